//! The fuzz targets of `fuzz/` (bodies in `support/fuzz_targets.rs`), run in `cargo test` on
//! seeded random inputs: a cheap, bounded stand-in for `cargo fuzz` (whose instrumented build
//! of the whole dependency tree costs more CI time than the suite may spend). Long
//! coverage-guided runs: `bash .ci/fuzz-smoke` (see the README).
//!
//! Knobs: `FUZZ_SMOKE_RUNS` (inputs per target, default 20000), `FUZZ_SMOKE_SEED` (default:
//! random, printed), `FUZZ_SMOKE_INPUT` (replay one input file), `FUZZ_DEBUG` (print the
//! store target's requests). A failing input is printed in hex; save it as a file and replay it with
//! `cargo fuzz run <target> FILE`.

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::support::fuzz_targets;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `target` on `FUZZ_SMOKE_RUNS` random inputs of random length; on a panic, reports the
/// seed and the input.
fn smoke(name: &str, target: fn(&[u8])) {
    // FUZZ_SMOKE_INPUT=FILE replays one input (e.g. a cargo-fuzz crash artifact) instead.
    if let Some(path) = std::env::var_os("FUZZ_SMOKE_INPUT") {
        let input = std::fs::read(&path).expect("read FUZZ_SMOKE_INPUT");
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            panic!("{name}: {path:?} panicked");
        }
        return;
    }
    let seed: u64 = env_or("FUZZ_SMOKE_SEED", rand::random());
    let runs: usize = env_or("FUZZ_SMOKE_RUNS", 20000);
    println!("fuzz_smoke {name}: FUZZ_SMOKE_SEED={seed} FUZZ_SMOKE_RUNS={runs}");
    let mut rng = StdRng::seed_from_u64(seed);
    for run in 0..runs {
        let mut input = vec![0u8; rng.random_range(0..2048)];
        rng.fill_bytes(&mut input);
        if let Err(panic) = std::panic::catch_unwind(|| target(&input)) {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("{name}: input {run} of seed {seed} panicked: {panic:?}\ninput (hex): {hex}");
        }
    }
    println!("fuzz_smoke {name}: {runs} inputs, no panic, invariants held");
}

/// No Kubernetes document, however malformed, panics the translators, and deleting every
/// object leaves no key behind.
#[test]
fn arbitrary_kubernetes_documents_never_panic_the_translators_nor_leave_keys_behind() {
    smoke("translators", fuzz_targets::translators);
}

/// No sequence of KV, Txn, Compact and Lease requests panics the store or breaks its
/// invariants (sorted unique keys, consistent revisions, leases listing their keys).
#[test]
fn arbitrary_request_sequences_never_panic_the_store_nor_break_its_invariants() {
    smoke("store_requests", fuzz_targets::store_requests);
}
