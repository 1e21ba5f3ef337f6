//! The fuzz corpora of the `umbra-link` targets `quic_kx` and `mux`, replayed under `cargo
//! test` (no nightly, no libFuzzer): every file of `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/`, then seeded mutants of them, through the same check the fuzz
//! target runs (`fuzz/harness/link.rs`). See `fuzz/README.md`.
//!
//! The `seed_generator_*` tests make the seed inputs (among them a real ServerHello of Umbra's
//! QUIC server config, and whole multiplexer sessions) and check them; with
//! `UMBRA_FUZZ_WRITE_SEEDS=1` they write them into `fuzz/corpus/<target>/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/harness/link.rs"]
mod harness;
#[path = "../../../fuzz/harness/replay.rs"]
mod replay;

use std::sync::Arc;
use std::time::SystemTime;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::crypto::{ClientConfig as _, ServerConfig as _};
use quinn_proto::transport_parameters::TransportParameters;
use umbra_pki::{Ca, ClientAuth};
use umbra_proto::Role;

#[test]
fn quic_kx() {
    let r = replay::replay("quic_kx", 20_000, harness::quic_kx);
    eprintln!("quic_kx: {r:?}");
}

#[test]
fn mux() {
    let r = replay::replay("mux", 20_000, harness::mux);
    eprintln!("mux: {r:?}");
}

/// A multiplexer frame header: kind, flags, version byte, stream, value (`mux/frame.rs`).
fn mf(kind: u8, flags: u8, ver: u8, stream: u32, value: u32) -> Vec<u8> {
    let mut b = vec![kind, flags, ver, 0];
    b.extend(stream.to_be_bytes());
    b.extend(value.to_be_bytes());
    b
}

#[test]
fn seed_generator_writes_sessions_the_multiplexer_survives() {
    const WINDOW: u32 = 16 * 1024;
    let hello = |max_streams| mf(6, 0, 1, max_streams, WINDOW);
    let data = |stream, flags, payload: &[u8]| {
        let mut b = mf(0, flags, 0, stream, payload.len() as u32);
        b.extend(payload);
        b
    };
    let (open, fin) = (1, 2);
    let seeds: Vec<(&str, u8, Vec<Vec<u8>>, bool)> = vec![
        (
            "accept-session",
            0,
            vec![
                hello(0),
                data(1, open, b"hi"),
                data(1, 0, b" there"),
                mf(3, 0, 0, 0, 7),
                data(1, fin, b""),
                mf(5, 0, 0, 0, 0),
            ],
            true,
        ),
        (
            "accept-over-the-limit",
            0,
            std::iter::once(hello(0))
                .chain((1..=6).map(|i| data(i, open | fin, b"x")))
                .collect(),
            true,
        ),
        (
            "accept-reset-then-late-frames",
            0,
            vec![
                hello(0),
                data(1, open, b"a"),
                mf(2, 0, 0, 1, 0),
                data(1, 0, b"late"),
                mf(1, 0, 0, 1, 4),
            ],
            true,
        ),
        (
            "accept-past-the-window",
            0,
            vec![hello(0), data(1, open, &[0; 16 * 1024]), data(1, 0, b"!")],
            true,
        ),
        (
            "open-session",
            1,
            vec![
                hello(8),
                mf(1, 0, 0, 1, 5),
                data(1, 0, b"reply"),
                data(1, fin, b""),
                mf(4, 0, 0, 0, 1),
            ],
            true,
        ),
        ("open-reset", 1, vec![hello(8), mf(2, 0, 0, 1, 2)], true),
        ("open-refused", 1, vec![mf(5, 0, 0, 0, 0x554d_0001)], false),
        (
            "open-peer-opens",
            1,
            vec![hello(8), data(1, open, b"x")],
            true,
        ),
        ("bad-version", 0, vec![mf(6, 0, 2, 0, WINDOW)], false),
        ("no-hello", 0, vec![data(1, open, b"x")], false),
    ];
    let dir = replay::seed_dir("mux");
    for (name, mode, frames, starts) in seeds {
        let mut input = vec![mode];
        input.extend(frames.concat());
        assert_eq!(harness::mux(&input), starts, "{name}");
        std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
    }
    replay::check_seeds(&dir, harness::mux);
}

