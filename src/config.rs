//! Command line: subcommands and flags (etcd's and Cilium's names where they exist),
//! validated into the configuration the app runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Cilium ClusterMesh API server with an embedded etcd-v3-compatible store"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mirror this cluster's Kubernetes state into the store (embedded unless attached).
    Clustermesh(Box<ClustermeshArgs>),
    /// The embedded store alone, as an etcd for this workload (mTLS on 2379).
    Kvstore(Box<KvstoreArgs>),
    /// Connect to every remote cluster of a clustermesh config directory, as an agent does,
    /// and print their status; fails unless all are ready.
    Status(StatusArgs),
    /// Print every change of every remote cluster as one JSON line, until Ctrl-C.
    Watch(MeshArgs),
    /// Two clusters on this machine, mirrored from examples/cluster1 and examples/cluster2,
    /// each seen by the other as a remote agent sees it; until Ctrl-C.
    Demo(DemoArgs),
    /// Certificates for a clustermesh-apiserver.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Copy every remote cluster of --clustermesh-config into the local store (attached with
    /// --kvstore-opt etcd.config=FILE) under cilium/cache/..., for local agents.
    Kvstoremesh(Box<KvstoremeshArgs>),
    /// Inspect a running kvstoremesh through its status API, or troubleshoot its connections.
    KvstoremeshDbg(KvstoremeshDbgArgs),
    /// Troubleshoot the clustermesh role's connection to its etcd.
    #[command(subcommand)]
    ClustermeshDbg(ClustermeshDbgCommand),
    /// Cilium's etcd-init container: empty the data directory and leave Cilium's users and
    /// roles there, authentication enabled, for the store (`/usr/bin/etcd`) to start on.
    Etcdinit(crate::persona::etcdinit::EtcdinitArgs),
    /// Cilium's CoreDNS Job: make CoreDNS serve the MCS-API clusterset domain (idempotent).
    McsapiCorednsCfg(crate::mcsapi_coredns::CorednsArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory holding cluster1/ and cluster2/ manifests.
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
}

/// The local cluster and the remote clusters to follow, as an agent is configured.
#[derive(Debug, Args)]
pub struct MeshArgs {
    /// Directory with one etcd client config per remote cluster, named after it.
    #[arg(long)]
    pub clustermesh_config: PathBuf,
    /// The local cluster's name (remotes with the same name are refused).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// The local cluster's ID (0: unset).
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// How long to wait for every remote cluster to sync.
    #[arg(long, value_parser = humantime_secs, default_value = "10s")]
    pub wait: Duration,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a CA (or reuse one) and the server, admin, remote and local certificates, one
    /// directory per Cilium Secret.
    Generate(CertsGenerateArgs),
}

#[derive(Debug, Args)]
pub struct CertsGenerateArgs {
    #[arg(long)]
    pub cluster_name: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Sign with this CA certificate (with --ca-key) instead of making a new CA.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Namespace of the clustermesh-apiserver Service (a SAN of the server certificate).
    #[arg(long, default_value = "kube-system")]
    pub namespace: String,
    /// `shared` makes the remote certificate's user `remote` (Helm authMode legacy and
    /// migration); `per-cluster` makes it `remote-<cluster>` (authMode cluster).
    #[arg(long, value_enum, default_value = "shared")]
    pub remote_user: crate::certs::RemoteUser,
    #[arg(long, value_delimiter = ',')]
    pub extra_dns_names: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub extra_ip_addresses: Vec<std::net::IpAddr>,
    /// Validity of every certificate, in days (Cilium's default: 1095).
    #[arg(long, default_value_t = 1095)]
    pub validity_days: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Cilium's switch (the chart's `debug.enabled`): debug logging, as `--log-level=debug`.
    #[arg(short = 'D', long, global = true, env = "CILIUM_DEBUG", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub debug: bool,
}

impl Default for LogArgs {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, log_level: "info".to_owned(), debug: false }
    }
}

impl LogArgs {
    /// The tracing filter: `--debug` wins over `--log-level`.
    pub fn filter(&self) -> &str {
        if self.debug { "debug" } else { &self.log_level }
    }
}

