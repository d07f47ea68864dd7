//! What Prometheus finds after a sync: Cilium's kvstore families on 9962, the process
//! metrics on 9962 and on the store's 9963, and quorum errors from an attached etcd that
//! went away.

use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::kvstore::instrumented::KvstoreMetrics;
use clustermesh_apiserver::kvstore::quorum::{self, QuorumCheck};
use clustermesh_apiserver::translate::Settings;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::support::etcd::http_get;
use crate::support::eventually;
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

/// The value of the first sample whose name and labels start with `series`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sync_both_listeners_serve_their_families_with_sensible_values() {
    let objects = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        objects.path().join("node.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: node-a\nspec:\n  addresses:\n  - type: InternalIP\n    ip: 10.0.0.1\n",
    )
    .expect("write manifest");
    let (client, health, metrics, etcd_metrics) = (free_port(), free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "cluster1", "--cluster-id", "1", "--auto-tls"])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
        .arg(format!("--listen-metrics-urls=http://127.0.0.1:{etcd_metrics}"))
        .arg(format!("--health-port={health}"))
        .arg("--health-bind-address=127.0.0.1")
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics}"))
        .arg("--k8s-objects-dir")
        .arg(objects.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    eventually("/readyz to answer 200", Duration::from_secs(20), || async {
        http_get("127.0.0.1", health, "/readyz").await.ok().filter(|(status, _)| *status == 200)
    })
    .await;

    let (status, body) = http_get("127.0.0.1", metrics, "/metrics").await.expect("scrape 9962");
    assert_eq!(status, 200);
    let ops = "cilium_clustermesh_apiserver_kvstore_operations_duration_seconds";
    let node_puts = format!(r#"{ops}_count{{scope="nodes/v1",kind="set",action="Update",outcome="success"}}"#);
    assert!(sample(&body, &node_puts).is_some_and(|n| n >= 1.0), "{node_puts} in\n{body}");
    let canary_puts = format!(r#"{ops}_count{{scope="synced/nodes/v1",kind="set",action="Update",outcome="success"}}"#);
    assert!(sample(&body, &canary_puts).is_some_and(|n| n >= 1.0), "{canary_puts} in\n{body}");
    let slowest_bucket = format!(r#"{ops}_bucket{{le="10.0",scope="nodes/v1""#);
    assert!(body.lines().any(|l| l.starts_with(&slowest_bucket)), "Prometheus' default buckets up to 10 s");
    let quorum = r#"cilium_clustermesh_apiserver_kvstore_quorum_errors_total{error="timeout"} "#;
    assert_eq!(sample(&body, quorum), Some(0.0), "exported, and zero, on the embedded store");
    assert!(!body.contains("cilium_clustermesh_apiserver_process_"), "process metrics carry no prefix");
    assert_process_metrics(&body, "9962");

    let (status, body) = http_get("127.0.0.1", etcd_metrics, "/metrics").await.expect("scrape 9963");
    assert_eq!(status, 200);
    assert!(sample(&body, "etcd_debugging_mvcc_keys_total ").is_some_and(|n| n >= 3.0), "{body}");
    assert_process_metrics(&body, "9963");

    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
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
