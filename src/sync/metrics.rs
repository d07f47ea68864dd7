//! The mirror's metrics under Cilium's names (`cilium_clustermesh_apiserver_*`), read from
//! the sync store at scrape time.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::store::{SyncStore, scope};

/// Filled in once the initial sync is complete.
pub type Bootstrap = Arc<Mutex<Option<Duration>>>;

#[derive(Debug)]
pub struct SyncCollector {
    pub sync: Arc<SyncStore>,
    pub cluster: String,
    /// The canary key of every prefix written, by scope.
    pub canaries: Vec<(String, String)>,
    pub bootstrap: Bootstrap,
}

impl SyncCollector {
    pub fn new(sync: Arc<SyncStore>, cluster: String, canary_keys: Vec<String>, bootstrap: Bootstrap) -> Self {
        let canaries = canary_keys
            .into_iter()
            .map(|key| {
                let prefix = key.splitn(4, '/').nth(3).unwrap_or_default().to_owned();
                (scope(&prefix).to_owned(), key)
            })
            .collect();
        Self { sync, cluster, canaries, bootstrap }
    }
}

impl std::fmt::Debug for SyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncStore").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl Collector for SyncCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cluster = self.cluster.as_str();
        if let Some(took) = *self.bootstrap.lock() {
            // Cilium's `syncstate` labels it with the local cluster (up to 1.18).
            let help = "Duration in seconds to complete bootstrap";
            let mut family = encoder.encode_descriptor("bootstrap_seconds", help, None, MetricType::Gauge)?;
            ConstGauge::new(took.as_secs_f64()).encode(family.encode_family(&[("source_cluster", cluster)])?)?;
        }

        let queued = self.sync.queued_by_scope();
        let mut family = encoder.encode_descriptor(
            "kvstore_sync_queue_size",
            "Keys waiting to be written to the kvstore",
            None,
            MetricType::Gauge,
        )?;
        for (scope, _) in &self.canaries {
            let labels = [("scope", scope.as_str()), ("source_cluster", cluster)];
            let count = queued.get(scope).copied().unwrap_or(0) as i64;
            ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
        }

        let errors = self.sync.errors_by_scope();
        let mut family = encoder.encode_descriptor(
            "kvstore_sync_errors",
            "Failed writes to the kvstore",
            None,
            MetricType::Counter,
        )?;
        for (scope, count) in &errors {
            let labels = [("scope", scope.as_str()), ("source_cluster", cluster)];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }

        let written = self.sync.canaries().borrow().clone();
        let mut family = encoder.encode_descriptor(
            "kvstore_initial_sync_completed",
            "Whether the initial sync of a prefix is complete",
            None,
            MetricType::Gauge,
        )?;
        for (scope, canary) in &self.canaries {
            let labels = [("scope", scope.as_str()), ("source_cluster", cluster), ("action", "write")];
            ConstGauge::new(i64::from(written.contains(canary))).encode(family.encode_family(&labels)?)?;
        }

        let version = [("version", env!("CARGO_PKG_VERSION"))];
        let mut family = encoder.encode_descriptor("version", "Build version", None, MetricType::Gauge)?;
        ConstGauge::new(1).encode(family.encode_family(&version)?)
    }
}
