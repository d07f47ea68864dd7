//! The binary as an operator runs it: flags validated, ready after the initial sync, and a
//! clean exit on SIGINT.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::etcd::http_get;
use crate::support::eventually;
use crate::support::process::{interrupt_and_wait, stdout_lines};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn an_invalid_cluster_name_is_refused_with_a_clear_error() {
    let output = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "Bad_Name", "--cluster-id", "1", "--auto-tls"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid --cluster-name \"Bad_Name\""), "{stderr}");
}

#[test]
fn a_cluster_id_outside_the_mesh_size_is_refused() {
    let output = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "c1", "--cluster-id", "300", "--auto-tls"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid --cluster-id 300"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_turns_ready_after_its_initial_sync_and_exits_cleanly_on_sigint() {
    let objects = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        objects.path().join("node.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: node-a\nspec:\n  addresses:\n  - type: InternalIP\n    ip: 10.0.0.1\n",
    )
    .expect("write manifest");
    let (client, health, metrics) = (free_port(), free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "cluster1", "--cluster-id", "1", "--auto-tls"])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
        .arg(format!("--health-port={health}"))
        .arg("--health-bind-address=127.0.0.1")
        .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics}"))
        .arg("--k8s-objects-dir")
        .arg(objects.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    eventually("/readyz to answer 200", Duration::from_secs(20), || async {
        http_get("127.0.0.1", health, "/readyz").await.ok().filter(|(status, _)| *status == 200)
    })
    .await;
    let (status, body) = http_get("127.0.0.1", metrics, "/metrics").await.expect("scrape");
    assert_eq!(status, 200);
    assert!(body.contains("cilium_clustermesh_apiserver_bootstrap_seconds"), "{body}");

    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_each_cluster_to_the_other_and_stops_on_sigint() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "demo", "--examples"])
        .arg(&examples)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let mut rx = stdout_lines(&mut child);
    let wanted = [
        "[cluster1 sees cluster2] + services cluster2/demo/echo",
        "[cluster2 sees cluster1] + services cluster1/demo/echo",
    ];
    let mut seen = Vec::new();
    while !wanted.iter().all(|w| seen.iter().any(|line: &String| line == w)) {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(line)) => seen.push(line),
            _ => panic!("the demo did not show both clusters; printed:\n{}", seen.join("\n")),
        }
    }
    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_serves_etcds_metric_names_and_health_on_its_metrics_listener() {
    let (client, metrics) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["kvstore", "--auto-tls"])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
        .arg(format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the store");
    let (_, health) = eventually("/health to answer", Duration::from_secs(20), || async {
        http_get("127.0.0.1", metrics, "/health").await.ok()
    })
    .await;
    assert_eq!(health, r#"{"health":"true","reason":""}"#);
    let (status, body) = http_get("127.0.0.1", metrics, "/metrics").await.expect("scrape");
    assert_eq!(status, 200);
    for series in [
        "etcd_server_has_leader 1",
        "etcd_debugging_mvcc_keys_total 0",
        "etcd_mvcc_db_total_size_in_bytes 0",
        "etcd_debugging_mvcc_watcher_total 0",
        "etcd_debugging_mvcc_watch_stream_total 0",
        "etcd_debugging_mvcc_current_revision 1",
    ] {
        assert!(body.contains(series), "{series} missing from\n{body}");
    }
    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_added_at_run_time_survive_a_restart_on_the_same_data_directory() {
    let pki = crate::support::Pki::new();
    let data = tempfile::tempdir().expect("data dir");
    // A new port for each start: the data directory is what must carry over, and a port given
    // back by the first process could be taken by another test's server meanwhile.
    let start = |port: u16| {
        Command::new(BIN)
            .args(["kvstore", "--cluster-name=cluster1", "--data-dir"])
            .arg(data.path())
            .arg(format!("--listen-client-urls=https://127.0.0.1:{port}"))
            .arg("--cert-file")
            .arg(pki.server_cert_path())
            .arg("--key-file")
            .arg(pki.server_key_path())
            .arg("--trusted-ca-file")
            .arg(pki.ca_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the store")
    };
    let admin = |port: u16| {
        let pki = &pki;
        move || async move {
            let url = format!("https://127.0.0.1:{port}");
            let mut client = crate::support::connect(&url, pki, "admin-cluster1").await.ok()?;
            client.user_list().await.ok().map(|list| (client, list.users().to_vec()))
        }
    };

    let port = free_port();
    let mut first = start(port);
    let (mut client, users) = eventually("the store to answer", Duration::from_secs(20), admin(port)).await;
    assert!(users.contains(&"remote".to_owned()), "{users:?}");
    let no_password = Some(etcd_client::UserAddOptions::new().with_no_pwd());
    client.user_add("remote-cluster2", "", no_password).await.expect("user added");
    client.user_grant_role("remote-cluster2", "remote").await.expect("role granted");
    // Saved within a second of the change; a clean stop saves once more in any case.
    let status = interrupt_and_wait(&mut first, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");

    let port = free_port();
    let mut second = start(port);
    let (_, users) = eventually("the store to answer again", Duration::from_secs(20), admin(port)).await;
    assert!(users.contains(&"remote-cluster2".to_owned()), "lost across the restart: {users:?}");
    interrupt_and_wait(&mut second, Duration::from_secs(15)).await;
}

/// Cilium's health answers, from the binary watching a Kubernetes API through a rate-limited
/// client: `/readyz` 200 `Ready` after the initial sync; `/healthz` 200 `ok` while the API
/// server answers and 500 with the error once it is gone; `/livez` 200 throughout, so that a
/// liveness probe never restarts the pod for an API server outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_as_ciliums_and_healthz_follows_the_kubernetes_api_server() {
    let fake = crate::support::FakeApiServer::start().await;
    fake.apply(serde_json::json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "node-a"},
        "spec": {"addresses": [{"type": "InternalIP", "ip": "10.0.0.1"}]}}));
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    crate::support::server::write_kubeconfig(&kubeconfig, &fake.url());
    let (client, health) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "cluster1", "--cluster-id", "1", "--auto-tls"])
        .args(["--k8s-client-qps=20", "--k8s-client-burst=5", "--prometheus-serve-addr="])
        .arg(format!("--listen-client-urls=https://127.0.0.1:{client}"))
        .arg(format!("--health-port={health}"))
        .arg("--health-bind-address=127.0.0.1")
        .arg(format!("--k8s-kubeconfig-path={}", kubeconfig.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    let ready = eventually("/readyz to answer 200", Duration::from_secs(20), || async {
        http_get("127.0.0.1", health, "/readyz").await.ok().filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!(ready, (200, "Ready".to_owned()));
    assert_eq!(http_get("127.0.0.1", health, "/healthz").await.expect("healthz"), (200, "ok".to_owned()));

    fake.stop().await;
    let (_, error) = eventually("/healthz to answer 500", Duration::from_secs(20), || async {
        http_get("127.0.0.1", health, "/healthz").await.ok().filter(|(status, _)| *status == 500)
    })
    .await;
    assert!(!error.is_empty(), "the error is told");
    assert_eq!(http_get("127.0.0.1", health, "/livez").await.expect("livez"), (200, "ok".to_owned()));

    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_kubernetes_client_rate_that_cannot_be_met_is_refused() {
    let output = Command::new(BIN)
        .args(["clustermesh", "--cluster-name", "c1", "--cluster-id", "1", "--auto-tls", "--k8s-client-qps=0"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--k8s-client-qps must be a positive number"));
}
