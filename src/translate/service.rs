//! Global Services (+ their EndpointSlices) → `cilium/state/services/v1/<cluster>/<ns>/<name>`
//! (Go `ClusterService`).
//!
//! A Service is exported when annotated global (`service.cilium.io/global`, alias
//! `io.cilium/global-service`) and shared (`service.cilium.io/shared`, alias
//! `io.cilium/shared-service`, default true) and its namespace is global. Frontends are the
//! cluster IPs with every Service port; backends are the ready-or-serving addresses of the
//! EndpointSlices labelled `kubernetes.io/service-name=<name>` in the same namespace.

use std::collections::BTreeMap;

use crate::blob::Blob;

use super::encode::{JsonWriter, parse_ip};
use super::endpointslice::{Backend, ParsedSlice};
use super::namespace::bool_annotation;
use super::{Entry, Error, Result, SERVICES_PREFIX, Settings};
use crate::k8s::{EndpointSlice, Service};

const GLOBAL_SERVICE: &str = "service.cilium.io/global";
const GLOBAL_SERVICE_ALIAS: &str = "io.cilium/global-service";
const SHARED_SERVICE: &str = "service.cilium.io/shared";
const SHARED_SERVICE_ALIAS: &str = "io.cilium/shared-service";
/// Kubernetes marks headless Services with this label as well as with `clusterIP: None`.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// `(protocol, port)` of a named port; Go `loadbalancer.L4Addr`.
pub(crate) type L4Addr = (String, u16);

/// Everything `ClusterService` needs from the Service itself, validated once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClusterServiceTemplate {
    namespace: String,
    name: String,
    /// Cluster IPs as written in the Service (empty for headless Services).
    frontends: Vec<String>,
    ports: BTreeMap<String, L4Addr>,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
}

pub(crate) fn service_key(settings: &Settings, namespace: &str, name: &str) -> String {
    format!("{SERVICES_PREFIX}/{}/{namespace}/{name}", settings.cluster_name)
}

/// Cilium's `GetAnnotationShared`: global, and shared unless said otherwise. The shared
/// annotation is only read (and only validated) on global Services.
pub(crate) fn is_global_and_shared(service: &Service) -> Result<bool> {
    let annotations = service.metadata.annotations.as_ref();
    let get = |key: &str, alias: &str| annotations.and_then(|a| a.get(key).or_else(|| a.get(alias)));
    let global = match get(GLOBAL_SERVICE, GLOBAL_SERVICE_ALIAS) {
        Some(value) => bool_annotation(GLOBAL_SERVICE, value)?,
        None => false,
    };
    if !global {
        return Ok(false);
    }
    match get(SHARED_SERVICE, SHARED_SERVICE_ALIAS) {
        Some(value) => bool_annotation(SHARED_SERVICE, value),
        None => Ok(true),
    }
}

/// `Ok(None)` when the Service is not a global shared Service.
pub(crate) fn parse(service: &Service) -> Result<Option<ClusterServiceTemplate>> {
    let name = service
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.name" })?;
    let namespace = service
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.namespace" })?;
    if !is_global_and_shared(service)? {
        return Ok(None);
    }
    let spec = service.spec.as_ref();
    let labels = service.metadata.labels.clone().unwrap_or_default();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or("");
    let headless = labels.contains_key(HEADLESS_LABEL) || cluster_ip.eq_ignore_ascii_case("none");

    let mut frontends = Vec::new();
    let mut ports = BTreeMap::new();
    if !headless {
        let cluster_ips = spec.and_then(|s| s.cluster_ips.as_deref()).filter(|ips| !ips.is_empty());
        let candidates: Vec<(String, &str)> = match cluster_ips {
            Some(ips) => ips.iter().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str())).collect(),
            None => vec![("spec.clusterIP".to_string(), cluster_ip)],
        };
        for (field, ip) in candidates {
            // Without a cluster IP (an ExternalName Service, or one that skipped API-server
            // allocation) Cilium would publish an empty frontend key, which agents reject.
            if ip.is_empty() {
                continue;
            }
            if parse_ip(ip).is_none() {
                return Err(Error::InvalidIp { field, value: ip.into() });
            }
            // Cilium keys frontends by the string as written; the API server writes canonical IPs.
            frontends.push(ip.to_string());
        }
        for (i, port) in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default().iter().enumerate() {
            let number = u16::try_from(port.port).map_err(|_| Error::InvalidValue {
                field: format!("spec.ports[{i}].port"),
                value: port.port.to_string(),
                expected: "a port number in 0..=65535",
            })?;
            // An empty protocol only occurs on objects that skipped defaulting: use the default.
            let protocol = port.protocol.as_deref().filter(|p| !p.is_empty()).unwrap_or("TCP");
            ports.insert(port.name.clone().unwrap_or_default(), (protocol.to_string(), number));
        }
    }

    Ok(Some(ClusterServiceTemplate {
        namespace: namespace.into(),
        name: name.into(),
        frontends,
        ports,
        labels,
        selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
    }))
}

