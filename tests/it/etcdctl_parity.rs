//! etcdctl 3.5 against our store prints what it prints against a real etcd 3.5 (Debian's 3.5.16,
//! the harness's oracle).
//!
//! Each scenario starts one real etcd and one embedded store with the same PKI, runs the same
//! etcdctl commands against both (the two runs of a step side by side, steps one after the
//! other) and compares, step by step, the exit code, stdout and stderr. Only what legitimately
//! differs between two independent single-member clusters is normalised away (see
//! [`Parity::normalise`]): cluster and member IDs, lease IDs (etcd derives them from its
//! member ID and clock), the endpoint URL, raft term and index, version string, database size,
//! health-check latency, the member's name and peer URLs, and etcd's own non-determinism (the
//! order of a lease's attached keys, sub-second lease countdowns). etcdctl's JSON log lines on
//! stderr are reduced to the gRPC error they report, since they carry timestamps and client IDs.
//!
//! Deliberate differences are asserted as such, never normalised: our store answers as etcd
//! 3.5 does where 3.5 changed behaviour (see the auth scenario), and compaction needs role
//! root (see `KvService::compact`), so it is only run as root here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use clustermesh_apiserver::etcd::auth::AuthStore;
use clustermesh_apiserver::etcd::store::Limits;

use crate::support::{ClientCert, EmbeddedStore, EtcdProcess, Etcdctl, Output, Pki, init_tracing};

/// Bound on one ordinary etcdctl run (etcdctl's own request timeout is 5 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a `watch` that never ends on its own is left to print what it replays. Every event
/// it should print exists before it starts, so this only has to cover process start-up.
const WATCH_WINDOW: Duration = Duration::from_millis(2500);

/// What one etcdctl run showed, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Exit code; `None` when killed at the end of its window (a watch).
    pub(crate) code: Option<i32>,
    pub(crate) timed_out: bool,
    pub(crate) stdout: String,
    /// stderr lines; etcdctl's JSON log lines are replaced by the gRPC error they report.
    pub(crate) stderr: Vec<String>,
}

impl Seen {
    pub(crate) fn succeeded(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// The last `Error: ...` line of stderr, or "" when there is none.
    pub(crate) fn error(&self) -> &str {
        self.stderr.iter().rev().find(|l| l.starts_with("Error:")).map_or("", String::as_str)
    }
}

/// One server as etcdctl sees it.
struct Side {
    name: &'static str,
    /// `127.0.0.1:<port>`
    endpoint: String,
    cluster_id: u64,
    member_id: u64,
    /// Lease IDs in the order this scenario granted them: `{lease1}` is the first.
    leases: Vec<i64>,
}

/// A real etcd and our store, driven by the same etcdctl commands.
pub(crate) struct Parity {
    etcd: EtcdProcess,
    ours: EmbeddedStore,
    sides: [Side; 2],
    /// One client certificate per Common Name, shared by both sides.
    certs: Mutex<HashMap<String, ClientCert>>,
    step: usize,
    /// Last, so that its files outlive both servers.
    pki: Pki,
}

impl Parity {
    async fn start() -> Parity {
        Self::start_with(&[], Limits::default()).await
    }

    /// Both servers configured alike: etcd with `etcd_args`, ours with the same `limits`.
    pub(crate) async fn start_with(etcd_args: &[&str], limits: Limits) -> Parity {
        init_tracing();
        let pki = Pki::new();
        let (etcd, ours) = tokio::join!(
            EtcdProcess::start_with_args(&pki, etcd_args),
            EmbeddedStore::start_with(&pki, AuthStore::default(), limits)
        );
        let real_ids = ids(&mut etcd.client(&pki, "root").await).await;
        let our_ids = ids(&mut ours.client(&pki, "root").await).await;
        let side = |name, endpoint, (cluster_id, member_id)| Side {
            name,
            endpoint,
            cluster_id,
            member_id,
            leases: Vec::new(),
        };
        let sides = [side("real etcd", etcd.endpoint(), real_ids), side("our store", ours.endpoint(), our_ids)];
        Parity { etcd, ours, sides, certs: Mutex::new(HashMap::new()), step: 0, pki }
    }

    /// An etcd client of each server as `user`: the real etcd's first.
    pub(crate) async fn clients(&self, user: &str) -> [etcd_client::Client; 2] {
        [self.etcd.client(&self.pki, user).await, self.ours.client(&self.pki, user).await]
    }

    fn cert(&self, user: &str) -> ClientCert {
        let mut certs = self.certs.lock().unwrap();
        certs.entry(user.to_owned()).or_insert_with(|| self.pki.client(user)).clone()
    }

    /// Runs `etcdctl <args>` as `user` against both servers at once; `{leaseN}` in an argument
    /// becomes that side's N-th granted lease ID (hex, as etcdctl takes it).
    async fn run_raw(&self, user: &str, args: &[&str], stdin: Option<&str>, timeout: Duration) -> [Output; 2] {
        let cert = self.cert(user);
        let run = |side: &Side| {
            let args: Vec<String> = args.iter().map(|a| substitute_leases(a, &side.leases)).collect();
            let ctl = Etcdctl::with_cert(&side.endpoint, self.pki.ca_path(), &cert);
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ctl.run_with_timeout_async(&args, stdin, timeout).await
            }
        };
        let (real, ours) = tokio::join!(run(&self.sides[0]), run(&self.sides[1]));
        [real, ours]
    }

