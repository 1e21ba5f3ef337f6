//! Identity URIs (from certificates) and enrollment tokens (from operators): parsing never
//! panics, and what parses prints back to the same text.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/proto.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::identity(data);
});
