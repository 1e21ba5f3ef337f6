//! One bidirectional stream on a link, over either transport: header-frame I/O for the
//! stream's first exchange, then chunk I/O for the data phase.
//!
//! Chunks are [`Bytes`] handed to and taken from quinn and the multiplexer without copying. On
//! QUIC a stream is a QUIC bidi stream; on TLS links a stream of Umbra's own multiplexer
//! (`mux/`).
//!
//! Semantics shared by both transports:
//! - [`Stream::finish`] half-closes: the peer's `recv_chunk` returns `None` once it has read
//!   everything; this side can keep receiving.
//! - [`Stream::reset`] aborts both ways; so does dropping a `Stream` whose sending half was not
//!   finished (data still queued may then be lost; call `finish` after a final reply).
//! - The peer learns of a stream opened with [`crate::Link::open`] when the opener first writes
//!   on QUIC (which announces streams with their first frame), at once on TLS links; every
//!   Umbra stream starts with the opener's header frame, so this never delays anything.
//! - Nothing here has a deadline. Callers bound frame reads and writes with
//!   `tokio::time::timeout`; `read_frame` keeps partial input across a cancelled call, so a
//!   timed-out read can be retried, but usually the stream is reset instead.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tracing::Span;
use umbra_proto::Frame;
use umbra_proto::frame::FrameError;

use crate::error::LinkError;
use crate::mux::{MuxRecv, MuxSend, SpliceStats};

/// One bidirectional stream. See the module docs for half-close and reset semantics.
pub struct Stream {
    id: u64,
    pub(crate) send: SendHalf,
    pub(crate) recv: RecvHalf,
    span: Span,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

impl Stream {
    pub(crate) fn new(id: u64, send: SendHalf, recv: RecvHalf, link_span: &Span) -> Stream {
        let span = tracing::info_span!(parent: link_span, "stream", id);
        Stream {
            id,
            send,
            recv,
            span,
        }
    }

    /// The transport's stream id (QUIC stream id, or the multiplexer's), unique on its link.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This stream's tracing span (child of its link's span, field `id`).
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Reads one header frame.
    ///
    /// Input is refused as soon as its 4-byte header is bad (version, kind, or a length over
    /// [`umbra_proto::frame::MAX_PAYLOAD`]), so at most one frame's worth is ever buffered.
    /// Bytes after the frame are kept and returned first by [`Stream::recv_chunk`].
    /// Errors: [`LinkError::Frame`] for malformed input, [`LinkError::StreamEnded`] if the peer
    /// finished first. No deadline: wrap in `tokio::time::timeout`.
    pub async fn read_frame(&mut self) -> Result<Frame, LinkError> {
        self.recv.read_frame().await
    }

    /// Writes one header frame. [`LinkError::Encode`] if a field is too long to encode.
    pub async fn write_frame(&mut self, f: &Frame) -> Result<(), LinkError> {
        let mut v = Vec::with_capacity(64);
        f.encode(&mut v).map_err(LinkError::Encode)?;
        self.send.send(Bytes::from(v)).await
    }

    /// Next chunk of data from the peer; `None` once the peer has finished its half.
    pub async fn recv_chunk(&mut self) -> Result<Option<Bytes>, LinkError> {
        self.recv.recv().await
    }

    /// Sends a chunk, waiting for flow-control credit (on TLS links the chunk is cut to the
    /// credit available, so at most one stream window is ever queued per stream).
    pub async fn send_chunk(&mut self, b: Bytes) -> Result<(), LinkError> {
        self.send.send(b).await
    }

    /// Half-closes: no more data from this side. Idempotent.
    pub async fn finish(&mut self) -> Result<(), LinkError> {
        self.send.finish()
    }

    /// Aborts the stream both ways: the peer's reads and writes fail with
    /// [`LinkError::StreamReset`].
    pub fn reset(&mut self) {
        self.send.reset();
        self.recv.stop();
    }

    pub(crate) fn into_parts(self) -> (SendHalf, RecvHalf, Span) {
        (self.send, self.recv, self.span)
    }
}

/// The sending half. Dropping it unfinished resets the stream.
pub(crate) struct SendHalf {
    inner: SendInner,
    /// Finished or reset: nothing more may be sent, and drop has nothing to do.
    done: bool,
}

enum SendInner {
    Quic(quinn::SendStream),
    Mux(MuxSend),
}

impl SendHalf {
    pub(crate) fn quic(s: quinn::SendStream) -> SendHalf {
        SendHalf {
            inner: SendInner::Quic(s),
            done: false,
        }
    }

    pub(crate) fn mux(s: MuxSend) -> SendHalf {
        SendHalf {
            inner: SendInner::Mux(s),
            done: false,
        }
    }

    pub(crate) async fn send(&mut self, b: Bytes) -> Result<(), LinkError> {
        if self.done {
            return Err(LinkError::Closed);
        }
        if b.is_empty() {
            return Ok(());
        }
        match &mut self.inner {
            SendInner::Quic(s) => s.write_chunk(b).await.map_err(LinkError::from),
            SendInner::Mux(s) => s.send(b).await,
        }
    }

    pub(crate) fn finish(&mut self) -> Result<(), LinkError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        match &mut self.inner {
            SendInner::Quic(s) => s.finish().map_err(|_| LinkError::Closed),
            SendInner::Mux(s) => s.finish(),
        }
    }

