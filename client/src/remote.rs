//! One remote cluster: the reconnect loop composing connection, heartbeat, cluster config,
//! canaries and caches (`pkg/clustermesh/common/remote_cluster.go`,
//! `pkg/clustermesh/remote_cluster.go`), and its status.
//!
//! A session is one etcd connection: connect → first heartbeat list (connected) → cluster
//! config (retrieved, validated, ID reserved) → canaries → one list+watch per prefix. Any
//! session error (no heartbeat, another etcd cluster ID, a refused config, ...) ends it; the
//! next one starts after a jittered backoff. The caches outlive sessions: every prefix marks its
//! entries stale when it starts again and deletes what its first list does not confirm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::cache::{AnyCache, Cache, CacheStatus, Event};
use crate::canaries::{Canaries, watch_canaries};
use crate::cluster_config::{self, ClusterIds};
use crate::config::{self, EtcdConfig};
use crate::connect::{self, Connection};
use crate::display::{error_chain, rfc3339};
use crate::heartbeat::{self, HeartbeatTimeout};
use crate::options::ClientOptions;
use crate::raw::{RawCache, RawCaches, RawSink};
use crate::wire::{
    ClusterConfig, ClusterId, ClusterName, ClusterService, Identity, IpCacheEntry, Kind, Node, ServiceExport,
    Validation,
};

/// Capacity of a remote's own event stream (when not part of a [`crate::ClusterMesh`]).
const EVENTS_CAPACITY: usize = 4096;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Connection(#[from] connect::Error),
    #[error("connection not established within {after:?}{}", last.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotEstablished { after: Duration, last: Option<String> },
    #[error(transparent)]
    ClusterConfig(#[from] cluster_config::Error),
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatTimeout),
    #[error("a session task stopped unexpectedly: {0}")]
    Task(String),
    /// Not a failure: the session starts again at once with the new config.
    #[error("the remote cluster's configuration changed")]
    ClusterConfigChanged,
}

/// Where a remote cluster's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Dialing, or waiting for the first heartbeat list.
    Connecting,
    /// Connected; reading the cluster config.
    WaitingForConfig,
    /// Config accepted; prefixes waiting for canaries or listing.
    Syncing,
    /// Every prefix listed and watched.
    Ready,
    /// The last session failed; waiting before the next attempt.
    Backoff,
    Stopped,
}

/// The remote cluster's config, as far as it was read (Cilium's `RemoteClusterConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConfigStatus {
    /// Always true: the config is required since Cilium 1.16.
    pub required: bool,
    pub retrieved: bool,
    pub cluster_id: Option<ClusterId>,
    /// The `cached` capability: the data comes through KVStoreMesh.
    pub kvstoremesh: bool,
    pub sync_canaries: bool,
    pub service_exports_enabled: Option<bool>,
    pub max_connected_clusters: Option<u32>,
}

/// A failure, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// RFC 3339, UTC.
    pub at: String,
    pub reason: String,
}

/// Everything known about one remote cluster, in words and as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteStatus {
    pub name: ClusterName,
    pub config_path: PathBuf,
    /// Connected, config retrieved, every watched prefix synced.
    pub ready: bool,
    pub connected: bool,
    pub phase: Phase,
    /// The etcd cluster ID this connection is locked to (hex), as Cilium prints it.
    pub etcd_cluster_id: Option<String>,
    pub config: ConfigStatus,
    /// One entry per prefix watched in the current (or last) session.
    pub prefixes: BTreeMap<Kind, CacheStatus>,
    pub num_failures: u64,
    pub last_failure: Option<Failure>,
}

impl RemoteStatus {
    /// Prefixes not synced yet, e.g. to say "synchronization in progress for nodes, services".
    pub fn unsynced(&self) -> Vec<Kind> {
        self.prefixes.iter().filter(|(_, p)| !p.synced).map(|(k, _)| *k).collect()
    }

    /// Entries cached over every prefix.
    pub fn num_entries(&self) -> usize {
        self.prefixes.values().map(|p| p.entries).sum()
    }
}

/// The parts of [`RemoteStatus`] the session loop owns.
#[derive(Debug, Clone)]
struct SessionStatus {
    connected: bool,
    phase: Phase,
    etcd_cluster_id: Option<u64>,
    config: ConfigStatus,
    watched: Vec<Kind>,
    num_failures: u64,
    last_failure: Option<Failure>,
}

