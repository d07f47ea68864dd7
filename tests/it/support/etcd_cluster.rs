//! A three-member (or N-member) real etcd cluster on 127.0.0.1: mTLS for clients, plain HTTP
//! between peers (loopback only). Members can be killed with SIGKILL and restarted on their
//! data dir, as a crashed pod would be.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::Pki;
use super::etcd::{find_binary, http_get};

/// How long the cluster (or a restarted member) may take to report healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; every member is killed (SIGKILL) and reaped on drop.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    initial_cluster: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `size` members with the server certificate of `pki` and waits until every member
    /// reports `"health":"true"` (a leader is elected and each member reaches it).
    pub async fn start(pki: &Pki, size: usize) -> EtcdCluster {
        let bin = find_binary("etcd", "ETCD_BIN");
        let dir = tempfile::Builder::new().prefix("it-etcd-cluster-").tempdir().expect("temp dir");
        // All ports bound at once, then released just before etcd binds them.
        let listeners: Vec<std::net::TcpListener> =
            (0..size * 3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().expect("addr").port()).collect();
        drop(listeners);
        let members: Vec<Member> = (0..size)
            .map(|i| {
                let data_dir = dir.path().join(format!("m{i}"));
                fs::DirBuilder::new().mode(0o700).create(&data_dir).expect("data dir");
                Member {
                    name: format!("m{i}"),
                    client_port: ports[3 * i],
                    peer_port: ports[3 * i + 1],
                    metrics_port: ports[3 * i + 2],
                    data_dir,
                    log_path: dir.path().join(format!("m{i}.log")),
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            bin,
            cert: pki.server_cert_path().to_owned(),
            key: pki.server_key_path().to_owned(),
            ca: pki.ca_path().to_owned(),
            initial_cluster,
            members,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client_url = format!("https://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let log = fs::OpenOptions::new().create(true).append(true).open(&m.log_path).expect("member log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-token=it-chaos")
            // Ignored by etcd once the data dir holds a member (a restart).
            .arg("--initial-cluster-state=new")
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{}", m.metrics_port))
            .arg(format!("--cert-file={}", self.cert.display()))
            .arg(format!("--key-file={}", self.key.display()))
            .arg(format!("--trusted-ca-file={}", self.ca.display()))
            .arg("--client-cert-auth")
            // Loopback: short heartbeats make elections after a kill quick.
            .args(["--heartbeat-interval=50", "--election-timeout=500"])
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.members[i].child = Some(child);
    }

    /// Waits (bounded) until member `i` answers `/health` with `"health":"true"`.
    pub async fn wait_healthy(&mut self, i: usize) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let port = self.members[i].metrics_port;
        loop {
            if let Some(child) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("etcd member {i} exited with {status}; log tail:\n{}", self.log_tail(i, 30));
            }
            let answer = tokio::time::timeout(Duration::from_secs(2), http_get("127.0.0.1", port, "/health")).await;
            if let Ok(Ok((_, body))) = &answer
                && body.contains(r#""health":"true""#)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd member {i} not healthy within {READY_TIMEOUT:?} (last: {answer:?}); log tail:\n{}",
                self.log_tail(i, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's `https://127.0.0.1:<client port>`.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("https://127.0.0.1:{}", m.client_port)).collect()
    }

    /// Kills member `i` with SIGKILL and reaps it (no-op if it is down).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed member on its data dir and waits until it is healthy again.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = fs::read_to_string(&self.members[i].log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
