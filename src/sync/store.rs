//! The sync store: the desired keys and values, written to the backend by one worker —
//! coalesced, unchanged bytes skipped, failures retried with backoff, every key on a lease
//! shared by at most 1,000 keys ([`super::leases`]), and a sync canary per prefix once that
//! prefix's initial state is written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use foldhash::{HashMap as FastMap, HashSet as FastSet};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use clustermesh_client::{Backoff, Retry};

use crate::blob::Blob;

use super::leases::{Leases, MAX_KEYS_PER_LEASE};
use crate::kvstore::instrumented::{EventsQueue, QueueLabels, operation_scope};
use crate::kvstore::{Backend, Error};

/// Failed writes are retried after 100 ms, doubling (with jitter) up to [`MAX_BACKOFF`], and
/// back to the start after a success.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a shutdown waits for the answers to writes already sent.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);

/// The metrics scope of a key, as Cilium labels its sync stores: the two segments after
/// `cilium/state/` or `cilium/cache/` (`nodes/v1`, `identities/v1`, `ip/v1`, ...), otherwise
/// the first two.
pub fn scope(key: &str) -> &str {
    let rest = key.strip_prefix("cilium/state/").or_else(|| key.strip_prefix("cilium/cache/")).unwrap_or(key);
    let end = rest.match_indices('/').nth(1).map_or(rest.len(), |(i, _)| i);
    &rest[..end]
}

/// A store key, shared by the slot map, the queue and the lease bookkeeping: its bytes are
/// held once however many of them refer to it.
type Key = Arc<str>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Key(Key),
    /// Written once no key under `prefix` that was queued before it is still unwritten.
    Canary {
        prefix: String,
        key: Key,
    },
}

impl Item {
    fn key(&self) -> &Key {
        match self {
            Item::Key(key) | Item::Canary { key, .. } => key,
        }
    }
}

/// A write taken from the queue.
struct Taken {
    item: Item,
    /// When the key was queued, for `kvstore_events_queue_seconds`.
    queued_at: Option<Instant>,
    /// Whether it puts, and so takes a lease.
    puts: bool,
    /// 0 until [`SyncStore::attach_leases`]; stays 0 for a delete.
    lease: i64,
}

/// The most writes taken from the queue at once when they go one at a time
/// ([`SyncOptions::max_in_flight`] = 1): the batch is written in one future, so the hand-over
/// from the mirror (a wakeup, a lock, a poll of the writer) is paid once per batch rather than
/// once per key. Bounded, so that lease renewals and a shutdown are not held up by a long
/// initial sync.
const MAX_BATCH: usize = 512;

/// What the backend holds for a key, as far as this process knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Absent,
    /// There, but with content unknown (a write whose answer was lost) or not ours to keep
    /// (found by pruning): written again, or deleted, whatever is desired.
    Unknown,
    Value(Blob),
}

/// One key the store knows: what is wanted and what is written. When both hold a value they
/// are usually the same `Blob`, so the value's bytes are held once.
#[derive(Debug)]
struct Slot {
    /// `None`: wanted gone.
    desired: Option<Blob>,
    written: Held,
}

impl Slot {
    fn needs_write(&self) -> bool {
        match (&self.desired, &self.written) {
            (Some(want), Held::Value(have)) => want != have,
            (None, Held::Absent) => false,
            _ => true,
        }
    }
}

/// The per-key maps use foldhash, not SipHash: they are hashed several times per key on
/// every write (see Cargo.toml).
#[derive(Default)]
struct State {
    /// One slot per key wanted or written; a key neither wanted nor written has none.
    slots: FastMap<Key, Slot>,
    queue: VecDeque<Item>,
    /// The keys in `queue`, and since when.
    queued: FastMap<Key, Instant>,
    /// Keys whose last write failed; a canary waits for them.
    failing: FastSet<Key>,
    canary_keys: FastSet<String>,
    /// Writes taken from the queue and not yet answered; counted as queued, so a drain waits
    /// for them.
    in_flight: usize,
    writes: u64,
    errors: u64,
    /// Failed writes per [`scope`] of the key, for `kvstore_sync_errors_total{scope}`.
    errors_by_scope: HashMap<String, u64>,
}

impl State {
    fn enqueue(&mut self, key: &str) {
        if !self.queued.contains_key(key) {
            let key = self.shared(key);
            self.enqueue_handle(key);
        }
    }

    /// [`State::enqueue`] of a key by its slot map handle: one hash of the key, not three,
    /// for each key an initial sync brings.
    fn enqueue_handle(&mut self, key: Key) {
        if let std::collections::hash_map::Entry::Vacant(vacant) = self.queued.entry(Arc::clone(&key)) {
            vacant.insert(Instant::now());
            self.queue.push_back(Item::Key(key));
        }
    }

    /// The slot map's handle of `key` (a new one for a key without a slot).
    fn shared(&self, key: &str) -> Key {
        self.slots.get_key_value(key).map_or_else(|| Key::from(key), |(key, _)| Arc::clone(key))
    }

    fn needs_write(&self, key: &str) -> bool {
        self.slots.get(key).is_some_and(Slot::needs_write)
    }

    fn desired(&self, key: &str) -> Option<&Blob> {
        self.slots.get(key)?.desired.as_ref()
    }

    /// The slot of `key`, made if missing (neither wanted nor written yet).
    fn slot(&mut self, key: &str) -> &mut Slot {
        if !self.slots.contains_key(key) {
            self.slots.insert(Key::from(key), Slot { desired: None, written: Held::Absent });
        }
        self.slots.get_mut(key).expect("inserted above")
    }

    fn set_written(&mut self, key: &str, held: Held) {
        self.slot(key).written = held;
        self.forget_if_idle(key);
    }

    /// Drops the slot of a key neither wanted nor written.
    fn forget_if_idle(&mut self, key: &str) {
        if self.slots.get(key).is_some_and(|slot| slot.desired.is_none() && slot.written == Held::Absent) {
            self.slots.remove(key);
        }
    }

    /// After the queue empties, gives back the room a burst (an initial sync) grew it to.
    fn shrink_if_drained(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 1024 {
            self.queue.shrink_to_fit();
        }
        if self.queued.is_empty() && self.queued.capacity() > 1024 {
            self.queued.shrink_to_fit();
        }
    }
}

/// What a write did, for the lease bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Put,
    Deleted,
}

