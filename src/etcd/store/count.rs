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

/// Entries kept in all (each about 100 bytes): a few thousand concurrent paged lists.
const MAX_ENTRIES: usize = 1 << 15;
/// Entries kept per range and revision; the lowest starts go first (lists move forward).
const MAX_PER_GROUP: usize = 4096;

#[derive(Debug, Default)]
pub struct CountCache {
    /// By (range end, revision): range start → live keys of `[start, end)` at that revision.
    groups: HashMap<(Bytes, i64), Group>,
    entries: usize,
    clock: u64,
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
        self.clock += 1;
        let group = self.groups.entry((Bytes::copy_from_slice(range.range_end), revision)).or_default();
        group.last_used = self.clock;
        // Copied: the request's key is a slice of the transport's receive buffer.
        if group.starts.insert(Bytes::copy_from_slice(range.key), count).is_none() {
            self.entries += 1;
        }
        if group.starts.len() > MAX_PER_GROUP {
            group.starts.pop_first();
            self.entries -= 1;
        }
        while self.entries > MAX_ENTRIES {
            let Some(oldest) = self.groups.iter().min_by_key(|(_, g)| g.last_used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(group) = self.groups.remove(&oldest) {
                self.entries -= group.starts.len();
            }
        }
    }

    /// Forgets the counts of revisions no read can ask for any more.
    pub fn compact(&mut self, revision: i64) {
        self.groups.retain(|&(_, r), _| r >= revision);
        self.entries = self.groups.values().map(|g| g.starts.len()).sum();
    }
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
    use super::super::blob::Blob;
    use super::*;

    /// Keys k00..k99 put at revisions 2..101, then every even one deleted at 102..151.
    fn keyspace() -> Keyspace {
        let mut ks = Keyspace::default();
        for i in 0..100 {
            ks.put(format!("k{i:02}").as_bytes(), Blob::copy_from(b"v"), 0, i + 2);
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
        for r in 0..(MAX_ENTRIES / MAX_PER_GROUP + 2) as i64 {
            for i in 0..MAX_PER_GROUP {
                cache.remember(KeyRange::new(format!("k{i:05}").as_bytes(), b"l"), 1000 + r, 1);
            }
        }
        assert!(cache.entries <= MAX_ENTRIES);
        assert_eq!(cache.entries, cache.groups.values().map(|g| g.starts.len()).sum::<usize>());
        let _ = ks;
    }
}
