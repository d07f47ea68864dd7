//! A production replacement for Cilium's `clustermesh-apiserver`, with an embedded
//! etcd-v3-compatible store.
//!
//! ```text
//!  Kubernetes API ──watch──▶ translate ──▶ sync store ──▶ etcd v3 store (embedded or attached)
//!                                                              │ mTLS :2379
//!                                              remote agents ◀─┘ (list + watch, CN = user)
//! ```

pub mod app;
pub mod config;
pub mod etcd;
pub mod pki;
pub mod shutdown;
