//! The MVCC keyspace: every key's versions since the last compaction, readable at any
//! retained revision.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use super::versions::{Version, Versions};
use crate::etcd::pb::mvccpb::KeyValue;

/// Which keys a request addresses, in etcd's encoding: an empty `range_end` is the single
/// key, `"\0"` is every key from `key` on, anything else is `[key, range_end)`.
#[derive(Debug, Clone, Copy)]
pub struct KeyRange<'a> {
    pub key: &'a [u8],
    pub range_end: &'a [u8],
}

impl<'a> KeyRange<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        Self { key, range_end }
    }

    pub fn is_single(&self) -> bool {
        self.range_end.is_empty()
    }

    pub fn contains(&self, candidate: &[u8]) -> bool {
        match self.range_end {
            [] => candidate == self.key,
            [0] => candidate >= self.key,
            end => candidate >= self.key && candidate < end,
        }
    }

    fn bounds(&self) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
        match self.range_end {
            [] => (Bound::Included(self.key), Bound::Included(self.key)),
            [0] => (Bound::Included(self.key), Bound::Unbounded),
            end => (Bound::Included(self.key), Bound::Excluded(end)),
        }
    }

    /// An inverted range (`range_end <= key`) addresses nothing, as in etcd.
    pub fn is_empty(&self) -> bool {
        !matches!(self.range_end, [] | [0]) && self.range_end <= self.key
    }
}

#[derive(Debug, Default)]
pub struct Keyspace {
    keys: BTreeMap<Bytes, Versions>,
    live_keys: usize,
    /// Bytes of live keys and values: what `db size` and the size metrics report.
    live_bytes: usize,
}

impl Keyspace {
    pub fn live_keys(&self) -> usize {
        self.live_keys
    }

    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// Visits the live key-values of `range` as of `revision`, in key order, until `visit`
    /// returns false.
    pub fn scan(&self, range: KeyRange<'_>, revision: i64, mut visit: impl FnMut(KeyValue) -> bool) {
        if range.is_empty() {
            return;
        }
        for (key, versions) in self.keys.range::<[u8], _>(range.bounds()) {
            if let Some(kv) = at_revision(key, versions, revision)
                && !visit(kv)
            {
                return;
            }
        }
    }

    /// Counts the live keys of `range` as of `revision`.
    pub fn count(&self, range: KeyRange<'_>, revision: i64) -> usize {
        if range.is_empty() {
            return 0;
        }
        self.keys
            .range::<[u8], _>(range.bounds())
            .filter(|(_, versions)| versions.at(revision).is_some_and(Version::is_live))
            .count()
    }

    /// The current value of a single key.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        latest(key, versions)
    }

    /// Writes `key` at `revision` and returns the previous live value.
    pub fn put(&mut self, key: Bytes, value: Bytes, lease: i64, revision: i64) -> Option<KeyValue> {
        let added = key.len() + value.len();
        let new = |create_revision, version| Version { mod_revision: revision, create_revision, version, lease, value };
        let previous = match self.keys.get_mut(&key) {
            Some(versions) => {
                let previous = latest(&key, versions);
                let version = match &previous {
                    Some(prev) => new(prev.create_revision, prev.version + 1),
                    None => new(revision, 1),
                };
                versions.push(version);
                previous
            }
            None => {
                self.keys.insert(key, Versions::One(new(revision, 1)));
                None
            }
        };
        match &previous {
            Some(prev) => self.live_bytes = self.live_bytes + added - (prev.key.len() + prev.value.len()),
            None => {
                self.live_keys += 1;
                self.live_bytes += added;
            }
        }
        previous
    }

    /// Deletes `key` at `revision` if it is live, returning what it held.
    pub fn delete(&mut self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        let previous = latest(key, versions)?;
        self.keys.get_mut(&previous.key)?.push(Version::tombstone(revision));
        self.live_keys -= 1;
        self.live_bytes -= previous.key.len() + previous.value.len();
        Some(previous)
    }

    /// The key-value `key` held as of `revision`, if it was live then.
    pub fn get_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        at_revision(key, versions, revision)
    }

    /// What `key` was put with at exactly `revision` (see [`Versions::put_at`]), for watchers.
    pub fn put_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        versions.put_at(revision).and_then(|v| to_key_value(key, v))
    }

    /// The live keys of `range` now, for a delete or a range compare.
    pub fn live_in(&self, range: KeyRange<'_>) -> Vec<KeyValue> {
        let mut out = Vec::new();
        self.scan(range, i64::MAX, |kv| {
            out.push(kv);
            true
        });
        out
    }

    /// Forgets every version that no read at `revision` or later can see: per key, all but
    /// the newest version at or below `revision`, and that one too when it is a tombstone.
    pub fn compact(&mut self, revision: i64) {
        self.keys.retain(|_, versions| versions.compact(revision));
    }
}