/// The embedded store's listener and limits, with etcd's own flag names.
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Comma-separated `https://host:port` URLs to serve the etcd API on.
    #[arg(long, value_delimiter = ',', default_value = "https://127.0.0.1:2379")]
    pub listen_client_urls: Vec<String>,
    /// Comma-separated `http://host:port` URLs serving `/metrics` (etcd's names: `etcd_*`,
    /// `grpc_server_*`) and `/health`. Cilium's chart uses port 9963.
    #[arg(long, value_delimiter = ',')]
    pub listen_metrics_urls: Vec<String>,
    /// Client URLs this member reports in `member list` (default: the listen URLs).
    #[arg(long, value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,
    /// Member name reported in `member list`.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Server certificate (PEM); required for the embedded store unless --auto-tls.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// CA bundle that client certificates must chain to (PEM).
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require and verify client certificates. On by default, unlike etcd: this store is
    /// meant to face other clusters, and the certificate is the only credential.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: bool,
    /// Generate a CA, a server certificate and an admin client certificate at start-up
    /// (into a fresh temporary directory) instead of reading certificate files.
    #[arg(long)]
    pub auto_tls: bool,
    /// How often the certificate files are checked for changes.
    #[arg(long, value_parser = humantime_secs, default_value = "10s")]
    pub tls_reload_interval: Duration,
    /// History to keep: hours as a number (etcd's periodic mode), or a duration like `30m`;
    /// 0 disables automatic compaction. Cilium's chart runs its etcd with 1.
    #[arg(long, value_parser = retention, default_value = "1")]
    pub auto_compaction_retention: Duration,
    /// Largest request accepted, in bytes (etcd's default: 1.5 MiB).
    #[arg(long, default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,
    /// Most operations in each part of a transaction (etcd's default: 128).
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: usize,
    /// Live leases one client identity (certificate Common Name) may hold; a grant beyond is
    /// refused with RESOURCE_EXHAUSTED (etcd: unbounded). Cilium's writers hold one lease per
    /// 1,000 keys.
    #[arg(long, default_value_t = 100_000)]
    pub max_leases_per_user: usize,
    /// Space quota in bytes, etcd's flag: when a write would take the keys and values held
    /// (history until compaction included) to it, the write is refused with etcd's NOSPACE
    /// error and alarm, and writes stay refused until the alarm is disarmed (`etcdctl alarm
    /// disarm`). 0 is etcd's default, 2 GiB; a negative value turns the quota off.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub quota_backend_bytes: i64,
    /// Client connections one certificate user may hold at once; 0: no limit, as etcd (every
    /// agent of a remote cluster connects as the same user, so only the operator knows a bound).
    #[arg(long, default_value_t = 0)]
    pub max_connections_per_user: usize,
    /// HTTP/2 streams (watches, keep-alives, requests in flight) one client connection may
    /// hold open at once (etcd: unbounded).
    #[arg(long, default_value_t = crate::etcd::server::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Interval of progress notifications to watchers that asked for them.
    #[arg(long = "experimental-watch-progress-notify-interval", value_parser = humantime_secs, default_value = "10m")]
    pub watch_progress_notify_interval: Duration,
    /// etcd's `--data-dir`: the store keeps its cluster and member IDs, revision, keys with their
    /// history, leases and compaction point there (a log of every committed write, bounded by
    /// snapshots), and comes back with them after a crash or restart; `kvstore` and
    /// `/usr/bin/etcd` also read users, roles and the auth switch from it (as `etcdinit` left
    /// them) and save every change to them there. Unset: nothing survives a restart.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// etcd's `--initial-cluster-token`: recorded in a new data directory; a directory recorded
    /// for another token is refused (Cilium's chart passes the pod's UID).
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// When the data directory's log is flushed to disk. Every write is in the log file
    /// before it is acknowledged, so a crash of the process loses nothing acknowledged, and a
    /// clean stop syncs it. `never` leaves the rest to the kernel: after a machine restart
    /// that followed an unclean stop the store keeps its data under a new cluster ID anyway
    /// (clients resync). `batch` syncs once a second off the write path (a power loss takes at
    /// most about the last second), `always` before each acknowledgement (etcd's guarantee, at
    /// the cost of a disk flush per write).
    #[arg(long, value_enum, default_value = "never")]
    pub wal_fsync: crate::etcd::wal::FsyncPolicy,
    /// The least log written since the last snapshot that triggers the next one (bytes).
    #[arg(long, default_value_t = crate::etcd::wal::DEFAULT_SNAPSHOT_LOG_BYTES, hide = true)]
    pub wal_snapshot_bytes: u64,
}

#[derive(Debug, Args)]
pub struct KvstoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Start with Cilium's users and roles for this cluster (root, admin-<name>,
    /// local-<name>, remote) and auth enabled, as Cilium's etcdinit leaves its etcd.
    /// Without it the store starts with auth disabled, as a fresh etcd does. A data
    /// directory that holds users and roles wins over this.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Let the `remote` role also read the KVStoreMesh cache (`cilium/cache/`,
    /// `cilium/cluster-config/`, `cilium/synced/`), as Cilium 1.16 did: its agents read the
    /// local cache with the remote certificate. Set by `/usr/bin/etcd` when started by the
    /// 1.16/1.17 chart (whose etcd container has `HOSTNAME_IP`); off otherwise, as in Cilium
    /// 1.17+, where remote clusters must not read what this cluster cached of others.
    #[arg(long, hide = true)]
    pub remote_reads_agent_cache: bool,
}

/// Which store the mirror writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvstoreKind {
    /// The store inside this process, served on --listen-client-urls.
    Embedded,
    /// A real etcd, configured by `--kvstore-opt etcd.config=FILE`.
    Etcd,
}

/// Cilium's `--k8s-client-qps` default, used when only the burst is given.
const CILIUM_K8S_CLIENT_QPS: f64 = 10.0;

/// client-go's token bucket: `burst` requests at once, `qps` per second on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KubeRate {
    pub qps: f64,
    pub burst: u32,
}

