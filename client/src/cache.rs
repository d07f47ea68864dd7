//! List+watch of one prefix into a cache, as Cilium's `paginatedList`/`watch`
//! (`pkg/kvstore/etcd.go`) and restartable watch store (`pkg/kvstore/store/watchstore.go`) do:
//!
//! - list in pages, every page after the first pinned to the first page's revision, then watch
//!   from the next revision;
//! - on every (re)start of the list, mark every known entry stale, and when the list is complete
//!   delete what is still stale: a relist never leaves an entry behind;
//! - a compacted or cancelled watch lists again; a broken watch re-opens from the next revision;
//! - values that fail decoding or Cilium's acceptance rules are logged and counted, never
//!   cached. An entry that turns invalid is removed, exactly as the next relist would decide
//!   (Cilium keeps the last good value on a live update but drops it on a relist).
//!
//! One [`PrefixCache`] does this for every kind and mode: its [`Decoder`] says what a value
//! becomes ([`Typed`]: a Cilium type; raw mode: the bytes as they are) and its [`Observer`] who
//! hears of the changes ([`Publisher`]: the change and event streams; raw mode: a
//! [`crate::raw::RawSink`]).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError, RwLock};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::connect::{self, Connection};
use crate::retry::{Backoff, Retry};
use crate::wire::{AnyEntry, ClusterName, Entry, IntoAny, Kind, Rejected, Validation, prefix_range_end};

/// How many changes a slow subscriber may fall behind before it misses some (it is told with
/// `RecvError::Lagged` and can re-read the snapshot).
const CHANGES_CAPACITY: usize = 4096;

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Upsert,
    Delete,
}

/// One change of a typed cache. For a deletion, `value` is the last value known.
#[derive(Debug, Clone)]
pub struct Change<T> {
    pub cluster: ClusterName,
    /// The key below the watched prefix: node name, `<namespace>/<name>`, identity, IP.
    pub key: String,
    pub op: Op,
    pub value: Arc<T>,
}

/// One change of any cache of any remote cluster, as one line of `watch` output.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub cluster: ClusterName,
    pub kind: Kind,
    pub op: Op,
    /// The full etcd key.
    pub key: String,
    /// The decoded value; `None` for a deletion.
    pub value: Option<AnyEntry>,
}

/// The state of one cache, published on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CacheStatus {
    /// The prefix watched in the current or last session.
    pub prefix: Option<String>,
    /// The initial list of the current session completed and the watch runs.
    pub synced: bool,
    pub entries: usize,
    /// Values refused since start (bad JSON or an acceptance rule).
    pub rejected: u64,
    /// Completed lists since start (the first one, then one per relist or reconnect).
    pub lists: u64,
    pub last_rejection: Option<String>,
    /// The last error reading or watching the prefix, cleared by the next completed list.
    pub last_error: Option<String>,
    /// Bumped on every change.
    pub generation: u64,
}

/// Turns the bytes of one value into what a [`PrefixCache`] holds: [`Typed`] decodes and checks
/// a Cilium type, [`crate::raw::Identity`] keeps the bytes as they are.
pub trait Decoder: Send + Sync + 'static {
    /// What the cache holds per key; cloned for every report, so cheap to clone (an `Arc`,
    /// `Bytes`). An upsert equal to the value held is not a change.
    type Value: Clone + PartialEq + Send + Sync + 'static;

    fn kind(&self) -> Kind;

    /// `key` is what follows the watched prefix. An error is logged and counted, and the key
    /// holds nothing afterwards.
    fn decode(&self, key: &str, value: &[u8], validation: &Validation) -> Result<Self::Value, Rejected>;

    /// The span of the task that lists and watches the prefix.
    fn span(&self) -> tracing::Span;
}

