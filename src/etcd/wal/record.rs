//! What the frames hold: protobuf messages, so that a later release can add fields that this
//! one skips, and this one's files stay readable there. Tags are the format: never reuse one.
//!
//! ```text
//! every file:  Header
//! a segment:   Entry*            (Commit | LeaseGrant | Compaction)
//! a snapshot:  SnapshotItem*     (Meta, then Key*, Lease*, Changes*, then End)
//! ```

use bytes::Bytes;
use prost::Message;

use super::FORMAT;

/// What kind of file a header opens.
pub const KIND_LOG: u32 = 1;
pub const KIND_SNAPSHOT: u32 = 2;

/// The first frame of every file.
#[derive(Clone, PartialEq, Message)]
pub struct Header {
    /// [`FORMAT`] of the writer.
    #[prost(uint32, tag = "1")]
    pub format: u32,
    /// [`KIND_LOG`] or [`KIND_SNAPSHOT`].
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(uint64, tag = "3")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "4")]
    pub member_id: u64,
    /// etcd's `--initial-cluster-token` the directory was created for.
    #[prost(string, tag = "5")]
    pub initial_cluster_token: String,
    /// The file's sequence number, as in its name.
    #[prost(uint64, tag = "6")]
    pub sequence: u64,
    /// The release that wrote it, for an operator reading a hex dump.
    #[prost(string, tag = "7")]
    pub writer: String,
    /// The kernel's boot ID when the file was started: a later start under another boot ID
    /// follows a machine restart, which may have lost writes that were not on disk yet.
    #[prost(string, tag = "8")]
    pub boot_id: String,
}

impl Header {
    pub fn new(kind: u32, owner: &super::Owner, sequence: u64) -> Self {
        Self {
            format: FORMAT,
            kind,
            cluster_id: owner.cluster_id,
            member_id: owner.member_id,
            initial_cluster_token: owner.token.clone(),
            sequence,
            writer: concat!("clustermesh-apiserver ", env!("CARGO_PKG_VERSION")).to_owned(),
            boot_id: owner.boot_id.clone(),
        }
    }
}

/// This boot of the machine (Linux's `/proc/sys/kernel/random/boot_id`, the host's in a
/// container too); empty where there is none.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|id| id.trim().to_owned()).unwrap_or_default()
}

/// One log entry.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(oneof = "entry::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<entry::Kind>,
}

pub mod entry {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Commit(super::Commit),
        #[prost(message, tag = "2")]
        LeaseGrant(super::LeaseGrant),
        #[prost(message, tag = "3")]
        Compaction(super::Compaction),
        /// The last entry of a clean shutdown, written once everything before it was synced.
        #[prost(message, tag = "4")]
        Shutdown(super::Shutdown),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Shutdown {}

/// One committed write: its operations, in the order they were applied, at `revision`.
///
/// `revision` is the store's revision after the write: one more than before when a key
/// changed, the same when nothing did (a revoke of a lease without keys).
#[derive(Clone, PartialEq, Message)]
pub struct Commit {
    #[prost(int64, tag = "1")]
    pub revision: i64,
    #[prost(message, repeated, tag = "2")]
    pub ops: Vec<Op>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Op {
    #[prost(oneof = "op::Kind", tags = "1, 2, 3")]
    pub kind: Option<op::Kind>,
}

pub mod op {
    use bytes::Bytes;

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A key written, with the value and lease it got (`ignore_value`/`ignore_lease`
        /// resolved): replay derives `create_revision` and `version` as the write did.
        #[prost(message, tag = "1")]
        Put(super::Put),
        /// A live key deleted.
        #[prost(bytes = "bytes", tag = "2")]
        Delete(Bytes),
        /// A lease removed (revoked or expired); the deletes of its keys follow.
        #[prost(int64, tag = "3")]
        Revoke(i64),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Put {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

/// A lease granted (also a snapshot's lease). `ttl` is the granted TTL in seconds, as the
/// store raised it to its minimum; the deadline is not kept: a restart gives the full TTL.
#[derive(Clone, PartialEq, Message)]
pub struct LeaseGrant {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    /// The granting client's certificate Common Name, for the per-user lease cap.
    #[prost(string, tag = "3")]
    pub owner: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Compaction {
    #[prost(int64, tag = "1")]
    pub revision: i64,
}

/// One item of a snapshot.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotItem {
    #[prost(oneof = "snapshot_item::Kind", tags = "1, 2, 3, 4, 5")]
    pub kind: Option<snapshot_item::Kind>,
}

pub mod snapshot_item {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Meta(super::Meta),
        #[prost(message, tag = "2")]
        Key(super::KeyVersions),
        #[prost(message, tag = "3")]
        Lease(super::LeaseGrant),
        #[prost(message, tag = "4")]
        Changes(super::Changes),
        #[prost(message, tag = "5")]
        End(super::End),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Meta {
    #[prost(int64, tag = "1")]
    pub revision: i64,
    #[prost(int64, tag = "2")]
    pub compact_revision: i64,
}

/// A key and every version of it the store held (tombstones included), oldest first.
#[derive(Clone, PartialEq, Message)]
pub struct KeyVersions {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(message, repeated, tag = "2")]
    pub versions: Vec<Version>,
}

/// `version == 0` is a tombstone, as in the store.
#[derive(Clone, PartialEq, Message)]
pub struct Version {
    #[prost(int64, tag = "1")]
    pub mod_revision: i64,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub version: i64,
    #[prost(int64, tag = "4")]
    pub lease: i64,
    #[prost(bytes = "bytes", tag = "5")]
    pub value: Bytes,
}

/// A run of the history, in order: the key of each change and its revision, negated for a
/// delete.
#[derive(Clone, PartialEq, Message)]
pub struct Changes {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub keys: Vec<Bytes>,
    #[prost(sint64, repeated, tag = "2")]
    pub signed_revisions: Vec<i64>,
}

/// The last item: what came before it, so that a snapshot cut short is never taken for whole.
#[derive(Clone, PartialEq, Message)]
pub struct End {
    #[prost(uint64, tag = "1")]
    pub keys: u64,
    #[prost(uint64, tag = "2")]
    pub leases: u64,
    #[prost(uint64, tag = "3")]
    pub changes: u64,
}
