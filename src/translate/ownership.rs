//! Cilium's first-owner rule for ipcache keys claimed by several endpoints.
//!
//! An IP can be listed by two endpoints at once (a pod being replaced, a stale endpoint). The first
//! claimant stays authoritative; later claimants queue up in arrival order, and when the owner
//! lets the IP go the next claimant's entry is written (Cilium `CachedConverter`/`entryGroup`).

// foldhash, not SipHash: every ipcache key is looked up here on every endpoint update.
use foldhash::{HashMap, HashSet};

use super::model::{ObjectKey, Tx};
use super::{Entry, StoreKey};
use crate::blob::Blob;

/// Who owns each claimed ipcache key, and who waits for it. The claims themselves are the
/// model's (each endpoint's own entries, while its namespace is global): holding them here too
/// cost a copy of every endpoint's entries.
#[derive(Default)]
pub(crate) struct Ownership {
    primaries: HashMap<StoreKey, ObjectKey>,
    /// The claimants waiting for a key, in arrival order. An IP is rarely claimed twice, so
    /// they live apart from the owners: an empty list beside each owner was a third of the
    /// owners' table.
    pending: HashMap<StoreKey, Vec<ObjectKey>>,
}

impl Ownership {
    /// `owner` now claims `new` (none: the owner is gone or no longer exported) instead of
    /// `old`, each one entry per key; records the resulting store writes in `tx`. `claimed`
    /// reads another claimant's current value for a key, for a promotion.
    ///
    /// New claims are processed before released ones, as in Cilium, so an owner that moves an IP
    /// within one update keeps ownership of the IPs it still lists.
    pub(crate) fn set(
        &mut self,
        owner: &ObjectKey,
        old: &[Entry],
        new: &[Entry],
        claimed: impl Fn(&ObjectKey, &str) -> Option<Blob>,
        tx: &mut Tx,
    ) {
        for (key, value) in new {
            let primary = self.primaries.entry(key.clone()).or_insert_with(|| owner.clone());
            if primary == owner {
                tx.put(key.clone(), value.clone());
            } else {
                let waiting = self.pending.entry(key.clone()).or_default();
                if !waiting.contains(owner) {
                    waiting.push(owner.clone());
                }
            }
        }
        let still_claimed = Keys::of(new);

        for (key, _) in old.iter().filter(|(key, _)| !still_claimed.contains(key)) {
            match self.primaries.get(key) {
                None => continue,
                Some(primary) if primary != owner => {
                    if let Some(waiting) = self.pending.get_mut(key) {
                        waiting.retain(|o| o != owner);
                        if waiting.is_empty() {
                            self.pending.remove(key);
                        }
                    }
                    continue;
                }
                Some(_) => {}
            }
            match self.promote(key, &claimed) {
                Some((next, value)) => {
                    self.primaries.insert(key.clone(), next);
                    tx.put(key.clone(), value);
                }
                None => {
                    self.primaries.remove(key);
                    tx.delete(key);
                }
            }
        }
    }

    /// Takes the oldest claimant waiting for `key` that still holds an entry for it.
    fn promote(&mut self, key: &str, claimed: &impl Fn(&ObjectKey, &str) -> Option<Blob>) -> Option<(ObjectKey, Blob)> {
        let waiting = self.pending.get_mut(key)?;
        let mut promoted = None;
        while !waiting.is_empty() {
            let next = waiting.remove(0);
            if let Some(value) = claimed(&next, key) {
                promoted = Some((next, value));
                break;
            }
        }
        if waiting.is_empty() {
            self.pending.remove(key);
        }
        promoted
    }
}