fn at_revision(key: &Bytes, versions: &Versions, revision: i64) -> Option<KeyValue> {
    versions.at(revision).and_then(|v| to_key_value(key, v))
}

fn latest(key: &Bytes, versions: &Versions) -> Option<KeyValue> {
    to_key_value(key, versions.latest())
}

fn to_key_value(key: &Bytes, version: &Version) -> Option<KeyValue> {
    version.is_live().then(|| KeyValue {
        key: key.clone(),
        create_revision: version.create_revision,
        mod_revision: version.mod_revision,
        version: version.version,
        value: version.value.clone(),
        lease: version.lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn keys_at(ks: &Keyspace, range: KeyRange<'_>, rev: i64) -> Vec<(String, String)> {
        let mut out = vec![];
        ks.scan(range, rev, |kv| {
            out.push((String::from_utf8_lossy(&kv.key).into_owned(), String::from_utf8_lossy(&kv.value).into_owned()));
            true
        });
        out
    }

    #[test]
    fn a_read_at_a_past_revision_sees_the_values_of_that_revision() {
        let mut ks = Keyspace::default();
        ks.put(b("a"), b("1"), 0, 2);
        ks.put(b("a"), b("2"), 0, 3);
        ks.delete(b"a", 4);
        let all = KeyRange::new(b"\0", b"\0");
        assert_eq!(keys_at(&ks, all, 2), vec![("a".into(), "1".into())]);
        assert_eq!(keys_at(&ks, all, 3), vec![("a".into(), "2".into())]);
        assert!(keys_at(&ks, all, 4).is_empty());
        assert_eq!(ks.live_keys(), 0);
    }

    #[test]
    fn recreating_a_deleted_key_starts_a_new_generation() {
        let mut ks = Keyspace::default();
        ks.put(b("k"), b("v"), 0, 2);
        ks.put(b("k"), b("v"), 0, 3);
        ks.delete(b"k", 4);
        ks.put(b("k"), b("w"), 0, 5);
        let kv = ks.get(b"k").expect("live");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
    }

    #[test]
    fn compaction_keeps_what_reads_at_or_after_it_can_see() {
        let mut ks = Keyspace::default();
        ks.put(b("gone"), b("x"), 0, 2);
        ks.put(b("kept"), b("old"), 0, 3);
        ks.delete(b"gone", 4);
        ks.put(b("kept"), b("new"), 0, 6);
        ks.compact(5);
        let all = KeyRange::new(b"\0", b"\0");
        assert_eq!(keys_at(&ks, all, 5), vec![("kept".into(), "old".into())]);
        assert_eq!(keys_at(&ks, all, 6), vec![("kept".into(), "new".into())]);
        assert_eq!(ks.keys.len(), 1, "the tombstoned key is forgotten");
    }

    #[test]
    fn prefix_and_from_key_ranges_follow_etcds_encoding() {
        let mut ks = Keyspace::default();
        for (i, k) in ["a", "b/1", "b/2", "c"].iter().enumerate() {
            ks.put(b(k), b("v"), 0, i as i64 + 2);
        }
        let names = |r| keys_at(&ks, r, 10).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names(KeyRange::new(b"b/", b"b0")), ["b/1", "b/2"]);
        assert_eq!(names(KeyRange::new(b"b/2", b"\0")), ["b/2", "c"]);
        assert_eq!(names(KeyRange::new(b"c", b"")), ["c"]);
        assert!(names(KeyRange::new(b"c", b"a")).is_empty());
        assert_eq!(ks.count(KeyRange::new(b"\0", b"\0"), 10), 4);
    }
}
