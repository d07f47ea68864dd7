//! The servers under test, each a child process of the bench so that all compete with the
//! client for the same cores and each has an RSS of its own: Debian's etcd 3.5 (the anchor every
//! ratio and target is taken against), Debian's etcd 3.4 (data dirs on tmpfs) and our
//! `clustermesh-apiserver kvstore`, all serving mTLS on random 127.0.0.1 ports.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::certs::{ClientCert, Pki};

/// Our server's binary, built by cargo for this bench target.
pub const OUR_BINARY: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

/// Where etcd keeps its data: tmpfs, as Cilium's chart does (an `emptyDir` with medium Memory).
const TMPFS: &str = "/dev/shm";

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the anchor, etcd 3.5.16, is unpacked by docker/build-images (when `ETCD_BIN` is unset).
const ETCD35_DEFAULT: &str = "target/docker/etcd-3.5.16/usr/bin/etcd";
/// Where etcd 3.4 is looked for when `ETCD34_BIN` is unset: Debian bookworm's etcd-server, then
/// the copy docker/build-images unpacks.
const ETCD34_DEFAULTS: [&str; 2] = ["/usr/bin/etcd", "target/docker/etcd-3.4.23/usr/bin/etcd"];

/// A server under test, in the order they run and are reported: the anchor first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// etcd 3.5, the line Cilium ships: the anchor of every ratio and target.
    Etcd35,
    /// etcd 3.4, the second etcd; left out when its binary is missing.
    Etcd34,
    Ours,
}

impl Which {
    pub const ALL: [Which; 3] = [Which::Etcd35, Which::Etcd34, Which::Ours];

    pub fn name(self) -> &'static str {
        match self {
            Which::Etcd35 => "etcd-3.5",
            Which::Etcd34 => "etcd-3.4",
            Which::Ours => "ours",
        }
    }

    pub fn is_etcd(self) -> bool {
        self != Which::Ours
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One value per server; none for a server the run left out (etcd 3.4 without its binary) or,
/// where a scenario allows it, one that failed.
#[derive(Debug, Clone)]
pub struct PerServer<T>([Option<T>; 3]);

/// One row's figures.
pub type Figures = PerServer<f64>;

impl<T> Default for PerServer<T> {
    fn default() -> Self {
        PerServer([None, None, None])
    }
}

impl<T> PerServer<T> {
    pub fn get(&self, which: Which) -> Option<&T> {
        self.0[which.index()].as_ref()
    }

    pub fn set(&mut self, which: Which, value: T) {
        self.0[which.index()] = Some(value);
    }

    /// The servers that have a value, anchor first.
    pub fn iter(&self) -> impl Iterator<Item = (Which, &T)> {
        Which::ALL.into_iter().zip(&self.0).filter_map(|(which, v)| Some((which, v.as_ref()?)))
    }

    pub fn map<'a, U>(&'a self, mut f: impl FnMut(&'a T) -> U) -> PerServer<U> {
        PerServer(self.0.each_ref().map(|v| v.as_ref().map(&mut f)))
    }

    /// A report row's figures: `f` of each server's value (`f` may return an `Option`).
    pub fn figures<F: Into<Option<f64>>>(&self, f: impl Fn(&T) -> F) -> Figures {
        PerServer(self.0.each_ref().map(|v| v.as_ref().and_then(|v| f(v).into())))
    }
}

/// An etcd binary and the version it reports.
#[derive(Debug, Clone)]
pub struct EtcdBinary {
    pub path: PathBuf,
    pub version: String,
}

/// The servers one run measures: etcd 3.5 (`ETCD_BIN`, else docker/build-images' copy; the run
/// fails without it), etcd 3.4 (`ETCD34_BIN`, else Debian's /usr/bin/etcd; left out, loudly,
/// when missing, and on purpose with `ETCD34_BIN=`), and ours.
#[derive(Debug, Clone)]
pub struct Lineup {
    etcd35: EtcdBinary,
    etcd34: Option<EtcdBinary>,
    /// What the run should shout about: a server left out, a version not the one expected.
    pub warnings: Vec<String>,
}

impl Lineup {
    pub fn find() -> anyhow::Result<Lineup> {
        let mut warnings = Vec::new();
        let path = match std::env::var_os("ETCD_BIN").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join(ETCD35_DEFAULT),
        };
        if !path.is_file() {
            bail!(
                "etcd 3.5, the benchmark's anchor, not found at {}: set $ETCD_BIN, or run docker/build-images \
                 (it unpacks Debian's etcd-server 3.5.16 into target/docker)",
                path.display()
            );
        }
        let etcd35 = EtcdBinary { version: etcd_version(&path)?, path };
        if !etcd35.version.starts_with("3.5.") {
            warnings.push(format!(
                "the anchor ({}) is etcd {}, not 3.5: the etcd-3.5 figures and every target are taken against it",
                etcd35.path.display(),
                etcd35.version
            ));
        }
        let etcd34 = find_etcd34(&etcd35, &mut warnings);
        Ok(Lineup { etcd35, etcd34, warnings })
    }

    /// The servers to run, anchor first.
    pub fn servers(&self) -> impl Iterator<Item = Which> + '_ {
        Which::ALL.into_iter().filter(|&which| which == Which::Ours || self.etcd(which).is_some())
    }

    pub fn etcd(&self, which: Which) -> Option<&EtcdBinary> {
        match which {
            Which::Etcd35 => Some(&self.etcd35),
            Which::Etcd34 => self.etcd34.as_ref(),
            Which::Ours => None,
        }
    }

    /// The version a server reports (ours: this crate's).
    pub fn version(&self, which: Which) -> Option<&str> {
        match which {
            Which::Ours => Some(env!("CARGO_PKG_VERSION")),
            etcd => self.etcd(etcd).map(|e| e.version.as_str()),
        }
    }

    pub fn binary(&self, which: Which) -> Option<&Path> {
        match which {
            Which::Ours => Some(Path::new(OUR_BINARY)),
            etcd => self.etcd(etcd).map(|e| e.path.as_path()),
        }
    }
}

