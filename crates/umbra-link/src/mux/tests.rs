//! The multiplexer against a raw peer over an in-memory pipe: each rule a peer can break,
//! with the legitimate twin next to it. (TLS links run the same code over real sockets in
//! the integration tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tracing::Span;

use super::frame::{HEADER_LEN, Header, MIN_WINDOW};
use super::{MuxConn, MuxError, code, start};
use crate::error::LinkError;
use crate::stream::Stream;
use crate::transport::{LinkConfig, Refusal};

const WINDOW: u32 = MIN_WINDOW;

fn cfg(max_streams: u32) -> LinkConfig {
    LinkConfig {
        max_streams,
        ..LinkConfig::default().with_stream_window_kib(WINDOW / 1024)
    }
}

async fn soon<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Whether `f` is still pending after a moment (it waits on something that has not come).
async fn still_waiting<T>(f: impl std::future::Future<Output = T>) -> bool {
    tokio::time::timeout(Duration::from_millis(200), f)
        .await
        .is_err()
}

/// The raw side of a pipe: frames written and read by hand.
struct Raw {
    io: DuplexStream,
}

impl Raw {
    async fn send(&mut self, h: Header, payload: &[u8]) {
        self.io.write_all(&h.encode()).await.unwrap();
        self.io.write_all(payload).await.unwrap();
    }

    async fn next(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut head = [0u8; HEADER_LEN];
        self.io.read_exact(&mut head).await.ok()?;
        let h = Header::decode(&head).unwrap();
        let len = match h {
            Header::Data { len, .. } => len as usize,
            _ => 0,
        };
        let mut payload = vec![0; len];
        self.io.read_exact(&mut payload).await.ok()?;
        Some((h, payload))
    }

    /// Frames until the multiplexer closes the pipe; the last one, if a GOAWAY, is its code.
    async fn goaway(&mut self) -> Option<u32> {
        let mut last = None;
        while let Some((h, _)) = soon("the link to close", self.next()).await {
            last = Some(h);
        }
        match last {
            Some(Header::GoAway { code }) => Some(code),
            _ => None,
        }
    }
}

/// A multiplexer on one end of a pipe, a raw peer on the other, past the HELLOs. `opener`:
/// whether the multiplexer opens the streams.
async fn raw_peer(opener: bool, max_streams: u32) -> (MuxConn, Raw) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let mut raw = Raw { io: b };
    let hello = Header::Hello {
        window: WINDOW,
        max_streams: if opener { 8 } else { 0 },
    };
    raw.send(hello, &[]).await;
    let conn = soon("start", start(a, opener, &cfg(max_streams), &Span::none()))
        .await
        .unwrap();
    let (h, _) = raw.next().await.unwrap();
    assert_eq!(
        h,
        Header::Hello {
            window: WINDOW,
            max_streams: if opener { 0 } else { max_streams },
        }
    );
    (conn, raw)
}

async fn read_all(s: &mut Stream) -> Result<Vec<u8>, LinkError> {
    let mut v = Vec::new();
    while let Some(c) = s.recv_chunk().await? {
        v.extend_from_slice(&c);
    }
    Ok(v)
}

fn data(stream: u32, open: bool, fin: bool, len: usize) -> Header {
    Header::Data {
        stream,
        open,
        fin,
        len: len as u32,
    }
}

#[tokio::test]
async fn two_multiplexers_carry_streams_both_ways() {
    let (opener, acceptor) = pair(4).await;
    for round in 0..3u8 {
        let mut c = opener.open(&Span::none()).await.unwrap();
        // More than a window each way: credit has to come back for it to finish.
        let up = vec![round; 3 * WINDOW as usize + 5];
        let client = async {
            c.send_chunk(Bytes::from(up.clone())).await.unwrap();
            c.finish().await.unwrap();
            read_all(&mut c).await.unwrap()
        };
        let serve = async {
            let mut s = acceptor.accept().await.unwrap();
            let got = read_all(&mut s).await.unwrap();
            s.send_chunk(Bytes::from(got.clone())).await.unwrap();
            s.finish().await.unwrap();
            got
        };
        let (reply, got) = soon("echo", async { tokio::join!(client, serve) }).await;
        assert_eq!(got, up);
        assert_eq!(reply, up);
    }
    // The acceptor cannot open, the opener cannot accept.
    assert!(matches!(
        acceptor.open(&Span::none()).await,
        Err(LinkError::NotOpener)
    ));
    opener.close();
    assert!(soon("closed", acceptor.accept()).await.is_none());
}

