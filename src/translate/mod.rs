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
mod namespace;
mod node;
mod ownership;
mod service;
mod serviceexport;

#[cfg(test)]
mod golden_tests;

use bytes::Bytes;

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

/// A key and the exact bytes to store under it.
pub type Entry = (String, Bytes);

// Store prefixes (Cilium's `SyncStore` prefixes). Keys are `<prefix>/<suffix>`; the prefixes carry
// no trailing slash, so list `<prefix>/` to avoid matching siblings such as `.../v10`.

/// `cilium/state/nodes/v1/<cluster>/<node>`.
pub const NODES_PREFIX: &str = "cilium/state/nodes/v1";
/// `cilium/state/identities/v1/id/<numeric id>`; no cluster segment (one cluster per store).
pub const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1/id";
/// `cilium/state/ip/v1/default/<ip>`; `default` is Cilium's only address space.
pub const IPCACHE_PREFIX: &str = "cilium/state/ip/v1/default";
/// `cilium/state/services/v1/<cluster>/<namespace>/<service>`.
pub const SERVICES_PREFIX: &str = "cilium/state/services/v1";
/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<service>` (MCS-API, Cilium 1.17+).
pub const SERVICE_EXPORTS_PREFIX: &str = "cilium/state/serviceexports/v1";
/// `cilium/state/endpointslices/v1/<cluster>/<namespace>/<slice>` (Cilium 1.20+).
pub const ENDPOINT_SLICES_PREFIX: &str = "cilium/state/endpointslices/v1";
/// `cilium/cluster-config/<cluster>`: written by the sync layer before anything else.
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config";
/// `cilium/synced/<cluster>/<canary name>`: one per prefix, written after its initial sync.
pub const SYNCED_PREFIX: &str = "cilium/synced";

/// The key of this cluster's configuration.
pub fn cluster_config_key(settings: &Settings) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}/{}", settings.cluster_name)
}

/// The value of `cilium/cluster-config/<cluster>` (Go `CiliumClusterConfig`): `id` and
/// `maxConnectedClusters` are omitted when zero, `capabilities` is always present,
/// `serviceExportsEnabled` is a tri-state that this apiserver always sets, and
/// `endpointSlicesExportMode` tells 1.20+ agents whether legacy services are still exported.
pub fn cluster_config(settings: &Settings) -> Bytes {
    let mut w = encode::JsonWriter::new();
    w.begin_object();
    if settings.cluster_id != 0 {
        w.field_uint("id", u64::from(settings.cluster_id));
    }
    w.key("capabilities");
    w.begin_object();
    // This apiserver always writes per-prefix canaries (the sync layer's contract).
    w.field_bool("syncedCanaries", true);
    if settings.max_connected_clusters != 0 {
        w.field_uint("maxConnectedClusters", u64::from(settings.max_connected_clusters));
    }
    w.field_bool("serviceExportsEnabled", settings.mcs_api_enabled);
    w.field_str("endpointSlicesExportMode", settings.service_v2_mode.export_mode());
    w.end_object();
    w.end_object();
    Bytes::from(w.finish())
}

/// The name under which the canary of `prefix` is written: agents register their watchers under
/// the parent prefix for identities and ipcache, so those two are overridden.
pub fn canary_name(prefix: &str) -> &str {
    match prefix {
        IDENTITIES_PREFIX => "cilium/state/identities/v1",
        IPCACHE_PREFIX => "cilium/state/ip/v1",
        other => other,
    }
}

/// `cilium/synced/<cluster>/<canary name>` for a store prefix.
pub fn canary_key(settings: &Settings, prefix: &str) -> String {
    format!("{SYNCED_PREFIX}/{}/{}", settings.cluster_name, canary_name(prefix))
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
