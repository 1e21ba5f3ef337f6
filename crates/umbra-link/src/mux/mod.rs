//! The stream multiplexer of TLS/TCP links: many [`Stream`]s over one TLS connection.
//!
//! Owns the wire format (`frame.rs`), per-stream flow control, stream ids and limits,
//! keepalive, and the link's GOAWAY. Built for what a relay needs and no more: every stream is
//! a pair of byte pipes with half-close and reset, opened by one side of the link only (see
//! [`crate::link`] for which).
//!
//! One task per link, the driver, owns the TLS connection and does all its I/O: it reads
//! frames and hands each stream's bytes to that stream's channel, and writes what the streams
//! send it through the link's command channel. A stream half never touches the socket, takes
//! no lock and allocates nothing per chunk: a chunk is a [`Bytes`] sliced from the driver's
//! read buffer on the way in, and given to rustls as it is on the way out. (Only while a
//! stream's reader is behind are its small chunks copied out and gathered, so that they do
//! not each keep a read buffer alive: see [`QUEUE_SLICE_MIN`].) The driver takes no
//! lock per wake-up either: it learns that the link is closing from an atomic flag (see
//! `Shared::close`), not by polling a cancellation token, whose every poll takes a mutex.
//!
//! Flow control is per stream only. Each side announces its stream window in its HELLO; a
//! sender has that much credit per stream, spends it on DATA, and gets it back in CREDIT
//! frames as the receiver's reader takes the bytes (in steps of an eighth of the window). A
//! receiver that gets more than its window for a stream, or credit beyond the window, closes
//! the link: it never buffers more than one window per stream. There is no connection
//! window: one stream whose reader stopped holds its own window and never the others' (a
//! connector's link is shared by every user of its apps). Credit bounds what the peer makes
//! us buffer, not what we queue for it: a peer may return credit for bytes it never read. So
//! the driver stops taking the streams' commands while [`OUT_MAX`] bytes wait for the
//! connection, and senders wait once [`QUEUE_MAX`] DATA bytes wait in the command channel;
//! the driver never stops reading the peer for this, so two links sending both ways do not
//! wait on each other.
//!
//! Relays can have the driver pass a stream's chunks on itself ([`Splice`]): to another
//! link's stream (the broker) or into a TCP socket (agent and connector), whenever the relay
//! has nothing pending and the destination takes the chunk at once; the relay's own loop
//! moves the rest. That spares a task wake-up per chunk on each relay.
//!
//! Stream lifetime: a stream's slot is free on each side once that side has both sent and
//! received the end of the stream (FIN both ways), or sent or received a RESET. TCP keeps
//! frames in order, so the acceptor frees a slot no later than the opener, and the opener can
//! count on the acceptor's `max_streams` (from its HELLO) and waits for a slot instead of
//! being refused. Frames still in flight for a stream that ended here are ignored; frames for
//! one never opened close the link.

mod frame;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info};

pub use frame::MuxFrameError;
use frame::{HEADER_LEN, Header, MAX_DATA, MAX_WINDOW, MIN_WINDOW, next_frame};

use crate::error::LinkError;
use crate::stream::{RecvHalf, SendHalf, Stream};
use crate::transport::{LinkConfig, Refusal};

/// Codes of RESET and GOAWAY frames besides the [`Refusal`] codes.
pub(crate) mod code {
    /// GOAWAY: a plain close. RESET: the stream was aborted by its user.
    pub(crate) const NO_ERROR: u32 = 0;
    /// GOAWAY: the peer broke the protocol.
    pub(crate) const PROTOCOL: u32 = 1;
    /// RESET: the stream was not taken (too many open, or nobody accepting).
    pub(crate) const REFUSED: u32 = 2;
}

/// How a link's multiplexer failed, as its streams and its dialer see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MuxError {
    /// The peer sent a header that is not valid.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] MuxFrameError),
    /// The peer sent a valid frame that breaks the protocol where it came.
    #[error("protocol violation by peer: {0}")]
    Protocol(&'static str),
    /// The peer closed the link with this code (1: it says we broke the protocol).
    #[error("link closed by peer (code {0})")]
    GoAway(u32),
}

/// Read buffer size: one whole DATA frame and its header fit.
const READ_BUF: usize = MAX_DATA as usize + HEADER_LEN;
/// Below this much spare room, the read buffer is re-reserved.
const MIN_READ: usize = 16 * 1024;
/// Payloads up to this size are copied next to their header (one slice for rustls); larger
/// ones are handed over as they are.
const COPY_MAX: usize = 2 * 1024;
/// A received chunk that waits for its stream's reader is kept as a slice of the read buffer
/// only from this size on. A slice keeps its whole read buffer (up to two frames' worth)
/// alive, so a peer sending small DATA frames to a stream whose reader is slow would pin a
/// read buffer per byte of window; smaller chunks are copied out, and gathered while the
/// reader is behind (see [`Entry::queue`]). What a waiting stream holds is then at most about
/// four times its window, whatever sizes the peer sends.
const QUEUE_SLICE_MIN: usize = 32 * 1024;
/// Most slices per vectored write.
const MAX_IOV: usize = 32;
/// Bytes queued for the connection past which the driver takes no more of the streams'
/// commands until it has written some: what it holds for a peer that does not read.
const OUT_MAX: usize = READ_BUF * 4;
/// DATA bytes the streams of one link may have waiting in the command channel; a sender
/// beyond it waits for the driver to take some (see [`Shared::try_queue`]). Credit alone does
/// not bound what a link holds for a peer that stops reading: a peer may return credit for
/// bytes it never read (it cannot be told from one that reads), and the driver goes on
/// reading its frames, so that two links both sending do not wait on each other.
const QUEUE_MAX: u64 = 1 << 20;
/// Frames answered on the peer's behalf (PONG, refused streams) allowed in the output at
/// once; beyond, the peer's frames are not read until the output has drained. An honest peer
/// never gets near: it pings once per keepalive and respects the stream limit.
const MAX_ANSWERS: u32 = 1024;
/// Passes of the driver loop before it yields to other tasks.
const DRIVER_BUDGET: u32 = 64;
/// How long a closing link may take to deliver its GOAWAY.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// How long a refused link's socket stays open after its GOAWAY went out: closing at once
/// would answer data the peer sent meanwhile with a TCP reset, which can reach it before the
/// GOAWAY that says why.
const REFUSE_LINGER: Duration = Duration::from_millis(250);

