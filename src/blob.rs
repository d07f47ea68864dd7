//! Immutable byte strings shared by reference count: the store's keys and values, and the
//! values the mirror translates, which the embedded store keeps without copying them (one
//! allocation per value for the translation model, the sync store and the store).
//!
//! A key is held three times (by the keyspace, by the history for as long as its changes
//! are kept, and by its lease), a value by every version that wrote it. `Bytes` costs 32
//! bytes per handle and, once shared, a separate 24-byte header allocation; a [`Blob`] is one
//! pointer to a single allocation holding the count, the length and the bytes. With 300k
//! Cilium-shaped keys on leases (`examples/store_memory`), the store's cost over the raw keys
//! and values went from 347 to 192 bytes per key (RSS growth 181 → 137 MiB).
//!
//! Responses still carry `Bytes` (the protobuf types are generated with them):
//! [`Blob::to_bytes`] lends the same allocation to one without copying it.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use bytes::Bytes;
use triomphe::ThinArc;

#[derive(Clone)]
pub struct Blob(ThinArc<(), u8>);

/// Every empty value and tombstone shares one allocation.
static EMPTY: LazyLock<Blob> = LazyLock::new(|| Blob(ThinArc::from_header_and_slice((), &[])));

impl Blob {
    /// An exact-size copy: slices of a request's receive buffer must not be kept, or the whole
    /// buffer would live as long as the key.
    pub fn copy_from(bytes: &[u8]) -> Self {
        if bytes.is_empty() {
            return Self::empty();
        }
        Self(ThinArc::from_header_and_slice((), bytes))
    }

    pub fn empty() -> Self {
        EMPTY.clone()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0.slice
    }

    /// The same bytes as a `Bytes`, sharing this allocation.
    pub fn to_bytes(&self) -> Bytes {
        if self.as_slice().is_empty() {
            return Bytes::new();
        }
        Bytes::from_owner(self.clone())
    }
}

/// Exact-size copies, for values built in a growable buffer.
impl From<String> for Blob {
    fn from(value: String) -> Self {
        Self::copy_from(value.as_bytes())
    }
}

impl From<Vec<u8>> for Blob {
    fn from(value: Vec<u8>) -> Self {
        Self::copy_from(&value)
    }
}

impl From<&str> for Blob {
    fn from(value: &str) -> Self {
        Self::copy_from(value.as_bytes())
    }
}

impl From<&[u8]> for Blob {
    fn from(value: &[u8]) -> Self {
        Self::copy_from(value)
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

// Equality, order and hash are the bytes', so that maps keyed by `Blob` can be searched
// with a `&[u8]` (`Borrow` requires exactly this agreement).
impl Borrow<[u8]> for Blob {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Blob {}

// Against other byte strings, as `Bytes` compares (assertions read values as text).
impl PartialEq<[u8]> for Blob {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<str> for Blob {
    fn eq(&self, other: &str) -> bool {
        self.as_slice() == other.as_bytes()
    }
}

impl PartialEq<&str> for Blob {
    fn eq(&self, other: &&str) -> bool {
        self.as_slice() == other.as_bytes()
    }
}

impl PartialEq<String> for Blob {
    fn eq(&self, other: &String) -> bool {
        self.as_slice() == other.as_bytes()
    }
}

impl PartialOrd for Blob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Blob {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl Hash for Blob {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", Bytes::copy_from_slice(self.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_one_pointer_and_an_optional_blob_costs_nothing_more() {
        assert_eq!(std::mem::size_of::<Blob>(), 8);
        assert_eq!(std::mem::size_of::<Option<Blob>>(), 8);
    }

    #[test]
    fn blobs_compare_and_hash_as_their_bytes() {
        use std::collections::{BTreeMap, HashSet};
        let mut map = BTreeMap::new();
        map.insert(Blob::copy_from(b"b"), 2);
        map.insert(Blob::copy_from(b"a"), 1);
        assert_eq!(map.get(&b"a"[..]), Some(&1));
        assert_eq!(map.keys().map(|k| k.as_slice().to_vec()).collect::<Vec<_>>(), [b"a".to_vec(), b"b".to_vec()]);
        let set: HashSet<Blob> = [Blob::copy_from(b"k")].into();
        assert!(set.contains(&b"k"[..]));
    }

    #[test]
    fn bytes_lent_to_a_response_outlive_the_blob() {
        let blob = Blob::copy_from(b"value");
        let bytes = blob.to_bytes();
        drop(blob);
        assert_eq!(&bytes[..], b"value");
        assert!(Blob::copy_from(b"").to_bytes().is_empty());
    }
}
