//! The Kubernetes objects scenarios 6 and 7 serve: Cilium-shaped CiliumEndpoints,
//! CiliumNodes and CiliumIdentities of one namespace, numbered. Also read by
//! `examples/bootstrap_memory.rs`, which feeds the same objects to the mirror in process.

use serde_json::{Value, json};

pub const CLUSTER: &str = "cluster1";
pub const NAMESPACE: &str = "bench";

pub fn endpoint_ip(seq: usize) -> String {
    format!("10.{}.{}.{}", 128 + ((seq >> 16) & 0x7f), (seq >> 8) & 0xff, seq & 0xff)
}

pub fn seq_of_ip(ip: &str) -> Option<usize> {
    let parts: Vec<usize> = ip.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    match parts.as_slice() {
        [10, a, b, c] if *a >= 128 => Some(((a - 128) << 16) | (b << 8) | c),
        _ => None,
    }
}

pub fn endpoint(seq: usize, identities: usize) -> Value {
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEndpoint",
        "metadata": {"name": format!("cep-{seq:07}"), "namespace": NAMESPACE},
        "status": {
            "id": seq % 65_000 + 1,
            "identity": {"id": 65_536 + seq % identities.max(1), "labels": [format!("k8s:app=app-{}", seq % 100)]},
            "networking": {
                "addressing": [{"ipv4": endpoint_ip(seq)}],
                "node": format!("172.16.{}.{}", (seq / 250) % 250, seq % 250 + 1),
            },
            "service-account": "default",
            "state": "ready",
        }
    })
}

pub fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
}

pub fn node(i: usize) -> Value {
    let name = format!("node-{i:06}");
    let (a, b) = ((i >> 8) & 0xff, i & 0xff);
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {
            "addresses": [
                {"ip": format!("172.16.{a}.{b}"), "type": "InternalIP"},
                {"ip": format!("10.{}.{a}.1", 64 + (b & 0x3f)), "type": "CiliumInternalIP"},
            ],
            "bootid": format!("570d3fd1-93db-4862-ba99-{i:012x}"),
            "health": {"ipv4": format!("10.{}.{a}.2", 64 + (b & 0x3f))},
            "ipam": {"podCIDRs": [format!("10.{}.{a}.0/24", 64 + (b & 0x3f))]},
        }
    })
}

pub fn identity(i: usize) -> Value {
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumIdentity",
        "metadata": {"name": (65_536 + i).to_string(), "labels": {"io.kubernetes.pod.namespace": NAMESPACE}},
        "security-labels": {
            "k8s:app": format!("app-{i}"),
            "k8s:io.cilium.k8s.policy.cluster": CLUSTER,
            "k8s:io.kubernetes.pod.namespace": NAMESPACE,
        }
    })
}
