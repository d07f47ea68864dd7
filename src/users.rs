//! Per-remote-cluster etcd users (`--cluster-users-enabled`), as Cilium's users manager
//! keeps them for `tls.authMode` `migration` and `cluster`: a YAML file (Helm's
//! `clustermesh-remote-users` ConfigMap) lists `users: [{name: remote-<peer>, role: remote}]`,
//! and the store gets exactly those users, each holding its role.
//!
//! Semantics follow `clustermesh-apiserver/clustermesh/users_mgmt.go`: an entry named like
//! this cluster is skipped; a user is (re)configured when new or its role changed, without
//! revoking other roles it may hold; users dropped from the file are deleted, but only users
//! this process configured — users that existed before start are never touched. A failed
//! sync is retried. Cilium is told of changes by fsnotify; the file is polled here, which
//! also sees Kubernetes' symlink swap of a ConfigMap volume.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_client::Backoff;
use etcd_client::{Client, UserAddOptions};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::controllers::{ControllerRuns, USERS_MANAGEMENT};
use crate::etcd::store::Store;

/// Cilium's default `--cluster-users-config-path` (where the chart mounts the ConfigMap).
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/cilium/etcd-config/users.yaml";
/// How often the file is read for changes, and the first retry delay after a failed sync.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("embedded store refused to change user {user}")]
    Embedded {
        user: String,
        #[source]
        source: crate::etcd::Error,
    },
    #[error("etcd refused to change user {user}")]
    Etcd {
        user: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// The users file: `users: [{name, role}]`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
pub struct UsersFile {
    /// `users:` with nothing after it (a null list) is valid, as in Cilium: no users.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub users: Vec<UserEntry>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<UserEntry>, D::Error> {
    Ok(Option::<Vec<UserEntry>>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub role: String,
}

impl UsersFile {
    pub fn parse(text: &str, path: &str) -> Result<Self, UsersError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_saphyr::from_str(text).map_err(|e| UsersError::Parse { path: path.to_owned(), reason: e.to_string() })
    }
}

/// Where users are created and deleted: Cilium's `UserEnforcePresence` / `UserEnforceAbsence`.
pub trait UserAdmin: Send + Sync + 'static {
    /// The user exists, password-less, and holds `role` (other roles are left alone).
    fn enforce_presence(&self, user: &str, role: &str) -> impl Future<Output = Result<(), UsersError>> + Send;
    /// The user does not exist.
    fn enforce_absence(&self, user: &str) -> impl Future<Output = Result<(), UsersError>> + Send;
}

/// The embedded store's auth table, changed in-process.
pub struct EmbeddedUsers(pub Arc<Store>);

impl UserAdmin for EmbeddedUsers {
    async fn enforce_presence(&self, user: &str, role: &str) -> Result<(), UsersError> {
        let result = self.0.auth().write().user_enforce_presence(user, role);
        result.map(drop).map_err(|source| UsersError::Embedded { user: user.to_owned(), source })
    }

    async fn enforce_absence(&self, user: &str) -> Result<(), UsersError> {
        let result = self.0.auth().write().user_enforce_absence(user);
        result.map(drop).map_err(|source| UsersError::Embedded { user: user.to_owned(), source })
    }
}

/// An attached etcd, through its auth API (the connection must be an admin's).
pub struct EtcdUsers(pub Client);

fn etcd_says(error: &etcd_client::Error, what: &str) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.message().contains(what))
}

impl UserAdmin for EtcdUsers {
    async fn enforce_presence(&self, user: &str, role: &str) -> Result<(), UsersError> {
        let failed = |source| UsersError::Etcd { user: user.to_owned(), source };
        let mut client = self.0.clone();
        match client.user_add(user, "", Some(UserAddOptions::new().with_no_pwd())).await {
            Ok(_) => {}
            Err(error) if etcd_says(&error, "user name already exists") => {}
            Err(error) => return Err(failed(error)),
        }
        client.user_grant_role(user, role).await.map(drop).map_err(failed)
    }

    async fn enforce_absence(&self, user: &str) -> Result<(), UsersError> {
        match self.0.clone().user_delete(user).await {
            Ok(_) => Ok(()),
            Err(error) if etcd_says(&error, "user name not found") => Ok(()),
            Err(source) => Err(UsersError::Etcd { user: user.to_owned(), source }),
        }
    }
}

/// The users this process configured, and their roles.
pub struct UsersManager<A> {
    admin: A,
    path: PathBuf,
    cluster_name: String,
    managed: HashMap<String, String>,
    runs: ControllerRuns,
}