/// Who hears of a [`PrefixCache`]'s changes besides its status.
///
/// `upsert`, `delete`, `synced` and `not_offered` are called while the cache holds its lock, so
/// that the order of reports for one key is the order of the changes and `synced` sees exactly
/// the keys held: they must return quickly and must not call back into the cache.
/// `published` is called after the lock is released and the status counts the change, so that
/// whoever is woken by it reads a status that agrees.
pub trait Observer<V>: Send + Sync + 'static {
    fn upsert(&self, _kind: Kind, _key: &str, _value: &V) {}
    fn delete(&self, _kind: Kind, _key: &str) {}
    /// A list completed; `keys` is every key now held.
    fn synced(&self, _kind: Kind, _keys: &[&str]) {}
    /// The remote does not publish the kind in this session; everything held was deleted just
    /// before.
    fn not_offered(&self, _kind: Kind) {}
    /// One change, after the fact; `prefix` is the watched prefix and `value` for a deletion the
    /// last value held.
    fn published(&self, _kind: Kind, _prefix: &str, _key: &str, _op: Op, _value: &V) {}
}

/// Decodes `T` with its acceptance rules.
pub struct Typed<T>(PhantomData<fn() -> T>);

impl<T: Entry> Decoder for Typed<T> {
    type Value = Arc<T>;

    fn kind(&self) -> Kind {
        T::KIND
    }

    fn decode(&self, key: &str, value: &[u8], validation: &Validation) -> Result<Arc<T>, Rejected> {
        T::decode(key, value, validation).map(Arc::new)
    }

    fn span(&self) -> tracing::Span {
        tracing::info_span!("prefix", kind = %T::KIND)
    }
}

/// A typed cache's change notifications: its own [`Change`] stream and the mesh-wide [`Event`]
/// stream.
pub struct Publisher<T> {
    cluster: ClusterName,
    changes: broadcast::Sender<Change<T>>,
    events: Option<broadcast::Sender<Event>>,
}

impl<T: Entry + IntoAny> Observer<Arc<T>> for Publisher<T> {
    fn published(&self, kind: Kind, prefix: &str, key: &str, op: Op, value: &Arc<T>) {
        if let Some(events) = &self.events
            && events.receiver_count() > 0
        {
            let _ = events.send(Event {
                cluster: self.cluster.clone(),
                kind,
                op,
                key: format!("{prefix}{key}"),
                value: (op == Op::Upsert).then(|| T::into_any(Arc::clone(value))),
            });
        }
        let change = Change { cluster: self.cluster.clone(), key: key.to_string(), op, value: Arc::clone(value) };
        let _ = self.changes.send(change);
    }
}

/// The entries of one kind read from one remote cluster, with change notifications. Cloning
/// gives another handle to the same cache.
pub type Cache<T> = PrefixCache<Typed<T>, Publisher<T>>;

struct Slot<V> {
    value: V,
    stale: bool,
}

struct Inner<D: Decoder, O> {
    decoder: D,
    observer: O,
    entries: RwLock<BTreeMap<String, Slot<D::Value>>>,
    status: watch::Sender<CacheStatus>,
}

/// The entries below one prefix of one remote cluster, as `D` decodes them, reported to `O`.
/// Cloning gives another handle to the same cache.
pub struct PrefixCache<D: Decoder, O> {
    inner: Arc<Inner<D, O>>,
}

impl<D: Decoder, O> Clone for PrefixCache<D, O> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<T: Entry + IntoAny> Cache<T> {
    pub(crate) fn new(cluster: ClusterName, events: Option<broadcast::Sender<Event>>) -> Self {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Self::with(Typed(PhantomData), Publisher { cluster, changes, events })
    }

    /// Every upsert and deletion from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change<T>> {
        self.inner.observer.changes.subscribe()
    }
}

impl<D: Decoder, O: Observer<D::Value>> PrefixCache<D, O> {
    pub(crate) fn with(decoder: D, observer: O) -> Self {
        let (status, _) = watch::channel(CacheStatus::default());
        let entries = RwLock::new(BTreeMap::new());
        Self { inner: Arc::new(Inner { decoder, observer, entries, status }) }
    }

    pub fn kind(&self) -> Kind {
        self.inner.decoder.kind()
    }

    pub fn get(&self, key: &str) -> Option<D::Value> {
        self.read(|entries| entries.get(key).map(|slot| slot.value.clone()))
    }

