//! Property-based differential conformance: random sequences of KV (put, range with every
//! option, delete range), Txn (compares, nested ops), Watch (replayed history, filters,
//! prev_kv, compaction), Lease (grant, attach, time-to-live, list, revoke) and Compact
//! operations, run through `etcd-client` against a real etcd and against our embedded store,
//! must get identical answers. A divergence is shrunk by proptest to a minimal sequence, which
//! the failure prints.
//!
//! Both servers run for the whole test; each case starts by revoking every lease and deleting
//! every key on both, and revisions are shown relative to the revision after that wipe, so
//! cases are independent (and shrinking meaningful) even though revisions keep growing.
//! Normalised away, because they legitimately differ between two servers: header cluster and
//! member IDs and raft terms (never shown), and the absolute revision (shown relative). Leases
//! use client-chosen IDs and long TTLs, so that no lease can expire mid-case on one server
//! only, and remaining TTLs (clock-dependent) are not compared. We run as `root`, so our
//! deliberate "Compact requires the root role" deviation does not apply.
//!
//! Knobs: `DIFF_PROP_CASES` (default 64), `DIFF_PROP_SEED` (default: random, printed).

use std::fmt::Write as _;
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType,
    WatchOptions,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

use crate::support::{EmbeddedStore, EtcdProcess, Pki};