/// What stream halves and handles ask of the driver.
enum Cmd {
    /// A stream this side opened: register it and announce it.
    Open {
        id: u32,
        entry: Entry,
    },
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    Reset {
        id: u32,
        code: u32,
    },
    /// The reader of stream `id` took `bytes` more.
    Credit {
        id: u32,
        bytes: u32,
    },
    Ping(oneshot::Sender<()>),
    /// From now on, pass stream `id`'s bytes straight to another stream (see [`Splice`]).
    Splice {
        id: u32,
        to: Box<Splice>,
    },
    /// The reader of stream `id` has taken `taken` events in all and passed them on, and
    /// found its channel empty.
    Drained {
        id: u32,
        taken: u64,
    },
}

/// Where the driver passes a stream's incoming bytes itself, instead of through the stream's
/// reader: the sending half of another stream (the broker's relay between an agent's link and
/// a connector's), or the TCP connection a relay copies them to (agent and connector). Saves
/// the relay task's wake-up on every chunk. Only while the reader has passed on everything
/// the channel gave it (no backlog), and the other stream has the credit for the chunk or
/// the socket takes it at once; anything else goes through the channel as usual, and the
/// relay's own loop passes it on. Either way a chunk leaves this link's memory only into the
/// other stream's credit or the kernel, so the bound per stream holds.
struct Splice {
    to: SpliceTo,
    stats: SpliceStats,
}

enum SpliceTo {
    Stream {
        link: Arc<Shared>,
        id: u32,
        stream: Arc<StreamShared>,
    },
    Tcp(Arc<TcpStream>),
}

/// What a spliced chunk counts, as the relay loop would have counted it.
pub(crate) struct SpliceStats {
    /// Chunks moved (the relay's idle watch reads it).
    pub(crate) progress: Arc<AtomicU64>,
    /// Bytes moved this way.
    pub(crate) total: Arc<AtomicU64>,
    pub(crate) metric: metrics::Counter,
}

/// What the driver hands a stream's reader, in order.
enum Event {
    Data(Bytes),
    Fin,
    Reset(u32),
}

/// How a link ended.
#[derive(Debug, Clone)]
enum End {
    /// Closed here.
    Local,
    /// The peer closed the connection (EOF) or sent GOAWAY with this code.
    Peer(u32),
    /// The peer broke the protocol.
    Mux(MuxError),
    /// The socket or TLS failed.
    Io(io::ErrorKind),
}

/// State of a link shared by its handle, its streams, the driver and keepalive.
struct Shared {
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Cancelled once the link has ended or is closing, for whoever waits on that. Only
    /// [`Shared::close`] and the driver itself cancel it: the driver does not poll it (a
    /// token's poll takes its mutex, once per wake-up of the driver) but reads `closing`.
    closed: CancellationToken,
    /// Set by [`Shared::close`]: the driver ends at its next poll (`driver` wakes it).
    closing: AtomicBool,
    /// The driver task's waker, registered on every poll: `close` must reach a driver that
    /// waits on a socket the peer has stopped reading, not only one that polls its commands.
    driver: AtomicWaker,
    /// Why the link ended; set before `closed` is cancelled by the driver.
    end: OnceLock<End>,
    rtt_nanos: AtomicU64,
    /// Set (to the refusal's code) before `closed` is cancelled by [`MuxConn::refuse`]: the
    /// driver then sends a GOAWAY with that code and lingers. 0 until then.
    refusing: AtomicU32,
    /// Receive-side credit is returned in steps of this many bytes.
    credit_step: u32,
    /// DATA bytes in the command channel, at most [`QUEUE_MAX`]: senders add, the driver
    /// takes away as it takes their commands.
    queued: AtomicU64,
    /// A sender found no room in `queued` and waits on `room`.
    blocked: AtomicBool,
    room: Notify,
}

impl Shared {
    /// Closes the link from this side: the driver sends a GOAWAY (with `refusing`'s code, if
    /// set) and ends.
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.driver.wake();
        self.closed.cancel();
    }

    /// The error of an operation on this link after it ended.
    fn error(&self) -> LinkError {
        match self.end.get() {
            Some(End::Peer(code)) => match Refusal::from_code(*code) {
                Some(r) => r.error(),
                None if *code == code::NO_ERROR => LinkError::Closed,
                None => LinkError::Mux(MuxError::GoAway(*code)),
            },
            Some(End::Mux(e)) => LinkError::Mux(e.clone()),
            Some(End::Io(kind)) => LinkError::Io(io::Error::from(*kind)),
            Some(End::Local) | None => LinkError::Closed,
        }
    }

    fn send(&self, c: Cmd) -> Result<(), LinkError> {
        self.cmds.send(c).map_err(|_| self.error())
    }

    /// Counts `n` more DATA bytes into the command channel, if they fit under [`QUEUE_MAX`].
    fn try_queue(&self, n: u64) -> bool {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q + n <= QUEUE_MAX).then_some(q + n)
            })
            .is_ok()
    }

    /// Counts `n` more DATA bytes into the command channel, once they fit.
    async fn queue(&self, n: u64) -> Result<(), LinkError> {
        if self.try_queue(n) {
            return Ok(());
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // Stored before the retry, and the driver loads it after taking bytes away:
            // either the retry sees room, or the driver sees a sender waiting.
            self.blocked.store(true, Ordering::SeqCst);
            if self.try_queue(n) {
                return Ok(());
            }
            tokio::select! {
                _ = room => {}
                _ = self.closed.cancelled() => return Err(self.error()),
            }
        }
    }

    /// The driver took `n` DATA bytes out of the command channel.
    fn dequeued(&self, n: u64) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
        if self.blocked.load(Ordering::SeqCst) && self.blocked.swap(false, Ordering::SeqCst) {
            self.room.notify_waiters();
        }
    }
}

