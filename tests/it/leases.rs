//! Keys on an attached etcd share leases 1,000 at a time (etcd's Put slows down with the
//! keys on a lease), and a lost lease costs a rewrite of its own keys, no others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::blob::Blob;
use clustermesh_apiserver::kvstore::etcd::Etcd;
use clustermesh_apiserver::sync::leases::MAX_KEYS_PER_LEASE;
use clustermesh_apiserver::sync::store::{ETCD_MAX_IN_FLIGHT, SyncOptions, SyncStore};
use etcd_client::{Client, GetOptions};
use tokio_util::sync::CancellationToken;

use crate::support::{EtcdProcess, Pki, eventually};

const PREFIX: &str = "cilium/state/ip/v1/default/";
const KEYS: usize = 2 * MAX_KEYS_PER_LEASE + 100;

/// Key → (lease, mod revision), and the store's revision.
async fn keys_by_lease(client: &Client) -> (BTreeMap<String, (i64, i64)>, i64) {
    let mut response = client.clone().get(PREFIX, Some(GetOptions::new().with_prefix())).await.expect("list");
    let revision = response.header().expect("header").revision();
    let keys = response
        .take_kvs()
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), (kv.lease(), kv.mod_revision())))
        .collect();
    (keys, revision)
}

async fn count(client: &Client) -> usize {
    let options = GetOptions::new().with_prefix().with_count_only();
    client.clone().get(PREFIX, Some(options)).await.map_or(0, |r| r.count() as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_keys_spread_over_leases_and_a_lost_lease_rewrites_only_its_keys() {
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let client = etcd.client(&pki, "root").await;
    let sync = SyncStore::with_options(SyncOptions { max_in_flight: ETCD_MAX_IN_FLIGHT, ..SyncOptions::default() });
    let token = CancellationToken::new();
    // A short TTL, so keep-alives (every TTL/3) notice the revoked lease quickly.
    let writer =
        tokio::spawn(Arc::clone(&sync).run(Arc::new(Etcd::new(client.clone())), Duration::from_secs(3), token.clone()));
    for i in 0..KEYS {
        sync.upsert(format!("{PREFIX}10.0.{}.{}", i / 256, i % 256), Blob::from(format!("{{\"n\":{i}}}")));
    }
    eventually("every key to be written", Duration::from_secs(60), || async { count(&client).await == KEYS }).await;

    let (before, revoked_at) = keys_by_lease(&client).await;
    let mut per_lease: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for (key, (lease, _)) in &before {
        per_lease.entry(*lease).or_default().insert(key.clone());
    }
    let sizes: Vec<usize> = per_lease.values().map(BTreeSet::len).collect();
    assert!(!per_lease.contains_key(&0), "every key is on a lease");
    assert_eq!(sizes.iter().filter(|n| **n == MAX_KEYS_PER_LEASE).count(), 2, "two full leases: {sizes:?}");
    assert_eq!(sizes.len(), 3, "and one for the rest: {sizes:?}");

    let (&lost, lost_keys) = per_lease.iter().find(|(_, keys)| keys.len() == MAX_KEYS_PER_LEASE).expect("a full lease");
    client.clone().lease_revoke(lost).await.expect("revoke one lease");
    assert_eq!(count(&client).await, KEYS - MAX_KEYS_PER_LEASE, "its keys went with it");

    eventually("the lost keys to be written again", Duration::from_secs(30), || async { count(&client).await == KEYS })
        .await;
    let (after, _) = keys_by_lease(&client).await;
    for (key, (lease, modified)) in &after {
        let (old_lease, old_modified) = before[key];
        if lost_keys.contains(key) {
            assert!(*modified > revoked_at, "{key} was written again");
            assert_ne!(*lease, lost, "{key} is on a live lease");
        } else {
            assert_eq!((*lease, *modified), (old_lease, old_modified), "{key} on a live lease was left alone");
        }
    }
    token.cancel();
    writer.await.expect("the writer stops on shutdown");
}
