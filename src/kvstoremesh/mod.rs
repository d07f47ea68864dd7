//! The `kvstoremesh` role: every remote cluster of a clustermesh config directory, copied byte
//! for byte into the local store under `cilium/cache/...`, so that local agents connect only to
//! their own cluster (`cilium-wire-format.md` §2.2, §10; Cilium's `pkg/clustermesh/kvstoremesh`).
//!
//! ```text
//!  config dir ──► client (raw mode: connect, cluster config, canaries, list+watch, relist)
//!                    │ per remote cluster
//!                    ▼
//!                 Reflector ──► SyncStore (lease, retries) ──► local store
//!                    cilium/cluster-config/<C> (cached: true), cilium/cache/<kind>/v1/<C>/...,
//!                    cilium/synced/<C>/cilium/cache/<kind>/v1 once each prefix is copied
//! ```
//!
//! A removed cluster loses its cluster config at once and its data after a grace period; a
//! cluster disconnected longer than `--clustermesh-cache-ttl` loses its services.

pub mod api;
pub mod metrics;
pub mod readiness;
pub mod reflector;
pub mod remotes;
pub mod revocation;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_client::{ClientOptions, ClusterMesh, ClusterName, RemoteCluster};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::controllers::{CLUSTER_CONFIG_ENFORCER, ControllerRuns};
use crate::kvstore::Backend;
use crate::kvstore::instrumented::EventsQueue;
use crate::sync::metrics::Bootstrap;
use crate::sync::state;
use crate::sync::store::{SyncOptions, SyncStore};

pub use readiness::ReadyTimeouts;
pub use remotes::RemovalPolicy;

/// How long a shutdown waits for queued cache writes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the clustermesh config directory")]
    ConfigDir(#[source] clustermesh_client::config::Error),
}

#[derive(Debug, Clone)]
pub struct KvstoremeshConfig {
    /// The client's settings, the local cluster included; service exports are always followed
    /// (reflected whenever a remote offers them, whatever the local MCS-API setting).
    pub client: ClientOptions,
    /// `--clustermesh-config`: one etcd client file per remote cluster, named after it.
    pub config_dir: PathBuf,
    /// `--kvstore-lease-ttl` (Cilium: 15 minutes).
    pub lease_ttl: Duration,
    pub ready: ReadyTimeouts,
    /// `--clustermesh-cache-ttl`; zero never revokes (Cilium's default).
    pub cache_ttl: Duration,
    pub removal: RemovalPolicy,
    /// How each cache writer uses the local store (writes in flight, keys per lease).
    pub writer: SyncOptions,
    /// `--enable-heartbeat`: also keep `cilium/.heartbeat` fresh in the local store, for a store
    /// no clustermesh role writes to (Cilium's external kvstore mode).
    pub heartbeat: Option<Duration>,
    /// Where the cache writers time their queues (`kvstore_events_queue_seconds`).
    pub events_queue: Option<EventsQueue>,
}

impl KvstoremeshConfig {
    pub fn new(client: ClientOptions, config_dir: PathBuf) -> Self {
        Self {
            client,
            config_dir,
            lease_ttl: Duration::from_secs(15 * 60),
            ready: ReadyTimeouts::default(),
            cache_ttl: Duration::ZERO,
            removal: RemovalPolicy::default(),
            writer: SyncOptions::default(),
            heartbeat: None,
            events_queue: None,
        }
    }
}

/// What the API, the metrics and the shutdown share.
pub struct Shared {
    pub local: ClusterName,
    /// Taken at shutdown, to stop and wait for every connection.
    mesh: Mutex<Option<ClusterMesh>>,
    pub remotes: remotes::Remotes,
    pub revocations: revocation::Revocations,
    pub bootstrap: Bootstrap,
}

impl Shared {
    /// The client side of every configured remote cluster.
    pub fn clients(&self) -> Vec<RemoteCluster> {
        self.mesh.lock().as_ref().map(ClusterMesh::remotes).unwrap_or_default()
    }