/// Keys drawn from a small universe, so that operations collide. `~s` (the watch sentinel)
/// sorts after all of them.
const KEYS: [&str; 6] = ["a", "b", "b/1", "b/2", "b/3", "c"];
const SENTINEL: &str = "~s";
/// Bound on any single answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
enum Range {
    Single,
    Prefix,
    FromKey,
    To(&'static str),
    All,
}

#[derive(Clone, Debug)]
struct Get {
    key: &'static str,
    range: Range,
    /// Relative revision; `None` reads the current one.
    revision: Option<i64>,
    limit: i64,
    sort: Option<(u8, u8)>,
    keys_only: bool,
    count_only: bool,
    mod_bounds: (Option<i64>, Option<i64>),
    create_bounds: (Option<i64>, Option<i64>),
    serializable: bool,
}

#[derive(Clone, Debug)]
enum Target {
    Value(&'static str),
    Version(i64),
    Create(i64),
    Mod(i64),
    Lease(i64),
}

#[derive(Clone, Debug)]
struct Cmp {
    key: &'static str,
    op: u8,
    target: Target,
    prefix: bool,
}

#[derive(Clone, Debug)]
enum TOp {
    Put(&'static str, &'static str, Option<i64>),
    Get(&'static str, Range),
    Delete(&'static str, Range),
    Txn(Box<TxnSpec>),
}

#[derive(Clone, Debug)]
struct TxnSpec {
    compares: Vec<Cmp>,
    success: Vec<TOp>,
    failure: Vec<TOp>,
}

impl TxnSpec {
    /// Whether some branch could delete a key and put it again in the same revision (told
    /// conservatively: a delete and a put anywhere in the transaction).
    fn may_recreate_a_key(&self) -> bool {
        fn visit(ops: &[TOp], deletes: &mut bool, puts: &mut bool) {
            for op in ops {
                match op {
                    TOp::Put(..) => *puts = true,
                    TOp::Delete(..) => *deletes = true,
                    TOp::Get(..) => {}
                    TOp::Txn(spec) => {
                        visit(&spec.success, deletes, puts);
                        visit(&spec.failure, deletes, puts);
                    }
                }
            }
        }
        let (mut deletes, mut puts) = (false, false);
        visit(&self.success, &mut deletes, &mut puts);
        visit(&self.failure, &mut deletes, &mut puts);
        deletes && puts
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put { key: &'static str, value: &'static str, lease: Option<i64>, prev_kv: bool, ignore_value: bool },
    Get(Get),
    Delete { key: &'static str, range: Range, prev_kv: bool },
    Txn(TxnSpec),
    Grant { id: i64, long: bool },
    Revoke { id: i64 },
    TimeToLive { id: i64, keys: bool },
    Leases,
    Compact { revision: i64, physical: bool },
    Watch { from: Option<&'static str>, start: i64, prev_kv: bool, filter: u8 },
}

fn key() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(&KEYS[..])
}

fn value() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(&["", "1", "2", "x"][..])
}

fn lease_id() -> impl Strategy<Value = i64> {
    1i64..=3
}

fn relative_revision() -> impl Strategy<Value = i64> {
    0i64..=12
}

fn range() -> impl Strategy<Value = Range> {
    prop_oneof![
        3 => Just(Range::Single),
        2 => Just(Range::Prefix),
        1 => Just(Range::FromKey),
        1 => key().prop_map(Range::To),
        1 => Just(Range::All),
    ]
}

fn get() -> impl Strategy<Value = Get> {
    (
        (key(), range(), proptest::option::of(relative_revision()), 0i64..4),
        (proptest::option::weighted(0.3, (0u8..5, 0u8..3)), any::<bool>(), proptest::bool::weighted(0.15)),
        (
            proptest::option::weighted(0.15, relative_revision()),
            proptest::option::weighted(0.15, relative_revision()),
            proptest::option::weighted(0.15, relative_revision()),
            proptest::option::weighted(0.15, relative_revision()),
            any::<bool>(),
        ),
    )
        .prop_map(|((key, range, revision, limit), (sort, keys_only, count_only), (a, b, c, d, serializable))| {
            Get {
                key,
                range,
                revision,
                limit,
                sort,
                keys_only,
                count_only,
                mod_bounds: (a, b),
                create_bounds: (c, d),
                serializable,
            }
        })
}

fn compare() -> impl Strategy<Value = Cmp> {
    let target = prop_oneof![
        value().prop_map(Target::Value),
        (0i64..4).prop_map(Target::Version),
        relative_revision().prop_map(Target::Create),
        relative_revision().prop_map(Target::Mod),
        (0i64..=3).prop_map(Target::Lease),
    ];
    (key(), 0u8..4, target, proptest::bool::weighted(0.2)).prop_map(|(key, op, target, prefix)| Cmp {
        key,
        op,
        target,
        prefix,
    })
}

fn txn() -> impl Strategy<Value = TxnSpec> {
    let leaf = prop_oneof![
        (key(), value(), proptest::option::weighted(0.2, lease_id())).prop_map(|(k, v, l)| TOp::Put(k, v, l)),
        (key(), range()).prop_map(|(k, r)| TOp::Get(k, r)),
        (key(), range()).prop_map(|(k, r)| TOp::Delete(k, r)),
    ];
    let ops = leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            3 => inner.clone(),
            1 => (
                proptest::collection::vec(compare(), 0..3),
                proptest::collection::vec(inner.clone(), 0..3),
                proptest::collection::vec(inner, 0..3),
            )
                .prop_map(|(compares, success, failure)| TOp::Txn(Box::new(TxnSpec { compares, success, failure }))),
        ]
    });
    (
        proptest::collection::vec(compare(), 0..3),
        proptest::collection::vec(ops.clone(), 0..4),
        proptest::collection::vec(ops, 0..4),
    )
        .prop_map(|(compares, success, failure)| TxnSpec { compares, success, failure })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), value(), proptest::option::weighted(0.25, lease_id()), any::<bool>(), proptest::bool::weighted(0.1))
            .prop_map(|(key, value, lease, prev_kv, ignore_value)| Op::Put { key, value, lease, prev_kv, ignore_value }),
        4 => get().prop_map(Op::Get),
        2 => (key(), range(), any::<bool>()).prop_map(|(key, range, prev_kv)| Op::Delete { key, range, prev_kv }),
        3 => txn().prop_map(Op::Txn),
        1 => (lease_id(), any::<bool>()).prop_map(|(id, long)| Op::Grant { id, long }),
        1 => lease_id().prop_map(|id| Op::Revoke { id }),
        1 => (lease_id(), any::<bool>()).prop_map(|(id, keys)| Op::TimeToLive { id, keys }),
        1 => Just(Op::Leases),
        1 => (relative_revision(), any::<bool>()).prop_map(|(revision, physical)| Op::Compact { revision, physical }),
        2 => (proptest::option::of(key()), 1i64..=12, any::<bool>(), 0u8..3)
            .prop_map(|(from, start, prev_kv, filter)| Op::Watch { from, start, prev_kv, filter }),
    ]
}

