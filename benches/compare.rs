//! Our embedded store against Debian's etcd 3.5 and 3.4, side by side in one run (issues 7, 18).
//!
//! ```text
//! [ETCD_BIN=etcd-3.5] [ETCD34_BIN=etcd-3.4] cargo bench --bench compare -- [--quick] [--out FILE] [--only 1,2,...] [sizing flags]
//! ```
//!
//! Each scenario starts a fresh server, measures it, and stops it before the next one starts:
//! etcd 3.5, then etcd 3.4, then ours, never two at once. All run as child processes of this
//! bench (mTLS on random 127.0.0.1 ports, etcd's data dir on tmpfs) and are driven by the same
//! etcd-client code; scenarios 6 and 7 run the clustermesh-apiserver binary itself, once with
//! its embedded store and once writing to each etcd. etcd 3.5 (what Cilium ships) is the anchor:
//! the targets are ratios to it. Without an etcd 3.4 binary the run goes on with 3.5 alone and
//! says so (see [`servers::Lineup`]). Only ratios measured in one run mean anything on a shared
//! machine; `--quick` shrinks every scenario to a smoke test whose sanity checks (every put
//! acknowledged, every watcher got every event, every list complete) fail the run, never a time.

#[path = "../tests/it/support/certs.rs"]
#[allow(dead_code)]
mod certs;
#[path = "compare/data.rs"]
mod data;
#[path = "compare/e2e.rs"]
mod e2e;
#[path = "../tests/it/support/fake_k8s.rs"]
#[allow(dead_code, unused_imports)]
mod fake_k8s;
#[path = "compare/kv.rs"]
mod kv;
#[path = "compare/objects.rs"]
mod objects;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/servers.rs"]
mod servers;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;

use data::{PREFIXES, Shapes, Sizes};
use report::{Better, Percentiles, Report, ServerInfo, Target, mib, ms};
use servers::{ClientTls, Lineup, PerServer, Server, Which};

/// Used by `certs` (included from the integration tests' support code).
fn install_crypto_provider() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[derive(Debug, Parser)]
#[command(about = "Our embedded store against etcd 3.5 and 3.4, side by side")]
struct Args {
    /// Every scenario in a few seconds: a smoke test of the harness (CI).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scenarios to run (1-9, comma-separated); default all.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=9))]
    only: Vec<u8>,
    /// Cilium test vectors to take value shapes from.
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// 1: concurrent clients (one connection each).
    #[arg(long)]
    put_clients: Option<usize>,
    /// 1: puts in total.
    #[arg(long)]
    puts: Option<usize>,
    /// 1, 2, 5: value size in bytes.
    #[arg(long, default_value_t = 300)]
    value_size: usize,

    /// 2: prefix watchers (one watch stream each).
    #[arg(long)]
    watchers: Option<usize>,
    /// 2: connections the watchers are spread over (default: one per watcher, like agents).
    #[arg(long)]
    watch_conns: Option<usize>,
    /// 2: puts under the watched prefix.
    #[arg(long)]
    watch_puts: Option<usize>,
    /// 2: concurrent writers making those puts.
    #[arg(long, default_value_t = 8)]
    watch_writers: usize,

    /// 3, 4, 7: ipcache entries (CiliumEndpoints in 7).
    #[arg(long)]
    ipcache: Option<usize>,
    /// 3, 4, 7: nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// 3, 4, 7: identities.
    #[arg(long)]
    identities: Option<usize>,
    /// 3: connections loading the data.
    #[arg(long, default_value_t = 64)]
    load_clients: usize,
    /// 3: keys per lease while loading (Cilium's lease manager caps it at 1,000).
    #[arg(long, default_value_t = 1000)]
    keys_per_lease: usize,

    /// 4: clients listing everything at once.
    #[arg(long)]
    storm_clients: Option<usize>,
    /// 4: how long the storm may take before it counts as failed, in seconds.
    #[arg(long, default_value_t = 600)]
    storm_timeout: u64,
    /// 4: page size of those lists.
    #[arg(long, default_value_t = 256)]
    page: i64,

    /// 5: keys on the small lease.
    #[arg(long)]
    lease_small: Option<usize>,
    /// 5: keys on the big lease.
    #[arg(long)]
    lease_big: Option<usize>,
    /// 5: sequential puts measured per lease.
    #[arg(long)]
    lease_samples: Option<usize>,

