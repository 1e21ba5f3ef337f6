//! The relay copy loops: stream to stream (the broker) and TCP to stream (agent and connector).
//!
//! Both run the two directions concurrently in the caller's task and end when both have
//! ended:
//! - half-close: end of input one way finishes (mux) or shuts down (TCP) the other side's
//!   write half, and the other direction keeps running until it ends too;
//! - idle timeout: no chunk moved either way for `idle` (checked every `idle / 4`) ends the
//!   relay with [`LinkError::Timeout`]; `Duration::ZERO` disables it;
//! - a stream aborted by the other side (reset, access revoked, its link gone) ends the
//!   relay at once, also while both directions are parked (a peer that neither reads nor
//!   sends: nothing else would notice before the idle limit);
//! - any error ends both directions and resets both streams, and the TCP connection is
//!   reset too (RST, not FIN): a transfer cut short anywhere on the path (the far end reset,
//!   a link lost, the idle limit, access revoked) must not reach a client or a service as a
//!   clean end of data, which `nc > file` and every read-until-EOF protocol would take for a
//!   complete one. Only a relay that ended well closes its TCP connection gracefully.
//!
//! The loops do not enter the stream's span per poll (entering an enabled span costs a few
//! µs per message on this path); their log lines name it as `parent` instead.
//!
//! Per chunk the loops do no allocation of their own, take no lock and read no clock: byte
//! counts go to [`Counters`] and to metric handles resolved once per relay (relaxed atomic
//! adds). `relay_streams` forwards the received [`Bytes`] as they are (no copy, no buffer, so
//! an idle stream holds no buffer memory); `relay_tcp` reads TCP into one [`BytesMut`] per
//! direction and hands out frozen slices of it; `reserve` reuses the allocation once the
//! transport has dropped the previous chunks. Between two streams of TLS links,
//! `relay_streams` has the links' drivers pass chunks on themselves while the other stream
//! has credit (`mux::Splice`): no wake-up of the relay task per chunk; its loops move the
//! rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::error::LinkError;
use crate::mux::SpliceStats;
use crate::stream::{RecvHalf, SendHalf, Stream};
use crate::telemetry;

/// Size of TCP reads.
const TCP_CHUNK: usize = 64 * 1024;
/// Below this much spare room the read buffer is re-reserved to `TCP_CHUNK`.
const TCP_MIN_READ: usize = 16 * 1024;

/// Bytes relayed, shared by reference (or `Arc`) with whoever reports them. Each count is
/// an `Arc` of its own because a TLS link's driver adds what it splices (see
/// [`relay_streams`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Towards the service: `a -> b` in [`relay_streams`]; in [`relay_tcp`], from the client's
    /// TCP connection or to the service's.
    pub up: Arc<AtomicU64>,
    /// Back towards the client.
    pub down: Arc<AtomicU64>,
}

/// Relays between two streams until both directions have ended (see the module docs).
/// `up` counts `a -> b`. Runs in `a`'s span.
pub async fn relay_streams(
    a: Stream,
    b: Stream,
    idle: Duration,
    counters: &Counters,
) -> Result<(), LinkError> {
    let (mut a_send, mut a_recv, span) = a.into_parts();
    let (mut b_send, mut b_recv, _) = b.into_parts();
    let (m_up, m_down) = telemetry::relay_bytes();
    let progress = Arc::new(AtomicU64::new(0));
    // Between two TLS links the links' drivers pass chunks on themselves while they can,
    // sparing this task a wake-up per chunk; the pumps below then move only what they could
    // not (a chunk the other stream had no credit for, and what follows it) and the ends.
    let stats = |total: &Arc<AtomicU64>, metric: &Counter| {
        let (progress, total, metric) = (progress.clone(), total.clone(), metric.clone());
        move || SpliceStats {
            progress,
            total,
            metric,
        }
    };
    a_recv.splice(&b_send, stats(&counters.up, &m_up));
    b_recv.splice(&a_send, stats(&counters.down, &m_down));
    // Either side's end aborted (see `SendHalf::aborted`): the pumps may both be parked.
    let (a_aborted, b_aborted) = (gated(a_send.aborted()), gated(b_send.aborted()));
    let r = async {
        let up = pump(&mut a_recv, &mut b_send, &progress, &counters.up, &m_up);
        let down = pump(&mut b_recv, &mut a_send, &progress, &counters.down, &m_down);
        tokio::select! {
            r = async { tokio::try_join!(up, down).map(|_| ()) } => r,
            () = idle_watch(&progress, idle) => Err(LinkError::Timeout("relay idle")),
            e = a_aborted => Err(e),
            e = b_aborted => Err(e),
        }
    }
    .await;
    if let Err(e) = &r {
        debug!(parent: &span, error = %e, "relay ended");
        a_send.reset();
        a_recv.stop();
        b_send.reset();
        b_recv.stop();
    }
    r
}

