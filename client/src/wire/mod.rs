//! Cilium's key layout and value encodings: the contract between a clustermesh-apiserver (or
//! KVStoreMesh) and the agents that read it (`cilium-wire-format.md` §2-§3, §8.3).
//!
//! Everything here is pure: keys are composed and values decoded and checked without IO, so the
//! acceptance rules are unit-tested against the shared test vectors.

mod cluster_config;
mod go;
mod identity;
mod ipcache;
mod node;
mod service;
mod serviceexport;

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

pub use cluster_config::{Capabilities, ClusterConfig};
pub use go::IpNet;
pub use identity::{Identity, Label, Labels};
pub use ipcache::{IpCacheEntry, NamedPort};
pub use node::{Node, NodeAddress};
pub use service::{BackendZone, ClusterService, L4Addr, PortConfiguration, ZoneHint};
pub use serviceexport::{ServiceExport, ServiceExportPort};

/// The name of a cluster, as Cilium spells it in keys, values and config file names.
///
/// Checked with Cilium's rule (enforced since 1.17): at most 32 characters of `[a-z0-9-]`,
/// starting and ending with a letter or digit (`pkg/clustermesh/types/option.go`,
/// `ValidateClusterName`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ClusterName(String);

/// Why a cluster name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster name {name:?}: {reason}")]
pub struct InvalidClusterName {
    pub name: String,
    pub reason: &'static str,
}

impl ClusterName {
    /// Cilium's limit on the length of a cluster name.
    pub const MAX_LEN: usize = 32;