/// What a stream's halves and the driver share.
struct StreamShared {
    /// What this side may still send (the peer's window minus bytes not yet credited back).
    credit: AtomicU64,
    /// [`OPEN`] while open, `code + 1` once the peer reset it, [`GONE`] once the link ended.
    state: AtomicU64,
    /// Wakes the sender waiting for credit (or for the news that there will be none).
    notify: Notify,
    /// Wakes whoever waits for the stream's end by reset or by the link's end
    /// ([`MuxSend::aborted`]); `notify` has one waiter only, the sender.
    ended: Notify,
    /// Events the reader has taken from its channel (it stores, the driver loads).
    taken: AtomicU64,
    /// Set by the driver while it holds small chunks back for the reader (see
    /// [`Entry::queue`]): a reader that finds its channel empty then says so.
    held: AtomicBool,
}

const OPEN: u64 = 0;
const GONE: u64 = u64::MAX;

impl StreamShared {
    fn new(credit: u32) -> Arc<StreamShared> {
        Arc::new(StreamShared {
            credit: AtomicU64::new(u64::from(credit)),
            state: AtomicU64::new(OPEN),
            notify: Notify::new(),
            ended: Notify::new(),
            taken: AtomicU64::new(0),
            held: AtomicBool::new(false),
        })
    }

    fn end(&self, state: u64) {
        let _ = self
            .state
            .compare_exchange(OPEN, state, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
        self.ended.notify_waiters();
    }
}

/// The error of a stream the peer reset with `code`.
fn reset_error(code: u32) -> LinkError {
    Refusal::from_code(code).map_or(LinkError::StreamReset(u64::from(code)), Refusal::error)
}

#[cfg(test)]
impl MuxConn {
    /// Makes the next stream id `id`, to reach the end of the id space in a test.
    pub(crate) fn skip_ids_to(&self, id: u32) {
        if let Side::Opener { next_id, .. } = &self.side {
            *next_id.lock().unwrap_or_else(PoisonError::into_inner) = id;
        }
    }
}

/// The multiplexer side of a TLS link.
pub(crate) struct MuxConn {
    shared: Arc<Shared>,
    side: Side,
}

enum Side {
    /// We open streams: ids count up from 1, and at most the peer's `max_streams` at once.
    Opener {
        next_id: Mutex<u32>,
        slots: Arc<Semaphore>,
        peer_window: u32,
    },
    /// The peer opens streams; the driver queues them here (at most `max_streams`: a queued
    /// stream counts as open).
    Acceptor(tokio::sync::Mutex<mpsc::UnboundedReceiver<Stream>>),
}

impl MuxConn {
    pub(crate) async fn open(&self, span: &Span) -> Result<Stream, LinkError> {
        let Side::Opener {
            next_id,
            slots,
            peer_window,
        } = &self.side
        else {
            return Err(LinkError::NotOpener);
        };
        if self.shared.closed.is_cancelled() {
            return Err(self.shared.error());
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(|_| self.shared.error())?,
            () = self.shared.closed.cancelled() => return Err(self.shared.error()),
        };
        let stream = StreamShared::new(*peer_window);
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Entry::new(tx, stream.clone(), Some(slot));
        // Ids must reach the wire in order: take the next one and queue its Open together.
        let id = {
            let mut next = next_id.lock().unwrap_or_else(PoisonError::into_inner);
            let id = *next;
            let Some(after) = id.checked_add(1) else {
                // Out of ids (2^32 opens on one link): a link left up but unable to open
                // would still be chosen for streams. Closed, it is dialed again.
                drop(next);
                self.shared.close();
                return Err(LinkError::Closed);
            };
            *next = after;
            self.shared.send(Cmd::Open { id, entry })?;
            id
        };
        Ok(new_stream(id, stream, rx, &self.shared, span))
    }

    pub(crate) async fn accept(&self) -> Option<Stream> {
        match &self.side {
            Side::Acceptor(rx) => rx.lock().await.recv().await,
            Side::Opener { .. } => {
                self.shared.closed.cancelled().await;
                None
            }
        }
    }

    pub(crate) fn close(&self) {
        self.shared.close();
    }

    /// See [`crate::Link::refuse`]: a GOAWAY with the refusal's code, then the close.
    pub(crate) fn refuse(&self, why: Refusal) {
        self.shared.refusing.store(why.code(), Ordering::Relaxed);
        self.shared.close();
    }

    pub(crate) fn refused(&self) -> Option<Refusal> {
        match self.shared.end.get() {
            Some(End::Peer(code)) => Refusal::from_code(*code),
            _ => None,
        }
    }

    pub(crate) async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    pub(crate) fn token(&self) -> CancellationToken {
        self.shared.closed.clone()
    }
}

fn new_stream(
    id: u32,
    stream: Arc<StreamShared>,
    rx: mpsc::UnboundedReceiver<Event>,
    link: &Arc<Shared>,
    span: &Span,
) -> Stream {
    let send = MuxSend {
        id,
        stream: stream.clone(),
        link: link.clone(),
    };
    let recv = MuxRecv {
        id,
        rx,
        stream: stream.clone(),
        link: link.clone(),
        unacked: 0,
        done: None,
        taken: 0,
        reported: None,
    };
    Stream::new(
        u64::from(id),
        SendHalf::mux(send),
        RecvHalf::mux(recv),
        span,
    )
}

/// The sending half of a stream.
pub(crate) struct MuxSend {
    id: u32,
    stream: Arc<StreamShared>,
    link: Arc<Shared>,
}

impl MuxSend {
    /// Sends `b` within the stream's credit, waiting for more as needed: at most one window
    /// of this stream is ever queued.
    pub(crate) async fn send(&mut self, mut b: Bytes) -> Result<(), LinkError> {
        while !b.is_empty() {
            let credit = self.credit().await?;
            let n = usize::try_from(credit)
                .unwrap_or(usize::MAX)
                .min(b.len())
                .min(MAX_DATA as usize);
            // Only this sender spends the stream's credit meanwhile (a splice into this stream
            // waits until the relay is back reading, see `Entry::try_splice`).
            self.link.queue(n as u64).await?;
            let piece = if n == b.len() {
                std::mem::take(&mut b)
            } else {
                b.split_to(n)
            };
            self.stream.credit.fetch_sub(n as u64, Ordering::AcqRel);
            self.link.send(Cmd::Data {
                id: self.id,
                data: piece,
                fin: false,
            })?;
        }
        Ok(())
    }

