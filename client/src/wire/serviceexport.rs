//! `cilium/state/serviceexports/v1/<C>/<ns>/<svc>`: an MCS-API service export (1.17+;
//! `MCSAPIServiceSpec`, `pkg/clustermesh/mcsapi/types/mcsapiservicespec.go`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::go::null_default;
use super::{Entry, Kind, Rejected, Validation, ensure};

/// One exported service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceExport {
    #[serde(deserialize_with = "null_default")]
    pub cluster: String,
    #[serde(deserialize_with = "null_default")]
    pub name: String,
    #[serde(deserialize_with = "null_default")]
    pub namespace: String,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, seconds precision; `None` is Go's zero time (`null`), which is refused.
    pub export_creation_timestamp: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub ports: Vec<ServiceExportPort>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type", deserialize_with = "null_default")]
    pub service_type: String,
    /// `ClientIP` or `None`.
    #[serde(deserialize_with = "null_default")]
    pub session_affinity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<serde_json::Value>,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

/// An MCS-API `ServicePort`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceExportPort {
    #[serde(deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub port: i32,
}

impl Entry for ServiceExport {
    const KIND: Kind = Kind::ServiceExports;

    /// Cilium's rules (`validate` and the validators of `mcsapiservicespec.go`): cluster,
    /// namespace, name and creation timestamp set; type, session affinity, internal traffic
    /// policy and traffic distribution within their enums; the cluster = the remote's name and
    /// `<namespace>/<name>` = the key. Service exports carry no cluster ID.
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected> {
        let export: ServiceExport = serde_json::from_slice(value)?;
        let enumerated = |field, value: &str, allowed: &[&str]| {
            ensure(allowed.contains(&value), || Rejected::Enum { field, value: value.into() })
        };
        ensure(!export.cluster.is_empty(), || Rejected::Unset("cluster"))?;
        ensure(!export.namespace.is_empty(), || Rejected::Unset("namespace"))?;
        ensure(!export.name.is_empty(), || Rejected::Unset("name"))?;
        match &export.export_creation_timestamp {
            Some(ts) if crate::display::is_rfc3339(ts) => {}
            Some(ts) => return Err(Rejected::Enum { field: "exportCreationTimestamp", value: ts.clone() }),
            None => return Err(Rejected::Unset("exportCreationTimestamp")),
        }
        enumerated("type", &export.service_type, &["ClusterSetIP", "Headless"])?;
        enumerated("session affinity", &export.session_affinity, &["ClientIP", "None"])?;
        if let Some(policy) = &export.internal_traffic_policy {
            enumerated("internal traffic policy", policy, &["Cluster", "Local"])?;
        }
        if let Some(distribution) = &export.traffic_distribution {
            enumerated("traffic distribution", distribution, &["PreferClose", "PreferSameZone", "PreferSameNode"])?;
        }
        ensure(validation.cluster == export.cluster.as_str(), || Rejected::ClusterName {
            got: export.cluster.clone(),
            expected: validation.cluster.to_string(),
        })?;
        let name = format!("{}/{}", export.namespace, export.name);
        ensure(name == key, || Rejected::KeyMismatch { what: "namespaced name", got: name.clone(), key: key.into() })?;
        Ok(export)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::validation;

    const EXPORT: &str = r#"{"cluster":"cluster1","name":"basic","namespace":"default","annotations":{"my-annotation":"foo"},"labels":{"my-label":"test"},"exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"my-port-1","protocol":"TCP","port":80}],"type":"ClusterSetIP","sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":42}}}"#;

    fn decode(key: &str, value: &str) -> Result<ServiceExport, Rejected> {
        ServiceExport::decode(key, value.as_bytes(), &validation("cluster1", 1))
    }

    #[test]
    fn the_golden_export_decodes() {
        let export = decode("default/basic", EXPORT).unwrap();
        assert_eq!(export.ports[0].port, 80);
        assert_eq!(export.session_affinity, "ClientIP");
    }

    #[test]
    fn exports_breaking_a_rule_are_rejected() {
        let cases = [
            ("default/other", EXPORT.to_string()),
            ("default/basic", EXPORT.replace("\"cluster1\"", "\"cluster2\"")),
            ("default/basic", EXPORT.replace("ClusterSetIP", "LoadBalancer")),
            ("default/basic", EXPORT.replace("\"ClientIP\",", "\"\",")),
            ("default/basic", EXPORT.replace("\"2026-01-01T00:00:00Z\"", "null")),
            ("default/basic", EXPORT.replace("\"2026-01-01T00:00:00Z\"", "\"yesterday\"")),
            ("default/basic", EXPORT.replace("\"type\"", "\"trafficDistribution\":\"Anywhere\",\"type\"")),
        ];
        for (key, value) in cases {
            assert!(decode(key, &value).is_err(), "{key}: {value}");
        }
    }
}
