//! One key's versions since the last compaction, stored so that the common case costs no
//! allocation of its own.
//!
//! Almost every key holds exactly one version: every key of a load that never updates, and
//! every key after a compaction. A `Vec` per key cost a 4-slot heap block (4 × 64 bytes plus
//! the allocator's header) on the first push; inline storage of the single version saves it
//! (about 250 of the 1,000 bytes per key saved with the history's change, see `history.rs`).

use super::packing::Value;

/// One version of a key: what it held from `mod_revision` until the next version.
///
/// `version == 0` is a tombstone (the key was deleted at `mod_revision`): etcd's live
/// versions start at 1, and this saves the 8-byte tag an `Option` would add to every version.
#[derive(Debug, Clone)]
pub struct Version {
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Value,
}

impl Version {
    pub fn tombstone(mod_revision: i64) -> Self {
        Self { mod_revision, create_revision: 0, version: 0, lease: 0, value: Value::empty() }
    }

    pub fn is_live(&self) -> bool {
        self.version != 0
    }
}

/// A key's versions in increasing `mod_revision` order; never empty.
#[derive(Debug, Clone)]
pub enum Versions {
    One(Version),
    Many(Vec<Version>),
}

impl Versions {
    pub fn latest(&self) -> &Version {
        match self {
            Versions::One(v) => v,
            // `Many` is never empty: it is only made from two versions and shrinks back to
            // `One` when compaction leaves one.
            Versions::Many(vs) => &vs[vs.len() - 1],
        }
    }

    /// The version a read at `revision` sees, if the key existed then (live or tombstone).
    pub fn at(&self, revision: i64) -> Option<&Version> {
        match self {
            Versions::One(v) => (v.mod_revision <= revision).then_some(v),
            Versions::Many(vs) => match vs.last() {
                Some(last) if last.mod_revision <= revision => Some(last),
                _ => {
                    let visible = vs.partition_point(|v| v.mod_revision <= revision);
                    visible.checked_sub(1).map(|i| &vs[i])
                }
            },
        }
    }

    /// The live version written at exactly `revision`. A key put and deleted in one txn holds
    /// both at that revision: a read at it sees the tombstone, a watcher is owed the put.
    pub fn put_at(&self, revision: i64) -> Option<&Version> {
        match self {
            Versions::One(v) => (v.mod_revision == revision && v.is_live()).then_some(v),
            Versions::Many(vs) => {
                let end = vs.partition_point(|v| v.mod_revision <= revision);
                vs[..end].iter().rev().take_while(|v| v.mod_revision == revision).find(|v| v.is_live())
            }
        }
    }

    /// Appends a newer version.
    pub fn push(&mut self, version: Version) {
        match self {
            Versions::One(_) => {
                let Versions::One(first) = std::mem::replace(self, Versions::Many(Vec::with_capacity(2))) else {
                    unreachable!("matched One above")
                };
                if let Versions::Many(vs) = self {
                    vs.push(first);
                    vs.push(version);
                }
            }
            Versions::Many(vs) => vs.push(version),
        }
    }

    /// Forgets what no read at `revision` or later can see: all but the newest version at or
    /// below `revision`, and that one too when it is a tombstone. Returns false when nothing
    /// is left (the key can be forgotten).
    pub fn compact(&mut self, revision: i64) -> bool {
        match self {
            Versions::One(v) => v.mod_revision > revision || v.is_live(),
            Versions::Many(vs) => {
                let visible = vs.partition_point(|v| v.mod_revision <= revision);
                if visible > 0 {
                    let keep_from = if vs[visible - 1].is_live() { visible - 1 } else { visible };
                    vs.drain(..keep_from);
                }
                match vs.len() {
                    0 => false,
                    1 => {
                        let only = vs.pop().expect("one version");
                        *self = Versions::One(only);
                        true
                    }
                    _ => {
                        vs.shrink_to_fit();
                        true
                    }
                }
            }
        }
    }

    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut Version)) {
        match self {
            Versions::One(v) => f(v),
            Versions::Many(vs) => vs.iter_mut().for_each(f),
        }
    }

    /// Bytes of the values of every version held, as written (a tombstone holds none).
    pub fn value_bytes(&self) -> usize {
        match self {
            Versions::One(v) => v.value.len(),
            Versions::Many(vs) => vs.iter().map(|v| v.value.len()).sum(),
        }
    }

    /// Bytes the values of every version take as held (see [`Value::held`]).
    pub fn held_bytes(&self) -> usize {
        match self {
            Versions::One(v) => v.value.held(),
            Versions::Many(vs) => vs.iter().map(|v| v.value.held()).sum(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self {
            Versions::One(_) => 1,
            Versions::Many(vs) => vs.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::Blob;

    fn live(mod_revision: i64, version: i64) -> Version {
        Version { mod_revision, create_revision: 2, version, lease: 0, value: Value::Plain(Blob::copy_from(b"v")) }
    }

    #[test]
    fn reads_see_the_newest_version_at_or_below_their_revision() {
        let mut vs = Versions::One(live(2, 1));
        assert!(vs.at(1).is_none());
        vs.push(live(4, 2));
        vs.push(Version::tombstone(6));
        assert_eq!(vs.at(3).map(|v| v.version), Some(1));
        assert_eq!(vs.at(5).map(|v| v.version), Some(2));
        assert!(!vs.at(9).expect("tombstone").is_live());
        assert!(!vs.latest().is_live());
    }

    #[test]
    fn compaction_keeps_what_later_reads_see_and_returns_to_inline_storage() {
        let mut vs = Versions::One(live(2, 1));
        vs.push(live(4, 2));
        vs.push(live(6, 3));
        assert!(vs.compact(4));
        assert_eq!(vs.len(), 2, "the version read at 4 and the newer one stay");
        assert!(vs.compact(6));
        assert!(matches!(vs, Versions::One(ref v) if v.mod_revision == 6));
        assert!(vs.compact(100), "a live single version is kept");
    }

    #[test]
    fn a_compacted_tombstone_forgets_the_key() {
        let mut vs = Versions::One(live(2, 1));
        vs.push(Version::tombstone(3));
        assert!(vs.compact(2), "the tombstone is above the compaction");
        assert!(!vs.compact(3));
        let mut lone = Versions::One(Version::tombstone(5));
        assert!(lone.compact(4));
        assert!(!lone.compact(5));
    }
}