    /// Resolves, with the error a send would get, once the stream was reset (by the peer, or
    /// here) or its link ended; never while it is open or after it ended well. Holds no
    /// borrow of this half, so a relay can wait for it while the half is busy sending.
    pub(crate) fn aborted(&self) -> impl Future<Output = LinkError> + Send + 'static {
        let (stream, link) = (self.stream.clone(), self.link.clone());
        async move {
            loop {
                // Enabled before the state is read: an end in between is not missed.
                let ended = stream.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                match stream.state.load(Ordering::Acquire) {
                    OPEN => ended.await,
                    GONE => return link.error(),
                    reset => return reset_error(u32::try_from(reset - 1).unwrap_or(0)),
                }
            }
        }
    }

    /// The credit available, once there is some.
    async fn credit(&self) -> Result<u64, LinkError> {
        loop {
            match self.stream.state.load(Ordering::Acquire) {
                OPEN => {}
                GONE => return Err(self.link.error()),
                reset => return Err(reset_error(u32::try_from(reset - 1).unwrap_or(0))),
            }
            let c = self.stream.credit.load(Ordering::Acquire);
            if c > 0 {
                return Ok(c);
            }
            // `notify_one` keeps a permit when nobody waits: credit granted between the load
            // above and this wait is not missed.
            self.stream.notify.notified().await;
        }
    }

    pub(crate) fn finish(&mut self) -> Result<(), LinkError> {
        self.link.send(Cmd::Data {
            id: self.id,
            data: Bytes::new(),
            fin: true,
        })
    }

    pub(crate) fn reset(&mut self) {
        // Err: the link is gone, and the stream with it.
        let _ = self.link.send(Cmd::Reset {
            id: self.id,
            code: code::NO_ERROR,
        });
    }
}

/// The receiving half of a stream.
pub(crate) struct MuxRecv {
    id: u32,
    rx: mpsc::UnboundedReceiver<Event>,
    stream: Arc<StreamShared>,
    link: Arc<Shared>,
    /// Bytes taken and not yet credited back.
    unacked: u32,
    /// `Some(None)` once the peer finished, `Some(Some(code))` once it reset.
    done: Option<Option<u32>>,
    /// Events taken from the channel.
    taken: u64,
    /// Spliced only: `taken` as last reported to the driver (`u64::MAX` before the first).
    reported: Option<u64>,
}

impl MuxRecv {
    /// Has the driver pass this stream's bytes to `to` itself, when it can (see [`Splice`]).
    /// Call once, before reading the data phase with [`MuxRecv::recv`], which goes on
    /// returning what the driver could not pass on.
    pub(crate) fn splice(&mut self, to: &MuxSend, stats: SpliceStats) {
        let to = SpliceTo::Stream {
            link: to.link.clone(),
            id: to.id,
            stream: to.stream.clone(),
        };
        self.splice_to(to, stats);
    }

    /// Has the driver write this stream's bytes to `tcp` itself, when the socket takes them
    /// at once (see [`Splice`]); [`MuxRecv::recv`] returns the rest.
    pub(crate) fn splice_tcp(&mut self, tcp: Arc<TcpStream>, stats: SpliceStats) {
        self.splice_to(SpliceTo::Tcp(tcp), stats);
    }

    fn splice_to(&mut self, to: SpliceTo, stats: SpliceStats) {
        let to = Box::new(Splice { to, stats });
        if self.link.send(Cmd::Splice { id: self.id, to }).is_ok() {
            self.reported = Some(u64::MAX);
        }
    }

    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        match self.done {
            Some(None) => return Ok(None),
            Some(Some(code)) => return Err(reset_error(code)),
            None => {}
        }
        let event = match self.rx.try_recv() {
            Ok(ev) => Some(ev),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Everything taken so far has been passed on (this is the relay's next read):
                // a spliced stream's driver may pass bytes on itself again. And a driver
                // holding small chunks back hands them over now. (`held` is loaded after
                // `taken` was stored; the driver stores `held` before it loads `taken`: one
                // of the two sees the other.)
                let spliced = self.reported.is_some_and(|r| r != self.taken);
                if spliced || self.stream.held.load(Ordering::SeqCst) {
                    if spliced {
                        self.reported = Some(self.taken);
                    }
                    let _ = self.link.send(Cmd::Drained {
                        id: self.id,
                        taken: self.taken,
                    });
                }
                self.rx.recv().await
            }
        };
        if event.is_some() {
            self.taken += 1;
            self.stream.taken.store(self.taken, Ordering::SeqCst);
        }
        match event {
            Some(Event::Data(b)) => {
                self.took(b.len());
                Ok(Some(b))
            }
            Some(Event::Fin) => {
                self.done = Some(None);
                Ok(None)
            }
            Some(Event::Reset(code)) => {
                self.done = Some(Some(code));
                Err(reset_error(code))
            }
            None => Err(self.link.error()),
        }
    }

    fn took(&mut self, n: usize) {
        // n <= MAX_DATA: the driver only delivers checked frames.
        self.unacked = self
            .unacked
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        if self.unacked >= self.link.credit_step {
            let bytes = std::mem::take(&mut self.unacked);
            let _ = self.link.send(Cmd::Credit { id: self.id, bytes });
        }
    }
}

impl Drop for MuxRecv {
    fn drop(&mut self) {
        // Dropped before the peer's end: tell it to stop (it ends the stream both ways).
        if self.done.is_none() {
            let _ = self.link.send(Cmd::Reset {
                id: self.id,
                code: code::NO_ERROR,
            });
        }
    }
}