/// etcd 3.4, or why it is left out (in `warnings`).
fn find_etcd34(anchor: &EtcdBinary, warnings: &mut Vec<String>) -> Option<EtcdBinary> {
    let path = match std::env::var_os("ETCD34_BIN") {
        Some(path) if path.is_empty() => {
            warnings.push("etcd 3.4 left out: ETCD34_BIN is empty".to_owned());
            return None;
        }
        Some(path) => PathBuf::from(path),
        // (Joined to an absolute path, the manifest directory goes.)
        None => {
            match ETCD34_DEFAULTS.iter().map(|p| Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).find(|p| p.is_file()) {
                Some(path) => path,
                None => {
                    warnings.push(format!(
                    "etcd 3.4 left out: not found at {} (apt-get install etcd-server on Debian bookworm, or set $ETCD34_BIN)",
                    ETCD34_DEFAULTS.join(" or ")
                ));
                    return None;
                }
            }
        }
    };
    let version = match etcd_version(&path) {
        Ok(version) => version,
        Err(error) => {
            warnings.push(format!("etcd 3.4 left out: {error:#}"));
            return None;
        }
    };
    if same_file(&path, &anchor.path) {
        warnings.push(format!("etcd 3.4 left out: {} is the anchor's binary", path.display()));
        return None;
    }
    if !version.starts_with("3.4.") {
        warnings.push(format!(
            "the second etcd ({}) is etcd {version}, not 3.4: the etcd-3.4 figures are its",
            path.display()
        ));
    }
    Some(EtcdBinary { path, version })
}

/// `etcd --version`'s "etcd Version: X.Y.Z".
fn etcd_version(path: &Path) -> anyhow::Result<String> {
    let mut cmd = Command::new(path);
    cmd.arg("--version").stdin(Stdio::null());
    remove_etcd_env(&mut cmd);
    let output = cmd.output().with_context(|| format!("run {} --version", path.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("{} --version printed no etcd version: {stdout}", path.display()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(a), Ok(b)) if a == b)
}

/// ETCD_* variables would be read as flags.
fn remove_etcd_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(key);
        }
    }
}

/// One running server; killed and reaped on drop.
pub struct Server {
    pub which: Which,
    child: Child,
    /// How it was started, for [`Server::kill_and_restart`].
    command: Vec<std::ffi::OsString>,
    client_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
}

