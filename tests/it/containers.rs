//! The image as operators run it, and attached mode against etcd in containers: our image
//! (docker/Dockerfile, built by docker/build-images from this build's binary) mirrors into a
//! three-member etcd 3.5 cluster on a private Docker network, through partitions: one member
//! cut off, then the apiserver itself. Nothing stale, nothing lost, and `/readyz` and
//! `kvstore_quorum_errors_total` say what is going on while cut off.
//!
//! The Kubernetes objects come from a directory of manifests mounted into the container
//! (`--k8s-objects-dir`); the expected keys come from the translation model fed with the same
//! objects. The test reads the store through ports published on 127.0.0.1 and, member by
//! member, with `etcdctl` inside each member.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::docker::{APISERVER_IMAGE, Container, ETCD_35, EtcdContainers, Network, docker_ok};
use crate::support::etcd::http_get;
use crate::support::server::free_port;
use crate::support::state::{self, Difference, Keys, STATE};
use crate::support::{Pki, eventually, init_tracing};

/// Bound on the apiserver getting ready and on the store converging after a change or a heal
/// (an HTTP/2 keep-alive of 15 s + 5 s finds a dead connection; then a resync).
const CONVERGE: Duration = Duration::from_secs(90);
/// The quorum check interval given to the apiserver (Cilium's variable; its default is 10 s).
const CHECK_INTERVAL: &str = "1s";
const QUORUM_ERRORS: &str = "cilium_clustermesh_apiserver_kvstore_quorum_errors_total";

/// Manifests in a directory the container mounts read-only; files replaced atomically, so the
/// server's poller never reads half a file.
struct Objects {
    dir: tempfile::TempDir,
    objects: BTreeMap<String, Value>,
}

impl Objects {
    fn new() -> Objects {
        let dir = tempfile::Builder::new().prefix("it-objects-").tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        Objects { dir, objects: BTreeMap::new() }
    }

    fn apply(&mut self, object: Value) {
        let name =
            format!("{}-{}.json", object["kind"].as_str().unwrap(), object["metadata"]["name"].as_str().unwrap());
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(&object).unwrap()).expect("write manifest");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::rename(&tmp, self.dir.path().join(&name)).expect("rename manifest");
        self.objects.insert(name, object);
    }

    fn delete(&mut self, kind: &str, name: &str) {
        let file = format!("{kind}-{name}.json");
        fs::remove_file(self.dir.path().join(&file)).expect("remove manifest");
        self.objects.remove(&file);
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The keys and bytes the store must hold for these objects, per the model.
    fn expected(&self) -> Keys {
        state::expected(self.objects.values().cloned())
    }
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": {"name": name},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}], "ipam": {"podCIDRs": ["10.9.0.0/24"]}}
    })
}