/// The driver's record of one live stream.
struct Entry {
    tx: mpsc::UnboundedSender<Event>,
    stream: Arc<StreamShared>,
    /// Bytes received and not yet credited back: at most our window.
    buffered: u32,
    sent_end: bool,
    received_end: bool,
    /// Opener: this stream's place under the peer's stream limit.
    _slot: Option<OwnedSemaphorePermit>,
    /// Where the driver passes this stream's bytes itself, if anywhere.
    splice: Option<Box<Splice>>,
    /// Events sent down `tx` in all.
    pushed: u64,
    /// Some events sent down `tx` may not have been passed on yet: splicing waits.
    backlog: bool,
    /// Spliced bytes not yet credited back.
    unacked: u32,
    /// Small chunks received while the reader was behind, not yet sent down `tx`.
    held: Vec<u8>,
    /// Listed in the driver's `unsettled`.
    unsettled: bool,
    /// `stream.held` is set: the reader is to say when it has drained its channel.
    asked: bool,
}

impl Entry {
    /// Hands `data`, received and not passed on, to the stream's reader; `true` if small
    /// chunks are held back and [`Entry::settle`] must run once the frames at hand are done.
    ///
    /// A chunk of [`QUEUE_SLICE_MIN`] or more goes down the channel as it is, and so does any
    /// chunk for a reader that has taken everything sent so far. Otherwise it is
    /// copied into `held`, which goes down the channel (as one chunk, in its own allocation)
    /// once it reaches that size, or when the reader has taken everything sent so far: at
    /// once for a reader that keeps up, and for one that does not, one chunk per catch-up
    /// instead of one per frame. Either way at most one small chunk per stream keeps a read
    /// buffer alive.
    fn queue(&mut self, data: Bytes) -> bool {
        // A reader that has taken everything takes this too, soon: as it is. (One slice per
        // stream at most, then, for a reader that stops; the rest is gathered.)
        let caught_up =
            self.held.is_empty() && self.stream.taken.load(Ordering::SeqCst) == self.pushed;
        if data.len() >= QUEUE_SLICE_MIN || caught_up {
            self.release();
            self.push(Event::Data(data));
            return false;
        }
        self.held.extend_from_slice(&data);
        // Nothing may overtake what is held: no splicing until the reader has drained.
        self.backlog = true;
        if self.held.len() >= QUEUE_SLICE_MIN {
            self.release();
            return false;
        }
        true
    }

    /// Sends what is held down the channel.
    fn release(&mut self) {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.push(Event::Data(Bytes::from(held)));
        }
        if self.asked {
            self.asked = false;
            self.stream.held.store(false, Ordering::SeqCst);
        }
    }

    /// Releases what is held if the reader has taken everything sent so far; otherwise asks
    /// the reader to say when it has.
    fn settle(&mut self) {
        self.unsettled = false;
        if self.held.is_empty() {
            return;
        }
        if !self.asked {
            self.asked = true;
            self.stream.held.store(true, Ordering::SeqCst);
        }
        if self.stream.taken.load(Ordering::SeqCst) == self.pushed {
            self.release();
        }
    }

    /// Hands `ev` to the stream's reader.
    fn push(&mut self, ev: Event) {
        // Err: the reader is gone, and its reset on the way.
        let _ = self.tx.send(ev);
        self.pushed += 1;
        self.backlog = true;
    }

    /// Passes as much of `payload` on as the splice can take at once (see [`Splice`]): the
    /// number of bytes passed, from the front.
    fn try_splice(&mut self, payload: &Bytes) -> usize {
        let Some(sp) = self.splice.as_ref() else {
            return 0;
        };
        if self.backlog {
            return 0;
        }
        let passed = match &sp.to {
            SpliceTo::Stream { link, id, stream } => {
                let len = payload.len() as u64;
                // Nobody else spends this credit now: the relay's sender only sends what our
                // channel gave it, and the channel has been drained.
                if stream.state.load(Ordering::Acquire) != OPEN
                    || stream.credit.load(Ordering::Acquire) < len
                    || !link.try_queue(len)
                {
                    return 0;
                }
                stream.credit.fetch_sub(len, Ordering::AcqRel);
                let data = Cmd::Data {
                    id: *id,
                    data: payload.clone(),
                    fin: false,
                };
                if link.cmds.send(data).is_err() {
                    // The other link is gone; the relay finds out through its own send.
                    stream.credit.fetch_add(len, Ordering::AcqRel);
                    link.dequeued(len);
                    return 0;
                }
                payload.len()
            }
            // Nobody else writes now either: the relay only writes what our channel gave it.
            // An error is left for the relay's own write to meet.
            SpliceTo::Tcp(tcp) => match tcp.try_write(payload) {
                Ok(n) => n,
                Err(_) => return 0,
            },
        };
        if passed > 0 {
            sp.stats.progress.fetch_add(1, Ordering::Relaxed);
            sp.stats.total.fetch_add(passed as u64, Ordering::Relaxed);
            sp.stats.metric.increment(passed as u64);
        }
        passed
    }

    fn new(
        tx: mpsc::UnboundedSender<Event>,
        stream: Arc<StreamShared>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Entry {
        Entry {
            tx,
            stream,
            buffered: 0,
            sent_end: false,
            received_end: false,
            _slot: slot,
            splice: None,
            pushed: 0,
            backlog: false,
            unacked: 0,
            held: Vec::new(),
            unsettled: false,
            asked: false,
        }
    }
}