/// One server, with the revision the current case started from.
struct Server {
    client: Client,
    base: i64,
    /// The latest revision seen in a header (to know when a watch has caught up).
    last: i64,
}

impl Server {
    fn rel(&self, revision: i64) -> i64 {
        if revision == 0 { 0 } else { revision - self.base }
    }

    fn abs(&self, relative: i64) -> i64 {
        self.base + relative
    }

    fn header(&mut self, header: Option<&etcd_client::ResponseHeader>) -> i64 {
        let revision = header.map_or(0, |h| h.revision());
        self.last = self.last.max(revision);
        self.rel(revision)
    }

    fn kv(&self, kv: &KeyValue) -> String {
        format!(
            "{}={:?} c={} m={} v={} l={}",
            String::from_utf8_lossy(kv.key()),
            String::from_utf8_lossy(kv.value()),
            self.rel(kv.create_revision()),
            self.rel(kv.mod_revision()),
            kv.version(),
            kv.lease()
        )
    }

    fn kvs(&self, kvs: &[KeyValue]) -> String {
        kvs.iter().map(|kv| self.kv(kv)).collect::<Vec<_>>().join(", ")
    }

    /// Revokes every lease and deletes every key; the revision after that is the new base.
    async fn wipe(&mut self) -> anyhow::Result<()> {
        for lease in self.client.leases().await?.leases() {
            self.client.lease_revoke(lease.id()).await?;
        }
        self.client.delete("", Some(DeleteOptions::new().with_all_keys())).await?;
        let revision = self.client.get("", Some(GetOptions::new().with_all_keys().with_count_only())).await?;
        self.base = revision.header().map_or(0, |h| h.revision());
        self.last = self.base;
        Ok(())
    }

    fn get_options(&self, get: &Get) -> GetOptions {
        let mut options = range_get(GetOptions::new(), &get.range);
        if let Some(revision) = get.revision {
            options = options.with_revision(self.abs(revision));
        }
        options = options.with_limit(get.limit);
        if let Some((target, order)) = get.sort {
            let target = [SortTarget::Key, SortTarget::Version, SortTarget::Create, SortTarget::Mod, SortTarget::Value]
                [target as usize];
            let order = [SortOrder::None, SortOrder::Ascend, SortOrder::Descend][order as usize];
            options = options.with_sort(target, order);
        }
        if get.keys_only {
            options = options.with_keys_only();
        }
        if get.count_only {
            options = options.with_count_only();
        }
        if let Some(r) = get.mod_bounds.0 {
            options = options.with_min_mod_revision(self.abs(r));
        }
        if let Some(r) = get.mod_bounds.1 {
            options = options.with_max_mod_revision(self.abs(r));
        }
        if let Some(r) = get.create_bounds.0 {
            options = options.with_min_create_revision(self.abs(r));
        }
        if let Some(r) = get.create_bounds.1 {
            options = options.with_max_create_revision(self.abs(r));
        }
        if get.serializable {
            options = options.with_serializable();
        }
        options
    }

    fn compare(&self, cmp: &Cmp) -> Compare {
        let op = [CompareOp::Equal, CompareOp::NotEqual, CompareOp::Greater, CompareOp::Less][cmp.op as usize];
        let compare = match &cmp.target {
            Target::Value(v) => Compare::value(cmp.key, op, *v),
            Target::Version(v) => Compare::version(cmp.key, op, *v),
            Target::Create(r) => Compare::create_revision(cmp.key, op, self.abs(*r)),
            Target::Mod(r) => Compare::mod_revision(cmp.key, op, self.abs(*r)),
            Target::Lease(id) => Compare::lease(cmp.key, op, *id),
        };
        if cmp.prefix { compare.with_prefix() } else { compare }
    }

    fn txn_op(&self, op: &TOp) -> TxnOp {
        match op {
            TOp::Put(k, v, lease) => TxnOp::put(*k, *v, lease.map(|l| PutOptions::new().with_lease(l))),
            TOp::Get(k, r) => TxnOp::get(*k, Some(range_get(GetOptions::new(), r))),
            TOp::Delete(k, r) => TxnOp::delete(*k, Some(range_delete(DeleteOptions::new().with_prev_key(), r))),
            TOp::Txn(spec) => TxnOp::txn(self.txn(spec)),
        }
    }

