//! The MVCC keyspace: every key's versions since the last compaction, readable at any
//! retained revision.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::packing::{Packer, Value, group_of};
use super::versions::{Version, Versions};
use crate::blob::Blob;
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

/// Rust's B-tree splits a full node into two part-full ones, so keys inserted in order (an
/// initial sync of a sorted Kubernetes list) leave its nodes just over half full: 96 bytes
/// of tree per 48-byte entry, 74 for keys in random order, where a tree built in one pass
/// from sorted entries needs 52. The keyspace is rebuilt that way each time it has grown by
/// a quarter, from this size on: in `examples/store_memory` (300k keys) RSS growth went
/// from 136.5 to 126.2 MiB, for 0.12 s of rebuilding in all and a longest pause of 27 ms
/// (at 284k keys; the store's lock is held), amortized 0.4 µs per key inserted.
const REBUILD_FROM: usize = 4096;

#[derive(Debug)]
pub struct Keyspace {
    keys: BTreeMap<Blob, Versions>,
    /// Decodes packed values for every read; the store packs with it before it takes its
    /// lock (see `packing.rs`).
    packer: Arc<Packer>,
    live_keys: usize,
    /// Bytes of live keys and values.
    live_bytes: usize,
    /// Bytes of every key held and of the value of every version held, live or kept for the
    /// history until a compaction drops it: what the space quota counts (see `quota.rs`).
    retained_bytes: usize,
    /// Bytes the values of `retained_bytes` take as held: packed or as written.
    held_value_bytes: usize,
    /// The size of `keys` at which it is next rebuilt dense.
    rebuild_at: usize,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self {
            keys: BTreeMap::new(),
            packer: Packer::new(),
            live_keys: 0,
            live_bytes: 0,
            retained_bytes: 0,
            held_value_bytes: 0,
            rebuild_at: 0,
        }
    }
}

impl Keyspace {
    pub fn packer(&self) -> &Arc<Packer> {
        &self.packer
    }

