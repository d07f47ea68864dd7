//! The client library (`clustermesh-client`) against our server (mirror fed by the fake
//! Kubernetes API, embedded store) and against a real etcd filled by hand or from the shared
//! test vectors: what a remote agent sees, through restarts, compactions and config changes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::embedded::{self, EmbeddedConfig};
use clustermesh_apiserver::etcd::server::{DEFAULT_MAX_CONCURRENT_STREAMS, ServerOptions};
use clustermesh_apiserver::etcd::service::cluster::MemberInfo;
use clustermesh_apiserver::etcd::service::watch::WatchConfig;
use clustermesh_apiserver::etcd::store::{Limits, Store};
use clustermesh_apiserver::etcd::tls::TlsFiles;
use clustermesh_apiserver::etcd::wal::{FsyncPolicy, WalConfig};
use clustermesh_apiserver::translate::Settings;
use clustermesh_client::global_services::{Backend, GlobalServiceSettings, remote_backends, select_backends};
use clustermesh_client::wire::L4Addr;
use clustermesh_client::{
    Backoff, ClientOptions, ClusterId, ClusterMesh, ClusterName, Event, Kind, LocalCluster, Op, RemoteCluster,
    RemoteStatus,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::mirror::{Mirror, Target};
use crate::support::{EmbeddedStore, EtcdProcess, FakeApiServer, Pki, eventually, init_tracing};

/// Bound on every wait for the client to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cilium-test-vectors.json");

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).expect("valid cluster name")
}

/// Cilium's behaviour with test-sized intervals. The local cluster is `local` with ID 9.
fn options() -> ClientOptions {
    ClientOptions::new(LocalCluster::new(name("local"), ClusterId(9)))
        .with_backoff(Backoff::new(Duration::from_millis(100), Duration::from_secs(1)))
        .with_cluster_config_retry(Duration::from_secs(10), Duration::from_millis(100))
        .with_request_timeout(Duration::from_secs(5))
        .with_dial_timeout(Duration::from_secs(2))
        .with_rewatch_delay(Duration::from_millis(20))
        .with_config_poll_interval(Duration::from_millis(100))
}

/// The etcd client file of `cluster` for the `remote` user, with `extra` settings.
fn write_peer(dir: &Path, cluster: &str, url: &str, pki: &Pki, extra: &str) -> PathBuf {
    pki.write_peer_config(dir, cluster, url, "remote", extra)
}

fn keys<T>(map: &std::collections::BTreeMap<String, T>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

async fn wait_ready(remote: &RemoteCluster) {
    if tokio::time::timeout(CATCH_UP, remote.wait_ready()).await.is_err() {
        panic!("{} not ready within {CATCH_UP:?}: {:#?}", remote.name(), remote.status());
    }
}

/// Waits until `check` holds for the remote's status; panics with the status otherwise.
async fn wait_status(remote: &RemoteCluster, what: &str, check: impl Fn(&RemoteStatus) -> bool) -> RemoteStatus {
    let mut last = remote.status();
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    while !check(&last) {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {last:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = remote.status();
    }
    last
}

/// Drains what the stream holds now.
fn received(events: &mut broadcast::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": name},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}]}
    })
}

/// The JSON our mirror writes for a node of `cluster` (enough for the client's rules).
fn node_value(cluster: &str, id: u32, name: &str, ip: &str) -> String {
    json!({"Name": name, "Cluster": cluster, "ClusterID": id, "IPAddresses": [{"Type": "InternalIP", "IP": ip}]})
        .to_string()
}

