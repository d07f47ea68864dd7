//! Cilium's own Helm chart runs our image unchanged: every pod of
//! `tests/fixtures/cilium-chart-pods/` (Cilium 1.16.19 and 1.20.0, value sets A to D) is
//! replayed the way kubelet runs it — the Secrets' files with the Secrets' subjects, the
//! ConfigMaps, the file baked into the image, the init container first, then every container
//! with its exact argv, environment and volume mounts, as uid 65532, in the pod's own
//! namespaces. The whole replay runs twice: with host processes and this build's binary as the
//! image's files, and as containers of our image on Docker ([`Runtime`]).
//!
//! For each pod: etcd-init exits 0; the etcd container serves Cilium's users over mTLS and its
//! metrics; the apiserver mirrors the test's Kubernetes API (reached through in-cluster
//! configuration) and turns ready; kvstoremesh turns ready. Set D adds its peer `cluster2` as a
//! second pod: kvstoremesh caches it, and an agent with the chart's agent certificate reads it
//! from the cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::eventually;
use crate::support::fake_k8s::{FakeApiServer, ResourceSpec};
use crate::support::pod::{ContainerSpec, Mount, POD_UID, Pod, PodFs, Runtime};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
/// Where the pod reaches the Kubernetes API (kubelet's `KUBERNETES_SERVICE_HOST/PORT`).
const K8S_PORT: u16 = 6443;
/// The pod IP of the 1.16 chart's `$(HOSTNAME_IP)`: bound on the pod's own loopback.
const POD_IP: &str = "10.244.0.10";
const SERVICE_NAME: &str = "clustermesh-apiserver.kube-system.svc";

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cilium-chart-pods");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".yaml") && name != "commands-index.yaml"
        })
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture YAML")
}

/// One cluster of the mesh, as the chart's values and `cilium-config` name it.
#[derive(Clone, Copy)]
struct Cluster {
    name: &'static str,
    id: u32,
}

const CLUSTER1: Cluster = Cluster { name: "cluster1", id: 1 };
const CLUSTER2: Cluster = Cluster { name: "cluster2", id: 2 };

/// One CA for the mesh (the chart's `Cilium CA`, shared between clusters as
/// `cilium clustermesh` requires) and the Secrets of each cluster.
struct MeshPki {
    ca: clustermesh_apiserver::pki::Authority,
}

struct Secret {
    ca: String,
    cert: String,
    key: String,
}

