//! The store's side of the data directory (`etcd/wal/`): the entries a write logs, replaying
//! them and a snapshot into a fresh state at start-up, taking snapshots, and the fsync timer.
//!
//! Entries are built from the store's own handles (`Blob`s, lent to protobuf as `Bytes`
//! without copying) while the write lock is held, and written before the lock is released.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::history::Change;
use super::packing::Packer;
use super::versions::{Version, Versions};
use super::{Identity, Limits, State, Store, Write};
use crate::blob::Blob;
use crate::etcd::auth::AuthStore;
use crate::etcd::wal::record::{self, entry, op};
use crate::etcd::wal::{self, FsyncPolicy, Log, Owner, Replay, SnapshotSink, WalConfig, WalError};

/// One operation of a logged write, as the write applied it.
#[derive(Debug)]
pub(super) enum Op {
    /// The value as written.
    Put {
        key: Blob,
        value: Bytes,
        lease: i64,
    },
    Delete(Blob),
    Revoke(i64),
}

pub(super) fn commit(revision: i64, ops: Vec<Op>) -> record::Entry {
    let ops = ops
        .into_iter()
        .map(|op| record::Op {
            kind: Some(match op {
                Op::Put { key, value, lease } => op::Kind::Put(record::Put { key: key.to_bytes(), value, lease }),
                Op::Delete(key) => op::Kind::Delete(key.to_bytes()),
                Op::Revoke(id) => op::Kind::Revoke(id),
            }),
        })
        .collect();
    record::Entry { kind: Some(entry::Kind::Commit(record::Commit { revision, ops })) }
}

pub(super) fn lease_grant(id: i64, ttl: i64, owner: &str) -> record::Entry {
    let grant = record::LeaseGrant { id, ttl, owner: owner.to_owned() };
    record::Entry { kind: Some(entry::Kind::LeaseGrant(grant)) }
}

pub(super) fn compaction(revision: i64) -> record::Entry {
    record::Entry { kind: Some(entry::Kind::Compaction(record::Compaction { revision })) }
}

/// The open log of a store with a data directory.
pub(super) struct Persistence {
    log: Log,
    dir: std::path::PathBuf,
    owner: Owner,
    /// Set by the write that finds the log has outgrown its snapshot.
    snapshot_wanted: Notify,
}

/// What a store opened on a data directory found there.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Whether the store was restored (false: a new store in an empty directory).
    pub warm: bool,
    /// Restored after a machine restart that followed an unclean stop: the data is kept
    /// under a new cluster ID (see [`Store::open`]).
    pub reidentified: bool,
    pub entries: u64,
    pub snapshot_bytes: u64,
    pub log_bytes: u64,
    /// Where a torn or corrupt log was cut, if it was.
    pub cut: Option<String>,
}

/// How long a failed snapshot waits before the next attempt.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(10);

impl Store {
    /// Opens the store kept in `config`'s data directory: the state, identity and leases it
    /// holds (every lease with its full TTL from now, as etcd restores them), or a new store
    /// with a fresh identity when it holds none.
    pub fn open(limits: Limits, auth: AuthStore, config: &WalConfig) -> Result<(Arc<Self>, Opened), WalError> {
        let dir = config.dir();
        let mut restore = Restore { state: State { revision: 1, ..State::default() }, now: Instant::now() };
        let recovered = wal::recover(&dir, &config.initial_cluster_token, &mut restore)?;
        let warm = recovered.owner.is_some();
        // Writes acknowledged before a machine restart may not have reached the disk (only
        // `always` syncs before acknowledging, and even then readers may have seen a write
        // before its sync): clients that saw them would resume past revisions that this store
        // is about to reuse. So after a restart of the machine, unless the last run ended
        // cleanly, the data stays but the store takes a new identity, and clients resync as
        // after any new store. A process crash loses nothing the kernel had: the identity stays.
        let rebooted = warm
            && !recovered.clean_shutdown
            && recovered.boot_id.as_deref().is_some_and(|boot| !boot.is_empty() && boot != config.boot_id);
        let new_owner = || {
            let identity = Identity::random();
            Owner {
                cluster_id: identity.cluster_id,
                member_id: identity.member_id,
                token: config.initial_cluster_token.clone(),
                boot_id: config.boot_id.clone(),
            }
        };
        let owner = match recovered.owner.clone() {
            Some(owner) if !rebooted => Owner { boot_id: config.boot_id.clone(), ..owner },
            _ => new_owner(),
        };
        let log = Log::create(
            &dir,
            owner.clone(),
            recovered.next_sequence,
            config.fsync,
            config.snapshot_log_bytes,
            recovered.log_bytes,
            recovered.snapshot_bytes,
        )?;
        let snapshot_wanted = Notify::new();
        if log.snapshot_due() {
            snapshot_wanted.notify_one();
        }
        let identity = Identity { cluster_id: owner.cluster_id, member_id: owner.member_id };
        let persistence = Persistence { log, dir, owner, snapshot_wanted };
        let opened = Opened {
            warm,
            reidentified: rebooted,
            entries: recovered.entries,
            snapshot_bytes: recovered.snapshot_bytes,
            log_bytes: recovered.log_bytes,
            cut: recovered.cut,
        };
        let store = Self::with_state(identity, limits, auth, restore.state, Some(persistence));
        if rebooted {
            // The files of the old identity go: a snapshot under the new one replaces them.
            store.snapshot()?;
        }
        Ok((store, opened))
    }

