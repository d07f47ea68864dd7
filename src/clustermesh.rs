//! The `clustermesh` role: Kubernetes objects → translation model → sync store → backend,
//! with the cluster config, heartbeat and readiness beside it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::controllers::{CLUSTER_CONFIG_ENFORCER, ControllerRuns};
use crate::kvstore::Backend;
use crate::kvstore::instrumented::{Instrumented, KvstoreMetrics};
use crate::source::filter::ListFilter;
use crate::source::{self, SourceEvent};
use crate::sync::metrics::{Bootstrap, SyncCollector};
use crate::sync::mirror::{Mirror, MirrorMetrics};
use crate::sync::state::{self, HEARTBEAT_INTERVAL};
use crate::sync::store::{SyncOptions, SyncStore};
use crate::translate::model::{Model, Settings};

/// Where objects come from.
#[derive(Clone)]
pub enum Source {
    Kubernetes(kube::Client),
    /// A directory of manifests, polled at the interval.
    Directory(PathBuf, Duration),
}

#[derive(Clone)]
pub struct ClustermeshConfig {
    pub settings: Settings,
    pub source: Source,
    /// Which objects of each kind are read, from either source.
    pub filter: ListFilter,
    /// `--kvstore-lease-ttl`: every key is written on a lease of this TTL, so that keys of a
    /// server that died without cleaning up expire on their own (Cilium: 15 minutes).
    pub lease_ttl: Duration,
    /// How often the cluster config is checked against the store.
    pub cluster_config_check: Duration,
    pub heartbeat: Duration,
    /// Writes the sync store keeps in flight ([`SyncOptions::max_in_flight`]).
    pub max_writes_in_flight: usize,
}

impl ClustermeshConfig {
    pub fn new(settings: Settings, source: Source) -> Self {
        Self {
            settings,
            source,
            filter: ListFilter::default(),
            lease_ttl: Duration::from_secs(15 * 60),
            cluster_config_check: Duration::from_secs(5),
            heartbeat: HEARTBEAT_INTERVAL,
            max_writes_in_flight: 1,
        }
    }
}

/// How long a shutdown waits for queued writes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

async fn drain_then_stop(sync: Arc<SyncStore>, shutdown: CancellationToken, writer: CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = writer.cancelled() => return,
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, sync.drained()).await;
    if drained.is_err() {
        tracing::warn!(queued = sync.stats().queued, "shutting down with writes still queued");
    }
    writer.cancel();
}

/// What the rest of the process can observe of a running mirror.
pub struct Running {
    pub ready: watch::Receiver<bool>,
    pub sync: Arc<SyncStore>,
    /// The kvstore families registered for this mirror (the attached-etcd quorum check
    /// feeds `quorum_errors`).
    pub kvstore_metrics: KvstoreMetrics,
    /// Cilium's controller groups of this process (the users manager counts into it too).
    pub controllers: ControllerRuns,
}

/// Starts the mirror and everything beside it on `backend`; all of it stops on `shutdown`.
///
/// The cluster config is queued before anything else, so it is the first key written:
/// agents refuse a cluster without one.
pub fn spawn(
    backend: Arc<dyn Backend>,
    config: ClustermeshConfig,
    registry: &mut Registry,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Running {
    let cluster = config.settings.cluster_name.clone();
    // Every operation below, of either backend, is timed under Cilium's kvstore metrics.
    let kvstore_metrics = KvstoreMetrics::register(registry);
    let backend: Arc<dyn Backend> = Arc::new(Instrumented::new(backend, kvstore_metrics.clone()));
    let options = SyncOptions { max_in_flight: config.max_writes_in_flight, ..SyncOptions::default() };
    let sync = SyncStore::timed(options, kvstore_metrics.events_queue.clone());
    let controllers = ControllerRuns::register(registry);
    controllers.declare(CLUSTER_CONFIG_ENFORCER);
    let cluster_config_key = crate::translate::cluster_config_key(&config.settings);
    sync.track_written(&cluster_config_key);
    sync.upsert(cluster_config_key.clone(), crate::translate::cluster_config(&config.settings));

    let metrics = MirrorMetrics::register(registry);
    let mirror = Mirror::new(Model::new(config.settings.clone()), Arc::clone(&sync), metrics);
    let kinds = mirror.kinds();
    let mut waited_for = mirror.canary_keys();
    waited_for.push(cluster_config_key.clone());
    let prefixes = mirror.prefixes();
    // After a restart on a store that kept its data, only what changed is written.
    sync.adopt_on_start(prefixes.iter().map(|prefix| format!("{prefix}/")).collect());

    let (events_tx, events_rx) = mpsc::channel::<SourceEvent>(1024);
    tracker.spawn(mirror.run(events_rx, shutdown.child_token()).instrument(tracing::info_span!("mirror", %cluster)));
    match config.source {
        Source::Kubernetes(client) => source::kube::spawn(client, &kinds, &config.filter, events_tx, tracker, shutdown),
        Source::Directory(dir, interval) => {
            let span = tracing::info_span!("objects_dir", dir = %dir.display());
            tracker.spawn(
                source::objects_dir::run(dir, kinds, config.filter, interval, events_tx, shutdown.child_token())
                    .instrument(span),
            );
        }
    }

    // The writer outlives the sources by up to DRAIN_TIMEOUT, so that what was already
    // queued (the last deletes above all) reaches the store before the process exits.
    let writer = CancellationToken::new();
    tracker.spawn(drain_then_stop(Arc::clone(&sync), shutdown.clone(), writer.clone()));
    tracker.spawn(
        Arc::clone(&sync)
            .run(Arc::clone(&backend), config.lease_ttl, writer)
            .instrument(tracing::info_span!("sync_store", %cluster)),
    );
    tracker.spawn(
        state::run_heartbeat(Arc::clone(&sync), config.heartbeat, shutdown.child_token())
            .instrument(tracing::info_span!("heartbeat")),
    );
    tracker.spawn(
        state::run_cluster_config_enforcer(
            Arc::clone(&sync),
            Arc::clone(&backend),
            cluster_config_key.clone(),
            config.cluster_config_check,
            controllers.clone(),
            shutdown.child_token(),
        )
        .instrument(tracing::info_span!("cluster_config")),
    );
    let bootstrap = Bootstrap::default();
    let canaries = waited_for.iter().filter(|k| **k != cluster_config_key).cloned().collect();
    registry.register_collector(Box::new(SyncCollector::new(
        Arc::clone(&sync),
        cluster.clone(),
        canaries,
        Arc::clone(&bootstrap),
    )));
    let (ready_tx, ready) = watch::channel(false);
    tracker.spawn(
        state::run_readiness(
            Arc::clone(&sync),
            backend,
            waited_for,
            prefixes,
            ready_tx,
            bootstrap,
            shutdown.child_token(),
        )
        .instrument(tracing::info_span!("readiness")),
    );
    Running { ready, sync, kvstore_metrics, controllers }
}