async fn pump(
    src: &mut RecvHalf,
    dst: &mut SendHalf,
    progress: &AtomicU64,
    total: &AtomicU64,
    metric: &Counter,
) -> Result<(), LinkError> {
    while let Some(chunk) = src.recv().await? {
        let n = chunk.len() as u64;
        dst.send(chunk).await?;
        total.fetch_add(n, Ordering::Relaxed);
        metric.increment(n);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    dst.finish()
}

/// Which end of a stream's path a TCP connection is, for which way its bytes count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEnd {
    /// The user's client (the agent's side): what it sends goes `up`, towards the service.
    Client,
    /// The service (the connector's side): what it sends goes `down`, back to the client.
    Service,
}

/// Relays between a TCP connection and a stream until both directions have ended (see the
/// module docs). `up` counts the bytes towards the service: TCP -> stream when `tcp` is the
/// [`TcpEnd::Client`], stream -> TCP when it is the [`TcpEnd::Service`]. Runs in the stream's
/// span.
pub async fn relay_tcp(
    tcp: TcpStream,
    s: Stream,
    end: TcpEnd,
    idle: Duration,
    counters: &Counters,
) -> Result<(), LinkError> {
    let (mut send, mut recv, span) = s.into_parts();
    let (m_up, m_down) = telemetry::relay_bytes();
    // (count, metric) of the bytes read from TCP, and of those written to it.
    let ((in_total, m_in), (out_total, m_out)) = match end {
        TcpEnd::Client => ((&counters.up, m_up), (&counters.down, m_down)),
        TcpEnd::Service => ((&counters.down, m_down), (&counters.up, m_up)),
    };
    // Until the relay has ended well, closing this connection resets it: also when this
    // future is dropped (a connector ending a stream whose target was unpublished).
    abort_on_close(&tcp);
    let progress = Arc::new(AtomicU64::new(0));
    // Shared, not split: on a TLS link the link's driver writes what arrives to the socket
    // itself whenever the socket takes it at once (`mux::Splice`), sparing this task a
    // wake-up per chunk; `down` below writes the rest.
    let tcp = Arc::new(tcp);
    recv.splice_tcp(&tcp, || SpliceStats {
        progress: progress.clone(),
        total: out_total.clone(),
        metric: m_out.clone(),
    });
    // The stream aborted (see `SendHalf::aborted`): `up` may be parked reading a silent
    // peer and `down` writing to one that reads nothing, and neither would see it.
    let aborted = gated(send.aborted());
    let r = async {
        let up = async {
            let mut buf = BytesMut::with_capacity(TCP_CHUNK);
            loop {
                if buf.capacity() < TCP_MIN_READ {
                    buf.reserve(TCP_CHUNK);
                }
                if read_some(&tcp, &mut buf).await? == 0 {
                    break;
                }
                let chunk = buf.split().freeze();
                let n = chunk.len() as u64;
                send.send(chunk).await?;
                in_total.fetch_add(n, Ordering::Relaxed);
                m_in.increment(n);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            send.finish()
        };
        let down = async {
            while let Some(chunk) = recv.recv().await? {
                write_all(&tcp, &chunk).await?;
                let n = chunk.len() as u64;
                out_total.fetch_add(n, Ordering::Relaxed);
                m_out.increment(n);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            socket2::SockRef::from(&*tcp).shutdown(std::net::Shutdown::Write)?;
            Ok::<(), LinkError>(())
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down).map(|_| ()) } => r,
            () = idle_watch(&progress, idle) => Err(LinkError::Timeout("relay idle")),
            e = aborted => Err(e),
        }
    }
    .await;
    match &r {
        Ok(()) => {
            // Both directions ended (FIN each way): close gracefully, sending what the
            // socket still holds.
            if let Err(e) = socket2::SockRef::from(&*tcp).set_linger(None) {
                debug!(parent: &span, error = %e, "cannot clear SO_LINGER");
            }
        }
        Err(e) => {
            debug!(parent: &span, error = %e, "relay ended");
            send.reset();
            recv.stop();
        }
    }
    r
}

