//! etcd 3.5's `--metrics=basic` families that one in-memory member can honestly report, read
//! from the store at scrape time, and our own bounds beside them.
//!
//! Names, types and labels are etcd 3.5.16's (`tests/it/metrics.rs` compares them with a real
//! etcd's scrape). One deviation: etcd types some gauges with a `_total` name
//! (`etcd_debugging_mvcc_keys_total`, `etcd_server_proposals_committed_total`, ...), which
//! `promtool check metrics` refuses; those are served untyped. Samples, names and labels are
//! unchanged, and PromQL does not read the type.
//!
//! Families with nothing behind them here are left out rather than faked: disk and WAL
//! latencies (nothing is written to disk), snapshots, raft heartbeats and read indexes, the
//! gRPC proxy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{ConnectionCounters, WatchGauges};
use crate::etcd::service::maintenance::ETCD_VERSION;
use crate::etcd::store::Store;

#[derive(Debug)]
pub(super) struct StoreCollector {
    pub store: Arc<Store>,
    pub watch: Arc<WatchGauges>,
    pub connections: Arc<ConnectionCounters>,
}

/// One sample without labels, or with one label.
enum Value {
    Gauge(i64),
    /// A gauge whose etcd name ends in `_total` (see the module comment).
    Untyped(i64),
    /// Named without its `_total`, which the encoder adds.
    Counter(u64),
    /// etcd's "1 for the label with the current value" gauges.
    Info(&'static str, String),
}

fn encode(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: Value) -> Result<(), std::fmt::Error> {
    match value {
        Value::Gauge(v) => ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?),
        Value::Untyped(v) => {
            ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Unknown)?)
        }
        Value::Counter(v) => {
            ConstCounter::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
        }
        Value::Info(label, v) => {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(1).encode(family.encode_family(&[(label, v.as_str())])?)
        }
    }
}

