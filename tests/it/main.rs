//! Integration tests: one binary; each module is a group of specifications.

mod harness_selftest;
mod mirror;
mod support;
