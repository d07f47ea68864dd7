//! The etcd connection to one remote cluster: mutual TLS through `etcd-client`, every request
//! bounded, every response header checked against the etcd cluster ID first seen on the
//! connection (Cilium's cluster-ID lock, `pkg/clustermesh/common/interceptor.go`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, GetResponse, Identity, ResponseHeader, SortOrder, SortTarget,
    TlsOptions, WatchOptions, WatchStream,
};

use crate::config::{self, EtcdConfig};
use crate::options::ClientOptions;

/// Why the connection failed or must be re-made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("read {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported etcd client configuration: {0}")]
    Unsupported(String),
    #[error("create the etcd client: {0}")]
    Client(#[source] etcd_client::Error),
    #[error("{what}: {source}")]
    Rpc {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{0}: timed out")]
    Timeout(String),
    /// Another etcd answered on the same connection (e.g. a restarted server or a load
    /// balancer switching replicas): everything read so far may be stale.
    #[error("etcd cluster ID changed from {locked:x} to {got:x}")]
    ClusterIdChanged { locked: u64, got: u64 },
    #[error("etcd response without a header")]
    MissingHeader,
}

impl Error {
    /// The store compacted the revision a request asked for: relist from scratch.
    pub(crate) fn is_compacted(&self) -> bool {
        match self {
            Error::Rpc { source: etcd_client::Error::GRpcStatus(status), .. } => {
                status.message().contains("required revision has been compacted")
            }
            _ => false,
        }
    }

    /// Errors that end the session: reconnecting is the only way out.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, Error::ClusterIdChanged { .. } | Error::MissingHeader)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Records the etcd cluster ID of the first response; any other ID later is an error.
#[derive(Debug, Default)]
pub(crate) struct ClusterIdLock(AtomicU64);

impl ClusterIdLock {
    pub(crate) fn check(&self, header: Option<&ResponseHeader>) -> Result<()> {
        let got = header.ok_or(Error::MissingHeader)?.cluster_id();
        match self.0.compare_exchange(0, got, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(locked) if locked == got => Ok(()),
            Err(locked) => Err(Error::ClusterIdChanged { locked, got }),
        }
    }

    /// The locked ID, if any response was seen yet.
    pub(crate) fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|id| *id != 0)
    }
}

/// One connection: the client, its cluster-ID lock and the options bounding each request.
#[derive(Clone)]
pub(crate) struct Connection {
    client: Client,
    lock: Arc<ClusterIdLock>,
    pub(crate) options: Arc<ClientOptions>,
}

/// A page of a range read: the response header's revision, the key-values and whether more
/// follow.
pub(crate) struct Page {
    pub(crate) revision: i64,
    pub(crate) kvs: Vec<etcd_client::KeyValue>,
    pub(crate) more: bool,
}

impl Connection {
    /// Builds the client from `config`. `etcd-client` dials lazily, so this only fails on bad
    /// configuration; an unreachable server shows up on the first request.
    pub(crate) async fn open(config: &EtcdConfig, options: Arc<ClientOptions>) -> Result<Self> {
        let dial = Dial {
            dial_timeout: options.dial_timeout,
            keep_alive: options.keep_alive,
            request_timeout: None,
            // Cilium opens its watches with `WithRequireLeader` (`hasleader: true`).
            require_leader: true,
        };
        let client = dial_client(config, &dial).await?;
        Ok(Self { client, lock: Arc::default(), options })
    }

    /// The etcd cluster ID this connection is locked to, once known.
    pub(crate) fn etcd_cluster_id(&self) -> Option<u64> {
        self.lock.get()
    }

    pub(crate) fn check_header(&self, header: Option<&ResponseHeader>) -> Result<()> {
        self.lock.check(header)
    }

