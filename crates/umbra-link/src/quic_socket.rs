//! The UDP socket under every QUIC endpoint: quinn-udp's socket state, driven by tokio with
//! two changes that matter for a relay.
//!
//! **Large MTUs.** Path MTU discovery runs up to the largest UDP payload, so that a path with a
//! large MTU (jumbo frames, loopback's 64 KiB) carries large packets: most of QUIC's cost is
//! per packet, not per byte. quinn batches up to 10 packets of one size into a single GSO send,
//! and the kernel refuses a GSO send whose total payload exceeds one IP datagram (about 64 KiB)
//! with `EMSGSIZE`, which quinn-udp drops silently. Two 32 KiB packets would then be lost every
//! time; the losses shrink the congestion window and trip quinn's black-hole detector, which
//! falls back to 1200-byte packets. [`UdpIo::try_send`] splits such a batch into sends that
//! fit. On a 1500-byte path a batch (10 × 1452 bytes) always fits and passes through unchanged.
//!
//! **No wake-up per packet sent.** quinn's tokio socket registers for writability as well as
//! readability. A UDP socket reports "writable" again each time the kernel frees a sent packet,
//! so every send brought one more `epoll_wait` round. Here the socket is registered for reads
//! only; writability is watched only after a send found the buffer full (a duplicate of the
//! descriptor is registered for writes until it fires). And a receive that returned fewer
//! datagrams than asked for has emptied the queue, so it marks the socket not readable
//! instead of asking the kernel once more just to hear `EAGAIN` (a datagram arriving later
//! raises a new readiness event).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The largest UDP payload of one IPv4 datagram (65535 − 20 − 8); IPv6 allows 20 bytes more.
/// A GSO send carries at most this much in all.
pub(crate) const MAX_GSO_PAYLOAD: usize = 65_507;

/// Byte ranges of `len` bytes of `segment`-sized packets, each range a whole number of
/// packets and at most `limit` bytes (at least one packet, even if that one is larger).
pub(crate) fn gso_chunks(
    len: usize,
    segment: usize,
    limit: usize,
) -> impl Iterator<Item = Range<usize>> {
    let segment = segment.max(1);
    let step = (limit / segment).max(1) * segment;
    (0..len)
        .step_by(step)
        .map(move |start| start..len.min(start + step))
}

/// A UDP socket for quinn (see the module docs).
pub(crate) struct UdpIo {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send found the buffer full and no writability event has been seen since. quinn asks
    /// its poller before every send; until then the answer is "writable" without a syscall.
    full: AtomicBool,
}