    /// The last entry of a clean stop: everything logged is synced, then this entry, so that a
    /// start after a machine restart knows nothing was lost and keeps the identity. Writes
    /// that still come after it make the next start treat the stop as unclean.
    fn log_clean_shutdown(&self) -> std::io::Result<()> {
        let Some(persistence) = &self.persistence else { return Ok(()) };
        let _no_writes = self.state.write();
        persistence.log.sync()?;
        let shutdown = record::Entry { kind: Some(entry::Kind::Shutdown(record::Shutdown {})) };
        persistence.log.append(&shutdown)?;
        persistence.log.sync()
    }

    /// Appends the entry `entry` builds, when the store keeps a log; returns its position.
    /// The caller holds the write lock. A store that cannot log stops: it would otherwise
    /// acknowledge writes that a restart loses (etcd stops too).
    pub(super) fn log(&self, entry: impl FnOnce() -> record::Entry) -> Option<u64> {
        let persistence = self.persistence.as_ref()?;
        match persistence.log.append(&entry()) {
            Ok(appended) => {
                if appended.snapshot_due {
                    persistence.snapshot_wanted.notify_one();
                }
                Some(appended.position)
            }
            Err(error) => fatal("writing the log", &error),
        }
    }

    /// With `--wal-fsync=always`, waits until the entry at `position` is on stable storage.
    /// Called after the write lock is released.
    pub(super) fn durable(&self, position: Option<u64>) {
        let (Some(persistence), Some(position)) = (&self.persistence, position) else { return };
        if persistence.log.policy() != FsyncPolicy::Always {
            return;
        }
        if let Err(error) = blocking(|| persistence.log.wait_durable(position)) {
            fatal("syncing the log", &error);
        }
    }

    /// Takes a snapshot now: the log moves to a new segment, and the state as of that moment
    /// is written beside it. Blocks on file I/O; the write lock is held only while the state
    /// is copied (handles, not bytes).
    pub fn snapshot(&self) -> Result<(), WalError> {
        let Some(persistence) = &self.persistence else { return Ok(()) };
        let (sequence, image) = {
            // The read lock keeps every writer out, so no entry lands between the rotation
            // and the copy: the new segment holds exactly what the image does not.
            let state = self.state.read();
            let sequence = persistence.log.rotate()?;
            (sequence, Image::of(&state))
        };
        let started = std::time::Instant::now();
        let meta = record::Meta { revision: image.revision, compact_revision: image.compact_revision };
        let mut sink = SnapshotSink::create(&persistence.dir, &persistence.owner, sequence, meta)?;
        // Leases before keys, so that restoring a key can attach it to its lease.
        for (id, ttl, owner) in image.leases {
            sink.lease(record::LeaseGrant { id, ttl, owner: owner.to_string() })?;
        }
        // Values as written: a snapshot must not depend on this process's dictionaries.
        let record = |v: Version| version_record(v, &self.packer);
        for (key, versions) in image.keys {
            let versions = match versions {
                Versions::One(v) => vec![record(v)],
                Versions::Many(vs) => vs.into_iter().map(record).collect(),
            };
            sink.key(record::KeyVersions { key: key.to_bytes(), versions })?;
        }
        for chunk in image.history.chunks(wal::CHANGES_PER_ITEM) {
            sink.changes(record::Changes {
                keys: chunk.iter().map(|c| c.key().to_bytes()).collect(),
                signed_revisions: chunk.iter().map(Change::signed_revision).collect(),
            })?;
        }
        let bytes = sink.finish()?;
        persistence.log.snapshot_written(bytes);
        tracing::info!(
            sequence,
            revision = image.revision,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written; older log segments removed"
        );
        Ok(())
    }

