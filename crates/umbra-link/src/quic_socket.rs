//! The UDP socket under every QUIC endpoint: quinn's tokio socket with one fix for large MTUs.
//!
//! Path MTU discovery runs up to the largest UDP payload, so that a path with a large MTU
//! (jumbo frames, loopback's 64 KiB) carries large packets: most of QUIC's cost is per packet,
//! not per byte. quinn batches up to 10 packets of one size into a single GSO send, and the
//! kernel refuses a GSO send whose total payload exceeds one IP datagram (about 64 KiB) with
//! `EMSGSIZE`, which quinn-udp drops silently. Two 32 KiB packets would then be lost every
//! time; the losses shrink the congestion window and trip quinn's black-hole detector, which
//! falls back to 1200-byte packets. [`GsoLimit`] splits such a batch into sends that fit.
//! On a 1500-byte path a batch (10 × 1452 bytes) always fits and passes through unchanged.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

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

/// Wraps quinn's socket: a GSO batch larger than [`MAX_GSO_PAYLOAD`] goes out as several sends.
pub(crate) struct GsoLimit(pub(crate) Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for GsoLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GsoLimit").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for GsoLimit {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let Some(segment) = t
            .segment_size
            .filter(|_| t.contents.len() > MAX_GSO_PAYLOAD)
        else {
            return self.0.try_send(t);
        };
        // On WouldBlock quinn retries the whole batch once the socket is writable. If a first
        // part went out already, its packets arrive twice and the receiver drops the copies by
        // packet number: cheaper than losses, which would trip the black-hole detector.
        for r in gso_chunks(t.contents.len(), segment, MAX_GSO_PAYLOAD) {
            let part = &t.contents[r];
            self.0.try_send(&Transmit {
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
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
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

        let sock: Arc<dyn AsyncUdpSocket> = Arc::new(GsoLimit(inner));
        send(sock.clone(), &batch(to, &contents)).await;
        let got = received(&rx);
        assert_eq!(got.len(), 3);
        assert_eq!(got.concat(), contents);

        // A batch that fits goes through unchanged.
        send(sock, &batch(to, &contents[..60_000])).await;
        assert_eq!(received(&rx).concat(), &contents[..60_000]);
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
