//! Answers clients depend on, as etcd gives them (Debian's etcd beside ours where it runs).

use etcd_client::{UserAddOptions, WatchOptions};

use crate::support::{EmbeddedStore, EtcdProcess, Pki, connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_reversed_range_is_refused_as_etcd_refuses_it() {
    let pki = Pki::new();
    let ours = EmbeddedStore::start(&pki).await;
    let etcd = EtcdProcess::start(&pki).await;
    for url in [etcd.client_url(), ours.client_url()] {
        let mut client = connect(&url, &pki, "root").await.unwrap();
        let mut stream = client.watch("b", Some(WatchOptions::new().with_range("a"))).await.unwrap();
        let first = stream.message().await.unwrap().expect("an answer");
        assert!(first.created() && first.canceled(), "{url}: {first:?}");
        assert_eq!((first.watch_id(), first.cancel_reason()), (-1, "mvcc: watcher range is empty"), "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_a_password_is_refused_because_it_could_never_authenticate() {
    let pki = Pki::new();
    let ours = EmbeddedStore::start(&pki).await;
    let mut client = connect(&ours.client_url(), &pki, "root").await.unwrap();
    let refused = client.user_add("alice", "secret", None).await.expect_err("refused");
    assert!(refused.to_string().contains("passwords are not supported"), "{refused}");
    client.user_add("alice", "", Some(UserAddOptions::new().with_no_pwd())).await.expect("password-less is fine");
}