    /// Every entry, by key below the watched prefix.
    pub fn snapshot(&self) -> BTreeMap<String, D::Value> {
        self.read(|entries| entries.iter().map(|(k, slot)| (k.clone(), slot.value.clone())).collect())
    }

    pub fn len(&self) -> usize {
        self.read(BTreeMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_synced(&self) -> bool {
        self.inner.status.borrow().synced
    }

    pub fn status(&self) -> CacheStatus {
        self.inner.status.borrow().clone()
    }

    /// Follows [`CacheStatus`]: wakes on every change, sync and rejection.
    pub fn watch_status(&self) -> watch::Receiver<CacheStatus> {
        self.inner.status.subscribe()
    }

    /// Waits until the current session's initial list has completed.
    pub async fn wait_synced(&self) {
        let mut status = self.watch_status();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = status.wait_for(|s| s.synced).await;
    }

    fn read<R>(&self, f: impl FnOnce(&BTreeMap<String, Slot<D::Value>>) -> R) -> R {
        f(&self.inner.entries.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Slot<D::Value>>) -> R) -> R {
        f(&mut self.inner.entries.write().unwrap_or_else(PoisonError::into_inner))
    }

    /// `changes` entries changed, leaving `entries`.
    fn count_changes(&self, entries: usize, changes: usize) {
        if changes > 0 {
            self.inner.status.send_modify(|s| {
                s.entries = entries;
                s.generation += changes as u64;
            });
        }
    }

    /// Tells the observer of one change, once the status counts it.
    fn publish(&self, key: &str, op: Op, value: &D::Value) {
        match op {
            Op::Upsert => tracing::debug!(kind = %self.kind(), key, "upsert"),
            Op::Delete => tracing::debug!(kind = %self.kind(), key, "delete"),
        }
        let status = self.inner.status.borrow();
        let prefix = status.prefix.as_deref().unwrap_or_default();
        self.inner.observer.published(self.kind(), prefix, key, op, value);
    }

    pub(crate) fn set_prefix(&self, prefix: &str) {
        self.inner.status.send_modify(|s| s.prefix = Some(prefix.to_string()));
    }

    pub(crate) fn set_unsynced(&self) {
        self.inner.status.send_if_modified(|s| std::mem::replace(&mut s.synced, false));
    }

    fn record_error(&self, error: String) {
        self.inner.status.send_modify(|s| s.last_error = Some(error));
    }

    /// Marks every entry stale: what the next list does not confirm is deleted at its end.
    pub(crate) fn mark_all_stale(&self) {
        self.write(|entries| entries.values_mut().for_each(|slot| slot.stale = true));
    }

    /// Decodes and stores one value; an unchanged value only clears the stale mark.
    pub(crate) fn upsert(&self, key: &str, value: &[u8], validation: &Validation) {
        let kind = self.kind();
        let decoded = match self.inner.decoder.decode(key, value, validation) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::warn!(
                    %kind,
                    key,
                    value = %String::from_utf8_lossy(value),
                    %error,
                    "unable to unmarshal value: entry rejected"
                );
                self.inner.status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_rejection = Some(format!("{key}: {error}"));
                });
                self.delete(key);
                return;
            }
        };
        let changed = self.write(|entries| match entries.get_mut(key) {
            Some(slot) if slot.value == decoded => {
                slot.stale = false;
                None
            }
            _ => {
                self.inner.observer.upsert(kind, key, &decoded);
                entries.insert(key.to_string(), Slot { value: decoded.clone(), stale: false });
                Some((decoded, entries.len()))
            }
        });
        if let Some((value, len)) = changed {
            self.count_changes(len, 1);
            self.publish(key, Op::Upsert, &value);
        }
    }

    pub(crate) fn delete(&self, key: &str) {
        let removed = self.write(|entries| {
            let slot = entries.remove(key)?;
            self.inner.observer.delete(self.kind(), key);
            Some((slot.value, entries.len()))
        });
        if let Some((value, len)) = removed {
            self.count_changes(len, 1);
            self.publish(key, Op::Delete, &value);
        }
    }

    /// The list is complete: delete what it did not confirm, and count as synced.
    pub(crate) fn finish_list(&self) {
        let kind = self.kind();
        let (stale, len) = self.write(|entries| {
            let keys: Vec<String> = entries.iter().filter(|(_, slot)| slot.stale).map(|(k, _)| k.clone()).collect();
            let mut stale = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(slot) = entries.remove(&key) {
                    self.inner.observer.delete(kind, &key);
                    stale.push((key, slot.value));
                }
            }
            self.inner.observer.synced(kind, &entries.keys().map(String::as_str).collect::<Vec<_>>());
            (stale, entries.len())
        });
        if !stale.is_empty() {
            tracing::info!(%kind, count = stale.len(), "deleting stale entries after the list");
        }
        self.count_changes(len, stale.len());
        for (key, value) in &stale {
            self.publish(key, Op::Delete, value);
        }
        self.inner.status.send_modify(|s| {
            s.synced = true;
            s.lists += 1;
            s.last_error = None;
        });
    }

    /// Deletes every entry (the cluster was removed, or its ID changed).
    pub(crate) fn drain(&self) {
        let drained = self.write(|entries| {
            let drained = std::mem::take(entries);
            drained.keys().for_each(|key| self.inner.observer.delete(self.kind(), key));
            drained
        });
        self.count_changes(0, drained.len());
        for (key, slot) in &drained {
            self.publish(key, Op::Delete, &slot.value);
        }
        self.set_unsynced();
    }

    /// The remote does not publish this kind in this session: nothing may linger.
    pub(crate) fn not_offered(&self) {
        self.drain();
        // Under the lock, as every report to the observer.
        self.write(|_| self.inner.observer.not_offered(self.kind()));
    }

    /// Lists and watches `prefix` into this cache until `token` is cancelled. Returns an error
    /// only for what ends the session (see [`connect::Error::is_fatal`]).
    pub(crate) async fn run(
        &self,
        connection: &Connection,
        prefix: String,
        validation: Validation,
        token: &CancellationToken,
    ) -> connect::Result<()> {
        self.set_prefix(&prefix);
        let mut sink = CacheSink { cache: self, prefix: &prefix, validation: &validation };
        list_and_watch(connection, &prefix, token, &mut sink).await
    }
}

