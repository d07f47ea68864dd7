//! The keys beside the mirrored objects — the cluster config (written first, restored when
//! edited or deleted) and the heartbeat — and readiness: ready once the cluster config and
//! every canary are written, after which keys that no object wants are pruned.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{SyncStore, list_for_prune};
use crate::blob::Blob;
use crate::controllers::{CLUSTER_CONFIG_ENFORCER, ControllerRuns};
use crate::kvstore::Backend;

/// Cilium's heartbeat key, rewritten every [`HEARTBEAT_INTERVAL`]; clients reconnect after
/// two intervals without one.
pub use clustermesh_client::wire::HEARTBEAT_KEY;
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps the heartbeat fresh until `shutdown`.
pub async fn run_heartbeat(sync: Arc<SyncStore>, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => sync.upsert(HEARTBEAT_KEY.to_owned(), Blob::from(super::rfc3339_now())),
        }
    }
}

/// Restores the cluster config when someone else changed or deleted it: agents refuse to
/// connect without it, and a wrong ID would make them drop this cluster. Each check is a run
/// of Cilium's `clustermesh-cluster-config-enforcer` controller group.
pub async fn run_cluster_config_enforcer(
    sync: Arc<SyncStore>,
    backend: Arc<dyn Backend>,
    key: String,
    interval: Duration,
    runs: ControllerRuns,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(desired) = sync.desired_value(&key) else { continue };
        let found = backend.get(&key).await;
        runs.record(CLUSTER_CONFIG_ENFORCER, found.is_ok());
        match found {
            Ok(found) if found.as_deref() != Some(&desired[..]) && sync.stats().queued == 0 => {
                tracing::warn!(key = %key, "cluster config changed outside this server; restoring it");
                sync.rewrite(&key, found.as_deref());
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(error = %crate::error_chain(&error), "reading the cluster config failed"),
        }
    }
}

/// Turns `ready` true once the cluster config and every canary in `canaries` are written,
/// records how long that took, then prunes `prefixes` of keys nothing wants (each listing
/// retried until it succeeds or shutdown); `None` if shut down before ready.
pub async fn run_readiness(
    sync: Arc<SyncStore>,
    backend: Arc<dyn Backend>,
    canaries: Vec<String>,
    prefixes: Vec<&'static str>,
    ready: watch::Sender<bool>,
    bootstrap: super::metrics::Bootstrap,
    shutdown: CancellationToken,
) -> Option<Duration> {
    let started = Instant::now();
    let mut written = sync.canaries();
    let all_written = written.wait_for(|set| canaries.iter().all(|c| set.contains(c)));
    tokio::select! {
        () = shutdown.cancelled() => return None,
        result = all_written => result.ok()?,
    };
    let took = started.elapsed();
    tracing::info!(bootstrap = ?took, canaries = canaries.len(), "initial sync complete; ready");
    *bootstrap.lock() = Some(took);
    ready.send_replace(true);
    for prefix in prefixes {
        let Some(keys) = list_for_prune(backend.as_ref(), &format!("{prefix}/"), &shutdown).await else {
            break;
        };
        let pruned = sync.prune(keys);
        if pruned > 0 {
            tracing::info!(prefix, pruned, "pruning keys of objects deleted while not running");
        }
    }
    Some(took)
}
