//! Links: one authenticated connection between a dialer (agent or connector) and a broker,
//! over QUIC or TLS/TCP, carrying many [`Stream`]s.
//!
//! Who opens streams is fixed by the dialer's certificate role:
//! - agent-dialed links: the agent (dialer) opens, one stream per flow it forwards;
//! - connector-dialed links: the broker (listener) opens, one stream per flow it routes to the
//!   connector.
//!
//! On TLS links the multiplexer refuses streams opened by the other side; QUIC follows the same
//! rule by stream limits. The listener learns the dialer's role from the
//! verified client certificate; the dialer reads its own role from the certificate in its
//! client config (the config's certificate resolver). Calling [`Link::open`] on the other side
//! is [`LinkError::NotOpener`].
//!
//! [`Listener::accept`] never blocks on a single peer: handshakes run in their own tasks, at
//! most `max_pending_handshakes` at once per transport (a new connection evicts the oldest
//! handshake in progress rather than wait, see `pending.rs`), each bounded by
//! `handshake_timeout`; failures are logged (with the remote address) and counted, never
//! returned. Once half the QUIC slots are taken, a new QUIC peer must first prove its address
//! with a Retry, so forged Initials (one datagram each) take no slot.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::SignatureScheme;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, warn};
use umbra_pki::PeerCert;
use umbra_proto::Role;

use crate::error::{LinkError, from_conn};
use crate::mux::MuxConn;
use crate::pending::{Pending, Slot};
use crate::stream::{RecvHalf, SendHalf, Stream};
use crate::telemetry;
use crate::transport::{LinkConfig, Refusal, Transport};
use crate::{quic, tls};

/// Bounds of the wait before a refused QUIC link is closed (two round trips).
const REFUSE_WAIT_MIN: Duration = Duration::from_millis(10);
const REFUSE_WAIT_MAX: Duration = Duration::from_secs(1);

/// Longest wait of [`Link::explain`] for a failing link to finish closing.
pub const EXPLAIN_WAIT: Duration = Duration::from_millis(250);

/// A cheap, cloneable handle to one link. The link closes when [`Link::close`] is called, when
/// the peer goes away or is silent past the idle timeout, or when the last handle is dropped.
#[derive(Clone)]
pub struct Link {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    peer: PeerCert,
    transport: Transport,
    kx_group: String,
    remote: SocketAddr,
    /// Whether this side opens the streams.
    opener: bool,
    span: Span,
    conn: Conn,
    /// Set by [`Link::refuse`]: the link counts as closed from then on (no new streams are
    /// opened on it), although on QUIC the close itself goes out a little later.
    refused_here: std::sync::atomic::AtomicBool,
    /// Holds taken on the link ([`Link::hold`]): what its user still carries over it.
    holds: Arc<std::sync::atomic::AtomicUsize>,
}

/// A hold on a link: its user still carries something over it (a relayed connection), so
/// the link is not to be closed as idle. Released when dropped.
#[derive(Debug)]
pub struct LinkHold(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for LinkHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) enum Conn {
    Quic {
        conn: quinn::Connection,
        /// The streams the peer holds open and the limit it is given (grown with use).
        credit: crate::quic_streams::StreamCredit,
        /// A dialer's own endpoint, kept alive with the link.
        _endpoint: Option<quinn::Endpoint>,
    },
    Mux(MuxConn),
}

/// Everything a transport hands over once its handshake is done.
pub(crate) struct LinkParts {
    pub(crate) peer: PeerCert,
    pub(crate) transport: Transport,
    pub(crate) kx_group: String,
    pub(crate) remote: SocketAddr,
    pub(crate) opener: bool,
    pub(crate) span: Span,
    pub(crate) conn: Conn,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.inner.peer.id)
            .field("transport", &self.inner.transport)
            .field("kx_group", &self.inner.kx_group)
            .field("remote", &self.inner.remote)
            .finish()
    }
}

