//! The HTTPS server: TLS 1.3 with optional client certificates, HTTP/1.1 and HTTP/2.
//!
//! Run here rather than through `axum::serve` because each request must carry the client
//! certificate its connection was authenticated with: the leaf is read once per connection
//! after the handshake and inserted into every request as a [`ConnPeer`] extension.
//!
//! Bounds, because the API is public (devices enroll through it before they have any
//! credential): at most `max_pending_handshakes` TLS handshakes run at once, and at most
//! `max_anonymous_connections` connections without a client certificate are held, each for
//! at most `anonymous_connection_secs`. A new connection that finds either bound full evicts
//! the oldest one there (`umbra_link::pending`), so connections that stall or idle cannot keep
//! a real client out. Enrolled peers' connections (client certificate) carry long polls and
//! live on, at most `max_connections_per_peer` per identity (more are closed after the
//! handshake); their long polls and heartbeats in flight are bounded per identity too.
//!
//! Shutdown: stop accepting, ask every connection to finish gracefully (long polls end at
//! once, see [`crate::distribution::Distribution::wait_newer`]), then abort what is left
//! after [`DRAIN`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tracing::Instrument;

use umbra_link::pending::Pending;

use crate::state::{ClientAddr, ConnPeer};
use umbra_link::quota::Quota;

/// Longest TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a request's headers (slow clients hold no connection forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests one HTTP/2 connection may have in progress (hyper's default is 200). Each may
/// carry a body of up to its route's limit, so this bounds what one connection can make the
/// controller hold; an identity's long polls (16) and a CLI's calls fit well within it.
const H2_MAX_STREAMS: u32 = 32;
/// The same for a connection without a client certificate (enrollment, the CA, the admin
/// API with its bearer token): up to `max_anonymous_connections` of them come from anyone.
const H2_ANONYMOUS_STREAMS: u32 = 4;
/// HTTP/2 flow-control windows (per stream and per connection) of an anonymous connection:
/// what the controller buffers of bodies no handler has read yet (hyper's default is 1 MiB
/// per connection). Admin uploads larger than this just take more round trips.
const H2_ANONYMOUS_WINDOW: u32 = 64 << 10;
/// Longest time for a request's body to arrive, counted from the first read that has to
/// wait for it (the handler reads right after the headers, on every route that takes a
/// body). Bodies are read into memory (up to the route's limit), so one that trickles in, or
/// stalls, would hold that memory for as long as its connection lives; enrolled peers'
/// connections live long. Answered 408.
pub(crate) const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for a broker's heartbeat, which may carry up to 16 MiB (a busy broker's live
/// streams) over a slow uplink; the broker's own client waits 60 s.
const HEARTBEAT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the body of a request to `path` may take.
fn body_timeout(path: &str) -> Duration {
    if path == "/v1/broker/heartbeat" {
        HEARTBEAT_BODY_TIMEOUT
    } else {
        BODY_READ_TIMEOUT
    }
}

/// A request body that did not arrive in time (see [`BODY_READ_TIMEOUT`]).
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0} s")]
pub(crate) struct BodyTimedOut(u64);

/// Whether `e`, or an error it wraps, is a [`BodyTimedOut`].
pub(crate) fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        cur = err.source();
    }
    false
}
/// How long connections get to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

/// The bounds on connections (see the module docs).
#[derive(Clone)]
pub(crate) struct Limits {
    pub(crate) handshakes: Arc<Pending>,
    pub(crate) anonymous: Arc<Pending>,
    pub(crate) anonymous_for: Duration,
    pub(crate) per_peer: Arc<Quota>,
}

/// Accepts connections until `shutdown` turns true (or its sender is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let acceptor = TlsAcceptor::from(tls.clone());
                    let span = tracing::debug_span!("conn", %remote);
                    conns.spawn(
                        connection(
                            tcp,
                            remote,
                            acceptor,
                            router.clone(),
                            limits.clone(),
                            shutdown.clone(),
                        )
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Usually fd exhaustion: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => if changed.is_err() { break },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::debug!(
            left = conns.len(),
            "aborting connections after drain timeout"
        );
        conns.abort_all();
    }
}

async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let slot = limits.handshakes.admit(remote.ip());
    let handshake = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
        () = slot.evicted.cancelled() => {
            tracing::debug!(%remote, "TLS handshake evicted by a newer connection");
            return;
        }
    };
    drop(slot);
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            return;
        }
    };
    // The verifier has checked the chain to our CA; the identity comes from the leaf only.
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| match umbra_pki::peer_cert(leaf) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!(%remote, error = %e, "client certificate without a usable identity");
                None
            }
        });
    // Without a client certificate: a place among the anonymous connections, for a while.
    let anonymous = peer.is_none().then(|| limits.anonymous.admit(remote.ip()));
    // With one: a place among that identity's connections, for as long as it lasts.
    let _place = match &peer {
        Some(p) => match limits.per_peer.take(&p.id.to_uri()) {
            Some(place) => Some(place),
            None => {
                // Counted, and logged at debug only: the peer could repeat this at will.
                metrics::counter!("umbra_controller_connections_refused_total", "reason" => "per_peer")
                    .increment(1);
                tracing::debug!(
                    %remote,
                    peer = %p.id,
                    max = limits.per_peer.max(),
                    "too many connections from this identity; closing this one"
                );
                return;
            }
        },
        None => None,
    };
    let conn_peer = ConnPeer(peer);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(conn_peer.clone());
        req.extensions_mut().insert(ClientAddr(remote));
        let mut router = router.clone();
        async move {
            let limit = body_timeout(req.uri().path());
            let req: Request = req.map(|b| axum::body::Body::new(Deadline::new(b, limit)));
            // A Router is always ready; `call` directly.
            let resp = router.call(req).await;
            Ok::<_, Infallible>(match resp {
                Ok(r) => r,
                Err(never) => match never {},
            })
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut h2 = builder.http2();
    h2.timer(TokioTimer::new());
    if anonymous.is_some() {
        h2.max_concurrent_streams(H2_ANONYMOUS_STREAMS)
            .initial_stream_window_size(H2_ANONYMOUS_WINDOW)
            .initial_connection_window_size(H2_ANONYMOUS_WINDOW);
    } else {
        h2.max_concurrent_streams(H2_MAX_STREAMS);
    }
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let shutting_down = async {
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    };
    let anonymous_over = async {
        match &anonymous {
            Some(slot) => tokio::select! {
                () = slot.evicted.cancelled() => "evicted by a newer anonymous connection",
                () = tokio::time::sleep(limits.anonymous_for) => "anonymous_connection_secs reached",
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
        _ = shutting_down => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        why = anonymous_over => {
            tracing::debug!(%remote, why, "closing a connection without a client certificate");
            // Requests in progress finish (bounded by the drain time); no new ones start.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// A request body that fails once `limit` has passed since its first read that had to wait
/// (see [`BODY_READ_TIMEOUT`]). A handler that never reads it (a long poll) is not cut.
struct Deadline<B> {
    inner: B,
    limit: Duration,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, limit: Duration) -> Self {
        Deadline {
            inner,
            limit,
            timer: None,
        }
    }
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(limit.as_secs()))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
