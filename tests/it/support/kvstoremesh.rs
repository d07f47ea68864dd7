//! Clusters on loopback for the KVStoreMesh specifications. Each is what one Cilium
//! clustermesh-apiserver pod holds: our embedded store with Cilium's users and roles, fed by its
//! own fake Kubernetes API through the mirror, and (when started) the kvstoremesh role in-process
//! on the same store, reading the other clusters as the `remote` user.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::kvstore::embedded::Embedded;
use clustermesh_apiserver::kvstoremesh::{self, KvstoremeshConfig, ReadyTimeouts, RemovalPolicy, Running};
use clustermesh_apiserver::translate::Settings;
use clustermesh_client::{Backoff, ClientOptions, ClusterId, ClusterName, LocalCluster};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::mirror::{Mirror, Target};
use super::{EmbeddedStore, FakeApiServer, Pki};

/// How often the mirrors of these clusters rewrite their heartbeat, and how long clients wait
/// for one before they reconnect: a stopped cluster is noticed within seconds, not minutes.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(4);

/// Cilium's client behaviour with test-sized intervals.
pub fn client_options(name: &str, id: u32) -> ClientOptions {
    let local = LocalCluster::new(ClusterName::new(name).expect("valid cluster name"), ClusterId(id));
    ClientOptions::new(local)
        .with_backoff(Backoff::new(Duration::from_millis(100), Duration::from_secs(1)))
        .with_cluster_config_retry(Duration::from_secs(10), Duration::from_millis(100))
        .with_request_timeout(Duration::from_secs(5))
        .with_dial_timeout(Duration::from_secs(2))
        .with_rewatch_delay(Duration::from_millis(20))
        .with_config_poll_interval(Duration::from_millis(100))
        .with_heartbeat_timeout(HEARTBEAT_TIMEOUT)
}

/// The etcd client file of `cluster`, authenticating as `user`.
pub fn write_peer(dir: &Path, cluster: &str, url: &str, pki: &Pki, user: &str) -> PathBuf {
    pki.write_peer_config(dir, cluster, url, user, "")
}

/// What one cluster publishes: a node, an identity in its ID range, an endpoint with that
/// identity, and a global service with one backend.
pub fn objects(cluster: &str, id: u32) -> Vec<Value> {
    let identity = (id << 16) + 100;
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        node(&format!("{cluster}-node-a"), &format!("10.{id}.0.1")),
        json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": identity.to_string()},
            "security-labels": {"k8s:app": "echo", "k8s:io.cilium.k8s.policy.cluster": cluster,
                                "k8s:io.kubernetes.pod.namespace": "default"}
        }),
        json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": "echo-1", "namespace": "default"},
            "status": {"identity": {"id": identity},
                       "networking": {"addressing": [{"ipv4": format!("10.{id}.1.5")}], "node": format!("10.{id}.0.1")}}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default", "annotations": {"service.cilium.io/global": "true"}},
            "spec": {"clusterIP": format!("10.96.{id}.10"), "clusterIPs": [format!("10.96.{id}.10")],
                     "selector": {"app": "echo"},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "echo-abc12", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.{id}.1.5")], "conditions": {"ready": true, "serving": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }),
    ]
}

pub fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name},
           "spec": {"addresses": [{"type": "InternalIP", "ip": ip}]}})
}

/// The cache a remote cluster's state becomes, written by hand from the wire contract
/// (`cilium-wire-format.md` §2.2) rather than from the code under test: the same bytes, keys
/// moved from `cilium/state/...` to `cilium/cache/...` with the cluster segment, identities
/// at `<C>/id/<id>`, IPs at `<C>/<ip>`. Endpoint slices are not reflected.
pub fn cached_copy(cluster: &str, state: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, value) in state {
        let cached = if let Some(rest) = key.strip_prefix("cilium/state/identities/v1/id/") {
            format!("cilium/cache/identities/v1/{cluster}/id/{rest}")
        } else if let Some(rest) = key.strip_prefix("cilium/state/ip/v1/default/") {
            format!("cilium/cache/ip/v1/{cluster}/{rest}")
        } else if key.starts_with("cilium/state/endpointslices/v1/") {
            continue;
        } else {
            key.replacen("cilium/state/", "cilium/cache/", 1)
        };
        out.insert(cached, value.clone());
    }
    out
}

/// Knobs of the kvstoremesh role in tests.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub grace_period: Duration,
    pub cache_ttl: Duration,
    pub per_cluster_ready_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(180),
            cache_ttl: Duration::ZERO,
            per_cluster_ready_timeout: Duration::from_secs(15),
        }
    }
}

/// The kvstoremesh role of one cluster, in-process.
pub struct InProcess {
    pub running: Running,
    pub registry: Arc<Registry>,
    token: CancellationToken,
    tracker: TaskTracker,
}

