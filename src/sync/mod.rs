//! From the translation model's key diffs to the store: the sync store (writes, lease,
//! canaries), the cluster-config and heartbeat keys, and readiness.

pub mod leases;
pub mod metrics;
pub mod mirror;
pub mod state;
pub mod store;

/// Now as Go's `time.RFC3339` prints it (UTC, whole seconds): the value Cilium writes into
/// canaries and the heartbeat. Readers ignore it; operators read it.
pub fn rfc3339_now() -> String {
    clustermesh_client::display::rfc3339(std::time::SystemTime::now())
}