/// Runs the multiplexer's handshake (a HELLO each way) on an established TLS connection and
/// starts the link's driver and keepalive. The caller bounds it with the handshake timeout.
/// A GOAWAY in place of the peer's HELLO is its refusal.
pub(crate) async fn start<T>(
    mut io: T,
    opener: bool,
    cfg: &LinkConfig,
    span: &Span,
) -> Result<MuxConn, LinkError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let window = cfg.stream_window.clamp(MIN_WINDOW, MAX_WINDOW);
    let max_streams = if opener { 0 } else { cfg.max_streams };
    let hello = Header::Hello {
        window,
        max_streams,
    };
    io.write_all(&hello.encode()).await?;
    io.flush().await?;
    let mut head = [0u8; HEADER_LEN];
    io.read_exact(&mut head).await?;
    let (peer_window, peer_max_streams) = match Header::decode(&head) {
        Ok(Header::Hello {
            window,
            max_streams,
        }) => (window, max_streams),
        Ok(Header::GoAway { code }) => {
            return Err(Refusal::from_code(code)
                .map_or(LinkError::Mux(MuxError::GoAway(code)), Refusal::error));
        }
        Ok(_) => {
            return Err(LinkError::Mux(MuxError::Protocol(
                "first frame is not HELLO",
            )));
        }
        Err(e) => return Err(LinkError::Mux(e.into())),
    };
    if opener && peer_max_streams == 0 {
        return Err(LinkError::Mux(MuxError::Protocol(
            "peer accepts no streams on a link where we open them",
        )));
    }

    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        cmds,
        closed: CancellationToken::new(),
        closing: AtomicBool::new(false),
        driver: AtomicWaker::new(),
        end: OnceLock::new(),
        rtt_nanos: AtomicU64::new(0),
        refusing: AtomicU32::new(0),
        credit_step: (window / 8).max(1),
        queued: AtomicU64::new(0),
        blocked: AtomicBool::new(false),
        room: Notify::new(),
    });
    let (side, accept) = if opener {
        let slots = (peer_max_streams as usize).min(Semaphore::MAX_PERMITS);
        let side = Side::Opener {
            next_id: Mutex::new(1),
            slots: Arc::new(Semaphore::new(slots)),
            peer_window,
        };
        (side, None)
    } else {
        // Bounded by the stream limit, since a queued stream counts as open; the driver never
        // waits on the application. A burst of opens (a connector's link after a broker's
        // restart) waits here instead of being refused.
        let (tx, rx) = mpsc::unbounded_channel();
        (Side::Acceptor(tokio::sync::Mutex::new(rx)), Some(tx))
    };
    let driver = Driver {
        io,
        link: shared.clone(),
        cmds: cmd_rx,
        streams: HashMap::new(),
        accept,
        last_id: 0,
        window,
        peer_window,
        max_streams: cfg.max_streams,
        rbuf: BytesMut::with_capacity(READ_BUF),
        unsettled: Vec::new(),
        out: Output::default(),
        answers: 0,
        ping: None,
        ping_seq: 0,
        flushed: true,
        span: span.clone(),
    };
    // Not instrumented: the driver is polled for every frame, and entering the link's span
    // each time costs more than the rest of the poll; its lines name the span.
    tokio::spawn(driver.run());
    tokio::spawn(
        keepalive(shared.clone(), cfg.keepalive, cfg.idle_timeout).instrument(span.clone()),
    );
    Ok(MuxConn { shared, side })
}

