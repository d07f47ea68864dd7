//! Integration tests: one binary; each module is a group of specifications.

mod adversarial;
mod auth_mtls;
mod certs;
mod chaos;
mod chart_pods;
mod client_port_http;
mod client_remote;
mod conformance;
mod differential;
mod differential_prop;
mod etcdctl_parity;
mod fake_k8s_selftest;
mod fuzz_smoke;
mod harness_selftest;
mod kvstoremesh;
mod leases;
mod mcsapi_coredns;
mod mesh_commands;
mod metrics;
mod mirror;
mod process;
mod soak;
mod support;
mod troubleshoot;
mod users;
mod watch_semantics;
