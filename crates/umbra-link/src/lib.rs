//! Umbra's links: authenticated, multiplexed connections between agents or connectors and
//! brokers, and the copy loops that move application bytes over them.
//!
//! Owns:
//! - two transports behind one API ([`Link`], [`Listener`], [`dial`], [`Stream`]): QUIC
//!   (quinn) and, where UDP is blocked, TLS 1.3 over TCP with Umbra's own stream multiplexer
//!   (`mux/`). Both use the rustls configs of `umbra-pki` (mutual TLS, ALPN [`ALPN`]) and
//!   report the negotiated key exchange group;
//! - who opens streams on a link (the dialer on agent links, the broker on connector links;
//!   see [`Link`]);
//! - header-frame I/O at the start of each stream ([`Stream::read_frame`],
//!   [`Stream::write_frame`]; the codec itself is `umbra_proto::frame`);
//! - the relay loops ([`relay_streams`], [`relay_tcp`]): half-close, idle timeout, counters;
//! - the HTTPS client to the controller ([`ControllerClient`], [`fetch_pinned_ca`]).
//!
//! Does not own: what a peer may do (authorization is the broker's), certificates and TLS
//! configs (`umbra-pki`), the frame codec (`umbra-proto`), deadlines on frame exchanges (the
//! caller wraps `read_frame`/`write_frame` in `tokio::time::timeout`).
//!
//! Spans: `link{peer, transport, kx, remote}` per link and `stream{id}` per stream (child of
//! its link). Metrics: see `telemetry.rs` (`umbra_links`,
//! `umbra_link_handshake_failures_total`, `umbra_relay_bytes_total`).

pub mod backoff;
mod broker;
pub mod budget;
mod control;
pub mod enroll;
mod error;
mod link;
mod mux;
mod path_mtu;
pub mod pending;
mod quic;
mod quic_kx;
mod quic_socket;
mod quic_streams;
pub mod quota;
mod relay;
mod stream;
mod telemetry;
mod tls;
mod transport;

pub use broker::{DialBrokerError, TransportPref, UnknownTransportPref, dial_broker};
pub use control::{
    ControllerClient, FOLLOWING_AGAIN, RenewingClient, fetch_pinned_ca, follow_broker_list,
};
pub use error::LinkError;
pub use link::{EXPLAIN_WAIT, HandshakeRefusal, Link, LinkHold, Listener, QuicPath, dial};
/// Not API: see [`mux::fuzz_peer`].
#[doc(hidden)]
pub use mux::fuzz_peer as fuzz_mux_peer;
pub use mux::{MuxError, MuxFrameError};
pub use relay::{Counters, TcpEnd, relay_streams, relay_tcp, reset_tcp};
pub use stream::Stream;
pub use transport::{
    ALPN, DEFAULT_STREAM_WINDOW_KIB, LinkConfig, Refusal, ResetKey, STREAM_WINDOW_KIB,
    STREAM_WINDOW_KIB_ERROR, Transport, UnknownTransport, stream_window_bytes,
};

/// Not API: for `fuzz/` (target `quic_kx`) and its corpus replay test only.
///
/// Feeds `pieces`, in order, to a fresh QUIC client session as the server's handshake bytes,
/// the way a dialing agent or connector reads a broker's first flight (the key exchange group
/// is read from the ServerHello on this path, `quic_kx.rs`). Returns whether the session came
/// out unharmed: still handshaking, with no handshake data and no peer identity, which must
/// hold for any bytes not made with the session's own keys.
#[doc(hidden)]
pub fn fuzz_quic_server_flight(pieces: &[&[u8]]) -> bool {
    use quinn::crypto::ClientConfig as _;
    use std::sync::{Arc, OnceLock};
    static CFG: OnceLock<Option<Arc<quic_kx::KxClientConfig>>> = OnceLock::new();
    let cfg = CFG.get_or_init(|| {
        let ca = umbra_pki::Ca::generate("fuzz", std::time::SystemTime::now()).ok()?;
        let tls = umbra_pki::client_config(&ca.cert_der(), None, &[ALPN], true).ok()?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).ok()?;
        Some(Arc::new(quic_kx::KxClientConfig(Arc::new(quic))))
    });
    let params = quinn_proto::transport_parameters::TransportParameters::read(
        quinn::Side::Client,
        &mut &[][..],
    );
    let (Some(cfg), Ok(params)) = (cfg, params) else {
        return false;
    };
    let Ok(mut session) = cfg
        .clone()
        .start_session(1, "b1.broker.umbra.internal", &params)
    else {
        return false;
    };
    for piece in pieces {
        let _ = session.read_handshake(piece);
    }
    session.is_handshaking()
        && session.handshake_data().is_none()
        && session.peer_identity().is_none()
}
