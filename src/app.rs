//! The only module that knows every component: builds them, spawns the task tree, and
//! orders shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::clustermesh::{self, ClustermeshConfig, Source};
use crate::config::{
    CertsCommand, CertsGenerateArgs, Cli, ClustermeshArgs, ClustermeshDbgCommand, Command, KubeRate, KvstoreArgs,
    KvstoreKind, KvstoremeshArgs, KvstoremeshDbgArgs, KvstoremeshDbgCommand, KvstoremeshRoleArgs, OutputFormat,
    StoreArgs,
};
use crate::controllers::ControllerRuns;
use crate::etcd::auth::{AuthStore, PermType, Permission};
use crate::etcd::datadir::{DataDir, Origin};
use crate::etcd::embedded::{self, EmbeddedConfig};
use crate::etcd::server::ServerOptions;
use crate::etcd::service::cluster::MemberInfo;
use crate::etcd::service::watch::WatchConfig;
use crate::etcd::store::Limits;
use crate::etcd::tls::TlsFiles;
use crate::kvstore::Backend;
use crate::kvstore::embedded::Embedded;
use crate::kvstore::etcd::{Etcd, EtcdConfig};
use crate::kvstore::instrumented::{Instrumented, KvstoreMetrics};
use crate::kvstore::limited::{Limiter, LimiterCollector, RateLimited, Rates};
use crate::kvstore::quorum::{self, QuorumCheck};
use crate::kvstoremesh::{self, KvstoremeshConfig, ReadyTimeouts, RemovalPolicy};
use crate::metrics::{self, Routes};
use crate::process_metrics::ProcessCollector;
use crate::source::filter::ListFilter;
use crate::sync::state::HEARTBEAT_KEY;
use crate::sync::store::ETCD_MAX_IN_FLIGHT;
use crate::translate::model::Settings;
use crate::users::{self, EmbeddedUsers, EtcdUsers, UserAdmin, UsersManager};
use crate::{certs, pki, shutdown};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli { log: _, command } = cli;
    match command {
        Command::Clustermesh(args) => run_clustermesh(*args).await,
        Command::Kvstore(args) => run_kvstore(*args).await,
        Command::Certs(CertsCommand::Generate(args)) => generate_certs(args),
        Command::Status(args) => crate::mesh::status(args.mesh, args.wait, args.output).await,
        Command::Demo(args) => {
            let token = CancellationToken::new();
            shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
            crate::demo::run(&args.examples, token).await
        }
        Command::Watch(args) => {
            let token = CancellationToken::new();
            shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
            crate::mesh::watch(args, token).await
        }
        Command::Kvstoremesh(args) => run_kvstoremesh(*args).await,
        Command::KvstoremeshDbg(args) => kvstoremesh_dbg(args).await,
        Command::ClustermeshDbg(ClustermeshDbgCommand::Troubleshoot(args)) => {
            print_report(crate::troubleshoot::local(&args.etcd_config, args.timeout).await)
        }
        Command::Etcdinit(args) => Ok(crate::persona::etcdinit::run(args).await?),
        Command::McsapiCorednsCfg(args) => {
            let client = kube_client(args.k8s_kubeconfig_path.as_deref(), args.k8s_api_server.as_deref(), None).await?;
            crate::mcsapi_coredns::run(client, &args).await?;
            Ok(())
        }
        Command::Version => {
            print!("{}", crate::persona::version());
            Ok(())
        }
    }
}

