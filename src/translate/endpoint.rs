//! CiliumEndpoints and CiliumEndpointSlices → `cilium/state/ip/v1/default/<ip>` (Go
//! `identity.IPIdentityPair`), one entry per endpoint IP.
//!
//! The key suffix must equal the value's `IP` in Go's `net.IP` text form: agents reject entries
//! where they differ, so both come from the same rendering.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::blob::Blob;

use super::encode::{JsonWriter, go_net_ip, parse_ip};
use super::names::Names;
use super::{Entry, Error, IPCACHE_PREFIX, Result};
use crate::k8s::{CiliumEndpoint, CiliumEndpointSlice, EncryptionSpec, EndpointNetworking, NamedPort};

/// The ipcache entries of one endpoint-carrying object, and the namespace the global-namespace
/// filter looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointEntries {
    /// Shared with every other holder of the name (see [`Names`]).
    pub(crate) namespace: Arc<str>,
    /// In input order; when the object lists an IP twice the later endpoint's value wins, as
    /// sequential upserts would in Cilium. Exactly sized: kept for every endpoint, mostly one
    /// entry each, where a grown vector reserves four.
    pub(crate) entries: Box<[Entry]>,
}

/// The ipcache entries of a CiliumEndpoint: one per non-empty IPv4/IPv6 of
/// `status.networking.addressing`, with the pod UID taken from a `Pod` owner reference.
/// Returns the endpoint's namespace and the entries (none while the endpoint has no networking).
pub fn cilium_endpoint_entries(endpoint: &CiliumEndpoint) -> Result<(String, Vec<Entry>)> {
    let parsed = parse_cilium_endpoint(endpoint, &mut Names::default())?;
    Ok((parsed.namespace.to_string(), parsed.entries.into_vec()))
}

/// The ipcache entries of every endpoint in a CiliumEndpointSlice; the namespace is the slice's
/// top-level `namespace` field.
pub fn cilium_endpoint_slice_entries(slice: &CiliumEndpointSlice) -> Result<(String, Vec<Entry>)> {
    let parsed = parse_cilium_endpoint_slice(slice, &mut Names::default())?;
    Ok((parsed.namespace.to_string(), parsed.entries.into_vec()))
}

/// The namespace's handle comes from `names`, shared with the model's other holders.
pub(crate) fn parse_cilium_endpoint(endpoint: &CiliumEndpoint, names: &mut Names) -> Result<EndpointEntries> {
    let name = endpoint
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.name" })?;
    let namespace = endpoint
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.namespace" })?;
    let pod_uid = endpoint
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|owner| owner.kind == "Pod")
        .map_or("", |owner| owner.uid.as_str());

    let mut out = Collector::new(names.get(namespace));
    let Some(status) = endpoint.status.as_ref() else { return Ok(out.finish()) };
    let identity = match status.identity.as_ref().and_then(|i| i.id) {
        None => 0,
        Some(id) => numeric_identity(id, "status.identity.id")?,
    };
    let meta = Metadata {
        namespace,
        pod_name: name,
        pod_uid,
        workload_name: "",
        workload_kind: "",
        service_account: status.service_account.as_deref().unwrap_or(""),
    };
    out.add(
        "status",
        status.networking.as_ref(),
        identity,
        encryption_key(status.encryption.as_ref(), "status.encryption.key")?,
        &named_ports(status.named_ports.as_deref(), "status.named-ports")?,
        &meta,
    )?;
    Ok(out.finish())
}

pub(crate) fn parse_cilium_endpoint_slice(slice: &CiliumEndpointSlice, names: &mut Names) -> Result<EndpointEntries> {
    slice.metadata.name.as_deref().filter(|n| !n.is_empty()).ok_or(Error::MissingField { field: "metadata.name" })?;
    let namespace =
        slice.spec.namespace.as_deref().filter(|n| !n.is_empty()).ok_or(Error::MissingField { field: "namespace" })?;

    let mut out = Collector::new(names.get(namespace));
    for (i, endpoint) in slice.spec.endpoints.as_deref().unwrap_or_default().iter().enumerate() {
        let workload = endpoint.workload.as_ref();
        let meta = Metadata {
            namespace,
            pod_name: endpoint.name.as_deref().unwrap_or(""),
            pod_uid: endpoint.pod_uid.as_deref().unwrap_or(""),
            workload_name: workload.and_then(|w| w.name.as_deref()).unwrap_or(""),
            workload_kind: workload.and_then(|w| w.kind.as_deref()).unwrap_or(""),
            service_account: endpoint.service_account.as_deref().unwrap_or(""),
        };
        let identity = numeric_identity(endpoint.id.unwrap_or(0), &format!("endpoints[{i}].id"))?;
        let key = encryption_key(endpoint.encryption.as_ref(), &format!("endpoints[{i}].encryption.key"))?;
        let ports = named_ports(endpoint.named_ports.as_deref(), &format!("endpoints[{i}].named-ports"))?;
        out.add(&format!("endpoints[{i}]"), endpoint.networking.as_ref(), identity, key, &ports, &meta)?;
    }
    Ok(out.finish())
}

