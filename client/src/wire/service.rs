//! `cilium/state/services/v1/<C>/<ns>/<svc>`: a global service as one cluster exports it
//! (`ClusterService`, `pkg/clustermesh/store/store.go`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::go::null_default;
use super::{ClusterId, Entry, Kind, Rejected, Validation, ensure};

/// Ports of one address, keyed by port name (`""` for an unnamed port).
pub type PortConfiguration = BTreeMap<String, L4Addr>;

/// A protocol and port (`loadbalancer.L4Addr`, no JSON tags).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct L4Addr {
    #[serde(rename = "Protocol", default, deserialize_with = "null_default")]
    pub protocol: String,
    #[serde(rename = "Port", default, deserialize_with = "null_default")]
    pub port: u16,
}

/// A remote cluster's view of one global service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClusterService {
    #[serde(deserialize_with = "null_default")]
    pub cluster: String,
    #[serde(deserialize_with = "null_default")]
    pub namespace: String,
    #[serde(deserialize_with = "null_default")]
    pub name: String,
    /// Service IPs; a key that is not an IP makes the whole value invalid (as in Cilium).
    #[serde(deserialize_with = "null_default")]
    pub frontends: BTreeMap<IpAddr, PortConfiguration>,
    /// Backend IPs (ready or serving endpoints).
    #[serde(deserialize_with = "null_default")]
    pub backends: BTreeMap<IpAddr, PortConfiguration>,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub hostnames: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub zones: BTreeMap<String, BackendZone>,
    #[serde(deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default")]
    pub selector: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default")]
    pub include_external: bool,
    /// `false`: the owner consumes remote backends but does not export its own; readers ignore
    /// such entries.
    #[serde(deserialize_with = "null_default")]
    pub shared: bool,
    #[serde(rename = "clusterID", deserialize_with = "null_default")]
    pub cluster_id: ClusterId,
}

/// Topology of one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackendZone {
    #[serde(deserialize_with = "null_default")]
    pub zone: String,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub for_zones: Vec<ZoneHint>,
}

/// A topology-aware routing hint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZoneHint {
    #[serde(deserialize_with = "null_default")]
    pub name: String,
}

impl ClusterService {
    /// `<namespace>/<name>`.
    pub fn namespaced_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Entry for ClusterService {
    const KIND: Kind = Kind::Services;

    /// Cilium's service rules (`Unmarshal`, `validate` and the validators of
    /// `pkg/clustermesh/store/store.go`): cluster, namespace and name set; the cluster ID valid
    /// unless it is the local one; every frontend and backend an IP; the cluster = the remote's
    /// name, `<namespace>/<name>` = the key, the cluster ID = the remote config's.
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected> {
        let service: ClusterService = serde_json::from_slice(value)?;
        ensure(!service.cluster.is_empty(), || Rejected::Unset("cluster"))?;
        ensure(!service.namespace.is_empty(), || Rejected::Unset("namespace"))?;
        ensure(!service.name.is_empty(), || Rejected::Unset("name"))?;
        if service.cluster_id != validation.local_cluster_id {
            validation.max_connected_clusters.check(service.cluster_id)?;
        }
        ensure(validation.cluster == service.cluster.as_str(), || Rejected::ClusterName {
            got: service.cluster.clone(),
            expected: validation.cluster.to_string(),
        })?;
        let name = service.namespaced_name();
        ensure(name == key, || Rejected::KeyMismatch { what: "namespaced name", got: name.clone(), key: key.into() })?;
        ensure(service.cluster_id == validation.cluster_id, || Rejected::ClusterId {
            got: service.cluster_id.0,
            expected: validation.cluster_id.0,
        })?;
        Ok(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::validation;

    const SERVICE: &str = r#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;

    fn decode(key: &str, value: &str) -> Result<ClusterService, Rejected> {
        ClusterService::decode(key, value.as_bytes(), &validation("cluster3", 3))
    }

    #[test]
    fn the_golden_service_decodes() {
        let service = decode("ns-alpha/echo-service", SERVICE).unwrap();
        let backend: IpAddr = "10.244.1.10".parse().unwrap();
        assert_eq!(service.backends[&backend]["http"], L4Addr { protocol: "TCP".into(), port: 8080 });
        assert!(service.shared);
    }

    #[test]
    fn services_breaking_a_rule_are_rejected() {
        assert!(matches!(decode("ns-alpha/other", SERVICE), Err(Rejected::KeyMismatch { .. })));
        assert!(matches!(
            decode("ns-alpha/echo-service", &SERVICE.replace("\"cluster3\"", "\"cluster4\"")),
            Err(Rejected::ClusterName { .. })
        ));
        assert!(matches!(
            decode("ns-alpha/echo-service", &SERVICE.replace("\"clusterID\":3", "\"clusterID\":4")),
            Err(Rejected::ClusterId { .. })
        ));
        assert!(matches!(
            decode("ns-alpha/echo-service", &SERVICE.replace("\"clusterID\":3", "\"clusterID\":0")),
            Err(Rejected::InvalidClusterId(_))
        ));
        assert!(matches!(
            decode("ns-alpha/echo-service", &SERVICE.replace("10.244.1.10", "backend-1")),
            Err(Rejected::Json(_))
        ));
        assert!(matches!(decode("/echo-service", &SERVICE.replace("ns-alpha", "")), Err(Rejected::Unset("namespace"))));
    }
}
