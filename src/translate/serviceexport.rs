//! MCS-API ServiceExport + Service → `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>`
//! (Go `MCSAPIServiceSpec`).
//!
//! Exported when both objects exist, MCS-API is enabled, the namespace is global and the Service
//! is not of type ExternalName. Cilium's reader rejects a `sessionAffinity` other than `"None"`
//! or `"ClientIP"`, so an empty one (only possible on objects that skipped API-server defaulting)
//! is exported as `"None"` (architecture decision 8; Cilium's golden file shows `""`).

use std::collections::BTreeMap;

use crate::blob::Blob;

use super::encode::JsonWriter;
use super::{Entry, Error, Result, SERVICE_EXPORTS_PREFIX, Settings};
use crate::k8s::{Service, ServiceExport};

/// What the export needs from the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceTemplate {
    external_name: bool,
    /// name, protocol, appProtocol, port of each Service port (MCS-API `ServicePort`).
    ports: Vec<(String, String, String, i32)>,
    headless: bool,
    session_affinity: String,
    timeout_seconds: Option<i32>,
    ip_families: Vec<String>,
    internal_traffic_policy: Option<String>,
    traffic_distribution: Option<String>,
}

/// What the export needs from the ServiceExport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExportTemplate {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    /// `metav1.Time` JSON: RFC 3339, UTC, whole seconds.
    created: String,
}

pub(crate) fn service_export_key(settings: &Settings, namespace: &str, name: &str) -> String {
    format!("{SERVICE_EXPORTS_PREFIX}/{}/{namespace}/{name}", settings.cluster_name)
}

pub(crate) fn parse_service(service: &Service) -> ServiceTemplate {
    let spec = service.spec.as_ref();
    let session_affinity = spec.and_then(|s| s.session_affinity.as_deref()).filter(|a| !a.is_empty()).unwrap_or("None");
    ServiceTemplate {
        external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
        ports: spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.protocol.clone().unwrap_or_default(),
                    p.app_protocol.clone().unwrap_or_default(),
                    p.port,
                )
            })
            .collect(),
        headless: spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None"),
        session_affinity: session_affinity.to_string(),
        timeout_seconds: spec
            .and_then(|s| s.session_affinity_config.as_ref())
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds),
        ip_families: spec.and_then(|s| s.ip_families.clone()).unwrap_or_default(),
        internal_traffic_policy: spec.and_then(|s| s.internal_traffic_policy.clone()),
        traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
    }
}

pub(crate) fn parse_export(export: &ServiceExport) -> Result<ExportTemplate> {
    export.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or(Error::MissingField { field: "metadata.name" })?;
    // Readers reject a zero timestamp: it drives MCS-API conflict resolution.
    let created = export
        .metadata
        .creation_timestamp
        .as_ref()
        .ok_or(Error::MissingField { field: "metadata.creationTimestamp" })?;
    let created =
        k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", created.0).map_err(|_| Error::InvalidValue {
            field: "metadata.creationTimestamp".into(),
            value: created.0.to_string(),
            expected: "a timestamp between years 0 and 9999",
        })?;
    let spec = export.spec.spec.as_ref();
    Ok(ExportTemplate {
        labels: spec.and_then(|s| s.exported_labels.clone()).unwrap_or_default(),
        annotations: spec.and_then(|s| s.exported_annotations.clone()).unwrap_or_default(),
        created,
    })
}

/// Renders the export; `None` for ExternalName Services, which MCS-API cannot export.
pub(crate) fn render(
    settings: &Settings,
    namespace: &str,
    name: &str,
    service: &ServiceTemplate,
    export: &ExportTemplate,
) -> Option<Entry> {
    if service.external_name {
        return None;
    }
    let mut w = JsonWriter::new();
    w.begin_object();
    w.field_str("cluster", &settings.cluster_name);
    w.field_str("name", name);
    w.field_str("namespace", namespace);
    if !export.annotations.is_empty() {
        w.key("annotations");
        w.string_map(Some(&export.annotations));
    }
    if !export.labels.is_empty() {
        w.key("labels");
        w.string_map(Some(&export.labels));
    }
    w.field_str("exportCreationTimestamp", &export.created);
    w.key("ports");
    w.begin_array();
    for (port_name, protocol, app_protocol, port) in &service.ports {
        w.begin_object();
        for (key, value) in [("name", port_name), ("protocol", protocol), ("appProtocol", app_protocol)] {
            if !value.is_empty() {
                w.field_str(key, value);
            }
        }
        w.key("port");
        w.int(i64::from(*port));
        w.end_object();
    }
    w.end_array();
    w.field_str("type", if service.headless { "Headless" } else { "ClusterSetIP" });
    w.field_str("sessionAffinity", &service.session_affinity);
    if let Some(timeout) = service.timeout_seconds {
        w.key("sessionAffinityConfig");
        w.begin_object();
        w.key("clientIP");
        w.begin_object();
        w.key("timeoutSeconds");
        w.int(i64::from(timeout));
        w.end_object();
        w.end_object();
    }
    if !service.ip_families.is_empty() {
        w.key("ipFamilies");
        w.begin_array();
        for family in &service.ip_families {
            w.string(family);
        }
        w.end_array();
    }
    if let Some(policy) = &service.internal_traffic_policy {
        w.field_str("internalTrafficPolicy", policy);
    }
    if let Some(distribution) = &service.traffic_distribution {
        w.field_str("trafficDistribution", distribution);
    }
    w.end_object();
    Some((service_export_key(settings, namespace, name).into(), Blob::from(w.finish())))
}