struct CacheSink<'a, D: Decoder, O> {
    cache: &'a PrefixCache<D, O>,
    prefix: &'a str,
    validation: &'a Validation,
}

impl<D: Decoder, O: Observer<D::Value>> Sink for CacheSink<'_, D, O> {
    fn list_started(&mut self) {
        self.cache.mark_all_stale();
    }

    fn upsert(&mut self, key: &str, value: &[u8]) {
        match key.strip_prefix(self.prefix) {
            Some(rest) => self.cache.upsert(rest, value, self.validation),
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
        self.cache.record_error(error.to_string());
    }
}

/// A cache of any kind and mode, for a remote cluster to run them all alike.
pub(crate) trait AnyCache: Send + Sync {
    fn kind(&self) -> Kind;
    fn status(&self) -> CacheStatus;
    fn watch_status(&self) -> watch::Receiver<CacheStatus>;
    fn set_prefix(&self, prefix: &str);
    fn set_unsynced(&self);
    fn drain(&self);
    fn not_offered(&self);
    fn span(&self) -> tracing::Span;
    /// [`PrefixCache::run`] as a task of its own.
    fn run(
        &self,
        connection: Connection,
        prefix: String,
        validation: Validation,
        token: CancellationToken,
    ) -> BoxFuture<'static, connect::Result<()>>;
}

impl<D: Decoder, O: Observer<D::Value>> AnyCache for PrefixCache<D, O> {
    fn kind(&self) -> Kind {
        self.kind()
    }

    fn status(&self) -> CacheStatus {
        self.status()
    }

    fn watch_status(&self) -> watch::Receiver<CacheStatus> {
        self.watch_status()
    }