    /// Takes snapshots when the log asks for them and, with `--wal-fsync=batch`, syncs the log
    /// every [`wal::BATCH_INTERVAL`]; syncs once more on `shutdown`. Returns at once for a
    /// store without a data directory.
    pub async fn run_persistence(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(persistence) = &self.persistence else { return };
        let mut batch = tokio::time::interval(wal::BATCH_INTERVAL);
        batch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let batching = persistence.log.policy() == FsyncPolicy::Batch;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = persistence.snapshot_wanted.notified() => {
                    let store = Arc::clone(&self);
                    let result = tokio::task::spawn_blocking(move || store.snapshot())
                        .instrument(tracing::info_span!("snapshot"))
                        .await;
                    if let Ok(Err(error)) = result {
                        tracing::error!(error = %crate::error_chain(&error), "snapshot failed; the log keeps growing until one succeeds");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(SNAPSHOT_RETRY) => {}
                        }
                        persistence.log.snapshot_failed();
                    }
                }
                _ = batch.tick(), if batching => {
                    let store = Arc::clone(&self);
                    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || store.sync_log()).await {
                        fatal("syncing the log", &error);
                    }
                }
            }
        }
        if let Err(error) = self.log_clean_shutdown() {
            tracing::error!(%error, "syncing the log at shutdown");
        }
    }

    fn sync_log(&self) -> std::io::Result<()> {
        match &self.persistence {
            Some(persistence) if persistence.log.policy() != FsyncPolicy::Never => persistence.log.sync(),
            _ => Ok(()),
        }
    }
}

fn version_record(v: Version, packer: &Packer) -> record::Version {
    record::Version {
        mod_revision: v.mod_revision,
        create_revision: v.create_revision,
        version: v.version,
        lease: v.lease,
        value: packer.unpack(&v.value),
    }
}

/// The state as of one moment, sharing its keys and values with the store.
struct Image {
    revision: i64,
    compact_revision: i64,
    keys: Vec<(Blob, Versions)>,
    history: Vec<Change>,
    leases: Vec<(i64, i64, Arc<str>)>,
}

impl Image {
    fn of(state: &State) -> Self {
        Self {
            revision: state.revision,
            compact_revision: state.compact_revision,
            keys: state.keyspace.entries(),
            history: state.history.changes(),
            leases: state.leases.export(),
        }
    }
}

/// A log that cannot be written or synced: the process stops before acknowledging anything
/// a restart would not have.
fn fatal(what: &str, error: &std::io::Error) -> ! {
    tracing::error!(%error, "{what} failed: stopping, so that no write is acknowledged that a restart would lose");
    eprintln!("fatal: {what}: {error}");
    std::process::abort()
}

/// Runs `f`, which blocks on I/O, without stalling the other tasks of a multi-threaded
/// runtime's worker.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Rebuilds a state from a snapshot and the log after it.
struct Restore {
    state: State,
    /// Every lease restored expires a full TTL from here.
    now: Instant,
}

impl Restore {
    fn grant(&mut self, grant: record::LeaseGrant) -> Result<(), String> {
        self.state
            .leases
            .grant(grant.id, grant.ttl, self.now, &grant.owner, usize::MAX)
            .map(|_| ())
            .map_err(|e| format!("lease {:x}: {e}", grant.id))
    }

