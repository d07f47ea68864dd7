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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::instrumented::QuorumLabels;

/// Cilium's status-check interval and timeout (`CILIUM_ETCD_STATUS_CHECK_INTERVAL`).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Cilium's `--kvstore-max-consecutive-quorum-errors` default.
pub const MAX_CONSECUTIVE_ERRORS: u64 = 2;

/// How often to check and when to give up on the store.
#[derive(Debug, Clone, Copy)]
pub struct QuorumCheck {
    pub interval: Duration,
    /// Failed checks in a row after which the store counts as unreachable: Cilium's
    /// `--kvstore-max-consecutive-quorum-errors`, after which its client reconnects. Ours
    /// reconnects on every call anyway; the count decides what `/readyz` says instead.
    pub max_consecutive_errors: u64,
}

impl QuorumCheck {
    /// Cilium's defaults, with `CILIUM_ETCD_STATUS_CHECK_INTERVAL` (a Go duration) honoured as
    /// Cilium's client does.
    pub fn from_env(max_consecutive_errors: Option<u64>) -> Result<QuorumCheck, String> {
        let interval = match std::env::var("CILIUM_ETCD_STATUS_CHECK_INTERVAL") {
            Ok(text) => {
                crate::config::humantime_secs(&text).map_err(|e| format!("CILIUM_ETCD_STATUS_CHECK_INTERVAL: {e}"))?
            }
            Err(_) => CHECK_INTERVAL,
        };
        Ok(QuorumCheck {
            interval,
            max_consecutive_errors: max_consecutive_errors.unwrap_or(MAX_CONSECUTIVE_ERRORS).max(1),
        })
    }
}

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

/// Checks every `check.interval` until `shutdown`; a check that takes longer than the interval
/// counts as `timeout`. `reachable` turns false after `check.max_consecutive_errors` failures
/// in a row and true again at the first check that passes.
pub async fn run(
    client: Client,
    probe_key: &'static str,
    errors: Family<QuorumLabels, Counter>,
    reachable: watch::Sender<bool>,
    check: QuorumCheck,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures_in_a_row = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut client = client.clone();
        let read = client.get(probe_key, Some(GetOptions::new().with_count_only()));
        let error = match tokio::time::timeout(check.interval, read).await {
            Ok(Ok(_)) => {
                if failures_in_a_row >= check.max_consecutive_errors {
                    tracing::info!("etcd answers quorum reads again");
                }
                failures_in_a_row = 0;
                reachable.send_if_modified(|reachable| !std::mem::replace(reachable, true));
                continue;
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error_chain(&error), "etcd quorum check failed");
                classify(&error)
            }
            Err(_) => {
                tracing::warn!(timeout = ?check.interval, "etcd quorum check timed out");
                "timeout"
            }
        };
        errors.get_or_create(&QuorumLabels { error }).inc();
        failures_in_a_row += 1;
        if failures_in_a_row == check.max_consecutive_errors {
            tracing::warn!(failures = failures_in_a_row, "etcd has no quorum for us: not ready until it answers again");
            reachable.send_replace(false);
        }
    }
}