    fn set_prefix(&self, prefix: &str) {
        self.set_prefix(prefix);
    }

    fn set_unsynced(&self) {
        self.set_unsynced();
    }

    fn drain(&self) {
        self.drain();
    }

    fn not_offered(&self) {
        self.not_offered();
    }

    fn span(&self) -> tracing::Span {
        self.inner.decoder.span()
    }

    fn run(
        &self,
        connection: Connection,
        prefix: String,
        validation: Validation,
        token: CancellationToken,
    ) -> BoxFuture<'static, connect::Result<()>> {
        let cache = self.clone();
        Box::pin(async move { cache.run(&connection, prefix, validation, &token).await })
    }
}

/// Receives what [`list_and_watch`] reads. Keys are full etcd keys.
pub(crate) trait Sink {
    /// A (re)list starts: every entry known so far is stale until listed again.
    fn list_started(&mut self) {}
    fn upsert(&mut self, key: &str, value: &[u8]);
    fn delete(&mut self, key: &str);
    /// The list is complete; watch events follow.
    fn list_done(&mut self) {}
    /// A retried failure, for status reporting.
    fn error(&mut self, _error: &connect::Error) {}
}

/// Why the inner watch loop stopped.
enum WatchEnd {
    Cancelled,
    Relist,
}

/// Lists `prefix` (every key starting with it) and watches it from the list's revision + 1,
/// relisting on compaction and re-opening broken watches, until `token` is cancelled.
pub(crate) async fn list_and_watch(
    connection: &Connection,
    prefix: &str,
    token: &CancellationToken,
    sink: &mut impl Sink,
) -> connect::Result<()> {
    list_and_watch_range(connection, prefix, &prefix_range_end(prefix.as_bytes()), token, sink).await
}

/// [`list_and_watch`] of `[start, end)`; an empty `end` is the one key `start`, which is all
/// a role granted a single key (Cilium's `remote` and its cluster config) may read.
pub(crate) async fn list_and_watch_range(
    connection: &Connection,
    prefix: &str,
    end: &[u8],
    token: &CancellationToken,
    sink: &mut impl Sink,
) -> connect::Result<()> {
    let start = prefix.as_bytes();
    let mut retry = rewatch_retry(connection);
    loop {
        sink.list_started();
        let listed = tokio::select! {
            () = token.cancelled() => return Ok(()),
            listed = list(connection, start, end, sink) => listed,
        };
        let revision = match listed {
            Ok(revision) => revision,
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) if error.is_compacted() => {
                tracing::info!(prefix, "list revision compacted between pages, listing again");
                continue;
            }
            Err(error) => {
                tracing::warn!(prefix, %error, "unable to list keys, retrying");
                sink.error(&error);
                if sleep_or_cancel(retry.next_delay(), token).await {
                    return Ok(());
                }
                continue;
            }
        };
        sink.list_done();
        retry.reset();
        match watch(connection, start, end, revision + 1, token, sink).await? {
            WatchEnd::Cancelled => return Ok(()),
            WatchEnd::Relist => {}
        }
    }
}

/// Reads every page of `[start, end)`, pinned to the first page's revision; returns it.
async fn list(connection: &Connection, start: &[u8], end: &[u8], sink: &mut impl Sink) -> connect::Result<i64> {
    let mut revision = 0;
    let mut from = start.to_vec();
    loop {
        let page = connection.range_page(&from, end, revision).await?;
        if revision == 0 {
            revision = page.revision;
        }
        for kv in &page.kvs {
            match kv.key_str() {
                Ok(key) => sink.upsert(key, kv.value()),
                Err(_) => tracing::warn!(key = ?kv.key(), "ignoring a key that is not UTF-8"),
            }
        }
        match page.kvs.last() {
            Some(last) if page.more => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(revision),
        }
    }
}

