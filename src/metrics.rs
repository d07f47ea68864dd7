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

/// What one admin listener answers. Cilium splits these over ports (metrics on 9962/9963,
/// health on 9880), so each listener gets only what belongs on it.
#[derive(Clone, Default)]
pub struct Routes {
    /// `/metrics`, in OpenMetrics or Prometheus' text format, as the scraper's `Accept` asks.
    pub metrics: Option<Arc<Registry>>,
    /// `/readyz` answers 200 once this turns true, 503 before; `/healthz` always 200.
    pub ready: Option<watch::Receiver<bool>>,
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
        router =
            router.route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(move || readyz(ready.clone())));
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

async fn readyz(ready: watch::Receiver<bool>) -> impl IntoResponse {
    if *ready.borrow() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
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
}
