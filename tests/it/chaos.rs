//! Convergence under chaos: a seeded random sequence of Kubernetes operations (CiliumNodes,
//! CiliumIdentities, CiliumEndpoints, Services with EndpointSlices, Namespaces; creates,
//! updates, deletes, objects turning invalid) on the fake API server, while the real binary is
//! SIGKILLed and restarted, watches get 410 Gone and relist, and — in attached mode — members of
//! a three-member etcd 3.5 cluster in containers (on a private Docker network, reached through
//! ports published on 127.0.0.1) are SIGKILLed and restarted. After settling, the
//! store under `cilium/state/` must hold exactly the expected keys and bytes: no stale key, no
//! missing key, no wrong value.
//!
//! The expected keys come from the pure translation model fed with the fake's final objects
//! (`Model::desired`), never from the server's writer or its event history: the property under
//! test is convergence (relists, pruning, leases, retries), not translation, which the golden
//! scenarios cover. IPs are never shared between objects, so the ipcache's "first owner wins"
//! rule cannot make the final state depend on event order.
//!
//! Knobs: `CHAOS_OPS` (operations, default 1000), `CHAOS_SEED` (default: random, printed), e.g.
//! `CHAOS_OPS=5000 CHAOS_SEED=7 cargo test --test it chaos -- --nocapture`.

use std::time::Duration;

use clustermesh_apiserver::translate::Settings;
use clustermesh_apiserver::translate::model::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::support::docker::{ETCD_35, EtcdContainers};
use crate::support::server::{ServerProcess, StoreMode, free_port};
use crate::support::state::{Difference, Keys, STATE, dump, expected};
use crate::support::{FakeApiServer, FakeOptions, Pki, client_tls, init_tracing};

/// Bound on the server becoming ready, and on the store converging, after the last fault.
const SETTLE: Duration = Duration::from_secs(90);

const NAMESPACES: [&str; 4] = ["ns-0", "ns-1", "ns-2", "ns-3"];
const NODES: usize = 8;
const IDENTITIES: usize = 8;
const ENDPOINTS_PER_NAMESPACE: usize = 6;
const SERVICES_PER_NAMESPACE: usize = 3;
const SLICES_PER_SERVICE: usize = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Generates objects; every address it hands out is new, so no two objects ever share an IP.
struct Generator {
    rng: StdRng,
    next_address: u32,
}

impl Generator {
    fn address(&mut self, first_octet: u32) -> String {
        self.next_address += 1;
        let n = self.next_address;
        format!("{first_octet}.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
    }

    fn node(&mut self, i: usize) -> Value {
        if self.rng.random_ratio(1, 20) {
            // Undecodable: the node's keys must go, exactly as if it had been deleted.
            return json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": format!("node-{i}")},
                "spec": {"addresses": "not a list"}});
        }
        let (internal, cilium, health) = (self.address(172), self.address(10), self.address(10));
        json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
            "metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}")}},
            "spec": {
                "addresses": [{"type": "InternalIP", "ip": internal}, {"type": "CiliumInternalIP", "ip": cilium}],
                "health": {"ipv4": health},
                "ipam": {"podCIDRs": [format!("10.{}.0.0/24", 100 + i)]}
            }
        })
    }

    fn identity_id(&mut self) -> u64 {
        100_000 + self.rng.random_range(0..IDENTITIES as u64)
    }

    fn identity(&mut self, id: u64) -> Value {
        let app = format!("app-{}", self.rng.random_range(0..5));
        let ns = NAMESPACES[self.rng.random_range(0..NAMESPACES.len())];
        json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": id.to_string(), "labels": {"io.kubernetes.pod.namespace": ns}},
            "security-labels": {"k8s:app": app, "k8s:io.cilium.k8s.policy.cluster": "cluster1",
                "k8s:io.kubernetes.pod.namespace": ns}
        })
    }

    fn endpoint(&mut self, ns: &str, i: usize) -> Value {
        let identity = self.identity_id();
        let (ip, node) = (self.address(11), self.address(172));
        json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": format!("cep-{i}"), "namespace": ns},
            "status": {
                "id": self.rng.random_range(1..4000),
                "identity": {"id": identity, "labels": ["k8s:app=x"]},
                "networking": {"addressing": [{"ipv4": ip}], "node": node},
                "state": "ready"
            }
        })
    }

    fn service(&mut self, ns: &str, i: usize) -> Value {
        let global = self.rng.random_ratio(3, 4);
        let cluster_ip = self.address(12);
        let port = self.rng.random_range(80..90);
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": ns,
                "annotations": {"service.cilium.io/global": global.to_string()}},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
                "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}
        })
    }

    fn endpoint_slice(&mut self, ns: &str, service: usize, i: usize) -> Value {
        let endpoints: Vec<Value> = (0..self.rng.random_range(0..4))
            .map(|_| {
                let ready = self.rng.random_ratio(4, 5);
                json!({"addresses": [self.address(13)], "conditions": {"ready": ready, "serving": ready, "terminating": false}})
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{service}-{i}"), "namespace": ns,
                "labels": {"kubernetes.io/service-name": format!("svc-{service}")}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        })
    }

    fn namespace(&mut self, ns: &str) -> Value {
        // Mostly global, so that most objects have keys to check.
        let annotations = match self.rng.random_range(0..6) {
            0 => json!({"clustermesh.cilium.io/global": "false"}),
            1 | 2 => json!({"clustermesh.cilium.io/global": "true"}),
            _ => json!({}),
        };
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "annotations": annotations}})
    }
}

