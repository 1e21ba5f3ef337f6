//! The in-process deployment used by `stack.rs`: a real controller (temporary data directory,
//! explicit CA key), real brokers, a real connector and a TCP echo target, all on 127.0.0.1 with
//! ports picked by the kernel, real TLS everywhere, identities made by real enrollments.
//!
//! Also the probes the cases share: bytes through an agent's forward, frames on a link dialed by
//! hand, admin REST calls, stand-ins for a connector or a broker that break the frame protocol,
//! and what the components logged (every line at INFO and above is captured, see [`logged`]).
//! Every wait is a poll with a deadline (50 ms steps), never a sleep standing in for an
//! assertion.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use umbra_agent::{AgentConfig, Forwarder, TransportPref};
use umbra_broker::{Broker, BrokerConfig};
use umbra_connector::{Connector, ConnectorConfig};
use umbra_controller::{Controller, ControllerConfig};
use umbra_link::enroll::{ControllerRef, save_controller_ref};
use umbra_link::{Link, LinkConfig, Listener, Stream, Transport};
use umbra_pki::{Ca, ClientAuth, TlsIdentity};
use umbra_proto::api::BrokerInfo;
use umbra_proto::{DialCode, Flow, Frame, OpenCode, PeerId, Role};

/// Two tests per case function `$case(t: TransportPref)`: `$case::quic` and `$case::tcp`
/// (agent links, and connector links where the case sets them up, on that transport). The
/// test file imports `TransportPref` and declares `#[macro_use] mod stack_util;`.
#[allow(unused_macros)]
macro_rules! both_transports {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$case(super::TransportPref::Quic).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$case(super::TransportPref::Tcp).await
            }
        }
    };
}

/// The published service every user with a policy may reach (the echo target).
pub(crate) const ECHO: &str = "echo";
/// A published service (same target) that no policy allows.
pub(crate) const SECRET: &str = "secret";
/// Name of the one connector.
pub(crate) const CONNECTOR: &str = "conn";
/// Poll step.
const STEP: Duration = Duration::from_millis(50);
/// Default limit for things that should happen "soon" (start-up, convergence).
pub(crate) const SOON: Duration = Duration::from_secs(10);
/// Links dialed by hand and the broker stand-in's links end after this much silence
/// (keepalives every second keep them up). On QUIC a peer's close may never be sent:
/// quinn-proto (0.11.19 at least) does not send CONNECTION_CLOSE while congestion-blocked,
/// which a 64 KiB MTU probe on loopback makes common (quinn-rs/quinn#2785); such links then
/// see their peer's close by this timeout, so waits for a close allow [`SOON`].
pub(crate) const HAND_IDLE: Duration = Duration::from_secs(3);

/// Timers of links dialed by hand and of stand-in endpoints (see [`HAND_IDLE`]).
fn hand_link_config() -> LinkConfig {
    LinkConfig {
        handshake_timeout: Duration::from_secs(3),
        idle_timeout: HAND_IDLE,
        keepalive: Duration::from_secs(1),
        ..LinkConfig::default()
    }
}

/// Every log line at INFO and above of this test process, with its spans' fields.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Panics on runtime worker threads (where the components' tasks run).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static INIT: Once = Once::new();

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the logs (see [`logged`]) and worker panics (see [`worker_panics`]); also logs
/// to the test's output when RUST_LOG is set (`RUST_LOG=info cargo test ...`).
pub(crate) fn init() {
    umbra_pki::install_crypto_provider();
    INIT.call_once(|| {
        use tracing_subscriber::filter::LevelFilter;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::{EnvFilter, Layer, fmt};
        let capture = fmt::layer()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .with_filter(LevelFilter::INFO);
        let shown = std::env::var_os("RUST_LOG").is_some().then(|| {
            fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::from_default_env())
        });
        let _ = tracing_subscriber::registry()
            .with(capture)
            .with(shown)
            .try_init();
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

/// Waits until a captured log line contains every one of `parts` and returns it; panics
/// after `within`. Lines carry their spans' fields (a broker's `link{peer=...}`, ...).
pub(crate) async fn logged(what: &str, within: Duration, parts: &[&str]) -> String {
    poll(what, within, || async {
        let logs = LOGS.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&logs)
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
            .ok_or_else(|| format!("no log line with all of {parts:?}"))
    })
    .await
}

/// Panics seen on runtime worker threads so far (a component's task that panicked).
pub(crate) fn worker_panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Calls `f` every 50 ms until it returns `Ok` or `within` has passed since the call; panics
/// with the last error then.
pub(crate) async fn poll<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= within => {
                panic!("{what}: not within {within:?} (last: {e})")
            }
            Err(_) => tokio::time::sleep(STEP).await,
        }
    }
}