    fn txn(&self, spec: &TxnSpec) -> Txn {
        Txn::new()
            .when(spec.compares.iter().map(|c| self.compare(c)).collect::<Vec<_>>())
            .and_then(spec.success.iter().map(|o| self.txn_op(o)).collect::<Vec<_>>())
            .or_else(spec.failure.iter().map(|o| self.txn_op(o)).collect::<Vec<_>>())
    }

    fn op_response(&self, response: &TxnOpResponse) -> String {
        match response {
            TxnOpResponse::Put(p) => format!("put prev=[{}]", p.prev_key().map(|kv| self.kv(kv)).unwrap_or_default()),
            TxnOpResponse::Get(g) => format!("get count={} more={} [{}]", g.count(), g.more(), self.kvs(g.kvs())),
            TxnOpResponse::Delete(d) => format!("delete deleted={} prev=[{}]", d.deleted(), self.kvs(d.prev_kvs())),
            TxnOpResponse::Txn(t) => format!(
                "txn ok={} [{}]",
                t.succeeded(),
                t.op_responses().iter().map(|r| self.op_response(r)).collect::<Vec<_>>().join("; ")
            ),
        }
    }

    /// Runs one operation and renders its answer (or error) with relative revisions.
    async fn run(&mut self, op: &Op) -> String {
        match tokio::time::timeout(STEP_TIMEOUT, self.answer(op)).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => show_error(&e),
            Err(_) => format!("no answer within {STEP_TIMEOUT:?}"),
        }
    }

    async fn answer(&mut self, op: &Op) -> Result<String, etcd_client::Error> {
        Ok(match op {
            Op::Put { key, value, lease, prev_kv, ignore_value } => {
                let mut options = PutOptions::new();
                if let Some(lease) = lease {
                    options = options.with_lease(*lease);
                }
                if *prev_kv {
                    options = options.with_prev_key();
                }
                if *ignore_value {
                    options = options.with_ignore_value();
                }
                let r = self.client.put(*key, *value, Some(options)).await?;
                let prev = r.prev_key().map(|kv| self.kv(kv)).unwrap_or_default();
                format!("rev={} prev=[{prev}]", self.header(r.header()))
            }
            Op::Get(get) => {
                let options = self.get_options(get);
                let r = self.client.get(get.key, Some(options)).await?;
                format!("rev={} count={} more={} [{}]", self.header(r.header()), r.count(), r.more(), self.kvs(r.kvs()))
            }
            Op::Delete { key, range, prev_kv } => {
                let mut options = range_delete(DeleteOptions::new(), range);
                if *prev_kv {
                    options = options.with_prev_key();
                }
                let r = self.client.delete(*key, Some(options)).await?;
                format!("rev={} deleted={} prev=[{}]", self.header(r.header()), r.deleted(), self.kvs(r.prev_kvs()))
            }
            Op::Txn(spec) => {
                let txn = self.txn(spec);
                let r = self.client.txn(txn).await?;
                let ops = r.op_responses().iter().map(|o| self.op_response(o)).collect::<Vec<_>>().join("; ");
                format!("rev={} ok={} [{ops}]", self.header(r.header()), r.succeeded())
            }
            Op::Grant { id, long } => {
                let ttl = if *long { 3600 } else { 600 };
                let r = self.client.lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(*id))).await?;
                format!("id={} ttl={}", r.id(), r.ttl())
            }
            Op::Revoke { id } => {
                let r = self.client.lease_revoke(*id).await?;
                format!("rev={}", self.header(r.header()))
            }
            Op::TimeToLive { id, keys } => {
                let options =
                    if *keys { LeaseTimeToLiveOptions::new().with_keys() } else { LeaseTimeToLiveOptions::new() };
                let r = self.client.lease_time_to_live(*id, Some(options)).await?;
                let mut keys: Vec<String> = r.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
                keys.sort();
                // A missing lease answers TTL -1; a live one's remaining TTL depends on the clock.
                format!("id={} granted={} expired={} keys={keys:?}", r.id(), r.granted_ttl(), r.ttl() < 0)
            }
            Op::Leases => {
                let r = self.client.leases().await?;
                let mut ids: Vec<i64> = r.leases().iter().map(|l| l.id()).collect();
                ids.sort();
                format!("{ids:?}")
            }
            Op::Compact { revision, physical } => {
                let options = if *physical { Some(CompactionOptions::new().with_physical()) } else { None };
                let r = self.client.compact(self.abs(*revision), options).await?;
                format!("rev={}", self.header(r.header()))
            }
            Op::Watch { from, start, prev_kv, filter } => self.watch(*from, *start, *prev_kv, *filter).await?,
        })
    }

    /// Watches from relative revision `start`, then writes the sentinel (a put and a delete
    /// of `~s`, the same on both servers) and records every event up to this sentinel's:
    /// events arrive in revision order, so the sentinel marks the end without any timeout.
    async fn watch(
        &mut self,
        from: Option<&'static str>,
        start: i64,
        prev_kv: bool,
        filter: u8,
    ) -> Result<String, etcd_client::Error> {
        let mut options = WatchOptions::new().with_start_revision(self.abs(start));
        options = match from {
            Some(_) => options.with_from_key(),
            None => options.with_all_keys(),
        };
        if prev_kv {
            options = options.with_prev_key();
        }
        let filters = match filter {
            1 => vec![WatchFilterType::NoPut],
            2 => vec![WatchFilterType::NoDelete],
            _ => vec![],
        };
        options = options.with_filters(filters);
        let mut stream = self.client.watch(from.unwrap_or(""), Some(options)).await?;
        let mut out = String::new();
        let created = stream.message().await?;
        let put = self.client.put(SENTINEL, "", None).await?;
        let put_revision = put.header().map_or(0, |h| h.revision());
        let r = self.client.delete(SENTINEL, None).await?;
        let delete_revision = r.header().map_or(0, |h| h.revision());
        self.header(r.header());
        // The last event to come is this sentinel's delete, or with NoDelete its put (earlier
        // cases' sentinels are in the replayed history too, and batching differs).
        let last = if filter == 2 { put_revision } else { delete_revision };
        if self.abs(start) > last {
            // A watch from a revision still to come: nothing to see (yet), on either server.
            let created = created.map(|m| format!("created={} canceled={}", m.created(), m.canceled()));
            return Ok(format!("watch from the future: {created:?}"));
        }
        let mut response = created;
        loop {
            let Some(message) = response else {
                out.push_str(" | stream ended");
                break;
            };
            if message.canceled() {
                let compacted = self.rel(message.compact_revision());
                let _ = write!(out, " | canceled compact={compacted} reason={:?}", message.cancel_reason());
                break;
            }
            let mut done = false;
            for event in message.events() {
                let kind = match event.event_type() {
                    EventType::Put => "PUT",
                    EventType::Delete => "DEL",
                };
                let kv = event.kv().map(|kv| self.kv(kv)).unwrap_or_default();
                let prev = event.prev_kv().map(|kv| self.kv(kv)).unwrap_or_default();
                let _ = write!(out, " | {kind} {kv} prev=[{prev}]");
                done |= event.kv().is_some_and(|kv| kv.mod_revision() == last);
            }
            if done {
                break;
            }
            response = stream.message().await?;
        }
        Ok(format!("watch{out}"))
    }
}

