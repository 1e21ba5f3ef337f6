//! The connector against a real link endpoint.
//!
//! A `umbra_link::Listener` with a broker certificate stands in for the broker's transport
//! endpoint: it accepts the connector's link and opens streams carrying `Dial` frames, as a
//! broker would. The connector starts offline (no controller reachable): its identity,
//! `controller.json` (with this endpoint as its only broker) and `published.json` are on disk,
//! which is the documented way a connector restarts while the controller is away.
//!
//! The connector's log lines and any panic on a runtime worker are captured (see `capture`),
//! so that a case can assert that an error was logged and that nothing panicked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use umbra_connector::{Connector, ConnectorConfig, TransportPref};
use umbra_link::enroll::{ControllerRef, save_controller_ref};
use umbra_link::{ALPN, Link, LinkConfig, Listener, Stream};
use umbra_pki::{Ca, ClientAuth};
use umbra_proto::api::{BrokerInfo, ConnectorConfig as Published, PublishedTarget};
use umbra_proto::{DialCode, Flow, Frame, OpenCode, PeerId, Role};

const ORG: &str = "test";
const WAIT: Duration = Duration::from_secs(15);

/// A TCP echo server that counts the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let n = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if s.write_all(&buf[..k]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepts)
}

/// A broker transport endpoint with a certificate from `ca` for broker `id` (named
/// `broker-<id>`).
///
/// Its links time out after 3 s of silence (keepalives every second keep them up): on QUIC a
/// close from the connector may never be sent, since quinn-proto (0.11.19 at least) does not
/// send CONNECTION_CLOSE while congestion-blocked, which a 64 KiB MTU probe on loopback makes
/// common (quinn-rs/quinn#2785); the endpoint then sees the link end by this timeout.
async fn broker_endpoint(ca: &Ca, id: &str) -> (Listener, BrokerInfo) {
    let server_name = umbra_pki::broker_server_name(id);
    let tls = umbra_pki::test_util::identity(ca, Role::Broker, id).unwrap();
    let server = umbra_pki::server_config(&tls, ClientAuth::Required, &[ALPN], false).unwrap();
    let listener = Listener::bind(
        Some("127.0.0.1:0".parse().unwrap()),
        Some("127.0.0.1:0".parse().unwrap()),
        Arc::new(server),
        LinkConfig {
            idle_timeout: Duration::from_secs(3),
            keepalive: Duration::from_secs(1),
            ..LinkConfig::default()
        },
    )
    .await
    .unwrap();
    let info = BrokerInfo {
        id: id.into(),
        name: format!("broker-{id}"),
        quic_addr: listener.quic_addr().map(|a| a.to_string()),
        tcp_addr: listener.tcp_addr().map(|a| a.to_string()),
        server_name,
    };
    (listener, info)
}

/// An enrolled connector's identity directory, as enrollment and a previous run leave it.
fn connector_dir(ca: &Ca, dir: &Path, broker: BrokerInfo, targets: Vec<PublishedTarget>) {
    let p = umbra_pki::test_util::issue_pems(
        ca,
        PeerId::new(ORG, Role::Connector, "c-1").unwrap(),
        vec![],
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, ca.cert_pem()).unwrap();
    save_controller_ref(
        dir,
        &ControllerRef {
            // Nothing listens here: the connector must serve from its cache.
            url: "https://127.0.0.1:9".into(),
            identity: format!("umbra://{ORG}/connector/c-1"),
            user: None,
            brokers: vec![broker],
        },
    )
    .unwrap();
    let published = Published {
        connector_id: "c-1".into(),
        version: 7,
        targets,
    };
    std::fs::write(
        dir.join("published.json"),
        serde_json::to_vec(&published).unwrap(),
    )
    .unwrap();
}

