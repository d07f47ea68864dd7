//! Differential specifications: the same operations, through the `etcd-client` crate, against a
//! real etcd and against our store, must give the same answers. Only what legitimately
//! differs between two servers is left out: header cluster and member IDs, and raft terms.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::support::{EmbeddedStore, EtcdProcess, Pki};

/// One server's answers to a script, a line per step.
struct Run {
    client: Client,
    lines: Vec<String>,
}

fn show_kv(kv: &KeyValue) -> String {
    format!(
        "{}={} create={} mod={} version={} lease={}",
        String::from_utf8_lossy(kv.key()),
        String::from_utf8_lossy(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

fn show_error(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => format!("error {:?}: {}", status.code(), status.message()),
        other => format!("error {other}"),
    }
}

fn show_op(response: &TxnOpResponse) -> String {
    match response {
        TxnOpResponse::Put(p) => format!("put prev={:?}", p.prev_key().map(show_kv)),
        TxnOpResponse::Get(g) => {
            format!("get count={} kvs={:?}", g.count(), g.kvs().iter().map(show_kv).collect::<Vec<_>>())
        }
        TxnOpResponse::Delete(d) => format!("delete deleted={}", d.deleted()),
        TxnOpResponse::Txn(t) => {
            format!(
                "txn succeeded={} [{}]",
                t.succeeded(),
                t.op_responses().iter().map(show_op).collect::<Vec<_>>().join("; ")
            )
        }
    }
}

impl Run {
    fn record(&mut self, step: &str, outcome: Result<String, etcd_client::Error>) {
        let outcome = outcome.unwrap_or_else(|e| show_error(&e));
        self.lines.push(format!("{step} => {outcome}"));
    }

    async fn put(&mut self, key: &str, value: &str, options: Option<PutOptions>) {
        let result =
            self.client.put(key, value, options.clone()).await.map(|r| {
                format!("rev={} prev={:?}", r.header().map_or(0, |h| h.revision()), r.prev_key().map(show_kv))
            });
        self.record(&format!("put {key} {value} {options:?}"), result);
    }

    async fn get(&mut self, key: &str, options: Option<GetOptions>) {
        let result = self.client.get(key, options.clone()).await.map(|r| {
            format!(
                "rev={} count={} more={} kvs={:?}",
                r.header().map_or(0, |h| h.revision()),
                r.count(),
                r.more(),
                r.kvs().iter().map(show_kv).collect::<Vec<_>>()
            )
        });
        self.record(&format!("get {key:?} {options:?}"), result);
    }

    async fn delete(&mut self, key: &str, options: Option<DeleteOptions>) {
        let result = self.client.delete(key, options.clone()).await.map(|r| {
            format!(
                "rev={} deleted={} prev={:?}",
                r.header().map_or(0, |h| h.revision()),
                r.deleted(),
                r.prev_kvs().iter().map(show_kv).collect::<Vec<_>>()
            )
        });
        self.record(&format!("delete {key:?} {options:?}"), result);
    }

    async fn txn(&mut self, name: &str, txn: Txn) {
        let result = self.client.txn(txn).await.map(|r| {
            format!(
                "rev={} succeeded={} [{}]",
                r.header().map_or(0, |h| h.revision()),
                r.succeeded(),
                r.op_responses().iter().map(show_op).collect::<Vec<_>>().join("; ")
            )
        });
        self.record(&format!("txn {name}"), result);
    }

    /// Opens a watch and records every event until `events` have arrived (or the watch is
    /// cancelled); batching may differ between servers, so events are recorded one by one.
    async fn watch(&mut self, key: &str, options: WatchOptions, events: usize) {
        let step = format!("watch {key:?} {options:?}");
        let mut stream = match self.client.watch(key, Some(options)).await {
            Ok(stream) => stream,
            Err(error) => return self.record(&step, Err(error)),
        };
        let mut seen = Vec::new();
        let collected = tokio::time::timeout(Duration::from_secs(10), async {
            while seen.len() < events {
                let Some(response) = stream.message().await? else { break };
                if response.canceled() {
                    seen.push(format!(
                        "canceled compact_revision={} reason={:?}",
                        response.compact_revision(),
                        response.cancel_reason()
                    ));
                    break;
                }
                for event in response.events() {
                    let kind = match event.event_type() {
                        EventType::Put => "PUT",
                        EventType::Delete => "DELETE",
                    };
                    seen.push(format!(
                        "{kind} {} prev={:?}",
                        event.kv().map(show_kv).unwrap_or_default(),
                        event.prev_kv().map(show_kv)
                    ));
                }
            }
            Ok::<_, etcd_client::Error>(())
        })
        .await;
        let outcome = match collected {
            Ok(Ok(())) => Ok(seen.join(" | ")),
            Ok(Err(error)) => Err(error),
            Err(_) => Ok(format!("timed out after {:?}", seen)),
        };
        self.record(&step, outcome);
    }
}

/// Runs `script` against a real etcd and against our store, then compares step by step.
async fn assert_same_answers<F>(script: F)
where
    F: AsyncFn(&mut Run),
{
    let pki = Pki::new();
    let etcd = EtcdProcess::start(&pki).await;
    let ours = EmbeddedStore::start(&pki).await;
    let mut reference = Run { client: etcd.client(&pki, "root").await, lines: Vec::new() };
    let mut candidate = Run { client: ours.client(&pki, "root").await, lines: Vec::new() };
    script(&mut reference).await;
    script(&mut candidate).await;
    for (i, (want, got)) in reference.lines.iter().zip(&candidate.lines).enumerate() {
        assert_eq!(got, want, "step {i} differs\n  etcd: {want}\n  ours: {got}");
    }
    assert_eq!(candidate.lines.len(), reference.lines.len());
    ours.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_answer_like_etcd_for_every_option() {
    assert_same_answers(async |run: &mut Run| {
        for (key, value) in [("a", "3"), ("b/1", "1"), ("b/2", "22"), ("b/3", "1"), ("c", "0")] {
            run.put(key, value, None).await;
        }
        run.put("b/2", "2", Some(PutOptions::new().with_prev_key())).await;
        run.get("b/", Some(GetOptions::new().with_prefix())).await;
        run.get("b/2", Some(GetOptions::new().with_from_key())).await;
        run.get("b/", Some(GetOptions::new().with_prefix().with_limit(2))).await;
        run.get("b/", Some(GetOptions::new().with_prefix().with_keys_only())).await;
        run.get("b/", Some(GetOptions::new().with_prefix().with_count_only())).await;
        run.get("a", Some(GetOptions::new().with_range("c"))).await;
        run.get("c", Some(GetOptions::new().with_range("a"))).await;
        run.get("", Some(GetOptions::new().with_all_keys().with_serializable())).await;
        for target in [SortTarget::Key, SortTarget::Version, SortTarget::Create, SortTarget::Mod, SortTarget::Value] {
            for order in [SortOrder::None, SortOrder::Ascend, SortOrder::Descend] {
                run.get("", Some(GetOptions::new().with_all_keys().with_sort(target, order).with_limit(3))).await;
            }
        }
        run.get("", Some(GetOptions::new().with_all_keys().with_min_mod_revision(4).with_max_mod_revision(6))).await;
        run.get("", Some(GetOptions::new().with_all_keys().with_min_create_revision(3).with_max_create_revision(5)))
            .await;
        run.get("b/2", Some(GetOptions::new().with_revision(3))).await;
        run.get("b/", Some(GetOptions::new().with_prefix().with_revision(4))).await;
        run.get("a", Some(GetOptions::new().with_revision(100))).await;
        run.get("missing", None).await;
        run.get("", None).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_deletes_and_their_errors_answer_like_etcd() {
    assert_same_answers(async |run: &mut Run| {
        run.put("k", "v1", None).await;
        run.put("k", "v2", Some(PutOptions::new().with_prev_key())).await;
        run.put("k", "", Some(PutOptions::new().with_ignore_value())).await;
        run.put("k", "x", Some(PutOptions::new().with_ignore_value())).await;
        run.put("nope", "", Some(PutOptions::new().with_ignore_value())).await;
        // Found by differential_prop: the lease is looked up before the key.
        run.put("nope", "", Some(PutOptions::new().with_ignore_value().with_lease(777))).await;
        run.put("k", "v3", Some(PutOptions::new().with_ignore_lease())).await;
        run.put("k", "v", Some(PutOptions::new().with_lease(12345))).await;
        run.put("", "v", None).await;
        run.get("k", None).await;
        for key in ["p/1", "p/2", "p/3", "q"] {
            run.put(key, key, None).await;
        }
        run.delete("p/", Some(DeleteOptions::new().with_prefix().with_prev_key())).await;
        run.delete("p/", Some(DeleteOptions::new().with_prefix())).await;
        run.delete("k", Some(DeleteOptions::new().with_from_key().with_prev_key())).await;
        run.put("k", "reborn", None).await;
        run.get("k", None).await;
        run.delete("", None).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_answer_like_etcd() {
    assert_same_answers(async |run: &mut Run| {
        run.put("x", "1", None).await;
        run.put("y", "2", None).await;
        let compares = |op: CompareOp| {
            vec![
                Compare::value("x", op, "1"),
                Compare::version("x", op, 1),
                Compare::create_revision("y", op, 3),
                Compare::mod_revision("y", op, 3),
                Compare::lease("y", op, 0),
            ]
        };
        for (name, op) in [("equal", CompareOp::Equal), ("not_equal", CompareOp::NotEqual)] {
            let txn = Txn::new()
                .when(compares(op))
                .and_then([TxnOp::put("z", name, None), TxnOp::get("z", None)])
                .or_else([TxnOp::delete("y", None), TxnOp::get("y", None)]);
            run.txn(name, txn).await;
        }
        run.txn(
            "missing key compares as zero",
            Txn::new()
                .when([Compare::version("none", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("none", "made", None)]),
        )
        .await;
        run.txn(
            "value compare on a missing key fails",
            Txn::new()
                .when([Compare::value("ghost", CompareOp::NotEqual, "x")])
                .and_then([TxnOp::put("ghost", "made", None)]),
        )
        .await;
        run.txn(
            "range compare covers every key",
            Txn::new()
                .when([Compare::version("x", CompareOp::Greater, 0).with_range("zz")])
                .and_then([TxnOp::get("", Some(GetOptions::new().with_all_keys()))]),
        )
        .await;
        let nested = Txn::new().when([Compare::value("x", CompareOp::Equal, "1")]).and_then([
            TxnOp::put("outer", "1", None),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::value("outer", CompareOp::Equal, "1")])
                    .and_then([TxnOp::put("inner", "1", None)]),
            ),
        ]);
        run.txn("nested", nested).await;
        run.txn("duplicate put", Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)])).await;
        run.txn(
            "put inside a deleted range",
            Txn::new()
                .and_then([TxnOp::delete("d", Some(DeleteOptions::new().with_prefix())), TxnOp::put("d/1", "2", None)]),
        )
        .await;
        run.txn(
            "too many ops",
            Txn::new().and_then((0..129).map(|i| TxnOp::get(format!("k{i}"), None)).collect::<Vec<_>>()),
        )
        .await;
        run.txn(
            "read of a future revision",
            Txn::new()
                .and_then([TxnOp::put("w", "1", None), TxnOp::get("x", Some(GetOptions::new().with_revision(1000)))]),
        )
        .await;
        // Found by differential_prop: etcd checks puts against deletes as `[key, range_end)`
        // in byte order, level by level, so these pass there and must pass here.
        run.txn(
            "a from-key or all-keys delete conflicts with no put",
            Txn::new().and_then([
                TxnOp::delete("a", Some(DeleteOptions::new().with_from_key())),
                TxnOp::delete("", Some(DeleteOptions::new().with_all_keys())),
                TxnOp::put("b", "1", None),
            ]),
        )
        .await;
        run.txn(
            "a nested put before a nested delete of the same key",
            Txn::new().or_else([
                TxnOp::txn(Txn::new().or_else([TxnOp::put("q", "1", None)])),
                TxnOp::txn(Txn::new().or_else([TxnOp::delete("q", None)])),
            ]),
        )
        .await;
        run.txn(
            "a nested delete before a nested put of the same key",
            Txn::new().and_then([
                TxnOp::txn(Txn::new().and_then([TxnOp::delete("q", None)])),
                TxnOp::txn(Txn::new().and_then([TxnOp::put("q", "1", None)])),
            ]),
        )
        .await;
        run.txn("empty", Txn::new()).await;
        run.get("", Some(GetOptions::new().with_all_keys())).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_replay_history_and_report_compaction_like_etcd() {
    assert_same_answers(async |run: &mut Run| {
        run.put("w/a", "1", None).await;
        run.put("w/b", "1", None).await;
        run.put("w/a", "2", None).await;
        run.delete("w/b", None).await;
        run.put("other", "1", None).await;
        run.watch("w/", WatchOptions::new().with_prefix().with_start_revision(2).with_prev_key(), 4).await;
        run.watch("w/", WatchOptions::new().with_prefix().with_start_revision(3), 2).await;
        run.watch("w/a", WatchOptions::new().with_start_revision(1), 2).await;
        run.watch(
            "w/",
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(2)
                .with_filters([etcd_client::WatchFilterType::NoPut]),
            1,
        )
        .await;
        run.watch("", WatchOptions::new().with_all_keys().with_start_revision(2), 5).await;
        // Found by differential_prop: a key put and deleted in one txn reports, in both events,
        // its state before the txn as prev_kv; a key deleted and put again is a creation,
        // without prev_kv.
        run.txn(
            "put then delete from key",
            Txn::new().and_then([
                TxnOp::put("w/a", "3", None),
                TxnOp::delete("w/", Some(DeleteOptions::new().with_from_key())),
            ]),
        )
        .await;
        run.txn(
            "delete every key, then put one again",
            Txn::new().and_then([
                TxnOp::delete("", Some(DeleteOptions::new().with_all_keys())),
                TxnOp::put("w/b", "4", None),
            ]),
        )
        .await;
        run.watch("w/", WatchOptions::new().with_prefix().with_start_revision(6).with_prev_key(), 4).await;
        let compacted =
            run.client.compact(5, None).await.map(|r| format!("rev={}", r.header().map_or(0, |h| h.revision())));
        run.record("compact 5", compacted);
        let again = run.client.compact(4, None).await.map(|_| "ok".to_owned());
        run.record("compact 4 again", again);
        run.watch("w/", WatchOptions::new().with_prefix().with_start_revision(3), 1).await;
        run.watch("w/", WatchOptions::new().with_prefix().with_start_revision(5), 1).await;
        run.get("w/a", Some(GetOptions::new().with_revision(3))).await;
        run.get("w/", Some(GetOptions::new().with_prefix().with_revision(5))).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_watch_sees_later_writes_in_order() {
    assert_same_answers(async |run: &mut Run| {
        let mut stream =
            run.client.watch("live/", Some(WatchOptions::new().with_prefix().with_prev_key())).await.expect("watch");
        let created = stream.message().await.expect("created").expect("a response");
        run.lines.push(format!("created={} canceled={}", created.created(), created.canceled()));
        for i in 0..20 {
            run.put(&format!("live/{}", i % 3), &i.to_string(), None).await;
        }
        run.delete("live/", Some(DeleteOptions::new().with_prefix())).await;
        let mut seen = Vec::new();
        while seen.len() < 23 {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
            let Ok(Ok(Some(response))) = message else { break };
            for event in response.events() {
                seen.push(format!("{:?} {:?}", event.event_type(), event.kv().map(show_kv)));
            }
        }
        run.lines.push(seen.join(" | "));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_answer_like_etcd() {
    assert_same_answers(async |run: &mut Run| {
        // A TTL below etcd's minimum is raised to it; keys go on long leases only, so that
        // no lease can expire while one server runs the script and not the other.
        for (ttl, id) in [(1, 0x100), (600, 0x200), (600, 0x300)] {
            let options = LeaseGrantOptions::new().with_id(id);
            let result =
                run.client.lease_grant(ttl, Some(options)).await.map(|r| format!("id={:x} ttl={}", r.id(), r.ttl()));
            run.record(&format!("grant {ttl}"), result);
        }
        let duplicate =
            run.client.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x200))).await.map(|r| r.id().to_string());
        run.record("grant an existing id", duplicate);
        let too_long = run.client.lease_grant(9_000_000_001, None).await.map(|r| r.ttl().to_string());
        run.record("grant too long a ttl", too_long);
        run.put("l/1", "a", Some(PutOptions::new().with_lease(0x200))).await;
        run.put("l/2", "b", Some(PutOptions::new().with_lease(0x200))).await;
        run.put("l/2", "b", Some(PutOptions::new().with_lease(0x300))).await;
        let ttl =
            run.client.lease_time_to_live(0x200, Some(LeaseTimeToLiveOptions::new().with_keys())).await.map(|r| {
                let keys: Vec<String> = r.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
                format!("granted={} keys={keys:?}", r.granted_ttl())
            });
        run.record("time to live with keys", ttl);
        let missing = run.client.lease_time_to_live(0x999, None).await.map(|r| format!("ttl={}", r.ttl()));
        run.record("time to live of a missing lease", missing);
        let leases = run.client.leases().await.map(|r| {
            let mut ids: Vec<i64> = r.leases().iter().map(|l| l.id()).collect();
            ids.sort();
            format!("{ids:x?}")
        });
        run.record("leases", leases);
        let revoked =
            run.client.lease_revoke(0x200).await.map(|r| format!("rev={}", r.header().map_or(0, |h| h.revision())));
        run.record("revoke", revoked);
        let again = run.client.lease_revoke(0x200).await.map(|_| "ok".to_owned());
        run.record("revoke again", again);
        run.get("l/", Some(GetOptions::new().with_prefix())).await;
        // etcd answers a keep-alive of a missing lease with TTL 0, which the client reports
        // as "lease not found".
        let answer = run.client.lease_keep_alive(0x999).await.map(|(keeper, _)| format!("id={:x}", keeper.id()));
        run.record("keep-alive of a missing lease", answer);
    })
    .await;
}
