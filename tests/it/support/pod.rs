//! A Kubernetes pod on this machine, as kubelet makes one, in either of two runtimes (the same
//! methods for both, so that a scenario runs unchanged on each):
//!
//! - [`Runtime::Processes`]: the pod is a network namespace (only loopback, plus the pod's
//!   addresses on it) and a mount namespace where the pod's volumes sit at the paths its
//!   containers expect, this build's binary over `/usr/bin` (as the image's files) and
//!   `/etc/hosts` with the pod's host aliases. Containers are processes entered into both.
//! - [`Runtime::Docker`]: the pod is a "pause" container (no network but loopback, the pod's
//!   addresses added to it) and its containers are containers of our image
//!   ([`APISERVER_IMAGE`]) sharing its network namespace; the image's own files run, and each
//!   container sees its own volume mounts over the image, as kubelet mounts them.
//!
//! Either way a container runs with the pod's user and group and exactly its environment, and
//! each container's [`Mount`]s are bind-mounted at their paths.
//!
//! Nothing leaves the machine: the pod's network namespace has no route anywhere. Traffic that
//! a pod sends to the Kubernetes API or to a peer cluster is carried by `socat` relays from a
//! port inside the pod's namespace to a loopback port in another namespace. The test's own
//! clients reach the pod from the host's files ([`Pod::in_network`]), in either runtime.
//!
//! Needs root (`unshare`, `nsenter`, `mount`), `ip` and `socat`; [`Runtime::Docker`] a Docker
//! Engine.

use std::io::{Read as _, Seek as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::docker::{APISERVER_IMAGE, BASE_IMAGE, Container, docker};

/// The user and group of every container of Cilium's pod (`runAsUser`, `fsGroup`).
pub const POD_UID: u32 = 65532;

/// How long a container that runs to completion (an init container, a Job, an exec) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// What runs the pod's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Host processes in the pod's namespaces, with this build's binary as the image's files.
    Processes,
    /// Containers of our image on this machine's Docker Engine.
    Docker,
}

/// A file or directory of the host that a container sees at `path`: a volume, mounted as
/// kubelet mounts it.
#[derive(Clone, Debug)]
pub struct Mount {
    pub source: PathBuf,
    pub path: String,
    pub read_only: bool,
}

/// One container of the pod, as kubelet starts it.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    /// The command and its arguments; `argv[0]` is the image's file that runs.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
}

/// The pod's files besides the containers' mounts.
pub struct PodFs<'a> {
    /// Lines of the pod's `/etc/hosts`.
    pub hosts: String,
    /// [`Runtime::Processes`] only (Docker has the image's files, and each container's mounts):
    /// staged `/var/lib` and `/run` trees (owned and moded as kubelet would leave them) ...
    pub var_lib: &'a Path,
    pub run: &'a Path,
    /// ... and `(name, target)`: files of the image in `/usr/bin`, as symlinks (argv[0] stays
    /// the name, as when the image's own file is run).
    pub usr_bin: Vec<(&'a str, &'a Path)>,
}

pub struct Pod {
    pub name: String,
    sandbox: Sandbox,
    /// The pod's long-running containers, in start order.
    containers: Vec<Running>,
    /// The `socat` relays into and out of the pod.
    relays: Vec<(String, Child)>,
    /// Files of the pod (volumes, hosts file, image overlay, logs); kept while the pod runs.
    pub dir: PathBuf,
}

/// What holds the pod's namespaces.
enum Sandbox {
    /// `unshare` (then `sleep`), the parent of nothing: containers are entered with `nsenter`.
    Processes { pause: Child },
    /// The pause container, and its process on the host (the namespaces' holder).
    Docker { pause: Container, pid: u32, hosts: PathBuf },
}

/// A long-running container of the pod.
struct Running {
    spec: ContainerSpec,
    process: RunningProcess,
}

enum RunningProcess {
    /// Its stderr goes to `<dir>/<name>.log`.
    Process(Child),
    Container(Container),
}

