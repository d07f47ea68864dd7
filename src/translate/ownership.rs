//! Cilium's first-owner rule for ipcache keys claimed by several endpoints.
//!
//! An IP can be listed by two endpoints at once (a pod being replaced, a stale endpoint). The first
//! claimant stays authoritative; later claimants queue up in arrival order, and when the owner
//! lets the IP go the next claimant's entry is written (Cilium `CachedConverter`/`entryGroup`).

use std::collections::BTreeMap;

use crate::blob::Blob;
// foldhash, not SipHash: every ipcache key is looked up here on every endpoint update.
use foldhash::HashMap;

use super::model::{ObjectKey, Tx};
use super::{Entry, StoreKey};

#[derive(Default)]
pub(crate) struct Ownership {
    /// Every claimant's current entries, primary or pending, sorted by key. A vector, not a
    /// map: nearly every endpoint claims one or two IPs, and a B-tree spends a whole ~600-byte
    /// node on one entry (160 MiB over 250k CiliumEndpoints).
    claims: BTreeMap<ObjectKey, Vec<Entry>>,
    groups: HashMap<StoreKey, Group>,
}

struct Group {
    primary: ObjectKey,
    pending: Vec<ObjectKey>,
}

impl Ownership {
    /// Replaces everything `owner` claims with `entries` (none: the owner is gone or no longer
    /// exported) and records the resulting store writes in `tx`.
    ///
    /// New claims are processed before released ones, as in Cilium, so an owner that moves an IP
    /// within one update keeps ownership of the IPs it still lists.
    pub(crate) fn set(&mut self, owner: &ObjectKey, entries: Vec<Entry>, tx: &mut Tx) {
        let old = self.claims.remove(owner).unwrap_or_default();
        for (key, value) in &entries {
            let group =
                self.groups.entry(key.clone()).or_insert_with(|| Group { primary: owner.clone(), pending: Vec::new() });
            if group.primary == *owner {
                tx.put(key.clone(), value.clone());
            } else if !group.pending.contains(owner) {
                group.pending.push(owner.clone());
            }
        }
        let current = by_key_last_wins(entries);

        for (key, _) in old.iter().filter(|(key, _)| lookup(&current, key).is_none()) {
            let Some(group) = self.groups.get_mut(key) else { continue };
            if group.primary != *owner {
                group.pending.retain(|o| o != owner);
                continue;
            }
            // Promote the oldest pending claimant that still holds an entry for the key.
            let mut promoted = None;
            while !group.pending.is_empty() {
                let next = group.pending.remove(0);
                if let Some(value) = self.claims.get(&next).and_then(|c| lookup(c, key)) {
                    promoted = Some((next, value.clone()));
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

        if !current.is_empty() {
            self.claims.insert(owner.clone(), current);
        }
    }
}

/// `entries` sorted by key, one per key: the last listed, as sequential upserts would leave it.
fn by_key_last_wins(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.reverse();
    // Stable: among equal keys the last listed stays first, and `dedup_by` keeps the first.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|later, kept| later.0 == kept.0);
    entries.shrink_to_fit();
    entries
}

fn lookup<'a>(entries: &'a [Entry], key: &str) -> Option<&'a Blob> {
    entries.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &entries[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::model::Kind;

    fn owner(name: &str) -> ObjectKey {
        ObjectKey { kind: Kind::CiliumEndpoint, namespace: Some("ns".into()), name: name.into() }
    }

    fn claim(ownership: &mut Ownership, who: &str, keys: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
        let mut tx = Tx::default();
        let entries = keys.iter().map(|(k, v)| (StoreKey::from(*k), Blob::from(*v))).collect();
        ownership.set(&owner(who), entries, &mut tx);
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
        let mut o = Ownership::default();
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
        let mut o = Ownership::default();
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
        let mut o = Ownership::default();
        claim(&mut o, "a", &[("ip1", "x"), ("ip2", "x")]);
        assert_eq!(claim(&mut o, "a", &[("ip1", "y")]), writes(&[("ip1", Some("y")), ("ip2", None)]));
    }
}
