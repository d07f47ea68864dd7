//! `--cluster-users-enabled`: the users file decides which `remote-<peer>` users exist, in
//! our embedded store (whose certificates then open or stop opening) and in an attached etcd.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::Limits;
use clustermesh_apiserver::users::{EmbeddedUsers, EtcdUsers, UserAdmin, UsersManager};
use tokio_util::sync::CancellationToken;

use crate::support::{EmbeddedStore, EtcdProcess, Pki, eventually};

const NODE: &str = "cilium/state/nodes/v1/cluster1/node-a";
const POLL: Duration = Duration::from_millis(50);

fn write_users(path: &Path, users: &[&str]) {
    let entries: String = users.iter().map(|u| format!("- name: {u}\n  role: remote\n")).collect();
    let text = if users.is_empty() { "users: []\n".to_owned() } else { format!("users:\n{entries}") };
    // Written aside and renamed in, as the kubelet swaps a ConfigMap volume.
    let staged = path.with_extension("tmp");
    std::fs::write(&staged, text).expect("write users file");
    std::fs::rename(&staged, path).expect("rename users file");
}

fn manage<A: UserAdmin>(admin: A, path: &Path, token: &CancellationToken) -> tokio::task::JoinHandle<()> {
    let manager = UsersManager::new(admin, path.to_owned(), "cluster1".into());
    tokio::spawn(manager.run(POLL, token.child_token()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_certificate_opens_the_embedded_store_once_listed_and_not_after_removal() {
    let pki = Pki::new();
    let store = EmbeddedStore::start_with(&pki, AuthStore::cilium("cluster1"), Limits::default()).await;
    store.client(&pki, "root").await.put(NODE, "{}", None).await.expect("admin put");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("users.yaml");
    write_users(&path, &[]);
    let token = CancellationToken::new();
    let task = manage(EmbeddedUsers(Arc::clone(&store.store)), &path, &token);

    let mut peer = store.client(&pki, "remote-cluster2").await;
    assert!(peer.get(NODE, None).await.is_err(), "an unlisted peer is refused");

    write_users(&path, &["remote-cluster2", "cluster1"]);
    eventually("remote-cluster2 to read the state", Duration::from_secs(10), || async {
        peer.clone().get(NODE, None).await.ok().filter(|r| r.count() == 1)
    })
    .await;
    assert!(!store.store.auth().read().user_list().contains(&"cluster1".to_owned()), "own name skipped");

    write_users(&path, &["remote-cluster3"]);
    eventually("remote-cluster2 to be refused again", Duration::from_secs(10), || async {
        peer.clone().get(NODE, None).await.is_err()
    })
    .await;
    assert!(store.store.auth().read().has_role("remote-cluster3", "remote"));
    assert!(store.store.auth().read().has_role("remote", "remote"), "etcdinit's shared user is not managed");

    token.cancel();
    task.await.expect("the manager stops on shutdown");
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_etcd_gets_the_listed_users_through_its_auth_api() {
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let mut admin = etcd.client(&pki, "root").await;
    // etcdinit's role, which the users manager grants but never creates.
    admin.role_add("remote").await.expect("add role remote");
    admin
        .user_add("preexisting", "", Some(etcd_client::UserAddOptions::new().with_no_pwd()))
        .await
        .expect("add a user this server never listed");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("users.yaml");
    write_users(&path, &["remote-cluster2", "remote-cluster3"]);
    let token = CancellationToken::new();
    let task = manage(EtcdUsers(admin.clone()), &path, &token);

    let users = |admin: etcd_client::Client| async move {
        let mut admin = admin;
        let mut names = admin.user_list().await.ok()?.users().to_vec();
        names.sort();
        Some(names)
    };
    eventually("both users to exist", Duration::from_secs(10), || async {
        users(admin.clone()).await.filter(|u| u.len() == 3)
    })
    .await;
    let roles = admin.user_get("remote-cluster2").await.expect("user get");
    assert_eq!(roles.roles(), ["remote"]);

    write_users(&path, &["remote-cluster3"]);
    let left = eventually("remote-cluster2 to be deleted", Duration::from_secs(10), || async {
        users(admin.clone()).await.filter(|u| u.len() == 2)
    })
    .await;
    assert_eq!(left, ["preexisting", "remote-cluster3"], "users not listed by this server are left alone");

    token.cancel();
    task.await.expect("the manager stops on shutdown");
}