/// Frames waiting to be written, in order: headers and small payloads copied into `stage`,
/// large payloads queued as they are.
#[derive(Default)]
struct Output {
    stage: BytesMut,
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Output {
    fn frame(&mut self, h: Header, payload: Bytes) {
        self.stage.extend_from_slice(&h.encode());
        self.len += HEADER_LEN + payload.len();
        if payload.len() <= COPY_MAX {
            self.stage.extend_from_slice(&payload);
        } else {
            if !self.stage.is_empty() {
                self.queue.push_back(self.stage.split().freeze());
            }
            self.queue.push_back(payload);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes everything queued; `Pending` once the connection takes no more.
    fn poll_write<T: AsyncWrite + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.stage.is_empty() {
                self.queue.push_back(self.stage.split().freeze());
            }
            if self.queue.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut k = 0;
            for (slot, b) in iov.iter_mut().zip(self.queue.iter()) {
                *slot = IoSlice::new(b);
                k += 1;
            }
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &iov[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.len -= n;
            while n > 0 {
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                if front.len() <= n {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
    }
}

/// The task that owns a link's connection.
struct Driver<T> {
    io: T,
    link: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    streams: HashMap<u32, Entry>,
    /// Acceptor: where streams the peer opens are queued.
    accept: Option<mpsc::UnboundedSender<Stream>>,
    /// The highest stream id announced on this link (by the peer, or by us as opener).
    last_id: u32,
    /// Our receive window per stream, and the peer's.
    window: u32,
    peer_window: u32,
    /// Acceptor: most streams the peer may hold open at once.
    max_streams: u32,
    rbuf: BytesMut,
    /// Streams holding small chunks back, to settle once the frames at hand are handled.
    unsettled: Vec<u32>,
    out: Output,
    /// Frames queued on the peer's behalf since the output last drained.
    answers: u32,
    /// Our PING awaiting its PONG.
    ping: Option<(u32, oneshot::Sender<()>)>,
    ping_seq: u32,
    /// Everything written has been flushed to the socket.
    flushed: bool,
    span: Span,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    async fn run(mut self) {
        let end = poll_fn(|cx| self.poll_drive(cx)).await;
        let goaway = match &end {
            End::Local => Some(self.link.refusing.load(Ordering::Relaxed)),
            End::Mux(_) => Some(code::PROTOCOL),
            End::Peer(_) | End::Io(_) => None,
        };
        match &end {
            End::Local => debug!(parent: &self.span, "link closed"),
            End::Peer(code) => debug!(parent: &self.span, code, "link ended by peer"),
            End::Mux(e) => info!(parent: &self.span, error = %e, "closing link"),
            End::Io(kind) => debug!(parent: &self.span, error = %kind, "link ended"),
        }
        // Streams see why from here on.
        let _ = self.link.end.set(end);
        self.link.closed.cancel();
        for (_, mut e) in self.streams.drain() {
            e.release();
            e.stream.end(GONE);
        }
        self.accept = None;
        self.ping = None;
        if let Some(code) = goaway {
            // After what is queued, not instead of it: the connection may hold part of a
            // frame already, and a GOAWAY cut into it would reach the peer as garbage.
            self.out.frame(Header::GoAway { code }, Bytes::new());
            let io = &mut self.io;
            let out = &mut self.out;
            let sent = tokio::time::timeout(CLOSE_FLUSH, async {
                poll_fn(|cx| out.poll_write(io, cx)).await?;
                io.shutdown().await
            });
            let _ = sent.await;
            if Refusal::from_code(code).is_some() {
                tokio::time::sleep(REFUSE_LINGER).await;
                debug!(parent: &self.span, "link refused");
            }
        }
    }

    /// Moves frames both ways until the link ends.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        // Registered before `closing` is read: a close in between still wakes this task.
        self.link.driver.register(cx.waker());
        if self.link.closing.load(Ordering::Acquire) {
            return Poll::Ready(End::Local);
        }
        for _ in 0..DRIVER_BUDGET {
            let mut progress = false;
            // What the streams send, while the connection takes it: past `OUT_MAX` the
            // commands wait in the channel, where their DATA counts against `QUEUE_MAX`.
            while self.out.len < OUT_MAX {
                match self.cmds.poll_recv(cx) {
                    Poll::Ready(Some(cmd)) => self.on_cmd(cmd),
                    Poll::Ready(None) => return Poll::Ready(End::Local),
                    Poll::Pending => break,
                }
                progress = true;
            }
            // Out to the connection.
            if !self.out.is_empty() {
                // Commands were left in the channel while the output was full, and its waker
                // is not registered then (the last receive found something): once there is
                // room again, the next pass must take them, or they wait for the peer's next
                // frame to wake this task.
                let was_full = self.out.len >= OUT_MAX;
                match self.out.poll_write(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => {
                        // Reading may have paused for the answers just written.
                        progress |= self.answers > 0 || was_full;
                        self.answers = 0;
                        self.flushed = false;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Io(e.kind())),
                    Poll::Pending => progress |= was_full && self.out.len < OUT_MAX,
                }
            }
            if !self.flushed {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flushed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Io(e.kind())),
                    Poll::Pending => {}
                }
            }
            // In from the connection, unless the peer has us answering too much already:
            // then frames wait, unparsed, until the answers are out.
            if self.answers < MAX_ANSWERS {
                // Frames left in the buffer while answers were capped.
                if let Err(end) = self.on_input() {
                    return Poll::Ready(end);
                }
            }
            if self.answers < MAX_ANSWERS {
                if self.rbuf.capacity() - self.rbuf.len() < MIN_READ {
                    self.rbuf.reserve(READ_BUF);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(End::Peer(code::NO_ERROR)),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(end) = self.on_input() {
                            return Poll::Ready(end);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Io(e.kind())),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open { id, entry } => {
                self.last_id = id;
                self.streams.insert(id, entry);
                let open = Header::Data {
                    stream: id,
                    open: true,
                    fin: false,
                    len: 0,
                };
                self.out.frame(open, Bytes::new());
            }
            Cmd::Data { id, data, fin } => {
                if !data.is_empty() {
                    self.link.dequeued(data.len() as u64);
                }
                let Some(e) = self.streams.get_mut(&id) else {
                    // Reset meanwhile: the bytes have nowhere to go.
                    return;
                };
                if e.sent_end {
                    return;
                }
                let len = u32::try_from(data.len()).unwrap_or(MAX_DATA);
                let h = Header::Data {
                    stream: id,
                    open: false,
                    fin,
                    len,
                };
                self.out.frame(h, data);
                if fin {
                    e.sent_end = true;
                    if e.received_end {
                        self.streams.remove(&id);
                    }
                }
            }
            Cmd::Reset { id, code } => {
                if let Some(e) = self.streams.remove(&id) {
                    e.stream.end(u64::from(code) + 1);
                    self.out
                        .frame(Header::Reset { stream: id, code }, Bytes::new());
                }
            }
            Cmd::Credit { id, bytes } => {
                if let Some(e) = self.streams.get_mut(&id) {
                    e.buffered = e.buffered.saturating_sub(bytes);
                    if !e.received_end {
                        self.out
                            .frame(Header::Credit { stream: id, bytes }, Bytes::new());
                    }
                }
            }
            Cmd::Splice { id, to } => {
                if let Some(e) = self.streams.get_mut(&id) {
                    // Until the reader says it has passed on what it was given.
                    e.backlog = true;
                    e.splice = Some(to);
                }
            }
            Cmd::Drained { id, taken } => {
                if let Some(e) = self.streams.get_mut(&id) {
                    if taken == e.pushed {
                        e.release();
                    }
                    e.backlog = e.pushed != taken;
                }
            }
            Cmd::Ping(done) => {
                self.ping_seq = self.ping_seq.wrapping_add(1);
                self.ping = Some((self.ping_seq, done));
                self.out.frame(
                    Header::Ping {
                        opaque: self.ping_seq,
                    },
                    Bytes::new(),
                );
            }
        }
    }

    /// Handles the whole frames in the read buffer, up to the cap on answers, then settles
    /// the streams that hold small chunks back.
    fn on_input(&mut self) -> Result<(), End> {
        let r = self.on_frames();
        for id in self.unsettled.drain(..) {
            if let Some(e) = self.streams.get_mut(&id) {
                e.settle();
            }
        }
        r
    }

    fn on_frames(&mut self) -> Result<(), End> {
        while self.answers < MAX_ANSWERS {
            match next_frame(&mut self.rbuf) {
                Ok(Some((h, payload))) => self.on_frame(h, payload)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::Mux(e.into())),
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, h: Header, payload: Bytes) -> Result<(), End> {
        let violation = |what| Err(End::Mux(MuxError::Protocol(what)));
        match h {
            Header::Data {
                stream,
                open,
                fin,
                len,
            } => {
                if open {
                    self.on_open(stream)?;
                }
                let Some(e) = self.streams.get_mut(&stream) else {
                    return self.ended_stream(stream);
                };
                if e.received_end {
                    return violation("data after the end of a stream");
                }
                e.buffered = e.buffered.saturating_add(len);
                if e.buffered > self.window {
                    return violation("more data than the stream window");
                }
                if len > 0 {
                    let passed = e.try_splice(&payload);
                    if passed > 0 {
                        // passed <= len <= MAX_DATA
                        let bytes = u32::try_from(passed).unwrap_or(len);
                        e.buffered -= bytes;
                        e.unacked = e.unacked.saturating_add(bytes);
                        if e.unacked >= self.link.credit_step && !fin {
                            let credit = Header::Credit {
                                stream,
                                bytes: std::mem::take(&mut e.unacked),
                            };
                            self.out.frame(credit, Bytes::new());
                        }
                    }
                    if passed < payload.len() && e.queue(payload.slice(passed..)) && !e.unsettled {
                        e.unsettled = true;
                        self.unsettled.push(stream);
                    }
                }
                if fin {
                    e.release();
                    e.push(Event::Fin);
                    e.received_end = true;
                    if e.sent_end {
                        self.streams.remove(&stream);
                    }
                }
            }
            Header::Credit { stream, bytes } => {
                let Some(e) = self.streams.get_mut(&stream) else {
                    return self.ended_stream(stream);
                };
                let before = e
                    .stream
                    .credit
                    .fetch_add(u64::from(bytes), Ordering::AcqRel);
                if before + u64::from(bytes) > u64::from(self.peer_window) {
                    return violation("credit beyond the stream window");
                }
                e.stream.notify.notify_one();
            }
            Header::Reset { stream, code } => {
                let Some(mut e) = self.streams.remove(&stream) else {
                    return self.ended_stream(stream);
                };
                e.stream.end(u64::from(code) + 1);
                e.release();
                e.push(Event::Reset(code));
            }
            Header::Ping { opaque } => {
                self.answers += 1;
                self.out.frame(Header::Pong { opaque }, Bytes::new());
            }
            Header::Pong { opaque } => {
                if self.ping.as_ref().is_some_and(|(seq, _)| *seq == opaque)
                    && let Some((_, done)) = self.ping.take()
                {
                    let _ = done.send(());
                }
            }
            Header::GoAway { code } => return Err(End::Peer(code)),
            Header::Hello { .. } => return violation("a second HELLO"),
        }
        Ok(())
    }

    /// A stream the peer announces.
    fn on_open(&mut self, id: u32) -> Result<(), End> {
        let Some(accept) = &self.accept else {
            return Err(End::Mux(MuxError::Protocol(
                "the peer opened a stream on a link where we open them",
            )));
        };
        if id <= self.last_id {
            return Err(End::Mux(MuxError::Protocol(
                "stream ids out of order or reused",
            )));
        }
        self.last_id = id;
        if self.streams.len() >= self.max_streams as usize {
            self.answers += 1;
            let refuse = Header::Reset {
                stream: id,
                code: code::REFUSED,
            };
            self.out.frame(refuse, Bytes::new());
            return Ok(());
        }
        let stream = StreamShared::new(self.peer_window);
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams
            .insert(id, Entry::new(tx, stream.clone(), None));
        let s = new_stream(id, stream, rx, &self.link, &self.span);
        if let Err(mpsc::error::SendError(mut s)) = accept.send(s) {
            debug!(parent: &self.span, stream = id, "nobody accepts streams; refusing");
            s.reset();
        }
        Ok(())
    }

    /// A frame for a stream not (or no longer) in the table: fine if the stream ended here
    /// (frames in flight), a violation if it was never announced.
    fn ended_stream(&self, id: u32) -> Result<(), End> {
        if id <= self.last_id {
            Ok(())
        } else {
            Err(End::Mux(MuxError::Protocol(
                "frame for a stream never opened",
            )))
        }
    }
}

/// Pings the peer every `every`; no answer within `idle` closes the link.
async fn keepalive(link: Arc<Shared>, every: Duration, idle: Duration) {
    loop {
        tokio::select! {
            () = link.closed.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let (done, answered) = oneshot::channel();
        if link.cmds.send(Cmd::Ping(done)).is_err() {
            return;
        }
        let start = Instant::now();
        let r = tokio::select! {
            () = link.closed.cancelled() => return,
            r = tokio::time::timeout(idle, answered) => r,
        };
        match r {
            Ok(Ok(())) => {
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                link.rtt_nanos.store(nanos.max(1), Ordering::Relaxed);
            }
            // The driver ended.
            Ok(Err(_)) => return,
            Err(_) => {
                info!(
                    idle_secs = idle.as_secs_f64(),
                    "peer silent past idle timeout; closing link"
                );
                link.close();
                return;
            }
        }
    }
}

/// Not API: for `fuzz/` (target `mux`) and its corpus replay test only.
///
/// Runs a multiplexer against `data[1..]` as everything a peer sends (starting with its
/// HELLO), then the peer's end of file; `data[0] & 1` says whether the multiplexer opens the
/// streams (it opens one and sends a few bytes) or accepts them (it reads every stream it
/// gets). Panics if the link is still up after the peer's end of file, or if what the
/// multiplexer wrote is not whole, valid frames starting with its HELLO. Returns whether the
/// link started.
#[doc(hidden)]
pub fn fuzz_peer(data: &[u8]) -> bool {
    let Some((&mode, peer)) = data.split_first() else {
        return false;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return false;
    };
    let opener = mode & 1 == 1;
    let peer = peer.to_vec();
    let bound = Duration::from_secs(5);
    let (started, out) = rt.block_on(async move {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        tokio::spawn(async move {
            let _ = wr.write_all(&peer).await;
            let _ = wr.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        let cfg = LinkConfig {
            max_streams: 4,
            ..LinkConfig::default().with_stream_window_kib(16)
        };
        let started = tokio::time::timeout(bound, start(ours, opener, &cfg, &Span::none())).await;
        let started = match started {
            Ok(Ok(conn)) => {
                let use_it = async {
                    if opener {
                        if let Ok(mut s) = conn.open(&Span::none()).await {
                            let _ = s.send_chunk(Bytes::from_static(b"hello")).await;
                            let _ = s.finish().await;
                            while let Ok(Some(_)) = s.recv_chunk().await {}
                        }
                    } else {
                        while let Some(mut s) = conn.accept().await {
                            while let Ok(Some(_)) = s.recv_chunk().await {}
                        }
                    }
                    conn.closed().await;
                };
                assert!(
                    tokio::time::timeout(bound, use_it).await.is_ok(),
                    "the link outlived its peer's end of file"
                );
                true
            }
            Ok(Err(_)) => false,
            Err(_) => panic!("the handshake outlived its peer's end of file"),
        };
        let out = tokio::time::timeout(bound, reader).await;
        (started, out)
    });
    let Ok(Ok(out)) = out else {
        panic!("the multiplexer kept its connection open");
    };
    let mut out = BytesMut::from(&out[..]);
    let mut first = true;
    while !out.is_empty() {
        match next_frame(&mut out) {
            Ok(Some((h, _))) => {
                assert!(!first || matches!(h, Header::Hello { .. }), "{h:?} first");
                first = false;
            }
            other => panic!("the multiplexer wrote {other:?}"),
        }
    }
    started
}