/// `clustermesh-apiserver clustermesh`, with Cilium's flag names.
#[derive(Debug, Args)]
pub struct ClustermeshArgs {
    /// This cluster's name: at most 32 characters, lowercase alphanumerics and '-', starting
    /// and ending with an alphanumeric.
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// This cluster's ID, 1..=--max-connected-clusters.
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    /// 255 or 511 (511 halves the cluster-local identity space).
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
    /// Also export MCS-API ServiceExports.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub clustermesh_enable_mcs_api: bool,
    /// Read CiliumEndpointSlices instead of CiliumEndpoints.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_cilium_endpoint_slice: bool,
    /// Whether namespaces without the `clustermesh.cilium.io/global` annotation are global.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub clustermesh_default_global_namespace: bool,
    /// Which service shapes to export: prefer-legacy (services/v1 and endpointslices/v1),
    /// prefer-endpointslice, or only-endpointslice (no services/v1).
    #[arg(long, default_value = "prefer-legacy")]
    pub clustermesh_service_v2: crate::translate::ServiceV2Mode,
    /// The store to write to. Unset: `etcd` when `--kvstore-opt etcd.config=FILE` is given
    /// (Cilium's pod, where the store is the `etcd` container), else `embedded`.
    #[arg(long, value_enum)]
    pub kvstore: Option<KvstoreKind>,
    /// `key=value` options of the store, repeatable, merged (a later key wins): `etcd.config`
    /// (the client file), `etcd.qps`, `etcd.bootstrapQps`, `etcd.maxInflight` and the other
    /// options of Cilium's etcd module.
    #[arg(long, value_delimiter = ',')]
    pub kvstore_opt: Vec<String>,
    /// TTL of the lease every written key is attached to.
    #[arg(long, value_parser = humantime_secs, default_value = "15m")]
    pub kvstore_lease_ttl: Duration,
    /// Keep one etcd user per remote cluster as listed in --cluster-users-config-path
    /// (Helm `tls.authMode` migration and cluster).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub cluster_users_enabled: bool,
    /// YAML file listing those users (`users: [{name: remote-<peer>, role: remote}]`); changes
    /// are picked up while running.
    #[arg(long, default_value = crate::users::DEFAULT_CONFIG_PATH)]
    pub cluster_users_config_path: PathBuf,
    /// Kubeconfig to reach the Kubernetes API (default: in-cluster, then ~/.kube/config).
    #[arg(long)]
    pub k8s_kubeconfig_path: Option<PathBuf>,
    /// The Kubernetes API server's URL, over the kubeconfig's or the in-cluster one.
    #[arg(long)]
    pub k8s_api_server: Option<String>,
    /// Cilium's list form of --k8s-api-server; the first URL is used.
    #[arg(long, value_delimiter = ',')]
    pub k8s_api_server_urls: Vec<String>,
    /// Requests per second to the Kubernetes API server, on average (client-go's rate limit,
    /// with --k8s-client-burst). Neither set: no limit (Cilium: 10 and 20); the watchers list
    /// with `resourceVersion=0`, which the API server answers from its cache, then watch.
    #[arg(long)]
    pub k8s_client_qps: Option<f64>,
    /// Requests the Kubernetes client may send at once (default: twice --k8s-client-qps).
    #[arg(long)]
    pub k8s_client_burst: Option<u32>,
    /// Read only the Services labelled `service.kubernetes.io/service-proxy-name` with this
    /// value; empty: the Services without that label (Cilium's flag and default).
    #[arg(long, default_value = "")]
    pub k8s_service_proxy_name: String,
    /// Read objects from this directory of YAML/JSON manifests instead of the Kubernetes API.
    #[arg(long, conflicts_with = "k8s_kubeconfig_path")]
    pub k8s_objects_dir: Option<PathBuf>,
    /// Port of /healthz and /readyz.
    #[arg(long, default_value_t = 9880)]
    pub health_port: u16,
    /// Address the health port listens on (all interfaces by default, for kubelet probes).
    #[arg(long, default_value = "0.0.0.0")]
    pub health_bind_address: std::net::IpAddr,
    /// Address of /metrics (`cilium_clustermesh_apiserver_*`); empty turns it off.
    #[arg(long, default_value = ":9962")]
    pub prometheus_serve_addr: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// With --clustermesh-config, the kvstoremesh role runs in this process too, on the same
    /// store, with its own health, metrics and status API listeners.
    #[command(flatten)]
    pub kvstoremesh: KvstoremeshRoleArgs,
    #[command(flatten)]
    pub kvstoremesh_listeners: KvstoremeshListenerArgs,
    #[command(flatten)]
    pub cilium: CiliumCompatArgs,
}

