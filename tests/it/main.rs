//! Integration tests: one binary; each module is a group of specifications.

mod certs;
mod differential;
mod fake_k8s_selftest;
mod harness_selftest;
mod mirror;
mod process;
mod support;
