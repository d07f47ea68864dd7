//! The store: one lock-protected state (keyspace, history, leases) plus the auth table,
//! shared by every gRPC service and by the in-process mirror.
//!
//! Requests and responses are etcd's own protobuf types: the store is etcd's semantics, the
//! services only add transport concerns (authorisation, size limits, streaming).

mod alarm;
mod count;
mod counters;
mod history;
mod keyspace;
mod lease;
mod packing;
mod persist;
mod quota;
mod txn;
mod versions;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use alarm::describe as describe_alarm;
pub use counters::Activity;
pub use history::MAX_EVENTS_PER_READ;
pub use keyspace::KeyRange;
pub use lease::{MAX_LEASE_TTL, MIN_LEASE_TTL};
pub use quota::DEFAULT_QUOTA_BYTES;

pub use persist::Opened;
use persist::Persistence;

use super::auth::AuthStore;
use super::error::{Error, Result};
use super::pb::etcdserverpb::alarm_request::AlarmAction;
use super::pb::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    ResponseHeader, TxnRequest, TxnResponse,
};
use super::pb::mvccpb::{Event, KeyValue, event::EventType};
use crate::blob::Blob;
use alarm::Alarms;
use count::CountCache;
use counters::Counters;
use history::{Change, History};
use keyspace::Keyspace;
use lease::Leases;
use packing::{Packer, Value};
use versions::Version;

/// Identity of this store as clients see it in every response header.
///
/// `cluster_id` is random per fresh start: Cilium's clients compare it on every response
/// and resync when it changes, which is exactly right for a store that starts empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

impl Identity {
    pub fn random() -> Self {
        Self { cluster_id: rand::random::<u64>() | 1, member_id: rand::random::<u64>() | 1 }
    }
}

/// A single member never changes leader, so its term is fixed; etcd reports 2 once a fresh
/// single member has elected itself, which keeps `etcdctl endpoint status` familiar.
pub const RAFT_TERM: u64 = 2;

/// Limits with etcd's flag names and defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-txn-ops`: compares, success ops and failure ops are each capped (etcd: 128).
    pub max_txn_ops: usize,
    /// `--max-request-bytes` (etcd: 1.5 MiB).
    pub max_request_bytes: usize,
    /// `--max-leases-per-user`: live leases one client identity may hold (ours; etcd has no
    /// cap). Cilium's writers hold one lease per 1,000 keys, agents none on a remote cluster.
    pub max_leases_per_user: usize,
    /// `--quota-backend-bytes`, as etcd reads it: 0 for [`DEFAULT_QUOTA_BYTES`], negative for
    /// no quota. See `quota.rs` for what is counted against it.
    pub quota_backend_bytes: i64,
}

impl Limits {
    /// The quota in effect, as etcd reports it (`etcd_server_quota_backend_bytes`, `Status`).
    pub fn quota_bytes(&self) -> i64 {
        quota::effective(self.quota_backend_bytes)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_txn_ops: 128, max_request_bytes: 1536 * 1024, max_leases_per_user: 100_000, quota_backend_bytes: 0 }
    }
}

#[derive(Debug, Default)]
struct State {
    keyspace: Keyspace,
    history: History,
    leases: Leases,
    alarms: Alarms,
    /// Writes and lease grants refused for want of space, for the metrics.
    quota_refusals: u64,
    /// The revision of the last write; a fresh store is at 1, as etcd is.
    revision: i64,
    compact_revision: i64,
}

impl State {
    fn compact(&mut self, revision: i64) {
        self.keyspace.compact(revision);
        self.history.compact(revision);
        self.compact_revision = revision;
    }
}

/// What one [`Store::history_from`] read found.
#[derive(Debug, Default)]
pub struct HistoryRead {
    /// The wanted events, in revision order.
    pub events: Vec<Event>,
    /// The last revision looked at; `None` when the history holds nothing from `from` on.
    pub upto: Option<i64>,
}

/// What [`Store::status`] reports about the data held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub revision: i64,
    pub compact_revision: i64,
    pub keys: usize,
    /// Bytes of the live keys and values.
    pub key_value_bytes: usize,
    /// Bytes of every key and value version held, history included: what the quota counts,
    /// and what `Status` and the metrics report as the database size.
    pub retained_bytes: usize,
    /// Bytes the values of `retained_bytes` take in memory, packed or not (see `packing.rs`),
    /// and the dictionaries packing them.
    pub held_value_bytes: usize,
    pub value_dictionaries: usize,
    pub history_events: usize,
    pub leases: usize,
    /// Bytes held by the paged-count cache, and how often its bound dropped entries.
    pub count_cache_bytes: usize,
    pub count_cache_evictions: u64,
    pub leases_refused: u64,
    pub quota_refusals: u64,
    /// Whether the NOSPACE alarm is raised.
    pub no_space: bool,
}