/// The span of one link: every log line of the link and its streams carries these fields.
pub(crate) fn link_span(peer: &PeerCert, t: Transport, kx: &str, remote: SocketAddr) -> Span {
    tracing::info_span!("link", peer = %peer.id, transport = t.as_str(), kx = kx, remote = %remote)
}

/// Whether the dialer opens the streams, given its role (see the module docs).
pub(crate) fn dialer_opens(dialer: Option<Role>) -> bool {
    dialer != Some(Role::Connector)
}

/// This process's role, read from the certificate its client config presents.
pub(crate) fn own_role(cfg: &rustls::ClientConfig) -> Option<Role> {
    const SCHEMES: &[SignatureScheme] = &[
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA256,
    ];
    let key = cfg.client_auth_cert_resolver.resolve(&[], SCHEMES)?;
    let leaf = key.end_entity_cert().ok()?;
    umbra_pki::peer_cert(leaf).ok().map(|p| p.id.role)
}

impl Link {
    pub(crate) fn new(p: LinkParts) -> Link {
        let gauge = telemetry::links(p.transport);
        gauge.increment(1.0);
        info!(parent: &p.span, opener = p.opener, "link up");
        // Counts the link down when it closes, whoever closes it. Holds the connection, not the
        // link, so that dropping the last `Link` still closes it (see `Drop`).
        let span = p.span.clone();
        match &p.conn {
            Conn::Quic { conn, .. } => {
                let conn = conn.clone();
                let opener = p.opener;
                tokio::spawn(async move {
                    let why = if opener {
                        // The peer may open no stream here. A listener allows every new
                        // connection a few before it knows the peer's role, and QUIC cannot
                        // take an allowance back: a connector that opens one anyway would
                        // have this side hold what it sends, for nobody, so it loses the
                        // link (as on TLS links, where the multiplexer says so).
                        tokio::select! {
                            why = conn.closed() => why,
                            Ok(_) = conn.accept_bi() => {
                                warn!(parent: &span, "peer opened a stream on a link where it may not; closing the link");
                                conn.close(
                                    quinn::VarInt::from_u32(crate::mux::code::PROTOCOL),
                                    b"stream opened by the wrong side",
                                );
                                conn.closed().await
                            }
                        }
                    } else {
                        conn.closed().await
                    };
                    let path = conn.stats().path;
                    telemetry::quic_link_closed(&path);
                    info!(
                        parent: &span,
                        reason = %why,
                        mtu = path.current_mtu,
                        mtu_probes_lost = path.lost_plpmtud_probes,
                        "link down"
                    );
                    gauge.decrement(1.0);
                });
            }
            Conn::Mux(h) => {
                let token = h.token();
                tokio::spawn(async move {
                    token.cancelled().await;
                    info!(parent: &span, "link down");
                    gauge.decrement(1.0);
                });
            }
        }
        Link {
            inner: Arc::new(LinkInner {
                peer: p.peer,
                transport: p.transport,
                kx_group: p.kx_group,
                remote: p.remote,
                opener: p.opener,
                span: p.span,
                conn: p.conn,
                refused_here: std::sync::atomic::AtomicBool::new(false),
                holds: Arc::default(),
            }),
        }
    }

    /// Takes a hold on the link for something its user carries over it (see [`LinkHold`]):
    /// a user that keeps links for what they carry closes those with none held.
    pub fn hold(&self) -> LinkHold {
        self.inner
            .holds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LinkHold(self.inner.holds.clone())
    }

