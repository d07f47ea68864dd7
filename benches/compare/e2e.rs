//! Scenarios 6 and 7: the clustermesh-apiserver binary end to end, once with its embedded
//! store (one process, as we ship it) and once writing to each etcd of the run
//! (`--kvstore=etcd`, two processes, as Cilium ships it). Kubernetes is played by this bench:
//! the integration tests' fake API server for 6, and for 7 a list-only server below, because
//! the fake rebuilds a snapshot of every object for each page it serves (quadratic for 300k
//! objects).

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::Response;
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use etcd_client::{GetOptions, WatchOptions};
use serde_json::Value;

use crate::certs::Pki;
use crate::data::{self, IDENTITIES_PREFIX, IPCACHE_PREFIX, NODES_PREFIX, Sizes};
use crate::report::{Better, Percentiles, Report, Target, mib, ms};
use crate::servers::{self, ClientTls, Lineup, Memory, OUR_BINARY, Server, Which};
use crate::{Config, for_each_server, progress};

use crate::objects::{CLUSTER, endpoint, identity, namespace, node, seq_of_ip};

/// One clustermesh-apiserver process, and the etcd it writes to when it is not using its own
/// store. Killed and reaped on drop.
struct Apiserver {
    child: Child,
    health_port: u16,
    /// Where remote clients read: our embedded store, or etcd.
    store_url: String,
    etcd: Option<Server>,
    dir: tempfile::TempDir,
}