fn global_service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn endpoint_slice(service: &str, address: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Our image running `clustermesh` attached to `cluster`, with its health and metrics
/// listeners published on 127.0.0.1. It is created on a network of its own (where the ports are
/// published) and joins the etcd network before it starts, so that leaving the etcd network
/// cuts it off its store but not off the test.
struct Apiserver {
    container: Container,
    _observe: Network,
    health_port: u16,
    metrics_port: u16,
}

impl Apiserver {
    fn start(cluster: &EtcdContainers, objects: &Objects) -> Apiserver {
        let endpoints: String = cluster.container_urls().iter().map(|url| format!("  - {url}\n")).collect();
        cluster.certs().add(
            "etcd-config.yaml",
            &format!(
                "endpoints:\n{endpoints}trusted-ca-file: /certs/ca.pem\ncert-file: /certs/root.pem\nkey-file: /certs/root-key.pem\n"
            ),
        );
        let observe = Network::new("observe");
        let (health_port, metrics_port) = (free_port(), free_port());
        let mut options: Vec<String> = vec![
            "--network".into(),
            observe.name().into(),
            "-p".into(),
            format!("127.0.0.1:{health_port}:9880"),
            "-p".into(),
            format!("127.0.0.1:{metrics_port}:9962"),
            "-v".into(),
            format!("{}:/objects:ro", objects.path().display()),
            "-e".into(),
            format!("CILIUM_ETCD_STATUS_CHECK_INTERVAL={CHECK_INTERVAL}"),
            // As Cilium's chart runs it.
            "--read-only".into(),
            "--cap-drop=ALL".into(),
        ];
        options.extend(cluster.certs().mount());
        let args: Vec<String> = [
            "clustermesh",
            "--cluster-name=cluster1",
            "--cluster-id=1",
            "--kvstore=etcd",
            "--kvstore-opt=etcd.config=/certs/etcd-config.yaml",
            "--k8s-objects-dir=/objects",
            "--health-port=9880",
            "--prometheus-serve-addr=:9962",
        ]
        .map(String::from)
        .into();
        let container = Container::run_on("apiserver", &options, APISERVER_IMAGE, &args, &[cluster.network()]);
        Apiserver { container, _observe: observe, health_port, metrics_port }
    }

    async fn readyz(&self) -> Option<u16> {
        let answer = tokio::time::timeout(Duration::from_secs(2), http_get("127.0.0.1", self.health_port, "/readyz"));
        answer.await.ok()?.ok().map(|(status, _)| status)
    }

    async fn quorum_errors(&self) -> Option<f64> {
        let answer = tokio::time::timeout(Duration::from_secs(2), http_get("127.0.0.1", self.metrics_port, "/metrics"));
        let (_, body) = answer.await.ok()?.ok()?;
        Some(
            body.lines()
                .filter(|line| line.starts_with(&format!("{QUORUM_ERRORS}{{")))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    async fn wait_readyz(&self, status: u16, why: &str) {
        eventually(why, CONVERGE, || async {
            match self.readyz().await {
                Some(found) if found == status => Ok(()),
                found => Err(format!("/readyz: {found:?}; log tail:\n{}", self.container.logs_tail(15))),
            }
        })
        .await;
    }
}

/// Waits until the store (a quorum read, through whichever member answers) holds exactly the
/// expected keys.
async fn converged(client: &etcd_client::Client, expected: &Keys, why: &str) {
    eventually(why, CONVERGE, || {
        let mut client = client.clone();
        async move { Difference::none(&state::dump(&mut client, STATE).await.map_err(|e| e.to_string())?, expected) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_uid_65532_and_answers_as_the_apiserver_and_as_etcd() {
    crate::support::docker::images();
    let config =
        docker_ok(&["image", "inspect", "-f", "{{.Config.User}} {{json .Config.Entrypoint}}", APISERVER_IMAGE]);
    assert_eq!(config.trim(), r#"65532:65532 ["/usr/bin/clustermesh-apiserver"]"#);
    let version = docker_ok(&["run", "--rm", APISERVER_IMAGE, "version"]);
    assert!(version.starts_with("clustermesh-apiserver "), "{version}");
    // Cilium's chart starts the store as /usr/bin/etcd: the same executable, as etcd.
    let etcd = docker_ok(&["run", "--rm", "--entrypoint", "/usr/bin/etcd", APISERVER_IMAGE, "--version"]);
    assert!(etcd.starts_with("etcd Version: 3.5."), "{etcd}");
    // A volume mounted over the image's certificate directory starts writable by the non-root
    // user (docker/compose.yaml's one-shot `certs generate` relies on it).
    let made = docker_ok(&[
        "run",
        "--rm",
        "-v",
        "/var/lib/clustermesh-apiserver",
        APISERVER_IMAGE,
        "certs",
        "generate",
        "--cluster-name=cluster1",
        "--out=/var/lib/clustermesh-apiserver/cluster1",
    ]);
    assert!(!made.contains("rror"), "{made}");
}

/// One member cut off: the other two keep a quorum, the apiserver keeps mirroring through them,
/// and the member catches up once back. Then the apiserver cut off its store: not ready and
/// counting quorum errors while cut off, and after the heal the deletes and adds it missed are
/// all applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_partitions_of_a_member_and_of_the_apiserver_nothing_is_stale_or_lost_and_readiness_tells_the_truth() {
    init_tracing();
    let pki = Pki::new();
    let cluster = EtcdContainers::start(&pki, 3, ETCD_35).await;
    let mut objects = Objects::new();
    for (name, ip) in [("node-a", "172.20.0.1"), ("node-b", "172.20.0.2"), ("node-c", "172.20.0.3")] {
        objects.apply(node(name, ip));
    }
    objects.apply(global_service("web", "10.96.0.10"));
    objects.apply(endpoint_slice("web", "10.0.1.1"));
    let apiserver = Apiserver::start(&cluster, &objects);
    apiserver.wait_readyz(200, "the apiserver to sync into etcd").await;
    let client = cluster.client(&pki, "root").await;
    converged(&client, &objects.expected(), "the initial sync").await;
    assert_eq!(apiserver.quorum_errors().await, Some(0.0), "no quorum error while all is well");

    // Member 2 cut off: two of three still make a quorum.
    cluster.disconnect(2);
    objects.delete("CiliumNode", "node-a");
    objects.apply(node("node-d", "172.20.0.4"));
    objects.apply(endpoint_slice("web", "10.0.1.2"));
    converged(&client, &objects.expected(), "changes made while a member is cut off").await;
    apiserver.wait_readyz(200, "ready while the store keeps its quorum").await;
    let behind = cluster.member_dump(2, STATE).expect("the cut-off member answers from its own copy");
    assert!(behind.keys().any(|k| k.ends_with("/node-a")), "the cut-off member cannot have seen the delete");
    cluster.reconnect(2).await;
    let expected = objects.expected();
    eventually("the healed member to catch up", CONVERGE, || async {
        Difference::none(&cluster.member_dump(2, STATE)?, &expected).map_err(anyhow::Error::msg)
    })
    .await;

    // The apiserver cut off its store.
    let errors_before = apiserver.quorum_errors().await.expect("metrics");
    apiserver.container.disconnect(cluster.network());
    objects.delete("CiliumNode", "node-b");
    objects.apply(node("node-e", "172.20.0.5"));
    objects.delete("EndpointSlice", "web-1");
    apiserver.wait_readyz(500, "not ready while cut off from etcd").await;
    let errors_cut = apiserver.quorum_errors().await.expect("metrics");
    assert!(errors_cut >= errors_before + 2.0, "quorum errors while cut off: {errors_before} → {errors_cut}");
    let unchanged = cluster.member_dump(0, STATE).expect("dump");
    assert!(unchanged.keys().any(|k| k.ends_with("/node-b")), "nothing can reach etcd while the apiserver is cut off");

    apiserver.container.connect(cluster.network(), &[]);
    apiserver.wait_readyz(200, "ready again after the heal").await;
    let expected = objects.expected();
    converged(&client, &expected, "what changed while the apiserver was cut off").await;
    for member in 0..cluster.size() {
        eventually("every member to hold the same keys", CONVERGE, || async {
            Difference::none(&cluster.member_dump(member, STATE)?, &expected).map_err(anyhow::Error::msg)
        })
        .await;
    }
    assert!(expected.keys().any(|k| k.ends_with("/node-e")) && !expected.keys().any(|k| k.ends_with("/node-b")));
}