/// Renders the `ClusterService` of a template with the backends of its EndpointSlices, which
/// must be given in a stable order (the model uses slice-name order): when two slices list the
/// same address, the later one's ports win, as Cilium's map assignment does.
pub(crate) fn render<'a>(
    template: &ClusterServiceTemplate,
    slices: impl IntoIterator<Item = &'a ParsedSlice>,
    settings: &Settings,
) -> Entry {
    let mut backends: BTreeMap<&str, &BTreeMap<String, L4Addr>> = BTreeMap::new();
    let mut hostnames: BTreeMap<&str, &str> = BTreeMap::new();
    let mut zones: BTreeMap<&str, &Backend> = BTreeMap::new();
    for slice in slices {
        for (address, backend) in &slice.backends {
            // Terminating-but-serving endpoints still take traffic, so they are exported too.
            if !backend.ready && !backend.serving {
                continue;
            }
            backends.insert(address, &backend.ports);
            if !backend.hostname.is_empty() {
                hostnames.insert(address, &backend.hostname);
            }
            if !backend.zone.is_empty() {
                zones.insert(address, backend);
            }
        }
    }

    let mut w = JsonWriter::new();
    w.begin_object();
    w.field_str("cluster", &settings.cluster_name);
    w.field_str("namespace", &template.namespace);
    w.field_str("name", &template.name);
    w.key("frontends");
    w.begin_object();
    let frontends: std::collections::BTreeSet<&str> = template.frontends.iter().map(String::as_str).collect();
    for ip in frontends {
        w.key(ip);
        write_ports(&mut w, &template.ports);
    }
    w.end_object();
    w.key("backends");
    w.begin_object();
    for (address, ports) in &backends {
        w.key(address);
        write_ports(&mut w, ports);
    }
    w.end_object();
    if !hostnames.is_empty() {
        w.key("hostnames");
        w.begin_object();
        for (address, hostname) in &hostnames {
            w.field_str(address, hostname);
        }
        w.end_object();
    }
    if !zones.is_empty() {
        w.key("zones");
        w.begin_object();
        for (address, backend) in &zones {
            w.key(address);
            w.begin_object();
            w.field_str("zone", &backend.zone);
            w.key("forZones");
            w.begin_array();
            for zone in &backend.for_zones {
                w.begin_object();
                w.field_str("name", zone);
                w.end_object();
            }
            w.end_array();
            w.end_object();
        }
        w.end_object();
    }
    w.key("labels");
    w.string_map(Some(&template.labels));
    w.key("selector");
    w.string_map(Some(&template.selector));
    w.field_bool("includeExternal", true);
    w.field_bool("shared", true);
    w.field_uint("clusterID", u64::from(settings.cluster_id));
    w.end_object();
    (service_key(settings, &template.namespace, &template.name).into(), Blob::from(w.finish()))
}

/// `PortConfiguration`: port name → `{"Protocol": ..., "Port": ...}` (Go `L4Addr`, no tags).
fn write_ports(w: &mut JsonWriter, ports: &BTreeMap<String, L4Addr>) {
    w.begin_object();
    for (name, (protocol, port)) in ports {
        w.key(name);
        w.begin_object();
        w.field_str("Protocol", protocol);
        w.field_uint("Port", u64::from(*port));
        w.end_object();
    }
    w.end_object();
}