impl Pod {
    /// Starts the pod's "pause", which holds the namespaces, with `addresses` on its loopback.
    pub fn start(runtime: Runtime, name: &str, dir: &Path, fs: &PodFs<'_>, addresses: &[&str]) -> Pod {
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, &fs.hosts).expect("hosts file");
        let sandbox = match runtime {
            Runtime::Processes => start_namespaces(name, dir, fs, &hosts, addresses),
            Runtime::Docker => start_pause_container(name, hosts, addresses),
        };
        Pod { name: name.to_owned(), sandbox, containers: Vec::new(), relays: Vec::new(), dir: dir.to_owned() }
    }

    /// The process that holds the pod's network namespace (for `nsenter -t`).
    pub fn pid(&self) -> u32 {
        match &self.sandbox {
            Sandbox::Processes { pause } => pause.id(),
            Sandbox::Docker { pid, .. } => *pid,
        }
    }

    /// Runs a container to completion (an init container, a Job), with its output; fails if it
    /// takes longer than [`RUN_TIMEOUT`].
    pub fn run(&self, spec: &ContainerSpec) -> Output {
        match &self.sandbox {
            Sandbox::Processes { .. } => output_within(self.process(spec), RUN_TIMEOUT),
            Sandbox::Docker { .. } => {
                let container = self.container(spec);
                let exited = output_within(docker_command(&["wait", container.name()]), RUN_TIMEOUT);
                assert!(exited.status.success(), "pod {}: docker wait {}: {exited:?}", self.name, spec.name);
                let code: i32 = String::from_utf8_lossy(&exited.stdout).trim().parse().expect("exit code");
                let logs = docker(&["logs", container.name()]);
                Output { status: ExitStatus::from_raw(code << 8), stdout: logs.stdout, stderr: logs.stderr }
            }
        }
    }

    /// Starts a long-running container.
    pub fn spawn(&mut self, spec: &ContainerSpec) {
        let process = match self.sandbox {
            Sandbox::Processes { .. } => {
                let log = std::fs::File::create(self.log_path(&spec.name)).expect("log file");
                let child = self.process(spec).stdout(Stdio::null()).stderr(log).spawn().expect("nsenter");
                RunningProcess::Process(child)
            }
            Sandbox::Docker { .. } => RunningProcess::Container(self.container(spec)),
        };
        self.containers.push(Running { spec: spec.clone(), process });
    }

    /// `argv` run in the running container `container`, as `kubectl exec` runs it: with the
    /// container's user, environment and mounts.
    pub fn exec(&self, container: &str, argv: &[&str]) -> Output {
        let running = self.containers.iter().find(|c| c.spec.name == container).expect("no such container");
        match &running.process {
            RunningProcess::Process(_) => {
                let spec = ContainerSpec { argv: argv.iter().map(|&a| a.to_owned()).collect(), ..running.spec.clone() };
                self.run(&spec)
            }
            RunningProcess::Container(c) => {
                let mut args = vec!["exec", c.name()];
                args.extend(argv);
                output_within(docker_command(&args), RUN_TIMEOUT)
            }
        }
    }

    /// A container entered into the pod's namespaces: a private mount namespace on top of the
    /// pod's where its mounts are bound, then the pod's user and exactly its environment.
    fn process(&self, spec: &ContainerSpec) -> Command {
        let mut script = String::from("set -e\n");
        for mount in &spec.mounts {
            let options = if mount.read_only { "-o ro " } else { "" };
            script.push_str(&format!("mount --bind {options}{} {}\n", mount.source.display(), mount.path));
        }
        // sh exports the PWD it sets; the container gets exactly its own environment.
        script.push_str(&format!(
            "unset PWD\nexec setpriv --reuid={POD_UID} --regid={POD_UID} --clear-groups -- \"$@\"\n"
        ));
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid().to_string(), "-m", "-n", "--"])
            .args(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", &script, "sh"])
            .args(&spec.argv)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// A container of our image in the pause container's network, started detached: argv[0]
    /// as the entrypoint (the image's file of that path runs), the pod's user, the chart's
    /// securityContext (no capabilities, no privilege escalation), the pod's hosts file, the
    /// container's mounts and environment.
    fn container(&self, spec: &ContainerSpec) -> Container {
        let Sandbox::Docker { pause, hosts, .. } = &self.sandbox else { unreachable!("a Docker pod") };
        let mut options: Vec<String> = vec![
            format!("--network=container:{}", pause.name()),
            format!("--user={POD_UID}:{POD_UID}"),
            "--cap-drop=ALL".into(),
            "--security-opt=no-new-privileges".into(),
            // `--add-host` is refused with another container's network: kubelet's way instead.
            bind(hosts, "/etc/hosts", true),
        ];
        options.extend(spec.mounts.iter().map(|m| bind(&m.source, &m.path, m.read_only)));
        options.extend(spec.env.iter().map(|(k, v)| format!("--env={k}={v}")));
        let (entrypoint, args) = spec.argv.split_first().expect("argv");
        options.push(format!("--entrypoint={entrypoint}"));
        Container::run(&format!("{}-{}", self.name, spec.name), &options, APISERVER_IMAGE, args)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// A container's (or relay's) log so far (for failure messages).
    pub fn log(&self, name: &str) -> String {
        match self.containers.iter().find(|c| c.spec.name == name).map(|c| &c.process) {
            Some(RunningProcess::Container(container)) => container.logs_tail(10_000),
            _ => std::fs::read_to_string(self.log_path(name)).unwrap_or_default(),
        }
    }

    /// Every container's and relay's log, for failure messages.
    pub fn logs(&self) -> String {
        let names = self.containers.iter().map(|c| &c.spec.name).chain(self.relays.iter().map(|(n, _)| n));
        let logs: Vec<String> = names.map(|n| format!("--- {n}:\n{}", self.log(n))).collect();
        logs.join("\n")
    }

    /// Fails if a container exited: a pod whose container died is not what is being tested.
    pub fn assert_running(&mut self) {
        let mut dead = Vec::new();
        for running in &mut self.containers {
            let exited = match &mut running.process {
                RunningProcess::Process(child) => child.try_wait().expect("wait").map(|s| s.to_string()),
                RunningProcess::Container(container) => {
                    (!container.is_running()).then(|| format!("exit code {}", container.exit_code()))
                }
            };
            if let Some(status) = exited {
                dead.push(format!("{} exited ({status})", running.spec.name));
            }
        }
        if !dead.is_empty() {
            panic!("pod {}: {}\n{}", self.name, dead.join(", "), self.logs());
        }
    }

    /// Fails unless every running container's process has exactly its environment and runs
    /// as the pod's user and group, as `/proc` shows them.
    pub fn assert_as_specified(&self) {
        for running in &self.containers {
            let (pid, runtime_adds) = match &running.process {
                RunningProcess::Process(child) => (child.id(), None),
                // runc sets HOME from the image's /etc/passwd when the environment has none
                // (under kubelet's runtimes too).
                RunningProcess::Container(container) => (container.pid(), Some("HOME")),
            };
            let name = &running.spec.name;
            let mut environment = process_environment(pid);
            environment.retain(|(key, _)| Some(key.as_str()) != runtime_adds);
            let mut expected = running.spec.env.clone();
            expected.sort();
            assert_eq!(environment, expected, "pod {}: {name}'s environment", self.name);
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            for ids in status.lines().filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:")) {
                let all_pod = ids.split_whitespace().skip(1).all(|id| id == POD_UID.to_string());
                assert!(all_pod, "pod {}: {name} runs as {ids}", self.name);
            }
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
        let child = self
            .in_network("socat")
            .args([&listen, &connect])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("socat");
        self.relays.push((name.to_owned(), child));
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The containers before the pause that holds their namespaces (its field drops after).
        for running in self.containers.drain(..) {
            if let RunningProcess::Process(mut child) = running.process {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for (_, child) in &mut self.relays {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Sandbox::Processes { pause } = &mut self.sandbox {
            let _ = pause.kill();
            let _ = pause.wait();
        }
    }
}

/// The environment of process `pid`, sorted.
fn process_environment(pid: u32) -> Vec<(String, String)> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let mut environment: Vec<(String, String)> = String::from_utf8_lossy(&environ)
        .split_terminator('\0')
        .map(|entry| entry.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).expect("KEY=VALUE"))
        .collect();
    environment.sort();
    environment
}

/// Shell lines that put `addresses` on the loopback of the namespace they run in.
fn loopback_script(addresses: &[&str]) -> String {
    let mut script = String::from("set -e\nip link set lo up\n");
    for address in addresses {
        script.push_str(&format!("ip addr add {address} dev lo\n"));
    }
    script
}

/// [`Runtime::Processes`]: new mount and network namespaces, held by a `sleep`.
fn start_namespaces(name: &str, dir: &Path, fs: &PodFs<'_>, hosts: &Path, addresses: &[&str]) -> Sandbox {
    let upper = dir.join("usr-bin-upper");
    let work = dir.join("usr-bin-work");
    std::fs::create_dir_all(&upper).expect("overlay upper");
    std::fs::create_dir_all(&work).expect("overlay work");
    for (file, target) in &fs.usr_bin {
        std::os::unix::fs::symlink(target, upper.join(file)).expect("image file");
    }
    let ready = dir.join("pause-ready");
    let mut script = loopback_script(addresses);
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
    let mut pause = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (needs root and util-linux)");
    for _ in 0..200 {
        if ready.exists() {
            return Sandbox::Processes { pause };
        }
        if let Some(status) = pause.try_wait().expect("wait") {
            panic!("pod {name}: setting up its namespaces failed ({status})");
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "a few polls of 25 ms while the sandbox starts, before the pod runs"
        )]
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = pause.kill();
    let _ = pause.wait();
    panic!("pod {name}: namespaces not ready within 5s");
}

/// [`Runtime::Docker`]: the pause container, the base image (scratch and the C library) running
/// the host's `sleep`, with no network but its loopback; the pod's addresses are added to that
/// from the host, in its namespace.
fn start_pause_container(name: &str, hosts: PathBuf, addresses: &[&str]) -> Sandbox {
    let options = [
        "--network=none".to_owned(),
        // Kubernetes' pause image runs as 65535, with nothing to do as root.
        "--user=65535:65535".to_owned(),
        bind(Path::new("/usr/bin/sleep"), "/pause", true),
        "--entrypoint=/pause".to_owned(),
    ];
    let pause = Container::run(&format!("{name}-pause"), &options, BASE_IMAGE, &["infinity".to_owned()]);
    let pid = pause.pid();
    assert!(pid != 0, "pod {name}: the pause container is not running: {}", pause.logs_tail(20));
    let output = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "--", "sh", "-c", &loopback_script(addresses)])
        .stdin(Stdio::null())
        .output()
        .expect("nsenter");
    assert!(output.status.success(), "pod {name}: addresses: {}", String::from_utf8_lossy(&output.stderr));
    Sandbox::Docker { pause, pid, hosts }
}

/// `--mount` for a bind mount (fails, unlike `-v`, when the source does not exist).
fn bind(source: &Path, target: &str, read_only: bool) -> String {
    let read_only = if read_only { ",readonly" } else { "" };
    format!("--mount=type=bind,source={},target={target}{read_only}", source.display())
}

fn docker_command(args: &[&str]) -> Command {
    let mut command = Command::new("docker");
    command.args(args);
    command
}

/// Runs `command` to completion with its output, killed and failed after `limit`. The output
/// goes through files: pipes would need reading while waiting.
fn output_within(mut command: Command, limit: Duration) -> Output {
    let (mut stdout, mut stderr) = (tempfile::tempfile().expect("temp file"), tempfile::tempfile().expect("temp file"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("dup"))
        .stderr(stderr.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?}: still running after {limit:?}");
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "a bounded wait for a docker command, as its blocking caller asks"
        )]
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |file: &mut std::fs::File| {
        let mut bytes = Vec::new();
        file.rewind().expect("rewind");
        file.read_to_end(&mut bytes).expect("read");
        bytes
    };
    Output { status, stdout: read(&mut stdout), stderr: read(&mut stderr) }
}
