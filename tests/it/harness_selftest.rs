//! The harness itself, proven against the real etcd 3.5: the generated PKI is one that etcd
//! accepts, it refuses what it should, and etcdctl works over mTLS.

use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::support::{EtcdProcess, Etcdctl, Pki, client_tls, connect_with_tls, eventually, init_tracing};

/// Bound on any single RPC in these tests.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A put that must get an answer (success or error) within [`RPC_TIMEOUT`].
async fn put(client: &mut Client, key: &str, value: &str) -> Result<(), etcd_client::Error> {
    tokio::time::timeout(RPC_TIMEOUT, client.put(key, value, None))
        .await
        .unwrap_or_else(|_| panic!("put {key} got no answer within {RPC_TIMEOUT:?}"))
        .map(drop)
}

/// Waits until etcd's log mentions `needle` (etcd logs each rejected TLS handshake).
async fn etcd_logged(etcd: &EtcdProcess, needle: &str) {
    eventually(&format!("etcd log to mention {needle:?}"), Duration::from_secs(5), || async {
        std::fs::read_to_string(etcd.log_path()).is_ok_and(|log| log.contains(needle))
    })
    .await;
}

async fn get_value(client: &mut Client, key: &str) -> Option<String> {
    let resp = tokio::time::timeout(RPC_TIMEOUT, client.get(key, None))
        .await
        .expect("get answered in time")
        .expect("get succeeded");
    resp.kvs().first().map(|kv| kv.value_str().expect("utf-8 value").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_etcd_accepts_a_client_certificate_from_its_ca() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let mut client = etcd.client(&pki, "root").await;

    put(&mut client, "cilium/state/x", "hello").await.expect("put through mTLS");

    assert_eq!(get_value(&mut client, "cilium/state/x").await.as_deref(), Some("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_etcd_refuses_a_client_from_another_ca() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let stranger = pki.foreign_client("root");
    let mut foreign = connect_with_tls(&etcd.client_url(), client_tls(pki.ca_pem(), Some(&stranger)))
        .await
        .expect("building a client is lazy and succeeds");

    let refused = put(&mut foreign, "cilium/state/x", "intruder").await;

    let err = refused.expect_err("etcd accepted a client certificate from another CA");
    eprintln!("refused as expected: {err}");
    etcd_logged(&etcd, "certificate signed by unknown authority").await;
    let mut trusted = etcd.client(&pki, "root").await;
    assert_eq!(get_value(&mut trusted, "cilium/state/x").await, None, "the refused put left no trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_etcd_refuses_an_expired_client_certificate() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let expired = pki.expired_client("root");
    let mut stale = connect_with_tls(&etcd.client_url(), client_tls(pki.ca_pem(), Some(&expired)))
        .await
        .expect("building a client is lazy and succeeds");

    let refused = put(&mut stale, "cilium/state/x", "stale").await;

    let err = refused.expect_err("etcd accepted an expired client certificate");
    eprintln!("refused as expected: {err}");
    etcd_logged(&etcd, "certificate has expired").await;
    let mut trusted = etcd.client(&pki, "root").await;
    assert_eq!(get_value(&mut trusted, "cilium/state/x").await, None, "the refused put left no trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_talks_to_real_etcd_over_mtls() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let etcdctl = Etcdctl::new(&etcd.endpoint(), &pki, "root");

    let put = etcdctl.run_async(&["put", "cilium/state/nodes/v1/c1/a", "node-a"]).await;
    put.assert_success();
    assert_eq!(put.stdout.trim(), "OK");

    let get = etcdctl.run_async(&["get", "--prefix", "cilium/state/"]).await;
    get.assert_success();
    assert_eq!(get.lines(), ["cilium/state/nodes/v1/c1/a", "node-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_txn_reads_compares_and_ops_from_stdin() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let etcdctl = Etcdctl::new(&etcd.endpoint(), &pki, "root");
    // compares, blank line, success ops, blank line, failure ops, blank line
    let script = "create(\"lock\") = \"0\"\n\nput lock owner-1\n\nget lock\n\n";

    let first = etcdctl.run_with_stdin_async(&["txn"], script).await;
    first.assert_success();
    assert_eq!(first.lines(), ["SUCCESS", "", "OK"]);

    let second = etcdctl.run_with_stdin_async(&["txn"], script).await;
    second.assert_success();
    assert_eq!(second.lines(), ["FAILURE", "", "lock", "owner-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_without_a_trusted_certificate_fails_instead_of_hanging() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let etcdctl = Etcdctl::with_cert(&etcd.endpoint(), pki.ca_path(), &pki.foreign_client("root"));

    let out = etcdctl.run_async(&["get", "x"]).await;

    out.assert_failure();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventually_polls_real_etcd_until_a_later_put_lands() {
    init_tracing();
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let mut client = etcd.client(&pki, "root").await;
    let mut writer = client.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.put("late/key", "v", None).await.expect("put");
    });

    let value = eventually("late/key to appear", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            // `None` (no key yet) means "try again"; so would an RPC error.
            let resp = client.get("late/", Some(GetOptions::new().with_prefix())).await.ok()?;
            resp.kvs().first().map(|kv| kv.value().to_vec())
        }
    })
    .await;

    assert_eq!(value, b"v");
    client.put("other", "x", None).await.expect("client still usable");
}

#[tokio::test]
#[should_panic(expected = "waiting for: a condition that never holds")]
async fn eventually_gives_up_at_its_timeout_and_names_what_it_waited_for() {
    eventually("a condition that never holds", Duration::from_millis(100), || async { false }).await;
}

#[test]
fn etcd_health_answer_is_parsed_from_raw_http() {
    // A stand-in for etcd's metrics listener, to check the readiness probe's HTTP parsing.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await.unwrap();
            conn.write_all(
                b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n{\"health\":\"false\"}",
            )
            .await
            .unwrap();
        });
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(5), crate::support::etcd::http_get("127.0.0.1", port, "/health"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!((status, body.as_str()), (503, r#"{"health":"false"}"#));
    });
}

#[test]
fn rotating_the_server_certificate_rewrites_its_files_with_a_new_key() {
    let pki = Pki::new();
    let before = pki.server();

    let after = pki.rotate_server_cert();

    assert_ne!(after.cert_pem, before.cert_pem);
    assert_ne!(after.key_pem, before.key_pem);
    assert_eq!(std::fs::read_to_string(pki.server_cert_path()).unwrap(), after.cert_pem);
    assert_eq!(std::fs::read_to_string(pki.server_key_path()).unwrap(), after.key_pem);
    assert_eq!(pki.server_cert_pem(), after.cert_pem);
}