    pub fn new(name: impl Into<String>) -> Result<Self, InvalidClusterName> {
        let name = name.into();
        let refuse = |reason| Err(InvalidClusterName { name: name.clone(), reason });
        if name.is_empty() {
            return refuse("empty");
        }
        if name.len() > Self::MAX_LEN {
            return refuse("longer than 32 characters");
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return refuse("only lower case letters, digits and '-' are allowed");
        }
        if name.starts_with('-') || name.ends_with('-') {
            return refuse("must start and end with a letter or digit");
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClusterName {
    type Err = InvalidClusterName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ClusterName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ClusterName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A cluster ID. `0` means "unset" (Cilium's `ClusterIDUnset`); a remote cluster must have one
/// in `1..=max` (see [`MaxConnectedClusters::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterId(pub u32);

impl ClusterId {
    pub const UNSET: ClusterId = ClusterId(0);

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A numeric security identity (24 bits in use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NumericIdentity(pub u32);

impl NumericIdentity {
    /// Cilium's `ReservedIdentityHost`.
    pub const HOST: NumericIdentity = NumericIdentity(1);
    /// Cilium's `ReservedIdentityRemoteNode`.
    pub const REMOTE_NODE: NumericIdentity = NumericIdentity(6);
    /// Cilium's `MinimalNumericIdentity`: identities below are reserved and not cluster-scoped.
    pub const MINIMAL_GLOBAL: NumericIdentity = NumericIdentity(256);

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `max-connected-clusters`: 255 (the default) or 511. It decides the valid cluster IDs and how
/// the 24-bit identity space is split between cluster ID and local identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MaxConnectedClusters(u32);

/// A `max-connected-clusters` value Cilium does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("max-connected-clusters must be 255 or 511, not {0}")]
pub struct InvalidMaxConnectedClusters(pub u32);

/// A cluster ID outside `1..=max`, in Cilium's words (`ValidateClusterID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidClusterId {
    #[error("ClusterID 0 is reserved")]
    Reserved,
    #[error("ClusterID > {max} is not supported")]
    TooLarge { id: u32, max: u32 },
}

impl MaxConnectedClusters {
    /// Cilium's default (`defaults.MaxConnectedClusters`).
    pub const DEFAULT: MaxConnectedClusters = MaxConnectedClusters(255);
    /// The extended mode (Cilium 1.15+).
    pub const EXTENDED: MaxConnectedClusters = MaxConnectedClusters(511);

    pub fn new(value: u32) -> Result<Self, InvalidMaxConnectedClusters> {
        match value {
            255 | 511 => Ok(Self(value)),
            other => Err(InvalidMaxConnectedClusters(other)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// Bits of local identity under the cluster ID (`GetClusterIDShift`): 16 with 255 clusters,
    /// 15 with 511.
    pub fn cluster_id_shift(self) -> u32 {
        if self.0 == 511 { 15 } else { 16 }
    }

    /// `ValidateClusterID`: 0 is reserved, anything above the maximum is unsupported.
    pub fn check(self, id: ClusterId) -> Result<(), InvalidClusterId> {
        match id.0 {
            0 => Err(InvalidClusterId::Reserved),
            id if id > self.0 => Err(InvalidClusterId::TooLarge { id, max: self.0 }),
            _ => Ok(()),
        }
    }

    /// The identities a cluster may allocate (`GetMinimalAllocationIdentity` ..=
    /// `GetMaximumAllocationIdentity`): `[id << shift, ((id + 1) << shift) - 1]`.
    pub fn identity_range(self, id: ClusterId) -> RangeInclusive<u32> {
        let shift = self.cluster_id_shift();
        let start = id.0 << shift;
        start..=start + ((1 << shift) - 1)
    }
}

impl Default for MaxConnectedClusters {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The kinds of entries a remote cluster publishes and this crate caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Nodes,
    Services,
    Identities,
    /// IP → identity entries (Cilium's status calls them "endpoints").
    #[serde(rename = "ipcache")]
    IpCache,
    ServiceExports,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Nodes, Kind::Services, Kind::Identities, Kind::IpCache, Kind::ServiceExports];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Nodes => "nodes",
            Kind::Services => "services",
            Kind::Identities => "identities",
            Kind::IpCache => "ipcache",
            Kind::ServiceExports => "service-exports",
        }
    }

    /// The `<kind>/v1` path segment shared by the state and cache layouts.
    fn segment(self) -> &'static str {
        let state = match self {
            Kind::Nodes => NODES_PREFIX,
            Kind::Services => SERVICES_PREFIX,
            Kind::Identities => IDENTITIES_PREFIX,
            Kind::IpCache => IPCACHE_PREFIX,
            Kind::ServiceExports => SERVICE_EXPORTS_PREFIX,
        };
        &state_canary_name(state)[STATE_PREFIX.len() + 1..]
    }

    /// The prefix watched for `cluster`, with the trailing `/` Cilium's watch store always adds
    /// (so that `cluster1` never matches `cluster10`).
    ///
    /// Stable wire contract (`cilium-wire-format.md` §2.1-§2.2): in the state layout identities
    /// and ipcache carry no cluster segment; in the cache layout (`cached` capability) every kind
    /// has one, with two irregular shapes: identities at `<C>/id`, ipcache at `<C>` in place of
    /// `default`.
    pub fn watch_prefix(self, cluster: &ClusterName, cached: bool) -> String {
        let base = if cached { CACHE_PREFIX } else { STATE_PREFIX };
        let segment = self.segment();
        match (self, cached) {
            (Kind::Identities, false) => format!("{base}/{segment}/id/"),
            (Kind::Identities, true) => format!("{base}/{segment}/{cluster}/id/"),
            (Kind::IpCache, false) => format!("{base}/{segment}/default/"),
            _ => format!("{base}/{segment}/{cluster}/"),
        }
    }

    /// The name this kind's watcher is registered under, i.e. what follows
    /// `cilium/synced/<C>/` in its canary key (`pkg/clustermesh/remote_cluster.go`, `Run`).
    pub fn canary_name(self, cached: bool) -> String {
        let base = if cached { CACHE_PREFIX } else { STATE_PREFIX };
        format!("{base}/{}", self.segment())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `kvstore.StatePrefix`.
pub const STATE_PREFIX: &str = "cilium/state";
/// `kvstore.CachePrefix`.
pub const CACHE_PREFIX: &str = "cilium/cache";
/// `kvstore.HeartbeatPath`: rewritten every minute by the writer; only its events matter.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// `cilium/cluster-config/<C>`: how cluster `<C>` describes itself.
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config";
/// `cilium/synced/<C>/<canary name>`: one canary per prefix, written after its initial sync.
pub const SYNCED_PREFIX: &str = "cilium/synced";

// The state layout, as the apiserver writes it. Keys are `<prefix>/<suffix>`; the prefixes carry
// no trailing slash, so list `<prefix>/` to avoid matching siblings such as `.../v10`.

/// `cilium/state/nodes/v1/<cluster>/<node>`.
pub const NODES_PREFIX: &str = "cilium/state/nodes/v1";
/// `cilium/state/identities/v1/id/<numeric id>`; no cluster segment (one cluster per store).
pub const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1/id";
/// `cilium/state/ip/v1/default/<ip>`; `default` is Cilium's only address space.
pub const IPCACHE_PREFIX: &str = "cilium/state/ip/v1/default";
/// `cilium/state/services/v1/<cluster>/<namespace>/<service>`.
pub const SERVICES_PREFIX: &str = "cilium/state/services/v1";
/// `cilium/state/serviceexports/v1/<cluster>/<namespace>/<service>` (MCS-API, Cilium 1.17+).
pub const SERVICE_EXPORTS_PREFIX: &str = "cilium/state/serviceexports/v1";
/// `cilium/state/endpointslices/v1/<cluster>/<namespace>/<slice>` (Cilium 1.20+; written, not
/// read by this crate).
pub const ENDPOINT_SLICES_PREFIX: &str = "cilium/state/endpointslices/v1";

/// `cilium/cluster-config/<C>`.
pub fn cluster_config_key(cluster: impl AsRef<str>) -> String {
    format!("{CLUSTER_CONFIG_PREFIX}/{}", cluster.as_ref())
}

/// `cilium/synced/<C>/`: the canaries of every prefix of `cluster`.
pub fn canary_prefix(cluster: impl AsRef<str>) -> String {
    format!("{SYNCED_PREFIX}/{}/", cluster.as_ref())
}

/// The name a writer's canary for the state `prefix` carries: agents register their watchers
/// under the parent prefix for identities and ipcache, so those two are overridden.
pub fn state_canary_name(prefix: &str) -> &str {
    match prefix {
        IDENTITIES_PREFIX => IDENTITIES_PREFIX.trim_end_matches("/id"),
        IPCACHE_PREFIX => IPCACHE_PREFIX.trim_end_matches("/default"),
        other => other,
    }
}

/// The first key after every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// What an entry is checked against: the remote cluster as configured locally (its file name)
/// and as it describes itself (its cluster config), plus the local cluster's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// The remote cluster's name: the config file name.
    pub cluster: ClusterName,
    /// The `id` of the remote cluster's config.
    pub cluster_id: ClusterId,
    /// The local cluster's ID (services carrying it skip the ID-range check, as in Cilium).
    pub local_cluster_id: ClusterId,
    /// The local `max-connected-clusters`: valid IDs and identity ranges follow from it.
    pub max_connected_clusters: MaxConnectedClusters,
}

impl Validation {
    /// The identities the remote cluster may allocate.
    pub fn identity_range(&self) -> RangeInclusive<u32> {
        self.max_connected_clusters.identity_range(self.cluster_id)
    }
}

/// Why an entry read from a remote cluster was refused (logged, counted, never cached).
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("value is not valid JSON for this kind: {0}")]
    Json(#[from] serde_json::Error),
    #[error("value is not UTF-8")]
    NotUtf8,
    #[error("{0} is unset")]
    Unset(&'static str),
    #[error("unexpected cluster name: got {got}, expected {expected}")]
    ClusterName { got: String, expected: String },
    #[error("{what} does not match key: got {got}, expected {key}")]
    KeyMismatch { what: &'static str, got: String, key: String },
    #[error("unexpected cluster ID: got {got}, expected {expected}")]
    ClusterId { got: u32, expected: u32 },
    #[error(transparent)]
    InvalidClusterId(#[from] InvalidClusterId),
    #[error("ID {id} does not belong to the allocation range of cluster ID {cluster_id}")]
    IdentityOutOfRange { id: u64, cluster_id: u32 },
    #[error("identity key {0:?} is not a decimal number")]
    IdentityKey(String),
    #[error("identity labels lack k8s:io.cilium.k8s.policy.cluster={expected}")]
    ClusterLabel { expected: String },
    #[error("{field} is not a valid IP address: {value:?}")]
    Ip { field: &'static str, value: String },
    #[error("{field} is unknown: {value:?}")]
    Enum { field: &'static str, value: String },
}

/// A value type read from a remote cluster: how to decode it and which of Cilium's acceptance
/// rules it must pass.
pub trait Entry: Clone + PartialEq + fmt::Debug + Serialize + Send + Sync + 'static {
    const KIND: Kind;

    /// Decodes and checks one value. `key` is what follows the watched prefix (e.g. the node
    /// name, `<namespace>/<name>`, the numeric identity or the IP).
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected>;
}

/// Any cached entry, for consumers that follow every kind at once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AnyEntry {
    Node(std::sync::Arc<Node>),
    Service(std::sync::Arc<ClusterService>),
    Identity(std::sync::Arc<Identity>),
    IpCache(std::sync::Arc<IpCacheEntry>),
    ServiceExport(std::sync::Arc<ServiceExport>),
}

/// Turns a typed entry into an [`AnyEntry`]; implemented for every [`Entry`] type.
pub trait IntoAny: Entry {
    fn into_any(value: std::sync::Arc<Self>) -> AnyEntry;
}

macro_rules! into_any {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl IntoAny for $ty {
            fn into_any(value: std::sync::Arc<Self>) -> AnyEntry {
                AnyEntry::$variant(value)
            }
        })*
    };
}

into_any!(Node => Node, ClusterService => Service, Identity => Identity, IpCacheEntry => IpCache, ServiceExport => ServiceExport);

/// `check(cond, || error)` in one line, for the validators.
fn ensure(condition: bool, error: impl FnOnce() -> Rejected) -> Result<(), Rejected> {
    if condition { Ok(()) } else { Err(error()) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    pub fn validation(cluster: &str, id: u32) -> Validation {
        Validation {
            cluster: name(cluster),
            cluster_id: ClusterId(id),
            local_cluster_id: ClusterId(99),
            max_connected_clusters: MaxConnectedClusters::DEFAULT,
        }
    }

    #[test]
    fn cluster_names_follow_ciliums_rule() {
        for good in ["cluster1", "a", "eu-west-1", "0abc", &"x".repeat(32)] {
            assert!(ClusterName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "Cluster1", "-a", "a-", "a_b", "a.b", &"x".repeat(33), "a/b"] {
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_ids_are_checked_against_max_connected_clusters() {
        let default = MaxConnectedClusters::DEFAULT;
        assert_eq!(default.check(ClusterId(0)), Err(InvalidClusterId::Reserved));
        assert!(default.check(ClusterId(1)).is_ok());
        assert!(default.check(ClusterId(255)).is_ok());
        assert_eq!(default.check(ClusterId(256)), Err(InvalidClusterId::TooLarge { id: 256, max: 255 }));
        assert!(MaxConnectedClusters::EXTENDED.check(ClusterId(511)).is_ok());
        assert!(MaxConnectedClusters::new(300).is_err());
    }

    #[test]
    fn identity_ranges_split_24_bits_by_max_connected_clusters() {
        assert_eq!(MaxConnectedClusters::DEFAULT.identity_range(ClusterId(1)), 65536..=131071);
        assert_eq!(MaxConnectedClusters::DEFAULT.identity_range(ClusterId(2)), 131072..=196607);
        assert_eq!(MaxConnectedClusters::DEFAULT.identity_range(ClusterId(255)), 16711680..=16777215);
        assert_eq!(MaxConnectedClusters::EXTENDED.identity_range(ClusterId(1)), 32768..=65535);
        assert_eq!(MaxConnectedClusters::EXTENDED.identity_range(ClusterId(511)), 16744448..=16777215);
    }

    #[test]
    fn prefixes_follow_the_state_and_cache_layouts() {
        let c = name("cluster2");
        let cases = [
            (Kind::Nodes, false, "cilium/state/nodes/v1/cluster2/", "cilium/state/nodes/v1"),
            (Kind::Services, false, "cilium/state/services/v1/cluster2/", "cilium/state/services/v1"),
            (Kind::ServiceExports, false, "cilium/state/serviceexports/v1/cluster2/", "cilium/state/serviceexports/v1"),
            (Kind::Identities, false, "cilium/state/identities/v1/id/", "cilium/state/identities/v1"),
            (Kind::IpCache, false, "cilium/state/ip/v1/default/", "cilium/state/ip/v1"),
            (Kind::Nodes, true, "cilium/cache/nodes/v1/cluster2/", "cilium/cache/nodes/v1"),
            (Kind::Services, true, "cilium/cache/services/v1/cluster2/", "cilium/cache/services/v1"),
            (Kind::ServiceExports, true, "cilium/cache/serviceexports/v1/cluster2/", "cilium/cache/serviceexports/v1"),
            (Kind::Identities, true, "cilium/cache/identities/v1/cluster2/id/", "cilium/cache/identities/v1"),
            (Kind::IpCache, true, "cilium/cache/ip/v1/cluster2/", "cilium/cache/ip/v1"),
        ];
        for (kind, cached, prefix, canary) in cases {
            assert_eq!(kind.watch_prefix(&c, cached), prefix, "{kind} cached={cached}");
            assert_eq!(kind.canary_name(cached), canary, "{kind} cached={cached}");
        }
        assert_eq!(canary_prefix(&c), "cilium/synced/cluster2/");
        assert_eq!(cluster_config_key(&c), "cilium/cluster-config/cluster2");
    }

    #[test]
    fn kinds_serialise_as_they_print() {
        for kind in Kind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn prefix_range_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_range_end(b"cilium/state/"), b"cilium/state0");
        assert_eq!(prefix_range_end(b"cilium/.heartbeat"), b"cilium/.heartbeau");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff"), b"\0");
    }
}

/// Every value of the shared test vectors (`cilium-test-vectors.json`) decodes and passes the
/// acceptance rules when read from the cluster its key names (state and cache layouts).
#[cfg(test)]
mod vectors {
    use super::tests::validation;
    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/cilium-test-vectors.json");

    /// The cluster a vector belongs to: from its key, or (identities, ipcache in the state
    /// layout) from its identity, whose top bits are the cluster ID.
    fn cluster_of(kind: Kind, key: &str, value: &str) -> (String, u32) {
        let from_name = |name: &str| {
            let id = name.trim_start_matches("cluster").parse().unwrap();
            (name.to_string(), id)
        };
        let parts: Vec<&str> = key.split('/').collect();
        match (kind, parts[1]) {
            (Kind::Identities, "state") => from_name(&format!("cluster{}", parts[5].parse::<u32>().unwrap() >> 16)),
            (Kind::IpCache, "state") => {
                let id = serde_json::from_str::<serde_json::Value>(value).unwrap()["ID"].as_u64().unwrap();
                from_name(&format!("cluster{}", id >> 16))
            }
            _ => from_name(parts[4]),
        }
    }

    fn check<T: Entry>(kind: Kind, key: &str, value: &str) -> Result<T, Rejected> {
        let (cluster, id) = cluster_of(kind, key, value);
        let cached = key.starts_with("cilium/cache/");
        let prefix = kind.watch_prefix(&ClusterName::new(&cluster).unwrap(), cached);
        let suffix = key.strip_prefix(&prefix).unwrap_or_else(|| panic!("{key} is not under {prefix}"));
        T::decode(suffix, value.as_bytes(), &validation(&cluster, id))
    }

    #[test]
    fn every_test_vector_decodes_and_is_accepted() {
        let text = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("read {VECTORS}: {e}"));
        let vectors: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let mut checked = std::collections::BTreeMap::<String, usize>::new();
        for vector in &vectors {
            let kind = vector["kind"].as_str().unwrap();
            let key = vector["key"].as_str().unwrap();
            let value = vector["value"].as_str().unwrap_or_default();
            let outcome = match kind.trim_start_matches("cache-") {
                "node" => check::<Node>(Kind::Nodes, key, value).map(|_| ()),
                "identity" => check::<Identity>(Kind::Identities, key, value).map(|_| ()),
                "ipcache" => check::<IpCacheEntry>(Kind::IpCache, key, value).map(|_| ()),
                "service" => check::<ClusterService>(Kind::Services, key, value).map(|_| ()),
                "serviceexport" => check::<ServiceExport>(Kind::ServiceExports, key, value).map(|_| ()),
                "cluster-config" => ClusterConfig::decode(value.as_bytes()).map(|config| {
                    let name = key.trim_start_matches("cilium/cluster-config/cluster");
                    assert_eq!(config.id.0.to_string(), name, "{key}");
                    if kind.starts_with("cache-") {
                        assert!(config.capabilities.cached && config.capabilities.synced_canaries, "{key}");
                    }
                }),
                _ => continue,
            };
            if let Err(error) = outcome {
                panic!("{kind} {key} rejected: {error}\n{value}");
            }
            *checked.entry(kind.to_string()).or_default() += 1;
        }
        for kind in ["node", "identity", "ipcache", "service", "serviceexport", "cluster-config"] {
            assert!(checked.get(kind).is_some_and(|n| *n >= 3), "{kind}: {checked:?}");
            let cached = format!("cache-{kind}");
            assert!(checked.get(&cached).is_some_and(|n| *n >= 2), "{cached}: {checked:?}");
        }
    }

    #[test]
    fn test_vectors_read_from_the_wrong_cluster_are_rejected() {
        let text = std::fs::read_to_string(VECTORS).unwrap();
        let vectors: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let wrong = validation("cluster8", 8);
        for vector in &vectors {
            let key = vector["key"].as_str().unwrap();
            let value = vector["value"].as_str().unwrap_or_default().as_bytes();
            let suffix = key.rsplit('/').next().unwrap();
            let rejected = match vector["kind"].as_str().unwrap() {
                "node" => Node::decode(suffix, value, &wrong).is_err(),
                "identity" => Identity::decode(suffix, value, &wrong).is_err(),
                "ipcache" => IpCacheEntry::decode(suffix, value, &wrong).is_err(),
                _ => continue,
            };
            assert!(rejected, "{key} accepted from cluster8");
        }
    }
}