/// Makes closing `tcp` reset the connection (SO_LINGER 0: RST, unsent data discarded) rather
/// than end it with a FIN, which the other end would read as a complete transfer.
fn abort_on_close(tcp: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "cannot set SO_LINGER");
    }
}

/// Closes a TCP connection that will carry nothing (its stream was denied or could not be
/// opened) with a reset, so the client sees a refusal, not an empty answer.
pub fn reset_tcp(tcp: TcpStream) {
    abort_on_close(&tcp);
    drop(tcp);
}

/// Reads what `tcp` has into `buf`, waiting for some: 0 at end of input.
async fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        tcp.readable().await?;
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

/// Writes all of `b` to `tcp`.
async fn write_all(tcp: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `f`, polled only once it asked to be (its waker was woken), not at every wake-up of the
/// relay task that awaits it: `select!` polls every branch at each wake-up, that is with
/// every chunk, and an abort watch waits on a tokio `Notify`, whose every poll takes a lock.
fn gated<F: Future + Unpin>(f: F) -> Gated<F> {
    Gated {
        inner: f,
        gate: Arc::new(Gate {
            // The first poll polls `f`, which registers its waker.
            woken: std::sync::atomic::AtomicBool::new(true),
            outer: atomic_waker::AtomicWaker::new(),
        }),
    }
}

struct Gated<F> {
    inner: F,
    gate: Arc<Gate>,
}

struct Gate {
    /// `inner`'s waker was woken since it was last polled.
    woken: std::sync::atomic::AtomicBool,
    /// The task awaiting the [`Gated`].
    outer: atomic_waker::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // Registered before `woken` is read: a wake in between is not missed.
        self.gate.outer.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(self.gate.clone());
        std::pin::Pin::new(&mut self.inner).poll(&mut std::task::Context::from_waker(&waker))
    }
}

/// Returns once `progress` has not moved for `idle` (never, for a zero `idle`).
async fn idle_watch(progress: &AtomicU64, idle: Duration) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let tick = (idle / 4).max(Duration::from_millis(1));
    let mut seen = progress.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= idle {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};

    /// A gated future is polled at its first poll and then only after its own waker was
    /// woken, however often the task awaiting it is; and it is ready as soon as that is.
    #[test]
    fn a_gated_future_is_polled_only_when_it_asked_to_be() {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let polls = Arc::new(AtomicU64::new(0));
        let counted = polls.clone();
        let inner = std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut rx).poll(cx)
        });
        let mut g = gated(inner);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(std::pin::Pin::new(&mut g).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once, at first");
        tx.send(5).unwrap();
        assert_eq!(std::pin::Pin::new(&mut g).poll(&mut cx), Poll::Ready(Ok(5)));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