    /// 6: Kubernetes events per second.
    #[arg(long)]
    e2e_rate: Option<u64>,
    /// 6: seconds of events.
    #[arg(long)]
    e2e_secs: Option<u64>,
    /// 7: how long a bootstrap may take before it counts as failed, in seconds.
    #[arg(long, default_value_t = 300)]
    bootstrap_timeout: u64,

    /// 8: agents connecting at once, each on its own mTLS connection.
    #[arg(long)]
    agents: Option<usize>,
    /// 8: how long the agents may take to be all listed and watching, in seconds.
    #[arg(long, default_value_t = 900)]
    agents_timeout: u64,
}

struct Config {
    quick: bool,
    /// The servers to measure.
    lineup: Lineup,
    put_clients: usize,
    puts: usize,
    value_size: usize,
    watchers: usize,
    watch_conns: usize,
    watch_puts: usize,
    watch_writers: usize,
    sizes: Sizes,
    load_clients: usize,
    keys_per_lease: usize,
    storm_clients: usize,
    page: i64,
    storm_timeout: std::time::Duration,
    lease_small: usize,
    lease_big: usize,
    lease_samples: usize,
    e2e_rate: u64,
    e2e_secs: u64,
    bootstrap_timeout: std::time::Duration,
    agents: usize,
    /// 8: one cluster of a mesh as each agent sees it (a few hundred nodes), not scenario 3's
    /// whole-mesh data set: the cost here is per agent.
    agent_sizes: Sizes,
    agents_timeout: std::time::Duration,
}

impl Config {
    fn from(args: &Args, lineup: Lineup) -> Config {
        let q = args.quick;
        let pick = |flag: Option<usize>, full: usize, quick: usize| flag.unwrap_or(if q { quick } else { full });
        let watchers = pick(args.watchers, 1000, 20);
        Config {
            quick: q,
            lineup,
            put_clients: pick(args.put_clients, 64, 8),
            puts: pick(args.puts, 200_000, 2_000),
            value_size: args.value_size.max(8),
            watchers,
            watch_conns: args.watch_conns.unwrap_or(watchers),
            watch_puts: pick(args.watch_puts, 10_000, 200),
            watch_writers: args.watch_writers.max(1),
            sizes: Sizes {
                ipcache: pick(args.ipcache, 250_000, 2_000),
                nodes: pick(args.nodes, 25_000, 200),
                identities: pick(args.identities, 25_000, 200),
            },
            load_clients: args.load_clients.max(1),
            keys_per_lease: args.keys_per_lease.max(1),
            storm_clients: pick(args.storm_clients, 1000, 10),
            page: args.page.max(1),
            storm_timeout: std::time::Duration::from_secs(args.storm_timeout),
            lease_small: pick(args.lease_small, 1_000, 100),
            lease_big: pick(args.lease_big, 100_000, 2_000),
            lease_samples: pick(args.lease_samples, 2_000, 100),
            e2e_rate: args.e2e_rate.unwrap_or(1000),
            e2e_secs: args.e2e_secs.unwrap_or(if q { 2 } else { 20 }),
            bootstrap_timeout: std::time::Duration::from_secs(args.bootstrap_timeout),
            agents: pick(args.agents, 2_000, 20),
            agent_sizes: Sizes {
                ipcache: pick(None, 5_000, 200),
                nodes: pick(None, 500, 20),
                identities: pick(None, 2_000, 50),
            },
            agents_timeout: std::time::Duration::from_secs(args.agents_timeout),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "put_clients": self.put_clients, "puts": self.puts, "value_size": self.value_size,
            "watchers": self.watchers, "watch_conns": self.watch_conns, "watch_puts": self.watch_puts,
            "watch_writers": self.watch_writers, "data": self.sizes, "load_clients": self.load_clients,
            "keys_per_lease": self.keys_per_lease, "storm_clients": self.storm_clients, "page": self.page,
            "lease_small": self.lease_small, "lease_big": self.lease_big, "lease_samples": self.lease_samples,
            "e2e_rate": self.e2e_rate, "e2e_secs": self.e2e_secs,
            "agents": self.agents, "agent_data": self.agent_sizes,
        })
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    // On SIGINT or SIGTERM the run is dropped, and with it every server it started.
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = run(args) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn progress(message: impl AsRef<str>) {
    eprintln!("[bench] {}", message.as_ref());
}

/// Runs `f` for each server of the run in turn, anchor first, and gathers what it returns.
async fn for_each_server<T, F, Fut>(lineup: &Lineup, mut f: F) -> anyhow::Result<PerServer<T>>
where
    F: FnMut(Which) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut out = PerServer::default();
    for which in lineup.servers() {
        out.set(which, f(which).await.with_context(|| which.name())?);
    }
    Ok(out)
}