pub struct Store {
    identity: Identity,
    limits: Limits,
    state: RwLock<State>,
    /// The keyspace's: puts pack their values with it before they take the lock.
    packer: Arc<Packer>,
    auth: RwLock<AuthStore>,
    /// Counts of ranges at committed revisions, for paged lists. Locked after `state`.
    counts: Mutex<CountCache>,
    /// The current revision, published after every write; watch streams wait on it.
    revision_tx: watch::Sender<i64>,
    /// Wakes the expiry task when a lease may now expire earlier than it planned.
    lease_granted: Notify,
    counters: Counters,
    /// The log and snapshots in the data directory, when the store has one.
    persistence: Option<Persistence>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl Store {
    /// A store that keeps nothing across restarts.
    pub fn new(identity: Identity, limits: Limits, auth: AuthStore) -> Arc<Self> {
        let state = State { revision: 1, ..State::default() };
        Self::with_state(identity, limits, auth, state, None)
    }

    fn with_state(
        identity: Identity,
        limits: Limits,
        auth: AuthStore,
        state: State,
        persistence: Option<Persistence>,
    ) -> Arc<Self> {
        let revision = state.revision;
        Arc::new(Self {
            identity,
            limits,
            packer: Arc::clone(state.keyspace.packer()),
            state: RwLock::new(state),
            auth: RwLock::new(auth),
            counts: Mutex::new(CountCache::default()),
            revision_tx: watch::Sender::new(revision),
            lease_granted: Notify::new(),
            counters: Counters::default(),
            persistence,
        })
    }

    /// Whether writes are logged to a data directory.
    fn logging(&self) -> bool {
        self.persistence.is_some()
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The current key-value revision.
    pub fn revision(&self) -> i64 {
        self.state.read().revision
    }

    /// A response header at `revision`.
    pub fn header_at(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: RAFT_TERM,
        }
    }

    /// A response header at the current revision.
    pub fn header(&self) -> ResponseHeader {
        self.header_at(self.revision())
    }

    /// Users, roles and the auth switch. Held separately from the keyspace lock: every request
    /// reads it, and changing it never needs to be atomic with a key write.
    pub fn auth(&self) -> &RwLock<AuthStore> {
        &self.auth
    }

    pub fn stats(&self) -> Stats {
        let state = self.state.read();
        let counts = self.counts.lock().stats();
        Stats {
            revision: state.revision,
            compact_revision: state.compact_revision,
            keys: state.keyspace.live_keys(),
            key_value_bytes: state.keyspace.live_bytes(),
            retained_bytes: state.keyspace.retained_bytes(),
            held_value_bytes: state.keyspace.held_value_bytes(),
            value_dictionaries: self.packer.dictionaries(),
            history_events: state.history.event_count(),
            leases: state.leases.len(),
            count_cache_bytes: counts.bytes,
            count_cache_evictions: counts.evictions,
            leases_refused: state.leases.refused(),
            quota_refusals: state.quota_refusals,
            no_space: state.alarms.no_space(),
        }
    }

    /// What the store has done since start (see [`Activity`]).
    pub fn activity(&self) -> Activity {
        self.counters.read()
    }

    /// Refuses a request that could add `cost` bytes when the space quota cannot take them,
    /// raising the NOSPACE alarm, or while that alarm is active (see `quota.rs`).
    fn admit(&self, state: &mut State, cost: usize) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        let used = state.keyspace.retained_bytes();
        let over = quota::exceeds(used, cost, quota::limit(self.limits.quota_backend_bytes));
        if !over && !state.alarms.no_space() {
            return Ok(());
        }
        if over && state.alarms.activate(self.identity.member_id, AlarmType::Nospace).1 {
            tracing::warn!(
                used,
                cost,
                quota = self.limits.quota_bytes(),
                "space quota exceeded: NOSPACE alarm raised; writes are refused until space is freed \
                 (delete, compact) and the alarm disarmed (etcdctl alarm disarm)"
            );
        }
        state.quota_refusals += 1;
        Err(Error::NoSpace)
    }

    /// etcd's Maintenance `Alarm`: lists, raises or clears alarms. Only NOSPACE can be raised.
    pub fn alarm(&self, request: &AlarmRequest) -> Result<AlarmResponse> {
        let action = AlarmAction::try_from(request.action)
            .map_err(|_| Error::InvalidArgument(format!("invalid alarm action {}", request.action)))?;
        let alarm = AlarmType::try_from(request.alarm)
            .map_err(|_| Error::InvalidArgument(format!("invalid alarm type {}", request.alarm)))?;
        let mut state = self.state.write();
        let alarms = match (action, alarm) {
            (AlarmAction::Get, _) => state.alarms.get(alarm),
            // etcd ignores a request to raise no alarm.
            (AlarmAction::Activate, AlarmType::None) => Vec::new(),
            (AlarmAction::Activate, AlarmType::Nospace) => {
                let (raised, new) = state.alarms.activate(request.member_id, alarm);
                if new {
                    tracing::warn!(member = format_args!("{:x}", request.member_id), "NOSPACE alarm raised by request");
                }
                vec![raised]
            }
            (AlarmAction::Activate, AlarmType::Corrupt) => {
                return Err(Error::Unsupported("alarm: this store has no corruption check to raise CORRUPT"));
            }
            (AlarmAction::Deactivate, _) => {
                let cleared = state.alarms.deactivate(request.member_id, alarm);
                if let Some(cleared) = &cleared {
                    tracing::warn!(
                        member = format_args!("{:x}", cleared.member_id),
                        alarm = alarm.as_str_name(),
                        "alarm disarmed"
                    );
                }
                cleared.into_iter().collect()
            }
        };
        if action != AlarmAction::Get {
            self.counters.applied();
        }
        Ok(AlarmResponse { header: Some(self.header_at(state.revision)), alarms })
    }

