//! KVStoreMesh: three clusters on this machine, each an embedded store fed by its own fake
//! Kubernetes API, each copying the other two into its `cilium/cache/...` (in-process, as
//! `clustermesh --clustermesh-config` runs it); and the `kvstoremesh` command attached to a real
//! etcd, with its status API, `kvstoremesh-dbg` and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::translate::Settings;
use clustermesh_client::{ClusterMesh, RemoteCluster};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::docker::{ETCD_35, EtcdContainers};
use crate::support::etcd::http_get;
use crate::support::kvstoremesh::{MeshCluster, Tuning, cached_copy, client_options, node, write_peer};
use crate::support::mirror::Target;
use crate::support::process::interrupt_and_wait;
use crate::support::{EmbeddedStore, Pki, eventually, init_tracing};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

/// Bound on every wait for copies to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);

/// The cache prefixes and canaries kvstoremesh writes per remote cluster.
const CACHE_CANARIES: [&str; 5] = [
    "cilium/cache/identities/v1",
    "cilium/cache/ip/v1",
    "cilium/cache/nodes/v1",
    "cilium/cache/serviceexports/v1",
    "cilium/cache/services/v1",
];

/// cluster1..cluster3, each configured with the other two, kvstoremesh running and ready.
async fn three_clusters(pki: &Pki, tuning: &[Tuning; 3]) -> Vec<MeshCluster> {
    let mut clusters = Vec::new();
    for id in 1..=3 {
        clusters.push(MeshCluster::start(pki, &format!("cluster{id}"), id).await);
    }
    for x in &clusters {
        for y in clusters.iter().filter(|y| y.name != x.name) {
            x.add_peer(pki, y);
        }
    }
    for (cluster, tuning) in clusters.iter_mut().zip(tuning) {
        cluster.start_kvstoremesh(tuning.clone()).await;
    }
    for cluster in &clusters {
        cluster.wait_kvstoremesh_ready().await;
    }
    clusters
}

/// What `cluster`'s cache must hold: the state of every other cluster, moved to the cache layout.
async fn expected_cache(clusters: &[MeshCluster], cluster: &MeshCluster) -> BTreeMap<String, String> {
    let mut expected = BTreeMap::new();
    for other in clusters.iter().filter(|c| c.name != cluster.name) {
        expected.extend(cached_copy(&other.name, &other.state().await));
    }
    expected
}

/// Waits until every cluster's cache is exactly the others' state, and `also` holds.
async fn caches_converge<F, Fut>(clusters: &[MeshCluster], what: &str, also: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(what, CATCH_UP, || async {
        if !also().await {
            return Err("the precondition does not hold yet".to_string());
        }
        for cluster in clusters {
            let (expected, found) =
                (expected_cache(clusters, cluster).await, cluster.target().dump("cilium/cache/").await);
            if expected != found {
                return Err(format!("{}'s cache\n  expected: {expected:#?}\n  found: {found:#?}", cluster.name));
            }
        }
        Ok(())
    })
    .await
}

async fn stop_all(clusters: Vec<MeshCluster>) {
    for cluster in clusters {
        cluster.stop().await;
    }
}

