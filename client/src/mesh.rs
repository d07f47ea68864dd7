//! Every remote cluster of a configuration directory, following the directory: a file added
//! connects a cluster, a changed file (or a changed certificate it names) reconnects it, a
//! removed file disconnects it and drains its entries (`pkg/clustermesh/common/clustermesh.go`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::cache::Event;
use crate::cluster_config::ClusterIds;
use crate::config::{self, ConfigDir, PeerFile};
use crate::options::ClientOptions;
use crate::raw::RawSinks;
use crate::remote::{RemoteCluster, RemoteStatus};
use crate::wire::{ClusterName, ClusterService};

/// Capacity of the mesh-wide event stream.
const EVENTS_CAPACITY: usize = 16_384;

/// The status of every remote cluster, by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MeshStatus {
    pub config_dir: PathBuf,
    pub remotes: Vec<RemoteStatus>,
}

impl MeshStatus {
    /// Every configured remote cluster is ready.
    pub fn all_ready(&self) -> bool {
        self.remotes.iter().all(|r| r.ready)
    }
}

struct Inner {
    dir: ConfigDir,
    raw: Option<Arc<dyn RawSinks>>,
    options: Arc<ClientOptions>,
    ids: ClusterIds,
    events: broadcast::Sender<Event>,
    remotes: RwLock<BTreeMap<ClusterName, (RemoteCluster, PeerFile)>>,
    members: watch::Sender<BTreeSet<ClusterName>>,
    token: CancellationToken,
}

/// The remote clusters of one configuration directory (`--clustermesh-config`).
pub struct ClusterMesh {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl ClusterMesh {
    /// Reads `dir` once (an unreadable directory is an error), connects every cluster in it,
    /// then follows the directory until `shutdown` is cancelled or [`ClusterMesh::shutdown`].
    pub async fn start(
        dir: impl Into<PathBuf>,
        options: ClientOptions,
        shutdown: &CancellationToken,
    ) -> Result<Self, config::Error> {
        Self::start_with(dir.into(), options, None, shutdown).await
    }

    /// Like [`ClusterMesh::start`], with every remote cluster in raw mode
    /// ([`RemoteCluster::start_raw`]); the typed caches and [`ClusterMesh::events`] stay empty.
    pub async fn start_raw(
        dir: impl Into<PathBuf>,
        options: ClientOptions,
        sinks: Arc<dyn RawSinks>,
        shutdown: &CancellationToken,
    ) -> Result<Self, config::Error> {
        Self::start_with(dir.into(), options, Some(sinks), shutdown).await
    }

    async fn start_with(
        dir: PathBuf,
        options: ClientOptions,
        raw: Option<Arc<dyn RawSinks>>,
        shutdown: &CancellationToken,
    ) -> Result<Self, config::Error> {
        let dir = ConfigDir::new(dir);
        let initial = scan(&dir, &options.local.name).await?;
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let (members, _) = watch::channel(BTreeSet::new());
        let inner = Arc::new(Inner {
            ids: ClusterIds::new(options.local.id),
            options: Arc::new(options),
            dir,
            raw,
            events,
            remotes: RwLock::new(BTreeMap::new()),
            members,
            token: shutdown.child_token(),
        });
        for (name, file) in initial {
            inner.add(name, file);
        }
        let span = tracing::info_span!("clustermesh_config", dir = %inner.dir.path().display());
        let task = tokio::spawn(Arc::clone(&inner).follow().instrument(span));
        Ok(Self { inner, task })
    }

    pub fn config_dir(&self) -> &Path {
        self.inner.dir.path()
    }

    pub fn remote(&self, name: &str) -> Option<RemoteCluster> {
        self.inner.read(|remotes| remotes.iter().find(|(n, _)| n.as_str() == name).map(|(_, (r, _))| r.clone()))
    }

    pub fn remotes(&self) -> Vec<RemoteCluster> {
        self.inner.read(|remotes| remotes.values().map(|(r, _)| r.clone()).collect())
    }

    /// The configured remote clusters; changes as files come and go.
    pub fn members(&self) -> watch::Receiver<BTreeSet<ClusterName>> {
        self.inner.members.subscribe()
    }