    /// Runs a step on both sides and returns what each showed, normalised, without comparing:
    /// for the few steps where a difference is expected and asserted by the caller.
    pub(crate) async fn both(&mut self, user: &str, args: &[&str], stdin: Option<&str>) -> [Seen; 2] {
        self.step += 1;
        let outputs = self.run_raw(user, args, stdin, RUN_TIMEOUT).await;
        if args.starts_with(&["lease", "grant"]) {
            for (side, out) in self.sides.iter_mut().zip(&outputs) {
                if let Some(id) = granted_lease(out) {
                    side.leases.push(id);
                }
            }
        }
        let seen = [self.normalise(0, args, &outputs[0]), self.normalise(1, args, &outputs[1])];
        for (out, seen) in outputs.iter().zip(&seen) {
            assert!(
                !out.timed_out,
                "step {}: etcdctl {args:?} did not finish within {RUN_TIMEOUT:?}: {seen:#?}",
                self.step
            );
        }
        seen
    }

    /// Runs a step on both sides and asserts that they showed the same.
    async fn same(&mut self, user: &str, args: &[&str], stdin: Option<&str>) -> Seen {
        let [real, ours] = self.both(user, args, stdin).await;
        self.assert_same(user, args, stdin, &real, &ours);
        ours
    }

    #[track_caller]
    fn assert_same(&self, user: &str, args: &[&str], stdin: Option<&str>, real: &Seen, ours: &Seen) {
        if real == ours {
            return;
        }
        let mut msg = format!("step {}: `etcdctl {}` as {user:?} differs", self.step, args.join(" "));
        if let Some(stdin) = stdin {
            let _ = write!(msg, "\nstdin:\n{stdin}");
        }
        for (side, seen) in self.sides.iter().zip([real, ours]) {
            let _ = write!(
                msg,
                "\n--- {} (exit {:?}, timed out {}) stdout:\n{}--- {} stderr:\n{}\n",
                side.name,
                seen.code,
                seen.timed_out,
                seen.stdout,
                side.name,
                seen.stderr.join("\n")
            );
        }
        panic!("{msg}");
    }

    /// Both succeed and print the same; returns the (normalised) stdout.
    pub(crate) async fn ok(&mut self, user: &str, args: &[&str]) -> String {
        let seen = self.same(user, args, None).await;
        assert!(
            seen.succeeded(),
            "step {}: `etcdctl {}` as {user:?} failed on both: {seen:#?}",
            self.step,
            args.join(" ")
        );
        seen.stdout
    }

    /// Both fail the same way; returns the final `Error: ...` line.
    pub(crate) async fn fails(&mut self, user: &str, args: &[&str]) -> String {
        let seen = self.same(user, args, None).await;
        assert!(
            !seen.succeeded() && !seen.error().is_empty(),
            "step {}: `etcdctl {}` as {user:?} was expected to fail with an error: {seen:#?}",
            self.step,
            args.join(" ")
        );
        seen.error().to_owned()
    }

    /// `etcdctl txn` reading compares, success ops and failure ops from stdin; both succeed
    /// and print the same. Returns the stdout.
    pub(crate) async fn txn(&mut self, user: &str, extra: &[&str], script: &str) -> String {
        let args: Vec<&str> = ["txn"].iter().chain(extra).copied().collect();
        let seen = self.same(user, &args, Some(script)).await;
        assert!(seen.succeeded(), "step {}: txn as {user:?} failed on both: {seen:#?}\nstdin:\n{script}", self.step);
        seen.stdout
    }

    /// Like [`Parity::txn`], for a transaction both servers refuse; returns the error line.
    pub(crate) async fn txn_fails(&mut self, user: &str, script: &str) -> String {
        let seen = self.same(user, &["txn"], Some(script)).await;
        assert!(
            !seen.succeeded() && !seen.error().is_empty(),
            "step {}: txn as {user:?} was expected to fail: {seen:#?}\nstdin:\n{script}",
            self.step
        );
        seen.error().to_owned()
    }

    /// Runs several watches at once on both sides, each killed after `window` unless it ends
    /// by itself, and asserts each prints the same on both. Returns the outputs in order.
    async fn watches(&mut self, user: &str, watches: &[&[&str]], window: Duration) -> Vec<Seen> {
        let runs = watches.iter().map(|args| self.run_raw(user, args, None, window));
        let outputs = futures::future::join_all(runs).await;
        let mut seen = Vec::new();
        for (args, outputs) in watches.iter().zip(outputs) {
            self.step += 1;
            let real = self.normalise(0, args, &outputs[0]);
            let ours = self.normalise(1, args, &outputs[1]);
            self.assert_same(user, args, None, &real, &ours);
            seen.push(ours);
        }
        seen
    }