/// The opener holds at most the acceptor's `max_streams` at once and waits for a slot rather
/// than being refused; a slot frees once the stream has ended both ways.
#[tokio::test]
async fn the_opener_waits_for_a_slot_under_the_peers_limit() {
    let (opener, acceptor) = pair(2).await;
    let mut first = opener.open(&Span::none()).await.unwrap();
    let _second = opener.open(&Span::none()).await.unwrap();
    assert!(still_waiting(opener.open(&Span::none())).await);
    // Ending the first one both ways frees its slot.
    first.finish().await.unwrap();
    let mut s = soon("accept", acceptor.accept()).await.unwrap();
    assert_eq!(read_all(&mut s).await.unwrap(), b"");
    s.finish().await.unwrap();
    assert_eq!(soon("end", read_all(&mut first)).await.unwrap(), b"");
    let _third = soon("a free slot", opener.open(&Span::none()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_peer_sending_past_the_window_loses_the_link() {
    let (conn, mut raw) = raw_peer(false, 8).await;
    // Exactly one window is fine, and arrives.
    raw.send(data(1, true, false, 0), &[]).await;
    let mut s = soon("accept", conn.accept()).await.unwrap();
    let full = vec![7u8; WINDOW as usize];
    for piece in full.chunks(4096) {
        raw.send(data(1, false, false, piece.len()), piece).await;
    }
    let mut got = Vec::new();
    while got.len() < full.len() {
        got.extend_from_slice(&soon("data", s.recv_chunk()).await.unwrap().unwrap());
    }
    assert_eq!(got, full);
    // Credit came back for what was read.
    let mut credited = 0;
    while credited < WINDOW {
        match soon("credit", raw.next()).await.unwrap() {
            (Header::Credit { stream: 1, bytes }, _) => credited += bytes,
            other => panic!("{other:?}"),
        }
    }
    // A second stream goes one byte past its window without waiting for credit.
    raw.send(data(2, true, false, 0), &[]).await;
    let mut s2 = soon("accept", conn.accept()).await.unwrap();
    raw.send(data(2, false, false, WINDOW as usize), &full)
        .await;
    raw.send(data(2, false, false, 1), &[1]).await;
    assert_eq!(raw.goaway().await, Some(code::PROTOCOL));
    let _ = soon("the window's bytes", s2.recv_chunk()).await;
    let e = soon("error", read_all(&mut s2)).await.unwrap_err();
    assert!(matches!(e, LinkError::Mux(MuxError::Protocol(_))), "{e:?}");
    assert!(e.is_peer_fault());
    assert!(conn.is_closed());
}

/// Small DATA frames for a stream whose reader is behind are gathered, not queued one by
/// one: each queued slice would keep a whole read buffer alive, so a peer sending one-byte
/// frames could make one window of bytes hold gigabytes. The twin: a reader that keeps up
/// gets every small frame at once.
#[tokio::test]
async fn small_frames_for_a_slow_reader_are_gathered() {
    let (conn, mut raw) = raw_peer(false, 8).await;
    raw.send(data(1, true, false, 0), &[]).await;
    let mut s = soon("accept", conn.accept()).await.unwrap();
    for i in 0..5u8 {
        raw.send(data(1, false, false, 1), &[i]).await;
        let got = soon("a byte", s.recv_chunk()).await.unwrap().unwrap();
        assert_eq!(&got[..], &[i]);
    }
    // The reader stops. 1,000 one-byte frames, each handled by the driver on its own: a ping
    // follows each, and its pong is awaited.
    let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    for (i, b) in (0u32..).zip(&sent) {
        raw.send(data(1, false, false, 1), &[*b]).await;
        raw.send(Header::Ping { opaque: i }, &[]).await;
        loop {
            match soon("pong", raw.next()).await.unwrap() {
                (Header::Pong { opaque }, _) if opaque == i => break,
                (Header::Credit { .. }, _) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    // The reader catches up: everything arrives, in order, without another frame from the
    // peer, in two chunks (the first byte went down at once; the rest was held).
    let mut got = Vec::new();
    let mut chunks = 0;
    while got.len() < sent.len() {
        got.extend_from_slice(&soon("held bytes", s.recv_chunk()).await.unwrap().unwrap());
        chunks += 1;
    }
    assert_eq!(got, sent);
    assert!(chunks <= 2, "{chunks} chunks for 1,000 one-byte frames");
    // And a reader waiting again gets the next byte at once.
    raw.send(data(1, false, false, 1), &[9]).await;
    let got = soon("a byte", s.recv_chunk()).await.unwrap().unwrap();
    assert_eq!(&got[..], &[9]);
    raw.send(data(1, false, true, 0), &[]).await;
    assert!(soon("fin", s.recv_chunk()).await.unwrap().is_none());
}

#[tokio::test]
async fn credit_beyond_the_window_loses_the_link() {
    let (conn, mut raw) = raw_peer(true, 0).await;
    let mut c = conn.open(&Span::none()).await.unwrap();
    assert_eq!(raw.next().await.unwrap().0, data(1, true, false, 0));
    // The twin: a window sent, the window credited back, and more can be sent.
    let window = Bytes::from(vec![1u8; WINDOW as usize]);
    c.send_chunk(window.clone()).await.unwrap();
    let mut got = 0;
    while got < WINDOW as usize {
        got += raw.next().await.unwrap().1.len();
    }
    assert!(still_waiting(c.send_chunk(Bytes::from_static(b"x"))).await);
    let credit = |bytes| Header::Credit { stream: 1, bytes };
    raw.send(credit(WINDOW), &[]).await;
    // The pending send above was cancelled, so this one goes out first.
    soon("send", c.send_chunk(Bytes::from_static(b"y")))
        .await
        .unwrap();
    assert_eq!(raw.next().await.unwrap().1, b"y");
    // One byte outstanding: crediting two is more than was ever sent.
    raw.send(credit(2), &[]).await;
    assert_eq!(raw.goaway().await, Some(code::PROTOCOL));
    assert!(conn.is_closed());
}

#[tokio::test]
async fn only_the_opening_side_opens_and_ids_only_go_up() {
    // A peer opening on a link where we open.
    let (conn, mut raw) = raw_peer(true, 0).await;
    raw.send(data(1, true, false, 0), &[]).await;
    assert_eq!(raw.goaway().await, Some(code::PROTOCOL));
    assert!(conn.is_closed());

    // Ids up: fine; the same id again, or a lower one: the link closes.
    for bad in [3, 2] {
        let (conn, mut raw) = raw_peer(false, 8).await;
        raw.send(data(1, true, false, 1), b"a").await;
        raw.send(data(3, true, false, 1), b"b").await;
        // Held, not dropped: a dropped stream is reset.
        let mut held = Vec::new();
        for want in [b"a", b"b"] {
            let mut s = soon("accept", conn.accept()).await.unwrap();
            assert_eq!(
                &soon("data", s.recv_chunk()).await.unwrap().unwrap()[..],
                want
            );
            held.push(s);
        }
        raw.send(data(bad, true, false, 1), b"c").await;
        assert_eq!(raw.goaway().await, Some(code::PROTOCOL), "id {bad}");
    }
}

#[tokio::test]
async fn frames_for_ended_streams_are_ignored_for_unopened_ones_not() {
    let (conn, mut raw) = raw_peer(false, 8).await;
    raw.send(data(1, true, false, 1), b"a").await;
    let mut s = soon("accept", conn.accept()).await.unwrap();
    assert_eq!(
        &soon("data", s.recv_chunk()).await.unwrap().unwrap()[..],
        b"a"
    );
    s.reset();
    assert_eq!(
        raw.next().await.unwrap().0,
        Header::Reset {
            stream: 1,
            code: code::NO_ERROR
        }
    );
    // Still in flight when the reset crossed: ignored.
    raw.send(data(1, false, false, 1), b"b").await;
    raw.send(
        Header::Credit {
            stream: 1,
            bytes: 1,
        },
        &[],
    )
    .await;
    raw.send(Header::Ping { opaque: 5 }, &[]).await;
    assert_eq!(
        soon("pong", raw.next()).await.unwrap().0,
        Header::Pong { opaque: 5 }
    );
    assert!(!conn.is_closed());
    // Stream 9 was never opened.
    raw.send(data(9, false, false, 1), b"c").await;
    assert_eq!(raw.goaway().await, Some(code::PROTOCOL));
}

#[tokio::test]
async fn data_after_the_end_of_a_stream_loses_the_link() {
    let (conn, mut raw) = raw_peer(false, 8).await;
    raw.send(data(1, true, true, 1), b"a").await;
    let mut s = soon("accept", conn.accept()).await.unwrap();
    assert_eq!(soon("all", read_all(&mut s)).await.unwrap(), b"a");
    // Our half is still open, so the stream is too; the peer's is over.
    raw.send(data(1, false, false, 1), b"b").await;
    assert_eq!(raw.goaway().await, Some(code::PROTOCOL));
}

/// A peer that opens more streams than it was told gets the extra ones refused and keeps its
/// link; one that pings without reading gets at most `MAX_ANSWERS` answers queued before the
/// multiplexer stops reading it (its writes stall), and goes on once it reads.
#[tokio::test]
async fn a_peer_over_its_limits_is_refused_not_served() {
    let (conn, mut raw) = raw_peer(false, 1).await;
    raw.send(data(1, true, false, 1), b"a").await;
    raw.send(data(2, true, false, 1), b"b").await;
    assert_eq!(
        soon("refused", raw.next()).await.unwrap().0,
        Header::Reset {
            stream: 2,
            code: code::REFUSED
        }
    );
    let mut s = soon("accept", conn.accept()).await.unwrap();
    assert_eq!(
        &soon("data", s.recv_chunk()).await.unwrap().unwrap()[..],
        b"a"
    );
    assert!(!conn.is_closed());

    // Pings, unread: the answers fill the pipe (64 KiB each way), then the multiplexer's own
    // queue, then it stops reading and the flood stalls.
    const FLOOD: u32 = 100_000;
    let pings: Vec<u8> = (0..FLOOD)
        .flat_map(|i| Header::Ping { opaque: i }.encode())
        .collect();
    let (mut rd, mut wr) = tokio::io::split(raw.io);
    let writer = tokio::spawn(async move {
        wr.write_all(&pings).await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "the multiplexer kept reading");
    // Reading the answers lets it go on: every ping is answered, in order.
    let mut head = [0u8; HEADER_LEN];
    let drain = async {
        for i in 0..FLOOD {
            rd.read_exact(&mut head).await.unwrap();
            assert_eq!(Header::decode(&head), Ok(Header::Pong { opaque: i }));
        }
    };
    soon("the flood to go through", drain).await;
    writer.await.unwrap();
    assert!(!conn.is_closed());
}

#[tokio::test]
async fn a_hello_is_checked() {
    let hello = |window, ver: u8| {
        let mut b = Header::Hello {
            window,
            max_streams: 4,
        }
        .encode();
        b[2] = ver;
        b
    };
    type Check = fn(&LinkError) -> bool;
    let cases: Vec<([u8; HEADER_LEN], Check)> = vec![
        (hello(WINDOW, 2), |e| {
            matches!(
                e,
                LinkError::Mux(MuxError::Frame(super::MuxFrameError::Version(2)))
            )
        }),
        (hello(1, 1), |e| {
            matches!(
                e,
                LinkError::Mux(MuxError::Frame(super::MuxFrameError::Window(1)))
            )
        }),
        (Header::Ping { opaque: 1 }.encode(), |e| {
            matches!(e, LinkError::Mux(MuxError::Protocol(_)))
        }),
        (
            Header::GoAway {
                code: Refusal::Identity.code(),
            }
            .encode(),
            |e| matches!(e, LinkError::Refused),
        ),
        (
            Header::Hello {
                window: WINDOW,
                max_streams: 0,
            }
            .encode(),
            |e| matches!(e, LinkError::Mux(MuxError::Protocol(_))),
        ),
    ];
    for (first, check) in cases {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(&first).await.unwrap();
        let e = match soon("start", start(a, true, &cfg(0), &Span::none())).await {
            Ok(_) => panic!("{first:?} accepted"),
            Err(e) => e,
        };
        assert!(check(&e), "{first:?}: {e:?}");
    }
    // The twin: a good HELLO starts the link.
    let (a, mut b) = tokio::io::duplex(1024);
    b.write_all(&hello(WINDOW, 1)).await.unwrap();
    assert!(start(a, true, &cfg(0), &Span::none()).await.is_ok());
}

/// A close from this side ends the link even while the peer reads nothing, when the driver
/// waits on the full connection and not on its commands: a stream waiting for credit hears of
/// it at once, and the peer, once it reads, gets everything queued whole and then the GOAWAY.
#[tokio::test]
async fn a_local_close_ends_the_link_while_the_peer_reads_nothing() {
    let (conn, mut raw) = raw_peer(true, 4).await;
    let span = Span::none();
    // Eight windows (128 KiB) against a 64 KiB pipe: the driver is left holding the rest.
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut s = soon("open", conn.open(&span)).await.unwrap();
        let window = Bytes::from(vec![7u8; WINDOW as usize]);
        soon("a window's worth", s.send_chunk(window))
            .await
            .unwrap();
        streams.push(s);
    }
    let s = streams.last_mut().unwrap();
    let mut more = Box::pin(s.send_chunk(Bytes::from_static(b"more")));
    assert!(
        still_waiting(more.as_mut()).await,
        "sent past the stream's credit"
    );
    conn.close();
    let r = soon("the waiting stream to hear of the close", more).await;
    assert!(matches!(r, Err(LinkError::Closed)), "{r:?}");
    // The peer reads again: whole frames (`next` decodes each header), the data of every
    // stream, then the GOAWAY.
    let mut bytes = 0;
    let mut last = None;
    while let Some((h, payload)) = soon("the link to close", raw.next()).await {
        bytes += payload.len();
        last = Some(h);
    }
    assert_eq!(bytes, 8 * WINDOW as usize);
    assert_eq!(
        last,
        Some(Header::GoAway {
            code: code::NO_ERROR
        })
    );
}

/// Two multiplexers on the ends of one pipe: (opener, acceptor), the acceptor taking at most
/// `max_streams` at once.
async fn pair(max_streams: u32) -> (MuxConn, MuxConn) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let opener = tokio::spawn(async move { start(a, true, &cfg(0), &Span::none()).await });
    let acceptor = soon("start", start(b, false, &cfg(max_streams), &Span::none()))
        .await
        .unwrap();
    (opener.await.unwrap().unwrap(), acceptor)
}

/// A link that has used every stream id closes, so that its peers dial again, instead of
/// staying up and refusing every open. The twin: the last id still opens a stream.
#[tokio::test]
async fn a_link_out_of_stream_ids_closes() {
    let (opener, acceptor) = pair(16).await;
    opener.skip_ids_to(u32::MAX - 1);
    let mut s = soon("open", opener.open(&Span::none())).await.unwrap();
    s.send_chunk(Bytes::from_static(b"last")).await.unwrap();
    let mut got = soon("accept", acceptor.accept()).await.unwrap();
    assert_eq!(read_n(&mut got, 4).await, b"last");
    assert!(!opener.shared.closed.is_cancelled());
    assert!(soon("open", opener.open(&Span::none())).await.is_err());
    assert!(opener.shared.closed.is_cancelled());
    soon("the peer sees the close", async {
        while acceptor.accept().await.is_some() {}
    })
    .await;
}

async fn read_n(s: &mut Stream, n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while v.len() < n {
        v.extend_from_slice(&soon("bytes", s.recv_chunk()).await.unwrap().unwrap());
    }
    v
}

/// The broker's relay between two TLS links: the source link's driver passes chunks to the
/// other stream itself while that stream has credit, so the relay's own loop sees none of
/// them; once the other stream's reader stalls, chunks wait in the relay's loop (no more
/// than a window each side), and all arrive in order when it reads again.
#[tokio::test]
async fn a_splice_passes_bytes_on_and_waits_when_the_other_stream_is_full() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let (a_open, a_acc) = pair(8).await;
    let (b_open, b_acc) = pair(8).await;
    let mut x = a_open.open(&Span::none()).await.unwrap();
    x.send_chunk(Bytes::from_static(b"hello")).await.unwrap();
    let src = soon("accept", a_acc.accept()).await.unwrap();
    let y = b_open.open(&Span::none()).await.unwrap();
    let (_src_send, mut src_recv, _) = src.into_parts();
    let (mut dst_send, _dst_recv, _) = y.into_parts();
    let progress = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    {
        let (progress, total) = (progress.clone(), total.clone());
        src_recv.splice(&dst_send, move || super::SpliceStats {
            progress,
            total,
            metric: metrics::Counter::noop(),
        });
    }
    // The relay's loop: what the driver did not pass on.
    let looped = Arc::new(AtomicU64::new(0));
    let pump = {
        let looped = looped.clone();
        tokio::spawn(async move {
            while let Some(c) = src_recv.recv().await.unwrap() {
                looped.fetch_add(c.len() as u64, Ordering::Relaxed);
                dst_send.send(c).await.unwrap();
            }
            dst_send.finish().unwrap();
            (src_recv, dst_send)
        })
    };
    let mut sink = soon("accept", b_acc.accept()).await.unwrap();
    // Sent before the splice: through the loop.
    assert_eq!(read_n(&mut sink, 5).await, b"hello");
    assert_eq!(looped.load(Ordering::Relaxed), 5);
    // Read as they come: every chunk passed on by the driver.
    for i in 0..100u32 {
        let chunk = format!("{i:04}");
        x.send_chunk(Bytes::from(chunk.clone())).await.unwrap();
        assert_eq!(read_n(&mut sink, 4).await, chunk.as_bytes());
    }
    assert_eq!(
        looped.load(Ordering::Relaxed),
        5,
        "chunks went through the loop"
    );
    assert_eq!(total.load(Ordering::Relaxed), 400);
    assert_eq!(progress.load(Ordering::Relaxed), 100);

    // The sink stops reading: past its window the rest waits, then arrives intact.
    let big: Vec<u8> = (0..4 * WINDOW).map(|i| (i % 251) as u8).collect();
    let sender = {
        let big = Bytes::from(big.clone());
        tokio::spawn(async move {
            x.send_chunk(big).await.unwrap();
            x.finish().await.unwrap();
            x
        })
    };
    assert!(
        still_waiting(async {
            while !sender.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await,
        "4 windows went into 2 windows of room"
    );
    assert_eq!(read_n(&mut sink, big.len()).await, big);
    assert_eq!(soon("end", read_all(&mut sink)).await.unwrap(), b"");
    assert!(
        looped.load(Ordering::Relaxed) > 5,
        "the loop took the overflow"
    );
    let _x = soon("sender", sender).await.unwrap();
    let _ = soon("pump", pump).await.unwrap();
}

/// Agent and connector: the link's driver writes a stream's bytes to the relay's TCP
/// connection itself while the socket takes them, so the relay's loop sees none of them;
/// when the socket is full the rest goes through the loop, and everything arrives in order.
#[tokio::test]
async fn a_tcp_splice_writes_to_the_socket_and_leaves_the_rest_to_the_loop() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::net::{TcpListener, TcpStream};

    let (a_open, a_acc) = pair(8).await;
    let mut x = a_open.open(&Span::none()).await.unwrap();
    x.send_chunk(Bytes::from_static(b"hello")).await.unwrap();
    let src = soon("accept", a_acc.accept()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut app, _) = listener.accept().await.unwrap();
    let ours = Arc::new(ours);
    let (_src_send, mut src_recv, _) = src.into_parts();
    let total = Arc::new(AtomicU64::new(0));
    {
        let total = total.clone();
        src_recv.splice_tcp(&ours, move || super::SpliceStats {
            progress: Arc::new(AtomicU64::new(0)),
            total,
            metric: metrics::Counter::noop(),
        });
    }
    let looped = Arc::new(AtomicU64::new(0));
    let pump = {
        let (looped, ours) = (looped.clone(), ours.clone());
        tokio::spawn(async move {
            while let Some(c) = src_recv.recv().await.unwrap() {
                looped.fetch_add(c.len() as u64, Ordering::Relaxed);
                let mut b = &c[..];
                while !b.is_empty() {
                    ours.writable().await.unwrap();
                    if let Ok(n) = ours.try_write(b) {
                        b = &b[n..];
                    }
                }
            }
            src_recv
        })
    };
    let mut buf = vec![0u8; 5];
    soon("hello", app.read_exact(&mut buf)).await.unwrap();
    assert_eq!(buf, b"hello");
    for i in 0..100u32 {
        let chunk = format!("{i:04}");
        x.send_chunk(Bytes::from(chunk.clone())).await.unwrap();
        let mut got = [0u8; 4];
        soon("chunk", app.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, chunk.as_bytes());
    }
    assert_eq!(
        looped.load(Ordering::Relaxed),
        5,
        "chunks went through the loop"
    );
    assert_eq!(total.load(Ordering::Relaxed), 400);

    // The app stops reading: the socket fills, the loop takes the overflow.
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    let sender = {
        let big = Bytes::from(big.clone());
        tokio::spawn(async move {
            x.send_chunk(big).await.unwrap();
            x.finish().await.unwrap();
            x
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = vec![0u8; big.len()];
    soon("16 MiB", app.read_exact(&mut got)).await.unwrap();
    assert!(got == big, "bytes differ");
    assert!(
        looped.load(Ordering::Relaxed) > 5,
        "the loop took the overflow"
    );
    let _x = soon("sender", sender).await.unwrap();
    let _ = soon("pump", pump).await.unwrap();
}

/// A peer that stops reading yet keeps returning credit (it cannot be told from one that
/// reads) gets no more than a bounded amount queued for it: the sender waits. Once the peer
/// reads again, everything arrives.
#[tokio::test]
async fn a_peer_that_returns_credit_without_reading_is_not_queued_for_without_bound() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let (conn, raw) = raw_peer(true, 8).await;
    let (mut rd, mut wr) = tokio::io::split(raw.io);
    let mut s = conn.open(&Span::none()).await.unwrap();
    // Far more than the bound, in chunks of a quarter window.
    const TOTAL: u64 = 8 << 20;
    let chunk = Bytes::from(vec![5u8; WINDOW as usize / 4]);
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while accepted.load(Ordering::SeqCst) < TOTAL {
                s.send_chunk(chunk.clone()).await.unwrap();
                accepted.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            s
        }
    });
    // Credit for every byte the sender got rid of, none of them read.
    let mut returned = credit_until_blocked(&conn, &accepted, &mut wr).await;
    let held = accepted.load(Ordering::SeqCst);
    // What waits in the channel, what the driver holds for the connection, the pipe's buffer,
    // and a frame on its way.
    let bound = super::QUEUE_MAX + super::OUT_MAX as u64 + 64 * 1024 + 2 * u64::from(WINDOW);
    assert!(
        held <= bound,
        "{held} bytes taken for a peer that reads nothing"
    );
    assert!(held < TOTAL && !sender.is_finished());

    // The twin: the peer reads again (crediting what it reads), and everything arrives.
    let reader = async {
        let mut read = 0u64;
        let mut head = [0u8; HEADER_LEN];
        let mut buf = vec![0u8; 64 * 1024];
        while read < TOTAL {
            rd.read_exact(&mut head).await.unwrap();
            if let Header::Data { stream: 1, len, .. } = Header::decode(&head).unwrap() {
                rd.read_exact(&mut buf[..len as usize]).await.unwrap();
                read += u64::from(len);
                if read > returned {
                    let bytes = u32::try_from(read - returned).unwrap();
                    wr.write_all(&Header::Credit { stream: 1, bytes }.encode())
                        .await
                        .unwrap();
                    returned = read;
                }
            }
        }
        read
    };
    let (read, sender) = soon("everything once the peer reads", async {
        tokio::join!(reader, sender)
    })
    .await;
    assert_eq!(read, TOTAL);
    drop(sender.unwrap());
}

/// Once a peer that stopped reading takes everything at once (its socket buffer is large)
/// and sends nothing, the commands that waited while the output was full still go out: the
/// driver must not wait for the peer's next frame to take them (a download sharing a
/// connector's link with a stalled one would freeze until the next keepalive).
#[tokio::test]
async fn commands_held_while_the_output_was_full_go_out_once_it_drains() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    // A pipe that holds far more than the driver queues itself.
    let (a, b) = tokio::io::duplex(8 << 20);
    let mut raw = Raw { io: b };
    raw.send(
        Header::Hello {
            window: WINDOW,
            max_streams: 8,
        },
        &[],
    )
    .await;
    let conn = soon("start", start(a, true, &cfg(8), &Span::none()))
        .await
        .unwrap();
    let _ = raw.next().await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(raw.io);
    let mut bulk = conn.open(&Span::none()).await.unwrap();
    let mut late = conn.open(&Span::none()).await.unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = tokio::spawn({
        let accepted = accepted.clone();
        let chunk = Bytes::from(vec![5u8; WINDOW as usize / 4]);
        async move {
            loop {
                if bulk.send_chunk(chunk.clone()).await.is_err() {
                    return;
                }
                accepted.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    });
    // Credit for every byte, none read, until the pipe and the driver's output are full and
    // the sender waits for room.
    credit_until_blocked(&conn, &accepted, &mut wr).await;
    // Queued behind it all.
    let late_send = tokio::spawn(async move {
        late.send_chunk(Bytes::from_static(b"late")).await.unwrap();
        late
    });
    // The peer now reads everything and sends nothing.
    soon("stream 2's chunk, with the peer silent", async {
        let mut head = [0u8; HEADER_LEN];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            rd.read_exact(&mut head).await.unwrap();
            if let Header::Data { stream, len, .. } = Header::decode(&head).unwrap() {
                rd.read_exact(&mut buf[..len as usize]).await.unwrap();
                if stream == 2 && &buf[..len as usize] == b"late" {
                    return;
                }
            }
        }
    })
    .await;
    drop(soon("the late sender", late_send).await.unwrap());
    sender.abort();
}

/// As a peer that stops reading yet returns credit (stream 1) for every byte the sender has
/// got rid of, until the sender waits for room in the link; the credit returned.
async fn credit_until_blocked(
    conn: &MuxConn,
    accepted: &std::sync::atomic::AtomicU64,
    wr: &mut tokio::io::WriteHalf<DuplexStream>,
) -> u64 {
    use std::sync::atomic::Ordering;
    let mut returned = 0u64;
    soon("the sender to wait for room", async {
        while !conn.shared.blocked.load(Ordering::SeqCst) {
            let a = accepted.load(Ordering::SeqCst);
            if a > returned {
                let bytes = u32::try_from(a - returned).unwrap();
                wr.write_all(&Header::Credit { stream: 1, bytes }.encode())
                    .await
                    .unwrap();
                returned = a;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    returned
}