async fn dial(link: &Link, service: &str, target: &str) -> (DialCode, Stream) {
    let mut s = tokio::time::timeout(WAIT, link.open())
        .await
        .unwrap()
        .unwrap();
    s.write_frame(&Frame::Dial {
        flow: Flow::Tcp,
        stream_id: 1,
        service: service.into(),
        target: target.into(),
        principal: "alice@example.test".into(),
    })
    .await
    .unwrap();
    match tokio::time::timeout(WAIT, s.read_frame())
        .await
        .unwrap()
        .unwrap()
    {
        Frame::DialReply { code } => (code, s),
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn echo_round_trip(s: &mut Stream, msg: &'static [u8]) {
    s.send_chunk(Bytes::from_static(msg)).await.unwrap();
    let mut got = Vec::new();
    while got.len() < msg.len() {
        match tokio::time::timeout(WAIT, s.recv_chunk())
            .await
            .unwrap()
            .unwrap()
        {
            Some(b) => got.extend_from_slice(&b),
            None => break,
        }
    }
    assert_eq!(got, msg);
}

async fn serves_only_published(transport: TransportPref) {
    capture::init();
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let (echo, accepts) = echo_server().await;
    let (listener, broker) = broker_endpoint(&ca, "b-1").await;
    let dir = tempfile::tempdir().unwrap();
    let published = echo.to_string();
    connector_dir(
        &ca,
        dir.path(),
        broker,
        vec![PublishedTarget {
            service: "echo".into(),
            target: published.clone(),
        }],
    );

    let connector = Connector::start(ConnectorConfig {
        identity_dir: dir.path().to_path_buf(),
        transport,
        dial_timeout_ms: 2_000,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(connector.identity(), format!("umbra://{ORG}/connector/c-1"));

    let link = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(link.peer().id.role, Role::Connector);
    assert_eq!(link.peer().id.id, "c-1");
    let want = match transport {
        TransportPref::Tcp => umbra_link::Transport::Tls,
        _ => umbra_link::Transport::Quic,
    };
    assert_eq!(link.transport(), want);

    // The published target, exactly as published: connected, bytes flow both ways.
    let (code, mut s) = dial(&link, "echo", &published).await;
    assert_eq!(code, DialCode::Ok);
    echo_round_trip(&mut s, b"hello through the connector").await;
    s.finish().await.unwrap();
    assert_eq!(accepts.load(Ordering::SeqCst), 1);

    // The same address written differently, another port, another service: refused, and no
    // connection reaches the echo server.
    let port = echo.port();
    let refused = [
        ("echo", format!("[::ffff:127.0.0.1]:{port}")),
        ("echo", format!("localhost:{port}")),
        ("echo", format!("2130706433:{port}")),
        ("echo", format!("127.1:{port}")),
        ("echo", format!("127.0.0.1:{}", port.wrapping_add(1).max(1))),
        ("other", published.clone()),
    ];
    for (service, target) in &refused {
        let (code, _s) = dial(&link, service, target).await;
        assert_eq!(code, DialCode::NotPublished, "{service} {target}");
    }
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "a refused dial reached the target"
    );

    // A stream the broker ends without a request is not a malformed frame: that stream is
    // reset... (malformed frames close the link: `malformed_requests_close_the_link_*`)
    let mut g = link.open().await.unwrap();
    g.finish().await.unwrap();
    let r = tokio::time::timeout(WAIT, g.recv_chunk()).await.unwrap();
    assert!(r.is_err(), "expected a reset, got {r:?}");

    // ...and the connector still serves the next valid Dial on the same link.
    let (code, mut s) = dial(&link, "echo", &published).await;
    assert_eq!(code, DialCode::Ok);
    echo_round_trip(&mut s, b"still serving").await;
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
    assert!(
        !link.is_closed(),
        "a stream without a request closed the link"
    );

    // Pings are answered.
    let mut p = link.open().await.unwrap();
    p.write_frame(&Frame::Ping { nonce: 99 }).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, p.read_frame())
            .await
            .unwrap()
            .unwrap(),
        Frame::Pong { nonce: 99 }
    );

    assert_eq!(capture::worker_panics(), Vec::<String>::new());
    connector.shutdown().await;
    // The connector closed its link.
    tokio::time::timeout(WAIT, link.closed()).await.unwrap();
    listener.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_only_published_targets_over_quic() {
    serves_only_published(TransportPref::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_only_published_targets_over_tcp() {
    serves_only_published(TransportPref::Tcp).await;
}

/// `auto`: where QUIC gets no answer (UDP blackholed), the connector falls back to TLS over
/// TCP and serves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_tcp_when_quic_gets_no_answer() {
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let (echo, accepts) = echo_server().await;
    let (listener, mut broker) = broker_endpoint(&ca, "b-1").await;
    // A UDP socket that reads nothing and answers nothing.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    broker.quic_addr = Some(blackhole.local_addr().unwrap().to_string());
    let dir = tempfile::tempdir().unwrap();
    connector_dir(
        &ca,
        dir.path(),
        broker,
        vec![PublishedTarget {
            service: "echo".into(),
            target: echo.to_string(),
        }],
    );
    let connector = Connector::start(ConnectorConfig {
        identity_dir: dir.path().to_path_buf(),
        transport: TransportPref::Auto,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap();
    let link = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(link.transport(), umbra_link::Transport::Tls);
    let (code, mut s) = dial(&link, "echo", &echo.to_string()).await;
    assert_eq!(code, DialCode::Ok);
    echo_round_trip(&mut s, b"over tcp").await;
    assert_eq!(accepts.load(Ordering::SeqCst), 1);
    connector.shutdown().await;
    drop(blackhole);
}

/// Header frames from the broker that are not requests: bytes that are no frame (a bad
/// version, an unknown kind, a length over the limit, a bad field) and a well-formed frame of
/// the wrong kind. Each closes the whole link (the broker endpoint sees it end), the connector
/// logs a warning naming the broker and the frame error, nothing panics; the twin: the
/// connector redials at once and the new link serves a valid `Dial`.
async fn malformed_requests_close_the_link(transport: TransportPref) {
    capture::init();
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let (echo, accepts) = echo_server().await;
    // An id of its own, so that the log lines of concurrent tests are told apart.
    let id = format!("b-bad-frames-{}", transport.as_str());
    let (listener, broker) = broker_endpoint(&ca, &id).await;
    let name = broker.name.clone();
    let dir = tempfile::tempdir().unwrap();
    let published = echo.to_string();
    connector_dir(
        &ca,
        dir.path(),
        broker,
        vec![PublishedTarget {
            service: "echo".into(),
            target: published.clone(),
        }],
    );
    let connector = Connector::start(ConnectorConfig {
        identity_dir: dir.path().to_path_buf(),
        transport,
        dial_timeout_ms: 2_000,
        reconnect_base_ms: 50,
        reconnect_cap_ms: 500,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap();
    let mut link = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (code, mut s) = dial(&link, "echo", &published).await;
    assert_eq!(code, DialCode::Ok);
    echo_round_trip(&mut s, b"before any bad frame").await;

    let mut bad_field = Frame::Dial {
        flow: Flow::Tcp,
        stream_id: 1,
        service: "echo".into(),
        target: published.clone(),
        principal: "alice@example.test".into(),
    }
    .to_bytes()
    .unwrap();
    bad_field[4] = 9; // the flow byte
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "bad version",
            vec![2, 3, 0, 0],
            "unsupported frame version 2",
        ),
        (
            "unknown kind",
            vec![1, 0x7f, 0, 0],
            "unknown frame kind 0x7f",
        ),
        (
            "oversized length",
            vec![1, 3, 0xff, 0xff],
            "frame payload of 65535 bytes exceeds the limit",
        ),
        ("bad field", bad_field, "invalid flow"),
        (
            "a frame that is not a request",
            Frame::OpenReply { code: OpenCode::Ok }.to_bytes().unwrap(),
            "unexpected frame OpenReply",
        ),
    ];
    for (i, (what, bytes, says)) in cases.into_iter().enumerate() {
        let mut g = link.open().await.unwrap();
        g.send_chunk(Bytes::from(bytes)).await.unwrap();
        let closed = tokio::time::timeout(WAIT, link.closed()).await;
        assert!(
            closed.is_ok(),
            "[{transport:?}] {what}: the link stayed up; logged:\n{}",
            capture::all().join("\n")
        );
        let want = [
            "malformed request frame from broker; closing its link",
            name.as_str(),
            says,
        ];
        let lines = capture::wait_for(&want).await;
        assert!(!lines.is_empty(), "[{transport:?}] {what}: nothing logged");
        eprintln!("[{transport:?}] {what}: {}", lines[0]);

        // The twin: the connector redials, and the new link serves.
        link = tokio::time::timeout(WAIT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let (code, mut s) = dial(&link, "echo", &published).await;
        assert_eq!(code, DialCode::Ok, "[{transport:?}] after {what}");
        echo_round_trip(&mut s, b"served after a bad frame").await;
        assert_eq!(accepts.load(Ordering::SeqCst), i + 2);
    }
    assert_eq!(capture::worker_panics(), Vec::<String>::new());
    connector.shutdown().await;
    listener.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_close_the_link_over_quic() {
    malformed_requests_close_the_link(TransportPref::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_close_the_link_over_tcp() {
    malformed_requests_close_the_link(TransportPref::Tcp).await;
}

/// What this test process logged (INFO and above, one line per event, fields as
/// `name=value`, span fields left out), and the panics of runtime worker threads, where the
/// connector's tasks run. Installed once per process as the global subscriber.
mod capture {
    use std::fmt::Write as _;
    use std::sync::{Mutex, Once};
    use std::time::{Duration, Instant};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static INIT: Once = Once::new();

    struct Capture;

    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            *m.level() <= Level::INFO
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let m = e.metadata();
            let mut line = Line(format!("{} {}:", m.level(), m.target()));
            e.record(&mut line);
            LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    pub(crate) fn init() {
        INIT.call_once(|| {
            tracing::subscriber::set_global_default(Capture).unwrap();
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let worker = std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("tokio-runtime-worker"));
                if worker {
                    PANICS
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(info.to_string());
                }
                default(info);
            }));
        });
    }

    /// The captured lines that contain every one of `parts`, waiting up to 5 s for one.
    pub(crate) async fn wait_for(parts: &[&str]) -> Vec<String> {
        let start = Instant::now();
        loop {
            let found: Vec<String> = LINES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
                .collect();
            if !found.is_empty() || start.elapsed() > Duration::from_secs(5) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every captured line, for failure messages.
    pub(crate) fn all() -> Vec<String> {
        LINES.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Panics seen on runtime worker threads so far.
    pub(crate) fn worker_panics() -> Vec<String> {
        PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One broker link holds at most `max_streams_per_link` streams (each a connection to a
/// target): the next one waits for a place instead of costing the connector another
/// connection, so no broker can take every descriptor. The twin: once one ends, it is
/// served.
async fn streams_per_broker_link_are_bounded(transport: TransportPref) {
    capture::init();
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let (echo, accepts) = echo_server().await;
    let (listener, broker) = broker_endpoint(&ca, "b-1").await;
    let dir = tempfile::tempdir().unwrap();
    connector_dir(
        &ca,
        dir.path(),
        broker,
        vec![PublishedTarget {
            service: "echo".into(),
            target: echo.to_string(),
        }],
    );
    let _connector = Connector::start(ConnectorConfig {
        identity_dir: dir.path().to_path_buf(),
        transport,
        max_streams_per_link: 3,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap();
    let link = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (code, mut s) = dial(&link, "echo", &echo.to_string()).await;
        assert_eq!(code, DialCode::Ok, "{transport}");
        echo_round_trip(&mut s, b"held").await;
        held.push(s);
    }
    // A fourth gets no place while three are held, and costs no target connection.
    let fourth = tokio::spawn({
        let link = link.clone();
        let target = echo.to_string();
        async move {
            let mut s = link.open().await.unwrap();
            s.write_frame(&Frame::Dial {
                flow: Flow::Tcp,
                stream_id: 4,
                service: "echo".into(),
                target,
                principal: "alice@example.test".into(),
            })
            .await
            .unwrap();
            match s.read_frame().await {
                Ok(Frame::DialReply { code }) => (code, s),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fourth.is_finished(),
        "{transport}: a fourth stream was served"
    );
    assert_eq!(accepts.load(Ordering::SeqCst), 3, "{transport}");
    // One ends: the fourth is served.
    let mut first = held.remove(0);
    first.finish().await.unwrap();
    while let Ok(Some(_)) = first.recv_chunk().await {}
    drop(first);
    let (code, mut s) = tokio::time::timeout(WAIT, fourth)
        .await
        .expect("the fourth stream once a place was free")
        .unwrap();
    assert_eq!(code, DialCode::Ok, "{transport}");
    echo_round_trip(&mut s, b"fourth").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_broker_link_are_bounded_over_quic() {
    streams_per_broker_link_are_bounded(TransportPref::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_broker_link_are_bounded_over_tcp() {
    streams_per_broker_link_are_bounded(TransportPref::Tcp).await;
}

/// A connector whose certificate runs out while the controller is away runs on and keeps
/// trying to renew (unattended, it recovers by itself when the controller is back, which
/// renews an expired certificate for a while); once the controller refuses (here: its
/// handshake does not accept the certificate), it says so and stops, naming the expiry and
/// what to do, and its links are closed. The twin: until then it is linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_connector_runs_on_until_refused_then_stops_and_says_so() {
    capture::init();
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let (listener, broker) = broker_endpoint(&ca, "b-1").await;
    let dir = tempfile::tempdir().unwrap();
    connector_dir(&ca, dir.path(), broker.clone(), vec![]);
    // The same identity, issued so that 3 s of it are left (nothing answers at the
    // controller's address, so it cannot be renewed).
    let lifetime = Duration::from_secs(3600);
    let p = umbra_pki::test_util::issue_pems(
        &ca,
        PeerId::new(ORG, Role::Connector, "c-1").unwrap(),
        vec![],
        SystemTime::now() - lifetime + Duration::from_secs(3),
        lifetime,
    )
    .unwrap();
    umbra_pki::write_identity_dir(dir.path(), &p.key_pem, &p.cert_pem, ca.cert_pem()).unwrap();
    let connector = Connector::start(ConnectorConfig {
        identity_dir: dir.path().to_path_buf(),
        transport: TransportPref::Tcp,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap();
    let link = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert!(!link.is_closed());
    // Expired, the controller away: it runs on.
    assert!(
        tokio::time::timeout(Duration::from_secs(8), connector.failed())
            .await
            .is_err(),
        "the connector stopped while the controller could still renew it"
    );
    // The controller is back, and refuses the certificate at its handshake (it trusts
    // another CA for clients).
    let other = Ca::generate(ORG, SystemTime::now()).unwrap();
    let server = umbra_pki::test_util::issue_pems(
        &ca,
        PeerId::new(ORG, Role::Controller, "ctl").unwrap(),
        vec!["127.0.0.1".into()],
        SystemTime::now(),
        lifetime,
    )
    .unwrap();
    let mut server_id =
        umbra_pki::TlsIdentity::from_pem(&server.cert_pem, &server.key_pem, ca.cert_pem()).unwrap();
    server_id.ca = other.cert_der();
    let tls =
        umbra_pki::server_config(&server_id, ClientAuth::Required, &[b"http/1.1"], false).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    save_controller_ref(
        dir.path(),
        &ControllerRef {
            url,
            identity: format!("umbra://{ORG}/connector/c-1"),
            user: None,
            brokers: vec![broker],
        },
    )
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(40), connector.failed())
        .await
        .expect("the connector did not stop once the controller refused it");
    let said = e.to_string();
    assert!(
        said.contains("expired") && said.contains("umbra connector enroll"),
        "{said}"
    );
    tokio::time::timeout(WAIT, link.closed())
        .await
        .expect("its link outlived the certificate");
    connector.shutdown().await;
}
