//! Cilium's `api_limiter_*` families for the etcd client's limiter (`pkg/rate/metrics`,
//! `api_call` `etcd` for the connection to the local store, as `makeSessionName` names it),
//! read from the [`Limiter`] at scrape time. As Cilium's, they appear with the first request
//! through the limiter.
//!
//! | family | `value` | here |
//! |---|---|---|
//! | `api_limiter_processed_requests_total` | — (`outcome`, `return_code`) | requests answered: `success`/`200`, `fail`/`500` (Cilium's etcd client reports failures without a code, which it maps to 500) |
//! | `api_limiter_processing_duration_seconds` | `mean`, `estimated` | mean of the last 10 successful requests; `estimated` 0, as the etcd limiter has no estimate (it does not auto-adjust) |
//! | `api_limiter_wait_duration_seconds` | `mean`, `min`, `max` | mean wait for the rate of the last 10 successful requests; `min` and `max` are Cilium's configured bounds, which the etcd limiter leaves at 0 |
//! | `api_limiter_requests_in_flight` | `in-flight`, `limit` | requests let through and not answered; `etcd.maxInflight` (the writers' bound here) |
//! | `api_limiter_rate_limit` | `limit`, `burst` | `etcd.bootstrapQps` until the first sync, then `etcd.qps` (0: unlimited, as Cilium reports no limiter); the burst is one second of requests |
//!
//! `api_limiter_adjustment_factor` is left out: the clustermesh-apiserver does not register it,
//! and the etcd limiter never adjusts.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Limiter;

#[derive(Debug)]
pub struct LimiterCollector {
    limiter: Arc<Limiter>,
    api_call: String,
    max_in_flight: usize,
}

impl LimiterCollector {
    /// `max_in_flight`: the `etcd.maxInflight` in effect.
    pub fn new(limiter: Arc<Limiter>, api_call: &str, max_in_flight: usize) -> Self {
        Self { limiter, api_call: api_call.to_owned(), max_in_flight }
    }
}

/// A family's name, help and samples by `value` label.
type Gauge<'a> = (&'a str, &'a str, &'a [(&'a str, f64)]);

fn mean(durations: &std::collections::VecDeque<Duration>) -> f64 {
    if durations.is_empty() {
        0.0
    } else {
        durations.iter().map(Duration::as_secs_f64).sum::<f64>() / durations.len() as f64
    }
}

impl Collector for LimiterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let record = self.limiter.record.lock().clone();
        if record.succeeded + record.failed == 0 {
            return Ok(());
        }
        let api_call = self.api_call.as_str();

        let mut family = encoder.encode_descriptor(
            "api_limiter_processed_requests",
            "Total number of API requests processed",
            None,
            MetricType::Counter,
        )?;
        for (outcome, code, count) in [("success", "200", record.succeeded), ("fail", "500", record.failed)] {
            if count > 0 {
                let labels = [("api_call", api_call), ("outcome", outcome), ("return_code", code)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }

        let rate = self.limiter.rate().unwrap_or(0.0);
        let processing = [("mean", mean(&record.processing)), ("estimated", 0.0)];
        let waits = [("mean", mean(&record.waits)), ("max", 0.0), ("min", 0.0)];
        let in_flight = [("in-flight", record.in_flight as f64), ("limit", self.max_in_flight as f64)];
        // One second of requests (see `Limiter::acquire`).
        let rate_limit = [("limit", rate), ("burst", rate)];
        let gauges: [Gauge<'_>; 4] = [
            ("api_limiter_processing_duration_seconds", "Current processing time of api call", &processing),
            ("api_limiter_wait_duration_seconds", "Current wait time for api calls", &waits),
            ("api_limiter_requests_in_flight", "Current requests in flight", &in_flight),
            ("api_limiter_rate_limit", "Current rate limiting configuration", &rate_limit),
        ];
        for (name, help, values) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (value, v) in values {
                ConstGauge::new(*v).encode(family.encode_family(&[("api_call", api_call), ("value", value)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::super::{RateLimited, Rates};
    use super::*;
    use crate::kvstore::Backend;
    use crate::kvstore::embedded::Embedded;

    fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_reports_as_ciliums_once_a_request_went_through() {
        use crate::etcd::auth::AuthStore;
        use crate::etcd::store::{Identity, Limits, Store};
        let limiter = Limiter::new(Rates { bootstrap: Some(100.0), steady: Some(20.0) });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(LimiterCollector::new(Arc::clone(&limiter), "etcd", 20)));
        assert!(!scrape(&registry).contains("api_limiter"), "nothing before the first request");

        let store = Store::new(Identity::random(), Limits::default(), AuthStore::default());
        let backend = RateLimited::new(Arc::new(Embedded::new(store)), Arc::clone(&limiter));
        backend.get("cilium/.heartbeat").await.expect("get");
        let text = scrape(&registry);
        let has = |series: &str| text.lines().any(|l| l.starts_with(series));
        assert!(
            has(r#"api_limiter_processed_requests_total{api_call="etcd",outcome="success",return_code="200"} 1"#),
            "{text}"
        );
        assert!(has(r#"api_limiter_rate_limit{api_call="etcd",value="limit"} 100"#), "bootstrap rate: {text}");
        assert!(has(r#"api_limiter_requests_in_flight{api_call="etcd",value="in-flight"} 0"#), "{text}");
        assert!(has(r#"api_limiter_requests_in_flight{api_call="etcd",value="limit"} 20"#), "{text}");
        for family in ["api_limiter_processing_duration_seconds", "api_limiter_wait_duration_seconds"] {
            assert!(has(&format!(r#"{family}{{api_call="etcd",value="mean"}}"#)), "{family}: {text}");
        }

        limiter.bootstrap_done();
        assert!(scrape(&registry).contains(r#"api_limiter_rate_limit{api_call="etcd",value="limit"} 20"#));
    }
}
