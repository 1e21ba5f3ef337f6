//! The relay loops, chained as in production:
//! TCP client -> agent `relay_tcp` -> link -> broker `relay_streams` -> link -> connector
//! `relay_tcp` -> TCP echo server.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use umbra_link::{
    Counters, Link, LinkConfig, LinkError, TcpEnd, Transport, dial, relay_streams, relay_tcp,
};
use umbra_proto::{DialCode, Flow, Frame, OpenCode, Role};

use crate::common::{Org, addr, both, pattern, server_name, soon};

/// A TCP echo server that echoes until EOF, then half-closes.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

struct Chain {
    /// Where TCP clients connect (the agent's local port).
    entry: std::net::SocketAddr,
    agent_counters: Arc<Counters>,
    broker_counters: Arc<Counters>,
    connector_counters: Arc<Counters>,
    /// How each of the broker's relays ended.
    broker_ends: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Result<(), LinkError>>>,
    _links: Vec<Link>,
}

/// Each relay's idle timeout (zero: none).
#[derive(Clone, Copy)]
struct Idle {
    agent: Duration,
    broker: Duration,
    connector: Duration,
}

/// Broker, connector and agent wired together over transport `t`; `idle` for every relay.
async fn chain(t: Transport, idle: Duration) -> Chain {
    let idle = Idle {
        agent: idle,
        broker: idle,
        connector: idle,
    };
    chain_with(t, idle, echo_server().await).await
}

/// The chain with an idle timeout per relay.
async fn chain_with(t: Transport, idle: Idle, target: std::net::SocketAddr) -> Chain {
    let org = Org::new();
    let cfg = LinkConfig::default();
    let listener = org.listener(cfg.clone()).await;

    // Connector: accepts streams from the broker, dials the target, relays.
    let conn_link = dial(addr(&listener, t), &server_name(), t, org.connector(), &cfg)
        .await
        .unwrap();
    let connector_counters = Arc::new(Counters::default());
    {
        let conn_link = conn_link.clone();
        let counters = connector_counters.clone();
        tokio::spawn(async move {
            while let Some(mut s) = conn_link.accept().await {
                let counters = counters.clone();
                tokio::spawn(async move {
                    let Ok(Frame::Dial { target, .. }) = s.read_frame().await else {
                        return;
                    };
                    let tcp = TcpStream::connect(target).await.unwrap();
                    s.write_frame(&Frame::DialReply { code: DialCode::Ok })
                        .await
                        .unwrap();
                    let _ = relay_tcp(tcp, s, TcpEnd::Service, idle.connector, &counters).await;
                });
            }
        });
    }
    let agent_link = dial(addr(&listener, t), &server_name(), t, org.agent(), &cfg)
        .await
        .unwrap();

    // Broker: sort the two links by role, route agent streams to the connector.
    let mut from_agent = None;
    let mut to_connector = None;
    while from_agent.is_none() || to_connector.is_none() {
        let l = soon("broker accept", listener.accept()).await.unwrap();
        match l.peer().id.role {
            Role::Agent => from_agent = Some(l),
            Role::Connector => to_connector = Some(l),
            r => panic!("unexpected {r}"),
        }
    }
    let (from_agent, to_connector) = (from_agent.unwrap(), to_connector.unwrap());
    let broker_counters = Arc::new(Counters::default());
    let (ended, broker_ends) = tokio::sync::mpsc::unbounded_channel();
    {
        let counters = broker_counters.clone();
        let (from_agent, to_connector) = (from_agent.clone(), to_connector.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(mut a) = from_agent.accept().await {
                n += 1;
                let to_connector = to_connector.clone();
                let counters = counters.clone();
                let ended = ended.clone();
                tokio::spawn(async move {
                    let Ok(Frame::Open { service, .. }) = a.read_frame().await else {
                        return;
                    };
                    let mut c = to_connector.open().await.unwrap();
                    c.write_frame(&Frame::Dial {
                        flow: Flow::Tcp,
                        stream_id: n,
                        service,
                        target: target.to_string(),
                        principal: "alice".into(),
                    })
                    .await
                    .unwrap();
                    assert_eq!(
                        c.read_frame().await.unwrap(),
                        Frame::DialReply { code: DialCode::Ok }
                    );
                    a.write_frame(&Frame::OpenReply { code: OpenCode::Ok })
                        .await
                        .unwrap();
                    let _ = ended.send(relay_streams(a, c, idle.broker, &counters).await);
                });
            }
        });
    }

    // Agent: local port; each TCP connection becomes a stream.
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let entry = local.local_addr().unwrap();
    let agent_counters = Arc::new(Counters::default());
    {
        let agent_link = agent_link.clone();
        let counters = agent_counters.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = local.accept().await {
                let agent_link = agent_link.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    let mut s = agent_link.open().await.unwrap();
                    s.write_frame(&Frame::Open {
                        flow: Flow::Tcp,
                        service: "demo".into(),
                        credential: vec![],
                    })
                    .await
                    .unwrap();
                    assert_eq!(
                        s.read_frame().await.unwrap(),
                        Frame::OpenReply { code: OpenCode::Ok }
                    );
                    let _ = relay_tcp(tcp, s, TcpEnd::Client, idle.agent, &counters).await;
                });
            }
        });
    }
    Chain {
        entry,
        agent_counters,
        broker_counters,
        connector_counters,
        broker_ends: tokio::sync::Mutex::new(broker_ends),
        _links: vec![conn_link, agent_link, from_agent, to_connector],
    }
}

