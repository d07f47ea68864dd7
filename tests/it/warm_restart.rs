//! Warm restart: the store binary (`kvstore --data-dir`) is SIGKILLed at random points while a
//! client writes (puts, deletes, txns, lease grants and revokes) and a watcher follows, then
//! started again on the same data directory. After every restart:
//!
//! - the store holds exactly the acknowledged history: every acknowledged write, and the one
//!   write in flight at the kill either whole or not at all (checked against a model of etcd's
//!   semantics: values, create and mod revisions, versions, leases and their keys);
//! - the cluster ID is the same and the revision continues from there;
//! - the watcher, resuming from the revision after the last event it saw, gets exactly the
//!   changes after it (nothing it saw before the kill is missing from the log);
//! - compactions done before a kill are still in force.
//!
//! At the end, `etcdctl watch --rev` replays the history from an early revision.
//!
//! Knobs: `WARM_RESTART_ROUNDS` (default 6), `WARM_RESTART_SEED` (default: random, printed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseGrantOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::server::{BIN, ServerProcess, StoreMode, free_port};
use crate::support::{Etcdctl, FakeApiServer, Pki, connect, eventually};

const PREFIX: &str = "k/";
const KEYS: usize = 12;
const LEASE_TTL: i64 = 3600;
/// Most operations one round sends before the kill (the kill usually comes first).
const MAX_OPS_PER_ROUND: usize = 400;
const WAIT: Duration = Duration::from_secs(30);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The store binary on one data directory, killed and restarted.
struct StoreProcess {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    url: String,
}

impl StoreProcess {
    fn start(pki: &Pki, data: &Path, log_dir: &Path) -> Self {
        let port = free_port();
        let args = vec![
            "--log-level=info".to_owned(),
            "kvstore".to_owned(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls=https://127.0.0.1:{port}"),
            format!("--cert-file={}", pki.server_cert_path().display()),
            format!("--key-file={}", pki.server_key_path().display()),
            format!("--trusted-ca-file={}", pki.ca_path().display()),
            "--auto-compaction-retention=0".to_owned(),
            // Small, so that rounds rotate segments and take snapshots mid-run.
            "--wal-snapshot-bytes=4096".to_owned(),
        ];
        let mut process =
            Self { args, log: log_dir.join("store.log"), child: None, url: format!("https://127.0.0.1:{port}") };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(BIN)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the store");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn client(&self, pki: &Pki) -> Client {
        let url = self.url.clone();
        eventually("the store to answer", WAIT, || async {
            let mut client = connect(&url, pki, "root").await.ok()?;
            client.status().await.ok()?;
            Some(client)
        })
        .await
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Kv {
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

/// One change as a watcher sees it: revision, key, and the value put (`None`: deleted).
type Event = (i64, String, Option<String>);

#[derive(Debug, Clone)]
enum Op {
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// If `key`'s mod revision is `expect`, put both keys, else delete `key`.
    Txn {
        key: String,
        expect: i64,
        puts: [(String, String); 2],
    },
    Grant {
        id: i64,
    },
    Revoke {
        id: i64,
    },
}

/// etcd's semantics for the operations above.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    revision: i64,
    compact_revision: i64,
    keys: BTreeMap<String, Kv>,
    leases: BTreeMap<i64, BTreeSet<String>>,
    events: Vec<Event>,
}

impl Model {
    fn new() -> Self {
        Self { revision: 1, ..Self::default() }
    }

    fn apply(&mut self, op: &Op) {
        let next = self.revision + 1;
        let mut changed = false;
        match op {
            Op::Put { key, value, lease } => {
                self.put(key, value, *lease, next);
                changed = true;
            }
            Op::Delete { key } => changed = self.delete(key, next),
            Op::Txn { key, expect, puts } => {
                let current = self.keys.get(key).map_or(0, |kv| kv.mod_revision);
                if current == *expect {
                    puts.iter().for_each(|(k, v)| self.put(k, v, 0, next));
                    changed = true;
                } else {
                    changed = self.delete(key, next);
                }
            }
            Op::Grant { id } => {
                self.leases.insert(*id, BTreeSet::new());
            }
            Op::Revoke { id } => {
                for key in self.leases.remove(id).unwrap_or_default() {
                    changed |= self.delete(&key, next);
                }
            }
        }
        if changed {
            self.revision = next;
        }
    }

    fn put(&mut self, key: &str, value: &str, lease: i64, revision: i64) {
        let previous = self.keys.get(key).cloned();
        if let Some(prev) = &previous
            && prev.lease != 0
        {
            self.leases.get_mut(&prev.lease).map(|keys| keys.remove(key));
        }
        if lease != 0 {
            self.leases.get_mut(&lease).expect("a live lease").insert(key.to_owned());
        }
        let (create_revision, version) = previous.map_or((revision, 1), |p| (p.create_revision, p.version + 1));
        let kv = Kv { value: value.to_owned(), create_revision, mod_revision: revision, version, lease };
        self.keys.insert(key.to_owned(), kv);
        self.events.push((revision, key.to_owned(), Some(value.to_owned())));
    }

    fn delete(&mut self, key: &str, revision: i64) -> bool {
        let Some(prev) = self.keys.remove(key) else { return false };
        if prev.lease != 0 {
            self.leases.get_mut(&prev.lease).map(|keys| keys.remove(key));
        }
        self.events.push((revision, key.to_owned(), None));
        true
    }

    fn events_from(&self, revision: i64) -> Vec<Event> {
        self.events.iter().filter(|e| e.0 >= revision).cloned().collect()
    }
}

/// What the client has been told, and the one operation it is waiting on.
struct Acked {
    model: Model,
    in_flight: Option<Op>,
}

fn random_op(rng: &mut StdRng, model: &Model, next_lease: &mut i64) -> Op {
    let key = format!("{PREFIX}{:02}", rng.random_range(0..KEYS));
    let value = format!("v{}", rng.random_range(0..1_000_000));
    let leases: Vec<i64> = model.leases.keys().copied().collect();
    match rng.random_range(0..100) {
        0..45 => {
            let lease = if !leases.is_empty() && rng.random_ratio(1, 3) {
                leases[rng.random_range(0..leases.len())]
            } else {
                0
            };
            Op::Put { key, value, lease }
        }
        45..65 => Op::Delete { key },
        65..85 => {
            let current = model.keys.get(&key).map_or(0, |kv| kv.mod_revision);
            let expect = if rng.random_ratio(2, 3) { current } else { current + 1 };
            let other = format!(
                "{PREFIX}{:02}",
                (rng.random_range(0..KEYS - 1) + 1 + key[2..].parse::<usize>().unwrap()) % KEYS
            );
            Op::Txn { key: key.clone(), expect, puts: [(key, value.clone()), (other, value)] }
        }
        85..93 if leases.len() < 6 => {
            *next_lease += 1;
            Op::Grant { id: *next_lease }
        }
        _ if !leases.is_empty() => Op::Revoke { id: leases[rng.random_range(0..leases.len())] },
        _ => Op::Put { key, value, lease: 0 },
    }
}

async fn send(client: &mut Client, op: &Op) -> Result<(), etcd_client::Error> {
    match op {
        Op::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            client.put(key.as_str(), value.as_str(), options).await.map(drop)
        }
        Op::Delete { key } => client.delete(key.as_str(), None).await.map(drop),
        Op::Txn { key, expect, puts } => {
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, *expect)])
                .and_then(puts.iter().map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None)).collect::<Vec<_>>())
                .or_else([TxnOp::delete(key.as_str(), None)]);
            client.txn(txn).await.map(drop)
        }
        Op::Grant { id } => client.lease_grant(LEASE_TTL, Some(LeaseGrantOptions::new().with_id(*id))).await.map(drop),
        Op::Revoke { id } => client.lease_revoke(*id).await.map(drop),
    }
}