/// Flags of Cilium's `clustermesh` and `kvstoremesh` commands (their cmdref, 1.16 to 1.20)
/// that change nothing here: Go runtime endpoints (gops, pprof, the hive shell), log drivers,
/// controller groups, Kubernetes client tuning this server does not apply yet. Accepted, so
/// that Cilium's command lines and users' `extraArgs` run unchanged, and named once in the log
/// when set.
#[derive(Debug, Args, Clone, Default)]
pub struct CiliumCompatArgs {
    /// Cilium's controller-group metrics selection; this server has no controller groups.
    #[arg(long, value_delimiter = ',')]
    pub controller_group_metrics: Vec<String>,
    /// Cilium 1.16's external workloads (VMs joining the mesh); not supported: `true` is
    /// refused at start-up rather than silently doing nothing.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_external_workloads: bool,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_gops: Option<bool>,
    #[arg(long, hide = true)]
    pub gops_port: Option<u16>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub pprof: Option<bool>,
    #[arg(long, hide = true)]
    pub pprof_address: Option<String>,
    #[arg(long, hide = true)]
    pub pprof_port: Option<u16>,
    #[arg(long, hide = true)]
    pub pprof_block_profile_rate: Option<i64>,
    #[arg(long, hide = true)]
    pub pprof_mutex_profile_fraction: Option<i64>,
    #[arg(long, hide = true)]
    pub shell_sock_path: Option<String>,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub log_driver: Vec<String>,
    #[arg(long, hide = true, value_delimiter = ',')]
    pub log_opt: Vec<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_k8s: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_k8s_api_discovery: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_k8s_endpoint_slice: Option<bool>,
    #[arg(long, hide = true)]
    pub crd_wait_timeout: Option<String>,
    #[arg(long, hide = true)]
    pub k8s_client_connection_keep_alive: Option<String>,
    #[arg(long, hide = true)]
    pub k8s_client_connection_timeout: Option<String>,
    #[arg(long, hide = true)]
    pub k8s_heartbeat_timeout: Option<String>,
    #[arg(long, hide = true)]
    pub kvstore_connectivity_timeout: Option<String>,
    /// Failed etcd quorum checks in a row after which an attached store counts as unreachable
    /// and /readyz answers 503 until a check passes (Cilium's default: 2).
    #[arg(long)]
    pub kvstore_max_consecutive_quorum_errors: Option<u64>,
    #[arg(long, hide = true)]
    pub kvstore_periodic_sync: Option<String>,
}

impl CiliumCompatArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enable_external_workloads {
            return Err(ConfigError::ExternalWorkloads);
        }
        Ok(())
    }

    /// The flags given that change nothing here, for one log line at start-up.
    pub fn ignored(&self) -> Option<String> {
        let set = [
            ("controller-group-metrics", !self.controller_group_metrics.is_empty()),
            ("enable-gops", self.enable_gops.is_some()),
            ("gops-port", self.gops_port.is_some()),
            ("pprof", self.pprof.is_some()),
            ("pprof-address", self.pprof_address.is_some()),
            ("pprof-port", self.pprof_port.is_some()),
            ("pprof-block-profile-rate", self.pprof_block_profile_rate.is_some()),
            ("pprof-mutex-profile-fraction", self.pprof_mutex_profile_fraction.is_some()),
            ("shell-sock-path", self.shell_sock_path.is_some()),
            ("log-driver", !self.log_driver.is_empty()),
            ("log-opt", !self.log_opt.is_empty()),
            ("enable-k8s", self.enable_k8s.is_some()),
            ("enable-k8s-api-discovery", self.enable_k8s_api_discovery.is_some()),
            ("enable-k8s-endpoint-slice", self.enable_k8s_endpoint_slice.is_some()),
            ("crd-wait-timeout", self.crd_wait_timeout.is_some()),
            ("k8s-client-connection-keep-alive", self.k8s_client_connection_keep_alive.is_some()),
            ("k8s-client-connection-timeout", self.k8s_client_connection_timeout.is_some()),
            ("k8s-heartbeat-timeout", self.k8s_heartbeat_timeout.is_some()),
            ("kvstore-connectivity-timeout", self.kvstore_connectivity_timeout.is_some()),
            ("kvstore-periodic-sync", self.kvstore_periodic_sync.is_some()),
        ];
        let names: Vec<&str> = set.iter().filter(|(_, given)| *given).map(|(name, _)| *name).collect();
        (!names.is_empty()).then(|| format!("Cilium flags without effect here, ignored: {}", names.join(", ")))
    }
}

impl ClustermeshArgs {
    /// `--k8s-client-qps` and `--k8s-client-burst`, when either is given.
    pub fn k8s_client_rate(&self) -> Option<KubeRate> {
        if self.k8s_client_qps.is_none() && self.k8s_client_burst.is_none() {
            return None;
        }
        let qps = self.k8s_client_qps.unwrap_or(CILIUM_K8S_CLIENT_QPS);
        let burst = self.k8s_client_burst.unwrap_or((qps * 2.0).ceil() as u32);
        Some(KubeRate { qps, burst })
    }

    /// `--k8s-api-server`, else the first of `--k8s-api-server-urls`.
    pub fn k8s_api_server(&self) -> Option<&str> {
        self.k8s_api_server
            .as_deref()
            .or(self.k8s_api_server_urls.first().map(String::as_str))
            .filter(|u| !u.is_empty())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_local_cluster(&self.cluster_name, self.cluster_id, self.max_connected_clusters)?;
        self.cilium.validate()?;
        if let Some(KubeRate { qps, burst }) = self.k8s_client_rate()
            && !(qps.is_finite() && qps > 0.0 && burst >= 1)
        {
            return Err(ConfigError::K8sClientRate { qps, burst });
        }
        let options = KvstoreOptions::parse(&self.kvstore_opt)?;
        if self.kvstore_kind() == KvstoreKind::Etcd && options.etcd_config.is_none() {
            return Err(ConfigError::NoEtcdConfig);
        }
        if self.kvstore_kind() == KvstoreKind::Embedded {
            self.store.validate()?;
        }
        Ok(())
    }

    /// `--kvstore`, or what Cilium's pod means by leaving it unset.
    pub fn kvstore_kind(&self) -> KvstoreKind {
        self.kvstore.unwrap_or(if self.etcd_config().is_some() { KvstoreKind::Etcd } else { KvstoreKind::Embedded })
    }

