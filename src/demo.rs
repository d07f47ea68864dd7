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

use crate::app::start_store;
use crate::clustermesh::{self, ClustermeshConfig, Source};
use crate::config::StoreArgs;
use crate::etcd::auth::AuthStore;
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
    let trusted_ca = pki::write(&work, "ca.crt", &ca.cert_pem())?;
    let server_cert = pki::write(&work, "tls.crt", &server.cert_pem)?;
    let server_key = pki::write(&work, "tls.key", &server.key_pem)?;
    let remote_cert = pki::write(&work, "remote.crt", &remote.cert_pem)?;
    let remote_key = pki::write(&work, "remote.key", &remote.key_pem)?;

    let tracker = TaskTracker::new();
    let mut endpoints = Vec::new();
    for (name, id) in CLUSTERS {
        let args = StoreArgs {
            listen_client_urls: vec!["https://127.0.0.1:0".to_owned()],
            name: name.to_owned(),
            cert_file: Some(server_cert.clone()),
            key_file: Some(server_key.clone()),
            trusted_ca_file: Some(trusted_ca.clone()),
            client_cert_auth: true,
            ..StoreArgs::etcd_defaults()
        };
        let started = start_store(&args, AuthStore::cilium(name), &tracker, &shutdown).await?;
        let (store, url) = (started.store, started.client_urls.into_iter().next().context("no client URL")?);
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
                trusted_ca.display(),
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