/// The per-endpoint strings of an `IPIdentityPair`; empty ones are omitted (`omitempty`).
struct Metadata<'a> {
    namespace: &'a str,
    pod_name: &'a str,
    pod_uid: &'a str,
    workload_name: &'a str,
    workload_kind: &'a str,
    service_account: &'a str,
}

struct Collector {
    namespace: Arc<str>,
    entries: Vec<Entry>,
    positions: HashMap<super::StoreKey, usize>,
}

impl Collector {
    fn new(namespace: Arc<str>) -> Self {
        Self { namespace, entries: Vec::new(), positions: HashMap::new() }
    }

    fn add(
        &mut self,
        path: &str,
        networking: Option<&EndpointNetworking>,
        identity: u32,
        key: u8,
        ports: &[(String, u16, String)],
        meta: &Metadata<'_>,
    ) -> Result<()> {
        let Some(networking) = networking else { return Ok(()) };
        let host_ip = match networking.node.as_deref().unwrap_or("") {
            "" => String::new(),
            text => go_net_ip(
                parse_ip(text)
                    .ok_or_else(|| Error::InvalidIp { field: format!("{path}.networking.node"), value: text.into() })?,
            ),
        };
        for (i, pair) in networking.addressing.as_deref().unwrap_or_default().iter().enumerate() {
            for (family, text) in [("ipv4", &pair.ipv4), ("ipv6", &pair.ipv6)] {
                let Some(text) = text.as_deref().filter(|t| !t.is_empty()) else { continue };
                let ip = parse_ip(text).ok_or_else(|| Error::InvalidIp {
                    field: format!("{path}.networking.addressing[{i}].{family}"),
                    value: text.into(),
                })?;
                self.push(ip_identity_pair(ip, &host_ip, identity, key, ports, meta));
            }
        }
        Ok(())
    }

