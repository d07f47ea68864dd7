//! The binary as an operator runs it: flags validated, ready after the initial sync, and a
//! clean exit on SIGINT.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::etcd::http_get;
use crate::support::eventually;

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

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within 15 s of SIGINT");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
