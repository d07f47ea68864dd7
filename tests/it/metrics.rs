//! What Prometheus finds after a sync, on each listener: Cilium's families on 9962
//! (`cilium_clustermesh_apiserver_*`) and 9964 (`cilium_kvstoremesh_*`), etcd 3.5's
//! `--metrics=basic` families on the store's 9963 under the names, types and labels a real
//! etcd 3.5.16 exports, the process metrics, quorum errors from an attached etcd that went away,
//! and every answer judged by promtool in both formats.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::kvstore::instrumented::KvstoreMetrics;
use clustermesh_apiserver::kvstore::quorum::{self, QuorumCheck};
use clustermesh_apiserver::translate::Settings;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::support::etcd::http_get;
use crate::support::eventually;
use crate::support::exposition::{assert_both_formats_pass, families, label_names, sample, scrape};
use crate::support::kvstoremesh::{MeshCluster, write_peer};
use crate::support::mirror::{Mirror, Target};
use crate::support::process::interrupt_and_wait;
use crate::support::{EtcdProcess, FakeApiServer, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
const PROCESS_FAMILIES: [&str; 6] = [
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn assert_process_metrics(body: &str, listener: &str) {
    for family in PROCESS_FAMILIES {
        let value = sample(body, &format!("{family} ")).unwrap_or_else(|| panic!("{family} missing on {listener}"));
        assert!(value >= 0.0, "{family} on {listener}: {value}");
    }
    assert!(sample(body, "process_resident_memory_bytes ").unwrap() > 0.0, "{listener}");
    assert!(sample(body, "process_open_fds ").unwrap() > 0.0, "{listener}");
    assert!(sample(body, "process_start_time_seconds ").unwrap() > 1e9, "{listener}: a Unix time");
}

/// A child process killed if the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NODE: &str = "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: node-a\nspec:\n  addresses:\n  - type: InternalIP\n    ip: 10.0.0.1\n";

async fn wait_ready(port: u16, what: &str, log: &std::path::Path) {
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while !http_get("127.0.0.1", port, "/readyz").await.is_ok_and(|(status, _)| status == 200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(ready.await.is_ok(), "{what} not ready; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

/// `family` is exported with exactly these label names.
fn assert_labels(body: &str, family: &str, labels: &[&str]) {
    assert!(families(body).contains_key(family), "{family} missing in\n{body}");
    assert_eq!(label_names(body, family), labels, "labels of {family}");
}

/// Cilium's kvstore families, under the role's prefix, with Cilium's labels.
fn assert_ciliums_kvstore_families(body: &str, prefix: &str) {
    for (family, labels) in [
        ("bootstrap_seconds", &["source_cluster"][..]),
        ("kvstore_operations_duration_seconds", &["action", "kind", "outcome", "scope"]),
        ("kvstore_events_queue_seconds", &["action", "scope"]),
        ("kvstore_quorum_errors_total", &["error"]),
        ("kvstore_sync_queue_size", &["scope", "source_cluster"]),
        ("kvstore_initial_sync_completed", &["action", "scope", "source_cluster"]),
        ("controllers_group_runs_total", &["group_name", "status"]),
    ] {
        assert_labels(body, &format!("{prefix}_{family}"), labels);
    }
    assert!(families(body).contains_key(&format!("{prefix}_kvstore_sync_errors_total")), "{body}");
    // Cilium's buckets, from 2 ms.
    let first_bucket = format!(r#"{prefix}_kvstore_events_queue_seconds_bucket{{le="0.002","#);
    assert!(body.lines().any(|l| l.starts_with(&first_bucket)), "{first_bucket} in\n{body}");
    let enforcer = format!(
        r#"{prefix}_controllers_group_runs_total{{group_name="clustermesh-cluster-config-enforcer",status="failure"}} 0"#
    );
    assert!(body.contains(&enforcer), "{enforcer} in\n{body}");
    assert_process_metrics(body, prefix);
}

/// etcd 3.5's `--metrics=basic` families that dashboards and alerts read, with the values a
/// single in-memory member reports.
fn assert_etcds_basic_families(body: &str) {
    for family in ETCD_BASIC_FAMILIES {
        assert!(families(body).contains_key(*family), "{family} missing on the store's listener:\n{body}");
    }
    for (series, value) in [
        ("etcd_server_has_leader ", 1.0),
        ("etcd_server_is_leader ", 1.0),
        ("etcd_server_leader_changes_seen_total ", 1.0),
        ("etcd_server_proposals_pending ", 0.0),
        ("etcd_server_proposals_failed_total ", 0.0),
        (r#"etcd_cluster_version{cluster_version="3.5"} "#, 1.0),
    ] {
        assert_eq!(sample(body, series), Some(value), "{series}");
    }
    let committed = sample(body, "etcd_server_proposals_committed_total ").expect("committed");
    assert!(committed > 0.0, "the sync's writes are proposals");
    assert_eq!(sample(body, "etcd_server_proposals_applied_total "), Some(committed), "applied as committed");
    assert!(sample(body, "etcd_mvcc_put_total ").is_some_and(|n| n >= 3.0), "{body}");
    assert!(sample(body, "etcd_debugging_mvcc_keys_total ").is_some_and(|n| n >= 3.0), "{body}");
    assert!(sample(body, "etcd_mvcc_db_total_size_in_bytes ").is_some_and(|n| n > 0.0), "{body}");
    assert!(sample(body, "etcd_debugging_lease_granted_total ").is_some_and(|n| n >= 1.0), "{body}");
    assert!(!families(body).contains_key("etcd_debugging_lease_total"), "not an etcd name");
    assert!(families(body).contains_key("clustermesh_store_leases"), "its equivalent, under our prefix");
    // The mirror's values are its own allocations, shared with the store and not packed.
    assert!(sample(body, "clustermesh_store_value_held_bytes ").is_some_and(|n| n > 0.0), "{body}");
    assert_eq!(sample(body, "clustermesh_store_value_dictionaries "), Some(0.0), "{body}");
    // Every method of every service from the start, every code, as etcd's gRPC server registers them.
    let started = body.lines().filter(|l| l.starts_with("grpc_server_started_total{")).count();
    assert_eq!(started, 41, "{body}");
    let never_called = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.Maintenance",grpc_method="Defragment",grpc_code="DataLoss"} 0"#;
    assert!(body.contains(never_called), "{body}");
    assert_labels(body, "grpc_server_handled_total", &["grpc_code", "grpc_method", "grpc_service", "grpc_type"]);
    assert_process_metrics(body, "the store");
}

/// The etcd families this store claims: what a real etcd 3.5.16 exports under `--metrics=basic`
/// (see `the_stores_etcd_families_are_named_typed_and_labelled_as_a_real_etcd_3_5s`).
const ETCD_BASIC_FAMILIES: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_is_learner",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_id",
    "etcd_server_version",
    "etcd_cluster_version",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_quota_backend_bytes",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_debugging_server_lease_expired_total",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sync_every_listener_serves_ciliums_and_etcds_families_and_promtool_passes_both_formats() {
    let pki = Pki::new();
    let cluster2 = MeshCluster::start(&pki, "cluster2", 2).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (objects, peers) = (dir.path().join("objects"), dir.path().join("peers"));
    std::fs::create_dir_all(&objects).expect("objects dir");
    std::fs::create_dir_all(&peers).expect("peers dir");
    std::fs::write(objects.join("node.yaml"), NODE).expect("write manifest");
    write_peer(&peers, "cluster2", &cluster2.store.client_url(), &pki, "remote");
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, "users:\n- name: remote-cluster2\n  role: remote\n").expect("users file");
    let [client, store_metrics, health, metrics, mesh_health, mesh_metrics] = [(); 6].map(|()| free_port());
    let log = dir.path().join("server.log");
    let child = Command::new(BIN)
        .args(["clustermesh", "--cluster-name=cluster1", "--cluster-id=1", "--auto-tls"])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
        .arg(format!("--listen-metrics-urls=http://127.0.0.1:{store_metrics}"))
        .args(["--health-bind-address=127.0.0.1", &format!("--health-port={health}")])
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics}"))
        .arg(format!("--k8s-objects-dir={}", objects.display()))
        .arg("--cluster-users-enabled")
        .arg(format!("--cluster-users-config-path={}", users.display()))
        .arg(format!("--clustermesh-config={}", peers.display()))
        .arg(format!("--kvstoremesh-health-port={mesh_health}"))
        .arg(format!("--kvstoremesh-prometheus-serve-addr=127.0.0.1:{mesh_metrics}"))
        .arg("--kvstoremesh-api-serve-addr=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the server");
    let mut child = Running(child);
    wait_ready(health, "the clustermesh role", &log).await;
    wait_ready(mesh_health, "the kvstoremesh role", &log).await;

    // 9962: the mirror's writes, Cilium's way.
    let users_synced = r#"cilium_clustermesh_apiserver_controllers_group_runs_total{group_name="clustermesh-users-management",status="success"} "#;
    let body = eventually("the users file synced once", Duration::from_secs(10), || async {
        let (_, body) = scrape(metrics, "*/*").await.ok()?;
        sample(&body, users_synced).filter(|n| *n >= 1.0).map(|_| body)
    })
    .await;
    let prefix = "cilium_clustermesh_apiserver";
    assert_ciliums_kvstore_families(&body, prefix);
    let bootstrap = sample(&body, &format!(r#"{prefix}_bootstrap_seconds{{source_cluster="cluster1"}} "#));
    assert!(bootstrap.is_some_and(|s| s > 0.0), "{body}");
    let ops = format!("{prefix}_kvstore_operations_duration_seconds");
    let node_puts = format!(r#"{ops}_count{{scope="nodes/v1",kind="set",action="Update",outcome="success"}}"#);
    assert!(sample(&body, &node_puts).is_some_and(|n| n >= 1.0), "{node_puts} in\n{body}");
    let slowest_bucket = format!(r#"{ops}_bucket{{le="10.0",scope="nodes/v1""#);
    assert!(body.lines().any(|l| l.starts_with(&slowest_bucket)), "Prometheus' default buckets up to 10 s");
    let node_queued = format!(r#"{prefix}_kvstore_events_queue_seconds_count{{scope="nodes/v1",action="create"}}"#);
    assert!(sample(&body, &node_queued).is_some_and(|n| n >= 1.0), "{node_queued} in\n{body}");
    let quorum = format!(r#"{prefix}_kvstore_quorum_errors_total{{error="timeout"}} "#);
    assert_eq!(sample(&body, &quorum), Some(0.0), "exported, and zero, on the embedded store");
    assert!(!body.contains("api_limiter"), "the embedded store is not reached through the etcd client's limiter");
    assert!(!body.contains(&format!("{prefix}_process_")), "process metrics carry no prefix");

    // 9964: the cache writes, Cilium's way.
    let (_, body) = scrape(mesh_metrics, "*/*").await.expect("scrape 9964");
    let prefix = "cilium_kvstoremesh";
    assert_ciliums_kvstore_families(&body, prefix);
    assert_labels(&body, "cilium_kvstoremesh_remote_cluster_readiness_status", &["source_cluster", "target_cluster"]);
    assert!(sample(&body, r#"cilium_kvstoremesh_bootstrap_seconds{source_cluster="cluster1"} "#).is_some(), "{body}");
    let cached_nodes = r#"cilium_kvstoremesh_kvstore_events_queue_seconds_count{scope="nodes/v1",action="create"}"#;
    assert!(sample(&body, cached_nodes).is_some_and(|n| n >= 1.0), "{cached_nodes} in\n{body}");

    // 9963: the store, etcd's way.
    let (_, body) = scrape(store_metrics, "*/*").await.expect("scrape 9963");
    assert_etcds_basic_families(&body);

    for (port, what) in [(metrics, "9962"), (store_metrics, "9963"), (mesh_metrics, "9964")] {
        assert_both_formats_pass(port, what).await;
    }

    let status = interrupt_and_wait(&mut child.0, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    cluster2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_attached_etcd_both_roles_report_the_etcd_clients_rate_limiter_as_ciliums() {
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let cluster2 = MeshCluster::start(&pki, "cluster2", 2).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (objects, peers) = (dir.path().join("objects"), dir.path().join("peers"));
    std::fs::create_dir_all(&objects).expect("objects dir");
    std::fs::create_dir_all(&peers).expect("peers dir");
    std::fs::write(objects.join("node.yaml"), NODE).expect("write manifest");
    write_peer(&peers, "cluster2", &cluster2.store.client_url(), &pki, "remote");
    let etcd_config = write_peer(dir.path(), "etcd-config.yaml", &etcd.client_url(), &pki, "root");
    let etcd_config = format!("--kvstore-opt=etcd.config={}", etcd_config.display());
    let [health, metrics, mesh_health, mesh_metrics] = [(); 4].map(|()| free_port());
    let log = dir.path().join("clustermesh.log");
    let clustermesh = Command::new(BIN)
        .args(["clustermesh", "--cluster-name=cluster1", "--cluster-id=1", "--kvstore=etcd", &etcd_config])
        .args([
            "--kvstore-opt=etcd.qps=50",
            "--kvstore-opt=etcd.bootstrapQps=10000",
            "--kvstore-opt=etcd.maxInflight=7",
        ])
        .args(["--health-bind-address=127.0.0.1", &format!("--health-port={health}")])
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics}"))
        .arg(format!("--k8s-objects-dir={}", objects.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start clustermesh");
    let mut clustermesh = Running(clustermesh);
    let mesh_log = dir.path().join("kvstoremesh.log");
    let kvstoremesh = Command::new(BIN)
        .args(["kvstoremesh", "--cluster-name=cluster1", "--cluster-id=1", &etcd_config])
        .args(["--kvstore-opt=etcd.qps=100", "--kvstore-opt=etcd.maxInflight=10"])
        .arg(format!("--clustermesh-config={}", peers.display()))
        .args(["--health-bind-address=127.0.0.1", &format!("--health-port={mesh_health}")])
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{mesh_metrics}"))
        .arg("--api-serve-addr=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&mesh_log).expect("log"))
        .spawn()
        .expect("start kvstoremesh");
    let mut kvstoremesh = Running(kvstoremesh);
    wait_ready(health, "clustermesh", &log).await;
    wait_ready(mesh_health, "kvstoremesh", &mesh_log).await;

    for (port, prefix, rate, in_flight_limit) in
        [(metrics, "cilium_clustermesh_apiserver", 50.0, 7.0), (mesh_metrics, "cilium_kvstoremesh", 100.0, 10.0)]
    {
        let limit = format!(r#"{prefix}_api_limiter_rate_limit{{api_call="etcd",value="limit"}} "#);
        // The bootstrap rate gives way to etcd.qps once the first sync is done.
        let body = eventually(&format!("{prefix}: the steady rate"), Duration::from_secs(10), || async {
            let (_, body) = scrape(port, "*/*").await.ok()?;
            (sample(&body, &limit) == Some(rate)).then_some(body)
        })
        .await;
        let processed = format!(
            r#"{prefix}_api_limiter_processed_requests_total{{api_call="etcd",outcome="success",return_code="200"}} "#
        );
        assert!(sample(&body, &processed).is_some_and(|n| n >= 1.0), "{processed} in\n{body}");
        assert_labels(
            &body,
            &format!("{prefix}_api_limiter_processed_requests_total"),
            &["api_call", "outcome", "return_code"],
        );
        for family in ["processing_duration_seconds", "wait_duration_seconds", "requests_in_flight", "rate_limit"] {
            assert_labels(&body, &format!("{prefix}_api_limiter_{family}"), &["api_call", "value"]);
        }
        let in_flight = format!(r#"{prefix}_api_limiter_requests_in_flight{{api_call="etcd",value="limit"}} "#);
        assert_eq!(sample(&body, &in_flight), Some(in_flight_limit), "etcd.maxInflight");
        let burst = format!(r#"{prefix}_api_limiter_rate_limit{{api_call="etcd",value="burst"}} "#);
        assert_eq!(sample(&body, &burst), Some(rate), "one second of requests");
        assert_ciliums_kvstore_families(&body, prefix);
        assert_both_formats_pass(port, prefix).await;
    }

    for (child, what) in [(&mut clustermesh, "clustermesh"), (&mut kvstoremesh, "kvstoremesh")] {
        let status = interrupt_and_wait(&mut child.0, Duration::from_secs(15)).await;
        assert!(status.success(), "{what} exit status {status}");
    }
    cluster2.stop().await;
}

/// A family's type on our listener matches etcd's: the same, or untyped for an etcd gauge whose
/// name ends in `_total`, which promtool refuses as a gauge.
fn compatible(ours: &str, etcds: &str, family: &str) -> bool {
    ours == etcds || (ours == "untyped" && etcds == "gauge" && family.ends_with("_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_etcd_families_are_named_typed_and_labelled_as_a_real_etcd_3_5s() {
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let etcd_port: u16 = etcd.metrics_url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("metrics port");
    let (_, etcds) = scrape(etcd_port, "*/*").await.expect("scrape etcd");
    let (client, store_metrics) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args(["kvstore", "--auto-tls", &format!("--listen-client-urls=https://127.0.0.1:{client}")])
        .arg(format!("--listen-metrics-urls=http://127.0.0.1:{store_metrics}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the store");
    let mut child = Running(child);
    let (_, ours) = eventually("the store's metrics", Duration::from_secs(10), || async {
        scrape(store_metrics, "*/*").await.ok()
    })
    .await;

    let (etcd_families, our_families) = (families(&etcds), families(&ours));
    let mismatch: BTreeMap<&str, String> = ETCD_BASIC_FAMILIES
        .iter()
        .filter_map(|family| {
            let (mine, theirs) = (our_families.get(*family), etcd_families.get(*family));
            let same_labels = label_names(&ours, family) == label_names(&etcds, family);
            match (mine, theirs) {
                (Some(mine), Some(theirs)) if compatible(mine, theirs, family) && same_labels => None,
                _ => Some((
                    *family,
                    format!(
                        "ours {mine:?} {:?}, etcd's {theirs:?} {:?}",
                        label_names(&ours, family),
                        label_names(&etcds, family)
                    ),
                )),
            }
        })
        .collect();
    assert!(mismatch.is_empty(), "families that drifted from etcd 3.5.16's: {mismatch:#?}");
    // And no etcd-looking family of ours that etcd does not have.
    let invented: Vec<&String> = our_families
        .keys()
        .filter(|f| f.starts_with("etcd_") || f.starts_with("grpc_"))
        .filter(|f| !etcd_families.contains_key(*f))
        .collect();
    assert!(invented.is_empty(), "not etcd 3.5.16 names: {invented:?}");
    assert_eq!(
        sample(&etcds, "etcd_server_has_leader "),
        sample(&ours, "etcd_server_has_leader "),
        "a single member leads, as etcd's does"
    );
    assert_eq!(sample(&etcds, "etcd_server_leader_changes_seen_total "), Some(1.0));
    assert_eq!(sample(&ours, "etcd_server_leader_changes_seen_total "), Some(1.0));

    let status = interrupt_and_wait(&mut child.0, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_an_attached_etcd_are_timed_under_the_same_names() {
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let fake = FakeApiServer::start().await;
    let target = Target::etcd(etcd.client(&pki, "root").await);
    let mut mirror = Mirror::start(&target, Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;
    let text = mirror.metrics();
    let ops = "cilium_clustermesh_apiserver_kvstore_operations_duration_seconds";
    for scope in ["cluster-config", "heartbeat", "synced/nodes/v1"] {
        let series = format!(r#"{ops}_count{{scope="{scope}",kind="set",action="Update",outcome="success"}}"#);
        assert!(sample(&text, &series).is_some_and(|n| n >= 1.0), "{series} in\n{text}");
    }
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_etcd_that_stops_answering_counts_quorum_errors_and_turns_unreachable_after_two() {
    let pki = Pki::new();
    let mut etcd = EtcdProcess::start(&pki).await;
    let client = etcd.client(&pki, "root").await;
    let metrics = KvstoreMetrics::register(&mut Registry::default());
    let token = CancellationToken::new();
    let (reachable, reachable_rx) = tokio::sync::watch::channel(true);
    let check = QuorumCheck { interval: Duration::from_millis(200), max_consecutive_errors: 2 };
    let check = tokio::spawn(quorum::run(
        client,
        "cilium/.heartbeat",
        metrics.quorum_errors.clone(),
        reachable,
        check,
        token.clone(),
    ));
    let total = || {
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("q", "", metrics.quorum_errors.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.lines()
            .filter(|l| l.starts_with("q_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(total(), 0.0, "a healthy etcd answers every check");
    assert!(*reachable_rx.borrow(), "reachable while it answers");

    etcd.kill();
    eventually("a quorum error to be counted", Duration::from_secs(10), || async { (total() > 0.0).then_some(()) })
        .await;
    eventually("two failures in a row to make the store unreachable", Duration::from_secs(10), || async {
        (!*reachable_rx.borrow()).then_some(())
    })
    .await;
    assert!(total() >= 2.0, "unreachable only after two failed checks, counted {}", total());
    token.cancel();
    check.await.expect("the check stops on shutdown");
}
