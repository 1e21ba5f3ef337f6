//! TLS 1.3 over TCP, with HTTP/2 (the `h2` crate) as the stream multiplexer.
//!
//! Each Umbra stream is one HTTP/2 request (`POST /s`, no meaningful headers) whose request and
//! response bodies carry the two directions. HTTP/2 lets only its client open streams, so the
//! side that opens Umbra streams takes the h2 client role (see [`crate::link`] for who opens):
//! the TLS client on agent-dialed links, the TLS server on connector-dialed links.
//!
//! Per link, tasks drive the connection (the h2 `Connection`, which does all socket I/O) and
//! keepalive (an h2 PING every `keepalive`; unanswered for `idle_timeout` closes the link). A
//! [`CancellationToken`] is the link's closed flag: cancelled by `close()`, by the driver when
//! the connection ends, or by keepalive.
//!
//! Flow control: every stream's receive window is `stream_window`, the connection's the sum
//! of them (`LinkConfig::connection_window`); received bytes are credited back as the stream hands them out, and
//! senders wait for credit (see `stream.rs`), so a link never buffers more than its windows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info};
use umbra_proto::Role;

use crate::error::{LinkError, from_h2, from_tls_io};
use crate::link::{Conn, Link, LinkParts, dialer_opens, link_span, own_role};
use crate::stream::{RecvHalf, SendHalf, Stream};
use crate::transport::{ALPN, H2_MAX_FRAME, H2_MAX_HEADER_LIST, LinkConfig, Refusal, Transport};

/// Read buffer under TLS (see [`buffered`]).
const TCP_READ_BUFFER: usize = 64 * 1024;

/// Least room rustls gets for encrypted bytes not yet written to the socket, per link (its
/// default is 64 KiB). A 64 KiB HTTP/2 DATA frame is a little over 64 KiB once framed and
/// sealed, so under the default every frame went out as two writes, the second of about a
/// hundred bytes, each waking the peer. With room for several frames, a frame is one `writev`
/// (single-stream TLS throughput: about 1.15x socat before, 1.2-1.3x after; benches/README).
/// A link whose stream window is larger gets one window: one stream never has more than
/// that in flight, so more room would not help it. The buffer fills only while the socket
/// is backed up.
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// The HTTP/2 side of a TLS link.
pub(crate) struct H2Conn {
    side: H2Side,
    closed: CancellationToken,
    /// Last keepalive round trip in nanoseconds; 0 until the first one.
    rtt_nanos: Arc<AtomicU64>,
    /// Set (to the refusal's code) before `closed` is cancelled by [`H2Conn::refuse`]: the
    /// server's driver then sends a GOAWAY with that code instead of just dropping the
    /// connection. 0 until then.
    refusing: Arc<AtomicU32>,
    /// The code of the peer's refusal, if it closed the link with one; 0 if not.
    peer_refused: Arc<AtomicU32>,
}

/// How long a refused link may take to deliver its GOAWAY.
const REFUSE_FLUSH: Duration = Duration::from_secs(1);
/// How long a refused link's socket stays open after its GOAWAY went out.
const REFUSE_LINGER: Duration = Duration::from_millis(250);

enum H2Side {
    /// We open streams.
    Client(h2::client::SendRequest<Bytes>),
    /// The peer opens streams; the driver queues them here.
    Server(tokio::sync::Mutex<mpsc::Receiver<Stream>>),
}

impl H2Conn {
    pub(crate) async fn open(&self, span: &Span) -> Result<Stream, LinkError> {
        let H2Side::Client(sr) = &self.side else {
            return Err(LinkError::NotOpener);
        };
        if self.closed.is_cancelled() {
            return Err(LinkError::Closed);
        }
        let mut sr = sr.clone().ready().await.map_err(from_h2)?;
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static("https://umbra.internal/s");
        let (resp, send) = sr.send_request(req, false).map_err(from_h2)?;
        let id = u64::from(u32::from(send.stream_id()));
        Ok(Stream::new(
            id,
            SendHalf::h2(send),
            RecvHalf::h2_pending(resp),
            span,
        ))
    }

    pub(crate) async fn accept(&self) -> Option<Stream> {
        match &self.side {
            H2Side::Server(rx) => rx.lock().await.recv().await,
            H2Side::Client(_) => {
                self.closed.cancelled().await;
                None
            }
        }
    }

    pub(crate) fn close(&self) {
        self.closed.cancel();
    }

    /// See [`crate::Link::refuse`]: only the h2 server can send the GOAWAY that says so.
    pub(crate) fn refuse(&self, why: Refusal) {
        if matches!(self.side, H2Side::Server(_)) {
            self.refusing.store(why.code(), Ordering::Relaxed);
        }
        self.closed.cancel();
    }

    pub(crate) fn refused(&self) -> Option<Refusal> {
        Refusal::from_code(self.peer_refused.load(Ordering::Relaxed))
    }

    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.rtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    pub(crate) fn token(&self) -> CancellationToken {
        self.closed.clone()
    }
}

