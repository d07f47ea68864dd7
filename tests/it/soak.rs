//! Soak: thousands of long-lived watchers on our embedded store, multiplexed over a few gRPC
//! streams, through rounds of concurrent churn (puts, multi-key txns, range deletes). Every
//! watcher's event stream must equal, event for event, the slice of the revision log its key
//! range selects: nothing missed, nothing duplicated, nothing reordered, no watch dropped. The
//! revision log is built from the writers' own answers (each request's revision, with
//! `prev_kv` for deletes), never from the store's history or another watcher.
//!
//! Between rounds the history is compacted, as the server's auto-compaction would; RSS is
//! sampled after each round and must not grow with the number of events (a generous bound: the
//! figures are printed).
//!
//! Knobs: `SOAK_WATCHERS` (default 2000), `SOAK_STREAMS` (default 8), `SOAK_OPS` (writes per
//! round, default 1000), `SOAK_ROUNDS` (default 2, at least 2).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{DeleteOptions, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{EmbeddedStore, Pki};

const GROUPS: usize = 20;
const KEYS_PER_GROUP: usize = 10;
const WRITERS: usize = 4;
/// Bound on every watcher catching up after a round.
const CATCH_UP: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One event, reduced to a fingerprint of (revision, key, type, value).
fn fingerprint(revision: i64, key: &[u8], delete: bool, value: &[u8]) -> u64 {
    // FNV-1a: order-sensitive and cheap; a collision would hide nothing systematic.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x100_0000_01b3);
        }
    };
    feed(&revision.to_le_bytes());
    feed(key);
    feed(&[u8::from(delete), 0xff]);
    feed(value);
    hash
}

/// An event of the revision log: (revision, order within the revision, key, delete, value).
type LogEntry = (i64, usize, Vec<u8>, bool, Vec<u8>);

fn key(group: usize, i: usize) -> String {
    format!("soak/g{group:02}/k{i}")
}

/// One writer's share of a round; returns the log entries of its writes.
async fn churn(mut client: etcd_client::Client, seed: u64, ops: usize) -> Vec<LogEntry> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    for n in 0..ops {
        let group = rng.random_range(0..GROUPS);
        match rng.random_range(0..10) {
            0..=5 => {
                let k = key(group, rng.random_range(0..KEYS_PER_GROUP));
                let value = format!("{seed}-{n}");
                let r = client.put(k.as_str(), value.as_str(), None).await.expect("put");
                log.push((r.header().expect("header").revision(), 0, k.into_bytes(), false, value.into_bytes()));
            }
            6 | 7 => {
                let k = key(group, rng.random_range(0..KEYS_PER_GROUP));
                let r = client.delete(k.as_str(), Some(DeleteOptions::new().with_prev_key())).await.expect("delete");
                let revision = r.header().expect("header").revision();
                for (i, kv) in r.prev_kvs().iter().enumerate() {
                    log.push((revision, i, kv.key().to_vec(), true, Vec::new()));
                }
            }
            8 => {
                // Several keys in one revision, in op order, across groups.
                let mut keys: Vec<String> =
                    (0..3).map(|_| key(rng.random_range(0..GROUPS), rng.random_range(0..KEYS_PER_GROUP))).collect();
                keys.sort();
                keys.dedup();
                let value = format!("{seed}-{n}-txn");
                let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::put(k.as_str(), value.as_str(), None)).collect();
                let r = client.txn(Txn::new().and_then(ops)).await.expect("txn");
                let revision = r.header().expect("header").revision();
                assert!(r.op_responses().iter().all(|o| matches!(o, TxnOpResponse::Put(_))));
                for (i, k) in keys.into_iter().enumerate() {
                    log.push((revision, i, k.into_bytes(), false, value.clone().into_bytes()));
                }
            }
            _ => {
                let prefix = format!("soak/g{group:02}/");
                let options = DeleteOptions::new().with_prefix().with_prev_key();
                let r = client.delete(prefix.as_str(), Some(options)).await.expect("delete range");
                let revision = r.header().expect("header").revision();
                for (i, kv) in r.prev_kvs().iter().enumerate() {
                    log.push((revision, i, kv.key().to_vec(), true, Vec::new()));
                }
            }
        }
    }
    log
}

