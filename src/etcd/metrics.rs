//! The embedded store's metrics under etcd's own names, so that dashboards and alerts
//! written for Cilium's etcd sidecar keep working.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::server::ServerMetrics;
use super::store::Store;

/// Watch streams and watchers currently open, kept by the Watch service.
#[derive(Debug, Default)]
pub struct WatchGauges {
    pub streams: AtomicI64,
    pub watchers: AtomicI64,
    /// Bytes of responses queued towards clients, across streams.
    pub queued_bytes: AtomicI64,
    /// Times a watch stream stopped reading its client's requests because the client was not
    /// reading the answers (the outbox budget was full).
    pub backpressured: std::sync::atomic::AtomicU64,
}

/// Connections the client port dropped before they reached the gRPC server.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// TLS handshakes refused: no certificate, an unknown CA, an expired certificate.
    pub handshakes_refused: std::sync::atomic::AtomicU64,
    /// Connections that did not finish the handshake, or sent nothing after it, in time.
    pub silent_closed: std::sync::atomic::AtomicU64,
    /// Connections closed after the handshake because their user held
    /// `--max-connections-per-user`.
    pub over_user_limit: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
    pub grpc_code: &'static str,
}

/// `grpc_server_started_total` and `grpc_server_handled_total`, as go-grpc-prometheus
/// names them for etcd.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetrics {
    started: Family<GrpcLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
}

/// Registers the store's metrics; returns the handles the server, its listeners and the Watch
/// service feed.
pub fn register(registry: &mut Registry, store: Arc<Store>) -> ServerMetrics {
    let grpc = GrpcMetrics::default();
    registry.register("grpc_server_started", "RPCs started on the server", grpc.started.clone());
    registry.register("grpc_server_handled", "RPCs completed on the server, by status code", grpc.handled.clone());
    let watch = Arc::new(WatchGauges::default());
    let connections = Arc::new(ConnectionCounters::default());
    let collector = StoreCollector { store, watch: Arc::clone(&watch), connections: Arc::clone(&connections) };
    registry.register_collector(Box::new(collector));
    ServerMetrics { grpc, watch, connections }
}

