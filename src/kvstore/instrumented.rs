//! Cilium's kvstore client metrics, measured around any [`Backend`]: one wrapper, so the
//! embedded store and an attached etcd are timed the same way and no backend repeats it.
//!
//! `kvstore_operations_duration_seconds{scope,kind,action,outcome}` follows Cilium's etcd
//! client (`pkg/kvstore/etcd.go`, `metrics.go`): `kind` is `read`, `set` or `delete`,
//! `action` the client call (`Get`, `Update`, `Delete`, `ListPrefix`), `outcome` `success`
//! or `fail`, and Prometheus' default buckets, as Cilium declares none. Lease calls are not
//! key operations and, as in Cilium, are not timed.
//!
//! `kvstore_events_queue_seconds{scope,action}` is Cilium's histogram of the time a watch event
//! waited in its client's queue. A writer's events are its own changes: here it is the time a
//! key waited in the sync store's queue, from queued (or queued again after a failed write) to
//! its write answered, `action` `create`, `modify` or `delete` as Cilium's event types
//! (see [`crate::sync::store::SyncStore::timed`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Backend, Result};
use crate::blob::Blob;

/// Prometheus' `DefBuckets`, which Cilium's histogram inherits.
const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Cilium's buckets for `kvstore_events_queue_seconds`.
const EVENTS_QUEUE_BUCKETS: [f64; 11] = [0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    scope: String,
    kind: &'static str,
    action: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuorumLabels {
    pub error: &'static str,
}

type Histograms = Family<OperationLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub scope: String,
    pub action: &'static str,
}

/// `kvstore_events_queue_seconds`, fed by the sync stores.
pub type EventsQueue = Family<QueueLabels, Histogram, fn() -> Histogram>;

/// The kvstore families of one registry (under the caller's prefix).
#[derive(Clone, Debug)]
pub struct KvstoreMetrics {
    operations: Histograms,
    /// `kvstore_quorum_errors_total{error}`: fed by the attached-etcd quorum check. The
    /// embedded store is one member inside this process with no consensus to lose, so
    /// nothing feeds it there; it is still exported, at zero, so dashboards find the series.
    pub quorum_errors: Family<QuorumLabels, Counter>,
    pub events_queue: EventsQueue,
}

impl KvstoreMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let operations: Histograms = Family::new_with_constructor(|| Histogram::new(DEFAULT_BUCKETS));
        let quorum_errors = Family::<QuorumLabels, Counter>::default();
        let events_queue: EventsQueue = Family::new_with_constructor(|| Histogram::new(EVENTS_QUEUE_BUCKETS));
        registry.register(
            "kvstore_operations_duration_seconds",
            "Duration in seconds of kvstore operations",
            operations.clone(),
        );
        registry.register(
            "kvstore_events_queue_seconds",
            "Seconds waited before a received event was queued",
            events_queue.clone(),
        );
        registry.register("kvstore_quorum_errors", "Number of quorum errors", quorum_errors.clone());
        // Families without a child are left out of a scrape; a zero under Cilium's usual
        // label keeps the series visible (and alertable) where nothing ever feeds it.
        drop(quorum_errors.get_or_create(&QuorumLabels { error: "timeout" }));
        Self { operations, quorum_errors, events_queue }
    }

    fn observe(&self, key: &str, kind: &'static str, action: &'static str, ok: bool, took: Duration) {
        let labels = OperationLabels {
            scope: operation_scope(key).to_owned(),
            kind,
            action,
            outcome: if ok { "success" } else { "fail" },
        };
        self.operations.get_or_create(&labels).observe(took.as_secs_f64());
    }
}

/// Cilium's `GetScopeFromKey`, which bounds the label's cardinality:
/// `cilium/{state,cache}/<resource>/<version>/…` → `<resource>/<version>`,
/// `cilium/synced/<cluster>/<key>` → `synced/<scope of key>` (or `synced`),
/// `cilium/<name>…` → `<name>` without a leading dot, anything else → `other`.
pub fn operation_scope(key: &str) -> String {
    let parts: Vec<&str> = key.splitn(4, '/').collect();
    if parts.len() < 2 || parts[0] != "cilium" || parts[1].is_empty() {
        return "other".into();
    }
    match parts[1] {
        "state" | "cache" => {
            let (Some(resource), Some(rest)) = (parts.get(2), parts.get(3)) else { return "other".into() };
            let version = rest.split('/').next().unwrap_or_default();
            if resource.is_empty() || version.is_empty() { "other".into() } else { format!("{resource}/{version}") }
        }
        "synced" => match parts.get(3).map(|inner| operation_scope(inner)) {
            Some(inner) if inner != "other" => format!("synced/{inner}"),
            _ => "synced".into(),
        },
        name => match name.trim_start_matches('.') {
            "" => "other".into(),
            name => name.to_owned(),
        },
    }
}

/// A backend whose key operations are timed into [`KvstoreMetrics`].
pub struct Instrumented {
    inner: Arc<dyn Backend>,
    metrics: KvstoreMetrics,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Backend>, metrics: KvstoreMetrics) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        key: &str,
        kind: &'static str,
        action: &'static str,
        operation: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = operation.await;
        self.metrics.observe(key, kind, action, result.is_ok(), started.elapsed());
        result
    }
}

impl Backend for Instrumented {
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>> {
        self.inner.grant_lease(ttl)
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        self.inner.keep_alive(lease)
    }

    fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.timed(key, "set", "Update", self.inner.put(key, value, lease)))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        Box::pin(self.timed(key, "read", "Get", self.inner.get(key)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.timed(key, "delete", "Delete", self.inner.delete(key)))
    }

    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(self.timed(prefix, "read", "ListPrefix", self.inner.keys_with_prefix(prefix)))
    }

    fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<super::Entry>>> {
        Box::pin(self.timed(prefix, "read", "ListPrefix", self.inner.entries_with_prefix(prefix)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_bounded_as_in_cilium() {
        assert_eq!(operation_scope("cilium/state/nodes/v1/c1/n1"), "nodes/v1");
        assert_eq!(operation_scope("cilium/cache/identities/v1/c2/id/5"), "identities/v1");
        assert_eq!(operation_scope("cilium/state/ip/v1/"), "ip/v1");
        assert_eq!(operation_scope("cilium/synced/c1/cilium/state/nodes/v1"), "synced/nodes/v1");
        assert_eq!(operation_scope("cilium/synced/c1"), "synced");
        assert_eq!(operation_scope("cilium/.heartbeat"), "heartbeat");
        assert_eq!(operation_scope("cilium/cluster-config/c1"), "cluster-config");
        assert_eq!(operation_scope("cilium/state"), "other");
        assert_eq!(operation_scope("somewhere/else"), "other");
    }
}
