//! Request semantics shared by the top-level RPCs and the operations inside a Txn: range
//! options, request validation, compares, and executing a transaction's branch.

use std::cmp::Ordering;

use bytes::Bytes;

use parking_lot::Mutex;

use super::Write;
use super::count::{self, CountCache};
use super::keyspace::{KeyRange, Keyspace};
use super::versions::Version;
use crate::etcd::error::{Error, Result};
use crate::etcd::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp,
    TxnRequest, TxnResponse,
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
};
use crate::etcd::pb::mvccpb::KeyValue;

/// Serves a Range at `current` (the store's revision, or a txn's pending one).
///
/// Mirrors etcd's `applierV3backend.Range`: limits are pushed into the scan only when no
/// sort or revision filter needs the whole range first; `count` is the number of keys in the
/// range before filters and limit; the header revision is always the current one.
///
/// `counts` remembers counts across requests; only reads at committed revisions may use it
/// (a txn's own reads see its pending revision, which its later writes still change).
pub(crate) fn range(
    keyspace: &Keyspace,
    request: &RangeRequest,
    current: i64,
    compact_revision: i64,
    counts: Option<&Mutex<CountCache>>,
) -> Result<RangeResponse> {
    if request.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    let (sort_order, sort_target) = check_sort(request)?;
    let revision = match request.revision {
        r if r <= 0 => current,
        r if r > current => return Err(Error::FutureRev),
        r if r < compact_revision => return Err(Error::Compacted),
        r => r,
    };
    let key_range = KeyRange::new(&request.key, &request.range_end);
    let count = match counts {
        Some(cache) => count::count(cache, keyspace, key_range, revision),
        None => keyspace.count(key_range, revision),
    } as i64;
    let mut response = RangeResponse { header: None, kvs: Vec::new(), more: false, count };
    if request.count_only {
        return Ok(response);
    }

    let filtered = request.sort_order != SortOrder::None as i32
        || request.min_mod_revision != 0
        || request.max_mod_revision != 0
        || request.min_create_revision != 0
        || request.max_create_revision != 0;
    let limit = usize::try_from(request.limit).unwrap_or(0);
    // One extra to know whether there is more.
    let scan_limit = if limit > 0 && !filtered { limit + 1 } else { usize::MAX };
    let mut kvs = Vec::new();
    keyspace.scan(key_range, revision, |kv| {
        if passes_revision_filters(request, &kv) {
            kvs.push(kv);
        }
        kvs.len() < scan_limit
    });

    // etcd sorts ascending by default when a non-key target is given, and never re-sorts an
    // ascending key order the scan already produced.
    let order = match (sort_order, sort_target) {
        (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key) => None,
        (SortOrder::None, _) | (SortOrder::Ascend, _) => Some(false),
        (SortOrder::Descend, _) => Some(true),
    };
    if let Some(descending) = order {
        let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable, so ties keep key order as in etcd.
        if descending {
            kvs.sort_by(|a, b| by(b, a));
        } else {
            kvs.sort_by(by);
        }
    }
    if limit > 0 && kvs.len() > limit {
        kvs.truncate(limit);
        response.more = true;
    }
    if request.keys_only {
        kvs.iter_mut().for_each(|kv| kv.value = Bytes::new());
    }
    response.kvs = kvs;
    Ok(response)
}

fn check_sort(request: &RangeRequest) -> Result<(SortOrder, SortTarget)> {
    let order = SortOrder::try_from(request.sort_order)
        .map_err(|_| Error::InvalidArgument(format!("invalid sort order {}", request.sort_order)))?;
    let target = SortTarget::try_from(request.sort_target)
        .map_err(|_| Error::InvalidArgument(format!("invalid sort target {}", request.sort_target)))?;
    Ok((order, target))
}

fn passes_revision_filters(request: &RangeRequest, kv: &KeyValue) -> bool {
    (request.min_mod_revision == 0 || kv.mod_revision >= request.min_mod_revision)
        && (request.max_mod_revision == 0 || kv.mod_revision <= request.max_mod_revision)
        && (request.min_create_revision == 0 || kv.create_revision >= request.min_create_revision)
        && (request.max_create_revision == 0 || kv.create_revision <= request.max_create_revision)
}

