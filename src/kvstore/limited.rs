//! Cilium's `--kvstore-opt etcd.qps` and `etcd.bootstrapQps`: a bound on the requests per
//! second sent to an attached etcd, with a higher bound until the first synchronisation is
//! done (Cilium's etcd client swaps its rate limiter the same way once bootstrap completes).
//!
//! A token bucket holding one second of requests: a quiet client may send a burst that
//! large, a busy one is held to the rate. Lease renewals pass unlimited, so that a slow rate
//! can never let the lease of every written key expire.
//!
//! What it does is exported as Cilium's `api_limiter_*` families (see `metrics`).

mod metrics;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Backend, Result};
use crate::blob::Blob;

pub use metrics::LimiterCollector;

/// Requests per second before and after bootstrap; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub bootstrap: Option<f64>,
    pub steady: Option<f64>,
}

#[derive(Debug)]
pub struct Limiter {
    rates: Rates,
    bootstrapped: AtomicBool,
    /// When the next request may go, if the bucket were empty.
    next: Mutex<Option<Instant>>,
    record: Mutex<Record>,
}

/// How many requests the limiter let through, and how the last ones went: what Cilium's
/// limiter reports after each request.
#[derive(Debug, Default, Clone)]
struct Record {
    in_flight: u64,
    succeeded: u64,
    failed: u64,
    /// Of the last [`MEAN_OVER`] successful requests, as Cilium's means.
    waits: VecDeque<Duration>,
    processing: VecDeque<Duration>,
}

/// Cilium's `defaultMeanOver`.
const MEAN_OVER: usize = 10;

impl Limiter {
    pub fn new(rates: Rates) -> Arc<Self> {
        Arc::new(Self { rates, bootstrapped: AtomicBool::new(false), next: Mutex::new(None), record: Mutex::default() })
    }

    /// From now on, the steady rate applies.
    pub fn bootstrap_done(&self) {
        if !self.bootstrapped.swap(true, Ordering::Relaxed) {
            tracing::debug!(rate = ?self.rates.steady, "kvstore rate: bootstrap done");
        }
    }

    fn rate(&self) -> Option<f64> {
        if self.bootstrapped.load(Ordering::Relaxed) { self.rates.steady } else { self.rates.bootstrap }
    }

    /// Waits for the request's turn, runs it and records how long each took.
    async fn run<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T> {
        let asked = Instant::now();
        self.acquire().await;
        let started = Instant::now();
        let in_flight = InFlight::new(self);
        let result = request.await;
        in_flight.finished(started - asked, started.elapsed(), result.is_ok());
        result
    }

    /// Waits for this request's turn.
    pub async fn acquire(&self) {
        let Some(rate) = self.rate() else { return };
        let interval = Duration::from_secs_f64(1.0 / rate);
        // One second of requests may go at once after a quiet period.
        let burst = Duration::from_secs(1);
        let now = Instant::now();
        let turn = {
            let mut next = self.next.lock();
            let earliest = now.checked_sub(burst).unwrap_or(now);
            let turn = next.map_or(earliest, |n| n.max(earliest));
            *next = Some(turn + interval);
            turn
        };
        if turn > now {
            tokio::time::sleep_until(turn).await;
        }
    }
}

/// A backend whose key operations wait for the [`Limiter`].
pub struct RateLimited {
    inner: Arc<dyn Backend>,
    limiter: Arc<Limiter>,
}

impl RateLimited {
    pub fn new(inner: Arc<dyn Backend>, limiter: Arc<Limiter>) -> Self {
        Self { inner, limiter }
    }
}

/// A request let through and not answered yet; one dropped unanswered (its caller gave up)
/// leaves the count without being recorded.
struct InFlight<'a> {
    limiter: &'a Limiter,
}

impl<'a> InFlight<'a> {
    fn new(limiter: &'a Limiter) -> Self {
        limiter.record.lock().in_flight += 1;
        Self { limiter }
    }

    fn finished(self, waited: Duration, processing: Duration, succeeded: bool) {
        let mut guard = self.limiter.record.lock();
        let record = &mut *guard;
        if succeeded {
            record.succeeded += 1;
            // Cilium's means are over successful requests only.
            for (last, took) in [(&mut record.waits, waited), (&mut record.processing, processing)] {
                if last.len() == MEAN_OVER {
                    last.pop_front();
                }
                last.push_back(took);
            }
        } else {
            record.failed += 1;
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.limiter.record.lock().in_flight -= 1;
    }
}

impl Backend for RateLimited {
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>> {
        Box::pin(self.limiter.run(self.inner.grant_lease(ttl)))
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        self.inner.keep_alive(lease)
    }

    fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.limiter.run(self.inner.put(key, value, lease)))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        Box::pin(self.limiter.run(self.inner.get(key)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.limiter.run(self.inner.delete(key)))
    }

    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(self.limiter.run(self.inner.keys_with_prefix(prefix)))
    }

    fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<super::Entry>>> {
        Box::pin(async move {
            self.limiter.acquire().await;
            self.inner.entries_with_prefix(prefix).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the requests let through by a given (paused, virtual) time.
    async fn passed_within(limiter: &Arc<Limiter>, requests: usize, within: Duration) -> usize {
        let start = Instant::now();
        let mut passed = 0;
        for _ in 0..requests {
            limiter.acquire().await;
            if Instant::now().duration_since(start) <= within {
                passed += 1;
            }
        }
        passed
    }

    #[tokio::test(start_paused = true)]
    async fn the_steady_rate_holds_after_a_burst_of_one_second() {
        let limiter = Limiter::new(Rates { bootstrap: Some(1000.0), steady: Some(10.0) });
        limiter.bootstrap_done();
        // A one-second burst (10), then 10 per second: 20 by the end of the first second.
        let passed = passed_within(&limiter, 40, Duration::from_secs(1)).await;
        assert!((19..=21).contains(&passed), "{passed}");
    }

    #[tokio::test(start_paused = true)]
    async fn bootstrap_runs_at_the_bootstrap_rate() {
        let limiter = Limiter::new(Rates { bootstrap: Some(1000.0), steady: Some(10.0) });
        let passed = passed_within(&limiter, 1500, Duration::from_secs(1)).await;
        assert!(passed >= 1500, "{passed}");
    }
}