    /// Puts what legitimately differs between the two servers into placeholders.
    fn normalise(&self, side: usize, args: &[&str], out: &Output) -> Seen {
        let side = &self.sides[side];
        let command: Vec<&str> = args.iter().copied().filter(|a| !a.starts_with('-')).take(2).collect();
        let json = args.iter().any(|a| *a == "-w=json" || *a == "--write-out=json")
            || args.windows(2).any(|w| w == ["-w", "json"]);
        let text = |raw: &str| -> String {
            let mut t = raw.replace(&side.endpoint, "<endpoint>");
            for (i, id) in side.leases.iter().enumerate() {
                let name = format!("<lease{}>", i + 1);
                for form in [format!("{id:016x}"), format!("{id:x}"), id.to_string()] {
                    t = replace_token(&t, &form, &name);
                }
            }
            for (id, name) in [(side.cluster_id, "<cluster-id>"), (side.member_id, "<member-id>")] {
                for form in [format!("{id:016x}"), format!("{id:x}"), id.to_string()] {
                    t = replace_token(&t, &form, name);
                }
            }
            t = replace_json_field(&t, "raft_term", "<raft-term>");
            match command.as_slice() {
                ["endpoint", "status"] if json => {
                    for field in ["version", "dbSize", "dbSizeInUse", "raftIndex", "raftTerm", "raftAppliedIndex"] {
                        t = replace_json_field(&t, field, &format!("<{field}>"));
                    }
                }
                // endpoint, ID, version, DB size, is leader, is learner, raft term, raft index,
                // raft applied index, errors
                ["endpoint", "status"] => {
                    t = replace_columns(
                        &t,
                        &[
                            (2, "<version>"),
                            (3, "<db-size>"),
                            (6, "<raft-term>"),
                            (7, "<raft-index>"),
                            (8, "<raft-applied-index>"),
                        ],
                    );
                }
                ["endpoint", "health"] if json => t = replace_json_field(&t, "took", "<took>"),
                ["endpoint", "health"] => t = replace_after(&t, "took = ", "<took>"),
                // ID, status, name, peer URLs, client URLs, is learner: the name is the harness's
                // choice, and the embedded store has no raft peers.
                ["member", "list"] if !json => t = replace_columns(&t, &[(2, "<name>"), (3, "<peer-urls>")]),
                ["lease", "timetolive"] => t = t.lines().map(normalise_time_to_live).map(|l| l + "\n").collect(),
                _ => {}
            }
            t
        };
        let mut stderr: Vec<String> = Vec::new();
        for line in out.stderr.lines() {
            let line = if line.starts_with("{\"level\"") {
                match grpc_error(line) {
                    Some(error) => error.to_owned(),
                    None => continue,
                }
            } else {
                line.to_owned()
            };
            let line = text(&line);
            // Whether etcdctl's retry interceptor logs a failure once or twice is not the
            // server's doing.
            if !stderr.contains(&line) {
                stderr.push(line);
            }
        }
        Seen { code: out.code, timed_out: out.timed_out, stdout: text(&out.stdout), stderr }
    }
}

/// (cluster ID, member ID) from a Status call.
async fn ids(client: &mut etcd_client::Client) -> (u64, u64) {
    let status = tokio::time::timeout(Duration::from_secs(10), client.status())
        .await
        .expect("status answered in time")
        .expect("status");
    let header = status.header().expect("status has a header");
    (header.cluster_id(), header.member_id())
}

fn substitute_leases(arg: &str, leases: &[i64]) -> String {
    let mut arg = arg.to_owned();
    // Highest first, so that `{lease1}` does not eat the start of `{lease12}`.
    for (i, id) in leases.iter().enumerate().rev() {
        arg = arg.replace(&format!("{{lease{}}}", i + 1), &format!("{id:x}"));
    }
    arg
}

