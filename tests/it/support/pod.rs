//! A Kubernetes pod on this machine, as kubelet makes one: its own network namespace (only
//! loopback, plus the pod IP on it) and its own mount namespace where the pod's volumes sit at
//! the paths its containers expect, the image's files over `/usr/bin`, and `/etc/hosts` with
//! the pod's host aliases. Containers are processes entered into both namespaces, with the
//! pod's user and group and exactly the container's environment.
//!
//! Nothing leaves the machine: a new network namespace has no route anywhere. Traffic that a
//! pod sends to the Kubernetes API or to a peer cluster is carried by `socat` relays from a
//! port inside the pod's namespace to a loopback port in another namespace.
//!
//! Needs root (`unshare`, `nsenter`, `mount`), `ip` and `socat`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The user and group of every container of Cilium's pod (`runAsUser`, `fsGroup`).
pub const POD_UID: u32 = 65532;

pub struct Pod {
    pub name: String,
    pause: Child,
    children: Vec<(String, Child)>,
    /// Files of the pod (volumes, hosts file, image overlay); kept while the pod runs.
    pub dir: PathBuf,
}

/// What the pod's mount namespace shows over the host's.
pub struct PodFs<'a> {
    /// Staged `/var/lib` and `/run` trees (owned and moded as kubelet would leave them).
    pub var_lib: &'a Path,
    pub run: &'a Path,
    /// Lines of the pod's `/etc/hosts`.
    pub hosts: String,
    /// `(name, target)`: files of the image in `/usr/bin`, as symlinks (argv[0] stays the
    /// name, as when the image's own file is run).
    pub usr_bin: Vec<(&'a str, &'a Path)>,
}

impl Pod {
    /// Starts the pod's "pause" process, which holds the namespaces.
    pub fn start(name: &str, dir: &Path, fs: &PodFs<'_>, addresses: &[&str]) -> Pod {
        let upper = dir.join("usr-bin-upper");
        let work = dir.join("usr-bin-work");
        std::fs::create_dir_all(&upper).expect("overlay upper");
        std::fs::create_dir_all(&work).expect("overlay work");
        for (file, target) in &fs.usr_bin {
            std::os::unix::fs::symlink(target, upper.join(file)).expect("image file");
        }
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, &fs.hosts).expect("hosts file");
        let ready = dir.join("pause-ready");
        let mut script = String::from("set -e\nip link set lo up\n");
        for address in addresses {
            script.push_str(&format!("ip addr add {address} dev lo\n"));
        }
        script.push_str(&format!(
            "mount -t tmpfs -o mode=0755 tmpfs /var/lib\ncp -a {var_lib}/. /var/lib/\n\
             mount -t tmpfs -o mode=0755 tmpfs /run\ncp -a {run}/. /run/\n\
             mount --bind {hosts} /etc/hosts\n\
             mount -t overlay overlay -o lowerdir=/usr/bin,upperdir={upper},workdir={work} /usr/bin\n\
             touch {ready}\nexec sleep 3600\n",
            var_lib = fs.var_lib.display(),
            run = fs.run.display(),
            hosts = hosts.display(),
            upper = upper.display(),
            work = work.display(),
            ready = ready.display(),
        ));
        let pause = Command::new("unshare")
            .args(["--mount", "--net", "--propagation", "private", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (needs root and util-linux)");
        let mut pod = Pod { name: name.to_owned(), pause, children: Vec::new(), dir: dir.to_owned() };
        for _ in 0..200 {
            if ready.exists() {
                return pod;
            }
            if let Some(status) = pod.pause.try_wait().expect("wait") {
                panic!("pod {name}: setting up its namespaces failed ({status})");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("pod {name}: namespaces not ready within 5s");
    }

    pub fn pid(&self) -> u32 {
        self.pause.id()
    }

    /// `nsenter` into the pod's mount and network namespaces as the pod's user, with exactly
    /// `env` as the environment.
    pub fn container(&self, argv: &[String], env: &[(String, String)]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid().to_string(), "-m", "-n", "-S", &POD_UID.to_string(), "-G", &POD_UID.to_string()])
            .arg("--")
            .args(argv)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// Runs a container to completion (an init container), with its output.
    pub fn run(&self, argv: &[String], env: &[(String, String)]) -> Output {
        self.container(argv, env).output().expect("nsenter")
    }

    /// Starts a long-running container; its stderr goes to `<dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, argv: &[String], env: &[(String, String)]) {
        let log = std::fs::File::create(self.log_path(name)).expect("log file");
        let child = self.container(argv, env).stdout(Stdio::null()).stderr(log).spawn().expect("nsenter");
        self.children.push((name.to_owned(), child));
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The container's log so far (for failure messages).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Every container's log, for failure messages.
    pub fn logs(&self) -> String {
        let logs: Vec<String> = self.children.iter().map(|(n, _)| format!("--- {n}:\n{}", self.log(n))).collect();
        logs.join("\n")
    }

    /// Fails if a container exited: a pod whose container died is not what is being tested.
    pub fn assert_running(&mut self) {
        let mut dead = Vec::new();
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().expect("wait") {
                dead.push(format!("{name} exited ({status})"));
            }
        }
        if !dead.is_empty() {
            panic!("pod {}: {}\n{}", self.name, dead.join(", "), self.logs());
        }
    }

    /// A command run in the pod's network namespace only (the host's files): the test's
    /// clients (etcdctl, curl) reaching the pod's ports as another pod on the node would.
    pub fn in_network(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.args(["-t", &self.pid().to_string(), "-n", "--", program]).stdin(Stdio::null());
        command
    }

    /// A `socat` relay: connections to `listen` (`IP:PORT`) inside this pod's network
    /// namespace are carried to `target` (`IP:PORT`) inside the network namespace of process
    /// `target_pid`. `tls` terminates TLS with `(cert, key)` on the listening side.
    pub fn relay(&mut self, name: &str, listen: &str, target_pid: u32, target: &str, tls: Option<(&Path, &Path)>) {
        let (ip, port) = listen.rsplit_once(':').expect("IP:PORT");
        let listen = match tls {
            Some((cert, key)) => format!(
                "OPENSSL-LISTEN:{port},bind={ip},reuseaddr,fork,cert={},key={},verify=0",
                cert.display(),
                key.display()
            ),
            None => format!("TCP-LISTEN:{port},bind={ip},reuseaddr,fork"),
        };
        // socat's address syntax: the colons of the inner address are escaped.
        let connect = format!("EXEC:nsenter -t {target_pid} -n -- socat STDIO TCP\\:{}", target.replace(':', "\\:"));
        let log = std::fs::File::create(self.log_path(name)).expect("log file");
        let child = Command::new("nsenter")
            .args(["-t", &self.pid().to_string(), "-n", "--", "socat", &listen, &connect])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("socat");
        self.children.push((name.to_owned(), child));
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.pause.kill();
        let _ = self.pause.wait();
    }
}
