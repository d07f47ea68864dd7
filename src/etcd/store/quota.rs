//! The space quota: etcd's `--quota-backend-bytes` and the cost of a request against it
//! (`server/etcdserver/quota.go`, `api/v3rpc/quota.go`, and the capped applier of
//! `server/etcdserver/apply.go`, release 3.5).
//!
//! What is counted: the bytes of every key the store holds and of the value of every version
//! it holds, the live ones and those the history keeps until a compaction drops them
//! ([`super::keyspace::Keyspace::retained_bytes`]). That is the data itself, measured exactly;
//! the store's own structures around it (tree nodes, version records, history entries, lease
//! sets) are not counted, and add about 190 bytes per key with Cilium's keys on leases
//! (`examples/store_memory`). etcd counts the size of its bbolt file instead, which for the same
//! data is larger (per-revision metadata, page slack, and no shrinking before a defragment), so
//! whatever fits under etcd's quota fits under the same quota here.
//!
//! As in etcd, a request that could grow the store is refused when its cost would take the
//! count to the quota or beyond (etcd: `size + cost < quota` is available), and the refusal
//! raises the NOSPACE alarm. While the alarm is active every such request is refused, even
//! once space is free again, until an administrator disarms it: etcd's capped applier.
//! Requests that cannot grow the store (reads, deletes, transactions without a put,
//! compaction, lease revokes and keep-alives) always pass.

use super::keyspace::Keyspace;
use crate::etcd::pb::etcdserverpb::{PutRequest, RequestOp, TxnRequest, request_op::Request};

/// etcd's `DefaultQuotaBytes`, used when the flag is 0, and ours too: a store that stays under
/// etcd's default stays under ours (see the module comment), so replacing an etcd sidecar never
/// refuses writes that etcd accepted. At that bound the store holds about 7 million
/// Cilium-shaped keys (some 290 bytes of key and value each) in about 3.3 GiB (with the ~190
/// bytes per key above); lower it to bound memory more tightly.
pub const DEFAULT_QUOTA_BYTES: i64 = 2 * 1024 * 1024 * 1024;

/// The quota in effect for the flag's value: 0 is etcd's default, a negative value turns the
/// quota off (as in etcd).
pub fn effective(configured: i64) -> i64 {
    if configured == 0 { DEFAULT_QUOTA_BYTES } else { configured }
}

/// The byte limit for the flag's value, `None` when the quota is off.
pub fn limit(configured: i64) -> Option<usize> {
    usize::try_from(effective(configured)).ok()
}

/// What a put can add: its key (counted even when the key is held already, so that the cost
/// never falls short) and its value, which for `ignore_value` is the value it keeps.
pub fn put_cost(keyspace: &Keyspace, put: &PutRequest) -> usize {
    let value = if put.ignore_value { keyspace.latest(&put.key).map_or(0, |v| v.value.len()) } else { put.value.len() };
    put.key.len() + value
}

/// What a transaction can add: the costlier of its two branches, as etcd's `costTxn` decides
/// before it knows which one runs. Unlike etcd, whose cost only sees the puts at the top
/// level, nested transactions count too: a quota that a nested put gets round bounds nothing.
pub fn txn_cost(keyspace: &Keyspace, txn: &TxnRequest) -> usize {
    branch_cost(keyspace, &txn.success).max(branch_cost(keyspace, &txn.failure))
}

fn branch_cost(keyspace: &Keyspace, ops: &[RequestOp]) -> usize {
    ops.iter()
        .map(|op| match &op.request {
            Some(Request::RequestPut(put)) => put_cost(keyspace, put),
            Some(Request::RequestTxn(nested)) => txn_cost(keyspace, nested),
            _ => 0,
        })
        .sum()
}

/// Whether a request of `cost` must be refused, with `used` bytes held and the quota `limit`.
pub fn exceeds(used: usize, cost: usize, limit: Option<usize>) -> bool {
    limit.is_some_and(|limit| used.saturating_add(cost) >= limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::Blob;
    use crate::etcd::pb::etcdserverpb::DeleteRangeRequest;
    use crate::etcd::store::packing::Value;

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn delete(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest { compare: vec![], success, failure }
    }

    #[test]
    fn zero_is_etcds_default_and_a_negative_quota_is_off() {
        assert_eq!(limit(0), Some(2 << 30));
        assert_eq!(limit(4096), Some(4096));
        assert_eq!(limit(-1), None);
        assert_eq!(effective(-1), -1, "reported as configured, as etcd's gauge does");
    }

    #[test]
    fn a_request_is_refused_when_it_would_reach_the_quota() {
        assert!(!exceeds(90, 9, Some(100)));
        assert!(exceeds(90, 10, Some(100)), "etcd needs size + cost < quota");
        assert!(!exceeds(usize::MAX, 1, None));
    }

    #[test]
    fn a_put_costs_its_key_and_the_value_it_will_hold() {
        let mut keyspace = Keyspace::default();
        keyspace.put(b"k", Value::Plain(Blob::copy_from(b"12345")), 0, 2);
        let Some(Request::RequestPut(mut request)) = put("k", "ab").request else { unreachable!() };
        assert_eq!(put_cost(&keyspace, &request), 3);
        request.value = Default::default();
        request.ignore_value = true;
        assert_eq!(put_cost(&keyspace, &request), 1 + 5, "keeps the 5-byte value, in a new version");
    }

    #[test]
    fn a_txn_costs_its_costlier_branch_nested_puts_included_and_deletes_nothing() {
        let keyspace = Keyspace::default();
        assert_eq!(txn_cost(&keyspace, &txn(vec![delete("a")], vec![])), 0);
        assert_eq!(txn_cost(&keyspace, &txn(vec![put("a", "1"), put("b", "22")], vec![put("c", "1")])), 5);
        let nested = RequestOp { request: Some(Request::RequestTxn(txn(vec![put("n", "123")], vec![]))) };
        assert_eq!(txn_cost(&keyspace, &txn(vec![delete("a"), nested], vec![])), 4);
    }
}