pub struct MeshCluster {
    pub name: String,
    pub id: u32,
    pub store: EmbeddedStore,
    pub fake: FakeApiServer,
    /// Where this cluster's kvstoremesh finds the other clusters.
    pub config_dir: tempfile::TempDir,
    mirror: Option<Mirror>,
    kvstoremesh: Option<InProcess>,
}

impl MeshCluster {
    /// Store, fake Kubernetes API with [`objects`], mirror; returns once the mirror is ready.
    pub async fn start(pki: &Pki, name: &str, id: u32) -> Self {
        let store = EmbeddedStore::start_with(pki, AuthStore::cilium(name), Default::default()).await;
        Self::with_store(store, name, id).await
    }

    async fn with_store(store: EmbeddedStore, name: &str, id: u32) -> Self {
        let fake = FakeApiServer::start().await;
        for object in objects(name, id) {
            fake.apply(object);
        }
        let target = Target::embedded(&store);
        let mut mirror = Mirror::start_with_heartbeat(&target, Settings::new(name, id), fake.client(), HEARTBEAT);
        mirror.wait_ready().await;
        let config_dir = tempfile::tempdir().expect("config dir");
        Self { name: name.into(), id, store, fake, config_dir, mirror: Some(mirror), kvstoremesh: None }
    }

    pub fn target(&self) -> Target {
        Target::embedded(&self.store)
    }

    /// Replaces the mirror with one run with `settings` (a Helm upgrade of this cluster's
    /// apiserver); returns once it is ready.
    pub async fn remirror(&mut self, settings: Settings) {
        if let Some(mirror) = self.mirror.take() {
            mirror.stop().await;
        }
        let mut mirror = Mirror::start_with_heartbeat(&self.target(), settings, self.fake.client(), HEARTBEAT);
        mirror.wait_ready().await;
        self.mirror = Some(mirror);
    }

    pub fn addr(&self) -> SocketAddr {
        self.store.addr
    }

    /// This cluster's kvstoremesh will copy `other`.
    pub fn add_peer(&self, pki: &Pki, other: &MeshCluster) {
        write_peer(self.config_dir.path(), &other.name, &other.store.client_url(), pki, "remote");
    }

    pub fn remove_peer(&self, other: &str) {
        std::fs::remove_file(self.config_dir.path().join(other)).expect("remove peer config");
    }

    /// Starts the kvstoremesh role on this cluster's store.
    pub async fn start_kvstoremesh(&mut self, tuning: Tuning) {
        let config = KvstoremeshConfig {
            ready: ReadyTimeouts { per_cluster: tuning.per_cluster_ready_timeout, global: Duration::from_secs(60) },
            cache_ttl: tuning.cache_ttl,
            removal: RemovalPolicy {
                grace_period: tuning.grace_period,
                retry_delay: Duration::from_millis(100),
                ..RemovalPolicy::default()
            },
            ..KvstoremeshConfig::new(client_options(&self.name, self.id), self.config_dir.path().to_owned())
        };
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        let mut registry = Registry::with_prefix("cilium_kvstoremesh");
        let backend = Arc::new(Embedded::new(Arc::clone(&self.store.store)));
        let running =
            kvstoremesh::spawn(backend, config, &mut registry, &tracker, &token).await.expect("kvstoremesh starts");
        self.kvstoremesh = Some(InProcess { running, registry: Arc::new(registry), token, tracker });
    }

    pub fn kvstoremesh(&self) -> &InProcess {
        self.kvstoremesh.as_ref().expect("kvstoremesh started")
    }

    pub async fn wait_kvstoremesh_ready(&self) {
        let mut ready = self.kvstoremesh().running.ready.clone();
        let waited = tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r)).await;
        assert!(matches!(waited, Ok(Ok(_))), "{}'s kvstoremesh not ready within 20 s", self.name);
    }

    /// Everything this cluster publishes under `cilium/state/`.
    pub async fn state(&self) -> BTreeMap<String, String> {
        self.target().dump("cilium/state/").await
    }

    /// Stops kvstoremesh (waiting for all its tasks), mirror and store; returns the address the
    /// store listened on.
    pub async fn stop(mut self) -> SocketAddr {
        if let Some(km) = self.kvstoremesh.take() {
            km.token.cancel();
            km.tracker.close();
            tokio::time::timeout(Duration::from_secs(10), km.tracker.wait())
                .await
                .expect("kvstoremesh shuts down within 10 s");
        }
        if let Some(mirror) = self.mirror.take() {
            mirror.stop().await;
        }
        let addr = self.store.addr;
        self.store.stop().await;
        addr
    }

    /// A fresh store on the same address (a new etcd cluster ID, as after a pod restart),
    /// mirrored from a fresh Kubernetes API under cluster ID `id`.
    pub async fn restart_at(pki: &Pki, addr: SocketAddr, name: &str, id: u32) -> Self {
        let store = EmbeddedStore::start_at(pki, AuthStore::cilium(name), addr).await;
        Self::with_store(store, name, id).await
    }
}
