//! One remote cluster's copy: what the client reads from the remote (raw bytes) becomes keys of
//! the local store under `cilium/cache/...`, written by this cluster's sync store, plus the
//! rewritten cluster config and one cache canary per prefix (`cilium-wire-format.md` §2.2, §5,
//! §10; Cilium's `pkg/clustermesh/kvstoremesh/reflector`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use clustermesh_client::raw::RawSink;
use clustermesh_client::wire::{CACHE_PREFIX, Capabilities, ClusterConfig, canary_prefix, cluster_config_key};
use clustermesh_client::{ClusterName, Kind};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::blob::Blob;
use crate::kvstore::Backend;
use crate::sync::store::{SyncStore, list_for_prune};

/// Where one kind of one remote cluster lives locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePaths {
    /// Every entry is `prefix` + the key below the remote's watched prefix. Stable wire
    /// contract: `cilium/cache/<kind>/v1/<C>/`, except identities at `.../<C>/id/` and ipcache
    /// at `cilium/cache/ip/v1/<C>/` (no `default` segment).
    pub prefix: String,
    /// `cilium/synced/<C>/cilium/cache/<kind>/v1`, the name agents register their watcher under.
    pub canary: String,
    /// What the drain after removal deletes: the whole `cilium/cache/<kind>/v1/<C>/`.
    pub drain: String,
}

impl CachePaths {
    pub fn new(cluster: &ClusterName, kind: Kind) -> Self {
        let base = kind.canary_name(true);
        Self {
            prefix: kind.watch_prefix(cluster, true),
            canary: format!("{}{base}", canary_prefix(cluster)),
            drain: format!("{base}/{cluster}/"),
        }
    }
}

/// The value of `cilium/cluster-config/<C>` in the local store: the remote's `id`,
/// `maxConnectedClusters` and `serviceExportsEnabled`, with `syncedCanaries` and `cached`
/// forced on (Go's `CiliumClusterConfig` field order and omitempty rules; Cilium's
/// `kvstoremesh/remote_cluster.go`, `Run`). `endpointSlicesExportMode` is not copied, as in the
/// Cilium source read: endpoint slices are not reflected, so agents must not look for them.
pub fn cached_cluster_config(remote: &ClusterConfig) -> Blob {
    let cached = ClusterConfig {
        id: remote.id,
        capabilities: Capabilities {
            synced_canaries: true,
            cached: true,
            max_connected_clusters: remote.capabilities.max_connected_clusters,
            service_exports_enabled: remote.capabilities.service_exports_enabled,
            endpoint_slices_export_mode: None,
        },
    };
    Blob::from(cached.encode())
}