/// The store's data as the model holds it (events are not observable this way).
async fn observe(client: &mut Client) -> (u64, Model) {
    let response = client.get(PREFIX, Some(GetOptions::new().with_prefix())).await.expect("get");
    let header = response.header().expect("header");
    let (cluster_id, revision) = (header.cluster_id(), header.revision());
    let keys = response
        .kvs()
        .iter()
        .map(|kv| {
            let kv_model = Kv {
                value: kv.value_str().expect("utf-8").to_owned(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                version: kv.version(),
                lease: kv.lease(),
            };
            (kv.key_str().expect("utf-8").to_owned(), kv_model)
        })
        .collect();
    let mut leases = BTreeMap::new();
    for lease in client.leases().await.expect("leases").leases() {
        let ttl = client
            .lease_time_to_live(lease.id(), Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .expect("time to live");
        assert_eq!(ttl.granted_ttl(), LEASE_TTL);
        assert!(ttl.ttl() > LEASE_TTL - 60, "a restored lease gets its full TTL again: {}", ttl.ttl());
        let keys = ttl.keys().iter().map(|k| String::from_utf8(k.clone()).expect("utf-8")).collect();
        leases.insert(lease.id(), keys);
    }
    (cluster_id, Model { revision, keys, leases, ..Model::default() })
}

/// The store holds the model exactly, or the model with the in-flight write applied; returns
/// the model that matched.
fn settle(acked: Acked, found: &Model) -> Model {
    let same = |m: &Model| (m.revision, &m.keys, &m.leases) == (found.revision, &found.keys, &found.leases);
    if same(&acked.model) {
        return acked.model;
    }
    if let Some(op) = &acked.in_flight {
        let mut with = acked.model.clone();
        with.apply(op);
        if same(&with) {
            return with;
        }
    }
    panic!(
        "the store holds neither the acknowledged history nor it plus the write in flight ({:?})\nacknowledged: {:#?}\nfound: {:#?}",
        acked.in_flight, acked.model, found
    );
}

/// Watch events from `from` until one at `until` (inclusive) has been seen.
async fn watch_until(client: &mut Client, from: i64, until: i64, into: &mut Vec<Event>) {
    if until < from {
        return;
    }
    let options = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = client.watch(PREFIX, Some(options)).await.expect("watch");
    let read = async {
        while into.last().is_none_or(|e| e.0 < until) {
            let response = stream.message().await.expect("watch stream").expect("watch open");
            assert!(!response.canceled(), "watch from {from} canceled: {}", response.cancel_reason());
            for event in response.events() {
                let kv = event.kv().expect("kv");
                let value = (event.event_type() == EventType::Put).then(|| kv.value_str().expect("utf-8").to_owned());
                into.push((kv.mod_revision(), kv.key_str().expect("utf-8").to_owned(), value));
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.unwrap_or_else(|_| panic!("no event at {until} within {WAIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_mid_write_restarts_with_exactly_its_acknowledged_history() {
    let seed: u64 = env_or("WARM_RESTART_SEED", rand::random());
    let rounds: usize = env_or("WARM_RESTART_ROUNDS", 6);
    println!("warm_restart: WARM_RESTART_SEED={seed} WARM_RESTART_ROUNDS={rounds}");
    let mut rng = StdRng::seed_from_u64(seed);
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("data dir");
    let logs = tempfile::tempdir().expect("log dir");
    let mut store = StoreProcess::start(&pki, data.path(), logs.path());
    let mut client = store.client(&pki).await;
    let cluster_id = client.status().await.expect("status").header().expect("header").cluster_id();

    let mut model = Model::new();
    let mut next_lease = 0x1000;
    for round in 0..rounds {
        // A compaction acknowledged before the kill must still hold after it.
        if model.revision > 20 && rng.random_ratio(1, 2) {
            let revision = rng.random_range(model.compact_revision.max(2)..=model.revision - 5);
            client.compact(revision, None).await.expect("compact");
            model.compact_revision = revision;
        }
        let watched_from = model.revision + 1;
        let mut watcher_client = store.client(&pki).await;
        let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
        let watcher = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let options = WatchOptions::new().with_prefix().with_start_revision(watched_from);
                let Ok(mut stream) = watcher_client.watch(PREFIX, Some(options)).await else { return };
                while let Ok(Some(response)) = stream.message().await {
                    for event in response.events() {
                        let kv = event.kv().expect("kv");
                        let value = (event.event_type() == EventType::Put).then(|| kv.value_str().unwrap().to_owned());
                        seen.lock().unwrap().push((kv.mod_revision(), kv.key_str().unwrap().to_owned(), value));
                    }
                }
            })
        };

        let acked = Arc::new(Mutex::new(Acked { model: model.clone(), in_flight: None }));
        let writer = {
            let (acked, mut client) = (Arc::clone(&acked), client.clone());
            let mut rng = StdRng::seed_from_u64(rng.random());
            let mut next = next_lease;
            tokio::spawn(async move {
                for _ in 0..MAX_OPS_PER_ROUND {
                    let op = {
                        let mut acked = acked.lock().unwrap();
                        let op = random_op(&mut rng, &acked.model, &mut next);
                        acked.in_flight = Some(op.clone());
                        op
                    };
                    if send(&mut client, &op).await.is_err() {
                        return next;
                    }
                    let mut acked = acked.lock().unwrap();
                    acked.model.apply(&op);
                    acked.in_flight = None;
                }
                next
            })
        };
        // Not an assertion: only where, among the writes, the kill lands.
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..400))).await;
        store.kill();
        next_lease = writer.await.expect("writer");
        watcher.await.expect("watcher");
        let acked = Arc::into_inner(acked).expect("writer done").into_inner().unwrap();
        let seen_before_kill = Arc::into_inner(seen).expect("watcher done").into_inner().unwrap();

        store.spawn();
        client = store.client(&pki).await;
        let (found_cluster, found) = observe(&mut client).await;
        assert_eq!(found_cluster, cluster_id, "round {round}: the cluster ID survives the restart");
        let mut settled = settle(acked, &found);
        settled.compact_revision = model.compact_revision;
        model = settled;
        println!(
            "round {round}: revision {} ({} events before the kill seen by the watcher)",
            model.revision,
            seen_before_kill.len()
        );

        // The watcher resumes after the last event it saw and misses nothing.
        let resume = seen_before_kill.last().map_or(watched_from, |e| e.0 + 1);
        let mut seen = seen_before_kill;
        let last = model.events.last().map_or(0, |e| e.0);
        watch_until(&mut client, resume, last, &mut seen).await;
        assert_eq!(seen, model.events_from(watched_from), "round {round}: the watcher's view across the kill");

        if model.compact_revision > 1 {
            let below = client
                .get(PREFIX, Some(GetOptions::new().with_prefix().with_revision(model.compact_revision - 1)))
                .await;
            assert!(below.is_err(), "round {round}: the compaction at {} was lost", model.compact_revision);
        }
    }
    assert!(model.revision > 10, "too few writes to mean anything: {}\n{}", model.revision, store.log_tail());
    let log = std::fs::read_to_string(&store.log).unwrap_or_default();
    assert!(log.contains("snapshot written"), "no snapshot was taken:\n{}", store.log_tail());

    // etcdctl resumes a watch from a revision before the restarts.
    let from = model.events.iter().map(|e| e.0).find(|&r| r >= model.compact_revision.max(2)).expect("events");
    let expected = model.events_from(from);
    let etcdctl = Etcdctl::new(&store.url, &pki, "root");
    let rev = format!("--rev={from}");
    let output =
        etcdctl.run_with_timeout_async(&["watch", &rev, "--prefix", PREFIX], None, Duration::from_secs(10)).await;
    let lines: Vec<&str> = output.stdout.lines().collect();
    let mut printed = Vec::new();
    let mut at = 0;
    while at < lines.len() {
        match lines[at] {
            "PUT" => {
                printed.push((lines[at + 1].to_owned(), Some(lines[at + 2].to_owned())));
                at += 3;
            }
            // etcdctl prints a delete's empty value as an empty line.
            "DELETE" => {
                printed.push((lines[at + 1].to_owned(), None));
                at += 3;
            }
            other => panic!("unexpected etcdctl line {other:?}\n{}", output.stdout),
        }
    }
    let wanted: Vec<_> = expected.into_iter().map(|(_, key, value)| (key, value)).collect();
    assert_eq!(printed, wanted, "etcdctl watch --rev={from}\nstderr: {}", output.stderr);
}

fn node(name: &str, ip: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}]}})
}

