//! `--clustermesh-cache-ttl`: the cached services and service exports of a remote cluster that
//! stays disconnected longer than this are revoked (deleted), so that nothing keeps sending
//! traffic to backends nobody can vouch for any more; the next successful list restores them.
//! Nodes, identities and IPs stay: dropping them would cut existing connections (Cilium's
//! reflectors enable revocation for services and service exports only).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_client::{ClusterName, Kind, RemoteCluster};
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Revocations so far, by remote cluster.
pub type Revocations = Arc<Mutex<BTreeMap<ClusterName, u64>>>;

const REVOKED_KINDS: [Kind; 2] = [Kind::Services, Kind::ServiceExports];

#[derive(Default)]
struct Tracked {
    connected_once: bool,
    disconnected_since: Option<Instant>,
    revoked: bool,
}

/// Checks the remote clusters `remotes()` returns against `ttl` until `shutdown`.
pub async fn run_revocation(
    remotes: impl Fn() -> Vec<RemoteCluster>,
    ttl: Duration,
    revocations: Revocations,
    shutdown: CancellationToken,
) {
    // Fine enough against a TTL of minutes, and cheap: the status is in memory.
    let mut ticks = tokio::time::interval((ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracked: BTreeMap<ClusterName, Tracked> = BTreeMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let current = remotes();
        tracked.retain(|name, _| current.iter().any(|r| r.name() == name));
        for remote in current {
            let state = tracked.entry(remote.name().clone()).or_default();
            if remote.status().connected {
                *state = Tracked { connected_once: true, ..Tracked::default() };
                continue;
            }
            if !state.connected_once || state.revoked {
                continue;
            }
            let since = *state.disconnected_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= ttl {
                tracing::warn!(cluster = %remote.name(), ?ttl, "remote cluster disconnected for longer than the cache TTL: revoking its cached services");
                for kind in REVOKED_KINDS {
                    remote.drain(kind);
                }
                state.revoked = true;
                *revocations.lock().entry(remote.name().clone()).or_default() += 1;
            }
        }
    }
}