/// A cluster config as our server writes it.
fn cluster_config(id: u32, canaries: bool) -> String {
    json!({"id": id, "capabilities": {"syncedCanaries": canaries, "maxConnectedClusters": 255}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_syncs_updates_and_deletes_everything_our_server_publishes() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let target = Target::embedded(&store);
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    // Identities, endpoints and services are exported for known (global) namespaces only.
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    fake.apply(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": "65600"},
        "security-labels": {"k8s:app": "echo", "k8s:io.cilium.k8s.policy.cluster": "cluster1",
                            "k8s:io.kubernetes.pod.namespace": "default"}
    }));
    fake.apply(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": {"name": "echo-1", "namespace": "default"},
        "status": {"identity": {"id": 65600}, "networking": {"addressing": [{"ipv4": "10.0.1.5"}], "node": "10.0.0.1"}}
    }));
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default", "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "echo"},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    }));
    fake.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-abc12", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.1.5"], "conditions": {"ready": true, "serving": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }));
    let mut mirror = Mirror::start(&target, Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;

    let dir = tempfile::tempdir().expect("config dir");
    write_peer(dir.path(), "cluster1", &store.client_url(), &pki, "");
    let shutdown = CancellationToken::new();
    let mesh = ClusterMesh::start(dir.path(), options(), &shutdown).await.expect("config dir readable");
    let mut events = mesh.events();
    let remote = mesh.remote("cluster1").expect("cluster1 configured");
    wait_ready(&remote).await;

    // Initial sync: every kind, decoded.
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-a"]);
    assert_eq!(remote.identities().get("65600").expect("identity").labels.get("k8s", "app"), Some("echo"));
    let endpoint = remote.ipcache().get("10.0.1.5").expect("ipcache entry");
    assert_eq!((endpoint.id.get(), endpoint.k8s_namespace.as_str()), (65600, "default"));
    let service = remote.services().get("default/echo").expect("global service");
    assert_eq!(service.cluster_id, ClusterId(1));
    let status = remote.status();
    assert!(status.ready && status.connected, "{status:#?}");
    assert!(status.config.retrieved && status.config.sync_canaries && !status.config.kvstoremesh, "{status:#?}");
    assert_eq!(status.config.cluster_id, Some(ClusterId(1)));
    assert!(status.etcd_cluster_id.is_some());
    assert_eq!(
        status.prefixes.keys().copied().collect::<Vec<_>>(),
        [Kind::Nodes, Kind::Services, Kind::Identities, Kind::IpCache]
    );
    assert_eq!(status.num_entries(), 4);
    assert_eq!(status.num_failures, 0);
    let json = serde_json::to_value(mesh.status()).expect("status serialises");
    assert_eq!(json["remotes"][0]["config"]["cluster-id"], 1, "{json:#}");
    assert_eq!(json["remotes"][0]["prefixes"]["nodes"]["entries"], 1, "{json:#}");

    // The global-service helper merges the remote backend with the local one.
    let remote_services = mesh.cluster_services("default", "echo");
    let settings =
        GlobalServiceSettings::from_annotations(&[("service.cilium.io/global".into(), "true".into())].into());
    let local = [Backend::local("10.9.0.7".parse().unwrap(), L4Addr { protocol: "TCP".into(), port: 8080 }, ["http"])];
    let selected =
        select_backends(&settings, &local, &remote_backends("default", "echo", remote_services.iter().map(|s| &**s)));
    let addrs: Vec<String> = selected.iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(addrs, ["10.9.0.7", "10.0.1.5"]);

    // Updates and deletes.
    fake.apply(node("node-b", "10.0.0.2"));
    fake.apply(node("node-a", "10.0.0.11"));
    eventually("node-a updated and node-b added", CATCH_UP, || async {
        let nodes = remote.nodes().snapshot();
        nodes.len() == 2
            && nodes.get("node-a").is_some_and(|n| n.ip_addresses[0].ip.unwrap().to_string() == "10.0.0.11")
    })
    .await;
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-b");
    fake.delete("v1", "Service", Some("default"), "echo");
    eventually("node-b and the service deleted", CATCH_UP, || async {
        keys(&remote.nodes().snapshot()) == ["node-a"] && remote.services().is_empty()
    })
    .await;

    // The same changes, as `watch` prints them.
    let lines: Vec<(String, String, String)> = received(&mut events)
        .iter()
        .map(|e| (e.kind.to_string(), serde_json::to_value(e.op).unwrap().as_str().unwrap().to_string(), e.key.clone()))
        .collect();
    for expected in [
        ("nodes", "upsert", "cilium/state/nodes/v1/cluster1/node-b"),
        ("nodes", "upsert", "cilium/state/nodes/v1/cluster1/node-a"),
        ("nodes", "delete", "cilium/state/nodes/v1/cluster1/node-b"),
        ("services", "delete", "cilium/state/services/v1/cluster1/default/echo"),
    ] {
        let expected = (expected.0.to_string(), expected.1.to_string(), expected.2.to_string());
        assert!(lines.contains(&expected), "{expected:?} missing from {lines:#?}");
    }
    mesh.shutdown().await;
    mirror.stop().await;
    store.stop().await;
}

