//! Security specifications of our store: who may connect (mutual TLS), what each of Cilium's
//! users may read and write (certificate Common Name = etcd user), request limits, and
//! certificate rotation without a restart.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::Limits;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

use crate::support::{ClientCert, EmbeddedStore, Pki, client_tls, connect_with_tls, eventually, init_tracing};

/// Bound on any single RPC or handshake in these tests.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

const CLUSTER: &str = "cluster1";
const ADMIN: &str = "admin-cluster1";
const LOCAL: &str = "local-cluster1";
const REMOTE: &str = "remote";

/// Awaits an RPC, failing the test if it gets no answer within [`RPC_TIMEOUT`].
async fn answer<T>(
    what: &str,
    rpc: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(RPC_TIMEOUT, rpc).await.unwrap_or_else(|_| panic!("{what}: no answer within {RPC_TIMEOUT:?}"))
}

/// The gRPC status of a refused RPC.
#[track_caller]
fn status<T: std::fmt::Debug>(what: &str, result: Result<T, etcd_client::Error>) -> (Code, String) {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => (status.code(), status.message().to_owned()),
        other => panic!("{what}: expected a gRPC error status, got {other:?}"),
    }
}

#[track_caller]
fn assert_permission_denied<T: std::fmt::Debug>(what: &str, result: Result<T, etcd_client::Error>) {
    assert_eq!(status(what, result), (Code::PermissionDenied, "etcdserver: permission denied".to_owned()), "{what}");
}

/// Every key with its value and modification revision, plus the store's revision: equal
/// snapshots mean nothing was written in between.
async fn snapshot(admin: &mut Client) -> (i64, Vec<(String, String, i64)>) {
    let resp = answer("snapshot", admin.get("", Some(GetOptions::new().with_all_keys()))).await.expect("snapshot");
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value_str().unwrap().to_owned(), kv.mod_revision()))
        .collect();
    (resp.header().expect("header").revision(), kvs)
}

