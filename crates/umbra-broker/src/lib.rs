//! The broker: Umbra's enforcement point, one per point of presence.
//!
//! It owns, for the links that agents and connectors dial to it (QUIC, or TLS 1.3 over TCP
//! where UDP is blocked, both with mutual TLS on Umbra certificates):
//! - admission of each link ([`authn`]),
//! - the decision for every new stream, taken locally from the last policy snapshot, with no
//!   controller round trip ([`authz`], [`authority`]),
//! - routing an allowed stream to the least-loaded live connector that serves the service
//!   ([`route`]),
//! - relaying its bytes, and cancelling live streams that a new snapshot no longer allows
//!   ([`relay`]),
//! - keeping the snapshot current and reporting live streams and audit events ([`sync`]).
//!
//! It does not own transports or the copy loops (`umbra-link`), the policy language
//! (`umbra-policy`) or any state that must survive it: brokers are stateless and many; the
//! on-disk snapshot is a cache of the controller's.
//!
//! Read one stream's life top-down in [`accept`].

mod accept;
mod audit;
mod authn;
mod authority;
mod authz;
mod config;
mod relay;
mod route;
mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use umbra_link::{ControllerClient, LinkConfig, Listener};
use umbra_pki::{ClientAuth, TlsIdentity};
use umbra_proto::Role;

