//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` (included there by path)
//! and by the seeded-random smoke test `fuzz_smoke` in `cargo test`. Each takes raw bytes and
//! must never panic for any input; each also checks invariants and panics when one breaks.
//!
//! This file depends only on `clustermesh_apiserver`, `arbitrary`, `bytes`, `prost` and
//! `serde_json`, so that both crates can compile it.

use std::collections::BTreeSet;

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::pb::etcdserverpb::compare::TargetUnion;
use clustermesh_apiserver::etcd::pb::etcdserverpb::request_op::Request;
use clustermesh_apiserver::etcd::pb::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use clustermesh_apiserver::etcd::store::{Identity, Limits, Store};
use clustermesh_apiserver::translate::Settings;
use clustermesh_apiserver::translate::model::{Kind, Model, Object};
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Translators: arbitrary Kubernetes JSON → model.

/// Field names the translators read, so that generated documents reach past the first check.
const FIELDS: &[&str] = &[
    "spec",
    "status",
    "metadata",
    "addresses",
    "ip",
    "type",
    "health",
    "ipv4",
    "ipv6",
    "ipam",
    "podCIDRs",
    "encryption",
    "key",
    "identity",
    "id",
    "labels",
    "networking",
    "addressing",
    "node",
    "ports",
    "port",
    "protocol",
    "name",
    "clusterIP",
    "clusterIPs",
    "annotations",
    "endpoints",
    "conditions",
    "ready",
    "serving",
    "terminating",
    "addressType",
    "security-labels",
    "namespace",
    "sessionAffinity",
    "targetPort",
    "nodeName",
    "zone",
    "hints",
    "endpoint-slice",
    "cidrs",
    "ingress",
    "egress",
    "named-ports",
    "encryption",
    "ipAddresses",
];
const STRINGS: &[&str] = &[
    "",
    "10.0.0.1",
    "fd00::1",
    "10.0.0.0/24",
    "InternalIP",
    "CiliumInternalIP",
    "TCP",
    "UDP",
    "SCTP",
    "true",
    "false",
    "None",
    "ClientIP",
    "IPv4",
    "IPv6",
    "ns-a",
    "ns-b",
    "a",
    "k8s:app=x",
    "256",
    "999999999999",
    "-1",
    "300.1.1.1",
    "service.cilium.io/global",
    "service.cilium.io/shared",
    "clustermesh.cilium.io/global",
    "kubernetes.io/service-name",
    "svc",
    "ExternalName",
    "LoadBalancer",
    "\u{0}",
    "é",
];

