//! Links and streams: handshakes, identities, who opens, frames, half-close, refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use umbra_link::{ALPN, Link, LinkConfig, LinkError, Listener, Refusal, Stream, Transport, dial};
use umbra_pki::broker_server_name;
use umbra_proto::frame::FrameError;
use umbra_proto::{DialCode, Flow, Frame, OpenCode, Role};

use crate::common::{Org, addr, both, pattern, server_name, soon};

async fn read_to_end(s: &mut Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = s.recv_chunk().await.unwrap() {
        out.extend_from_slice(&b);
    }
    out
}

async fn send_all(s: &mut Stream, data: &[u8]) {
    for piece in data.chunks(50_000) {
        s.send_chunk(Bytes::copy_from_slice(piece)).await.unwrap();
    }
}

/// An agent link dialed to `listener` over `t`, and the listener's side of it.
async fn agent_link(
    org: &Org,
    listener: &Listener,
    t: Transport,
    cfg: &LinkConfig,
) -> (Link, Link) {
    let link = dial(addr(listener, t), &server_name(), t, org.agent(), cfg)
        .await
        .unwrap();
    let server = soon("accept", listener.accept()).await.unwrap();
    (link, server)
}

/// A connector link dialed to `listener` over `t`, and the listener's (broker's) side of it.
async fn connector_link(org: &Org, listener: &Listener, t: Transport) -> (Link, Link) {
    let link = dial(
        addr(listener, t),
        &server_name(),
        t,
        org.connector(),
        &LinkConfig::default(),
    )
    .await
    .unwrap();
    let broker = soon("accept", listener.accept()).await.unwrap();
    (link, broker)
}

/// A real agent dials `listener` over QUIC, then over TLS/TCP, and is accepted each time.
async fn agents_link_on_both_transports(org: &Org, listener: &Listener, cfg: &LinkConfig) {
    for t in [Transport::Quic, Transport::Tls] {
        let link = soon(
            "a real agent links",
            dial(addr(listener, t), &server_name(), t, org.agent(), cfg),
        )
        .await
        .unwrap();
        let accepted = soon("accept", listener.accept()).await.unwrap();
        assert_eq!(accepted.transport(), t);
        drop(link);
    }
}

fn open_frame() -> Frame {
    Frame::Open {
        flow: Flow::Tcp,
        service: "demo".into(),
        credential: vec![],
    }
}

/// Agent dials; identities, kx group, frames both ways, data echoed, half-close both ways.
async fn agent_link_frames_echo_half_close(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let cfg = LinkConfig::default();
    let (link, server) = agent_link(&org, &listener, t, &cfg).await;

    assert_eq!(link.transport(), t);
    assert_eq!(server.transport(), t);
    assert_eq!(link.peer().id.role, Role::Broker);
    assert_eq!(link.peer().id.id, "b1");
    assert_eq!(server.peer().id.to_uri(), "umbra://default/agent/dev1");
    assert_eq!(link.kx_group(), "X25519MLKEM768");
    assert_eq!(server.kx_group(), "X25519MLKEM768");
    assert!(link.is_opener());
    assert!(!server.is_opener());
    assert!(matches!(server.open().await, Err(LinkError::NotOpener)));

    let mut c = link.open().await.unwrap();
    // Frame and first data back to back: the listener must keep the bytes after the frame.
    c.write_frame(&open_frame()).await.unwrap();
    c.send_chunk(Bytes::from_static(b"early")).await.unwrap();

    let mut s = soon("stream", server.accept()).await.unwrap();
    assert_eq!(soon("frame", s.read_frame()).await.unwrap(), open_frame());
    s.write_frame(&Frame::OpenReply { code: OpenCode::Ok })
        .await
        .unwrap();
    assert_eq!(
        soon("reply", c.read_frame()).await.unwrap(),
        Frame::OpenReply { code: OpenCode::Ok }
    );

    // Echo on the listener side: everything it receives goes back, then it finishes.
    let echo = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(b) = s.recv_chunk().await.unwrap() {
            got.extend_from_slice(&b);
            s.send_chunk(b).await.unwrap();
        }
        // The client has finished; this side can still send.
        s.send_chunk(Bytes::from_static(b"+after-your-finish"))
            .await
            .unwrap();
        s.finish().await.unwrap();
        got
    });

    // Less than one stream window, since this side sends everything before it reads (the
    // relay tests move megabytes with both directions concurrent).
    let data = pattern(128 * 1024, 7);
    let sender = async {
        send_all(&mut c, &data).await;
        c.finish().await.unwrap();
        read_to_end(&mut c).await
    };
    let back = soon("echo", sender).await;
    let got = soon("echo task", echo).await.unwrap();
    let mut expected = b"early".to_vec();
    expected.extend_from_slice(&data);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "listener received different bytes");
    expected.extend_from_slice(b"+after-your-finish");
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "echo differs");

    link.close();
    soon("server sees close", server.closed()).await;
    assert!(link.is_closed());
}
both!(agent_link_frames_echo_half_close);