/// What a raw TLS client saw: the server's certificate (DER) once the server has accepted the
/// session and answered HTTP/2, or the error that ended the session.
async fn tls_session(addr: SocketAddr, ca_pem: &str, client: Option<&ClientCert>) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match client {
        Some(cert) => {
            let chain =
                CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("client key");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let session = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        let server_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        // With TLS 1.3 the server judges the client certificate after the client considers
        // the handshake done: only the first read tells whether the session was accepted.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed by the server".to_owned()),
            Ok(_) => server_cert.ok_or_else(|| "no server certificate".to_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    tokio::time::timeout(RPC_TIMEOUT, session).await.unwrap_or_else(|_| Err("timed out".to_owned()))
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM").to_vec()
}

/// A put from a client with the given TLS identity must fail, the raw TLS session must be
/// ended by the server with one of `alerts`, and the store must be left as it was.
async fn assert_refused(pki: &Pki, store: &EmbeddedStore, identity: Option<&ClientCert>, alerts: &[&str]) {
    let mut admin = store.client(pki, "root").await;
    let before = snapshot(&mut admin).await;

    let mut client = connect_with_tls(&store.endpoint(), client_tls(pki.ca_pem(), identity))
        .await
        .expect("building a client is lazy and succeeds");
    let refused = answer("put", client.put("cilium/state/x", "intruder", None)).await;
    let err = refused.expect_err("the store accepted the client");
    eprintln!("refused as expected: {err}");

    let session = tls_session(store.addr, pki.ca_pem(), identity).await;
    let ended = session.expect_err("the server accepted a raw TLS session");
    assert!(
        alerts.iter().any(|alert| ended.contains(&format!("fatal alert: {alert}"))),
        "expected one of the TLS alerts {alerts:?}, got: {ended}"
    );
    // Positive control: the same raw client with a good certificate is accepted.
    tls_session(store.addr, pki.ca_pem(), Some(&pki.client("root"))).await.expect("a trusted client is accepted");
    assert_eq!(snapshot(&mut admin).await, before, "a refused client changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;

    assert_refused(&pki, &store, None, &["CertificateRequired"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;

    // The foreign CA has the same subject name as the trusted one, so the chain is built and
    // then fails its signature check (DecryptError); a verifier matching names only would
    // have let it in.
    assert_refused(&pki, &store, Some(&pki.foreign_client("root")), &["DecryptError", "UnknownCA"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;

    assert_refused(&pki, &store, Some(&pki.expired_client("root")), &["CertificateExpired"]).await;
}

/// Our store with Cilium's users, seeded by the cluster's admin.
async fn cilium_store(pki: &Pki) -> (EmbeddedStore, Client) {
    init_tracing();
    let store = EmbeddedStore::start_with(pki, AuthStore::cilium(CLUSTER), Limits::default()).await;
    let mut admin = store.client(pki, ADMIN).await;
    for (key, value) in [
        ("cilium/state/nodes/v1/cluster1/node-a", "a"),
        ("cilium/cluster-config/cluster1", "config-1"),
        ("cilium/cluster-config/cluster10", "config-10"),
        ("cilium/cluster-config/other", "config-other"),
        ("cilium/synced/cluster1/cilium/state/nodes/v1", "1"),
        ("cilium/synced/cluster2/cilium/state/nodes/v1", "2"),
        ("cilium/.heartbeat", "now"),
        ("cilium/cache/identities/v1/id/1", "id"),
        ("cilium/cache/nodes/v1/cluster2/node-b", "b"),
    ] {
        answer("seed", admin.put(key, value, None)).await.expect("the admin seeds the store");
    }
    (store, admin)
}

async fn get(client: &mut Client, key: &str, options: Option<GetOptions>) -> Result<Vec<String>, etcd_client::Error> {
    let resp = answer(&format!("get {key}"), client.get(key, options)).await?;
    Ok(resp.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect())
}

fn prefix() -> Option<GetOptions> {
    Some(GetOptions::new().with_prefix())
}

/// The first response of a new watch on `key` (with `options`).
async fn first_watch_response(client: &mut Client, key: &str, options: WatchOptions) -> etcd_client::WatchResponse {
    let mut stream = answer("watch", client.watch(key, Some(options))).await.expect("watch stream opens");
    answer("first watch response", stream.message()).await.expect("watch response").expect("stream still open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_admin_may_write_anywhere() {
    let pki = Pki::new();
    let (_store, mut admin) = cilium_store(&pki).await;

    for key in ["cilium/state/services/v1/cluster1/ns/svc", "cilium/cache/x", "cilium/cluster-config/cluster2", "other"]
    {
        answer("put", admin.put(key, "v", None)).await.unwrap_or_else(|e| panic!("admin put {key}: {e}"));
    }
    let deleted =
        answer("delete", admin.delete("cilium/cache/", Some(etcd_client::DeleteOptions::new().with_prefix())))
            .await
            .expect("admin delete");
    assert_eq!(deleted.deleted(), 3);
    let txn = Txn::new()
        .when([Compare::version("other", CompareOp::Equal, 1)])
        .and_then([TxnOp::put("cilium/state/y", "1", None), TxnOp::delete("other", None)]);
    assert!(answer("txn", admin.txn(txn)).await.expect("admin txn").succeeded());
    assert_eq!(get(&mut admin, "", Some(GetOptions::new().with_all_keys())).await.unwrap().len(), 10);
    let users = answer("user list", admin.user_list()).await.expect("the admin holds role root");
    assert!(users.users().contains(&REMOTE.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_user_reads_exactly_what_a_remote_agent_needs_and_writes_nothing() {
    let pki = Pki::new();
    let (store, mut admin) = cilium_store(&pki).await;
    let lease = answer("grant", admin.lease_grant(300, None)).await.expect("grant").id();
    let options = Some(PutOptions::new().with_lease(lease));
    answer("put", admin.put("cilium/state/nodes/v1/cluster1/leased", "l", options)).await.expect("leased put");
    let before = snapshot(&mut admin).await;
    let mut remote = store.client(&pki, REMOTE).await;

    assert_eq!(
        get(&mut remote, "cilium/state/", prefix()).await.expect("state"),
        ["cilium/state/nodes/v1/cluster1/leased", "cilium/state/nodes/v1/cluster1/node-a"]
    );
    assert_eq!(get(&mut remote, "cilium/state/nodes/v1/cluster1/node-a", None).await.unwrap().len(), 1);
    assert_eq!(get(&mut remote, "cilium/cluster-config/cluster1", None).await.expect("own config").len(), 1);
    assert_eq!(get(&mut remote, "cilium/synced/cluster1/", prefix()).await.expect("synced").len(), 1);
    assert_eq!(get(&mut remote, "cilium/.heartbeat", None).await.expect("heartbeat").len(), 1);
    let ttl = answer("ttl", remote.lease_time_to_live(lease, None)).await.expect("lease of readable keys");
    assert_eq!(ttl.id(), lease);

    for (key, options) in [
        ("cilium/cluster-config/other", None),
        ("cilium/cluster-config/cluster10", None),
        // A prefix read of its own config key would also return cluster10's.
        ("cilium/cluster-config/cluster1", prefix()),
        ("cilium/synced/cluster2/", prefix()),
        ("cilium/cache/", prefix()),
        ("cilium/cache/identities/v1/id/1", None),
        ("cilium/", prefix()),
        ("", Some(GetOptions::new().with_all_keys())),
    ] {
        assert_permission_denied(&format!("remote get {key} {options:?}"), get(&mut remote, key, options).await);
    }

    let state = "cilium/state/nodes/v1/cluster1/node-a";
    assert_permission_denied("put state", answer("put", remote.put(state, "x", None)).await);
    assert_permission_denied("put heartbeat", answer("put", remote.put("cilium/.heartbeat", "x", None)).await);
    assert_permission_denied("put elsewhere", answer("put", remote.put("x", "x", None)).await);
    assert_permission_denied("delete", answer("delete", remote.delete(state, None)).await);
    let txn = Txn::new().when([Compare::value(state, CompareOp::Equal, "a")]).and_then([TxnOp::put(state, "x", None)]);
    assert_permission_denied("txn put", answer("txn", remote.txn(txn)).await);
    let reads_then_writes =
        Txn::new().and_then([TxnOp::get(state, None)]).or_else([TxnOp::delete("cilium/state/", None)]);
    assert_permission_denied(
        "txn with a write in its other branch",
        answer("txn", remote.txn(reads_then_writes)).await,
    );
    assert_permission_denied("lease revoke", answer("revoke", remote.lease_revoke(lease)).await);
    // Stricter than etcd: a compaction would make every watching agent relist.
    let revision = before.0;
    assert_permission_denied("compact", answer("compact", remote.compact(revision, None)).await);
    assert_permission_denied("user add", answer("user add", remote.user_add("mallory", "", None)).await);

    assert_eq!(snapshot(&mut admin).await, before, "a refused request changed the store");
    let ttl = answer("ttl", admin.lease_time_to_live(lease, None)).await.expect("ttl");
    assert!(ttl.ttl() > 0, "the refused revoke left the lease alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_outside_the_remote_users_permissions_is_cancelled() {
    let pki = Pki::new();
    let (store, mut admin) = cilium_store(&pki).await;
    let mut remote = store.client(&pki, REMOTE).await;

    let refused = first_watch_response(&mut remote, "cilium/cache/", WatchOptions::new().with_prefix()).await;
    assert!(refused.created() && refused.canceled(), "{refused:?}");
    assert!(refused.cancel_reason().contains("etcdserver: permission denied"), "{refused:?}");

    // Positive control: a watch inside its permissions gets the events.
    let mut stream = answer("watch", remote.watch("cilium/state/", Some(WatchOptions::new().with_prefix())))
        .await
        .expect("watch stream opens");
    let created = answer("created", stream.message()).await.unwrap().unwrap();
    assert!(created.created() && !created.canceled(), "{created:?}");
    answer("put", admin.put("cilium/state/nodes/v1/cluster1/node-c", "c", None)).await.unwrap();
    answer("put", admin.put("cilium/cache/nodes/v1/cluster1/node-c", "c", None)).await.unwrap();
    let event = answer("event", stream.message()).await.unwrap().unwrap();
    let keys: Vec<&str> = event.events().iter().map(|e| e.kv().unwrap().key_str().unwrap()).collect();
    assert_eq!(keys, ["cilium/state/nodes/v1/cluster1/node-c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_user_reads_the_cache_but_not_the_state() {
    let pki = Pki::new();
    let (store, _admin) = cilium_store(&pki).await;
    let mut local = store.client(&pki, LOCAL).await;

    assert_eq!(get(&mut local, "cilium/cache/", prefix()).await.expect("cache").len(), 2);
    assert_eq!(get(&mut local, "cilium/cluster-config/", prefix()).await.expect("every config").len(), 3);
    assert_eq!(get(&mut local, "cilium/synced/", prefix()).await.expect("every synced").len(), 2);
    assert_eq!(get(&mut local, "cilium/.heartbeat", None).await.expect("heartbeat").len(), 1);

    assert_permission_denied("local get state", get(&mut local, "cilium/state/", prefix()).await);
    assert_permission_denied(
        "local get a state key",
        get(&mut local, "cilium/state/nodes/v1/cluster1/node-a", None).await,
    );
    assert_permission_denied("local put cache", answer("put", local.put("cilium/cache/x", "x", None)).await);
    let refused = first_watch_response(&mut local, "cilium/state/", WatchOptions::new().with_prefix()).await;
    assert!(refused.canceled(), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_whose_common_name_is_no_user_is_denied() {
    let pki = Pki::new();
    let (store, mut admin) = cilium_store(&pki).await;
    let before = snapshot(&mut admin).await;
    let mut stranger = store.client(&pki, "intruder").await;

    assert_permission_denied("get", get(&mut stranger, "cilium/.heartbeat", None).await);
    assert_permission_denied("get state", get(&mut stranger, "cilium/state/", prefix()).await);
    assert_permission_denied("put", answer("put", stranger.put("cilium/state/x", "x", None)).await);
    assert_permission_denied("delete", answer("delete", stranger.delete("cilium/.heartbeat", None)).await);
    let refused = first_watch_response(&mut stranger, "cilium/.heartbeat", WatchOptions::new()).await;
    assert!(refused.canceled(), "{refused:?}");
    let admin_rpc = status("user list", answer("user list", stranger.user_list()).await);
    assert_eq!(admin_rpc, (Code::FailedPrecondition, "etcdserver: user name not found".to_owned()));

    assert_eq!(snapshot(&mut admin).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_transactions_with_too_many_operations_are_refused() {
    init_tracing();
    let pki = Pki::new();
    let limits = Limits { max_request_bytes: 4096, max_txn_ops: 4, ..Limits::default() };
    let store = EmbeddedStore::start_with(&pki, AuthStore::default(), limits).await;
    let mut client = store.client(&pki, "root").await;
    answer("put", client.put("small", "x".repeat(3000), None)).await.expect("a put under the limit");
    let before = snapshot(&mut client).await;

    let too_large = answer("put", client.put("big", "x".repeat(5000), None)).await;
    assert_eq!(status("big put", too_large), (Code::InvalidArgument, "etcdserver: request is too large".to_owned()));
    // Over the transport's limit too (the request limit plus etcd's 512 KiB of gRPC framing):
    // gRPC's and etcd's code for it, which clients retry or circuit-break on.
    let over_transport = answer("put", client.put("huge", "x".repeat(600 * 1024), None)).await;
    assert_eq!(status("huge put", over_transport).0, Code::ResourceExhausted);
    // The same on a watch stream: the stream ends with that code, not with a silent OK.
    let huge_watch = async {
        let mut watch = client.watch("x".repeat(600 * 1024), None).await?;
        watch.message().await
    };
    assert_eq!(status("huge watch", answer("watch", huge_watch).await).0, Code::ResourceExhausted);
    let big_txn =
        Txn::new().and_then([TxnOp::put("a", "x".repeat(2500), None), TxnOp::put("b", "x".repeat(2500), None)]);
    let too_large = answer("txn", client.txn(big_txn)).await;
    assert_eq!(status("big txn", too_large), (Code::InvalidArgument, "etcdserver: request is too large".to_owned()));

    let too_many = (Code::InvalidArgument, "etcdserver: too many operations in txn request".to_owned());
    let puts = |n: usize| (0..n).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect::<Vec<_>>();
    let five_ops = answer("txn", client.txn(Txn::new().and_then(puts(5)))).await;
    assert_eq!(status("5 success ops", five_ops), too_many);
    let five_else = answer("txn", client.txn(Txn::new().or_else(puts(5)))).await;
    assert_eq!(status("5 failure ops", five_else), too_many);
    let compares: Vec<Compare> = (0..5).map(|i| Compare::version(format!("k{i}"), CompareOp::Equal, 0)).collect();
    let five_compares = answer("txn", client.txn(Txn::new().when(compares))).await;
    assert_eq!(status("5 compares", five_compares), too_many);
    assert_eq!(snapshot(&mut client).await, before, "a refused request changed the store");

    let four = answer("txn", client.txn(Txn::new().and_then(puts(4)))).await.expect("4 ops are within the limit");
    assert!(four.succeeded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_to_new_connections_while_the_store_keeps_serving() {
    init_tracing();
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let root = pki.client("root");
    let old = der(&pki.server_cert_pem());
    assert_eq!(tls_session(store.addr, pki.ca_pem(), Some(&root)).await.expect("session"), old);
    let mut before = store.client(&pki, "root").await;
    answer("put", before.put("k", "before", None)).await.expect("put before the rotation");

    let rotated = pki.rotate_server_cert();
    let new = der(&rotated.cert_pem);
    assert_ne!(new, old);

    // The reloader polls every 100 ms; a session made meanwhile may still get the old one.
    // Each session verifies the chain against the CA and the name `localhost`.
    eventually("a new TLS session to present the rotated certificate", Duration::from_secs(5), || async {
        let seen = tls_session(store.addr, pki.ca_pem(), Some(&root)).await?;
        if seen == new { Ok(()) } else { Err("still the old certificate".to_owned()) }
    })
    .await;
    // From then on every new session gets it.
    for _ in 0..3 {
        assert_eq!(tls_session(store.addr, pki.ca_pem(), Some(&root)).await.expect("session"), new);
    }

    answer("put", before.put("k", "after", None)).await.expect("the connection from before still works");
    let mut after = store.client(&pki, "root").await;
    let value = answer("get", after.get("k", None)).await.expect("a new connection works");
    assert_eq!(value.kvs()[0].value_str().unwrap(), "after");
}