/// etcd's `cluster_version` label: the `major.minor` of the cluster.
fn cluster_version() -> String {
    ETCD_VERSION.rsplit_once('.').map_or(ETCD_VERSION, |(major_minor, _)| major_minor).to_owned()
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.store.stats();
        let activity = self.store.activity();
        let watch = |gauge: &std::sync::atomic::AtomicI64| gauge.load(Ordering::Relaxed);
        let held = stats.retained_bytes as i64;
        let identity = self.store.identity();
        // One member, which elected itself at start: always the leader, one leader change seen
        // (what a fresh single-member etcd reports), never a learner; it applies each request
        // as it commits it, so nothing is pending and a proposal cannot fail or be dropped.
        let etcd: [(&str, &str, Value); 28] = [
            ("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.", Value::Gauge(1)),
            ("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.", Value::Gauge(1)),
            (
                "etcd_server_is_learner",
                "Whether or not this member is a learner. 1 if is, 0 otherwise.",
                Value::Gauge(0),
            ),
            ("etcd_server_leader_changes_seen", "The number of leader changes seen.", Value::Counter(1)),
            (
                "etcd_server_id",
                "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
                Value::Info("server_id", format!("{:x}", identity.member_id)),
            ),
            (
                "etcd_server_version",
                "Which version is running. 1 for 'server_version' label with current version.",
                Value::Info("server_version", ETCD_VERSION.to_owned()),
            ),
            (
                "etcd_cluster_version",
                "Which version is running. 1 for 'cluster_version' label with current cluster version",
                Value::Info("cluster_version", cluster_version()),
            ),
            // Proposals: the requests etcd passes through consensus, as the store applies them
            // (see `Activity::applied`); committed and applied are the same count here.
            (
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
                Value::Untyped(activity.applied as i64),
            ),
            (
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
                Value::Untyped(activity.applied as i64),
            ),
            ("etcd_server_proposals_pending", "The current number of pending proposals to commit.", Value::Gauge(0)),
            ("etcd_server_proposals_failed", "The total number of failed proposals seen.", Value::Counter(0)),
            (
                "etcd_server_quota_backend_bytes",
                "Current backend storage quota size in bytes.",
                Value::Gauge(self.store.limits().quota_bytes()),
            ),
            // The database is the bytes of every key and value version held, history included:
            // what the quota counts; in memory, allocated and in use are the same.
            (
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
                Value::Gauge(held),
            ),
            (
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
                Value::Gauge(held),
            ),
            // Operations as etcd's mvcc counts them: each put, delete-range and range, top-level
            // or inside a txn; every txn request.
            ("etcd_mvcc_put", "Total number of puts seen by this member.", Value::Counter(activity.puts)),
            ("etcd_mvcc_delete", "Total number of deletes seen by this member.", Value::Counter(activity.deletes)),
            ("etcd_mvcc_range", "Total number of ranges seen by this member.", Value::Counter(activity.ranges)),
            ("etcd_mvcc_txn", "Total number of txns seen by this member.", Value::Counter(activity.txns)),
            ("etcd_debugging_mvcc_keys_total", "Total number of keys.", Value::Untyped(stats.keys as i64)),
            ("etcd_debugging_mvcc_current_revision", "The current revision of store.", Value::Gauge(stats.revision)),
            // etcd reports -1 until the first compaction.
            (
                "etcd_debugging_mvcc_compact_revision",
                "The revision of the last compaction in store.",
                Value::Gauge(if stats.compact_revision == 0 { -1 } else { stats.compact_revision }),
            ),
            (
                "etcd_debugging_mvcc_watcher_total",
                "Total number of watchers.",
                Value::Untyped(watch(&self.watch.watchers)),
            ),
            (
                "etcd_debugging_mvcc_slow_watcher_total",
                "Total number of unsynced slow watchers.",
                Value::Untyped(watch(&self.watch.slow_watchers)),
            ),
            (
                "etcd_debugging_mvcc_watch_stream_total",
                "Total number of watch streams.",
                Value::Untyped(watch(&self.watch.streams)),
            ),
            // Leases: revoked counts expired ones too, as etcd's lessor does.
            (
                "etcd_debugging_lease_granted",
                "The total number of granted leases.",
                Value::Counter(activity.leases_granted),
            ),
            (
                "etcd_debugging_lease_revoked",
                "The total number of revoked leases.",
                Value::Counter(activity.leases_revoked),
            ),
            (
                "etcd_debugging_lease_renewed",
                "The number of renewed leases seen by the leader.",
                Value::Counter(activity.leases_renewed),
            ),
            (
                "etcd_debugging_server_lease_expired",
                "The total number of expired leases.",
                Value::Counter(activity.leases_expired),
            ),
        ];
        for (name, help, value) in etcd {
            encode(&mut encoder, name, help, value)?;
        }

        // Ours (no etcd counterpart): what is held, and the memory bounds and when they bit.
        let ours: [(&str, &str, Value); 13] = [
            ("clustermesh_store_leases", "Leases held", Value::Gauge(stats.leases as i64)),
            (
                "clustermesh_store_value_held_bytes",
                "Bytes the values of the database size take in memory, most of them packed",
                Value::Gauge(stats.held_value_bytes as i64),
            ),
            (
                "clustermesh_store_value_dictionaries",
                "Dictionaries the store trained to pack values, one per key group",
                Value::Gauge(stats.value_dictionaries as i64),
            ),
            (
                "clustermesh_store_watch_queued_bytes",
                "Bytes of watch responses queued towards clients",
                Value::Gauge(watch(&self.watch.queued_bytes)),
            ),
            (
                "clustermesh_store_watch_backpressure",
                "Times a watch stream stopped reading requests while its client left its answers unread",
                Value::Counter(self.watch.backpressured.load(Ordering::Relaxed)),
            ),
            (
                "clustermesh_store_count_cache_bytes",
                "Bytes held by the cache of range counts for paged lists",
                Value::Gauge(stats.count_cache_bytes as i64),
            ),
            (
                "clustermesh_store_count_cache_evictions",
                "Groups of range counts dropped to keep the cache within its byte bound",
                Value::Counter(stats.count_cache_evictions),
            ),
            (
                "clustermesh_store_lease_grants_refused",
                "Lease grants refused because the user held --max-leases-per-user leases",
                Value::Counter(stats.leases_refused),
            ),
            (
                "clustermesh_store_quota_refusals",
                "Writes and lease grants refused with NOSPACE: over --quota-backend-bytes, or while its alarm was raised",
                Value::Counter(stats.quota_refusals),
            ),
            (
                "clustermesh_store_tls_handshakes_refused",
                "Client connections whose TLS handshake was refused (certificate missing, unknown or expired)",
                Value::Counter(self.connections.handshakes_refused.load(Ordering::Relaxed)),
            ),
            (
                "clustermesh_store_silent_connections_closed",
                "Client connections closed for finishing no handshake, or sending nothing, within 10 s",
                Value::Counter(self.connections.silent_closed.load(Ordering::Relaxed)),
            ),
            (
                "clustermesh_store_connections_over_user_limit",
                "Client connections closed after the handshake because their user held --max-connections-per-user",
                Value::Counter(self.connections.over_user_limit.load(Ordering::Relaxed)),
            ),
            (
                "clustermesh_store_history_events",
                "Changes held in the revision history (bounded by compaction)",
                Value::Gauge(stats.history_events as i64),
            ),
        ];
        for (name, help, value) in ours {
            encode(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_version_is_the_major_and_minor_of_the_server() {
        assert_eq!(cluster_version(), "3.5");
    }
}
