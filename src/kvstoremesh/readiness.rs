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
pub async fn run_readiness(
    clusters: Vec<Arc<Reflector>>,
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

async fn cluster_ready(reflector: &Reflector, per_cluster: Duration) {
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

#[cfg(test)]
mod tests {
    use clustermesh_client::ClusterName;
    use clustermesh_client::raw::RawSink;
    use clustermesh_client::wire::ClusterConfig;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::etcd::auth::AuthStore;
    use crate::etcd::store::{Identity, Limits, Store};
    use crate::kvstore::embedded::Embedded;
    use crate::sync::store::SyncStore;

    const TIMEOUTS: ReadyTimeouts =
        ReadyTimeouts { per_cluster: Duration::from_secs(1), global: Duration::from_secs(10) };

    /// A copy whose writer never runs: its canaries never appear.
    fn stuck(connected: bool) -> Arc<Reflector> {
        let backend = Arc::new(Embedded::new(Store::new(Identity::random(), Limits::default(), AuthStore::default())));
        let name = ClusterName::new("c2").unwrap();
        let reflector = Reflector::new(name, SyncStore::new(), backend, TaskTracker::new(), CancellationToken::new());
        if connected {
            reflector.cluster_config(&ClusterConfig::default());
        }
        Arc::new(reflector)
    }

    async fn ready_after(reflector: Arc<Reflector>) -> Duration {
        let (tx, mut ready) = watch::channel(false);
        let bootstrap = Bootstrap::default();
        let started = Instant::now();
        tokio::spawn(run_readiness(vec![reflector], TIMEOUTS, tx, Arc::clone(&bootstrap), CancellationToken::new()));
        ready.wait_for(|r| *r).await.unwrap();
        assert!(bootstrap.lock().is_some(), "bootstrap_seconds is recorded");
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_that_never_connects_is_not_waited_for_past_the_per_cluster_timeout() {
        let took = ready_after(stuck(false)).await;
        assert!(took >= TIMEOUTS.per_cluster && took < TIMEOUTS.global, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connected_cluster_that_never_syncs_holds_readiness_until_the_global_timeout() {
        let took = ready_after(stuck(true)).await;
        assert!(took >= TIMEOUTS.global, "{took:?}");
    }
}