fn cached_config(id: u32) -> String {
    format!(
        r#"{{"id":{id},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cache_holds_exactly_the_other_two_clusters_byte_for_byte_and_follows_their_changes() {
    init_tracing();
    let pki = Pki::new();
    let clusters = three_clusters(&pki, &Default::default()).await;
    caches_converge(&clusters, "every cache equals the other clusters' state", || async { true }).await;

    for cluster in &clusters {
        let target = cluster.target();
        for other in clusters.iter().filter(|c| c.name != cluster.name) {
            let key = format!("cilium/cluster-config/{}", other.name);
            assert_eq!(target.get(&key).await, Some(cached_config(other.id)), "{} in {}", key, cluster.name);
            let canaries: BTreeSet<String> =
                target.dump(&format!("cilium/synced/{}/", other.name)).await.into_keys().collect();
            let expected: BTreeSet<String> =
                CACHE_CANARIES.iter().map(|c| format!("cilium/synced/{}/{c}", other.name)).collect();
            assert_eq!(canaries, expected, "cache canaries of {} in {}", other.name, cluster.name);
        }
        assert!(
            target.dump(&format!("cilium/cache/nodes/v1/{}/", cluster.name)).await.is_empty(),
            "no cluster caches itself"
        );
    }

    // A node added and an endpoint deleted in cluster1 reach the caches of cluster2 and cluster3.
    let c1 = &clusters[0];
    c1.fake.apply(node("cluster1-node-b", "10.1.0.2"));
    c1.fake.delete("cilium.io/v2", "CiliumEndpoint", Some("default"), "echo-1");
    caches_converge(&clusters, "cluster1's changes copied", || async {
        let state = c1.state().await;
        state.contains_key("cilium/state/nodes/v1/cluster1/cluster1-node-b")
            && !state.contains_key("cilium/state/ip/v1/default/10.1.1.5")
    })
    .await;
    for cluster in &clusters[1..] {
        let target = cluster.target();
        assert!(target.get("cilium/cache/nodes/v1/cluster1/cluster1-node-b").await.is_some());
        assert_eq!(target.get("cilium/cache/ip/v1/cluster1/10.1.1.5").await, None);
    }
    stop_all(clusters).await;
}

/// Cilium's KVStoreMesh reads a remote's cluster config once per connection (cilium/cilium#37701):
/// a remote upgraded to export MCS-API services stays cached as not exporting until something
/// breaks the connection. Ours follows the config, so agents reading the cache see the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_cluster_config_changed_mid_session_reaches_the_cache_at_once() {
    init_tracing();
    let pki = Pki::new();
    let mut c1 = MeshCluster::start(&pki, "cluster1", 1).await;
    let mut c2 = MeshCluster::start(&pki, "cluster2", 2).await;
    c1.add_peer(&pki, &c2);
    c1.start_kvstoremesh(Tuning::default()).await;
    c1.wait_kvstoremesh_ready().await;
    let target = c1.target();
    assert_eq!(target.get("cilium/cluster-config/cluster2").await, Some(cached_config(2)));

    let mut exporting = Settings::new("cluster2", 2);
    exporting.mcs_api_enabled = true;
    c2.remirror(exporting).await;
    let expected = cached_config(2).replace(r#""serviceExportsEnabled":false"#, r#""serviceExportsEnabled":true"#);
    eventually("cluster2's new config in cluster1's cache", CATCH_UP, || async {
        let cached = target.get("cilium/cluster-config/cluster2").await;
        (cached.as_deref() == Some(expected.as_str())).then_some(()).ok_or(format!("cached: {cached:?}"))
    })
    .await;
    c1.stop().await;
    c2.stop().await;
}

/// The entries of every typed cache of `remote`, as comparable JSON.
fn entries(remote: &RemoteCluster) -> BTreeMap<&'static str, Value> {
    fn json(value: impl serde::Serialize) -> Value {
        serde_json::to_value(value).expect("serialise")
    }
    BTreeMap::from([
        ("nodes", json(remote.nodes().snapshot())),
        ("services", json(remote.services().snapshot())),
        ("identities", json(remote.identities().snapshot())),
        ("ipcache", json(remote.ipcache().snapshot())),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reading_the_local_cache_sees_the_same_entries_as_one_reading_the_remotes() {
    init_tracing();
    let pki = Pki::new();
    let clusters = three_clusters(&pki, &Default::default()).await;
    let (c1, others) = (&clusters[0], &clusters[1..]);

    // As agents of cluster1 are configured with and without KVStoreMesh: the same remote
    // names, pointing at the local store (as `local-cluster1`) or at each remote (as `remote`).
    let (via_cache, direct) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for other in others {
        write_peer(via_cache.path(), &other.name, &c1.store.client_url(), &pki, "local-cluster1");
        write_peer(direct.path(), &other.name, &other.store.client_url(), &pki, "remote");
    }
    let token = CancellationToken::new();
    let cached = ClusterMesh::start(via_cache.path(), client_options("cluster1", 1), &token).await.unwrap();
    let remote = ClusterMesh::start(direct.path(), client_options("cluster1", 1), &token).await.unwrap();
    for mesh in [&cached, &remote] {
        if tokio::time::timeout(CATCH_UP, mesh.wait_ready()).await.is_err() {
            panic!("agent not ready: {:#?}", mesh.status());
        }
    }
    let same = || {
        others.iter().all(|other| {
            let (a, b) = (cached.remote(&other.name).unwrap(), remote.remote(&other.name).unwrap());
            entries(&a) == entries(&b)
        })
    };
    eventually("both agents hold the same entries", CATCH_UP, || async { same() }).await;
    for other in others {
        let through_cache = cached.remote(&other.name).unwrap().status();
        assert!(through_cache.config.kvstoremesh, "{through_cache:#?}");
        assert!(!remote.remote(&other.name).unwrap().status().config.kvstoremesh);
        assert_eq!(through_cache.num_entries(), 4, "node, service, identity, endpoint: {through_cache:#?}");
    }

    // A change in cluster2 reaches both, the same way.
    clusters[1].fake.apply(node("cluster2-node-b", "10.2.0.2"));
    eventually("cluster2-node-b seen by both agents", CATCH_UP, || async {
        let seen = |mesh: &ClusterMesh| mesh.remote("cluster2").unwrap().nodes().get("cluster2-node-b").is_some();
        seen(&cached) && seen(&remote) && same()
    })
    .await;
    cached.shutdown().await;
    remote.shutdown().await;
    stop_all(clusters).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_remote_loses_its_cluster_config_at_once_and_its_cached_data_after_the_grace_period() {
    init_tracing();
    let pki = Pki::new();
    let grace = Duration::from_secs(2);
    let tuning = [Tuning { grace_period: grace, ..Tuning::default() }, Tuning::default(), Tuning::default()];
    let clusters = three_clusters(&pki, &tuning).await;
    caches_converge(&clusters, "initial copies", || async { true }).await;
    let c1 = clusters[0].target();

    clusters[0].remove_peer("cluster3");
    let removed = tokio::time::Instant::now();
    eventually("cluster3's cluster config deleted from cluster1", Duration::from_secs(5), || async {
        c1.get("cilium/cluster-config/cluster3").await.is_none()
    })
    .await;
    assert!(removed.elapsed() < grace, "the cluster config goes first, without waiting for the grace period");
    assert!(
        !c1.dump("cilium/cache/nodes/v1/cluster3/").await.is_empty(),
        "the cached data stays during the grace period, for agents still reading it"
    );

    let leftovers = |target: Target| async move {
        let mut found = BTreeMap::new();
        for prefix in ["cilium/synced/cluster3/", "cilium/cache/"] {
            found.extend(target.dump(prefix).await.into_iter().filter(|(k, _)| k.contains("/cluster3/")));
        }
        found
    };
    eventually("cluster3's cached data drained from cluster1", CATCH_UP, || async {
        leftovers(c1.clone()).await.is_empty()
    })
    .await;
    assert!(removed.elapsed() >= grace, "data deleted only after the grace period");
    let cluster2_copy = cached_copy("cluster2", &clusters[1].state().await);
    c1.expect("cluster2's copy is untouched", "cilium/cache/", &cluster2_copy).await;
    assert_eq!(
        clusters[0].kvstoremesh().running.shared.status().iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        ["cluster2"],
        "the status no longer lists cluster3"
    );

    // Configured again: copied again, completely.
    clusters[0].add_peer(&pki, &clusters[2]);
    caches_converge(&clusters, "cluster3 copied again into cluster1", || async { true }).await;
    assert_eq!(c1.get("cilium/cluster-config/cluster3").await, Some(cached_config(3)));
    stop_all(clusters).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_down_past_the_cache_ttl_loses_its_services_and_back_with_a_new_cluster_id_leaves_nothing_stale() {
    init_tracing();
    let pki = Pki::new();
    let ttl = Tuning { cache_ttl: Duration::from_secs(1), ..Tuning::default() };
    let mut clusters = three_clusters(&pki, &[ttl, Tuning::default(), Tuning::default()]).await;
    caches_converge(&clusters, "initial copies", || async { true }).await;
    let (c1, c3) = (clusters[0].target(), clusters[2].target());

    let addr = clusters.remove(1).stop().await;
    eventually("cluster1 revokes cluster2's cached services", CATCH_UP, || async {
        c1.dump("cilium/cache/services/v1/cluster2/").await.is_empty()
    })
    .await;
    assert!(!c1.dump("cilium/cache/nodes/v1/cluster2/").await.is_empty(), "nodes are not revoked");
    assert!(
        !c3.dump("cilium/cache/services/v1/cluster2/").await.is_empty(),
        "without --clustermesh-cache-ttl nothing is revoked"
    );
    let metrics = metrics_text(&clusters[0]);
    assert!(
        metrics.contains(
            r#"cilium_kvstoremesh_remote_cluster_cache_revocations{source_cluster="cluster1",target_cluster="cluster2"} 1"#
        ),
        "{metrics}"
    );

    // Back on the same address as a new cluster: new etcd cluster ID, new cluster ID 12, and
    // different objects (all of cluster ID 12's ranges and addresses).
    let mut restarted = MeshCluster::restart_at(&pki, addr, "cluster2", 12).await;
    for other in &clusters {
        restarted.add_peer(&pki, other);
    }
    restarted.start_kvstoremesh(Tuning::default()).await;
    clusters.insert(1, restarted);
    caches_converge(&clusters, "caches equal the restarted cluster2's state, nothing stale", || async { true }).await;
    for target in [&c1, &c3] {
        assert_eq!(target.get("cilium/cluster-config/cluster2").await, Some(cached_config(12)));
        assert!(target.get("cilium/cache/identities/v1/cluster2/id/131172").await.is_none(), "old identity");
        assert!(target.get("cilium/cache/identities/v1/cluster2/id/786532").await.is_some(), "new identity");
    }
    let metrics = metrics_text(&clusters[0]);
    assert!(
        metrics.contains(r#"cilium_kvstoremesh_remote_cluster_readiness_status{source_cluster="cluster1",target_cluster="cluster2"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(
            r#"cilium_kvstoremesh_remote_cluster_failures{source_cluster="cluster1",target_cluster="cluster2"} 0"#
        ),
        "the outage counts as a failure: {metrics}"
    );
    stop_all(clusters).await;
}

/// Kills the child if the test fails before it is stopped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics_text(cluster: &MeshCluster) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &cluster.kvstoremesh().registry).expect("encode metrics");
    text
}

/// A remote cluster as Cilium 1.16 publishes it, written by hand: canaries, but no
/// `serviceExportsEnabled` in its cluster config (so service exports are not offered).
async fn old_remote(pki: &Pki) -> EmbeddedStore {
    let store = EmbeddedStore::start(pki).await;
    let mut client = store.client(pki, "root").await;
    let puts = [
        (
            "cilium/cluster-config/cluster4",
            r#"{"id":4,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255}}"#,
        ),
        // Spacing no encoder of ours would produce: a copy must not re-encode.
        ("cilium/state/nodes/v1/cluster4/n1", r#"{ "Name": "n1",  "Cluster": "cluster4", "ClusterID": 4 }"#),
        ("cilium/.heartbeat", "2026-05-04T09:21:07Z"),
    ];
    for (key, value) in puts {
        client.put(key, value, None).await.expect("put");
    }
    for kind in ["nodes", "services", "identities", "ip"] {
        let key = format!("cilium/synced/cluster4/cilium/state/{kind}/v1");
        client.put(key, "2026-05-04T09:21:07Z", None).await.expect("put canary");
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kvstoremesh_command_fills_a_real_etcd_and_reports_through_its_status_api_dbg_and_metrics() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdContainers::start(&pki, 1, ETCD_35).await;
    let local = Target::etcd(etcd.client(&pki, "root").await);
    // Left by an earlier session, when cluster4 still offered service exports.
    local.put("cilium/cache/serviceexports/v1/cluster4/default/old", "{}").await;
    let cluster2 = MeshCluster::start(&pki, "cluster2", 2).await;
    let cluster4 = old_remote(&pki).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let peers = tempfile::tempdir().unwrap();
    write_peer(peers.path(), "cluster2", &cluster2.store.client_url(), &pki, "remote");
    write_peer(peers.path(), "cluster4", &cluster4.client_url(), &pki, "root");
    write_peer(peers.path(), "cluster9", &format!("https://{dead}"), &pki, "remote");
    let etcd_config = write_peer(dir.path(), "etcd-config.yaml", &etcd.client_url(), &pki, "admin-cluster1");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (health, metrics, api) = (free(), free(), free());
    let log = std::fs::File::create(dir.path().join("kvstoremesh.log")).unwrap();
    let child = Command::new(BIN)
        .args(["kvstoremesh", "--cluster-name=cluster1", "--cluster-id=1", "--max-connected-clusters=255"])
        .arg(format!("--kvstore-opt=etcd.config={}", etcd_config.display()))
        .args(["--kvstore-opt=etcd.qps=100", "--kvstore-opt=etcd.maxInflight=10"])
        .arg(format!("--clustermesh-config={}", peers.path().display()))
        .args(["--health-bind-address=127.0.0.1", &format!("--health-port={health}")])
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics}"))
        .arg(format!("--api-serve-addr=127.0.0.1:{api}"))
        .args(["--per-cluster-ready-timeout=1s", "--controller-group-metrics=all", "--enable-heartbeat"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kvstoremesh");
    let mut child = KillOnDrop(child);
    let log_tail = || std::fs::read_to_string(dir.path().join("kvstoremesh.log")).unwrap_or_default();

    let ready = tokio::time::timeout(CATCH_UP, async {
        while !http_get("127.0.0.1", health, "/readyz").await.is_ok_and(|(status, _)| status == 200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(ready.await.is_ok(), "kvstoremesh not ready within {CATCH_UP:?}; log:\n{}", log_tail());
    let mut expected = cached_copy("cluster2", &cluster2.state().await);
    expected.insert(
        "cilium/cache/nodes/v1/cluster4/n1".into(),
        r#"{ "Name": "n1",  "Cluster": "cluster4", "ClusterID": 4 }"#.into(),
    );
    local.expect("cluster2 and cluster4 copied, the stale export drained", "cilium/cache/", &expected).await;
    assert_eq!(
        local.get("cilium/cluster-config/cluster4").await.as_deref(),
        Some(r#"{"id":4,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#)
    );
    assert!(
        local.get("cilium/synced/cluster4/cilium/cache/serviceexports/v1").await.is_some(),
        "the canary of a kind not offered is faked, so agents do not wait for it"
    );
    assert!(local.get("cilium/cluster-config/cluster9").await.is_none());
    assert!(local.get("cilium/.heartbeat").await.is_some(), "--enable-heartbeat keeps the local heartbeat");

    let dbg = |args: &[&str]| {
        let output = Command::new(BIN)
            .args(["kvstoremesh-dbg", "-H", &format!("127.0.0.1:{api}"), "status"])
            .args(args)
            .output()
            .expect("run kvstoremesh-dbg");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("UTF-8")
    };
    let text = dbg(&[]);
    assert!(text.starts_with("KVStoreMesh:\t2/3 clusters ready\n"), "{text}");
    assert!(
        text.contains("   cluster2: ready, 1 nodes, 1 endpoints, 1 identities, 1 services, 0 failures (last: never)\n"),
        "{text}"
    );
    assert!(text.contains("   cluster9: not-ready, 0 nodes"), "{text}");
    assert!(text.contains("   └  remote configuration: expected=true, retrieved=false\n"), "{text}");
    let json: Value = serde_json::from_str(&dbg(&["-o", "json"])).expect("JSON status");
    let by_name = |name: &str| json.as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap();
    let (c2, c4, c9) = (by_name("cluster2"), by_name("cluster4"), by_name("cluster9"));
    assert_eq!((&c2["ready"], &c2["connected"], &c2["num-nodes"]), (&Value::Bool(true), &Value::Bool(true), &1.into()));
    assert_eq!(c2["config"]["cluster-id"], 2);
    assert_eq!(c2["config"]["service-exports-enabled"], false);
    assert_eq!(c2["synced"]["service-exports"], true, "{c2:#}");
    assert!(c4["synced"].get("service-exports").is_none(), "not offered, so not reported: {c4:#}");
    assert!(c9.get("ready").is_none() && c9.get("connected").is_none(), "{c9:#}");

    let (status, scraped) = http_get("127.0.0.1", metrics, "/metrics").await.expect("scrape");
    assert_eq!(status, 200);
    for line in [
        r#"cilium_kvstoremesh_remote_clusters{source_cluster="cluster1"} 3"#,
        r#"cilium_kvstoremesh_remote_cluster_readiness_status{source_cluster="cluster1",target_cluster="cluster2"} 1"#,
        r#"cilium_kvstoremesh_remote_cluster_readiness_status{source_cluster="cluster1",target_cluster="cluster9"} 0"#,
        r#"cilium_kvstoremesh_kvstore_initial_sync_completed{scope="nodes/v1",source_cluster="cluster2",action="write"} 1"#,
        r#"cilium_kvstoremesh_kvstore_sync_queue_size{scope="ip/v1",source_cluster="cluster4"} 0"#,
    ] {
        assert!(scraped.contains(line), "missing {line}\n{scraped}");
    }
    assert!(scraped.contains(r#"cilium_kvstoremesh_bootstrap_seconds{source_cluster="cluster1"} "#), "{scraped}");
    // The cache writes are timed like the clustermesh role's writes, and the process is described.
    let cache_puts = scraped.lines().find(|line| {
        line.starts_with("cilium_kvstoremesh_kvstore_operations_duration_seconds_count{")
            && line.contains(r#"kind="set""#)
            && line.contains(r#"outcome="success""#)
    });
    assert!(cache_puts.is_some_and(|line| !line.ends_with(" 0")), "cache writes timed:\n{scraped}");
    assert!(scraped.contains("cilium_kvstoremesh_kvstore_quorum_errors_total{"), "{scraped}");
    assert!(scraped.contains("process_resident_memory_bytes "), "{scraped}");

    let exit = interrupt_and_wait(&mut child.0, Duration::from_secs(15)).await;
    assert!(exit.success(), "graceful shutdown on SIGINT: {exit}");
    cluster2.stop().await;
    cluster4.stop().await;
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clustermesh_command_with_a_clustermesh_config_runs_both_roles_on_its_embedded_store() {
    init_tracing();
    let pki = Pki::new();
    let cluster2 = MeshCluster::start(&pki, "cluster2", 2).await;
    let (objects, peers) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(
        objects.path().join("node.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: cluster1-node-a\nspec:\n  addresses:\n  - type: InternalIP\n    ip: 10.1.0.1\n",
    )
    .unwrap();
    write_peer(peers.path(), "cluster2", &cluster2.store.client_url(), &pki, "remote");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (store, health, kvstoremesh_health, api) = (free(), free(), free(), free());
    let log_path = objects.path().join("server.log");
    let child = Command::new(BIN)
        .args(["clustermesh", "--cluster-name=cluster1", "--cluster-id=1"])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{store}"))
        .arg(format!("--cert-file={}", pki.server_cert_path().display()))
        .arg(format!("--key-file={}", pki.server_key_path().display()))
        .arg(format!("--trusted-ca-file={}", pki.ca_path().display()))
        .args(["--health-bind-address=127.0.0.1", &format!("--health-port={health}"), "--prometheus-serve-addr="])
        .arg(format!("--k8s-objects-dir={}", objects.path().display()))
        .arg(format!("--clustermesh-config={}", peers.path().display()))
        .arg(format!("--kvstoremesh-health-port={kvstoremesh_health}"))
        .args(["--kvstoremesh-prometheus-serve-addr=", &format!("--kvstoremesh-api-serve-addr=127.0.0.1:{api}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start the server");
    let mut child = KillOnDrop(child);
    for (what, port) in [("clustermesh", health), ("kvstoremesh", kvstoremesh_health)] {
        let ready = tokio::time::timeout(CATCH_UP, async {
            while !http_get("127.0.0.1", port, "/readyz").await.is_ok_and(|(status, _)| status == 200) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(ready.await.is_ok(), "{what} role not ready; log:\n{}", std::fs::read_to_string(&log_path).unwrap());
    }

    // An agent of cluster1 reads cluster2 from its own cluster's store, as local-cluster1.
    let agent_dir = tempfile::tempdir().unwrap();
    write_peer(agent_dir.path(), "cluster2", &format!("https://127.0.0.1:{store}"), &pki, "local-cluster1");
    let token = CancellationToken::new();
    let agent = ClusterMesh::start(agent_dir.path(), client_options("cluster1", 1), &token).await.unwrap();
    if tokio::time::timeout(CATCH_UP, agent.wait_ready()).await.is_err() {
        panic!("agent not ready: {:#?}", agent.status());
    }
    let remote = agent.remote("cluster2").unwrap();
    assert!(remote.status().config.kvstoremesh);
    assert!(remote.nodes().get("cluster2-node-a").is_some());
    agent.shutdown().await;

    let clusters =
        clustermesh_apiserver::kvstoremesh::api::fetch(&format!("127.0.0.1:{api}")).await.expect("status API");
    assert_eq!(clusters.len(), 1);
    assert!(clusters[0].ready && clusters[0].name == "cluster2", "{clusters:#?}");

    let exit = interrupt_and_wait(&mut child.0, Duration::from_secs(15)).await;
    assert!(exit.success(), "graceful shutdown on SIGINT: {exit}");
    cluster2.stop().await;
}