/// What the writing loop of [`SyncStore::run`] keeps between iterations.
struct Worker {
    retry: Retry,
    /// After a failed write nothing new is sent until this passes.
    paused: Option<tokio::time::Instant>,
    leases: Leases,
    /// Keys with a write taken from the queue and unanswered: a key has one write in flight
    /// at a time.
    in_flight_keys: FastSet<Key>,
}

impl Worker {
    /// Pauses sending for the next retry delay, and returns it.
    fn pause(&mut self) -> Duration {
        let delay = self.retry.next_delay();
        self.paused = Some(tokio::time::Instant::now() + delay);
        delay
    }
}

/// Counters the metrics layer reads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub queued: usize,
    pub errors: u64,
    pub writes: u64,
}

/// The keys under `prefix` in `backend`, for [`SyncStore::prune`], retried with backoff until
/// listed: a prefix left unlisted would keep the keys of objects deleted meanwhile for as long
/// as the process runs (found by the chaos test: an etcd member killed during the listing).
/// `None` once `shutdown` is cancelled.
pub async fn list_for_prune(backend: &dyn Backend, prefix: &str, shutdown: &CancellationToken) -> Option<Vec<String>> {
    let span = tracing::warn_span!("prune", prefix);
    retry_until_shutdown("listing keys to prune", shutdown, || backend.keys_with_prefix(prefix)).instrument(span).await
}

/// Runs `attempt` until it succeeds, waiting as [`BACKOFF`] says after each failure; `None`
/// once `shutdown` is cancelled (also mid-attempt).
async fn retry_until_shutdown<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut retry = BACKOFF.start();
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        let error = match result {
            Ok(value) => return Some(value),
            Err(error) => error,
        };
        let delay = retry.next_delay();
        tracing::warn!(error = %crate::error_chain(&error), retry_in = ?delay, "{what} failed");
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

pub struct SyncStore {
    /// The one lock: what is wanted, written, queued and counted.
    state: Mutex<State>,
    wake: Notify,
    /// The canary keys written so far (readiness watches this).
    canaries_tx: watch::Sender<HashSet<String>>,
    options: SyncOptions,
    /// Woken whenever a write is answered or handed back to the queue, for [`Self::drained`].
    settled: Notify,
    /// Where the time from a key being queued to its write being answered goes: Cilium's
    /// `kvstore_events_queue_seconds`, which times events waiting in its client's queue.
    queue_seconds: Option<EventsQueue>,
    /// Prefixes whose keys the worker adopts when it starts ([`SyncStore::adopt_on_start`]).
    adopt: Mutex<Vec<String>>,
    /// Holders of [`SyncStore::hold_wakes`]: while any, changes wake the writer only once a
    /// batch is queued.
    holding: AtomicUsize,
    /// A change left the writer asleep under a hold: the hold's end wakes it.
    deferred: AtomicBool,
}

/// Returned by [`SyncStore::hold_wakes`]; wakes the writer when dropped if a change was
/// left for it meanwhile.
#[must_use = "the hold ends when this is dropped"]
pub struct WakesHeld<'a> {
    store: &'a SyncStore,
}

impl Drop for WakesHeld<'_> {
    fn drop(&mut self) {
        let store = self.store;
        if store.holding.fetch_sub(1, Ordering::AcqRel) == 1 && store.deferred.swap(false, Ordering::AcqRel) {
            store.wake.notify_one();
        }
    }
}

/// How the worker uses the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOptions {
    /// Keys sharing one lease (Cilium: 1,000).
    pub max_keys_per_lease: usize,
    /// Writes sent before the first is answered. Each key still has at most one write in
    /// flight, in order, and a canary waits until every write before it is answered. One
    /// suits the embedded store (a write is a function call); an attached etcd is paid in
    /// round trips, which Cilium overlaps too (`etcd.maxInflight`, defaulting to its QPS, 20).
    pub max_in_flight: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self { max_keys_per_lease: MAX_KEYS_PER_LEASE, max_in_flight: 1 }
    }
}

/// Cilium's default write concurrency toward an etcd (`etcd.maxInflight` = `etcd.qps`).
pub const ETCD_MAX_IN_FLIGHT: usize = 20;

impl Default for SyncStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            canaries_tx: watch::Sender::new(HashSet::new()),
            options: SyncOptions::default(),
            settled: Notify::new(),
            queue_seconds: None,
            adopt: Mutex::default(),
            holding: AtomicUsize::new(0),
            deferred: AtomicBool::new(false),
        }
    }
}

