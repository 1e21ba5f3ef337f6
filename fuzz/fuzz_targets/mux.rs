//! A TLS link's multiplexer fed what a peer sends after the handshake (`umbra-link/src/mux/`):
//! never panics, ends with the peer's end of file, writes only valid frames. Input: a mode
//! byte, then the peer's bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/link.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::mux(data);
});