/// What one watcher watches: a group's prefix, or every group.
#[derive(Clone, Copy)]
enum Scope {
    Group(usize),
    All,
}

impl Scope {
    fn prefix(self) -> String {
        match self {
            Scope::Group(g) => format!("soak/g{g:02}/"),
            Scope::All => "soak/".to_string(),
        }
    }

    fn selects(self, key: &[u8]) -> bool {
        key.starts_with(self.prefix().as_bytes())
    }
}

/// The events one stream's watchers received so far, per watcher, and whether a watch ended.
#[derive(Default)]
struct Received {
    events: Vec<Vec<u64>>,
    /// The highest revision each watcher has seen.
    seen: Vec<i64>,
    failures: Vec<String>,
}

/// Opens `scopes.len()` watches on one stream from `start`, then records their events.
async fn watch_stream(
    mut client: etcd_client::Client,
    scopes: Vec<Scope>,
    start: i64,
    received: Arc<Mutex<Received>>,
) -> tokio::task::JoinHandle<()> {
    let first = scopes[0];
    let mut stream = client
        .watch(first.prefix(), Some(WatchOptions::new().with_prefix().with_start_revision(start).with_watch_id(1)))
        .await
        .expect("open a watch stream");
    for (i, scope) in scopes.iter().enumerate().skip(1) {
        let options = WatchOptions::new().with_prefix().with_start_revision(start).with_watch_id(i as i64 + 1);
        stream.watch(scope.prefix(), Some(options)).await.expect("add a watch");
    }
    {
        let mut r = received.lock().unwrap();
        r.events = vec![Vec::new(); scopes.len()];
        r.seen = vec![0; scopes.len()];
    }
    let mut created = 0;
    while created < scopes.len() {
        let message = stream.message().await.expect("watch created").expect("stream open");
        assert!(message.created() && !message.canceled(), "watch created: {message:?}");
        created += 1;
    }
    tokio::spawn(async move {
        // The stream (and with it every watch) lives as long as this task.
        let _client = client;
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    received.lock().unwrap().failures.push("stream ended".into());
                    return;
                }
                Err(e) => {
                    received.lock().unwrap().failures.push(format!("stream failed: {e}"));
                    return;
                }
            };
            let index = (message.watch_id() - 1) as usize;
            let mut r = received.lock().unwrap();
            if message.canceled() {
                r.failures.push(format!("watch {} canceled: {:?}", message.watch_id(), message.cancel_reason()));
                continue;
            }
            for event in message.events() {
                let kv = event.kv().expect("event kv");
                let delete = event.event_type() == EventType::Delete;
                r.events[index].push(fingerprint(kv.mod_revision(), kv.key(), delete, kv.value()));
                r.seen[index] = r.seen[index].max(kv.mod_revision());
            }
        }
    })
}

