//! A real etcd (Debian's 3.5.16, see [`find_binary`]) with mTLS on random 127.0.0.1 ports, and
//! mTLS clients for any etcd-compatible endpoint.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::certs::{ClientCert, Pki};

/// Debian's etcd 3.5.16 (the line Cilium ships), unpacked by docker/build-images: the oracle of
/// the differential and etcdctl tests. `$ETCD_BIN` and `$ETCDCTL_BIN` point elsewhere (e.g.
/// Debian bookworm's 3.4 in /usr/bin).
const ORACLE_DIR: &str = "target/docker/etcd-3.5.16/usr/bin";
/// How long etcd may take to report `"health":"true"` (it needs about 1 s to elect itself).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Start attempts when etcd loses a race for one of its random ports.
const START_ATTEMPTS: usize = 3;
/// Connect timeout of the clients built here.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A running single-member etcd with client-certificate authentication. Killed (SIGKILL) and
/// reaped on drop; its data dir and log go with it.
pub struct EtcdProcess {
    child: Child,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    log_path: PathBuf,
}

/// Why one start attempt failed.
enum StartError {
    /// Another process took one of the chosen ports: try again with new ones.
    PortTaken(String),
    Fatal(String),
}

/// A server certificate, its key and the CA clients must chain to.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl EtcdProcess {
    /// Starts etcd with the server certificate of `pki` (`--client-cert-auth`, trusted CA =
    /// `pki.ca_path()`) and waits until its metrics listener reports `"health":"true"`.
    ///
    /// # Panics
    /// If the `etcd` binary is missing (a failure, not a skip), or etcd dies or is not healthy
    /// within 15 s; the message includes the tail of etcd's log.
    pub async fn start(pki: &Pki) -> EtcdProcess {
        Self::start_with_args(pki, &[]).await
    }

    /// Like [`EtcdProcess::start`], with more flags (e.g. `--quota-backend-bytes=...`).
    pub async fn start_with_args(pki: &Pki, extra: &[&str]) -> EtcdProcess {
        let files = ServerFiles {
            cert: pki.server_cert_path().to_owned(),
            key: pki.server_key_path().to_owned(),
            ca: pki.ca_path().to_owned(),
        };
        Self::start_with_files_and_args(&files, extra).await
    }

    /// Starts etcd with certificate files made elsewhere (e.g. by `certs generate`).
    pub async fn start_with_files(files: &ServerFiles) -> EtcdProcess {
        Self::start_with_files_and_args(files, &[]).await
    }

    async fn start_with_files_and_args(files: &ServerFiles, extra: &[&str]) -> EtcdProcess {
        let bin = find_binary("etcd", "ETCD_BIN");
        let mut lost_races = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(&bin, files, extra).await {
                Ok(etcd) => return etcd,
                Err(StartError::PortTaken(log)) => {
                    lost_races.push(format!("attempt {attempt}: port taken:\n{log}"));
                }
                Err(StartError::Fatal(msg)) => panic!("etcd did not start: {msg}"),
            }
        }
        panic!("etcd did not start: a port was taken in each of {START_ATTEMPTS} attempts\n{}", lost_races.join("\n"));
    }

    async fn try_start(bin: &Path, files: &ServerFiles, extra: &[&str]) -> Result<EtcdProcess, StartError> {
        let fatal = |what: &str, e: &dyn std::fmt::Display| StartError::Fatal(format!("{what}: {e}"));
        let dir =
            tempfile::Builder::new().prefix("it-etcd-").tempdir().map_err(|e| fatal("create etcd temp dir", &e))?;
        let data_dir = dir.path().join("data");
        // etcd warns unless its data dir is private.
        fs::DirBuilder::new().mode(0o700).create(&data_dir).map_err(|e| fatal("create etcd data dir", &e))?;
        let log_path = dir.path().join("etcd.log");
        let log = fs::File::create(&log_path).map_err(|e| fatal("create etcd log", &e))?;
        let log2 = log.try_clone().map_err(|e| fatal("clone etcd log", &e))?;
        let [client_port, peer_port, metrics_port] = free_ports().map_err(|e| fatal("pick free ports", &e))?;

        let client_url = format!("https://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        cmd.arg("--name=it")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=it={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"))
            .arg(format!("--cert-file={}", files.cert.display()))
            .arg(format!("--key-file={}", files.key.display()))
            .arg(format!("--trusted-ca-file={}", files.ca.display()))
            .arg("--client-cert-auth")
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // ETCD_* variables would be read as flags by etcd.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().map_err(|e| fatal(&format!("spawn {}", bin.display()), &e))?;
        // From here on, Drop kills etcd whatever happens.
        let mut etcd = EtcdProcess { child, dir, client_port, peer_port, metrics_port, log_path };

        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log = etcd.log_tail(40);
                return Err(if log.contains("address already in use") {
                    StartError::PortTaken(log)
                } else {
                    StartError::Fatal(format!("etcd exited with {status}; log tail:\n{log}"))
                });
            }
            let last = match tokio::time::timeout(Duration::from_secs(2), etcd.health()).await {
                Ok(Ok(body)) if body.contains(r#""health":"true""#) => return Ok(etcd),
                Ok(Ok(body)) => format!("unhealthy: {}", body.trim()),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "health request timed out".to_string(),
            };
            if start.elapsed() >= READY_TIMEOUT {
                return Err(StartError::Fatal(format!(
                    "not healthy after {READY_TIMEOUT:?} (last: {last}); log tail:\n{}",
                    etcd.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `https://127.0.0.1:<client port>`
    pub fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:<client port>`
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// `http://127.0.0.1:<metrics port>` (plain HTTP: `/health`, `/metrics`).
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding `data/` and `etcd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of etcd's log (stdout and stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read_to_string(&self.log_path) {
            Ok(log) => {
                let all: Vec<&str> = log.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }

    /// The body of `GET /health` on the metrics listener, e.g. `{"health":"true"}`.
    pub async fn health(&self) -> anyhow::Result<String> {
        let (status, body) = http_get("127.0.0.1", self.metrics_port, "/health").await?;
        // 503 with a body means "not healthy yet" (no leader): still an answer.
        if status != 200 && status != 503 {
            bail!("GET /health: HTTP {status}: {}", body.trim());
        }
        Ok(body)
    }

    /// An etcd client authenticated with a fresh client certificate for `cn`.
    ///
    /// # Panics
    /// If the client cannot be built.
    pub async fn client(&self, pki: &Pki, cn: &str) -> Client {
        connect(&self.client_url(), pki, cn)
            .await
            .unwrap_or_else(|e| panic!("connect to etcd at {} as {cn:?}: {e:#}", self.client_url()))
    }

    /// Kills etcd (SIGKILL) and reaps it. Also done on drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for EtcdProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdProcess")
            .field("pid", &self.child.id())
            .field("client_url", &self.client_url())
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// TLS options trusting `ca_pem`, presenting `identity` as client certificate if given.
pub fn client_tls(ca_pem: &str, identity: Option<&ClientCert>) -> TlsOptions {
    let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem));
    match identity {
        Some(cert) => tls.identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem)),
        None => tls,
    }
}

/// Connects to any mTLS etcd endpoint (`https://host:port` or `host:port`) trusting the CA of
/// `pki`, with a fresh client certificate for `cn`.
///
/// Like every etcd_client connection this is lazy: a refused handshake shows up as an error
/// (or a hang — bound it) on the first RPC, not here.
pub async fn connect(url_or_endpoint: &str, pki: &Pki, cn: &str) -> anyhow::Result<Client> {
    let cert = pki.client(cn);
    connect_with_tls(url_or_endpoint, client_tls(pki.ca_pem(), Some(&cert))).await
}

/// Connects to an etcd endpoint (`https://host:port` or `host:port`) with the given TLS options,
/// e.g. from [`client_tls`] with a foreign, expired or missing client certificate.
pub async fn connect_with_tls(url_or_endpoint: &str, tls: TlsOptions) -> anyhow::Result<Client> {
    let url = https_url(url_or_endpoint)?;
    let options = ConnectOptions::new().with_tls(tls).with_connect_timeout(CONNECT_TIMEOUT);
    tokio::time::timeout(Duration::from_secs(10), Client::connect([url.as_str()], Some(options)))
        .await
        .with_context(|| format!("connect to {url}: timed out"))?
        .with_context(|| format!("connect to {url}"))
}

/// `host:port` → `https://host:port`; `https://…` unchanged; `http://…` refused (mTLS only).
fn https_url(url_or_endpoint: &str) -> anyhow::Result<String> {
    if url_or_endpoint.starts_with("https://") {
        Ok(url_or_endpoint.to_string())
    } else if url_or_endpoint.starts_with("http://") {
        bail!("{url_or_endpoint}: plain HTTP, but these clients use mTLS")
    } else {
        Ok(format!("https://{url_or_endpoint}"))
    }
}

/// Three distinct ports that were free on 127.0.0.1 a moment ago (all bound at once, then
/// released). Another process may still grab one before etcd binds it: see [`START_ATTEMPTS`].
fn free_ports() -> std::io::Result<[u16; 3]> {
    let listeners = [
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([listeners[0].local_addr()?.port(), listeners[1].local_addr()?.port(), listeners[2].local_addr()?.port()])
}

/// A minimal HTTP/1.0 GET; returns (status code, body). The server closes the connection.
pub async fn http_get(host: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream =
        tokio::net::TcpStream::connect((host, port)).await.with_context(|| format!("connect to {host}:{port}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: */*\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) =
        response.split_once("\r\n\r\n").with_context(|| format!("malformed HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP status line: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Finds the oracle's `name` (`etcd` or `etcdctl`): the path in `$override_var` if set and
/// non-empty, else Debian's 3.5.16 ([`ORACLE_DIR`]).
///
/// # Panics
/// If no executable is found: a missing tool fails the test instead of skipping it.
pub fn find_binary(name: &str, override_var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "${override_var} is {}, which is not a file", path.display());
        return path;
    }
    // The unpacked package docker/build-images makes its etcd 3.5 image from.
    super::docker::images();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(ORACLE_DIR).join(name);
    assert!(path.is_file(), "{} missing after docker/build-images", path.display());
    path
}
