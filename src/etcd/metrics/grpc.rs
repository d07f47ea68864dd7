//! The server's RPCs as go-grpc-prometheus counts them for etcd: `grpc_server_started_total`,
//! `grpc_server_handled_total{grpc_code}`, `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total`, every series present at zero from the start for every method
//! served (etcd's `grpc_prometheus.Register`), so that rates and ratios have a baseline before
//! the first call. Beside them etcd's `etcd_network_client_grpc_{received,sent}_bytes_total`:
//! the bytes of the protobuf messages, which etcd counts in its codec.
//!
//! A stream is handled when it ends, with the status its trailers carry (or `Canceled` when
//! the client went away first), as the interceptor records what the handler returned:
//! `started - handled` is the streams open, which etcd's dashboard plots.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::frames::{CountedRequest, CountedResponse, Handled};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
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

impl HandledLabels {
    pub fn new(labels: GrpcLabels, grpc_code: &'static str) -> Self {
        let GrpcLabels { grpc_type, grpc_service, grpc_method } = labels;
        Self { grpc_type, grpc_service, grpc_method, grpc_code }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GrpcMetrics {
    started: Family<GrpcLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    msg_received: Family<GrpcLabels, Counter>,
    msg_sent: Family<GrpcLabels, Counter>,
    received_bytes: Counter,
    sent_bytes: Counter,
}

impl GrpcMetrics {
    /// Registers the families, every method's series at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // etcd's help texts; the registry adds their final period.
        registry.register("grpc_server_started", "Total number of RPCs started on the server", metrics.started.clone());
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            metrics.handled.clone(),
        );
        registry.register(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server",
            metrics.msg_received.clone(),
        );
        registry.register(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server",
            metrics.msg_sent.clone(),
        );
        registry.register(
            "etcd_network_client_grpc_received_bytes",
            "The total number of bytes received from grpc clients",
            metrics.received_bytes.clone(),
        );
        registry.register(
            "etcd_network_client_grpc_sent_bytes",
            "The total number of bytes sent to grpc clients",
            metrics.sent_bytes.clone(),
        );
        for labels in served_methods() {
            drop(metrics.started.get_or_create(&labels));
            drop(metrics.msg_received.get_or_create(&labels));
            drop(metrics.msg_sent.get_or_create(&labels));
            for code in CODES {
                drop(metrics.handled.get_or_create(&HandledLabels::new(labels, code)));
            }
        }
        metrics
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
/// then costs no allocation. The same list names the series made at start.
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

fn served_methods() -> impl Iterator<Item = GrpcLabels> {
    METHODS.iter().flat_map(|(service, methods)| {
        methods.iter().map(|method| GrpcLabels {
            grpc_type: grpc_type(method),
            grpc_service: service,
            grpc_method: method,
        })
    })
}

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

/// go-grpc-prometheus' `grpc_type`, from the method's streaming sides.
fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" => "server_stream",
        _ => "unary",
    }
}

/// gRPC status codes by number, as Prometheus labels spell them.
const CODES: [&str; 17] = [
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

/// The label of a `grpc-status` value.
pub(super) fn code_name(code: &[u8]) -> &'static str {
    std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .and_then(|i| CODES.get(i).copied())
        .unwrap_or("Unknown")
}

type Body = tonic::body::Body;

impl<S, R> tower::Service<http::Request<Body>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: http_body::Body + Unpin,
{
    type Response = http::Response<CountedResponse<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (service, method) = known_method(request.uri().path());
        let labels = GrpcLabels { grpc_type: grpc_type(method), grpc_service: service, grpc_method: method };
        let metrics = &self.metrics;
        metrics.started.get_or_create(&labels).inc();
        let received = metrics.msg_received.get_or_create(&labels).clone();
        let request =
            request.map(|body| Body::new(CountedRequest::new(body, received, metrics.received_bytes.clone())));
        let sent = (metrics.msg_sent.get_or_create(&labels).clone(), metrics.sent_bytes.clone());
        let handled = Handled::new(metrics.handled.clone(), labels);
        // The clone-and-swap keeps the service that poll_ready readied for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            resource_exhausted_as_grpc_says(&mut response);
            // An error is answered trailers-only, its status in the headers: handled now.
            // Anything else is handled when its trailers go out.
            let handled = match response.headers().get("grpc-status") {
                Some(code) => {
                    handled.record(code_name(code.as_bytes()));
                    None
                }
                None => Some(handled),
            };
            Ok(response.map(|body| CountedResponse::new(body, sent.0, sent.1, handled)))
        })
    }
}

/// A unary request over the receive limit, answered trailers-only: its code as gRPC says it
/// (see [`crate::etcd::service::is_too_large`]).
fn resource_exhausted_as_grpc_says<R>(response: &mut http::Response<R>) {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers.get("grpc-message").and_then(|v| v.to_str().ok()).is_some_and(|m| {
            // grpc-message is percent-encoded on the wire.
            crate::etcd::service::is_too_large(tonic::Code::OutOfRange, &m.replace("%20", " "))
        });
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

    #[test]
    fn every_method_of_every_service_starts_at_zero_with_every_code() {
        let mut registry = Registry::default();
        GrpcMetrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        // 41 methods (etcd's 43 less gRPC's health service, which is not served here).
        assert_eq!(count("grpc_server_started_total{"), 41);
        assert_eq!(count("grpc_server_handled_total{"), 41 * 17);
        assert_eq!(count("grpc_server_msg_sent_total{"), 41);
        let watch = r#"grpc_server_handled_total{grpc_type="bidi_stream",grpc_service="etcdserverpb.Watch",grpc_method="Watch",grpc_code="Unavailable"} 0"#;
        assert!(text.contains(watch), "{text}");
        assert!(text.contains("etcd_network_client_grpc_sent_bytes_total 0"));
    }

    #[test]
    fn status_codes_read_as_labels() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"14"), "Unavailable");
        assert_eq!(code_name(b"99"), "Unknown");
    }
}