    /// `--kvstore-opt etcd.config=FILE`.
    pub fn etcd_config(&self) -> Option<PathBuf> {
        KvstoreOptions::parse(&self.kvstore_opt).ok().and_then(|o| o.etcd_config)
    }

    pub fn kvstore_options(&self) -> Result<KvstoreOptions, ConfigError> {
        KvstoreOptions::parse(&self.kvstore_opt)
    }

    /// `:9962` → all interfaces; empty → off.
    pub fn prometheus_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        serve_addr(&self.prometheus_serve_addr)
    }
}

/// The local cluster's identity, checked as Cilium checks it at start-up.
fn validate_local_cluster(name: &str, id: u32, max_connected_clusters: u32) -> Result<(), ConfigError> {
    validate_cluster_name(name)?;
    if !matches!(max_connected_clusters, 255 | 511) {
        return Err(ConfigError::MaxConnectedClusters(max_connected_clusters));
    }
    if id == 0 || id > max_connected_clusters {
        return Err(ConfigError::ClusterId { id, max: max_connected_clusters });
    }
    Ok(())
}

/// `--kvstore-opt`, merged as Cilium's `stringToString` flag merges repeated uses: a later
/// key wins. Unknown keys are refused, as Cilium's etcd module refuses them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvstoreOptions {
    /// `etcd.config`: the etcd client file.
    pub etcd_config: Option<PathBuf>,
    /// `etcd.qps`: steady-state requests per second to the store.
    pub qps: Option<f64>,
    /// `etcd.bootstrapQps`: requests per second until the first synchronisation is done.
    pub bootstrap_qps: Option<f64>,
    /// `etcd.maxInflight`: requests in flight at once.
    pub max_inflight: Option<usize>,
}

/// The keys of Cilium's etcd module (`pkg/kvstore/etcd.go`), all accepted; those not in
/// [`KvstoreOptions`] change nothing here.
const ETCD_OPTIONS: &[&str] = &[
    "etcd.address",
    "etcd.config",
    "etcd.qps",
    "etcd.bootstrapQps",
    "etcd.maxInflight",
    "etcd.listLimit",
    "etcd.leaseTTL",
    "etcd.keepaliveHeartbeat",
    "etcd.keepaliveTimeout",
];

impl KvstoreOptions {
    pub fn parse(options: &[String]) -> Result<Self, ConfigError> {
        let mut parsed = Self::default();
        for option in options.iter().filter(|o| !o.trim().is_empty()) {
            let (key, value) =
                option.split_once('=').ok_or_else(|| ConfigError::KvstoreOpt(option.clone(), "expected key=value"))?;
            let bad = |why| ConfigError::KvstoreOpt(option.clone(), why);
            match key {
                "etcd.config" => parsed.etcd_config = Some(PathBuf::from(value)),
                "etcd.qps" => {
                    parsed.qps = Some(value.parse().ok().filter(|q: &f64| *q > 0.0).ok_or(bad("a positive number"))?)
                }
                "etcd.bootstrapQps" => {
                    parsed.bootstrap_qps =
                        Some(value.parse().ok().filter(|q: &f64| *q > 0.0).ok_or(bad("a positive number"))?)
                }
                "etcd.maxInflight" => {
                    parsed.max_inflight =
                        Some(value.parse().ok().filter(|n: &usize| *n > 0).ok_or(bad("a positive integer"))?)
                }
                key if ETCD_OPTIONS.contains(&key) => {}
                _ => return Err(bad("unknown option")),
            }
        }
        Ok(parsed)
    }
}

/// Cilium's `--prometheus-serve-addr` spelling: `:9962` → all interfaces; empty → off.
pub fn serve_addr(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let full = if text.starts_with(':') { format!("0.0.0.0{text}") } else { text.to_owned() };
    full.parse().map(Some).map_err(|_| ConfigError::BadAddr(text.to_owned()))
}

/// The kvstoremesh role's own settings (Cilium's flag names), shared by the `kvstoremesh`
/// command and `clustermesh --clustermesh-config`.
#[derive(Debug, Args, Clone)]
pub struct KvstoremeshRoleArgs {
    /// Directory with one etcd client config per remote cluster, named after it (Helm mounts
    /// the cilium-kvstoremesh Secret at /var/lib/cilium/clustermesh).
    #[arg(long)]
    pub clustermesh_config: Option<PathBuf>,
    /// Remote clusters that cannot connect within this are not waited for by /readyz.
    #[arg(long, value_parser = humantime_secs, default_value = "15s")]
    pub per_cluster_ready_timeout: Duration,
    /// /readyz turns ready after this even if some remote clusters are not synchronized.
    #[arg(long, value_parser = humantime_secs, default_value = "10m")]
    pub global_ready_timeout: Duration,
    /// Revoke the cached services of a remote cluster disconnected for longer than this;
    /// 0s never revokes.
    #[arg(long, value_parser = humantime_secs, default_value = "0s")]
    pub clustermesh_cache_ttl: Duration,
    /// Keep the cached data of a removed remote cluster (it expires with the lease).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub disable_drain_on_disconnection: bool,
    /// Between deleting a removed cluster's config and deleting its cached data, so agents
    /// can disconnect first (Cilium hard-codes 3 minutes; this flag is ours).
    #[arg(long, value_parser = humantime_secs, default_value = "3m")]
    pub kvstoremesh_drain_grace_period: Duration,
}

