//! A QUIC server's first flight as a dialing client reads it, sniffing the key exchange group
//! from the ServerHello (`umbra-link/src/quic_kx.rs`): never panics, and no such bytes get the
//! client session past its handshake. Input: a split position byte, then the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/link.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::quic_kx(data);
});