/// A receiver that stops reading holds at most one stream window for that stream: the
/// sender stalls once the window is used, so a stalled app costs the side in front of it
/// one window of memory, never more. Checked with the default window and with a smaller and
/// a larger configured one. Twin: once the receiver reads again, every byte arrives, in order.
async fn stalled_reader_holds_one_window(t: Transport) {
    let org = Org::new();
    for kib in [umbra_link::DEFAULT_STREAM_WINDOW_KIB, 64, 1024] {
        let cfg = LinkConfig::default().with_stream_window_kib(kib);
        let window = cfg.stream_window as usize;
        assert_eq!(window, kib as usize * 1024);
        let listener = org.listener(cfg.clone()).await;
        let (link, server) = agent_link(&org, &listener, t, &cfg).await;
        let mut c = link.open().await.unwrap();
        c.write_frame(&open_frame()).await.unwrap();
        let mut s = soon("stream", server.accept()).await.unwrap();
        assert_eq!(soon("frame", s.read_frame()).await.unwrap(), open_frame());

        // The sender pushes 8 KiB pieces and counts those fully accepted; nobody reads.
        let data = pattern(4 * window, u64::from(kib));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sender = {
            let data = data.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                for piece in data.chunks(8 * 1024) {
                    c.send_chunk(Bytes::copy_from_slice(piece)).await.unwrap();
                    accepted.fetch_add(piece.len(), std::sync::atomic::Ordering::Relaxed);
                }
                c.finish().await.unwrap();
                c
            })
        };
        // The sender gets at least half a window out (a transport that stalls earlier fails
        // here), then stalls: the count stops moving for 300 ms.
        let half = window / 2;
        soon("half a window accepted", async {
            while accepted.load(std::sync::atomic::Ordering::Relaxed) < half {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = accepted.load(std::sync::atomic::Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        assert!(
            last <= window,
            "{t:?}: {last} bytes accepted for a reader that reads nothing, window {window}"
        );
        assert!(!sender.is_finished(), "{t:?}: sender not stalled");

        let got = soon("read after the stall", read_to_end(&mut s)).await;
        assert_eq!(got.len(), data.len(), "{t:?}, window {window}");
        assert!(got == data, "{t:?}: bytes differ after the stall");
        drop(soon("sender", sender).await.unwrap());
        link.close();
    }
}
both!(stalled_reader_holds_one_window);

/// Streams whose reader has stopped never hold up the other streams of their link: on a
/// connector's link, shared by every user of its apps, a broker that cannot pass one user's
/// downloads on (that user's agent reads nothing) holds them, one stream window each, and the
/// other users' streams go on. 1,100 stalled streams of 16 KiB hold more than the 16 MiB a
/// fixed connection window would allow; one more stream still moves 1 MiB. Twin: every stalled
/// stream's bytes arrive once it is read.
async fn stalled_streams_hold_up_no_other_stream(t: Transport) {
    const STALLED: usize = 1100;
    let org = Org::new();
    let cfg = LinkConfig::default().with_stream_window_kib(16);
    let window = cfg.stream_window as usize;
    assert!(STALLED * window > 16 * 1024 * 1024);
    let listener = org.listener(cfg.clone()).await;
    let link = dial(addr(&listener, t), &server_name(), t, org.connector(), &cfg)
        .await
        .unwrap();
    let broker = soon("accept", listener.accept()).await.unwrap();
    // The connector answers each stream with one window of data, or 1 MiB when asked by a 1,
    // and counts the windows it has sent whole.
    let windows_sent = Arc::new(AtomicUsize::new(0));
    let sent = windows_sent.clone();
    tokio::spawn(async move {
        while let Some(mut s) = link.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let Ok(Some(ask)) = s.recv_chunk().await else {
                    return;
                };
                let len = if ask[..] == [1] { 1 << 20 } else { window };
                send_all(&mut s, &pattern(len, len as u64)).await;
                s.finish().await.unwrap();
                if len == window {
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                // Held, as a relay holds it, until the broker's side ends.
                while let Ok(Some(_)) = s.recv_chunk().await {}
            });
        }
    });
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut s = soon(&format!("stream {i} opens"), broker.open())
            .await
            .unwrap();
        s.send_chunk(Bytes::from_static(&[0])).await.unwrap();
        stalled.push(s);
    }
    // Every stalled stream's window filled (sent whole, so the broker holds it) before the
    // stream that must still move.
    soon("every stalled stream's window sent", async {
        while windows_sent.load(Ordering::SeqCst) < STALLED {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut busy = broker.open().await.unwrap();
    busy.send_chunk(Bytes::from_static(&[1])).await.unwrap();
    let got = soon("1 MiB past 1,100 stalled streams", read_to_end(&mut busy)).await;
    assert!(got == pattern(1 << 20, 1 << 20), "{t:?}: bytes differ");
    for (i, s) in stalled.iter_mut().enumerate() {
        let got = soon("a stalled stream's window", read_to_end(s)).await;
        assert!(got == pattern(window, window as u64), "{t:?}: stream {i}");
    }
}
both!(stalled_streams_hold_up_no_other_stream);

/// On loopback a QUIC link starts with the loopback interface's MTU on both sides and sends
/// no MTU probe: the first hop is the whole path, so nothing is left to discover
/// (`path_mtu.rs`; the search cost the first pings of every loopback link milliseconds).
/// Links over other interfaces start at QUIC's minimum and search: the e2e test checks that
/// over veth pairs (`check_mtu_probes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_loopback_links_start_at_the_loopback_mtu() {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let cfg = LinkConfig::default();
    let (link, server) = agent_link(&org, &listener, Transport::Quic, &cfg).await;
    // Right after the handshake, before any stream.
    for (side, l) in [("dialer", &link), ("listener", &server)] {
        let p = l.quic_path().unwrap();
        assert!(p.mtu > 16_000, "{side}: {p:?}");
    }
    let pongs = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(mut s) = server.accept().await {
                if let Ok(Frame::Ping { nonce }) = s.read_frame().await {
                    s.write_frame(&Frame::Pong { nonce }).await.unwrap();
                    s.finish().await.unwrap();
                }
            }
        })
    };
    for nonce in 0..20 {
        let mut s = link.open().await.unwrap();
        s.write_frame(&Frame::Ping { nonce }).await.unwrap();
        assert_eq!(
            soon("pong", s.read_frame()).await.unwrap(),
            Frame::Pong { nonce }
        );
    }
    for (side, l) in [("dialer", &link), ("listener", &server)] {
        let p = l.quic_path().unwrap();
        assert!(p.mtu > 16_000, "{side}: {p:?}");
        assert_eq!((p.mtu_probes_sent, p.black_holes), (0, 0), "{side}: {p:?}");
    }
    link.close();
    soon("listener sees the close", server.closed()).await;
    pongs.abort();
}