    fn commit(&mut self, commit: record::Commit) -> Result<(), String> {
        let before = self.state.revision;
        let mut write = Write::begin(&mut self.state, false);
        for op in commit.ops {
            match op.kind {
                Some(op::Kind::Put(put)) => {
                    if put.lease != 0 && !write.state.leases.contains(put.lease) {
                        return Err(format!("put of {:?} on lease {:x}, which does not exist", put.key, put.lease));
                    }
                    let value = write.keyspace().packer().pack(&put.key, &put.value);
                    write.apply_put(&put.key, value, None, put.lease);
                }
                Some(op::Kind::Delete(key)) => {
                    if !write.delete_key(Blob::copy_from(&key)) {
                        return Err(format!("delete of {key:?}, which is not live"));
                    }
                }
                Some(op::Kind::Revoke(id)) => {
                    write.state.leases.remove(id).map_err(|e| format!("revoke of lease {id:x}: {e}"))?;
                }
                None => return Err("an operation of an unknown kind".to_owned()),
            }
        }
        let (after, _) = write.apply();
        if after != commit.revision {
            return Err(format!("logged at revision {}, replayed at {after} (after {before})", commit.revision));
        }
        Ok(())
    }
}

impl Replay for Restore {
    fn meta(&mut self, meta: record::Meta) -> Result<(), String> {
        self.state.revision = meta.revision;
        self.state.compact_revision = meta.compact_revision;
        Ok(())
    }

    fn key(&mut self, key: record::KeyVersions) -> Result<(), String> {
        let mut versions = key.versions.into_iter().map(|v| Version {
            mod_revision: v.mod_revision,
            create_revision: v.create_revision,
            version: v.version,
            lease: v.lease,
            value: self.state.keyspace.packer().pack(&key.key, &v.value),
        });
        let first = versions.next().ok_or_else(|| format!("key {:?} without versions", key.key))?;
        let mut all = Versions::One(first);
        versions.for_each(|v| all.push(v));
        let latest = all.latest();
        let lease = if latest.is_live() { latest.lease } else { 0 };
        let handle = self.state.keyspace.restore(&key.key, all).map_err(|e| format!("key {:?}: {e}", key.key))?;
        if lease != 0 {
            if !self.state.leases.contains(lease) {
                return Err(format!("key {:?} on lease {lease:x}, which does not exist", key.key));
            }
            self.state.leases.attach(lease, &handle);
        }
        Ok(())
    }

    fn lease(&mut self, lease: record::LeaseGrant) -> Result<(), String> {
        self.grant(lease)
    }

    fn changes(&mut self, changes: record::Changes) -> Result<(), String> {
        if changes.keys.len() != changes.signed_revisions.len() {
            return Err("a run of history with more keys than revisions".to_owned());
        }
        let run = changes
            .keys
            .iter()
            .zip(changes.signed_revisions)
            .map(|(key, signed): (&Bytes, i64)| Change::from_signed(self.state.keyspace.handle(key), signed))
            .collect();
        self.state.history.append(run);
        Ok(())
    }