/// The typed caches of one remote cluster.
pub struct Caches {
    pub nodes: Cache<Node>,
    pub services: Cache<ClusterService>,
    pub identities: Cache<Identity>,
    pub ipcache: Cache<IpCacheEntry>,
    pub service_exports: Cache<ServiceExport>,
}

impl Caches {
    fn new(cluster: &ClusterName, events: &broadcast::Sender<Event>) -> Self {
        Self {
            nodes: Cache::new(cluster.clone(), Some(events.clone())),
            services: Cache::new(cluster.clone(), Some(events.clone())),
            identities: Cache::new(cluster.clone(), Some(events.clone())),
            ipcache: Cache::new(cluster.clone(), Some(events.clone())),
            service_exports: Cache::new(cluster.clone(), Some(events.clone())),
        }
    }

    pub fn status(&self, kind: Kind) -> CacheStatus {
        self.get(kind).status()
    }

    fn get(&self, kind: Kind) -> &dyn AnyCache {
        match kind {
            Kind::Nodes => &self.nodes,
            Kind::Services => &self.services,
            Kind::Identities => &self.identities,
            Kind::IpCache => &self.ipcache,
            Kind::ServiceExports => &self.service_exports,
        }
    }
}

struct Inner {
    name: ClusterName,
    config_path: PathBuf,
    options: Arc<ClientOptions>,
    ids: ClusterIds,
    caches: Caches,
    /// Raw mode: entries go to a sink as bytes, and the typed caches stay empty.
    raw: Option<RawCaches>,
    events: broadcast::Sender<Event>,
    session: watch::Sender<SessionStatus>,
    /// The cluster ID reserved for this remote, kept across sessions until it changes.
    reserved: Mutex<Option<ClusterId>>,
    reconnect: Notify,
    token: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// A connection to one remote cluster, kept up until stopped. Cloning gives another handle.
#[derive(Clone)]
pub struct RemoteCluster {
    inner: Arc<Inner>,
}

/// The tasks of one session: the first to fail ends it.
type Tasks = JoinSet<Result<(), SessionError>>;

/// How one session ended.
enum SessionEnd {
    Cancelled,
    Reconfigured,
    Failed(SessionError),
}

impl RemoteCluster {
    /// Connects to the cluster `name` configured by the etcd config file at `config_path`, and
    /// keeps the connection up until `shutdown` is cancelled or [`RemoteCluster::stop`] is called.
    ///
    /// Must be called within a Tokio runtime.
    pub fn start(
        name: ClusterName,
        config_path: impl Into<PathBuf>,
        options: ClientOptions,
        shutdown: &CancellationToken,
    ) -> Self {
        let ids = ClusterIds::new(options.local.id);
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        Self::spawn(name, config_path.into(), Arc::new(options), ids, events, None, shutdown)
    }

    /// Like [`RemoteCluster::start`], in raw mode: every entry goes to `sink` as the bytes the
    /// remote store holds, undecoded and unchecked, and the typed caches stay empty. Only the
    /// cluster config is read and validated (and its ID reserved in `ids`, shared with the
    /// other remote clusters), as for an agent.
    pub fn start_raw(
        name: ClusterName,
        config_path: impl Into<PathBuf>,
        options: ClientOptions,
        ids: ClusterIds,
        sink: Arc<dyn RawSink>,
        shutdown: &CancellationToken,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        Self::spawn(name, config_path.into(), Arc::new(options), ids, events, Some(sink), shutdown)
    }

    pub(crate) fn spawn(
        name: ClusterName,
        config_path: PathBuf,
        options: Arc<ClientOptions>,
        ids: ClusterIds,
        events: broadcast::Sender<Event>,
        raw: Option<Arc<dyn RawSink>>,
        shutdown: &CancellationToken,
    ) -> Self {
        let (session, _) = watch::channel(SessionStatus {
            connected: false,
            phase: Phase::Connecting,
            etcd_cluster_id: None,
            config: ConfigStatus { required: true, ..ConfigStatus::default() },
            watched: Vec::new(),
            num_failures: 0,
            last_failure: None,
        });
        let inner = Arc::new(Inner {
            caches: Caches::new(&name, &events),
            raw: raw.map(RawCaches::new),
            name,
            config_path,
            options,
            ids,
            events,
            session,
            reserved: Mutex::new(None),
            reconnect: Notify::new(),
            token: shutdown.child_token(),
            task: Mutex::new(None),
        });
        let span = tracing::info_span!("remote", cluster = %inner.name);
        let task = tokio::spawn(Arc::clone(&inner).run().instrument(span));
        *inner.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Self { inner }
    }

