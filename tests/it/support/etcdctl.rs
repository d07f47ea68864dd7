//! Debian's `etcdctl` (3.5.16, see [`super::etcd::find_binary`]) run as a subprocess against an
//! mTLS endpoint.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::{ClientCert, Pki};
use super::etcd::find_binary;

/// Hard bound on one etcdctl run (etcdctl's own `--command-timeout` is 5 s per request).
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// etcdctl bound to one endpoint and one client identity. The certificate files must outlive it
/// (keep the [`Pki`] alive).
#[derive(Debug, Clone)]
pub struct Etcdctl {
    /// `https://host:port`
    pub endpoint: String,
    pub cacert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What one etcdctl run produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exited with status 0 (false when killed at the timeout).
    pub status_success: bool,
    /// Exit code, `None` when killed by a signal.
    pub code: Option<i32>,
    /// Killed because it ran longer than its timeout (stdout/stderr hold what came before).
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with stdout and stderr unless the run succeeded; returns `self` for chaining.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status_success,
            "etcdctl failed (code {:?}, timed out: {})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.timed_out, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the run failed (exited non-zero, not merely timed out).
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.status_success && !self.timed_out,
            "expected etcdctl to fail (code {:?}, timed out: {})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.timed_out,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout split into lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

impl Etcdctl {
    /// etcdctl for `endpoint` (`host:port` or `https://host:port`) with a fresh client
    /// certificate for `cn` from `pki`.
    pub fn new(endpoint: &str, pki: &Pki, cn: &str) -> Etcdctl {
        Etcdctl::with_cert(endpoint, pki.ca_path(), &pki.client(cn))
    }

    /// etcdctl for `endpoint` with an explicit CA file and client certificate (e.g. a foreign or
    /// expired one).
    pub fn with_cert(endpoint: &str, ca_path: &Path, cert: &ClientCert) -> Etcdctl {
        let endpoint = if endpoint.contains("://") { endpoint.to_string() } else { format!("https://{endpoint}") };
        Etcdctl { endpoint, cacert: ca_path.to_path_buf(), cert: cert.cert_path.clone(), key: cert.key_path.clone() }
    }

    /// Runs `etcdctl <global flags> <args>` and waits for it (at most [`DEFAULT_RUN_TIMEOUT`]).
    /// Blocking: from async tests use [`Etcdctl::run_async`].
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_timeout(args, None, DEFAULT_RUN_TIMEOUT)
    }

    /// Like [`Etcdctl::run`], feeding `stdin` (then EOF), e.g. for interactive `etcdctl txn`:
    /// compares, blank line, success ops, blank line, failure ops, blank line (etcdctl
    /// fails with "Error: EOF" without the last blank line).
    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        self.run_with_timeout(args, Some(stdin), DEFAULT_RUN_TIMEOUT)
    }

    /// Runs etcdctl and kills it after `timeout`, returning what it printed so far with
    /// `timed_out` set. Useful for commands that never end on their own, such as `watch`.
    pub fn run_with_timeout(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Output {
        let bin = find_binary("etcdctl", "ETCDCTL_BIN");
        let mut cmd = Command::new(&bin);
        // ETCDCTL_* variables would clash with the flags below.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg(format!("--cacert={}", self.cacert.display()))
            .arg(format!("--cert={}", self.cert.display()))
            .arg(format!("--key={}", self.key.display()))
            .args(["--command-timeout=5s", "--dial-timeout=3s"])
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin.display()));

        // Pipes are drained on their own threads so a chatty child never blocks on a full pipe.
        let writer = stdin.map(|input| {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            let input = input.to_string();
            // An early exit of etcdctl closes the pipe; its output tells what went wrong.
            std::thread::spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            })
        });
        let mut out_pipe = child.stdout.take().expect("stdout is piped");
        let mut err_pipe = child.stderr.take().expect("stderr is piped");
        let out_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out_pipe.read_to_end(&mut buf);
            buf
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err_pipe.read_to_end(&mut buf);
            buf
        });

        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().expect("wait for killed etcdctl");
                }
                #[expect(clippy::disallowed_methods, reason = "blocking by design: async tests call run_async")]
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("wait for etcdctl {args:?}: {e}"),
            }
        };
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        let stdout = out_reader.join().expect("stdout reader");
        let stderr = err_reader.join().expect("stderr reader");
        Output {
            status_success: status.success() && !timed_out,
            code: status.code(),
            timed_out,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// [`Etcdctl::run`] on tokio's blocking pool.
    pub async fn run_async(&self, args: &[&str]) -> Output {
        self.run_blocking(args, None, DEFAULT_RUN_TIMEOUT).await
    }

    /// [`Etcdctl::run_with_stdin`] on tokio's blocking pool.
    pub async fn run_with_stdin_async(&self, args: &[&str], stdin: &str) -> Output {
        self.run_blocking(args, Some(stdin), DEFAULT_RUN_TIMEOUT).await
    }

    /// [`Etcdctl::run_with_timeout`] on tokio's blocking pool.
    pub async fn run_with_timeout_async(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Output {
        self.run_blocking(args, stdin, timeout).await
    }

    async fn run_blocking(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Output {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            this.run_with_timeout(&args, stdin.as_deref(), timeout)
        })
        .await
        .unwrap_or_else(|e| match e.try_into_panic() {
            // Keep the original panic message (e.g. "`etcdctl` not found").
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("etcdctl task: {e}"),
        })
    }
}
