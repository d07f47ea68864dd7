//! `status` and `watch`: the client library from the command line, to see a mesh as a remote
//! agent sees it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clustermesh_client::{
    ClientOptions, ClusterId, ClusterMesh, ClusterName, LocalCluster, MaxConnectedClusters, RemoteStatus,
};
use tokio_util::sync::CancellationToken;

use crate::config::{MeshArgs, OutputFormat};

fn options(args: &MeshArgs) -> anyhow::Result<ClientOptions> {
    let name = ClusterName::new(args.cluster_name.clone()).context("--cluster-name")?;
    let max = MaxConnectedClusters::new(args.max_connected_clusters).context("--max-connected-clusters")?;
    Ok(ClientOptions::new(LocalCluster::new(name, ClusterId(args.cluster_id)).with_max_connected_clusters(max)))
}

async fn start(args: &MeshArgs, token: &CancellationToken) -> anyhow::Result<ClusterMesh> {
    ClusterMesh::start(&args.clustermesh_config, options(args)?, token)
        .await
        .with_context(|| format!("reading {}", args.clustermesh_config.display()))
}

/// Connects to every remote of the directory, waits up to `--wait` for all of them to sync,
/// and prints their status. Fails when a remote is not ready, so scripts can gate on it.
pub async fn status(args: MeshArgs, wait: Duration, output: OutputFormat) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    let mesh = start(&args, &token).await?;
    let _ = tokio::time::timeout(wait, mesh.wait_ready()).await;
    let status = mesh.status();
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Text => print!("{}", describe(&args.clustermesh_config, &status.remotes)),
    }
    let ready = status.all_ready();
    mesh.shutdown().await;
    if !ready {
        anyhow::bail!("not every remote cluster is ready");
    }
    Ok(())
}

/// The status in words, one block per remote cluster, as `cilium clustermesh status` reads.
pub fn describe(dir: &Path, remotes: &[RemoteStatus]) -> String {
    let mut out = String::new();
    let ready = remotes.iter().filter(|r| r.ready).count();
    let _ = writeln!(out, "{ready}/{} remote clusters ready ({})", remotes.len(), dir.display());
    for remote in remotes {
        let state = if remote.ready {
            "ready"
        } else if remote.connected {
            "syncing"
        } else {
            "not connected"
        };
        let _ = writeln!(out, "- {}: {state}, {} entries", remote.name, remote.num_entries());
        let config = &remote.config;
        let id = config.cluster_id.map_or_else(|| "?".to_owned(), |id| id.0.to_string());
        let _ = writeln!(
            out,
            "  cluster config: retrieved={} id={id} sync-canaries={} kvstoremesh={}",
            config.retrieved, config.sync_canaries, config.kvstoremesh
        );
        for (kind, prefix) in &remote.prefixes {
            let synced = if prefix.synced { "synced" } else { "not synced" };
            let _ = writeln!(out, "  {kind}: {synced}, {} entries, {} rejected", prefix.entries, prefix.rejected);
        }
        if let Some(failure) = &remote.last_failure {
            let _ = writeln!(out, "  failures: {} (last at {}: {})", remote.num_failures, failure.at, failure.reason);
        }
    }
    out
}

/// Prints one JSON line per change (cluster, kind, op, key, decoded value) until `shutdown`.
pub async fn watch(args: MeshArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mesh = start(&args, &shutdown).await?;
    let mut events = mesh.events();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.recv() => match event {
                Ok(event) => println!("{}", serde_json::to_string(&event)?),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "output too slow; changes skipped (caches are unaffected)");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    mesh.shutdown().await;
    Ok(())
}