    pub fn name(&self) -> &ClusterName {
        &self.inner.name
    }

    pub fn config_path(&self) -> &Path {
        &self.inner.config_path
    }

    pub fn caches(&self) -> &Caches {
        &self.inner.caches
    }

    /// The raw cache of `kind`, in raw mode ([`RemoteCluster::start_raw`]).
    pub fn raw(&self, kind: Kind) -> Option<&RawCache> {
        self.inner.raw.as_ref().map(|raw| raw.get(kind))
    }

    pub fn nodes(&self) -> &Cache<Node> {
        &self.inner.caches.nodes
    }

    pub fn services(&self) -> &Cache<ClusterService> {
        &self.inner.caches.services
    }

    pub fn identities(&self) -> &Cache<Identity> {
        &self.inner.caches.identities
    }

    pub fn ipcache(&self) -> &Cache<IpCacheEntry> {
        &self.inner.caches.ipcache
    }

    pub fn service_exports(&self) -> &Cache<ServiceExport> {
        &self.inner.caches.service_exports
    }

    /// Every change of every cache of this cluster (of the whole mesh, for a remote started by
    /// a [`crate::ClusterMesh`]).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub fn status(&self) -> RemoteStatus {
        let session = self.inner.session.borrow().clone();
        let prefixes: BTreeMap<Kind, CacheStatus> =
            session.watched.iter().map(|kind| (*kind, self.inner.cache(*kind).status())).collect();
        let ready = session.connected
            && session.config.retrieved
            && !prefixes.is_empty()
            && prefixes.values().all(|p| p.synced);
        let phase = match session.phase {
            Phase::Syncing if ready => Phase::Ready,
            phase => phase,
        };
        RemoteStatus {
            name: self.inner.name.clone(),
            config_path: self.inner.config_path.clone(),
            ready,
            connected: session.connected,
            phase,
            etcd_cluster_id: session.etcd_cluster_id.map(|id| format!("{id:x}")),
            config: session.config,
            prefixes,
            num_failures: session.num_failures,
            last_failure: session.last_failure,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.status().ready
    }

    /// Waits until the cluster is ready (connected, config retrieved, every prefix synced).
    /// Never returns while it cannot connect: bound it with a timeout.
    pub async fn wait_ready(&self) {
        let mut session = self.inner.session.subscribe();
        let mut caches: Vec<_> = Kind::ALL.iter().map(|k| self.inner.cache(*k).watch_status()).collect();
        while !self.is_ready() {
            let mut changes: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>> =
                vec![Box::pin(async { session.changed().await.unwrap_or(()) })];
            for cache in caches.iter_mut() {
                changes.push(Box::pin(async { cache.changed().await.unwrap_or(()) }));
            }
            futures::future::select_all(changes).await;
        }
    }

    /// Deletes every entry of `kind` (reporting the deletions), e.g. to revoke what a cluster
    /// unreachable for too long published; the next list of `kind` brings the entries back.
    pub fn drain(&self, kind: Kind) {
        self.inner.cache(kind).drain();
    }

    /// Drops the current connection and connects again at once (e.g. the config file changed).
    pub fn reconnect(&self) {
        self.inner.reconnect.notify_one();
    }

    /// Stops the connection and waits for it; the caches keep their entries (as Cilium does on
    /// agent shutdown).
    pub async fn stop(&self) {
        self.inner.token.cancel();
        let task = self.inner.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::error!(cluster = %self.inner.name, %error, "remote cluster task failed");
        }
    }

    /// Stops, then deletes every cached entry (emitting the deletions) and releases the cluster
    /// ID: the cluster was removed from the configuration.
    pub async fn remove(&self) {
        self.disconnect().await;
        for kind in Kind::ALL {
            self.inner.cache(kind).drain();
        }
        tracing::info!(cluster = %self.inner.name, "remote cluster disconnected and drained");
    }

