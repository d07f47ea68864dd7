//! `mcsapi-coredns-cfg`, the CoreDNS Job of Cilium's chart, against the test's Kubernetes API:
//! the Corefile serves the clusterset domain, the old one is kept, CoreDNS is rolled out, and a
//! second run changes nothing.

use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::support::fake_k8s::{FakeApiServer, ResourceSpec, Verb};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

const COREFILE: &str = ".:53 {\n    errors\n    health\n    ready\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n       fallthrough in-addr.arpa ip6.arpa\n    }\n    forward . /etc/resolv.conf\n    cache 30\n}\n";

async fn cluster(coredns_image: &str) -> FakeApiServer {
    let fake = FakeApiServer::start().await;
    fake.register(ResourceSpec::new("apps", "v1", "deployments", "Deployment", true));
    fake.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "coredns", "namespace": "kube-system"},
        "data": {"Corefile": COREFILE},
    }));
    fake.apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": "kube-system"},
        "spec": {"selector": {"matchLabels": {"k8s-app": "kube-dns"}}, "template": {
            "metadata": {"labels": {"k8s-app": "kube-dns"}},
            "spec": {"containers": [{"name": "coredns", "image": coredns_image}]},
        }},
    }));
    fake
}

/// The Job's argv as Cilium 1.20's chart renders it, with the API server's address.
fn job(fake: &FakeApiServer) -> Output {
    Command::new(BIN)
        .args([
            "mcsapi-coredns-cfg",
            "--coredns-deployment-name=coredns",
            "--coredns-configmap-name=coredns",
            "--coredns-namespace=kube-system",
            "--coredns-cluster-domain=cluster.local",
            "--coredns-clusterset-domain=clusterset.local",
        ])
        .arg(format!("--k8s-api-server={}", fake.url()))
        .output()
        .expect("run")
}

fn coredns_configmap(fake: &FakeApiServer) -> Value {
    fake.get("v1", "ConfigMap", Some("kube-system"), "coredns").expect("the CoreDNS ConfigMap")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corefile_serves_the_clusterset_domain_and_coredns_rolls_out_once() {
    let fake = cluster("registry.k8s.io/coredns/coredns:v1.12.2").await;
    let output = job(&fake);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let configmap = coredns_configmap(&fake);
    let corefile = configmap["data"]["Corefile"].as_str().unwrap();
    assert!(
        corefile.contains(
            "kubernetes cluster.local clusterset.local in-addr.arpa ip6.arpa {\n       multicluster clusterset.local\n"
        ),
        "{corefile}"
    );
    assert_eq!(configmap["data"]["Corefile.cilium.bak"], COREFILE);
    let deployment = fake.get("apps/v1", "Deployment", Some("kube-system"), "coredns").expect("the CoreDNS Deployment");
    let stamp = &deployment["spec"]["template"]["metadata"]["annotations"]["clustermesh.cilium.io/autoPatchedAt"];
    assert!(stamp.as_str().is_some_and(|t| t.ends_with('Z')), "{deployment}");

    // The Job runs again on every upgrade: nothing more to do.
    let version = configmap["metadata"]["resourceVersion"].clone();
    let writes_before = fake.requests().iter().filter(|r| r.verb == Verb::Other).count();
    let output = job(&fake);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let configmap = coredns_configmap(&fake);
    assert_eq!(configmap["metadata"]["resourceVersion"], version);
    assert_eq!(fake.requests().iter().filter(|r| r.verb == Verb::Other).count(), writes_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_coredns_or_a_missing_configmap_fails_the_job_and_changes_nothing() {
    let fake = cluster("registry.k8s.io/coredns/coredns:v1.11.3").await;
    let output = job(&fake);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("too old"), "{stderr}");
    let configmap = coredns_configmap(&fake);
    assert_eq!(configmap["data"]["Corefile"], COREFILE);

    let empty = FakeApiServer::start().await;
    empty.register(ResourceSpec::new("apps", "v1", "deployments", "Deployment", true));
    let output = job(&empty);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("getting CoreDNS ConfigMap kube-system/coredns"), "{stderr}");
}
