//! The copies of every configured remote cluster, from a file's arrival to the drain after its
//! removal: a cluster's [`Reflector`] and sync store live until its data is gone, so that a
//! cluster re-added during the grace period picks up its own copy again (and a relist deletes
//! whatever changed meanwhile), while one re-added after the drain started waits for it to end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_client::raw::{RawSink, RawSinks};
use clustermesh_client::{Backoff, ClusterName};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::reflector::{Reflector, drain_prefixes};
use crate::controllers::ControllerRuns;
use crate::kvstore::Backend;
use crate::kvstore::instrumented::EventsQueue;
use crate::sync::state;
use crate::sync::store::{SyncOptions, SyncStore};

/// How often each cached cluster config is compared with the store (the clustermesh role's
/// interval for its own).
const CLUSTER_CONFIG_CHECK: Duration = Duration::from_secs(5);

/// How removals behave (Cilium: `kvstoremesh/remote_cluster.go`, `Remove`).
#[derive(Debug, Clone)]
pub struct RemovalPolicy {
    /// Between deleting the cluster config (agents stop connecting) and deleting the data
    /// (agents had time to disconnect). Cilium: 3 minutes.
    pub grace_period: Duration,
    /// `--disable-drain-on-disconnection`: keep the data; the lease expires it eventually.
    pub disabled: bool,
    /// Cilium retries a failed drain 5 times, doubling from 2 s.
    pub retries: u32,
    pub retry_delay: Duration,
}

impl Default for RemovalPolicy {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(180),
            disabled: false,
            retries: 5,
            retry_delay: Duration::from_secs(2),
        }
    }
}

/// The longest wait between two attempts to drain a removed cluster (5 attempts doubling from
/// 2 s stay under it, as Cilium's).
const MAX_REMOVAL_RETRY_DELAY: Duration = Duration::from_secs(60);

/// One remote cluster's copy and its writer.
pub struct ClusterCopy {
    pub reflector: Arc<Reflector>,
    /// Stops the writer; cancelled once the data is drained, or at shutdown after the queue is.
    writer: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ClusterCopy {
    pub fn sync(&self) -> &Arc<SyncStore> {
        self.reflector.sync()
    }
}

enum Entry {
    Active(Arc<ClusterCopy>),
    Removing {
        copy: Arc<ClusterCopy>,
        /// Cancelled when the cluster comes back within the grace period.
        abort: CancellationToken,
        /// The grace period is over: the data is being deleted.
        draining: bool,
        /// Cancelled when the removal is over.
        done: CancellationToken,
    },
}

/// Where the cache writers report: Cilium's `kvstore_events_queue_seconds` and controller
/// groups.
#[derive(Debug, Clone, Default)]
pub struct WriterMetrics {
    pub events_queue: Option<EventsQueue>,
    pub controllers: ControllerRuns,
}

struct Inner {
    backend: Arc<dyn Backend>,
    lease_ttl: Duration,
    writer: SyncOptions,
    metrics: WriterMetrics,
    removal: RemovalPolicy,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    entries: Mutex<BTreeMap<ClusterName, Entry>>,
}

/// Every remote cluster's copy; the [`RawSinks`] of the client's directory follower.
#[derive(Clone)]
pub struct Remotes {
    inner: Arc<Inner>,
}

impl Remotes {
    pub fn new(
        backend: Arc<dyn Backend>,
        lease_ttl: Duration,
        writer: SyncOptions,
        metrics: WriterMetrics,
        removal: RemovalPolicy,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let entries = Mutex::new(BTreeMap::new());
        Self { inner: Arc::new(Inner { backend, lease_ttl, writer, metrics, removal, tracker, shutdown, entries }) }
    }

    /// The copies of the clusters currently configured (not those being removed).
    pub fn active(&self) -> BTreeMap<ClusterName, Arc<ClusterCopy>> {
        let entries = self.inner.entries.lock();
        entries
            .iter()
            .filter_map(|(name, entry)| match entry {
                Entry::Active(copy) => Some((name.clone(), Arc::clone(copy))),
                Entry::Removing { .. } => None,
            })
            .collect()
    }

