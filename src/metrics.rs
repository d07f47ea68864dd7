//! The small HTTP servers beside the gRPC one: Prometheus metrics and health endpoints.

use std::sync::Arc;

use axum::Router;
use axum::extract::RawQuery;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What `/healthz` checks, as an error text when it fails.
pub type Liveness = Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What one admin listener answers. Cilium splits these over ports (metrics on 9962/9963,
/// health on 9880), so each listener gets only what belongs on it.
#[derive(Clone, Default)]
pub struct Routes {
    /// `/metrics`, in OpenMetrics or Prometheus' text format, as the scraper's `Accept` asks.
    pub metrics: Option<Arc<Registry>>,
    /// The health routes: `/readyz` answers 200 `Ready` once this turns true, 500 `NotReady`
    /// before, as Cilium's; `/livez` answers 200 while the process serves HTTP (what a
    /// liveness probe should ask: nothing outside the process); `/healthz` asks `liveness`.
    pub ready: Option<watch::Receiver<bool>>,
    /// Cilium's apiserver `/healthz`: 200 `ok` when the Kubernetes API server answers, 500
    /// with the error when not. Without a check, `/healthz` is `/livez`.
    pub liveness: Option<Liveness>,
    /// etcd's own `/health` (`{"health":"true"}`), for probes written against an etcd sidecar:
    /// the names of the alarms raised (`NOSPACE`), which make it unhealthy as they make etcd.
    pub etcd_health: Option<Alarms>,
}

/// The names of the alarms a store has raised, read at each `/health` request.
pub type Alarms = Arc<dyn Fn() -> Vec<&'static str> + Send + Sync>;

pub fn router(routes: Routes) -> Router {
    let mut router = Router::new();
    if let Some(registry) = routes.metrics {
        router = router.route("/metrics", get(move |headers| metrics(Arc::clone(&registry), headers)));
    }
    if let Some(ready) = routes.ready {
        let liveness = routes.liveness;
        router = router
            .route("/livez", get(|| async { "ok" }))
            .route("/healthz", get(move || healthz(liveness.clone())))
            .route("/readyz", get(move || readyz(ready.clone())));
    }
    if let Some(alarms) = routes.etcd_health {
        router = router.route("/health", get(move |query| etcd_health(alarms(), query)));
    }
    router
}

/// etcd's `checkHealth`: unhealthy, 503, while an alarm not named in an `exclude` parameter
/// is raised (`/health?exclude=NOSPACE` ignores a full store).
async fn etcd_health(alarms: Vec<&'static str>, RawQuery(query): RawQuery) -> impl IntoResponse {
    let query = query.unwrap_or_default();
    let excluded: Vec<&str> = query.split('&').filter_map(|pair| pair.strip_prefix("exclude=")).collect();
    match alarms.into_iter().find(|alarm| !excluded.contains(alarm)) {
        None => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"health\":\"true\",\"reason\":\"\"}".to_owned(),
        ),
        // etcd writes it with Go's `http.Error`: plain text, a newline after the JSON.
        Some(alarm) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{{\"health\":\"false\",\"reason\":\"ALARM {alarm}\"}}\n"),
        ),
    }
}

/// What a scraper asked for: OpenMetrics when its `Accept` names it (Prometheus asks for it
/// first), else Prometheus' text format 0.0.4, which older scrapers and `promtool` read.
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

async fn metrics(registry: Arc<Registry>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], String::new());
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], prometheus_text(&body))
    }
}

/// OpenMetrics text → Prometheus text 0.0.4: a counter family is named after its `_total`
/// samples, `info` becomes a gauge named `<name>_info`, `unknown` is `untyped`; `# UNIT`,
/// `# EOF` and exemplars have no place in 0.0.4.
fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP precedes TYPE in OpenMetrics; its name depends on the type, so it waits.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" | "gaugehistogram" | "stateset" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            // An exemplar follows the value after ` # `; label values cannot hold that
            // sequence unescaped in what prometheus-client writes.
            out.push_str(line.split_once(" # ").map_or(line, |(sample, _)| sample));
            out.push('\n');
        }
    }
    out
}

