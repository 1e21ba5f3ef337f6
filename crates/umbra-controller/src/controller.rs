//! Start-up and shutdown: open the store, take custody of the CA, bind, create the first admin
//! token (the last step that can fail), serve.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use umbra_pki::ServerCertSlot;

use crate::admin_token;
use crate::api;
use crate::ca;
use crate::config::ControllerConfig;
use crate::distribution::Distribution;
use crate::error::ControllerError;
use crate::failures::FailureBudget;
use crate::state::{Clock, Ctx};
use crate::store::{self, SNAPSHOT_VERSION, Store};

/// How often the controller's own server certificate is replaced (it lives 7 days).
const SERVER_CERT_ROTATION: Duration = Duration::from_secs(24 * 3600);

/// A running controller. Dropping it stops the server (without waiting); prefer
/// [`Controller::shutdown`].
pub struct Controller {
    addr: SocketAddr,
    public_url: Option<String>,
    ca_pem: String,
    ca_sha256: [u8; 32],
    first_admin_token: Option<String>,
    ctx: Arc<Ctx>,
    shutdown_tx: watch::Sender<bool>,
    server: JoinHandle<()>,
    rotation: JoinHandle<()>,
    /// Publishes committed versions a dropped request did not (`distribution::follow_store`).
    follow: JoinHandle<()>,
    /// Forgets what has aged out (`housekeeping`).
    sweeps: JoinHandle<()>,
    audit_retention: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("addr", &self.addr)
            .field("org", &self.ctx.org)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Validates the configuration, opens and migrates the database, loads or creates the
    /// CA (the key-encryption key comes from `ca_key`, else the `UMBRA_CA_KEY` environment
    /// variable, else `<data_dir>/ca.kek`), binds, creates the first admin token on the very
    /// first start (once nothing else can fail, so that a failed start leaves none unseen),
    /// and serves.
    pub async fn start(cfg: ControllerConfig) -> Result<Controller, ControllerError> {
        Self::start_with_clock(cfg, Arc::new(SystemTime::now)).await
    }