async fn run_clustermesh(args: ClustermeshArgs) -> anyhow::Result<()> {
    args.validate()?;
    let kvstore = args.kvstore_kind();
    let options = args.kvstore_options()?;
    if let Some(ignored) = args.cilium.ignored() {
        tracing::info!("{ignored}");
    }
    let token = CancellationToken::new();
    shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
    let tracker = TaskTracker::new();
    // Process metrics carry no prefix, as Prometheus' process collector names them.
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector));
    let registry = root.sub_registry_with_prefix("cilium_clustermesh_apiserver");

    let settings = Settings {
        max_connected_clusters: args.max_connected_clusters,
        enable_cilium_endpoint_slice: args.enable_cilium_endpoint_slice,
        mcs_api_enabled: args.clustermesh_enable_mcs_api,
        default_global_namespace: args.clustermesh_default_global_namespace,
        service_v2_mode: args.clustermesh_service_v2,
        ..Settings::new(args.cluster_name.clone(), args.cluster_id)
    };
    let source = match (&args.k8s_objects_dir, &args.k8s_kubeconfig_path) {
        (Some(dir), _) => Source::Directory(dir.clone(), Duration::from_secs(1)),
        (None, path) => {
            Source::Kubernetes(kube_client(path.as_deref(), args.k8s_api_server(), args.k8s_client_rate()).await?)
        }
    };
    let liveness = match &source {
        Source::Kubernetes(client) => Some(kubernetes_answers(client.clone())),
        Source::Directory(..) => None,
    };
    let mut config = ClustermeshConfig::new(settings, source);
    config.lease_ttl = args.kvstore_lease_ttl;
    config.filter = ListFilter { service_proxy_name: args.k8s_service_proxy_name.clone() };
    // `--clustermesh-config`: the kvstoremesh role too, on the same store.
    let kvstoremesh = match &args.kvstoremesh.clustermesh_config {
        Some(dir) => {
            let local = local_cluster(&args.cluster_name, args.cluster_id, args.max_connected_clusters)?;
            let listeners = &args.kvstoremesh_listeners;
            let mut config = kvstoremesh_config(local, dir.clone(), &args.kvstoremesh, args.kvstore_lease_ttl, false);
            if kvstore == KvstoreKind::Etcd {
                config.writer.max_in_flight = options.max_inflight.unwrap_or(KVSTOREMESH_ETCD_MAX_IN_FLIGHT);
            }
            let listeners = KvstoremeshListeners {
                health: SocketAddr::new(args.health_bind_address, listeners.kvstoremesh_health_port),
                metrics: crate::config::serve_addr(&listeners.kvstoremesh_prometheus_serve_addr)?,
                api: Some(listeners.kvstoremesh_api_serve_addr.clone()).filter(|a| !a.trim().is_empty()),
            };
            Some((config, listeners))
        }
        None => None,
    };

    // Shutdown order: the mirror stops and drains into the store first; only then do the
    // store's gRPC servers close their clients' watch streams.
    let store_token = CancellationToken::new();
    let store_tracker = TaskTracker::new();
    // The store, started or connected; from here on the roles run the same on either.
    let local = match kvstore {
        KvstoreKind::Embedded => {
            let auth = AuthStore::cilium(&args.cluster_name);
            let store = start_store(&args.store, auth, &store_tracker, &store_token).await?.store;
            LocalStore { backend: Arc::new(Embedded::new(Arc::clone(&store))), kind: StoreKind::Embedded(store) }
        }
        KvstoreKind::Etcd => {
            let path = args.etcd_config().context("--kvstore-opt etcd.config=FILE")?;
            let client = EtcdConfig::load(&path)?.connect().await?;
            // Each write to etcd is a round trip (and a disk sync): overlap them as Cilium does.
            config.max_writes_in_flight = options.max_inflight.unwrap_or(ETCD_MAX_IN_FLIGHT);
            let limiter = Limiter::new(Rates { bootstrap: options.bootstrap_qps, steady: options.qps });
            let backend = RateLimited::new(Arc::new(Etcd::new(client.clone())), Arc::clone(&limiter));
            LocalStore { backend: Arc::new(backend), kind: StoreKind::Etcd { client, limiter } }
        }
    };
    let (running, reachable) = run_roles(local, config, kvstoremesh, &args, registry, &tracker, &token).await?;
    // A store that fails takes the whole process down with it.
    let failed = store_token.clone();
    let main = token.clone();
    tokio::spawn(async move {
        failed.cancelled().await;
        main.cancel();
    });
    let health = bind(SocketAddr::new(args.health_bind_address, args.health_port)).await?;
    let ready = ready_while_reachable(running.ready.clone(), reachable, &tracker, &token);
    let routes = Routes { ready: Some(ready), liveness, ..Routes::default() };
    tracker.spawn(serve_admin(health, routes, token.child_token(), "health"));
    if let Some(addr) = args.prometheus_addr()? {
        let routes = Routes { metrics: Some(Arc::new(root)), ..Routes::default() };
        tracker.spawn(serve_admin(bind(addr).await?, routes, token.child_token(), "metrics"));
    }
    wait_for_shutdown(&token, &tracker).await?;
    store_token.cancel();
    wait_for_shutdown(&store_token, &store_tracker).await
}