    pub fn live_keys(&self) -> usize {
        self.live_keys
    }

    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }

    pub fn held_value_bytes(&self) -> usize {
        self.held_value_bytes
    }

    /// Visits the live key-values of `range` as of `revision`, in key order, until `visit`
    /// returns false.
    pub fn scan(&self, range: KeyRange<'_>, revision: i64, mut visit: impl FnMut(KeyValue) -> bool) {
        if range.is_empty() {
            return;
        }
        for (key, versions) in self.keys.range::<[u8], _>(range.bounds()) {
            if let Some(kv) = self.at_revision(key, versions, revision)
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

    /// The current version of a live key.
    pub fn latest(&self, key: &[u8]) -> Option<&Version> {
        self.keys.get(key).map(Versions::latest).filter(|v| v.is_live())
    }

    /// Writes `key` at `revision`. Returns the keyspace's own handle of the key (allocated
    /// here for a key it never held) and the version it replaced, if that was live.
    pub fn put(&mut self, key: &[u8], value: Value, lease: i64, revision: i64) -> (Blob, Option<Version>) {
        let added = key.len() + value.len();
        // Every version keeps its value until a compaction drops it; the key is held once.
        self.retained_bytes += value.len();
        self.held_value_bytes += value.held();
        let new = |create_revision, version| Version { mod_revision: revision, create_revision, version, lease, value };
        let (handle, previous) = match self.keys.get_key_value(key) {
            Some((handle, versions)) => {
                let handle = handle.clone();
                let previous = Some(versions.latest()).filter(|v| v.is_live()).cloned();
                let version = match &previous {
                    Some(prev) => new(prev.create_revision, prev.version + 1),
                    None => new(revision, 1),
                };
                self.keys.get_mut(key).expect("found above").push(version);
                (handle, previous)
            }
            None => {
                let handle = Blob::copy_from(key);
                self.retained_bytes += key.len();
                self.keys.insert(handle.clone(), Versions::One(new(revision, 1)));
                self.grew();
                (handle, None)
            }
        };
        match &previous {
            Some(prev) => self.live_bytes = self.live_bytes + added - (key.len() + prev.value.len()),
            None => {
                self.live_keys += 1;
                self.live_bytes += added;
            }
        }
        (handle, previous)
    }

    /// Deletes `key` at `revision` if it is live, returning what it held.
    pub fn delete(&mut self, key: &[u8], revision: i64) -> Option<Version> {
        let versions = self.keys.get_mut(key)?;
        let previous = Some(versions.latest()).filter(|v| v.is_live()).cloned()?;
        versions.push(Version::tombstone(revision));
        self.live_keys -= 1;
        self.live_bytes -= key.len() + previous.value.len();
        Some(previous)
    }

    /// The key-value `key` held as of `revision`, if it was live then.
    pub fn get_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        self.at_revision(key, versions, revision)
    }

    /// What `key` was put with at exactly `revision` (see [`Versions::put_at`]), for watchers.
    pub fn put_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        versions.put_at(revision).and_then(|v| self.to_key_value(key, v))
    }

    /// The live keys of `range` now, for a delete or a range compare.
    pub fn live_in(&self, range: KeyRange<'_>) -> Vec<(Blob, Version)> {
        if range.is_empty() {
            return Vec::new();
        }
        self.keys
            .range::<[u8], _>(range.bounds())
            .filter_map(|(key, versions)| Some((key.clone(), Some(versions.latest()).filter(|v| v.is_live())?.clone())))
            .collect()
    }

    /// Forgets every version that no read at `revision` or later can see: per key, all but
    /// the newest version at or below `revision`, and that one too when it is a tombstone.
    pub fn compact(&mut self, revision: i64) {
        let (mut freed, mut freed_held) = (0, 0);
        self.keys.retain(|key, versions| {
            let (before, held_before) = (versions.value_bytes(), versions.held_bytes());
            let kept = versions.compact(revision);
            freed += if kept { before - versions.value_bytes() } else { before + key.len() };
            freed_held += if kept { held_before - versions.held_bytes() } else { held_before };
            kept
        });
        self.retained_bytes -= freed;
        self.held_value_bytes -= freed_held;
        self.rebuild_at = next_rebuild(self.keys.len());
    }

    /// Adds a key with the versions a snapshot holds (keys come in order, each once); returns
    /// the keyspace's handle of it.
    pub fn restore(&mut self, key: &[u8], versions: Versions) -> Result<Blob, &'static str> {
        if self.keys.contains_key(key) {
            return Err("restored twice");
        }
        let handle = Blob::copy_from(key);
        let latest = versions.latest();
        if latest.is_live() {
            self.live_keys += 1;
            self.live_bytes += key.len() + latest.value.len();
        }
        self.retained_bytes += key.len() + versions.value_bytes();
        self.held_value_bytes += versions.held_bytes();
        self.keys.insert(handle.clone(), versions);
        self.grew();
        Ok(handle)
    }

    /// The keyspace's own handle of `key` when it holds it, else a new one: history restored
    /// from a snapshot shares the keyspace's keys.
    pub fn handle(&self, key: &[u8]) -> Blob {
        self.keys.get_key_value(key).map_or_else(|| Blob::copy_from(key), |(handle, _)| handle.clone())
    }

    /// Every key with its versions, sharing their bytes (for a snapshot).
    pub fn entries(&self) -> Vec<(Blob, Versions)> {
        self.keys.iter().map(|(key, versions)| (key.clone(), versions.clone())).collect()
    }

    /// After a key was added: rebuilds the tree dense when it has grown enough (see
    /// [`REBUILD_FROM`]).
    fn grew(&mut self) {
        let len = self.keys.len();
        if len < self.rebuild_at {
            return;
        }
        if len >= REBUILD_FROM {
            // `append` into a non-empty map builds a new tree in one pass from the merge of
            // both (here: one entry, then the rest in order, no comparison past the first),
            // filling every node; collecting would sort the entries first.
            let mut rest = std::mem::take(&mut self.keys);
            if let Some((key, versions)) = rest.pop_first() {
                self.keys.insert(key, versions);
                self.keys.append(&mut rest);
            }
        }
        self.rebuild_at = next_rebuild(len);
    }
}