impl MeshPki {
    /// The Secret `name` as the fixture describes it: subject and SANs from `referenced_objects`.
    fn secret(&self, fixture: &Value, secret: &str, cluster: Cluster) -> Secret {
        let secrets =
            fixture["referenced_objects"]["TLS Secrets rendered by tls-helm"].as_array().expect("TLS Secrets");
        let spec = secrets.iter().find(|s| s["secret"] == secret).unwrap_or_else(|| panic!("no Secret {secret}"));
        let subject = spec["tls.crt_subject"].as_str().expect("subject");
        let cn = subject.strip_prefix("CN = ").expect("CN = ...").replace("cluster1", cluster.name);
        let sans: Vec<String> = spec["subjectAltName"]
            .as_str()
            .map(|s| {
                s.split(", ")
                    .map(|san| san.trim_start_matches("DNS:").trim_start_matches("IP Address:").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        // The chart's certificates all carry server and client usages.
        let issued = self.ca.server(&cn, &sans).expect("issue");
        Secret { ca: self.ca.cert_pem(), cert: issued.cert_pem, key: issued.key_pem }
    }
}

/// The files of the pod's volumes, staged under `root` with kubelet's ownership and modes, at
/// the paths the containers see them (one tree for `/var/lib`, one for `/run`).
struct Staged {
    var_lib: PathBuf,
    run: PathBuf,
}

fn write_owned(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(POD_UID), Some(POD_UID)).expect("chown");
}

/// Where a file of the pod lives in the staged trees (`/var/run` is `/run`).
fn staged_path(staged: &Staged, path: &str) -> PathBuf {
    if let Some(rest) = path.strip_prefix("/var/lib/") {
        staged.var_lib.join(rest)
    } else if let Some(rest) = path.strip_prefix("/var/run/").or_else(|| path.strip_prefix("/run/")) {
        staged.run.join(rest)
    } else {
        panic!("a volume outside /var/lib and /run: {path}")
    }
}

/// Stages every file every container of the pod sees, from the fixture's descriptions.
fn stage_volumes(
    fixture: &Value,
    pki: &MeshPki,
    cluster: Cluster,
    peer_users: &str,
    root: &Path,
    k8s_ca: &str,
) -> Staged {
    let staged = Staged { var_lib: root.join("var-lib"), run: root.join("run") };
    std::fs::create_dir_all(&staged.var_lib).unwrap();
    std::fs::create_dir_all(&staged.run).unwrap();
    let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
    let views = fixture["filesystem_view_per_container"].as_object().expect("filesystem view");
    for files in views.values() {
        for file in files.as_array().expect("files") {
            let (path, from) = (file["path"].as_str().expect("path"), file["from"].as_str().expect("from"));
            if from.starts_with("emptyDir") {
                let dir = staged_path(&staged, path);
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::chown(&dir, Some(POD_UID), Some(POD_UID)).unwrap();
                continue;
            }
            if from.starts_with("baked into the image") {
                // Our image's own file (docker/etcd-config.yaml), as the Dockerfile bakes it: for
                // the process runtime's pod. No volume holds it, so containers of the image
                // see the image's own.
                let baked =
                    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/etcd-config.yaml"))
                        .expect("baked etcd-config.yaml");
                write_owned(&staged_path(&staged, path), &baked, 0o644);
                continue;
            }
            if from.starts_with("configMap clustermesh-remote-users") {
                // The volume's defaultMode, as for the Secrets: 0400 in every fixture.
                write_owned(&staged_path(&staged, path), peer_users, 0o400);
                continue;
            }
            if from.starts_with("secret cilium-kvstoremesh") {
                let peers =
                    &fixture["agent_side"]["Secret cilium-kvstoremesh (read by the kvstoremesh container; decoded)"];
                let dir = staged_path(&staged, path.trim_end_matches("<one file per key>"));
                std::fs::create_dir_all(&dir).unwrap();
                if cluster.name == CLUSTER1.name
                    && let Some(peers) = peers.as_object()
                {
                    for (peer, config) in peers {
                        write_owned(&dir.join(peer), config.as_str().expect("peer config"), 0o400);
                    }
                }
                continue;
            }
            let rest = from.strip_prefix("secret ").unwrap_or_else(|| panic!("unknown file source {from:?}"));
            let (secret, key) = rest.split_once(" key ").expect("secret NAME key KEY");
            let key = key.trim_end_matches(" (optional source)");
            let secret = secrets.entry(secret.to_owned()).or_insert_with(|| pki.secret(fixture, secret, cluster));
            let contents = match key {
                "ca.crt" => &secret.ca,
                "tls.crt" => &secret.cert,
                "tls.key" => &secret.key,
                other => panic!("unknown Secret key {other}"),
            };
            write_owned(&staged_path(&staged, path), contents, 0o400);
        }
    }
    // The service account kubelet mounts for in-cluster configuration.
    let sa = staged.run.join("secrets/kubernetes.io/serviceaccount");
    write_owned(&sa.join("token"), "test-token", 0o644);
    write_owned(&sa.join("ca.crt"), k8s_ca, 0o644);
    write_owned(&sa.join("namespace"), "kube-system", 0o644);
    staged
}

/// A container's environment as kubelet builds it: the fixture's variables (cluster identity
/// substituted), the service's variables, and the image's PATH.
fn container_env(container: &Value, cluster: Cluster, pod_uid: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
        ("HOSTNAME".to_owned(), format!("clustermesh-apiserver-{}", cluster.name)),
        ("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), K8S_PORT.to_string()),
    ];
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("name").to_owned();
        let value = match (var["resolves_to"].as_str(), name.as_str()) {
            (None, _) => continue,
            (_, "CLUSTER_NAME" | "CILIUM_CLUSTER_NAME") => cluster.name.to_owned(),
            (_, "CLUSTER_ID") => cluster.id.to_string(),
            (_, "INITIAL_CLUSTER_TOKEN") => pod_uid.to_owned(),
            (_, "HOSTNAME_IP") => POD_IP.to_owned(),
            (Some(value), _) => value.to_owned(),
        };
        env.push((name, value));
    }
    env
}

/// Where the service account's token, CA and namespace are (kubelet mounts them in every
/// container, `automountServiceAccountToken`).
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A container of the pod `pod` (the fixture's), as kubelet starts it.
fn container_spec(pod: &Value, container: &Value, staged: &Staged, cluster: Cluster, pod_uid: &str) -> ContainerSpec {
    let env = container_env(container, cluster, pod_uid);
    ContainerSpec {
        name: container["name"].as_str().expect("name").to_owned(),
        argv: argv(container, &env),
        env,
        mounts: mounts(pod, container, staged),
    }
}

/// The container's volume mounts, and the service account.
fn mounts(pod: &Value, container: &Value, staged: &Staged) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = volume_mounts(container)
        .map(|mount| Mount {
            source: volume_dir(pod, mount["volume"].as_str().expect("volume"), staged),
            path: mount["mountPath"].as_str().expect("mountPath").to_owned(),
            read_only: mount["readOnly"].as_bool().unwrap_or(false),
        })
        .collect();
    mounts.push(Mount { source: staged_path(staged, SERVICE_ACCOUNT), path: SERVICE_ACCOUNT.into(), read_only: true });
    mounts
}

fn volume_mounts(container: &Value) -> impl Iterator<Item = &Value> {
    container["volumeMounts"].as_array().into_iter().flatten()
}

/// Where `volume` is staged: at the first path a container of `pod` mounts it, so that every
/// container that mounts it (etcd-init and etcd, the emptyDir) has the same directory.
fn volume_dir(pod: &Value, volume: &str, staged: &Staged) -> PathBuf {
    let containers = pod["initContainers"].as_array().into_iter().chain(pod["containers"].as_array()).flatten();
    let path = containers
        .flat_map(volume_mounts)
        .find(|mount| mount["volume"] == volume)
        .and_then(|mount| mount["mountPath"].as_str())
        .unwrap_or_else(|| panic!("volume {volume} mounted nowhere"));
    staged_path(staged, path)
}

/// kubelet's `$(VAR)` expansion of command and args.
fn argv(container: &Value, env: &[(String, String)]) -> Vec<String> {
    let words =
        container["command"].as_array().into_iter().flatten().chain(container["args"].as_array().into_iter().flatten());
    words
        .map(|word| {
            let mut text = word.as_str().expect("argv word").to_owned();
            for (name, value) in env {
                text = text.replace(&format!("$({name})"), value);
            }
            text
        })
        .collect()
}

/// The objects this cluster's Kubernetes API serves: one node, and CoreDNS as kubeadm
/// deploys it (for the chart's CoreDNS Job).
fn seed(fake: &FakeApiServer, cluster: Cluster) {
    fake.apply_yaml(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: node-{c}\nspec:\n  addresses:\n  - type: InternalIP\n    ip: 10.{id}.0.1\n",
        c = cluster.name,
        id = cluster.id
    ));
    fake.register(ResourceSpec::new("apps", "v1", "deployments", "Deployment", true));
    fake.apply(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
        "data": {"Corefile": ".:53 {\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n    }\n    forward . /etc/resolv.conf\n}\n"},
    }));
    fake.apply(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "kube-dns"}}, "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}},
            "spec": {"containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.12.2"}]}}},
    }));
}