impl Apiserver {
    async fn start(which: Which, lineup: &Lineup, pki: &Pki, kube_url: &str) -> anyhow::Result<Apiserver> {
        let etcd = if which.is_etcd() { Some(Server::start(which, lineup, pki).await?) } else { None };
        let dir = tempfile::Builder::new().prefix("cm-bench-apiserver-").tempdir_in("/dev/shm")?;
        let kubeconfig = dir.path().join("kubeconfig.yaml");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {kube_url}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
            ),
        )?;
        let [store_port, health_port, metrics_port] = servers::free_ports()?;
        let log = std::fs::File::create(dir.path().join("apiserver.log"))?;
        let mut cmd = Command::new(OUR_BINARY);
        cmd.arg("clustermesh")
            .arg(format!("--cluster-name={CLUSTER}"))
            .arg("--cluster-id=1")
            .arg(format!("--k8s-kubeconfig-path={}", kubeconfig.display()))
            .arg(format!("--health-port={health_port}"))
            .arg(format!("--prometheus-serve-addr=127.0.0.1:{metrics_port}"))
            .arg("--log-level=warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let store_url = match &etcd {
            Some(etcd) => {
                let client = pki.client("root");
                let config = dir.path().join("etcd-config.yaml");
                std::fs::write(
                    &config,
                    format!(
                        "endpoints:\n- {}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                        etcd.client_url(),
                        pki.ca_path().display(),
                        client.cert_path.display(),
                        client.key_path.display()
                    ),
                )?;
                cmd.arg("--kvstore=etcd").arg(format!("--kvstore-opt=etcd.config={}", config.display()));
                etcd.client_url()
            }
            None => {
                let url = format!("https://127.0.0.1:{store_port}");
                cmd.arg("--kvstore=embedded")
                    .arg(format!("--listen-client-urls={url}"))
                    .arg(format!("--cert-file={}", pki.server_cert_path().display()))
                    .arg(format!("--key-file={}", pki.server_key_path().display()))
                    .arg(format!("--trusted-ca-file={}", pki.ca_path().display()));
                url
            }
        };
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Apiserver { child, health_port, store_url, etcd, dir })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `/readyz` answers 200: the cluster config and every canary are written.
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the apiserver exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), servers::http_get(self.health_port, "/readyz")).await
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("the apiserver was not ready after {timeout:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Memory of every process serving the mesh, plus etcd's data on tmpfs.
    fn memory(&self) -> anyhow::Result<(Memory, u64)> {
        let mut total = servers::process_memory(self.child.id())?;
        let mut tmpfs = 0;
        if let Some(etcd) = &self.etcd {
            let m = etcd.memory()?;
            total.rss += m.rss;
            total.rss_anon += m.rss_anon;
            total.rss_file += m.rss_file;
            total.rss_shmem += m.rss_shmem;
            total.hwm += m.hwm;
            tmpfs = etcd.tmpfs_bytes();
        }
        Ok((total, tmpfs))
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Kubernetes events -> remote client

struct E2e {
    events: usize,
    received: usize,
    latency: Percentiles,
    rate: f64,
}

pub async fn scenario_e2e(config: &Config, pki: &Pki, tls: &ClientTls, report: &mut Report) -> anyhow::Result<()> {
    const S: &str = "6 end to end";
    let events = (config.e2e_rate * config.e2e_secs) as usize;
    let results = for_each_server(&config.lineup, |which| {
        progress(format!("{S}: {} ({events} CiliumEndpoints at {}/s)", which.name(), config.e2e_rate));
        e2e_one(which, &config.lineup, pki, tls, events, config.e2e_rate)
    })
    .await?;
    for (which, r) in results.iter() {
        report.check(
            S,
            which.name(),
            format!("remote client saw {} of {} endpoints", r.received, r.events),
            r.received == r.events,
        );
    }
    report.row(S, "k8s->remote p50", "ms", Better::Lower, results.figures(|r| ms(r.latency.p50)), None);
    report.row(
        S,
        &format!("k8s->remote p99 at {}/s", config.e2e_rate),
        "ms",
        Better::Lower,
        results.figures(|r| ms(r.latency.p99)),
        Some(Target::OursAtMost { value: 10.0 }),
    );
    report.row(S, "events applied/s (achieved)", "1/s", Better::Higher, results.figures(|r| r.rate), None);
    Ok(())
}

async fn e2e_one(
    which: Which,
    lineup: &Lineup,
    pki: &Pki,
    tls: &ClientTls,
    events: usize,
    rate: u64,
) -> anyhow::Result<E2e> {
    let fake = crate::fake_k8s::FakeApiServer::start_with(crate::fake_k8s::FakeOptions {
        history_limit: events + 1000,
        request_log_limit: 100,
        ..Default::default()
    })
    .await;
    fake.apply(namespace());
    let mut apiserver = Apiserver::start(which, lineup, pki, &fake.url()).await?;
    apiserver.wait_ready(Duration::from_secs(60)).await?;
    let mut client = tls.connect(&apiserver.store_url).await?;
    let prefix = format!("{IPCACHE_PREFIX}default/");
    let mut stream = client.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix())).await?;
    loop {
        if stream.message().await?.context("watch ended before created")?.created() {
            break;
        }
    }
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..events).map(|_| AtomicU64::new(0)).collect());
    let receiver = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(events);
            let mut seen = vec![false; events];
            let run = async {
                while latencies.len() < events {
                    let Some(response) = stream.message().await? else { break };
                    let now = base.elapsed();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key());
                        let Some(seq) = key.rsplit('/').next().and_then(seq_of_ip).filter(|&s| s < events) else {
                            continue;
                        };
                        if std::mem::replace(&mut seen[seq], true) {
                            continue;
                        }
                        let at = Duration::from_nanos(sent[seq].load(Ordering::Acquire));
                        latencies.push(u32::try_from(now.saturating_sub(at).as_micros()).unwrap_or(u32::MAX));
                    }
                }
                Ok::<_, anyhow::Error>(())
            };
            let limit = Duration::from_secs(60) + Duration::from_millis(events as u64 * 2);
            if tokio::time::timeout(limit, run).await.is_err() {
                eprintln!("e2e: remote client timed out with {} of {events} events", latencies.len());
            }
            latencies
        })
    };
    // Paced: event `seq` is due at `seq / rate` seconds; late ones go out at once.
    let start = Instant::now();
    let mut seq = 0;
    while seq < events {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize + 1).min(events);
        while seq < due {
            sent[seq].store(base.elapsed().as_nanos() as u64, Ordering::Release);
            fake.apply(endpoint(seq, 1000));
            seq += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let achieved = events as f64 / start.elapsed().as_secs_f64();
    let latencies = receiver.await.context("receiver panicked")?;
    let received = latencies.len();
    drop(apiserver);
    fake.stop().await;
    Ok(E2e { events, received, latency: Percentiles::of_micros(latencies), rate: achieved })
}