pub use config::{BrokerConfig, ConfigError};

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("broker identity in {dir}: {source} (enroll the broker first: `umbra broker enroll`)")]
    Identity {
        dir: PathBuf,
        source: umbra_pki::PkiError,
    },
    #[error("the certificate in {0} is not a broker's (run `umbra broker enroll`)")]
    NotABroker(PathBuf),
    #[error("controller reference in {dir}: {source}")]
    ControllerRef {
        dir: PathBuf,
        source: umbra_link::LinkError,
    },
    #[error("TLS configuration: {0}")]
    Tls(umbra_pki::PkiError),
    #[error("listen: {0}")]
    Listen(umbra_link::LinkError),
    #[error("policy engine: {0}")]
    Policy(#[from] umbra_policy::PolicyError),
    #[error("{path}: {source}")]
    ResetKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit spool {path}: {source}")]
    AuditSpool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another broker is running on {0}: one process per broker identity (start this one \
         with another --dir, enrolled with its own token)"
    )]
    AlreadyRunning(PathBuf),
    #[error("cannot lock {dir}: {source}")]
    Lock {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The QUIC stateless-reset key, created once and kept next to the identity so that a
/// restarted broker can reset its peers' stale connections (they then reconnect at once).
fn reset_key(dir: &std::path::Path) -> Result<umbra_link::ResetKey, BrokerError> {
    let path = dir.join("quic-reset.key");
    let err = |source| BrokerError::ResetKey {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&b);
            return Ok(umbra_link::ResetKey(k));
        }
        Ok(_) => warn!(path = %path.display(), "replacing a malformed QUIC reset key"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let k: [u8; 32] = umbra_pki::random_bytes();
    umbra_pki::write_private_file(&path, &k).map_err(err)?;
    Ok(umbra_link::ResetKey(k))
}

/// State shared by the broker's tasks.
/// How often a device may ask for its service list (one Cedar decision per published
/// service each time): a burst of 10, then one per 500 ms; all devices together 1000, then
/// 100 per second. An agent asks once per `umbra agent services`.
const LISTINGS: umbra_link::budget::BudgetConfig = umbra_link::budget::BudgetConfig {
    key_burst: 10.0,
    key_every: std::time::Duration::from_millis(500),
    global_burst: 1000.0,
    global_per_sec: 100.0,
    max_keys: 4096,
};

/// The rate of stream opens per device: a burst, then a steady rate, per device only. There is
/// no bound over all devices: one device's flood must not refuse another's streams.
fn opens_budget(cfg: &BrokerConfig) -> umbra_link::budget::BudgetConfig {
    umbra_link::budget::BudgetConfig {
        key_burst: f64::from(cfg.stream_open_burst),
        key_every: std::time::Duration::from_secs_f64(1.0 / f64::from(cfg.stream_opens_per_sec)),
        // Far beyond what a broker can open: never the limit.
        global_burst: 1e15,
        global_per_sec: 1e15,
        // Devices tracked one by one; beyond them (a broker with more devices streaming at
        // once), new ones share a budget until tracked ones are whole again.
        max_keys: 65_536,
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: BrokerConfig,
    pub(crate) org: String,
    pub(crate) name: String,
    pub(crate) server_name: String,
    pub(crate) quic_addr: Option<String>,
    pub(crate) tcp_addr: Option<String>,
    pub(crate) snapshot_path: PathBuf,
    pub(crate) authority: ArcSwap<authority::Authority>,
    /// The snapshot version in force with what it ends ended: set after an install has
    /// re-decided the live streams and links, and reported in heartbeats. `authority` holds
    /// the new version a moment earlier, while the streams it ends are still being closed.
    pub(crate) applied: AtomicU64,
    /// The confirmation time last written to `snapshot_path` (Unix seconds).
    pub(crate) persisted_confirmation: std::sync::atomic::AtomicU64,
    pub(crate) connectors: route::Registry,
    pub(crate) agents: route::Registry,
    /// Streams open per device (`max_streams_per_device`).
    pub(crate) device_streams: Arc<umbra_link::quota::Quota>,
    pub(crate) streams: relay::LiveStreams,
    pub(crate) audit: audit::AuditQueue,
    /// Service lists per device ([`LISTINGS`]).
    pub(crate) listings: std::sync::Mutex<umbra_link::budget::Budget<Arc<str>>>,
    /// Streams opened per device (`stream_opens_per_sec` after `stream_open_burst`; see
    /// [`opens_budget`]).
    pub(crate) opens: std::sync::Mutex<umbra_link::budget::Budget<Arc<str>>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) shutdown: CancellationToken,
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    tasks: Vec<JoinHandle<()>>,
    /// This process's hold on the identity directory (`umbra_pki::lock_instance`).
    _instance: std::fs::File,
}

impl Broker {
    /// Loads the identity and last snapshot, binds the listeners and starts serving.
    pub async fn start(cfg: BrokerConfig) -> Result<Broker, BrokerError> {
        cfg.validate()?;
        let dir = cfg.identity_dir.clone();
        let identity = TlsIdentity::load_dir(&dir).map_err(|source| BrokerError::Identity {
            dir: dir.clone(),
            source,
        })?;
        if identity.peer.id.role != Role::Broker {
            return Err(BrokerError::NotABroker(dir));
        }
        let instance = umbra_pki::lock_instance(&dir)
            .map_err(|source| BrokerError::Lock {
                dir: dir.clone(),
                source,
            })?
            .ok_or_else(|| BrokerError::AlreadyRunning(dir.clone()))?;
        let swept = umbra_pki::sweep_temp_files(&dir, std::time::SystemTime::now());
        if swept > 0 {
            info!(dir = %dir.display(), swept, "removed temporary files an earlier stop left");
        }
        let cref = umbra_link::enroll::load_controller_ref(&dir).map_err(|source| {
            BrokerError::ControllerRef {
                dir: dir.clone(),
                source,
            }
        })?;
        let snapshot_path = authority::cache_path(&dir);
        let held = match authority::load_cached(&snapshot_path) {
            Some(a) => {
                info!(
                    version = a.snapshot.version,
                    "enforcing the cached snapshot until the controller answers"
                );
                a
            }
            None => authority::Authority::empty()?,
        };
        sync::publish_gauges(&held, std::time::SystemTime::now());
        // The certificate sits in a slot so that renewals take effect without rebinding.
        let (server_tls, cert_slot) = umbra_pki::server_config_reloadable(
            &identity,
            ClientAuth::Required,
            &[umbra_link::ALPN],
            false,
        )
        .map_err(BrokerError::Tls)?;
        let link_cfg = LinkConfig {
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            max_pending_handshakes: cfg.max_pending_handshakes,
            reset_key: Some(reset_key(&dir)?),
            ..LinkConfig::default()
        }
        .with_stream_window_kib(cfg.stream_window_kib);
        let listener = Arc::new(
            Listener::bind(
                cfg.listen_quic,
                cfg.listen_tcp,
                Arc::new(server_tls),
                link_cfg,
            )
            .await
            .map_err(BrokerError::Listen)?,
        );
        let host = cfg.advertise();
        let fmt_addr = |a: SocketAddr| match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{}", a.port()),
            Err(_) => format!("{host}:{}", a.port()),
        };
        let org = identity.peer.id.org.clone();
        let spool = dir.join("audit.spool");
        let audit = audit::AuditQueue::open(&spool).map_err(|source| BrokerError::AuditSpool {
            path: spool.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            name: if cfg.name.is_empty() {
                identity.peer.id.id.clone()
            } else {
                cfg.name.clone()
            },
            server_name: umbra_pki::broker_server_name(&identity.peer.id.id),
            quic_addr: listener.quic_addr().map(fmt_addr),
            tcp_addr: listener.tcp_addr().map(fmt_addr),
            snapshot_path,
            persisted_confirmation: held.confirmed_at.into(),
            applied: held.snapshot.version.into(),
            authority: ArcSwap::from_pointee(held),
            connectors: Default::default(),
            agents: Default::default(),
            device_streams: umbra_link::quota::Quota::new(cfg.max_streams_per_device),
            streams: Default::default(),
            audit,
            listings: std::sync::Mutex::new(umbra_link::budget::Budget::new(
                LISTINGS,
                std::time::Instant::now(),
            )),
            opens: std::sync::Mutex::new(umbra_link::budget::Budget::new(
                opens_budget(&cfg),
                std::time::Instant::now(),
            )),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            org,
            cfg,
        });
        info!(
            name = %shared.name,
            quic = ?listener.quic_addr(),
            tcp = ?listener.tcp_addr(),
            "broker listening"
        );
        let client = match ControllerClient::new(&cref.url, &identity.ca, Some(&identity)) {
            Ok(c) => Some(Arc::new(ArcSwap::from_pointee(c))),
            Err(e) => {
                warn!(error = %e, "controller client unavailable; enforcing the cached snapshot only");
                None
            }
        };
        let mut tasks = vec![
            tokio::spawn(accept::accept_links(shared.clone(), listener.clone())),
            tokio::spawn(accept::audit_handshake_refusals(
                shared.clone(),
                listener.clone(),
                identity.peer.id.to_uri(),
            )),
            tokio::spawn(sync::reverify_loop(shared.clone())),
        ];
        if let Some(client) = client {
            tasks.push(tokio::spawn(sync::snapshot_loop(
                shared.clone(),
                client.clone(),
            )));
            tasks.push(tokio::spawn(sync::heartbeat_loop(
                shared.clone(),
                client.clone(),
            )));
            tasks.push(tokio::spawn(renewal(
                shared.clone(),
                dir,
                identity,
                cref.url,
                cert_slot,
                client,
            )));
        }
        Ok(Broker {
            shared,
            listener,
            tasks,
            _instance: instance,
        })
    }

    /// Where the QUIC listener is bound.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.listener.quic_addr()
    }

    /// Where the TLS-over-TCP listener is bound.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listener.tcp_addr()
    }

    /// Version of the snapshot being enforced.
    pub fn snapshot_version(&self) -> u64 {
        self.shared.authority.load().snapshot.version
    }

    /// Number of streams relaying now.
    pub fn live_streams(&self) -> usize {
        self.shared.streams.len()
    }

    /// Number of agent links up now (the same count as the `umbra_broker_links{role="agent"}`
    /// gauge).
    pub fn agent_links(&self) -> usize {
        self.shared.agents.len()
    }

    /// Stops accepting, closes every link and stream, and waits for the tasks.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.listener.close();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Renews the broker's certificate before it expires and puts the new one to use: presented
/// from the next handshake on, and used for the controller connection.
async fn renewal(
    shared: Arc<Shared>,
    dir: PathBuf,
    identity: TlsIdentity,
    url: String,
    slot: umbra_pki::ServerCertSlot,
    client: Arc<ArcSwap<ControllerClient>>,
) {
    // A broker runs on past an expiry (its listeners stay up): renewal goes on until the
    // controller renews or refuses for good.
    let mut renewed = umbra_link::enroll::spawn_renewal_until_refused(dir, Arc::new(identity));
    loop {
        tokio::select! {
            r = renewed.changed() => if r.is_err() { return },
            () = shared.shutdown.cancelled() => return,
        }
        let id = renewed.borrow_and_update().clone();
        if let Err(e) = slot.replace(&id) {
            warn!(error = %e, "renewed certificate unusable; keeping the current one");
            continue;
        }
        match ControllerClient::new(&url, &id.ca, Some(&id)) {
            Ok(c) => client.store(Arc::new(c)),
            Err(e) => warn!(error = %e, "controller client with the renewed certificate"),
        }
        info!(serial = %id.peer.serial_hex, "presenting the renewed certificate");
    }
}