    fn entry(&mut self, entry: record::Entry) -> Result<(), String> {
        match entry.kind {
            Some(entry::Kind::Commit(commit)) => self.commit(commit),
            Some(entry::Kind::LeaseGrant(grant)) => self.grant(grant),
            Some(entry::Kind::Shutdown(_)) => Ok(()),
            Some(entry::Kind::Compaction(compaction)) => {
                let revision = compaction.revision;
                if revision <= self.state.compact_revision || revision > self.state.revision {
                    return Err(format!(
                        "compaction to {revision} at revision {} (compacted to {})",
                        self.state.revision, self.state.compact_revision
                    ));
                }
                self.state.compact(revision);
                Ok(())
            }
            None => Err("an entry of an unknown kind".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::pb::etcdserverpb::{
        CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
        PutRequest, RangeRequest, RequestOp, TxnRequest, request_op,
    };
    use crate::etcd::pb::mvccpb::KeyValue;

    const TOKEN: &str = "token-1";

    fn config(dir: &std::path::Path) -> WalConfig {
        WalConfig { fsync: FsyncPolicy::Never, ..WalConfig::new(dir, TOKEN) }
    }

    fn open(dir: &std::path::Path) -> Arc<Store> {
        Store::open(Limits::default(), AuthStore::default(), &config(dir)).expect("opens").0
    }

    fn put(store: &Store, key: &str, value: &str, lease: i64) -> i64 {
        let request = PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            lease,
            ..Default::default()
        };
        store.put(request).expect("put").header.expect("header").revision
    }

    fn put_op(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn delete(store: &Store, key: &str) {
        let request = DeleteRangeRequest { key: key.as_bytes().to_vec().into(), ..Default::default() };
        store.delete_range(request).expect("delete");
    }

    fn grant(store: &Store, ttl: i64) -> i64 {
        store.lease_grant(&LeaseGrantRequest { ttl, id: 0 }, Some("admin-cluster1")).expect("grant").id
    }

    /// Everything a client can observe of the data: identity, revisions, every key as of
    /// every retained revision, the history from the compaction on, and the leases.
    #[derive(Debug, PartialEq)]
    struct Observed {
        identity: Identity,
        revision: i64,
        compact_revision: i64,
        reads: Vec<(i64, Vec<KeyValue>)>,
        history: Vec<(i32, Option<KeyValue>, Option<KeyValue>)>,
        leases: Vec<(i64, i64, Vec<Bytes>)>,
    }

    fn observe(store: &Store) -> Observed {
        let stats = store.stats();
        let reads = (stats.compact_revision.max(1)..=stats.revision)
            .map(|revision| {
                let all =
                    RangeRequest { key: vec![0].into(), range_end: vec![0].into(), revision, ..Default::default() };
                (revision, store.range(&all).expect("range").kvs)
            })
            .collect();
        let from = stats.compact_revision.max(1);
        let history = store
            .history_from(from, true, |_, _, _| true)
            .expect("retained")
            .events
            .into_iter()
            .map(|e| (e.r#type, e.kv, e.prev_kv))
            .collect();
        let mut leases: Vec<_> = store
            .lease_list()
            .1
            .into_iter()
            .map(|l| {
                let ttl = store.lease_time_to_live(&LeaseTimeToLiveRequest { id: l.id, keys: true });
                (l.id, ttl.granted_ttl, ttl.keys)
            })
            .collect();
        leases.sort();
        Observed {
            identity: store.identity(),
            revision: stats.revision,
            compact_revision: stats.compact_revision,
            reads,
            history,
            leases,
        }
    }

    /// Puts, an update, a delete, a txn, leases granted, used, revoked with their keys, and
    /// a compaction.
    fn workload(store: &Store) {
        let lease = grant(store, 60);
        let doomed = grant(store, 30);
        put(store, "a", "1", 0);
        put(store, "a", "2", lease);
        put(store, "b", "1", doomed);
        put(store, "c", "1", 0);
        delete(store, "c");
        let txn = TxnRequest { compare: vec![], success: vec![put_op("d", "1"), put_op("e", "1")], failure: vec![] };
        store.txn(txn).expect("txn");
        store.lease_revoke(&LeaseRevokeRequest { id: doomed }).expect("revoke");
        let empty = grant(store, 10);
        store.lease_revoke(&LeaseRevokeRequest { id: empty }).expect("revoke of a lease without keys");
        store.compact(&CompactionRequest { revision: 4, physical: false }).expect("compact");
        put(store, "c", "again", 0);
    }

    #[test]
    fn a_reopened_store_holds_exactly_what_it_held_keys_revisions_history_leases_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        workload(&store);
        let before = observe(&store);
        drop(store);

        let (reopened, opened) = Store::open(Limits::default(), AuthStore::default(), &config(dir.path())).unwrap();
        assert!(opened.warm);
        assert_eq!(observe(&reopened), before);
        assert_eq!((before.revision, before.compact_revision), (9, 4));
        assert_eq!(put(&reopened, "f", "1", 0), 10, "the revision continues");
    }

    /// The log and snapshots hold values as written, so a restart, whose dictionaries are
    /// new, reads every packed value back; it packs them again with dictionaries of its own.
    #[test]
    fn packed_values_are_logged_and_snapshotted_as_written_and_packed_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let key = |i: usize| format!("cilium/state/ip/v1/default/10.1.{}.{}", i / 250, i % 250);
        let value = |i: usize| {
            format!(r#"{{"IP":"10.1.{}.{}","ID":{},"K8sPodName":"pod-{i:x}"}}"#, i / 250, i % 250, 70000 + i % 300)
        };
        let total = super::super::packing::SAMPLE_VALUES + 100;
        for i in 0..total - 50 {
            put(&store, &key(i), &value(i), 0);
        }
        store.packer.trained();
        store.snapshot().expect("snapshot");
        for i in total - 50..total {
            put(&store, &key(i), &value(i), 0);
        }
        drop(store);

        let reopened = open(dir.path());
        let all = RangeRequest { key: vec![0].into(), range_end: vec![0].into(), ..Default::default() };
        let read = |store: &Store| -> Vec<(Bytes, Bytes)> {
            store.range(&all).expect("range").kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
        };
        let mut written: Vec<_> = (0..total).map(|i| (Bytes::from(key(i)), Bytes::from(value(i)))).collect();
        written.sort();
        assert_eq!(read(&reopened), written);
        reopened.packer.trained();
        put(&reopened, "other", "1", 0);
        let plain = reopened
            .state
            .read()
            .keyspace
            .entries()
            .iter()
            .filter(|(k, v)| k.starts_with(b"cilium/") && !v.latest().value.is_packed())
            .count();
        assert_eq!(plain, 0, "packed again after the restart");
        assert_eq!(read(&reopened)[..total], written[..]);
    }

    #[test]
    fn a_snapshot_and_the_log_after_it_restore_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        workload(&store);
        store.snapshot().expect("snapshot");
        let lease = grant(&store, 90);
        put(&store, "g", "1", lease);
        delete(&store, "a");
        store.snapshot().expect("a second snapshot replaces the first");
        put(&store, "h", "1", 0);
        let before = observe(&store);
        drop(store);

        let files: Vec<_> = std::fs::read_dir(config(dir.path()).dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("snapshot-") || name.starts_with("wal-"))
            .collect();
        assert_eq!(files.len(), 2, "one snapshot and the segment after it: {files:?}");
        assert_eq!(observe(&open(dir.path())), before);
    }

    #[test]
    fn every_restored_lease_gets_its_full_ttl_from_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let lease = grant(&store, 1000);
        put(&store, "k", "v", lease);
        drop(store);
        let store = open(dir.path());
        let ttl = store.lease_time_to_live(&LeaseTimeToLiveRequest { id: lease, keys: true });
        assert_eq!((ttl.granted_ttl, ttl.keys), (1000, vec![Bytes::from_static(b"k")]));
        assert!(ttl.ttl >= 999, "{}", ttl.ttl);
        store.lease_revoke(&LeaseRevokeRequest { id: lease }).expect("the restored lease revokes its keys");
        let k = RangeRequest { key: b"k".to_vec().into(), ..Default::default() };
        assert!(store.range(&k).unwrap().kvs.is_empty());
    }

    #[test]
    fn a_write_torn_by_a_crash_is_absent_and_everything_before_it_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        put(&store, "a", "1", 0);
        let before = observe(&store);
        put(&store, "b", "1", 0);
        drop(store);
        let segment = config(dir.path()).dir().join("wal-0000000000000001.log");
        let len = std::fs::metadata(&segment).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(len - 1).unwrap();

        let (store, opened) = Store::open(Limits::default(), AuthStore::default(), &config(dir.path())).unwrap();
        assert!(opened.cut.is_some());
        assert_eq!(observe(&store), before);
        assert_eq!(put(&store, "b", "2", 0), 3, "the lost revision is taken again");
    }

    /// A crash can tear the last write anywhere: cut the log at every byte, and the store
    /// opens as it was after some whole prefix of its writes, a longer one for a longer log.
    #[test]
    fn a_log_cut_at_any_byte_opens_as_the_store_was_after_its_last_whole_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut states = vec![observe(&store)];
        let lease = grant(&store, 60);
        states.push(observe(&store));
        for (key, value) in [("a", "1"), ("b", "2"), ("a", "3")] {
            put(&store, key, value, lease);
            states.push(observe(&store));
        }
        let txn = TxnRequest { compare: vec![], success: vec![put_op("c", "1"), put_op("d", "1")], failure: vec![] };
        store.txn(txn).expect("txn");
        states.push(observe(&store));
        delete(&store, "b");
        states.push(observe(&store));
        store.compact(&CompactionRequest { revision: 4, physical: false }).expect("compact");
        states.push(observe(&store));
        store.lease_revoke(&LeaseRevokeRequest { id: lease }).expect("revoke");
        states.push(observe(&store));
        drop(store);

        let segment = config(dir.path()).dir().join("wal-0000000000000001.log");
        let whole = std::fs::read(&segment).unwrap();
        let mut last = 0;
        for len in 0..=whole.len() {
            let copy = tempfile::tempdir().unwrap();
            let copy_dir = config(copy.path()).dir();
            std::fs::create_dir_all(&copy_dir).unwrap();
            std::fs::write(copy_dir.join("wal-0000000000000001.log"), &whole[..len]).unwrap();
            let (store, _) = Store::open(Limits::default(), AuthStore::default(), &config(copy.path())).unwrap();
            let seen = observe(&store);
            if len == 0 || seen.identity != states[0].identity {
                // Cut inside the header: a directory with no store in it yet.
                assert!(last == 0 && seen.revision == 1, "cut at {len}");
                continue;
            }
            let at = states.iter().position(|s| *s == seen);
            let at = at.unwrap_or_else(|| panic!("cut at {len}: a state the store never had: {seen:#?}"));
            assert!(at >= last, "cut at {len}: went back from state {last} to {at}");
            last = at;
        }
        assert_eq!(last, states.len() - 1, "the whole log restores the last state");
    }

