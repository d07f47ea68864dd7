//! Remembered `count`s of ranges, so that paging through a range costs a page per request.
//!
//! etcd answers every Range with `count`, the live keys of the whole requested range. A
//! client listing N keys in pages asks for `[after last key, end)` each time, so counting
//! each page's rest from scratch makes one full list O(N²/page) (the reconnect storm of the
//! benchmark spent 30% of its time there). But the keys live at a committed revision never
//! change, so a count of `[k', end)` at revision r stays true until r is compacted, and
//! `count([k, end)) = count([k', end)) - count([k', k))` for any `k' <= k`: the next page
//! costs a scan of the previous page only. Clients listing at the same revision (every
//! agent reconnecting between two writes) share the same entries.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use super::keyspace::{KeyRange, Keyspace};

/// Bytes the cache may hold, keys and bookkeeping counted: a few thousand concurrent paged
/// lists of Cilium's keys. Bounded in bytes, not entries, because the keys are the client's.
const MAX_BYTES: usize = 8 << 20;
/// Entries kept per range and revision; the lowest starts go first (lists move forward).
const MAX_PER_GROUP: usize = 4096;
/// Ranges with a longer start or end are counted from scratch, never remembered: Cilium's keys
/// are far shorter, and a client sending megabyte keys must not fill the cache with them.
const MAX_KEY_BYTES: usize = 1024;
/// What an entry and a group cost beside their keys (tree node, hash slot, counters).
const ENTRY_OVERHEAD: usize = 64;
const GROUP_OVERHEAD: usize = 128;

#[derive(Debug, Default)]
pub struct CountCache {
    /// By (range end, revision): range start → live keys of `[start, end)` at that revision.
    groups: HashMap<(Bytes, i64), Group>,
    entries: usize,
    bytes: usize,
    clock: u64,
    /// Groups dropped to stay within [`MAX_BYTES`].
    evictions: u64,
}

/// What the cache holds, for the store's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountCacheStats {
    pub bytes: usize,
    pub evictions: u64,
}

#[derive(Debug, Default)]
struct Group {
    starts: BTreeMap<Bytes, usize>,
    last_used: u64,
}

/// The nearest remembered count below a request, to count from.
#[derive(Debug)]
pub struct Hint {
    start: Bytes,
    count: usize,
}

impl CountCache {
    /// The remembered count with the greatest start at or below `range.key`.
    pub fn hint(&mut self, range: KeyRange<'_>, revision: i64) -> Option<Hint> {
        self.clock += 1;
        let group = self.groups.get_mut(&(Bytes::copy_from_slice(range.range_end), revision))?;
        group.last_used = self.clock;
        let bound = (std::ops::Bound::Unbounded, std::ops::Bound::Included(range.key));
        let (start, &count) = group.starts.range::<[u8], _>(bound).next_back()?;
        Some(Hint { start: start.clone(), count })
    }