    /// Stops and releases the cluster ID, keeping every entry: the cluster was removed, and the
    /// owner of a raw sink decides when its copy goes (KVStoreMesh: after a grace period).
    pub async fn disconnect(&self) {
        self.stop().await;
        if let Some(id) = self.inner.reserved.lock().unwrap_or_else(PoisonError::into_inner).take() {
            self.inner.ids.release(id, &self.inner.name);
        }
    }
}

impl Inner {
    fn update(&self, f: impl FnOnce(&mut SessionStatus)) {
        self.session.send_modify(f);
    }

    /// The cache this remote fills for `kind`: the typed one, or the raw one in raw mode.
    fn cache(&self, kind: Kind) -> &dyn AnyCache {
        match &self.raw {
            Some(raw) => raw.get(kind),
            None => self.caches.get(kind),
        }
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = self.options.backoff.start();
        loop {
            let token = self.token.child_token();
            let mut established = None;
            let end = tokio::select! {
                end = self.session(&token, &mut established) => end,
                () = self.reconnect.notified() => SessionEnd::Reconfigured,
                () = self.token.cancelled() => SessionEnd::Cancelled,
            };
            token.cancel();
            for kind in Kind::ALL {
                self.cache(kind).set_unsynced();
            }
            self.update(|s| {
                s.connected = false;
                s.etcd_cluster_id = None;
                s.config = ConfigStatus { required: true, ..ConfigStatus::default() };
            });
            match end {
                SessionEnd::Cancelled => break,
                SessionEnd::Reconfigured => {
                    tracing::info!("configuration changed, reconnecting");
                    self.update(|s| s.phase = Phase::Connecting);
                }
                SessionEnd::Failed(error) => {
                    if established.is_some_and(|at: Instant| at.elapsed() >= backoff.reset_after()) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error_chain(&error), retry_in = ?delay, "remote cluster connection failed");
                    self.update(|s| {
                        s.phase = Phase::Backoff;
                        s.num_failures += 1;
                        s.last_failure = Some(Failure { at: rfc3339(SystemTime::now()), reason: error_chain(&error) });
                    });
                    tokio::select! {
                        () = self.token.cancelled() => break,
                        () = self.reconnect.notified() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    self.update(|s| s.phase = Phase::Connecting);
                }
            }
        }
        self.update(|s| s.phase = Phase::Stopped);
    }

    async fn session(&self, token: &CancellationToken, established: &mut Option<Instant>) -> SessionEnd {
        match self.try_session(token, established).await {
            Ok(()) => SessionEnd::Cancelled,
            Err(SessionError::ClusterConfigChanged) => SessionEnd::Reconfigured,
            Err(error) => SessionEnd::Failed(error),
        }
    }

    /// Runs one session until `token` is cancelled (`Ok`) or something fails, one phase after
    /// the other; a phase returns `None` when the session was cancelled meanwhile.
    async fn try_session(
        &self,
        token: &CancellationToken,
        established: &mut Option<Instant>,
    ) -> Result<(), SessionError> {
        let mut tasks = Tasks::new();
        let Some(connection) = self.connect(&mut tasks, token, established).await? else { return Ok(()) };
        let Some(config) = self.read_config(&connection, &mut tasks, token).await? else { return Ok(()) };
        let kinds = self.accept_config(&config)?;
        self.follow_config(&connection, &config, &mut tasks, token);
        self.start_prefixes(&connection, &config, &kinds, &mut tasks, token);
        until_cancelled_or_failed(&mut tasks, token).await
    }