    /// Every alarm raised, for `Status`.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.state.read().alarms.get(AlarmType::None)
    }

    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse> {
        let state = self.state.read();
        let (revision, compacted) = (state.revision, state.compact_revision);
        let mut response = txn::range(&state.keyspace, request, revision, compacted, Some(&self.counts))?;
        response.header = Some(self.header_at(state.revision));
        self.counters.range();
        Ok(response)
    }

    pub fn put(&self, request: PutRequest) -> Result<PutResponse> {
        txn::check_put(&request)?;
        // Packed before the lock is taken: compressing is most of a put's own time.
        let value = (!request.ignore_value).then(|| self.packer.pack(&request.key, &request.value));
        self.put_with(request, value)
    }

    /// A put from inside this process whose value is already a [`Blob`]: the store keeps that
    /// allocation rather than a copy, so the bytes are held once by the writer and the store.
    pub fn put_shared(&self, key: &[u8], value: Blob, lease: i64) -> Result<PutResponse> {
        let request =
            PutRequest { key: Bytes::copy_from_slice(key), value: value.to_bytes(), lease, ..Default::default() };
        txn::check_put(&request)?;
        self.put_with(request, Some(Value::Plain(value)))
    }

    /// `value`, when given, is how the store keeps the request's value (checked by the caller).
    fn put_with(&self, request: PutRequest, value: Option<Value>) -> Result<PutResponse> {
        let mut state = self.state.write();
        let cost = quota::put_cost(&state.keyspace, &request);
        self.admit(&mut state, cost)?;
        let mut write = Write::begin(&mut state, self.logging());
        let mut response = write.put(request, value)?;
        let committed = write.commit(self);
        drop(state);
        self.durable(committed.logged);
        self.repack_if_due();
        response.header = Some(self.header_at(committed.revision));
        self.counters.put();
        Ok(response)
    }

    /// Packs the values a group kept plain while its dictionary was being trained.
    fn repack_if_due(&self) {
        let groups = self.packer.take_repacks();
        if groups.is_empty() {
            return;
        }
        let mut state = self.state.write();
        for group in groups {
            state.keyspace.repack(&group);
        }
    }

    pub fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        txn::check_delete(&request)?;
        let mut state = self.state.write();
        let mut write = Write::begin(&mut state, self.logging());
        let mut response = write.delete_range(&request);
        let committed = write.commit(self);
        drop(state);
        self.durable(committed.logged);
        response.header = Some(self.header_at(committed.revision));
        self.counters.delete();
        Ok(response)
    }

    pub fn txn(&self, request: TxnRequest) -> Result<TxnResponse> {
        txn::check_txn(&request, self.limits.max_txn_ops)?;
        let mut state = self.state.write();
        // Before anything runs: a refused txn writes nothing.
        let cost = quota::txn_cost(&state.keyspace, &request);
        self.admit(&mut state, cost)?;
        let writes = counters::writes(&request);
        let mut write = Write::begin(&mut state, self.logging());
        let mut response = txn::execute(&mut write, request)?;
        let committed = write.commit(self);
        drop(state);
        self.durable(committed.logged);
        self.repack_if_due();
        response.header = Some(self.header_at(committed.revision));
        self.counters.txn(writes, &response);
        Ok(response)
    }

    /// Forgets history below `request.revision`. Reads and watches below it get
    /// [`Error::Compacted`] from then on.
    pub fn compact(&self, request: &CompactionRequest) -> Result<CompactionResponse> {
        let mut state = self.state.write();
        if request.revision <= state.compact_revision {
            return Err(Error::Compacted);
        }
        if request.revision > state.revision {
            return Err(Error::FutureRev);
        }
        state.compact(request.revision);
        self.counts.lock().compact(request.revision);
        let logged = self.log(|| persist::compaction(request.revision));
        let header = Some(self.header_at(state.revision));
        drop(state);
        self.durable(logged);
        self.counters.applied();
        Ok(CompactionResponse { header })
    }

    /// Grants a lease to `user` (the caller's Common Name; `None` for the process itself or a
    /// client without one), within [`Limits::max_leases_per_user`]. Refused while the NOSPACE
    /// alarm is active, as etcd's capped applier does: a lease holds no key or value bytes, so
    /// a grant never raises the alarm itself.
    pub fn lease_grant(&self, request: &LeaseGrantRequest, user: Option<&str>) -> Result<LeaseGrantResponse> {
        let mut state = self.state.write();
        if state.alarms.no_space() {
            state.quota_refusals += 1;
            return Err(Error::NoSpace);
        }
        let max = self.limits.max_leases_per_user;
        let owner = user.unwrap_or_default();
        let lease = state.leases.grant(request.id, request.ttl, Instant::now(), owner, max)?;
        let (id, ttl) = (lease.id, lease.ttl);
        let logged = self.log(|| persist::lease_grant(id, ttl, owner));
        let response =
            LeaseGrantResponse { header: Some(self.header_at(state.revision)), id, ttl, error: String::new() };
        drop(state);
        self.durable(logged);
        self.lease_granted.notify_one();
        self.counters.lease_granted();
        Ok(response)
    }

    /// Revokes the lease and deletes its keys in one revision.
    pub fn lease_revoke(&self, request: &LeaseRevokeRequest) -> Result<LeaseRevokeResponse> {
        let mut state = self.state.write();
        let mut write = Write::begin(&mut state, self.logging());
        write.revoke(request.id)?;
        let committed = write.commit(self);
        drop(state);
        self.durable(committed.logged);
        self.counters.lease_revoked();
        Ok(LeaseRevokeResponse { header: Some(self.header_at(committed.revision)) })
    }

    /// Renews the lease; `None` when it does not exist (etcd then answers TTL 0).
    pub fn lease_keep_alive(&self, id: i64) -> Option<i64> {
        let ttl = self.state.write().leases.renew(id, Instant::now()).ok();
        if ttl.is_some() {
            self.counters.lease_renewed();
        }
        ttl
    }

    pub fn lease_time_to_live(&self, request: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
        let state = self.state.read();
        let header = Some(self.header_at(state.revision));
        match state.leases.get(request.id) {
            Some(lease) => {
                let mut keys: Vec<Bytes> =
                    if request.keys { lease.keys.iter().map(Blob::to_bytes).collect() } else { Vec::new() };
                keys.sort();
                LeaseTimeToLiveResponse {
                    header,
                    id: lease.id,
                    ttl: lease.remaining(Instant::now()),
                    granted_ttl: lease.ttl,
                    keys,
                }
            }
            // etcd answers a missing lease with TTL -1 rather than an error; etcdctl prints
            // "already expired" from it.
            None => LeaseTimeToLiveResponse { header, id: request.id, ttl: -1, granted_ttl: 0, keys: Vec::new() },
        }
    }

    /// Every lease, soonest expiry first: etcd's `lessor.Leases()` sorts by expiry, and
    /// `etcdctl lease list` prints in that order. Equal deadlines go in ID order.
    pub fn lease_list(&self) -> (ResponseHeader, Vec<LeaseStatus>) {
        let state = self.state.read();
        let mut leases: Vec<(Instant, i64)> =
            state.leases.ids().filter_map(|id| state.leases.get(id).map(|lease| (lease.deadline, id))).collect();
        leases.sort_unstable();
        (self.header_at(state.revision), leases.into_iter().map(|(_, id)| LeaseStatus { id }).collect())
    }

    /// The keys attached to a lease, for the permission check etcd makes before a revoke.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Bytes>> {
        let state = self.state.read();
        let lease = state.leases.get(id).ok_or(Error::LeaseNotFound)?;
        Ok(lease.keys.iter().map(Blob::to_bytes).collect())
    }

    /// A receiver of the current revision, marked changed after every write.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision_tx.subscribe()
    }

    /// The events from revision `from` on that `wanted` accepts (bounded: whole revisions,
    /// about [`MAX_EVENTS_PER_READ`] events looked at; call again from `upto + 1`), or
    /// `Err(compact_revision)` when `from` has been compacted away.
    ///
    /// `wanted` sees an event's key, `mod_revision` and type only: the key-value is built for
    /// the events it accepts.
    ///
    /// With `prev_kv`, each event carries what its key held at `mod_revision - 1`, read from
    /// the keyspace as etcd reads it: absent when that revision is compacted.
    pub fn history_from(
        &self,
        from: i64,
        prev_kv: bool,
        mut wanted: impl FnMut(&[u8], i64, EventType) -> bool,
    ) -> Result<HistoryRead, i64> {
        let state = self.state.read();
        if from < state.compact_revision {
            return Err(state.compact_revision);
        }
        let mut events = Vec::new();
        let upto = state.history.read_from(from, |change| {
            let r#type = if change.is_put() { EventType::Put } else { EventType::Delete };
            if !wanted(change.key(), change.revision(), r#type) {
                return;
            }
            let kv = if change.is_put() {
                // The keyspace keeps every version the history still holds.
                match state.keyspace.put_at(change.key(), change.revision()) {
                    Some(written) => written,
                    None => return debug_assert!(false, "a put in the history is in the keyspace"),
                }
            } else {
                // A delete's `kv` is exactly this: etcd sends only the key and `mod_revision`.
                KeyValue { key: change.key().to_bytes(), mod_revision: change.revision(), ..KeyValue::default() }
            };
            let before = kv.mod_revision - 1;
            // etcd's sendLoop gives a creation no prev_kv, even a key deleted and put again in
            // one txn, whose state at `before` exists (found by differential_prop).
            let created = r#type == EventType::Put && kv.create_revision == kv.mod_revision;
            let prev_kv = (prev_kv && !created && before >= state.compact_revision)
                .then(|| state.keyspace.get_at(&kv.key, before))
                .flatten();
            events.push(Event { r#type: r#type as i32, kv: Some(kv), prev_kv });
        });
        Ok(HistoryRead { events, upto })
    }

    /// Revokes leases as their deadlines pass, until `shutdown`.
    pub async fn run_lease_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.state.read().leases.next_deadline();
            let sleep = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.lease_granted.notified() => continue,
                () = sleep => {}
            }
            let mut state = self.state.write();
            let expired = state.leases.expired(Instant::now());
            if expired.is_empty() {
                continue;
            }
            let mut write = Write::begin(&mut state, self.logging());
            for id in &expired {
                // Only leases still in the table are returned, so revoke cannot fail here.
                let _ = write.revoke(*id);
            }
            let committed = write.commit(&self);
            drop(state);
            let revision = committed.revision;
            self.durable(committed.logged);
            self.counters.leases_expired(expired.len() as u64);
            tracing::debug!(leases = expired.len(), revision, "leases expired");
        }
    }

    /// etcd's periodic auto-compaction: every tenth of `retention`, compact to the revision
    /// that was current `retention` ago, so that at least `retention` of history is kept.
    pub async fn run_auto_compaction(self: Arc<Self>, retention: Duration, shutdown: CancellationToken) {
        let tick = (retention / 10).max(Duration::from_secs(1));
        let mut samples: std::collections::VecDeque<(Instant, i64)> = Default::default();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let now = Instant::now();
            samples.push_back((now, self.revision()));
            let mut target = None;
            while let Some(&(at, revision)) = samples.front() {
                if now.duration_since(at) < retention {
                    break;
                }
                target = Some(revision);
                samples.pop_front();
            }
            if let Some(revision) = target {
                match self.compact(&CompactionRequest { revision, physical: false }) {
                    Ok(_) => tracing::info!(revision, "auto-compacted"),
                    Err(Error::Compacted) => {}
                    Err(error) => tracing::warn!(%error, revision, "auto-compaction failed"),
                }
            }
        }
    }
}

