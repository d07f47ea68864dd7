//! TLS for the store's listener: PEM files → rustls config (client certificate required),
//! reloaded when the files change, and the client certificate's Common Name as identity.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::connections::{ConnectionLimit, OpenConnection};
use super::metrics::ConnectionCounters;

/// A handshake that has not finished by then is dropped, so that idle sockets cannot pile up
/// in front of the accept loop.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("no PEM private key in {0}")]
    NoKey(PathBuf),
    #[error("CA bundle {path} holds no usable certificate")]
    BadCa {
        path: PathBuf,
        #[source]
        source: Option<rustls::Error>,
    },
    #[error("building the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("certificate and key do not form a usable server identity")]
    Config(#[source] rustls::Error),
}

/// Who is on the other end of a connection, decided once at handshake time.
///
/// With auth enabled the certificate's Common Name is the etcd user, exactly as etcd does
/// with `--client-cert-auth`: Cilium creates every user without a password, so the
/// certificate is the only credential.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The client certificate's Common Name; `None` without a certificate or without a CN.
    pub common_name: Option<String>,
    pub remote_addr: Option<SocketAddr>,
}

/// The files etcd's `--cert-file`, `--key-file` and `--trusted-ca-file` name.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: PathBuf,
    /// etcd's `--client-cert-auth`: require and verify a client certificate.
    pub client_cert_auth: bool,
}

/// The server's TLS configuration, swapped whole when its files change. Connections keep
/// the configuration they were accepted with; new ones get the new files.
pub struct ReloadingConfig {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    loaded_from: Mutex<Vec<Vec<u8>>>,
}

impl ReloadingConfig {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, Error> {
        let contents = read_all(&files)?;
        let config = build(&files, &contents)?;
        Ok(Arc::new(Self { files, current: RwLock::new(Arc::new(config)), loaded_from: Mutex::new(contents) }))
    }

    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read())
    }

    /// Rebuilds the configuration if any file's contents changed. A change that does not
    /// load (a half-written file, a key not matching its certificate) keeps the old
    /// configuration in service and is reported.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let contents = read_all(&self.files)?;
        let mut loaded_from = self.loaded_from.lock();
        if *loaded_from == contents {
            return Ok(false);
        }
        let config = build(&self.files, &contents)?;
        *self.current.write() = Arc::new(config);
        *loaded_from = contents;
        Ok(true)
    }

    /// Checks the files every `interval` until `shutdown`. Kubernetes updates mounted
    /// Secrets by swapping a symlink, which file-change notifications often miss; comparing
    /// contents is cheap at this size and never misses.
    pub async fn run_reloader(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded"),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), "TLS files changed but do not load; keeping the previous ones")
                }
            }
        }
    }
}

fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>, Error> {
    [&files.cert, &files.key, &files.trusted_ca]
        .into_iter()
        .map(|path| std::fs::read(path).map_err(|source| Error::Read { path: path.clone(), source }))
        .collect()
}

fn build(files: &TlsFiles, contents: &[Vec<u8>]) -> Result<rustls::ServerConfig, Error> {
    let [cert_pem, key_pem, ca_pem] = contents else { unreachable!("read_all reads three files") };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| Error::NoKey(files.key.clone()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = if files.client_cert_auth {
        let roots = ca_roots(&files.trusted_ca, ca_pem)?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(Error::Verifier)?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(certs, key).map_err(Error::Config)?;
    // gRPC clients (grpc-go ≥ 1.67 among them) refuse a TLS server that does not
    // negotiate HTTP/2 through ALPN. HTTP/1.1 is offered second, for etcd's plain HTTP
    // endpoints on the same port (`/version`, `/health`), which troubleshooting tools read.
    config.alpn_protocols = vec![b"h2".to_vec(), HTTP1_ALPN.to_vec()];
    Ok(config)
}

fn ca_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem).filter_map(Result::ok) {
        roots.add(cert).map_err(|source| Error::BadCa { path: path.to_owned(), source: Some(source) })?;
    }
    if roots.is_empty() {
        return Err(Error::BadCa { path: path.to_owned(), source: None });
    }
    Ok(roots)
}

