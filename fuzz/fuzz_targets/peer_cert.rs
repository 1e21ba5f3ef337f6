//! A peer's leaf certificate as the identity is read from it after a handshake
//! (`umbra_pki::peer_cert`): never panics, and an accepted leaf has exactly one URI name, the
//! identity returned, with the serial and expiry reported. Input: DER, or a PEM chain if it
//! starts with `-----`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness/pki.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::peer_cert(data);
});
