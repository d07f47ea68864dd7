//! Containers on this machine's Docker Engine: the images `docker/build-images` makes (built once
//! per test process, from this build's binary), private networks, containers, and etcd in
//! containers, one member or a cluster.
//!
//! Every network and container carries the label [`LABEL`] with the test process's pid and is
//! removed when its guard drops, also when the test panics; what a killed test process left
//! behind is removed by the next one. Tests reach containers only through ports published on
//! 127.0.0.1 (or `docker exec`); containers reach each other on their private network.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use super::Pki;
use super::etcd::client_tls;
use super::server::free_port;

/// The label every test container and network carries; its value is the test process's pid.
pub const LABEL: &str = "io.clustermesh-apiserver.it";
/// Our image, as `docker/build-images` tags it.
pub const APISERVER_IMAGE: &str = "clustermesh-apiserver:dev";
/// Debian trixie's etcd: the line Cilium ships, the containers' main oracle.
pub const ETCD_35: &str = "clustermesh-local/etcd:3.5.16";
/// Debian bookworm's etcd.
pub const ETCD_34: &str = "clustermesh-local/etcd:3.4.23";
/// The base of the images above: scratch with this machine's C library (no shell, no tools).
pub const BASE_IMAGE: &str = "clustermesh-local/base:bookworm";

/// How long an etcd member (or a restarted one) may take to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `docker` with `args`; the output whatever the exit status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("docker {}: {e} (the container tests need a Docker Engine)", args.join(" ")))
}

/// Runs `docker` with `args` and returns its stdout; panics with its stderr if it fails.
pub fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Makes sure the images exist and hold this build's binary: `docker/build-images` runs once per
/// test process (Docker's cache makes it quick when nothing changed). Leftovers of test
/// processes that are gone are removed first.
///
/// # Panics
/// If Docker or the images cannot be had: a failure, never a skip.
pub fn images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        remove_leftovers();
        let root = env!("CARGO_MANIFEST_DIR");
        let output = Command::new("bash")
            .arg(Path::new(root).join("docker/build-images"))
            .args(["--binary", env!("CARGO_BIN_EXE_clustermesh-apiserver"), "--tag", APISERVER_IMAGE])
            .current_dir(root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("docker/build-images: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "docker/build-images failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    if let Err(error) = built {
        panic!("{error}");
    }
}

/// Containers and networks labelled by test processes that no longer run.
fn remove_leftovers() {
    let gone = |pid: &str| pid.parse::<u32>().is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}");
    let filter = format!("label={LABEL}");
    for line in docker_ok(&["ps", "-a", "--filter", &filter, "--format", &format]).lines() {
        if let Some((id, pid)) = line.split_once(' ')
            && gone(pid)
        {
            docker(&["rm", "-f", "-v", id]);
        }
    }
    for line in docker_ok(&["network", "ls", "--filter", &filter, "--format", &format]).lines() {
        if let Some((id, pid)) = line.split_once(' ')
            && gone(pid)
        {
            docker(&["network", "rm", id]);
        }
    }
}

