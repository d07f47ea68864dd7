//! Raw mode: a remote cluster's entries exactly as its store holds them, handed to a
//! [`RawSink`] by the same session machinery and the same [`PrefixCache`] as the typed caches
//! (connection, cluster config, canaries, paginated list at a pinned revision, watch, stale
//! deletion at list end, relist on compaction, drain on a cluster ID change), with the
//! [`Identity`] decoder and the sink as its observer. Nothing is decoded or checked: this is
//! what KVStoreMesh needs to copy a remote cluster byte for byte (`store.KVPairCreator` in
//! Cilium's `pkg/clustermesh/kvstoremesh/reflector`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::{Decoder, Observer, PrefixCache};
use crate::wire::{ClusterConfig, ClusterName, Kind, Rejected, Validation};

/// Where a raw-mode remote cluster delivers what it reads.
///
/// Every method is called while the reporting cache holds its lock, so that the order of
/// reports for one key is the order of the changes: implementations must return quickly and
/// must not call back into the [`crate::RemoteCluster`].
pub trait RawSink: Send + Sync + 'static {
    /// The remote cluster's config was read and accepted for a new session; called before any
    /// prefix of that session is listed.
    fn cluster_config(&self, config: &ClusterConfig);
    /// `key` (what follows the watched prefix) now holds `value`. An entry listed again with the
    /// same bytes is not reported again.
    fn upsert(&self, kind: Kind, key: &str, value: &Bytes);
    /// `key` is gone: deleted remotely, not confirmed by a relist, or drained.
    fn delete(&self, kind: Kind, key: &str);
    /// A (re)list of `kind` completed: everything listed was reported and everything it did not
    /// confirm was deleted. `keys` is every key now held for `kind`.
    fn synced(&self, kind: Kind, keys: &[&str]);
    /// The remote does not publish `kind` in this session (e.g. no service exports before
    /// Cilium 1.17); whatever was held for it was deleted just before.
    fn not_offered(&self, kind: Kind);
}

/// Raw mode for a whole directory: where each remote cluster's entries go, and what happens
/// when its file is removed.
pub trait RawSinks: Send + Sync + 'static {
    /// A cluster appeared in the directory: the sink of its new connection.
    fn sink(&self, cluster: &ClusterName) -> Arc<dyn RawSink>;
    /// Its file was removed: the connection is stopped and its ID released, but nothing was
    /// drained; what was copied is the implementation's to drop.
    fn removed(&self, cluster: &ClusterName);
}

/// Raw mode's decoder: the bytes as the remote store holds them, never refused.
pub struct Identity(Kind);

impl Decoder for Identity {
    type Value = Bytes;

    fn kind(&self) -> Kind {
        self.0
    }

    fn decode(&self, _key: &str, value: &[u8], _validation: &Validation) -> Result<Bytes, Rejected> {
        Ok(Bytes::copy_from_slice(value))
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("raw_prefix", kind = %self.0)
    }
}

/// Raw mode's observer: every report goes to the sink, under the cache's lock.
impl Observer<Bytes> for Arc<dyn RawSink> {
    fn upsert(&self, kind: Kind, key: &str, value: &Bytes) {
        RawSink::upsert(&**self, kind, key, value);
    }

    fn delete(&self, kind: Kind, key: &str) {
        RawSink::delete(&**self, kind, key);
    }

    fn synced(&self, kind: Kind, keys: &[&str]) {
        RawSink::synced(&**self, kind, keys);
    }

    fn not_offered(&self, kind: Kind) {
        RawSink::not_offered(&**self, kind);
    }
}

/// The raw entries of one kind read from one remote cluster. Cloning gives another handle.
pub type RawCache = PrefixCache<Identity, Arc<dyn RawSink>>;

impl RawCache {
    pub(crate) fn new(kind: Kind, sink: Arc<dyn RawSink>) -> Self {
        Self::with(Identity(kind), sink)
    }
}

/// One raw cache per kind, all reporting to the same sink.
pub(crate) struct RawCaches {
    sink: Arc<dyn RawSink>,
    caches: BTreeMap<Kind, RawCache>,
}

impl RawCaches {
    pub(crate) fn new(sink: Arc<dyn RawSink>) -> Self {
        let caches = Kind::ALL.into_iter().map(|k| (k, RawCache::new(k, Arc::clone(&sink)))).collect();
        Self { sink, caches }
    }

    pub(crate) fn cluster_config(&self, config: &ClusterConfig) {
        self.sink.cluster_config(config);
    }

    pub(crate) fn get(&self, kind: Kind) -> &RawCache {
        // Every kind gets a cache in `new`.
        &self.caches[&kind]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::wire::tests::validation;

    /// Records what the sink is told, one line per call.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl RawSink for Recorder {
        fn cluster_config(&self, config: &ClusterConfig) {
            self.0.lock().unwrap().push(format!("config {}", config.id));
        }
        fn upsert(&self, kind: Kind, key: &str, value: &Bytes) {
            self.0.lock().unwrap().push(format!("upsert {kind} {key}={}", String::from_utf8_lossy(value)));
        }
        fn delete(&self, kind: Kind, key: &str) {
            self.0.lock().unwrap().push(format!("delete {kind} {key}"));
        }
        fn synced(&self, kind: Kind, keys: &[&str]) {
            self.0.lock().unwrap().push(format!("synced {kind} [{}]", keys.join(",")));
        }
        fn not_offered(&self, kind: Kind) {
            self.0.lock().unwrap().push(format!("not-offered {kind}"));
        }
    }

    #[test]
    fn values_pass_through_untouched_and_a_relist_reports_only_what_changed() {
        let recorder = Arc::new(Recorder::default());
        let cache = RawCache::new(Kind::IpCache, recorder.clone());
        // Nothing is checked against it.
        let v = validation("cluster1", 1);
        cache.mark_all_stale();
        // Not valid JSON for any kind: raw mode does not care.
        cache.upsert("10.0.0.1", b"\x00not json", &v);
        cache.upsert("10.0.0.2", b"{\"b\":1, \"a\":2}", &v);
        cache.finish_list();
        assert_eq!(
            recorder.take(),
            [
                "upsert ipcache 10.0.0.1=\0not json",
                "upsert ipcache 10.0.0.2={\"b\":1, \"a\":2}",
                "synced ipcache [10.0.0.1,10.0.0.2]"
            ]
        );
        assert!(cache.status().synced);

        // Reconnect: .2 unchanged (silent), .1 gone, .3 new.
        cache.set_unsynced();
        cache.mark_all_stale();
        cache.upsert("10.0.0.2", b"{\"b\":1, \"a\":2}", &v);
        cache.upsert("10.0.0.3", b"x", &v);
        cache.finish_list();
        assert_eq!(
            recorder.take(),
            ["upsert ipcache 10.0.0.3=x", "delete ipcache 10.0.0.1", "synced ipcache [10.0.0.2,10.0.0.3]"]
        );
        assert_eq!(cache.status().lists, 2);
        assert_eq!(cache.snapshot().len(), 2);
    }

    #[test]
    fn a_kind_not_offered_is_drained_then_reported() {
        let recorder = Arc::new(Recorder::default());
        let cache = RawCache::new(Kind::ServiceExports, recorder.clone());
        let v = validation("cluster1", 1);
        cache.upsert("ns/a", b"1", &v);
        recorder.take();
        cache.not_offered();
        assert_eq!(recorder.take(), ["delete service-exports ns/a", "not-offered service-exports"]);
        assert!(cache.is_empty());
        assert!(!cache.status().synced);
    }
}