/// Cilium's words and codes (`clustermesh-apiserver/clustermesh/health.go`).
async fn readyz(ready: watch::Receiver<bool>) -> impl IntoResponse {
    if *ready.borrow() { (StatusCode::OK, "Ready") } else { (StatusCode::INTERNAL_SERVER_ERROR, "NotReady") }
}

async fn healthz(liveness: Option<Liveness>) -> impl IntoResponse {
    let answer = match liveness {
        Some(check) => check().await,
        None => Ok(()),
    };
    match answer {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error),
    }
}

/// Serves `routes` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, routes: Routes, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(routes)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_others_get_the_text_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0, text/plain")));
        assert!(!wants_openmetrics(None));
    }

    #[tokio::test]
    async fn etcd_health_is_503_while_an_alarm_not_excluded_is_raised() {
        let status = |alarms: Vec<&'static str>, query: Option<&'static str>| async move {
            etcd_health(alarms, RawQuery(query.map(str::to_owned))).await.into_response().status()
        };
        assert_eq!(status(vec![], None).await, StatusCode::OK);
        assert_eq!(status(vec!["NOSPACE"], None).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(vec!["NOSPACE"], Some("exclude=NOSPACE")).await, StatusCode::OK);
        assert_eq!(status(vec!["NOSPACE"], Some("exclude=CORRUPT")).await, StatusCode::SERVICE_UNAVAILABLE);
        let response = etcd_health(vec!["NOSPACE"], RawQuery(None)).await.into_response();
        let body = axum::body::to_bytes(response.into_body(), 1024).await.expect("body");
        assert_eq!(&body[..], b"{\"health\":\"false\",\"reason\":\"ALARM NOSPACE\"}\n", "etcd 3.5.16's answer");
    }

    #[test]
    fn families_are_renamed_as_the_text_format_names_them() {
        let openmetrics = "# HELP requests Requests served.\n# TYPE requests counter\nrequests_total{code=\"200\"} 3 # {trace=\"a\"} 1\n\
                           # HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n\
                           # HELP size Size.\n# TYPE size gauge\n# UNIT size bytes\nsize 7\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP requests_total Requests served.\n# TYPE requests_total counter\nrequests_total{code=\"200\"} 3\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n\
             # HELP size Size.\n# TYPE size gauge\nsize 7\n"
        );
    }

    async fn get(routes: Routes, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt;
        let request = axum::http::Request::get(path).body(axum::body::Body::empty()).expect("request");
        let response = router(routes).oneshot(request).await.expect("answered");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        (status, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    fn health(ready: bool, liveness: Option<Liveness>) -> Routes {
        let (_, ready) = watch::channel(ready);
        Routes { ready: Some(ready), liveness, ..Routes::default() }
    }

    #[tokio::test]
    async fn readiness_answers_in_ciliums_words_and_codes() {
        assert_eq!(get(health(false, None), "/readyz").await, (StatusCode::INTERNAL_SERVER_ERROR, "NotReady".into()));
        assert_eq!(get(health(true, None), "/readyz").await, (StatusCode::OK, "Ready".into()));
    }

    #[tokio::test]
    async fn healthz_reports_the_kubernetes_check_and_livez_only_the_process() {
        let unreachable: Liveness =
            Arc::new(|| Box::pin(async { Err("Get \"https://10.96.0.1/version\": connection refused".to_owned()) }));
        let routes = health(true, Some(unreachable));
        let (status, body) = get(routes.clone(), "/healthz").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("connection refused"), "{body}");
        assert_eq!(get(routes, "/livez").await, (StatusCode::OK, "ok".into()));

        let reachable: Liveness = Arc::new(|| Box::pin(async { Ok(()) }));
        assert_eq!(get(health(false, Some(reachable)), "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(health(false, None), "/healthz").await, (StatusCode::OK, "ok".into()));
    }
}
