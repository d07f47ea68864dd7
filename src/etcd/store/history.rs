//! The change log watchers read from: every revision's changes since the last compaction.
//!
//! Writers only append; each watch stream pulls from here at its own pace. That is what
//! keeps a slow watcher from ever blocking a writer, and what lets a watcher that fell
//! behind catch up without gaps or duplicates.
//!
//! One flat entry per change, its key the keyspace's own `Bytes`, shared rather than copied.
//! `prev_kv` is not kept: as etcd does, it is read from the keyspace at `mod_revision - 1`
//! when a watcher asks for it. This replaced an `Arc` per revision holding a `Vec` of full
//! events (4 slots of about 200 bytes on its first push): with the inline single version of
//! `versions.rs`, `examples/store_memory` (300k Cilium-shaped keys, one put per revision)
//! went from 1,430 to 436 bytes per key over the raw keys and values (RSS growth 491 → 206
//! MiB), about three quarters of that saving here.
//!
//! A change now holds only its key and revision (16 bytes with the key a [`Blob`]; was a
//! 96-byte `KeyValue`): a put's value, lease and versions are read back from the keyspace, which keeps the version
//! written at that revision for as long as the history holds it (there is one change per key
//! per revision: txns refuse duplicate keys, and a key deleted twice changes once). With the
//! `VecDeque`'s growth slack and the value's no longer needed shared-buffer header, this
//! saved 89 bytes per key in `examples/store_memory` (436 → 347 over the raw keys and
//! values; RSS growth 206 → 181 MiB).

use std::collections::VecDeque;

use crate::blob::Blob;

/// One key's change at one revision: a put or a delete.
#[derive(Debug, Clone)]
pub struct Change {
    key: Blob,
    /// The revision, negated for a delete (revisions start at 2), which keeps the put/delete
    /// flag from padding the entry to 24 bytes.
    signed_revision: i64,
}

impl Change {
    pub fn put(key: Blob, revision: i64) -> Self {
        Self { key, signed_revision: revision }
    }

    pub fn delete(key: Blob, revision: i64) -> Self {
        Self { key, signed_revision: -revision }
    }

    pub fn key(&self) -> &Blob {
        &self.key
    }

    pub fn revision(&self) -> i64 {
        self.signed_revision.abs()
    }

    pub fn is_put(&self) -> bool {
        self.signed_revision > 0
    }

    /// The revision, negated for a delete: the snapshot's encoding of a change.
    pub fn signed_revision(&self) -> i64 {
        self.signed_revision
    }

    pub fn from_signed(key: Blob, signed_revision: i64) -> Self {
        Self { key, signed_revision }
    }
}

#[derive(Debug, Default)]
pub struct History {
    /// In revision order.
    changes: VecDeque<Change>,
}

/// Bounds one read so that a watcher far behind never holds the store's lock for long.
pub const MAX_EVENTS_PER_READ: usize = 4096;

impl History {
    /// Appends one revision's changes, in the order the write made them.
    pub fn append(&mut self, changes: Vec<Change>) {
        self.changes.extend(changes);
    }

    pub fn event_count(&self) -> usize {
        self.changes.len()
    }

    /// Every change held, sharing the keys (for a snapshot).
    pub fn changes(&self) -> Vec<Change> {
        self.changes.iter().cloned().collect()
    }

    /// Visits the changes from revision `from` on, whole revisions at a time (a revision's
    /// changes are never split), stopping once [`MAX_EVENTS_PER_READ`] changes were visited.
    /// Returns the last revision visited, `None` when there is nothing from `from` on. The
    /// caller has already checked that `from` is not compacted.
    pub fn read_from(&self, from: i64, mut visit: impl FnMut(&Change)) -> Option<i64> {
        let start = self.changes.partition_point(|c| c.revision() < from);
        let mut last = None;
        for (visited, change) in self.changes.range(start..).enumerate() {
            if visited >= MAX_EVENTS_PER_READ && last != Some(change.revision()) {
                break;
            }
            last = Some(change.revision());
            visit(change);
        }
        last
    }

    /// Drops the revisions below `revision`. A watch may still start at `revision` itself and
    /// then sees all of it, its deletes included: etcd keeps the tombstones of the compaction's
    /// own revision since 3.5.15 (etcd-io/etcd#18274; before, a watcher resuming there missed
    /// those deletes and kept the keys for ever, which is what Cilium's agents do on a resume).
    pub fn compact(&mut self, revision: i64) {
        let below = self.changes.partition_point(|c| c.revision() < revision);
        self.changes.drain(..below);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: i64) -> Change {
        Change::put(Blob::empty(), revision)
    }

    fn delete(revision: i64) -> Change {
        Change::delete(Blob::empty(), revision)
    }

    fn read(h: &History, from: i64) -> (Vec<i64>, Option<i64>) {
        let mut revisions = Vec::new();
        let last = h.read_from(from, |c| revisions.push(c.revision()));
        (revisions, last)
    }

    #[test]
    fn reads_start_at_the_requested_revision_and_never_split_one() {
        let mut h = History::default();
        h.append(vec![put(2)]);
        h.append(vec![put(3); MAX_EVENTS_PER_READ]);
        h.append(vec![put(4)]);
        let (revisions, last) = read(&h, 3);
        assert_eq!((revisions.len(), last), (MAX_EVENTS_PER_READ, Some(3)), "the big revision comes whole");
        let (revisions, last) = read(&h, 1);
        assert_eq!((revisions.len(), last), (MAX_EVENTS_PER_READ + 1, Some(3)), "the next one waits");
        assert_eq!(read(&h, 4), (vec![4], Some(4)));
        assert_eq!(read(&h, 5), (vec![], None));
    }

    #[test]
    fn reads_and_compactions_of_a_long_history() {
        let mut h = History::default();
        (2..2 + 3 * 1024).for_each(|r| h.append(vec![put(r)]));
        h.append(vec![put(5000), delete(5000), put(5000)]);
        assert_eq!(read(&h, 1024 + 1).0.first(), Some(&(1024 + 1)));
        h.compact(1024 + 10);
        assert_eq!(h.event_count(), 2 * 1024 - 8 + 3);
        assert_eq!(read(&h, 0).0.first(), Some(&(1024 + 10)));
        h.compact(5000);
        assert_eq!(read(&h, 0), (vec![5000, 5000, 5000], Some(5000)));
        h.append(vec![put(5001)]);
        assert_eq!(read(&h, 5001), (vec![5001], Some(5001)));
    }

    #[test]
    fn compaction_drops_only_revisions_below_it() {
        let mut h = History::default();
        (2..6).for_each(|r| h.append(vec![put(r), put(r)]));
        h.compact(4);
        assert_eq!(read(&h, 0).0, [4, 4, 5, 5]);
        assert_eq!(h.event_count(), 4);
    }

    #[test]
    fn compaction_keeps_the_deletes_of_its_own_revision_as_etcd_keeps_their_tombstones() {
        let mut h = History::default();
        h.append(vec![put(2), delete(2), put(2)]);
        h.append(vec![delete(3)]);
        h.compact(2);
        assert_eq!(read(&h, 0).0, [2, 2, 2, 3]);
        h.compact(3);
        assert_eq!(read(&h, 0), (vec![3], Some(3)));
        assert_eq!(h.event_count(), 1);
    }
}
