//! The mirror's own memory, stage by stage: scenario 7's objects (CiliumEndpoints, CiliumNodes,
//! CiliumIdentities) applied to the translation model and synced into the embedded store in
//! process (no Kubernetes HTTP, no gRPC), printing the RSS after each stage.
//!
//! ```text
//! cargo run --release --example bootstrap_memory -- [endpoints nodes identities] [--no-store]
//! ```
//!
//! Each part is weighed by dropping it: the model and the mirror first, then the sync store,
//! then the store. A value's bytes are shared by all three and counted with the last holder
//! (the store). Run with `_RJEM_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0` so that freed
//! pages go back to the kernel at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../benches/compare/objects.rs"]
#[allow(dead_code)]
mod objects;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::{Identity, Limits, Store};
use clustermesh_apiserver::kvstore::embedded::Embedded;
use clustermesh_apiserver::source::SourceEvent;
use clustermesh_apiserver::sync::mirror::{Mirror, MirrorMetrics};
use clustermesh_apiserver::sync::store::SyncStore;
use clustermesh_apiserver::translate::model::{Kind, Model, Object, Settings};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

// The server's allocator, so that the figures are the server's (see src/main.rs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    // Without the writer: what the model, the mirror and the sync store's wanted keys weigh.
    let no_store = std::env::args().any(|a| a == "--no-store");
    let num = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (endpoints, nodes, identities) = (num(0, 250_000), num(1, 25_000), num(2, 25_000));
    let start = Instant::now();
    let base = rss_mib();
    let store = Store::new(Identity::random(), Limits::default(), AuthStore::default());
    let sync = SyncStore::new();
    let shutdown = CancellationToken::new();
    let worker = (!no_store).then(|| {
        tokio::spawn(Arc::clone(&sync).run(
            Arc::new(Embedded::new(Arc::clone(&store))),
            Duration::from_secs(900),
            shutdown.clone(),
        ))
    });
    let mut mirror =
        Mirror::new(Model::new(Settings::new(objects::CLUSTER, 1)), Arc::clone(&sync), MirrorMetrics::default());
    let mut feed = |kind: Kind, count: usize, make: &dyn Fn(usize) -> Value| {
        mirror.handle(SourceEvent::Init(kind));
        // In runs, as the mirror takes them from its channel.
        for start in (0..count).step_by(256) {
            let objects = (start..count.min(start + 256))
                .map(|i| SourceEvent::InitApply(Object::from_value(kind, make(i)).expect("decodes")));
            mirror.handle_all(objects);
        }
        mirror.handle(SourceEvent::InitDone(kind));
    };
    feed(Kind::Namespace, 1, &|_| objects::namespace());
    feed(Kind::CiliumNode, nodes, &objects::node);
    feed(Kind::CiliumIdentity, identities, &objects::identity);
    feed(Kind::CiliumEndpoint, endpoints, &|i| objects::endpoint(i, identities));
    for kind in [Kind::Service, Kind::EndpointSlice] {
        mirror.handle(SourceEvent::Init(kind));
        mirror.handle(SourceEvent::InitDone(kind));
    }
    let applied = rss_mib();
    let applied_at = start.elapsed();
    if !no_store {
        sync.drained().await;
    }
    let synced = rss_mib();
    println!(
        "objects {}: applied {:.1} MiB (+{:.1}) at {:.2} s; synced {:.1} MiB (+{:.1}) at {:.2} s; store keys {}",
        endpoints + nodes + identities,
        applied,
        applied - base,
        applied_at.as_secs_f64(),
        synced,
        synced - applied,
        start.elapsed().as_secs_f64(),
        sync.stats().writes,
    );
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    drop(mirror);
    settle().await;
    let without_model = rss_mib();
    shutdown.cancel();
    if let Some(worker) = worker {
        let _ = worker.await;
    }
    drop(sync);
    settle().await;
    let without_sync = rss_mib();
    drop(store);
    settle().await;
    let bare = rss_mib();
    println!(
        "model and mirror {:.1} MiB, sync store {:.1} MiB, embedded store {:.1} MiB, the rest {:.1} MiB",
        synced - without_model,
        without_model - without_sync,
        without_sync - bare,
        bare
    );
    Ok(())
}
