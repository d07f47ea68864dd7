//! Readiness of the KVStoreMesh role (Cilium: `kvstoremesh.go`, `synced`; `remote_cluster.go`,
//! `waitForConnection`): ready once every cluster configured at start has its cache canaries
//! written, where a cluster that does not even connect within `--per-cluster-ready-timeout` is
//! not waited for, and ready regardless after `--global-ready-timeout`. Once ready, always ready.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::reflector::Reflector;
use crate::kvstore::Backend;
use crate::sync::metrics::Bootstrap;

#[derive(Debug, Clone, Copy)]
pub struct ReadyTimeouts {
    /// Cilium: 15 s.
    pub per_cluster: Duration,
    /// Cilium: 10 minutes.
    pub global: Duration,
}

impl Default for ReadyTimeouts {
    fn default() -> Self {
        Self { per_cluster: Duration::from_secs(15), global: Duration::from_secs(600) }
    }
}

/// Waits for `clusters` as described above, then turns `ready` on and records the time taken.
pub async fn run_readiness<B: Backend>(
    clusters: Vec<Arc<Reflector<B>>>,
    timeouts: ReadyTimeouts,
    ready: watch::Sender<bool>,
    bootstrap: Bootstrap,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let waits = clusters.iter().map(|reflector| cluster_ready(reflector, timeouts.per_cluster));
    tokio::select! {
        () = shutdown.cancelled() => return,
        _ = futures::future::join_all(waits) => {
            tracing::info!(clusters = clusters.len(), "every remote cluster synchronized (or never connected)");
        }
        () = tokio::time::sleep(timeouts.global) => {
            tracing::info!(
                timeout = ?timeouts.global,
                "not every remote cluster synchronized in time; ready anyway, some cached data may be incomplete"
            );
        }
    }
    let took = started.elapsed();
    *bootstrap.lock() = Some(took);
    ready.send_replace(true);
}

async fn cluster_ready<B: Backend>(reflector: &Reflector<B>, per_cluster: Duration) {
    let not_connected_in_time = async {
        tokio::time::sleep(per_cluster).await;
        if reflector.connected_once() {
            // Connected: from now on only the global timeout stops the wait.
            std::future::pending::<()>().await;
        }
        tracing::info!(cluster = %reflector.cluster(), "remote cluster did not connect in time; not waited for");
    };
    tokio::select! {
        () = reflector.wait_synced() => {}
        () = not_connected_in_time => {}
    }
}
