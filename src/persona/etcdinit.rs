//! `clustermesh-apiserver etcdinit`: the init container of Cilium's pod.
//!
//! Cilium's etcdinit starts a throw-away etcd on the data directory, creates Cilium's users
//! and roles through it, enables auth and stops it, so that the `etcd` container finds them
//! in the backend. Our store reads the same facts from the data directory's auth file
//! ([`crate::etcd::datadir`]), so this writes that file directly: the same contract at the
//! data-directory level, without a child process.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::etcd::auth::AuthStore;
use crate::etcd::datadir::{DataDir, Origin};

/// Cilium's flags, each also read from `CILIUM_<FLAG>` as Cilium's viper setup does (the
/// chart passes the cluster name only as `CILIUM_CLUSTER_NAME`).
#[derive(Debug, Args)]
pub struct EtcdinitArgs {
    /// The data directory the `etcd` container will use.
    #[arg(long, env = "CILIUM_ETCD_DATA_DIR", default_value = "/var/run/etcd")]
    pub etcd_data_dir: PathBuf,
    /// etcd's `--initial-cluster-token` (the chart passes the pod UID); recorded, no other effect.
    #[arg(long, env = "CILIUM_ETCD_INITIAL_CLUSTER_TOKEN", default_value = "clustermesh-apiserver")]
    pub etcd_initial_cluster_token: String,
    /// etcd's `--name`; recorded, no other effect.
    #[arg(long, env = "CILIUM_ETCD_CLUSTER_NAME", default_value = "clustermesh-apiserver")]
    pub etcd_cluster_name: String,
    /// The Cilium cluster name: the users are `admin-<name>` and `local-<name>`, and the
    /// `remote` role reads this cluster's config and sync canaries.
    #[arg(long, env = "CILIUM_CLUSTER_NAME", default_value = "default")]
    pub cluster_name: String,
    /// Bound on the whole initialisation.
    #[arg(long, env = "CILIUM_TIMEOUT", value_parser = crate::config::humantime_secs, default_value = "2m")]
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdinitError {
    #[error(transparent)]
    DataDir(#[from] crate::etcd::datadir::DataDirError),
    #[error("not done within --timeout {0:?}")]
    Timeout(Duration),
}

/// Empties the data directory and leaves Cilium's users and roles there, auth enabled.
pub async fn run(args: EtcdinitArgs) -> Result<(), EtcdinitError> {
    let timeout = args.timeout;
    let work = tokio::task::spawn_blocking(move || initialise(&args));
    match tokio::time::timeout(timeout, work).await {
        Ok(done) => done.expect("etcdinit does not panic"),
        Err(_) => Err(EtcdinitError::Timeout(timeout)),
    }
}

fn initialise(args: &EtcdinitArgs) -> Result<(), EtcdinitError> {
    let data = DataDir::new(&args.etcd_data_dir);
    tracing::info!(data_dir = %data.path().display(), "deleting the contents of the data directory");
    data.clear()?;
    let auth = AuthStore::cilium(&args.cluster_name);
    let origin = Origin {
        writer: "etcdinit".to_owned(),
        cluster_name: args.cluster_name.clone(),
        etcd_cluster_name: args.etcd_cluster_name.clone(),
        initial_cluster_token: args.etcd_initial_cluster_token.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    data.save_auth(auth.state(), origin)?;
    tracing::info!(
        cluster_name = %args.cluster_name,
        users = ?auth.user_list(),
        "users and roles written, authentication enabled"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn init_replaces_whatever_the_directory_held_with_ciliums_users() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("member/snap")).unwrap();
        std::fs::write(dir.path().join("member/snap/db"), b"old").unwrap();
        let args = EtcdinitArgs {
            etcd_data_dir: dir.path().to_owned(),
            etcd_initial_cluster_token: "uid".to_owned(),
            etcd_cluster_name: "clustermesh-apiserver".to_owned(),
            cluster_name: "cluster1".to_owned(),
            timeout: Duration::from_secs(120),
        };
        run(args).await.unwrap();

        assert!(!dir.path().join("member").exists());
        let auth = DataDir::new(dir.path()).load_auth().unwrap().expect("written");
        assert!(auth.is_enabled());
        assert_eq!(auth.user_list(), ["admin-cluster1", "local-cluster1", "remote", "root"]);
    }
}