/// Every key under `cilium/state/` with its mod revision and lease.
async fn state_keys(client: &mut Client) -> (u64, i64, BTreeMap<String, (i64, i64)>) {
    let response = client.get("cilium/state/", Some(GetOptions::new().with_prefix())).await.expect("get");
    let header = response.header().expect("header");
    let keys = response
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().expect("utf-8").to_owned(), (kv.mod_revision(), kv.lease())))
        .collect();
    (header.cluster_id(), header.revision(), keys)
}

/// The `clustermesh` binary with `--data-dir`, SIGKILLed and started again while one node
/// changed: the store comes back warm and the mirror writes only that node (plus its own
/// canaries and cluster config); every other key keeps its revision and its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_restarted_on_a_warm_store_writes_only_what_changed_meanwhile() {
    const NODES: usize = 40;
    let pki = Pki::new();
    let fake = FakeApiServer::start().await;
    for i in 0..NODES {
        fake.apply(node(&format!("node-{i}"), &format!("10.0.{i}.1")));
    }
    let data = tempfile::tempdir().expect("data dir");
    let client_port = free_port();
    let mode = StoreMode::Embedded { client_port };
    let mut server =
        ServerProcess::start_with(&pki, &fake.url(), &mode, &[format!("--data-dir={}", data.path().display())]);
    server.wait_ready(WAIT).await;
    let url = format!("https://127.0.0.1:{client_port}");
    let mut client = connect(&url, &pki, "root").await.expect("connect");
    let (cluster_id, before_revision, before) = state_keys(&mut client).await;
    assert_eq!(before.len(), NODES, "{before:?}");

    server.kill();
    fake.apply(node("node-0", "10.9.9.9"));
    server.restart();
    server.wait_ready(WAIT).await;
    let mut client = connect(&url, &pki, "root").await.expect("connect");
    // Readiness comes with the canaries, after the initial sync's writes.
    let (found_cluster, after_revision, after) = state_keys(&mut client).await;
    assert_eq!(found_cluster, cluster_id, "the same etcd cluster");
    let changed: Vec<&String> = after.iter().filter(|(k, v)| before.get(*k) != Some(*v)).map(|(k, _)| k).collect();
    assert_eq!(changed, ["cilium/state/nodes/v1/cluster1/node-0"], "only the changed node was written");
    assert!(
        after_revision - before_revision < 20,
        "{} revisions for one changed node (a rewrite of everything is {NODES} or more)",
        after_revision - before_revision
    );
}