/// The link transport an agent preference stands for.
pub(crate) fn link_transport(t: TransportPref) -> Transport {
    match t {
        TransportPref::Tcp => Transport::Tls,
        _ => Transport::Quic,
    }
}

// ---------------------------------------------------------------------------------------------
// Admin REST client

/// Admin calls with the bearer token, trusting only the organisation CA.
#[derive(Clone)]
pub(crate) struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    pub(crate) fn new(base: &str, token: &str, ca: &CertificateDer<'static>) -> Admin {
        let tls = umbra_pki::client_config(ca, None, &[b"h2", b"http/1.1"], false).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        Admin {
            http,
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    /// Any call: the status and the JSON body (`Null` when empty).
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, v)
    }

    /// A call that must succeed.
    pub(crate) async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: HTTP {status}: {v}"
        );
        v
    }

    pub(crate) async fn get(&self, path: &str) -> Value {
        self.ok("GET", path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Value {
        self.ok("POST", path, Some(body)).await
    }

    pub(crate) async fn token(&self, role: &str, user: Option<&str>, name: Option<&str>) -> String {
        let v = self
            .post(
                "/v1/enrollment-tokens",
                json!({ "role": role, "user": user, "name": name, "ttl_secs": 600 }),
            )
            .await;
        v["token"].as_str().unwrap().to_owned()
    }

    pub(crate) async fn allow(&self, policy: &str, user: &str, service: &str) {
        let text =
            umbra_policy::allow_policy(&umbra_policy::PolicySubject::User(user.into()), service);
        self.post("/v1/policies", json!({ "name": policy, "text": text }))
            .await;
    }

    /// Waits until exactly `n` stored audit entries satisfy `matches` (brokers send theirs
    /// with their heartbeats).
    pub(crate) async fn wait_audited(
        &self,
        what: &str,
        n: usize,
        matches: impl Fn(&Value) -> bool,
    ) {
        poll(what, SOON, || async {
            let got = self.audit().await.iter().filter(|e| matches(e)).count();
            if got == n {
                Ok(())
            } else {
                Err(format!("{got} of {n}"))
            }
        })
        .await;
    }

    /// Every audit entry stored so far.
    pub(crate) async fn audit(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get(&format!("/v1/audit?after={after}&limit=1000"))
                .await;
            let page = page.as_array().cloned().unwrap_or_default();
            let Some(last) = page.last() else { break };
            after = last["seq"].as_i64().unwrap();
            let n = page.len();
            out.extend(page);
            if n < 1000 {
                break;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The deployment

/// Starts something that a test may stop and start again on the same port: on a port from
/// [`restartable_port`], trying the next one if `start` fails (some other process took it).
pub(crate) async fn on_restartable_port<T, F, Fut>(what: &str, mut start: F) -> T
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for _ in 0..20 {
        let addr = SocketAddr::from(([127, 0, 0, 1], restartable_port()));
        match start(addr).await {
            Ok(t) => return t,
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    panic!("{what} did not start on any restartable port: {last}")
}

/// A loopback port, free for TCP and UDP when picked, for a listener a test restarts on the
/// same port. A port the kernel picked for port 0 could be given to any new socket (an
/// outgoing connection, a QUIC dialer's UDP socket) while the listener is down, and the
/// restart would fail. These come from 12000-26999, below the range the kernel hands out
/// (32768 and up by default) and below the quickstart tests' ports (27400 and up), each
/// test process starting in its own slice (by its pid), so that parallel tests rarely meet.
pub(crate) fn restartable_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOW: usize = 12_000;
    const SPAN: usize = 15_000;
    let slice = (std::process::id() as usize % 500) * 30;
    for _ in 0..SPAN {
        let i = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (LOW + (slice + i) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {LOW}-{}", LOW + SPAN - 1)
}

/// One broker: its configuration (ports fixed after the first start, so a restart keeps the
/// addresses agents and the connector know) and the running instance.
pub(crate) struct BrokerSlot {
    pub(crate) cfg: BrokerConfig,
    pub(crate) id: String,
    pub(crate) server_name: String,
    pub(crate) quic: SocketAddr,
    pub(crate) tcp: SocketAddr,
    pub(crate) broker: Option<Broker>,
}

impl BrokerSlot {
    pub(crate) fn addr(&self, t: Transport) -> SocketAddr {
        match t {
            Transport::Quic => self.quic,
            Transport::Tls => self.tcp,
        }
    }

    pub(crate) fn running(&self) -> &Broker {
        self.broker.as_ref().expect("broker is running")
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }

    /// Starts it again on the same directory and ports (the old sockets may take a moment to
    /// be released, hence the poll).
    pub(crate) async fn start_again(&mut self) {
        assert!(self.broker.is_none(), "stop it first");
        let cfg = self.cfg.clone();
        let b = poll("broker restart", SOON, || {
            let cfg = cfg.clone();
            async move { Broker::start(cfg).await.map_err(|e| e.to_string()) }
        })
        .await;
        // A broker started with TCP only has no QUIC address (`quic` holds its TCP one).
        if b.quic_addr().is_some() {
            assert_eq!(b.quic_addr(), Some(self.quic));
        }
        assert_eq!(b.tcp_addr(), Some(self.tcp));
        self.broker = Some(b);
    }
}

/// An enrolled agent identity.
pub(crate) struct AgentId {
    pub(crate) user: String,
    pub(crate) dir: PathBuf,
    pub(crate) device: String,
}

impl AgentId {
    pub(crate) fn identity(&self) -> TlsIdentity {
        TlsIdentity::load_dir(&self.dir).unwrap()
    }

    pub(crate) fn config(&self, t: TransportPref) -> AgentConfig {
        AgentConfig {
            identity_dir: self.dir.clone(),
            transport: t,
            open_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            idle_timeout_secs: 300,
            ..AgentConfig::default()
        }
    }
}

/// What to build.
pub(crate) struct Opts {
    /// One entry per broker: its `max_staleness_secs`.
    pub(crate) brokers: Vec<u64>,
    /// Users to create, each with an enrolled agent and a policy `<local part>-echo` allowing
    /// `echo`.
    pub(crate) users: Vec<&'static str>,
}

pub(crate) struct Stack {
    pub(crate) dir: TempDir,
    pub(crate) ctl_cfg: ControllerConfig,
    pub(crate) controller: Option<Controller>,
    pub(crate) url: String,
    pub(crate) ca: CertificateDer<'static>,
    pub(crate) admin: Admin,
    pub(crate) admin_token: String,
    pub(crate) brokers: Vec<BrokerSlot>,
    pub(crate) connector: Option<Connector>,
    pub(crate) connector_dir: PathBuf,
    pub(crate) connector_id: String,
    pub(crate) echo: SocketAddr,
    pub(crate) agents: BTreeMap<String, AgentId>,
    echo_task: Option<JoinHandle<()>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(t) = &self.echo_task {
            t.abort();
        }
    }
}

/// `alice@example.test` -> `alice`.
pub(crate) fn local(user: &str) -> &str {
    user.split('@').next().unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Stack {
    /// Controller only (users created, nothing enrolled).
    pub(crate) async fn controller_only(users: &[&str]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let ctl_cfg = ControllerConfig {
            data_dir: dir.path().join("controller"),
            ca_key: Some(hex(&umbra_pki::random_bytes::<32>())),
            ..ControllerConfig::default()
        };
        let controller = on_restartable_port("controller", |addr| {
            let cfg = ControllerConfig {
                listen: addr,
                ..ctl_cfg.clone()
            };
            async move { Controller::start(cfg).await.map_err(|e| e.to_string()) }
        })
        .await;
        let admin_token = controller.first_admin_token().unwrap();
        let url = controller.url();
        let ca = CertificateDer::from_pem_slice(controller.ca_pem().as_bytes()).unwrap();
        let admin = Admin::new(&url, &admin_token, &ca);
        // Restarts listen where peers already look.
        let ctl_cfg = ControllerConfig {
            listen: controller.local_addr(),
            ..ctl_cfg
        };
        for u in users {
            admin
                .post("/v1/users", json!({ "id": u, "groups": [] }))
                .await;
        }
        let connector_dir = dir.path().join("connector");
        Stack {
            dir,
            ctl_cfg,
            controller: Some(controller),
            url,
            ca,
            admin,
            admin_token,
            brokers: Vec::new(),
            connector: None,
            connector_dir,
            connector_id: String::new(),
            echo: SocketAddr::from(([127, 0, 0, 1], 0)),
            agents: BTreeMap::new(),
            echo_task: None,
        }
    }

    /// The whole deployment, converged: brokers hold the latest snapshot.
    pub(crate) async fn start(opts: Opts) -> Stack {
        let mut s = Stack::controller_only(&opts.users).await;
        for (i, staleness) in opts.brokers.iter().enumerate() {
            s.add_broker(&format!("broker-{i}"), *staleness).await;
        }
        s.brokers_registered().await;

        let (echo, task) = echo_server().await;
        s.echo = echo;
        s.echo_task = Some(task);

        let token = s.admin.token("connector", None, Some(CONNECTOR)).await;
        let issued = umbra_link::enroll::enroll(&s.url, &token, &s.connector_dir, Role::Connector)
            .await
            .unwrap();
        s.connector_id = issued.identity.rsplit('/').next().unwrap().to_owned();
        for svc in [ECHO, SECRET] {
            s.admin
                .post(
                    "/v1/services",
                    json!({ "name": svc, "target": echo.to_string(), "connectors": [CONNECTOR] }),
                )
                .await;
        }
        for u in &opts.users {
            s.admin.allow(&format!("{}-echo", local(u)), u, ECHO).await;
            s.enroll_agent(u, local(u)).await;
        }
        s.start_connector().await;
        s.converge().await;
        s.ready().await;
        s
    }

    /// Waits until the first agent gets `echo` through every running broker (the connector
    /// has linked to each).
    pub(crate) async fn ready(&self) {
        let Some(a) = self.agents.values().next() else {
            return;
        };
        let id = a.identity();
        for b in self.brokers.iter().filter(|b| b.broker.is_some()) {
            poll(&format!("{} serves echo", b.cfg.name), SOON, || {
                served(b, Transport::Quic, &id)
            })
            .await;
        }
    }

    pub(crate) fn controller(&self) -> &Controller {
        self.controller.as_ref().expect("controller is running")
    }

    /// Waits until the controller has heard from every broker of the stack with an address
    /// (the heartbeat carries them): agents and connectors learn brokers from it.
    pub(crate) async fn brokers_registered(&self) {
        let n = self.brokers.len();
        poll("brokers registered", SOON, || async {
            let v = self.admin.get("/v1/brokers/all").await;
            let seen = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| {
                    b["last_seen"].as_u64().unwrap_or(0) > 0
                        && !(b["quic_addr"].is_null() && b["tcp_addr"].is_null())
                })
                .count();
            if seen == n {
                Ok(())
            } else {
                Err(format!("{seen} of {n}: {v}"))
            }
        })
        .await;
    }

    pub(crate) async fn add_broker(&mut self, name: &str, max_staleness_secs: u64) {
        self.add_broker_with(name, |c| c.max_staleness_secs = max_staleness_secs)
            .await;
    }

    /// Enrolls a broker `name` and starts it with `tweak` applied to its configuration.
    pub(crate) async fn add_broker_with(
        &mut self,
        name: &str,
        tweak: impl FnOnce(&mut BrokerConfig),
    ) {
        let token = self.admin.token("broker", None, Some(name)).await;
        let dir = self.dir.path().join(name);
        umbra_link::enroll::enroll(&self.url, &token, &dir, Role::Broker)
            .await
            .unwrap();
        self.start_broker(name, dir, tweak).await;
    }

    /// Starts a broker enrolled in `dir` on free loopback ports (QUIC and TCP, heartbeat
    /// 250 ms, then `tweak`) and adds it to [`Stack::brokers`].
    pub(crate) async fn start_broker(
        &mut self,
        name: &str,
        dir: PathBuf,
        tweak: impl FnOnce(&mut BrokerConfig),
    ) -> &BrokerSlot {
        let id = TlsIdentity::load_dir(&dir).unwrap().peer.id.id;
        let mut cfg = BrokerConfig {
            name: name.into(),
            identity_dir: dir,
            heartbeat_ms: 250,
            ..BrokerConfig::default()
        };
        tweak(&mut cfg);
        // QUIC and TLS/TCP on one port (UDP and TCP), as operators run it.
        let broker = on_restartable_port(name, |addr| {
            let mut cfg = cfg.clone();
            cfg.listen_quic = cfg.listen_quic.map(|_| addr);
            cfg.listen_tcp = cfg.listen_tcp.map(|_| addr);
            async move { Broker::start(cfg).await.map_err(|e| e.to_string()) }
        })
        .await;
        let quic = broker.quic_addr();
        let tcp = broker.tcp_addr();
        cfg.listen_quic = quic;
        cfg.listen_tcp = tcp;
        self.brokers.push(BrokerSlot {
            cfg,
            server_name: umbra_pki::broker_server_name(&id),
            id,
            quic: quic.or(tcp).unwrap(),
            tcp: tcp.or(quic).unwrap(),
            broker: Some(broker),
        });
        self.brokers.last().unwrap()
    }

    pub(crate) async fn enroll_agent(&mut self, user: &str, key: &str) -> &AgentId {
        let token = self.admin.token("agent", Some(user), None).await;
        let dir = self.dir.path().join(format!("agent-{key}"));
        let issued = umbra_link::enroll::enroll(&self.url, &token, &dir, Role::Agent)
            .await
            .unwrap();
        let device = issued.identity.rsplit('/').next().unwrap().to_owned();
        self.agents.insert(
            key.to_owned(),
            AgentId {
                user: user.to_owned(),
                dir,
                device,
            },
        );
        &self.agents[key]
    }

    pub(crate) fn agent(&self, key: &str) -> &AgentId {
        &self.agents[key]
    }

    pub(crate) async fn start_connector(&mut self) {
        let c = Connector::start(ConnectorConfig {
            identity_dir: self.connector_dir.clone(),
            reconnect_base_ms: 100,
            reconnect_cap_ms: 1_000,
            ..ConnectorConfig::default()
        })
        .await
        .unwrap();
        self.connector = Some(c);
    }

    /// Waits until every running broker enforces the controller's latest snapshot.
    pub(crate) async fn converge(&self) {
        let want = self.controller().snapshot_version();
        poll("brokers converge", SOON, || async {
            for b in &self.brokers {
                if let Some(r) = &b.broker
                    && r.snapshot_version() < want
                {
                    return Err(format!(
                        "{} holds {} < {want}",
                        b.cfg.name,
                        r.snapshot_version()
                    ));
                }
            }
            Ok(())
        })
        .await;
    }

    pub(crate) async fn forward(&self, key: &str, t: TransportPref, service: &str) -> Forwarder {
        Forwarder::start(
            self.agent(key).config(t),
            service,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await
        .unwrap()
    }

    pub(crate) async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }

    /// Starts the controller again on the same data directory and address.
    pub(crate) async fn restart_controller(&mut self, cfg: ControllerConfig) {
        self.stop_controller().await;
        let c = poll("controller restart", SOON, || {
            let cfg = cfg.clone();
            async move { Controller::start(cfg).await.map_err(|e| e.to_string()) }
        })
        .await;
        assert!(c.first_admin_token().is_none());
        self.controller = Some(c);
    }

    /// Revokes a device through the admin API.
    pub(crate) async fn revoke_device(&self, device: &str) {
        let v = self
            .admin
            .ok("POST", &format!("/v1/devices/{device}/revoke"), None)
            .await;
        assert_eq!(v["revoked"], true, "{v}");
    }
}

// ---------------------------------------------------------------------------------------------
// The target

/// A TCP echo server: echoes until the client finishes its half, then finishes its own.
pub(crate) async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let (addr, _, task) = counting_echo().await;
    (addr, task)
}

/// [`echo_server`], which also counts the connections it accepted.
pub(crate) async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted, task)
}

/// Deterministic bytes that make misordering and corruption visible.
pub(crate) fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Through a forward (plain TCP to the agent's local port)

/// Sends `data`, finishes the write half, and reads everything back; `limit` bounds it all.
pub(crate) async fn round_trip(
    addr: SocketAddr,
    data: &[u8],
    limit: Duration,
) -> Result<(), String> {
    let run = async {
        let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut r, mut w) = s.into_split();
        let write = async {
            w.write_all(data).await?;
            w.shutdown().await
        };
        let read = async {
            let mut buf = Vec::with_capacity(data.len());
            r.read_to_end(&mut buf).await.map(|_| buf)
        };
        let (wr, rd) = tokio::join!(write, read);
        let got = rd.map_err(|e| format!("read: {e}"))?;
        wr.map_err(|e| format!("write: {e}"))?;
        if got.len() != data.len() {
            return Err(format!("got {} bytes of {}", got.len(), data.len()));
        }
        if got != data {
            let at = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("bytes differ from offset {at}"));
        }
        Ok(())
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| format!("no complete echo within {limit:?}"))?
}

/// A small echo through the forward: the service is reachable.
pub(crate) async fn echo_ok(addr: SocketAddr) -> Result<(), String> {
    round_trip(addr, b"ping through umbra", Duration::from_secs(3)).await
}

/// The forward resets the connection without a byte, or no longer listens (it stopped, its
/// certificate expired): refused. `Err` if data came back, the connection stayed open, or it
/// ended cleanly (a client would take that for an empty answer).
pub(crate) async fn refused(addr: SocketAddr) -> Result<(), String> {
    let reset = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::ConnectionReset {
            Ok(())
        } else {
            Err(e.to_string())
        }
    };
    let run = async {
        // The reset may come before the connect is seen to complete.
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => return reset(e),
        };
        // Ignore write errors: the forward may already have closed.
        let _ = s.write_all(b"probe").await;
        let _ = s.shutdown().await;
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf).await {
            Ok(_) if buf.is_empty() => Err("closed cleanly, not reset".to_string()),
            Ok(_) => Err(format!("{} bytes came back: still allowed", buf.len())),
            Err(e) => reset(e),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .map_err(|_| "connection stayed open".to_string())?
}