/// [`for_each_server`] with the server started, alone, for `f` (and stopped when `f` drops it).
async fn per_server<T, F, Fut>(config: &Config, pki: &certs::Pki, f: F) -> anyhow::Result<PerServer<T>>
where
    F: Fn(Which, Server) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    per_server_with(config, pki, false, f).await
}

/// [`per_server`]; with `persistent`, ours keeps its store in a data directory.
async fn per_server_with<T, F, Fut>(
    config: &Config,
    pki: &certs::Pki,
    persistent: bool,
    f: F,
) -> anyhow::Result<PerServer<T>>
where
    F: Fn(Which, Server) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (lineup, f) = (&config.lineup, &f);
    for_each_server(
        lineup,
        |which| async move { f(which, Server::start_with(which, lineup, pki, persistent).await?).await },
    )
    .await
}

async fn run(args: Args) -> anyhow::Result<bool> {
    install_crypto_provider();
    let lineup = Lineup::find()?;
    for warning in &lineup.warnings {
        eprintln!("WARNING: {warning}");
    }
    let config = Config::from(&args, lineup);
    let wanted = |n: u8| args.only.is_empty() || args.only.contains(&n);
    let vectors = args.vectors.clone().unwrap_or_else(data::default_vectors_path);
    let shapes = Arc::new(Shapes::load(&vectors)?);
    let pki = certs::Pki::new();
    let tls = ClientTls::new(&pki);
    let mut report = Report {
        quick: config.quick,
        machine: format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        servers: ServerInfo::of(&config.lineup),
        sizes: config.describe(),
        ..Report::default()
    };
    for server in &report.servers {
        progress(format!("{}: {} ({})", server.name, server.version, server.binary.display()));
    }
    let started = Instant::now();

    let mut shown = 0;
    if wanted(1) {
        let result = scenario_put(&config, &pki, &tls, &mut report).await;
        finish(&mut report, "1", result, &mut shown);
    }
    if wanted(2) {
        let result = scenario_watch(&config, &pki, &tls, &mut report).await;
        finish(&mut report, "2", result, &mut shown);
    }
    if wanted(3) || wanted(4) {
        let result = scenario_data(&config, &pki, &tls, &shapes, &mut report, wanted(4)).await;
        finish(&mut report, "3/4", result, &mut shown);
    }
    if wanted(5) {
        let result = scenario_leases(&config, &pki, &tls, &mut report).await;
        finish(&mut report, "5", result, &mut shown);
    }
    if wanted(6) {
        let result = e2e::scenario_e2e(&config, &pki, &tls, &mut report).await;
        finish(&mut report, "6", result, &mut shown);
    }
    if wanted(7) {
        let result = e2e::scenario_bootstrap(&config, &pki, &tls, &mut report).await;
        finish(&mut report, "7", result, &mut shown);
    }
    if wanted(8) {
        let result = scenario_agents(&config, &pki, &tls, &shapes, &mut report).await;
        finish(&mut report, "8", result, &mut shown);
    }
    if wanted(9) {
        let result = scenario_restart(&config, &pki, &tls, &shapes, &mut report).await;
        finish(&mut report, "9", result, &mut shown);
    }
    report.notes.push(format!("total bench time {:.1} s", started.elapsed().as_secs_f64()));
    report.notes.extend(config.lineup.warnings.iter().map(|w| format!("WARNING: {w}")));

    println!("{}", report.table());
    for note in &report.notes {
        println!("note: {note}");
    }
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", out.display()))?;
        progress(format!("results written to {}", out.display()));
    }
    let failed = report.failed_checks();
    if failed.is_empty() {
        println!("sanity checks: {} passed, 0 failed", report.checks.len());
        Ok(true)
    } else {
        println!("sanity checks: {} passed, {} failed", report.checks.len() - failed.len(), failed.len());
        for check in failed {
            println!("FAILED [{}/{}] {}", check.scenario, check.server, check.what);
        }
        Ok(false)
    }
}