/// The lease ID `lease grant` printed: `lease <hex> granted with TTL(..)` or `"ID":<decimal>`.
fn granted_lease(out: &Output) -> Option<i64> {
    let text = out.stdout.trim();
    if let Some(rest) = text.strip_prefix("lease ") {
        let hex = rest.split_whitespace().next()?;
        return i64::from_str_radix(hex, 16).ok();
    }
    let rest = &text[text.find("\"ID\":")? + 5..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Replaces each occurrence of `token` that is not part of a longer word or number.
fn replace_token(text: &str, token: &str, with: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(pos) = text[from..].find(token) {
        let (start, end) = (from + pos, from + pos + token.len());
        let free = |i: Option<usize>| i.and_then(|i| bytes.get(i)).is_none_or(|b| !b.is_ascii_alphanumeric());
        if free(start.checked_sub(1)) && free(Some(end)) {
            out.push_str(&text[copied..start]);
            out.push_str(with);
            copied = end;
        }
        from = start + 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// `"field":<value>` → `"field":"<placeholder>"`, the value ending at `,`, `}` or `]`.
fn replace_json_field(text: &str, field: &str, placeholder: &str) -> String {
    let key = format!("\"{field}\":");
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find(&key) {
        let value_start = pos + key.len();
        let value_len = rest[value_start..].find([',', '}', ']']).unwrap_or(rest.len() - value_start);
        out.push_str(&rest[..value_start]);
        let _ = write!(out, "\"{placeholder}\"");
        rest = &rest[value_start + value_len..];
    }
    out.push_str(rest);
    out
}

/// In every line of `, `-separated columns, replaces the given columns.
fn replace_columns(text: &str, columns: &[(usize, &str)]) -> String {
    text.lines()
        .map(|line| {
            let mut cols: Vec<&str> = line.split(", ").collect();
            for &(i, with) in columns {
                if let Some(col) = cols.get_mut(i) {
                    *col = with;
                }
            }
            cols.join(", ") + "\n"
        })
        .collect()
}

/// Replaces everything after `marker` up to the end of its line.
fn replace_after(text: &str, marker: &str, with: &str) -> String {
    text.lines()
        .map(|line| match line.find(marker) {
            Some(pos) => format!("{}{with}\n", &line[..pos + marker.len()]),
            None => format!("{line}\n"),
        })
        .collect()
}

/// `lease X granted with TTL(300s), remaining(299s), attached keys([k2 k1])`:
/// - etcd lists a lease's keys in Go map order, which is random: they are sorted here;
/// - the remaining seconds count down while etcdctl starts: a value within 2 s of the TTL
///   becomes `remaining(within 2s of the TTL)`, anything else is left as it is (and will differ).
fn normalise_time_to_live(line: &str) -> String {
    let mut line = line.to_owned();
    if let (Some(open), Some(close)) = (line.find("attached keys(["), line.rfind("])")) {
        let start = open + "attached keys([".len();
        let mut keys: Vec<&str> = line[start..close].split(' ').collect();
        keys.sort_unstable();
        line = format!("{}{}{}", &line[..start], keys.join(" "), &line[close..]);
    }
    let number_after = |marker: &str| -> Option<(usize, usize, i64)> {
        let start = line.find(marker)? + marker.len();
        let len = line[start..].find("s)")?;
        Some((start, start + len + 1, line[start..start + len].parse().ok()?))
    };
    if let (Some((_, _, ttl)), Some((start, end, remaining))) = (number_after("TTL("), number_after("remaining("))
        && (ttl - 2..=ttl).contains(&remaining)
    {
        line.replace_range(start..end, "within 2s of the TTL");
    }
    line
}

/// `rpc error: code = X desc = Y` from one of etcdctl's JSON log lines.
fn grpc_error(line: &str) -> Option<&str> {
    let start = line.find("rpc error: ")?;
    let len = line[start..].find('"').unwrap_or(line.len() - start);
    Some(&line[start..start + len])
}

#[test]
fn normalisation_helpers_replace_only_whole_tokens_and_chosen_fields() {
    assert_eq!(replace_token("id 12 and 123 and x12", "12", "<n>"), "id <n> and 123 and x12");
    assert_eq!(
        replace_json_field(r#"{"version":"3.4.23","dbSize":20480}"#, "version", "<v>"),
        r#"{"version":"<v>","dbSize":20480}"#
    );
    assert_eq!(replace_columns("a, b, c\n", &[(1, "<b>")]), "a, <b>, c\n");
    assert_eq!(
        normalise_time_to_live("lease <lease1> granted with TTL(300s), remaining(299s), attached keys([k2 k1])"),
        "lease <lease1> granted with TTL(300s), remaining(within 2s of the TTL), attached keys([k1 k2])"
    );
    assert_eq!(
        normalise_time_to_live("lease <lease1> granted with TTL(300s), remaining(290s)"),
        "lease <lease1> granted with TTL(300s), remaining(290s)",
        "a remaining time far from the TTL is kept, so that it shows"
    );
    assert_eq!(substitute_leases("--lease={lease1}", &[0x1a, 0x2b]), "--lease=1a");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_put_and_del_print_the_same_as_on_real_etcd() {
    let mut p = Parity::start().await;
    for (key, value) in [("a", "1"), ("b", "2"), ("c", "3"), ("a", "11"), ("d", "4")] {
        assert_eq!(p.ok("root", &["put", key, value]).await, "OK\n");
    }

    assert_eq!(p.ok("root", &["get", "a"]).await, "a\n11\n");
    p.ok("root", &["get", "a", "-w", "json"]).await;
    p.ok("root", &["get", "--prefix", ""]).await;
    p.ok("root", &["get", "b", "--from-key"]).await;
    p.ok("root", &["get", "a", "--from-key", "--limit=2"]).await;
    p.ok("root", &["get", "a", "c"]).await;
    p.ok("root", &["get", "--prefix", "", "--keys-only"]).await;
    p.ok("root", &["get", "a", "--print-value-only"]).await;
    p.ok("root", &["get", "a", "--hex"]).await;
    for target in ["KEY", "VERSION", "CREATE", "MODIFY", "VALUE"] {
        for order in ["ASCEND", "DESCEND"] {
            p.ok("root", &["get", "--prefix", "", &format!("--sort-by={target}"), &format!("--order={order}")]).await;
        }
    }
    // `more` and `count` (what 3.5's --count-only prints) under a limit and a sort.
    let limited =
        p.ok("root", &["get", "--prefix", "", "--sort-by=VALUE", "--order=DESCEND", "--limit=2", "-w", "json"]).await;
    assert!(limited.contains(r#""more":true,"count":4"#), "{limited}");
    p.ok("root", &["get", "--prefix", "", "--count-only", "-w", "fields"]).await;
    assert_eq!(p.ok("root", &["get", "a", "--rev=2"]).await, "a\n1\n");
    assert_eq!(p.ok("root", &["get", "a", "--rev=1"]).await, "");
    p.ok("root", &["get", "--prefix", "", "--rev=4", "-w", "json"]).await;
    p.fails("root", &["get", "a", "--rev=100"]).await;
    p.ok("root", &["get", "--prefix", "", "--consistency=s"]).await;
    p.fails("root", &["get", ""]).await;

    assert_eq!(p.ok("root", &["put", "a", "12", "--prev-kv"]).await, "OK\na\n11\n");
    assert_eq!(p.ok("root", &["put", "e", "5", "--prev-kv"]).await, "OK\n");
    p.ok("root", &["put", "e", "6", "--prev-kv", "-w", "json"]).await;
    p.ok("root", &["put", "a", "--ignore-value"]).await;
    p.fails("root", &["put", "zz", "--ignore-value"]).await;
    p.fails("root", &["put", "", "x"]).await;
    p.ok("root", &["get", "a", "-w", "json"]).await;

    assert_eq!(p.ok("root", &["del", "x"]).await, "0\n");
    assert_eq!(p.ok("root", &["del", "a", "--prev-kv"]).await, "1\na\n12\n");
    p.ok("root", &["del", "b", "--prefix", "--prev-kv"]).await;
    p.ok("root", &["del", "c", "--from-key", "--prev-kv", "-w", "json"]).await;
    p.ok("root", &["get", "--prefix", "", "-w", "json"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn txn_from_stdin_takes_the_same_branch_and_prints_the_same() {
    let mut p = Parity::start().await;
    p.ok("root", &["put", "k1", "a"]).await;
    p.ok("root", &["put", "k2", "b"]).await;

    // compares, blank line, success ops, blank line, failure ops, blank line
    let out =
        p.txn("root", &[], "create(\"k1\") > \"0\"\nversion(\"k2\") = \"1\"\n\nput k3 c\nget k1\n\nget k2\n\n").await;
    assert!(out.starts_with("SUCCESS\n"), "{out}");
    let out = p.txn("root", &[], "value(\"k1\") = \"zzz\"\n\nput k9 x\n\ndel k2 --prev-kv\nget k --prefix\n\n").await;
    assert!(out.starts_with("FAILURE\n"), "{out}");
    p.txn(
        "root",
        &["-w", "json"],
        "mod(\"k1\") < \"100\"\ncreate(\"k3\") = \"0\"\n\nput k4 d\n\nget k --prefix --limit=1\n\n",
    )
    .await;
    p.txn("root", &["-w", "json"], "value(\"k1\") = \"a\"\nmod(\"k3\") > \"3\"\n\nput k1 b --prev-kv\nget k1\n\n\n")
        .await;
    p.txn("root", &[], "value(\"missing\") = \"x\"\n\n\nget missing\n\n").await;
    p.txn("root", &[], "version(\"missing\") = \"0\"\n\nput fresh 1\n\n\n").await;
    // No compare at all: the success branch runs.
    p.txn("root", &[], "\nput k5 e\nget k5 --rev=1\n\n\n").await;

    p.txn_fails("root", "create(\"k1\") > \"0\"\n\nput q 1\nput q 2\n\n\n").await;
    p.txn_fails("root", "create(\"k1\") > \"0\"\n\nput q 1\ndel q\n\n\n").await;
    p.txn_fails("root", "create(\"k1\") > \"0\"\n\nput q 1 --lease=1234\n\n\n").await;
    p.ok("root", &["get", "--prefix", "", "-w", "json"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_replays_history_and_reports_compaction_like_real_etcd() {
    let mut p = Parity::start().await;
    // Revisions 2..=7.
    p.ok("root", &["put", "k/a", "1"]).await;
    p.ok("root", &["put", "k/b", "1"]).await;
    p.ok("root", &["put", "k/a", "2"]).await;
    p.ok("root", &["del", "k/b"]).await;
    p.ok("root", &["put", "other", "x"]).await;
    p.ok("root", &["put", "k/c", "3"]).await;

    let replays = p
        .watches(
            "root",
            &[
                &["watch", "--prefix", "k/", "--rev=2"],
                &["watch", "k/a", "--rev=3", "--prev-kv"],
                &["watch", "--prefix", "k/", "--rev=4", "--prev-kv", "-w", "json"],
                &["watch", "k/a", "k/c", "--rev=1"],
            ],
            WATCH_WINDOW,
        )
        .await;
    assert!(replays.iter().all(|w| w.timed_out), "a watch ended by itself: {replays:#?}");
    assert_eq!(replays[0].stdout, "PUT\nk/a\n1\nPUT\nk/b\n1\nPUT\nk/a\n2\nDELETE\nk/b\n\nPUT\nk/c\n3\n");

    assert_eq!(p.ok("root", &["compaction", "5"]).await, "compacted revision 5\n");
    p.fails("root", &["compaction", "5"]).await;
    p.fails("root", &["compaction", "100"]).await;
    p.fails("root", &["get", "k/a", "--rev=4"]).await;
    p.ok("root", &["get", "k/a", "--rev=5"]).await;

    let after = p
        .watches(
            "root",
            &[&["watch", "--prefix", "k/", "--rev=3"], &["watch", "--prefix", "k/", "--rev=5", "--prev-kv"]],
            WATCH_WINDOW,
        )
        .await;
    assert!(!after[0].timed_out, "a watch from a compacted revision must be cancelled: {:#?}", after[0]);
    assert_eq!(after[0].error(), "Error: watch is canceled by the server");
    // Compaction at 5 keeps the tombstone written at 5 (etcd 3.5.15 and later), so a watch
    // from 5 still sees that delete, without its previous value, which is compacted.
    assert!(after[1].timed_out && after[1].stdout == "DELETE\nk/b\n\nPUT\nk/c\n3\n", "{:#?}", after[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_are_granted_attached_renewed_listed_and_revoked_like_on_real_etcd() {
    let mut p = Parity::start().await;
    assert_eq!(p.ok("root", &["lease", "grant", "300"]).await, "lease <lease1> granted with TTL(300s)\n");
    p.ok("root", &["lease", "grant", "100"]).await;
    p.ok("root", &["lease", "grant", "200", "-w", "json"]).await;
    p.ok("root", &["put", "k1", "v1", "--lease={lease1}"]).await;
    p.ok("root", &["put", "k2", "v2", "--lease={lease1}"]).await;
    p.ok("root", &["put", "k3", "v3", "--lease={lease2}"]).await;
    p.ok("root", &["get", "--prefix", "k", "-w", "json"]).await;

    p.ok("root", &["lease", "keep-alive", "--once", "{lease1}"]).await;
    let ttl = p.ok("root", &["lease", "timetolive", "{lease1}", "--keys"]).await;
    assert!(ttl.ends_with("attached keys([k1 k2])\n"), "{ttl}");
    // Renewed just before, so that both countdowns are within the tolerance of the TTL.
    p.ok("root", &["lease", "keep-alive", "--once", "{lease2}"]).await;
    p.ok("root", &["lease", "timetolive", "{lease2}"]).await;
    // etcd lists leases soonest expiry first.
    assert_eq!(p.ok("root", &["lease", "list"]).await, "found 3 leases\n<lease2>\n<lease3>\n<lease1>\n");
    p.ok("root", &["lease", "list", "-w", "json"]).await;

    assert_eq!(p.ok("root", &["lease", "revoke", "{lease1}"]).await, "lease <lease1> revoked\n");
    p.fails("root", &["lease", "revoke", "{lease1}"]).await;
    p.ok("root", &["lease", "timetolive", "{lease1}"]).await;
    p.same("root", &["lease", "keep-alive", "--once", "{lease1}"], None).await;
    p.fails("root", &["put", "k4", "v", "--lease={lease1}"]).await;
    p.ok("root", &["get", "--prefix", "k"]).await;
    p.fails("root", &["lease", "grant", "9000000001"]).await;
    // Raised to etcd's minimum TTL; nothing below depends on this lease, which expires soon.
    assert_eq!(p.ok("root", &["lease", "grant", "1"]).await, "lease <lease4> granted with TTL(2s)\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_and_maintenance_commands_describe_the_same_single_member() {
    let mut p = Parity::start().await;
    p.ok("root", &["put", "a", "1"]).await;

    let status = p.ok("root", &["endpoint", "status"]).await;
    assert!(status.starts_with("https://<endpoint>, <member-id>, <version>, <db-size>, true, false, "), "{status}");
    p.ok("root", &["endpoint", "status", "-w", "json"]).await;
    p.ok("root", &["endpoint", "health"]).await;
    p.ok("root", &["endpoint", "health", "-w", "json"]).await;
    p.ok("root", &["member", "list"]).await;
    // The whole JSON, including which header fields are set, except for the name and peer
    // URLs compared in the simple output above.
    let real = p.etcd.client(&p.pki, "root").await.member_list().await.expect("member list on etcd");
    let ours = p.ours.client(&p.pki, "root").await.member_list().await.expect("member list on ours");
    let header = |r: &etcd_client::MemberListResponse| r.header().map(|h| (h.revision(), h.raft_term()));
    assert_eq!(header(&ours), header(&real), "member list header (revision, raft term)");
    assert_eq!(p.ok("root", &["alarm", "list"]).await, "");
    p.ok("root", &["defrag"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_users_roles_and_permissions_are_managed_like_on_real_etcd() {
    let mut p = Parity::start().await;
    assert_eq!(p.ok("root", &["user", "add", "root", "--no-password"]).await, "User root created\n");
    p.ok("root", &["user", "add", "alice", "--no-password"]).await;
    p.ok("root", &["user", "add", "bob", "--no-password"]).await;
    p.fails("root", &["user", "add", "alice", "--no-password"]).await;
    p.fails("root", &["user", "add", "", "--no-password"]).await;
    assert_eq!(p.ok("root", &["role", "add", "reader"]).await, "Role reader created\n");
    p.fails("root", &["role", "add", "reader"]).await;
    p.fails("root", &["role", "add", ""]).await;
    p.ok("root", &["role", "grant-permission", "reader", "read", "k1"]).await;
    p.ok("root", &["role", "grant-permission", "--prefix", "reader", "read", "cilium/state/"]).await;
    p.ok("root", &["role", "grant-permission", "reader", "readwrite", "a", "z"]).await;
    p.ok("root", &["role", "grant-permission", "reader", "write", "w", "--from-key"]).await;
    // Granting the same range again changes its type.
    p.ok("root", &["role", "grant-permission", "reader", "write", "k1"]).await;
    p.ok("root", &["role", "grant-permission", "reader", "read", "k1"]).await;
    p.fails("root", &["role", "grant-permission", "reader", "readx", "a"]).await;
    p.fails("root", &["role", "grant-permission", "nope", "read", "a"]).await;
    p.ok("root", &["role", "get", "reader"]).await;
    p.ok("root", &["role", "get", "reader", "-w", "json"]).await;
    p.fails("root", &["role", "get", "nope"]).await;
    p.ok("root", &["role", "list"]).await;
    assert_eq!(
        p.ok("root", &["user", "grant-role", "alice", "reader"]).await,
        "Role reader is granted to user alice\n"
    );
    p.ok("root", &["user", "grant-role", "alice", "reader"]).await;
    p.fails("root", &["user", "grant-role", "alice", "nope"]).await;
    p.fails("root", &["user", "grant-role", "nobody", "reader"]).await;
    assert_eq!(p.ok("root", &["user", "get", "alice"]).await, "User: alice\nRoles: reader\n");
    p.ok("root", &["user", "get", "alice", "--detail"]).await;
    p.ok("root", &["user", "get", "alice", "-w", "json"]).await;
    p.fails("root", &["user", "get", "nobody"]).await;
    p.ok("root", &["user", "list"]).await;
    p.ok("root", &["user", "list", "-w", "json"]).await;

    // etcdctl adds role root and grants it to user root when auth enable says it is missing.
    p.ok("root", &["auth", "status"]).await;
    assert_eq!(p.ok("root", &["auth", "enable"]).await, "Authentication Enabled\n");
    p.ok("root", &["auth", "status"]).await;
    assert_eq!(p.ok("root", &["role", "list"]).await, "reader\nroot\n");
    p.ok("root", &["user", "get", "root"]).await;
    p.fails("root", &["user", "revoke-role", "root", "root"]).await;
    p.fails("root", &["user", "delete", "root"]).await;
    p.fails("root", &["role", "delete", "root"]).await;
    // Root's stored permissions (none): root's access needs none.
    let [real, ours] = p.both("root", &["role", "get", "root"], None).await;
    assert_eq!(real.stdout, "Role root\nKV Read:\nKV Write:\n", "{real:#?}");
    assert_eq!(ours.stdout, real.stdout, "{ours:#?}");

    assert_eq!(
        p.ok("root", &["role", "revoke-permission", "reader", "k1"]).await,
        "Permission of key k1 is revoked from role reader\n"
    );
    p.fails("root", &["role", "revoke-permission", "reader", "k1"]).await;
    p.ok("root", &["role", "revoke-permission", "reader", "--prefix", "cilium/state/"]).await;
    p.ok("root", &["role", "revoke-permission", "reader", "w", "--from-key"]).await;
    p.fails("root", &["role", "revoke-permission", "reader", "a"]).await;
    p.ok("root", &["role", "revoke-permission", "reader", "a", "z"]).await;
    p.fails("root", &["role", "revoke-permission", "nope", "a"]).await;
    p.ok("root", &["role", "get", "reader"]).await;
    p.ok("root", &["user", "revoke-role", "alice", "reader"]).await;
    p.fails("root", &["user", "revoke-role", "alice", "reader"]).await;
    p.fails("root", &["user", "revoke-role", "nobody", "reader"]).await;
    assert_eq!(p.ok("root", &["user", "delete", "bob"]).await, "User bob deleted\n");
    p.fails("root", &["user", "delete", "bob"]).await;
    p.ok("root", &["role", "delete", "reader"]).await;
    p.fails("root", &["role", "delete", "reader"]).await;
    assert_eq!(p.ok("root", &["auth", "disable"]).await, "Authentication Disabled\n");
    p.ok("root", &["auth", "disable"]).await;
    p.ok("root", &["role", "delete", "root"]).await;
    p.ok("root", &["user", "get", "root"]).await;
    p.ok("root", &["user", "delete", "root"]).await;
    p.ok("root", &["user", "list"]).await;
    p.ok("root", &["role", "list"]).await;

    // A reversed permission range is refused (`isValidPermissionRange`, etcd 3.5; 3.4 stored
    // it and never matched it).
    p.ok("root", &["role", "add", "r2"]).await;
    let [real, ours] = p.both("root", &["role", "grant-permission", "r2", "read", "b", "a"], None).await;
    assert_eq!(real.error(), "Error: etcdserver: invalid auth management", "{real:#?}");
    assert_eq!(ours.error(), real.error(), "{ours:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_certificate_user_is_denied_the_same_way_as_on_real_etcd() {
    let mut p = Parity::start().await;
    for (key, value) in [("k1", "v"), ("cilium/state/x", "sx"), ("secret", "s")] {
        p.ok("root", &["put", key, value]).await;
    }
    p.ok("root", &["lease", "grant", "300"]).await;
    p.ok("root", &["put", "cilium/state/leased", "l", "--lease={lease1}"]).await;
    p.ok("root", &["user", "add", "root", "--no-password"]).await;
    p.ok("root", &["user", "add", "alice", "--no-password"]).await;
    p.ok("root", &["role", "add", "ro"]).await;
    p.ok("root", &["role", "grant-permission", "ro", "read", "k1"]).await;
    p.ok("root", &["role", "grant-permission", "--prefix", "ro", "read", "cilium/state/"]).await;
    p.ok("root", &["user", "grant-role", "alice", "ro"]).await;
    p.ok("root", &["auth", "enable"]).await;
    let everything = p.ok("root", &["get", "--prefix", "", "-w", "json"]).await;

    // Reads inside the granted ranges.
    assert_eq!(p.ok("alice", &["get", "k1"]).await, "k1\nv\n");
    p.ok("alice", &["get", "--prefix", "cilium/state/"]).await;
    p.ok("alice", &["get", "cilium/state/x", "--consistency=s", "-w", "json"]).await;
    p.txn("alice", &[], "value(\"k1\") = \"v\"\n\nget cilium/state/ --prefix\n\nget k1\n\n").await;
    p.ok("root", &["lease", "keep-alive", "--once", "{lease1}"]).await;
    p.ok("alice", &["lease", "timetolive", "{lease1}", "--keys"]).await;
    p.ok("alice", &["user", "get", "alice"]).await;
    p.ok("alice", &["role", "get", "ro"]).await;

    // Reads outside them, and every write.
    let denied = "Error: etcdserver: permission denied";
    for args in [
        &["get", "secret"][..],
        &["get", "--prefix", ""],
        &["get", "k1", "--from-key"],
        &["get", "--prefix", "cilium/"],
        &["get", "k1", "k2"],
        &["put", "k1", "x"],
        &["put", "cilium/state/y", "x"],
        &["put", "cilium/state/x", "--ignore-value"],
        &["del", "k1"],
        &["del", "--prefix", "cilium/state/"],
        &["lease", "revoke", "{lease1}"],
        &["user", "list"],
        &["role", "list"],
        &["user", "get", "root"],
        &["role", "get", "root"],
        &["user", "add", "mallory", "--no-password"],
        &["role", "grant-permission", "ro", "readwrite", "secret"],
        &["user", "grant-role", "alice", "root"],
        &["auth", "disable"],
    ] {
        let error = p.fails("alice", args).await;
        assert!(error.ends_with("etcdserver: permission denied)") || error == denied, "{args:?}: {error}");
    }
    assert_eq!(p.txn_fails("alice", "value(\"k1\") = \"v\"\n\nput k1 w\n\n\n").await, denied);
    assert_eq!(p.txn_fails("alice", "value(\"secret\") = \"s\"\n\nget k1\n\n\n").await, denied);
    assert_eq!(p.txn_fails("alice", "value(\"k1\") = \"v\"\n\nget k1\n\nget secret\n\n").await, denied);

    // Watches: refused outside the range (the watch is cancelled), replayed inside it.
    let watches = p
        .watches("alice", &[&["watch", "secret"], &["watch", "--prefix", "cilium/state/", "--rev=1"]], WATCH_WINDOW)
        .await;
    assert!(!watches[0].timed_out && watches[0].error() == "Error: watch is canceled by the server", "{watches:#?}");
    assert!(watches[1].timed_out && watches[1].stdout.starts_with("PUT\ncilium/state/x\nsx\n"), "{watches:#?}");

    // A certificate whose Common Name is no user.
    for args in [&["get", "k1"][..], &["put", "k1", "x"], &["del", "k1"], &["watch", "k1"]] {
        p.fails("ghost", args).await;
    }
    assert_eq!(p.fails("ghost", &["user", "get", "alice"]).await, "Error: etcdserver: user name not found");
    p.fails("ghost", &["auth", "disable"]).await;

    assert_eq!(
        p.ok("root", &["get", "--prefix", "", "-w", "json"]).await,
        everything,
        "the refused writes left no trace"
    );
}
