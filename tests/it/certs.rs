//! `certs generate` writes certificates that our store and a real etcd both accept, with the
//! users Cilium's roles expect.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::Limits;
use etcd_client::{Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::support::etcd::ServerFiles;
use crate::support::{EmbeddedStore, EtcdProcess, install_crypto_provider};

fn generate(out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args(["certs", "generate", "--cluster-name", "cluster1", "--out"])
        .arg(out)
        .status()
        .expect("run certs generate");
    assert!(status.success(), "certs generate failed");
}

fn server_files(out: &Path) -> ServerFiles {
    let dir = out.join("clustermesh-apiserver-server-cert");
    ServerFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}

/// A client authenticated by one of the generated Secrets.
async fn client_from_secret(out: &Path, secret: &str, endpoint: &str) -> Client {
    let dir = out.join(secret);
    let read = |f: &str| std::fs::read(dir.join(f)).expect("read certificate file");
    let tls = TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("tls.crt"), read("tls.key")));
    let options = ConnectOptions::new().with_tls(tls).with_connect_timeout(Duration::from_secs(5));
    Client::connect([format!("https://{endpoint}")], Some(options)).await.expect("connect")
}

async fn put_and_read_back(client: &mut Client) -> Result<String, etcd_client::Error> {
    client.put("cilium/state/nodes/v1/cluster1/n1", "v", None).await?;
    let response = client.get("cilium/state/nodes/v1/", Some(GetOptions::new().with_prefix())).await?;
    Ok(String::from_utf8_lossy(response.kvs()[0].value()).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_certificates_carry_ciliums_users_into_our_store() {
    install_crypto_provider();
    let out = tempfile::tempdir().expect("temp dir");
    generate(out.path());
    let store =
        EmbeddedStore::start_with_files(&server_files(out.path()), AuthStore::cilium("cluster1"), Limits::default())
            .await;
    let mut admin = client_from_secret(out.path(), "clustermesh-apiserver-admin-cert", &store.endpoint()).await;
    assert_eq!(put_and_read_back(&mut admin).await.expect("admin writes and reads"), "v");

    let mut remote = client_from_secret(out.path(), "clustermesh-apiserver-remote-cert", &store.endpoint()).await;
    let read = remote.get("cilium/state/nodes/v1/cluster1/n1", None).await.expect("remote reads state");
    assert_eq!(read.kvs().len(), 1);
    let denied = remote.put("cilium/state/nodes/v1/cluster1/n2", "x", None).await.expect_err("remote cannot write");
    assert!(denied.to_string().contains("permission denied"), "{denied}");

    let mut local = client_from_secret(out.path(), "clustermesh-apiserver-local-cert", &store.endpoint()).await;
    let denied = local.get("cilium/state/nodes/v1/cluster1/n1", None).await.expect_err("local cannot read state");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_certificates_are_accepted_by_a_real_etcd() {
    let out = tempfile::tempdir().expect("temp dir");
    generate(out.path());
    let etcd = EtcdProcess::start_with_files(&server_files(out.path())).await;
    let mut admin = client_from_secret(out.path(), "clustermesh-apiserver-admin-cert", &etcd.endpoint()).await;
    assert_eq!(put_and_read_back(&mut admin).await.expect("etcd accepts the admin certificate"), "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_ca_is_reused_so_every_cluster_of_a_mesh_shares_one_trust_root() {
    let first = tempfile::tempdir().expect("temp dir");
    generate(first.path());
    let second = tempfile::tempdir().expect("temp dir");
    let ca = first.path().join("cilium-ca");
    let status = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args(["certs", "generate", "--cluster-name", "cluster2", "--remote-user", "per-cluster", "--out"])
        .arg(second.path())
        .arg("--ca-cert")
        .arg(ca.join("ca.crt"))
        .arg("--ca-key")
        .arg(ca.join("ca.key"))
        .status()
        .expect("run certs generate");
    assert!(status.success());
    // cluster2's remote certificate (user remote-cluster2) is trusted by cluster1's store.
    let store =
        EmbeddedStore::start_with_files(&server_files(first.path()), AuthStore::default(), Limits::default()).await;
    let mut remote = client_from_secret(second.path(), "clustermesh-apiserver-remote-cert", &store.endpoint()).await;
    remote.put("k", "v", None).await.expect("a certificate from the shared CA is accepted");
    store.stop().await;
}