    /// How many holds are taken on the link now.
    pub fn held(&self) -> usize {
        self.inner.holds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The peer's identity, from the leaf certificate the handshake verified.
    pub fn peer(&self) -> &PeerCert {
        &self.inner.peer
    }

    /// Which transport carries this link.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// The negotiated key exchange group, e.g. `"X25519MLKEM768"` (from rustls on TLS links,
    /// from the ServerHello on QUIC links; `"unknown"` if it could not be read).
    pub fn kx_group(&self) -> &str {
        &self.inner.kx_group
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote
    }

    /// This link's tracing span (fields: peer, transport, kx, remote).
    pub fn span(&self) -> &Span {
        &self.inner.span
    }

    /// Whether this side opens the streams on this link (see the module docs).
    pub fn is_opener(&self) -> bool {
        self.inner.opener
    }

    /// Opens a new bidi stream. Waits while the peer's stream limit is reached.
    /// [`LinkError::NotOpener`] on the side that does not open streams.
    pub async fn open(&self) -> Result<Stream, LinkError> {
        if !self.inner.opener {
            return Err(LinkError::NotOpener);
        }
        if self.refused_here() {
            return Err(LinkError::Closed);
        }
        match &self.inner.conn {
            Conn::Quic { conn, .. } => {
                let (s, r) = conn.open_bi().await.map_err(from_conn)?;
                Ok(Stream::new(
                    u64::from(s.id()),
                    SendHalf::quic(s),
                    RecvHalf::quic(r),
                    &self.inner.span,
                ))
            }
            Conn::Mux(h) => h.open(&self.inner.span).await,
        }
    }

    /// The next stream the peer opened; `None` once the link is closed. On the opening side
    /// (where the peer opens none) this waits for the link to close.
    pub async fn accept(&self) -> Option<Stream> {
        if self.inner.opener {
            self.closed().await;
            return None;
        }
        match &self.inner.conn {
            Conn::Quic { conn, credit, .. } => {
                let (s, r) = conn.accept_bi().await.ok()?;
                let (held, raise) = credit.accepted();
                if let Some(limit) = raise {
                    debug!(parent: &self.inner.span, limit, "peer may open more streams at once");
                    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limit));
                }
                Some(Stream::new(
                    u64::from(s.id()),
                    SendHalf::quic(s),
                    RecvHalf::quic(r).holding(held),
                    &self.inner.span,
                ))
            }
            Conn::Mux(h) => h.accept().await,
        }
    }

    /// Closes the link at once; its streams fail.
    pub fn close(&self) {
        self.inner.close();
    }

    /// Closes the link telling the peer it was refused, and which [`Refusal`] (the detail stays
    /// with the broker, in its log and audit). The peer's pending and later operations fail
    /// with that refusal's error (see also [`Link::explain`]). On QUIC
    /// the close goes out two round trips later (at least 10 ms, at most 1 s), so that a link
    /// refused right after its handshake is not mistaken for a reset. On TLS links it is a
    /// GOAWAY with the refusal code, after which the socket lingers a moment.
    pub fn refuse(&self, why: Refusal) {
        self.inner
            .refused_here
            .store(true, std::sync::atomic::Ordering::Relaxed);
        match &self.inner.conn {
            Conn::Quic { conn, .. } => {
                // Closed the moment the handshake completes, the dialer may not have
                // confirmed it yet, and then tends to see a stateless reset instead of the
                // close (seen on loopback about one time in fifteen). Two round trips later
                // it has; this handle keeps the link from closing plainly before.
                let conn = conn.clone();
                let hold = self.clone();
                let wait = (conn.rtt() * 2).clamp(REFUSE_WAIT_MIN, REFUSE_WAIT_MAX);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    conn.close(quinn::VarInt::from_u32(why.code()), b"refused");
                    drop(hold);
                });
            }
            Conn::Mux(h) => h.refuse(why),
        }
    }

    /// Refines an error of this link or one of its streams into its refusal's error when the
    /// peer refused the link. On TLS links a stream may fail with a plain connection error
    /// while the GOAWAY that carries the refusal is still being processed, so this waits (at
    /// most [`EXPLAIN_WAIT`]) for the link to finish closing before it looks. For failure
    /// paths only: on a link that stays up it returns `e` after that wait.
    pub async fn explain(&self, e: LinkError) -> LinkError {
        if e.refusal().is_some() {
            return e;
        }
        let _ = tokio::time::timeout(EXPLAIN_WAIT, self.closed()).await;
        self.refused().map_or(e, Refusal::error)
    }

    /// How the peer refused this link, if it closed it with a refusal (see [`Link::refuse`]).
    pub fn refused(&self) -> Option<Refusal> {
        match &self.inner.conn {
            Conn::Quic { conn, .. } => conn.close_reason().and_then(|e| from_conn(e).refusal()),
            Conn::Mux(h) => h.refused(),
        }
    }

    /// Resolves once the link is closed, for whatever reason.
    pub async fn closed(&self) {
        match &self.inner.conn {
            Conn::Quic { conn, .. } => {
                conn.closed().await;
            }
            Conn::Mux(h) => h.closed().await,
        }
    }

    /// Whether this side refused the link ([`Link::refuse`]).
    fn refused_here(&self) -> bool {
        self.inner
            .refused_here
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the link is closed, or refused by this side (and about to close).
    pub fn is_closed(&self) -> bool {
        if self.refused_here() {
            return true;
        }
        match &self.inner.conn {
            Conn::Quic { conn, .. } => conn.close_reason().is_some(),
            Conn::Mux(h) => h.is_closed(),
        }
    }

    /// The QUIC path as quinn sees it; `None` on TLS links.
    pub fn quic_path(&self) -> Option<QuicPath> {
        match &self.inner.conn {
            Conn::Quic { conn, .. } => {
                let p = conn.stats().path;
                Some(QuicPath {
                    mtu: p.current_mtu,
                    mtu_probes_sent: p.sent_plpmtud_probes,
                    mtu_probes_lost: p.lost_plpmtud_probes,
                    sent_packets: p.sent_packets,
                    lost_packets: p.lost_packets,
                    black_holes: p.black_holes_detected,
                })
            }
            Conn::Mux(_) => None,
        }
    }

    /// Current round-trip estimate: QUIC's smoothed RTT, or the last keepalive PING on TLS
    /// links (`None` before the first).
    pub fn rtt(&self) -> Option<Duration> {
        match &self.inner.conn {
            Conn::Quic { conn, .. } => Some(conn.rtt()),
            Conn::Mux(h) => h.rtt(),
        }
    }
}

