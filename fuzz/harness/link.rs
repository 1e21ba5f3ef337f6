//! One input of the `umbra-link` fuzz targets: `quic_kx`, bytes a QUIC server sends a dialing
//! agent or connector in its first flight, read by the client session that sniffs the key
//! exchange group from the ServerHello (`crates/umbra-link/src/quic_kx.rs`); and `mux`, what a
//! peer sends a TLS link's multiplexer (`crates/umbra-link/src/mux/`).
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/{quic_kx,mux}.rs` (libFuzzer) and by
//! `crates/umbra-link/tests/fuzz_corpus.rs` (replays the corpus under `cargo test`).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

/// Input: one byte `k`, then the server's handshake bytes, delivered in two pieces split after
/// `k` bytes (quinn hands CRYPTO frame data over as it arrives, so the ServerHello may come in
/// parts). Never panics, and no such bytes complete or authenticate the client's handshake.
/// Always false: whether the ServerHello was understood is not observable from outside.
pub(crate) fn quic_kx(data: &[u8]) -> bool {
    let Some((&k, flight)) = data.split_first() else {
        return false;
    };
    let (a, b) = flight.split_at(usize::from(k).min(flight.len()));
    assert!(
        umbra_link::fuzz_quic_server_flight(&[a, b]),
        "a forged server flight got a client session past the handshake"
    );
    false
}

/// Input of the target `mux`: one byte (bit 0: the multiplexer opens the streams, else it
/// accepts them), then everything a peer sends on a TLS link after the handshake, starting
/// with its HELLO (`crates/umbra-link/src/mux/`). Never panics; the link ends with the
/// peer's end of file; everything the multiplexer wrote is whole, valid frames, HELLO first.
/// True when the link started (the input got past the HELLO exchange).
pub(crate) fn mux(data: &[u8]) -> bool {
    umbra_link::fuzz_mux_peer(data)
}
