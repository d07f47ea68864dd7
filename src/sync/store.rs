//! The sync store: the desired keys and values, written to the backend by one worker —
//! coalesced, unchanged bytes skipped, failures retried with backoff, every key on the
//! session lease, and a sync canary per prefix once that prefix's initial state is written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::kvstore::{Backend, Error};

/// Failed writes are retried after this, doubling up to [`MAX_BACKOFF`] (the same shape as
/// kube's watcher backoff), and back to the start after a success.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The metrics scope of a key, as Cilium labels its sync stores: the two segments after
/// `cilium/state/` (`nodes/v1`, `identities/v1`, `ip/v1`, ...), otherwise the first two.
pub fn scope(key: &str) -> &str {
    let rest = key.strip_prefix("cilium/state/").unwrap_or(key);
    let end = rest.match_indices('/').nth(1).map_or(rest.len(), |(i, _)| i);
    &rest[..end]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Key(String),
    /// Written once no key under `prefix` that was queued before it is still unwritten.
    Canary {
        prefix: String,
        key: String,
    },
}

#[derive(Default)]
struct State {
    desired: HashMap<String, Bytes>,
    /// What the backend holds, as far as this process knows. `None` marks a key that is
    /// there but not ours to keep (found by pruning): the worker deletes it.
    written: HashMap<String, Option<Bytes>>,
    queue: VecDeque<Item>,
    queued: HashSet<String>,
    /// Keys whose last write failed; a canary waits for them.
    failing: HashSet<String>,
    canary_keys: HashSet<String>,
}

impl State {
    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(Item::Key(key));
        }
    }

    fn needs_write(&self, key: &str) -> bool {
        match (self.desired.get(key), self.written.get(key)) {
            (Some(want), Some(Some(have))) => want != have,
            (None, None) => false,
            _ => true,
        }
    }
}

/// Counters the metrics layer reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub queued: usize,
    pub errors: u64,
    pub writes: u64,
}

pub struct SyncStore {
    state: Mutex<State>,
    wake: Notify,
    stats: Mutex<SyncStats>,
    /// Failed writes per [`scope`] of the key, for `kvstore_sync_errors_total{scope}`.
    errors_by_scope: Mutex<HashMap<String, u64>>,
    /// The canary keys written so far (readiness watches this).
    canaries_tx: watch::Sender<HashSet<String>>,
}

impl Default for SyncStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            stats: Mutex::default(),
            errors_by_scope: Mutex::default(),
            canaries_tx: watch::Sender::new(HashSet::new()),
        }
    }
}