/// Listener side: TLS handshake on an accepted TCP connection, then HTTP/2 in the role the
/// dialer's certificate calls for. The caller bounds it with the handshake timeout.
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
    let conn = h2_start(tls, we_open, cfg, &span).await?;
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Tls,
        kx_group,
        remote,
        opener: we_open,
        span,
        conn: Conn::H2(conn),
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
    let conn = h2_start(tls, we_open, cfg, &span).await?;
    Ok(Link::new(LinkParts {
        peer,
        transport: Transport::Tls,
        kx_group,
        remote: addr,
        opener: we_open,
        span,
        conn: Conn::H2(conn),
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

/// Runs the HTTP/2 handshake in the given role and starts the link's tasks.
async fn h2_start<T>(
    io: T,
    h2_client: bool,
    cfg: &LinkConfig,
    span: &Span,
) -> Result<H2Conn, LinkError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let closed = CancellationToken::new();
    let rtt_nanos = Arc::new(AtomicU64::new(0));
    let refusing = Arc::new(AtomicU32::new(0));
    let peer_refused = Arc::new(AtomicU32::new(0));
    let send_buffer = cfg.stream_window as usize;
    let (side, ping) = if h2_client {
        let (sr, mut conn) = h2::client::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.h2_connection_window())
            .max_frame_size(H2_MAX_FRAME)
            .max_send_buffer_size(send_buffer)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_concurrent_streams(0)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(from_h2)?;
        let ping = conn.ping_pong();
        let token = closed.clone();
        let refused = peer_refused.clone();
        let span = span.clone();
        // Not instrumented: this task is polled for every frame, and entering the link's
        // span each time costs more than the rest of the poll; its lines name the span.
        tokio::spawn(async move {
            tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => debug!(parent: &span, "link ended"),
                    Err(e) => {
                        debug!(parent: &span, error = %e, "link ended");
                        if let Some(r) = from_h2(e).refusal() {
                            refused.store(r.code(), Ordering::Relaxed);
                        }
                    }
                },
                () = token.cancelled() => debug!(parent: &span, "link closed"),
            }
            token.cancel();
        });
        (H2Side::Client(sr), ping)
    } else {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.h2_connection_window())
            .max_frame_size(H2_MAX_FRAME)
            .max_send_buffer_size(send_buffer)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_concurrent_streams(cfg.max_streams)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(from_h2)?;
        let ping = conn.ping_pong();
        // Bounded: a peer opening streams nobody accepts gets them refused, and the driver
        // never waits on the application.
        let (tx, rx) = mpsc::channel(cfg.max_streams.clamp(1, 1024) as usize);
        // Not instrumented, like the client's driver above.
        tokio::spawn(serve_streams(
            conn,
            tx,
            closed.clone(),
            refusing.clone(),
            span.clone(),
        ));
        (H2Side::Server(tokio::sync::Mutex::new(rx)), ping)
    };
    if let Some(ping) = ping {
        tokio::spawn(
            keepalive(
                ping,
                closed.clone(),
                rtt_nanos.clone(),
                cfg.keepalive,
                cfg.idle_timeout,
            )
            .instrument(span.clone()),
        );
    }
    Ok(H2Conn {
        side,
        closed,
        rtt_nanos,
        refusing,
        peer_refused,
    })
}

/// Drives an h2 server connection and queues the streams the peer opens.
async fn serve_streams<T>(
    mut conn: h2::server::Connection<T, Bytes>,
    tx: mpsc::Sender<Stream>,
    closed: CancellationToken,
    refusing: Arc<AtomicU32>,
    span: Span,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = tokio::select! {
            () = closed.cancelled() => {
                let code = refusing.load(Ordering::Relaxed);
                if code != 0 {
                    conn.abrupt_shutdown(h2::Reason::from(code));
                    let flushed = tokio::time::timeout(
                        REFUSE_FLUSH,
                        std::future::poll_fn(|cx| conn.poll_closed(cx)),
                    );
                    let _ = flushed.await;
                    // Hold the socket a moment: closing it now would answer data the peer
                    // sent meanwhile with a TCP reset, which can reach its h2 layer before
                    // the GOAWAY that says why.
                    tokio::time::sleep(REFUSE_LINGER).await;
                    debug!(parent: &span, "link refused");
                } else {
                    debug!(parent: &span, "link closed");
                }
                break;
            }
            next = conn.accept() => next,
        };
        let (req, mut respond) = match next {
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                debug!(parent: &span, error = %e, "link ended");
                break;
            }
            None => {
                debug!(parent: &span, "link ended by peer");
                break;
            }
        };
        // The response headers go out at once: they carry nothing, and the opener's receive
        // half waits for them.
        let send = match respond.send_response(http::Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(parent: &span, error = %e, "stream gone before it was accepted");
                continue;
            }
        };
        let id = u64::from(u32::from(send.stream_id()));
        let stream = Stream::new(id, SendHalf::h2(send), RecvHalf::h2(req.into_body()), &span);
        if let Err(mpsc::error::TrySendError::Full(mut s)) = tx.try_send(stream) {
            debug!(parent: &span, stream = id, "accept queue full; refusing stream");
            s.reset();
        }
    }
    closed.cancel();
}

async fn keepalive(
    mut ping: h2::PingPong,
    closed: CancellationToken,
    rtt_nanos: Arc<AtomicU64>,
    every: Duration,
    idle: Duration,
) {
    loop {
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let start = Instant::now();
        let answered = tokio::select! {
            () = closed.cancelled() => return,
            r = tokio::time::timeout(idle, ping.ping(h2::Ping::opaque())) => r,
        };
        match answered {
            Ok(Ok(_)) => {
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                rtt_nanos.store(nanos.max(1), Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                debug!(error = %e, "keepalive failed; closing link");
                closed.cancel();
                return;
            }
            Err(_) => {
                info!(
                    idle_secs = idle.as_secs_f64(),
                    "peer silent past idle timeout; closing link"
                );
                closed.cancel();
                return;
            }
        }
    }
}
