//! Scenarios 1-5: the store alone, driven through the etcd v3 API by the same client code
//! for both servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};
use tokio::sync::Barrier;

use crate::data::{self, PREFIXES, Shapes, Sizes};
use crate::report::Percentiles;
use crate::servers::{self, ClientTls, Server};

/// Runs `f(worker)` on `n` tasks and collects their results in worker order.
async fn spawn_all<T, F, Fut>(n: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for handle in handles {
        out.push(handle.await.context("worker panicked")??);
    }
    Ok(out)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

async fn revision(client: &mut Client) -> anyhow::Result<i64> {
    let response = client.get("bench/revision-probe", None).await?;
    Ok(response.header().context("response without a header")?.revision())
}

// ---------------------------------------------------------------------------------------------
// 1. Put throughput

pub struct PutThroughput {
    pub puts: usize,
    pub acknowledged: usize,
    pub revisions: i64,
    pub elapsed: Duration,
    pub latency: Percentiles,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
}

pub async fn put_throughput(
    server: &Server,
    tls: &ClientTls,
    clients: usize,
    puts: usize,
    value_size: usize,
) -> anyhow::Result<PutThroughput> {
    let url = server.client_url();
    let conns = tls.connect_many(&url, clients).await?;
    // One put per connection first, so that TLS handshakes are not measured.
    for (i, client) in conns.iter().enumerate() {
        client.clone().put(format!("bench/put/warmup/{i}"), vec![b'w'; value_size], None).await?;
    }
    let first = revision(&mut conns[0].clone()).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = server.cpu_time();
    let client_before = servers::own_cpu_time();
    let start = Instant::now();
    let results = spawn_all(clients, |w| {
        let (mut client, next) = (conns[w].clone(), Arc::clone(&next));
        async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= puts {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                // A few thousand keys updated over and over, as an agent's own keys are.
                let key = format!("bench/put/{:02}/{:04}", w % 100, i % 1000);
                let mut value = vec![b'v'; value_size];
                value[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let t = Instant::now();
                client.put(key, value, None).await.with_context(|| format!("put {i}"))?;
                latencies.push(micros(t.elapsed()));
            }
        }
    })
    .await?;
    let elapsed = start.elapsed();
    let server_cpu = server.cpu_time().saturating_sub(cpu_before);
    let client_cpu = servers::own_cpu_time().saturating_sub(client_before);
    let last = revision(&mut conns[0].clone()).await?;
    let latencies: Vec<u32> = results.into_iter().flatten().collect();
    Ok(PutThroughput {
        puts,
        acknowledged: latencies.len(),
        revisions: last - first,
        elapsed,
        latency: Percentiles::of_micros(latencies),
        server_cpu,
        client_cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Watch fan-out

pub struct WatchFanout {
    pub watchers: usize,
    pub puts: usize,
    /// Events each watcher received, in watcher order.
    pub received: Vec<usize>,
    /// Watchers whose events came out of revision order or duplicated.
    pub out_of_order: usize,
    pub elapsed: Duration,
    pub latency: Percentiles,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
}

impl WatchFanout {
    pub fn delivered(&self) -> usize {
        self.received.iter().sum()
    }
}

pub async fn watch_fanout(
    server: &Server,
    tls: &ClientTls,
    watchers: usize,
    conns: usize,
    puts: usize,
    writers: usize,
    value_size: usize,
) -> anyhow::Result<WatchFanout> {
    const PREFIX: &str = "bench/watch/";
    let url = server.client_url();
    let clients = tls.connect_many(&url, conns.max(1)).await?;
    let base = Instant::now();
    let ready = Arc::new(Barrier::new(watchers + 1));
    // Generous, but bounded: a watcher that never gets all its events fails the run.
    let deadline = Duration::from_secs(60) + Duration::from_micros((watchers * puts) as u64 * 5);
    let mut handles = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let mut client = clients[w % clients.len()].clone();
        let ready = Arc::clone(&ready);
        handles.push(tokio::spawn(async move {
            let mut stream = client.watch(PREFIX, Some(WatchOptions::new().with_prefix())).await?;
            // Wait for the server to confirm the watcher before any put is made.
            loop {
                let response = stream.message().await?.context("watch stream ended before created")?;
                if response.created() {
                    break;
                }
            }
            ready.wait().await;
            let mut latencies = Vec::with_capacity(puts);
            let mut last_revision = 0;
            let mut in_order = true;
            let run = async {
                while latencies.len() < puts {
                    let Some(response) = stream.message().await? else { break };
                    let now = base.elapsed();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        in_order &= kv.mod_revision() > last_revision;
                        last_revision = kv.mod_revision();
                        let sent = u64::from_le_bytes(kv.value()[..8].try_into().unwrap_or([0; 8]));
                        latencies.push(micros(now.saturating_sub(Duration::from_nanos(sent))));
                    }
                }
                Ok::<_, anyhow::Error>(())
            };
            match tokio::time::timeout(deadline, run).await {
                Ok(result) => result?,
                Err(_) => eprintln!("watcher {w}: timed out with {} of {puts} events", latencies.len()),
            }
            Ok::<_, anyhow::Error>((latencies, in_order))
        }));
    }
    ready.wait().await;
    let cpu_before = server.cpu_time();
    let client_before = servers::own_cpu_time();
    let start = base.elapsed();
    let next = Arc::new(AtomicUsize::new(0));
    spawn_all(writers, |w| {
        let (mut client, next) = (clients[w % clients.len()].clone(), Arc::clone(&next));
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= puts {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut value = vec![b'v'; value_size.max(8)];
                value[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
                client.put(format!("{PREFIX}{:05}", i % 1000), value, None).await?;
            }
        }
    })
    .await?;
    let mut received = Vec::with_capacity(watchers);
    let mut out_of_order = 0;
    let mut all = Vec::with_capacity(watchers * puts);
    for handle in handles {
        let (latencies, in_order) = handle.await.context("watcher panicked")??;
        received.push(latencies.len());
        out_of_order += usize::from(!in_order);
        all.extend(latencies);
    }
    let elapsed = base.elapsed() - start;
    let server_cpu = server.cpu_time().saturating_sub(cpu_before);
    let client_cpu = servers::own_cpu_time().saturating_sub(client_before);
    Ok(WatchFanout {
        watchers,
        puts,
        received,
        out_of_order,
        elapsed,
        latency: Percentiles::of_micros(all),
        server_cpu,
        client_cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Memory after loading Cilium-shaped data

pub struct Load {
    pub elapsed: Duration,
    pub keys_per_lease: usize,
    pub leases: usize,
    /// Keys found per prefix after the load.
    pub counts: Vec<(String, usize)>,
    pub server_cpu: Duration,
}

/// Writes the data set with puts on leases of at most `keys_per_lease` keys each, as
/// Cilium's lease manager does, from `clients` connections.
pub async fn load(
    server: &Server,
    tls: &ClientTls,
    shapes: &Arc<Shapes>,
    sizes: Sizes,
    clients: usize,
    keys_per_lease: usize,
) -> anyhow::Result<Load> {
    let url = server.client_url();
    let conns = tls.connect_many(&url, clients).await?;
    let total = sizes.total();
    let lease_count = total.div_ceil(keys_per_lease);
    let mut leases = Vec::with_capacity(lease_count);
    let mut client = conns[0].clone();
    for _ in 0..lease_count {
        leases.push(client.lease_grant(3600, None).await?.id());
    }
    let leases = Arc::new(leases);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = server.cpu_time();
    let start = Instant::now();
    spawn_all(clients, |w| {
        let (mut client, next, leases, shapes) =
            (conns[w].clone(), Arc::clone(&next), Arc::clone(&leases), Arc::clone(shapes));
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let (key, value) = shapes.item(&sizes, i);
                let lease = leases[i / keys_per_lease];
                client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
            }
        }
    })
    .await?;
    let elapsed = start.elapsed();
    let server_cpu = server.cpu_time().saturating_sub(cpu_before);
    let counts = count_prefixes(&mut client).await?;
    Ok(Load { elapsed, keys_per_lease, leases: lease_count, counts, server_cpu })
}

/// The keys under each of the data set's prefixes.
async fn count_prefixes(client: &mut Client) -> anyhow::Result<Vec<(String, usize)>> {
    let mut counts = Vec::new();
    for prefix in PREFIXES {
        let options = GetOptions::new().with_range(data::prefix_end(prefix)).with_count_only();
        let count = client.get(prefix, Some(options)).await?.count();
        counts.push((prefix.to_owned(), usize::try_from(count).unwrap_or(0)));
    }
    Ok(counts)
}

/// Keys under the data set's prefixes, counted by a new connection (retried until the server
/// answers: right after a restart it may still be opening its listener).
pub async fn count_all(server: &Server, tls: &ClientTls) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let counted = async {
            let mut client = tls.connect(&server.client_url()).await?;
            Ok::<_, anyhow::Error>(count_prefixes(&mut client).await?.iter().map(|(_, n)| n).sum())
        }
        .await;
        match counted {
            Ok(total) => return Ok(total),
            Err(error) if start.elapsed() > Duration::from_secs(60) => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Reconnect storm

pub struct Storm {
    pub clients: usize,
    pub elapsed: Duration,
    /// Keys each client listed, summed over the prefixes.
    pub listed: Vec<usize>,
    pub pages: usize,
    pub bytes: usize,
    pub server_cpu: Duration,
    pub client_cpu: Duration,
}

/// What one paginated list of a prefix read.
struct Listed {
    revision: i64,
    keys: usize,
    pages: usize,
    bytes: usize,
}

/// Lists `prefix` in pages of `page`, every page after the first pinned to the first page's
/// revision, as Cilium's agents do.
async fn list_pinned(client: &mut Client, prefix: &str, page: i64) -> anyhow::Result<Listed> {
    let end = data::prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut listed = Listed { revision: 0, keys: 0, pages: 0, bytes: 0 };
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if listed.revision > 0 {
            options = options.with_revision(listed.revision);
        }
        let response = client.get(from.clone(), Some(options)).await?;
        if listed.revision == 0 {
            listed.revision = response.header().context("no header")?.revision();
        }
        listed.pages += 1;
        listed.keys += response.kvs().len();
        listed.bytes += response.kvs().iter().map(|kv| kv.key().len() + kv.value().len()).sum::<usize>();
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(listed),
        }
    }
}

/// `clients` new connections at once, each listing every prefix in pages of `page`, pinned to
/// the revision of its first page as Cilium's agents do.
pub async fn storm(
    server: &Server,
    tls: &ClientTls,
    clients: usize,
    page: i64,
    timeout: Duration,
) -> anyhow::Result<Storm> {
    let url = server.client_url();
    // Built beforehand; etcd_client dials lazily, so every connection and TLS handshake
    // happens inside the measured time, as in a real storm.
    let conns = tls.connect_many(&url, clients).await?;
    let start_gate = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::with_capacity(clients);
    for mut client in conns {
        let gate = Arc::clone(&start_gate);
        handles.push(tokio::spawn(async move {
            gate.wait().await;
            let (mut keys, mut pages, mut bytes) = (0usize, 0usize, 0usize);
            for prefix in PREFIXES {
                let listed = list_pinned(&mut client, prefix, page).await?;
                (keys, pages, bytes) = (keys + listed.keys, pages + listed.pages, bytes + listed.bytes);
            }
            Ok::<_, anyhow::Error>((keys, pages, bytes))
        }));
    }
    let cpu_before = server.cpu_time();
    let client_before = servers::own_cpu_time();
    let start = Instant::now();
    start_gate.wait().await;
    let mut listed = Vec::with_capacity(clients);
    let (mut pages, mut bytes) = (0, 0);
    let joined = tokio::time::timeout(timeout, async {
        for handle in handles {
            let (k, p, b) = handle.await.context("client panicked")??;
            listed.push(k);
            pages += p;
            bytes += b;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => bail!("the storm did not finish within {timeout:?} (raise --storm-timeout or lower --storm-clients)"),
    }
    let elapsed = start.elapsed();
    let server_cpu = server.cpu_time().saturating_sub(cpu_before);
    let client_cpu = servers::own_cpu_time().saturating_sub(client_before);
    Ok(Storm { clients, elapsed, listed, pages, bytes, server_cpu, client_cpu })
}

// ---------------------------------------------------------------------------------------------
// 5. Put latency against the keys already on the lease

pub struct LeasePhase {
    pub keys_on_lease: usize,
    pub attach_elapsed: Duration,
    pub latency: Percentiles,
}

/// Attaches `keys` keys to a fresh lease (from `clients` connections), then measures
/// `samples` sequential puts that rewrite keys of that lease with it.
pub async fn lease_phase(
    server: &Server,
    tls: &ClientTls,
    tag: &str,
    keys: usize,
    samples: usize,
    clients: usize,
    value_size: usize,
) -> anyhow::Result<LeasePhase> {
    let url = server.client_url();
    let conns = tls.connect_many(&url, clients).await?;
    let mut client = conns[0].clone();
    let lease = client.lease_grant(3600, None).await?.id();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let key_of = {
        let tag = tag.to_owned();
        move |i: usize| format!("bench/lease/{tag}/{i:07}")
    };
    spawn_all(clients, |w| {
        let (mut client, next, key_of) = (conns[w].clone(), Arc::clone(&next), key_of.clone());
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<_, anyhow::Error>(());
                }
                client.put(key_of(i), vec![b'v'; value_size], Some(PutOptions::new().with_lease(lease))).await?;
            }
        }
    })
    .await?;
    let attach_elapsed = start.elapsed();
    let ttl = client.lease_time_to_live(lease, None).await?;
    if ttl.ttl() <= 0 {
        bail!("lease {lease:x} is gone after attaching {keys} keys");
    }
    let mut latencies = Vec::with_capacity(samples);
    for s in 0..samples {
        // Spread over the lease's keys; a rewrite with the same lease keeps the count.
        let i = s.wrapping_mul(7919) % keys;
        let t = Instant::now();
        client.put(key_of(i), vec![b'u'; value_size], Some(PutOptions::new().with_lease(lease))).await?;
        latencies.push(micros(t.elapsed()));
    }
    Ok(LeasePhase { keys_on_lease: keys, attach_elapsed, latency: Percentiles::of_micros(latencies) })
}

// ---------------------------------------------------------------------------------------------
// 8. Agents at scale

/// What one agent of a remote cluster lists and watches on connect (Cilium's remote cluster
/// watch set; the two service prefixes hold nothing in this data set but are watched anyway).
pub const AGENT_PREFIXES: [&str; 5] = [
    data::NODES_PREFIX,
    "cilium/state/services/v1/",
    "cilium/state/serviceexports/v1/",
    data::IDENTITIES_PREFIX,
    data::IPCACHE_PREFIX,
];

pub struct Agents {
    pub agents: usize,
    /// From the start gate until every agent has listed its prefixes and has its watches.
    pub connected: Duration,
    /// Keys each agent listed, summed over its prefixes.
    pub listed: Vec<usize>,
    /// Server RSS before the agents connected and once all of them watch.
    pub rss_before: u64,
    pub rss_connected: u64,
    /// One node changed, then seen by every agent: put → event, over all agents.
    pub fanout: Percentiles,
    /// Agents that saw the change.
    pub notified: usize,
    pub server_cpu: Duration,
}

/// `agents` new connections at once, each listing [`AGENT_PREFIXES`] in pages of `page` pinned
/// to its first page's revision, then watching each prefix from the next revision, as a
/// Cilium agent connecting to a remote cluster does; then one change that every agent must see.
pub async fn agents(
    server: &Server,
    tls: &ClientTls,
    agents: usize,
    page: i64,
    timeout: Duration,
) -> anyhow::Result<Agents> {
    const CHANGED: &str = "cilium/state/nodes/v1/bench-agents/changed";
    let url = server.client_url();
    let conns = tls.connect_many(&url, agents).await?;
    let rss_before = server.memory()?.rss;
    let gate = Arc::new(Barrier::new(agents + 1));
    let watching = Arc::new(Barrier::new(agents + 1));
    let base = Instant::now();
    let mut handles = Vec::with_capacity(agents);
    for mut client in conns {
        let (gate, watching) = (Arc::clone(&gate), Arc::clone(&watching));
        handles.push(tokio::spawn(async move {
            gate.wait().await;
            let mut listed = 0;
            let mut streams = Vec::with_capacity(AGENT_PREFIXES.len());
            for prefix in AGENT_PREFIXES {
                let list = list_pinned(&mut client, prefix, page).await?;
                listed += list.keys;
                let options =
                    WatchOptions::new().with_range(data::prefix_end(prefix)).with_start_revision(list.revision + 1);
                let mut stream = client.watch(prefix, Some(options)).await?;
                while !stream.message().await?.context("watch ended before created")?.created() {}
                streams.push(stream);
            }
            watching.wait().await;
            // The node prefix's watch sees the change (its value is the put's send time).
            let nodes = &mut streams[0];
            loop {
                let response = nodes.message().await?.context("the node watch ended")?;
                if let Some(kv) =
                    response.events().iter().filter_map(|e| e.kv()).find(|kv| kv.key() == CHANGED.as_bytes())
                {
                    let sent = u64::from_le_bytes(kv.value()[..8].try_into().unwrap_or([0; 8]));
                    return Ok::<_, anyhow::Error>((listed, base.elapsed().saturating_sub(Duration::from_nanos(sent))));
                }
            }
        }));
    }
    let cpu_before = server.cpu_time();
    let start = Instant::now();
    gate.wait().await;
    if tokio::time::timeout(timeout, watching.wait()).await.is_err() {
        bail!(
            "{agents} agents were not all listed and watching within {timeout:?} (raise --agents-timeout or lower --agents)"
        );
    }
    let connected = start.elapsed();
    let rss_connected = server.memory()?.rss;
    let mut writer = tls.connect(&url).await?;
    writer.put(CHANGED, (base.elapsed().as_nanos() as u64).to_le_bytes().to_vec(), None).await?;
    let mut listed = Vec::with_capacity(agents);
    let mut latencies = Vec::with_capacity(agents);
    let joined = tokio::time::timeout(Duration::from_secs(60), async {
        for handle in handles {
            let (keys, latency) = handle.await.context("agent panicked")??;
            listed.push(keys);
            latencies.push(micros(latency));
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => bail!("the change did not reach every agent within 60 s ({} did)", latencies.len()),
    }
    let server_cpu = server.cpu_time().saturating_sub(cpu_before);
    let notified = latencies.len();
    Ok(Agents {
        agents,
        connected,
        listed,
        rss_before,
        rss_connected,
        fanout: Percentiles::of_micros(latencies),
        notified,
        server_cpu,
    })
}