/// Puts every test vector whose kind `select` accepts into `target` (later values win).
async fn load_vectors(target: &Target, select: impl Fn(&str) -> bool) {
    let text = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("read {VECTORS}: {e}"));
    let vectors: Vec<Value> = serde_json::from_str(&text).expect("vectors are JSON");
    for vector in vectors {
        let kind = vector["kind"].as_str().expect("kind");
        if select(kind) && !kind.starts_with("endpointslice") {
            target.put(vector["key"].as_str().expect("key"), vector["value"].as_str().unwrap_or_default()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_vectors_in_a_real_etcd_are_read_and_foreign_or_invalid_entries_rejected() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let target = Target::etcd(etcd.client(&pki, "root").await);
    load_vectors(&target, |kind| !kind.starts_with("cache-")).await;
    // Entries breaking one rule each, next to the valid vectors of cluster1.
    let bad = [
        ("cilium/state/nodes/v1/cluster1/renamed", node_value("cluster1", 1, "other-name", "10.0.0.1")),
        ("cilium/state/nodes/v1/cluster1/foreign", node_value("cluster2", 1, "foreign", "10.0.0.2")),
        ("cilium/state/nodes/v1/cluster1/wrong-id", node_value("cluster1", 7, "wrong-id", "10.0.0.3")),
        ("cilium/state/nodes/v1/cluster1/garbage", "{not json".to_string()),
        ("cilium/state/identities/v1/id/65999", "k8s:app=x;k8s:io.cilium.k8s.policy.cluster=cluster2;".to_string()),
        ("cilium/state/ip/v1/default/10.1.0.99", json!({"IP": "10.1.0.98", "ID": 65792}).to_string()),
    ];
    for (key, value) in &bad {
        target.put(key, value).await;
    }

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster1", &etcd.client_url(), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster1"), path, options().with_service_exports(true), &shutdown);
    wait_ready(&remote).await;

    assert_eq!(keys(&remote.nodes().snapshot()), ["k8s-node-a1"]);
    assert_eq!(keys(&remote.identities().snapshot()), ["65792"]);
    assert_eq!(keys(&remote.ipcache().snapshot()), ["10.1.0.57"]);
    assert_eq!(keys(&remote.services().snapshot()), ["kube-system/dns-headless", "shop/frontend"]);
    assert_eq!(keys(&remote.service_exports().snapshot()), ["shop/cache", "shop/frontend"]);
    let status = remote.status();
    let rejected = |kind| status.prefixes[&kind].rejected;
    assert_eq!(rejected(Kind::Nodes), 4, "{status:#?}");
    // Two identities of other clusters' ranges (vectors) and one with another cluster's label.
    assert_eq!(rejected(Kind::Identities), 3, "{status:#?}");
    // Two entries with other clusters' identities (vectors) and one under another IP's key.
    assert_eq!(rejected(Kind::IpCache), 3, "{status:#?}");
    assert_eq!(rejected(Kind::Services), 0, "{status:#?}");
    assert_eq!(status.config.service_exports_enabled, Some(false));

    // A live update that breaks a rule removes the entry, as the next relist would.
    target
        .put("cilium/state/nodes/v1/cluster1/k8s-node-a1", &node_value("cluster1", 2, "k8s-node-a1", "10.0.0.1"))
        .await;
    eventually("the node turned invalid is gone", CATCH_UP, || async { remote.nodes().is_empty() }).await;
    assert_eq!(remote.status().prefixes[&Kind::Nodes].rejected, 5);
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_cache_prefixes_are_read_when_the_config_says_cached() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let target = Target::etcd(etcd.client(&pki, "root").await);
    load_vectors(&target, |kind| kind.starts_with("cache-") || kind == "heartbeat").await;
    // The vectors carry no canary for the services and service-export cache prefixes.
    for prefix in ["services", "serviceexports"] {
        target.put(&format!("cilium/synced/cluster2/cilium/cache/{prefix}/v1"), "2026-05-04T09:25:44Z").await;
    }

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster2", &etcd.client_url(), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster2"), path, options().with_service_exports(true), &shutdown);
    wait_ready(&remote).await;
    let status = remote.status();
    assert!(status.config.kvstoremesh, "{status:#?}");
    assert_eq!(status.prefixes[&Kind::Identities].prefix.as_deref(), Some("cilium/cache/identities/v1/cluster2/id/"));
    assert_eq!(status.prefixes[&Kind::IpCache].prefix.as_deref(), Some("cilium/cache/ip/v1/cluster2/"));
    assert_eq!(keys(&remote.nodes().snapshot()), ["k8s-node-b7"]);
    assert_eq!(keys(&remote.identities().snapshot()), ["143210"]);
    assert_eq!(keys(&remote.ipcache().snapshot()), ["fd00:10:2:3::3a5c"]);
    assert_eq!(keys(&remote.services().snapshot()), ["payments/db"]);
    assert_eq!(keys(&remote.service_exports().snapshot()), ["payments/db"]);
    assert!(status.prefixes.values().all(|p| p.rejected == 0), "{status:#?}");
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_is_listed_only_once_its_canary_exists() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let target = Target::etcd(etcd.client(&pki, "root").await);
    target.put("cilium/cluster-config/cluster2", &cluster_config(2, true)).await;
    target.put("cilium/.heartbeat", "2026-05-04T09:22:00Z").await;
    target.put("cilium/state/nodes/v1/cluster2/node-x", &node_value("cluster2", 2, "node-x", "10.2.0.1")).await;
    target.put("cilium/state/identities/v1/id/131100", "k8s:io.cilium.k8s.policy.cluster=cluster2;").await;

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster2", &etcd.client_url(), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster2"), path, options(), &shutdown);
    wait_status(&remote, "config retrieved", |s| s.config.retrieved && s.prefixes.len() == 4).await;
    // Give the client ample time to (wrongly) list without a canary.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = remote.status();
    assert!(status.prefixes.values().all(|p| !p.synced && p.lists == 0), "{status:#?}");
    assert!(remote.nodes().is_empty() && !status.ready);

    target.put("cilium/synced/cluster2/cilium/state/nodes/v1", "2026-05-04T09:21:07Z").await;
    remote.nodes().wait_synced().await;
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-x"]);
    let status = remote.status();
    assert!(!status.prefixes[&Kind::Identities].synced && remote.identities().is_empty(), "{status:#?}");
    assert_eq!(status.unsynced(), [Kind::Services, Kind::Identities, Kind::IpCache]);

    for name in ["services", "identities", "ip"] {
        target.put(&format!("cilium/synced/cluster2/cilium/state/{name}/v1"), "2026-05-04T09:21:07Z").await;
    }
    wait_ready(&remote).await;
    assert_eq!(keys(&remote.identities().snapshot()), ["131100"]);
    remote.stop().await;
}

