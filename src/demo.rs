//! `demo`: two clusters on this machine, each mirrored from a directory of manifests into
//! its own embedded store, and each seen by the other through the client library, as a
//! remote agent sees it. Edit a manifest and watch the change arrive on the other side.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clustermesh_client::{ClientOptions, ClusterId, ClusterMesh, ClusterName, LocalCluster, Op};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clustermesh::{self, ClustermeshConfig, Source};
use crate::etcd::auth::AuthStore;
use crate::etcd::embedded::{self, EmbeddedConfig, Listeners};
use crate::etcd::server::{DEFAULT_MAX_CONCURRENT_STREAMS, ServerOptions};
use crate::etcd::service::cluster::MemberInfo;
use crate::etcd::service::watch::WatchConfig;
use crate::etcd::store::Limits;
use crate::etcd::tls::TlsFiles;
use crate::kvstore::embedded::Embedded;
use crate::pki::{self, Authority};
use crate::translate::Settings;

const CLUSTERS: [(&str, u32); 2] = [("cluster1", 1), ("cluster2", 2)];

/// Runs until `shutdown`, printing what each cluster sees of the other.
pub async fn run(examples: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("clustermesh-apiserver-demo-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // One CA for the mesh, as Cilium recommends: every cluster trusts every other.
    let ca = Authority::new("Cilium CA")?;
    let server = ca.server("clustermesh-apiserver.cilium.io", &[pki::CILIUM_SERVER_NAMES, &["127.0.0.1"]].concat())?;
    let remote = ca.client("remote")?;
    let tls = TlsFiles {
        trusted_ca: pki::write(&work, "ca.crt", &ca.cert_pem())?,
        cert: pki::write(&work, "tls.crt", &server.cert_pem)?,
        key: pki::write(&work, "tls.key", &server.key_pem)?,
        client_cert_auth: true,
    };
    let remote_cert = pki::write(&work, "remote.crt", &remote.cert_pem)?;
    let remote_key = pki::write(&work, "remote.key", &remote.key_pem)?;

    let tracker = TaskTracker::new();
    let mut endpoints = Vec::new();
    for (name, id) in CLUSTERS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
        let url = format!("https://{}", listener.local_addr()?);
        let config = EmbeddedConfig {
            tls: tls.clone(),
            tls_reload_interval: Duration::from_secs(10),
            limits: Limits::default(),
            server: ServerOptions {
                member: MemberInfo { name: name.to_owned(), client_urls: vec![url.clone()] },
                watch: WatchConfig::default(),
                max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
                max_connections_per_user: 0,
            },
            auto_compaction_retention: Duration::from_secs(3600),
            persistence: None,
        };
        let listeners = Listeners { client: vec![listener], metrics: Vec::new() };
        let store = embedded::spawn(listeners, config, AuthStore::cilium(name), &tracker, &shutdown)?;
        let source = Source::Directory(examples.join(name), Duration::from_millis(500));
        let config = ClustermeshConfig::new(Settings::new(name, id), source);
        let mut registry = Registry::default();
        clustermesh::spawn(Arc::new(Embedded::new(store)), config, &mut registry, &tracker, &shutdown);
        println!("{name}: serving on {url}, mirroring {}", examples.join(name).display());
        endpoints.push((name, id, url));
    }

    // Each cluster's agent view: a config directory naming the other cluster.
    let mut meshes = Vec::new();
    for (name, id, _) in &endpoints {
        let dir = work.join(format!("{name}-clustermesh"));
        std::fs::create_dir_all(&dir)?;
        for (peer, _, url) in endpoints.iter().filter(|(peer, _, _)| peer != name) {
            let config = format!(
                "endpoints:\n- {url}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
                tls.trusted_ca.display(),
                remote_cert.display(),
                remote_key.display()
            );
            std::fs::write(dir.join(peer), config)?;
        }
        let local = LocalCluster::new(ClusterName::new(*name)?, ClusterId(*id));
        meshes.push((*name, ClusterMesh::start(&dir, ClientOptions::new(local), &shutdown).await?));
    }
    println!("press Ctrl-C to stop; edit files under {} to see changes cross over", examples.display());

    let mut views = Vec::new();
    for (name, mesh) in &meshes {
        let mut events = mesh.events();
        let viewer = name.to_string();
        let shutdown = shutdown.clone();
        views.push(tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    event = events.recv() => event,
                };
                match event {
                    Ok(event) => {
                        let op = if event.op == Op::Upsert { "+" } else { "-" };
                        let entry = event.key.rsplit_once("/v1/").map_or(event.key.as_str(), |(_, rest)| rest);
                        println!("[{viewer} sees {}] {op} {} {entry}", event.cluster, event.kind);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }));
    }
    for (name, mesh) in &meshes {
        let mesh_ready = mesh.wait_ready();
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = mesh_ready => {
                let entries: usize = mesh.status().remotes.iter().map(|r| r.num_entries()).sum();
                println!("[{name}] every remote cluster synced: {entries} entries");
            }
        }
    }
    shutdown.cancelled().await;
    for (_, mesh) in meshes {
        mesh.shutdown().await;
    }
    for view in views {
        let _ = view.await;
    }
    tracker.close();
    tracker.wait().await;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
