//! The lease table: TTLs, deadlines, and the keys attached to each lease.
//!
//! Attaching or detaching a key is a hash-set insert or remove, so a put with a lease costs
//! the same whether the lease holds ten keys or a hundred thousand (etcd's cost grows with
//! them, which is why Cilium caps its leases at 1,000 keys).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::blob::Blob;
use crate::etcd::error::{Error, Result};

/// A lease's keys. Hashed with foldhash: keys are written by authenticated clients, and a
/// put with a lease hashes its key once or twice.
pub type LeaseKeys = HashSet<Blob, foldhash::fast::RandomState>;

/// etcd's limit (`lease.MaxLeaseTTL`, about 285 years).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd raises shorter TTLs to this: 3/2 of the default 1 s election timeout, rounded up.
/// Keeping it means `lease grant 1` answers `TTL(2s)` here as it does against etcd.
pub const MIN_LEASE_TTL: i64 = 2;

#[derive(Debug)]
pub struct Lease {
    pub id: i64,
    /// The TTL as granted (after raising to the minimum), in seconds.
    pub ttl: i64,
    pub deadline: Instant,
    pub keys: LeaseKeys,
    /// Who granted it: the client certificate's Common Name ("" without one).
    owner: Arc<str>,
}

impl Lease {
    /// Whole seconds left, as etcd reports them (truncated, never negative).
    pub fn remaining(&self, now: Instant) -> i64 {
        self.deadline.saturating_duration_since(now).as_secs() as i64
    }
}

#[derive(Debug, Default)]
pub struct Leases {
    leases: HashMap<i64, Lease>,
    /// One entry per lease granted, at a deadline no later than the lease's: a renewal only
    /// moves the lease's own deadline, and an entry found early when popped is pushed back at
    /// the lease's current deadline. A keep-alive stream therefore costs no memory, whatever
    /// its rate. Entries of revoked leases are dropped when popped, or all at once when they
    /// outnumber the live leases.
    expiries: BinaryHeap<Reverse<(Instant, i64)>>,
    /// Live leases per owner, for the per-user cap.
    owned: HashMap<Arc<str>, usize>,
    /// Grants the cap refused, for the metrics.
    refused: u64,
}

impl Leases {
    /// Grants a lease to `owner`, who may hold at most `max_per_owner` at once: without a cap,
    /// a read-only user could grant leases until memory runs out (etcd does not stop it).
    pub fn grant(&mut self, id: i64, ttl: i64, now: Instant, owner: &str, max_per_owner: usize) -> Result<&Lease> {
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        let id = if id == 0 { self.fresh_id() } else { id };
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        let owner: Arc<str> = match self.owned.get_key_value(owner) {
            Some((_, &held)) if held >= max_per_owner => {
                self.refused += 1;
                return Err(Error::TooManyLeases);
            }
            Some((owner, _)) => Arc::clone(owner),
            None => Arc::from(owner),
        };
        *self.owned.entry(Arc::clone(&owner)).or_default() += 1;
        let ttl = ttl.max(MIN_LEASE_TTL);
        let deadline = now + Duration::from_secs(ttl as u64);
        self.expiries.push(Reverse((deadline, id)));
        Ok(self.leases.entry(id).or_insert(Lease { id, ttl, deadline, keys: LeaseKeys::default(), owner }))
    }

    /// Positive, random and unused: clients print lease IDs in hex and some treat negative
    /// ones as invalid.
    fn fresh_id(&self) -> i64 {
        loop {
            let id = (rand::random::<u64>() >> 1) as i64;
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.leases.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Every lease as (ID, granted TTL, owner), for a snapshot.
    pub fn export(&self) -> Vec<(i64, i64, Arc<str>)> {
        self.leases.values().map(|l| (l.id, l.ttl, Arc::clone(&l.owner))).collect()
    }

    /// Grants refused by the per-owner cap so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Pushes the deadline a full TTL away; returns the TTL.
    pub fn renew(&mut self, id: i64, now: Instant) -> Result<i64> {
        let lease = self.leases.get_mut(&id).ok_or(Error::LeaseNotFound)?;
        lease.deadline = now + Duration::from_secs(lease.ttl as u64);
        Ok(lease.ttl)
    }

    /// Removes the lease; the caller deletes the keys it returns.
    pub fn remove(&mut self, id: i64) -> Result<Lease> {
        let lease = self.leases.remove(&id).ok_or(Error::LeaseNotFound)?;
        if let Some(held) = self.owned.get_mut(&lease.owner) {
            *held -= 1;
            if *held == 0 {
                self.owned.remove(&lease.owner);
            }
        }
        // Grant-and-revoke churn must not grow the heap past a multiple of the live leases.
        if self.expiries.len() > 2 * self.leases.len() + 64 {
            self.expiries = self.leases.values().map(|l| Reverse((l.deadline, l.id))).collect();
        }
        Ok(lease)
    }

    /// Entries in the expiry heap.
    #[cfg(test)]
    fn heap_len(&self) -> usize {
        self.expiries.len()
    }

    pub fn attach(&mut self, id: i64, key: &Blob) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.insert(key.clone());
        }
    }