/// The store the clustermesh role writes to, started or connected.
struct LocalStore {
    /// What every role writes through.
    backend: Arc<dyn Backend>,
    /// What else the roles need of the store, which differs between the two.
    kind: StoreKind,
}

#[expect(clippy::large_enum_variant, reason = "one value per process, made once at start-up")]
enum StoreKind {
    /// The embedded store (the users manager changes its auth table in-process).
    Embedded(Arc<crate::etcd::store::Store>),
    /// An attached etcd: its connection (users, quorum check) and the rate limiter of the
    /// writes to it.
    Etcd { client: etcd_client::Client, limiter: Arc<Limiter> },
}

/// Runs the roles of `clustermesh` on the local store: the mirror, the users manager, the
/// attached store's quorum check and the kvstoremesh role. Returns the mirror and, on an
/// attached etcd, whether the store answers.
async fn run_roles(
    local: LocalStore,
    config: ClustermeshConfig,
    kvstoremesh: Option<(KvstoremeshConfig, KvstoremeshListeners)>,
    args: &ClustermeshArgs,
    registry: &mut Registry,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> anyhow::Result<(clustermesh::Running, Option<watch::Receiver<bool>>)> {
    let LocalStore { backend, kind } = local;
    let max_writes_in_flight = config.max_writes_in_flight;
    let running = clustermesh::spawn(Arc::clone(&backend), config, registry, tracker, token);
    if let StoreKind::Etcd { limiter, .. } = &kind {
        let collector = LimiterCollector::new(Arc::clone(limiter), ETCD_API_CALL, max_writes_in_flight);
        registry.register_collector(Box::new(collector));
    }
    if args.cluster_users_enabled {
        let runs = running.controllers.clone();
        match &kind {
            StoreKind::Embedded(store) => spawn_users(EmbeddedUsers(Arc::clone(store)), args, runs, tracker, token),
            StoreKind::Etcd { client, .. } => spawn_users(EtcdUsers(client.clone()), args, runs, tracker, token),
        }
    }
    let reachable = match kind {
        StoreKind::Embedded(_) => None,
        StoreKind::Etcd { client, limiter } => {
            tracker.spawn(end_bootstrap_when_ready(running.ready.clone(), limiter, token.child_token()));
            let (reachable, reachable_rx) = tokio::sync::watch::channel(true);
            let check = QuorumCheck::from_env(args.cilium.kvstore_max_consecutive_quorum_errors)
                .map_err(|e| anyhow::anyhow!(e))?;
            let errors = running.kvstore_metrics.quorum_errors.clone();
            tracker.spawn(
                quorum::run(client, HEARTBEAT_KEY, errors, reachable, check, token.child_token())
                    .instrument(tracing::info_span!("quorum_check")),
            );
            Some(reachable_rx)
        }
    };
    if let Some((config, listeners)) = kvstoremesh {
        start_kvstoremesh(backend, config, listeners, tracker, token, None, reachable.clone()).await?;
    }
    Ok((running, reachable))
}

/// `/readyz` of a role on an attached etcd: synchronised, and the store answering quorum reads
/// (a role cut off from its store is not serving what Kubernetes says, whatever it synced
/// before). Without a quorum check (the embedded store), synchronised is enough.
fn ready_while_reachable(
    synced: watch::Receiver<bool>,
    reachable: Option<watch::Receiver<bool>>,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> watch::Receiver<bool> {
    let Some(mut reachable) = reachable else { return synced };
    let mut synced = synced;
    let both =
        |synced: &watch::Receiver<bool>, reachable: &watch::Receiver<bool>| *synced.borrow() && *reachable.borrow();
    let (ready, ready_rx) = watch::channel(both(&synced, &reachable));
    let shutdown = token.child_token();
    tracker.spawn(async move {
        // A sender that is gone keeps its last value (the mirror drops its readiness sender
        // once synchronised for good).
        let (mut synced_open, mut reachable_open) = (true, true);
        while synced_open || reachable_open {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = synced.changed(), if synced_open => synced_open = changed.is_ok(),
                changed = reachable.changed(), if reachable_open => reachable_open = changed.is_ok(),
            }
            let now = both(&synced, &reachable);
            ready.send_if_modified(|ready| std::mem::replace(ready, now) != now);
        }
    });
    ready_rx
}

/// The `api_call` label of the limiter of the connection to the local store: Cilium's
/// `makeSessionName("etcd", ...)` without a cluster name.
const ETCD_API_CALL: &str = "etcd";

/// Cilium's etcd client leaves its bootstrap rate once the first synchronisation is done.
async fn end_bootstrap_when_ready(
    mut ready: tokio::sync::watch::Receiver<bool>,
    limiter: Arc<Limiter>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        done = ready.wait_for(|ready| *ready) => if done.is_ok() { limiter.bootstrap_done() },
        () = shutdown.cancelled() => {}
    }
}

