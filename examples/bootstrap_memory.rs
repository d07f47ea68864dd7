//! The mirror's own memory, stage by stage: scenario 7's objects (CiliumEndpoints, CiliumNodes,
//! CiliumIdentities) applied to the translation model and synced into the embedded store in
//! process (no Kubernetes HTTP, no gRPC), printing the RSS after each stage.
//!
//! ```text
//! cargo run --release --example bootstrap_memory -- [endpoints nodes identities]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::{Identity, Limits, Store};
use clustermesh_apiserver::kvstore::embedded::Embedded;
use clustermesh_apiserver::source::SourceEvent;
use clustermesh_apiserver::sync::mirror::{Mirror, MirrorMetrics};
use clustermesh_apiserver::sync::store::SyncStore;
use clustermesh_apiserver::translate::model::{Kind, Model, Object, Settings};
use serde_json::{Value, json};
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

const NAMESPACE: &str = "default";

fn node(i: usize) -> Value {
    let name = format!("node-{i:06}");
    let (a, b) = ((i >> 8) & 0xff, i & 0xff);
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {
            "addresses": [
                {"ip": format!("172.16.{a}.{b}"), "type": "InternalIP"},
                {"ip": format!("10.{}.{a}.1", 64 + (b & 0x3f)), "type": "CiliumInternalIP"},
            ],
            "bootid": format!("570d3fd1-93db-4862-ba99-{i:012x}"),
            "health": {"ipv4": format!("10.{}.{a}.2", 64 + (b & 0x3f))},
            "ipam": {"podCIDRs": [format!("10.{}.{a}.0/24", 64 + (b & 0x3f))]},
        }
    })
}

fn identity(i: usize) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
        "metadata": {"name": (65_536 + i).to_string(), "labels": {"io.kubernetes.pod.namespace": NAMESPACE}},
        "security-labels": {
            "k8s:app": format!("app-{i}"),
            "k8s:io.cilium.k8s.policy.cluster": "cluster1",
            "k8s:io.kubernetes.pod.namespace": NAMESPACE,
        }
    })
}

fn endpoint(seq: usize, identities: usize) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": {"name": format!("cep-{seq:07}"), "namespace": NAMESPACE},
        "status": {
            "id": seq % 65_000 + 1,
            "identity": {"id": 65_536 + seq % identities.max(1), "labels": [format!("k8s:app=app-{}", seq % 100)]},
            "networking": {
                "addressing": [{"ipv4": format!("10.{}.{}.{}", 128 + ((seq >> 16) & 0x7f), (seq >> 8) & 0xff, seq & 0xff)}],
                "node": format!("172.16.{}.{}", (seq / 250) % 250, seq % 250 + 1),
            },
            "service-account": "default",
            "state": "ready",
        }
    })
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
    let mut mirror = Mirror::new(Model::new(Settings::new("cluster1", 1)), Arc::clone(&sync), MirrorMetrics::default());
    let mut feed = |kind: Kind, count: usize, make: &dyn Fn(usize) -> Value| {
        mirror.handle(SourceEvent::Init(kind));
        for i in 0..count {
            mirror.handle(SourceEvent::InitApply(Object::from_value(kind, make(i)).expect("decodes")));
        }
        mirror.handle(SourceEvent::InitDone(kind));
    };
    feed(Kind::Namespace, 1, &|_| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    feed(Kind::CiliumNode, nodes, &node);
    feed(Kind::CiliumIdentity, identities, &identity);
    feed(Kind::CiliumEndpoint, endpoints, &|i| endpoint(i, identities));
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
