//! Stream header frames from a peer: decoding never panics, consumes no more than it was
//! given, whatever decodes re-encodes to the same bytes, and a prefix of a frame asks for more.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/proto.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::frame(data);
});