    /// Every remote cluster in Cilium's status model, sorted by name.
    pub fn status(&self) -> Vec<status::RemoteCluster> {
        let mut clusters: Vec<_> =
            self.clients().iter().map(|remote| status::RemoteCluster::from_status(&remote.status())).collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        clusters
    }
}

/// What the rest of the process can observe of a running KVStoreMesh.
pub struct Running {
    pub ready: watch::Receiver<bool>,
    pub shared: Arc<Shared>,
}

impl Running {
    /// The status source of the REST API.
    pub fn status_source(&self) -> api::StatusSource {
        let shared = Arc::clone(&self.shared);
        Arc::new(move || shared.status())
    }
}

/// Starts copying every remote cluster of `config.config_dir` into `backend`; everything stops
/// on `shutdown`, the cache writers last (after their queues drained, bounded).
pub async fn spawn(
    backend: Arc<dyn Backend>,
    config: KvstoremeshConfig,
    registry: &mut Registry,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Running, Error> {
    let KvstoremeshConfig {
        client,
        config_dir,
        lease_ttl,
        ready: timeouts,
        cache_ttl,
        removal,
        writer,
        heartbeat,
        events_queue,
    } = config;
    let local = client.local().name.clone();
    let controllers = ControllerRuns::register(registry);
    controllers.declare(CLUSTER_CONFIG_ENFORCER);
    let metrics = remotes::WriterMetrics { events_queue, controllers };
    let remotes = remotes::Remotes::new(
        Arc::clone(&backend),
        lease_ttl,
        writer,
        metrics,
        removal,
        tracker.clone(),
        shutdown.clone(),
    );
    let mesh = ClusterMesh::start_raw(
        config_dir,
        client.with_service_exports(true),
        Arc::new(remotes.clone()),
        &shutdown.child_token(),
    )
    .await
    .map_err(Error::ConfigDir)?;
    let shared = Arc::new(Shared {
        local: local.clone(),
        mesh: Mutex::new(Some(mesh)),
        remotes: remotes.clone(),
        revocations: revocation::Revocations::default(),
        bootstrap: Bootstrap::default(),
    });
    registry.register_collector(Box::new(metrics::MeshCollector { shared: Arc::clone(&shared) }));

    // The clusters configured now are those readiness waits for (as Cilium's sync waiter).
    let initial = remotes.active().into_values().map(|copy| Arc::clone(&copy.reflector)).collect();
    let (ready_tx, ready) = watch::channel(false);
    tracker.spawn(
        readiness::run_readiness(initial, timeouts, ready_tx, Arc::clone(&shared.bootstrap), shutdown.child_token())
            .instrument(tracing::info_span!("kvstoremesh_readiness", %local)),
    );

    if !cache_ttl.is_zero() {
        let clients = Arc::clone(&shared);
        tracker.spawn(
            revocation::run_revocation(
                move || clients.clients(),
                cache_ttl,
                Arc::clone(&shared.revocations),
                shutdown.child_token(),
            )
            .instrument(tracing::info_span!("cache_ttl", ?cache_ttl)),
        );
    }

    let heartbeat_writer = CancellationToken::new();
    if let Some(interval) = heartbeat {
        let sync = SyncStore::new();
        tracker.spawn(
            state::run_heartbeat(Arc::clone(&sync), interval, shutdown.child_token())
                .instrument(tracing::info_span!("heartbeat")),
        );
        tracker.spawn(
            sync.run(Arc::clone(&backend), lease_ttl, heartbeat_writer.clone())
                .instrument(tracing::info_span!("heartbeat_writer")),
        );
    }

    let (stopping, token) = (Arc::clone(&shared), shutdown.clone());
    tracker.spawn(
        async move {
            token.cancelled().await;
            // Connections first (no more changes), then what they queued, then the writers.
            let mesh = stopping.mesh.lock().take();
            if let Some(mesh) = mesh {
                mesh.shutdown().await;
            }
            stopping.remotes.drain_writers(DRAIN_TIMEOUT).await;
            heartbeat_writer.cancel();
        }
        .instrument(tracing::info_span!("kvstoremesh_shutdown", %local)),
    );
    Ok(Running { ready, shared })
}
