//! Kubernetes objects → Cilium's kvstore keys and exact value bytes, as a pure state machine.
//!
//! ```text
//!  Object (typed) ──apply/delete──▶ Model ──▶ Changes { upserts, deletes, invalid }
//!                                     │
//!                                     └──▶ desired(): every key the model wants now (relists)
//! ```
//!
//! Nothing here does IO: the sync layer feeds events and writes the changes. Key layouts and value
//! encodings are a stable wire contract with Cilium agents, KVStoreMesh and the operator
//! (`../shared/reference/cilium-wire-format.md` §2-§3); they must not change shape.
//!
//! Objects that skipped API-server defaulting are treated as defaulted where Cilium's own readers
//! would otherwise reject the value: an empty `sessionAffinity` is exported as `"None"`
//! (architecture decision 8) and an empty Service port protocol as `"TCP"`.

mod encode;
mod endpoint;
mod endpointslice;
mod identity;
pub mod model;
mod names;
mod namespace;
mod node;
mod ownership;
mod service;
mod serviceexport;

#[cfg(test)]
mod golden_tests;

use crate::blob::Blob;

pub use endpoint::{cilium_endpoint_entries, cilium_endpoint_slice_entries};
pub use endpointslice::endpoint_slice_export;
pub use identity::identity_entry;
pub use model::{ALL_KINDS, Changes, Kind, Model, Object, ObjectKey, ServiceV2Mode, Settings, UnknownObject};
pub use namespace::is_global_namespace;
pub use node::node_entry;
pub use service::cluster_service_entry;
pub use serviceexport::service_export_entry;

/// Why an object cannot be translated. Each variant names the field at fault, with a JSON-path
/// style location (`status.networking.addressing[0].ipv4`) so a warn line is actionable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{field} is missing")]
    MissingField { field: &'static str },
    #[error("{field}: {value:?} is not an IP address")]
    InvalidIp { field: String, value: String },
    #[error("{field}: {value:?} is not {expected}")]
    InvalidValue { field: String, value: String, expected: &'static str },
    #[error("annotation {annotation}: {value:?} is neither \"true\" nor \"false\"")]
    MalformedAnnotation { annotation: &'static str, value: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A store key and its value. The key is shared by every structure that refers to it (the
/// model's maps, the sync store, the lease bookkeeping): its bytes are held once.
pub type Entry = (StoreKey, Blob);

/// A store key as the pipeline holds it; see [`Entry`].
pub type StoreKey = std::sync::Arc<str>;

// The key layout is the client library's (`clustermesh_client::wire`), the one owner of what a
// Cilium peer can see; the writer uses it as the readers do.
pub use clustermesh_client::wire::{
    CLUSTER_CONFIG_PREFIX, ENDPOINT_SLICES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX, NODES_PREFIX,
    SERVICE_EXPORTS_PREFIX, SERVICES_PREFIX, SYNCED_PREFIX, state_canary_name as canary_name,
};
use clustermesh_client::wire::{Capabilities, ClusterConfig, ClusterId};

/// The key of this cluster's configuration.
pub fn cluster_config_key(settings: &Settings) -> String {
    clustermesh_client::wire::cluster_config_key(&settings.cluster_name)
}

/// The value of `cilium/cluster-config/<cluster>`: this apiserver always writes per-prefix
/// canaries and always sets the `serviceExportsEnabled` tri-state; `endpointSlicesExportMode`
/// tells 1.20+ agents whether legacy services are still exported.
pub fn cluster_config(settings: &Settings) -> Blob {
    let config = ClusterConfig {
        id: ClusterId(settings.cluster_id),
        capabilities: Capabilities {
            synced_canaries: true,
            cached: false,
            max_connected_clusters: settings.max_connected_clusters,
            service_exports_enabled: Some(settings.mcs_api_enabled),
            endpoint_slices_export_mode: Some(settings.service_v2_mode.export_mode().to_owned()),
        },
    };
    Blob::from(config.encode())
}

/// `cilium/synced/<cluster>/<canary name>` for a store prefix.
pub fn canary_key(settings: &Settings, prefix: &str) -> String {
    format!("{}{}", clustermesh_client::wire::canary_prefix(&settings.cluster_name), canary_name(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(kind: &str, key: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cilium-test-vectors.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let vectors: serde_json::Value = serde_json::from_str(&text).expect("test vectors are JSON");
        vectors
            .as_array()
            .expect("array")
            .iter()
            .find(|v| v["kind"] == kind && v["key"] == key)
            .and_then(|v| v["value"].as_str())
            .unwrap_or_else(|| panic!("no {kind} vector for {key}"))
            .to_string()
    }

    #[test]
    fn cluster_config_reports_every_capability_of_a_1_20_apiserver() {
        let settings = Settings::new("cluster3", 3);
        assert_eq!(
            cluster_config(&settings),
            r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"services-and-endpointslices"}}"#
        );
        assert_eq!(cluster_config_key(&settings), "cilium/cluster-config/cluster3");
    }

    #[test]
    fn cluster_config_follows_mcs_api_and_service_v2_flags() {
        let mut settings = Settings::new("cluster5", 5);
        settings.service_v2_mode = ServiceV2Mode::OnlyEndpointSlice;
        assert_eq!(cluster_config(&settings), vector("cluster-config", "cilium/cluster-config/cluster5"));
        settings.service_v2_mode = ServiceV2Mode::PreferEndpointSlice;
        settings.mcs_api_enabled = true;
        settings.max_connected_clusters = 511;
        assert_eq!(
            cluster_config(&settings),
            r#"{"id":5,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":511,"serviceExportsEnabled":true,"endpointSlicesExportMode":"services-and-endpointslices"}}"#
        );
    }

    #[test]
    fn canaries_of_identities_and_ipcache_use_the_parent_prefix() {
        let settings = Settings::new("cluster1", 1);
        assert_eq!(canary_key(&settings, IDENTITIES_PREFIX), "cilium/synced/cluster1/cilium/state/identities/v1");
        assert_eq!(canary_key(&settings, IPCACHE_PREFIX), "cilium/synced/cluster1/cilium/state/ip/v1");
        assert_eq!(canary_key(&settings, NODES_PREFIX), "cilium/synced/cluster1/cilium/state/nodes/v1");
        for prefix in [NODES_PREFIX, SERVICES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX, SERVICE_EXPORTS_PREFIX] {
            // The vectors' canary keys are the ones agents wait for.
            vector("synced-canary", &canary_key(&settings, prefix));
        }
    }
}