/// Connector dials; the broker (listener) opens streams, the connector accepts them.
async fn listener_opens_on_connector_links(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let (link, broker) = connector_link(&org, &listener, t).await;
    assert_eq!(broker.peer().id.role, Role::Connector);
    assert!(broker.is_opener());
    assert!(!link.is_opener());
    assert!(matches!(link.open().await, Err(LinkError::NotOpener)));

    let dial_frame = Frame::Dial {
        flow: Flow::Tcp,
        stream_id: 42,
        service: "demo".into(),
        target: "127.0.0.1:80".into(),
        principal: "alice".into(),
    };
    let mut b = broker.open().await.unwrap();
    b.write_frame(&dial_frame).await.unwrap();
    let mut c = soon("connector accepts", link.accept()).await.unwrap();
    assert_eq!(soon("dial", c.read_frame()).await.unwrap(), dial_frame);
    c.write_frame(&Frame::DialReply { code: DialCode::Ok })
        .await
        .unwrap();
    c.send_chunk(Bytes::from_static(b"from connector"))
        .await
        .unwrap();
    c.finish().await.unwrap();
    assert_eq!(
        soon("reply", b.read_frame()).await.unwrap(),
        Frame::DialReply { code: DialCode::Ok }
    );
    assert_eq!(soon("data", read_to_end(&mut b)).await, b"from connector");
    // The connector finished its half; the broker still sends.
    b.send_chunk(Bytes::from_static(b"from broker"))
        .await
        .unwrap();
    b.finish().await.unwrap();
    assert_eq!(soon("data", read_to_end(&mut c)).await, b"from broker");
}
both!(listener_opens_on_connector_links);

/// A connector may open no stream on its link: the broker opens them. Over QUIC the listener
/// allows a new connection a few streams before it knows the peer's role, and cannot take
/// that back; a connector that opens one anyway (here a raw quinn client with a real
/// connector certificate) loses the link, instead of having the broker hold what it sends.
/// The twin: the broker's own streams on that link work up to then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_opening_a_quic_stream_loses_the_link() {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let id = org.identity(Role::Connector, "c1");
    let tls = umbra_pki::client_config(&org.ca.cert_der(), Some(&id), &[ALPN], true).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            addr(&listener, Transport::Quic),
            &server_name(),
        )
        .unwrap();
    let conn = soon("handshake", connecting).await.unwrap();
    // Nor may it send QUIC datagrams, which nothing reads yet (UDP flows come later): the
    // broker does not offer them.
    assert_eq!(conn.max_datagram_size(), None);
    assert!(matches!(
        conn.send_datagram(Bytes::from_static(b"udp")),
        Err(quinn::SendDatagramError::UnsupportedByPeer)
    ));
    let broker = soon("accept", listener.accept()).await.unwrap();
    assert_eq!(broker.peer().id.role, Role::Connector);
    assert!(broker.is_opener());

    let mut b = broker.open().await.unwrap();
    b.send_chunk(Bytes::from_static(b"dial")).await.unwrap();
    let (_send, mut recv) = soon("the broker's stream", conn.accept_bi()).await.unwrap();
    let mut got = [0u8; 4];
    soon("its bytes", recv.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"dial");

    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&[0u8; 64 * 1024]).await;
    let why = soon("the link to close", conn.closed()).await;
    assert!(
        matches!(&why, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(1)),
        "{why:?}"
    );
    assert!(broker.is_closed());
}