/// Sends `data` through the chain and returns what came back (reading concurrently).
async fn round_trip(entry: std::net::SocketAddr, data: Arc<Vec<u8>>) -> Vec<u8> {
    let tcp = TcpStream::connect(entry).await.unwrap();
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        for piece in data.chunks(100_000) {
            w.write_all(piece).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

/// 8 MiB each way through agent -> broker -> connector -> echo, intact, half-close honoured
/// at every hop (the echo's EOF only comes after the client's).
async fn chain_moves_8_mib_both_ways(t: Transport) {
    let c = chain(t, Duration::from_secs(30)).await;
    let data = Arc::new(pattern(8 << 20, 99));
    let back = soon("8 MiB round trip", round_trip(c.entry, data.clone())).await;
    assert_eq!(back.len(), data.len());
    assert!(back == *data, "bytes differ");
    // Counters: relays finish right after the client sees EOF; wait for the last adds.
    soon("agent counters", async {
        loop {
            let up = c
                .agent_counters
                .up
                .load(std::sync::atomic::Ordering::Relaxed);
            let down = c
                .agent_counters
                .down
                .load(std::sync::atomic::Ordering::Relaxed);
            if up == 8 << 20 && down == 8 << 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        c.broker_counters
            .up
            .load(std::sync::atomic::Ordering::Relaxed),
        8 << 20
    );

    // Several flows at once over the same links.
    let mut flows = Vec::new();
    for i in 0..8 {
        let data = Arc::new(pattern(256 * 1024 + i, i as u64));
        let entry = c.entry;
        flows.push(tokio::spawn(async move {
            let back = round_trip(entry, data.clone()).await;
            assert!(back == *data, "flow {i}");
        }));
    }
    for f in flows {
        soon("parallel flows", f).await.unwrap();
    }
}
both!(chain_moves_8_mib_both_ways);

/// On loopback (64 KiB MTU) path MTU discovery finds a large MTU on every link, in both
/// directions (each side accepts large datagrams), and bulk data goes in large packets with
/// no black hole detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_uses_the_large_loopback_mtu_under_load() {
    let c = chain(Transport::Quic, Duration::from_secs(30)).await;
    let data = Arc::new(pattern(48 << 20, 7));
    let back = soon("48 MiB round trip", round_trip(c.entry, data.clone())).await;
    assert!(back == *data, "bytes differ");
    for l in &c._links {
        let p = l.quic_path().expect("a QUIC link");
        assert_eq!(p.black_holes, 0, "{:?} link: {p:?}", l.peer().id.role);
        assert!(p.mtu > 16_000, "{:?} link: {p:?}", l.peer().id.role);
    }
    // The data itself went in large packets: 48 MiB each way is far fewer than the 35,000
    // packets of 1452 bytes it would take.
    let sent: u64 = c
        ._links
        .iter()
        .map(|l| l.quic_path().unwrap().sent_packets)
        .sum();
    assert!(sent < 4 * 35_000, "{sent} packets on four links");
}

/// The broker's relay, idle, ends with `Timeout` and resets both streams, so the TCP client
/// sees its connection end, not before the idle time. Only the broker has an idle timeout
/// here: the agent's and the connector's relays would wait for ever.
async fn idle_relay_times_out(t: Transport) {
    let idle = Duration::from_millis(300);
    let c = chain_with(
        t,
        Idle {
            agent: Duration::ZERO,
            broker: idle,
            connector: Duration::ZERO,
        },
        echo_server().await,
    )
    .await;
    let mut tcp = TcpStream::connect(c.entry).await.unwrap();
    tcp.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // Now silence.
    let quiet = std::time::Instant::now();
    let end = soon("the broker's relay to end", async {
        c.broker_ends.lock().await.recv().await
    })
    .await;
    assert!(matches!(end, Some(Err(LinkError::Timeout(_)))), "{end:?}");
    assert!(quiet.elapsed() >= idle, "ended after {:?}", quiet.elapsed());
    // The agent's relay saw its stream reset and reset the client's connection: an end the
    // client cannot take for a complete answer.
    let mut rest = Vec::new();
    let r = soon("the client's connection to end", tcp.read_to_end(&mut rest)).await;
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{t}: the client saw a clean end"
    );
    assert!(rest.is_empty());
}
both!(idle_relay_times_out);

/// Resets `s` (SO_LINGER 0, then close), as a crashing or aborting peer does.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// A service that resets its connection in the middle of an answer: the client's read ends
/// in an error, not in a clean end of data that would pass a truncated transfer for a whole
/// one. The twin is `chain_moves_8_mib_both_ways`: an answer that ends well ends cleanly.
async fn a_reset_service_resets_the_client(t: Transport) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 1];
                let _ = s.read_exact(&mut req).await;
                let _ = s.write_all(&pattern(300_000, 3)).await;
                reset(s);
            });
        }
    });
    let none = Idle {
        agent: Duration::ZERO,
        broker: Duration::ZERO,
        connector: Duration::ZERO,
    };
    let c = chain_with(t, none, target).await;
    let mut tcp = TcpStream::connect(c.entry).await.unwrap();
    tcp.write_all(b"?").await.unwrap();
    let mut got = Vec::new();
    let r = soon("the client's read to end", tcp.read_to_end(&mut got)).await;
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "{t}: the client read {} bytes and a clean end",
        got.len()
    );
    assert!(got.len() <= 300_000);
}
both!(a_reset_service_resets_the_client);