impl<A: UserAdmin> UsersManager<A> {
    pub fn new(admin: A, path: PathBuf, cluster_name: String) -> Self {
        Self { admin, path, cluster_name, managed: HashMap::new(), runs: ControllerRuns::default() }
    }

    /// Counts each sync as a run of Cilium's `clustermesh-users-management` controller group.
    pub fn counting_runs_in(mut self, runs: ControllerRuns) -> Self {
        runs.declare(USERS_MANAGEMENT);
        self.runs = runs;
        self
    }

    /// Brings the store in line with `file`. On failure the users done so far stay
    /// recorded, so the retry redoes only the rest.
    pub async fn apply(&mut self, file: &UsersFile) -> Result<(), UsersError> {
        let mut stale: Vec<String> = self.managed.keys().cloned().collect();
        for entry in &file.users {
            // Cilium compares with the bare cluster name, not `remote-<name>`.
            if entry.name == self.cluster_name {
                continue;
            }
            if self.managed.get(&entry.name) != Some(&entry.role) {
                self.admin.enforce_presence(&entry.name, &entry.role).await?;
                tracing::info!(user = %entry.name, role = %entry.role, "etcd user configured");
            }
            self.managed.insert(entry.name.clone(), entry.role.clone());
            stale.retain(|user| *user != entry.name);
        }
        for user in stale {
            self.admin.enforce_absence(&user).await?;
            tracing::info!(user = %user, "etcd user removed");
            self.managed.remove(&user);
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), UsersError> {
        let path = self.path.display().to_string();
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| UsersError::Read { path: path.clone(), source })?;
        let file = UsersFile::parse(&text, &path)?;
        self.apply(&file).await
    }

    /// Syncs now, then whenever the file's content changes, until `shutdown`; failures are
    /// retried with a doubling delay.
    pub async fn run(mut self, poll: Duration, shutdown: CancellationToken) {
        tracing::info!(path = %self.path.display(), "managing etcd users from the users file");
        let mut applied: Option<String> = None;
        let mut retry = Backoff::new(poll, MAX_RETRY).start();
        loop {
            let current = tokio::fs::read_to_string(&self.path).await.ok();
            if current.is_none() || current != applied {
                let synced = self.sync().await;
                self.runs.record(USERS_MANAGEMENT, synced.is_ok());
                match synced {
                    Ok(()) => {
                        applied = current;
                        retry.reset();
                    }
                    Err(error) => {
                        let delay = retry.next_delay();
                        tracing::warn!(error = %crate::error_chain(&error), retry_in = ?delay, "syncing etcd users failed");
                        applied = None;
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl UserAdmin for Arc<Recorder> {
        async fn enforce_presence(&self, user: &str, role: &str) -> Result<(), UsersError> {
            self.0.lock().push(format!("+{user}:{role}"));
            Ok(())
        }
        async fn enforce_absence(&self, user: &str) -> Result<(), UsersError> {
            self.0.lock().push(format!("-{user}"));
            Ok(())
        }
    }

    fn file(text: &str) -> UsersFile {
        UsersFile::parse(text, "users.yaml").expect("parses")
    }

    #[test]
    fn the_chart_rendered_file_parses() {
        let parsed = file("users:\n- name: remote-cluster2\n  role: remote\n- name: remote-cluster3\n  role: remote\n");
        assert_eq!(parsed.users.len(), 2);
        assert_eq!(parsed.users[1], UserEntry { name: "remote-cluster3".into(), role: "remote".into() });
        assert_eq!(file(""), UsersFile::default());
        assert_eq!(file("users: []\n"), UsersFile::default());
        assert_eq!(file("users:\n"), UsersFile::default());
    }

    #[tokio::test]
    async fn users_are_configured_once_changed_on_role_and_removed_only_when_managed() {
        let log = Arc::new(Recorder::default());
        let mut manager = UsersManager::new(Arc::clone(&log), "users.yaml".into(), "cluster1".into());
        let two = file(
            "users:\n- {name: remote-c2, role: remote}\n- {name: cluster1, role: remote}\n- {name: remote-c3, role: remote}\n",
        );
        manager.apply(&two).await.unwrap();
        manager.apply(&two).await.unwrap();
        assert_eq!(*log.0.lock(), ["+remote-c2:remote", "+remote-c3:remote"], "own name skipped, no repeats");

        log.0.lock().clear();
        manager.apply(&file("users:\n- {name: remote-c2, role: reader}\n")).await.unwrap();
        assert_eq!(*log.0.lock(), ["+remote-c2:reader", "-remote-c3"]);
    }
}