fn arbitrary_json(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let choice = if depth == 0 { u.int_in_range(0..=4)? } else { u.int_in_range(0..=6)? };
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(u.arbitrary::<i64>()? % 70_000),
        3 => Value::String((*u.choose(STRINGS)?).to_string()),
        4 => Value::String(u.arbitrary::<String>()?),
        5 => {
            let n = u.int_in_range(0..=3)?;
            Value::Array((0..n).map(|_| arbitrary_json(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut map = Map::new();
            for _ in 0..n {
                let key = (*u.choose(FIELDS)?).to_string();
                map.insert(key, arbitrary_json(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

const KINDS: &[(&str, &str)] = &[
    ("cilium.io/v2", "CiliumNode"),
    ("cilium.io/v2", "CiliumIdentity"),
    ("cilium.io/v2", "CiliumEndpoint"),
    ("cilium.io/v2alpha1", "CiliumEndpointSlice"),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("multicluster.x-k8s.io/v1alpha1", "ServiceExport"),
    ("v1", "Namespace"),
];

/// A Kubernetes-shaped document: a known kind, a name from a small set (so that updates and
/// deletes collide), and arbitrary content; or, sometimes, whatever JSON the bytes parse as.
fn arbitrary_object(u: &mut Unstructured<'_>) -> Result<Value> {
    if u.ratio(1, 8)? {
        let raw: Vec<u8> = u.arbitrary()?;
        return Ok(serde_json::from_slice(&raw).unwrap_or(Value::Null));
    }
    let (api_version, kind) = *u.choose(KINDS)?;
    let mut object = Map::new();
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    let mut metadata = Map::new();
    let name = if kind == "CiliumIdentity" {
        (*u.choose(&["1000", "70000", "x", ""])?).to_string()
    } else {
        (*u.choose(&["a", "b", "c", ""])?).to_string()
    };
    metadata.insert("name".into(), json!(name));
    metadata.insert("namespace".into(), json!(*u.choose(&["ns-a", "ns-b", ""])?));
    if u.arbitrary()? {
        metadata.insert("annotations".into(), arbitrary_json(u, 2)?);
    }
    if u.arbitrary()? {
        metadata.insert("labels".into(), arbitrary_json(u, 2)?);
    }
    object.insert("metadata".into(), Value::Object(metadata));
    for field in ["spec", "status", "security-labels", "endpoints", "ports", "addressType", "endpoint-slice"] {
        if u.ratio(1, 2)? {
            object.insert(field.into(), arbitrary_json(u, 4)?);
        }
    }
    Ok(Value::Object(object))
}

/// Arbitrary documents applied to (and deleted from) the translation model, under arbitrary
/// settings. Never panics; every key it wants is under `cilium/`; and once every object is
/// deleted, it wants nothing.
pub fn translators(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = translators_inner(&mut u);
}

fn translators_inner(u: &mut Unstructured<'_>) -> Result<()> {
    let mut settings = Settings::new("cluster1", u.int_in_range(1..=255)?);
    settings.enable_cilium_endpoint_slice = u.arbitrary()?;
    settings.mcs_api_enabled = u.arbitrary()?;
    settings.default_global_namespace = u.arbitrary()?;
    let mut model = Model::new(settings);
    let mut seen = BTreeSet::new();
    let steps = u.int_in_range(1..=12)?;
    for _ in 0..steps {
        let document = arbitrary_object(u)?;
        // Documents that do not decode are what the sources skip (with a log line and a metric).
        if let Ok(Some(object)) = Object::decode(document) {
            let key = object.key();
            let changes = model.apply(object);
            seen.insert(key);
            for (k, _) in &changes.upserts {
                assert!(k.starts_with("cilium/"), "key outside cilium/: {k}");
            }
        }
        if u.ratio(1, 5)? && !seen.is_empty() {
            let key = u.choose(&seen.iter().cloned().collect::<Vec<_>>())?.clone();
            let _ = model.delete(&key);
        }
    }
    for key in &seen {
        let _ = model.delete(key);
    }
    let left = model.desired();
    assert!(left.is_empty(), "keys left after every object was deleted: {:?}", left.keys().collect::<Vec<_>>());
    // The kinds enum is exhaustive over what we generate: a new kind needs a generator.
    assert!(KINDS.iter().all(|(_, k)| Kind::from_kubernetes_kind(k).is_some()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Store: arbitrary decoded etcd requests → the in-process store.

const KEYS: &[&[u8]] = &[b"a", b"b", b"b/1", b"b/2", b"c", b"\x00", b"\xff", b""];

fn key(u: &mut Unstructured<'_>) -> Result<Bytes> {
    Ok(if u.ratio(1, 16)? { Bytes::from(u.arbitrary::<Vec<u8>>()?) } else { Bytes::from_static(u.choose(KEYS)?) })
}

fn range_end(u: &mut Unstructured<'_>) -> Result<Bytes> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Bytes::new(),
        1 => Bytes::from_static(b"\x00"),
        _ => key(u)?,
    })
}

fn small(u: &mut Unstructured<'_>) -> Result<i64> {
    Ok(match u.int_in_range(0..=5)? {
        0 => u.arbitrary()?,
        1 => -1,
        _ => u.int_in_range(0..=40)?,
    })
}

fn request_op(u: &mut Unstructured<'_>, depth: u32) -> Result<RequestOp> {
    let request = match u.int_in_range(0..=if depth == 0 { 2 } else { 3 })? {
        0 => Request::RequestRange(range_request(u)?),
        1 => Request::RequestPut(put_request(u)?),
        2 => Request::RequestDeleteRange(DeleteRangeRequest {
            key: key(u)?,
            range_end: range_end(u)?,
            prev_kv: u.arbitrary()?,
        }),
        _ => Request::RequestTxn(txn_request(u, depth - 1)?),
    };
    Ok(RequestOp { request: if u.ratio(1, 30)? { None } else { Some(request) } })
}

fn range_request(u: &mut Unstructured<'_>) -> Result<RangeRequest> {
    Ok(RangeRequest {
        key: key(u)?,
        range_end: range_end(u)?,
        limit: small(u)?,
        revision: small(u)?,
        sort_order: u.int_in_range(-1..=3)?,
        sort_target: u.int_in_range(-1..=5)?,
        serializable: u.arbitrary()?,
        keys_only: u.arbitrary()?,
        count_only: u.arbitrary()?,
        min_mod_revision: if u.ratio(1, 4)? { small(u)? } else { 0 },
        max_mod_revision: if u.ratio(1, 4)? { small(u)? } else { 0 },
        min_create_revision: if u.ratio(1, 4)? { small(u)? } else { 0 },
        max_create_revision: if u.ratio(1, 4)? { small(u)? } else { 0 },
    })
}

fn put_request(u: &mut Unstructured<'_>) -> Result<PutRequest> {
    Ok(PutRequest {
        key: key(u)?,
        value: Bytes::from(u.arbitrary::<Vec<u8>>()?),
        lease: if u.ratio(1, 3)? { u.int_in_range(0..=4)? } else { 0 },
        prev_kv: u.arbitrary()?,
        ignore_value: u.ratio(1, 8)?,
        ignore_lease: u.ratio(1, 8)?,
    })
}

fn txn_request(u: &mut Unstructured<'_>, depth: u32) -> Result<TxnRequest> {
    let compares = u.int_in_range(0..=3)?;
    let mut compare = Vec::new();
    for _ in 0..compares {
        let target = u.int_in_range(-1..=5)?;
        let union = match u.int_in_range(0..=5)? {
            0 => None,
            1 => Some(TargetUnion::Version(small(u)?)),
            2 => Some(TargetUnion::CreateRevision(small(u)?)),
            3 => Some(TargetUnion::ModRevision(small(u)?)),
            4 => Some(TargetUnion::Value(Bytes::from(u.arbitrary::<Vec<u8>>()?))),
            _ => Some(TargetUnion::Lease(small(u)?)),
        };
        compare.push(Compare {
            result: u.int_in_range(-1..=4)?,
            target,
            key: key(u)?,
            range_end: range_end(u)?,
            target_union: union,
        });
    }
    let ops = |u: &mut Unstructured<'_>| -> Result<Vec<RequestOp>> {
        let n = u.int_in_range(0..=4)?;
        (0..n).map(|_| request_op(u, depth)).collect()
    };
    Ok(TxnRequest { compare, success: ops(u)?, failure: ops(u)? })
}

/// Checks what every answer must satisfy whatever came before: the whole keyspace listed in
/// key order without duplicates, each key's revisions consistent with the store's.
fn check_invariants(store: &Store, last_revision: &mut i64) {
    let revision = store.revision();
    assert!(revision >= *last_revision, "revision went back: {last_revision} -> {revision}");
    *last_revision = revision;
    let all = store
        .range(&RangeRequest {
            key: Bytes::from_static(b"\x00"),
            range_end: Bytes::from_static(b"\x00"),
            ..Default::default()
        })
        .expect("a full range at the current revision always answers");
    assert_eq!(all.count as usize, all.kvs.len(), "count without a limit equals the keys returned");
    for pair in all.kvs.windows(2) {
        assert!(pair[0].key < pair[1].key, "keys sorted and unique");
    }
    for kv in &all.kvs {
        assert!(kv.version >= 1 && kv.create_revision >= 1, "live key with a version: {kv:?}");
        assert!(kv.create_revision <= kv.mod_revision && kv.mod_revision <= revision, "revisions in order: {kv:?}");
        if kv.lease != 0 {
            let keys = store.lease_keys(kv.lease).expect("a key's lease exists");
            assert!(keys.iter().any(|k| k == &kv.key), "lease {} does not list its key {kv:?}: {keys:?}", kv.lease);
        }
    }
}

/// Arbitrary KV, Txn, Compact and Lease requests against an in-process store. Never panics;
/// errors are answers too; the invariants of [`check_invariants`] hold after every request,
/// and a successful put is visible to the next read.
pub fn store_requests(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let store = Store::new(
        Identity::random(),
        Limits { max_txn_ops: 8, max_request_bytes: 4096, ..Limits::default() },
        AuthStore::default(),
    );
    let mut last = store.revision();
    let _ = store_inner(&mut u, &store, &mut last);
    check_invariants(&store, &mut last);
}

fn store_inner(u: &mut Unstructured<'_>, store: &Store, last: &mut i64) -> Result<()> {
    let steps = u.int_in_range(1..=24)?;
    // FUZZ_DEBUG=1 prints each request, to turn a failing input into a readable case.
    let debug = std::env::var_os("FUZZ_DEBUG").is_some();
    for _ in 0..steps {
        let choice = u.int_in_range(0..=8)?;
        if debug {
            eprintln!("op {choice}");
        }
        match choice {
            0 => {
                let _ = store.range(&range_request(u)?);
            }
            1 | 2 => {
                let put = put_request(u)?;
                let (k, v, ignore_value) = (put.key.clone(), put.value.clone(), put.ignore_value);
                if debug {
                    eprintln!("put {put:?}");
                }
                let answer = store.put(put);
                if debug {
                    eprintln!("  -> {answer:?}");
                }
                if answer.is_ok() && !ignore_value {
                    let read = store.range(&RangeRequest { key: k, ..Default::default() }).expect("read back");
                    assert_eq!(read.kvs.first().map(|kv| &kv.value), Some(&v), "a put is visible to the next read");
                }
            }
            3 => {
                let _ = store.delete_range(DeleteRangeRequest {
                    key: key(u)?,
                    range_end: range_end(u)?,
                    prev_kv: u.arbitrary()?,
                });
            }
            4 | 5 => {
                let request = txn_request(u, 2)?;
                if debug {
                    eprintln!("txn {request:?}");
                }
                let answer = store.txn(request);
                if debug {
                    eprintln!("  -> {answer:?}");
                }
            }
            6 => {
                let _ = store.compact(&CompactionRequest { revision: small(u)?, physical: u.arbitrary()? });
            }
            7 => {
                let request = LeaseGrantRequest { ttl: small(u)?, id: u.int_in_range(0..=4)? };
                let answer = store.lease_grant(&request, None);
                if debug {
                    eprintln!("grant {request:?} -> {answer:?}");
                }
            }
            _ => {
                let id = u.int_in_range(0..=4)?;
                if u.arbitrary()? {
                    let answer = store.lease_revoke(&LeaseRevokeRequest { id });
                    if debug {
                        eprintln!("revoke {id} -> {answer:?}");
                    }
                } else {
                    let ttl = store.lease_time_to_live(&LeaseTimeToLiveRequest { id, keys: u.arbitrary()? });
                    let renewed = store.lease_keep_alive(id);
                    if debug {
                        eprintln!("time to live {id} -> {ttl:?}; keep-alive -> {renewed:?}");
                    }
                }
            }
        }
        check_invariants(store, last);
    }
    Ok(())
}