/// A client that aborts (resets) mid-upload: the service's read ends in an error, not in a
/// clean end that it would take for a complete request. The twin: a client that half-closes
/// after the same bytes is read to a clean end with every byte.
async fn an_aborted_upload_resets_the_service(t: Transport) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let (ends, mut ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ends = ends.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let r = s.read_to_end(&mut got).await.map_err(|e| e.kind());
                let _ = ends.send((r, got.len()));
            });
        }
    });
    let none = Idle {
        agent: Duration::ZERO,
        broker: Duration::ZERO,
        connector: Duration::ZERO,
    };
    let c = chain_with(t, none, target).await;
    for abort in [true, false] {
        let mut tcp = TcpStream::connect(c.entry).await.unwrap();
        tcp.write_all(&pattern(14_000, 5)).await.unwrap();
        // Let the bytes reach the service before the end.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if abort {
            reset(tcp);
        } else {
            tcp.shutdown().await.unwrap();
        }
        let (r, n) = soon("the service's read to end", ended.recv())
            .await
            .unwrap();
        if abort {
            assert_eq!(
                r.err(),
                Some(std::io::ErrorKind::ConnectionReset),
                "{t}: the service read {n} bytes and a clean end of an aborted upload"
            );
        } else {
            assert_eq!((r, n), (Ok(14_000), 14_000), "{t}");
        }
    }
}
both!(an_aborted_upload_resets_the_service);

