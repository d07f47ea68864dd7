//! The embedded store's gRPC server: every etcd service on one mTLS listener.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::{ConnectionCounters, GrpcMetrics, GrpcMetricsLayer, WatchGauges};
use super::pb::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use super::service::auth::AuthService;
use super::service::cluster::{ClusterService, MemberInfo};
use super::service::kv::KvService;
use super::service::lease::LeaseService;
use super::service::maintenance::MaintenanceService;
use super::service::watch::{WatchConfig, WatchService};
use super::store::Store;
use super::tls::{self, ReloadingConfig};

/// gRPC framing on top of `--max-request-bytes`, as etcd allows (`grpcOverheadBytes`), so
/// that an oversized put is answered with etcd's "request is too large" and not a transport
/// error.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub member: MemberInfo,
    pub watch: WatchConfig,
    /// etcd's `--max-concurrent-streams`: HTTP/2 streams one connection may hold open.
    pub max_concurrent_streams: u32,
    /// Client connections one certificate user may hold at once (0: no limit).
    pub max_connections_per_user: usize,
}

/// Streams per connection unless configured: etcd leaves it unbounded, which lets one
/// certificate holder open watch streams without end; Cilium's clients use a handful.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Request headers larger than this are refused (gRPC's own default is 8 KiB; etcd's clients
/// send a few hundred bytes).
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Where the server reports what it does.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    pub grpc: GrpcMetrics,
    pub watch: Arc<WatchGauges>,
    pub connections: Arc<ConnectionCounters>,
}

#[derive(Debug, thiserror::Error)]
#[error("serving the etcd API")]
pub struct ServeError(#[source] tonic::transport::Error);

/// etcd's plain HTTP endpoints on the client port, for connections that negotiated HTTP/1.1:
/// `/version` (what `etcdctl`-less tools and Cilium's troubleshooting read) and `/health`.
fn http1_handler(shutdown: CancellationToken) -> tls::Http1Handler {
    use axum::Router;
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let json = |body: serde_json::Value| ([(CONTENT_TYPE, "application/json")], body.to_string());
    let version = json(serde_json::json!({
        "etcdserver": super::service::maintenance::ETCD_VERSION,
        "etcdcluster": ETCD_CLUSTER_VERSION,
    }));
    let health = json(serde_json::json!({"health": "true", "reason": ""}));
    let router = Router::new()
        .route("/version", get(move || std::future::ready(version.clone())))
        .route("/health", get(move || std::future::ready(health.clone())));
    Arc::new(move |connection| {
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(connection);
            // A client that never finishes its request headers is dropped, as etcd does.
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            let mut serving = std::pin::pin!(serving);
            let result = tokio::select! {
                result = serving.as_mut() => result,
                () = shutdown.cancelled() => {
                    serving.as_mut().graceful_shutdown();
                    serving.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP/1.1 connection ended with an error");
            }
        });
    })
}

/// The cluster version etcd reports beside its own: the `major.minor.0` of the server.
const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// Serves the etcd v3 API on `listener` until `shutdown`; returns once in-flight requests
/// have finished and every watch and keep-alive stream has been closed.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    store: Arc<Store>,
    options: ServerOptions,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let max_message = store.limits().max_request_bytes + GRPC_OVERHEAD_BYTES;
    let limit = super::connections::ConnectionLimit::new(options.max_connections_per_user);
    let http1 = http1_handler(shutdown.clone());
    let incoming = tls::incoming(listener, tls, http1, limit, metrics.connections, shutdown.clone());
    tonic::transport::Server::builder()
        .layer(GrpcMetricsLayer(metrics.grpc))
        // etcd's server keepalive defaults: clients behind a LoadBalancer are told about a
        // dead peer within a few seconds of these.
        .http2_keepalive_interval(Some(Duration::from_secs(7200)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(options.max_concurrent_streams))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .add_service(
            KvServer::new(KvService::new(Arc::clone(&store), shutdown.clone())).max_decoding_message_size(max_message),
        )
        .add_service(
            WatchServer::new(WatchService::new(Arc::clone(&store), options.watch, metrics.watch, shutdown.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(LeaseServer::new(LeaseService::new(Arc::clone(&store), shutdown.clone())))
        .add_service(MaintenanceServer::new(MaintenanceService::new(Arc::clone(&store))))
        .add_service(ClusterServer::new(ClusterService::new(Arc::clone(&store), options.member)))
        .add_service(AuthServer::new(AuthService::new(Arc::clone(&store))))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(ServeError)
}