    pub fn status(&self) -> MeshStatus {
        MeshStatus {
            config_dir: self.inner.dir.path().to_owned(),
            remotes: self.remotes().iter().map(RemoteCluster::status).collect(),
        }
    }

    /// Every change of every cache of every remote cluster, including the deletions that drain
    /// a removed cluster.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The shared remote views of the service `namespace/name` (what [`crate::global_services`]
    /// merges); services exported with `shared: false` are left out, as Cilium ignores them.
    pub fn cluster_services(&self, namespace: &str, name: &str) -> Vec<Arc<ClusterService>> {
        let key = format!("{namespace}/{name}");
        self.remotes().iter().filter_map(|r| r.services().get(&key)).filter(|s| s.shared).collect()
    }

    /// Waits until every remote cluster configured when called is ready. Never returns while
    /// one cannot connect: bound it with a timeout.
    pub async fn wait_ready(&self) {
        for remote in self.remotes() {
            remote.wait_ready().await;
        }
    }

    /// Stops following the directory and every connection, and waits for them. Caches are not
    /// drained (Cilium keeps remote state across an agent restart).
    pub async fn shutdown(self) {
        self.inner.token.cancel();
        let remotes = self.remotes();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "clustermesh config watcher failed");
        }
        for remote in remotes {
            remote.stop().await;
        }
    }
}

/// Scans off the async threads (file reads block).
async fn scan(dir: &ConfigDir, local: &ClusterName) -> Result<BTreeMap<ClusterName, PeerFile>, config::Error> {
    let (dir, local) = (dir.clone(), local.clone());
    let path = dir.path().to_owned();
    match tokio::task::spawn_blocking(move || dir.scan(&local)).await {
        Ok(scanned) => scanned,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(config::Error::Read { path, source: std::io::Error::other(error.to_string()) }),
    }
}

impl Inner {
    fn read<R>(&self, f: impl FnOnce(&BTreeMap<ClusterName, (RemoteCluster, PeerFile)>) -> R) -> R {
        f(&self.remotes.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn publish_members(&self) {
        let names = self.read(|remotes| remotes.keys().cloned().collect());
        self.members.send_replace(names);
    }

    fn add(&self, name: ClusterName, file: PeerFile) {
        tracing::info!(cluster = %name, path = %file.path.display(), "new remote cluster configuration");
        let remote = RemoteCluster::spawn(
            name.clone(),
            file.path.clone(),
            Arc::clone(&self.options),
            self.ids.clone(),
            self.events.clone(),
            self.raw.as_ref().map(|sinks| sinks.sink(&name)),
            &self.token,
        );
        self.remotes.write().unwrap_or_else(PoisonError::into_inner).insert(name, (remote, file));
        self.publish_members();
    }

    /// Polls the directory and applies what changed.
    async fn follow(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.token.cancelled() => return,
                () = tokio::time::sleep(self.options.config_poll_interval) => {}
            }
            let scanned = match scan(&self.dir, &self.options.local.name).await {
                Ok(scanned) => scanned,
                Err(error) => {
                    // Keep every connection: a transient error must not disconnect the mesh.
                    tracing::warn!(%error, "unable to read the clustermesh config directory");
                    continue;
                }
            };
            let current = self.read(|remotes| remotes.iter().map(|(n, (_, f))| (n.clone(), f.clone())).collect());
            let changes = config::diff(&current, &scanned);
            for name in changes.removed {
                let removed = self.remotes.write().unwrap_or_else(PoisonError::into_inner).remove(&name);
                self.publish_members();
                if let Some((remote, _)) = removed {
                    tracing::info!(cluster = %name, "remote cluster configuration removed");
                    match &self.raw {
                        Some(sinks) => {
                            remote.disconnect().await;
                            sinks.removed(&name);
                        }
                        None => remote.remove().await,
                    }
                }
            }
            for (name, file) in changes.changed {
                tracing::info!(cluster = %name, "remote cluster configuration changed");
                let mut remotes = self.remotes.write().unwrap_or_else(PoisonError::into_inner);
                if let Some((remote, known)) = remotes.get_mut(&name) {
                    *known = file;
                    remote.reconnect();
                }
            }
            for (name, file) in changes.added {
                self.add(name, file);
            }
        }
    }
}