impl SyncStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with_options(options: SyncOptions) -> Arc<Self> {
        let options = SyncOptions {
            max_in_flight: options.max_in_flight.max(1),
            max_keys_per_lease: options.max_keys_per_lease.max(1),
        };
        Arc::new(Self { options, ..Self::default() })
    }

    /// Before its first write, the worker reads what the store holds under `prefixes` (each
    /// ending in `/`): a key found on a lease counts as written with its value, on that lease,
    /// which is kept alive from then on. On a store that kept its data across a restart of this
    /// process (a warm embedded store, an attached etcd), the initial sync then writes only
    /// what differs, and no key moves to a new lease; what nothing wants is pruned after the
    /// initial sync ([`SyncStore::prune`]).
    pub fn adopt_on_start(&self, prefixes: Vec<String>) {
        *self.adopt.lock() = prefixes;
    }

    /// Like [`SyncStore::with_options`], timing each key's wait into `queue_seconds`
    /// (labelled with Cilium's scope of the key and `create`, `modify` or `delete`).
    pub fn timed(options: SyncOptions, queue_seconds: EventsQueue) -> Arc<Self> {
        let options = SyncOptions {
            max_in_flight: options.max_in_flight.max(1),
            max_keys_per_lease: options.max_keys_per_lease.max(1),
        };
        Arc::new(Self { options, queue_seconds: Some(queue_seconds), ..Self::default() })
    }

    /// Until the returned guard is dropped, [`SyncStore::upsert`] and [`SyncStore::delete`]
    /// wake the writer only once [`MAX_BATCH`] writes are queued, and the drop wakes it for
    /// the rest. For a caller with a run of changes at hand (the mirror, with the events its
    /// channel holds): a writer faster than it would otherwise sleep and be woken again for
    /// each key, a thread hand-over each time (a fifth of an initial sync's time, `perf` said),
    /// where now it wakes to a batch. Nothing waits longer than the run of changes.
    pub fn hold_wakes(&self) -> WakesHeld<'_> {
        self.holding.fetch_add(1, Ordering::AcqRel);
        WakesHeld { store: self }
    }

    /// Wakes the writer for a change, unless [`SyncStore::hold_wakes`] defers it.
    fn changed(&self, queued: usize) {
        if queued < MAX_BATCH && self.holding.load(Ordering::Acquire) > 0 {
            self.deferred.store(true, Ordering::Release);
        } else {
            self.wake.notify_one();
        }
    }

    /// Wants `key` to hold `value`; a value equal to what is written costs nothing.
    /// The key's handle is kept as given (the translation model's own, so no copy).
    pub fn upsert(&self, key: impl Into<Key>, value: Blob) {
        let key: Key = key.into();
        let mut state = self.state.lock();
        match state.slots.get_mut(&*key) {
            Some(slot) => {
                if slot.desired.as_ref() == Some(&value) {
                    return;
                }
                // Equal bytes found written (adopted at start, or read back): one allocation
                // for both from now on.
                if let Held::Value(written) = &slot.written
                    && *written == value
                {
                    slot.written = Held::Value(value.clone());
                }
                slot.desired = Some(value);
                if slot.needs_write() {
                    state.enqueue(&key);
                }
            }
            None => {
                state.slots.insert(Arc::clone(&key), Slot { desired: Some(value), written: Held::Absent });
                state.enqueue_handle(key);
            }
        }
        let queued = state.queue.len();
        drop(state);
        self.changed(queued);
    }

    /// Wants `key` gone.
    pub fn delete(&self, key: &str) {
        let mut state = self.state.lock();
        let Some(slot) = state.slots.get_mut(key) else { return };
        slot.desired = None;
        if slot.needs_write() {
            state.enqueue(key);
        } else {
            state.forget_if_idle(key);
        }
        let queued = state.queue.len();
        drop(state);
        self.changed(queued);
    }

    /// Writes `canary_key` (an RFC 3339 timestamp, on the lease) once every key under
    /// `prefix` queued until now has been written.
    pub fn request_canary(&self, prefix: &str, canary_key: &str) {
        let mut state = self.state.lock();
        state.canary_keys.insert(canary_key.to_owned());
        state.queue.push_back(Item::Canary { prefix: prefix.to_owned(), key: Key::from(canary_key) });
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
    pub fn rewrite(&self, key: &str, found: Option<&[u8]>) {
        let mut state = self.state.lock();
        state.set_written(key, found.map_or(Held::Absent, |value| Held::Value(Blob::copy_from(value))));
        if state.needs_write(key) {
            state.enqueue(key);
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
            if state.desired(&key).is_some() || state.queued.contains_key(key.as_str()) {
                continue;
            }
            // Unknown here, or adopted at start and wanted by nothing since.
            let slot = state.slot(&key);
            if slot.written == Held::Absent {
                slot.written = Held::Unknown;
            }
            state.enqueue(&key);
            pruned += 1;
        }
        drop(state);
        self.wake.notify_one();
        pruned
    }

    /// The keys wanted under `prefix`.
    pub fn desired_keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let state = self.state.lock();
        let wanted = state.slots.iter().filter(|(key, slot)| slot.desired.is_some() && key.starts_with(prefix));
        wanted.map(|(key, _)| key.to_string()).collect()
    }

    pub fn desired_value(&self, key: &str) -> Option<Blob> {
        self.state.lock().desired(key).cloned()
    }

    pub fn stats(&self) -> SyncStats {
        let state = self.state.lock();
        SyncStats { writes: state.writes, errors: state.errors, queued: state.queued.len() + state.in_flight }
    }

    /// Returns once nothing is queued or in flight, canaries included: everything wanted so far
    /// is written (or given up on by a shutdown).
    pub async fn drained(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the check, so that a write answered in between still wakes us.
            settled.as_mut().enable();
            if self.idle() {
                return;
            }
            settled.await;
        }
    }

    /// Nothing in the queue (not only no key queued: a canary waiting there is no key) and
    /// nothing in flight.
    fn idle(&self) -> bool {
        let state = self.state.lock();
        state.queue.is_empty() && state.in_flight == 0
    }

    /// Keys waiting to be written, by [`scope`].
    pub fn queued_by_scope(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for key in self.state.lock().queued.keys() {
            *out.entry(scope(key).to_owned()).or_default() += 1;
        }
        out
    }

    /// Failed writes since start, by [`scope`].
    pub fn errors_by_scope(&self) -> HashMap<String, u64> {
        self.state.lock().errors_by_scope.clone()
    }

    /// Watches the set of canary keys written so far.
    pub fn canaries(&self) -> watch::Receiver<HashSet<String>> {
        self.canaries_tx.subscribe()
    }

    /// Writes until `shutdown`: each key goes on a lease of `lease_ttl` with room for it
    /// ([`Leases`]), every lease is kept alive, and when one is lost only its keys are
    /// written again, on another lease. Up to [`SyncOptions::max_in_flight`] writes are sent
    /// at once; on shutdown those already sent are answered before this returns.
    pub async fn run(self: Arc<Self>, backend: Arc<dyn Backend>, lease_ttl: Duration, shutdown: CancellationToken) {
        let mut worker = Worker {
            retry: BACKOFF.start(),
            paused: None,
            leases: Leases::new(self.options.max_keys_per_lease),
            in_flight_keys: FastSet::default(),
        };
        if !self.adopt_found(&*backend, &mut worker.leases, &shutdown).await {
            return;
        }
        let mut in_flight = FuturesUnordered::new();
        let mut keep_alive = tokio::time::interval(lease_ttl / 3);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keep_alive.reset();
        // Writes one at a time (the embedded store): everything ready, up to a batch, goes in
        // one future, one key after the other. Overlapping writes (an attached etcd): one key
        // a future, so that each round trip overlaps the others.
        let batch = if self.options.max_in_flight == 1 { MAX_BATCH } else { 1 };
        loop {
            while worker.paused.is_none() && in_flight.len() < self.options.max_in_flight && !shutdown.is_cancelled() {
                let mut sends = self.take_ready(&mut worker.in_flight_keys, batch);
                if sends.is_empty() {
                    break;
                }
                let stopped = self.attach_leases(&mut worker, &*backend, &mut sends, lease_ttl, &shutdown).await;
                if !sends.is_empty() {
                    let this = &self;
                    let backend = &*backend;
                    in_flight.push(async move {
                        let mut answers = Vec::with_capacity(sends.len());
                        let mut sends = sends.into_iter();
                        // A failure pauses sending: what follows it in the batch goes back
                        // to the queue unsent, where it was.
                        for send in sends.by_ref() {
                            let result = this.write(backend, &send.item, send.lease, send.queued_at).await;
                            let failed = result.is_err();
                            answers.push((send, result));
                            if failed {
                                break;
                            }
                        }
                        (answers, sends.collect::<Vec<_>>())
                    });
                }
                if stopped {
                    break;
                }
            }
            let pause = async {
                match worker.paused {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => {
                    // What was sent is answered (and recorded), so a drain that saw the
                    // queue empty has really written everything.
                    let answers = async {
                        while let Some((answers, unsent)) = in_flight.next().await {
                            self.settle(&mut worker, answers, unsent);
                        }
                    };
                    if tokio::time::timeout(IN_FLIGHT_GRACE, answers).await.is_err() {
                        tracing::warn!("shutting down with writes unanswered");
                    }
                    return;
                }
                () = self.wake.notified(), if worker.paused.is_none() => {}
                () = pause => worker.paused = None,
                Some((answers, unsent)) = in_flight.next() => self.settle(&mut worker, answers, unsent),
                _ = keep_alive.tick() => for lease in worker.leases.ids() {
                    match backend.keep_alive(lease).await {
                        Ok(()) => {}
                        Err(Error::LeaseLost(_)) => self.lose(&mut worker.leases, lease),
                        Err(error) => tracing::warn!(error = %crate::error_chain(&error), "lease keep-alive failed"),
                    }
                },
            }
        }
    }

    /// Adopts what the store holds under the prefixes of [`SyncStore::adopt_on_start`];
    /// false if shut down meanwhile.
    async fn adopt_found(&self, backend: &dyn Backend, leases: &mut Leases, shutdown: &CancellationToken) -> bool {
        let prefixes = std::mem::take(&mut *self.adopt.lock());
        let mut found = Vec::new();
        for prefix in &prefixes {
            let list = || backend.entries_with_prefix(prefix);
            let Some(entries) = retry_until_shutdown("listing keys to adopt", shutdown, list).await else {
                return false;
            };
            found.extend(entries);
        }
        let mut adopted = std::collections::BTreeSet::new();
        let mut keys = 0;
        {
            let mut state = self.state.lock();
            // A key without a lease was not written by a writer like this one: it is written
            // again (on a lease) if wanted, pruned if not.
            for entry in found.into_iter().filter(|entry| entry.lease != 0) {
                state.slot(&entry.key).written = Held::Value(Blob::copy_from(&entry.value));
                leases.adopt(state.shared(&entry.key), entry.lease);
                adopted.insert(entry.lease);
                keys += 1;
            }
        }
        if keys > 0 {
            tracing::info!(keys, leases = adopted.len(), "kept what the store holds from a previous run");
        }
        // A lease that is gone took its keys with it: they are written again.
        for lease in adopted {
            match backend.keep_alive(lease).await {
                Ok(()) => {}
                Err(Error::LeaseLost(_)) => self.lose(leases, lease),
                Err(error) => tracing::warn!(error = %crate::error_chain(&error), "lease keep-alive failed"),
            }
        }
        true
    }

    /// Records the answers to a batch's writes, in the order sent, and queues again, where
    /// they were, the writes a failure kept from being sent.
    fn settle(&self, worker: &mut Worker, answers: Vec<(Taken, Result<Written, Error>)>, unsent: Vec<Taken>) {
        let taken = answers.len() + unsent.len();
        for (send, result) in answers {
            self.answered(worker, &send.item, send.lease, result);
        }
        self.unsend(worker, unsent);
        self.handed_back(taken);
    }

    /// Records the answer to one write; a failure pauses sending.
    fn answered(&self, worker: &mut Worker, item: &Item, lease: i64, result: Result<Written, Error>) {
        let key = item.key();
        worker.in_flight_keys.remove(key);
        match result {
            Ok(written) => {
                if written == Written::Deleted {
                    worker.leases.release(key);
                } else if !worker.leases.holds(key, lease) {
                    // The lease was found lost while this put was unanswered: the key may
                    // have gone with it, after the put landed.
                    self.rewrite(key, None);
                }
                worker.retry.reset();
            }
            Err(Error::LeaseLost(lost)) => {
                self.requeue(item.clone(), false);
                self.lose(&mut worker.leases, lost);
            }
            Err(error) => {
                let delay = worker.pause();
                self.failed(item, &error, delay);
            }
        }
    }

    /// Puts writes taken but not sent back at the head of the queue, in their order: a canary
    /// queued behind them stays behind them.
    fn unsend(&self, worker: &mut Worker, unsent: Vec<Taken>) {
        if unsent.is_empty() {
            return;
        }
        let mut state = self.state.lock();
        for send in unsent.into_iter().rev() {
            worker.in_flight_keys.remove(send.item.key());
            if let Item::Key(key) = &send.item {
                // Queued again meanwhile (changed while taken), the key is in the queue twice:
                // the copy found second has nothing left to write, or writes the newer value.
                let queued_at = send.queued_at.unwrap_or_else(Instant::now);
                state.queued.entry(Arc::clone(key)).or_insert(queued_at);
            }
            state.queue.push_front(send.item);
        }
    }

    /// Writes taken from the queue are over (answered, or queued again).
    fn handed_back(&self, writes: usize) {
        self.state.lock().in_flight -= writes;
        self.settled.notify_waiters();
    }

    /// The lease of each put in `sends` (granting one when every lease is full). A refused
    /// grant (a full store refuses them all) is its write's failure: counted, and retried
    /// after the backoff like any other, while the loop goes on renewing the leases that hold
    /// what is written (retrying the grant in place stopped those renewals: after one TTL of
    /// refusals every key written was gone). From a refusal or a shutdown on, `sends` is cut
    /// to the writes before it and the rest handed back; true then, to stop sending.
    async fn attach_leases(
        &self,
        worker: &mut Worker,
        backend: &dyn Backend,
        sends: &mut Vec<Taken>,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        for at in 0..sends.len() {
            if !sends[at].puts {
                continue;
            }
            let key = Arc::clone(sends[at].item.key());
            let lease = tokio::select! {
                () = shutdown.cancelled() => None,
                lease = self.lease_for(backend, &mut worker.leases, &key, ttl) => Some(lease),
            };
            match lease {
                Some(Ok(lease)) => sends[at].lease = lease,
                Some(Err(error)) => {
                    let mut rest = sends.split_off(at);
                    let refused = rest.remove(0);
                    worker.in_flight_keys.remove(refused.item.key());
                    let delay = worker.pause();
                    self.failed(&refused.item, &error, delay);
                    let unsent = rest.len();
                    self.unsend(worker, rest);
                    self.handed_back(1 + unsent);
                    return true;
                }
                None => {
                    let rest = sends.split_off(at);
                    let unsent = rest.len();
                    self.unsend(worker, rest);
                    self.handed_back(unsent);
                    return true;
                }
            }
        }
        false
    }

    /// Counts and logs a failed write, and queues it again.
    fn failed(&self, item: &Item, error: &Error, retry_in: Duration) {
        let key = match item {
            Item::Key(key) | Item::Canary { key, .. } => key,
        };
        let mut state = self.state.lock();
        state.errors += 1;
        *state.errors_by_scope.entry(scope(key).to_owned()).or_default() += 1;
        drop(state);
        tracing::warn!(error = %crate::error_chain(error), item = ?item, ?retry_in, "kvstore write failed");
        self.requeue(item.clone(), true);
    }

    /// The lease to put `key` with, granting a new one when every lease is full.
    async fn lease_for(
        &self,
        backend: &dyn Backend,
        leases: &mut Leases,
        key: &Key,
        ttl: Duration,
    ) -> Result<i64, Error> {
        if let Some(lease) = leases.assign(key) {
            return Ok(lease);
        }
        let lease = backend.grant_lease(ttl).await?;
        tracing::info!(lease = format_args!("{lease:x}"), ttl = ?ttl, "kvstore lease granted");
        leases.add(lease);
        Ok(leases.assign(key).expect("a fresh lease has room"))
    }

    /// The lease is gone, and with it the keys written on it (and only those): they are
    /// written again.
    fn lose(&self, leases: &mut Leases, lease: i64) {
        let keys = leases.lost(lease);
        tracing::warn!(lease = format_args!("{lease:x}"), keys = keys.len(), "lease lost; writing its keys again");
        let mut state = self.state.lock();
        for key in keys {
            state.set_written(&key, Held::Absent);
            if state.needs_write(&key) {
                state.enqueue(&key);
            }
        }
    }

    /// The writes to send next, up to `limit`, taken under one lock. A key already in flight
    /// is skipped: its answer queues it again if it still differs, which keeps one write per
    /// key in flight, in order. A canary waits until nothing is in flight, and goes alone.
    /// Each key comes with the time it was queued, and is in flight from now on: a drain must
    /// not find the queue and the writes in flight both empty while its lease is granted.
    fn take_ready(&self, in_flight: &mut FastSet<Key>, limit: usize) -> Vec<Taken> {
        let mut state = self.state.lock();
        let mut taken = Vec::new();
        let mut skipped = 0;
        while taken.len() < limit {
            let Some(item) = state.queue.pop_front() else {
                state.shrink_if_drained();
                break;
            };
            match &item {
                Item::Key(key) => {
                    let queued_at = state.queued.remove(key);
                    if in_flight.contains(key) {
                        continue;
                    }
                    let Some(slot) = state.slots.get(key).filter(|slot| slot.needs_write()) else {
                        state.failing.remove(key);
                        continue;
                    };
                    // Only puts take a lease: a delete must not grant one when all are full.
                    let puts = slot.desired.is_some();
                    in_flight.insert(Arc::clone(key));
                    taken.push(Taken { item, queued_at, puts, lease: 0 });
                }
                Item::Canary { .. } if !in_flight.is_empty() => {
                    state.queue.push_front(item);
                    break;
                }
                Item::Canary { prefix, .. } => {
                    // A key under the prefix whose write failed was queued before the
                    // canary: the canary goes behind it again.
                    let blocked = state.failing.iter().any(|k| k.starts_with(prefix.as_str()));
                    if blocked {
                        state.queue.push_back(item);
                        skipped += 1;
                        if skipped >= state.queue.len() {
                            break;
                        }
                        continue;
                    }
                    in_flight.insert(Arc::clone(item.key()));
                    taken.push(Taken { item, queued_at: None, puts: true, lease: 0 });
                    break;
                }
            }
        }
        state.in_flight += taken.len();
        taken
    }

    fn requeue(&self, item: Item, failed: bool) {
        let mut state = self.state.lock();
        match item {
            Item::Key(key) => {
                if failed {
                    state.failing.insert(Arc::clone(&key));
                    // A failed request may still have been applied (the answer was lost, not
                    // the request): the key's content is unknown now, so whatever is desired
                    // next, even its absence, is written again.
                    state.slot(&key).written = Held::Unknown;
                }
                state.enqueue(&key);
            }
            canary @ Item::Canary { .. } => state.queue.push_back(canary),
        }
    }

    async fn write(
        &self,
        backend: &dyn Backend,
        item: &Item,
        lease: i64,
        queued_at: Option<Instant>,
    ) -> Result<Written, Error> {
        match item {
            Item::Key(key) => {
                let (want, action) = {
                    let state = self.state.lock();
                    let want = state.desired(key).cloned();
                    let written = state.slots.get(&**key).is_some_and(|slot| slot.written != Held::Absent);
                    let action = match (&want, written) {
                        (None, _) => "delete",
                        (Some(_), false) => "create",
                        (Some(_), true) => "modify",
                    };
                    (want, action)
                };
                match &want {
                    Some(value) => backend.put(key, value.clone(), lease).await?,
                    None => backend.delete(key).await?,
                }
                let deleted = want.is_none();
                tracing::debug!(key = %key, deleted, "kvstore write");
                let mut state = self.state.lock();
                state.failing.remove(key);
                state.set_written(key, want.map_or(Held::Absent, Held::Value));
                // The desired value may have changed while the write was in flight.
                if state.needs_write(key) {
                    state.enqueue(key);
                }
                state.writes += 1;
                let canary = state.canary_keys.contains(&**key);
                drop(state);
                if let (Some(histograms), Some(queued_at)) = (&self.queue_seconds, queued_at) {
                    let labels = QueueLabels { scope: operation_scope(key), action };
                    histograms.get_or_create(&labels).observe(queued_at.elapsed().as_secs_f64());
                }
                if canary {
                    self.canaries_tx.send_modify(|written| {
                        written.insert(key.to_string());
                    });
                }
                if deleted {
                    return Ok(Written::Deleted);
                }
            }
            Item::Canary { key, .. } => {
                // The canary becomes an ordinary desired key, so it is written again with
                // everything else if the lease is ever lost.
                let value = Blob::from(super::rfc3339_now());
                self.state.lock().slot(key).desired = Some(value.clone());
                backend.put(key, value.clone(), lease).await?;
                let mut state = self.state.lock();
                state.slot(key).written = Held::Value(value);
                state.writes += 1;
                drop(state);
                tracing::info!(canary = %key, "initial sync written");
                self.canaries_tx.send_modify(|written| {
                    written.insert(key.to_string());
                });
            }
        }
        Ok(Written::Put)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use futures::future::BoxFuture;

    use super::*;
    use crate::kvstore::{Entry, Result};

    /// An in-memory backend that can be told to fail writes or to lose the lease.
    #[derive(Default)]
    struct Memory {
        keys: Mutex<BTreeMap<String, (Bytes, i64)>>,
        leases: Mutex<HashSet<i64>>,
        next_lease: Mutex<i64>,
        fail_puts: Mutex<usize>,
        /// Lease grants to refuse (as a store over its space quota refuses them).
        fail_grants: Mutex<usize>,
        keep_alives: Mutex<usize>,
        /// Listings to fail before answering.
        fail_lists: Mutex<usize>,
        /// Puts applied whose answer is then lost (an error for the caller).
        lose_answers: Mutex<usize>,
        puts: Mutex<Vec<String>>,
        /// When set, every put takes this long (on the paused test clock).
        latency: Mutex<Option<Duration>>,
        /// `start <key>` and `done <key>` of every put, in order.
        events: Mutex<Vec<String>>,
        /// Keys with a put in progress; the most there ever were at once.
        active: Mutex<HashSet<String>>,
        most_active: Mutex<usize>,
        /// A put started for a key that already had one in progress.
        overlapping_key: Mutex<Option<String>>,
    }

    impl Memory {
        fn value(&self, key: &str) -> Option<String> {
            self.keys.lock().get(key).map(|(v, _)| String::from_utf8_lossy(v).into_owned())
        }

        fn lose_lease(&self, lease: i64) {
            self.leases.lock().remove(&lease);
            self.keys.lock().retain(|_, (_, on)| *on != lease);
        }

        fn lease_of(&self, key: &str) -> Option<i64> {
            self.keys.lock().get(key).map(|(_, lease)| *lease)
        }

        fn lose_leases(&self) {
            self.leases.lock().clear();
            self.keys.lock().retain(|_, (_, lease)| *lease == 0);
        }
    }

    impl Backend for Memory {
        fn grant_lease(&self, _: Duration) -> BoxFuture<'_, Result<i64>> {
            Box::pin(async move {
                {
                    let mut fail = self.fail_grants.lock();
                    if *fail > 0 {
                        *fail -= 1;
                        return Err(Error::Embedded(crate::etcd::Error::NoSpace));
                    }
                }
                let mut next = self.next_lease.lock();
                *next += 1;
                self.leases.lock().insert(*next);
                Ok(*next)
            })
        }

        fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
            Box::pin(async move {
                *self.keep_alives.lock() += 1;
                if self.leases.lock().contains(&lease) { Ok(()) } else { Err(Error::LeaseLost(lease)) }
            })
        }

        fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
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
                let latency = *self.latency.lock();
                if let Some(latency) = latency {
                    self.events.lock().push(format!("start {key}"));
                    {
                        let mut active = self.active.lock();
                        if !active.insert(key.to_owned()) {
                            *self.overlapping_key.lock() = Some(key.to_owned());
                        }
                        let mut most = self.most_active.lock();
                        *most = (*most).max(active.len());
                    }
                    tokio::time::sleep(latency).await;
                    self.active.lock().remove(key);
                    self.events.lock().push(format!("done {key}"));
                }
                self.puts.lock().push(key.to_owned());
                self.keys.lock().insert(key.to_owned(), (value.to_bytes(), lease));
                let mut lose = self.lose_answers.lock();
                if *lose > 0 {
                    *lose -= 1;
                    return Err(Error::Config { path: key.into(), reason: "answer lost".into() });
                }
                Ok(())
            })
        }

        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
            Box::pin(async move { Ok(self.keys.lock().get(key).map(|(v, _)| v.clone())) })
        }

        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                self.keys.lock().remove(key);
                Ok(())
            })
        }

        fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
            Box::pin(async move {
                {
                    let mut fail = self.fail_lists.lock();
                    if *fail > 0 {
                        *fail -= 1;
                        return Err(Error::Config { path: prefix.into(), reason: "injected failure".into() });
                    }
                }
                Ok(self.keys.lock().keys().filter(|k| k.starts_with(prefix)).cloned().collect())
            })
        }

        fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>> {
            Box::pin(async move {
                let keys = self.keys.lock();
                let found = keys.iter().filter(|(k, _)| k.starts_with(prefix));
                Ok(found
                    .map(|(key, (value, lease))| Entry { key: key.clone(), value: value.clone(), lease: *lease })
                    .collect())
            })
        }
    }

    fn start(backend: &Arc<Memory>) -> (Arc<SyncStore>, CancellationToken, tokio::task::JoinHandle<()>) {
        let store = SyncStore::new();
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
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
        assert_eq!(scope("cilium/cache/identities/v1/c2/id/65537"), "identities/v1");
        assert_eq!(scope("cilium/cluster-config/c1"), "cilium/cluster-config");
        assert_eq!(scope("cilium/.heartbeat"), "cilium/.heartbeat");
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_for_pruning_that_fails_is_retried_until_it_answers_or_shutdown() {
        let backend = Arc::new(Memory::default());
        backend.keys.lock().insert("p/deleted-while-down".into(), (Bytes::from_static(b"x"), 0));
        *backend.fail_lists.lock() = 3;
        let shutdown = CancellationToken::new();
        let keys = list_for_prune(backend.as_ref(), "p/", &shutdown).await;
        assert_eq!(keys, Some(vec!["p/deleted-while-down".to_owned()]));
        assert_eq!(*backend.fail_lists.lock(), 0, "every failure was retried");

        *backend.fail_lists.lock() = usize::MAX;
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stopping.cancel();
        });
        assert_eq!(list_for_prune(backend.as_ref(), "p/", &shutdown).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_value_is_not_written_twice() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        store.upsert("k", Blob::from("v"));
        settle().await;
        store.upsert("k", Blob::from("v"));
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
        store.upsert("cilium/state/nodes/v1/c/n1", Blob::from("n1"));
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
        store.upsert("k", Blob::from("v"));
        settle().await;
        assert_eq!(backend.value("k").as_deref(), Some("v"), "applied, though reported failed");
        store.delete("k");
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(backend.value("k"), None);
        token.cancel();
        worker.await.unwrap();
    }

    /// A previous run's keys on its lease, in a store that kept them.
    fn previous_run(backend: &Memory, lease: i64, keys: &[(&str, &str)]) {
        backend.leases.lock().insert(lease);
        *backend.next_lease.lock() = lease;
        for (key, value) in keys {
            backend.keys.lock().insert((*key).to_owned(), (Bytes::copy_from_slice(value.as_bytes()), lease));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_store_that_kept_its_keys_only_the_differences_are_written_on_the_leases_found() {
        let backend = Arc::new(Memory::default());
        previous_run(&backend, 7, &[("p/same", "1"), ("p/changed", "old"), ("p/gone", "x")]);
        let store = SyncStore::new();
        store.adopt_on_start(vec!["p/".to_owned()]);
        store.upsert("p/same", Blob::from("1"));
        store.upsert("p/changed", Blob::from("new"));
        store.upsert("p/added", Blob::from("1"));
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        settle().await;
        assert_eq!(*backend.puts.lock(), ["p/changed", "p/added"], "p/same is not written again");
        assert_eq!((backend.lease_of("p/changed"), backend.lease_of("p/added")), (Some(7), Some(7)), "no new lease");
        assert_eq!(backend.value("p/gone").as_deref(), Some("x"), "kept until the initial sync is pruned");

        let present = backend.keys_with_prefix("p/").await.unwrap();
        assert_eq!(store.prune(present), 1);
        settle().await;
        assert_eq!(backend.value("p/gone"), None, "nothing wants it");
        assert!(*backend.keep_alives.lock() >= 1, "the lease found is kept alive");
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn keys_found_on_a_lease_that_is_gone_are_written_again() {
        let backend = Arc::new(Memory::default());
        previous_run(&backend, 7, &[("p/a", "1")]);
        backend.leases.lock().clear();
        let store = SyncStore::new();
        store.adopt_on_start(vec!["p/".to_owned()]);
        store.upsert("p/a", Blob::from("1"));
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        settle().await;
        assert_eq!(*backend.puts.lock(), ["p/a"]);
        assert_eq!(backend.lease_of("p/a"), Some(8), "on a lease granted now");
        token.cancel();
        worker.await.unwrap();
    }

    /// A shutdown waits on `drained()` before stopping the writer: it returns only once every
    /// write wanted so far is answered, failed ones retried included.
    #[tokio::test(start_paused = true)]
    async fn drained_returns_once_every_wanted_write_is_answered() {
        let backend = Arc::new(Memory::default());
        *backend.latency.lock() = Some(Duration::from_millis(50));
        *backend.fail_puts.lock() = 1;
        let (store, token, worker) = start(&backend);
        store.drained().await;
        for key in ["a", "b", "c"] {
            store.upsert(key, Blob::from("1"));
        }
        store.drained().await;
        for key in ["a", "b", "c"] {
            assert_eq!(backend.value(key).as_deref(), Some("1"), "{key} written before drained() returned");
        }
        assert_eq!(store.stats().errors, 1, "the failed put was retried before");
        token.cancel();
        worker.await.unwrap();
    }

    /// Found by bootstrap_memory, which counts the writes once drained: now and then the
    /// canaries requested last were not among them.
    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_the_canaries_requested_too() {
        let backend = Arc::new(Memory::default());
        *backend.latency.lock() = Some(Duration::from_millis(50));
        let (store, token, worker) = start(&backend);
        store.upsert("p/a", Blob::from("1"));
        store.drained().await;
        store.request_canary("p", "synced/p");
        store.drained().await;
        assert!(backend.value("synced/p").is_some(), "the canary written before drained() returned");
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_gets_every_key_written_again() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        store.upsert("a", Blob::from("1"));
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
    async fn each_key_write_is_timed_from_its_queueing_as_a_create_modify_or_delete() {
        let backend = Arc::new(Memory::default());
        *backend.latency.lock() = Some(Duration::from_millis(20));
        let queue: EventsQueue = prometheus_client::metrics::family::Family::new_with_constructor(|| {
            prometheus_client::metrics::histogram::Histogram::new([0.01, 0.03, 0.1])
        });
        let store = SyncStore::timed(SyncOptions::default(), queue.clone());
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        let key = "cilium/state/nodes/v1/c/a";
        store.upsert(key, Blob::from("1"));
        // Queued behind the first write, which takes 20 ms.
        store.upsert("cilium/state/nodes/v1/c/b", Blob::from("1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.upsert(key, Blob::from("2"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.delete(key);
        tokio::time::sleep(Duration::from_millis(100)).await;
        token.cancel();
        worker.await.unwrap();

        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("q", "", queue);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let count = |action: &str| format!("q_count{{scope=\"nodes/v1\",action=\"{action}\"}}");
        assert!(text.contains(&format!("{} 2\n", count("create"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", count("modify"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", count("delete"))), "{text}");
        // The second key waited for the first write and its own (40 ms): past the 30 ms bucket.
        let within_30ms = "q_bucket{le=\"0.03\",scope=\"nodes/v1\",action=\"create\"} 1\n";
        assert!(text.contains(within_30ms), "{text}");
    }

    /// A store over its space quota refuses lease grants until an administrator disarms its
    /// alarm, for as long as that takes: meanwhile the leases holding what is written must
    /// still be renewed, or every key goes with them after one TTL.
    #[tokio::test(start_paused = true)]
    async fn a_refused_lease_grant_is_a_failed_write_retried_while_the_leases_in_use_are_renewed() {
        let backend = Arc::new(Memory::default());
        let store = SyncStore::with_options(SyncOptions { max_keys_per_lease: 1, ..SyncOptions::default() });
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        store.upsert("cilium/state/nodes/v1/c/a", Blob::from("a"));
        settle().await;
        assert_eq!(backend.lease_of("cilium/state/nodes/v1/c/a"), Some(1));

        *backend.fail_grants.lock() = usize::MAX;
        store.upsert("cilium/state/nodes/v1/c/b", Blob::from("b"));
        tokio::time::sleep(Duration::from_secs(2 * 900)).await;
        settle().await;
        assert!(*backend.keep_alives.lock() >= 5, "lease 1 renewed every 300 s meanwhile");
        assert_eq!(backend.value("cilium/state/nodes/v1/c/b"), None);
        assert!(store.stats().errors > 1, "each refused grant is a failed write");
        assert_eq!(store.errors_by_scope().get("nodes/v1").copied(), Some(store.stats().errors));
        assert_eq!(store.stats().queued, 1);

        *backend.fail_grants.lock() = 0;
        tokio::time::sleep(MAX_BACKOFF).await;
        settle().await;
        assert_eq!(backend.value("cilium/state/nodes/v1/c/b").as_deref(), Some("b"));
        assert_eq!(store.stats().queued, 0);
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn keys_fill_leases_up_to_the_cap_and_a_lost_lease_rewrites_only_its_own_keys() {
        let backend = Arc::new(Memory::default());
        let store = SyncStore::with_options(SyncOptions { max_keys_per_lease: 2, ..SyncOptions::default() });
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        for key in ["k1", "k2", "k3", "k4", "k5"] {
            store.upsert(key, Blob::from("v"));
        }
        settle().await;
        let leases: Vec<_> = ["k1", "k2", "k3", "k4", "k5"].map(|k| backend.lease_of(k).unwrap()).into();
        assert_eq!(leases, [1, 1, 2, 2, 3]);

        backend.puts.lock().clear();
        backend.lose_lease(2);
        tokio::time::sleep(Duration::from_secs(301)).await;
        settle().await;
        let mut rewritten = backend.puts.lock().clone();
        rewritten.sort();
        assert_eq!(rewritten, ["k3", "k4"], "only the lost lease's keys are written again");
        assert_eq!(
            [backend.lease_of("k3"), backend.lease_of("k4")],
            [Some(3), Some(4)],
            "the room left on lease 3 first, then a new lease"
        );
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn writes_overlap_up_to_the_limit_one_per_key_in_order_and_a_canary_waits_for_all_before_it() {
        let backend = Arc::new(Memory::default());
        *backend.latency.lock() = Some(Duration::from_millis(10));
        let store = SyncStore::with_options(SyncOptions { max_in_flight: 4, ..SyncOptions::default() });
        let token = CancellationToken::new();
        let worker = tokio::spawn(Arc::clone(&store).run(backend.clone(), Duration::from_secs(900), token.clone()));
        for i in 0..12 {
            store.upsert(format!("p/k{i}"), Blob::from("v1"));
        }
        store.request_canary("p", "synced/p");
        store.upsert("q/after", Blob::from("v1"));
        settle().await;
        // k0 is in flight now; its next value must follow, not overtake, that write.
        store.upsert("p/k0", Blob::from("v2"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;

        assert_eq!(*backend.most_active.lock(), 4, "four writes in flight at once, never more");
        assert_eq!(*backend.overlapping_key.lock(), None, "never two writes of one key at once");
        assert_eq!(backend.value("p/k0").as_deref(), Some("v2"), "the later value wins");
        let events = backend.events.lock().clone();
        let at =
            |event: &str| events.iter().position(|e| e == event).unwrap_or_else(|| panic!("{event} in {events:?}"));
        let canary = at("start synced/p");
        for i in 0..12 {
            assert!(at(&format!("done p/k{i}")) < canary, "p/k{i} answered before the canary is sent");
        }
        assert!(at("start q/after") > canary, "what was queued after the canary is sent after it");
        assert_eq!(store.stats().queued, 0);
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn changes_under_a_hold_wake_the_writer_when_it_ends_or_once_a_batch_is_queued() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        settle().await;
        let held = store.hold_wakes();
        store.upsert("a", Blob::from("1"));
        settle().await;
        assert!(backend.puts.lock().is_empty(), "the writer sleeps through the hold");
        drop(held);
        settle().await;
        assert_eq!(*backend.puts.lock(), ["a"]);

        let _held = store.hold_wakes();
        for i in 0..MAX_BATCH {
            store.upsert(format!("k{i}"), Blob::from("1"));
        }
        settle().await;
        assert_eq!(backend.puts.lock().len(), 1 + MAX_BATCH, "a full batch wakes it, hold or not");
        token.cancel();
        worker.await.unwrap();
    }

    /// Writes one at a time go in batches: a failure in the middle of one pauses sending, and
    /// what followed it is sent after the pause, still ahead of the canary queued behind it.
    #[tokio::test(start_paused = true)]
    async fn a_failure_mid_batch_sends_nothing_more_until_the_retry_and_keeps_the_canary_last() {
        let backend = Arc::new(Memory::default());
        let (store, token, worker) = start(&backend);
        store.upsert("p/k1", Blob::from("v"));
        settle().await;
        *backend.fail_puts.lock() = 1;
        for key in ["p/k2", "p/k3", "p/k4"] {
            store.upsert(key, Blob::from("v"));
        }
        store.request_canary("p", "synced/p");
        settle().await;
        assert_eq!(*backend.puts.lock(), ["p/k1"], "nothing sent after p/k2 failed");
        assert_eq!(store.stats().queued, 3, "the failed key and the two after it");

        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(*backend.puts.lock(), ["p/k1", "p/k3", "p/k4", "p/k2", "synced/p"]);
        assert_eq!(store.stats(), SyncStats { queued: 0, errors: 1, writes: 5 });
        token.cancel();
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_deletes_only_keys_nothing_wants() {
        let backend = Arc::new(Memory::default());
        backend.keys.lock().insert("p/stale".into(), (Bytes::from_static(b"old"), 0));
        backend.keys.lock().insert("p/kept".into(), (Bytes::from_static(b"old"), 0));
        let (store, token, worker) = start(&backend);
        store.upsert("p/kept", Blob::from("new"));
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
