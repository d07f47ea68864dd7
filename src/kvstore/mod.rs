//! Where the mirror writes: the embedded store in-process, or an attached etcd. One trait,
//! so that everything above it is the same in both modes.

pub mod embedded;
pub mod etcd;
pub mod instrumented;
pub mod limited;
pub mod quorum;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

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
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<i64>> + Send;
    /// Renews the lease; [`Error::LeaseLost`] when it no longer exists.
    fn keep_alive(&self, lease: i64) -> impl Future<Output = Result<()>> + Send;
    /// Writes the key with the lease attached (0 for none); [`Error::LeaseLost`] when the
    /// lease no longer exists.
    fn put(&self, key: &str, value: Bytes, lease: i64) -> impl Future<Output = Result<()>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>>> + Send;
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
    /// The keys under `prefix` now (for pruning what no object wants after a restart).
    fn keys_with_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The keys under `prefix` now with their values and leases: what a restarted writer finds
    /// in a store that kept its data (a warm store, an attached etcd), so that it writes only
    /// what differs and keeps the leases it finds.
    fn entries_with_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<Entry>>> + Send;
}

/// A key as found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    /// 0 for none.
    pub lease: i64,
}