/// Records a scenario that failed as a failed check (the run goes on with the next one), and
/// shows the rows it added, so that a long run's figures survive a later failure.
fn finish(report: &mut Report, scenario: &str, result: anyhow::Result<()>, shown: &mut usize) {
    if let Err(error) = result {
        eprintln!("scenario {scenario} failed: {error:#}");
        report.check(scenario, "-", format!("scenario ran: {error:#}"), false);
    }
    for row in &report.rows[*shown..] {
        progress(report.describe_row(row));
    }
    *shown = report.rows.len();
}

fn latency_rows(report: &mut Report, scenario: &str, what: &str, latency: &PerServer<Percentiles>) {
    report.row(scenario, &format!("{what} p50"), "ms", Better::Lower, latency.figures(|p| ms(p.p50)), None);
    report.row(scenario, &format!("{what} p99"), "ms", Better::Lower, latency.figures(|p| ms(p.p99)), None);
}

async fn scenario_put(config: &Config, pki: &certs::Pki, tls: &ClientTls, report: &mut Report) -> anyhow::Result<()> {
    const S: &str = "1 put throughput";
    let results = per_server(config, pki, |which, server| async move {
        progress(format!("{S}: {} ({} puts from {} clients)", which.name(), config.puts, config.put_clients));
        kv::put_throughput(&server, tls, config.put_clients, config.puts, config.value_size).await
    })
    .await?;
    for (which, r) in results.iter() {
        report.check(
            S,
            which.name(),
            format!("{} of {} puts acknowledged", r.acknowledged, r.puts),
            r.acknowledged == r.puts,
        );
        report.check(
            S,
            which.name(),
            format!("{} revisions for {} puts", r.revisions, r.puts),
            r.revisions == r.puts as i64,
        );
    }
    let rate = |r: &kv::PutThroughput| r.puts as f64 / r.elapsed.as_secs_f64();
    let cpu = |r: &kv::PutThroughput| r.server_cpu.as_secs_f64() * 1e6 / r.puts as f64;
    report.row(S, "puts/s", "1/s", Better::Higher, results.figures(rate), Some(Target::RatioAtLeast { value: 5.0 }));
    latency_rows(report, S, "put latency", &results.map(|r| r.latency));
    report.row(S, "server CPU per put", "us", Better::Lower, results.figures(cpu), None);
    let client = |r: &kv::PutThroughput| r.client_cpu.as_secs_f64() * 1e6 / r.puts as f64;
    report.row(S, "client CPU per put (bench)", "us", Better::Lower, results.figures(client), None);
    Ok(())
}

async fn scenario_watch(config: &Config, pki: &certs::Pki, tls: &ClientTls, report: &mut Report) -> anyhow::Result<()> {
    const S: &str = "2 watch fan-out";
    let results = per_server(config, pki, |which, server| async move {
        progress(format!(
            "{S}: {} ({} watchers on {} connections, {} puts)",
            which.name(),
            config.watchers,
            config.watch_conns,
            config.watch_puts
        ));
        kv::watch_fanout(
            &server,
            tls,
            config.watchers,
            config.watch_conns,
            config.watch_puts,
            config.watch_writers,
            config.value_size,
        )
        .await
    })
    .await?;
    for (which, r) in results.iter() {
        let complete = r.received.iter().filter(|&&n| n == r.puts).count();
        report.check(
            S,
            which.name(),
            format!("{complete} of {} watchers got all {} events", r.watchers, r.puts),
            complete == r.watchers,
        );
        report.check(
            S,
            which.name(),
            format!("{} watchers saw events out of order", r.out_of_order),
            r.out_of_order == 0,
        );
    }
    let rate = |r: &kv::WatchFanout| r.delivered() as f64 / r.elapsed.as_secs_f64();
    let cpu = |r: &kv::WatchFanout| r.server_cpu.as_secs_f64() * 1e6 / r.delivered().max(1) as f64;
    report.row(
        S,
        "events delivered/s",
        "1/s",
        Better::Higher,
        results.figures(rate),
        Some(Target::RatioAtLeast { value: 5.0 }),
    );
    latency_rows(report, S, "put->event latency", &results.map(|r| r.latency));
    report.row(S, "server CPU per event", "us", Better::Lower, results.figures(cpu), None);
    let client = |r: &kv::WatchFanout| r.client_cpu.as_secs_f64() * 1e6 / r.delivered().max(1) as f64;
    report.row(S, "client CPU per event (bench)", "us", Better::Lower, results.figures(client), None);
    Ok(())
}

