//! Cedar policy text as the controller stores it and every broker compiles it from a
//! snapshot: never panics, what is stored compiles, and what compiles denies by default and
//! decides consistently.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/policy.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::policy(data);
});
