//! The mirror end to end: objects in a (fake) Kubernetes API server, keys in the store —
//! our embedded one and a real etcd alike.

use std::collections::BTreeMap;
use std::time::Duration;

use clustermesh_apiserver::translate::Settings;
use serde_json::{Value, json};

use crate::support::docker::{ETCD_34, ETCD_35, EtcdContainers};
use crate::support::mirror::{Mirror, Target, wait_for_key};
use crate::support::{EmbeddedStore, FakeApiServer, Pki, eventually};

const NODES: &str = "cilium/state/nodes/v1/cluster1/";

fn settings() -> Settings {
    Settings::new("cluster1", 1)
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": name},
        "spec": {"addresses": [{"type": "InternalIP", "ip": ip}]}
    })
}

async fn node_ips(target: &Target) -> BTreeMap<String, String> {
    target
        .dump(NODES)
        .await
        .into_iter()
        .map(|(key, value)| {
            let ip = serde_json::from_str::<Value>(&value).expect("node JSON")["IPAddresses"][0]["IP"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (key.trim_start_matches(NODES).to_owned(), ip)
        })
        .collect()
}

async fn expect_nodes(target: &Target, expected: &[(&str, &str)]) {
    let expected: BTreeMap<String, String> = expected.iter().map(|(n, ip)| (n.to_string(), ip.to_string())).collect();
    let mut last = BTreeMap::new();
    let matched = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            last = node_ips(target).await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(matched.is_ok(), "nodes in the store: expected {expected:?}, found {last:?}");
}

/// Our store and a fake Kubernetes API, ready for a mirror between them.
struct Embedded {
    _pki: Pki,
    store: EmbeddedStore,
    target: Target,
    fake: FakeApiServer,
}

impl Embedded {
    async fn start() -> Self {
        let pki = Pki::new();
        let store = EmbeddedStore::start(&pki).await;
        let target = Target::embedded(&store);
        Self { _pki: pki, store, target, fake: FakeApiServer::start().await }
    }
}

/// A mirror of `fake` into `target` for cluster1, once it reports ready.
async fn start_mirror(target: &Target, fake: &FakeApiServer) -> Mirror {
    let mut mirror = Mirror::start(target, settings(), fake.client());
    mirror.wait_ready().await;
    mirror
}

async fn adds_updates_and_deletes_propagate(target: Target) {
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    let mirror = start_mirror(&target, &fake).await;
    expect_nodes(&target, &[("node-a", "10.0.0.1")]).await;

    fake.apply(node("node-b", "10.0.0.2"));
    fake.apply(node("node-a", "10.0.0.11"));
    expect_nodes(&target, &[("node-a", "10.0.0.11"), ("node-b", "10.0.0.2")]).await;

    fake.delete("cilium.io/v2", "CiliumNode", None, "node-a");
    expect_nodes(&target, &[("node-b", "10.0.0.2")]).await;
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_updates_and_deletes_in_kubernetes_reach_the_embedded_store() {
    let pki = Pki::new();
    let store = EmbeddedStore::start(&pki).await;
    adds_updates_and_deletes_propagate(Target::embedded(&store)).await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_updates_and_deletes_in_kubernetes_reach_a_real_etcd_in_a_container() {
    let pki = Pki::new();
    let etcd = EtcdContainers::start(&pki, 1, ETCD_35).await;
    adds_updates_and_deletes_propagate(Target::etcd(etcd.client(&pki, "root").await)).await;
}

/// Debian bookworm's etcd, for operators who attach an older etcd than Cilium ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_updates_and_deletes_in_kubernetes_reach_etcd_3_4_in_a_container() {
    let pki = Pki::new();
    let etcd = EtcdContainers::start(&pki, 1, ETCD_34).await;
    adds_updates_and_deletes_propagate(Target::etcd(etcd.client(&pki, "root").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_announces_readiness_only_with_cluster_config_and_every_canary() {
    let Embedded { _pki, store, target, fake } = Embedded::start().await;
    let mirror = start_mirror(&target, &fake).await;
    let config = target.get("cilium/cluster-config/cluster1").await.expect("cluster config written");
    let expected = clustermesh_apiserver::translate::cluster_config(&settings());
    assert_eq!(config.as_bytes(), &expected[..]);
    assert!(
        config.starts_with(r#"{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255"#),
        "{config}"
    );
    let canaries: Vec<String> = target.dump("cilium/synced/cluster1/").await.into_keys().collect();
    for name in ["nodes/v1", "identities/v1", "ip/v1", "services/v1", "serviceexports/v1"] {
        let canary = format!("cilium/synced/cluster1/cilium/state/{name}");
        assert!(canaries.contains(&canary), "{canary} missing from {canaries:?}");
    }
    // The heartbeat has its own task and is no part of readiness: it may land just after.
    eventually("the heartbeat written", Duration::from_secs(10), || async { target.get("cilium/.heartbeat").await })
        .await;
    let metrics = mirror.metrics();
    for line in [
        r#"cilium_clustermesh_apiserver_kvstore_initial_sync_completed{scope="nodes/v1",source_cluster="cluster1",action="write"} 1"#,
        r#"cilium_clustermesh_apiserver_kvstore_initial_sync_completed{scope="ip/v1",source_cluster="cluster1",action="write"} 1"#,
        r#"cilium_clustermesh_apiserver_kvstore_sync_queue_size{scope="identities/v1",source_cluster="cluster1"} 0"#,
        r#"cilium_clustermesh_apiserver_bootstrap_seconds{source_cluster="cluster1"} "#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    mirror.stop().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_config_edited_or_deleted_by_someone_else_is_restored() {
    let Embedded { _pki, store, target, fake } = Embedded::start().await;
    let mirror = start_mirror(&target, &fake).await;
    let key = "cilium/cluster-config/cluster1";
    let original = target.get(key).await.expect("written");
    target.put(key, r#"{"id":5}"#).await;
    eventually("an edited cluster config restored", Duration::from_secs(10), || async {
        (target.get(key).await.as_ref() == Some(&original)).then_some(())
    })
    .await;
    target.delete(key).await;
    eventually("a deleted cluster config restored", Duration::from_secs(10), || async {
        (target.get(key).await.as_ref() == Some(&original)).then_some(())
    })
    .await;
    mirror.stop().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_410_gone_deletes_what_vanished_meanwhile() {
    let Embedded { _pki, store, target, fake } = Embedded::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    fake.apply(node("node-b", "10.0.0.2"));
    let mirror = start_mirror(&target, &fake).await;
    expect_nodes(&target, &[("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")]).await;

    // A partition: the delete is never seen as a watch event, only by the relist.
    fake.pause_watches();
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-a");
    fake.apply(node("node-c", "10.0.0.3"));
    fake.expire_history();
    fake.close_watches();
    fake.resume_watches();
    expect_nodes(&target, &[("node-b", "10.0.0.2"), ("node-c", "10.0.0.3")]).await;
    mirror.stop().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_the_server_was_down_is_pruned_after_restart_in_attached_mode() {
    let pki = Pki::new();
    let etcd = EtcdContainers::start(&pki, 1, ETCD_35).await;
    let target = Target::etcd(etcd.client(&pki, "root").await);
    let fake = FakeApiServer::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    fake.apply(node("node-b", "10.0.0.2"));
    let first = start_mirror(&target, &fake).await;
    expect_nodes(&target, &[("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")]).await;
    first.stop().await;

    // Down: node-a goes away. Its key outlives us on the old lease (15 minutes).
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-a");
    assert!(target.get(&format!("{NODES}node-a")).await.is_some());

    let second = start_mirror(&target, &fake).await;
    expect_nodes(&target, &[("node-b", "10.0.0.2")]).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_object_is_skipped_and_counted_and_never_stops_the_stream() {
    let Embedded { _pki, store, target, fake } = Embedded::start().await;
    fake.apply(node("node-a", "10.0.0.1"));
    let mirror = start_mirror(&target, &fake).await;
    expect_nodes(&target, &[("node-a", "10.0.0.1")]).await;

    // node-a turns invalid: it loses its key, exactly as a relist would decide.
    let mut broken = node("node-a", "10.0.0.1");
    broken["spec"]["addresses"] = json!("not a list");
    fake.apply(broken);
    fake.apply(node("node-b", "10.0.0.2"));
    expect_nodes(&target, &[("node-b", "10.0.0.2")]).await;
    let metrics = mirror.metrics();
    assert!(
        metrics.contains(r#"cilium_clustermesh_apiserver_invalid_objects_total{kind="CiliumNode"} 1"#),
        "invalid object counted:\n{metrics}"
    );

    fake.apply(node("node-a", "10.0.0.9"));
    expect_nodes(&target, &[("node-a", "10.0.0.9"), ("node-b", "10.0.0.2")]).await;
    let _ = wait_for_key(&target, "cilium/.heartbeat").await;
    mirror.stop().await;
    store.stop().await;
}

fn global_service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels,
            "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

fn endpoint_slice(service: &str, name: &str, address: &str, managed_by: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": managed_by}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// The backend addresses exported for each global service of cluster1.
async fn exported_backends(target: &Target) -> BTreeMap<String, Vec<String>> {
    let prefix = "cilium/state/services/v1/cluster1/default/";
    target
        .dump(prefix)
        .await
        .into_iter()
        .map(|(key, value)| {
            let service: Value = serde_json::from_str(&value).expect("service JSON");
            let backends = service["backends"].as_object().map(|b| b.keys().cloned().collect()).unwrap_or_default();
            (key.trim_start_matches(prefix).to_owned(), backends)
        })
        .collect()
}

/// Cilium lists Services without another proxy's `service-proxy-name` and EndpointSlices not
/// written by its own endpoint-slice mesh controller (`pkg/k8s/utils/utils.go`): a remote
/// cluster's backends, mirrored into this cluster by the operator, must never be exported back
/// into the mesh as this cluster's, and another proxy's Services are not Cilium's to serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_another_proxy_and_slices_of_ciliums_mesh_controller_are_never_exported() {
    let Embedded { _pki, store, target, fake } = Embedded::start().await;
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}));
    fake.apply(global_service("web", json!({})));
    fake.apply(endpoint_slice("web", "web-local", "10.1.0.1", "endpointslice-controller.k8s.io"));
    fake.apply(endpoint_slice("web", "web-cluster2", "10.2.0.1", "endpointslice-mesh-controller.cilium.io"));
    fake.apply(global_service("gateway", json!({"service.kubernetes.io/service-proxy-name": "other-proxy"})));
    fake.apply(endpoint_slice("gateway", "gateway-local", "10.1.0.9", "endpointslice-controller.k8s.io"));
    let mirror = start_mirror(&target, &fake).await;
    let only_local = BTreeMap::from([("web".to_owned(), vec!["10.1.0.1".to_owned()])]);
    assert_eq!(exported_backends(&target).await, only_local);

    // A service handed over to another proxy leaves the selection: to the mirror, a delete.
    fake.apply(global_service("web", json!({"service.kubernetes.io/service-proxy-name": "other-proxy"})));
    eventually("web's export to be withdrawn", Duration::from_secs(15), || async {
        exported_backends(&target).await.is_empty().then_some(())
    })
    .await;
    mirror.stop().await;
    store.stop().await;
}