#[derive(Debug)]
struct StoreCollector {
    store: Arc<Store>,
    watch: Arc<WatchGauges>,
    connections: Arc<ConnectionCounters>,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.store.stats();
        let held = stats.retained_bytes as i64;
        let gauges: [(&str, &str, i64); 10] = [
            ("etcd_server_has_leader", "Whether a leader exists: a single member always leads", 1),
            ("etcd_server_is_leader", "Whether this member is the leader", 1),
            (
                "etcd_server_quota_backend_bytes",
                "Space quota in bytes (--quota-backend-bytes; negative: no quota)",
                self.store.limits().quota_bytes(),
            ),
            ("etcd_mvcc_db_total_size_in_bytes", "Bytes of keys and values held, history included", held),
            ("etcd_mvcc_db_total_size_in_use_in_bytes", "Bytes of keys and values held, history included", held),
            ("etcd_debugging_mvcc_keys_total", "Live keys", stats.keys as i64),
            ("etcd_debugging_mvcc_current_revision", "Current revision", stats.revision),
            ("etcd_debugging_mvcc_compact_revision", "Last compaction revision", stats.compact_revision),
            ("etcd_debugging_mvcc_watcher_total", "Watchers open", self.watch.watchers.load(Ordering::Relaxed)),
            (
                "etcd_debugging_mvcc_watch_stream_total",
                "Watch streams open",
                self.watch.streams.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        let leases = ConstGauge::new(stats.leases as i64);
        leases.encode(encoder.encode_descriptor(
            "etcd_debugging_lease_total",
            "Leases held",
            None,
            MetricType::Gauge,
        )?)?;
        // Ours (no etcd counterpart): the memory bounds, and when they bit.
        ConstGauge::new(self.watch.queued_bytes.load(Ordering::Relaxed)).encode(encoder.encode_descriptor(
            "clustermesh_store_watch_queued_bytes",
            "Bytes of watch responses queued towards clients",
            None,
            MetricType::Gauge,
        )?)?;
        prometheus_client::metrics::counter::ConstCounter::new(self.watch.backpressured.load(Ordering::Relaxed))
            .encode(encoder.encode_descriptor(
                "clustermesh_store_watch_backpressure",
                "Times a watch stream stopped reading requests while its client left its answers unread",
                None,
                MetricType::Counter,
            )?)?;
        ConstGauge::new(stats.count_cache_bytes as i64).encode(encoder.encode_descriptor(
            "clustermesh_store_count_cache_bytes",
            "Bytes held by the cache of range counts for paged lists",
            None,
            MetricType::Gauge,
        )?)?;
        prometheus_client::metrics::counter::ConstCounter::new(stats.count_cache_evictions).encode(
            encoder.encode_descriptor(
                "clustermesh_store_count_cache_evictions",
                "Groups of range counts dropped to keep the cache within its byte bound",
                None,
                MetricType::Counter,
            )?,
        )?;
        let counters = [
            (
                "clustermesh_store_lease_grants_refused",
                "Lease grants refused because the user held --max-leases-per-user leases",
                stats.leases_refused,
            ),
            (
                "clustermesh_store_quota_refusals",
                "Writes and lease grants refused with NOSPACE: over --quota-backend-bytes, or while its alarm was raised",
                stats.quota_refusals,
            ),
            (
                "clustermesh_store_tls_handshakes_refused",
                "Client connections whose TLS handshake was refused (certificate missing, unknown or expired)",
                self.connections.handshakes_refused.load(Ordering::Relaxed),
            ),
            (
                "clustermesh_store_silent_connections_closed",
                "Client connections closed for finishing no handshake, or sending nothing, within 10 s",
                self.connections.silent_closed.load(Ordering::Relaxed),
            ),
            (
                "clustermesh_store_connections_over_user_limit",
                "Client connections closed after the handshake because their user held --max-connections-per-user",
                self.connections.over_user_limit.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            prometheus_client::metrics::counter::ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

/// The tower layer that counts every RPC by service, method and final status code.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer(pub GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

/// etcd's services and their methods, so that labels are static strings: counting a call
/// then costs no allocation (two `String`s per call before, on every put).
const METHODS: [(&str, &[&str]); 6] = [
    ("etcdserverpb.KV", &["Range", "Put", "DeleteRange", "Txn", "Compact"]),
    ("etcdserverpb.Watch", &["Watch"]),
    ("etcdserverpb.Lease", &["LeaseGrant", "LeaseRevoke", "LeaseKeepAlive", "LeaseTimeToLive", "LeaseLeases"]),
    ("etcdserverpb.Cluster", &["MemberAdd", "MemberRemove", "MemberUpdate", "MemberList", "MemberPromote"]),
    (
        "etcdserverpb.Maintenance",
        &["Alarm", "Status", "Defragment", "Hash", "HashKV", "Snapshot", "MoveLeader", "Downgrade"],
    ),
    (
        "etcdserverpb.Auth",
        &[
            "AuthEnable",
            "AuthDisable",
            "AuthStatus",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ],
    ),
];

/// The (service, method) labels of a request path; a path that names no etcd method (the
/// server answers it Unimplemented) is counted as `unknown`.
fn known_method(path: &str) -> (&'static str, &'static str) {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    METHODS
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(s, methods)| methods.iter().find(|m| **m == method).map(|m| (*s, *m)))
        .unwrap_or(("unknown", "unknown"))
}

fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" => "server_stream",
        _ => "unary",
    }
}

/// gRPC status codes by number, as Prometheus labels spell them.
fn code_name(code: &str) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    code.parse::<usize>().ok().and_then(|i| NAMES.get(i).copied()).unwrap_or("Unknown")
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = known_method(request.uri().path());
        let labels = GrpcLabels { grpc_type: grpc_type(method), grpc_service: service, grpc_method: method };
        self.metrics.started.get_or_create(&labels).inc();
        // The clone-and-swap keeps the service that poll_ready readied for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let handled = self.metrics.handled.clone();
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            resource_exhausted_as_grpc_says(&mut response);
            // Errors are trailers-only responses with the status in the headers; anything
            // else started successfully.
            let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map_or("OK", code_name);
            let labels = HandledLabels {
                grpc_type: labels.grpc_type,
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                grpc_code: code,
            };
            handled.get_or_create(&labels).inc();
            Ok(response)
        })
    }
}

/// A unary request over the receive limit, answered trailers-only: its code as gRPC says it
/// (see [`super::service::is_too_large`]).
fn resource_exhausted_as_grpc_says<R>(response: &mut http::Response<R>) {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            // grpc-message is percent-encoded on the wire.
            .is_some_and(|m| super::service::is_too_large(tonic::Code::OutOfRange, &m.replace("%20", " ")));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_map_to_static_labels() {
        assert_eq!(known_method("/etcdserverpb.KV/Put"), ("etcdserverpb.KV", "Put"));
        assert_eq!(known_method("/etcdserverpb.Watch/Watch"), ("etcdserverpb.Watch", "Watch"));
        assert_eq!(known_method("/etcdserverpb.KV/Nope"), ("unknown", "unknown"));
        assert_eq!(known_method("/grpc.health.v1.Health/Check"), ("unknown", "unknown"));
    }
}