    /// [`Controller::start`] with an injected clock (tests and simulations move time to expire
    /// tokens without sleeping). TLS handshakes judge client certificates by it too.
    pub async fn start_with_clock(
        cfg: ControllerConfig,
        clock: Clock,
    ) -> Result<Controller, ControllerError> {
        cfg.validate()?;
        create_data_dir(&cfg)?;
        let store = Store::open(&cfg.database(), &cfg.org).await?;
        // The one place the environment is read; everything below takes the value.
        let env_key = match cfg.ca_key {
            Some(_) => None,
            None => std::env::var(ca::KEK_ENV).ok(),
        };
        let ca = ca::load_or_create(&store, &cfg, env_key.as_deref(), clock()).await?;

        let server_id = ca::server_identity(&ca, &store, &cfg.server_names, clock()).await?;
        // The handshake lets an expired certificate through for a month past the renewal
        // grace: the renewal route then refuses it with the reason, audited, instead of a
        // handshake failure its holder sees as a closed connection. Every route checks
        // expiry again (`Ctx::check_cert`).
        let tls_grace = cfg.renew_grace() + ca::REFUSAL_WINDOW;
        let (tls, slot) = ca::server_tls(&server_id, tls_grace, clock.clone())?;

        // Every start moves the version to at least the clock in milliseconds. A store
        // restored from a backup counts on from where the backup was; without this, it could
        // hand out a version a broker or connector already holds for other content, and they
        // would take it for current. The clock is far ahead of any count of changes.
        let version = {
            let floor = clock()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let mut w = store.write().await?;
            let v = store::raise(w.conn(), &cfg.org, SNAPSHOT_VERSION, floor).await?;
            w.commit().await?;
            v
        };
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ControllerError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ControllerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let ca_pem = ca.cert_pem().to_owned();
        // The CA certificate is public: operators hand it to `umbra admin --ca-file`.
        let ca_file = cfg.data_dir.join("ca.pem");
        umbra_pki::write_public_file(&ca_file, ca_pem.as_bytes()).map_err(|source| {
            ControllerError::Io {
                op: "write",
                path: ca_file,
                source,
            }
        })?;
        // Last of the steps that can fail: the token is shown only by a start that succeeds,
        // and its hash, once committed, stops every later start from creating one. Created
        // before a failing step, it would be lost with the error, and the operator left
        // without one (a reset from the host would be the only way back).
        let first_admin_token = admin_token::first(&store, clock()).await?;
        let ca_sha256 = ca.sha256();
        let ctx = Arc::new(Ctx {
            store,
            org: cfg.org.clone(),
            ca,
            clock,
            cert_lifetime: cfg.cert_lifetime(),
            renew_grace: cfg.renew_grace(),
            token_ttl: cfg.token_ttl(),
            dist: Distribution::new(version),
            heartbeats: umbra_link::quota::Quota::new(api::MAX_HEARTBEATS_PER_BROKER),
            failures: std::sync::Mutex::new(FailureBudget::new(std::time::Instant::now())),
            shutdown: shutdown_rx.clone(),
        });
        let router = api::router(ctx.clone());
        let limits = api::serve::Limits {
            handshakes: umbra_link::pending::Pending::new(cfg.max_pending_handshakes),
            anonymous: umbra_link::pending::Pending::new(cfg.max_anonymous_connections),
            anonymous_for: Duration::from_secs(cfg.anonymous_connection_secs),
            per_peer: umbra_link::quota::Quota::new(cfg.max_connections_per_peer),
        };
        let server = tokio::spawn(api::serve::serve(
            listener,
            tls,
            router,
            limits,
            shutdown_rx.clone(),
        ));
        let rotation = tokio::spawn(rotate_server_cert(
            ctx.clone(),
            slot,
            cfg.server_names.clone(),
            shutdown_rx.clone(),
        ));
        let sweeps = tokio::spawn(crate::housekeeping::sweep_loop(
            ctx.clone(),
            cfg.audit_retention(),
            shutdown_rx.clone(),
        ));
        let follow = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                crate::distribution::follow_store(
                    &ctx.store,
                    &ctx.org,
                    &ctx.dist,
                    crate::distribution::FOLLOW_EVERY,
                    shutdown_rx,
                )
                .await;
            })
        };
        tracing::info!(
            %addr,
            org = %cfg.org,
            ca_sha256 = %hex::encode(ca_sha256),
            snapshot_version = version,
            "controller listening"
        );
        Ok(Controller {
            addr,
            public_url: cfg.public_url.clone(),
            ca_pem,
            ca_sha256,
            first_admin_token,
            ctx,
            shutdown_tx,
            server,
            rotation,
            follow,
            sweeps,
            audit_retention: cfg.audit_retention(),
        })
    }

    /// Runs a retention sweep now (one runs at start and every hour): deletes the audit
    /// records older than `audit_retention_days` and the enrollment tokens used or expired
    /// more than 30 days ago, and says how many.
    pub async fn sweep(&self) -> Result<crate::housekeeping::Swept, ControllerError> {
        Ok(crate::housekeeping::sweep(&self.ctx, self.audit_retention).await?)
    }

    /// `https://<address>:<port>` of the listener (loopback if bound to the unspecified address).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The URL peers should use: `public_url` from the configuration, else [`Controller::url`].
    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| self.url())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// SHA-256 of the CA certificate DER (the pin in enrollment tokens).
    pub fn ca_sha256(&self) -> [u8; 32] {
        self.ca_sha256
    }

    /// The admin token created on the very first start of this database; `None` on later
    /// starts (only its hash is stored). Print it once.
    pub fn first_admin_token(&self) -> Option<String> {
        self.first_admin_token.clone()
    }

    /// Whether `token` is a current admin token (it may have been rotated or reset since it
    /// was issued).
    pub async fn admin_token_works(&self, token: &str) -> Result<bool, ControllerError> {
        let mut r = self.ctx.store.read().await?;
        Ok(admin_token::check(&mut r, &self.ctx.org, token).await?)
    }

    /// The current snapshot version.
    pub fn snapshot_version(&self) -> u64 {
        self.ctx.dist.current()
    }

    /// Long polls (snapshots, connector configs, broker lists) waiting now for a newer
    /// version: each one counted here sees the next publish. For tests that make a change
    /// once a poll waits.
    #[doc(hidden)]
    pub fn long_polls_waiting(&self) -> usize {
        self.ctx.dist.waiting_now()
    }

    /// Not API: for `fuzz/` (target `admin_api`) and its corpus replay test only. Serves one
    /// request in process with the router the listener serves, as it arrives on a connection
    /// from loopback without a client certificate (an administrator's). `None` if `method`
    /// and `target` make no request line, which the listener's HTTP parser refuses before
    /// any route runs.
    #[doc(hidden)]
    pub async fn fuzz_request(
        &self,
        method: &str,
        target: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Option<(u16, Vec<u8>)> {
        use tower::Service;
        let mut req = axum::http::Request::builder().method(method).uri(target);
        if let Some(t) = bearer {
            req = req.header(axum::http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = req.body(axum::body::Body::from(body)).ok()?;
        req.extensions_mut()
            .insert(crate::state::ConnPeer::default());
        req.extensions_mut()
            .insert(crate::state::ClientAddr(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                40_000,
            ))));
        let Ok(resp) = api::router(self.ctx.clone()).call(req).await;
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .ok()?;
        Some((status, body.to_vec()))
    }

    /// Stops accepting, lets open requests finish (long polls end at once), closes the
    /// database.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.server.await;
        self.rotation.abort();
        let _ = self.rotation.await;
        self.follow.abort();
        let _ = self.follow.await;
        self.sweeps.abort();
        let _ = self.sweeps.await;
        self.ctx.store.close().await;
        tracing::info!("controller stopped");
    }
}

/// The data directory: this user's own, private (see [`umbra_pki::private_dir`]).
fn create_data_dir(cfg: &ControllerConfig) -> Result<(), ControllerError> {
    umbra_pki::private_dir(&cfg.data_dir).map_err(|source| ControllerError::Io {
        op: "use directory",
        path: cfg.data_dir.clone(),
        source,
    })?;
    let swept = umbra_pki::sweep_temp_files(&cfg.data_dir, std::time::SystemTime::now());
    if swept > 0 {
        tracing::info!(dir = %cfg.data_dir.display(), swept, "removed temporary files an earlier stop left");
    }
    Ok(())
}

/// Replaces the server certificate daily, long before its 7-day expiry.
async fn rotate_server_cert(
    ctx: Arc<Ctx>,
    slot: ServerCertSlot,
    names: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SERVER_CERT_ROTATION) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
        let renewed = async {
            let id = ca::server_identity(&ctx.ca, &ctx.store, &names, ctx.now()).await?;
            slot.replace(&id)?;
            Ok::<_, ControllerError>(())
        };
        match renewed.await {
            Ok(()) => tracing::info!("server certificate renewed"),
            Err(e) => tracing::error!(error = %e, "cannot renew the server certificate"),
        }
    }
}
