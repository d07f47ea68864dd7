//! Settings of the client: who the local cluster is, and every interval and limit, each with the
//! default Cilium uses (and where it comes from).

use std::time::Duration;

use crate::retry::Backoff;
use crate::wire::{ClusterId, ClusterName, MaxConnectedClusters};

/// The local cluster, as the agent knows it (`--cluster-name`, `--cluster-id`,
/// `--max-connected-clusters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCluster {
    pub name: ClusterName,
    /// `0` when unset: then no remote ID is refused for clashing with it.
    pub id: ClusterId,
    pub max_connected_clusters: MaxConnectedClusters,
}

impl LocalCluster {
    pub fn new(name: ClusterName, id: ClusterId) -> Self {
        Self { name, id, max_connected_clusters: MaxConnectedClusters::DEFAULT }
    }

    pub fn with_max_connected_clusters(mut self, max: MaxConnectedClusters) -> Self {
        self.max_connected_clusters = max;
        self
    }
}

impl Default for LocalCluster {
    /// Cilium's defaults: cluster `default`, ID unset, 255 clusters.
    fn default() -> Self {
        Self::new(ClusterName::new("default").expect("valid name"), ClusterId::UNSET)
    }
}

/// Everything the client can be told. Build with [`ClientOptions::new`] and the `with_*`
/// methods; every default is Cilium's.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub(crate) local: LocalCluster,
    pub(crate) backoff: Backoff,
    pub(crate) heartbeat_timeout: Duration,
    pub(crate) cluster_config_timeout: Duration,
    pub(crate) cluster_config_retry: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) dial_timeout: Duration,
    pub(crate) keep_alive: (Duration, Duration),
    pub(crate) list_page_size: u32,
    pub(crate) rewatch_delay: Duration,
    pub(crate) config_poll_interval: Duration,
    pub(crate) service_exports: bool,
}

impl ClientOptions {
    pub fn new(local: LocalCluster) -> Self {
        Self {
            local,
            backoff: Backoff::default(),
            // 2 × `HeartbeatWriteInterval` (60 s): `pkg/kvstore/etcd.go`, `statusChecker`.
            heartbeat_timeout: Duration::from_secs(120),
            // `clusterConfigRetrievalTimeout`: `pkg/clustermesh/common/remote_cluster.go`.
            cluster_config_timeout: Duration::from_secs(180),
            // The controller's linear back-off base (1 s), capped at 30 s (`MaxRetryInterval`).
            cluster_config_retry: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(15),
            // `etcd.keepaliveHeartbeat` / `etcd.keepaliveTimeout`.
            keep_alive: (Duration::from_secs(15), Duration::from_secs(25)),
            // `etcd.limit`.
            list_page_size: 256,
            // `pkg/kvstore/etcd.go`: a closed watch channel is re-opened after 50 ms.
            rewatch_delay: Duration::from_millis(50),
            config_poll_interval: Duration::from_secs(1),
            service_exports: false,
        }
    }

    pub fn local(&self) -> &LocalCluster {
        &self.local
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Reconnect when no heartbeat arrived for this long (Cilium: 2 × 60 s). Counted from the
    /// connection, so a server that never writes a heartbeat is left after this long too.
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// How long a missing or unreadable cluster config is retried before the connection is
    /// dropped and retried (Cilium: 3 minutes), and the base of the linear retry interval.
    pub fn with_cluster_config_retry(mut self, timeout: Duration, retry_base: Duration) -> Self {
        self.cluster_config_timeout = timeout;
        self.cluster_config_retry = retry_base;
        self
    }

    /// The bound on each unary request (list pages, the cluster config, the first heartbeat read).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The TCP+TLS connect timeout when the config file sets no `dial-timeout`.
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// gRPC keep-alive ping interval and timeout.
    pub fn with_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval, timeout);
        self
    }

    /// Keys per list page (Cilium: 256).
    pub fn with_list_page_size(mut self, size: u32) -> Self {
        self.list_page_size = size.max(1);
        self
    }

    /// The first pause before re-opening a broken watch (doubling, capped at 2 s).
    pub fn with_rewatch_delay(mut self, delay: Duration) -> Self {
        self.rewatch_delay = delay;
        self
    }

    /// How often the config directory is re-read.
    pub fn with_config_poll_interval(mut self, interval: Duration) -> Self {
        self.config_poll_interval = interval;
        self
    }

    /// Also watch MCS-API service exports of remotes that offer them (Cilium: when
    /// `--clustermesh-enable-mcs-api` is set locally).
    pub fn with_service_exports(mut self, enabled: bool) -> Self {
        self.service_exports = enabled;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut state = Backoff::default().start();
        let first = state.next_delay();
        assert!(first >= Duration::from_millis(800) && first < Duration::from_millis(1600), "{first:?}");
        let second = state.next_delay();
        assert!(second >= Duration::from_millis(1600) && second < Duration::from_millis(3200), "{second:?}");
        for _ in 0..10 {
            assert!(state.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(state.next_delay(), Duration::from_secs(30));
        state.reset();
        assert!(state.next_delay() < Duration::from_millis(1600));
    }
}