/// A link this side refused counts as closed at once and opens no more streams, although on
/// QUIC its close goes out up to two round trips later: a broker sends no new stream to a
/// connector it has just refused (revoked). The twin: before the refusal it opens them.
async fn a_refused_link_opens_nothing(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let (link, broker) = connector_link(&org, &listener, t).await;
    let accepted = tokio::spawn(async move {
        // Held, not dropped: a dropped stream is reset.
        let mut held = Vec::new();
        while let Some(s) = link.accept().await {
            held.push(s);
        }
        held.len()
    });
    assert!(!broker.is_closed());
    let mut s = broker.open().await.unwrap();
    s.write_frame(&Frame::Ping { nonce: 1 }).await.unwrap();
    broker.refuse(Refusal::Identity);
    assert!(
        broker.is_closed(),
        "{t:?}: refused, so closed for new streams"
    );
    assert!(
        matches!(broker.open().await, Err(LinkError::Closed)),
        "{t:?}"
    );
    // At most the stream opened before the refusal reached the connector (on TLS links the
    // broker's refusal is a plain close, which may overtake it).
    let n = soon("the link closes", accepted).await.unwrap();
    assert!(n <= 1, "{t:?}: {n} streams reached the connector");
}
both!(a_refused_link_opens_nothing);

/// Many streams at once on one link, each echoed independently.
async fn many_concurrent_streams(t: Transport) {
    const N: usize = 200;
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let link = dial(
        addr(&listener, t),
        &server_name(),
        t,
        org.agent(),
        &LinkConfig::default(),
    )
    .await
    .unwrap();
    let server = soon("accept", listener.accept()).await.unwrap();
    tokio::spawn(async move {
        while let Some(mut s) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(b)) = s.recv_chunk().await {
                    if s.send_chunk(b).await.is_err() {
                        return;
                    }
                }
                let _ = s.finish().await;
            });
        }
    });
    let mut tasks = Vec::new();
    for i in 0..N {
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = link.open().await.unwrap();
            let data = pattern(16 * 1024 + i, i as u64);
            send_all(&mut s, &data).await;
            s.finish().await.unwrap();
            assert!(read_to_end(&mut s).await == data, "stream {i}");
            s.id()
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(soon("stream task", task).await.unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), N, "stream ids are unique");
}
both!(many_concurrent_streams);

/// More streams held open at once than a QUIC link allows its peer at first (256): the
/// limit grows as they are used, and no stream is refused or left waiting.
async fn streams_held_at_once_beyond_the_first_limit(t: Transport) {
    const N: usize = 1000;
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let (link, server) = agent_link(&org, &listener, t, &LinkConfig::default()).await;
    let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(s) = server.accept().await {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    let mut opened = Vec::new();
    for i in 0..N {
        let mut s = soon(&format!("stream {i} opens"), link.open())
            .await
            .unwrap();
        // A QUIC peer learns of a stream with its first byte.
        s.send_chunk(Bytes::from(vec![i as u8])).await.unwrap();
        opened.push(s);
    }
    // Every one of them open on both sides at once, then each echoes its byte.
    let mut held = Vec::new();
    for i in 0..N {
        held.push(
            soon(&format!("stream {i} accepted"), accepted.recv())
                .await
                .unwrap(),
        );
    }
    for s in &mut held {
        let b = soon("a byte", s.recv_chunk()).await.unwrap().unwrap();
        s.send_chunk(b).await.unwrap();
    }
    for (i, s) in opened.iter_mut().enumerate() {
        let b = soon("the echo", s.recv_chunk()).await.unwrap().unwrap();
        assert_eq!(&b[..], &[i as u8], "{t:?}: stream {i}");
    }
}
both!(streams_held_at_once_beyond_the_first_limit);

/// Resident memory of this process (nextest runs each test in its own).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A QUIC link costs the listener little memory before its peer uses it: quinn keeps state
/// for every stream a peer may open at once, and a link that allowed 65,536 from the
/// handshake on cost about 5 MiB, before any certificate was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_links_cost_little_memory() {
    const LINKS: usize = 100;
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let cfg = LinkConfig::default();
    // One link first, so that what every process sets up once is not counted.
    let first = agent_link(&org, &listener, Transport::Quic, &cfg).await;
    let before = rss_bytes();
    let mut links = Vec::new();
    for _ in 0..LINKS {
        links.push(agent_link(&org, &listener, Transport::Quic, &cfg).await);
    }
    let per_link = (rss_bytes().saturating_sub(before)) / LINKS as u64;
    eprintln!("QUIC: {} KiB per link (both ends)", per_link / 1024);
    assert!(
        per_link < 1024 * 1024,
        "{} KiB per QUIC link (both ends)",
        per_link / 1024
    );
    // They all work.
    for (agent, _) in links.iter().chain([&first]) {
        let mut s = agent.open().await.unwrap();
        s.send_chunk(Bytes::from_static(b"x")).await.unwrap();
    }
}