/// A name no other test (of this or another process) uses.
pub fn unique_name(purpose: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("it-{}-{}-{purpose}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn label() -> String {
    format!("{LABEL}={}", std::process::id())
}

/// A private bridge network, removed on drop (after the containers on it: drop those first).
pub struct Network {
    name: String,
}

impl Network {
    pub fn new(purpose: &str) -> Network {
        images();
        let name = unique_name(purpose);
        docker_ok(&["network", "create", "--label", &label(), &name]);
        Network { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        docker(&["network", "rm", &self.name]);
    }
}

/// A container started detached, removed (with its anonymous volumes) on drop.
pub struct Container {
    name: String,
}

impl Container {
    /// `docker run -d` with `options` (network, ports, mounts, user...), `image` and `args`.
    pub fn run(purpose: &str, options: &[String], image: &str, args: &[String]) -> Container {
        Self::run_on(purpose, options, image, args, &[])
    }

    /// Like [`Container::run`], joined to `also` before it starts, so that its program sees
    /// every network from its first instant.
    pub fn run_on(purpose: &str, options: &[String], image: &str, args: &[String], also: &[&Network]) -> Container {
        images();
        let name = unique_name(purpose);
        let label = label();
        let mut argv: Vec<&str> = vec!["create", "--name", &name, "--label", &label];
        argv.extend(options.iter().map(String::as_str));
        argv.push(image);
        argv.extend(args.iter().map(String::as_str));
        docker_ok(&argv);
        let container = Container { name };
        for network in also {
            container.connect(network, &[]);
        }
        container.start();
        container
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// SIGKILL, as a node losing power would.
    pub fn kill(&self) {
        docker_ok(&["kill", &self.name]);
    }

    /// Starts the stopped container again, on its own filesystem (an etcd member keeps its data).
    pub fn start(&self) {
        docker_ok(&["start", &self.name]);
    }

    pub fn is_running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.name]).stdout.starts_with(b"true")
    }

    /// The host pid of the container's first process (0 when it is not running).
    pub fn pid(&self) -> u32 {
        docker_ok(&["inspect", "-f", "{{.State.Pid}}", &self.name]).trim().parse().expect("pid")
    }

    /// The exit code of the container's last run (0 while it runs).
    pub fn exit_code(&self) -> String {
        docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &self.name]).trim().to_owned()
    }

    /// Cuts the container off `network`: every connection over it fails from now on.
    pub fn disconnect(&self, network: &Network) {
        docker_ok(&["network", "disconnect", "--force", network.name(), &self.name]);
    }

    /// Joins `network`, reachable there under `aliases`.
    pub fn connect(&self, network: &Network, aliases: &[&str]) {
        let mut argv = vec!["network", "connect"];
        for alias in aliases {
            argv.extend(["--alias", alias]);
        }
        argv.extend([network.name(), &self.name]);
        docker_ok(&argv);
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut argv = vec!["exec", &self.name];
        argv.extend(args);
        docker(&argv)
    }

    /// The last `lines` of the container's output (stdout and stderr).
    pub fn logs_tail(&self, lines: usize) -> String {
        let output = docker(&["logs", "--tail", &lines.to_string(), &self.name]);
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A directory of files for containers to mount read-only at `/certs`: the CA, the server
/// certificate (`*.mesh.cilium.io` is among its names) and `root`'s client certificate. World-
/// readable, so that our image's non-root user can read them too; test keys only.
pub struct CertsDir {
    dir: tempfile::TempDir,
}

impl CertsDir {
    pub fn new(pki: &Pki) -> CertsDir {
        let dir = tempfile::Builder::new().prefix("it-container-certs-").tempdir().expect("temp dir");
        let root = pki.client("root");
        for (name, from) in [
            ("ca.pem", pki.ca_path()),
            ("server.pem", pki.server_cert_path()),
            ("server-key.pem", pki.server_key_path()),
            ("root.pem", root.cert_path.as_path()),
            ("root-key.pem", root.key_path.as_path()),
        ] {
            let to = dir.path().join(name);
            fs::copy(from, &to).expect("copy certificate");
            fs::set_permissions(&to, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        CertsDir { dir }
    }

    /// Adds a file (e.g. another client's certificate) and returns its path inside containers.
    pub fn add(&self, name: &str, contents: &str) -> String {
        let path = self.dir.path().join(name);
        fs::write(&path, contents).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        format!("/certs/{name}")
    }

    /// `-v <dir>:/certs:ro`.
    pub fn mount(&self) -> [String; 2] {
        ["-v".into(), format!("{}:/certs:ro", self.dir.path().display())]
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

struct Member {
    container: Container,
    host: String,
    port: u16,
}

/// etcd in containers on a private network: peers talk plain HTTP on it, clients mTLS with the
/// test PKI's server certificate. Tests reach member `i` at `https://127.0.0.1:<port>`;
/// containers on [`EtcdContainers::network`] at `https://etcd-<i>.mesh.cilium.io:2379`.
pub struct EtcdContainers {
    // Fields drop in order: the members before their network.
    members: Vec<Member>,
    certs: CertsDir,
    network: Network,
    image: String,
}

impl EtcdContainers {
    /// Starts `size` members of `image` and waits until each reports healthy (a leader is
    /// elected and each member reaches it).
    pub async fn start(pki: &Pki, size: usize, image: &str) -> EtcdContainers {
        let network = Network::new("etcd");
        let certs = CertsDir::new(pki);
        let hosts: Vec<String> = (0..size).map(|i| format!("etcd-{i}.mesh.cilium.io")).collect();
        let initial_cluster =
            hosts.iter().enumerate().map(|(i, host)| format!("etcd-{i}=http://{host}:2380")).collect::<Vec<_>>();
        let mut members = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let port = free_port();
            let mut options = vec![
                "--network".into(),
                network.name().into(),
                "--network-alias".into(),
                host.clone(),
                "-p".into(),
                format!("127.0.0.1:{port}:2379"),
            ];
            options.extend(certs.mount());
            let args: Vec<String> = [
                "etcd".into(),
                format!("--name=etcd-{i}"),
                // In the container's own filesystem: kept across `docker kill` and `docker start`.
                "--data-dir=/var/lib/etcd/data".into(),
                "--listen-client-urls=https://0.0.0.0:2379".into(),
                format!("--advertise-client-urls=https://{host}:2379"),
                "--listen-peer-urls=http://0.0.0.0:2380".into(),
                format!("--initial-advertise-peer-urls=http://{host}:2380"),
                format!("--initial-cluster={}", initial_cluster.join(",")),
                "--initial-cluster-token=it-containers".into(),
                "--initial-cluster-state=new".into(),
                "--cert-file=/certs/server.pem".into(),
                "--key-file=/certs/server-key.pem".into(),
                "--trusted-ca-file=/certs/ca.pem".into(),
                "--client-cert-auth".into(),
                "--heartbeat-interval=100".into(),
                "--election-timeout=1000".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
                "--log-level=warn".into(),
            ]
            .into();
            let container = Container::run(&format!("etcd-{i}"), &options, image, &args);
            members.push(Member { container, host: host.clone(), port });
        }
        let cluster = EtcdContainers { members, certs, network, image: image.into() };
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    pub fn certs(&self) -> &CertsDir {
        &self.certs
    }

    /// Every member's `https://127.0.0.1:<published port>`, for the tests' own clients.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("https://127.0.0.1:{}", m.port)).collect()
    }

    /// The first member's URL: what a single-member cluster is reached at.
    pub fn client_url(&self) -> String {
        self.client_urls().remove(0)
    }

    /// Every member's URL on the private network, for containers.
    pub fn container_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("https://{}:2379", m.host)).collect()
    }

    /// A client of every member, authenticated as `cn`.
    pub async fn client(&self, pki: &Pki, cn: &str) -> Client {
        let cert = pki.client(cn);
        let options = ConnectOptions::new()
            .with_tls(client_tls(pki.ca_pem(), Some(&cert)))
            .with_connect_timeout(Duration::from_secs(3));
        tokio::time::timeout(Duration::from_secs(10), Client::connect(self.client_urls(), Some(options)))
            .await
            .expect("connect to etcd in containers: timed out")
            .expect("connect to etcd in containers")
    }

    /// SIGKILLs member `i`; its data stays in the container.
    pub fn kill(&mut self, i: usize) {
        self.members[i].container.kill();
    }

    /// Starts a killed member again on its data and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.members[i].container.start();
        self.wait_healthy(i).await;
    }

    /// Cuts member `i` off the network: its peers and every client lose it, it keeps running.
    pub fn disconnect(&self, i: usize) {
        self.members[i].container.disconnect(&self.network);
    }

    /// Puts member `i` back on the network under its name and waits until it is healthy.
    pub async fn reconnect(&self, i: usize) {
        let member = &self.members[i];
        member.container.connect(&self.network, &[&member.host]);
        self.wait_healthy(i).await;
    }

    /// `etcdctl` inside member `i`, as `root`, against the member itself.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        let mut argv = vec![
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--cacert=/certs/ca.pem",
            "--cert=/certs/root.pem",
            "--key=/certs/root-key.pem",
            "--command-timeout=3s",
        ];
        argv.extend(args);
        self.members[i].container.exec(&argv)
    }

    /// Waits (bounded) until member `i` answers `endpoint health`: a quorum read through it.
    pub async fn wait_healthy(&self, i: usize) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let output = self.etcdctl(i, &["endpoint", "health"]);
            if output.status.success() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd member {i} ({}) not healthy within {READY_TIMEOUT:?}: {}\nlog tail:\n{}",
                self.image,
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log_tail(i, 30)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// What member `i` itself holds under `prefix` (a serializable read: no quorum needed, so a
    /// member that is cut off answers from its own copy).
    pub fn member_dump(&self, i: usize, prefix: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let output = self.etcdctl(i, &["get", "--prefix", prefix, "--consistency=s", "-w", "json"]);
        anyhow::ensure!(output.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&output.stderr).trim());
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let decode = |value: &serde_json::Value| -> anyhow::Result<Vec<u8>> {
            use base64::Engine as _;
            Ok(base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap_or_default())?)
        };
        let mut found = BTreeMap::new();
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            found.insert(String::from_utf8(decode(&kv["key"])?)?, decode(&kv["value"])?);
        }
        Ok(found)
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i].container.logs_tail(lines)
    }
}