impl UdpIo {
    /// Takes over a bound socket (made non-blocking here).
    pub(crate) fn new(socket: std::net::UdpSocket) -> io::Result<UdpIo> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(UdpIo {
            io,
            state,
            full: AtomicBool::new(false),
        })
    }

    fn send_one(&self, t: &Transmit) -> io::Result<()> {
        // `send`, not `try_send`: quinn-udp reports only WouldBlock and logs the rest (a
        // datagram refused by the kernel is a loss that QUIC recovers from).
        let r = self.state.send(self.io.get_ref().into(), t);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.full.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpIo")
            .field("local", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for UdpIo {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            watch: None,
        })
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let Some(segment) = t
            .segment_size
            .filter(|_| t.contents.len() > MAX_GSO_PAYLOAD)
        else {
            return self.send_one(t);
        };
        // On WouldBlock quinn retries the whole batch once the socket is writable. If a first
        // part went out already, its packets arrive twice and the receiver drops the copies by
        // packet number: cheaper than losses, which would trip the black-hole detector.
        for r in gso_chunks(t.contents.len(), segment, MAX_GSO_PAYLOAD) {
            let part = &t.contents[r];
            self.send_one(&Transmit {
                destination: t.destination,
                ecn: t.ecn,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: t.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let asked = bufs.len().min(meta.len()).min(BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    // recvmmsg stops early only when the queue is empty. Clearing keeps any
                    // readiness the driver saw after this guard was taken.
                    if n < asked {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // WouldBlock: `try_io` cleared the readiness; wait for the next event.
                Err(_) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Registers `fd` with the runtime's reactor for `interest` only.
///
/// tokio deprecates the safe constructor because an arbitrary `AsRawFd` type could hand out a
/// different descriptor later; `std::net::UdpSocket` and `OwnedFd` own theirs for life, which
/// is the condition the replacement (`unsafe fn register_with_interest`) asks of its caller.
#[allow(deprecated)]
fn register<T: std::os::fd::AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(fd, interest)
}

/// Tells quinn when to send: at once, unless a send found the buffer full; then a duplicate
/// of the descriptor is registered for writability until it fires.
struct WritablePoller {
    socket: Arc<UdpIo>,
    watch: Option<AsyncFd<OwnedFd>>,
}

impl fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritablePoller")
            .field("watching", &self.watch.is_some())
            .finish()
    }
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.full.load(Ordering::Relaxed) {
            this.watch = None;
            return Poll::Ready(Ok(()));
        }
        let watch = match &mut this.watch {
            Some(w) => w,
            slot @ None => {
                let fd = this.socket.io.get_ref().as_fd().try_clone_to_owned()?;
                slot.insert(register(fd, Interest::WRITABLE)?)
            }
        };
        ready!(watch.poll_write_ready(cx))?.retain_ready();
        // Writable (or an error, which the next send reports): stop watching, so that later
        // sends raise no events. Registering checks the current state, so room that appeared
        // between the failed send and the registration is not missed.
        this.socket.full.store(false, Ordering::Relaxed);
        this.watch = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quinn::Runtime;

    use super::*;

    /// Three 30,000-byte packets as one GSO transmit to `to`.
    fn batch(to: SocketAddr, contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: Some(30_000),
            src_ip: None,
        }
    }

    fn received(rx: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0; 70_000];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// `try_send` once the socket is writable, as quinn's connection driver does.
    async fn send(sock: Arc<dyn AsyncUdpSocket>, t: &Transmit<'_>) {
        let mut poller = sock.clone().create_io_poller();
        loop {
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                .await
                .unwrap();
            match sock.try_send(t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_gso_batch_arrives_whole() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let inner = quinn::TokioRuntime
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        assert!(
            inner.max_transmit_segments() > 1,
            "this kernel has no UDP GSO"
        );
        let contents: Vec<u8> = (0..90_000u32).map(|i| (i % 251) as u8).collect();

        // The premise: quinn-udp alone reports success, yet the kernel sent nothing.
        send(inner.clone(), &batch(to, &contents)).await;
        assert!(received(&rx).is_empty());

        let sock: Arc<dyn AsyncUdpSocket> =
            Arc::new(UdpIo::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        send(sock.clone(), &batch(to, &contents)).await;
        let got = received(&rx);
        assert_eq!(got.len(), 3);
        assert_eq!(got.concat(), contents);

        // A batch that fits goes through unchanged.
        send(sock, &batch(to, &contents[..60_000])).await;
        assert_eq!(received(&rx).concat(), &contents[..60_000]);
    }

    /// Receives once into a full batch of buffers; fails if nothing comes within 5 s.
    async fn recv_batch(sock: &UdpIo, buf: &mut [u8]) -> Vec<usize> {
        let mut meta = [RecvMeta::default(); BATCH_SIZE];
        let n = tokio::time::timeout(Duration::from_secs(5), async {
            let mut iovs: Vec<IoSliceMut<'_>> = buf
                .chunks_mut(2048)
                .take(BATCH_SIZE)
                .map(IoSliceMut::new)
                .collect();
            std::future::poll_fn(|cx| sock.poll_recv(cx, &mut iovs, &mut meta)).await
        })
        .await
        .expect("a datagram was sent but the socket never became readable")
        .unwrap();
        meta[..n].iter().map(|m| m.len).collect()
    }

    #[tokio::test]
    async fn a_datagram_after_a_drained_queue_is_still_seen() {
        let sock = UdpIo::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = sock.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = vec![0; 2048 * BATCH_SIZE];

        // One datagram: a short batch, so the socket is marked not readable without asking
        // the kernel again. Each later datagram must raise readiness anew.
        for round in 1..=20usize {
            tx.send_to(&vec![7; round], to).unwrap();
            assert_eq!(recv_batch(&sock, &mut buf).await, vec![round]);
        }

        // A burst larger than one batch comes out whole over several receives.
        for i in 0..(BATCH_SIZE * 3) {
            tx.send_to(&[1; 100][..1 + i % 100], to).unwrap();
        }
        let mut got = 0;
        while got < BATCH_SIZE * 3 {
            got += recv_batch(&sock, &mut buf).await.len();
        }
        assert_eq!(got, BATCH_SIZE * 3);
    }

    #[tokio::test]
    async fn writability_is_watched_only_after_a_full_buffer() {
        let sock = Arc::new(UdpIo::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        let mut poller = sock.clone().create_io_poller();
        // Room in the buffer: ready at once, nothing registered.
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
        assert!(format!("{poller:?}").contains("watching: false"));

        // After a send found the buffer full (loopback never fills it, so the flag is set
        // by hand): the poller registers a duplicate for writability, which reports the room
        // there is, and clears the flag.
        sock.full.store(true, Ordering::Relaxed);
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
        )
        .await
        .expect("a writable socket was never reported writable")
        .unwrap();
        assert!(!sock.full.load(Ordering::Relaxed));
        assert!(format!("{poller:?}").contains("watching: false"));
    }

    fn chunks(len: usize, segment: usize, limit: usize) -> Vec<Range<usize>> {
        gso_chunks(len, segment, limit).collect()
    }

    #[test]
    fn a_batch_that_fits_is_one_send() {
        // 10 × 1452-byte packets, the last one short.
        assert_eq!(chunks(14_000, 1452, MAX_GSO_PAYLOAD), vec![0..14_000]);
    }

    #[test]
    fn large_packets_go_one_or_a_few_per_send() {
        assert_eq!(
            chunks(3 * 65_000, 65_000, MAX_GSO_PAYLOAD),
            vec![0..65_000, 65_000..130_000, 130_000..195_000]
        );
        // 30,000-byte packets: two fit in one send; the short last packet rides alone.
        assert_eq!(
            chunks(5 * 30_000 - 7, 30_000, MAX_GSO_PAYLOAD),
            vec![0..60_000, 60_000..120_000, 120_000..149_993]
        );
    }

    #[test]
    fn every_chunk_is_whole_packets_within_the_limit() {
        for segment in [1200, 1452, 6_000, 9_000, 16_384, 32_768, 65_000] {
            for n in 1..=10 {
                let len = n * segment - segment / 3;
                let got = chunks(len, segment, MAX_GSO_PAYLOAD);
                assert_eq!(got.first().map(|r| r.start), Some(0));
                assert_eq!(got.last().map(|r| r.end), Some(len));
                for w in got.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                for r in &got[..got.len() - 1] {
                    assert_eq!(r.len() % segment, 0, "segment {segment}, n {n}");
                }
                assert!(got.iter().all(|r| r.len() <= MAX_GSO_PAYLOAD.max(segment)));
            }
        }
    }
}