    async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.options.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::Rpc { what: what(), source }),
            Err(_) => Err(Error::Timeout(what())),
        }
    }

    /// Reads one key (serializable, like every read of Cilium's remote clients).
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let options = GetOptions::new().with_serializable();
        let response: GetResponse =
            self.bounded(|| format!("get {key}"), self.client.kv_client().get(key, Some(options))).await?;
        self.check_header(response.header())?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// One page of `[start, end)` in key order, at `revision` (0: the latest).
    pub(crate) async fn range_page(&self, start: &[u8], end: &[u8], revision: i64) -> Result<Page> {
        let options = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(i64::from(self.options.list_page_size))
            .with_revision(revision)
            .with_sort(SortTarget::Key, SortOrder::Ascend)
            .with_serializable();
        let what = || format!("list {} at revision {revision}", String::from_utf8_lossy(start));
        let mut response: GetResponse =
            self.bounded(what, self.client.kv_client().get(start.to_vec(), Some(options))).await?;
        self.check_header(response.header())?;
        let revision = response.header().map(ResponseHeader::revision).unwrap_or_default();
        let more = response.more();
        Ok(Page { revision, kvs: response.take_kvs(), more })
    }

    /// Opens a watch of `[start, end)` from `start_revision`.
    pub(crate) async fn watch(&self, start: &[u8], end: &[u8], start_revision: i64) -> Result<WatchStream> {
        let options = WatchOptions::new().with_range(end.to_vec()).with_start_revision(start_revision);
        let what = || format!("watch {} from revision {start_revision}", String::from_utf8_lossy(start));
        self.bounded(what, self.client.watch_client().watch(start.to_vec(), Some(options))).await
    }
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    tokio::fs::read(path).await.map_err(|source| Error::TlsFile { path: path.into(), source })
}

/// Trust the configured CA, present the configured client certificate.
async fn tls_options(config: &EtcdConfig) -> Result<TlsOptions> {
    if config.insecure_skip_tls_verify {
        return Err(Error::Unsupported("insecure-skip-tls-verify is not supported: name a trusted-ca-file".into()));
    }
    let ca = config
        .trusted_ca_file
        .as_deref()
        .ok_or_else(|| Error::Unsupported("https:// endpoints need a trusted-ca-file".into()))?;
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_file(ca).await?));
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read_file(cert).await?, read_file(key).await?));
        }
        (None, None) => {}
        _ => return Err(Error::Unsupported("cert-file and key-file go together".into())),
    }
    Ok(tls)
}

/// How a client built from an etcd client file dials, beyond what the file says.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Used when the file has no `dial-timeout`.
    pub dial_timeout: Duration,
    /// Keep-alive interval and timeout of the HTTP/2 connection.
    pub keep_alive: (Duration, Duration),
    /// Bound on every request (none: each caller bounds its own).
    pub request_timeout: Option<Duration>,
    /// etcd's `WithRequireLeader` on watches.
    pub require_leader: bool,
}

/// An etcd client for Cilium's etcd client file, as Cilium reads the file (`endpoints`,
/// `trusted-ca-file` or `ca-file`, `cert-file`/`key-file`, `insecure-transport`,
/// `dial-timeout`, `username`/`password`): the one place such a file becomes a connection, for
/// remote clusters and for the attached local store alike.
pub async fn dial_client(config: &EtcdConfig, dial: &Dial) -> Result<Client> {
    let https = config.endpoints.iter().filter(|e| e.starts_with("https://")).count();
    let plain = config.endpoints.iter().filter(|e| e.starts_with("http://")).count();
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout.unwrap_or(dial.dial_timeout))
        .with_keep_alive(dial.keep_alive.0, dial.keep_alive.1)
        .with_require_leader(dial.require_leader);
    if let Some(timeout) = dial.request_timeout {
        connect = connect.with_timeout(timeout);
    }
    if let Some(user) = &config.username {
        connect = connect.with_user(user.clone(), config.password.clone().unwrap_or_default());
    }
    match (https, plain) {
        (0, _) if config.insecure_transport => {}
        (0, _) => {
            return Err(Error::Unsupported("plain http:// endpoints need insecure-transport: true".into()));
        }
        (_, 0) => connect = connect.with_tls(tls_options(config).await?),
        _ => return Err(Error::Unsupported("mixed http:// and https:// endpoints".into())),
    }
    Client::connect(&config.endpoints, Some(connect)).await.map_err(Error::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_id_lock_keeps_the_first_id() {
        let lock = ClusterIdLock::default();
        assert_eq!(lock.get(), None);
        assert!(matches!(lock.check(None), Err(Error::MissingHeader)));
        assert!(lock.get().is_none());
    }
}
