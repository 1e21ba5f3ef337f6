//! The agent's broker choice and failover over real links.
//!
//! Two `umbra_link::Listener`s with broker certificates stand in for brokers at the transport
//! level: they answer pings, list one service, and answer `Open` with a scripted reply (`Ok`
//! and then echo, prefixed by their name so the test sees which one served; `Denied` for the
//! service `secret`). No policy runs here; the real broker is tested with the binary. What is
//! under test is the agent: ranking, the held link, failover when a broker is killed or falls
//! silent (within 3 s), and that a denial is final.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use umbra_agent::{AgentConfig, Forwarder, TransportPref};
use umbra_link::enroll::{ControllerRef, save_controller_ref};
use umbra_link::{ALPN, Link, LinkConfig, Listener, Stream, Transport};
use umbra_pki::{Ca, ClientAuth};
use umbra_proto::api::BrokerInfo;
use umbra_proto::{Frame, OpenCode, PeerId, Role};

const ORG: &str = "test";
const WAIT: Duration = Duration::from_secs(15);
const FAILOVER_BUDGET: Duration = Duration::from_secs(3);

struct StandIn {
    name: String,
    info: BrokerInfo,
    listener: Arc<Listener>,
    links: Arc<Mutex<Vec<Link>>>,
    silent: Arc<AtomicBool>,
    /// Reset every `Open` stream, keeping the link (as a broker does to a device over its
    /// `max_streams_per_device`).
    reset: Arc<AtomicBool>,
    /// Answer pings but hold every `Open` unanswered (connectors slow to dial).
    slow: Arc<AtomicBool>,
    opens: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl StandIn {
    async fn start(ca: &Ca, id: &str) -> StandIn {
        let _now = SystemTime::now();
        let server_name = umbra_pki::broker_server_name(id);
        let tls = umbra_pki::test_util::identity(ca, Role::Broker, id).unwrap();
        let server = umbra_pki::server_config(&tls, ClientAuth::Required, &[ALPN], false).unwrap();
        let listener = Arc::new(
            Listener::bind(
                Some("127.0.0.1:0".parse().unwrap()),
                Some("127.0.0.1:0".parse().unwrap()),
                Arc::new(server),
                LinkConfig::default(),
            )
            .await
            .unwrap(),
        );
        let info = BrokerInfo {
            id: id.into(),
            name: format!("broker-{id}"),
            quic_addr: listener.quic_addr().map(|a| a.to_string()),
            tcp_addr: listener.tcp_addr().map(|a| a.to_string()),
            server_name,
        };
        let links = Arc::new(Mutex::new(Vec::new()));
        let silent = Arc::new(AtomicBool::new(false));
        let reset = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let opens = Arc::new(AtomicUsize::new(0));
        let task = {
            let (listener, links) = (listener.clone(), links.clone());
            let flags = Flags {
                name: info.name.clone(),
                silent: silent.clone(),
                reset: reset.clone(),
                slow: slow.clone(),
                opens: opens.clone(),
            };
            tokio::spawn(async move {
                while let Some(link) = listener.accept().await {
                    links.lock().await.push(link.clone());
                    let flags = flags.clone();
                    tokio::spawn(async move {
                        while let Some(s) = link.accept().await {
                            tokio::spawn(serve(s, flags.clone()));
                        }
                    });
                }
            })
        };
        StandIn {
            name: info.name.clone(),
            info,
            listener,
            links,
            silent,
            reset,
            slow,
            opens,
            task,
        }
    }

    /// As if the process died and its sockets were closed by the kernel.
    async fn kill(&self) {
        self.task.abort();
        self.listener.close();
        for l in self.links.lock().await.iter() {
            l.close();
        }
    }
}

/// What a stand-in's streams are served with.
#[derive(Clone)]
struct Flags {
    name: String,
    silent: Arc<AtomicBool>,
    reset: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    opens: Arc<AtomicUsize>,
}

async fn serve(mut s: Stream, flags: Flags) {
    let Flags {
        name,
        silent,
        reset,
        slow,
        opens,
    } = flags;
    let Ok(f) = s.read_frame().await else { return };
    if silent.load(Ordering::SeqCst) {
        // Holds the stream and never answers.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return;
    }
    match f {
        Frame::Ping { nonce } => {
            let _ = s.write_frame(&Frame::Pong { nonce }).await;
            let _ = s.finish().await;
        }
        Frame::ListServices => {
            let _ = s
                .write_frame(&Frame::ServiceList {
                    services: vec!["echo".into()],
                })
                .await;
            let _ = s.finish().await;
        }
        Frame::Open { service, .. } => {
            opens.fetch_add(1, Ordering::SeqCst);
            if reset.load(Ordering::SeqCst) {
                s.reset();
                return;
            }
            if slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            // `partial`: only broker b-b has a connector for it; `nowhere`: no broker has.
            let unavailable =
                (service == "partial" && name != "broker-b-b") || service == "nowhere";
            if unavailable {
                let _ = s
                    .write_frame(&Frame::OpenReply {
                        code: OpenCode::Unavailable,
                    })
                    .await;
                let _ = s.finish().await;
                return;
            }
            if service == "secret" {
                let _ = s
                    .write_frame(&Frame::OpenReply {
                        code: OpenCode::Denied,
                    })
                    .await;
                let _ = s.finish().await;
                return;
            }
            if s.write_frame(&Frame::OpenReply { code: OpenCode::Ok })
                .await
                .is_err()
            {
                return;
            }
            let _ = s.send_chunk(format!("{name}\n").into()).await;
            while let Ok(Some(b)) = s.recv_chunk().await {
                if s.send_chunk(b).await.is_err() {
                    return;
                }
            }
            let _ = s.finish().await;
        }
        _ => s.reset(),
    }
}

fn agent_dir(ca: &Ca, dir: &Path, brokers: Vec<BrokerInfo>) {
    let p = umbra_pki::test_util::issue_pems(
        ca,
        PeerId::new(ORG, Role::Agent, "d-1").unwrap(),
        vec![],
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, ca.cert_pem()).unwrap();
    save_controller_ref(
        dir,
        &ControllerRef {
            // Nothing listens here: brokers work without the controller.
            url: "https://127.0.0.1:9".into(),
            identity: format!("umbra://{ORG}/agent/d-1"),
            user: Some("alice@example.test".into()),
            brokers,
        },
    )
    .unwrap();
}

/// Connects through the forwarder; returns the name of the broker that served and checks
/// that bytes echo.
async fn served_by(f: &Forwarder) -> String {
    connected(f.local_addr()).await.0
}

/// Connects to a forward and checks that bytes echo; returns the name of the broker that
/// served and the connection, still open.
async fn connected(forward: std::net::SocketAddr) -> (String, BufReader<TcpStream>) {
    let tcp = TcpStream::connect(forward).await.unwrap();
    let mut r = BufReader::new(tcp);
    let mut line = String::new();
    tokio::time::timeout(WAIT, r.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(line.ends_with('\n'), "connection closed early: {line:?}");
    echoes(&mut r).await;
    (line.trim_end().to_owned(), r)
}

async fn echoes(r: &mut BufReader<TcpStream>) {
    r.get_mut().write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
}

struct Setup {
    ca: Ca,
    a: StandIn,
    b: StandIn,
    dir: tempfile::TempDir,
    cfg: AgentConfig,
}

async fn setup(transport: TransportPref) -> Setup {
    umbra_pki::install_crypto_provider();
    let ca = Ca::generate(ORG, SystemTime::now()).unwrap();
    let a = StandIn::start(&ca, "b-a").await;
    let b = StandIn::start(&ca, "b-b").await;
    let dir = tempfile::tempdir().unwrap();
    agent_dir(&ca, dir.path(), vec![a.info.clone(), b.info.clone()]);
    let cfg = AgentConfig {
        identity_dir: dir.path().to_path_buf(),
        transport,
        ..AgentConfig::default()
    };
    Setup { ca, a, b, dir, cfg }
}

async fn killed_broker_fails_over(transport: TransportPref) {
    let s = setup(transport).await;
    let f = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let first = served_by(&f).await;
    assert_eq!(served_by(&f).await, first, "the held link is reused");
    let (dead, alive) = if first == s.a.name {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    };
    dead.kill().await;

    let t0 = Instant::now();
    assert_eq!(served_by(&f).await, alive.name);
    let took = t0.elapsed();
    assert!(took < FAILOVER_BUDGET, "failover took {took:?}");
    // And it stays there.
    assert_eq!(served_by(&f).await, alive.name);
    f.shutdown().await;
    drop((s.ca, s.dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_broker_fails_over_quic() {
    killed_broker_fails_over(TransportPref::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_broker_fails_over_tcp() {
    killed_broker_fails_over(TransportPref::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_broker_fails_over_within_budget() {
    let s = setup(TransportPref::Auto).await;
    let f = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let first = served_by(&f).await;
    let (mute, alive) = if first == s.a.name {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    };
    // The link stays up, but nothing is answered any more (a hung or blackholed broker).
    mute.silent.store(true, Ordering::SeqCst);

    let t0 = Instant::now();
    assert_eq!(served_by(&f).await, alive.name);
    let took = t0.elapsed();
    assert!(took < FAILOVER_BUDGET, "failover took {took:?}");
    f.shutdown().await;
}

/// A connection to `addr` is reset without a byte (perhaps before the connect is seen done):
/// a refusal the client cannot take for an empty answer.
async fn assert_reset_without_data(addr: std::net::SocketAddr, what: &str) {
    let end = match TcpStream::connect(addr).await {
        Ok(mut tcp) => {
            let mut buf = [0u8; 16];
            tokio::time::timeout(WAIT, tcp.read(&mut buf))
                .await
                .unwrap()
        }
        Err(e) => Err(e),
    };
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{what} is not reset without data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_is_final_and_closes_the_connection() {
    let s = setup(TransportPref::Auto).await;
    let f = Forwarder::start(s.cfg.clone(), "secret", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_reset_without_data(f.local_addr(), "a denied connection").await;
    // One Open in total: a denial is not a reason to ask another broker.
    let opens = s.a.opens.load(Ordering::SeqCst) + s.b.opens.load(Ordering::SeqCst);
    assert_eq!(opens, 1);

    // The stays-available twin: the same agent still reaches an allowed service.
    let g = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let name = served_by(&g).await;
    assert!(name == s.a.name || name == s.b.name);
    f.shutdown().await;
    g.shutdown().await;
}

/// A broker that allows a stream but has no connector link for it (say, it just restarted)
/// answers `Unavailable`; the agent asks the other brokers once each before giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_tries_the_other_brokers() {
    let s = setup(TransportPref::Auto).await;
    let f = Forwarder::start(s.cfg.clone(), "partial", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            served_by(&f).await,
            s.b.name,
            "served by the broker with a connector"
        );
    }
    // Nobody can serve it: the connection is closed after one try per broker.
    let g = Forwarder::start(s.cfg.clone(), "nowhere", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let before = s.a.opens.load(Ordering::SeqCst) + s.b.opens.load(Ordering::SeqCst);
    assert_reset_without_data(g.local_addr(), "a connection to an unavailable service").await;
    let after = s.a.opens.load(Ordering::SeqCst) + s.b.opens.load(Ordering::SeqCst);
    assert_eq!(after - before, 2, "one Open per broker");
    f.shutdown().await;
    g.shutdown().await;
}

/// A broker that resets one stream but keeps the link (a device over its
/// `max_streams_per_device`) fails only that request: it is served by the other broker, and
/// the link to the first, with the live connections it carries, stays up and current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_keeps_the_link_and_its_live_connections() {
    let s = setup(TransportPref::Auto).await;
    let f = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (first, mut live) = connected(f.local_addr()).await;
    let (busy, other) = if first == s.a.name {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    };
    busy.reset.store(true, Ordering::SeqCst);
    assert_eq!(
        served_by(&f).await,
        other.name,
        "the reset request fails over"
    );
    // The connection that was live on the first broker's link still works.
    echoes(&mut live).await;
    // The first broker is still the one new connections ask first.
    busy.reset.store(false, Ordering::SeqCst);
    let opens = busy.opens.load(Ordering::SeqCst);
    assert_eq!(
        served_by(&f).await,
        busy.name,
        "the current broker stays current"
    );
    assert_eq!(busy.opens.load(Ordering::SeqCst), opens + 1);
    echoes(&mut live).await;
    f.shutdown().await;
}

/// A broker that answers pings but not an `Open` (its connectors slow to dial) fails that
/// request only: it is tried on the other broker, and the connections live on the first
/// broker's link go on, as that broker stays current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_open_keeps_the_link_and_its_live_connections() {
    let s = setup(TransportPref::Auto).await;
    let f = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (first, mut live) = connected(f.local_addr()).await;
    let (busy, other) = if first == s.a.name {
        (&s.a, &s.b)
    } else {
        (&s.b, &s.a)
    };
    busy.slow.store(true, Ordering::SeqCst);
    // The open timeout, a ping, then the wait for a broker that still answers pings.
    let (name, _) = tokio::time::timeout(Duration::from_secs(40), async {
        let tcp = TcpStream::connect(f.local_addr()).await.unwrap();
        let mut r = BufReader::new(tcp);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        (line.trim_end().to_owned(), r)
    })
    .await
    .expect("the slow request was not served elsewhere");
    assert_eq!(name, other.name, "the slow request fails over");
    echoes(&mut live).await;
    busy.slow.store(false, Ordering::SeqCst);
    assert_eq!(
        served_by(&f).await,
        busy.name,
        "the broker that was slow stays current"
    );
    echoes(&mut live).await;
    f.shutdown().await;
}

/// While a request that the current broker cannot serve dials another broker that does not
/// answer (black-holed: its UDP swallowed, its TCP never served), connections through the
/// current link go on being served at once: the side dial does not hold the session up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_dial_does_not_hold_up_the_current_link() {
    let s = setup(TransportPref::Auto).await;
    let swallow = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let unserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = BrokerInfo {
        id: "b-hole".into(),
        name: "broker-b-hole".into(),
        quic_addr: Some(swallow.local_addr().unwrap().to_string()),
        tcp_addr: Some(unserved.local_addr().unwrap().to_string()),
        server_name: umbra_pki::broker_server_name("b-hole"),
    };
    let dir = tempfile::tempdir().unwrap();
    agent_dir(
        &s.ca,
        dir.path(),
        vec![s.a.info.clone(), s.b.info.clone(), hole],
    );
    let cfg = AgentConfig {
        identity_dir: dir.path().to_path_buf(),
        // The black-holed dial lasts a connect timeout per transport: long enough that the
        // connections below are served well within it, however loaded the machine.
        connect_timeout_ms: 3_000,
        ..s.cfg.clone()
    };
    // One session for both services.
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let f = Forwarder::start_many(cfg, &[("echo".into(), any), ("nowhere".into(), any)])
        .await
        .unwrap();
    let (echo, nowhere) = (f.forwards()[0].1, f.forwards()[1].1);
    let first = connected(echo).await.0;
    assert!(first == s.a.name || first == s.b.name, "{first}");

    // Neither listed broker has a connector for `nowhere`: after both answer, the request
    // dials the black-holed one, which takes a connect timeout per transport.
    let asked = || s.a.opens.load(Ordering::SeqCst) + s.b.opens.load(Ordering::SeqCst);
    let before = asked();
    let stalled = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(nowhere).await.unwrap();
        let mut buf = [0u8; 16];
        tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0)
    });
    let t0 = Instant::now();
    while asked() < before + 2 {
        assert!(t0.elapsed() < WAIT, "the brokers were never asked");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stalled.is_finished(),
        "the side dial should still be under way"
    );
    // Served through the current link while that dial is under way.
    for _ in 0..3 {
        assert_eq!(connected(echo).await.0, first);
    }
    assert!(
        !stalled.is_finished(),
        "served only after the side dial gave up"
    );
    assert_eq!(
        stalled.await.unwrap(),
        0,
        "unavailable: closed without data"
    );
    f.shutdown().await;
    drop((swallow, unserved));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_services() {
    let s = setup(TransportPref::Auto).await;
    let st = umbra_agent::status(&s.cfg).await.unwrap();
    assert_eq!(st.identity, format!("umbra://{ORG}/agent/d-1"));
    assert_eq!(st.user.as_deref(), Some("alice@example.test"));
    assert!(st.cert_not_after > SystemTime::now());
    assert_eq!(st.brokers.len(), 2);
    for b in &st.brokers {
        assert!(b.rtt.is_ok(), "{}: {:?}", b.info.name, b.rtt);
        assert_eq!(b.transport, Transport::Quic);
    }
    assert_eq!(umbra_agent::services(&s.cfg).await.unwrap(), vec!["echo"]);

    // A dead broker is listed last, with the reason.
    s.a.kill().await;
    let st = umbra_agent::status(&s.cfg).await.unwrap();
    assert_eq!(st.brokers[0].info.name, s.b.name);
    assert!(st.brokers[0].rtt.is_ok());
    assert_eq!(st.brokers[1].info.name, s.a.name);
    assert!(st.brokers[1].rtt.is_err());
    assert_eq!(umbra_agent::services(&s.cfg).await.unwrap(), vec!["echo"]);
}

/// Where UDP is blocked, `auto` falls back to TLS over TCP: with every broker's QUIC address
/// a UDP socket that swallows what it is sent (as a firewall dropping UDP would), the agent is
/// served over TLS/TCP links. The twin: with QUIC reachable, `auto` links over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tls_where_udp_is_blocked() {
    let s = setup(TransportPref::Auto).await;
    let transports = |st: &StandIn| {
        let links = st.links.clone();
        async move {
            links
                .lock()
                .await
                .iter()
                .filter(|l| !l.is_closed())
                .map(Link::transport)
                .collect::<Vec<_>>()
        }
    };
    // Twin first: QUIC reachable, QUIC used.
    let f = Forwarder::start(s.cfg.clone(), "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let first = served_by(&f).await;
    let served = if first == s.a.name { &s.a } else { &s.b };
    assert!(transports(served).await.contains(&Transport::Quic));
    f.shutdown().await;

    // Now the QUIC addresses lead nowhere: bound, never read, never answered.
    let swallow: Vec<std::net::UdpSocket> = (0..2)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let brokers: Vec<BrokerInfo> = [&s.a, &s.b]
        .iter()
        .zip(&swallow)
        .map(|(st, u)| BrokerInfo {
            quic_addr: Some(u.local_addr().unwrap().to_string()),
            ..st.info.clone()
        })
        .collect();
    agent_dir(&s.ca, dir.path(), brokers);
    let cfg = AgentConfig {
        identity_dir: dir.path().to_path_buf(),
        ..s.cfg.clone()
    };
    for st in [&s.a, &s.b] {
        for l in st.links.lock().await.iter() {
            l.close();
        }
    }
    let f = Forwarder::start(cfg, "echo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let name = served_by(&f).await;
    let served = if name == s.a.name { &s.a } else { &s.b };
    let up = transports(served).await;
    assert!(
        !up.is_empty() && up.iter().all(|t| *t == Transport::Tls),
        "links up at the serving broker: {up:?}"
    );
    assert_eq!(served_by(&f).await, name, "the TLS link is held");
    f.shutdown().await;
    drop(swallow);
}