    /// Remembers that `range` holds `count` live keys at `revision`.
    pub fn remember(&mut self, range: KeyRange<'_>, revision: i64, count: usize) {
        if range.key.len() > MAX_KEY_BYTES || range.range_end.len() > MAX_KEY_BYTES {
            return;
        }
        self.clock += 1;
        let group_key = (Bytes::copy_from_slice(range.range_end), revision);
        let group_cost = group_key.0.len() + GROUP_OVERHEAD;
        let group = self.groups.entry(group_key).or_insert_with(|| {
            self.bytes += group_cost;
            Group::default()
        });
        group.last_used = self.clock;
        // Copied: the request's key is a slice of the transport's receive buffer.
        if group.starts.insert(Bytes::copy_from_slice(range.key), count).is_none() {
            self.entries += 1;
            self.bytes += range.key.len() + ENTRY_OVERHEAD;
        }
        if group.starts.len() > MAX_PER_GROUP
            && let Some((start, _)) = group.starts.pop_first()
        {
            self.entries -= 1;
            self.bytes -= start.len() + ENTRY_OVERHEAD;
        }
        while self.bytes > MAX_BYTES {
            let Some(oldest) = self.groups.iter().min_by_key(|(_, g)| g.last_used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(group) = self.groups.remove(&oldest) {
                self.entries -= group.starts.len();
                self.bytes -= group_bytes(&oldest, &group);
                self.evictions += 1;
            }
        }
    }

    /// Forgets the counts of revisions no read can ask for any more.
    pub fn compact(&mut self, revision: i64) {
        self.groups.retain(|&(_, r), _| r >= revision);
        self.entries = self.groups.values().map(|g| g.starts.len()).sum();
        self.bytes = self.groups.iter().map(|(k, g)| group_bytes(k, g)).sum();
    }

    pub fn stats(&self) -> CountCacheStats {
        CountCacheStats { bytes: self.bytes, evictions: self.evictions }
    }
}

/// What a group costs, as [`CountCache::remember`] adds it up.
fn group_bytes(key: &(Bytes, i64), group: &Group) -> usize {
    key.0.len() + GROUP_OVERHEAD + group.starts.keys().map(|start| start.len() + ENTRY_OVERHEAD).sum::<usize>()
}

/// Counts the live keys of `range` at the committed `revision`, from a remembered count when
/// there is one. `cache` is locked only around the look-up and the update, never the scan.
pub fn count(cache: &parking_lot::Mutex<CountCache>, keyspace: &Keyspace, range: KeyRange<'_>, revision: i64) -> usize {
    if range.is_single() || range.is_empty() {
        return keyspace.count(range, revision);
    }
    let hint = cache.lock().hint(range, revision);
    let count = match hint {
        Some(hint) if hint.start == range.key => hint.count,
        // The keys of `[hint.start, range.key)` are in the hint's count but not in ours. (Not
        // reached with `range.key == "\0"`, which as a range end would mean "no end": no
        // start lies below it but itself.)
        Some(hint) => hint.count - keyspace.count(KeyRange::new(&hint.start, range.key), revision),
        None => keyspace.count(range, revision),
    };
    cache.lock().remember(range, revision, count);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::Blob;
    use crate::etcd::store::packing::Value;

    /// Keys k00..k99 put at revisions 2..101, then every even one deleted at 102..151.
    fn keyspace() -> Keyspace {
        let mut ks = Keyspace::default();
        for i in 0..100 {
            ks.put(format!("k{i:02}").as_bytes(), Value::Plain(Blob::copy_from(b"v")), 0, i + 2);
        }
        for i in (0..100).step_by(2) {
            ks.delete(format!("k{i:02}").as_bytes(), 102 + i / 2);
        }
        ks
    }

    fn pages(cache: &parking_lot::Mutex<CountCache>, ks: &Keyspace, end: &[u8], revision: i64) -> Vec<usize> {
        let mut counts = Vec::new();
        let mut key = b"k".to_vec();
        loop {
            let range = KeyRange::new(&key, end);
            counts.push(count(cache, ks, range, revision));
            let mut page = Vec::new();
            ks.scan(range, revision, |kv| {
                page.push(kv.key);
                page.len() < 7
            });
            match page.last() {
                Some(last) if page.len() == 7 => key = [last.as_ref(), b"\0"].concat(),
                _ => return counts,
            }
        }
    }

    #[test]
    fn paged_counts_equal_counts_from_scratch_at_every_revision() {
        let ks = keyspace();
        let cache = parking_lot::Mutex::new(CountCache::default());
        for revision in [1, 2, 50, 101, 120, 151, 200] {
            for end in [&b"l"[..], b"\0", b"k50"] {
                let cached = pages(&cache, &ks, end, revision);
                let fresh = pages(&parking_lot::Mutex::new(CountCache::default()), &ks, end, revision);
                assert_eq!(cached, fresh, "revision {revision}, end {end:?}");
                // A second client listing at the same revision is served from the first's counts.
                assert_eq!(pages(&cache, &ks, end, revision), fresh);
                let mut expected = Vec::new();
                let mut scratch = b"k".to_vec();
                for _ in &fresh {
                    expected.push(ks.count(KeyRange::new(&scratch, end), revision));
                    let mut seen = 0;
                    ks.scan(KeyRange::new(&scratch.clone(), end), revision, |kv| {
                        seen += 1;
                        if seen == 7 {
                            scratch = [kv.key.as_ref(), b"\0"].concat();
                        }
                        seen < 7
                    });
                }
                assert_eq!(fresh, expected);
            }
        }
    }

    #[test]
    fn a_request_below_every_remembered_start_counts_from_scratch() {
        let ks = keyspace();
        let cache = parking_lot::Mutex::new(CountCache::default());
        assert_eq!(count(&cache, &ks, KeyRange::new(b"k50", b"l"), 101), 50);
        assert_eq!(count(&cache, &ks, KeyRange::new(b"k10", b"l"), 101), 90);
        assert_eq!(count(&cache, &ks, KeyRange::new(b"k60", b"l"), 101), 40);
        assert_eq!(count(&cache, &ks, KeyRange::new(b"k60", b"l"), 151), 20);
        assert_eq!(count(&cache, &ks, KeyRange::new(b"k50", b"k20"), 101), 0, "an inverted range holds nothing");
        for _ in 0..2 {
            assert_eq!(count(&cache, &ks, KeyRange::new(b"\0", b"\0"), 101), 100, "every key, asked twice");
        }
    }

    #[test]
    fn compaction_forgets_older_revisions_and_limits_hold() {
        let ks = keyspace();
        let mut cache = CountCache::default();
        cache.remember(KeyRange::new(b"k", b"l"), 50, 49);
        cache.remember(KeyRange::new(b"k", b"l"), 120, 80);
        cache.compact(100);
        assert!(cache.hint(KeyRange::new(b"k", b"l"), 50).is_none());
        assert_eq!(cache.hint(KeyRange::new(b"k5", b"l"), 120).map(|h| h.count), Some(80));
        for i in 0..MAX_PER_GROUP + 10 {
            cache.remember(KeyRange::new(format!("k{i:05}").as_bytes(), b"l"), 130, 1);
        }
        assert!(cache.entries <= MAX_PER_GROUP + 1);
        let _ = ks;
    }

    #[test]
    fn the_cache_stays_within_its_bytes_whatever_the_keys_a_client_sends() {
        let mut cache = CountCache::default();
        // Long keys (within a client's allowed prefix) at many revisions: the attack of a
        // read-only user on a byte-blind cache.
        let long = |i: usize, len: usize| format!("cilium/state/{i:08}{}", "x".repeat(len));
        for revision in 0..400 {
            cache.remember(KeyRange::new(long(revision as usize, 900).as_bytes(), b"cilium/state0"), revision, 1);
            cache.remember(KeyRange::new(long(revision as usize, 2 << 20).as_bytes(), b"cilium/state0"), revision, 1);
        }
        for r in 0..64 {
            for i in 0..MAX_PER_GROUP {
                cache.remember(KeyRange::new(format!("k{i:05}").as_bytes(), b"l"), 1000 + r, 1);
            }
        }
        assert!(cache.stats().bytes <= MAX_BYTES, "{:?}", cache.stats());
        assert!(cache.stats().evictions > 0);
        assert_eq!(cache.stats().bytes, cache.groups.iter().map(|(k, g)| group_bytes(k, g)).sum::<usize>());
        assert_eq!(cache.entries, cache.groups.values().map(|g| g.starts.len()).sum::<usize>());
        // The megabyte keys were never held.
        assert!(cache.groups.values().flat_map(|g| g.starts.keys()).all(|k| k.len() <= MAX_KEY_BYTES));
    }
}