/// Malformed input gets `LinkError::Frame` (or `StreamEnded`) and only that stream suffers.
async fn malformed_frames_are_errors(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let link = dial(
        addr(&listener, t),
        &server_name(),
        t,
        org.agent(),
        &LinkConfig::default(),
    )
    .await
    .unwrap();
    let server = soon("accept", listener.accept()).await.unwrap();

    type Check = fn(&LinkError) -> bool;
    let cases: Vec<(&[u8], Check)> = vec![
        (&[9, 1, 0, 0], |e| {
            matches!(e, LinkError::Frame(FrameError::Version(9)))
        }),
        (&[1, 0x7f, 0, 0], |e| {
            matches!(e, LinkError::Frame(FrameError::UnknownKind(0x7f)))
        }),
        (&[1, 1, 0xff, 0xff], |e| {
            matches!(e, LinkError::Frame(FrameError::TooLong(_)))
        }),
        (&[1, 2, 0, 1, 99], |e| {
            matches!(e, LinkError::Frame(FrameError::BadValue(_)))
        }),
        // Truncated: a valid header, then the peer finishes.
        (&[1, 1, 0, 10, 1], |e| {
            matches!(e, LinkError::Frame(FrameError::Truncated))
        }),
        (&[], |e| matches!(e, LinkError::StreamEnded)),
    ];
    for (bytes, check) in cases {
        let mut c = link.open().await.unwrap();
        if bytes.is_empty() {
            // QUIC announces a stream with its first frame: finishing an empty stream does.
            c.finish().await.unwrap();
        } else {
            c.send_chunk(Bytes::copy_from_slice(bytes)).await.unwrap();
            c.finish().await.unwrap();
        }
        let mut s = soon("stream", server.accept()).await.unwrap();
        let e = soon("frame", s.read_frame()).await.unwrap_err();
        assert!(check(&e), "{bytes:?}: {e:?}");
        assert!(e.is_peer_fault());
        s.reset();
    }

    // A frame dribbled one byte at a time is still read, and the link still works.
    let mut c = link.open().await.unwrap();
    let bytes = open_frame().to_bytes().unwrap();
    let mut s = None;
    for b in bytes {
        c.send_chunk(Bytes::copy_from_slice(&[b])).await.unwrap();
        if s.is_none() {
            s = Some(soon("stream", server.accept()).await.unwrap());
        }
        tokio::task::yield_now().await;
    }
    let mut s = s.unwrap();
    assert_eq!(soon("frame", s.read_frame()).await.unwrap(), open_frame());
    assert!(!link.is_closed() && !server.is_closed());
}
both!(malformed_frames_are_errors);

/// A reset reaches the peer as `StreamReset`, both ways.
async fn reset_reaches_peer(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let link = dial(
        addr(&listener, t),
        &server_name(),
        t,
        org.agent(),
        &LinkConfig::default(),
    )
    .await
    .unwrap();
    let server = soon("accept", listener.accept()).await.unwrap();
    let mut c = link.open().await.unwrap();
    c.write_frame(&open_frame()).await.unwrap();
    let mut s = soon("stream", server.accept()).await.unwrap();
    s.read_frame().await.unwrap();
    c.reset();
    let e = soon("reset seen", s.recv_chunk()).await.unwrap_err();
    assert!(matches!(e, LinkError::StreamReset(_)), "{e:?}");
    // Dropping an unfinished stream resets it too.
    let mut c = link.open().await.unwrap();
    c.write_frame(&open_frame()).await.unwrap();
    let mut s = soon("stream", server.accept()).await.unwrap();
    s.read_frame().await.unwrap();
    drop(c);
    let e = soon("reset seen", s.recv_chunk()).await.unwrap_err();
    assert!(matches!(e, LinkError::StreamReset(_)), "{e:?}");
}
both!(reset_reaches_peer);

/// The stream operations of an agent whose link the broker ended: open a stream, send a
/// frame, read the answer; the first error.
async fn first_error(link: &Link) -> LinkError {
    let run = async {
        let mut s = link.open().await?;
        s.write_frame(&Frame::Ping { nonce: 1 }).await?;
        s.read_frame().await?;
        Ok::<(), LinkError>(())
    };
    let e = soon("the link to fail", run).await.unwrap_err();
    link.explain(e).await
}

/// A refused link tells the agent so, and which refusal (it can say "revoked or not enrolled",
/// or "too many links", instead of "the broker is unreachable"); a plain close does not claim
/// a refusal.
async fn refusal_reaches_the_agent(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let cfg = LinkConfig::default();

    for (why, says) in [
        (Refusal::Identity, "revoked, or not enrolled"),
        (Refusal::TooManyLinks, "as many links"),
    ] {
        let (link, server) = agent_link(&org, &listener, t, &cfg).await;
        server.refuse(why);
        let e = first_error(&link).await;
        assert_eq!(e.refusal(), Some(why), "{t:?}: {e:?}");
        assert!(e.to_string().contains("refused by the broker"), "{e}");
        assert!(e.to_string().contains(says), "{e}");
        soon("closed", link.closed()).await;
        assert_eq!(link.refused(), Some(why));
        // Later operations say so too; the refusal is not a protocol fault of the broker.
        assert_eq!(first_error(&link).await.refusal(), Some(why), "{t:?}");
        assert!(!e.is_peer_fault());
    }

    // The twin: a link closed without a refusal fails, but not as refused.
    let (link, server) = agent_link(&org, &listener, t, &cfg).await;
    server.close();
    let e = first_error(&link).await;
    assert_eq!(e.refusal(), None, "{t:?}: {e:?}");
    soon("closed", link.closed()).await;
    assert_eq!(link.refused(), None);
}
both!(refusal_reaches_the_agent);

