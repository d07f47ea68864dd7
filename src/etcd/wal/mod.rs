//! The store's write-ahead log and snapshots in the data directory: what lets a store that was
//! SIGKILLed (an OOM kill, a crash) come back with the same cluster ID, member ID, revision,
//! keys, history and leases, so that every agent of every remote cluster resumes its watches
//! instead of relisting (cilium/cilium#26192).
//!
//! ```text
//! <data-dir>/clustermesh-apiserver/
//!     auth.json                        users, roles, auth switch (see `datadir.rs`)
//!     wal-<sequence:016x>.log          segments: a header, then one entry per committed write
//!     snapshot-<sequence:016x>.snap    the whole store as of the start of segment <sequence>
//! ```
//!
//! Every file is a sequence of frames (`frame.rs`: length, CRC-32C, payload); the payloads are
//! protobuf messages (`record.rs`), so fields can be added without a new format version. The
//! first frame of every file is a [`record::Header`]: the format version, the cluster and
//! member IDs, and etcd's `--initial-cluster-token`. A directory written by a newer format or
//! for another token is refused.
//!
//! **What is logged.** One entry per committed revision (a put, a delete, a txn, a lease revoke
//! or expiry with the deletes of its keys, as one entry), each lease grant, each compaction.
//! The entry is written (`write(2)`, to the page cache) while the store's write lock is held and
//! before the write is published to readers and watchers: the log order is the revision order,
//! and nothing a client can see is missing from the log after a process crash. Keep-alives are
//! not logged: as etcd does after a restart, every lease gets its full TTL again from the
//! restart. Users, roles and the auth switch stay in `auth.json`; alarms are not kept.
//!
//! **fsync** is a policy ([`FsyncPolicy`]); it never runs under the store's lock. Every header
//! records the machine's boot ID: a start under another boot, after a stop that did not end
//! the log with a clean-shutdown entry, may have lost writes clients saw, so the store keeps
//! its data under a new identity (see `Store::open`).
//!
//! **Snapshots** bound the log: once the segments written since the last snapshot outgrow it
//! (and at least [`DEFAULT_SNAPSHOT_LOG_BYTES`]), the log moves to a new segment and the state
//! as of that point (every key version and history entry since the compaction, so that a
//! watcher resuming after a restart misses nothing the store still holds, and the leases) is
//! written to a snapshot beside it, synced, and the older files removed.
//!
//! **Recovery** reads the newest snapshot, then the segments after it, and stops at the first
//! torn or corrupt frame: the store restarts at the last record that was whole, never at a
//! corrupt one. The cut segment is truncated there, later ones removed, and writing goes on in
//! a fresh segment.

mod frame;
mod log;
pub mod record;
mod recover;
mod snapshot;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use frame::{FrameError, FrameReader, write_frame, write_message_frame};
pub use log::{Appended, Log, Owner};
pub use recover::{Recovered, Replay, recover};
pub use snapshot::{CHANGES_PER_ITEM, SnapshotSink, write_snapshot};

/// Written into every header; a reader refuses anything newer than it knows.
pub const FORMAT: u32 = 1;

/// The log is not snapshotted before it holds this much, however small the store.
pub const DEFAULT_SNAPSHOT_LOG_BYTES: u64 = 64 << 20;

/// How often `--wal-fsync=batch` syncs the log.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);

const LOG_PREFIX: &str = "wal-";
const LOG_SUFFIX: &str = ".log";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";

/// When the log is flushed to stable storage (`--wal-fsync`). Every policy writes each entry
/// to the file before the write is acknowledged, so a process crash loses nothing
/// acknowledged; they differ only in what a power loss or kernel crash can take.
///
/// `never` is the default: after a machine restart that followed an unclean stop the store
/// takes a new identity anyway (clients resync; see `Store::open`), so syncing would only
/// spare the mirror some rewriting after a power loss, while its writeback costs the process
/// CPU on every write (measured in the README); a clean stop syncs once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// Never: the kernel writes dirty pages back when it chooses (about 30 s on Linux).
    #[default]
    Never,
    /// Once a second, off the write path: a power loss takes at most about the last second.
    Batch,
    /// Before each write is acknowledged, as etcd does; concurrent writes share one fsync.
    Always,
}

/// Where and how the store persists itself.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// etcd's `--data-dir`; the files live in its `clustermesh-apiserver/` subdirectory.
    pub data_dir: PathBuf,
    /// etcd's `--initial-cluster-token`: a directory written for another token is refused.
    pub initial_cluster_token: String,
    pub fsync: FsyncPolicy,
    /// The least log written since the last snapshot that triggers the next one.
    pub snapshot_log_bytes: u64,
    /// This boot of the machine ([`record::boot_id`]; set by tests).
    pub boot_id: String,
}

impl WalConfig {
    pub fn new(data_dir: impl Into<PathBuf>, initial_cluster_token: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            initial_cluster_token: initial_cluster_token.into(),
            fsync: FsyncPolicy::default(),
            snapshot_log_bytes: DEFAULT_SNAPSHOT_LOG_BYTES,
            boot_id: record::boot_id(),
        }
    }

    /// The directory holding the log and snapshots (beside `auth.json`).
    pub fn dir(&self) -> PathBuf {
        self.data_dir.join(crate::etcd::datadir::STATE_DIR)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: written by a newer release (format {found}; this release reads up to {FORMAT}); \
         start that release again, or empty the data directory to start a new store"
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: not a file of this store (no valid header)")]
    NotOurs { path: PathBuf },
    #[error(
        "{path}: written for --initial-cluster-token {found:?}, not {expected:?}: this data directory belongs \
         to another cluster; empty it (as etcdinit does) to start a new store"
    )]
    TokenMismatch { path: PathBuf, found: String, expected: String },
    #[error("{path}: cluster {found:016x}, where the other files say {expected:016x}")]
    IdentityMismatch { path: PathBuf, found: u64, expected: u64 },
    #[error("{path}: {reason}; the snapshot is written whole before it replaces anything, so this is damage")]
    CorruptSnapshot { path: PathBuf, reason: String },
    #[error("{dir}: log segment {missing:016x} is missing (have {have:?}); refusing to start with a gap")]
    MissingSegment { dir: PathBuf, missing: u64, have: Vec<u64> },
    #[error("{path}: entry {index}: {reason}")]
    BadEntry { path: PathBuf, index: u64, reason: String },
}

impl WalError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_owned();
        move |source| Self::Io { action, path, source }
    }
}

pub(crate) fn log_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{LOG_PREFIX}{sequence:016x}{LOG_SUFFIX}"))
}

pub(crate) fn snapshot_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{SNAPSHOT_PREFIX}{sequence:016x}{SNAPSHOT_SUFFIX}"))
}

/// The sequence number in a file name of the given kind.
fn sequence_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

/// Makes a rename or a new file durable: its directory entry is synced.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(WalError::io("syncing", dir))
}