    pub fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    /// The leases whose deadline has passed, oldest first.
    pub fn expired(&mut self, now: Instant) -> Vec<i64> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, id))) = self.expiries.peek().copied() {
            if deadline > now {
                break;
            }
            self.expiries.pop();
            match self.leases.get(&id) {
                Some(lease) if lease.deadline <= now => out.push(id),
                // Renewed since: back in at its current deadline.
                Some(lease) => self.expiries.push(Reverse((lease.deadline, id))),
                None => {}
            }
        }
        out
    }

    /// When the next lease may expire, for the expiry task's sleep.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiries.peek().map(|Reverse((deadline, _))| *deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ttls_are_raised_to_etcds_minimum() {
        let mut leases = Leases::default();
        let lease = leases.grant(7, 1, Instant::now(), "", usize::MAX).expect("granted");
        assert_eq!((lease.id, lease.ttl), (7, MIN_LEASE_TTL));
    }

    #[test]
    fn granting_an_existing_id_is_refused() {
        let mut leases = Leases::default();
        let now = Instant::now();
        leases.grant(7, 10, now, "", usize::MAX).expect("granted");
        assert_eq!(leases.grant(7, 10, now, "", usize::MAX).err(), Some(Error::LeaseExists));
    }

    #[test]
    fn a_renewed_lease_does_not_expire_at_its_old_deadline() {
        let mut leases = Leases::default();
        let start = Instant::now();
        leases.grant(1, 10, start, "", usize::MAX).expect("granted");
        leases.grant(2, 10, start, "", usize::MAX).expect("granted");
        leases.renew(1, start + Duration::from_secs(5)).expect("renewed");
        assert_eq!(leases.expired(start + Duration::from_secs(11)), vec![2]);
        assert_eq!(leases.expired(start + Duration::from_secs(16)), vec![1]);
    }

    #[test]
    fn keep_alives_and_grant_revoke_churn_do_not_grow_the_expiry_heap() {
        let mut leases = Leases::default();
        let start = Instant::now();
        leases.grant(1, MAX_LEASE_TTL, start, "", usize::MAX).expect("granted");
        for i in 0..100_000u64 {
            leases.renew(1, start + Duration::from_millis(i)).expect("renewed");
        }
        assert_eq!(leases.heap_len(), 1);
        for id in 2..10_000 {
            leases.grant(id, MAX_LEASE_TTL, start, "", usize::MAX).expect("granted");
            leases.remove(id).expect("revoked");
        }
        assert!(leases.heap_len() <= 2 * leases.len() + 65, "{}", leases.heap_len());
        assert_eq!(leases.expired(start + Duration::from_secs(MAX_LEASE_TTL as u64 + 200)), vec![1]);
    }

    #[test]
    fn each_owner_holds_at_most_its_cap_and_a_revoked_lease_frees_a_place() {
        let mut leases = Leases::default();
        let now = Instant::now();
        leases.grant(1, 10, now, "remote", 2).expect("first");
        leases.grant(2, 10, now, "remote", 2).expect("second");
        assert_eq!(leases.grant(3, 10, now, "remote", 2).err(), Some(Error::TooManyLeases));
        leases.grant(3, 10, now, "admin-cluster1", 2).expect("another owner has places of its own");
        leases.remove(1).expect("revoked");
        leases.grant(4, 10, now, "remote", 2).expect("a place freed by the revoke");
        assert_eq!(leases.owned.get("remote"), Some(&2));
    }
}
