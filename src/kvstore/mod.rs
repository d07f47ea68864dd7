//! Where the mirror writes: the embedded store in-process, or an attached etcd. One trait,
//! so that everything above it is the same in both modes.
//!
//! Everything above this module holds the backend as one `Arc<dyn Backend>`: the trait is
//! object-safe (its methods return boxed futures), so the choice of store, and the wrappers
//! composed around it ([`instrumented`], [`limited`]), are made once where the process starts
//! instead of as a type parameter threaded through every role. An enum of the stores would
//! avoid the box, but it closes the set: the wrappers nest in any order and tests bring stores
//! of their own. The price is one small allocation per call per layer, next to a write that
//! already allocates its key and value, or a network round trip.

pub mod embedded;
pub mod etcd;
pub mod instrumented;
pub mod limited;
pub mod quorum;

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::blob::Blob;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lease expired or was revoked: every key written with it is gone, and the writer
    /// must take a new lease and write everything again.
    #[error("lease {0:x} is gone")]
    LeaseLost(i64),
    #[error("embedded store refused the request")]
    Embedded(#[source] crate::etcd::Error),
    #[error("etcd request failed")]
    Etcd(#[source] etcd_client::Error),
    #[error("etcd client configuration {path}: {reason}")]
    Config { path: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The operations the mirror needs from an etcd v3 store. Keys are Cilium's UTF-8 paths.
pub trait Backend: Send + Sync + 'static {
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>>;
    /// Renews the lease; [`Error::LeaseLost`] when it no longer exists.
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>>;
    /// Writes the key with the lease attached (0 for none); [`Error::LeaseLost`] when the
    /// lease no longer exists.
    /// The value is a [`Blob`]: the embedded store keeps the writer's allocation.
    fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>>;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
    /// The keys under `prefix` now (for pruning what no object wants after a restart).
    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>>;
    /// The keys under `prefix` now with their values and leases: what a restarted writer finds
    /// in a store that kept its data (a warm store, an attached etcd), so that it writes only
    /// what differs and keeps the leases it finds.
    fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Entry>>>;
}

/// A key as found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    /// 0 for none.
    pub lease: i64,
}