/// Cilium's users manager, on whichever store the mirror writes to.
fn spawn_users<A: UserAdmin>(
    admin: A,
    args: &ClustermeshArgs,
    runs: ControllerRuns,
    tracker: &TaskTracker,
    token: &CancellationToken,
) {
    let path = args.cluster_users_config_path.clone();
    let manager = UsersManager::new(admin, path, args.cluster_name.clone()).counting_runs_in(runs);
    tracker.spawn(manager.run(users::POLL_INTERVAL, token.child_token()).instrument(tracing::info_span!("users")));
}

async fn run_kvstoremesh(args: KvstoremeshArgs) -> anyhow::Result<()> {
    args.validate()?;
    let KvstoremeshArgs {
        cluster_name,
        cluster_id,
        max_connected_clusters,
        kvstore: _,
        kvstore_opt: _,
        kvstore_lease_ttl,
        role,
        enable_heartbeat,
        health_port,
        health_bind_address,
        prometheus_serve_addr,
        api_serve_addr,
        cilium,
    } = &args;
    if let Some(ignored) = cilium.ignored() {
        tracing::info!("{ignored}");
    }
    let options = args.kvstore_options()?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
    let tracker = TaskTracker::new();
    let local = local_cluster(cluster_name, *cluster_id, *max_connected_clusters)?;
    let dir = role.clustermesh_config.clone().context("--clustermesh-config DIR")?;
    let mut config = kvstoremesh_config(local, dir, role, *kvstore_lease_ttl, *enable_heartbeat);
    config.writer.max_in_flight = options.max_inflight.unwrap_or(KVSTOREMESH_ETCD_MAX_IN_FLIGHT);
    let listeners = KvstoremeshListeners {
        health: SocketAddr::new(*health_bind_address, *health_port),
        metrics: crate::config::serve_addr(prometheus_serve_addr)?,
        api: Some(api_serve_addr.clone()).filter(|a| !a.trim().is_empty()),
    };
    let path = options.etcd_config.context("--kvstore-opt etcd.config=FILE")?;
    let etcd = EtcdConfig::load(&path)?.connect().await?;
    let limiter = Limiter::new(Rates { bootstrap: options.bootstrap_qps, steady: options.qps });
    let backend = Arc::new(RateLimited::new(Arc::new(Etcd::new(etcd.clone())), Arc::clone(&limiter)));
    let check = QuorumCheck::from_env(cilium.kvstore_max_consecutive_quorum_errors).map_err(|e| anyhow::anyhow!(e))?;
    let (reachable, reachable_rx) = tokio::sync::watch::channel(true);
    let kvstore_metrics =
        start_kvstoremesh(backend, config, listeners, &tracker, &token, Some(limiter), Some(reachable_rx)).await?;
    tracker.spawn(
        quorum::run(etcd, HEARTBEAT_KEY, kvstore_metrics.quorum_errors, reachable, check, token.child_token())
            .instrument(tracing::info_span!("quorum_check")),
    );
    wait_for_shutdown(&token, &tracker).await
}

fn local_cluster(name: &str, id: u32, max: u32) -> anyhow::Result<clustermesh_client::LocalCluster> {
    let name = clustermesh_client::ClusterName::new(name)?;
    let max = clustermesh_client::MaxConnectedClusters::new(max)?;
    Ok(clustermesh_client::LocalCluster::new(name, clustermesh_client::ClusterId(id)).with_max_connected_clusters(max))
}