/// One atomic write: every change lands at `revision`, the one after the current revision,
/// and becomes visible to watchers only at [`Write::commit`].
pub(crate) struct Write<'a> {
    state: &'a mut State,
    revision: i64,
    /// This write's changes, in order.
    changes: Vec<Change>,
    /// What the log needs to replay this write, in order, when the store keeps a log.
    ops: Option<Vec<persist::Op>>,
}

/// What [`Write::commit`] did.
#[derive(Debug, Clone, Copy)]
struct Committed {
    /// The store's revision afterwards.
    revision: i64,
    /// The log position of the write's entry, when one was written.
    logged: Option<u64>,
}

impl<'a> Write<'a> {
    fn begin(state: &'a mut State, logging: bool) -> Self {
        let revision = state.revision + 1;
        Self { state, revision, changes: Vec::new(), ops: logging.then(Vec::new) }
    }

    /// The revision reads inside this write see: the pending one once anything changed.
    fn read_revision(&self) -> i64 {
        if self.changes.is_empty() { self.state.revision } else { self.revision }
    }

    fn keyspace(&self) -> &Keyspace {
        &self.state.keyspace
    }

    fn compact_revision(&self) -> i64 {
        self.state.compact_revision
    }

    /// `value`, when given, is how the store keeps the request's value (packed before the
    /// lock, or shared with the writer); a txn's puts are packed here.
    fn put(&mut self, request: PutRequest, value: Option<Value>) -> Result<PutResponse> {
        // etcd looks the lease up before the key (found by differential_prop).
        if request.lease != 0 && !self.state.leases.contains(request.lease) {
            return Err(Error::LeaseNotFound);
        }
        let existing = self.state.keyspace.latest(&request.key);
        if (request.ignore_value || request.ignore_lease) && existing.is_none() {
            return Err(Error::KeyNotFound);
        }
        let (value, as_written) = match (existing, request.ignore_value) {
            (Some(prev), true) => {
                (prev.value.clone(), self.ops.is_some().then(|| self.keyspace().packer().unpack(&prev.value)))
            }
            _ => (
                value.unwrap_or_else(|| self.keyspace().packer().pack(&request.key, &request.value)),
                Some(request.value),
            ),
        };
        let lease = match (existing, request.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => request.lease,
        };
        if lease != 0 && !self.state.leases.contains(lease) {
            return Err(Error::LeaseNotFound);
        }
        let (key, previous) = self.apply_put(&request.key, value, as_written, lease);
        let prev_kv = previous.filter(|_| request.prev_kv).map(|prev| self.keyspace().key_value(&key, &prev));
        Ok(PutResponse { header: None, prev_kv })
    }

    /// Writes `key` with what a put resolved (its lease known to exist): the part of a put
    /// that log replay repeats. `as_written` is the value for the log, when one is kept.
    fn apply_put(
        &mut self,
        key: &[u8],
        value: Value,
        as_written: Option<Bytes>,
        lease: i64,
    ) -> (Blob, Option<Version>) {
        let (key, previous) = self.state.keyspace.put(key, value, lease, self.revision);
        if let (Some(ops), Some(value)) = (&mut self.ops, as_written) {
            // The keyspace's own handle: the key is not copied for the log.
            ops.push(persist::Op::Put { key: key.clone(), value, lease });
        }
        if let Some(prev) = &previous
            && prev.lease != 0
            && prev.lease != lease
        {
            self.state.leases.detach(prev.lease, &key);
        }
        if lease != 0 {
            self.state.leases.attach(lease, &key);
        }
        self.changes.push(Change::put(key.clone(), self.revision));
        (key, previous)
    }

