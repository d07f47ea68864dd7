//! `cargo fuzz run translators`: see tests/it/support/fuzz_targets.rs for what it checks.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/it/support/fuzz_targets.rs"]
mod fuzz_targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::translators(data));
