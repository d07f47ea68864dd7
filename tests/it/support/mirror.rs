//! The `clustermesh` role run in-process: the fake Kubernetes API in, our embedded store or a
//! real etcd out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::clustermesh::{self, ClustermeshConfig, Source};
use clustermesh_apiserver::kvstore::Backend;
use clustermesh_apiserver::kvstore::embedded::Embedded;
use clustermesh_apiserver::kvstore::etcd::Etcd;
use clustermesh_apiserver::translate::Settings;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{EmbeddedStore, eventually};

/// A running mirror. [`Mirror::stop`] cancels it and waits for every task.
pub struct Mirror {
    pub ready: watch::Receiver<bool>,
    pub registry: Arc<Registry>,
    token: CancellationToken,
    tracker: TaskTracker,
}

/// Where the mirror writes, and how the test reads it back.
#[derive(Clone)]
pub enum Target {
    Embedded(Arc<clustermesh_apiserver::etcd::store::Store>),
    Etcd(Box<etcd_client::Client>),
}

impl Target {
    pub fn embedded(store: &EmbeddedStore) -> Self {
        Target::Embedded(Arc::clone(&store.store))
    }

    pub fn etcd(client: etcd_client::Client) -> Self {
        Target::Etcd(Box::new(client))
    }

    /// Every key under `prefix` with its value, as text.
    pub async fn dump(&self, prefix: &str) -> BTreeMap<String, String> {
        let keys = match self {
            Target::Embedded(store) => Embedded::new(Arc::clone(store)).keys_with_prefix(prefix).await,
            Target::Etcd(client) => Etcd::new((**client).clone()).keys_with_prefix(prefix).await,
        }
        .expect("list keys");
        let mut out = BTreeMap::new();
        for key in keys {
            if let Some(value) = self.get(&key).await {
                out.insert(key, value);
            }
        }
        out
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let value = match self {
            Target::Embedded(store) => Embedded::new(Arc::clone(store)).get(key).await,
            Target::Etcd(client) => Etcd::new((**client).clone()).get(key).await,
        }
        .expect("get");
        value.map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub async fn put(&self, key: &str, value: &str) {
        let value = clustermesh_apiserver::blob::Blob::from(value);
        match self {
            Target::Embedded(store) => Embedded::new(Arc::clone(store)).put(key, value, 0).await,
            Target::Etcd(client) => Etcd::new((**client).clone()).put(key, value, 0).await,
        }
        .expect("put");
    }

    pub async fn delete(&self, key: &str) {
        match self {
            Target::Embedded(store) => Embedded::new(Arc::clone(store)).delete(key).await,
            Target::Etcd(client) => Etcd::new((**client).clone()).delete(key).await,
        }
        .expect("delete");
    }

    /// Waits (bounded) until the keys under `prefix` are exactly `expected`.
    pub async fn expect(&self, what: &str, prefix: &str, expected: &BTreeMap<String, String>) {
        let mut last = BTreeMap::new();
        let found = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                last = self.dump(prefix).await;
                if &last == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "{what}: keys under {prefix:?}\n  expected: {expected:#?}\n  found:    {last:#?}");
    }
}

impl Mirror {
    pub fn start(target: &Target, settings: Settings, kube: kube::Client) -> Self {
        Self::start_with_heartbeat(target, settings, kube, clustermesh_apiserver::sync::state::HEARTBEAT_INTERVAL)
    }

    /// With the heartbeat rewritten every `heartbeat`, for clients that must notice a stopped
    /// server within a test's time (Cilium's clients wait 2 × 60 s).
    pub fn start_with_heartbeat(target: &Target, settings: Settings, kube: kube::Client, heartbeat: Duration) -> Self {
        let mut config = ClustermeshConfig::new(settings, Source::Kubernetes(kube));
        config.cluster_config_check = Duration::from_millis(200);
        config.heartbeat = heartbeat;
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut registry = Registry::with_prefix("cilium_clustermesh_apiserver");
        let running = match target {
            Target::Embedded(store) => {
                clustermesh::spawn(Arc::new(Embedded::new(Arc::clone(store))), config, &mut registry, &tracker, &token)
            }
            Target::Etcd(client) => {
                // As the server runs against an attached etcd: several writes in flight.
                config.max_writes_in_flight = clustermesh_apiserver::sync::store::ETCD_MAX_IN_FLIGHT;
                clustermesh::spawn(Arc::new(Etcd::new((**client).clone())), config, &mut registry, &tracker, &token)
            }
        };
        Self { ready: running.ready, registry: Arc::new(registry), token, tracker }
    }

    pub async fn wait_ready(&mut self) {
        let ready = tokio::time::timeout(Duration::from_secs(20), self.ready.wait_for(|r| *r)).await;
        assert!(matches!(ready, Ok(Ok(_))), "the mirror did not become ready within 20 s");
    }

    /// The metrics text, as Prometheus would scrape it.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode metrics");
        text
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the mirror shuts down within 10 s");
    }
}

/// Waits until `key` exists under `target`.
pub async fn wait_for_key(target: &Target, key: &str) -> String {
    eventually(&format!("{key} to be written"), Duration::from_secs(15), || async { target.get(key).await }).await
}