/// Servers that are not brokers are refused by the dialer.
async fn dialer_refuses_non_brokers(t: Transport) {
    let org = Org::new();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // An agent certificate cannot even serve TLS (no serverAuth EKU, no DNS name).
    let agent = org.identity(Role::Agent, "dev9");
    let l = umbra_link::Listener::bind(
        Some(lo),
        Some(lo),
        org.server_tls(&agent),
        LinkConfig::default(),
    )
    .await
    .unwrap();
    let e = dial(
        addr(&l, t),
        &server_name(),
        t,
        org.agent(),
        &LinkConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(e.is_peer_fault(), "{e:?}");
    // A controller certificate carrying the broker's DNS name passes TLS; the role check
    // refuses it.
    let ctl = org.identity_with(
        Role::Controller,
        "ctl",
        vec![broker_server_name("b1")],
        SystemTime::now(),
        Duration::from_secs(3600),
    );
    let l = umbra_link::Listener::bind(
        Some(lo),
        Some(lo),
        org.server_tls(&ctl),
        LinkConfig::default(),
    )
    .await
    .unwrap();
    let e = dial(
        addr(&l, t),
        &server_name(),
        t,
        org.agent(),
        &LinkConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, LinkError::WrongPeer), "{e:?}");
}
both!(dialer_refuses_non_brokers);

/// Dial outcome for a client the listener must refuse: TLS 1.3 clients finish their side of
/// the handshake before the server checks their certificate, so the refusal shows either as
/// a dial error or as the link closing at once.
async fn refused(link: Result<Link, LinkError>) {
    if let Ok(link) = link {
        soon("refused link to close", link.closed()).await;
    }
}

/// No certificate, a foreign CA's certificate, an expired certificate: refused, and the
/// listener keeps serving a valid agent.
async fn bad_clients_refused_listener_still_serves(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let a = addr(&listener, t);
    let cfg = LinkConfig::default();

    refused(dial(a, &server_name(), t, org.client_tls(None), &cfg).await).await;

    let foreign = Org::new();
    let stranger = foreign.identity(Role::Agent, "dev1");
    let cfg_foreign = org.client_tls(Some(&stranger));
    refused(dial(a, &server_name(), t, cfg_foreign, &cfg).await).await;

    let day = Duration::from_secs(86_400);
    let expired = org.identity_with(
        Role::Agent,
        "dev1",
        vec![],
        SystemTime::now() - 2 * day,
        day,
    );
    refused(dial(a, &server_name(), t, org.client_tls(Some(&expired)), &cfg).await).await;

    let good = dial(a, &server_name(), t, org.agent(), &cfg).await.unwrap();
    let accepted = soon("accept", listener.accept()).await.unwrap();
    assert_eq!(accepted.peer().id.to_uri(), "umbra://default/agent/dev1");
    let mut s = good.open().await.unwrap();
    s.write_frame(&open_frame()).await.unwrap();
    let mut r = soon("stream", accepted.accept()).await.unwrap();
    assert_eq!(r.read_frame().await.unwrap(), open_frame());
}
both!(bad_clients_refused_listener_still_serves);

/// 500 TCP connections that send nothing (more than `max_pending_handshakes`), a few that
/// send garbage, and a burst of UDP garbage do not keep a valid agent out, on either
/// transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_block_valid_peers() {
    let org = Org::new();
    let cfg = LinkConfig {
        handshake_timeout: Duration::from_secs(20),
        ..LinkConfig::default()
    };
    let listener = org.listener(cfg.clone()).await;
    let tcp = listener.tcp_addr().unwrap();
    let udp = listener.quic_addr().unwrap();

    let mut stalled = Vec::new();
    for _ in 0..500 {
        stalled.push(tokio::net::TcpStream::connect(tcp).await.unwrap());
    }
    for i in 0..20u64 {
        let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
        s.write_all(&pattern(3000, i)).await.unwrap();
        stalled.push(s);
    }
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u64 {
        let len = 1 + (i as usize * 37) % 1400;
        let mut g = pattern(len, i);
        if i % 2 == 0 {
            // Looks like a QUIC long header (Initial), then garbage.
            g[0] = 0xc0 | (g[0] & 0x0f);
        }
        let _ = sock.send_to(&g, udp).await;
    }

    for t in [Transport::Quic, Transport::Tls] {
        let started = tokio::time::Instant::now();
        let link = tokio::time::timeout(
            Duration::from_secs(5),
            dial(addr(&listener, t), &server_name(), t, org.agent(), &cfg),
        )
        .await
        .expect("valid agent kept out")
        .unwrap();
        let accepted = soon("accept", listener.accept()).await.unwrap();
        assert_eq!(accepted.peer().id.role, Role::Agent);
        assert_eq!(accepted.transport(), t);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(link);
    }
    drop(stalled);
}

/// The first flight a real dialer sends on `t`: a QUIC Initial datagram (ClientHello
/// inside), or the TLS ClientHello bytes on TCP. Captured by pointing [`dial`] at a socket
/// that answers nothing.
async fn first_flight(org: &Org, t: Transport, cfg: &LinkConfig) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = match t {
        Transport::Quic => {
            let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let to = sink.local_addr().unwrap();
            let name = server_name();
            let d = dial(to, &name, t, org.agent(), cfg);
            tokio::select! {
                r = sink.recv(&mut buf) => r.unwrap(),
                r = d => panic!("dial ended before sending: {r:?}"),
            }
        }
        Transport::Tls => {
            let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let to = sink.local_addr().unwrap();
            let name = server_name();
            let d = dial(to, &name, t, org.agent(), cfg);
            let read = async {
                let (mut s, _) = sink.accept().await.unwrap();
                tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                    .await
                    .unwrap()
            };
            tokio::select! {
                n = read => n,
                r = d => panic!("dial ended before sending: {r:?}"),
            }
        }
    };
    buf.truncate(n);
    assert!(buf.len() > 200, "a first flight of {} bytes", buf.len());
    buf
}

