//! The attached etcd's quorum check, feeding `kvstore_quorum_errors_total{error}`.
//!
//! Cilium's client proves quorum by taking a lock (a write through Raft) every status-check
//! interval and counts `timeout` when that does not finish in time. A linearizable read
//! proves the same thing without writing: etcd answers it only through a leader that still
//! holds a quorum (ReadIndex). The embedded store never runs this — see
//! [`super::instrumented::KvstoreMetrics::quorum_errors`].

use std::time::Duration;

use etcd_client::{Client, GetOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use super::instrumented::QuorumLabels;

/// Cilium's status-check interval and timeout (`CILIUM_ETCD_STATUS_CHECK_INTERVAL`).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What a failed check is counted as. `timeout` is Cilium's own label value; the other two
/// name what etcd told us instead of going silent.
fn classify(error: &etcd_client::Error) -> &'static str {
    match error {
        etcd_client::Error::GRpcStatus(status) if status.message().contains("no leader") => "no leader",
        etcd_client::Error::GRpcStatus(status)
            if matches!(status.code(), tonic::Code::DeadlineExceeded) || status.message().contains("timed out") =>
        {
            "timeout"
        }
        _ => "unreachable",
    }
}

/// Checks every `interval` until `shutdown`; a check that takes longer than `interval`
/// counts as `timeout`.
pub async fn run(
    client: Client,
    probe_key: &'static str,
    errors: Family<QuorumLabels, Counter>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut client = client.clone();
        let read = client.get(probe_key, Some(GetOptions::new().with_count_only()));
        let error = match tokio::time::timeout(interval, read).await {
            Ok(Ok(_)) => continue,
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error_chain(&error), "etcd quorum check failed");
                classify(&error)
            }
            Err(_) => {
                tracing::warn!(timeout = ?interval, "etcd quorum check timed out");
                "timeout"
            }
        };
        errors.get_or_create(&QuorumLabels { error }).inc();
    }
}