/// One random create, update or delete. Returns a short description for the failure report.
fn random_operation(generator: &mut Generator, fake: &FakeApiServer) -> String {
    let rng = &mut generator.rng;
    let (api_version, kind, namespace, name): (&str, &str, Option<String>, String) = match rng.random_range(0..6) {
        0 => ("cilium.io/v2", "CiliumNode", None, format!("node-{}", rng.random_range(0..NODES))),
        1 => ("cilium.io/v2", "CiliumIdentity", None, (100_000 + rng.random_range(0..IDENTITIES)).to_string()),
        2 => (
            "cilium.io/v2",
            "CiliumEndpoint",
            Some(NAMESPACES[rng.random_range(0..NAMESPACES.len())].to_string()),
            format!("cep-{}", rng.random_range(0..ENDPOINTS_PER_NAMESPACE)),
        ),
        3 => (
            "v1",
            "Service",
            Some(NAMESPACES[rng.random_range(0..NAMESPACES.len())].to_string()),
            format!("svc-{}", rng.random_range(0..SERVICES_PER_NAMESPACE)),
        ),
        4 => (
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some(NAMESPACES[rng.random_range(0..NAMESPACES.len())].to_string()),
            format!("svc-{}-{}", rng.random_range(0..SERVICES_PER_NAMESPACE), rng.random_range(0..SLICES_PER_SERVICE)),
        ),
        _ => ("v1", "Namespace", None, NAMESPACES[rng.random_range(0..NAMESPACES.len())].to_string()),
    };
    let exists = fake.get(api_version, kind, namespace.as_deref(), &name).is_some();
    let what = format!("{kind} {}{name}", namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default());
    if exists && generator.rng.random_ratio(1, 4) {
        fake.delete(api_version, kind, namespace.as_deref(), &name);
        return format!("delete {what}");
    }
    let ns = namespace.as_deref().unwrap_or_default();
    let index = |s: &str| s.rsplit('-').next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    let object = match kind {
        "CiliumNode" => generator.node(index(&name)),
        "CiliumIdentity" => generator.identity(name.parse().expect("numeric identity")),
        "CiliumEndpoint" => generator.endpoint(ns, index(&name)),
        "Service" => generator.service(ns, index(&name)),
        "EndpointSlice" => {
            let mut parts = name.trim_start_matches("svc-").split('-').map(|p| p.parse::<usize>().expect("index"));
            let (service, slice) = (parts.next().expect("service"), parts.next().expect("slice"));
            generator.endpoint_slice(ns, service, slice)
        }
        _ => generator.namespace(&name),
    };
    fake.apply(object);
    format!("{} {what}", if exists { "update" } else { "create" })
}