/// Thousands of watchers under churn each see exactly their slice of the revision log, round
/// after round, and memory does not grow with the events delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_watchers_under_churn_each_see_exactly_their_slice_of_the_revision_log() {
    let watchers: usize = env_or("SOAK_WATCHERS", 2000);
    let streams: usize = env_or("SOAK_STREAMS", 8).max(1);
    let ops: usize = env_or("SOAK_OPS", 1000);
    let rounds: usize = env_or("SOAK_ROUNDS", 2).max(2);
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    let mut admin = store.client(&pki, "root").await;
    let start = admin.put("soak-start", "", None).await.expect("put").header().expect("header").revision() + 1;

    // Watchers spread over streams (two streams per client connection); one in 20 watches
    // every group, the others one group each.
    let mut scopes: Vec<Vec<Scope>> = vec![Vec::new(); streams];
    for w in 0..watchers {
        let scope = if w % 20 == 0 { Scope::All } else { Scope::Group(w % GROUPS) };
        scopes[w % streams].push(scope);
    }
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    let mut client = store.client(&pki, "root").await;
    for (s, scopes) in scopes.iter().enumerate() {
        if s % 2 == 0 {
            client = store.client(&pki, "root").await;
        }
        let received = Arc::new(Mutex::new(Received::default()));
        tasks.push(watch_stream(client.clone(), scopes.clone(), start, Arc::clone(&received)).await);
        receivers.push(received);
    }
    let rss_start = rss_kib();

    let mut rss_after = Vec::new();
    let mut delivered_total = 0usize;
    let mut log_total = 0usize;
    let mut round_start = start;
    for round in 0..rounds {
        // Concurrent writers; then one sentinel per group closes the round.
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(churn(admin.clone(), (round * WRITERS + w) as u64, ops / WRITERS)))
            .collect();
        let mut log: Vec<LogEntry> = Vec::new();
        for writer in writers {
            log.extend(writer.await.expect("writer"));
        }
        let mut last = 0;
        for group in 0..GROUPS {
            let k = format!("soak/g{group:02}/~end");
            let value = format!("round {round}");
            let r = admin.put(k.as_str(), value.as_str(), Some(PutOptions::new())).await.expect("sentinel");
            last = r.header().expect("header").revision();
            log.push((last, 0, k.into_bytes(), false, value.into_bytes()));
        }
        log.sort_by_key(|entry| (entry.0, entry.1));
        log_total += log.len();

        // Every watcher catches up to the last sentinel it selects.
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let behind: usize = scopes
                .iter()
                .zip(&receivers)
                .map(|(scopes, received)| {
                    let r = received.lock().unwrap();
                    assert!(r.failures.is_empty(), "round {round}: {:?}", r.failures);
                    scopes
                        .iter()
                        .zip(&r.seen)
                        .filter(|(scope, seen)| {
                            let wanted = match scope {
                                Scope::All => last,
                                Scope::Group(g) => last - (GROUPS - 1 - g) as i64,
                            };
                            **seen < wanted
                        })
                        .count()
                })
                .sum();
            if behind == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {behind} watchers behind after {CATCH_UP:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Each watcher's events equal its slice of the log.
        let mut delivered = 0usize;
        for (s, (scopes, received)) in scopes.iter().zip(&receivers).enumerate() {
            let mut r = received.lock().unwrap();
            for (w, scope) in scopes.iter().enumerate() {
                let got = std::mem::take(&mut r.events[w]);
                let want: Vec<u64> = log
                    .iter()
                    .filter(|(rev, _, key, _, _)| *rev >= round_start && scope.selects(key))
                    .map(|(rev, _, key, delete, value)| fingerprint(*rev, key, *delete, value))
                    .collect();
                delivered += got.len();
                if got != want {
                    let first_difference = got.iter().zip(&want).position(|(a, b)| a != b);
                    panic!(
                        "round {round}, stream {s}, watcher {w} ({}): {} events received, {} in the log; \
                         first difference at {first_difference:?}",
                        scope.prefix(),
                        got.len(),
                        want.len()
                    );
                }
            }
        }
        delivered_total += delivered;
        round_start = last + 1;
        // As the server's auto-compaction would: the history of a verified round goes.
        admin.compact(last, None).await.expect("compact");
        rss_after.push(rss_kib());
        println!(
            "soak round {round}: {watchers} watchers on {streams} streams, {} log events, {delivered} delivered, RSS {} MiB",
            log.len(),
            rss_after[round] / 1024
        );
    }
    println!(
        "soak: {watchers} watchers, {rounds} rounds, {log_total} log events, {delivered_total} events delivered and \
         checked, RSS start {} MiB, after each round {:?} MiB",
        rss_start / 1024,
        rss_after.iter().map(|r| r / 1024).collect::<Vec<_>>()
    );
    // Flat memory, generously: the rounds after the first may not add more than 64 MiB in
    // all, whereas keeping every delivered event would grow with each round.
    let growth = rss_after[rounds - 1].saturating_sub(rss_after[0]);
    assert!(
        growth < 64 * 1024,
        "RSS grew by {} MiB over {} rounds after the first: {rss_after:?} KiB",
        growth / 1024,
        rounds - 1
    );
    for task in tasks {
        task.abort();
    }
    store.stop().await;
}