/// Our embedded store on a port of our choosing, so that it can be restarted in place.
struct PinnedStore {
    store: Arc<Store>,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl PinnedStore {
    async fn start(pki: &Pki, addr: SocketAddr) -> Self {
        Self::start_with(pki, addr, None).await
    }

    /// With `data_dir`, the store is kept there and restored from it.
    async fn start_with(pki: &Pki, addr: SocketAddr, data_dir: Option<&Path>) -> Self {
        let listener = eventually(&format!("bind {addr}"), Duration::from_secs(10), || async {
            tokio::net::TcpListener::bind(addr).await
        })
        .await;
        let config = EmbeddedConfig {
            tls: TlsFiles {
                cert: pki.server_cert_path().to_owned(),
                key: pki.server_key_path().to_owned(),
                trusted_ca: pki.ca_path().to_owned(),
                client_cert_auth: true,
            },
            tls_reload_interval: Duration::from_secs(60),
            limits: Limits::default(),
            server: ServerOptions {
                member: MemberInfo { name: "pinned".into(), client_urls: vec![format!("https://{addr}")] },
                watch: WatchConfig::default(),
                max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
                max_connections_per_user: 0,
            },
            auto_compaction_retention: Duration::ZERO,
            persistence: data_dir.map(|dir| WalConfig { fsync: FsyncPolicy::Never, ..WalConfig::new(dir, "it") }),
        };
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        let listeners = embedded::Listeners { client: vec![listener], metrics: Vec::new() };
        let store = embedded::spawn(listeners, config, AuthStore::default(), &tracker, &token).expect("store starts");
        Self { store, token, tracker }
    }

    async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.expect("store stops within 10 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_with_a_new_cluster_id_is_resynced_in_full_without_stale_entries() {
    init_tracing();
    let pki = Pki::new();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let first = PinnedStore::start(&pki, addr).await;
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    fake.apply(node("node-b", "10.0.0.2"));
    let mut mirror =
        Mirror::start(&Target::Embedded(Arc::clone(&first.store)), Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster1", &format!("https://{addr}"), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster1"), path, options(), &shutdown);
    wait_ready(&remote).await;
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-a", "node-b"]);
    let first_id = remote.status().etcd_cluster_id.expect("locked to the first store");
    let mut changes = remote.nodes().subscribe();

    // The whole pod restarts: the store comes back empty, with another etcd cluster ID.
    mirror.stop().await;
    first.stop().await;
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-a");
    fake.apply(node("node-c", "10.0.0.3"));
    // Meanwhile the agent keeps what it knew.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-a", "node-b"]);

    let second = PinnedStore::start(&pki, addr).await;
    let mut mirror =
        Mirror::start(&Target::Embedded(Arc::clone(&second.store)), Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;
    let status = wait_status(&remote, "resynced with the new store", |s| {
        s.ready && s.etcd_cluster_id.as_ref().is_some_and(|id| *id != first_id)
    })
    .await;
    // The re-opened watches answered from another etcd cluster: that ended the session.
    let reason = status.last_failure.as_ref().map(|f| f.reason.as_str()).unwrap_or_default();
    assert!(reason.contains("etcd cluster ID changed"), "{status:#?}");
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-b", "node-c"], "no stale node-a");
    // node-b was never dropped on the way: only node-a's deletion and node-c's creation.
    let seen: Vec<(String, Op)> = std::iter::from_fn(|| changes.try_recv().ok()).map(|c| (c.key, c.op)).collect();
    assert!(!seen.contains(&("node-b".to_string(), Op::Delete)), "{seen:?}");
    assert!(seen.contains(&("node-a".to_string(), Op::Delete)), "{seen:?}");
    remote.stop().await;
    mirror.stop().await;
    second.stop().await;
}

/// A store restarted on its data directory keeps its etcd cluster ID and history (warm
/// restart): the agent's broken watches re-open from their next revision on the same cluster,
/// and nothing is listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_on_its_data_directory_is_followed_without_a_relist() {
    init_tracing();
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("data dir");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    let first = PinnedStore::start_with(&pki, addr, Some(data.path())).await;
    let target = Target::Embedded(Arc::clone(&first.store));
    target.put("cilium/cluster-config/cluster2", &cluster_config(2, true)).await;
    target.put("cilium/.heartbeat", "2026-05-04T09:22:00Z").await;
    target.put("cilium/state/nodes/v1/cluster2/node-a", &node_value("cluster2", 2, "node-a", "10.2.0.1")).await;
    for name in ["nodes", "services", "identities", "ip"] {
        target.put(&format!("cilium/synced/cluster2/cilium/state/{name}/v1"), "2026-05-04T09:21:07Z").await;
    }

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster2", &format!("https://{addr}"), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster2"), path, options(), &shutdown);
    wait_ready(&remote).await;
    let before = remote.status();
    let mut changes = remote.nodes().subscribe();

    drop(target);
    first.stop().await;
    let second = PinnedStore::start_with(&pki, addr, Some(data.path())).await;
    let target = Target::Embedded(Arc::clone(&second.store));
    target.put("cilium/state/nodes/v1/cluster2/node-b", &node_value("cluster2", 2, "node-b", "10.2.0.2")).await;
    eventually("the agent to see the write made after the restart", Duration::from_secs(20), || async {
        remote.nodes().snapshot().contains_key("node-b").then_some(())
    })
    .await;

    let after = remote.status();
    assert_eq!(after.etcd_cluster_id, before.etcd_cluster_id, "the same etcd cluster");
    assert!(after.last_failure.is_none(), "the session went on: {after:#?}");
    let lists = |s: &RemoteStatus| s.prefixes.iter().map(|(k, p)| (*k, p.lists)).collect::<Vec<_>>();
    assert_eq!(lists(&after), lists(&before), "no prefix listed again");
    let seen: Vec<(String, Op)> = std::iter::from_fn(|| changes.try_recv().ok()).map(|c| (c.key, c.op)).collect();
    assert_eq!(seen, [("node-b".to_owned(), Op::Upsert)], "only the new write");
    remote.stop().await;
    second.stop().await;
}

/// A TCP relay that can cut every connection and refuse new ones, to break watches without
/// touching the server.
struct Relay {
    addr: SocketAddr,
    blocked: Arc<Mutex<bool>>,
    cut: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let blocked = Arc::new(Mutex::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (blocked2, cut2) = (Arc::clone(&blocked), Arc::clone(&cut));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *blocked2.lock().unwrap() {
                    continue;
                }
                let cut = Arc::clone(&cut2);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Self { addr, blocked, cut, task }
    }

    /// Cuts every open connection and refuses new ones until [`Relay::resume`].
    fn cut(&self) {
        *self.blocked.lock().unwrap() = true;
        self.cut.notify_waiters();
    }

    fn resume(&self) {
        *self.blocked.lock().unwrap() = false;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_compaction_relists_and_drops_what_vanished() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let target = Target::embedded(&store);
    target.put("cilium/cluster-config/cluster1", &cluster_config(1, false)).await;
    target.put("cilium/.heartbeat", "2026-05-04T09:22:00Z").await;
    for (name, ip) in [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")] {
        target.put(&format!("cilium/state/nodes/v1/cluster1/{name}"), &node_value("cluster1", 1, name, ip)).await;
    }
    let relay = Relay::start(store.addr).await;

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster1", &format!("https://{}", relay.addr), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster1"), path, options(), &shutdown);
    wait_ready(&remote).await;
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-a", "node-b"]);
    assert_eq!(remote.status().prefixes[&Kind::Nodes].lists, 1);

    // While the client is cut off, node-a goes away and the history of it is compacted.
    relay.cut();
    target.delete("cilium/state/nodes/v1/cluster1/node-a").await;
    target.put("cilium/state/nodes/v1/cluster1/node-c", &node_value("cluster1", 1, "node-c", "10.0.0.3")).await;
    let mut admin = store.client(&pki, "root").await;
    let revision = admin.get("cilium/", None).await.expect("get").header().expect("header").revision();
    admin.compact(revision, None).await.expect("compact");
    relay.resume();

    eventually("node-a gone and node-c seen after the relist", CATCH_UP, || async {
        keys(&remote.nodes().snapshot()) == ["node-b", "node-c"]
    })
    .await;
    let status = remote.status();
    assert!(status.prefixes[&Kind::Nodes].lists >= 2, "relisted: {status:#?}");
    assert_eq!(status.num_failures, 0, "a relist, not a reconnect: {status:#?}");
    remote.stop().await;
    store.stop().await;
}

/// Fills `target` as a cluster `cluster` with ID `id`, one node, no canaries.
async fn fill_cluster(target: &Target, cluster: &str, id: u32) {
    target.put(&format!("cilium/cluster-config/{cluster}"), &cluster_config(id, false)).await;
    target.put("cilium/.heartbeat", "2026-05-04T09:22:00Z").await;
    let key = format!("cilium/state/nodes/v1/{cluster}/{cluster}-node");
    target.put(&key, &node_value(cluster, id, &format!("{cluster}-node"), "10.0.0.1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_added_changed_and_removed_in_the_config_directory_follow_at_run_time() {
    init_tracing();
    let pki = Pki::new();
    let (one, two) = (EmbeddedStore::start(&pki).await, EmbeddedStore::start(&pki).await);
    fill_cluster(&Target::embedded(&one), "cluster1", 1).await;
    fill_cluster(&Target::embedded(&two), "cluster2", 2).await;
    // cluster3 claims cluster2's ID: it must be refused while cluster2 holds it.
    Target::embedded(&two).put("cilium/cluster-config/cluster3", &cluster_config(2, false)).await;

    let dir = tempfile::tempdir().expect("config dir");
    write_peer(dir.path(), "cluster1", &one.client_url(), &pki, "");
    std::fs::write(dir.path().join("ca.crt"), "not a cluster: no endpoints key").expect("write");
    let shutdown = CancellationToken::new();
    let mesh = ClusterMesh::start(dir.path(), options(), &shutdown).await.expect("config dir readable");
    let mut events = mesh.events();
    let members = |mesh: &ClusterMesh| mesh.members().borrow().iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(members(&mesh), BTreeSet::from(["cluster1".to_string()]));
    wait_ready(&mesh.remote("cluster1").expect("cluster1")).await;

    // Added.
    write_peer(dir.path(), "cluster2", &two.client_url(), &pki, "");
    eventually("cluster2 connected", CATCH_UP, || async { mesh.remote("cluster2") }).await;
    let cluster2 = mesh.remote("cluster2").expect("cluster2");
    wait_ready(&cluster2).await;
    assert_eq!(keys(&cluster2.nodes().snapshot()), ["cluster2-node"]);

    // A duplicate cluster ID is refused.
    write_peer(dir.path(), "cluster3", &two.client_url(), &pki, "");
    eventually("cluster3 refused", CATCH_UP, || async {
        let status = mesh.remote("cluster3")?.status();
        status.last_failure.filter(|f| f.reason.contains("clusterID 2 is already used by cluster cluster2"))
    })
    .await;
    std::fs::remove_file(dir.path().join("cluster3")).expect("remove cluster3");

    // Changed: reconnects (and relists) with the new file.
    let lists = cluster2.status().prefixes[&Kind::Nodes].lists;
    write_peer(dir.path(), "cluster2", &two.client_url(), &pki, "dial-timeout: 3s\n");
    wait_status(&cluster2, "a reconnect after the file changed", |s| s.ready && s.prefixes[&Kind::Nodes].lists > lists)
        .await;
    assert_eq!(cluster2.status().num_failures, 0, "a reconfiguration is not a failure");

    // Removed: disconnected, drained, and its deletions announced.
    std::fs::remove_file(dir.path().join("cluster1")).expect("remove cluster1");
    eventually("cluster1 removed", CATCH_UP, || async { mesh.remote("cluster1").is_none() }).await;
    eventually("only cluster2 left", CATCH_UP, || async { members(&mesh) == BTreeSet::from(["cluster2".to_string()]) })
        .await;
    let events = received(&mut events);
    let drained = events.iter().any(|e| {
        e.cluster.as_str() == "cluster1"
            && e.op == Op::Delete
            && e.key == "cilium/state/nodes/v1/cluster1/cluster1-node"
    });
    assert!(drained, "cluster1's node deleted: {events:#?}");
    assert!(events.iter().any(|e| e.cluster.as_str() == "cluster2" && e.op == Op::Upsert));
    mesh.shutdown().await;
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_heartbeat_or_a_missing_cluster_config_fails_the_connection_and_it_is_retried() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let target = Target::embedded(&store);
    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster1", &store.client_url(), &pki, "");
    let shutdown = CancellationToken::new();

    // No cluster config (e.g. a wrong cluster name): retried, then the connection is dropped.
    let quick = options().with_cluster_config_retry(Duration::from_millis(500), Duration::from_millis(100));
    let remote = RemoteCluster::start(name("cluster1"), &path, quick.clone(), &shutdown);
    let status = wait_status(&remote, "a config failure", |s| s.num_failures >= 1).await;
    let reason = status.last_failure.expect("failure recorded").reason;
    assert!(reason.contains("failed to retrieve cluster configuration cilium/cluster-config/cluster1"), "{reason}");
    assert!(!status.config.retrieved);
    // Once the config appears, the next attempt succeeds.
    fill_cluster(&target, "cluster1", 1).await;
    wait_ready(&remote).await;
    remote.stop().await;

    // A heartbeat that is never rewritten: the connection is dropped after the timeout.
    let remote = RemoteCluster::start(
        name("cluster1"),
        &path,
        quick.with_heartbeat_timeout(Duration::from_millis(700)),
        &shutdown,
    );
    wait_ready(&remote).await;
    let status = wait_status(&remote, "a heartbeat failure", |s| s.num_failures >= 1).await;
    let reason = status.last_failure.expect("failure recorded").reason;
    assert!(reason.contains("no heartbeat"), "{reason}");
    // Heartbeats keep it up: no further failure while they arrive.
    let writer = {
        let target = target.clone();
        tokio::spawn(async move {
            loop {
                target.put("cilium/.heartbeat", "2026-05-04T09:23:00Z").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_ready(&remote).await;
    let failures = remote.status().num_failures;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(remote.status().num_failures, failures, "{:#?}", remote.status());
    assert_eq!(keys(&remote.nodes().snapshot()), ["cluster1-node"], "entries survive reconnects");
    writer.abort();
    remote.stop().await;
    store.stop().await;
}

/// A connection cut in the middle of the initial paginated list of a large prefix (here after
/// 256 KiB of answers, within about 1.5 MiB of nodes), with keys added and removed while the
/// client reconnects: the client ends with exactly the remote's nodes, no more, no fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_list_ends_with_exactly_the_remotes_data() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let target = Target::embedded(&store);
    target.put("cilium/cluster-config/cluster1", &cluster_config(1, false)).await;
    target.put("cilium/.heartbeat", "2026-05-04T09:22:00Z").await;
    let node_key = |i: usize| format!("cilium/state/nodes/v1/cluster1/node-{i:05}");
    let node = |i: usize| {
        node_value("cluster1", 1, &format!("node-{i:05}"), &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
    };
    const NODES: usize = 8000;
    for i in 0..NODES {
        target.put(&node_key(i), &node(i)).await;
    }
    let relay = crate::support::relay::CuttingRelay::start(store.addr, 256 * 1024).await;

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster1", &format!("https://{}", relay.addr), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster1"), path, options(), &shutdown);
    eventually("the first connection cut", CATCH_UP, || async { relay.has_cut() }).await;
    assert!(!remote.nodes().is_synced(), "the cut came before the nodes list completed");
    // Meanwhile the remote changes: some nodes go, some come, one changes.
    for i in (0..NODES).step_by(7) {
        target.delete(&node_key(i)).await;
    }
    for i in NODES..NODES + 50 {
        target.put(&node_key(i), &node(i)).await;
    }
    target.put(&node_key(1), &node_value("cluster1", 1, "node-00001", "10.200.0.1")).await;

    wait_ready(&remote).await;
    let expected: BTreeSet<String> = target
        .dump("cilium/state/nodes/v1/cluster1/")
        .await
        .into_keys()
        .map(|k| k.trim_start_matches("cilium/state/nodes/v1/cluster1/").to_string())
        .collect();
    eventually("the client's nodes to equal the remote's", CATCH_UP, || async {
        remote.nodes().snapshot().keys().cloned().collect::<BTreeSet<String>>() == expected
    })
    .await;
    let snapshot = remote.nodes().snapshot();
    assert_eq!(snapshot.len(), NODES - NODES.div_ceil(7) + 50);
    let changed = format!("{:?}", snapshot["node-00001"]);
    assert!(changed.contains("10.200.0.1"), "the changed node has its new value: {changed}");
    // The client may retry the interrupted page on a new connection (the gRPC channel
    // reconnects by itself) or relist; either way it went through a second connection.
    assert!(relay.connections() >= 2, "reconnected through the relay");
    remote.stop().await;
    store.stop().await;
}

/// Cilium reads a remote's cluster config once per connection (cilium/cilium#37701); we follow
/// it: a remote that turns on service exports mid-session (an upgrade, a Helm change) is read
/// with its new capabilities at once, without counting a failure or waiting for a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_cluster_config_changed_mid_session_is_followed_at_once() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let target = Target::embedded(&store);
    target.put("cilium/.heartbeat", "2026-05-04T09:25:44Z").await;
    target.put("cilium/cluster-config/cluster2", &cluster_config(2, false)).await;
    target.put("cilium/state/nodes/v1/cluster2/node-a", &node_value("cluster2", 2, "node-a", "10.2.0.1")).await;
    load_vectors(&target, |kind| kind == "serviceexport").await;

    let dir = tempfile::tempdir().expect("config dir");
    let path = write_peer(dir.path(), "cluster2", &store.client_url(), &pki, "");
    let shutdown = CancellationToken::new();
    let remote = RemoteCluster::start(name("cluster2"), path, options().with_service_exports(true), &shutdown);
    wait_ready(&remote).await;
    let before = remote.status();
    assert_eq!(before.config.service_exports_enabled, None, "{before:#?}");
    assert!(!before.prefixes.contains_key(&Kind::ServiceExports), "{before:#?}");
    assert!(remote.service_exports().snapshot().is_empty());

    let exporting = json!({"id": 2, "capabilities": {"syncedCanaries": false, "maxConnectedClusters": 255,
        "serviceExportsEnabled": true}});
    target.put("cilium/cluster-config/cluster2", &exporting.to_string()).await;
    let after = wait_status(&remote, "the new config to be read", |s| {
        s.config.service_exports_enabled == Some(true) && s.ready
    })
    .await;
    assert_eq!(keys(&remote.service_exports().snapshot()), ["payments/db"]);
    assert_eq!(keys(&remote.nodes().snapshot()), ["node-a"]);
    assert_eq!(after.num_failures, 0, "a config change is not a failure: {after:#?}");

    // The same config written again (the remote's enforcer restoring it) changes nothing.
    target.put("cilium/cluster-config/cluster2", &exporting.to_string()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(remote.status().num_failures, 0);
    remote.stop().await;
    store.stop().await;
}
