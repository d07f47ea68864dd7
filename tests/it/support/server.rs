//! The `clustermesh` role as a child process (the real binary), fed by the fake Kubernetes API
//! through a kubeconfig, writing to its embedded store or to an attached etcd. It can be
//! SIGKILLed and started again with the same flags.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::Pki;
use super::etcd::http_get;

pub const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

/// Where the server writes.
pub enum StoreMode {
    /// Its own embedded store, served on this `127.0.0.1` port with the PKI's server certificate.
    Embedded { client_port: u16 },
    /// A real etcd at these client URLs (Cilium's etcd config file, client certificate `root`).
    Attached { endpoints: Vec<String> },
}

pub struct ServerProcess {
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    health_port: u16,
    starts: usize,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A kubeconfig for a plain-HTTP API server without authentication.
pub fn write_kubeconfig(path: &Path, server_url: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server_url}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\n"
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

impl ServerProcess {
    /// Starts `clustermesh --cluster-name cluster1 --cluster-id 1` against the API at
    /// `api_url`. Does not wait for readiness: see [`ServerProcess::wait_ready`].
    pub fn start(pki: &Pki, api_url: &str, mode: &StoreMode) -> ServerProcess {
        Self::start_with(pki, api_url, mode, &[])
    }

    /// [`ServerProcess::start`] with more flags.
    pub fn start_with(pki: &Pki, api_url: &str, mode: &StoreMode, extra: &[String]) -> ServerProcess {
        let dir = tempfile::Builder::new().prefix("it-server-").tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, api_url);
        let health_port = free_port();
        let mut args: Vec<String> = vec![
            "--log-level=warn".into(),
            "clustermesh".into(),
            "--cluster-name=cluster1".into(),
            "--cluster-id=1".into(),
            format!("--k8s-kubeconfig-path={}", kubeconfig.display()),
            format!("--health-port={health_port}"),
            "--health-bind-address=127.0.0.1".into(),
            "--prometheus-serve-addr=".into(),
        ];
        match mode {
            StoreMode::Embedded { client_port } => {
                args.push(format!("--listen-client-urls=https://127.0.0.1:{client_port}"));
                args.push(format!("--cert-file={}", pki.server_cert_path().display()));
                args.push(format!("--key-file={}", pki.server_key_path().display()));
                args.push(format!("--trusted-ca-file={}", pki.ca_path().display()));
            }
            StoreMode::Attached { endpoints } => {
                let cert = pki.client("root");
                let config: PathBuf = dir.path().join("etcd-config.yaml");
                let text = format!(
                    "endpoints:\n{}trusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                    endpoints.iter().map(|e| format!("- {e}\n")).collect::<String>(),
                    pki.ca_path().display(),
                    cert.cert_path.display(),
                    cert.key_path.display()
                );
                std::fs::write(&config, text).expect("write etcd config");
                args.push("--kvstore=etcd".into());
                args.push(format!("--kvstore-opt=etcd.config={}", config.display()));
            }
        }
        args.extend_from_slice(extra);
        let mut server = ServerProcess { args, dir, child: None, health_port, starts: 0 };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        let child = Command::new(BIN)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the server");
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL: no drain, no lease revoke, no goodbye to watchers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the binary again with the same flags (after [`ServerProcess::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// How many times the binary was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// Waits until `/readyz` answers 200 (every initial sync done).
    ///
    /// # Panics
    /// If the process exited by itself (a crash is a failure, never restarted here), or is not
    /// ready in time; with the tail of its log.
    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.assert_alive();
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), http_get("127.0.0.1", self.health_port, "/readyz")).await
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server was not ready within {within:?}; log tail:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics (with the log tail) if the process, when it should be running, has exited.
    pub fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("the server exited by itself with {status}; log tail:\n{}", self.log_tail(40));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
