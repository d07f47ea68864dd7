//! What the store has done since start, counted as etcd's `--metrics=basic` counts it, for the
//! `etcd_mvcc_*_total`, `etcd_server_proposals_*` and lease families of the metrics listener.
//!
//! Atomics beside the state rather than in it: reads count too, and take only the read lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::etcd::pb::etcdserverpb::{RequestOp, TxnRequest, TxnResponse, request_op, response_op};

#[derive(Debug, Default)]
pub(super) struct Counters {
    ranges: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
    txns: AtomicU64,
    applied: AtomicU64,
    leases_granted: AtomicU64,
    leases_revoked: AtomicU64,
    leases_renewed: AtomicU64,
    leases_expired: AtomicU64,
}

/// A reading of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Range operations, top-level or inside a txn (etcd's `etcd_mvcc_range_total`).
    pub ranges: u64,
    /// Put operations, top-level or inside a txn.
    pub puts: u64,
    /// DeleteRange operations (not the keys they deleted), top-level or inside a txn.
    pub deletes: u64,
    /// Txn requests.
    pub txns: u64,
    /// Requests that etcd would have passed through consensus, applied: puts, deletes, txns
    /// that write, compactions, lease grants and revocations (one per expired lease, as
    /// etcd's leader proposes them), alarm changes. User and role changes are not counted.
    pub applied: u64,
    pub leases_granted: u64,
    /// Revoked by a client or expired, as etcd's lessor counts both.
    pub leases_revoked: u64,
    pub leases_renewed: u64,
    pub leases_expired: u64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn range(&self) {
        add(&self.ranges, 1);
    }

    pub(super) fn put(&self) {
        add(&self.puts, 1);
        add(&self.applied, 1);
    }

    pub(super) fn delete(&self) {
        add(&self.deletes, 1);
        add(&self.applied, 1);
    }

    /// A txn that ran: the operations of the branches it took, nested txns included.
    pub(super) fn txn(&self, request_writes: bool, response: &TxnResponse) {
        add(&self.txns, 1);
        if request_writes {
            add(&self.applied, 1);
        }
        self.txn_ops(response);
    }

    fn txn_ops(&self, response: &TxnResponse) {
        for op in &response.responses {
            match &op.response {
                Some(response_op::Response::ResponseRange(_)) => add(&self.ranges, 1),
                Some(response_op::Response::ResponsePut(_)) => add(&self.puts, 1),
                Some(response_op::Response::ResponseDeleteRange(_)) => add(&self.deletes, 1),
                Some(response_op::Response::ResponseTxn(nested)) => self.txn_ops(nested),
                None => {}
            }
        }
    }

    /// A compaction or an alarm change: applied, nothing else counted.
    pub(super) fn applied(&self) {
        add(&self.applied, 1);
    }

    pub(super) fn lease_granted(&self) {
        add(&self.leases_granted, 1);
        add(&self.applied, 1);
    }

    pub(super) fn lease_revoked(&self) {
        add(&self.leases_revoked, 1);
        add(&self.applied, 1);
    }

    pub(super) fn leases_expired(&self, n: u64) {
        add(&self.leases_expired, n);
        add(&self.leases_revoked, n);
        add(&self.applied, n);
    }

    pub(super) fn lease_renewed(&self) {
        add(&self.leases_renewed, 1);
    }

    pub(super) fn read(&self) -> Activity {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Activity {
            ranges: get(&self.ranges),
            puts: get(&self.puts),
            deletes: get(&self.deletes),
            txns: get(&self.txns),
            applied: get(&self.applied),
            leases_granted: get(&self.leases_granted),
            leases_revoked: get(&self.leases_revoked),
            leases_renewed: get(&self.leases_renewed),
            leases_expired: get(&self.leases_expired),
        }
    }
}

/// Whether any branch of the txn could write: etcd serves a txn without puts and deletes as
/// a read, outside consensus.
pub(super) fn writes(request: &TxnRequest) -> bool {
    let op_writes = |op: &RequestOp| match &op.request {
        Some(request_op::Request::RequestPut(_) | request_op::Request::RequestDeleteRange(_)) => true,
        Some(request_op::Request::RequestTxn(nested)) => writes(nested),
        Some(request_op::Request::RequestRange(_)) | None => false,
    };
    request.success.iter().chain(&request.failure).any(op_writes)
}
