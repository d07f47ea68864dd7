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
    groups: HashMap<StoreKey, Group>,
}

struct Group {
    primary: ObjectKey,
    pending: Vec<ObjectKey>,
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
            let group =
                self.groups.entry(key.clone()).or_insert_with(|| Group { primary: owner.clone(), pending: Vec::new() });
            if group.primary == *owner {
                tx.put(key.clone(), value.clone());
            } else if !group.pending.contains(owner) {
                group.pending.push(owner.clone());
            }
        }
        let still_claimed = Keys::of(new);

        for (key, _) in old.iter().filter(|(key, _)| !still_claimed.contains(key)) {
            let Some(group) = self.groups.get_mut(key) else { continue };
            if group.primary != *owner {
                group.pending.retain(|o| o != owner);
                continue;
            }
            // Promote the oldest pending claimant that still holds an entry for the key.
            let mut promoted = None;
            while !group.pending.is_empty() {
                let next = group.pending.remove(0);
                if let Some(value) = claimed(&next, key) {
                    promoted = Some((next, value));
                    break;
                }
            }
            match promoted {
                Some((next, value)) => {
                    group.primary = next;
                    tx.put(key.clone(), value);
                }
                None => {
                    self.groups.remove(key);
                    tx.delete(key);
                }
            }
        }
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
    }

    #[test]
    fn an_owner_updating_its_value_rewrites_it_and_dropping_one_ip_keeps_the_others() {
        let mut o = Claims::default();
        claim(&mut o, "a", &[("ip1", "x"), ("ip2", "x")]);
        assert_eq!(claim(&mut o, "a", &[("ip1", "y")]), writes(&[("ip1", Some("y")), ("ip2", None)]));
    }
}