/// A flood of QUIC Initials, each from an address of its own that then goes quiet (as forged
/// source addresses would), takes at most half the QUIC handshake slots: beyond that the
/// listener answers with a Retry, which only a sender that receives at its address can
/// follow. It evicts no TCP handshake (each transport has its own slots). The twins: a real
/// agent links over QUIC (through the Retry) and over TCP meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_initial_flood_takes_no_slot_it_cannot_prove() {
    let org = Org::new();
    let cfg = LinkConfig {
        handshake_timeout: Duration::from_secs(20),
        max_pending_handshakes: 8,
        ..LinkConfig::default()
    };
    let listener = org.listener(cfg.clone()).await;
    let udp = listener.quic_addr().unwrap();
    // Four stalled TCP handshakes, each from a loopback address of its own (one source holds
    // at most an eighth of the slots: see `pending.rs`).
    let mut stalled = Vec::new();
    for i in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.1.{}:0", i + 1).parse().unwrap())
            .unwrap();
        stalled.push(sock.connect(listener.tcp_addr().unwrap()).await.unwrap());
    }
    let mut senders = Vec::new();
    for i in 0..24 {
        let initial = first_flight(&org, Transport::Quic, &cfg).await;
        let sock = tokio::net::UdpSocket::bind(format!("127.0.2.{}:0", i + 1))
            .await
            .unwrap();
        sock.send_to(&initial, udp).await.unwrap();
        senders.push(sock);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 4 TCP + at most 4 (half of 8) QUIC.
    let held = listener.handshakes_in_progress();
    assert!(held <= 8, "{held} handshakes hold slots");
    // The later senders were asked to retry: the listener's first answer to them is a
    // long-header Retry packet (type 3), not its Initial. Each sender waits for that first
    // answer (all at once, up to 5 s: a loaded machine answers late, not differently).
    let mut firsts = tokio::task::JoinSet::new();
    for s in senders {
        firsts.spawn(async move {
            let mut buf = [0u8; 2048];
            let first = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await;
            matches!(first, Ok(Ok(n)) if n > 0 && buf[0] & 0xf0 == 0xf0)
        });
    }
    let mut retried = 0;
    while let Some(r) = firsts.join_next().await {
        retried += usize::from(r.unwrap());
    }
    assert!(retried >= 20, "{retried} of 24 senders were sent a Retry");
    // No stalled TCP handshake was evicted by the flood.
    for s in &mut stalled {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(
            Duration::from_millis(50),
            tokio::io::AsyncReadExt::read(s, &mut b),
        )
        .await;
        assert!(r.is_err(), "a stalled TCP handshake was closed: {r:?}");
    }
    agents_link_on_both_transports(&org, &listener, &cfg).await;
}

/// A dialer's QUIC socket takes datagrams from its broker only: a QUIC Initial sent to it
/// from another address gets no answer (an agent or a connector never listens, and a scanner
/// must not find its port responsive). The twin: the same Initial sent to the listener is
/// answered, and the dialer's link works throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialers_quic_port_answers_nobody_else() {
    let org = Org::new();
    let cfg = LinkConfig::default();
    let listener = org.listener(cfg.clone()).await;
    let (link, server) = agent_link(&org, &listener, Transport::Quic, &cfg).await;
    let dialer_port = server.remote_addr();
    let initial = first_flight(&org, Transport::Quic, &cfg).await;
    let scanner = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        scanner.send_to(&initial, dialer_port).await.unwrap();
    }
    let answer = tokio::time::timeout(Duration::from_millis(500), scanner.recv(&mut buf)).await;
    assert!(answer.is_err(), "the dialer's port answered: {answer:?}");
    scanner
        .send_to(&initial, listener.quic_addr().unwrap())
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), scanner.recv(&mut buf)).await;
    assert!(
        matches!(answer, Ok(Ok(n)) if n > 0),
        "the listener did not answer: {answer:?}"
    );
    // The link is not disturbed: a stream both ways.
    let mut s = link.open().await.unwrap();
    s.write_frame(&open_frame()).await.unwrap();
    let mut accepted = soon("stream", server.accept()).await.unwrap();
    assert_eq!(accepted.read_frame().await.unwrap(), open_frame());
}

