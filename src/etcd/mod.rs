//! The embedded etcd-v3-compatible store: an in-memory MVCC keyspace with watches, leases
//! and certificate-based auth, served over gRPC with mutual TLS.
//!
//! ```text
//!  client ──mTLS──▶ tls::Acceptor ──▶ tonic services (service/*) ──▶ Store (store/*)
//!                   (CN → user)        validate · authorise · map      keyspace · history · leases
//!                                                                     │
//!                   Watch streams ◀── pull from history ◀── revision ─┘ (never blocks writers)
//! ```

pub mod auth;
pub mod connections;
pub mod datadir;
pub mod embedded;
pub mod error;
pub mod metrics;
pub mod pb;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod wal;

pub use error::{Error, Result};
