//! What the data directory's log costs a put, without gRPC around it: the same Cilium-shaped
//! puts (on leases of 1,000 keys) into a store without `--data-dir`, then with one under each
//! fsync policy, timed in process CPU per put; and how long the store takes to open again
//! from its log, then from a snapshot.
//!
//! `cargo run --release --example wal_cost -- [PUTS] [DIR]` (default 200000 puts, a temporary
//! directory under /tmp; give a directory on the disk that matters).

use std::sync::Arc;
use std::time::Instant;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::pb::etcdserverpb::{LeaseGrantRequest, PutRequest};
use clustermesh_apiserver::etcd::store::{Identity, Limits, Store};
use clustermesh_apiserver::etcd::wal::{FsyncPolicy, WalConfig};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("comm").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn run(store: &Store, puts: usize) -> (f64, f64) {
    let value = vec![b'v'; 300];
    let mut lease = 0;
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    for i in 0..puts {
        if i % 1000 == 0 {
            lease = store.lease_grant(&LeaseGrantRequest { ttl: 900, id: 0 }, None).expect("grant").id;
        }
        let key = format!("cilium/state/ip/v1/default/10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let request =
            PutRequest { key: key.into_bytes().into(), value: value.clone().into(), lease, ..Default::default() };
        store.put(request).expect("put");
    }
    let per_put = |seconds: f64| seconds * 1e9 / puts as f64;
    (per_put(cpu_seconds() - cpu), per_put(wall.elapsed().as_secs_f64()))
}

/// Opens the store again and prints how long that took (a warm restart's start-up).
fn restart(config: &WalConfig, what: &str) {
    let started = Instant::now();
    let (store, opened) = Store::open(Limits::default(), AuthStore::default(), config).expect("reopen");
    let stats = store.stats();
    println!(
        "  restart {what}: {:.0} ms for {} keys at revision {} ({} log bytes, {} snapshot bytes)",
        started.elapsed().as_secs_f64() * 1e3,
        stats.keys,
        stats.revision,
        opened.log_bytes,
        opened.snapshot_bytes
    );
}

/// `threads` writers at once, for lock contention: CPU per put over all of them.
fn run_concurrent(store: &Arc<Store>, puts: usize, threads: usize) -> f64 {
    let cpu = cpu_seconds();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let store = Arc::clone(store);
            scope.spawn(move || {
                let value = vec![b'v'; 300];
                for i in 0..puts / threads {
                    let key = format!("cilium/state/ip/v1/t{t}/10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                    let request =
                        PutRequest { key: key.into_bytes().into(), value: value.clone().into(), ..Default::default() };
                    store.put(request).expect("put");
                }
            });
        }
    });
    (cpu_seconds() - cpu) * 1e9 / puts as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let puts: usize = args.next().map_or(200_000, |n| n.parse().expect("a number of puts"));
    let parent = args.next().map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let memory = Store::new(Identity::random(), Limits::default(), AuthStore::default());
    let (cpu, wall) = run(&memory, puts);
    println!("no data dir:      {cpu:7.0} ns CPU/put {wall:7.0} ns wall/put");
    for threads in [4, 16] {
        let memory = Store::new(Identity::random(), Limits::default(), AuthStore::default());
        let without = run_concurrent(&memory, puts, threads);
        let dir = tempfile::Builder::new().prefix("wal-cost-").tempdir_in(&parent).expect("temp dir");
        let config = WalConfig { fsync: FsyncPolicy::Never, ..WalConfig::new(dir.path(), "bench") };
        let (store, _) = Store::open(Limits::default(), AuthStore::default(), &config).expect("open");
        let with = run_concurrent(&store, puts, threads);
        println!(
            "{threads:2} writers at once: {without:7.0} ns CPU/put without, {with:7.0} ns with a data dir (never)"
        );
    }
    for policy in [FsyncPolicy::Never, FsyncPolicy::Batch, FsyncPolicy::Always] {
        let dir = tempfile::Builder::new().prefix("wal-cost-").tempdir_in(&parent).expect("temp dir");
        let config = WalConfig { fsync: policy, ..WalConfig::new(dir.path(), "bench") };
        let (store, _) = Store::open(Limits::default(), AuthStore::default(), &config).expect("open");
        // `always` syncs every put here (one writer, nothing to share a sync with): fewer puts.
        let n = if policy == FsyncPolicy::Always { puts / 20 } else { puts };
        let (cpu, wall) = run(&store, n);
        println!("data dir {policy:<7?} {cpu:7.0} ns CPU/put {wall:7.0} ns wall/put ({n} puts)");
        if policy == FsyncPolicy::Batch {
            drop(store);
            restart(&config, "from the log");
            let (store, _) = Store::open(Limits::default(), AuthStore::default(), &config).expect("open");
            store.snapshot().expect("snapshot");
            drop(store);
            restart(&config, "from a snapshot");
        }
    }
}
