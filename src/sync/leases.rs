//! Which lease each written key is attached to, at most [`MAX_KEYS_PER_LEASE`] keys a lease.
//!
//! etcd's cost of a Put with a lease grows with the keys already on that lease (etcd issue
//! 15993), so Cilium's lease manager (`pkg/kvstore/etcd_lease.go`) moves on to a new lease
//! after 1,000 keys. The cap also bounds what a lost lease takes with it: only its keys are
//! gone, and only they are written again.
//!
//! The embedded store runs the same bookkeeping: its attach cost does not grow with the
//! lease, so the cap buys it nothing but costs it only one lease per 1,000 keys, and one
//! path for both modes means lease loss behaves — and is tested — the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::HashMap;

/// Cilium's `etcdMaxKeysPerLease`.
pub const MAX_KEYS_PER_LEASE: usize = 1000;

#[derive(Debug)]
pub struct Leases {
    limit: usize,
    /// Lease → keys attached to it. Ordered, so the lease chosen for a new key is stable.
    counts: BTreeMap<i64, usize>,
    /// The key handles are the sync store's own: no key's bytes are held here.
    by_key: HashMap<Arc<str>, i64>,
    /// Where new keys go while it has room (the most recently granted lease).
    current: Option<i64>,
}

impl Leases {
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), counts: BTreeMap::new(), by_key: HashMap::default(), current: None }
    }

    /// The lease `key` is to be written with: the one it is already on, else one with room
    /// (the current lease first, then one that deletions freed up). `None`: every lease is
    /// full, so the caller grants a new one and hands it to [`Leases::add`].
    pub fn assign(&mut self, key: &Arc<str>) -> Option<i64> {
        if let Some(lease) = self.by_key.get(key) {
            return Some(*lease);
        }
        let has_room = |lease: &i64, counts: &BTreeMap<i64, usize>| counts.get(lease).is_some_and(|n| *n < self.limit);
        let lease = match self.current {
            Some(current) if has_room(&current, &self.counts) => current,
            _ => *self.counts.iter().find(|(_, n)| **n < self.limit)?.0,
        };
        self.current = Some(lease);
        *self.counts.entry(lease).or_default() += 1;
        self.by_key.insert(Arc::clone(key), lease);
        Some(lease)
    }

    /// A newly granted lease, which new keys go to from now on.
    pub fn add(&mut self, lease: i64) {
        self.counts.entry(lease).or_default();
        self.current = Some(lease);
    }

    /// `key` was found in the store on `lease` (written by a previous run): it stays there,
    /// and the lease is kept alive and takes new keys while it has room.
    pub fn adopt(&mut self, key: Arc<str>, lease: i64) {
        self.release(&key);
        *self.counts.entry(lease).or_default() += 1;
        self.by_key.insert(key, lease);
    }

    /// `key` was deleted: its place on its lease is free again.
    pub fn release(&mut self, key: &str) {
        if let Some(lease) = self.by_key.remove(key)
            && let Some(count) = self.counts.get_mut(&lease)
        {
            *count = count.saturating_sub(1);
        }
    }

    /// The lease is gone: forgets it and returns the keys that went with it.
    pub fn lost(&mut self, lease: i64) -> Vec<Arc<str>> {
        self.counts.remove(&lease);
        if self.current == Some(lease) {
            self.current = None;
        }
        let mut keys: Vec<Arc<str>> =
            self.by_key.iter().filter(|(_, l)| **l == lease).map(|(k, _)| Arc::clone(k)).collect();
        // In key order, so the rewrite is the same on every run.
        keys.sort_unstable();
        for key in &keys {
            self.by_key.remove(key);
        }
        keys
    }

    /// Whether `key` is still attached to `lease` (false once that lease was lost).
    pub fn holds(&self, key: &str, lease: i64) -> bool {
        self.by_key.get(key) == Some(&lease)
    }

    /// Every lease held, for keep-alives.
    pub fn ids(&self) -> Vec<i64> {
        self.counts.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_lease_sends_new_keys_to_a_new_one_and_a_key_keeps_its_lease() {
        let mut leases = Leases::new(2);
        assert_eq!(leases.assign(&"a".into()), None, "no lease yet");
        leases.add(1);
        assert_eq!(leases.assign(&"a".into()), Some(1));
        assert_eq!(leases.assign(&"b".into()), Some(1));
        assert_eq!(leases.assign(&"a".into()), Some(1), "rewriting a key does not count twice");
        assert_eq!(leases.assign(&"c".into()), None, "lease 1 is full");
        leases.add(2);
        assert_eq!(leases.assign(&"c".into()), Some(2));
        assert_eq!(leases.ids(), [1, 2]);
    }

    #[test]
    fn deleted_keys_free_room_and_a_lost_lease_returns_only_its_keys() {
        let mut leases = Leases::new(2);
        leases.add(1);
        leases.assign(&"a".into());
        leases.assign(&"b".into());
        leases.add(2);
        leases.assign(&"c".into());
        leases.assign(&"d".into());
        leases.release("a");
        assert_eq!(leases.assign(&"e".into()), Some(1), "the room a deletion left is reused");
        assert_eq!(leases.lost(2), [Arc::from("c"), Arc::from("d")]);
        assert_eq!(leases.ids(), [1]);
        assert_eq!(leases.assign(&"c".into()), None, "lease 1 is full again; c needs a new lease");
    }
}
