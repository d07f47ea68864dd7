//! Cilium's controller-group metric, `controllers_group_runs_total{group_name,status}`
//! (`pkg/controller/cell.go`): one count per run of a periodic task, `status` `success` or
//! `failure`. Cilium's chart enables every group (`--controller-group-metrics=all`).
//!
//! Only our tasks that do what a Cilium controller group does carry its name:
//!
//! | group | Cilium | here: one run is |
//! |---|---|---|
//! | `clustermesh-cluster-config-enforcer` | `pkg/clustermesh/clustercfg`, every 5 min | one check of the cluster config against the store (every 5 s; per remote in KVStoreMesh) |
//! | `clustermesh-users-management` | `clustermesh-apiserver/clustermesh/users_mgmt.go`, on each change of the users file | one sync of the users file into the store |
//!
//! Cilium's heartbeat is a plain loop, not a controller, and has no group. KVStoreMesh's
//! `clustermesh-remote-cluster` and `clustermesh-cluster-config` groups time Cilium's connection
//! controller, which our client's session loop does not mirror run for run; its outcomes are in
//! `remote_cluster_failures` and `remote_cluster_readiness_status`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub const CLUSTER_CONFIG_ENFORCER: &str = "clustermesh-cluster-config-enforcer";
pub const USERS_MANAGEMENT: &str = "clustermesh-users-management";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    group_name: &'static str,
    status: &'static str,
}

/// The runs of every controller group of one process. A default value counts into a family
/// registered nowhere (for tests and callers that export nothing).
#[derive(Debug, Clone, Default)]
pub struct ControllerRuns(Family<RunLabels, Counter>);

impl ControllerRuns {
    pub fn register(registry: &mut Registry) -> Self {
        let runs = Self::default();
        registry.register(
            "controllers_group_runs",
            "Number of times that a controller group was run, labeled by completion status and controller group name",
            runs.0.clone(),
        );
        runs
    }

    /// `group` runs in this process: both its series exist from the start, at zero.
    pub fn declare(&self, group: &'static str) {
        for status in ["success", "failure"] {
            drop(self.0.get_or_create(&RunLabels { group_name: group, status }));
        }
    }

    pub fn record(&self, group: &'static str, succeeded: bool) {
        let status = if succeeded { "success" } else { "failure" };
        self.0.get_or_create(&RunLabels { group_name: group, status }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_counted_by_group_and_status_from_zero() {
        let mut registry = Registry::default();
        let runs = ControllerRuns::register(&mut registry);
        runs.declare(USERS_MANAGEMENT);
        runs.record(USERS_MANAGEMENT, false);
        runs.record(USERS_MANAGEMENT, true);
        runs.record(USERS_MANAGEMENT, true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = |status: &str| {
            format!("controllers_group_runs_total{{group_name=\"clustermesh-users-management\",status=\"{status}\"}}")
        };
        assert!(text.contains(&format!("{} 2\n", series("success"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", series("failure"))), "{text}");
    }
}
