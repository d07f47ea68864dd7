//! Shared harness for the integration tests: test PKI, a real etcd process, etcdctl, polling.
//!
//! Everything listens on 127.0.0.1 only, and every wait is bounded.

// Not every test module uses every helper.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod docker;
pub mod embedded;
pub mod etcd;
pub mod etcd_cluster;
pub mod etcdctl;
pub mod eventually;
pub mod exposition;
pub mod fake_k8s;
pub mod fuzz_targets;
pub mod kvstoremesh;
pub mod mirror;
pub mod pod;
pub mod process;
pub mod relay;
pub mod server;
pub mod state;

pub use certs::{ClientCert, Pki};
pub use embedded::EmbeddedStore;
pub use etcd::{EtcdProcess, client_tls, connect, connect_with_tls};
pub use etcdctl::{Etcdctl, Output};
pub use eventually::{Attempt, eventually};
pub use fake_k8s::{FakeApiServer, FakeOptions, RequestRecord, ResourceSpec, Verb};

use std::sync::Once;

/// Installs a tracing subscriber once per test binary: filter from `RUST_LOG` (default `warn`),
/// output through the test writer so it is captured per test.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Another subscriber may already be installed (e.g. by the code under test); keep it.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// Installs rustls' ring provider as the process default (idempotent). Only ring is compiled in,
/// so this changes nothing in practice, but it makes the choice explicit for rustls users.
pub fn install_crypto_provider() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