/// The listeners of the kvstoremesh role inside `clustermesh` (the ports of Cilium's
/// kvstoremesh container, so probes and scrapers written for it keep working).
#[derive(Debug, Args, Clone)]
pub struct KvstoremeshListenerArgs {
    /// Port of the kvstoremesh role's /healthz and /readyz.
    #[arg(long, default_value_t = 9881)]
    pub kvstoremesh_health_port: u16,
    /// Address of the kvstoremesh role's /metrics (`cilium_kvstoremesh_*`); empty turns it off.
    #[arg(long, default_value = ":9964")]
    pub kvstoremesh_prometheus_serve_addr: String,
    /// Address of the kvstoremesh status API (`GET /v1/cluster`); empty turns it off.
    #[arg(long, default_value = "localhost:9889")]
    pub kvstoremesh_api_serve_addr: String,
}

/// Which store kvstoremesh writes to: only an attached etcd-compatible one (the local
/// clustermesh-apiserver's store), as in Cilium's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvstoremeshBackend {
    Etcd,
}

/// `clustermesh-apiserver kvstoremesh`, with Cilium's flag names.
#[derive(Debug, Args)]
pub struct KvstoremeshArgs {
    /// This cluster's name (a remote config file with this name is ignored).
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    /// This cluster's ID, 1..=--max-connected-clusters.
    #[arg(long, default_value_t = 0)]
    pub cluster_id: u32,
    /// 255 or 511; remote clusters must agree unless 255.
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
    /// The local store's kind.
    #[arg(long, value_enum, default_value_t = KvstoremeshBackend::Etcd)]
    pub kvstore: KvstoremeshBackend,
    /// `key=value` options of the local store, repeatable, merged: `etcd.config=FILE` is
    /// required; `etcd.maxInflight` bounds the cache writes in flight.
    #[arg(long, value_delimiter = ',')]
    pub kvstore_opt: Vec<String>,
    /// TTL of the lease every cached key is written with.
    #[arg(long, value_parser = humantime_secs, default_value = "15m")]
    pub kvstore_lease_ttl: Duration,
    #[command(flatten)]
    pub role: KvstoremeshRoleArgs,
    /// Also keep cilium/.heartbeat fresh in the local store (for a store no clustermesh role
    /// writes to).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_heartbeat: bool,
    /// Port of /healthz and /readyz (Cilium's chart: 9881).
    #[arg(long, default_value_t = 9881)]
    pub health_port: u16,
    /// Address the health port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub health_bind_address: std::net::IpAddr,
    /// Address of /metrics (`cilium_kvstoremesh_*`); empty turns it off.
    #[arg(long, default_value = ":9964")]
    pub prometheus_serve_addr: String,
    /// Address of the status API read by `kvstoremesh-dbg` (`GET /v1/cluster`); empty turns it off.
    #[arg(long, default_value = "localhost:9889")]
    pub api_serve_addr: String,
    #[command(flatten)]
    pub cilium: CiliumCompatArgs,
}

impl KvstoremeshArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_local_cluster(&self.cluster_name, self.cluster_id, self.max_connected_clusters)?;
        self.cilium.validate()?;
        if KvstoreOptions::parse(&self.kvstore_opt)?.etcd_config.is_none() {
            return Err(ConfigError::NoEtcdConfig);
        }
        if self.role.clustermesh_config.is_none() {
            return Err(ConfigError::NoClustermeshConfig);
        }
        serve_addr(&self.prometheus_serve_addr)?;
        Ok(())
    }

    /// `--kvstore-opt etcd.config=FILE`.
    pub fn etcd_config(&self) -> Option<PathBuf> {
        KvstoreOptions::parse(&self.kvstore_opt).ok().and_then(|o| o.etcd_config)
    }

    pub fn kvstore_options(&self) -> Result<KvstoreOptions, ConfigError> {
        KvstoreOptions::parse(&self.kvstore_opt)
    }
}

#[derive(Debug, Args)]
pub struct KvstoremeshDbgArgs {
    /// The kvstoremesh status API.
    #[arg(short = 'H', long, global = true, default_value = "localhost:9889")]
    pub host: String,
    #[command(subcommand)]
    pub command: KvstoremeshDbgCommand,
}

#[derive(Debug, Subcommand)]
pub enum KvstoremeshDbgCommand {
    /// Display status of remote clusters.
    Status(KvstoremeshDbgStatusArgs),
    /// Troubleshoot connectivity towards the remote clusters (and the local etcd).
    Troubleshoot(KvstoremeshTroubleshootArgs),
}

/// Cilium's default path of the local etcd client file (baked into the image).
const DEFAULT_ETCD_CONFIG: &str = "/var/lib/cilium/etcd-config.yaml";

#[derive(Debug, Args)]
pub struct KvstoremeshTroubleshootArgs {
    /// Only these remote clusters (default: every one configured).
    pub clusters: Vec<String>,
    /// The ClusterMesh configuration directory.
    #[arg(long, default_value = "/var/lib/cilium/clustermesh/")]
    pub clustermesh_config: PathBuf,
    /// The local etcd client file.
    #[arg(long, default_value = DEFAULT_ETCD_CONFIG)]
    pub etcd_config: PathBuf,
    /// Also troubleshoot the local etcd.
    #[arg(long)]
    pub include_local: bool,
    /// Bound on each check.
    #[arg(long, value_parser = humantime_secs, default_value = "5s")]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum ClustermeshDbgCommand {
    /// Troubleshoot connectivity towards the local etcd.
    Troubleshoot(ClustermeshTroubleshootArgs),
}

