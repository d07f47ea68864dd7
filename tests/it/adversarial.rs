//! A client holding a certificate signed by the CA (the least any attacker of a ClusterMesh
//! endpoint has) cannot exhaust the store's memory. Each attack runs against the real binary
//! for a bounded time; the server's resident memory is read from `/proc` before, during and
//! after, and a legitimate `remote` read must be answered throughout.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};

use crate::support::{Pki, connect};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(4);
/// Resident memory an attack may add to the server, in bytes.
const BUDGET: u64 = 48 << 20;

struct Server {
    child: Child,
    url: String,
    metrics_port: u16,
}

impl Server {
    async fn start(pki: &Pki) -> Server {
        Self::start_with(pki, &[]).await
    }

    async fn start_with(pki: &Pki, flags: &[&str]) -> Server {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (port, metrics_port) = (free(), free());
        let child = Command::new(BIN)
            .args(["--log-level=warn", "kvstore", "--cluster-name=cluster1"])
            .args(flags)
            .arg(format!("--listen-client-urls=https://127.0.0.1:{port}"))
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"))
            .arg("--cert-file")
            .arg(pki.server_cert_path())
            .arg("--key-file")
            .arg(pki.server_key_path())
            .arg("--trusted-ca-file")
            .arg(pki.ca_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the store");
        let server = Server { child, url: format!("https://127.0.0.1:{port}"), metrics_port };
        crate::support::eventually("the store to answer", Duration::from_secs(20), || async {
            let mut admin = connect(&server.url, pki, "admin-cluster1").await.ok()?;
            admin.put("cilium/state/nodes/v1/cluster1/n1", "node", None).await.ok()
        })
        .await;
        server
    }

    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("server alive");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// A counter or gauge of the store's metrics listener.
    async fn metric(&self, name: &str) -> Option<u64> {
        let (_, metrics) = crate::support::etcd::http_get("127.0.0.1", self.metrics_port, "/metrics").await.ok()?;
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A legitimate agent's read answers within a bound.
    async fn remote_read(&self, pki: &Pki) {
        let read = async {
            let mut remote = connect(&self.url, pki, "remote").await?;
            let found = remote.get("cilium/state/nodes/v1/", Some(GetOptions::new().with_prefix())).await?;
            anyhow::ensure!(!found.kvs().is_empty(), "the node written at start is missing");
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the remote read answers within 5s")
            .expect("the remote read succeeds");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `attack` for [`ATTACK`] beside legitimate reads; the server's memory stays within
/// [`BUDGET`] of where it started.
async fn within_budget<F>(what: &str, pki: &Pki, server: &Server, attack: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let before = server.rss();
    let attacker = tokio::spawn(async move {
        let _ = tokio::time::timeout(ATTACK, attack).await;
    });
    let mut peak = before;
    while !attacker.is_finished() {
        server.remote_read(pki).await;
        peak = peak.max(server.rss());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    attacker.await.expect("attacker task");
    server.remote_read(pki).await;
    peak = peak.max(server.rss());
    let grown = peak.saturating_sub(before);
    assert!(grown < BUDGET, "{what}: the server grew by {} MiB (budget {} MiB)", grown >> 20, BUDGET >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_creating_watches_without_reading_the_answers_is_held_back() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut attacker = connect(&server.url, &pki, "remote").await.unwrap();
    let attack = async move {
        let options = || Some(WatchOptions::new().with_prefix());
        let Ok(mut stream) = attacker.watch("cilium/state/", options()).await else { return };
        // Never reads a response: only HTTP/2 flow control can stop it.
        loop {
            if stream.watch("cilium/state/", options()).await.is_err() {
                return;
            }
        }
    };
    within_budget("watch-create flood", &pki, &server, attack).await;
    let held_back = server.metric("clustermesh_store_watch_backpressure_total").await;
    assert!(held_back.is_some_and(|n| n >= 1), "the limit is reported when hit: {held_back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_spam_on_a_long_lease_costs_no_memory() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut attacker = connect(&server.url, &pki, "remote").await.unwrap();
    let lease = attacker.lease_grant(9_000_000_000, None).await.unwrap().id();
    let attack = async move {
        let Ok((mut keeper, mut responses)) = attacker.lease_keep_alive(lease).await else { return };
        tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
        while keeper.keep_alive().await.is_ok() {}
    };
    within_budget("keep-alive spam", &pki, &server, attack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_reads_with_huge_keys_at_many_revisions_do_not_fill_the_count_cache() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut admin = connect(&server.url, &pki, "admin-cluster1").await.unwrap();
    for i in 0..50 {
        admin.put(format!("cilium/state/nodes/v1/cluster1/x{i}"), "n", None).await.unwrap();
    }
    let revision = admin.get("cilium/", None).await.unwrap().header().map_or(1, |h| h.revision());
    let mut attacker = connect(&server.url, &pki, "remote").await.unwrap();
    let attack = async move {
        let long = "z".repeat(1 << 20);
        for round in 0u64.. {
            // A limited range read inside the remote role's prefix, from a megabyte-long start
            // key, at one of many revisions: each is a distinct count to remember.
            let key = format!("cilium/state/{round}{long}");
            let options = GetOptions::new()
                .with_range("cilium/state0")
                .with_limit(1)
                .with_revision(revision - (round as i64 % 40));
            if attacker.get(key, Some(options)).await.is_err() {
                return;
            }
        }
    };
    within_budget("huge-key paged reads", &pki, &server, attack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_request_is_closed() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let cert = pki.client("remote");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap()).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut config =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr = server.url.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.expect("handshake");
    // Silent after the handshake: no HTTP/2 preface. The server closes within its handshake
    // timeout (10 s), as etcd does, rather than keeping the connection for free.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection is still open after 20 s");
    server.remote_read(&pki).await;
    let closed = server.metric("clustermesh_store_silent_connections_closed_total").await;
    assert_eq!(closed, Some(1), "the close is counted");
}

/// A client opens hundreds of watchers from revision 1 on one stream and never reads: the
/// replay of the history to them stops at the stream's byte budget, and another client that
/// does read gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_replayed_to_stalled_watchers_stops_at_the_budget_and_readers_get_everything() {
    const KEYS: usize = 1000;
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut admin = connect(&server.url, &pki, "admin-cluster1").await.unwrap();
    for i in 0..KEYS {
        admin
            .put(format!("cilium/state/ip/v1/default/10.0.{}.{}", i / 250, i % 250), "x".repeat(200), None)
            .await
            .unwrap();
    }
    let before = server.rss();
    let from_start = || Some(WatchOptions::new().with_prefix().with_start_revision(1));
    let mut attacker = connect(&server.url, &pki, "remote").await.unwrap();
    let mut stalled = attacker.watch("cilium/state/", from_start()).await.expect("watch");
    for _ in 1..300 {
        match tokio::time::timeout(Duration::from_secs(1), stalled.watch("cilium/state/", from_start())).await {
            Ok(sent) => sent.expect("a create is sent"),
            Err(_) => break,
        }
    }
    server.remote_read(&pki).await;

    let mut reader = connect(&server.url, &pki, "remote").await.unwrap();
    let mut replay = reader.watch("cilium/state/", from_start()).await.expect("watch");
    let mut revisions = Vec::new();
    let read_all = async {
        // The node written at start and every ip key, each once.
        while revisions.len() < KEYS + 1 {
            let message = replay.message().await.expect("watch").expect("stream open");
            revisions.extend(message.events().iter().filter_map(|e| e.kv().map(|kv| kv.mod_revision())));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all).await.expect("the reader gets the whole history");
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "every event once, in order");
    let grown = server.rss().saturating_sub(before);
    assert!(grown < BUDGET, "history replay: the server grew by {} MiB", grown >> 20);
    drop(stalled);
    server.remote_read(&pki).await;
}

/// A burst the store legitimately holds (64 MiB of values) and then lets go of (deleted,
/// compacted) does not leave the pod's memory at its high-water mark: the allocator gives freed
/// pages back, so resident memory returns near where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_taken_by_a_burst_is_given_back_once_the_data_is_deleted_and_compacted() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let mut admin = connect(&server.url, &pki, "root").await.unwrap();
    let before = server.rss();
    // Noise, which the store cannot pack smaller: the burst takes its full size.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noise = || {
        (0..16 << 10)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>()
    };
    for i in 0..4096 {
        admin.put(format!("cilium/state/burst/{i:05}"), noise(), None).await.expect("put");
    }
    let peak = server.rss();
    assert!(peak > before + (48 << 20), "the burst is held: {} → {} MiB", before >> 20, peak >> 20);
    let deleted =
        admin.delete("cilium/state/burst/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let revision = deleted.header().expect("header").revision();
    admin.compact(revision, None).await.expect("compact");
    crate::support::eventually(
        "resident memory to come back within 16 MiB of the start",
        Duration::from_secs(30),
        || async {
            let now = server.rss();
            if now < before + (16 << 20) {
                Ok(())
            } else {
                Err(format!("{} MiB at start, {} MiB at the peak, {} MiB now", before >> 20, peak >> 20, now >> 20))
            }
        },
    )
    .await;
    server.remote_read(&pki).await;
}

/// A read-only user cannot grant leases until memory runs out: past its cap each grant is
/// refused with gRPC's quota code, counted, and other users keep their own places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_granting_leases_without_end_is_stopped_at_its_cap() {
    let pki = Pki::new();
    let server = Server::start_with(&pki, &["--max-leases-per-user=1000"]).await;
    let mut attacker = connect(&server.url, &pki, "remote").await.unwrap();
    let mut refused = 0;
    for _ in 0..1200 {
        match attacker.lease_grant(9_000_000_000, None).await {
            Ok(_) => {}
            Err(etcd_client::Error::GRpcStatus(status)) if status.code() == tonic::Code::ResourceExhausted => {
                refused += 1
            }
            Err(other) => panic!("a lease grant failed otherwise: {other}"),
        }
    }
    assert_eq!(refused, 200, "exactly the grants past the cap are refused");
    let mut admin = connect(&server.url, &pki, "admin-cluster1").await.unwrap();
    admin.lease_grant(60, None).await.expect("another user still gets leases");
    server.remote_read(&pki).await;
    let counted = server.metric("clustermesh_store_lease_grants_refused_total").await;
    assert_eq!(counted, Some(200), "the refusals are counted");
}

/// A certificate from another CA gets no connection, and each refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_with_a_certificate_of_another_ca_are_refused_and_counted() {
    let pki = Pki::new();
    let server = Server::start(&pki).await;
    let foreign = pki.foreign_client("remote");
    for _ in 0..3 {
        let tls = crate::support::client_tls(pki.ca_pem(), Some(&foreign));
        if let Ok(mut client) = crate::support::connect_with_tls(&server.url, tls).await {
            let read = tokio::time::timeout(Duration::from_secs(5), client.get("cilium/", None)).await;
            assert!(!matches!(read, Ok(Ok(_))), "a foreign certificate was served: {read:?}");
        }
    }
    server.remote_read(&pki).await;
    let refused = server.metric("clustermesh_store_tls_handshakes_refused_total").await;
    assert!(refused.is_some_and(|n| n >= 3), "each refusal is counted: {refused:?}");
}

/// With `--max-connections-per-user`, a certificate holder opening connections without end
/// is stopped at the bound: its next connection is closed after the handshake and counted,
/// other users keep connecting, and a closed connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_opening_connections_without_end_is_stopped_at_its_bound() {
    let pki = Pki::new();
    let server = Server::start_with(&pki, &["--max-connections-per-user=2"]).await;
    let read = |mut client: etcd_client::Client| async move {
        tokio::time::timeout(Duration::from_secs(5), client.get("cilium/state/nodes/v1/", None)).await
    };
    let first = connect(&server.url, &pki, "remote").await.expect("first connection");
    let second = connect(&server.url, &pki, "remote").await.expect("second connection");
    assert!(matches!(read(first.clone()).await, Ok(Ok(_))) && matches!(read(second.clone()).await, Ok(Ok(_))));
    if let Ok(third) = connect(&server.url, &pki, "remote").await {
        assert!(!matches!(read(third).await, Ok(Ok(_))), "a third connection of the same user is served");
    }
    let counted = server.metric("clustermesh_store_connections_over_user_limit_total").await;
    assert!(counted.is_some_and(|n| n >= 1), "the refusal is counted: {counted:?}");
    let admin = connect(&server.url, &pki, "admin-cluster1").await.expect("another user connects");
    assert!(matches!(read(admin).await, Ok(Ok(_))), "another user is served");

    drop((first, second));
    crate::support::eventually("a closed connection's place to be given back", Duration::from_secs(10), || async {
        let client = connect(&server.url, &pki, "remote").await.ok()?;
        matches!(read(client).await, Ok(Ok(_))).then_some(())
    })
    .await;
}