/// Cache writes overlapped toward an attached etcd: Cilium's chart runs kvstoremesh with
/// `etcd.maxInflight=10`.
const KVSTOREMESH_ETCD_MAX_IN_FLIGHT: usize = 10;

fn kvstoremesh_config(
    local: clustermesh_client::LocalCluster,
    dir: PathBuf,
    role: &KvstoremeshRoleArgs,
    lease_ttl: Duration,
    heartbeat: bool,
) -> KvstoremeshConfig {
    let KvstoremeshRoleArgs {
        clustermesh_config: _,
        per_cluster_ready_timeout,
        global_ready_timeout,
        clustermesh_cache_ttl,
        disable_drain_on_disconnection,
        kvstoremesh_drain_grace_period,
    } = role;
    KvstoremeshConfig {
        lease_ttl,
        ready: ReadyTimeouts { per_cluster: *per_cluster_ready_timeout, global: *global_ready_timeout },
        cache_ttl: *clustermesh_cache_ttl,
        removal: RemovalPolicy {
            grace_period: *kvstoremesh_drain_grace_period,
            disabled: *disable_drain_on_disconnection,
            ..RemovalPolicy::default()
        },
        heartbeat: heartbeat.then_some(crate::sync::state::HEARTBEAT_INTERVAL),
        ..KvstoremeshConfig::new(clustermesh_client::ClientOptions::new(local), dir)
    }
}

/// Where the kvstoremesh role answers (Cilium's kvstoremesh container: 9881, 9964, 9889).
struct KvstoremeshListeners {
    health: SocketAddr,
    metrics: Option<SocketAddr>,
    /// `host:port`, resolved when bound (`localhost:9889`).
    api: Option<String>,
}

/// Starts the role and its listeners; returns its kvstore metrics (for the quorum check of an
/// attached store).
async fn start_kvstoremesh(
    backend: Arc<dyn Backend>,
    config: KvstoremeshConfig,
    listeners: KvstoremeshListeners,
    tracker: &TaskTracker,
    token: &CancellationToken,
    limiter: Option<Arc<Limiter>>,
    store_reachable: Option<watch::Receiver<bool>>,
) -> anyhow::Result<KvstoreMetrics> {
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector));
    let registry = root.sub_registry_with_prefix("cilium_kvstoremesh");
    // The cache writes are timed under Cilium's kvstore families, as the clustermesh role's.
    let kvstore_metrics = KvstoreMetrics::register(registry);
    if let Some(limiter) = &limiter {
        let collector = LimiterCollector::new(Arc::clone(limiter), ETCD_API_CALL, config.writer.max_in_flight);
        registry.register_collector(Box::new(collector));
    }
    let backend: Arc<dyn Backend> = Arc::new(Instrumented::new(backend, kvstore_metrics.clone()));
    let config = KvstoremeshConfig { events_queue: Some(kvstore_metrics.events_queue.clone()), ..config };
    let running = kvstoremesh::spawn(backend, config, registry, tracker, token).await?;
    if let Some(limiter) = limiter {
        tracker.spawn(end_bootstrap_when_ready(running.ready.clone(), limiter, token.child_token()));
    }
    let health = bind(listeners.health).await?;
    let ready = ready_while_reachable(running.ready.clone(), store_reachable, tracker, token);
    let routes = Routes { ready: Some(ready), ..Routes::default() };
    tracker.spawn(serve_admin(health, routes, token.child_token(), "kvstoremesh-health"));
    if let Some(addr) = listeners.metrics {
        let routes = Routes { metrics: Some(Arc::new(root)), ..Routes::default() };
        tracker.spawn(serve_admin(bind(addr).await?, routes, token.child_token(), "kvstoremesh-metrics"));
    }
    if let Some(addr) = listeners.api {
        let listener = tokio::net::TcpListener::bind(addr.as_str()).await.with_context(|| format!("binding {addr}"))?;
        let span = tracing::info_span!("kvstoremesh_api", addr = ?listener.local_addr().ok());
        let (source, shutdown) = (running.status_source(), token.child_token());
        tracker.spawn(
            async move {
                if let Err(error) = kvstoremesh::api::serve(listener, source, shutdown).await {
                    tracing::error!(%error, "kvstoremesh status API failed");
                }
            }
            .instrument(span),
        );
    }
    Ok(kvstore_metrics)
}

