//! Our embedded store, started in-process on a random 127.0.0.1 port with the test PKI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::embedded::{self, EmbeddedConfig};
use clustermesh_apiserver::etcd::server::{DEFAULT_MAX_CONCURRENT_STREAMS, ServerOptions};
use clustermesh_apiserver::etcd::service::cluster::MemberInfo;
use clustermesh_apiserver::etcd::service::watch::WatchConfig;
use clustermesh_apiserver::etcd::store::{Limits, Store};
use clustermesh_apiserver::etcd::tls::TlsFiles;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::ServerFiles;
use super::{Pki, install_crypto_provider};

/// A running embedded store. Dropping it cancels its tasks; [`EmbeddedStore::stop`] also
/// waits for them, so graceful shutdown is exercised by every test that calls it.
pub struct EmbeddedStore {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl EmbeddedStore {
    pub async fn start(pki: &Pki) -> Self {
        Self::start_with(pki, AuthStore::default(), Limits::default()).await
    }

    pub async fn start_with(pki: &Pki, auth: AuthStore, limits: Limits) -> Self {
        let files = ServerFiles {
            cert: pki.server_cert_path().to_owned(),
            key: pki.server_key_path().to_owned(),
            ca: pki.ca_path().to_owned(),
        };
        Self::start_with_files(&files, auth, limits).await
    }

    /// Starts with certificate files made elsewhere (e.g. by `certs generate`).
    pub async fn start_with_files(files: &ServerFiles, auth: AuthStore, limits: Limits) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        Self::start_on(listener, files, auth, limits)
    }

    /// Starts on a given address, e.g. the one of a store just stopped: a restart, as clients
    /// configured with that endpoint see it (a fresh store, with a new etcd cluster ID).
    pub async fn start_at(pki: &Pki, auth: AuthStore, addr: SocketAddr) -> Self {
        let files = ServerFiles {
            cert: pki.server_cert_path().to_owned(),
            key: pki.server_key_path().to_owned(),
            ca: pki.ca_path().to_owned(),
        };
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::start_on(listener, &files, auth, Limits::default())
    }

    fn start_on(listener: tokio::net::TcpListener, files: &ServerFiles, auth: AuthStore, limits: Limits) -> Self {
        install_crypto_provider();
        let addr = listener.local_addr().expect("local addr");
        let config = EmbeddedConfig {
            tls: TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                trusted_ca: files.ca.clone(),
                client_cert_auth: true,
            },
            tls_reload_interval: Duration::from_millis(100),
            limits,
            server: ServerOptions {
                member: MemberInfo { name: "embedded".into(), client_urls: vec![format!("https://{addr}")] },
                watch: WatchConfig::default(),
                max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
                max_connections_per_user: 0,
            },
            auto_compaction_retention: Duration::ZERO,
            persistence: None,
        };
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let listeners = embedded::Listeners { client: vec![listener], metrics: Vec::new() };
        let store = embedded::spawn(listeners, config, auth, &tracker, &token).expect("embedded store starts");
        Self { addr, store, token, tracker }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn client_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn client(&self, pki: &Pki, cn: &str) -> etcd_client::Client {
        super::connect(&self.endpoint(), pki, cn).await.expect("connect to the embedded store")
    }

    /// Cancels every task and waits (bounded) for all of them to finish.
    pub async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("the embedded store shuts down within 10 s");
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
