//! `cilium/cluster-config/<C>`: how a cluster describes itself (`CiliumClusterConfig`,
//! `pkg/clustermesh/types/types.go`).

use serde::{Deserialize, Serialize};

use super::go::null_default;
use super::{ClusterId, Rejected};

/// A cluster's self-description. Unknown fields are ignored and missing ones default, as with
/// Go's decoder, so every shape from 1.14 to 1.20 reads; [`ClusterConfig::encode`] writes Go's
/// bytes (field order, `omitempty`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "is_unset")]
    pub id: ClusterId,
    #[serde(default, deserialize_with = "null_default")]
    pub capabilities: Capabilities,
}

/// What the producer supports (`CiliumClusterConfigCapabilities`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Per-prefix canaries are written; readers wait for them before listing a prefix.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "std::ops::Not::not")]
    pub synced_canaries: bool,
    /// The data lives under `cilium/cache/...` with a cluster segment (KVStoreMesh).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// 255 or 511 (1.15+); 0 when the producer predates the field.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "is_zero")]
    pub max_connected_clusters: u32,
    /// Absent: the producer predates MCS-API (≤1.16); `false`: supported but disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
    /// 1.20: `"endpointslices-only"` means no `services/v1` data is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_slices_export_mode: Option<String>,
}

fn is_unset(id: &ClusterId) -> bool {
    *id == ClusterId::UNSET
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ClusterConfig {
    /// The value of `cilium/cluster-config/<C>` as Go's `encoding/json` writes
    /// `CiliumClusterConfig`: fields in declaration order, zero values of `omitempty` fields left
    /// out, `capabilities` always present.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a ClusterConfig always encodes")
    }

    /// Decodes the value of `cilium/cluster-config/<C>`.
    pub fn decode(value: &[u8]) -> Result<Self, Rejected> {
        Ok(serde_json::from_slice(value)?)
    }

    /// Whether the producer publishes legacy global services (`services/v1`); only the 1.20
    /// "endpointslices only" export mode does not.
    pub fn publishes_services(&self) -> bool {
        self.capabilities.endpoint_slices_export_mode.as_deref() != Some("endpointslices-only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_shape_decodes() {
        let c = ClusterConfig::decode(br#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":511}}"#)
            .unwrap();
        assert_eq!(c.id, ClusterId(3));
        assert!(c.capabilities.synced_canaries && !c.capabilities.cached);
        assert_eq!(c.capabilities.max_connected_clusters, 511);
        assert_eq!(c.capabilities.service_exports_enabled, None);

        let c = ClusterConfig::decode(br#"{"id":9,"capabilities":{}}"#).unwrap();
        assert_eq!(c, ClusterConfig { id: ClusterId(9), capabilities: Capabilities::default() });

        let c = ClusterConfig::decode(br#"{"capabilities":null,"future":1}"#).unwrap();
        assert_eq!(c, ClusterConfig::default());

        let c = ClusterConfig::decode(
            br#"{"id":5,"capabilities":{"syncedCanaries":true,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#,
        )
        .unwrap();
        assert_eq!(c.capabilities.service_exports_enabled, Some(false));
        assert!(!c.publishes_services());
        assert!(ClusterConfig::decode(b"{not json").is_err());
    }

    #[test]
    fn encodes_as_gos_encoder_leaves_out_zero_values() {
        let c = ClusterConfig::default();
        assert_eq!(c.encode(), br#"{"capabilities":{}}"#);
        let mut c = ClusterConfig { id: ClusterId(4), ..ClusterConfig::default() };
        c.capabilities.synced_canaries = true;
        c.capabilities.max_connected_clusters = 511;
        c.capabilities.service_exports_enabled = Some(false);
        assert_eq!(
            String::from_utf8(c.encode()).unwrap(),
            r#"{"id":4,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":511,"serviceExportsEnabled":false}}"#
        );
        assert_eq!(ClusterConfig::decode(&c.encode()).unwrap(), c);
    }
}
