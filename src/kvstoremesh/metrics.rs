//! KVStoreMesh's metrics under Cilium's names (`cilium_kvstoremesh_*`), read from the client's
//! status and every cluster's sync store at scrape time.
//!
//! The `remote_cluster*` families carry `target_cluster` (Cilium 1.19+) and also
//! `source_cluster` (Cilium ≤1.18), so dashboards written for either keep working.

use std::sync::Arc;

use clustermesh_client::Kind;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Shared;
use super::status::unix_seconds;
use crate::sync::store::scope;

pub struct MeshCollector {
    pub shared: Arc<Shared>,
}

impl std::fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCollector").finish_non_exhaustive()
    }
}

impl Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.shared;
        let local = shared.local.as_str();
        if let Some(took) = *shared.bootstrap.lock() {
            // Cilium's `syncstate`, labelled with the local cluster (up to 1.18); here the time
            // until every remote cluster was synchronized (or timed out).
            let help = "Duration in seconds to complete bootstrap";
            let mut family = encoder.encode_descriptor("bootstrap_seconds", help, None, MetricType::Gauge)?;
            ConstGauge::new(took.as_secs_f64()).encode(family.encode_family(&[("source_cluster", local)])?)?;
        }

        let statuses: Vec<_> = shared.clients().iter().map(|r| r.status()).collect();
        let mut family = encoder.encode_descriptor(
            "remote_clusters",
            "The total number of remote clusters meshed with the local cluster",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(statuses.len() as i64).encode(family.encode_family(&[("source_cluster", local)])?)?;

        let per_remote = |name: &'static str,
                          help: &'static str,
                          value: &dyn Fn(&clustermesh_client::RemoteStatus) -> i64,
                          encoder: &mut DescriptorEncoder|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &statuses {
                let labels = [("source_cluster", local), ("target_cluster", status.name.as_str())];
                ConstGauge::new(value(status)).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        };
        // Cilium: connected and the cluster config retrieved.
        per_remote(
            "remote_cluster_readiness_status",
            "The readiness status of the remote cluster",
            &|s| i64::from(s.connected && s.config.retrieved),
            &mut encoder,
        )?;
        per_remote(
            "remote_cluster_failures",
            "The total number of failures related to the remote cluster",
            &|s| s.num_failures as i64,
            &mut encoder,
        )?;
        per_remote(
            "remote_cluster_last_failure_ts",
            "The timestamp of the last failure of the remote cluster",
            &|s| s.last_failure.as_ref().and_then(|f| unix_seconds(&f.at)).map_or(0, |t| t as i64),
            &mut encoder,
        )?;
        let revocations = shared.revocations.lock().clone();
        per_remote(
            "remote_cluster_cache_revocations",
            "The total number of cache revocations related to the remote cluster",
            &|s| revocations.get(&s.name).copied().unwrap_or(0) as i64,
            &mut encoder,
        )?;

        self.encode_writers(&mut encoder, &statuses)?;

        let version = [("version", env!("CARGO_PKG_VERSION"))];
        let mut family = encoder.encode_descriptor("version", "Build version", None, MetricType::Gauge)?;
        ConstGauge::new(1).encode(family.encode_family(&version)?)
    }
}

impl MeshCollector {
    /// The kvstore families of every cluster's copy, `scope` being the cached prefix
    /// (`nodes/v1`, ...) and `source_cluster` the remote cluster, as Cilium labels the sync
    /// stores of its reflectors.
    fn encode_writers(
        &self,
        encoder: &mut DescriptorEncoder,
        statuses: &[clustermesh_client::RemoteStatus],
    ) -> Result<(), std::fmt::Error> {
        let copies = self.shared.remotes.active();
        let mut family = encoder.encode_descriptor(
            "kvstore_sync_queue_size",
            "Keys waiting to be written to the kvstore",
            None,
            MetricType::Gauge,
        )?;
        for (name, copy) in &copies {
            let queued = copy.sync().queued_by_scope();
            for kind in Kind::ALL {
                let scope = scope(&copy.reflector.paths(kind).prefix).to_owned();
                let labels = [("scope", scope.as_str()), ("source_cluster", name.as_str())];
                ConstGauge::new(queued.get(&scope).copied().unwrap_or(0) as i64)
                    .encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "kvstore_sync_errors",
            "Failed writes to the kvstore",
            None,
            MetricType::Counter,
        )?;
        for (name, copy) in &copies {
            for (scope, count) in copy.sync().errors_by_scope() {
                let labels = [("scope", scope.as_str()), ("source_cluster", name.as_str())];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "kvstore_initial_sync_completed",
            "Whether the initial sync of a prefix is complete",
            None,
            MetricType::Gauge,
        )?;
        for (name, copy) in &copies {
            let written = copy.sync().canaries().borrow().clone();
            let status = statuses.iter().find(|s| &s.name == name);
            for kind in Kind::ALL {
                let paths = copy.reflector.paths(kind);
                let scope = scope(&paths.prefix).to_owned();
                let read = status.and_then(|s| s.prefixes.get(&kind)).is_some_and(|p| p.synced);
                for (action, done) in [("read", read), ("write", written.contains(&paths.canary))] {
                    let labels = [("scope", scope.as_str()), ("source_cluster", name.as_str()), ("action", action)];
                    ConstGauge::new(i64::from(done)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