fn next_rebuild(len: usize) -> usize {
    (len + len / 4).max(REBUILD_FROM)
}

impl Keyspace {
    fn at_revision(&self, key: &Blob, versions: &Versions, revision: i64) -> Option<KeyValue> {
        versions.at(revision).and_then(|v| self.to_key_value(key, v))
    }

    fn to_key_value(&self, key: &Blob, version: &Version) -> Option<KeyValue> {
        version.is_live().then(|| self.key_value(key, version))
    }

    /// A live version as etcd's `KeyValue`, lending it the key's bytes and the value's when
    /// it is plain.
    pub fn key_value(&self, key: &Blob, version: &Version) -> KeyValue {
        KeyValue {
            key: key.to_bytes(),
            create_revision: version.create_revision,
            mod_revision: version.mod_revision,
            version: version.version,
            value: self.packer.unpack(&version.value),
            lease: version.lease,
        }
    }

    /// Packs the plain values of `group`'s keys, once its dictionary has arrived; their
    /// lengths as written, and so every count, stay the same.
    pub fn repack(&mut self, group: &[u8]) {
        let end = crate::etcd::auth::prefix_end(group);
        let range = KeyRange::new(group, &end);
        for (key, versions) in self.keys.range_mut::<[u8], _>(range.bounds()) {
            if group_of(key) != group {
                continue;
            }
            versions.for_each_mut(|version| {
                if let Some(packed) = self.packer.repack(key, &version.value) {
                    self.held_value_bytes -= version.value.held() - packed.held();
                    version.value = packed;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Value {
        Value::Plain(Blob::copy_from(s.as_bytes()))
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
        ks.put(b"a", v("1"), 0, 2);
        ks.put(b"a", v("2"), 0, 3);
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
        ks.put(b"k", v("v"), 0, 2);
        ks.put(b"k", v("v"), 0, 3);
        ks.delete(b"k", 4);
        ks.put(b"k", v("w"), 0, 5);
        let kv = ks.get_at(b"k", 5).expect("live");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
    }

    #[test]
    fn compaction_keeps_what_reads_at_or_after_it_can_see() {
        let mut ks = Keyspace::default();
        ks.put(b"gone", v("x"), 0, 2);
        ks.put(b"kept", v("old"), 0, 3);
        ks.delete(b"gone", 4);
        ks.put(b"kept", v("new"), 0, 6);
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
            ks.put(k.as_bytes(), v("v"), 0, i as i64 + 2);
        }
        let names = |r| keys_at(&ks, r, 10).into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(names(KeyRange::new(b"b/", b"b0")), ["b/1", "b/2"]);
        assert_eq!(names(KeyRange::new(b"b/2", b"\0")), ["b/2", "c"]);
        assert_eq!(names(KeyRange::new(b"c", b"")), ["c"]);
        assert!(names(KeyRange::new(b"c", b"a")).is_empty());
        assert_eq!(ks.count(KeyRange::new(b"\0", b"\0"), 10), 4);
    }

    #[test]
    fn a_keyspace_rebuilt_as_it_grows_holds_exactly_what_was_written() {
        let mut ks = Keyspace::default();
        let n = REBUILD_FROM * 3;
        for i in 0..n {
            ks.put(format!("k/{i:06}").as_bytes(), v(&i.to_string()), 0, i as i64 + 2);
        }
        ks.put(b"k/000001", v("again"), 0, n as i64 + 2);
        assert!(ks.rebuild_at > n, "rebuilt at least once on the way");
        let all = keys_at(&ks, KeyRange::new(b"k/", b"k0"), i64::MAX);
        assert_eq!(all.len(), n);
        assert!(all.iter().enumerate().all(|(i, (k, val))| *k == format!("k/{i:06}")
            && *val == if i == 1 { "again".to_owned() } else { i.to_string() }));
        let kv = ks.get_at(b"k/000001", n as i64 + 2).expect("live");
        assert_eq!((kv.create_revision, kv.version), (3, 2), "versions survive the rebuilds");
    }
}
