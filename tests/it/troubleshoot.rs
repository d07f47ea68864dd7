//! `clustermesh-dbg troubleshoot` and `kvstoremesh-dbg troubleshoot` (what `cilium sysdump`
//! runs in the pod): each check of an etcd client file printed, and a failed one failing the
//! command with the step that broke named.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::{EmbeddedStore, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

fn run(args: &[&str], paths: &[&Path]) -> (Output, String) {
    let output = Command::new(BIN).args(args).args(paths).output().expect("run");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_local_etcd_passes_every_check() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pki.write_peer_config(dir.path(), "etcd-config.yaml", &store.client_url(), "admin-cluster1", "");

    let (output, text) = run(&["clustermesh-dbg", "troubleshoot", "--etcd-config"], &[&config]);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    for step in [
        "✅ TCP connection successfully established",
        "✅ TLS connection successfully established",
        "ℹ️  Etcd server version: 3.5",
        "Subject:             CN=admin-cluster1",
        "✅ Etcd connection successfully established",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_checks_each_remote_and_its_cluster_config_and_the_local_etcd() {
    let pki = Pki::new();
    let local = EmbeddedStore::start(&pki).await;
    let remote = EmbeddedStore::start(&pki).await;
    let mut client = remote.client(&pki, "root").await;
    client.put("cilium/cluster-config/cluster2", r#"{"id":2}"#, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("clustermesh");
    std::fs::create_dir_all(&mesh).unwrap();
    pki.write_peer_config(&mesh, "cluster2", &remote.client_url(), "remote-cluster1", "");
    let local_config = pki.write_peer_config(dir.path(), "etcd-config.yaml", &local.client_url(), "admin-cluster1", "");

    let (output, text) = run(
        &["kvstoremesh-dbg", "troubleshoot", "--include-local", "--etcd-config"],
        &[&local_config, Path::new("--clustermesh-config"), &mesh],
    );
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("Local etcd:") && text.contains("Remote cluster \"cluster2\":"), "{text}");
    assert!(text.contains(r#"✅ Cluster configuration found: {"id":2}"#), "{text}");

    // A cluster asked for by name that is not configured is a failure.
    let (output, text) = run(&["kvstoremesh-dbg", "troubleshoot", "cluster9", "--clustermesh-config"], &[&mesh]);
    assert!(!output.status.success() && text.contains("❌ Remote cluster \"cluster9\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_fails_at_the_step_that_breaks() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();

    // The server's certificate is not signed by the CA the file trusts.
    let foreign =
        format!("endpoints:\n- {}\ntrusted-ca-file: {}\n", store.client_url(), pki.foreign_ca_path().display());
    let config = dir.path().join("foreign.yaml");
    std::fs::write(&config, foreign).unwrap();
    let (output, text) = run(&["clustermesh-dbg", "troubleshoot", "--timeout", "2s", "--etcd-config"], &[&config]);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("✅ TCP connection") && text.contains("❌ Cannot establish TLS connection"), "{text}");

    // Nothing listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = pki.write_peer_config(dir.path(), "closed.yaml", &format!("https://{closed}"), "admin-cluster1", "");
    let (output, text) = run(&["clustermesh-dbg", "troubleshoot", "--timeout", "2s", "--etcd-config"], &[&config]);
    assert!(!output.status.success() && text.contains("❌ Cannot establish TCP connection"), "{text}");
}