async fn kvstoremesh_dbg(args: KvstoremeshDbgArgs) -> anyhow::Result<()> {
    let KvstoremeshDbgArgs { host, command } = args;
    match command {
        KvstoremeshDbgCommand::Troubleshoot(args) => {
            let local = args.include_local.then_some(args.etcd_config.as_path());
            print_report(
                crate::troubleshoot::kvstoremesh(&args.clustermesh_config, &args.clusters, local, args.timeout).await,
            )
        }
        KvstoremeshDbgCommand::Status(status) => {
            let clusters = kvstoremesh::api::fetch(&host).await.context("Failed to retrieve status information")?;
            match status.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&clusters)?),
                OutputFormat::Text => print!(
                    "{}",
                    kvstoremesh::status::format_text(&clusters, status.verbose, std::time::SystemTime::now())
                ),
            }
            Ok(())
        }
    }
}

/// Prints a troubleshooting report; a failed check fails the command.
fn print_report(report: crate::troubleshoot::Report) -> anyhow::Result<()> {
    print!("{}", report.text());
    anyhow::ensure!(!report.failed(), "some checks failed (marked ❌ above)");
    Ok(())
}

fn generate_certs(args: CertsGenerateArgs) -> anyhow::Result<()> {
    crate::config::validate_cluster_name(&args.cluster_name)?;
    let options = certs::Options {
        cluster_name: args.cluster_name,
        namespace: args.namespace,
        out: args.out,
        ca: args.ca_cert.zip(args.ca_key),
        remote_user: args.remote_user,
        extra_dns_names: args.extra_dns_names,
        extra_ip_addresses: args.extra_ip_addresses,
        validity: Duration::from_secs(args.validity_days * 24 * 3600),
    };
    for dir in certs::generate(&options)? {
        println!("{}", dir.display());
    }
    Ok(())
}

async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    api_server: Option<&str>,
    rate: Option<KubeRate>,
) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?
        }
        // Cilium's --k8s-api-server without credentials of its own: the in-cluster ones when
        // there are, else the URL alone.
        None if api_server.is_some() => match kube::Config::incluster() {
            Ok(config) => config,
            Err(_) => kube::Config::new(api_server.unwrap_or_default().parse().context("--k8s-api-server")?),
        },
        None => kube::Config::infer().await.context("finding the Kubernetes API (in-cluster or kubeconfig)")?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url.parse().with_context(|| format!("--k8s-api-server {url:?}"))?;
    }
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(match rate {
        // tower's window limiter as client-go's token bucket: `burst` requests per window of
        // `burst / qps` seconds allows the same bursts and the same average.
        Some(KubeRate { qps, burst }) => {
            let window = Duration::from_secs_f64(f64::from(burst) / qps);
            builder.with_layer(&tower::limit::RateLimitLayer::new(u64::from(burst), window)).build()
        }
        None => builder.build(),
    })
}

/// How long `/healthz` waits for the Kubernetes API server.
const KUBERNETES_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Cilium's apiserver `/healthz`: the Kubernetes API server answers its version.
fn kubernetes_answers(client: kube::Client) -> metrics::Liveness {
    Arc::new(move || {
        let client = client.clone();
        Box::pin(async move {
            match tokio::time::timeout(KUBERNETES_HEALTH_TIMEOUT, client.apiserver_version()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(crate::error_chain(&error)),
                Err(_) => Err(format!("the Kubernetes API server did not answer within {KUBERNETES_HEALTH_TIMEOUT:?}")),
            }
        })
    })
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
    what: &'static str,
) {
    let addr = listener.local_addr().ok();
    async move {
        if let Err(error) = metrics::serve(listener, routes, shutdown).await {
            tracing::error!(%error, "admin server failed");
        }
    }
    .instrument(tracing::info_span!("admin", what, addr = ?addr))
    .await
}

/// Waits for the shutdown signal, then for every task, within the grace period.
async fn wait_for_shutdown(token: &CancellationToken, tracker: &TaskTracker) -> anyhow::Result<()> {
    token.cancelled().await;
    tracker.close();
    if tokio::time::timeout(shutdown::GRACE_PERIOD, tracker.wait()).await.is_err() {
        anyhow::bail!("tasks still running {:?} after the shutdown signal", shutdown::GRACE_PERIOD);
    }
    Ok(())
}