/// A flood of bare TCP connects from one address evicts only its own handshakes in progress
/// (one source holds at most an eighth of the slots): a slower handshake from another address,
/// as a distant peer's is, keeps its slot however fast the flood comes. The twin: a real agent
/// links meanwhile, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_from_one_source_evicts_only_its_own() {
    let org = Org::new();
    let cfg = LinkConfig {
        handshake_timeout: Duration::from_secs(20),
        max_pending_handshakes: 16,
        ..LinkConfig::default()
    };
    let listener = org.listener(cfg.clone()).await;
    let to = listener.tcp_addr().unwrap();
    let from = |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        sock
    };
    // The distant peer's handshake, in progress (it has sent nothing yet).
    let mut far = from("127.0.3.1").connect(to).await.unwrap();
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(from("127.0.3.2").connect(to).await.unwrap());
    }
    // The flood's older connections were closed (evicted); the last ones hold its share.
    let mut closed = 0;
    for s in &mut flood {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(
            Duration::from_millis(20),
            tokio::io::AsyncReadExt::read(s, &mut b),
        )
        .await;
        closed += usize::from(matches!(r, Ok(Ok(0) | Err(_))));
    }
    assert!(closed >= 190, "{closed} of the flood's 200 evicted");
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        tokio::io::AsyncReadExt::read(&mut far, &mut b),
    )
    .await;
    assert!(r.is_err(), "the other source's handshake was closed: {r:?}");
    assert!(listener.handshakes_in_progress() <= 3);
    agents_link_on_both_transports(&org, &listener, &cfg).await;
}

/// Handshakes that start and then stall hold a slot only until the handshake timeout: silent
/// TCP connections, half a real ClientHello, and real QUIC Initials (each a new connection
/// at the listener) whose sender then goes quiet. The TCP ones are closed, every slot is
/// freed, and a valid agent then links on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_end_at_the_handshake_timeout() {
    let org = Org::new();
    // Long enough that setting up the stalls below (real Initials, made one by one) takes
    // well under half of it on a loaded machine.
    let timeout = Duration::from_secs(6);
    let cfg = LinkConfig {
        handshake_timeout: timeout,
        ..LinkConfig::default()
    };
    let listener = org.listener(cfg.clone()).await;
    let tcp = listener.tcp_addr().unwrap();
    let udp = listener.quic_addr().unwrap();

    let hello = first_flight(&org, Transport::Tls, &cfg).await;
    let mut stalled = Vec::new();
    for i in 0..6 {
        let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
        if i % 2 == 1 {
            s.write_all(&hello[..hello.len() / 2]).await.unwrap();
        }
        stalled.push(s);
    }
    let mut quiet = Vec::new();
    for _ in 0..4 {
        // A fresh Initial each time (its connection id is new), from a socket of its own.
        let initial = first_flight(&org, Transport::Quic, &cfg).await;
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&initial, udp).await.unwrap();
        quiet.push(sock);
    }
    let started = tokio::time::Instant::now();
    let all = stalled.len() + quiet.len();
    let mut seen = 0;
    while seen < all && started.elapsed() < timeout / 2 {
        seen = listener.handshakes_in_progress();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, all, "every stalled handshake holds a slot at first");
    // Not closed before their time (well within it here).
    let mut b = [0u8; 64];
    let early = tokio::time::timeout(
        Duration::from_millis(50),
        tokio::io::AsyncReadExt::read(&mut stalled[0], &mut b),
    )
    .await;
    assert!(early.is_err(), "closed early: {early:?}");

    // The TCP ones are closed by the listener once their time is up.
    for s in &mut stalled {
        let mut b = [0u8; 64];
        let r = tokio::time::timeout(timeout * 4, tokio::io::AsyncReadExt::read(s, &mut b))
            .await
            .expect("a stalled TCP handshake outlived the handshake timeout");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    let freed = tokio::time::timeout(timeout * 4, async {
        while listener.handshakes_in_progress() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        freed.is_ok(),
        "{} handshakes still in progress long after the timeout",
        listener.handshakes_in_progress()
    );

    // The twin: real agents link on both transports.
    agents_link_on_both_transports(&org, &listener, &cfg).await;
}

/// `Listener::close` ends `accept`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_close_ends_accept() {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    listener.close();
    assert!(
        soon("accept after close", listener.accept())
            .await
            .is_none()
    );
}

/// A link closed by the side sending at full speed (its congestion window full, data in
/// flight) reaches the peer at once, not at the peer's idle timeout (30 s): ten tries, each
/// closing at a different point of a transfer under way.
async fn close_during_bulk_reaches_the_peer(t: Transport) {
    let org = Org::new();
    let listener = org.listener(LinkConfig::default()).await;
    let cfg = LinkConfig::default();
    let mut late = Vec::new();
    for i in 0..10u64 {
        let (link, server) = agent_link(&org, &listener, t, &cfg).await;
        let mut c = link.open().await.unwrap();
        c.write_frame(&open_frame()).await.unwrap();
        let mut s = soon("stream", server.accept()).await.unwrap();
        s.read_frame().await.unwrap();
        let sender = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; 64 * 1024]);
            while s.send_chunk(chunk.clone()).await.is_ok() {}
        });
        let received = Arc::new(AtomicUsize::new(0));
        let counted = received.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(b)) = c.recv_chunk().await {
                counted.fetch_add(b.len(), Ordering::Relaxed);
            }
        });
        // Under way: at least 1 MiB through, then a little more each try.
        soon("1 MiB through", async {
            while received.load(Ordering::Relaxed) < 1 << 20 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(3 * i)).await;
        server.close();
        if tokio::time::timeout(Duration::from_secs(3), link.closed())
            .await
            .is_err()
        {
            late.push(i);
        }
        sender.abort();
        reader.abort();
    }
    assert_eq!(
        late,
        Vec::<u64>::new(),
        "[{t:?}] closes not seen within 3 s"
    );
}
both!(close_during_bulk_reaches_the_peer);