    fn delete_range(&mut self, request: &DeleteRangeRequest) -> DeleteRangeResponse {
        let range = KeyRange::new(&request.key, &request.range_end);
        let doomed = self.state.keyspace.live_in(range);
        let deleted = doomed.len() as i64;
        let prev_kvs = if request.prev_kv {
            doomed.iter().map(|(key, v)| self.keyspace().key_value(key, v)).collect()
        } else {
            Vec::new()
        };
        for (key, _) in doomed {
            self.delete_key(key);
        }
        DeleteRangeResponse { header: None, deleted, prev_kvs }
    }

    /// Deletes `key` if it is live; returns whether it was.
    fn delete_key(&mut self, key: Blob) -> bool {
        let Some(previous) = self.state.keyspace.delete(&key, self.revision) else { return false };
        if previous.lease != 0 {
            self.state.leases.detach(previous.lease, &key);
        }
        if let Some(ops) = &mut self.ops {
            ops.push(persist::Op::Delete(key.clone()));
        }
        self.changes.push(Change::delete(key, self.revision));
        true
    }

    fn revoke(&mut self, id: i64) -> Result<()> {
        let lease = self.state.leases.remove(id)?;
        if let Some(ops) = &mut self.ops {
            ops.push(persist::Op::Revoke(id));
        }
        let mut keys: Vec<Blob> = lease.keys.into_iter().collect();
        // Sorted, so that the delete events of one revoke come in key order, as etcd's do.
        keys.sort();
        for key in keys {
            self.delete_key(key);
        }
        Ok(())
    }

    /// Applies the write to the state (revision, history) without publishing it; returns
    /// the revision afterwards and the ops to log.
    fn apply(self) -> (i64, Option<Vec<persist::Op>>) {
        if !self.changes.is_empty() {
            self.state.revision = self.revision;
            self.state.history.append(self.changes);
        }
        (self.state.revision, self.ops.filter(|ops| !ops.is_empty()))
    }

    /// Logs the write, then publishes it: a revision is in the log before any reader or
    /// watcher can see it (the caller still holds the store's write lock).
    fn commit(self, store: &Store) -> Committed {
        let before = self.state.revision;
        let (revision, ops) = self.apply();
        let logged = ops.and_then(|ops| store.log(|| persist::commit(revision, ops)));
        if revision != before {
            store.revision_tx.send_replace(revision);
        }
        Committed { revision, logged }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::pb::etcdserverpb::{
        Compare, RequestOp, compare::CompareResult, compare::CompareTarget, compare::TargetUnion, request_op,
    };

    fn store() -> Arc<Store> {
        Store::new(Identity::random(), Limits::default(), AuthStore::default())
    }

    fn put(store: &Store, key: &str, value: &str) -> i64 {
        let request = PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        };
        store.put(request).expect("put").header.expect("header").revision
    }

    fn get(store: &Store, key: &str) -> Option<KeyValue> {
        let request = RangeRequest { key: key.as_bytes().to_vec().into(), ..Default::default() };
        store.range(&request).expect("range").kvs.pop()
    }

    #[test]
    fn a_fresh_store_is_at_revision_one_and_each_write_adds_one() {
        let store = store();
        assert_eq!(store.revision(), 1);
        assert_eq!(put(&store, "a", "1"), 2);
        assert_eq!(put(&store, "b", "1"), 3);
    }

    #[test]
    fn a_delete_of_nothing_does_not_bump_the_revision() {
        let store = store();
        put(&store, "a", "1");
        let request = DeleteRangeRequest { key: b"zzz".to_vec().into(), ..Default::default() };
        let response = store.delete_range(request).expect("delete");
        assert_eq!((response.deleted, response.header.unwrap().revision), (0, 2));
    }