async fn scenario_data(
    config: &Config,
    pki: &certs::Pki,
    tls: &ClientTls,
    shapes: &Arc<Shapes>,
    report: &mut Report,
    storm: bool,
) -> anyhow::Result<()> {
    const S3: &str = "3 memory";
    const S4: &str = "4 reconnect storm";
    /// One server's scenario 3 (and 4).
    struct Loaded {
        idle: servers::Memory,
        load: kv::Load,
        loaded: servers::Memory,
        tmpfs: u64,
        /// Scenario 4, and the memory after it.
        storm: Option<(kv::Storm, servers::Memory)>,
    }
    let sizes = config.sizes;
    let results = per_server(config, pki, |which, mut server| async move {
        let idle = server.memory()?;
        progress(format!("{S3}: {} (loading {} keys)", which.name(), sizes.total()));
        let load = kv::load(&server, tls, shapes, sizes, config.load_clients, config.keys_per_lease).await?;
        // Let background work (etcd's snapshot, compaction; our allocator) settle.
        tokio::time::sleep(std::time::Duration::from_secs(if config.quick { 1 } else { 3 })).await;
        server.check_alive()?;
        let loaded = server.memory()?;
        let tmpfs = server.tmpfs_bytes();
        let storm = if storm {
            progress(format!("{S4}: {} ({} clients)", which.name(), config.storm_clients));
            let result = kv::storm(&server, tls, config.storm_clients, config.page, config.storm_timeout).await?;
            server.check_alive()?;
            Some((result, server.memory()?))
        } else {
            None
        };
        Ok::<_, anyhow::Error>(Loaded { idle, load, loaded, tmpfs, storm })
    })
    .await?;
    for (which, Loaded { load, storm, .. }) in results.iter() {
        for (prefix, count) in &load.counts {
            let expected = sizes.of_prefix(prefix);
            report.check(S3, which.name(), format!("{count} of {expected} keys under {prefix}"), *count == expected);
        }
        if let Some((storm, _)) = storm {
            let complete = storm.listed.iter().filter(|&&n| n == sizes.total()).count();
            report.check(
                S4,
                which.name(),
                format!("{complete} of {} clients listed all {} keys", storm.clients, sizes.total()),
                complete == storm.clients,
            );
        }
    }
    let rate = |r: &Loaded| sizes.total() as f64 / r.load.elapsed.as_secs_f64();
    report.row(S3, "RSS idle", "MiB", Better::Lower, results.figures(|r| mib(r.idle.rss)), None);
    report.row(
        S3,
        "RSS after load",
        "MiB",
        Better::Lower,
        results.figures(|r| mib(r.loaded.rss)),
        Some(Target::RatioAtMost { value: 1.0 / 3.0 }),
    );
    report.row(
        S3,
        "RSS + data on tmpfs",
        "MiB",
        Better::Lower,
        results.figures(|r| mib(r.loaded.private() + r.tmpfs)),
        None,
    );
    report.row(S3, "load puts/s (on leases)", "1/s", Better::Higher, results.figures(rate), None);
    let cpu = |r: &Loaded| r.load.server_cpu.as_secs_f64() * 1e6 / sizes.total() as f64;
    report.row(S3, "server CPU per put (load)", "us", Better::Lower, results.figures(cpu), None);
    let mut memory = Vec::new();
    for (which, Loaded { load, loaded, tmpfs, .. }) in results.iter() {
        memory.push(if which.is_etcd() {
            format!(
                "{} RSS anon {:.0} MiB, file {:.0} MiB, shmem {:.0} MiB, tmpfs data dir {:.0} MiB",
                which.name(),
                mib(loaded.rss_anon),
                mib(loaded.rss_file),
                mib(loaded.rss_shmem),
                mib(*tmpfs)
            )
        } else {
            format!(
                "{} RSS anon {:.0} MiB; {} leases of {} keys",
                which.name(),
                mib(loaded.rss_anon),
                load.leases,
                load.keys_per_lease
            )
        });
    }
    report.notes.push(format!("3: {}", memory.join("; ")));
    if storm {
        let storms = results.map(|r| r.storm.as_ref());
        let secs = |(s, _): &(kv::Storm, _)| s.elapsed.as_secs_f64();
        let cpu = |(s, _): &(kv::Storm, _)| s.server_cpu.as_secs_f64() * 1e6 / s.pages.max(1) as f64;
        report.row(
            S4,
            "time to list everything",
            "s",
            Better::Lower,
            storms.figures(|s| s.map(secs)),
            Some(Target::RatioAtMost { value: 1.0 / 3.0 }),
        );
        report.row(S4, "server CPU per page", "us", Better::Lower, storms.figures(|s| s.map(cpu)), None);
        let client = |(s, _): &(kv::Storm, _)| s.client_cpu.as_secs_f64() * 1e6 / s.pages.max(1) as f64;
        report.row(S4, "client CPU per page (bench)", "us", Better::Lower, storms.figures(|s| s.map(client)), None);
        let hwm = |(_, after): &(_, servers::Memory)| mib(after.hwm);
        report.row(S4, "peak RSS (VmHWM)", "MiB", Better::Lower, storms.figures(|s| s.map(hwm)), None);
        if let Some(Some((e, _))) = storms.get(Which::Etcd35) {
            report.notes.push(format!(
                "4: {} clients x {} keys in pages of {} ({} pages, {:.0} MiB of keys+values per server)",
                e.clients,
                sizes.total(),
                config.page,
                e.pages,
                mib(e.bytes as u64)
            ));
        }
    }
    let _ = PREFIXES;
    Ok(())
}