/// Watches from `next` until cancelled or a relist is needed, re-opening broken streams.
async fn watch(
    connection: &Connection,
    start: &[u8],
    end: &[u8],
    mut next: i64,
    token: &CancellationToken,
    sink: &mut impl Sink,
) -> connect::Result<WatchEnd> {
    let prefix = String::from_utf8_lossy(start).into_owned();
    let mut retry = rewatch_retry(connection);
    // Whether the last stream ended in a failure: the next is opened after a delay.
    let mut failed = false;
    loop {
        if failed && sleep_or_cancel(retry.next_delay(), token).await {
            return Ok(WatchEnd::Cancelled);
        }
        let opened = tokio::select! {
            () = token.cancelled() => return Ok(WatchEnd::Cancelled),
            opened = connection.watch(start, end, next) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                tracing::debug!(%prefix, %error, "unable to open the watch, retrying");
                sink.error(&error);
                failed = true;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = token.cancelled() => return Ok(WatchEnd::Cancelled),
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    tracing::debug!(%prefix, next, "watch stream closed, re-opening");
                    failed = true;
                    break;
                }
                Err(source) => {
                    let error = connect::Error::Rpc { what: format!("watch {prefix}"), source };
                    tracing::debug!(%prefix, %error, next, "watch failed, re-opening");
                    sink.error(&error);
                    failed = true;
                    break;
                }
            };
            connection.check_header(response.header())?;
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::info!(
                        %prefix,
                        next,
                        compact_revision = response.compact_revision(),
                        "watch revision compacted, relisting"
                    );
                } else {
                    tracing::warn!(%prefix, reason = response.cancel_reason(), "watch cancelled, relisting");
                    if sleep_or_cancel(connection.options.rewatch_delay, token).await {
                        return Ok(WatchEnd::Cancelled);
                    }
                }
                return Ok(WatchEnd::Relist);
            }
            if failed {
                failed = false;
                retry.reset();
            }
            let events = response.events();
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let Ok(key) = kv.key_str() else {
                    tracing::warn!(key = ?kv.key(), "ignoring a key that is not UTF-8");
                    continue;
                };
                match event.event_type() {
                    etcd_client::EventType::Put => sink.upsert(key, kv.value()),
                    etcd_client::EventType::Delete => sink.delete(key),
                }
                next = next.max(kv.mod_revision() + 1);
            }
            // A progress notification promises every event up to its revision was sent.
            if events.is_empty()
                && !response.created()
                && let Some(header) = response.header()
            {
                next = next.max(header.revision() + 1);
            }
        }
    }
}

/// Re-opening a watch or re-reading a prefix: from `rewatch_delay`, doubling up to 2 s.
fn rewatch_retry(connection: &Connection) -> Retry {
    let initial = connection.options.rewatch_delay;
    Backoff::new(initial, REWATCH_MAX_DELAY.max(initial)).start()
}