/// An open connection through a forward that has echoed once.
pub(crate) struct LiveConn(pub TcpStream);

impl LiveConn {
    pub(crate) async fn open(addr: SocketAddr) -> Result<LiveConn, String> {
        let mut c = LiveConn(TcpStream::connect(addr).await.map_err(|e| e.to_string())?);
        c.echo(b"hello").await?;
        Ok(c)
    }

    /// Writes and reads the same bytes back (the connection stays open).
    pub(crate) async fn echo(&mut self, data: &[u8]) -> Result<(), String> {
        let run = async {
            self.0.write_all(data).await.map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; data.len()];
            self.0
                .read_exact(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if buf != data {
                return Err("echo differs".to_string());
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(3), run)
            .await
            .map_err(|_| "no echo within 3 s".to_string())?
    }

    /// Waits until the peer closes the connection (EOF or reset).
    pub(crate) async fn closed_within(mut self, within: Duration) -> Result<(), String> {
        let run = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.0.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, run)
            .await
            .map_err(|_| format!("still open after {within:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Frame level: links dialed by hand

/// Dials a broker presenting `id` (its chain and key as they are; `id.ca` is the trust anchor
/// for the broker's certificate).
pub(crate) async fn dial(b: &BrokerSlot, t: Transport, id: &TlsIdentity) -> Result<Link, String> {
    dial_with(b, t, id, |_| {}).await
}

/// [`dial`] with `tweak` applied to the link configuration.
pub(crate) async fn dial_with(
    b: &BrokerSlot,
    t: Transport,
    id: &TlsIdentity,
    tweak: impl FnOnce(&mut LinkConfig),
) -> Result<Link, String> {
    let mut cfg = hand_link_config();
    tweak(&mut cfg);
    let tls = umbra_pki::client_config(&id.ca, Some(id), &[umbra_link::ALPN], t == Transport::Quic)
        .map_err(|e| e.to_string())?;
    umbra_link::dial(b.addr(t), &b.server_name, t, Arc::new(tls), &cfg)
        .await
        .map_err(|e| e.to_string())
}

/// One `Open` and its reply.
pub(crate) async fn open(link: &Link, service: &str) -> Result<(OpenCode, Stream), String> {
    let run = async {
        let mut s = link.open().await.map_err(|e| format!("open: {e}"))?;
        s.write_frame(&Frame::Open {
            flow: Flow::Tcp,
            service: service.to_owned(),
            credential: Vec::new(),
        })
        .await
        .map_err(|e| format!("write Open: {e}"))?;
        match s.read_frame().await {
            Ok(Frame::OpenReply { code }) => Ok((code, s)),
            Ok(other) => Err(format!("unexpected {other:?}")),
            Err(e) => Err(format!("read reply: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .map_err(|_| "no reply within 3 s".to_string())?
}

/// The reply code only.
pub(crate) async fn open_code(link: &Link, service: &str) -> Result<OpenCode, String> {
    open(link, service).await.map(|(c, _)| c)
}

/// Bytes through an opened stream: send, finish, read everything back.
pub(crate) async fn stream_echo(s: &mut Stream, data: &[u8]) -> Result<(), String> {
    let run = async {
        s.send_chunk(Bytes::copy_from_slice(data))
            .await
            .map_err(|e| e.to_string())?;
        s.finish().await.map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        while let Some(c) = s.recv_chunk().await.map_err(|e| e.to_string())? {
            got.extend_from_slice(&c);
        }
        if got != data {
            return Err(format!("echo differs ({} bytes)", got.len()));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .map_err(|_| "no echo within 3 s".to_string())?
}

/// Open `echo` on a fresh link and move bytes: the identity gets service from this broker.
pub(crate) async fn served(b: &BrokerSlot, t: Transport, id: &TlsIdentity) -> Result<(), String> {
    let link = dial(b, t, id).await?;
    let (code, mut s) = open(&link, ECHO).await?;
    if code != OpenCode::Ok {
        return Err(format!("Open {ECHO}: {code:?}"));
    }
    let r = stream_echo(&mut s, b"frame-level hello").await;
    link.close();
    r
}

/// A ping on a new stream of the link.
pub(crate) async fn ping(link: &Link) -> Result<(), String> {
    let run = async {
        let mut s = link.open().await.map_err(|e| e.to_string())?;
        s.write_frame(&Frame::Ping { nonce: 7 })
            .await
            .map_err(|e| e.to_string())?;
        match s.read_frame().await.map_err(|e| e.to_string())? {
            Frame::Pong { nonce: 7 } => Ok(()),
            other => Err(format!("unexpected {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .map_err(|_| "no pong within 3 s".to_string())?
}

/// How a broker turned an identity away.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// `dial` itself failed.
    Handshake(String),
    /// The dialer's side of the handshake completed (TLS 1.3 sends the client certificate
    /// last), then the broker closed the link before it carried anything; `refused` is what
    /// it told the dialer ([`umbra_link::Link::refuse`]), if it did.
    ClosedAfterHandshake {
        why: String,
        refused: Option<umbra_link::Refusal>,
    },
}

/// Asserts that `id` gets nothing from the broker: the dial fails, or the link is closed
/// before it carries anything (agent identities: a ping is not answered; connector
/// identities, where the broker opens the streams: the link does not stay up).
pub(crate) async fn assert_refused(
    b: &BrokerSlot,
    t: Transport,
    id: &TlsIdentity,
    what: &str,
) -> Refusal {
    let link = match dial(b, t, id).await {
        Err(e) => return Refusal::Handshake(e),
        Ok(link) => link,
    };
    let why = if link.is_opener() {
        match ping(&link).await {
            Ok(()) => panic!("{what} over {t:?}: the broker answered a ping"),
            Err(e) => e,
        }
    } else {
        "not the opener: waited for the broker to close".to_string()
    };
    // SOON: on QUIC the close may only arrive by the idle timeout (see `HAND_IDLE`).
    match tokio::time::timeout(SOON, link.closed()).await {
        Ok(()) => Refusal::ClosedAfterHandshake {
            why,
            refused: link.refused(),
        },
        Err(_) => panic!("{what} over {t:?}: the link stayed up"),
    }
}

/// Reads the identity files of a directory as PEM.
pub(crate) fn pem(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Stand-ins: peers that speak the frame protocol by hand

/// Serves the streams a broker opens on `link` (dialed with a connector's identity) like a
/// connector would, counting the `Dial`s in `dials`: with `answer`, each `Dial` is answered
/// with those raw bytes and the stream is held until the link ends (so that no reset
/// overtakes them); with `None`, `DialReply{Ok}` and then an echo of the stream's bytes.
pub(crate) async fn stand_in_connector(
    link: Link,
    answer: Option<Vec<u8>>,
    dials: Arc<AtomicUsize>,
) {
    stand_in_connector_with(link, answer, dials, Arc::default()).await;
}

/// [`stand_in_connector`] that answers the broker's pings while `pongs` is set.
pub(crate) async fn stand_in_connector_with(
    link: Link,
    answer: Option<Vec<u8>>,
    dials: Arc<AtomicUsize>,
    pongs: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Some(mut s) = link.accept().await {
        let (link, answer, dials) = (link.clone(), answer.clone(), dials.clone());
        let pongs = pongs.clone();
        tokio::spawn(async move {
            let dial = match s.read_frame().await {
                Ok(Frame::Ping { nonce }) if pongs.load(Ordering::SeqCst) => {
                    let _ = s.write_frame(&Frame::Pong { nonce }).await;
                    let _ = s.finish().await;
                    return;
                }
                other => other,
            };
            let Ok(Frame::Dial { .. }) = dial else {
                return;
            };
            dials.fetch_add(1, Ordering::SeqCst);
            match answer {
                Some(b) => {
                    let _ = s.send_chunk(Bytes::from(b)).await;
                    link.closed().await;
                }
                None => {
                    let ok = Frame::DialReply { code: DialCode::Ok };
                    if s.write_frame(&ok).await.is_ok() {
                        echo_stream(&mut s).await;
                    }
                }
            }
        });
    }
}

/// Echoes a stream's bytes until the peer finishes, then finishes.
async fn echo_stream(s: &mut Stream) {
    while let Ok(Some(c)) = s.recv_chunk().await {
        if s.send_chunk(c).await.is_err() {
            return;
        }
    }
    let _ = s.finish().await;
}

/// A broker stand-in at the transport level, with a certificate from its own CA: answers
/// pings, and each `Open` with the next scripted answer (raw bytes; the stream is then held
/// until the link ends), or, with none left, `OpenReply{Ok}` and an echo. Each link it
/// accepts is handed to the test on `links`.
pub(crate) struct StandInBroker {
    pub(crate) ca: Ca,
    pub(crate) info: BrokerInfo,
    pub(crate) uri: String,
    pub(crate) script: Arc<Mutex<VecDeque<Vec<u8>>>>,
    pub(crate) links: mpsc::UnboundedReceiver<Link>,
    listener: Arc<Listener>,
    task: JoinHandle<()>,
}

impl Drop for StandInBroker {
    fn drop(&mut self) {
        self.task.abort();
        self.listener.close();
    }
}

impl StandInBroker {
    pub(crate) async fn start(org: &str, id: &str) -> StandInBroker {
        let ca = Ca::generate(org, SystemTime::now()).unwrap();
        let tls = umbra_pki::test_util::identity(&ca, Role::Broker, id).unwrap();
        let server =
            umbra_pki::server_config(&tls, ClientAuth::Required, &[umbra_link::ALPN], false)
                .unwrap();
        let listener = Arc::new(
            Listener::bind(
                Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                Arc::new(server),
                hand_link_config(),
            )
            .await
            .unwrap(),
        );
        let info = BrokerInfo {
            id: id.into(),
            name: format!("stand-in-{id}"),
            quic_addr: listener.quic_addr().map(|a| a.to_string()),
            tcp_addr: listener.tcp_addr().map(|a| a.to_string()),
            server_name: umbra_pki::broker_server_name(id),
        };
        let script: Arc<Mutex<VecDeque<Vec<u8>>>> = Arc::default();
        let (tx, links) = mpsc::unbounded_channel();
        let task = {
            let (listener, script) = (listener.clone(), script.clone());
            tokio::spawn(async move {
                while let Some(link) = listener.accept().await {
                    let _ = tx.send(link.clone());
                    let script = script.clone();
                    tokio::spawn(async move {
                        while let Some(s) = link.accept().await {
                            tokio::spawn(stand_in_broker_stream(s, link.clone(), script.clone()));
                        }
                    });
                }
            })
        };
        StandInBroker {
            uri: PeerId::new(org, Role::Broker, id).unwrap().to_uri(),
            ca,
            info,
            script,
            links,
            listener,
            task,
        }
    }

    /// An agent identity directory (device `device`) that knows only this broker and a
    /// controller nobody listens for (agents work without it), and a config for it.
    pub(crate) fn agent(&self, dir: &Path, device: &str, t: TransportPref) -> AgentConfig {
        let org = self.ca.org().to_owned();
        let p = umbra_pki::test_util::issue_pems(
            &self.ca,
            PeerId::new(&org, Role::Agent, device).unwrap(),
            vec![],
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
        umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, self.ca.cert_pem()).unwrap();
        save_controller_ref(
            dir,
            &ControllerRef {
                url: "https://127.0.0.1:9".into(),
                identity: format!("umbra://{org}/agent/{device}"),
                user: Some("alice@example.test".into()),
                brokers: vec![self.info.clone()],
            },
        )
        .unwrap();
        AgentConfig {
            identity_dir: dir.to_path_buf(),
            transport: t,
            open_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            idle_timeout_secs: 300,
            ..AgentConfig::default()
        }
    }

    /// The next link an agent dialed.
    pub(crate) async fn next_link(&mut self) -> Link {
        tokio::time::timeout(SOON, self.links.recv())
            .await
            .expect("a link within 10 s")
            .expect("the stand-in is running")
    }
}

async fn stand_in_broker_stream(mut s: Stream, link: Link, script: Arc<Mutex<VecDeque<Vec<u8>>>>) {
    match s.read_frame().await {
        Ok(Frame::Ping { nonce }) => {
            if s.write_frame(&Frame::Pong { nonce }).await.is_ok() {
                let _ = s.finish().await;
            }
        }
        Ok(Frame::Open { .. }) => {
            let next = script.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            match next {
                Some(b) => {
                    let _ = s.send_chunk(Bytes::from(b)).await;
                    link.closed().await;
                }
                None => {
                    let ok = Frame::OpenReply { code: OpenCode::Ok };
                    if s.write_frame(&ok).await.is_ok() {
                        echo_stream(&mut s).await;
                    }
                }
            }
        }
        _ => s.reset(),
    }
}
