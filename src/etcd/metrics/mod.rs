//! The embedded store's metrics under etcd's own names (`--metrics=basic`), so that the
//! dashboards and alerts written for Cilium's etcd sidecar keep working; our own bounds beside
//! them under `clustermesh_store_*`.
//!
//! `grpc`: the server's RPCs as go-grpc-prometheus counts them for etcd. `families`: the
//! store's state and activity, each etcd family with what it means for one in-memory member.

mod families;
mod frames;
mod grpc;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::registry::Registry;

pub use grpc::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService};

use super::server::ServerMetrics;
use super::store::Store;

/// Watch streams and watchers currently open, kept by the Watch service.
#[derive(Debug, Default)]
pub struct WatchGauges {
    pub streams: AtomicI64,
    pub watchers: AtomicI64,
    /// Watchers still behind the store's revision once their stream stopped serving them:
    /// the history is being replayed to them in bounded reads, or their client is not
    /// reading (etcd's unsynced "slow" watchers).
    pub slow_watchers: AtomicI64,
    /// Bytes of responses queued towards clients, across streams.
    pub queued_bytes: AtomicI64,
    /// Times a watch stream stopped reading its client's requests because the client was not
    /// reading the answers (the outbox budget was full).
    pub backpressured: AtomicU64,
}

/// Connections the client port dropped before they reached the gRPC server.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// TLS handshakes refused: no certificate, an unknown CA, an expired certificate.
    pub handshakes_refused: AtomicU64,
    /// Connections that did not finish the handshake, or sent nothing after it, in time.
    pub silent_closed: AtomicU64,
    /// Connections closed after the handshake because their user held
    /// `--max-connections-per-user`.
    pub over_user_limit: AtomicU64,
}

/// Registers the store's metrics; returns the handles the server, its listeners and the Watch
/// service feed.
pub fn register(registry: &mut Registry, store: Arc<Store>) -> ServerMetrics {
    let grpc = GrpcMetrics::register(registry);
    let watch = Arc::new(WatchGauges::default());
    let connections = Arc::new(ConnectionCounters::default());
    let collector =
        families::StoreCollector { store, watch: Arc::clone(&watch), connections: Arc::clone(&connections) };
    registry.register_collector(Box::new(collector));
    ServerMetrics { grpc, watch, connections }
}