/// The keys of one claim, searched once per released key: a scan for the one or two IPs of
/// an endpoint, a set for a CiliumEndpointSlice's hundred.
enum Keys<'a> {
    Few(&'a [Entry]),
    Many(HashSet<&'a str>),
}

impl<'a> Keys<'a> {
    fn of(entries: &'a [Entry]) -> Self {
        if entries.len() <= 8 { Keys::Few(entries) } else { Keys::Many(entries.iter().map(|(k, _)| &**k).collect()) }
    }

    fn contains(&self, key: &str) -> bool {
        match self {
            Keys::Few(entries) => entries.iter().any(|(k, _)| &**k == key),
            Keys::Many(keys) => keys.contains(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translate::model::Kind;

    /// Ownership with the claims kept beside it, as the model keeps them.
    #[derive(Default)]
    struct Claims {
        ownership: Ownership,
        claims: BTreeMap<ObjectKey, Vec<Entry>>,
    }

    fn owner(name: &str) -> ObjectKey {
        ObjectKey { kind: Kind::CiliumEndpoint, namespace: Some("ns".into()), name: name.into() }
    }

    fn claim(o: &mut Claims, who: &str, keys: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
        let mut tx = Tx::default();
        let new: Vec<Entry> = keys.iter().map(|(k, v)| (StoreKey::from(*k), Blob::from(*v))).collect();
        let owner = owner(who);
        let old = o.claims.insert(owner.clone(), new.clone()).unwrap_or_default();
        let claims = &o.claims;
        let claimed = |owner: &ObjectKey, key: &str| {
            claims.get(owner)?.iter().find(|(k, _)| &**k == key).map(|(_, value)| value.clone())
        };
        o.ownership.set(&owner, &old, &new, claimed, &mut tx);
        tx.into_writes()
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| String::from_utf8(v.to_vec()).expect("utf-8"))))
            .collect()
    }

    fn writes(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(String::from))).collect()
    }

    #[test]
    fn an_ip_shared_by_two_endpoints_belongs_to_the_first_until_it_goes_away() {
        let mut o = Claims::default();
        assert_eq!(claim(&mut o, "a", &[("ip1", "a1")]), writes(&[("ip1", Some("a1"))]));
        assert_eq!(claim(&mut o, "b", &[("ip1", "b1")]), writes(&[]));
        assert_eq!(claim(&mut o, "b", &[("ip1", "b2")]), writes(&[]), "a pending claimant's update writes nothing");
        assert_eq!(claim(&mut o, "a", &[]), writes(&[("ip1", Some("b2"))]), "the next claimant takes over");
        assert_eq!(claim(&mut o, "a", &[("ip1", "a3")]), writes(&[]), "the returning endpoint queues behind");
        assert_eq!(claim(&mut o, "b", &[]), writes(&[("ip1", Some("a3"))]));
        assert_eq!(claim(&mut o, "a", &[]), writes(&[("ip1", None)]));
    }

    #[test]
    fn pending_claimants_are_promoted_in_arrival_order_and_leavers_lose_their_place() {
        let mut o = Claims::default();
        claim(&mut o, "a", &[("ip", "a")]);
        claim(&mut o, "b", &[("ip", "b")]);
        claim(&mut o, "c", &[("ip", "c")]);
        claim(&mut o, "d", &[("ip", "d")]);
        assert_eq!(claim(&mut o, "b", &[]), writes(&[]));
        assert_eq!(claim(&mut o, "a", &[]), writes(&[("ip", Some("c"))]));
        assert_eq!(claim(&mut o, "c", &[]), writes(&[("ip", Some("d"))]));
        assert!(o.ownership.pending.is_empty(), "nobody waits any more: {:?}", o.ownership.pending);
        assert_eq!(claim(&mut o, "d", &[]), writes(&[("ip", None)]));
        assert!(o.ownership.primaries.is_empty());
    }

    #[test]
    fn an_owner_updating_its_value_rewrites_it_and_dropping_one_ip_keeps_the_others() {
        let mut o = Claims::default();
        claim(&mut o, "a", &[("ip1", "x"), ("ip2", "x")]);
        assert_eq!(claim(&mut o, "a", &[("ip1", "y")]), writes(&[("ip1", Some("y")), ("ip2", None)]));
    }
}