/// A TLS 1.3 ServerHello handshake message with `exts` (type, data).
fn hello(session_id: &[u8], exts: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(session_id.len() as u8);
    body.extend(session_id);
    body.extend([0x13, 0x01, 0]);
    let mut e = Vec::new();
    for (ty, data) in exts {
        e.extend(ty.to_be_bytes());
        e.extend((data.len() as u16).to_be_bytes());
        e.extend(*data);
    }
    body.extend((e.len() as u16).to_be_bytes());
    body.extend(e);
    let mut m = vec![2, 0, (body.len() >> 8) as u8, body.len() as u8];
    m.extend(body);
    m
}

#[test]
fn seed_generator_writes_flights_the_session_survives() {
    // A real first flight: Umbra's QUIC client and server configs (X25519MLKEM768 only).
    let ca = Ca::generate("fuzz", SystemTime::now()).unwrap();
    let broker = umbra_pki::test_util::identity(&ca, Role::Broker, "b1").unwrap();
    let agent = umbra_pki::test_util::identity(&ca, Role::Agent, "d1").unwrap();
    let alpn: &[&[u8]] = &[umbra_link::ALPN];
    let server_tls = umbra_pki::server_config(&broker, ClientAuth::Required, alpn, true).unwrap();
    let client_tls = umbra_pki::client_config(&agent.ca, Some(&agent), alpn, true).unwrap();
    let server_cfg = Arc::new(QuicServerConfig::try_from(server_tls).unwrap());
    let client_cfg = Arc::new(QuicClientConfig::try_from(client_tls).unwrap());
    let params = TransportParameters::read(quinn::Side::Client, &mut &[][..]).unwrap();
    let mut client = client_cfg
        .start_session(1, "b1.broker.umbra.internal", &params)
        .unwrap();
    let mut server = server_cfg.start_session(1, &params);
    let mut client_hello = Vec::new();
    client.write_handshake(&mut client_hello);
    server.read_handshake(&client_hello).unwrap();
    let mut server_hello = Vec::new();
    assert!(server.write_handshake(&mut server_hello).is_some());
    let mut encrypted_flight = Vec::new();
    server.write_handshake(&mut encrypted_flight);
    assert_eq!(server_hello[0], 2, "a ServerHello");

    let mut x25519 = vec![0x00, 0x1d, 0, 32];
    x25519.extend([9u8; 32]);
    let mut mlkem = vec![0x11, 0xec, 0x04, 0x60];
    mlkem.extend([9u8; 1120]);
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("real-whole", 0, server_hello.clone()),
        ("real-split", 100, server_hello.clone()),
        (
            "real-then-more",
            255,
            [&server_hello[..], &encrypted_flight[..]].concat(),
        ),
        ("x25519", 3, hello(&[], &[(43, &[3, 4]), (51, &x25519)])),
        (
            "mlkem-session-id",
            40,
            hello(&[1; 32], &[(51, &mlkem), (43, &[3, 4])]),
        ),
        (
            "hello-retry",
            0,
            hello(&[], &[(43, &[3, 4]), (51, &[0x11, 0xec])]),
        ),
        ("no-key-share", 0, hello(&[], &[(43, &[3, 4])])),
        ("short-share", 0, hello(&[], &[(51, &[0x00])])),
        ("not-a-hello", 0, vec![1, 0, 0, 4, 3, 3, 0, 0]),
    ];
    let dir = replay::seed_dir("quic_kx");
    for (name, split, flight) in seeds {
        let mut input = vec![split];
        input.extend(flight);
        std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
    }
    // No flight, real or broken, completes or authenticates the session: the check asserts
    // that itself (it reports nothing accepted: the sniffed group is not observable).
    replay::check_seeds(&dir, harness::quic_kx);
}