/// The Common Name of a DER certificate's subject; with several, the last, as Go's
/// `pkix.Name.CommonName` (and so etcd) reads it.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().last()?;
    cn.as_str().ok().map(str::to_owned)
}

/// One accepted, handshaken connection, carrying its peer identity into every request.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerIdentity,
    /// Bytes read to tell HTTP/2 from HTTP/1.1 (a client that negotiated no protocol), handed
    /// back before the stream's own.
    sniffed: bytes::Bytes,
    /// This connection's place under `--max-connections-per-user`, given back when it closes.
    _slot: OpenConnection,
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.sniffed.is_empty() {
            let n = this.sniffed.len().min(buf.remaining());
            buf.put_slice(&this.sniffed.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE_START: &[u8] = b"PRI ";

/// Which protocol a connection speaks: its ALPN choice, or for a client that negotiated none
/// (Cilium's troubleshooting writes a bare `GET /version` this way), its first bytes. The
/// first bytes are awaited for HTTP/2 too: a client that sends nothing within the handshake
/// timeout is dropped, as etcd drops it, instead of holding a connection for free.
async fn speaks_http1(connection: &mut TlsConnection) -> io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let negotiated = connection.stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if negotiated.as_deref() == Some(HTTP1_ALPN) {
        return Ok(true);
    }
    let mut first = Vec::with_capacity(H2_PREFACE_START.len());
    while first.len() < H2_PREFACE_START.len() {
        let mut byte = [0u8; 1];
        if connection.stream.read(&mut byte).await? == 0 {
            break;
        }
        first.push(byte[0]);
        if !H2_PREFACE_START.starts_with(&first) {
            break;
        }
    }
    if first.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let http1 = negotiated.is_none() && first.as_slice() != H2_PREFACE_START;
    connection.sniffed = bytes::Bytes::from(first);
    Ok(http1)
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The ALPN name of HTTP/1.1.
pub const HTTP1_ALPN: &[u8] = b"http/1.1";

/// Takes a connection that negotiated HTTP/1.1 (the gRPC server only speaks HTTP/2).
pub type Http1Handler = Arc<dyn Fn(TlsConnection) + Send + Sync>;

/// Accepts on `listener` until `shutdown`, handshaking each connection on its own task so a
/// slow or hostile client never stalls the others. Refused handshakes (no certificate, an
/// unknown CA, an expired certificate) are logged at debug and dropped. Connections that
/// negotiated HTTP/1.1 go to `http1` instead of the returned stream.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    http1: Http1Handler,
    limit: Arc<ConnectionLimit>,
    counters: Arc<ConnectionCounters>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, remote_addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.current());
                let (tx, http1, counters) = (tx.clone(), Arc::clone(&http1), Arc::clone(&counters));
                let limit = Arc::clone(&limit);
                tokio::spawn(async move {
                    let silent = || counters.silent_closed.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let common_name = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|cert| common_name(cert));
                            let Some(slot) = limit.open(common_name.as_deref()) else {
                                counters.over_user_limit.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%remote_addr, user = ?common_name, "connection refused: the user holds --max-connections-per-user");
                                return;
                            };
                            let peer = PeerIdentity { common_name, remote_addr: Some(remote_addr) };
                            let mut connection =
                                TlsConnection { stream, peer, sniffed: bytes::Bytes::new(), _slot: slot };
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, speaks_http1(&mut connection)).await {
                                Ok(Ok(true)) => http1(connection),
                                Ok(Ok(false)) => drop(tx.send(Ok(connection)).await),
                                Ok(Err(error)) => tracing::debug!(%remote_addr, %error, "connection closed early"),
                                Err(_) => {
                                    silent();
                                    tracing::debug!(%remote_addr, "no request within the handshake timeout");
                                }
                            }
                        }
                        Ok(Err(error)) => {
                            counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%remote_addr, %error, "TLS handshake refused");
                        }
                        Err(_) => {
                            silent();
                            tracing::debug!(%remote_addr, "TLS handshake timed out");
                        }
                    }
                });
            }
        }
        .instrument(tracing::info_span!("accept")),
    );
    ReceiverStream::new(rx)
}
