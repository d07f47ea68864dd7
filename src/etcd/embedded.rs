//! Wiring of one embedded store: its listeners, TLS reloader and background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use prometheus_client::registry::Registry;

use super::auth::AuthStore;
use super::metrics;
use super::pb::etcdserverpb::AlarmType;
use super::server::{self, ServerOptions};
use super::store::{Identity, Limits, Store};
use super::tls::{self, ReloadingConfig, TlsFiles};
use super::wal::{WalConfig, WalError};
use crate::metrics::Routes;

#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub tls: TlsFiles,
    pub tls_reload_interval: Duration,
    pub limits: Limits,
    pub server: ServerOptions,
    /// Zero disables automatic compaction.
    pub auto_compaction_retention: Duration,
    /// `--data-dir`: the store is restored from it and logs every write there.
    pub persistence: Option<WalConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("opening the store in the data directory")]
    DataDir(#[from] WalError),
}

/// The sockets one embedded store serves on, bound by the caller.
#[derive(Debug, Default)]
pub struct Listeners {
    /// etcd's `--listen-client-urls`: the gRPC API over mutual TLS.
    pub client: Vec<TcpListener>,
    /// etcd's `--listen-metrics-urls`: plain-HTTP `/metrics` and `/health`.
    pub metrics: Vec<TcpListener>,
}

/// Starts serving the store on every listener, with lease expiry, automatic compaction and
/// certificate reloading beside it; all of it stops on `shutdown` and is tracked by `tracker`.
pub fn spawn(
    listeners: Listeners,
    config: EmbeddedConfig,
    auth: AuthStore,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<Store>, StartError> {
    let tls = ReloadingConfig::load(config.tls.clone())?;
    let store = match &config.persistence {
        None => Store::new(Identity::random(), config.limits, auth),
        Some(wal) => {
            let (store, opened) = Store::open(config.limits, auth, wal)?;
            if opened.reidentified {
                tracing::warn!(
                    "the machine restarted since the store last wrote its log, and the store did not stop cleanly: \
                     writes not yet on disk may be lost, so the data is kept under a new cluster ID and clients resync"
                );
            }
            if let Some(cut) = &opened.cut {
                tracing::warn!("the log ended in a torn or corrupt record (a crash mid-write): {cut}");
            }
            let stats = store.stats();
            tracing::info!(
                dir = %wal.dir().display(),
                warm = opened.warm,
                revision = stats.revision,
                compact_revision = stats.compact_revision,
                keys = stats.keys,
                leases = stats.leases,
                log_entries = opened.entries,
                log_bytes = opened.log_bytes,
                snapshot_bytes = opened.snapshot_bytes,
                fsync = ?wal.fsync,
                "{}",
                if opened.warm { "store restored from the data directory" } else { "new store in the data directory" }
            );
            tracker.spawn(
                Arc::clone(&store)
                    .run_persistence(shutdown.child_token())
                    .instrument(tracing::info_span!("persistence")),
            );
            store
        }
    };
    tracing::info!(
        cluster_id = format_args!("{:x}", store.identity().cluster_id),
        member_id = format_args!("{:x}", store.identity().member_id),
        "embedded store started"
    );

    tracker.spawn(
        Arc::clone(&store).run_lease_expiry(shutdown.child_token()).instrument(tracing::info_span!("lease_expiry")),
    );
    if !config.auto_compaction_retention.is_zero() {
        tracker.spawn(
            Arc::clone(&store)
                .run_auto_compaction(config.auto_compaction_retention, shutdown.child_token())
                .instrument(tracing::info_span!("auto_compaction")),
        );
    }
    tracker.spawn(
        Arc::clone(&tls)
            .run_reloader(config.tls_reload_interval, shutdown.child_token())
            .instrument(tracing::info_span!("tls_reloader")),
    );
    let mut registry = Registry::default();
    let server_metrics = metrics::register(&mut registry, Arc::clone(&store));
    // An etcd sidecar exports its own process metrics on this port; operators scrape them here.
    registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
    // etcd's /health turns unhealthy while an alarm is raised.
    let alarms: crate::metrics::Alarms = {
        let store = Arc::clone(&store);
        Arc::new(move || {
            store.alarms().iter().filter_map(|a| AlarmType::try_from(a.alarm).ok()).map(|a| a.as_str_name()).collect()
        })
    };
    let routes = Routes { metrics: Some(Arc::new(registry)), etcd_health: Some(alarms), ..Routes::default() };
    for listener in listeners.metrics {
        let addr = listener.local_addr().ok();
        let (routes, shutdown) = (routes.clone(), shutdown.child_token());
        tracker.spawn(
            async move {
                if let Err(error) = crate::metrics::serve(listener, routes, shutdown).await {
                    tracing::error!(%error, "metrics server failed");
                }
            }
            .instrument(tracing::info_span!("etcd_metrics", addr = ?addr)),
        );
    }
    for listener in listeners.client {
        let addr = listener.local_addr().ok();
        let span = tracing::info_span!("etcd_server", addr = ?addr);
        let (tls, store, options, metrics, shutdown) =
            (Arc::clone(&tls), Arc::clone(&store), config.server.clone(), server_metrics.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                tracing::info!("serving the etcd v3 API over mutual TLS");
                if let Err(error) = server::serve(listener, tls, store, options, metrics, shutdown.child_token()).await
                {
                    tracing::error!(error = %crate::error_chain(&error), "etcd API server failed");
                    // One listener failing takes the process down: a half-served store
                    // would look healthy to some clients and dead to others.
                    shutdown.cancel();
                }
            }
            .instrument(span),
        );
    }
    Ok(store)
}

/// The accept queue of each listener, as etcd's: a burst of agents reconnecting after a
/// LoadBalancer failover must not overflow it.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds every address before anything is spawned, so a port in use fails start-up cleanly.
pub async fn bind_all(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(*addr)?;
        listeners.push(socket.listen(LISTEN_BACKLOG)?);
    }
    Ok(listeners)
}