/// Translates a Service and its ServiceExport (same namespace and name). `Ok(None)` for
/// ExternalName Services. The MCS-API switch and the namespace filter are the model's job.
pub fn service_export_entry(service: &Service, export: &ServiceExport, settings: &Settings) -> Result<Option<Entry>> {
    let name = export.metadata.name.as_deref().ok_or(Error::MissingField { field: "metadata.name" })?;
    let namespace = export.metadata.namespace.as_deref().ok_or(Error::MissingField { field: "metadata.namespace" })?;
    Ok(render(settings, namespace, name, &parse_service(service), &parse_export(export)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{ServiceExportFields, ServiceExportSpec};
    use k8s_openapi::api::core::v1::{ClientIPConfig, ServicePort, ServiceSpec, SessionAffinityConfig};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn export(labels: &[(&str, &str)], annotations: &[(&str, &str)], created: Option<&str>) -> ServiceExport {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        let mut export = ServiceExport::new(
            "db",
            ServiceExportFields {
                spec: Some(ServiceExportSpec { exported_labels: map(labels), exported_annotations: map(annotations) }),
            },
        );
        export.metadata.namespace = Some("payments".into());
        export.metadata.creation_timestamp = created.map(|t| Time(t.parse().expect("timestamp")));
        export
    }

    fn service(spec: ServiceSpec) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("db".into());
        svc.metadata.namespace = Some("payments".into());
        svc.spec = Some(spec);
        svc
    }

    fn text(entry: Option<Entry>) -> String {
        String::from_utf8(entry.expect("exported").1.to_vec()).expect("utf-8")
    }

    #[test]
    fn a_dual_stack_export_with_app_protocol_matches_the_reference_vector() {
        let svc = service(ServiceSpec {
            cluster_ip: Some("10.97.0.15".into()),
            ports: Some(vec![
                ServicePort {
                    name: Some("postgres".into()),
                    protocol: Some("TCP".into()),
                    port: 5432,
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                    port: 9187,
                    ..Default::default()
                },
            ]),
            session_affinity: Some("None".into()),
            ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
            internal_traffic_policy: Some("Cluster".into()),
            ..Default::default()
        });
        let (key, _) = service_export_entry(
            &svc,
            &export(&[], &[], Some("2026-03-14T08:30:00.75Z")),
            &Settings::new("cluster2", 2),
        )
        .expect("valid")
        .expect("exported");
        assert_eq!(&*key, "cilium/state/serviceexports/v1/cluster2/payments/db");
        assert_eq!(
            text(
                service_export_entry(
                    &svc,
                    &export(&[], &[], Some("2026-03-14T08:30:00Z")),
                    &Settings::new("cluster2", 2)
                )
                .expect("valid")
            ),
            r#"{"cluster":"cluster2","name":"db","namespace":"payments","exportCreationTimestamp":"2026-03-14T08:30:00Z","ports":[{"name":"postgres","protocol":"TCP","port":5432},{"name":"metrics","protocol":"TCP","appProtocol":"http","port":9187}],"type":"ClusterSetIP","sessionAffinity":"None","ipFamilies":["IPv4","IPv6"],"internalTrafficPolicy":"Cluster"}"#
        );
    }

    #[test]
    fn client_ip_affinity_exported_labels_and_annotations_are_carried() {
        let svc = service(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(vec![ServicePort { port: 6379, ..Default::default() }]),
            session_affinity: Some("ClientIP".into()),
            session_affinity_config: Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig { timeout_seconds: Some(10800) }),
            }),
            traffic_distribution: Some("PreferClose".into()),
            ..Default::default()
        });
        assert_eq!(
            text(
                service_export_entry(
                    &svc,
                    &export(&[("tier", "edge")], &[("owner", "a<b")], Some("2026-01-01T00:00:00Z")),
                    &Settings::new("c", 1)
                )
                .expect("valid")
            ),
            r#"{"cluster":"c","name":"db","namespace":"payments","annotations":{"owner":"a\u003cb"},"labels":{"tier":"edge"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"port":6379}],"type":"Headless","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":10800}},"trafficDistribution":"PreferClose"}"#
        );
    }

    #[test]
    fn an_undefaulted_session_affinity_is_exported_as_none() {
        let svc = service(ServiceSpec { ports: Some(vec![]), ..Default::default() });
        assert_eq!(
            text(
                service_export_entry(&svc, &export(&[], &[], Some("2026-01-01T00:00:00Z")), &Settings::new("c", 1))
                    .expect("valid")
            ),
            r#"{"cluster":"c","name":"db","namespace":"payments","exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[],"type":"ClusterSetIP","sessionAffinity":"None"}"#
        );
    }

    #[test]
    fn external_name_services_are_not_exported_and_a_missing_timestamp_is_invalid() {
        let svc = service(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("example.com".into()),
            ..Default::default()
        });
        assert_eq!(
            service_export_entry(&svc, &export(&[], &[], Some("2026-01-01T00:00:00Z")), &Settings::new("c", 1)),
            Ok(None)
        );
        assert_eq!(
            service_export_entry(&svc, &export(&[], &[], None), &Settings::new("c", 1)),
            Err(Error::MissingField { field: "metadata.creationTimestamp" })
        );
    }
}
