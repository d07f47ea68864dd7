//! The change log watchers read from: every revision's changes since the last compaction.
//!
//! Writers only append; each watch stream pulls from here at its own pace. That is what
//! keeps a slow watcher from ever blocking a writer, and what lets a watcher that fell
//! behind catch up without gaps or duplicates.
//!
//! A change is the key-value as written (a tombstone for a delete), one flat entry per
//! change: its key and value are the keyspace's own `Bytes`, shared rather than copied.
//! `prev_kv` is not kept: as etcd does, it is read from the keyspace at `mod_revision - 1`
//! when a watcher asks for it. This replaced an `Arc` per revision holding a `Vec` of full
//! events (4 slots of about 200 bytes on its first push): with the inline single version of
//! `versions.rs`, `examples/store_memory` (300k Cilium-shaped keys, one put per revision)
//! went from 1,430 to 436 bytes per key over the raw keys and values (RSS growth 491 → 206
//! MiB), about three quarters of that saving here.

use std::collections::VecDeque;

use crate::etcd::pb::mvccpb::KeyValue;

#[derive(Debug, Default)]
pub struct History {
    /// In revision order; a delete is a tombstone (`version == 0`, only key and
    /// `mod_revision` set), exactly what etcd sends as a delete event's `kv`.
    changes: VecDeque<KeyValue>,
}

/// Bounds one read so that a watcher far behind never holds the store's lock for long.
pub const MAX_EVENTS_PER_READ: usize = 4096;

pub fn is_put(change: &KeyValue) -> bool {
    change.version != 0
}

impl History {
    /// Appends one revision's changes, in the order the write made them.
    pub fn append(&mut self, changes: Vec<KeyValue>) {
        self.changes.extend(changes);
    }

    pub fn event_count(&self) -> usize {
        self.changes.len()
    }

    /// Visits the changes from revision `from` on, whole revisions at a time (a revision's
    /// changes are never split), stopping once [`MAX_EVENTS_PER_READ`] changes were visited.
    /// Returns the last revision visited, `None` when there is nothing from `from` on. The
    /// caller has already checked that `from` is not compacted.
    pub fn read_from(&self, from: i64, mut visit: impl FnMut(&KeyValue)) -> Option<i64> {
        let start = self.changes.partition_point(|c| c.mod_revision < from);
        let mut last = None;
        for (visited, change) in self.changes.range(start..).enumerate() {
            if visited >= MAX_EVENTS_PER_READ && last != Some(change.mod_revision) {
                break;
            }
            last = Some(change.mod_revision);
            visit(change);
        }
        last
    }

    /// Drops the revisions below `revision`. A watch may still start at `revision` itself
    /// and then sees what etcd keeps of it: its puts, which are every key's latest version,
    /// but not its deletes, whose tombstones the compaction removed.
    pub fn compact(&mut self, revision: i64) {
        let below = self.changes.partition_point(|c| c.mod_revision < revision);
        self.changes.drain(..below);
        let at = self.changes.partition_point(|c| c.mod_revision <= revision);
        if self.changes.range(..at).any(|c| !is_put(c)) {
            let kept: Vec<KeyValue> = self.changes.drain(..at).filter(is_put).collect();
            for change in kept.into_iter().rev() {
                self.changes.push_front(change);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: i64) -> KeyValue {
        KeyValue { mod_revision: revision, version: 1, ..KeyValue::default() }
    }

    fn delete(revision: i64) -> KeyValue {
        KeyValue { mod_revision: revision, ..KeyValue::default() }
    }

    fn read(h: &History, from: i64) -> (Vec<i64>, Option<i64>) {
        let mut revisions = Vec::new();
        let last = h.read_from(from, |c| revisions.push(c.mod_revision));
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
        assert_eq!(read(&h, 0), (vec![5000, 5000], Some(5000)));
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
    fn compaction_drops_the_deletes_of_its_own_revision_as_etcd_drops_their_tombstones() {
        let mut h = History::default();
        h.append(vec![put(2), delete(2), put(2)]);
        h.append(vec![delete(3)]);
        h.compact(2);
        assert_eq!(read(&h, 0).0, [2, 2, 3]);
        h.compact(3);
        assert_eq!(read(&h, 0), (vec![], None));
        assert_eq!(h.event_count(), 0);
    }
}