async fn scenario_leases(
    config: &Config,
    pki: &certs::Pki,
    tls: &ClientTls,
    report: &mut Report,
) -> anyhow::Result<()> {
    const S: &str = "5 leases";
    let results = per_server(config, pki, |which, server| async move {
        progress(format!("{S}: {} ({} then {} keys on a lease)", which.name(), config.lease_small, config.lease_big));
        let small =
            kv::lease_phase(&server, tls, "small", config.lease_small, config.lease_samples, 64, config.value_size)
                .await?;
        let big =
            kv::lease_phase(&server, tls, "big", config.lease_big, config.lease_samples, 64, config.value_size).await?;
        Ok::<_, anyhow::Error>((small, big))
    })
    .await?;
    for (which, (small, big)) in results.iter() {
        for phase in [small, big] {
            report.check(
                S,
                which.name(),
                format!("{} puts measured with {} keys on the lease", phase.latency.count, phase.keys_on_lease),
                phase.latency.count == config.lease_samples,
            );
        }
    }
    let small = format!("put p50, {} keys on lease", config.lease_small);
    let big = format!("put p50, {} keys on lease", config.lease_big);
    report.row(S, &small, "ms", Better::Lower, results.figures(|(small, _)| ms(small.latency.p50)), None);
    report.row(S, &big, "ms", Better::Lower, results.figures(|(_, big)| ms(big.latency.p50)), None);
    let growth = |(small, big): &(kv::LeasePhase, kv::LeasePhase)| {
        small.latency.p50.as_secs_f64().max(1e-9).recip() * big.latency.p50.as_secs_f64()
    };
    report.row(
        S,
        "p50 growth (big/small lease)",
        "x",
        Better::Lower,
        results.figures(growth),
        Some(Target::OursAtMost { value: 1.2 }),
    );
    let attach = |(_, big): &(_, kv::LeasePhase)| big.keys_on_lease as f64 / big.attach_elapsed.as_secs_f64();
    report.row(
        S,
        &format!("attach puts/s up to {} keys", config.lease_big),
        "1/s",
        Better::Higher,
        results.figures(attach),
        None,
    );
    Ok(())
}