    /// Every copy still held, removed or not (for the writer metrics).
    pub fn all(&self) -> Vec<Arc<ClusterCopy>> {
        let entries = self.inner.entries.lock();
        entries
            .values()
            .map(|entry| match entry {
                Entry::Active(copy) | Entry::Removing { copy, .. } => Arc::clone(copy),
            })
            .collect()
    }

    /// Stops every writer once its queue is empty (or after `timeout`): the last step of a
    /// shutdown, after the remote connections stopped.
    pub async fn drain_writers(&self, timeout: Duration) {
        let copies = self.all();
        let drained = tokio::time::timeout(timeout, async {
            for copy in &copies {
                copy.sync().drained().await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutting down with cache writes still queued");
        }
        for copy in copies {
            copy.writer.cancel();
        }
    }

    fn new_copy(&self, cluster: &ClusterName, after: Option<CancellationToken>) -> Arc<ClusterCopy> {
        let inner = &self.inner;
        let sync = match &inner.metrics.events_queue {
            Some(queue) => SyncStore::timed(inner.writer, queue.clone()),
            None => SyncStore::with_options(inner.writer),
        };
        let reflector = Arc::new(Reflector::new(
            cluster.clone(),
            Arc::clone(&sync),
            Arc::clone(&inner.backend),
            inner.tracker.clone(),
            inner.shutdown.child_token(),
        ));
        // The writer is not a child of the shutdown token: it outlives the connections so that
        // what was queued reaches the store (see `drain_writers`).
        let writer = CancellationToken::new();
        let (backend, ttl, token) = (Arc::clone(&inner.backend), inner.lease_ttl, writer.clone());
        let span = tracing::info_span!("cache_writer", cluster = %cluster);
        let task = inner.tracker.spawn(
            async move {
                if let Some(previous) = after {
                    // The previous copy's drain deletes whole prefixes: writing before it ends
                    // would lose keys.
                    tokio::select! {
                        () = previous.cancelled() => {}
                        () = token.cancelled() => return,
                    }
                }
                sync.run(backend, ttl, token).await;
            }
            .instrument(span),
        );
        // Agents refuse a cluster without its config, and a wrong ID makes them drop it: put it
        // back when someone else edits or deletes it (Cilium's `EnforceClusterConfig`).
        inner.tracker.spawn(
            state::run_cluster_config_enforcer(
                Arc::clone(reflector.sync()),
                Arc::clone(&inner.backend),
                reflector.cluster_config_key(),
                CLUSTER_CONFIG_CHECK,
                inner.metrics.controllers.clone(),
                writer.clone(),
            )
            .instrument(tracing::info_span!("cluster_config", cluster = %cluster)),
        );
        Arc::new(ClusterCopy { reflector, writer, task: Mutex::new(Some(task)) })
    }

    /// The file of `cluster` was removed: delete its cluster config now, its data after the
    /// grace period.
    fn remove(&self, cluster: &ClusterName) {
        let mut entries = self.inner.entries.lock();
        let Some(Entry::Active(copy)) = entries.remove(cluster) else { return };
        if self.inner.removal.disabled {
            // As Cilium: nothing is deleted, not even the cluster config.
            tracing::warn!(
                cluster = %cluster,
                "remote cluster removed, but draining its cached data is disabled; it expires with the lease"
            );
            copy.writer.cancel();
            return;
        }
        // First, so that agents (re)starting now do not connect to a cluster going away.
        copy.sync().delete(&copy.reflector.cluster_config_key());
        let (abort, done) = (CancellationToken::new(), CancellationToken::new());
        entries.insert(
            cluster.clone(),
            Entry::Removing { copy: Arc::clone(&copy), abort: abort.clone(), draining: false, done: done.clone() },
        );
        drop(entries);
        let this = self.clone();
        let span = tracing::info_span!("drain", cluster = %cluster);
        let cluster = cluster.clone();
        self.inner.tracker.spawn(async move { this.run_removal(cluster, copy, abort, done).await }.instrument(span));
    }

    async fn run_removal(
        &self,
        cluster: ClusterName,
        copy: Arc<ClusterCopy>,
        abort: CancellationToken,
        done: CancellationToken,
    ) {
        let _done = done.drop_guard();
        let grace = self.inner.removal.grace_period;
        tracing::info!(?grace, "waiting before removing cached data, to let agents disconnect");
        tokio::select! {
            () = self.inner.shutdown.cancelled() => return,
            () = abort.cancelled() => return,
            () = tokio::time::sleep(grace) => {}
        }
        {
            let mut entries = self.inner.entries.lock();
            if abort.is_cancelled() {
                return;
            }
            if let Some(Entry::Removing { draining, .. }) = entries.get_mut(&cluster) {
                *draining = true;
            }
        }
        // The writer must not write behind the deletions.
        copy.writer.cancel();
        let task = copy.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let mut retry = Backoff::new(self.inner.removal.retry_delay, MAX_REMOVAL_RETRY_DELAY).start();
        let mut attempt = 0;
        loop {
            match self.delete_data(&cluster).await {
                Ok(deleted) => {
                    tracing::info!(deleted, "removed all cached data of the remote cluster");
                    break;
                }
                Err(error) if attempt >= self.inner.removal.retries => {
                    tracing::error!(
                        error = %crate::error_chain(&error),
                        "failed to remove cached data despite retries; it expires with the lease"
                    );
                    break;
                }
                Err(error) => {
                    let delay = retry.next_delay();
                    tracing::warn!(error = %crate::error_chain(&error), retry_in = ?delay, "failed to remove cached data, retrying");
                    tokio::select! {
                        () = self.inner.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        }
        let mut entries = self.inner.entries.lock();
        if matches!(entries.get(&cluster), Some(Entry::Removing { .. })) {
            entries.remove(&cluster);
        }
    }

    async fn delete_data(&self, cluster: &ClusterName) -> crate::kvstore::Result<usize> {
        let mut deleted = 0;
        // Cilium deletes the cluster config again here: a writer stopped mid-flight may have
        // put it back.
        self.inner.backend.delete(&clustermesh_client::wire::cluster_config_key(cluster)).await?;
        for prefix in drain_prefixes(cluster) {
            for key in self.inner.backend.keys_with_prefix(&prefix).await? {
                self.inner.backend.delete(&key).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

impl RawSinks for Remotes {
    fn sink(&self, cluster: &ClusterName) -> Arc<dyn RawSink> {
        let mut entries = self.inner.entries.lock();
        let copy = match entries.remove(cluster) {
            Some(Entry::Active(copy)) => copy,
            Some(Entry::Removing { copy, abort, draining: false, .. }) => {
                tracing::info!(cluster = %cluster, "remote cluster configured again within the grace period: keeping its cached data");
                abort.cancel();
                copy
            }
            Some(Entry::Removing { done, .. }) => {
                tracing::info!(cluster = %cluster, "remote cluster configured again while its cached data is drained: copying after the drain");
                self.new_copy(cluster, Some(done))
            }
            None => self.new_copy(cluster, None),
        };
        entries.insert(cluster.clone(), Entry::Active(Arc::clone(&copy)));
        Arc::clone(&copy.reflector) as Arc<dyn RawSink>
    }

    fn removed(&self, cluster: &ClusterName) {
        self.remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use clustermesh_client::wire::{Capabilities, ClusterConfig};
    use clustermesh_client::{ClusterId, Kind};

    use super::*;
    use crate::etcd::auth::AuthStore;
    use crate::etcd::store::{Identity, Limits, Store};
    use crate::kvstore::embedded::Embedded;

    const GRACE: Duration = Duration::from_secs(10);
    const NODE: &str = "cilium/cache/nodes/v1/c2/n1";
    const CONFIG: &str = "cilium/cluster-config/c2";

    fn setup() -> (Remotes, Arc<Embedded>, CancellationToken) {
        let backend = Arc::new(Embedded::new(Store::new(Identity::random(), Limits::default(), AuthStore::default())));
        let token = CancellationToken::new();
        let removal = RemovalPolicy { grace_period: GRACE, ..RemovalPolicy::default() };
        let remotes = Remotes::new(
            backend.clone(),
            Duration::from_secs(900),
            SyncOptions::default(),
            WriterMetrics::default(),
            removal,
            TaskTracker::new(),
            token.clone(),
        );
        (remotes, backend, token)
    }

    /// One session of c2: its config, one node, the list of every kind done.
    fn copy_one_node(sink: &Arc<dyn RawSink>) {
        sink.cluster_config(&ClusterConfig { id: ClusterId(2), capabilities: Capabilities::default() });
        sink.upsert(Kind::Nodes, "n1", &Bytes::from_static(b"node"));
        for kind in Kind::ALL {
            sink.synced(kind, if kind == Kind::Nodes { &["n1"] } else { &[] });
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    async fn get(backend: &Embedded, key: &str) -> Option<Bytes> {
        backend.get(key).await.unwrap()
    }

    fn name() -> ClusterName {
        ClusterName::new("c2").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_cluster_loses_its_config_at_once_and_its_data_after_the_grace_period() {
        let (remotes, backend, token) = setup();
        copy_one_node(&remotes.sink(&name()));
        settle().await;
        assert!(get(&backend, NODE).await.is_some());
        assert!(get(&backend, "cilium/synced/c2/cilium/cache/ip/v1").await.is_some(), "canary of an empty prefix");

        remotes.removed(&name());
        settle().await;
        assert_eq!(get(&backend, CONFIG).await, None, "the config goes at once");
        assert!(get(&backend, NODE).await.is_some(), "the data stays during the grace period");
        tokio::time::sleep(GRACE).await;
        settle().await;
        assert_eq!(backend.keys_with_prefix("cilium/").await.unwrap(), Vec::<String>::new());
        assert!(remotes.all().is_empty());
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_configured_again_within_the_grace_period_keeps_its_copy() {
        let (remotes, backend, token) = setup();
        copy_one_node(&remotes.sink(&name()));
        settle().await;
        remotes.removed(&name());
        tokio::time::sleep(GRACE / 2).await;
        let again = remotes.sink(&name());
        tokio::time::sleep(GRACE * 2).await;
        assert!(get(&backend, NODE).await.is_some(), "not drained");
        // The new session relists: what vanished meanwhile goes, the config comes back.
        again.cluster_config(&ClusterConfig { id: ClusterId(2), capabilities: Capabilities::default() });
        again.synced(Kind::Nodes, &[]);
        settle().await;
        assert_eq!(get(&backend, NODE).await, None);
        assert!(get(&backend, CONFIG).await.is_some());

        backend.delete(CONFIG).await.unwrap();
        tokio::time::sleep(CLUSTER_CONFIG_CHECK * 2).await;
        assert!(get(&backend, CONFIG).await.is_some(), "a config deleted by someone else comes back");
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cluster_configured_again_while_drained_is_copied_after_the_drain() {
        let (remotes, backend, token) = setup();
        copy_one_node(&remotes.sink(&name()));
        settle().await;
        remotes.removed(&name());
        tokio::time::sleep(GRACE).await;
        // The drain has started (or ended): the new copy must not race it.
        let again = remotes.sink(&name());
        copy_one_node(&again);
        settle().await;
        assert!(get(&backend, NODE).await.is_some(), "written after the drain, not deleted by it");
        assert!(get(&backend, CONFIG).await.is_some());
        token.cancel();
    }
}