fn range_get(options: GetOptions, range: &Range) -> GetOptions {
    match range {
        Range::Single => options,
        Range::Prefix => options.with_prefix(),
        Range::FromKey => options.with_from_key(),
        Range::To(end) => options.with_range(*end),
        Range::All => options.with_all_keys(),
    }
}

fn range_delete(options: DeleteOptions, range: &Range) -> DeleteOptions {
    match range {
        Range::Single => options,
        Range::Prefix => options.with_prefix(),
        Range::FromKey => options.with_from_key(),
        Range::To(end) => options.with_range(*end),
        Range::All => options.with_all_keys(),
    }
}

fn show_error(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => format!("error {:?}: {}", status.code(), status.message()),
        other => format!("error {other}"),
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// For any sequence of KV, Txn, Watch, Lease and Compact operations, our store answers exactly
/// as etcd does (relative revisions, same errors, same events).
#[test]
fn random_operation_sequences_get_the_same_answers_from_our_store_as_from_etcd() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let pki = Pki::new();
    let (etcd, ours) = runtime.block_on(async {
        let etcd = EtcdProcess::start(&pki).await;
        let ours = EmbeddedStore::start(&pki).await;
        (etcd, ours)
    });
    let (reference, candidate) =
        runtime.block_on(async { (etcd.client(&pki, "root").await, ours.client(&pki, "root").await) });
    let etcd_process = &etcd;
    let servers = std::cell::RefCell::new((
        Server { client: reference, base: 0, last: 0 },
        Server { client: candidate, base: 0, last: 0 },
    ));

    let cases: u32 = env_or("DIFF_PROP_CASES", 64);
    let seed: u64 = env_or("DIFF_PROP_SEED", rand::random());
    println!("differential_prop: DIFF_PROP_SEED={seed} DIFF_PROP_CASES={cases}");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { cases, max_shrink_iters: 512, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let steps = std::cell::Cell::new(0usize);
    let first_divergence = std::cell::Cell::new(false);
    let skipped_compactions = std::cell::Cell::new(0usize);
    let result = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
        let mut servers = servers.borrow_mut();
        let (etcd, ours) = &mut *servers;
        runtime.block_on(async {
            etcd.wipe().await.map_err(|e| TestCaseError::fail(format!("wiping etcd: {e:#}")))?;
            ours.wipe().await.map_err(|e| TestCaseError::fail(format!("wiping our store: {e:#}")))?;
            // Revisions (relative) at which a transaction may have deleted and re-created a key.
            let mut recreated_at = std::collections::BTreeSet::new();
            for (i, op) in ops.iter().enumerate() {
                steps.set(steps.get() + 1);
                if let Op::Compact { revision, .. } = op
                    && recreated_at.contains(revision)
                {
                    // etcd 3.5.15 and later lose such a key's live value when compacted at exactly
                    // that revision and die at the next read of it ("range failed to find revision
                    // pair", etcd-io/etcd#22376, a regression from #18274; open). Our store keeps
                    // the value; the case goes on without that compaction on either server.
                    skipped_compactions.set(skipped_compactions.get() + 1);
                    continue;
                }
                let before = etcd.last;
                let want = etcd.run(op).await;
                let got = ours.run(op).await;
                if let Op::Txn(spec) = op
                    && etcd.last > before
                    && spec.may_recreate_a_key()
                {
                    recreated_at.insert(etcd.rel(etcd.last));
                }
                if want != got {
                    if !first_divergence.replace(true) {
                        // Shown at once: shrinking can take a while.
                        println!("differential_prop: divergence before shrinking at step {i} ({op:?})\n  etcd: {want}\n  ours: {got}");
                        // An etcd that died answers every later case with a transport error:
                        // its own last words tell whether it hit one of its bugs.
                        let log = etcd_process.log_tail(20);
                        let last_words = log.lines().rfind(|l| l.contains(r#""level":"fatal""#) || l.contains("panic"));
                        if let Some(fatal) = last_words {
                            println!("differential_prop: etcd's log: {fatal}\n  the case: {ops:?}");
                        }
                    }
                    return Err(TestCaseError::fail(format!(
                        "step {i} ({op:?}) differs\n  etcd: {want}\n  ours: {got}"
                    )));
                }
            }
            Ok(())
        })
    });
    println!(
        "differential_prop: seed={seed} sequences={cases} steps={} divergences={} compactions skipped (etcd-io/etcd#22376)={}",
        steps.get(),
        u8::from(result.is_err()),
        skipped_compactions.get()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, minimal)) => {
            panic!("DIFF_PROP_SEED={seed}: our store diverges from etcd.\n{reason}\nminimal sequence:\n{minimal:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("DIFF_PROP_SEED={seed}: aborted: {reason}"),
    }
    runtime.block_on(ours.stop());
    drop(etcd);
}
