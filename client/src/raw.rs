//! Raw mode: a remote cluster's entries exactly as its store holds them, handed to a
//! [`RawSink`] by the same session machinery as the typed caches (connection, cluster config,
//! canaries, paginated list at a pinned revision, watch, stale deletion at list end, relist on
//! compaction, drain on a cluster ID change). Nothing is decoded or checked: this is what
//! KVStoreMesh needs to copy a remote cluster byte for byte (`store.KVPairCreator` in Cilium's
//! `pkg/clustermesh/kvstoremesh/reflector`).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheStatus, Sink, list_and_watch};
use crate::connect::{self, Connection};
use crate::wire::{ClusterConfig, ClusterName, Kind};

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

struct Slot {
    value: Bytes,
    stale: bool,
}

struct Inner {
    kind: Kind,
    entries: RwLock<BTreeMap<String, Slot>>,
    status: watch::Sender<CacheStatus>,
    sink: Arc<dyn RawSink>,
}

/// The raw entries of one kind read from one remote cluster. Cloning gives another handle.
#[derive(Clone)]
pub struct RawCache {
    inner: Arc<Inner>,
}

impl RawCache {
    pub(crate) fn new(kind: Kind, sink: Arc<dyn RawSink>) -> Self {
        let (status, _) = watch::channel(CacheStatus::default());
        Self { inner: Arc::new(Inner { kind, entries: RwLock::new(BTreeMap::new()), status, sink }) }
    }

    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    pub fn len(&self) -> usize {
        self.inner.entries.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, by key below the watched prefix.
    pub fn snapshot(&self) -> BTreeMap<String, Bytes> {
        let entries = self.inner.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries.iter().map(|(k, slot)| (k.clone(), slot.value.clone())).collect()
    }

    pub fn status(&self) -> CacheStatus {
        self.inner.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<CacheStatus> {
        self.inner.status.subscribe()
    }

    pub(crate) fn set_prefix(&self, prefix: &str) {
        self.inner.status.send_modify(|s| s.prefix = Some(prefix.to_string()));
    }

    pub(crate) fn set_unsynced(&self) {
        self.inner.status.send_if_modified(|s| std::mem::replace(&mut s.synced, false));
    }

    fn changed(&self, entries: usize) {
        self.inner.status.send_modify(|s| {
            s.entries = entries;
            s.generation += 1;
        });
    }

    pub(crate) fn mark_all_stale(&self) {
        let mut entries = self.inner.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries.values_mut().for_each(|slot| slot.stale = true);
    }

    pub(crate) fn upsert(&self, key: &str, value: &[u8]) {
        let mut entries = self.inner.entries.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = entries.get_mut(key)
            && slot.value == value
        {
            slot.stale = false;
            return;
        }
        let value = Bytes::copy_from_slice(value);
        self.inner.sink.upsert(self.inner.kind, key, &value);
        entries.insert(key.to_string(), Slot { value, stale: false });
        let len = entries.len();
        drop(entries);
        tracing::debug!(kind = %self.inner.kind, key, "raw upsert");
        self.changed(len);
    }

    pub(crate) fn delete(&self, key: &str) {
        let mut entries = self.inner.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.remove(key).is_some() {
            self.inner.sink.delete(self.inner.kind, key);
            let len = entries.len();
            drop(entries);
            tracing::debug!(kind = %self.inner.kind, key, "raw delete");
            self.changed(len);
        }
    }

    /// The list is complete: delete what it did not confirm, report the sync.
    pub(crate) fn finish_list(&self) {
        let mut entries = self.inner.entries.write().unwrap_or_else(PoisonError::into_inner);
        let stale: Vec<String> = entries.iter().filter(|(_, slot)| slot.stale).map(|(k, _)| k.clone()).collect();
        if !stale.is_empty() {
            tracing::info!(kind = %self.inner.kind, count = stale.len(), "deleting stale entries after the list");
        }
        for key in &stale {
            entries.remove(key);
            self.inner.sink.delete(self.inner.kind, key);
        }
        let keys: Vec<&str> = entries.keys().map(String::as_str).collect();
        self.inner.sink.synced(self.inner.kind, &keys);
        let len = entries.len();
        drop(entries);
        self.inner.status.send_modify(|s| {
            s.entries = len;
            s.generation += 1;
            s.synced = true;
            s.lists += 1;
            s.last_error = None;
        });
    }

    /// Deletes every entry, reporting each deletion.
    pub(crate) fn drain(&self) {
        let mut entries = self.inner.entries.write().unwrap_or_else(PoisonError::into_inner);
        for key in std::mem::take(&mut *entries).into_keys() {
            self.inner.sink.delete(self.inner.kind, &key);
        }
        drop(entries);
        self.inner.status.send_modify(|s| {
            s.entries = 0;
            s.generation += 1;
            s.synced = false;
        });
    }

    pub(crate) fn not_offered(&self) {
        self.drain();
        self.inner.sink.not_offered(self.inner.kind);
    }

    /// Lists and watches `prefix` until `token` is cancelled (see [`crate::cache`]).
    pub(crate) async fn run(
        &self,
        connection: &Connection,
        prefix: String,
        token: &CancellationToken,
    ) -> connect::Result<()> {
        self.set_prefix(&prefix);
        let mut sink = RawCacheSink { cache: self, prefix: &prefix };
        list_and_watch(connection, &prefix, token, &mut sink).await
    }
}

struct RawCacheSink<'a> {
    cache: &'a RawCache,
    prefix: &'a str,
}

impl Sink for RawCacheSink<'_> {
    fn list_started(&mut self) {
        self.cache.mark_all_stale();
    }

    fn upsert(&mut self, key: &str, value: &[u8]) {
        match key.strip_prefix(self.prefix) {
            Some(rest) => self.cache.upsert(rest, value),
            None => tracing::warn!(key, "ignoring a key outside the watched prefix"),
        }
    }

    fn delete(&mut self, key: &str) {
        if let Some(rest) = key.strip_prefix(self.prefix) {
            self.cache.delete(rest);
        }
    }

    fn list_done(&mut self) {
        self.cache.finish_list();
    }

    fn error(&mut self, error: &connect::Error) {
        self.cache.inner.status.send_modify(|s| s.last_error = Some(error.to_string()));
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
        cache.mark_all_stale();
        // Not valid JSON for any kind: raw mode does not care.
        cache.upsert("10.0.0.1", b"\x00not json");
        cache.upsert("10.0.0.2", b"{\"b\":1, \"a\":2}");
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
        cache.upsert("10.0.0.2", b"{\"b\":1, \"a\":2}");
        cache.upsert("10.0.0.3", b"x");
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
        cache.upsert("ns/a", b"1");
        recorder.take();
        cache.not_offered();
        assert_eq!(recorder.take(), ["delete service-exports ns/a", "not-offered service-exports"]);
        assert!(cache.is_empty());
        assert!(!cache.status().synced);
    }
}