pub(crate) fn check_put(request: &PutRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if request.ignore_value && !request.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if request.ignore_lease && request.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub(crate) fn check_delete(request: &DeleteRangeRequest) -> Result<()> {
    if request.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` and `checkIntervals`: operation counts, keys present, and no key
/// written twice by one branch (a put inside a deleted range counts as twice).
pub(crate) fn check_txn(request: &TxnRequest, max_ops: usize) -> Result<()> {
    if request.compare.len() > max_ops || request.success.len() > max_ops || request.failure.len() > max_ops {
        return Err(Error::TooManyOps);
    }
    for compare in &request.compare {
        if compare.key.is_empty() {
            return Err(Error::EmptyKey);
        }
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) if r.key.is_empty() => return Err(Error::EmptyKey),
            Some(Request::RequestPut(p)) => check_put(p)?,
            Some(Request::RequestDeleteRange(d)) => check_delete(d)?,
            Some(Request::RequestTxn(t)) => check_txn(t, max_ops)?,
            // etcd's checkRequestOp refuses an empty op before anything runs; found by the
            // store fuzz target: refused only when reached, it left the ops before it half
            // applied (a key deleted yet live, its lease no longer listing it).
            None => return Err(Error::KeyNotFound),
            _ => {}
        }
    }
    check_branch_writes(&request.success)?;
    check_branch_writes(&request.failure)?;
    Ok(())
}

/// etcd's `checkIntervals` (v3rpc/key.go), rule for rule, since clients see its exact
/// verdicts: a put may not hit a key put or deleted elsewhere in the same branch, except that
/// the two branches of a nested txn are alternatives. Like etcd, a nested txn's puts are checked
/// only against the deletes of this level and of the nested txns before it, and a delete's
/// range is `[key, range_end)` compared as plain bytes, so a from-key or all-keys delete
/// (`range_end` = `\0`) is an empty interval that conflicts with nothing.
fn check_branch_writes(ops: &[RequestOp]) -> Result<()> {
    check_intervals(ops).map(drop)
}

/// A delete's interval: one key, or `[key, range_end)`.
fn delete_interval(d: &DeleteRangeRequest) -> (&[u8], Option<&[u8]>) {
    (&d.key, (!d.range_end.is_empty()).then_some(&d.range_end[..]))
}

fn intersects(deletes: &[(&[u8], Option<&[u8]>)], key: &[u8]) -> bool {
    deletes.iter().any(|(start, end)| match end {
        None => *start == key,
        Some(end) => *start <= key && key < *end,
    })
}

type Writes<'a> = (Vec<&'a [u8]>, Vec<(&'a [u8], Option<&'a [u8]>)>);

fn check_intervals(ops: &[RequestOp]) -> Result<Writes<'_>> {
    let mut deletes: Vec<(&[u8], Option<&[u8]>)> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(delete_interval(d)),
            _ => None,
        })
        .collect();
    let mut puts: Vec<&[u8]> = Vec::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, deletes_then) = check_intervals(&t.success)?;
        let (puts_else, deletes_else) = check_intervals(&t.failure)?;
        for key in &puts_then {
            if puts.contains(key) || intersects(&deletes, key) {
                return Err(Error::DuplicateKey);
            }
            puts.push(key);
        }
        for key in &puts_else {
            // The same key in both branches of one nested txn is fine: only one runs.
            if (puts.contains(key) && !puts_then.contains(key)) || intersects(&deletes, key) {
                return Err(Error::DuplicateKey);
            }
            if !puts.contains(key) {
                puts.push(key);
            }
        }
        deletes.extend(deletes_then);
        deletes.extend(deletes_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else { continue };
        if puts.contains(&&p.key[..]) || intersects(&deletes, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.push(&p.key);
    }
    Ok((puts, deletes))
}

/// Evaluates the compares, then runs the chosen branch inside `write`.
///
/// Like etcd, every compare, nested ones included, is evaluated against the state before
/// the transaction: a nested txn does not see the writes of the branch it sits in.
pub(crate) fn execute(write: &mut Write<'_>, request: TxnRequest) -> Result<TxnResponse> {
    let mut path = Vec::new();
    choose_path(write.keyspace(), &request, &mut path);
    // etcd validates every put's lease and key before applying anything, so a bad op
    // leaves no partial transaction behind.
    validate_ops(write, &request, &mut path.iter().copied(), &mut Vec::new())?;
    execute_path(write, request, &mut path.into_iter())
}

/// The branch every txn on the chosen path takes, in pre-order.
fn choose_path(keyspace: &Keyspace, txn: &TxnRequest, path: &mut Vec<bool>) {
    let succeeded = txn.compare.iter().all(|c| compare(keyspace, c));
    path.push(succeeded);
    for op in if succeeded { &txn.success } else { &txn.failure } {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            choose_path(keyspace, nested, path);
        }
    }
}

fn execute_path(
    write: &mut Write<'_>,
    request: TxnRequest,
    path: &mut impl Iterator<Item = bool>,
) -> Result<TxnResponse> {
    let succeeded = path.next().unwrap_or(false);
    let ops = if succeeded { request.success } else { request.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        responses.push(execute_op(write, op, path)?);
    }
    Ok(TxnResponse { header: None, succeeded, responses })
}

/// `trail`: the writes of the ops before this one on the path, in execution order, so that a
/// put that needs its key (`ignore_value`, `ignore_lease`) sees the deletes and puts before it
/// (found by the store fuzz target: a delete then such a put of the same key failed half way).
fn validate_ops<'t>(
    write: &Write<'_>,
    txn: &'t TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    trail: &mut Vec<&'t RequestOp>,
) -> Result<()> {
    let ops = if path.next().unwrap_or(false) { &txn.success } else { &txn.failure };
    for op in ops {
        match &op.request {
            Some(Request::RequestRange(r)) => {
                if r.revision > write.state.revision {
                    return Err(Error::FutureRev);
                }
                if r.revision > 0 && r.revision < write.compact_revision() {
                    return Err(Error::Compacted);
                }
                check_sort(r)?;
            }
            Some(Request::RequestPut(p)) => {
                if p.lease != 0 && !write.state.leases.contains(p.lease) {
                    return Err(Error::LeaseNotFound);
                }
                if (p.ignore_value || p.ignore_lease) && !exists_after(write, trail, &p.key) {
                    return Err(Error::KeyNotFound);
                }
            }
            Some(Request::RequestTxn(nested)) => validate_ops(write, nested, path, trail)?,
            _ => {}
        }
        trail.push(op);
    }
    Ok(())
}

/// Whether `key` exists once the writes in `trail` have run: the last write touching it
/// decides, else the state before the txn.
fn exists_after(write: &Write<'_>, trail: &[&RequestOp], key: &[u8]) -> bool {
    for op in trail.iter().rev() {
        match &op.request {
            Some(Request::RequestPut(p)) if p.key == key => return true,
            Some(Request::RequestDeleteRange(d)) if KeyRange::new(&d.key, &d.range_end).contains(key) => return false,
            _ => {}
        }
    }
    write.keyspace().latest(key).is_some()
}

fn execute_op(write: &mut Write<'_>, op: RequestOp, path: &mut impl Iterator<Item = bool>) -> Result<ResponseOp> {
    let response = match op.request {
        Some(Request::RequestRange(r)) => {
            let current = write.read_revision();
            let mut response = range(write.keyspace(), &r, current, write.compact_revision(), None)?;
            response.header = Some(inner_header(current));
            Response::ResponseRange(response)
        }
        Some(Request::RequestPut(p)) => {
            let mut response = write.put(p, None)?;
            response.header = Some(inner_header(write.revision));
            Response::ResponsePut(response)
        }
        Some(Request::RequestDeleteRange(d)) => {
            let mut response = write.delete_range(&d);
            response.header = Some(inner_header(write.read_revision()));
            Response::ResponseDeleteRange(response)
        }
        Some(Request::RequestTxn(t)) => {
            let mut response = execute_path(write, t, path)?;
            response.header = Some(inner_header(write.read_revision()));
            Response::ResponseTxn(response)
        }
        None => return Err(Error::InvalidArgument("txn operation without a request".into())),
    };
    Ok(ResponseOp { response: Some(response) })
}

/// etcd fills only the revision in the headers of a txn's inner responses.
fn inner_header(revision: i64) -> ResponseHeader {
    ResponseHeader { revision, ..ResponseHeader::default() }
}

/// etcd's `applyCompare`: every key of the range must satisfy the compare; a missing key
/// compares as all zeroes, except that a value compare against a missing key always fails.
fn compare(keyspace: &Keyspace, compare: &Compare) -> bool {
    let live = keyspace.live_in(KeyRange::new(&compare.key, &compare.range_end));
    let target = CompareTarget::try_from(compare.target).unwrap_or(CompareTarget::Version);
    if live.is_empty() {
        // All zeroes: a tombstone's fields.
        return target != CompareTarget::Value && compare_version(compare, target, &Version::tombstone(0), keyspace);
    }
    live.iter().all(|(_, version)| compare_version(compare, target, version, keyspace))
}

fn compare_version(compare: &Compare, target: CompareTarget, kv: &Version, keyspace: &Keyspace) -> bool {
    let value = || keyspace.packer().unpack(&kv.value);
    let ordering = match (target, &compare.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => value().as_ref().cmp(v.as_ref()),
        (CompareTarget::Value, _) => value().as_ref().cmp(&[][..]),
        (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.version.cmp(v),
        (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => kv.create_revision.cmp(v),
        (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.mod_revision.cmp(v),
        (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.lease.cmp(v),
        (CompareTarget::Version, _) => kv.version.cmp(&0),
        (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
        (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
        (CompareTarget::Lease, _) => kv.lease.cmp(&0),
    };
    match CompareResult::try_from(compare.result) {
        Ok(CompareResult::Equal) => ordering == Ordering::Equal,
        Ok(CompareResult::Greater) => ordering == Ordering::Greater,
        Ok(CompareResult::Less) => ordering == Ordering::Less,
        Ok(CompareResult::NotEqual) => ordering != Ordering::Equal,
        Err(_) => false,
    }
}