/// Memory of a process, from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
    pub hwm: u64,
}

impl Memory {
    /// What the process holds that is not a mapping of a tmpfs file: with
    /// [`Server::tmpfs_bytes`] added, the memory the server costs without counting the same
    /// page twice (etcd maps its bbolt file, which lives on tmpfs).
    pub fn private(&self) -> u64 {
        self.rss.saturating_sub(self.rss_shmem)
    }
}

/// CPU time this bench process (the clients) has used so far.
pub fn own_cpu_time() -> Duration {
    process_cpu_time(std::process::id()).unwrap_or_default()
}

impl Server {
    pub async fn start(which: Which, lineup: &Lineup, pki: &Pki) -> anyhow::Result<Server> {
        Self::start_with(which, lineup, pki, false).await
    }

    /// With `persistent`, ours keeps its store in a data directory (etcd always does).
    pub async fn start_with(which: Which, lineup: &Lineup, pki: &Pki, persistent: bool) -> anyhow::Result<Server> {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(which, lineup, pki, persistent).await {
                Ok(server) => return Ok(server),
                Err(e) if format!("{e:#}").contains("address already in use") => last = format!("{e:#}"),
                Err(e) => return Err(e),
            }
        }
        bail!("{} did not start: a port was taken three times: {last}", which.name())
    }

    async fn try_start(which: Which, lineup: &Lineup, pki: &Pki, persistent: bool) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cm-bench-{}-", which.name()))
            .tempdir_in(TMPFS)
            .with_context(|| format!("create a temp dir in {TMPFS}"))?;
        let log_path = dir.path().join("server.log");
        let log = fs::File::create(&log_path)?;
        let [client_port, metrics_port, peer_port] = free_ports()?;
        let client_url = format!("https://127.0.0.1:{client_port}");
        let metrics_url = format!("http://127.0.0.1:{metrics_port}");
        let mut cmd = match which {
            Which::Etcd35 | Which::Etcd34 => {
                let bin = &lineup.etcd(which).with_context(|| format!("{} is not in this run", which.name()))?.path;
                let data_dir = dir.path().join("data");
                fs::DirBuilder::new().mode(0o700).create(&data_dir)?;
                let peer_url = format!("http://127.0.0.1:{peer_port}");
                let mut cmd = Command::new(bin);
                cmd.arg("--name=bench")
                    .arg(format!("--data-dir={}", data_dir.display()))
                    .arg(format!("--listen-client-urls={client_url}"))
                    .arg(format!("--advertise-client-urls={client_url}"))
                    .arg(format!("--listen-peer-urls={peer_url}"))
                    .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                    .arg(format!("--initial-cluster=bench={peer_url}"))
                    .arg("--initial-cluster-state=new")
                    .arg(format!("--listen-metrics-urls={metrics_url}"))
                    .arg(format!("--cert-file={}", pki.server_cert_path().display()))
                    .arg(format!("--key-file={}", pki.server_key_path().display()))
                    .arg(format!("--trusted-ca-file={}", pki.ca_path().display()))
                    .arg("--client-cert-auth")
                    // As Cilium's chart runs its etcd sidecar.
                    .arg("--auto-compaction-retention=1")
                    .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"]);
                remove_etcd_env(&mut cmd);
                cmd
            }
            Which::Ours => {
                let mut cmd = Command::new(OUR_BINARY);
                cmd.arg("kvstore")
                    .arg(format!("--listen-client-urls={client_url}"))
                    .arg(format!("--listen-metrics-urls={metrics_url}"))
                    .arg(format!("--cert-file={}", pki.server_cert_path().display()))
                    .arg(format!("--key-file={}", pki.server_key_path().display()))
                    .arg(format!("--trusted-ca-file={}", pki.ca_path().display()))
                    .arg("--auto-compaction-retention=1")
                    .arg("--log-level=warn")
                    .env_remove("RUST_LOG");
                // The cost of the data directory's log: `BENCH_OURS_DATA_DIR=/some/dir` (a new
                // data directory is made inside it per server) and `BENCH_OURS_WAL_FSYNC`.
                if persistent {
                    cmd.arg(format!("--data-dir={}", dir.path().join("data").display()));
                } else if let Some(parent) = std::env::var_os("BENCH_OURS_DATA_DIR") {
                    let data_dir = tempfile::Builder::new().prefix("bench-ours-").tempdir_in(parent)?.keep();
                    cmd.arg(format!("--data-dir={}", data_dir.display()));
                    if let Ok(policy) = std::env::var("BENCH_OURS_WAL_FSYNC") {
                        cmd.arg(format!("--wal-fsync={policy}"));
                    }
                }
                cmd
            }
        };
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let command =
            std::iter::once(cmd.get_program().to_owned()).chain(cmd.get_args().map(ToOwned::to_owned)).collect();
        let mut server = Server { which, child, command, client_port, metrics_port, dir, log_path };
        server.wait_healthy().await?;
        Ok(server)
    }

    /// SIGKILL (an OOM kill), then the same command on the same data directory; returns once
    /// it answers `/health` again, with the time that took.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        self.child.kill()?;
        self.child.wait()?;
        let log = fs::OpenOptions::new().append(true).open(&self.log_path)?;
        let start = Instant::now();
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        remove_etcd_env(&mut cmd);
        self.child = cmd.spawn().with_context(|| format!("respawn {cmd:?}"))?;
        self.wait_healthy().await?;
        Ok(start.elapsed())
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let (which, server) = (self.which, self);
        let start = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("{} exited with {status}; log:\n{}", which.name(), server.log_tail(30));
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), http_get(server.metrics_port, "/health")).await
            {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("{} not healthy after {READY_TIMEOUT:?}; log:\n{}", which.name(), server.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        process_memory(self.pid())
    }

    /// Bytes the server keeps on tmpfs (etcd's WAL, snapshots and bbolt file; nothing for ours):
    /// memory too, though not in the process's RSS.
    pub fn tmpfs_bytes(&self) -> u64 {
        if self.which.is_etcd() { dir_allocated_bytes(&self.dir.path().join("data")) } else { 0 }
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        process_cpu_time(self.pid()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails if the process has died (e.g. out of memory) since it started.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} died with {status}; log:\n{}", self.which.name(), self.log_tail(30));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn process_memory(pid: u32) -> anyhow::Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc/<pid>/status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:"),
        rss_anon: field("RssAnon:"),
        rss_file: field("RssFile:"),
        rss_shmem: field("RssShmem:"),
        hwm: field("VmHWM:"),
    })
}