// ---------------------------------------------------------------------------------------------
// 7. Bootstrap

struct Bootstrap {
    elapsed: Duration,
    counts: Vec<(&'static str, usize)>,
    memory: Memory,
    tmpfs: u64,
    /// Memory once the bootstrap's garbage has gone back to the kernel (see `SETTLE`).
    settled: Memory,
}

/// How long after readiness the settled RSS is read: our allocator (jemalloc) hands freed
/// pages back within 10 s, Go's scavenger within a few minutes. Operators see this figure for
/// as long as the process runs; the one at readiness includes what the bootstrap just freed.
const SETTLE: Duration = Duration::from_secs(15);
const SETTLE_QUICK: Duration = Duration::from_secs(1);

pub async fn scenario_bootstrap(
    config: &Config,
    pki: &Pki,
    tls: &ClientTls,
    report: &mut Report,
) -> anyhow::Result<()> {
    const S: &str = "7 bootstrap";
    let sizes = config.sizes;
    let settle = if config.quick { SETTLE_QUICK } else { SETTLE };
    let kube = ListServer::start(&sizes).await?;
    let kube_url = kube.url();
    let kube_url = kube_url.as_str();
    // A failed bootstrap is a failed check; the other servers still run.
    let results = for_each_server(&config.lineup, |which| async move {
        progress(format!(
            "{S}: {} ({} CiliumEndpoints, {} CiliumNodes, {} CiliumIdentities)",
            which.name(),
            sizes.ipcache,
            sizes.nodes,
            sizes.identities
        ));
        Ok(bootstrap_one(which, &config.lineup, pki, tls, kube_url, config.bootstrap_timeout, settle).await)
    })
    .await?;
    let unknown = kube.unknown_paths();
    if !unknown.is_empty() {
        report.notes.push(format!("7: the list server answered 404 to {unknown:?}"));
    }
    for (which, r) in results.iter() {
        match r {
            Ok(r) => {
                for (prefix, count) in &r.counts {
                    let expected = sizes.of_prefix(prefix);
                    let what = format!("{count} of {expected} keys under {prefix}");
                    report.check(S, which.name(), what, *count == expected);
                }
            }
            Err(error) => {
                let error = format!("{error:#}");
                let first = error.lines().next().unwrap_or_default().to_owned();
                report.check(S, which.name(), format!("bootstrap finished: {first}"), false);
                eprintln!("{S}: {}: {error}", which.name());
            }
        }
    }
    let secs = |r: &anyhow::Result<Bootstrap>| r.as_ref().ok().map(|r| r.elapsed.as_secs_f64());
    report.row(
        S,
        "start -> all canaries written",
        "s",
        Better::Lower,
        results.figures(secs),
        Some(Target::OursAtMost { value: 3.0 }),
    );
    let rss = |r: &anyhow::Result<Bootstrap>| r.as_ref().ok().map(|r| mib(r.memory.rss));
    let total = |r: &anyhow::Result<Bootstrap>| r.as_ref().ok().map(|r| mib(r.memory.private() + r.tmpfs));
    let settled = |r: &anyhow::Result<Bootstrap>| r.as_ref().ok().map(|r| mib(r.settled.rss));
    report.row(S, "RSS of the mesh's processes", "MiB", Better::Lower, results.figures(rss), None);
    report.row(
        S,
        &format!("RSS of the mesh's processes {} s later", settle.as_secs()),
        "MiB",
        Better::Lower,
        results.figures(settled),
        Some(Target::OursAtMost { value: 300.0 }),
    );
    report.row(S, "RSS + data on tmpfs", "MiB", Better::Lower, results.figures(total), None);
    kube.stop();
    Ok(())
}

async fn bootstrap_one(
    which: Which,
    lineup: &Lineup,
    pki: &Pki,
    tls: &ClientTls,
    kube_url: &str,
    timeout: Duration,
    settle: Duration,
) -> anyhow::Result<Bootstrap> {
    // For etcd, the etcd process is up before the clock starts, as a sidecar would be.
    let mut apiserver = Apiserver::start(which, lineup, pki, kube_url).await?;
    let elapsed = apiserver.wait_ready(timeout).await?;
    let mut client = tls.connect(&apiserver.store_url).await?;
    let mut counts = Vec::new();
    for prefix in [NODES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX] {
        let options = GetOptions::new().with_range(data::prefix_end(prefix)).with_count_only();
        let count = client.get(prefix, Some(options)).await?.count();
        counts.push((prefix, usize::try_from(count).unwrap_or(0)));
    }
    let (memory, tmpfs) = apiserver.memory()?;
    tokio::time::sleep(settle).await;
    let (settled, _) = apiserver.memory()?;
    Ok(Bootstrap { elapsed, counts, memory, tmpfs, settled })
}

/// Serves LISTs of pre-rendered objects with `limit`/`continue`, empty lists for every other
/// collection, and WATCHes that stay open without events.
struct ListServer {
    addr: std::net::SocketAddr,
    state: Arc<ListState>,
    task: tokio::task::JoinHandle<()>,
}

struct ListState {
    /// Collection path -> (apiVersion, List kind, rendered items).
    lists: HashMap<&'static str, (&'static str, &'static str, Vec<String>)>,
    unknown: parking_lot::Mutex<Vec<String>>,
}

impl ListServer {
    async fn start(sizes: &Sizes) -> anyhow::Result<ListServer> {
        let mut lists = HashMap::new();
        let render = |v: Value| v.to_string();
        lists.insert("/api/v1/namespaces", ("v1", "NamespaceList", vec![render(namespace())]));
        lists.insert(
            "/apis/cilium.io/v2/ciliumnodes",
            ("cilium.io/v2", "CiliumNodeList", (0..sizes.nodes).map(|i| render(node(i))).collect()),
        );
        lists.insert(
            "/apis/cilium.io/v2/ciliumidentities",
            ("cilium.io/v2", "CiliumIdentityList", (0..sizes.identities).map(|i| render(identity(i))).collect()),
        );
        lists.insert(
            "/apis/cilium.io/v2/ciliumendpoints",
            (
                "cilium.io/v2",
                "CiliumEndpointList",
                (0..sizes.ipcache).map(|i| render(endpoint(i, sizes.identities))).collect(),
            ),
        );
        let state = Arc::new(ListState { lists, unknown: Default::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // TCP_NODELAY, as kube-apiserver and the fake API server of scenario 6.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = axum::Router::new().fallback(list_handler).with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ListServer { addr, state, task })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn unknown_paths(&self) -> Vec<String> {
        self.state.unknown.lock().clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn list_handler(State(state): State<Arc<ListState>>, uri: Uri) -> Response {
    let path = uri.path();
    let query: HashMap<&str, &str> =
        uri.query().unwrap_or_default().split('&').filter_map(|kv| kv.split_once('=')).collect();
    let json = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("response")
    };
    let known = state.lists.get(path);
    let collection = known.is_some() || path.starts_with("/api/v1/") || path.starts_with("/apis/");
    if !collection || path.split('/').count() > 7 {
        state.unknown.lock().push(path.to_owned());
        return json(
            StatusCode::NOT_FOUND,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#.into(),
        );
    }
    if matches!(query.get("watch"), Some(&"true") | Some(&"1")) {
        // Nothing ever changes: an open stream without events (the client times it out).
        let stream = futures::stream::pending::<Result<Bytes, Infallible>>();
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .expect("response");
    }
    let no_items = Vec::new();
    let (api_version, kind, items) = match known {
        Some((a, k, items)) => (*a, *k, items),
        None => ("v1", "List", &no_items),
    };
    let from: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).filter(|&l| l > 0).unwrap_or(usize::MAX);
    let to = from.saturating_add(limit).min(items.len());
    let mut body = String::with_capacity((to - from.min(to)) * 400 + 200);
    body.push_str(&format!(r#"{{"apiVersion":"{api_version}","kind":"{kind}","metadata":{{"resourceVersion":"1""#));
    if to < items.len() {
        body.push_str(&format!(r#","continue":"{to}","remainingItemCount":{}"#, items.len() - to));
    }
    body.push_str(r#"},"items":["#);
    for (i, item) in items[from.min(to)..to].iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    json(StatusCode::OK, body)
}
