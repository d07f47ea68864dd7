//! The event log watchers read from: every revision's events since the last compaction.
//!
//! Writers only append; each watch stream pulls from here at its own pace. That is what
//! keeps a slow watcher from ever blocking a writer, and what lets a watcher that fell
//! behind catch up without gaps or duplicates.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::etcd::pb::mvccpb::{Event, event::EventType};

/// The events of one revision, in the order the write produced them. `prev_kv` is filled
/// in every event; streams that did not ask for it drop it when they send.
#[derive(Debug)]
pub struct Revision {
    pub revision: i64,
    pub events: Vec<Event>,
}

#[derive(Debug, Default)]
pub struct History {
    revisions: VecDeque<Arc<Revision>>,
    events: usize,
}

/// Bounds one read so that a watcher far behind never holds the store's lock for long.
pub const MAX_EVENTS_PER_READ: usize = 4096;

impl History {
    pub fn append(&mut self, revision: Revision) {
        self.events += revision.events.len();
        self.revisions.push_back(Arc::new(revision));
    }

    pub fn event_count(&self) -> usize {
        self.events
    }

    /// The revisions from `from` on, whole (a revision's events are never split), stopping
    /// once [`MAX_EVENTS_PER_READ`] events are gathered. The caller has already checked that
    /// `from` is not compacted.
    pub fn read_from(&self, from: i64) -> Vec<Arc<Revision>> {
        let start = self.revisions.partition_point(|r| r.revision < from);
        let mut out = Vec::new();
        let mut gathered = 0;
        for revision in self.revisions.range(start..) {
            if gathered >= MAX_EVENTS_PER_READ {
                break;
            }
            gathered += revision.events.len();
            out.push(Arc::clone(revision));
        }
        out
    }

    /// Drops the revisions below `revision`. A watch may still start at `revision` itself
    /// and then sees what etcd keeps of it: its puts, which are every key's latest version,
    /// but not its deletes, whose tombstones the compaction removed.
    pub fn compact(&mut self, revision: i64) {
        while let Some(front) = self.revisions.front() {
            if front.revision > revision {
                break;
            }
            let puts: Vec<Event> = if front.revision == revision {
                front.events.iter().filter(|e| e.r#type == EventType::Put as i32).cloned().collect()
            } else {
                Vec::new()
            };
            self.events -= front.events.len();
            self.revisions.pop_front();
            if !puts.is_empty() {
                self.events += puts.len();
                self.revisions.push_front(Arc::new(Revision { revision, events: puts }));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(revision: i64, events: usize) -> Revision {
        Revision { revision, events: vec![Event::default(); events] }
    }

    #[test]
    fn reads_start_at_the_requested_revision_and_never_split_one() {
        let mut h = History::default();
        h.append(rev(2, 1));
        h.append(rev(3, MAX_EVENTS_PER_READ));
        h.append(rev(4, 1));
        let read: Vec<i64> = h.read_from(3).iter().map(|r| r.revision).collect();
        assert_eq!(read, [3], "the big revision comes whole, the next one waits");
        let read: Vec<i64> = h.read_from(1).iter().map(|r| r.revision).collect();
        assert_eq!(read, [2, 3]);
    }

    #[test]
    fn compaction_drops_only_revisions_below_it() {
        let mut h = History::default();
        (2..6).for_each(|r| h.append(rev(r, 2)));
        h.compact(4);
        let read: Vec<i64> = h.read_from(0).iter().map(|r| r.revision).collect();
        assert_eq!(read, [4, 5]);
        assert_eq!(h.event_count(), 4);
    }

    #[test]
    fn compaction_drops_the_deletes_of_its_own_revision_as_etcd_drops_their_tombstones() {
        let mut h = History::default();
        let delete = Event { r#type: EventType::Delete as i32, ..Event::default() };
        h.append(Revision { revision: 2, events: vec![Event::default(), delete.clone()] });
        h.append(Revision { revision: 3, events: vec![delete] });
        h.compact(2);
        let kept: Vec<(i64, usize)> = h.read_from(0).iter().map(|r| (r.revision, r.events.len())).collect();
        assert_eq!(kept, [(2, 1), (3, 1)]);
        h.compact(3);
        assert!(h.read_from(0).is_empty());
        assert_eq!(h.event_count(), 0);
    }
}