/// Figures of a QUIC link's path (see [`Link::quic_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicPath {
    /// Largest UDP payload in use, from path MTU discovery.
    pub mtu: u16,
    /// Path MTU probes sent, and judged lost (see `path_mtu.rs` for why these should be few).
    pub mtu_probes_sent: u64,
    pub mtu_probes_lost: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets judged lost.
    pub lost_packets: u64,
    /// Times an MTU black hole was detected (the MTU then falls back to 1200 bytes).
    pub black_holes: u64,
}

impl LinkInner {
    fn close(&self) {
        match &self.conn {
            Conn::Quic { conn, .. } => conn.close(quinn::VarInt::from_u32(0), b"closed"),
            Conn::Mux(h) => h.close(),
        }
    }
}

impl Drop for LinkInner {
    fn drop(&mut self) {
        self.close();
    }
}

/// Dials a broker. Verifies the broker's certificate (CA and `server_name`, by `client_tls`),
/// then that its identity is a broker ([`LinkError::WrongPeer`] otherwise). The whole
/// handshake is bounded by `cfg.handshake_timeout`.
pub async fn dial(
    addr: SocketAddr,
    server_name: &str,
    transport: Transport,
    client_tls: Arc<rustls::ClientConfig>,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    let attempt = async {
        match transport {
            Transport::Quic => quic::dial(addr, server_name, client_tls, cfg).await,
            Transport::Tls => tls::dial(addr, server_name, client_tls, cfg).await,
        }
    };
    let r = match tokio::time::timeout(cfg.handshake_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::Timeout("handshake")),
    };
    if let Err(e) = &r {
        telemetry::handshake_failed(transport);
        debug!(%addr, transport = transport.as_str(), error = %e, "dial failed");
    }
    r
}