    fn push(&mut self, (key, value): Entry) {
        match self.positions.get(&key) {
            Some(&at) => self.entries[at].1 = value,
            None => {
                self.positions.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    fn finish(self) -> EndpointEntries {
        EndpointEntries { namespace: self.namespace, entries: self.entries.into_boxed_slice() }
    }
}

/// `IPIdentityPair` in its newest field order. `Mask` is never set for endpoints and is omitted,
/// `Metadata` is always the empty string, the `K8s*` strings and `NamedPorts` are `omitempty`.
fn ip_identity_pair(
    ip: IpAddr,
    host_ip: &str,
    identity: u32,
    key: u8,
    ports: &[(String, u16, String)],
    meta: &Metadata<'_>,
) -> Entry {
    let ip_text = go_net_ip(ip);
    let mut w = JsonWriter::new();
    w.begin_object();
    w.field_str("IP", &ip_text);
    w.field_str("HostIP", host_ip);
    w.field_uint("ID", u64::from(identity));
    w.field_uint("Key", u64::from(key));
    w.field_str("Metadata", "");
    for (field, value) in [
        ("K8sNamespace", meta.namespace),
        ("K8sPodName", meta.pod_name),
        ("K8sPodUID", meta.pod_uid),
        ("K8sWorkloadName", meta.workload_name),
        ("K8sWorkloadKind", meta.workload_kind),
        ("K8sServiceAccount", meta.service_account),
    ] {
        if !value.is_empty() {
            w.field_str(field, value);
        }
    }
    if !ports.is_empty() {
        // Cilium's apiserver keeps the endpoint's order (only the agent's own writer sorts).
        w.key("NamedPorts");
        w.begin_array();
        for (name, port, protocol) in ports {
            w.begin_object();
            w.field_str("Name", name);
            w.field_uint("Port", u64::from(*port));
            w.field_str("Protocol", protocol);
            w.end_object();
        }
        w.end_array();
    }
    w.end_object();
    (format!("{IPCACHE_PREFIX}/{ip_text}").into(), Blob::from(w.finish()))
}

fn numeric_identity(id: i64, field: &str) -> Result<u32> {
    u32::try_from(id).map_err(|_| Error::InvalidValue {
        field: field.into(),
        value: id.to_string(),
        expected: "a numeric security identity",
    })
}

fn encryption_key(encryption: Option<&EncryptionSpec>, field: &str) -> Result<u8> {
    match encryption.and_then(|e| e.key) {
        None => Ok(0),
        Some(key) => u8::try_from(key).map_err(|_| Error::InvalidValue {
            field: field.into(),
            value: key.to_string(),
            expected: "an IPsec key index in 0..=255",
        }),
    }
}

fn named_ports(ports: Option<&[NamedPort]>, field: &str) -> Result<Vec<(String, u16, String)>> {
    ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let port = p.port.unwrap_or(0);
            let port = u16::try_from(port).map_err(|_| Error::InvalidValue {
                field: format!("{field}[{i}].port"),
                value: port.to_string(),
                expected: "a port number in 0..=65535",
            })?;
            Ok((p.name.clone().unwrap_or_default(), port, p.protocol.clone().unwrap_or_default()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{
        AddressPair, CiliumEndpointSliceFields, CoreCiliumEndpoint, EndpointIdentity, EndpointStatus, Workload,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn networking(pairs: &[(Option<&str>, Option<&str>)], node: &str) -> Option<EndpointNetworking> {
        Some(EndpointNetworking {
            addressing: Some(
                pairs
                    .iter()
                    .map(|(v4, v6)| AddressPair { ipv4: v4.map(Into::into), ipv6: v6.map(Into::into) })
                    .collect(),
            ),
            node: Some(node.into()),
        })
    }

    fn endpoint(namespace: &str, name: &str, status: EndpointStatus) -> CiliumEndpoint {
        let mut cep = CiliumEndpoint::new(name, Default::default());
        cep.metadata.namespace = Some(namespace.into());
        cep.status = Some(status);
        cep
    }

    fn values(entries: &[Entry]) -> Vec<(&str, &str)> {
        entries.iter().map(|(k, v)| (&**k, std::str::from_utf8(v).expect("utf-8"))).collect()
    }

    #[test]
    fn a_dual_stack_endpoint_with_pod_uid_and_named_ports_matches_the_reference_vector() {
        let mut cep = endpoint(
            "payments",
            "db-0",
            EndpointStatus {
                identity: Some(EndpointIdentity { id: Some(143210), labels: None }),
                networking: networking(&[(None, Some("fd00:10:2:3:0:0:0:3a5c"))], "172.18.0.7"),
                encryption: Some(EncryptionSpec { key: Some(3) }),
                named_ports: Some(vec![
                    NamedPort { name: Some("postgres".into()), port: Some(5432), protocol: Some("TCP".into()) },
                    NamedPort { name: Some("metrics".into()), port: Some(9187), protocol: Some("TCP".into()) },
                ]),
                service_account: Some("default".into()),
                ..Default::default()
            },
        );
        cep.metadata.owner_references = Some(vec![
            OwnerReference { kind: "ReplicaSet".into(), uid: "not-this-one".into(), ..Default::default() },
            OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: "db-0".into(),
                uid: "0b5a7f1e-2c44-4d2e-a1f3-6c0f9d8e7b21".into(),
                ..Default::default()
            },
        ]);
        let (namespace, entries) = cilium_endpoint_entries(&cep).expect("valid endpoint");
        assert_eq!(namespace, "payments");
        assert_eq!(
            values(&entries),
            [(
                "cilium/state/ip/v1/default/fd00:10:2:3::3a5c",
                r#"{"IP":"fd00:10:2:3::3a5c","HostIP":"172.18.0.7","ID":143210,"Key":3,"Metadata":"","K8sNamespace":"payments","K8sPodName":"db-0","K8sPodUID":"0b5a7f1e-2c44-4d2e-a1f3-6c0f9d8e7b21","K8sServiceAccount":"default","NamedPorts":[{"Name":"postgres","Port":5432,"Protocol":"TCP"},{"Name":"metrics","Port":9187,"Protocol":"TCP"}]}"#
            )]
        );
    }

    #[test]
    fn ipv4_mapped_endpoint_ips_are_keyed_by_their_ipv4_form() {
        let cep = endpoint(
            "shop",
            "frontend",
            EndpointStatus {
                networking: networking(&[(Some("::ffff:10.1.0.57"), None)], "::ffff:192.168.10.11"),
                ..Default::default()
            },
        );
        let (_, entries) = cilium_endpoint_entries(&cep).expect("valid endpoint");
        assert_eq!(
            values(&entries),
            [(
                "cilium/state/ip/v1/default/10.1.0.57",
                r#"{"IP":"10.1.0.57","HostIP":"192.168.10.11","ID":0,"Key":0,"Metadata":"","K8sNamespace":"shop","K8sPodName":"frontend"}"#
            )]
        );
    }

    #[test]
    fn an_endpoint_without_networking_has_no_entries_yet() {
        let cep = endpoint("ns", "pending", EndpointStatus::default());
        assert_eq!(cilium_endpoint_entries(&cep), Ok(("ns".to_string(), vec![])));
        let mut no_status = endpoint("ns", "pending", EndpointStatus::default());
        no_status.status = None;
        assert_eq!(cilium_endpoint_entries(&no_status), Ok(("ns".to_string(), vec![])));
    }

    #[test]
    fn bad_endpoint_ips_and_out_of_range_numbers_name_the_field() {
        let cep = endpoint(
            "ns",
            "x",
            EndpointStatus {
                networking: networking(&[(Some("10.0.0.1"), Some("fd00::zz"))], "10.1.1.1"),
                ..Default::default()
            },
        );
        assert_eq!(
            cilium_endpoint_entries(&cep),
            Err(Error::InvalidIp { field: "status.networking.addressing[0].ipv6".into(), value: "fd00::zz".into() })
        );
        let cep = endpoint(
            "ns",
            "x",
            EndpointStatus { networking: networking(&[(Some("10.0.0.1"), None)], "node-1"), ..Default::default() },
        );
        assert!(
            matches!(cilium_endpoint_entries(&cep), Err(Error::InvalidIp { field, .. }) if field == "status.networking.node")
        );
        let cep = endpoint(
            "ns",
            "x",
            EndpointStatus {
                identity: Some(EndpointIdentity { id: Some(-1), labels: None }),
                networking: networking(&[(Some("10.0.0.1"), None)], ""),
                ..Default::default()
            },
        );
        assert!(
            matches!(cilium_endpoint_entries(&cep), Err(Error::InvalidValue { field, .. }) if field == "status.identity.id")
        );
        let mut cep = endpoint("ns", "x", EndpointStatus::default());
        cep.metadata.namespace = None;
        assert_eq!(cilium_endpoint_entries(&cep), Err(Error::MissingField { field: "metadata.namespace" }));
    }

    #[test]
    fn slice_endpoints_carry_workload_and_the_later_duplicate_ip_wins() {
        let ces = CiliumEndpointSlice::new(
            "ces-1",
            CiliumEndpointSliceFields {
                namespace: Some("qux".into()),
                endpoints: Some(vec![
                    CoreCiliumEndpoint {
                        name: Some("foo-002".into()),
                        id: Some(199475),
                        networking: networking(&[(Some("10.244.2.74"), None)], "172.18.0.2"),
                        encryption: Some(EncryptionSpec { key: Some(5) }),
                        service_account: Some("default".into()),
                        pod_uid: Some("ces-pod-uid".into()),
                        workload: Some(Workload { kind: Some("Deployment".into()), name: Some("echo".into()) }),
                        ..Default::default()
                    },
                    CoreCiliumEndpoint {
                        name: Some("foo-003".into()),
                        id: Some(199476),
                        networking: networking(
                            &[(Some("10.244.2.91"), None), (Some("10.244.2.74"), None)],
                            "172.18.0.2",
                        ),
                        ..Default::default()
                    },
                ]),
            },
        );
        let (namespace, entries) = cilium_endpoint_slice_entries(&ces).expect("valid slice");
        assert_eq!(namespace, "qux");
        assert_eq!(
            values(&entries),
            [
                (
                    "cilium/state/ip/v1/default/10.244.2.74",
                    r#"{"IP":"10.244.2.74","HostIP":"172.18.0.2","ID":199476,"Key":0,"Metadata":"","K8sNamespace":"qux","K8sPodName":"foo-003"}"#
                ),
                (
                    "cilium/state/ip/v1/default/10.244.2.91",
                    r#"{"IP":"10.244.2.91","HostIP":"172.18.0.2","ID":199476,"Key":0,"Metadata":"","K8sNamespace":"qux","K8sPodName":"foo-003"}"#
                ),
            ]
        );

        let mut first_only = ces.clone();
        if let Some(endpoints) = first_only.spec.endpoints.as_mut() {
            endpoints.truncate(1);
        }
        let (_, entries) = cilium_endpoint_slice_entries(&first_only).expect("valid slice");
        assert_eq!(
            values(&entries)[0].1,
            r#"{"IP":"10.244.2.74","HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"qux","K8sPodName":"foo-002","K8sPodUID":"ces-pod-uid","K8sWorkloadName":"echo","K8sWorkloadKind":"Deployment","K8sServiceAccount":"default"}"#
        );
    }

    #[test]
    fn a_slice_without_namespace_is_invalid() {
        let ces = CiliumEndpointSlice::new("ces-1", CiliumEndpointSliceFields::default());
        assert_eq!(cilium_endpoint_slice_entries(&ces), Err(Error::MissingField { field: "namespace" }));
    }
}