/// A stream the broker ends while a relay at its edge has both directions parked (its TCP
/// peer neither reads nor sends: a stalled download, a service that stopped reading) ends
/// that relay at once and resets its TCP connection, though the edges here have no idle
/// limit: before, it stayed open until the idle limit (an hour by default), after access
/// was revoked. The broker's relay ends first, by its own idle limit, as a revocation ends
/// it. Round `A`: the client uploads to a service that reads nothing (the connector's
/// relay is parked both ways); round `B`: the service sends to a client that reads nothing
/// (the agent's is).
async fn a_stalled_relay_ends_when_the_broker_ends_its_stream(t: Transport) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let (held, mut service_conns) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                s.read_exact(&mut mode).await.unwrap();
                if mode[0] == b'B' {
                    // Sends until the client's relay is full, then waits.
                    let _ = s.write_all(&pattern(16 << 20, 7)).await;
                }
                let _ = held.send(s);
            });
        }
    });
    let edges_never_idle = Idle {
        agent: Duration::ZERO,
        broker: Duration::from_millis(500),
        connector: Duration::ZERO,
    };
    let c = chain_with(t, edges_never_idle, target).await;

    // A: the service reads nothing, sends nothing.
    let mut client = TcpStream::connect(c.entry).await.unwrap();
    client.write_all(b"A").await.unwrap();
    let (_r, mut w) = client.into_split();
    let uploading = tokio::spawn(async move {
        let _ = w.write_all(&pattern(16 << 20, 5)).await;
        w
    });
    let service = soon("the service's connection", service_conns.recv())
        .await
        .unwrap();
    let end = soon(
        "the broker's relay to end",
        c.broker_ends.lock().await.recv(),
    )
    .await;
    assert!(matches!(end, Some(Err(LinkError::Timeout(_)))), "{end:?}");
    // Reading would drain the connection and set the relay going again: its reset is
    // watched for in the socket's pending error instead.
    soon(
        "the connector to reset the service's connection",
        reset_seen(&service),
    )
    .await;
    uploading.abort();

    // B: the client reads nothing, sends nothing more.
    let mut client = TcpStream::connect(c.entry).await.unwrap();
    client.write_all(b"B").await.unwrap();
    let end = soon(
        "the broker's relay to end",
        c.broker_ends.lock().await.recv(),
    )
    .await;
    assert!(matches!(end, Some(Err(LinkError::Timeout(_)))), "{end:?}");
    soon(
        "the agent to reset the client's connection",
        reset_seen(&client),
    )
    .await;
}
both!(a_stalled_relay_ends_when_the_broker_ends_its_stream);

/// Returns once `tcp` was reset by its peer, read from its pending error (`SO_ERROR`)
/// without reading any data.
async fn reset_seen(tcp: &TcpStream) {
    loop {
        match tcp.take_error().unwrap() {
            Some(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Some(e) => panic!("{e}"),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Every relay counts bytes the same way: `up` towards the service, `down` back to the client,
/// the connector included (its TCP connection is the service's end). A target that answers
/// three bytes for each one it reads tells the two apart.
async fn relays_count_each_direction(t: Transport) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(&got.repeat(3)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let idle = Idle {
        agent: Duration::ZERO,
        broker: Duration::ZERO,
        connector: Duration::ZERO,
    };
    let c = chain_with(t, idle, target).await;
    let sent = 100_000;
    let back = soon(
        "round trip",
        round_trip(c.entry, Arc::new(pattern(sent, 7))),
    )
    .await;
    assert_eq!(back.len(), 3 * sent);
    let want = (sent as u64, 3 * sent as u64);
    for (who, counters) in [
        ("agent", &c.agent_counters),
        ("broker", &c.broker_counters),
        ("connector", &c.connector_counters),
    ] {
        soon(who, async {
            loop {
                let got = (
                    counters.up.load(std::sync::atomic::Ordering::Relaxed),
                    counters.down.load(std::sync::atomic::Ordering::Relaxed),
                );
                if got == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}
both!(relays_count_each_direction);

/// `relay_tcp` itself returns `Timeout` when nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_tcp_reports_idle_timeout() {
    for t in [Transport::Quic, Transport::Tls] {
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
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = link.open().await.unwrap();
        s.write_frame(&Frame::ListServices).await.unwrap();
        let mut peer = soon("stream", server.accept()).await.unwrap();
        assert_eq!(peer.read_frame().await.unwrap(), Frame::ListServices);
        let counters = Counters::default();
        let r = soon(
            "relay idle",
            relay_tcp(
                tcp,
                s,
                TcpEnd::Client,
                Duration::from_millis(200),
                &counters,
            ),
        )
        .await;
        assert!(matches!(r, Err(LinkError::Timeout(_))), "{t}: {r:?}");
        // The peer's stream was reset.
        let e = soon("peer sees reset", peer.recv_chunk()).await;
        assert!(matches!(e, Err(LinkError::StreamReset(_))), "{t}: {e:?}");
        drop(client);
    }
}