/// Accepts links on a QUIC and/or a TCP address.
pub struct Listener {
    quic_addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    links: tokio::sync::Mutex<mpsc::Receiver<Link>>,
    refusals: tokio::sync::Mutex<mpsc::Receiver<HandshakeRefusal>>,
    stop: CancellationToken,
    endpoint: Option<quinn::Endpoint>,
    /// Handshakes in progress, one bound per transport: a flood on one (spoofed QUIC
    /// Initials cost an attacker one datagram each) cannot evict the other's.
    pending: [Arc<Pending>; 2],
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("quic_addr", &self.quic_addr)
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

/// A handshake the listener refused for the peer's credential (a certificate of another CA,
/// expired, or not a leaf; none; no Umbra identity), for the application's audit trail (see
/// [`LinkError::is_refused_credential`]). Handshakes that merely failed (timed out, evicted,
/// given up by the peer) or were refused before the peer answered from its address are not
/// reported.
#[derive(Debug, Clone)]
pub struct HandshakeRefusal {
    pub remote: SocketAddr,
    pub transport: Transport,
    /// Why, as the TLS or QUIC stack said it (at most 512 bytes).
    pub reason: String,
}

/// Refusals waiting for [`Listener::refused`]; beyond this many, new ones are only counted
/// (`umbra_link_handshake_failures_total`) and logged.
const REFUSALS_QUEUED: usize = 256;

/// Where finished handshakes go: links to `accept`, refusals to `refused`.
#[derive(Clone)]
struct Sinks {
    links: mpsc::Sender<Link>,
    refusals: mpsc::Sender<HandshakeRefusal>,
    /// Which refused handshakes get an `info` line ([`REFUSAL_LINES`]): anyone can make them
    /// as fast as connections fail, and each line is a write to the log.
    lines: Arc<std::sync::Mutex<crate::budget::Budget<std::net::IpAddr>>>,
}

impl Sinks {
    fn new(links: mpsc::Sender<Link>, refusals: mpsc::Sender<HandshakeRefusal>) -> Sinks {
        let lines = crate::budget::Budget::new(REFUSAL_LINES, std::time::Instant::now());
        Sinks {
            links,
            refusals,
            lines: Arc::new(std::sync::Mutex::new(lines)),
        }
    }
}

/// The budget of `handshake refused` lines: per source address a burst of 10, then one per
/// 10 s; in all a burst of 100, then 10 a second. Beyond it a refusal is a `debug` line, and
/// the source's next `info` line says how many were not logged; every one is counted
/// (`umbra_link_handshake_failures_total`), and what the application records of them (the
/// broker's audit) has a budget of its own.
const REFUSAL_LINES: crate::budget::BudgetConfig = crate::budget::BudgetConfig {
    key_burst: 10.0,
    key_every: Duration::from_secs(10),
    global_burst: 100.0,
    global_per_sec: 10.0,
    max_keys: 4096,
};

impl Listener {
    /// Binds the given addresses (port 0 picks one; see [`Listener::quic_addr`] and
    /// [`Listener::tcp_addr`]) and starts accepting. `server_tls` serves both transports; it
    /// should require client certificates (`ClientAuth::Required`) and offer ALPN
    /// [`crate::ALPN`]. Links without a client certificate are refused either way.
    pub async fn bind(
        quic: Option<SocketAddr>,
        tcp: Option<SocketAddr>,
        server_tls: Arc<rustls::ServerConfig>,
        cfg: LinkConfig,
    ) -> Result<Listener, LinkError> {
        let stop = CancellationToken::new();
        let pending = [
            Pending::new(cfg.max_pending_handshakes),
            Pending::new(cfg.max_pending_handshakes),
        ];
        // Links handshaken but not yet taken by `accept`.
        let (links, rx) = mpsc::channel(cfg.max_pending_handshakes.max(1));
        let (refusals, refused_rx) = mpsc::channel(REFUSALS_QUEUED);
        let tx = Sinks::new(links, refusals);
        let cfg = Arc::new(cfg);

        let mut tcp_addr = None;
        let tcp_listener = match tcp {
            Some(addr) => {
                let l = TcpListener::bind(addr).await?;
                tcp_addr = Some(l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let mut quic_addr = None;
        let endpoint = match quic {
            Some(addr) => {
                let (e, base) = quic::server_endpoint(addr, server_tls.clone(), &cfg)?;
                quic_addr = Some(e.local_addr()?);
                Some((e, Arc::new(base)))
            }
            None => None,
        };
        if let Some(l) = tcp_listener {
            let acceptor = TlsAcceptor::from(server_tls);
            tokio::spawn(accept_tcp(
                l,
                acceptor,
                pending[1].clone(),
                tx.clone(),
                cfg.clone(),
                stop.clone(),
            ));
        }
        if let Some((e, base)) = &endpoint {
            tokio::spawn(accept_quic(
                e.clone(),
                base.clone(),
                pending[0].clone(),
                tx,
                cfg,
                stop.clone(),
            ));
        }
        info!(?quic_addr, ?tcp_addr, "listening");
        let endpoint = endpoint.map(|(e, _)| e);
        Ok(Listener {
            quic_addr,
            tcp_addr,
            links: tokio::sync::Mutex::new(rx),
            refusals: tokio::sync::Mutex::new(refused_rx),
            stop,
            endpoint,
            pending,
        })
    }

    /// Handshakes in progress on both transports (at most `max_pending_handshakes` on each;
    /// each ends by `handshake_timeout`).
    pub fn handshakes_in_progress(&self) -> usize {
        self.pending.iter().map(|p| p.running()).sum()
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// The bound TCP address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The next link whose handshake (with client certificate) completed; `None` once the
    /// listener is closed. Failed or slow handshakes are logged and skipped, never returned.
    pub async fn accept(&self) -> Option<Link> {
        if self.stop.is_cancelled() {
            return None;
        }
        let mut links = self.links.lock().await;
        tokio::select! {
            () = self.stop.cancelled() => None,
            l = links.recv() => l,
        }
    }

    /// The next handshake refused for the peer's fault (see [`HandshakeRefusal`]); `None` once
    /// the listener is closed.
    pub async fn refused(&self) -> Option<HandshakeRefusal> {
        if self.stop.is_cancelled() {
            return None;
        }
        let mut refusals = self.refusals.lock().await;
        tokio::select! {
            () = self.stop.cancelled() => None,
            r = refusals.recv() => r,
        }
    }

    /// Stops accepting: no new links, `accept` returns `None`. Links already accepted stay
    /// up (close them one by one).
    pub fn close(&self) {
        self.stop.cancel();
        if let Some(e) = &self.endpoint {
            e.set_server_config(None);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

async fn accept_tcp(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pending: Arc<Pending>,
    tx: Sinks,
    cfg: Arc<LinkConfig>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off instead of spinning.
                    warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = pending.admit(remote.ip());
        let (acceptor, tx, cfg) = (acceptor.clone(), tx.clone(), cfg.clone());
        tokio::spawn(async move {
            let r = bounded(
                slot,
                cfg.handshake_timeout,
                tls::accept(tcp, remote, acceptor, &cfg),
            )
            .await;
            deliver(r, Transport::Tls, remote, &tx);
        });
    }
}

async fn accept_quic(
    endpoint: quinn::Endpoint,
    base: Arc<quinn::ServerConfig>,
    pending: Arc<Pending>,
    tx: Sinks,
    cfg: Arc<LinkConfig>,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        // Under load, a peer must first show that it receives at its address (a stateless
        // Retry, one round trip): an Initial is one datagram whose source anyone can forge,
        // and otherwise each would take a slot and evict a real handshake.
        if pending.busy() && !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            metrics::counter!("umbra_link_quic_retries_total").increment(1);
            continue;
        }
        let remote = incoming.remote_address();
        let slot = pending.admit(remote.ip());
        let (tx, cfg, base) = (tx.clone(), cfg.clone(), base.clone());
        tokio::spawn(async move {
            let handshake = quic::accept(incoming, &base, &cfg);
            let r = bounded(slot, cfg.handshake_timeout, handshake).await;
            deliver(r, Transport::Quic, remote, &tx);
        });
    }
}

/// Runs a handshake within its deadline and its slot (see `pending.rs`); the slot is freed
/// when this returns.
async fn bounded(
    slot: Slot,
    timeout: Duration,
    handshake: impl Future<Output = Result<Link, LinkError>>,
) -> Result<Link, LinkError> {
    tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => {
            r.unwrap_or(Err(LinkError::Timeout("handshake")))
        }
        () = slot.evicted.cancelled() => {
            Err(LinkError::Timeout("handshake evicted by a newer connection"))
        }
    }
}

/// Hands a finished handshake to `accept`, or logs and counts its failure (and hands a
/// refusal to `refused`).
fn deliver(r: Result<Link, LinkError>, transport: Transport, remote: SocketAddr, tx: &Sinks) {
    let err = match r {
        Ok(link) => {
            match tx.links.try_send(link) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(link)) => {
                    // Links are arriving faster than the application accepts them: shed this
                    // one (its dialer reconnects) rather than queue without bound.
                    warn!(%remote, peer = %link.peer().id, "accept queue full; closing new link");
                }
                // The listener is gone; dropping the link closes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
            return;
        }
        Err(e) => e,
    };
    telemetry::handshake_failed(transport);
    if err.is_peer_fault() {
        let line = tx
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .on_event(Some(remote.ip()), std::time::Instant::now());
        match line {
            crate::budget::Verdict::Record { skipped } => info!(
                %remote, transport = transport.as_str(), error = %err, not_logged = skipped,
                "handshake refused"
            ),
            crate::budget::Verdict::Skip => debug!(
                %remote, transport = transport.as_str(), error = %err,
                "handshake refused (over the log budget)"
            ),
        }
        // Full: the application is behind; the line above and the counter still have it.
        if err.is_refused_credential() {
            let _ = tx.refusals.try_send(HandshakeRefusal {
                remote,
                transport,
                reason: umbra_proto::bounded(&err.to_string(), 512).into_owned(),
            });
        }
    } else {
        debug!(%remote, transport = transport.as_str(), error = %err, "handshake failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of refused handshakes from one address is not a flood of log lines: ten
    /// `info` lines, then one per 10 s; another address still gets its lines, and the
    /// source's next line says how many were not logged.
    #[test]
    fn refused_handshakes_are_logged_within_a_budget() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer({
                let buf = buf.clone();
                move || buf.clone()
            })
            .finish();
        let (links, _l) = mpsc::channel(1);
        let (refusals, _r) = mpsc::channel(1);
        let tx = Sinks::new(links, refusals);
        let flood: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let other: SocketAddr = "198.51.100.2:6000".parse().unwrap();
        tracing::subscriber::with_default(sub, || {
            for _ in 0..1000 {
                deliver(
                    Err(LinkError::Handshake("not TLS")),
                    Transport::Tls,
                    flood,
                    &tx,
                );
            }
            deliver(
                Err(LinkError::Handshake("not TLS")),
                Transport::Tls,
                other,
                &tx,
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines = |from: &str| {
            text.lines()
                .filter(|l| l.contains("handshake refused") && l.contains(from))
                .count()
        };
        assert_eq!(lines("192.0.2.1:5000"), 10, "{text}");
        assert_eq!(lines("198.51.100.2:6000"), 1, "{text}");
        // The source's next line, once its budget is back, counts the 990 not logged.
        let next = tx.lines.lock().unwrap().on_event(
            Some(flood.ip()),
            std::time::Instant::now() + Duration::from_secs(10),
        );
        assert_eq!(next, crate::budget::Verdict::Record { skipped: 990 });
    }
}
