//! QUIC links (quinn): endpoint and transport configuration, handshakes.
//!
//! Streams are QUIC bidi streams. Stream limits enforce who opens: the side that must not be
//! opened at advertises `max_concurrent_bidi_streams = 0`. The listener does not know the
//! dialer's role before the handshake, so it starts at a small limit (`quic_streams`), grown
//! with use on agent links and lowered to 0 for connector links. quinn's defaults for GSO/GRO
//! and ECN stay on; path MTU discovery goes up to the largest UDP payload (see
//! `quic_socket.rs`).
//!
//! The negotiated key exchange group is read from the ServerHello (see `quic_kx.rs`), because
//! quinn does not expose rustls's answer.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use tracing::{debug, info};
use umbra_pki::kx_group_name;
use umbra_proto::Role;

use crate::error::{LinkError, from_conn};
use crate::link::{Conn, Link, LinkParts, dialer_opens, link_span, own_role};
use crate::path_mtu;
use crate::quic_kx::{KxClientConfig, KxServerConfig, QuicHandshake};
use crate::quic_socket::UdpIo;
use crate::quic_streams::{self, StreamCredit};
use crate::transport::{ALPN, LinkConfig, QUIC_SEND_WINDOW, Transport};

fn transport_config(
    cfg: &LinkConfig,
    peer_may_open: bool,
    remote: SocketAddr,
) -> Result<TransportConfig, LinkError> {
    let mut t = TransportConfig::default();
    // Path MTU discovery searches up to what the first hop towards `remote` carries: about
    // 1472 bytes on Ethernet, more with jumbo frames, 64 KiB on loopback. Most of QUIC's cost
    // is per packet, so a larger packet is less CPU per byte; probes beyond the first hop
    // would only be lost, and stall the new link while they are in flight (`path_mtu.rs`).
    // `quic_socket` keeps GSO batches of large packets deliverable.
    // On loopback the bound is the path's MTU, and a link starts there (`path_mtu::initial`).
    let bound = path_mtu::search_bound(remote, MAX_UDP_PAYLOAD);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(bound);
    t.mtu_discovery_config(Some(mtu));
    let initial = path_mtu::initial(remote, bound);
    t.initial_mtu(initial);
    let mut cc = quinn::congestion::CubicConfig::default();
    cc.initial_window(path_mtu::initial_window(initial));
    t.congestion_controller_factory(Arc::new(cc));
    t.stream_receive_window(VarInt::from_u32(cfg.stream_window))
        .receive_window(VarInt::from_u64(cfg.connection_window()).unwrap_or(VarInt::MAX))
        .send_window(QUIC_SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(if peer_may_open {
            quic_streams::initial(cfg.max_streams)
        } else {
            0
        }))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // No QUIC datagrams until UDP flows use them: quinn would otherwise advertise them and
        // keep up to 1.25 MB of a peer's datagrams per link that nothing reads (each one a
        // slice holding its whole receive buffer). A peer sending one now breaks the protocol.
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(cfg.keepalive))
        .max_idle_timeout(Some(IdleTimeout::try_from(cfg.idle_timeout).map_err(
            |_| LinkError::Config("idle_timeout too large for QUIC".into()),
        )?));
    Ok(t)
}

/// The listener's endpoint and the server config each incoming connection starts from (see
/// [`accept`]). `server_tls` must allow TLS 1.3 with the AES-128-GCM suite (QUIC's initial
/// suite); every umbra-pki config does.
pub(crate) fn server_endpoint(
    addr: SocketAddr,
    server_tls: Arc<rustls::ServerConfig>,
    cfg: &LinkConfig,
) -> Result<(Endpoint, quinn::ServerConfig), LinkError> {
    let crypto = QuicServerConfig::try_from(server_tls)
        .map_err(|e| LinkError::Config(format!("QUIC server TLS config: {e}")))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(KxServerConfig(Arc::new(crypto))));
    // The endpoint's own transport config is never used: every connection is accepted with
    // one made for its path.
    sc.transport_config(Arc::new(transport_config(cfg, true, addr)?));
    // Connections waiting for a handshake slot; beyond this quinn refuses new ones.
    sc.max_incoming(cfg.max_pending_handshakes.saturating_mul(4).max(64));
    let e = endpoint(addr, Some(sc.clone()), cfg.reset_key.as_ref(), None)?;
    Ok((e, sc))
}

