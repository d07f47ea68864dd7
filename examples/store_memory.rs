//! Loads the benchmark's Cilium-shaped data (scenario 3) straight into the embedded store,
//! without gRPC, and prints the process's RSS growth: a quick, low-noise way to weigh a
//! change of the store's in-memory representation before running the full benchmark.
//!
//! Then it loads a second store with the same data, its values plain (as `put_shared` leaves
//! them), and reads every key back from both: what packing saves, and what it costs a read.
//!
//! ```text
//! cargo run --release --example store_memory -- [ipcache nodes identities] [--updates N]
//! ```

#[path = "../benches/compare/data.rs"]
#[allow(dead_code)]
mod data;

use std::time::Instant;

use clustermesh_apiserver::blob::Blob;
use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::pb::etcdserverpb::{LeaseGrantRequest, PutRequest, RangeRequest};
use clustermesh_apiserver::etcd::store::{Identity, Limits, Store};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let sizes = data::Sizes { ipcache: num(0, 250_000), nodes: num(1, 25_000), identities: num(2, 25_000) };
    let shapes = data::Shapes::load(&data::default_vectors_path())?;
    let mut raw = 0;
    let store = Store::new(Identity::random(), Limits::default(), AuthStore::default());
    let leases: Vec<i64> = (0..sizes.total().div_ceil(1000))
        .map(|_| store.lease_grant(&LeaseGrantRequest { ttl: 3600, id: 0 }, None).expect("grant").id)
        .collect();
    let before = rss_kib();
    let start = Instant::now();
    for i in 0..sizes.total() {
        let (key, value) = shapes.item(&sizes, i);
        raw += key.len() + value.len();
        // As the transport would hand them over: slices of a bigger buffer.
        let request = PutRequest {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            value: bytes::Bytes::copy_from_slice(&value),
            lease: leases[i / 1000],
            ..Default::default()
        };
        store.put(request).expect("put");
    }
    let elapsed = start.elapsed();
    let after = rss_kib();
    let grown = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "keys {} raw key+value {:.1} MiB; RSS grew {:.1} MiB ({:.0} B/key over raw), total RSS {:.1} MiB; load {:.2} s",
        sizes.total(),
        raw as f64 / 1048576.0,
        grown,
        (grown * 1048576.0 - raw as f64) / sizes.total() as f64,
        after as f64 / 1024.0,
        elapsed.as_secs_f64()
    );

    let plain = Store::new(Identity::random(), Limits::default(), AuthStore::default());
    let plain_leases: Vec<i64> = (0..sizes.total().div_ceil(1000))
        .map(|_| plain.lease_grant(&LeaseGrantRequest { ttl: 3600, id: 0 }, None).expect("grant").id)
        .collect();
    let before = rss_kib();
    let start = Instant::now();
    for i in 0..sizes.total() {
        let (key, value) = shapes.item(&sizes, i);
        plain.put_shared(key.as_bytes(), Blob::from(value), plain_leases[i / 1000]).expect("put");
    }
    let plain_elapsed = start.elapsed();
    let grown = rss_kib().saturating_sub(before) as f64 / 1024.0;
    println!(
        "the same keys with their values plain: RSS grew {grown:.1} MiB ({:.0} B/key over raw); load {:.2} s (+{:.2} us a put to pack)",
        (grown * 1048576.0 - raw as f64) / sizes.total() as f64,
        plain_elapsed.as_secs_f64(),
        (elapsed.as_secs_f64() - plain_elapsed.as_secs_f64()) * 1e6 / sizes.total() as f64
    );
    let list_all = |store: &Store| {
        let request = RangeRequest { key: vec![0].into(), range_end: vec![0].into(), ..Default::default() };
        let rounds = 5;
        let start = Instant::now();
        for _ in 0..rounds {
            let listed = store.range(&request).expect("range").kvs.len();
            assert_eq!(listed, sizes.total());
        }
        start.elapsed().as_secs_f64() * 1e6 / (rounds * sizes.total()) as f64
    };
    let (packed_us, plain_us) = (list_all(&store), list_all(&plain));
    println!(
        "a listed key costs {packed_us:.3} us packed, {plain_us:.3} us plain (+{:.3} us to unpack)",
        packed_us - plain_us
    );
    Ok(())
}