/// utime + stime of a process, from `/proc/<pid>/stat` (clock ticks of 1/100 s on Linux).
pub fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

fn dir_allocated_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

pub fn free_ports() -> std::io::Result<[u16; 3]> {
    let listeners = [
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
        std::net::TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([listeners[0].local_addr()?.port(), listeners[1].local_addr()?.port(), listeners[2].local_addr()?.port()])
}

/// A minimal HTTP/1.0 GET on 127.0.0.1; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed status line")?;
    Ok((status, body.to_string()))
}

/// What every bench client presents: the test CA and one client certificate (CN `root`).
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: String,
    cert: ClientCert,
}

impl ClientTls {
    pub fn new(pki: &Pki) -> Self {
        Self { ca_pem: pki.ca_pem().to_owned(), cert: pki.client("root") }
    }

    fn options(&self) -> TlsOptions {
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert.cert_pem, &self.cert.key_pem))
    }

    /// A new client, i.e. a new connection (and TLS handshake, on first use).
    pub async fn connect(&self, url: &str) -> anyhow::Result<Client> {
        let options = ConnectOptions::new()
            .with_tls(self.options())
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        tokio::time::timeout(Duration::from_secs(30), Client::connect([url], Some(options)))
            .await
            .with_context(|| format!("connect to {url}: timed out"))?
            .with_context(|| format!("connect to {url}"))
    }

    /// `n` clients, connected up to 32 at a time.
    pub async fn connect_many(&self, url: &str, n: usize) -> anyhow::Result<Vec<Client>> {
        use futures::StreamExt as _;
        let clients: Vec<anyhow::Result<Client>> =
            futures::stream::iter(0..n).map(|_| self.connect(url)).buffered(32).collect().await;
        clients.into_iter().collect()
    }
}