    #[test]
    fn a_txn_applies_every_write_of_its_branch_at_one_revision() {
        let store = store();
        put(&store, "lock", "free");
        let put_op = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: b"lock".to_vec().into(),
                target_union: Some(TargetUnion::Value(b"free".to_vec().into())),
                ..Default::default()
            }],
            success: vec![put_op("x"), put_op("y")],
            failure: vec![],
        };
        let response = store.txn(txn).expect("txn");
        assert!(response.succeeded);
        assert_eq!(response.header.unwrap().revision, 3);
        assert_eq!(get(&store, "x").unwrap().mod_revision, 3);
        assert_eq!(get(&store, "y").unwrap().mod_revision, 3);
    }

    #[test]
    fn activity_is_counted_as_etcds_metrics_count_it() {
        let store = store();
        put(&store, "lock", "free");
        get(&store, "lock");
        let range_op = RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"lock".to_vec().into(),
                ..Default::default()
            })),
        };
        let delete_op = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: b"lock".to_vec().into(),
                ..Default::default()
            })),
        };
        let read_only = TxnRequest { success: vec![range_op.clone()], ..Default::default() };
        store.txn(read_only).expect("txn");
        let writing = TxnRequest { success: vec![range_op, delete_op], ..Default::default() };
        store.txn(writing).expect("txn");
        let lease = store.lease_grant(&LeaseGrantRequest { ttl: 60, id: 0 }, None).expect("grant").id;
        assert!(store.lease_keep_alive(lease).is_some());
        store.lease_revoke(&LeaseRevokeRequest { id: lease }).expect("revoke");

        let activity = store.activity();
        assert_eq!((activity.puts, activity.ranges, activity.deletes, activity.txns), (1, 3, 1, 2));
        assert_eq!(
            (activity.leases_granted, activity.leases_renewed, activity.leases_revoked, activity.leases_expired),
            (1, 1, 1, 0)
        );
        // The put, the writing txn, the grant and the revoke; reads and renewals are not proposals.
        assert_eq!(activity.applied, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_counts_as_expired_and_revoked() {
        let store = store();
        store.lease_grant(&LeaseGrantRequest { ttl: 5, id: 0 }, None).expect("grant");
        let shutdown = CancellationToken::new();
        let expiry = tokio::spawn(Arc::clone(&store).run_lease_expiry(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(6)).await;
        shutdown.cancel();
        expiry.await.expect("expiry task");
        let activity = store.activity();
        assert_eq!((activity.leases_expired, activity.leases_revoked, activity.applied), (1, 1, 2));
    }

    #[test]
    fn a_txn_with_a_bad_lease_changes_nothing() {
        let store = store();
        let ops = vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"a".to_vec().into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"b".to_vec().into(),
                    lease: 42,
                    ..Default::default()
                })),
            },
        ];
        let error = store.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).unwrap_err();
        assert_eq!(error, Error::LeaseNotFound);
        assert_eq!(store.revision(), 1);
        assert!(get(&store, "a").is_none());
    }

    /// etcd accepts a put in one nested txn and a delete of the same key in a later one (its
    /// `checkIntervals` checks a nested put only against the deletes before it): watchers see
    /// both events at the one revision, the put with its value.
    #[test]
    fn a_key_put_then_deleted_in_one_txn_shows_both_events_to_watchers() {
        let store = store();
        let nested = |op: request_op::Request| RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success: vec![RequestOp { request: Some(op) }],
                failure: vec![],
            })),
        };
        let put = request_op::Request::RequestPut(PutRequest {
            key: b"a".to_vec().into(),
            value: b"1".to_vec().into(),
            ..Default::default()
        });
        let delete = request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: b"a".to_vec().into(),
            ..Default::default()
        });
        let revision = store
            .txn(TxnRequest { compare: vec![], success: vec![nested(put), nested(delete)], failure: vec![] })
            .expect("accepted as etcd accepts it")
            .header
            .expect("header")
            .revision;
        assert!(get(&store, "a").is_none());
        let read = store.history_from(revision, true, |_, _, _| true).expect("not compacted");
        let seen: Vec<_> = read
            .events
            .iter()
            .map(|e| (e.r#type, e.kv.as_ref().map(|kv| (kv.value.to_vec(), kv.mod_revision))))
            .collect();
        assert_eq!(
            seen,
            vec![
                (EventType::Put as i32, Some((b"1".to_vec(), revision))),
                (EventType::Delete as i32, Some((Vec::new(), revision))),
            ]
        );
    }

    /// Found by the store fuzz target: an empty op after a delete left the delete half done.
    #[test]
    fn a_txn_with_an_empty_op_is_refused_as_etcd_does_and_changes_nothing() {
        let store = store();
        put(&store, "a", "1");
        let ops = vec![
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: b"a".to_vec().into(),
                    ..Default::default()
                })),
            },
            RequestOp { request: None },
        ];
        let error = store.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).unwrap_err();
        assert_eq!(error, Error::KeyNotFound);
        assert_eq!(store.revision(), 2);
        assert!(get(&store, "a").is_some());
        put(&store, "b", "1");
        assert!(get(&store, "a").is_some(), "no pending delete surfaces with the next write");
    }

    /// Found by the store fuzz target: a put that needs its key, after a delete of that key in
    /// the same txn, failed only once the delete had run.
    #[test]
    fn a_txn_whose_put_needs_a_key_deleted_before_it_is_refused_and_changes_nothing() {
        let store = store();
        put(&store, "b", "1");
        let ops = vec![
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: b"b".to_vec().into(),
                    range_end: b"\0".to_vec().into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"b".to_vec().into(),
                    ignore_lease: true,
                    ..Default::default()
                })),
            },
        ];
        let error = store.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).unwrap_err();
        assert_eq!(error, Error::KeyNotFound);
        assert_eq!(store.revision(), 2);
        assert!(get(&store, "b").is_some());
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_in_one_revision_visible_to_watchers() {
        let store = store();
        let lease = store.lease_grant(&LeaseGrantRequest { ttl: 60, id: 0 }, None).expect("grant").id;
        for key in ["k1", "k2"] {
            let request = PutRequest { key: key.as_bytes().to_vec().into(), lease, ..Default::default() };
            store.put(request).expect("put");
        }
        store.lease_revoke(&LeaseRevokeRequest { id: lease }).expect("revoke");
        assert_eq!(store.revision(), 4);
        let history = store.history_from(4, true, |_, _, _| true).expect("not compacted");
        let deleted: Vec<_> = history.events.iter().map(|e| (e.r#type, e.kv.as_ref().unwrap().key.clone())).collect();
        assert!(history.events.iter().all(|e| e.prev_kv.as_ref().is_some_and(|p| p.mod_revision < 4)));
        let delete = EventType::Delete as i32;
        assert_eq!(deleted, vec![(delete, Bytes::from_static(b"k1")), (delete, Bytes::from_static(b"k2"))]);
    }

    #[test]
    fn reads_and_watches_below_the_compaction_are_refused() {
        let store = store();
        (0..4).for_each(|i| {
            put(&store, "k", &i.to_string());
        });
        store.compact(&CompactionRequest { revision: 4, physical: false }).expect("compact");
        let old = RangeRequest { key: b"k".to_vec().into(), revision: 3, ..Default::default() };
        assert_eq!(store.range(&old).unwrap_err(), Error::Compacted);
        assert_eq!(store.history_from(3, false, |_, _, _| true).unwrap_err(), 4);
        let at = RangeRequest { key: b"k".to_vec().into(), revision: 4, ..Default::default() };
        assert_eq!(store.range(&at).unwrap().kvs[0].value, Bytes::from_static(b"2"));
        let future = RangeRequest { key: b"k".to_vec().into(), revision: 9, ..Default::default() };
        assert_eq!(store.range(&future).unwrap_err(), Error::FutureRev);
    }

    /// etcd lets a txn put a key that a from-key delete of the same txn removed (its duplicate
    /// check reads `[key, "\0")` as an empty interval). Compacted at exactly that revision, etcd
    /// 3.5.15 and later lose the key's value and die at the next read of it (etcd-io/etcd#22376),
    /// which is why the differential test leaves such compactions out.
    #[test]
    fn a_key_deleted_and_put_again_in_one_txn_survives_a_compaction_at_that_revision() {
        let store = store();
        put(&store, "k", "old");
        let ops = vec![
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: b"k".to_vec().into(),
                    range_end: b"\0".to_vec().into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"k".to_vec().into(),
                    value: b"new".to_vec().into(),
                    ..Default::default()
                })),
            },
        ];
        store.txn(TxnRequest { compare: vec![], success: ops, failure: vec![] }).expect("txn");
        let recreated = store.revision();
        store.compact(&CompactionRequest { revision: recreated, physical: true }).expect("compact");
        let kv = get(&store, "k").expect("the key outlives the compaction");
        assert_eq!(
            (kv.value, kv.create_revision, kv.mod_revision, kv.version),
            (Bytes::from_static(b"new"), recreated, recreated, 1)
        );
        let at = RangeRequest { key: b"k".to_vec().into(), revision: recreated, ..Default::default() };
        assert_eq!(store.range(&at).expect("readable at the compaction").kvs.len(), 1);
    }

    /// Values written over the API are packed once their group has a dictionary, those kept
    /// plain meanwhile on the next write; every read sees them as written.
    #[test]
    fn packed_values_read_back_as_written_by_ranges_watches_prev_kv_and_compares() {
        let store = store();
        let key = |i: usize| format!("cilium/state/ip/v1/default/10.0.{}.{}", i / 250, i % 250);
        let value = |i: usize| {
            format!(
                r#"{{"IP":"10.0.{}.{}","HostIP":"192.168.0.{}","ID":{},"K8sNamespace":"ns{}","K8sPodName":"pod-{i:x}"}}"#,
                i / 250,
                i % 250,
                i % 9,
                70000 + i % 500,
                i % 13
            )
        };
        let total = packing::SAMPLE_VALUES + 100;
        let first = put(&store, &key(0), &value(0));
        for i in 1..packing::SAMPLE_VALUES {
            put(&store, &key(i), &value(i));
        }
        store.packer.trained();
        for i in packing::SAMPLE_VALUES..total {
            put(&store, &key(i), &value(i));
        }
        let plain = store.state.read().keyspace.entries().iter().filter(|(_, v)| !v.latest().value.is_packed()).count();
        assert_eq!(plain, 0, "every value packed, the sampled ones on the first write after training");

        let prefix = b"cilium/state/ip/v1/";
        let all = RangeRequest {
            key: prefix.to_vec().into(),
            range_end: crate::etcd::auth::prefix_end(prefix).into(),
            ..Default::default()
        };
        let response = store.range(&all).expect("range");
        let mut listed: Vec<_> = response.kvs.iter().map(|kv| (kv.key.to_vec(), kv.value.to_vec())).collect();
        listed.sort();
        let mut written: Vec<_> = (0..total).map(|i| (key(i).into_bytes(), value(i).into_bytes())).collect();
        written.sort();
        assert_eq!(listed, written);
        let stats = store.stats();
        assert_eq!(stats.key_value_bytes, written.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
        let values: usize = written.iter().map(|(_, v)| v.len()).sum();
        assert!(stats.held_value_bytes * 2 < values, "{} bytes held for {values}", stats.held_value_bytes);
        assert_eq!(stats.value_dictionaries, 1);

        let read = store.history_from(first, false, |_, _, _| true).expect("not compacted");
        assert_eq!(read.events.len(), total);
        assert!(read.events.iter().enumerate().all(|(i, e)| e.kv.as_ref().is_some_and(|kv| kv.value == value(i))));

        let replaced = store
            .put(PutRequest {
                key: key(3).into_bytes().into(),
                value: value(4).into_bytes().into(),
                prev_kv: true,
                ..Default::default()
            })
            .expect("put");
        assert_eq!(replaced.prev_kv.expect("prev_kv").value, value(3));
        let compare = |v: String| Compare {
            key: key(3).into_bytes().into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value(v.into_bytes().into())),
            ..Default::default()
        };
        let txn = |v| store.txn(TxnRequest { compare: vec![compare(v)], success: vec![], failure: vec![] });
        assert!(txn(value(4)).expect("txn").succeeded);
        assert!(!txn(value(3)).expect("txn").succeeded);

        let everything = DeleteRangeRequest { key: vec![0].into(), range_end: vec![0].into(), ..Default::default() };
        store.delete_range(everything).expect("delete");
        store.compact(&CompactionRequest { revision: store.revision(), physical: false }).expect("compact");
        let stats = store.stats();
        assert_eq!((stats.retained_bytes, stats.held_value_bytes), (0, 0), "a compaction frees what it held");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_takes_its_keys_with_it() {
        let store = store();
        let shutdown = CancellationToken::new();
        let expiry = tokio::spawn(Arc::clone(&store).run_lease_expiry(shutdown.clone()));
        let lease = store.lease_grant(&LeaseGrantRequest { ttl: 5, id: 0 }, None).expect("grant").id;
        store.put(PutRequest { key: b"k".to_vec().into(), lease, ..Default::default() }).expect("put");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(get(&store, "k").is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(get(&store, "k").is_none());
        assert!(store.lease_keys(lease).is_err());
        shutdown.cancel();
        expiry.await.expect("expiry task ends");
    }

    mod quota {
        use super::*;

        fn store_with_quota(quota_backend_bytes: i64) -> Arc<Store> {
            let limits = Limits { quota_backend_bytes, ..Limits::default() };
            Store::new(Identity::random(), limits, AuthStore::default())
        }

        fn try_put(store: &Store, key: &str, value: usize) -> Result<PutResponse> {
            store.put(PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: vec![b'v'; value].into(),
                ..Default::default()
            })
        }

        fn put_op(key: &str, value: usize) -> RequestOp {
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec().into(),
                    value: vec![b'v'; value].into(),
                    ..Default::default()
                })),
            }
        }

        fn delete_op(key: &str) -> RequestOp {
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: key.as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }
        }

        fn alarm(store: &Store, action: AlarmAction) -> Vec<AlarmMember> {
            let member_id = if action == AlarmAction::Get { 0 } else { store.identity().member_id };
            let request = AlarmRequest { action: action as i32, member_id, alarm: AlarmType::Nospace as i32 };
            store.alarm(&request).expect("alarm request").alarms
        }

        fn no_space_raised(store: &Store) -> bool {
            alarm(store, AlarmAction::Get)
                == [AlarmMember { member_id: store.identity().member_id, alarm: AlarmType::Nospace as i32 }]
        }

        /// Fills a 1,000-byte quota with ten 90-byte keys (k0..k9, 92 bytes each), then is
        /// refused the eleventh.
        fn full_store() -> Arc<Store> {
            let store = store_with_quota(1000);
            for i in 0..10 {
                try_put(&store, &format!("k{i}"), 90).expect("within the quota");
            }
            assert_eq!(try_put(&store, "k10", 90).unwrap_err(), Error::NoSpace);
            store
        }

        #[test]
        fn the_quota_counts_every_key_and_every_value_version_until_compaction_drops_it() {
            let store = store_with_quota(-1);
            put(&store, "key", "12345");
            assert_eq!(store.stats().retained_bytes, 3 + 5);
            put(&store, "key", "123");
            assert_eq!(store.stats().retained_bytes, 3 + 5 + 3, "the old version is history");
            assert_eq!(store.stats().key_value_bytes, 3 + 3, "live bytes are the newest version's");
            let delete = DeleteRangeRequest { key: b"key".to_vec().into(), ..Default::default() };
            store.delete_range(delete).expect("delete");
            assert_eq!(store.stats().retained_bytes, 3 + 5 + 3, "a delete frees nothing before compaction");
            store.compact(&CompactionRequest { revision: 3, physical: false }).expect("compact");
            assert_eq!(store.stats().retained_bytes, 3 + 3, "the version read at 3 is kept");
            store.compact(&CompactionRequest { revision: store.revision(), physical: false }).expect("compact");
            assert_eq!(store.stats().retained_bytes, 0);
        }

        #[test]
        fn a_write_that_would_reach_the_quota_is_refused_with_nospace_and_raises_the_alarm() {
            let store = store_with_quota(100);
            try_put(&store, "a", 49).expect("50 of 100 bytes");
            assert!(alarm(&store, AlarmAction::Get).is_empty());
            assert_eq!(try_put(&store, "b", 49).unwrap_err(), Error::NoSpace, "50 + 50 is not under 100");
            assert!(no_space_raised(&store));
            assert!(get(&store, "b").is_none());
            let stats = store.stats();
            assert_eq!((stats.retained_bytes, stats.revision, stats.quota_refusals, stats.no_space), (50, 2, 1, true));
        }

        #[test]
        fn while_the_alarm_is_raised_only_what_cannot_grow_the_store_passes() {
            let store = store_with_quota(1000);
            let lease = store.lease_grant(&LeaseGrantRequest { ttl: 60, id: 0 }, None).expect("grant").id;
            for i in 0..10 {
                try_put(&store, &format!("k{i}"), 90).expect("within the quota");
            }
            assert_eq!(try_put(&store, "k10", 90).unwrap_err(), Error::NoSpace);

            assert_eq!(try_put(&store, "tiny", 0).unwrap_err(), Error::NoSpace, "even a put that would fit");
            let with_put =
                TxnRequest { compare: vec![], success: vec![delete_op("k0")], failure: vec![put_op("x", 1)] };
            assert_eq!(store.txn(with_put).unwrap_err(), Error::NoSpace, "a put in either branch counts");
            let grant = LeaseGrantRequest { ttl: 60, id: 0 };
            assert_eq!(store.lease_grant(&grant, None).unwrap_err(), Error::NoSpace);

            let deletes_only = TxnRequest { compare: vec![], success: vec![delete_op("k0")], failure: vec![] };
            assert!(store.txn(deletes_only).expect("a txn without puts").succeeded);
            assert!(get(&store, "k1").is_some(), "reads answer");
            let delete = DeleteRangeRequest { key: b"k1".to_vec().into(), ..Default::default() };
            assert_eq!(store.delete_range(delete).expect("deletes pass").deleted, 1);
            assert_eq!(store.lease_keep_alive(lease), Some(60), "keep-alives pass");
            store.lease_revoke(&LeaseRevokeRequest { id: lease }).expect("revokes pass");
            store
                .compact(&CompactionRequest { revision: store.revision(), physical: false })
                .expect("compaction passes");
            assert_eq!(store.stats().retained_bytes, 8 * 92, "the deleted keys are gone after compaction");
            assert_eq!(try_put(&store, "tiny", 0).unwrap_err(), Error::NoSpace, "space is free, the alarm stays");
            assert_eq!(store.stats().quota_refusals, 5);
        }

        #[test]
        fn a_refused_txn_writes_nothing_of_its_branch() {
            let store = full_store();
            alarm(&store, AlarmAction::Deactivate);
            let (revision, history) = (store.revision(), store.stats().history_events);
            let txn = TxnRequest {
                compare: vec![],
                success: vec![delete_op("k0"), put_op("small", 1), put_op("big", 100)],
                failure: vec![],
            };
            assert_eq!(store.txn(txn).unwrap_err(), Error::NoSpace);
            assert!(get(&store, "k0").is_some(), "the delete before the puts did not happen");
            assert!(get(&store, "small").is_none());
            assert_eq!((store.revision(), store.stats().history_events), (revision, history));
            assert!(no_space_raised(&store));
        }

        #[test]
        fn a_disarmed_store_takes_writes_that_fit_and_raises_the_alarm_again_for_one_that_does_not() {
            let store = full_store();
            assert_eq!(alarm(&store, AlarmAction::Deactivate).len(), 1, "disarm answers the cleared alarm");
            assert!(alarm(&store, AlarmAction::Get).is_empty());
            assert!(alarm(&store, AlarmAction::Deactivate).is_empty(), "nothing left to clear");
            try_put(&store, "fits", 50).expect("920 + 54 < 1000");
            assert_eq!(try_put(&store, "over", 50).unwrap_err(), Error::NoSpace);
            assert!(no_space_raised(&store), "raised again by the next write over the quota");
        }

        #[test]
        fn an_administrator_can_raise_nospace_by_hand_and_no_other_alarm() {
            let store = store_with_quota(0);
            let raise = |alarm: AlarmType| AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: 42,
                alarm: alarm as i32,
            };
            assert_eq!(store.alarm(&raise(AlarmType::Nospace)).expect("raised").alarms.len(), 1);
            assert_eq!(try_put(&store, "k", 1).unwrap_err(), Error::NoSpace);
            assert!(matches!(store.alarm(&raise(AlarmType::Corrupt)), Err(Error::Unsupported(_))));
            assert!(store.alarm(&raise(AlarmType::None)).expect("ignored").alarms.is_empty());
            let clear = AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: 42,
                alarm: AlarmType::Nospace as i32,
            };
            store.alarm(&clear).expect("cleared");
            try_put(&store, "k", 1).expect("writable again");
        }

        #[test]
        fn a_negative_quota_turns_it_off() {
            let store = store_with_quota(-1);
            try_put(&store, "big", 1 << 20).expect("no quota");
            assert_eq!(store.limits().quota_bytes(), -1);
            assert_eq!(store_with_quota(0).limits().quota_bytes(), DEFAULT_QUOTA_BYTES);
        }
    }
}