/// Socket buffer asked for in each direction (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max`). The defaults (about 200 KiB) drop datagrams in bursts at Gbit/s rates, and
/// every drop costs the congestion window.
const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// The largest UDP payload QUIC allows, as both the MTU discovery bound and what this endpoint
/// accepts (advertised to the peer as `max_udp_payload_size`; the peer's MTU discovery stops
/// there, so both sides must raise it).
const MAX_UDP_PAYLOAD: u16 = 65_527;

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<&crate::transport::ResetKey>,
    peer: Option<SocketAddr>,
) -> Result<Endpoint, LinkError> {
    let socket = std::net::UdpSocket::bind(addr)?;
    // A dialer's socket is connected to its broker: the kernel then drops datagrams from
    // anyone else, so the port of an agent or a connector (which never listens) answers no
    // scanner's forged Initial, as quinn would otherwise (with a close).
    if let Some(peer) = peer {
        socket.connect(peer)?;
    }
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer only costs throughput.
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER) {
        debug!(error = %e, "cannot enlarge UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), UDP_BUFFER) {
        debug!(error = %e, "cannot enlarge UDP send buffer");
    }
    let mut endpoint_cfg = match reset_key {
        Some(k) => {
            let mut c = quinn::EndpointConfig::new(Arc::new(aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                &k.0,
            )));
            // A restarted endpoint only answers with a reset for connection ids it recognises
            // as its own, so the id generator's key must survive the restart too.
            let d = umbra_pki::sha256(&[&k.0[..], b"umbra quic cid key"].concat());
            let cid_key = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            c.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            c
        }
        None => quinn::EndpointConfig::default(),
    };
    endpoint_cfg
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| LinkError::Config(format!("QUIC max UDP payload: {e}")))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(UdpIo::new(socket)?);
    Ok(Endpoint::new_with_abstract_socket(
        endpoint_cfg,
        server,
        socket,
        runtime,
    )?)
}

/// Listener side: completes the handshake of an incoming connection, with `base` (from
/// [`server_endpoint`]) given a transport config for this peer's path. The caller bounds it
/// with the handshake timeout.
pub(crate) async fn accept(
    incoming: quinn::Incoming,
    base: &quinn::ServerConfig,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    let remote = incoming.remote_address();
    let mut sc = base.clone();
    sc.transport_config(Arc::new(transport_config(cfg, true, remote)?));
    let conn = incoming
        .accept_with(Arc::new(sc))
        .map_err(from_conn)?
        .await
        .map_err(from_conn)?;
    let (peer, kx_group) = verified_peer(&conn)?;
    let we_open = !dialer_opens(Some(peer.id.role));
    if we_open {
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(0));
    }
    let span = link_span(&peer, Transport::Quic, &kx_group, remote);
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Quic,
        kx_group,
        remote,
        opener: we_open,
        span,
        conn: Conn::Quic {
            conn,
            credit: StreamCredit::new(if we_open { 0 } else { cfg.max_streams }),
            _endpoint: None,
        },
    }))
}

/// Dialer side, on an endpoint of its own (dropped with the link). The caller bounds it with
/// the handshake timeout.
pub(crate) async fn dial(
    addr: SocketAddr,
    server_name: &str,
    client_tls: Arc<rustls::ClientConfig>,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    let we_open = dialer_opens(own_role(&client_tls));
    let crypto = QuicClientConfig::try_from(client_tls)
        .map_err(|e| LinkError::Config(format!("QUIC client TLS config: {e}")))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(KxClientConfig(Arc::new(crypto))));
    cc.transport_config(Arc::new(transport_config(cfg, !we_open, addr)?));
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = endpoint(bind, None, None, Some(addr))?;
    let conn = endpoint
        .connect_with(cc, addr, server_name)?
        .await
        .map_err(from_conn)?;
    let (peer, kx_group) = verified_peer(&conn)?;
    if peer.id.role != Role::Broker {
        info!(peer = %peer.id, "dialed server is not a broker");
        conn.close(VarInt::from_u32(0), b"not a broker");
        return Err(LinkError::WrongPeer);
    }
    let span = link_span(&peer, Transport::Quic, &kx_group, addr);
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Quic,
        kx_group,
        remote: addr,
        opener: we_open,
        span,
        conn: Conn::Quic {
            conn,
            credit: StreamCredit::new(if we_open { 0 } else { cfg.max_streams }),
            _endpoint: Some(endpoint),
        },
    }))
}

/// ALPN, peer identity from the leaf, and key exchange group of an established connection.
fn verified_peer(conn: &quinn::Connection) -> Result<(umbra_pki::PeerCert, String), LinkError> {
    let hs = conn
        .handshake_data()
        .and_then(|d| d.downcast::<QuicHandshake>().ok());
    let Some(hs) = hs else {
        return Err(LinkError::Handshake("no handshake data"));
    };
    if hs.protocol.as_deref() != Some(ALPN) {
        return Err(LinkError::Handshake("ALPN umbra/1 not negotiated"));
    }
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok());
    let leaf = certs
        .as_deref()
        .and_then(|c| c.first())
        .ok_or(LinkError::Handshake("no peer certificate"))?;
    let peer = umbra_pki::peer_cert(leaf).map_err(LinkError::PeerIdentity)?;
    let kx = hs
        .kx_group
        .map_or_else(|| "unknown".to_owned(), kx_group_name);
    Ok((peer, kx))
}