/// The longest wait before re-opening a watch: a broken stream is usually a reconnect away.
const REWATCH_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Sleeps; `true` if cancelled meanwhile.
pub(crate) async fn sleep_or_cancel(duration: std::time::Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Node;
    use crate::wire::tests::validation;

    fn node(name: &str, ip: &str) -> Vec<u8> {
        format!(r#"{{"Name":"{name}","Cluster":"cluster1","ClusterID":1,"IPAddresses":[{{"Type":"InternalIP","IP":"{ip}"}}]}}"#)
            .into_bytes()
    }

    #[test]
    fn a_relist_deletes_what_it_did_not_see_and_keeps_the_rest_silently() {
        let cache = Cache::<Node>::new(ClusterName::new("cluster1").unwrap(), None);
        let mut changes = cache.subscribe();
        let v = validation("cluster1", 1);
        cache.mark_all_stale();
        cache.upsert("a", &node("a", "10.0.0.1"), &v);
        cache.upsert("b", &node("b", "10.0.0.2"), &v);
        cache.finish_list();
        assert!(cache.is_synced());
        assert_eq!(cache.len(), 2);
        assert_eq!(changes.try_recv().unwrap().key, "a");
        assert_eq!(changes.try_recv().unwrap().key, "b");

        // Reconnect: b unchanged, a gone, c new.
        cache.set_unsynced();
        cache.mark_all_stale();
        cache.upsert("b", &node("b", "10.0.0.2"), &v);
        cache.upsert("c", &node("c", "10.0.0.3"), &v);
        assert_eq!(cache.len(), 3, "stale entries stay until the list completes");
        cache.finish_list();
        assert_eq!(cache.snapshot().keys().cloned().collect::<Vec<_>>(), ["b", "c"]);
        let c = changes.try_recv().unwrap();
        assert_eq!((c.key.as_str(), c.op), ("c", Op::Upsert));
        let a = changes.try_recv().unwrap();
        assert_eq!((a.key.as_str(), a.op), ("a", Op::Delete));
        assert_eq!(a.value.name, "a");
        assert!(changes.try_recv().is_err(), "an unchanged value is not a change");
        assert_eq!(cache.status().lists, 2);
    }

    #[test]
    fn rejected_values_are_counted_not_cached_and_replace_a_valid_one() {
        let cache = Cache::<Node>::new(ClusterName::new("cluster1").unwrap(), None);
        let v = validation("cluster1", 1);
        cache.upsert("a", &node("a", "10.0.0.1"), &v);
        cache.upsert("x", &node("y", "10.0.0.9"), &v);
        cache.upsert("z", b"{", &v);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.status().rejected, 2);
        cache.upsert("a", &node("a", "not-an-ip"), &v);
        assert!(cache.is_empty(), "an entry that turns invalid is removed");
        assert_eq!(cache.status().rejected, 3);
        assert!(cache.status().last_rejection.unwrap().starts_with("a: "));
    }

    #[test]
    fn the_generation_counts_entry_changes_not_lists() {
        let cache = Cache::<Node>::new(ClusterName::new("cluster1").unwrap(), None);
        let mut changes = cache.subscribe();
        let v = validation("cluster1", 1);
        cache.mark_all_stale();
        cache.upsert("a", &node("a", "10.0.0.1"), &v);
        cache.upsert("b", &node("b", "10.0.0.2"), &v);
        cache.finish_list();
        assert_eq!(cache.status().generation, 2);

        // A relist that confirms everything changes nothing.
        cache.mark_all_stale();
        cache.upsert("a", &node("a", "10.0.0.1"), &v);
        cache.upsert("b", &node("b", "10.0.0.2"), &v);
        cache.finish_list();
        assert_eq!(cache.status().generation, 2);

        // One that confirms nothing deletes both: two changes.
        cache.mark_all_stale();
        cache.finish_list();
        assert_eq!((cache.status().generation, cache.status().entries), (4, 0));
        let seen: Vec<_> = std::iter::from_fn(|| changes.try_recv().ok()).map(|c| (c.key, c.op)).collect();
        assert_eq!(
            seen,
            [
                ("a".to_string(), Op::Upsert),
                ("b".to_string(), Op::Upsert),
                ("a".to_string(), Op::Delete),
                ("b".to_string(), Op::Delete)
            ]
        );
        cache.drain();
        assert_eq!(cache.status().generation, 4, "nothing left to drain");
        assert!(!cache.is_synced());
    }

    #[test]
    fn the_mesh_wide_stream_carries_full_keys_and_decoded_values() {
        let (events, mut rx) = broadcast::channel(16);
        let cache = Cache::<Node>::new(ClusterName::new("cluster1").unwrap(), Some(events));
        cache.set_prefix("cilium/state/nodes/v1/cluster1/");
        cache.upsert("a", &node("a", "10.0.0.1"), &validation("cluster1", 1));
        cache.drain();
        let upsert = rx.try_recv().unwrap();
        assert_eq!(upsert.key, "cilium/state/nodes/v1/cluster1/a");
        let json = serde_json::to_value(&upsert).unwrap();
        assert_eq!(json["kind"], "nodes");
        assert_eq!(json["op"], "upsert");
        assert_eq!(json["value"]["Name"], "a");
        let delete = serde_json::to_value(rx.try_recv().unwrap()).unwrap();
        assert_eq!((delete["op"].as_str(), delete["value"].is_null()), (Some("delete"), true));
    }
}