/// The [`RawSink`] of one remote cluster: every report becomes a desired key of the cluster's
/// [`SyncStore`], which coalesces, retries and writes on its lease.
pub struct Reflector {
    cluster: ClusterName,
    sync: Arc<SyncStore>,
    backend: Arc<dyn Backend>,
    paths: BTreeMap<Kind, CachePaths>,
    /// Kinds whose canary was requested: once per copy, as Cilium's syncer does.
    canaries: Mutex<HashSet<Kind>>,
    /// Set once a session of this copy got as far as the cluster config (Cilium's "connected",
    /// which keeps the cluster in the readiness check past `--per-cluster-ready-timeout`).
    connected_once: std::sync::atomic::AtomicBool,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Reflector {
    pub fn new(
        cluster: ClusterName,
        sync: Arc<SyncStore>,
        backend: Arc<dyn Backend>,
        tracker: TaskTracker,
        token: CancellationToken,
    ) -> Self {
        let paths = Kind::ALL.into_iter().map(|k| (k, CachePaths::new(&cluster, k))).collect();
        Self { cluster, sync, backend, paths, canaries: Mutex::default(), connected_once: false.into(), tracker, token }
    }

    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    pub fn sync(&self) -> &Arc<SyncStore> {
        &self.sync
    }

    pub fn paths(&self, kind: Kind) -> &CachePaths {
        &self.paths[&kind]
    }

    pub fn cluster_config_key(&self) -> String {
        cluster_config_key(&self.cluster)
    }

    pub fn connected_once(&self) -> bool {
        self.connected_once.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every cache canary of this cluster is written.
    pub fn synced(&self) -> bool {
        let written = self.sync.canaries();
        let written = written.borrow();
        self.paths.values().all(|p| written.contains(&p.canary))
    }

    /// Waits until [`Reflector::synced`].
    pub async fn wait_synced(&self) {
        let wanted: Vec<String> = self.paths.values().map(|p| p.canary.clone()).collect();
        let mut written = self.sync.canaries();
        // The sender lives as long as the sync store, which `self` holds.
        let _ = written.wait_for(|set| wanted.iter().all(|c| set.contains(c))).await;
    }

    /// The prefix of `kind` holds exactly `keys` (plus what other reports add later): drop
    /// what an earlier copy wanted, write the canary once, and (first time only) delete keys a
    /// previous process left in the store.
    fn settle(&self, kind: Kind, keys: &[&str]) {
        let paths = &self.paths[&kind];
        let present: BTreeSet<String> = keys.iter().map(|k| format!("{}{k}", paths.prefix)).collect();
        for key in self.sync.desired_keys_with_prefix(&paths.prefix) {
            if !present.contains(&key) {
                self.sync.delete(&key);
            }
        }
        if !self.canaries.lock().insert(kind) {
            return;
        }
        self.sync.request_canary(&paths.prefix, &paths.canary);
        let (sync, backend, prefix) = (Arc::clone(&self.sync), Arc::clone(&self.backend), paths.prefix.clone());
        let token = self.token.clone();
        let span = tracing::info_span!("prune", cluster = %self.cluster, %kind);
        self.tracker.spawn(
            async move {
                let Some(keys) = list_for_prune(backend.as_ref(), &prefix, &token).await else {
                    return;
                };
                let pruned = sync.prune(keys);
                if pruned > 0 {
                    tracing::info!(%prefix, pruned, "deleting cached keys no longer in the remote cluster");
                }
            }
            .instrument(span),
        );
    }
}

impl RawSink for Reflector {
    fn cluster_config(&self, config: &ClusterConfig) {
        self.connected_once.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sync.upsert(self.cluster_config_key(), cached_cluster_config(config));
    }

    fn upsert(&self, kind: Kind, key: &str, value: &Bytes) {
        // A copy the local store keeps (the remote cache holds the received bytes).
        self.sync.upsert(format!("{}{key}", self.paths[&kind].prefix), Blob::copy_from(value));
    }

    fn delete(&self, kind: Kind, key: &str) {
        self.sync.delete(&format!("{}{key}", self.paths[&kind].prefix));
    }

    fn synced(&self, kind: Kind, keys: &[&str]) {
        self.settle(kind, keys);
    }

    fn not_offered(&self, kind: Kind) {
        // Drain what an earlier session copied, and pretend the (empty) copy is complete so
        // that agents waiting for every canary are not held up (Cilium: drain + fake OnSync).
        tracing::info!(cluster = %self.cluster, %kind, "not offered by the remote cluster: draining, canary faked");
        self.settle(kind, &[]);
    }
}

/// What a drained cluster leaves behind: nothing under these prefixes.
pub fn drain_prefixes(cluster: &ClusterName) -> Vec<String> {
    let mut prefixes = vec![canary_prefix(cluster)];
    prefixes.extend(Kind::ALL.into_iter().map(|k| CachePaths::new(cluster, k).drain));
    debug_assert!(prefixes[1..].iter().all(|p| p.starts_with(CACHE_PREFIX)));
    prefixes
}

#[cfg(test)]
mod tests {
    use clustermesh_client::ClusterId;
    use clustermesh_client::wire::Capabilities;

    use super::*;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    #[test]
    fn cache_paths_follow_the_two_irregular_shapes() {
        let c = name("cluster2");
        let cases = [
            (Kind::Nodes, "cilium/cache/nodes/v1/cluster2/", "cilium/cache/nodes/v1/cluster2/"),
            (Kind::Services, "cilium/cache/services/v1/cluster2/", "cilium/cache/services/v1/cluster2/"),
            (
                Kind::ServiceExports,
                "cilium/cache/serviceexports/v1/cluster2/",
                "cilium/cache/serviceexports/v1/cluster2/",
            ),
            (Kind::Identities, "cilium/cache/identities/v1/cluster2/id/", "cilium/cache/identities/v1/cluster2/"),
            (Kind::IpCache, "cilium/cache/ip/v1/cluster2/", "cilium/cache/ip/v1/cluster2/"),
        ];
        for (kind, prefix, drain) in cases {
            let paths = CachePaths::new(&c, kind);
            assert_eq!((paths.prefix.as_str(), paths.drain.as_str()), (prefix, drain), "{kind}");
        }
        assert_eq!(CachePaths::new(&c, Kind::Identities).canary, "cilium/synced/cluster2/cilium/cache/identities/v1");
        assert_eq!(CachePaths::new(&c, Kind::IpCache).canary, "cilium/synced/cluster2/cilium/cache/ip/v1");
        assert_eq!(drain_prefixes(&c)[0], "cilium/synced/cluster2/");
        assert_eq!(drain_prefixes(&c).len(), 6);
    }

    #[test]
    fn the_cached_cluster_config_matches_the_shared_test_vectors() {
        let config = |id, max, exports| ClusterConfig {
            id: ClusterId(id),
            capabilities: Capabilities {
                synced_canaries: true,
                max_connected_clusters: max,
                service_exports_enabled: exports,
                endpoint_slices_export_mode: Some("services-and-endpointslices".into()),
                ..Capabilities::default()
            },
        };
        assert_eq!(
            cached_cluster_config(&config(2, 255, Some(true))),
            r#"{"id":2,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":true}}"#
        );
        assert_eq!(
            cached_cluster_config(&config(1, 255, Some(false))),
            r#"{"id":1,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
        );
        // A 1.14 producer: no maximum, no MCS-API; both stay absent.
        assert_eq!(
            cached_cluster_config(&config(7, 0, None)),
            r#"{"id":7,"capabilities":{"syncedCanaries":true,"cached":true}}"#
        );
    }
}