/// The keys and bytes the store must hold for the fake's current objects, per the model.
fn expected_state(fake: &FakeApiServer) -> Keys {
    let kinds = [
        ("v1", "Namespace"),
        ("cilium.io/v2", "CiliumNode"),
        ("cilium.io/v2", "CiliumIdentity"),
        ("cilium.io/v2", "CiliumEndpoint"),
        ("v1", "Service"),
        ("discovery.k8s.io/v1", "EndpointSlice"),
    ];
    expected(kinds.into_iter().flat_map(|(api_version, kind)| fake.objects(api_version, kind)))
}

#[derive(Debug, Default)]
struct Tally {
    operations: usize,
    server_kills: usize,
    relists_410: usize,
    etcd_member_kills: usize,
}

enum Store {
    Embedded { client_port: u16 },
    Attached(EtcdContainers),
}

/// Runs the chaos sequence against the real binary writing to `store`, settles, and asserts
/// that the store holds exactly the expected keys.
async fn converge_under_chaos(mut store: Store, pki: &Pki) {
    init_tracing();
    let seed: u64 = env_or("CHAOS_SEED", rand::rng().random());
    let operations: usize = env_or("CHAOS_OPS", 1000);
    let mode_name = match store {
        Store::Embedded { .. } => "embedded",
        Store::Attached(_) => "attached",
    };
    // Printed first: cargo shows a failing test's output, so the seed is in every failure report.
    println!("chaos ({mode_name}): CHAOS_SEED={seed} CHAOS_OPS={operations}");

    // A short history, so that watches that fall behind get 410 on their own too.
    let fake = FakeApiServer::start_with(FakeOptions { history_limit: 200, ..FakeOptions::default() }).await;
    let mode = match &store {
        Store::Embedded { client_port } => StoreMode::Embedded { client_port: *client_port },
        Store::Attached(cluster) => StoreMode::Attached { endpoints: cluster.client_urls() },
    };
    let mut server = ServerProcess::start(pki, &fake.url(), &mode);
    let mut generator = Generator { rng: StdRng::seed_from_u64(seed), next_address: 0 };
    let mut tally = Tally::default();
    let mut log: Vec<String> = Vec::new();
    // Each kind of fault at least once, at fixed points; more at random.
    let forced = [operations / 4, operations / 2, 3 * operations / 4];
    let mut server_down_for = 0usize;
    let mut member_down: Option<(usize, usize)> = None;
    for op in 0..operations {
        log.push(random_operation(&mut generator, &fake));
        tally.operations += 1;
        if server_down_for > 0 {
            server_down_for -= 1;
            if server_down_for == 0 {
                server.restart();
                log.push("restart server".into());
                // Half the time the next kill comes only after a complete initial sync, so
                // that kills hit both a starting and a steady-state server.
                if generator.rng.random_bool(0.5) {
                    server.wait_ready(SETTLE).await;
                    log.push("server ready".into());
                }
            }
        }
        if let Some((member, ops_left)) = member_down.as_mut() {
            *ops_left -= 1;
            if *ops_left == 0 {
                let member = *member;
                member_down = None;
                if let Store::Attached(cluster) = &mut store {
                    cluster.restart(member).await;
                    log.push(format!("restart etcd member {member}"));
                }
            }
        }
        let fault = match forced.iter().position(|&at| at == op) {
            Some(i) => Some(i),
            None if generator.rng.random_ratio(1, 40) => Some(generator.rng.random_range(0..3)),
            None => None,
        };
        match fault {
            Some(0) if server.is_running() => {
                server.assert_alive();
                server.kill();
                tally.server_kills += 1;
                // Down for a while: what happens meanwhile is only seen by the next start's list.
                server_down_for = generator.rng.random_range(1..30);
                log.push("SIGKILL server".into());
            }
            Some(1) => {
                fake.expire_history();
                fake.close_watches();
                tally.relists_410 += 1;
                log.push("expire history + close watches (410 on re-watch)".into());
            }
            Some(2) if member_down.is_none() => {
                if let Store::Attached(cluster) = &mut store {
                    let member = generator.rng.random_range(0..cluster.size());
                    cluster.kill(member);
                    tally.etcd_member_kills += 1;
                    member_down = Some((member, generator.rng.random_range(1..40)));
                    log.push(format!("SIGKILL etcd member {member}"));
                }
            }
            _ => {}
        }
        // Let the server work between operations, so that faults land mid-stream.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // Settle: everything back up, then the store must converge.
    if let Some((member, _)) = member_down
        && let Store::Attached(cluster) = &mut store
    {
        cluster.restart(member).await;
    }
    if !server.is_running() {
        server.restart();
    }
    server.wait_ready(SETTLE).await;
    let expected = expected_state(&fake);
    let mut client = match &store {
        Store::Embedded { client_port } => {
            crate::support::connect(&format!("127.0.0.1:{client_port}"), pki, "root").await.expect("connect")
        }
        Store::Attached(cluster) => {
            let cert = pki.client("root");
            let options = etcd_client::ConnectOptions::new()
                .with_tls(client_tls(pki.ca_pem(), Some(&cert)))
                .with_connect_timeout(Duration::from_secs(3));
            etcd_client::Client::connect(cluster.client_urls(), Some(options)).await.expect("connect")
        }
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    let found = loop {
        let found = dump(&mut client, STATE).await;
        if let Ok(found) = &found
            && Difference::between(found, &expected) == Difference::default()
        {
            break found.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            break found.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let diff = Difference::between(&found, &expected);
    println!(
        "chaos ({mode_name}): seed={seed} operations={} server SIGKILLs={} 410 relists={} etcd member SIGKILLs={} \
         server starts={} expected keys={} stale={} missing={} wrong={}",
        tally.operations,
        tally.server_kills,
        tally.relists_410,
        tally.etcd_member_kills,
        server.starts(),
        expected.len(),
        diff.stale.len(),
        diff.missing.len(),
        diff.wrong.len()
    );
    assert!(
        diff == Difference::default(),
        "CHAOS_SEED={seed} CHAOS_OPS={operations}: the store did not converge within {SETTLE:?}: {diff:#?}\n\
         last operations:\n{}\nserver log tail:\n{}",
        log[log.len().saturating_sub(40)..].join("\n"),
        server.log_tail(40)
    );
    assert!(!expected.is_empty(), "a sequence that leaves nothing to check proves nothing (seed {seed})");
    // The server is whole again: cluster config and every canary.
    let meta = dump(&mut client, "cilium/").await.expect("dump");
    let config = clustermesh_apiserver::translate::cluster_config(&Settings::new("cluster1", 1));
    assert_eq!(meta.get("cilium/cluster-config/cluster1"), Some(&config.to_vec()), "cluster config (seed {seed})");
    let settings = Settings::new("cluster1", 1);
    for prefix in Model::new(settings.clone()).prefixes() {
        let canary = clustermesh_apiserver::translate::canary_key(&settings, prefix);
        assert!(meta.contains_key(&canary), "{canary} missing (seed {seed})");
    }
    server.assert_alive();
}

/// Attached mode: the store outlives every SIGKILL of the server, so stale keys from before a
/// kill (on the dead process's 15-minute lease) must be pruned, and writes lost to an etcd
/// member's death must be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_to_a_three_member_etcd_in_containers_the_store_converges_to_exactly_the_expected_keys_through_kills_and_relists()
 {
    let pki = Pki::new();
    let cluster = EtcdContainers::start(&pki, 3, ETCD_35).await;
    converge_under_chaos(Store::Attached(cluster), &pki).await;
}

/// Embedded mode: a SIGKILL wipes the store; each restart must rebuild it from Kubernetes
/// alone, and the last one must end with exactly the expected keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_is_rebuilt_with_exactly_the_expected_keys_after_kills_and_relists() {
    let pki = Pki::new();
    converge_under_chaos(Store::Embedded { client_port: free_port() }, &pki).await;
}
