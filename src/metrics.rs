//! The small HTTP servers beside the gRPC one: Prometheus metrics and health endpoints.

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What one admin listener answers. Cilium splits these over ports (metrics on 9962/9963,
/// health on 9880), so each listener gets only what belongs on it.
#[derive(Clone, Default)]
pub struct Routes {
    /// `/metrics`, in the OpenMetrics text format Prometheus scrapes.
    pub metrics: Option<Arc<Registry>>,
    /// `/readyz` answers 200 once this turns true, 503 before; `/healthz` always 200.
    pub ready: Option<watch::Receiver<bool>>,
    /// etcd's own `/health` (`{"health":"true"}`), for probes written against an etcd sidecar.
    pub etcd_health: bool,
}

pub fn router(routes: Routes) -> Router {
    let mut router = Router::new();
    if let Some(registry) = routes.metrics {
        router = router.route("/metrics", get(move || metrics(Arc::clone(&registry))));
    }
    if let Some(ready) = routes.ready {
        router =
            router.route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(move || readyz(ready.clone())));
    }
    if routes.etcd_health {
        router = router.route(
            "/health",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{\"health\":\"true\",\"reason\":\"\"}") }),
        );
    }
    router
}

async fn metrics(registry: Arc<Registry>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new()),
    }
}

async fn readyz(ready: watch::Receiver<bool>) -> impl IntoResponse {
    if *ready.borrow() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// Serves `routes` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, routes: Routes, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(routes)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