/// etcdctl (Debian's) in the pod's network, as user `cn`.
struct Etcdctl<'a> {
    pod: &'a Pod,
    ca: PathBuf,
    dir: PathBuf,
    endpoint: String,
}

impl Etcdctl<'_> {
    fn user(&self, pki: &MeshPki, cn: &str) -> (PathBuf, PathBuf) {
        let issued = pki.ca.server(cn, &[]).expect("issue");
        let (cert, key) = (self.dir.join(format!("{cn}.crt")), self.dir.join(format!("{cn}.key")));
        std::fs::write(&cert, issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        (cert, key)
    }

    fn run(&self, user: &(PathBuf, PathBuf), args: &[&str]) -> Result<String, String> {
        let output = self
            .pod
            .in_network("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg(format!("--cacert={}", self.ca.display()))
            .arg(format!("--cert={}", user.0.display()))
            .arg(format!("--key={}", user.1.display()))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .expect("etcdctl");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if output.status.success() { Ok(text(&output.stdout)) } else { Err(text(&output.stderr)) }
    }
}

fn curl(pod: &Pod, url: &str) -> Option<String> {
    let output = pod.in_network("curl").args(["-sf", "--max-time", "5", url]).output().expect("curl");
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What every pod of one replay shares.
struct Replay<'a> {
    runtime: Runtime,
    pki: &'a MeshPki,
    /// The image's executable for [`Runtime::Processes`], where the pod's user can read it.
    binary: &'a Path,
}

/// A running pod of one cluster, with what the checks need.
struct RunningPod {
    pod: Pod,
    fake: FakeApiServer,
    version: String,
    staged: Staged,
}

async fn start_pod(replay: &Replay<'_>, fixture: &Value, cluster: Cluster, root: &Path) -> RunningPod {
    let version = fixture["fixture"]["cilium_release"].as_str().map(str::to_owned).unwrap_or_default();
    // The test's API serves the MCS-API ServiceExports in `v1alpha1`; Cilium 1.20 installs the
    // `v1beta1` CRD (`clustermesh-mcs-api-install-crds`) and reads only that version.
    let fake = FakeApiServer::start().await;
    if release_at_least(&version, 1, 20) {
        fake.register(ResourceSpec::new("multicluster.x-k8s.io", "v1beta1", "serviceexports", "ServiceExport", true));
    }
    seed(&fake, cluster);
    let k8s_ca = clustermesh_apiserver::pki::Authority::new("kubernetes").expect("CA");
    let k8s_cert = k8s_ca.server("kube-apiserver", &["127.0.0.1", "kubernetes.default.svc"]).expect("issue");
    let (k8s_crt, k8s_key) = (root.join("k8s.crt"), root.join("k8s.key"));
    std::fs::write(&k8s_crt, &k8s_cert.cert_pem).unwrap();
    std::fs::write(&k8s_key, &k8s_cert.key_pem).unwrap();

    let users = match &fixture["referenced_objects"]["configMap clustermesh-remote-users"]["data"]["users.yaml"] {
        Value::String(users) => users.replace("remote-cluster2", &format!("remote-{}", other(cluster).name)),
        // Not rendered by the chart for this set (1.20 A/B): `cilium clustermesh` creates it.
        _ => "users:\n".to_owned(),
    };
    let staged = stage_volumes(fixture, replay.pki, cluster, &users, root, &k8s_ca.cert_pem());
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
    for alias in fixture["pod"]["hostAliases"].as_array().into_iter().flatten() {
        for name in alias["hostnames"].as_array().into_iter().flatten() {
            hosts.push_str(&format!("{}\t{}\n", alias["ip"].as_str().expect("ip"), name.as_str().expect("name")));
        }
    }
    // What the Service's DNS name resolves to for an agent on this node.
    hosts.push_str(&format!("127.0.0.1\t{SERVICE_NAME}\n"));
    let fs = PodFs {
        var_lib: &staged.var_lib,
        run: &staged.run,
        hosts,
        usr_bin: vec![("clustermesh-apiserver", replay.binary), ("etcd", replay.binary)],
    };
    let mut addresses = vec![format!("{POD_IP}/32")];
    addresses.extend(
        fixture["pod"]["hostAliases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{}/32", a["ip"].as_str().unwrap())),
    );
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let mut pod = Pod::start(replay.runtime, &format!("{version}-{}", cluster.name), root, &fs, &addresses);
    let test_pid = std::process::id();
    pod.relay(
        "k8s-relay",
        &format!("127.0.0.1:{K8S_PORT}"),
        test_pid,
        &fake.addr().to_string(),
        Some((&k8s_crt, &k8s_key)),
    );

    let pod_uid = format!("6f1c2a7e-0000-4000-8000-00000000000{}", cluster.id);
    let spec = |container| container_spec(&fixture["pod"], container, &staged, cluster, &pod_uid);
    let output = pod.run(&spec(&fixture["pod"]["initContainers"][0]));
    assert!(
        output.status.success(),
        "{version} {}: etcd-init exited {}: {}",
        cluster.name,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for container in fixture["pod"]["containers"].as_array().expect("containers") {
        pod.spawn(&spec(container));
    }
    RunningPod { pod, fake, version, staged }
}

fn release_at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

fn other(cluster: Cluster) -> Cluster {
    if cluster.name == CLUSTER1.name { CLUSTER2 } else { CLUSTER1 }
}

/// Polls `url` from the pod's network until it answers 2xx; on timeout, fails with every
/// container's log.
async fn wait_http(pod: &mut Pod, what: &str, url: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        if let Some(body) = curl(pod, url) {
            pod.assert_running();
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("pod {}: no answer from {what} ({url}) within 45s\n{}", pod.name, pod.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The checks on the etcd container's users, for one pod of `cluster`.
fn check_users(running: &RunningPod, pki: &MeshPki, cluster: Cluster, scratch: &Path) {
    let ca = scratch.join("ca.crt");
    std::fs::write(&ca, pki.ca.cert_pem()).unwrap();
    let etcdctl =
        Etcdctl { pod: &running.pod, ca, dir: scratch.to_owned(), endpoint: "https://127.0.0.1:2379".to_owned() };
    let label = format!("{} {}", running.version, cluster.name);
    let admin = etcdctl.user(pki, &format!("admin-{}", cluster.name));
    etcdctl
        .run(&admin, &["put", "cilium/state/test/v1/probe", "x"])
        .unwrap_or_else(|e| panic!("{label}: admin writes: {e}"));

    let remote = etcdctl.user(pki, "remote");
    let read = etcdctl.run(&remote, &["get", "--prefix", "cilium/state/test/"]);
    assert!(read.as_deref().is_ok_and(|out| out.contains("probe")), "{label}: remote reads cilium/state/: {read:?}");
    let write = etcdctl.run(&remote, &["put", "cilium/state/test/v1/evil", "x"]);
    assert!(write.as_ref().is_err_and(|e| e.contains("permission denied")), "{label}: remote cannot write: {write:?}");

    let local = etcdctl.user(pki, &format!("local-{}", cluster.name));
    let read = etcdctl.run(&local, &["get", "--prefix", "cilium/cache/"]);
    assert!(read.is_ok(), "{label}: local reads cilium/cache/: {read:?}");
    let read = etcdctl.run(&local, &["get", "--prefix", "cilium/state/"]);
    assert!(
        read.as_ref().is_err_and(|e| e.contains("permission denied")),
        "{label}: local cannot read cilium/state/: {read:?}"
    );

    let intruder = etcdctl.user(pki, "intruder");
    let read = etcdctl.run(&intruder, &["get", "--prefix", "cilium/"]);
    assert!(read.is_err(), "{label}: an unknown CN is refused: {read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_ciliums_chart_renders_runs_on_our_image() {
    replay_every_pod(Runtime::Processes).await;
}

/// The same pods as containers of our image (`clustermesh-apiserver:dev`, built from this
/// build's binary): the image's own `/usr/bin/etcd` and `/var/lib/cilium/etcd-config.yaml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_ciliums_chart_renders_runs_as_containers_of_our_image() {
    replay_every_pod(Runtime::Docker).await;
}

async fn replay_every_pod(runtime: Runtime) {
    crate::support::install_crypto_provider();
    let fixtures = fixtures();
    assert!(fixtures.len() >= 8, "the fixtures of 1.16.19 and 1.20.0, sets A to D: {fixtures:?}");
    // The image's executable, where the pod's user can read it.
    let scratch = tempfile::Builder::new().prefix("it-pods-").tempdir().expect("temp dir");
    set_mode(scratch.path(), 0o755);
    let binary = scratch.path().join("clustermesh-apiserver");
    std::fs::copy(BIN, &binary).expect("copy the binary");
    let pki = MeshPki { ca: clustermesh_apiserver::pki::Authority::new("Cilium CA").expect("CA") };
    let replay = Replay { runtime, pki: &pki, binary: &binary };

    for path in fixtures {
        let fixture = load(&path);
        let label = path.file_stem().unwrap().to_string_lossy().into_owned();
        let root = scratch.path().join(&label);
        std::fs::create_dir_all(root.join(CLUSTER1.name)).unwrap();
        let mut running = start_pod(&replay, &fixture, CLUSTER1, &root.join(CLUSTER1.name)).await;

        // The 1.16 chart has etcd serve its metrics on the pod IP only.
        let metrics_host = if argv_mentions(&fixture, "etcd", "HOSTNAME_IP") { POD_IP } else { "127.0.0.1" };
        let metrics =
            wait_http(&mut running.pod, "etcd metrics on 9963", &format!("http://{metrics_host}:9963/metrics")).await;
        assert!(metrics.contains("etcd_server_has_leader"), "{label}: etcd metrics: {metrics}");
        check_users(&running, &pki, CLUSTER1, &root);

        wait_http(&mut running.pod, "the apiserver's /readyz on 9880", "http://127.0.0.1:9880/readyz").await;
        let ca = root.join("ca.crt");
        let etcdctl =
            Etcdctl { pod: &running.pod, ca, dir: root.clone(), endpoint: "https://127.0.0.1:2379".to_owned() };
        let admin = etcdctl.user(&pki, "admin-cluster1");
        let node = etcdctl.run(&admin, &["get", "--print-value-only", "cilium/state/nodes/v1/cluster1/node-cluster1"]);
        assert!(node.as_deref().is_ok_and(|v| v.contains("10.1.0.1")), "{label}: the node mirrored: {node:?}");
        wait_http(&mut running.pod, "kvstoremesh's /readyz on 9881", "http://127.0.0.1:9881/readyz").await;
        running.pod.assert_as_specified();

        // The peer pod of set D stays up until the troubleshooting below has reached it.
        let _peer = if fixture["agent_side"]["Secret cilium-kvstoremesh (read by the kvstoremesh container; decoded)"]
            .is_object()
        {
            Some(check_peer(&replay, &fixture, &mut running, &root, &label).await)
        } else {
            None
        };
        // What `cilium clustermesh status` and `cilium sysdump` exec in the pod's containers:
        // the `*-dbg` commands in the container of the same role.
        let exec = |args: &[&str]| {
            let container = if args[0] == "kvstoremesh-dbg" { "kvstoremesh" } else { "apiserver" };
            let argv: Vec<&str> =
                std::iter::once("/usr/bin/clustermesh-apiserver").chain(args.iter().copied()).collect();
            running.pod.exec(container, &argv)
        };
        let version = exec(&["version"]);
        assert!(version.status.success(), "{label}: version: {version:?}");
        let status = exec(&["kvstoremesh-dbg", "status", "-o", "json"]);
        let json = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{label}: kvstoremesh-dbg status: {status:?}");
        let clusters: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{label}: {e}: {json}"));
        let peers = usize::from(
            fixture["agent_side"]["Secret cilium-kvstoremesh (read by the kvstoremesh container; decoded)"].is_object(),
        );
        assert_eq!(clusters.as_array().map(Vec::len), Some(peers), "{label}: kvstoremesh-dbg status: {json}");
        for troubleshoot in
            [&["clustermesh-dbg", "troubleshoot"][..], &["kvstoremesh-dbg", "troubleshoot", "--include-local"]]
        {
            let output = exec(troubleshoot);
            assert!(
                output.status.success(),
                "{label}: {troubleshoot:?}:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // The chart's other workloads on this image (1.20's CoreDNS Job), with the pod's
        // in-cluster configuration.
        for job in fixture["other_workloads_using_the_image"].as_array().into_iter().flatten() {
            for container in job["containers"].as_array().into_iter().flatten() {
                let output = running.pod.run(&container_spec(job, container, &running.staged, CLUSTER1, "job"));
                assert!(output.status.success(), "{label}: Job {}: {output:?}", job["name"]);
                let corefile = running.fake.get("v1", "ConfigMap", Some("kube-system"), "coredns").unwrap_or_default();
                let corefile = corefile["data"]["Corefile"].as_str().unwrap_or_default();
                assert!(corefile.contains("multicluster clusterset.local"), "{label}: {corefile}");
            }
        }
        running.pod.assert_running();
    }
}

fn argv_mentions(fixture: &Value, container: &str, text: &str) -> bool {
    fixture["pod"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == container)
        .any(|c| c["args"].to_string().contains(text))
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Set D: the peer `cluster2` runs as a second pod, reached at its host alias's address
/// (172.18.0.10:32379 inside cluster1's pod); cluster1's kvstoremesh caches it and an agent
/// with the chart's agent certificate reads it through the cache.
async fn check_peer(
    replay: &Replay<'_>,
    fixture: &Value,
    running: &mut RunningPod,
    root: &Path,
    label: &str,
) -> RunningPod {
    let pki = replay.pki;
    std::fs::create_dir_all(root.join(CLUSTER2.name)).unwrap();
    let peer = start_pod(replay, fixture, CLUSTER2, &root.join(CLUSTER2.name)).await;
    let alias = fixture["pod"]["hostAliases"][0]["ip"].as_str().expect("host alias");
    running.pod.relay("peer-relay", &format!("{alias}:32379"), peer.pod.pid(), "127.0.0.1:2379", None);

    let ca = root.join("ca.crt");
    let etcdctl =
        Etcdctl { pod: &running.pod, ca, dir: root.to_owned(), endpoint: "https://127.0.0.1:2379".to_owned() };
    let local = etcdctl.user(pki, "local-cluster1");
    eventually(&format!("{label}: cluster2's node in cluster1's cache"), Duration::from_secs(60), || {
        let found = etcdctl.run(&local, &["get", "--print-value-only", "cilium/cache/nodes/v1/cluster2/node-cluster2"]);
        async move { found.ok().filter(|v| v.contains("10.2.0.1")) }
    })
    .await;

    // The agent: the Secret cilium-clustermesh and the certificates the chart projects next
    // to it, at the agent's path, read by our client library as cilium-agent reads them.
    let agent_dir = root.join("agent-clustermesh");
    let agent_secret =
        fixture["agent_side"]["Secret cilium-clustermesh (read by agents; decoded)"].as_object().expect("agent Secret");
    for (peer, config) in agent_secret {
        write_owned(&agent_dir.join(peer), config.as_str().unwrap(), 0o400);
    }
    for (prefix, secret) in [
        ("common-etcd-client", "clustermesh-apiserver-remote-cert"),
        ("local-etcd-client", "clustermesh-apiserver-local-cert"),
    ] {
        let issued = pki.secret(fixture, secret, CLUSTER1);
        write_owned(&agent_dir.join(format!("{prefix}-ca.crt")), &issued.ca, 0o400);
        write_owned(&agent_dir.join(format!("{prefix}.crt")), &issued.cert, 0o400);
        write_owned(&agent_dir.join(format!("{prefix}.key")), &issued.key, 0o400);
    }
    // In cluster1's pod's network, where 127.0.0.1:2379 is cluster1's etcd (an agent on the
    // node reaches it at the Service's address).
    let agent = ContainerSpec {
        name: "agent".into(),
        argv: [
            "/usr/bin/clustermesh-apiserver",
            "--log-level=warn",
            "status",
            "--clustermesh-config=/var/lib/cilium/clustermesh",
            "--cluster-name=cluster1",
            "--cluster-id=1",
            "--wait=30s",
            "--output=json",
        ]
        .map(str::to_owned)
        .into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        mounts: vec![Mount { source: agent_dir, path: "/var/lib/cilium/clustermesh".into(), read_only: true }],
    };
    let output = running.pod.run(&agent);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("cluster2"),
        "{label}: the agent reads cluster2 from the cache: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    peer
}