async fn run_kvstore(args: KvstoreArgs) -> anyhow::Result<()> {
    let KvstoreArgs { store, cluster_name, remote_reads_agent_cache } = args;
    let data_dir = store.data_dir.clone().map(DataDir::new);
    let saved = match &data_dir {
        Some(dir) => dir.load_auth().context("loading users and roles from the data directory")?,
        None => None,
    };
    let mut auth = match (saved, &cluster_name) {
        (Some(saved), _) => {
            tracing::info!(users = ?saved.user_list(), enabled = saved.is_enabled(), "users and roles loaded from the data directory");
            saved
        }
        (None, Some(name)) => AuthStore::cilium(name),
        (None, None) => AuthStore::default(),
    };
    if remote_reads_agent_cache && grant_remote_cache_reads(&mut auth) {
        tracing::info!(
            "started by Cilium's 1.16/1.17 chart: role remote may also read cilium/cache/, cilium/cluster-config/ and \
             cilium/synced/, as that release's agents read the KVStoreMesh cache with the remote certificate"
        );
    }
    let token = CancellationToken::new();
    shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
    let tracker = TaskTracker::new();
    let store = start_store(&store, auth, &tracker, &token).await?.store;
    if let Some(dir) = data_dir {
        tracker.spawn(
            save_auth_changes(store, dir, token.child_token()).instrument(tracing::info_span!("auth_persistence")),
        );
    }
    wait_for_shutdown(&token, &tracker).await
}

/// What Cilium 1.16's agents read from the local cache, granted to role `remote` if it is
/// Cilium's (it reads `cilium/state/`). Returns whether anything was granted.
fn grant_remote_cache_reads(auth: &mut AuthStore) -> bool {
    const REMOTE: &str = "remote";
    let Ok(perms) = auth.role_get(REMOTE) else { return false };
    if !perms.iter().any(|p| p.key.as_ref() == b"cilium/state/") {
        return false;
    }
    let mut granted = false;
    for prefix in [&b"cilium/cache/"[..], b"cilium/cluster-config/", b"cilium/synced/"] {
        let perm = Permission::prefix(PermType::Read, prefix);
        if !perms.contains(&perm) {
            granted |= auth.role_grant_permission(REMOTE, perm).is_ok();
        }
    }
    granted
}