async fn scenario_agents(
    config: &Config,
    pki: &certs::Pki,
    tls: &ClientTls,
    shapes: &Arc<Shapes>,
    report: &mut Report,
) -> anyhow::Result<()> {
    const S: &str = "8 agents at scale";
    let sizes = config.agent_sizes;
    let results = per_server(config, pki, |which, mut server| async move {
        let attempt = async {
            kv::load(&server, tls, shapes, sizes, config.load_clients, config.keys_per_lease).await?;
            progress(format!("{S}: {} ({} agents, {} keys each)", which.name(), config.agents, sizes.total()));
            let result = kv::agents(&server, tls, config.agents, config.page, config.agents_timeout).await?;
            server.check_alive()?;
            Ok::<_, anyhow::Error>(result)
        };
        // A server that does not get every agent listed in time (etcd at 10,000) is a failed
        // check; the others are still measured.
        Ok::<_, anyhow::Error>(attempt.await)
    })
    .await?;
    for (which, r) in results.iter() {
        let r = match r {
            Ok(r) => r,
            Err(error) => {
                let error = format!("{error:#}");
                let first = error.lines().next().unwrap_or_default().to_owned();
                report.check(S, which.name(), format!("every agent listed and watching: {first}"), false);
                eprintln!("{S}: {}: {error}", which.name());
                continue;
            }
        };
        let complete = r.listed.iter().filter(|&&n| n == sizes.total()).count();
        report.check(
            S,
            which.name(),
            format!("{complete} of {} agents listed all {} keys", r.agents, sizes.total()),
            complete == r.agents,
        );
        report.check(
            S,
            which.name(),
            format!("{} of {} agents saw the change", r.notified, r.agents),
            r.notified == r.agents,
        );
    }
    // A row's figure of each server that finished.
    let of = |f: fn(&kv::Agents) -> f64| move |r: &anyhow::Result<kv::Agents>| r.as_ref().ok().map(f);
    let secs = |r: &kv::Agents| r.connected.as_secs_f64();
    report.row(
        S,
        "connect storm: all listed and watching",
        "s",
        Better::Lower,
        results.figures(of(secs)),
        Some(Target::RatioAtMost { value: 1.0 / 5.0 }),
    );
    let per_agent =
        |r: &kv::Agents| r.rss_connected.saturating_sub(r.rss_before) as f64 / 1024.0 / r.agents.max(1) as f64;
    report.row(
        S,
        "RSS per connected agent",
        "KiB",
        Better::Lower,
        results.figures(of(per_agent)),
        Some(Target::RatioAtMost { value: 1.0 / 5.0 }),
    );
    report.row(
        S,
        "one change -> every agent p50",
        "ms",
        Better::Lower,
        results.figures(of(|r| ms(r.fanout.p50))),
        None,
    );
    report.row(
        S,
        "one change -> every agent p99",
        "ms",
        Better::Lower,
        results.figures(of(|r| ms(r.fanout.p99))),
        Some(Target::OursAtMost { value: 100.0 }),
    );
    let cpu = |r: &kv::Agents| r.server_cpu.as_secs_f64() * 1e3 / r.agents.max(1) as f64;
    report.row(S, "server CPU per agent", "ms", Better::Lower, results.figures(of(cpu)), None);
    report.notes.push(format!(
        "8: {} agents, each listing {} keys ({} nodes, {} identities, {} IPs) in pages of {} over 5 prefixes and watching them",
        config.agents, sizes.total(), sizes.nodes, sizes.identities, sizes.ipcache, config.page
    ));
    Ok(())
}

/// Scenario 9: a store holding scenario 3's data is SIGKILLed (an OOM kill) and started again on
/// its data directory (ours with `--data-dir`, etcd's own); measured from the restart to the
/// first answer that counts every key again.
async fn scenario_restart(
    config: &Config,
    pki: &certs::Pki,
    tls: &ClientTls,
    shapes: &Arc<Shapes>,
    report: &mut Report,
) -> anyhow::Result<()> {
    const S: &str = "9 warm restart";
    let sizes = config.sizes;
    let results = per_server_with(config, pki, true, |which, mut server| async move {
        progress(format!("{S}: {} (loading {} keys, then SIGKILL)", which.name(), sizes.total()));
        kv::load(&server, tls, shapes, sizes, config.load_clients, config.keys_per_lease).await?;
        let started = Instant::now();
        let healthy = server.kill_and_restart().await?;
        let counted = kv::count_all(&server, tls).await?;
        let serving = started.elapsed();
        server.check_alive()?;
        Ok::<_, anyhow::Error>((healthy, serving, counted))
    })
    .await?;
    for (which, (_, _, counted)) in results.iter() {
        report.check(
            S,
            which.name(),
            format!("{counted} of {} keys back after the restart", sizes.total()),
            *counted == sizes.total(),
        );
    }
    report.row(
        S,
        "SIGKILL -> healthy",
        "s",
        Better::Lower,
        results.figures(|(healthy, ..)| healthy.as_secs_f64()),
        None,
    );
    report.row(
        S,
        "SIGKILL -> serving with all keys",
        "s",
        Better::Lower,
        results.figures(|(_, serving, _)| serving.as_secs_f64()),
        Some(Target::OursAtMost { value: 2.0 }),
    );
    report.notes.push(format!(
        "9: {} keys on leases of {} keys; ours with --data-dir (--wal-fsync never), etcd with its data dir, both on tmpfs",
        sizes.total(),
        config.keys_per_lease
    ));
    Ok(())
}
