//! Reading and checking a remote cluster's `cilium/cluster-config/<C>` (required since Cilium
//! 1.16; `pkg/clustermesh/common/remote_cluster.go`, `getClusterConfig`;
//! `pkg/clustermesh/types/option.go`, `ValidateRemoteConfig`; `pkg/clustermesh/common/idsmgr.go`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connect::{self, Connection};
use crate::options::LocalCluster;
use crate::wire::{ClusterConfig, ClusterId, ClusterName, InvalidClusterId, cluster_config_key};

/// Why a remote cluster's config was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing, unreadable or not JSON for the whole retrieval window. Usually a wrong cluster
    /// name (the file name must be the remote's `--cluster-name`), or KVStoreMesh not connected
    /// to that cluster.
    #[error("failed to retrieve cluster configuration {key}: {last}")]
    NotRetrieved { key: String, last: String },
    #[error(transparent)]
    Connection(#[from] connect::Error),
    #[error(transparent)]
    InvalidId(#[from] InvalidClusterId),
    #[error("mismatched MaxConnectedClusters; local={local}, remote={remote}")]
    MaxConnectedClusters { local: u32, remote: u32 },
    #[error("clusterID {0} is assigned to the local cluster")]
    LocalId(ClusterId),
    #[error("clusterID {id} is already used by cluster {holder}")]
    DuplicateId { id: ClusterId, holder: ClusterName },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads `cilium/cluster-config/<cluster>`, retrying a missing, unreadable or undecodable value
/// with a linearly growing interval (capped at 30 s) until the configured timeout (Cilium:
/// 3 minutes). Returns `Ok(None)` when cancelled. A changed etcd cluster ID ends the attempt.
pub(crate) async fn retrieve(
    connection: &Connection,
    cluster: &ClusterName,
    token: &CancellationToken,
) -> Result<Option<ClusterConfig>> {
    let key = cluster_config_key(cluster);
    let options = &connection.options;
    let deadline = Instant::now() + options.cluster_config_timeout;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let last = match connection.get(&key).await {
            Ok(Some(value)) => match ClusterConfig::decode(&value) {
                Ok(config) => return Ok(Some(config)),
                Err(error) => format!("invalid value: {error}"),
            },
            Ok(None) => "cluster configuration expected to be present but not found".to_string(),
            Err(error) if error.is_fatal() => return Err(error.into()),
            Err(error) => error.to_string(),
        };
        let delay = options.cluster_config_retry.saturating_mul(attempt).min(Duration::from_secs(30));
        if Instant::now() + delay > deadline {
            return Err(Error::NotRetrieved { key, last });
        }
        tracing::debug!(%key, attempt, reason = %last, "cluster configuration not retrieved yet, retrying");
        tokio::select! {
            () = token.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Follows `cilium/cluster-config/<cluster>` for the rest of a session: returns the new config
/// once the stored one decodes to anything other than `current` (`Ok(None)` when cancelled).
///
/// Cilium reads the config once per connection (cilium/cilium#37701): a remote that enables
/// service exports or KVStoreMesh, or changes its ID, during an upgrade is read with the old
/// config until something else breaks the connection. Deletes and undecodable values are not
/// a config: the remote's apiserver restores its own key.
pub(crate) async fn follow(
    connection: &Connection,
    cluster: &ClusterName,
    current: &ClusterConfig,
    token: &CancellationToken,
) -> connect::Result<Option<ClusterConfig>> {
    let key = cluster_config_key(cluster);
    let changed = token.child_token();
    let mut sink = Follower { key: &key, current, changed: &changed, new: None };
    crate::cache::list_and_watch_range(connection, &key, &[], &changed, &mut sink).await?;
    Ok(sink.new)
}

struct Follower<'a> {
    key: &'a str,
    current: &'a ClusterConfig,
    /// Cancelled once a different config is seen, which ends the watch.
    changed: &'a CancellationToken,
    new: Option<ClusterConfig>,
}

impl crate::cache::Sink for Follower<'_> {
    fn upsert(&mut self, key: &str, value: &[u8]) {
        if key != self.key || self.new.is_some() {
            return;
        }
        match ClusterConfig::decode(value) {
            Ok(config) if config != *self.current => {
                tracing::info!(key, from = ?self.current, to = ?config, "the remote cluster's configuration changed");
                self.new = Some(config);
                self.changed.cancel();
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(key, %error, "ignoring an undecodable cluster configuration"),
        }
    }

    fn delete(&mut self, _key: &str) {}
}

/// `ValidateRemoteConfig`: the ID in `1..=max`, and, when the local cluster runs with more than
/// 255 clusters, the same `maxConnectedClusters` on both sides.
pub fn validate(config: &ClusterConfig, local: &LocalCluster) -> Result<()> {
    local.max_connected_clusters.check(config.id)?;
    let local_max = local.max_connected_clusters.get();
    if local_max != 255 && config.capabilities.max_connected_clusters != local_max {
        return Err(Error::MaxConnectedClusters {
            local: local_max,
            remote: config.capabilities.max_connected_clusters,
        });
    }
    Ok(())
}

/// The cluster IDs in use by connected remote clusters: two remotes with the same ID, or a
/// remote with the local cluster's ID, would mix up identities.
#[derive(Debug, Clone, Default)]
pub struct ClusterIds {
    local: ClusterId,
    used: Arc<Mutex<BTreeMap<ClusterId, ClusterName>>>,
}

impl ClusterIds {
    pub fn new(local: ClusterId) -> Self {
        Self { local, used: Arc::default() }
    }

    /// Reserves `id` for `cluster` (idempotent for the same cluster).
    pub fn reserve(&self, id: ClusterId, cluster: &ClusterName) -> Result<()> {
        if id == ClusterId::UNSET {
            return Err(InvalidClusterId::Reserved.into());
        }
        if id == self.local {
            return Err(Error::LocalId(id));
        }
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        match used.get(&id) {
            Some(holder) if holder != cluster => Err(Error::DuplicateId { id, holder: holder.clone() }),
            _ => {
                used.insert(id, cluster.clone());
                Ok(())
            }
        }
    }

    /// Releases `id` if `cluster` holds it.
    pub fn release(&self, id: ClusterId, cluster: &ClusterName) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if used.get(&id) == Some(cluster) {
            used.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Capabilities, MaxConnectedClusters};

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn config(id: u32, max: u32) -> ClusterConfig {
        ClusterConfig {
            id: ClusterId(id),
            capabilities: Capabilities { max_connected_clusters: max, ..Capabilities::default() },
        }
    }

    #[test]
    fn remote_configs_are_validated_like_cilium_does() {
        let local = LocalCluster::new(name("local"), ClusterId(1));
        assert!(validate(&config(2, 255), &local).is_ok());
        assert!(validate(&config(2, 0), &local).is_ok(), "a 1.14 config without the field is fine with 255");
        assert!(validate(&config(2, 511), &local).is_ok(), "only an extended local mesh compares");
        assert!(matches!(validate(&config(0, 255), &local), Err(Error::InvalidId(InvalidClusterId::Reserved))));
        assert!(matches!(validate(&config(256, 255), &local), Err(Error::InvalidId(_))));

        let extended = local.with_max_connected_clusters(MaxConnectedClusters::EXTENDED);
        assert!(validate(&config(300, 511), &extended).is_ok());
        assert!(matches!(
            validate(&config(2, 255), &extended),
            Err(Error::MaxConnectedClusters { local: 511, remote: 255 })
        ));
    }

    #[test]
    fn an_id_is_reserved_by_one_cluster_at_a_time() {
        let ids = ClusterIds::new(ClusterId(1));
        assert!(matches!(ids.reserve(ClusterId(1), &name("a")), Err(Error::LocalId(_))));
        assert!(matches!(ids.reserve(ClusterId(0), &name("a")), Err(Error::InvalidId(_))));
        ids.reserve(ClusterId(2), &name("a")).unwrap();
        ids.reserve(ClusterId(2), &name("a")).unwrap();
        let error = ids.reserve(ClusterId(2), &name("b")).unwrap_err();
        assert_eq!(error.to_string(), "clusterID 2 is already used by cluster a");
        ids.release(ClusterId(2), &name("b"));
        assert!(ids.reserve(ClusterId(2), &name("b")).is_err(), "only the holder releases");
        ids.release(ClusterId(2), &name("a"));
        ids.reserve(ClusterId(2), &name("b")).unwrap();
    }
}