#[derive(Debug, Args)]
pub struct ClustermeshTroubleshootArgs {
    /// The local etcd client file.
    #[arg(long, default_value = DEFAULT_ETCD_CONFIG)]
    pub etcd_config: PathBuf,
    /// Bound on each check.
    #[arg(long, value_parser = humantime_secs, default_value = "5s")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct KvstoremeshDbgStatusArgs {
    /// Output verbose status information for ready clusters as well.
    #[arg(long)]
    pub verbose: bool,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Cilium's rule (enforced since 1.17): the name becomes part of keys, DNS names and
/// certificate names.
pub fn validate_cluster_name(name: &str) -> Result<(), ConfigError> {
    clustermesh_client::ClusterName::new(name).map(drop).map_err(|_| ConfigError::ClusterName(name.to_owned()))
}

/// A listen URL reduced to what we bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenUrl {
    pub url: String,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("listen URL {url:?}: expected a {scheme} URL")]
    WrongScheme { url: String, scheme: &'static str },
    #[error("listen URL {url:?}: expected SCHEME://IP:PORT")]
    BadAddress {
        url: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("--max-request-bytes must be at least 1 KiB, got {0}")]
    TinyRequestLimit(usize),
    #[error("--k8s-client-qps must be a positive number and --k8s-client-burst at least 1, got {qps} and {burst}")]
    K8sClientRate { qps: f64, burst: u32 },
    #[error("--listen-client-urls names no URL")]
    NoListenUrl,
    #[error("--max-txn-ops must be at least 1")]
    NoTxnOps,
    #[error("the embedded store needs --cert-file, --key-file and --trusted-ca-file (or --auto-tls)")]
    NoTlsFiles,
    #[error(
        "invalid --cluster-name {0:?}: at most 32 characters, lowercase alphanumerics and '-', starting and ending with an alphanumeric"
    )]
    ClusterName(String),
    #[error("invalid --cluster-id {id}: must be between 1 and {max} (--max-connected-clusters)")]
    ClusterId { id: u32, max: u32 },
    #[error("invalid --max-connected-clusters {0}: must be 255 or 511")]
    MaxConnectedClusters(u32),
    #[error("--kvstore etcd needs --kvstore-opt etcd.config=FILE")]
    NoEtcdConfig,
    #[error("--clustermesh-config DIR is required")]
    NoClustermeshConfig,
    #[error("invalid address {0:?}")]
    BadAddr(String),
    #[error("--kvstore-opt {0:?}: {1}")]
    KvstoreOpt(String, &'static str),
    #[error("--enable-external-workloads: external workloads are not supported by this server")]
    ExternalWorkloads,
}

impl StoreArgs {
    /// Every flag at its default.
    pub fn etcd_defaults() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            store: StoreArgs,
        }
        Defaults::parse_from(["defaults"]).store
    }

    pub fn listen_urls(&self) -> Result<Vec<ListenUrl>, ConfigError> {
        self.listen_client_urls.iter().map(|url| parse_listen_url(url, "https://")).collect()
    }

    pub fn metrics_urls(&self) -> Result<Vec<ListenUrl>, ConfigError> {
        self.listen_metrics_urls.iter().map(|url| parse_listen_url(url, "http://")).collect()
    }

    /// Where and how the store persists itself, with `--data-dir`.
    pub fn wal_config(&self) -> Option<crate::etcd::wal::WalConfig> {
        let dir = self.data_dir.as_ref()?;
        let mut config = crate::etcd::wal::WalConfig::new(dir, &self.initial_cluster_token);
        config.fsync = self.wal_fsync;
        config.snapshot_log_bytes = self.wal_snapshot_bytes;
        Some(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen_urls()?.is_empty() {
            return Err(ConfigError::NoListenUrl);
        }
        self.metrics_urls()?;
        let files = [&self.cert_file, &self.key_file, &self.trusted_ca_file];
        if !self.auto_tls && files.iter().any(|f| f.is_none()) {
            return Err(ConfigError::NoTlsFiles);
        }
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::TinyRequestLimit(self.max_request_bytes));
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::NoTxnOps);
        }
        Ok(())
    }
}

/// `https://127.0.0.1:2379`, `https://[::1]:2379`; Cilium's chart brackets IPv4 too
/// (`https://[10.0.0.1]:2379`), so brackets around an IPv4 address are accepted.
fn parse_listen_url(url: &str, scheme: &'static str) -> Result<ListenUrl, ConfigError> {
    let rest = url.strip_prefix(scheme).ok_or_else(|| ConfigError::WrongScheme { url: url.to_owned(), scheme })?;
    let hostport = rest.trim_end_matches('/');
    let addr = hostport.parse::<SocketAddr>().or_else(|error| {
        let unbracketed = hostport.strip_prefix('[').and_then(|h| h.split_once("]:")).map(|(h, p)| format!("{h}:{p}"));
        unbracketed.and_then(|h| h.parse().ok()).ok_or(ConfigError::BadAddress { url: url.to_owned(), source: error })
    })?;
    Ok(ListenUrl { url: url.to_owned(), addr })
}