    /// 1. Connected once the heartbeat key's first list returns; from then on a watchdog ends
    ///    the session when the heartbeat stops.
    async fn connect(
        &self,
        tasks: &mut Tasks,
        token: &CancellationToken,
        established: &mut Option<Instant>,
    ) -> Result<Option<Connection>, SessionError> {
        let file = EtcdConfig::load(&self.config_path).await?;
        let connection = Connection::open(&file, Arc::clone(&self.options)).await?;
        let heartbeat = heartbeat::watch_heartbeat(connection.clone(), token.clone());
        let last_error = heartbeat.last_error.clone();
        tasks.spawn(
            async move { heartbeat.run.await.map_err(SessionError::from) }
                .instrument(tracing::debug_span!("heartbeat")),
        );
        let timeout = self.options.request_timeout;
        tokio::select! {
            () = token.cancelled() => return Ok(None),
            ended = tasks.join_next() => return Err(task_ended(ended)),
            listed = heartbeat.established => if listed.is_err() {
                return Err(SessionError::Task("heartbeat watcher stopped".into()));
            },
            () = tokio::time::sleep(timeout) => {
                return Err(SessionError::NotEstablished { after: timeout, last: last_error.borrow().clone() });
            }
        }
        *established = Some(Instant::now());
        let etcd_cluster_id = connection.etcd_cluster_id();
        tracing::info!(etcd_cluster_id = ?etcd_cluster_id.map(|id| format!("{id:x}")), "connection to remote cluster established");
        self.update(|s| {
            s.connected = true;
            s.phase = Phase::WaitingForConfig;
            s.etcd_cluster_id = etcd_cluster_id;
        });
        let heartbeat_timeout = self.options.heartbeat_timeout;
        let (last, dog_token) = (heartbeat.last, token.clone());
        tasks.spawn(
            async move { heartbeat::watchdog(last, heartbeat_timeout, dog_token).await.map_err(SessionError::from) }
                .instrument(tracing::debug_span!("watchdog")),
        );
        Ok(Some(connection))
    }

    /// 2. The cluster config, retried until the remote publishes it (unless a session task
    ///    fails first).
    async fn read_config(
        &self,
        connection: &Connection,
        tasks: &mut Tasks,
        token: &CancellationToken,
    ) -> Result<Option<ClusterConfig>, SessionError> {
        tokio::select! {
            ended = tasks.join_next() => Err(task_ended(ended)),
            config = cluster_config::retrieve(connection, &self.name, token) => Ok(config?),
        }
    }

    /// 3. The config validated and its ID reserved; returns the kinds to watch, after draining
    ///    the ones no longer offered.
    fn accept_config(&self, config: &ClusterConfig) -> Result<Vec<Kind>, SessionError> {
        cluster_config::validate(config, &self.options.local)?;
        self.reserve(config.id)?;
        tracing::info!(cluster_id = %config.id, capabilities = ?config.capabilities, "found remote cluster configuration");
        let kinds = self.kinds(config);
        self.update(|s| {
            s.phase = Phase::Syncing;
            s.config = ConfigStatus {
                required: true,
                retrieved: true,
                cluster_id: Some(config.id),
                kvstoremesh: config.capabilities.cached,
                sync_canaries: config.capabilities.synced_canaries,
                service_exports_enabled: config.capabilities.service_exports_enabled,
                max_connected_clusters: Some(config.capabilities.max_connected_clusters).filter(|m| *m != 0),
            };
            s.watched = kinds.clone();
        });
        if let Some(raw) = &self.raw {
            // Before any prefix starts: a copy must describe the cluster before holding its data.
            raw.cluster_config(config);
        }
        for kind in Kind::ALL.into_iter().filter(|k| !kinds.contains(k)) {
            // No longer offered (or no longer wanted): nothing may linger.
            self.cache(kind).not_offered();
        }
        Ok(kinds)
    }

    /// 4. Whatever the remote writes to its config from now on ends the session, so that the
    ///    next one reads the prefixes the new config offers.
    fn follow_config(
        &self,
        connection: &Connection,
        config: &ClusterConfig,
        tasks: &mut Tasks,
        token: &CancellationToken,
    ) {
        let (connection, name, token, followed) =
            (connection.clone(), self.name.clone(), token.clone(), config.clone());
        tasks.spawn(
            async move {
                match cluster_config::follow(&connection, &name, &followed, &token).await? {
                    Some(_) => Err(SessionError::ClusterConfigChanged),
                    None => Ok(()),
                }
            }
            .instrument(tracing::debug_span!("cluster_config")),
        );
    }

    /// 5. Canaries, then one list+watch per prefix of `kinds`.
    fn start_prefixes(
        &self,
        connection: &Connection,
        config: &ClusterConfig,
        kinds: &[Kind],
        tasks: &mut Tasks,
        token: &CancellationToken,
    ) {
        let canaries = if config.capabilities.synced_canaries {
            let (canaries, run) = watch_canaries(connection.clone(), &self.name, token.clone());
            tasks.spawn(
                async move { run.await.map_err(SessionError::from) }.instrument(tracing::debug_span!("canaries")),
            );
            Some(canaries)
        } else {
            None
        };
        let validation = Validation {
            cluster: self.name.clone(),
            cluster_id: config.id,
            local_cluster_id: self.options.local.id,
            max_connected_clusters: self.options.local.max_connected_clusters,
        };
        let cached = config.capabilities.cached;
        let start = PrefixStart { connection, validation: &validation, canaries: &canaries, cached, token };
        for kind in kinds {
            start.spawn(tasks, self.cache(*kind));
        }
    }