/// Translates one Service with the EndpointSlices that may back it (slices of other services or
/// namespaces are ignored). `Ok(None)` when the Service is not global and shared. The namespace
/// filter is not applied here: that is the model's job.
pub fn cluster_service_entry(
    service: &Service,
    slices: &[EndpointSlice],
    settings: &Settings,
) -> Result<Option<Entry>> {
    let Some(template) = parse(service)? else { return Ok(None) };
    let mut parsed = Vec::new();
    for slice in slices {
        let slice = super::endpointslice::parse(slice, settings)?;
        if slice.namespace == template.namespace && slice.service.as_deref() == Some(template.name.as_str()) {
            parsed.push(slice);
        }
    }
    parsed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(render(&template, &parsed, settings)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::endpointslice::SERVICE_NAME_LABEL;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, ForZone};

    fn service(annotations: &[(&str, &str)], spec: ServiceSpec) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("db".into());
        svc.metadata.namespace = Some("payments".into());
        svc.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        svc.spec = Some(spec);
        svc
    }

    fn port(name: &str, protocol: Option<&str>, number: i32) -> ServicePort {
        ServicePort { name: Some(name.into()), protocol: protocol.map(Into::into), port: number, ..Default::default() }
    }

    fn endpoint(addresses: &[&str], ready: Option<bool>, serving: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            conditions: Some(EndpointConditions { ready, serving, terminating: None }),
            ..Default::default()
        }
    }

    fn slice(name: &str, address_type: &str, endpoints: Vec<Endpoint>, ports: &[(&str, i32)]) -> EndpointSlice {
        let mut slice = EndpointSlice {
            address_type: address_type.into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        slice.metadata.name = Some(name.into());
        slice.metadata.namespace = Some("payments".into());
        slice.metadata.labels = Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), "db".to_string())]));
        slice
    }

    fn text(entry: Option<Entry>) -> String {
        let (_, value) = entry.expect("exported");
        String::from_utf8(value.to_vec()).expect("utf-8")
    }

    #[test]
    fn a_dual_stack_service_with_hostnames_and_zones_matches_the_reference_vector() {
        let mut svc = service(
            &[("service.cilium.io/global", "true")],
            ServiceSpec {
                cluster_ip: Some("10.97.0.15".into()),
                cluster_ips: Some(vec!["10.97.0.15".into(), "fd00:10:97::3f21".into()]),
                ports: Some(vec![port("postgres", Some("TCP"), 5432), port("metrics", Some("TCP"), 9187)]),
                selector: Some(BTreeMap::from([("app".to_string(), "db".to_string())])),
                ..Default::default()
            },
        );
        svc.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/name".to_string(), "db".to_string())]));
        let with_topology = |address: &str| Endpoint {
            hostname: Some("db-0".into()),
            zone: Some("eu-west-1b".into()),
            hints: Some(EndpointHints {
                for_zones: Some(vec![ForZone { name: "eu-west-1b".into() }]),
                for_nodes: None,
            }),
            ..endpoint(&[address], Some(true), Some(true))
        };
        let slices = [
            slice("db-v4", "IPv4", vec![with_topology("10.2.3.91")], &[("postgres", 5432), ("metrics", 9187)]),
            slice("db-v6", "IPv6", vec![with_topology("fd00:10:2:3::3a5c")], &[("postgres", 5432), ("metrics", 9187)]),
        ];
        assert_eq!(
            text(cluster_service_entry(&svc, &slices, &Settings::new("cluster2", 2)).expect("valid")),
            r#"{"cluster":"cluster2","namespace":"payments","name":"db","frontends":{"10.97.0.15":{"metrics":{"Protocol":"TCP","Port":9187},"postgres":{"Protocol":"TCP","Port":5432}},"fd00:10:97::3f21":{"metrics":{"Protocol":"TCP","Port":9187},"postgres":{"Protocol":"TCP","Port":5432}}},"backends":{"10.2.3.91":{"metrics":{"Protocol":"TCP","Port":9187},"postgres":{"Protocol":"TCP","Port":5432}},"fd00:10:2:3::3a5c":{"metrics":{"Protocol":"TCP","Port":9187},"postgres":{"Protocol":"TCP","Port":5432}}},"hostnames":{"10.2.3.91":"db-0","fd00:10:2:3::3a5c":"db-0"},"zones":{"10.2.3.91":{"zone":"eu-west-1b","forZones":[{"name":"eu-west-1b"}]},"fd00:10:2:3::3a5c":{"zone":"eu-west-1b","forZones":[{"name":"eu-west-1b"}]}},"labels":{"app.kubernetes.io/name":"db"},"selector":{"app":"db"},"includeExternal":true,"shared":true,"clusterID":2}"#
        );
    }

    #[test]
    fn a_headless_service_has_empty_frontends_but_keeps_its_backends() {
        let mut svc = service(
            &[("io.cilium/global-service", "TRUE")],
            ServiceSpec {
                cluster_ip: Some("None".into()),
                cluster_ips: Some(vec!["None".into()]),
                ports: Some(vec![port("dns", Some("UDP"), 53)]),
                selector: Some(BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())])),
                ..Default::default()
            },
        );
        svc.metadata.name = Some("dns-headless".into());
        svc.metadata.namespace = Some("kube-system".into());
        let mut dns = slice("dns-1", "IPv4", vec![endpoint(&["10.1.0.88"], None, None)], &[]);
        dns.metadata.namespace = Some("kube-system".into());
        dns.metadata.labels = Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), "dns-headless".to_string())]));
        dns.ports = Some(vec![
            EndpointPort {
                name: Some("dns".into()),
                port: Some(53),
                protocol: Some("UDP".into()),
                ..Default::default()
            },
            EndpointPort { name: Some("dns-tcp".into()), port: Some(53), protocol: None, ..Default::default() },
            EndpointPort {
                name: Some("quic".into()),
                port: Some(853),
                protocol: Some("QUIC".into()),
                ..Default::default()
            },
            EndpointPort { name: Some("unset".into()), port: None, protocol: None, ..Default::default() },
        ]);
        assert_eq!(
            text(cluster_service_entry(&svc, &[dns], &Settings::new("cluster1", 1)).expect("valid")),
            r#"{"cluster":"cluster1","namespace":"kube-system","name":"dns-headless","frontends":{},"backends":{"10.1.0.88":{"dns":{"Protocol":"UDP","Port":53},"dns-tcp":{"Protocol":"TCP","Port":53}}},"labels":{},"selector":{"k8s-app":"kube-dns"},"includeExternal":true,"shared":true,"clusterID":1}"#
        );
    }

    #[test]
    fn only_ready_or_serving_endpoints_become_backends() {
        let svc = service(
            &[("service.cilium.io/global", "true")],
            ServiceSpec {
                cluster_ip: Some("10.96.0.1".into()),
                ports: Some(vec![port("", None, 80)]),
                ..Default::default()
            },
        );
        let slices = [slice(
            "db-1",
            "IPv4",
            vec![
                endpoint(&["10.0.0.1"], Some(true), Some(true)),
                endpoint(&["10.0.0.2"], Some(false), Some(true)),
                endpoint(&["10.0.0.3"], Some(false), Some(false)),
                endpoint(&["10.0.0.4"], Some(false), None),
            ],
            &[("", 8080)],
        )];
        assert_eq!(
            text(cluster_service_entry(&svc, &slices, &Settings::new("c", 1)).expect("valid")),
            r#"{"cluster":"c","namespace":"payments","name":"db","frontends":{"10.96.0.1":{"":{"Protocol":"TCP","Port":80}}},"backends":{"10.0.0.1":{"":{"Protocol":"TCP","Port":8080}},"10.0.0.2":{"":{"Protocol":"TCP","Port":8080}},"10.0.0.4":{"":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":1}"#
        );
    }

    #[test]
    fn non_global_or_unshared_services_are_not_exported() {
        let spec = ServiceSpec { cluster_ip: Some("10.96.0.1".into()), ..Default::default() };
        let settings = Settings::new("c", 1);
        assert_eq!(cluster_service_entry(&service(&[], spec.clone()), &[], &settings), Ok(None));
        assert_eq!(
            cluster_service_entry(&service(&[("service.cilium.io/global", "false")], spec.clone()), &[], &settings),
            Ok(None)
        );
        assert_eq!(
            cluster_service_entry(
                &service(&[("service.cilium.io/global", "true"), ("service.cilium.io/shared", "false")], spec.clone()),
                &[],
                &settings
            ),
            Ok(None)
        );
        // The shared annotation is ignored (and not validated) on non-global services.
        assert_eq!(
            cluster_service_entry(&service(&[("service.cilium.io/shared", "maybe")], spec), &[], &settings),
            Ok(None)
        );
    }

    #[test]
    fn malformed_annotations_and_bad_cluster_ips_are_errors() {
        let spec = ServiceSpec { cluster_ip: Some("10.96.0.1".into()), ..Default::default() };
        let settings = Settings::new("c", 1);
        assert!(matches!(
            cluster_service_entry(&service(&[("service.cilium.io/global", "yes")], spec), &[], &settings),
            Err(Error::MalformedAnnotation { annotation: "service.cilium.io/global", .. })
        ));
        let spec = ServiceSpec { cluster_ips: Some(vec!["10.96.0.300".into()]), ..Default::default() };
        assert_eq!(
            cluster_service_entry(&service(&[("service.cilium.io/global", "true")], spec), &[], &settings),
            Err(Error::InvalidIp { field: "spec.clusterIPs[0]".into(), value: "10.96.0.300".into() })
        );
    }
}
