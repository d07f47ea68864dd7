//! A production replacement for Cilium's `clustermesh-apiserver`, with an embedded
//! etcd-v3-compatible store.
//!
//! ```text
//!  Kubernetes API ──watch──▶ translate ──▶ sync store ──▶ etcd v3 store (embedded or attached)
//!                                                              │ mTLS :2379
//!                                              remote agents ◀─┘ (list + watch, CN = user)
//! ```

pub mod app;
pub mod blob;
pub mod certs;
pub mod clustermesh;
pub mod config;
pub mod controllers;
pub mod demo;
pub mod etcd;
pub mod k8s;
pub mod kvstore;
pub mod kvstoremesh;
pub mod mcsapi_coredns;
pub mod mesh;
pub mod metrics;
pub mod persona;
pub mod pki;
pub mod process_metrics;
pub mod shutdown;
pub mod source;
pub mod sync;
pub mod translate;
pub mod troubleshoot;
pub mod users;

/// An error and its sources on one line, for log fields.
pub use clustermesh_client::display::error_chain;
