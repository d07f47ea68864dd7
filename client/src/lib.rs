//! What a Cilium agent does to follow remote clusters, as a Rust library: read the clustermesh
//! configuration directory, connect to each remote cluster's clustermesh-apiserver (or
//! KVStoreMesh) over mutual TLS, check its cluster config, wait for its sync canaries and keep
//! typed caches of its nodes, identities, IP → identity entries, global services and MCS-API
//! service exports, applying Cilium's acceptance rules.
//!
//! ```no_run
//! use clustermesh_client::{ClientOptions, ClusterId, ClusterMesh, ClusterName, LocalCluster};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let local = LocalCluster::new(ClusterName::new("cluster1")?, ClusterId(1));
//! let shutdown = CancellationToken::new();
//! // One file per remote cluster, named after it, as Cilium's Helm chart mounts them.
//! let mesh = ClusterMesh::start("/var/lib/cilium/clustermesh", ClientOptions::new(local), &shutdown).await?;
//! let mut events = mesh.events();
//! mesh.wait_ready().await;
//! for remote in mesh.remotes() {
//!     for (name, node) in remote.nodes().snapshot() {
//!         println!("{}: node {name} with {} addresses", remote.name(), node.ip_addresses.len());
//!     }
//!     println!("{}", serde_json::to_string(&remote.status())?);
//! }
//! // One change at a time, from every remote cluster.
//! while let Ok(event) = events.recv().await {
//!     println!("{}", serde_json::to_string(&event)?);
//! }
//! mesh.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Raw mode ([`RemoteCluster::start_raw`], [`ClusterMesh::start_raw`]) runs the same sessions but
//! hands every entry to a [`raw::RawSink`] as the bytes the remote stores, undecoded: what KVStoreMesh
//! needs to copy a cluster byte for byte.
//!
//! The pure parts work without a connection: decoding and checking what a remote publishes,
//! and choosing the backends of a global service.
//!
//! ```
//! use clustermesh_client::global_services::{Backend, GlobalServiceSettings, remote_backends, select_backends};
//! use clustermesh_client::wire::{ClusterService, Entry, L4Addr, Validation};
//! use clustermesh_client::{ClusterId, ClusterName, MaxConnectedClusters};
//!
//! let validation = Validation {
//!     cluster: ClusterName::new("cluster2").unwrap(),
//!     cluster_id: ClusterId(2),
//!     local_cluster_id: ClusterId(1),
//!     max_connected_clusters: MaxConnectedClusters::DEFAULT,
//! };
//! let value = r#"{"cluster":"cluster2","namespace":"shop","name":"db","frontends":{},"backends":{"10.2.0.7":{"pg":{"Protocol":"TCP","Port":5432}}},"labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":2}"#;
//! let remote = ClusterService::decode("shop/db", value.as_bytes(), &validation).unwrap();
//! // Another cluster's name in the value is refused, as Cilium refuses it.
//! let foreign = value.replace("cluster2", "cluster3");
//! assert!(ClusterService::decode("shop/db", foreign.as_bytes(), &validation).is_err());
//!
//! let annotations = [("service.cilium.io/global".to_string(), "true".to_string())].into();
//! let settings = GlobalServiceSettings::from_annotations(&annotations);
//! let local = [Backend::local("10.1.0.4".parse().unwrap(), L4Addr { protocol: "TCP".into(), port: 5432 }, ["pg"])];
//! let selected = select_backends(&settings, &local, &remote_backends("shop", "db", [&remote]));
//! assert_eq!(selected.len(), 2);
//! ```
//!
//! Data flow for one remote cluster ([`RemoteCluster`]), one session per etcd connection:
//!
//! ```text
//!  config file ──► connect (mTLS) ──► heartbeat list ─► connected ──► watchdog (no heartbeat: reconnect)
//!                                         │
//!                        cilium/cluster-config/<C> (retry ≤ 3 min, validate, reserve ID)
//!                                         │
//!                  cilium/synced/<C>/ ──► canary seen ──► per prefix: list (pages, pinned revision)
//!                                                              │        mark stale … delete stale
//!                                                              ▼
//!                                              watch from revision + 1 ──► Cache<T> ──► snapshot,
//!                                              (compacted: relist)                      changes, events
//! ```
//!
//! Every response must come from the etcd cluster the connection first answered from: another
//! `cluster_id` in a response header (a restarted server, a switching load balancer) ends the
//! session, and the next one relists everything, deleting what is gone.

pub mod cache;
mod canaries;
pub mod cluster_config;
pub mod config;
pub mod connect;
pub mod display;
pub mod global_services;
mod heartbeat;
mod mesh;
mod options;
pub mod raw;
pub mod remote;
mod retry;
pub mod wire;

pub use cache::{Cache, CacheStatus, Change, Event, Op};
pub use cluster_config::ClusterIds;
pub use heartbeat::HeartbeatTimeout;
pub use mesh::{ClusterMesh, MeshStatus};
pub use options::{ClientOptions, LocalCluster};
pub use remote::{Caches, ConfigStatus, Failure, Phase, RemoteCluster, RemoteStatus, SessionError};
pub use retry::{Backoff, Retry};
pub use wire::{ClusterId, ClusterName, Kind, MaxConnectedClusters, NumericIdentity};
