//! TLS 1.3 over TCP: the handshake and identity checks of a TLS link, on each side. Streams
//! over the connection are the multiplexer's (`mux/`), which takes the connection once the
//! handshake is done; the side that opens Umbra streams (see [`crate::link`]) opens them there.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::info;
use umbra_proto::Role;

use crate::error::{LinkError, from_tls_io};
use crate::link::{Conn, Link, LinkParts, dialer_opens, link_span, own_role};
use crate::mux;
use crate::transport::{ALPN, LinkConfig, Transport};

/// Read buffer under TLS (see [`buffered`]).
const TCP_READ_BUFFER: usize = 64 * 1024;

/// Least room rustls gets for encrypted bytes not yet written to the socket, per link (its
/// default is 64 KiB). A 64 KiB DATA frame is a little over 64 KiB once framed and
/// sealed, so under the default every frame went out as two writes, the second of about a
/// hundred bytes, each waking the peer. With room for several frames, a frame is one `writev`
/// (single-stream TLS throughput: about 1.15x socat before, 1.2-1.3x after; benches/README).
/// A link whose stream window is larger gets one window: one stream never has more than
/// that in flight, so more room would not help it. The buffer fills only while the socket
/// is backed up.
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Listener side: TLS handshake on an accepted TCP connection, then the multiplexer in the
/// role the dialer's certificate calls for. The caller bounds it with the handshake timeout.
pub(crate) async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(buffered(tcp)).await.map_err(from_tls_io)?;
    tls.get_mut().1.set_buffer_limit(Some(tls_send_buffer(cfg)));
    let (_, c) = tls.get_ref();
    if c.alpn_protocol() != Some(ALPN) {
        return Err(LinkError::Handshake("ALPN umbra/1 not negotiated"));
    }
    let leaf = c
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(LinkError::Handshake("no client certificate"))?;
    let peer = umbra_pki::peer_cert(leaf).map_err(LinkError::PeerIdentity)?;
    let kx_group = kx_name(c.negotiated_key_exchange_group());
    let we_open = !dialer_opens(Some(peer.id.role));
    let span = link_span(&peer, Transport::Tls, &kx_group, remote);
    let conn = mux::start(tls, we_open, cfg, &span).await?;
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Tls,
        kx_group,
        remote,
        opener: we_open,
        span,
        conn: Conn::Mux(conn),
    }))
}

/// Dialer side. The caller bounds it with the handshake timeout.
pub(crate) async fn dial(
    addr: SocketAddr,
    server_name: &str,
    client_tls: Arc<rustls::ClientConfig>,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| LinkError::Config(format!("invalid server name {server_name:?}")))?;
    let we_open = dialer_opens(own_role(&client_tls));
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = TlsConnector::from(client_tls)
        .connect(name, buffered(tcp))
        .await
        .map_err(from_tls_io)?;
    tls.get_mut().1.set_buffer_limit(Some(tls_send_buffer(cfg)));
    let (_, c) = tls.get_ref();
    if c.alpn_protocol() != Some(ALPN) {
        return Err(LinkError::Handshake("ALPN umbra/1 not negotiated"));
    }
    let leaf = c
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(LinkError::Handshake("no server certificate"))?;
    let peer = umbra_pki::peer_cert(leaf).map_err(LinkError::PeerIdentity)?;
    if peer.id.role != Role::Broker {
        info!(peer = %peer.id, "dialed server is not a broker");
        return Err(LinkError::WrongPeer);
    }
    let kx_group = kx_name(c.negotiated_key_exchange_group());
    let span = link_span(&peer, Transport::Tls, &kx_group, addr);
    let conn = mux::start(tls, we_open, cfg, &span).await?;
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Tls,
        kx_group,
        remote: addr,
        opener: we_open,
        span,
        conn: Conn::Mux(conn),
    }))
}

fn tls_send_buffer(cfg: &LinkConfig) -> usize {
    TLS_SEND_BUFFER.max(cfg.stream_window as usize)
}

/// rustls reads the socket 4 KiB at a time after each drained record; a read buffer under
/// TLS turns that into one large read per burst (about a quarter of the receive syscalls at
/// full speed).
fn buffered(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(TCP_READ_BUFFER, tcp)
}

fn kx_name(g: Option<&'static dyn rustls::crypto::SupportedKxGroup>) -> String {
    g.map_or_else(
        || "unknown".to_owned(),
        |g| umbra_pki::kx_group_name(g.name()),
    )
}