    /// The prefixes to watch: every kind the remote publishes and we want.
    fn kinds(&self, config: &ClusterConfig) -> Vec<Kind> {
        let mut kinds = vec![Kind::Nodes];
        if config.publishes_services() {
            kinds.push(Kind::Services);
        }
        kinds.extend([Kind::Identities, Kind::IpCache]);
        if self.options.service_exports && config.capabilities.service_exports_enabled.is_some() {
            kinds.push(Kind::ServiceExports);
        }
        kinds
    }

    /// Reserves `id`; a changed ID first drains everything read under the old one.
    fn reserve(&self, id: ClusterId) -> Result<(), cluster_config::Error> {
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = *reserved
            && old != id
        {
            tracing::info!(old = %old, new = %id, "remote cluster ID changed: draining all known entries");
            for kind in Kind::ALL {
                self.cache(kind).drain();
            }
            self.ids.release(old, &self.name);
            *reserved = None;
        }
        self.ids.reserve(id, &self.name)?;
        *reserved = Some(id);
        Ok(())
    }
}

/// What every prefix task of a session shares.
struct PrefixStart<'a> {
    connection: &'a Connection,
    validation: &'a Validation,
    canaries: &'a Option<Canaries>,
    cached: bool,
    token: &'a CancellationToken,
}

impl PrefixStart<'_> {
    fn spawn(&self, tasks: &mut Tasks, cache: &dyn AnyCache) {
        let kind = cache.kind();
        let prefix = kind.watch_prefix(&self.validation.cluster, self.cached);
        cache.set_prefix(&prefix);
        let canary = self.canary(kind);
        let token = self.token.clone();
        let run = cache.run(self.connection.clone(), prefix.clone(), self.validation.clone(), token.clone());
        tasks.spawn(
            async move {
                if !wait_for_canary(canary, &token).await {
                    return Ok(());
                }
                tracing::debug!(%prefix, "starting list+watch");
                run.await.map_err(SessionError::from)
            }
            .instrument(cache.span()),
        );
    }

    fn canary(&self, kind: Kind) -> Option<(Canaries, String)> {
        self.canaries.clone().map(|canaries| (canaries, kind.canary_name(self.cached)))
    }
}

/// Waits for the canary, if the remote writes them; `false` when the session ends first.
async fn wait_for_canary(canary: Option<(Canaries, String)>, token: &CancellationToken) -> bool {
    let Some((mut canaries, name)) = canary else { return true };
    tracing::debug!(canary = %name, "waiting for the sync canary");
    tokio::select! {
        () = token.cancelled() => false,
        present = canaries.wait_for(&name) => {
            if !present {
                // The canary watcher ended; the session ends with its error.
                token.cancelled().await;
            }
            present
        }
    }
}

/// 6. Until cancelled or the first failure.
async fn until_cancelled_or_failed(tasks: &mut Tasks, token: &CancellationToken) -> Result<(), SessionError> {
    loop {
        tokio::select! {
            () = token.cancelled() => return Ok(()),
            ended = tasks.join_next() => match ended {
                Some(Ok(Ok(()))) if token.is_cancelled() => return Ok(()),
                Some(Ok(Ok(()))) => {}
                ended => return Err(task_ended(ended)),
            },
        }
    }
}

fn task_ended(ended: Option<Result<Result<(), SessionError>, tokio::task::JoinError>>) -> SessionError {
    match ended {
        Some(Ok(Err(error))) => error,
        Some(Ok(Ok(()))) => SessionError::Task("a session task returned early".into()),
        Some(Err(error)) => SessionError::Task(error.to_string()),
        None => SessionError::Task("no session task left".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_skip_repeated_causes() {
        let error = SessionError::Config(config::Error::Read {
            path: "/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        });
        assert_eq!(error_chain(&error), "read /x: gone");
    }
}