    fn open_in_boot(dir: &std::path::Path, boot: &str) -> (Arc<Store>, Opened) {
        let config = WalConfig { boot_id: boot.to_owned(), ..config(dir) };
        Store::open(Limits::default(), AuthStore::default(), &config).expect("opens")
    }

    #[test]
    fn after_a_machine_restart_that_followed_a_crash_the_data_stays_under_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_in_boot(dir.path(), "boot-a");
        workload(&store);
        let before = observe(&store);
        drop(store);

        let (store, opened) = open_in_boot(dir.path(), "boot-b");
        assert!(opened.warm && opened.reidentified);
        let after = observe(&store);
        assert_ne!(after.identity.cluster_id, before.identity.cluster_id, "clients must resync");
        assert_eq!(Observed { identity: before.identity, ..observe(&store) }, before, "the data is kept");
        drop(store);
        let (store, opened) = open_in_boot(dir.path(), "boot-b");
        assert!(!opened.reidentified, "a crash within the same boot keeps the new identity");
        assert_eq!(observe(&store), after);
    }

    #[test]
    fn after_a_clean_stop_a_machine_restart_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_in_boot(dir.path(), "boot-a");
        workload(&store);
        store.log_clean_shutdown().expect("clean stop");
        let before = observe(&store);
        drop(store);
        let (store, opened) = open_in_boot(dir.path(), "boot-b");
        assert!(!opened.reidentified);
        assert_eq!(observe(&store), before);
        put(&store, "after", "1", 0);
        drop(store);
        let (_, opened) = open_in_boot(dir.path(), "boot-c");
        assert!(opened.reidentified, "the clean stop was followed by writes and a crash");
    }

    #[test]
    fn a_data_directory_of_another_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let other = WalConfig::new(dir.path(), "token-2");
        let error = Store::open(Limits::default(), AuthStore::default(), &other).expect_err("refused");
        assert!(matches!(error, WalError::TokenMismatch { .. }), "{error}");
    }

    #[test]
    fn a_new_directory_gets_a_fresh_identity_that_restarts_keep() {
        let dir = tempfile::tempdir().unwrap();
        let (store, opened) = Store::open(Limits::default(), AuthStore::default(), &config(dir.path())).unwrap();
        assert!(!opened.warm);
        let identity = store.identity();
        drop(store);
        assert_eq!(open(dir.path()).identity(), identity);
    }
}