impl SyncStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Wants `key` to hold `value`; a value equal to what is written costs nothing.
    pub fn upsert(&self, key: String, value: Bytes) {
        let mut state = self.state.lock();
        if state.desired.get(&key) == Some(&value) {
            return;
        }
        state.desired.insert(key.clone(), value);
        if state.needs_write(&key) {
            state.enqueue(key);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Wants `key` gone.
    pub fn delete(&self, key: &str) {
        let mut state = self.state.lock();
        if state.desired.remove(key).is_none() && !state.written.contains_key(key) {
            return;
        }
        if state.needs_write(key) {
            state.enqueue(key.to_owned());
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Writes `canary_key` (an RFC 3339 timestamp, on the lease) once every key under
    /// `prefix` queued until now has been written.
    pub fn request_canary(&self, prefix: &str, canary_key: &str) {
        let mut state = self.state.lock();
        state.canary_keys.insert(canary_key.to_owned());
        state.queue.push_back(Item::Canary { prefix: prefix.to_owned(), key: canary_key.to_owned() });
        drop(state);
        self.wake.notify_one();
    }

    /// Reports writes of `key` through [`SyncStore::canaries`] too (the cluster config,
    /// which readiness waits for like a canary).
    pub fn track_written(&self, key: &str) {
        self.state.lock().canary_keys.insert(key.to_owned());
    }

    /// Forgets what is believed written for `key` and writes the desired state again: for
    /// keys someone else may have changed (the cluster config) or removed.
    pub fn rewrite(&self, key: &str, found: Option<Bytes>) {
        let mut state = self.state.lock();
        match found {
            Some(value) => state.written.insert(key.to_owned(), Some(value)),
            None => state.written.remove(key),
        };
        if state.needs_write(key) {
            state.enqueue(key.to_owned());
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Deletes the keys in `present` (found under one of our prefixes) that nothing wants:
    /// what was deleted while we were not running.
    pub fn prune(&self, present: impl IntoIterator<Item = String>) -> usize {
        let mut state = self.state.lock();
        let mut pruned = 0;
        for key in present {
            if !state.desired.contains_key(&key) && !state.written.contains_key(&key) {
                state.written.insert(key.clone(), None);
                state.enqueue(key);
                pruned += 1;
            }
        }
        drop(state);
        self.wake.notify_one();
        pruned
    }

    pub fn desired_value(&self, key: &str) -> Option<Bytes> {
        self.state.lock().desired.get(key).cloned()
    }

    pub fn stats(&self) -> SyncStats {
        let mut stats = *self.stats.lock();
        stats.queued = self.state.lock().queued.len();
        stats
    }

    /// Keys waiting to be written, by [`scope`].
    pub fn queued_by_scope(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for key in &self.state.lock().queued {
            *out.entry(scope(key).to_owned()).or_default() += 1;
        }
        out
    }

    /// Failed writes since start, by [`scope`].
    pub fn errors_by_scope(&self) -> HashMap<String, u64> {
        self.errors_by_scope.lock().clone()
    }

    /// Watches the set of canary keys written so far.
    pub fn canaries(&self) -> watch::Receiver<HashSet<String>> {
        self.canaries_tx.subscribe()
    }

    /// Writes until `shutdown`: takes a lease of `lease_ttl`, keeps it alive, and when it is
    /// lost takes a new one and writes every desired key again.
    pub async fn run<B: Backend>(self: Arc<Self>, backend: Arc<B>, lease_ttl: Duration, shutdown: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        let Some(mut lease) = self.grant(&*backend, lease_ttl, &shutdown).await else { return };
        let mut keep_alive = tokio::time::interval(lease_ttl / 3);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keep_alive.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                _ = keep_alive.tick() => match backend.keep_alive(lease).await {
                    Ok(()) => {}
                    Err(Error::LeaseLost(_)) => {
                        let Some(new) = self.relapse(&*backend, lease, lease_ttl, &shutdown).await else { return };
                        lease = new;
                    }
                    Err(error) => tracing::warn!(error = %crate::error_chain(&error), "lease keep-alive failed"),
                },
            }
            while let Some(item) = self.next_item() {
                if shutdown.is_cancelled() {
                    return;
                }
                match self.write(&*backend, &item, lease).await {
                    Ok(()) => backoff = MIN_BACKOFF,
                    Err(Error::LeaseLost(_)) => {
                        self.requeue(item, false);
                        let Some(new) = self.relapse(&*backend, lease, lease_ttl, &shutdown).await else { return };
                        lease = new;
                    }
                    Err(error) => {
                        self.stats.lock().errors += 1;
                        let failed = match &item {
                            Item::Key(key) | Item::Canary { key, .. } => scope(key).to_owned(),
                        };
                        *self.errors_by_scope.lock().entry(failed).or_default() += 1;
                        tracing::warn!(error = %crate::error_chain(&error), item = ?item, retry_in = ?backoff, "kvstore write failed");
                        self.requeue(item, true);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    async fn grant<B: Backend>(&self, backend: &B, ttl: Duration, shutdown: &CancellationToken) -> Option<i64> {
        let mut backoff = MIN_BACKOFF;
        loop {
            match backend.grant_lease(ttl).await {
                Ok(lease) => {
                    tracing::info!(lease = format_args!("{lease:x}"), ttl = ?ttl, "kvstore session lease granted");
                    return Some(lease);
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), retry_in = ?backoff, "granting the session lease failed")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The lease is gone, and with it every key written on it: write everything again.
    async fn relapse<B: Backend>(
        &self,
        backend: &B,
        old: i64,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Option<i64> {
        tracing::warn!(lease = format_args!("{old:x}"), "session lease lost; writing every key again");
        let lease = self.grant(backend, ttl, shutdown).await?;
        let mut state = self.state.lock();
        state.written.clear();
        let keys: Vec<String> = state.desired.keys().cloned().collect();
        for key in keys {
            state.enqueue(key);
        }
        Some(lease)
    }

    fn next_item(&self) -> Option<Item> {
        let mut state = self.state.lock();
        let mut skipped = 0;
        loop {
            let item = state.queue.pop_front()?;
            match &item {
                Item::Key(key) => {
                    state.queued.remove(key);
                    if state.needs_write(key) {
                        return Some(item);
                    }
                    state.failing.remove(key);
                }
                Item::Canary { prefix, .. } => {
                    // A key under the prefix whose write failed was queued before the
                    // canary: the canary goes behind it again.
                    let blocked = state.failing.iter().any(|k| k.starts_with(prefix.as_str()));
                    if blocked {
                        state.queue.push_back(item);
                        skipped += 1;
                        if skipped >= state.queue.len() {
                            return None;
                        }
                        continue;
                    }
                    return Some(item);
                }
            }
        }
    }

    fn requeue(&self, item: Item, failed: bool) {
        let mut state = self.state.lock();
        match item {
            Item::Key(key) => {
                if failed {
                    state.failing.insert(key.clone());
                    // A failed request may still have been applied (the answer was lost, not
                    // the request): the key's content is unknown now, so whatever is desired
                    // next, even its absence, is written again.
                    state.written.insert(key.clone(), None);
                }
                state.enqueue(key);
            }
            canary @ Item::Canary { .. } => state.queue.push_back(canary),
        }
    }

    async fn write<B: Backend>(&self, backend: &B, item: &Item, lease: i64) -> Result<(), Error> {
        match item {
            Item::Key(key) => {
                let want = self.state.lock().desired.get(key).cloned();
                match &want {
                    Some(value) => backend.put(key, value.clone(), lease).await?,
                    None => backend.delete(key).await?,
                }
                tracing::debug!(key = %key, deleted = want.is_none(), "kvstore write");
                let mut state = self.state.lock();
                state.failing.remove(key);
                match want {
                    Some(value) => state.written.insert(key.clone(), Some(value)),
                    None => state.written.remove(key),
                };
                // The desired value may have changed while the write was in flight.
                if state.needs_write(key) {
                    state.enqueue(key.clone());
                }
                drop(state);
                self.stats.lock().writes += 1;
                if self.state.lock().canary_keys.contains(key) {
                    self.canaries_tx.send_modify(|written| {
                        written.insert(key.clone());
                    });
                }
            }
            Item::Canary { key, .. } => {
                // The canary becomes an ordinary desired key, so it is written again with
                // everything else if the lease is ever lost.
                let value = Bytes::from(super::rfc3339_now());
                self.state.lock().desired.insert(key.clone(), value.clone());
                backend.put(key, value.clone(), lease).await?;
                self.state.lock().written.insert(key.clone(), Some(value));
                self.stats.lock().writes += 1;
                tracing::info!(canary = %key, "initial sync written");
                self.canaries_tx.send_modify(|written| {
                    written.insert(key.clone());
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kvstore::Result;

    /// An in-memory backend that can be told to fail writes or to lose the lease.
    #[derive(Default)]
    struct Memory {
        keys: Mutex<BTreeMap<String, (Bytes, i64)>>,
        leases: Mutex<HashSet<i64>>,
        next_lease: Mutex<i64>,
        fail_puts: Mutex<usize>,
        /// Puts applied whose answer is then lost (an error for the caller).
        lose_answers: Mutex<usize>,
        puts: Mutex<Vec<String>>,
    }

    impl Memory {
        fn value(&self, key: &str) -> Option<String> {
            self.keys.lock().get(key).map(|(v, _)| String::from_utf8_lossy(v).into_owned())
        }

        fn lose_leases(&self) {
            self.leases.lock().clear();
            self.keys.lock().retain(|_, (_, lease)| *lease == 0);
        }
    }

    impl Backend for Memory {
        async fn grant_lease(&self, _: Duration) -> Result<i64> {
            let mut next = self.next_lease.lock();
            *next += 1;
            self.leases.lock().insert(*next);
            Ok(*next)
        }

        async fn keep_alive(&self, lease: i64) -> Result<()> {
            if self.leases.lock().contains(&lease) { Ok(()) } else { Err(Error::LeaseLost(lease)) }
        }

        async fn put(&self, key: &str, value: Bytes, lease: i64) -> Result<()> {
            {
                let mut fail = self.fail_puts.lock();
                if *fail > 0 {
                    *fail -= 1;
                    return Err(Error::Config { path: key.into(), reason: "injected failure".into() });
                }
            }
            if !self.leases.lock().contains(&lease) {
                return Err(Error::LeaseLost(lease));
            }
            self.puts.lock().push(key.to_owned());
            self.keys.lock().insert(key.to_owned(), (value, lease));
            let mut lose = self.lose_answers.lock();
            if *lose > 0 {
                *lose -= 1;
                return Err(Error::Config { path: key.into(), reason: "answer lost".into() });
            }
            Ok(())
        }

        async fn get(&self, key: &str) -> Result<Option<Bytes>> {
            Ok(self.keys.lock().get(key).map(|(v, _)| v.clone()))
        }

        async fn delete(&self, key: &str) -> Result<()> {
            self.keys.lock().remove(key);
            Ok(())
        }

        async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
            Ok(self.keys.lock().keys().filter(|k| k.starts_with(prefix)).cloned().collect())
        }
    }

    fn start(backend: &Arc<Memory>) -> (Arc<SyncStore>, CancellationToken, tokio::task::JoinHandle<()>) {
        let store = SyncStore::new();
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(Arc::clone(backend), Duration::from_secs(900), token.clone()));
        (store, token, worker)
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn scopes_name_the_state_prefix_as_ciliums_metrics_do() {
        assert_eq!(scope("cilium/state/nodes/v1/c1/n1"), "nodes/v1");
        assert_eq!(scope("cilium/state/ip/v1/default/10.0.0.1"), "ip/v1");
        assert_eq!(scope("cilium/cluster-config/c1"), "cilium/cluster-config");
        assert_eq!(scope("cilium/.heartbeat"), "cilium/.heartbeat");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_value_is_not_written_twice() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        store.upsert("k".into(), Bytes::from_static(b"v"));
        settle().await;
        store.upsert("k".into(), Bytes::from_static(b"v"));
        settle().await;
        assert_eq!(backend.puts.lock().as_slice(), ["k"]);
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_and_holds_back_its_prefix_canary() {
        let backend = Arc::new(Memory::default());
        *backend.fail_puts.lock() = 2;
        let (store, token, worker) = start(&backend);
        store.upsert("cilium/state/nodes/v1/c/n1".into(), Bytes::from_static(b"n1"));
        store.request_canary("cilium/state/nodes/v1", "cilium/synced/c/cilium/state/nodes/v1");
        settle().await;
        assert_eq!(backend.value("cilium/synced/c/cilium/state/nodes/v1"), None, "canary waits for the failing key");
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(backend.value("cilium/state/nodes/v1/c/n1").as_deref(), Some("n1"));
        assert!(backend.value("cilium/synced/c/cilium/state/nodes/v1").is_some());
        assert!(store.canaries().borrow().contains("cilium/synced/c/cilium/state/nodes/v1"));
        assert_eq!(store.stats().errors, 2);
        token.cancel();
        worker.await.unwrap();
    }

    /// Found by the chaos test (an etcd member killed mid-request): a put whose answer is lost
    /// was applied all the same; deleting the key before the retry must still delete it.
    #[tokio::test(start_paused = true)]
    async fn a_key_deleted_after_a_put_with_a_lost_answer_is_deleted() {
        let backend = Arc::new(Memory::default());
        *backend.lose_answers.lock() = 1;
        let (store, token, worker) = start(&backend);
        store.upsert("k".into(), Bytes::from_static(b"v"));
        settle().await;
        assert_eq!(backend.value("k").as_deref(), Some("v"), "applied, though reported failed");
        store.delete("k");
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(backend.value("k"), None);
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_gets_every_key_written_again() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        store.upsert("a".into(), Bytes::from_static(b"1"));
        store.request_canary("a", "synced/a");
        settle().await;
        backend.lose_leases();
        assert_eq!(backend.value("a"), None);
        tokio::time::sleep(Duration::from_secs(301)).await;
        settle().await;
        assert_eq!(backend.value("a").as_deref(), Some("1"));
        assert!(backend.value("synced/a").is_some(), "the canary comes back too");
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_deletes_only_keys_nothing_wants() {
        let backend = Arc::new(Memory::default());
        backend.keys.lock().insert("p/stale".into(), (Bytes::from_static(b"old"), 0));
        backend.keys.lock().insert("p/kept".into(), (Bytes::from_static(b"old"), 0));
        let (store, token, worker) = start(&backend);
        store.upsert("p/kept".into(), Bytes::from_static(b"new"));
        settle().await;
        let present = backend.keys_with_prefix("p/").await.unwrap();
        assert_eq!(store.prune(present), 1);
        settle().await;
        assert_eq!(backend.value("p/stale"), None);
        assert_eq!(backend.value("p/kept").as_deref(), Some("new"));
        token.cancel();
        worker.await.unwrap();
    }
}