    /// Resolves, with why, once the peer aborted the stream (QUIC: STOP_SENDING; a TLS link:
    /// RESET) or its link is gone; never while the stream is healthy, nor once it ended
    /// well. Holds no borrow of this half. A relay whose two directions are both parked (its
    /// TCP peer reads nothing and sends nothing) learns from it at once that the broker
    /// ended the stream (access revoked, the other side gone), instead of at its idle limit.
    pub(crate) fn aborted(&self) -> std::pin::Pin<Box<dyn Future<Output = LinkError> + Send>> {
        match &self.inner {
            SendInner::Quic(s) => {
                let stopped = s.stopped();
                Box::pin(async move {
                    match stopped.await {
                        Ok(Some(code)) => LinkError::StreamReset(code.into_inner()),
                        // Finished and every byte acknowledged: nothing more can abort it.
                        Ok(None) => std::future::pending().await,
                        Err(quinn::StoppedError::ConnectionLost(c)) => crate::error::from_conn(c),
                        Err(quinn::StoppedError::ZeroRttRejected) => LinkError::Closed,
                    }
                })
            }
            SendInner::Mux(s) => Box::pin(s.aborted()),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.done = true;
        match &mut self.inner {
            // Errors mean the stream is already gone, which is what was asked for.
            SendInner::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(0));
            }
            SendInner::Mux(s) => s.reset(),
        }
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        // quinn would finish an unfinished stream on drop, which would make an aborted
        // transfer look complete to the peer. Make both transports reset.
        if !self.done {
            self.reset();
        }
    }
}

/// The receiving half, with the bytes read past a header frame.
pub(crate) struct RecvHalf {
    inner: RecvInner,
    /// Bytes that followed the last header frame in its chunk: the data phase starts here.
    leftover: Option<Bytes>,
    /// A header frame spanning chunks, kept across cancelled `read_frame` calls.
    partial: BytesMut,
    /// On streams a QUIC peer opened: counts the stream open on its link until dropped.
    _held: Option<crate::quic_streams::Held>,
}

enum RecvInner {
    Quic(quinn::RecvStream),
    Mux(MuxRecv),
    Ended,
}

impl RecvHalf {
    fn with(inner: RecvInner) -> RecvHalf {
        RecvHalf {
            inner,
            leftover: None,
            partial: BytesMut::new(),
            _held: None,
        }
    }

    /// This half counts its stream as open on its link until it is dropped.
    pub(crate) fn holding(mut self, held: crate::quic_streams::Held) -> RecvHalf {
        self._held = Some(held);
        self
    }

    pub(crate) fn quic(r: quinn::RecvStream) -> RecvHalf {
        RecvHalf::with(RecvInner::Quic(r))
    }

    pub(crate) fn mux(r: MuxRecv) -> RecvHalf {
        RecvHalf::with(RecvInner::Mux(r))
    }

    /// Lets the link's driver pass this half's bytes to `to` itself when both are streams of
    /// TLS links (see `mux::Splice`); elsewhere nothing changes. `recv` goes on returning
    /// whatever the driver does not pass on.
    pub(crate) fn splice(&mut self, to: &SendHalf, stats: impl FnOnce() -> SpliceStats) {
        if let (RecvInner::Mux(r), SendInner::Mux(s)) = (&mut self.inner, &to.inner) {
            r.splice(s, stats());
        }
    }

    /// The same towards a TCP connection: on TLS links the driver writes this half's bytes to
    /// `tcp` itself when the socket takes them at once.
    pub(crate) fn splice_tcp(&mut self, tcp: &Arc<TcpStream>, stats: impl FnOnce() -> SpliceStats) {
        if let RecvInner::Mux(r) = &mut self.inner {
            r.splice_tcp(tcp.clone(), stats());
        }
    }

    pub(crate) async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        if let Some(b) = self.leftover.take() {
            return Ok(Some(b));
        }
        self.recv_raw().await
    }

    async fn recv_raw(&mut self) -> Result<Option<Bytes>, LinkError> {
        match &mut self.inner {
            RecvInner::Quic(r) => match r.read_chunk(usize::MAX, true).await? {
                Some(c) => Ok(Some(c.bytes)),
                None => {
                    self.inner = RecvInner::Ended;
                    Ok(None)
                }
            },
            RecvInner::Mux(r) => r.recv().await,
            RecvInner::Ended => Ok(None),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, LinkError> {
        loop {
            let chunk = match self.recv().await? {
                Some(c) => c,
                None if self.partial.is_empty() => return Err(LinkError::StreamEnded),
                None => return Err(LinkError::Frame(FrameError::Truncated)),
            };
            if self.partial.is_empty() {
                // Usual case: the whole frame in one chunk, decoded in place.
                match Frame::decode(&chunk)? {
                    Some((f, used)) => {
                        if used < chunk.len() {
                            self.leftover = Some(chunk.slice(used..));
                        }
                        return Ok(f);
                    }
                    None => self.partial.extend_from_slice(&chunk),
                }
            } else {
                // `decode` has accepted the header, so `partial` stays below one maximal
                // frame plus one chunk.
                self.partial.extend_from_slice(&chunk);
                if let Some((f, used)) = Frame::decode(&self.partial)? {
                    let rest = self.partial.split_off(used);
                    self.partial = BytesMut::new();
                    if !rest.is_empty() {
                        self.leftover = Some(rest.freeze());
                    }
                    return Ok(f);
                }
            }
        }
    }

    pub(crate) fn stop(&mut self) {
        if let RecvInner::Quic(r) = &mut self.inner {
            // Err: already finished or stopped.
            let _ = r.stop(quinn::VarInt::from_u32(0));
        }
        self.inner = RecvInner::Ended;
        self.leftover = None;
    }
}
