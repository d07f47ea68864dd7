//! Watch behaviour beyond what etcd-client shows: fragmented responses, progress requests,
//! and a watcher that does not read never holding writers back.

use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::pb::etcdserverpb::{
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse, watch_client::WatchClient,
    watch_request::RequestUnion,
};
use clustermesh_apiserver::etcd::store::Limits;
use etcd_client::WatchOptions;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{EmbeddedStore, Pki};

/// A raw watch stream through our own generated client, to see every field etcd sends.
async fn raw_watch(store: &EmbeddedStore, pki: &Pki) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<WatchResponse>) {
    let client = pki.client("root");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .identity(Identity::from_pem(&client.cert_pem, &client.key_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(store.client_url())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    let responses = WatchClient::new(channel).watch(ReceiverStream::new(rx)).await.expect("watch").into_inner();
    (tx, responses)
}

fn create(key: &str, range_end: &str, start_revision: i64, fragment: bool) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.as_bytes().to_vec().into(),
            range_end: range_end.as_bytes().to_vec().into(),
            start_revision,
            fragment,
            ..Default::default()
        })),
    }
}

async fn next(responses: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10 s")
        .expect("no error")
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_request_limit_arrives_in_fragments_when_asked() {
    let pki = Pki::new();
    let store = EmbeddedStore::start_with(
        &pki,
        AuthStore::default(),
        Limits { max_request_bytes: 4096, max_txn_ops: 128, ..Limits::default() },
    )
    .await;
    let mut client = store.client(&pki, "root").await;
    for i in 0..8 {
        client.put(format!("f/{i}"), vec![b'x'; 1000], None).await.expect("put");
    }
    let (tx, mut responses) = raw_watch(&store, &pki).await;
    tx.send(create("f/", "f0", 1, true)).await.expect("send");
    assert!(next(&mut responses).await.created);
    let mut pieces = Vec::new();
    loop {
        let response = next(&mut responses).await;
        let last = !response.fragment;
        pieces.push(response);
        if last {
            break;
        }
    }
    assert!(pieces.len() > 1, "8 KB of events over a 4 KB limit come in several pieces");
    let keys: Vec<String> = pieces
        .iter()
        .flat_map(|p| &p.events)
        .map(|e| String::from_utf8_lossy(&e.kv.as_ref().unwrap().key).into_owned())
        .collect();
    assert_eq!(keys, (0..8).map(|i| format!("f/{i}")).collect::<Vec<_>>());
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_request_is_answered_with_the_current_revision_once_watchers_caught_up() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let mut client = store.client(&pki, "root").await;
    for i in 0..3 {
        client.put(format!("p/{i}"), "v", None).await.expect("put");
    }
    let (tx, mut responses) = raw_watch(&store, &pki).await;
    tx.send(create("p/", "p0", 2, false)).await.expect("send");
    tx.send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) })
        .await
        .expect("send");
    let mut events = 0;
    let progress = loop {
        let response = next(&mut responses).await;
        events += response.events.len();
        if response.watch_id == -1 {
            break response;
        }
    };
    assert_eq!(events, 3, "every event before the progress notification");
    assert_eq!(progress.header.expect("header").revision, 4);
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_never_holds_writers_back_and_misses_nothing() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let mut writer = store.client(&pki, "root").await;
    let mut reader = store.client(&pki, "root").await;
    let mut stream = reader.watch("s/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let created = stream.message().await.expect("created").expect("open");
    assert!(created.created());
    // Far more than the stream's buffers hold, while nobody reads.
    let writes = 3000;
    let all_written = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..writes {
            writer.put(format!("s/{}", i % 50), vec![b'v'; 512], None).await.expect("put");
        }
    })
    .await;
    assert!(all_written.is_ok(), "writers were held back by a watcher that does not read");
    let mut last_revision = 0;
    let mut seen = 0;
    while seen < writes {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events keep coming")
            .expect("no error")
            .expect("open");
        assert!(!response.canceled(), "the slow watcher was not dropped: {}", response.cancel_reason());
        for event in response.events() {
            let revision = event.kv().expect("kv").mod_revision();
            assert_eq!(revision, last_revision.max(1) + 1, "no gap, no duplicate");
            last_revision = revision;
            seen += 1;
        }
    }
    store.stop().await;
}
