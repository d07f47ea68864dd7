//! `status` and `watch`: a remote agent's view of a cluster, from the command line.

use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::translate::Settings;
use serde_json::{Value, json};

use crate::support::mirror::{Mirror, Target};
use crate::support::process::{interrupt_and_wait, stdout_lines};
use crate::support::{EmbeddedStore, FakeApiServer, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

/// A clustermesh config directory with one remote, `cluster1`, pointing at `store`.
fn config_dir(pki: &Pki, store: &EmbeddedStore) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = pki.client("remote");
    let config = format!(
        "endpoints:\n- {}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
        store.client_url(),
        pki.ca_path().display(),
        client.cert_path.display(),
        client.key_path.display()
    );
    std::fs::write(dir.path().join("cluster1"), config).expect("write config");
    dir
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
           "spec": {"addresses": [{"type": "InternalIP", "ip": "10.0.0.1"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_synced_remote_in_words_and_in_json() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a"));
    let mut mirror = Mirror::start(&Target::embedded(&store), Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;
    let dir = config_dir(&pki, &store);

    let run = |format: &'static str| {
        let dir = dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["status", "--cluster-name", "local", "--cluster-id", "9", "--wait", "15s", "-o", format])
                .arg("--clustermesh-config")
                .arg(dir)
                .output()
                .expect("run status")
        })
    };
    let json_output = run("json").await.expect("join");
    assert!(json_output.status.success(), "{}", String::from_utf8_lossy(&json_output.stderr));
    let status: Value = serde_json::from_slice(&json_output.stdout).expect("JSON status");
    let remote = &status["remotes"][0];
    assert_eq!(remote["name"], "cluster1");
    assert_eq!(remote["ready"], true);
    assert_eq!(remote["config"]["cluster-id"], 1);
    assert_eq!(remote["prefixes"]["nodes"]["entries"], 1);

    let text_output = run("text").await.expect("join");
    let text = String::from_utf8_lossy(&text_output.stdout);
    assert!(text.starts_with("1/1 remote clusters ready"), "{text}");
    assert!(text.contains("- cluster1: ready"), "{text}");
    mirror.stop().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fails_while_a_remote_cannot_be_reached() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let dir = config_dir(&pki, &store);
    store.stop().await;
    let output = Command::new(BIN)
        .args(["status", "--wait", "1s", "--clustermesh-config"])
        .arg(dir.path())
        .output()
        .expect("run status");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("0/1 remote clusters ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_json_line_per_change() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a"));
    let mut mirror = Mirror::start(&Target::embedded(&store), Settings::new("cluster1", 1), fake.client());
    mirror.wait_ready().await;
    let dir = config_dir(&pki, &store);
    let mut child = Command::new(BIN)
        .args(["watch", "--clustermesh-config"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let mut rx = stdout_lines(&mut child);
    let mut next_node_event = async || loop {
        let line = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await.expect("a line").expect("open");
        let event: Value = serde_json::from_str(&line).expect("JSON line");
        if event["kind"] == "nodes" {
            return event;
        }
    };
    let first = next_node_event().await;
    assert_eq!((first["cluster"].as_str(), first["op"].as_str()), (Some("cluster1"), Some("upsert")));
    assert_eq!(first["key"], "cilium/state/nodes/v1/cluster1/node-a");
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-a");
    let deleted = next_node_event().await;
    assert_eq!(deleted["op"], "delete");
    let status = interrupt_and_wait(&mut child, Duration::from_secs(15)).await;
    assert!(status.success(), "watch exits cleanly: {status}");
    mirror.stop().await;
    store.stop().await;
}