/// How often the auth revision is compared with the saved one.
const AUTH_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Saves users, roles and the auth switch whenever they change (etcd keeps them in its
/// backend; here the data directory's auth file is the backend), and once more at shutdown.
async fn save_auth_changes(store: Arc<crate::etcd::store::Store>, dir: DataDir, shutdown: CancellationToken) {
    let mut saved = None;
    // A failing save is retried every interval but reported once per failure spell.
    let mut failing = false;
    loop {
        let state = store.auth().read().state();
        if saved.as_ref() != Some(&state) {
            match dir.save_auth(state.clone(), Origin::store()) {
                Ok(()) => (saved, failing) = (Some(state), false),
                Err(error) if !failing => {
                    failing = true;
                    tracing::error!(error = %crate::error_chain(&error), "saving users and roles; retrying");
                }
                Err(_) => {}
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(AUTH_SAVE_INTERVAL) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// The embedded store, serving.
pub(crate) struct StartedStore {
    pub store: Arc<crate::etcd::store::Store>,
    /// The client URLs it reports in `member list`.
    pub client_urls: Vec<String>,
}

/// Starts the embedded store as `args` say (`kvstore`, `clustermesh` on the embedded store,
/// `demo`); it stops on `token` and is tracked by `tracker`.
pub(crate) async fn start_store(
    args: &StoreArgs,
    auth: AuthStore,
    tracker: &TaskTracker,
    token: &CancellationToken,
) -> anyhow::Result<StartedStore> {
    let StoreArgs {
        listen_client_urls: _,
        listen_metrics_urls: _,
        advertise_client_urls,
        name,
        cert_file,
        key_file,
        trusted_ca_file,
        client_cert_auth,
        auto_tls,
        tls_reload_interval,
        auto_compaction_retention,
        max_request_bytes,
        max_txn_ops,
        max_leases_per_user,
        quota_backend_bytes,
        max_connections_per_user,
        max_concurrent_streams,
        watch_progress_notify_interval,
        data_dir: _,
        initial_cluster_token: _,
        wal_fsync: _,
        wal_snapshot_bytes: _,
    } = args;
    args.validate()?;
    let urls = args.listen_urls()?;
    let tls = if *auto_tls {
        auto_tls_files(*client_cert_auth, urls.first().map_or("", |u| u.url.as_str()))?
    } else {
        // clap enforces these three unless --auto-tls.
        let path = |p: &Option<PathBuf>, flag: &str| p.clone().with_context(|| format!("{flag} is required"));
        TlsFiles {
            cert: path(cert_file, "--cert-file")?,
            key: path(key_file, "--key-file")?,
            trusted_ca: path(trusted_ca_file, "--trusted-ca-file")?,
            client_cert_auth: *client_cert_auth,
        }
    };
    let addrs: Vec<_> = urls.iter().map(|u| u.addr).collect();
    let metrics_addrs: Vec<_> = args.metrics_urls()?.iter().map(|u| u.addr).collect();
    let listeners = embedded::Listeners {
        client: embedded::bind_all(&addrs).await.with_context(|| format!("binding {addrs:?}"))?,
        metrics: embedded::bind_all(&metrics_addrs).await.with_context(|| format!("binding {metrics_addrs:?}"))?,
    };
    let client_urls = if advertise_client_urls.is_empty() {
        // A listen URL on port 0 is reported with the port bound (the demo's stores).
        let bound = listeners.client.iter().map(|l| l.local_addr().ok());
        urls.iter()
            .zip(bound)
            .map(|(u, bound)| match bound {
                Some(bound) if u.addr.port() == 0 => format!("https://{bound}"),
                _ => u.url.clone(),
            })
            .collect()
    } else {
        advertise_client_urls.clone()
    };
    let config = EmbeddedConfig {
        tls,
        tls_reload_interval: *tls_reload_interval,
        limits: Limits {
            max_txn_ops: *max_txn_ops,
            max_request_bytes: *max_request_bytes,
            max_leases_per_user: *max_leases_per_user,
            quota_backend_bytes: *quota_backend_bytes,
        },
        server: ServerOptions {
            member: MemberInfo { name: name.clone(), client_urls: client_urls.clone() },
            watch: WatchConfig { progress_notify_interval: *watch_progress_notify_interval },
            max_concurrent_streams: *max_concurrent_streams,
            max_connections_per_user: *max_connections_per_user,
        },
        auto_compaction_retention: *auto_compaction_retention,
        persistence: args.wal_config(),
    };
    let store = embedded::spawn(listeners, config, auth, tracker, token).context("starting the embedded store")?;
    Ok(StartedStore { store, client_urls })
}

/// `--auto-tls`: a throw-away CA, server certificate and `root` client certificate in a
/// fresh directory, announced in the log with the etcdctl line that uses them.
fn auto_tls_files(client_cert_auth: bool, endpoint: &str) -> anyhow::Result<TlsFiles> {
    let dir = std::env::temp_dir().join(format!("clustermesh-apiserver-tls-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = pki::Authority::new("clustermesh-apiserver auto-tls CA")?;
    let server =
        ca.server("clustermesh-apiserver.cilium.io", &[pki::CILIUM_SERVER_NAMES, &["127.0.0.1", "::1"]].concat())?;
    let client = ca.client("root")?;
    let files = TlsFiles {
        trusted_ca: pki::write(&dir, "ca.crt", &ca.cert_pem())?,
        cert: pki::write(&dir, "tls.crt", &server.cert_pem)?,
        key: pki::write(&dir, "tls.key", &server.key_pem)?,
        client_cert_auth,
    };
    pki::write(&dir, "root.crt", &client.cert_pem)?;
    pki::write(&dir, "root.key", &client.key_pem)?;
    tracing::info!(
        dir = %dir.display(),
        "auto-tls: try `etcdctl --endpoints={endpoint} --cacert={0}/ca.crt --cert={0}/root.crt --key={0}/root.key get --prefix cilium/`",
        dir.display()
    );
    Ok(files)
}
