//! The client port answers etcd's plain HTTP endpoints beside gRPC, as etcd does: a client
//! that negotiates HTTP/1.1 reads `/version` and `/health` (troubleshooting tools read the
//! server version this way), with the same mutual TLS as the gRPC API.

use std::process::Command;

use serde_json::Value;

use crate::support::{EmbeddedStore, EtcdProcess, Pki};

/// `curl --http1.1` with the client certificate of `cn` (none when `cn` is `None`).
fn curl(pki: &Pki, url: &str, cn: Option<&str>) -> Result<String, String> {
    let mut command = Command::new("curl");
    command.args(["-sS", "--fail", "--http1.1", "--max-time", "5", "--cacert"]).arg(pki.ca_path());
    if let Some(cn) = cn {
        let cert = pki.client(cn);
        command.arg("--cert").arg(&cert.cert_path).arg("--key").arg(&cert.key_path);
    }
    let output = command.arg(url).output().expect("curl");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if output.status.success() { Ok(text(&output.stdout)) } else { Err(text(&output.stderr)) }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_health_answer_over_http1_as_etcds_do() {
    let pki = Pki::new();
    let ours = EmbeddedStore::start(&pki).await;
    let etcd = EtcdProcess::start(&pki).await;

    for path in ["/version", "/health"] {
        let theirs = json(&curl(&pki, &format!("{}{path}", etcd.client_url()), Some("root")).expect("etcd answers"));
        let mine = json(&curl(&pki, &format!("{}{path}", ours.client_url()), Some("root")).expect("we answer"));
        // Every field of the oracle's answer is there, with its type (etcd 3.5 added `reason`
        // to `/health`; a 3.4 oracle has fewer).
        for (field, value) in theirs.as_object().expect("etcd answers an object") {
            let same_type = std::mem::discriminant(value) == std::mem::discriminant(&mine[field]);
            assert!(same_type, "{path}: field {field}: {mine} vs etcd's {theirs}");
        }
    }
    let version = json(&curl(&pki, &format!("{}/version", ours.client_url()), Some("root")).unwrap());
    assert!(version["etcdserver"].as_str().is_some_and(|v| v.starts_with("3.5")), "{version}");
    let health = json(&curl(&pki, &format!("{}/health", ours.client_url()), Some("root")).unwrap());
    assert_eq!(health, serde_json::json!({"health": "true", "reason": ""}));

    // The same port still serves gRPC.
    let mut client = ours.client(&pki, "root").await;
    client.put("k", "v", None).await.expect("gRPC on the same port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_negotiates_no_protocol_is_answered_by_what_it_sends() {
    // Cilium's `troubleshoot` commands write a bare `GET /version` after a handshake without
    // ALPN; a gRPC client without ALPN starts with the HTTP/2 preface instead.
    let pki = Pki::new();
    let ours = EmbeddedStore::start(&pki).await;
    let cert = pki.client("root");
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--http1.1", "--no-alpn", "--max-time", "5", "--cacert"])
        .arg(pki.ca_path())
        .arg("--cert")
        .arg(&cert.cert_path)
        .arg("--key")
        .arg(&cert.key_path)
        .arg(format!("{}/version", ours.client_url()))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && body.contains("etcdserver"), "{output:?}");
    let mut client = ours.client(&pki, "root").await;
    client.put("k", "v", None).await.expect("gRPC still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_endpoints_need_a_client_certificate_like_the_grpc_api() {
    let pki = Pki::new();
    let ours = EmbeddedStore::start(&pki).await;
    let refused = curl(&pki, &format!("{}/version", ours.client_url()), None);
    assert!(refused.is_err(), "answered without a client certificate: {refused:?}");
}