pub(crate) fn humantime_secs(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration like 10s, 5m or 1h"))
}

fn retention(text: &str) -> Result<Duration, String> {
    if let Ok(hours) = text.parse::<u64>() {
        return Ok(Duration::from_secs(hours * 3600));
    }
    humantime_secs(text)
}

/// Durations as Go and etcd print them: a number and one unit of ms, s, m or h.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number * 60)),
        "h" => Some(Duration::from_secs(number * 3600)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls_accept_ciliums_bracketed_ipv4_and_plain_ipv6() {
        let https = |url| parse_listen_url(url, "https://");
        assert_eq!(https("https://[10.0.0.1]:2379").unwrap().addr, "10.0.0.1:2379".parse().unwrap());
        assert_eq!(https("https://[::1]:2379").unwrap().addr, "[::1]:2379".parse().unwrap());
        assert!(matches!(https("http://127.0.0.1:2379"), Err(ConfigError::WrongScheme { .. })));
    }

    #[test]
    fn cluster_names_follow_ciliums_rule() {
        for good in ["default", "cluster1", "a", "my-cluster-2", &"a".repeat(32)] {
            assert!(validate_cluster_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "Cluster", "a_b", &"a".repeat(33)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cluster_id_must_fit_the_mesh_size() {
        let parse = |extra: &[&str]| {
            let args = [&["clustermesh-apiserver", "clustermesh", "--cluster-name=c1"], extra].concat();
            let Command::Clustermesh(args) = Cli::try_parse_from(args).expect("parses").command else {
                panic!("clustermesh command")
            };
            args.validate()
        };
        assert!(matches!(parse(&["--cluster-id=0", "--auto-tls"]), Err(ConfigError::ClusterId { .. })));
        assert!(matches!(parse(&["--cluster-id=256", "--auto-tls"]), Err(ConfigError::ClusterId { .. })));
        assert!(parse(&["--cluster-id=256", "--max-connected-clusters=511", "--auto-tls"]).is_ok());
        assert!(matches!(parse(&["--cluster-id=3", "--kvstore=etcd"]), Err(ConfigError::NoEtcdConfig)));
    }

    #[test]
    fn repeated_kvstore_opts_merge_and_name_the_store_as_ciliums_pod_does() {
        let parse = |args: &[&str]| {
            let args =
                [&["clustermesh-apiserver", "clustermesh", "--cluster-name=c1", "--cluster-id=1"], args].concat();
            let Command::Clustermesh(args) = Cli::try_parse_from(args).expect("parses").command else {
                panic!("clustermesh command")
            };
            args
        };
        let chart = parse(&[
            "--kvstore-opt=etcd.config=/var/lib/cilium/etcd-config.yaml",
            "--kvstore-opt=etcd.qps=20",
            "--kvstore-opt=etcd.bootstrapQps=10000",
            // The 1.15 chart's spelling: flag and value as two words; a later key wins.
            "--kvstore-opt",
            "etcd.qps=50,etcd.maxInflight=10",
            "--controller-group-metrics=all",
            "--enable-external-workloads=false",
            "--k8s-client-qps=30",
        ]);
        let options = chart.kvstore_options().unwrap();
        assert_eq!(options.etcd_config.as_deref(), Some(std::path::Path::new("/var/lib/cilium/etcd-config.yaml")));
        assert_eq!((options.qps, options.bootstrap_qps, options.max_inflight), (Some(50.0), Some(10000.0), Some(10)));
        assert_eq!(chart.kvstore_kind(), KvstoreKind::Etcd, "an etcd client file means the etcd container");
        assert!(chart.validate().is_ok());
        assert!(chart.cilium.ignored().unwrap().contains("controller-group-metrics"));
        assert_eq!(
            chart.k8s_client_rate(),
            Some(KubeRate { qps: 30.0, burst: 60 }),
            "client-go's burst: twice the QPS"
        );

        assert_eq!(parse(&["--auto-tls"]).kvstore_kind(), KvstoreKind::Embedded);
        assert!(matches!(parse(&["--kvstore-opt=etcd.bogus=1"]).validate(), Err(ConfigError::KvstoreOpt(..))));
        assert!(matches!(
            parse(&["--auto-tls", "--enable-external-workloads"]).validate(),
            Err(ConfigError::ExternalWorkloads)
        ));
    }

    #[test]
    fn compaction_retention_is_hours_when_a_bare_number_as_in_etcd() {
        assert_eq!(retention("1").unwrap(), Duration::from_secs(3600));
        assert_eq!(retention("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(retention("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn the_kvstore_command_parses_etcds_flag_spelling() {
        let cli = Cli::try_parse_from([
            "clustermesh-apiserver",
            "kvstore",
            "--listen-client-urls=https://127.0.0.1:2379,https://[::1]:2379",
            "--cert-file=s.pem",
            "--key-file=k.pem",
            "--trusted-ca-file=ca.pem",
            "--client-cert-auth",
            "--max-txn-ops=64",
        ])
        .expect("parses");
        let Command::Kvstore(args) = cli.command else { panic!("kvstore command") };
        assert_eq!(args.store.listen_urls().unwrap().len(), 2);
        assert!(args.store.client_cert_auth);
        assert_eq!(args.store.max_txn_ops, 64);
    }
}
