//! The connector: runs next to private applications and carries brokers' streams to them.
//!
//! It never listens. It dials out to every broker and holds one link to each; brokers open
//! streams on those links, and the connector connects each stream to a target **published for
//! this connector**, and nothing else. Read the modules in the order of one stream:
//!
//! 1. [`config`]: what the operator sets.
//! 2. `sync`: published targets (long poll, cached in `published.json`) and the broker list
//!    from the controller.
//! 3. `links`: one link per broker, redialed with backoff, QUIC then TLS over TCP.
//! 4. `serve`: read the broker's `Dial`, check it against the published targets (exact
//!    string match), dial the target, relay.
//!
//! The certificate is renewed in the background
//! (`umbra_link::enroll::spawn_renewal_until_refused`), also after an expiry while the
//! controller was away; new links use the renewed identity. Only the controller's refusal
//! stops the connector.
//!
//! Offline start: everything the connector needs at start is on disk in its identity
//! directory (`key.pem`, `cert.pem`, `ca.pem`, `controller.json` with the controller URL and
//! last known brokers, `published.json` with the last published targets), so it starts and
//! serves while the controller is unreachable.
//!
//! Not owned here: the access decision (the broker's, from policy), enrollment itself
//! ([`enroll`] is umbra-link's).

pub mod config;
mod links;
mod serve;
mod sync;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use umbra_link::LinkConfig;
use umbra_link::enroll::{load_controller_ref, spawn_renewal_until_refused};
use umbra_pki::TlsIdentity;
use umbra_proto::Role;
use umbra_proto::api::ConnectorConfig as PublishedConfig;

pub use config::{ConfigError, ConnectorConfig, TransportPref, UnknownTransportPref};
pub use sync::{TARGETS_FOLLOWING_AGAIN, TARGETS_UNREACHABLE};
pub use umbra_link::enroll::enroll;

/// Why a connector did not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No usable identity in `identity_dir` (not enrolled, or files damaged).
    #[error("identity: {0} (enroll the connector first)")]
    Identity(#[source] umbra_pki::PkiError),
    /// The identity is not a connector's.
    #[error("the identity in identity_dir is a {0} certificate, not a connector's")]
    WrongRole(Role),
    /// `controller.json` is missing or unreadable.
    #[error("controller reference: {0}")]
    ControllerRef(#[source] umbra_link::LinkError),
    /// The certificate expired (at the time given) without a renewal, while the connector
    /// was not running or the controller was away: brokers refuse it, and only a valid
    /// certificate can be renewed.
    #[error(
        "this connector's certificate expired at {0} and the controller refused to renew it \
         (the connector revoked, or expired longer ago than the controller renews). Enroll it \
         again with a new token: umbra connector enroll --controller URL --token TOKEN"
    )]
    Expired(String),
    /// The certificate had expired (at `at`) when the connector started, and the controller
    /// did not renew it.
    #[error(
        "this connector's certificate expired at {at} and was not renewed: {error}. The \
         controller renews a certificate for a while after it expired (renew_grace_secs, 7 \
         days by default) unless the connector was revoked; start again once it can be \
         reached, or enroll it again with a new token: \
         umbra connector enroll --controller URL --token TOKEN"
    )]
    ExpiredUnrenewed { at: String, error: String },
    /// Another connector process holds the identity directory.
    #[error(
        "another connector is running on {0}: one process per connector identity (enroll \
         another with its own token and --dir)"
    )]
    AlreadyRunning(std::path::PathBuf),
    /// The identity directory's lock could not be taken.
    #[error("cannot lock {0}: {1}")]
    Lock(std::path::PathBuf, #[source] std::io::Error),
}

/// Renews the expired identity in `dir` (expired at `at`), as the controller allows for a
/// while after expiry (a host powered off past its certificate's end). A refusal is an
/// error; a controller that cannot be reached is not (the connector starts, and renewal goes
/// on in the background until the controller answers): the expired identity is returned.
async fn renew_expired(
    dir: &std::path::Path,
    at: String,
    expired: TlsIdentity,
) -> Result<TlsIdentity, ConnectorError> {
    let renewed =
        tokio::time::timeout(RENEW_AT_START, umbra_link::enroll::renew(dir, &expired)).await;
    let error = match renewed {
        Ok(Ok(issued)) => {
            if let Some(issued) = issued {
                tracing::info!(serial = %issued.serial, "the expired certificate was renewed");
            }
            let identity = TlsIdentity::load_dir(dir).map_err(ConnectorError::Identity)?;
            usable(&identity, SystemTime::now())?;
            return Ok(identity);
        }
        Ok(Err(e)) if e.is_refusal() => e.to_string(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, not_after = %at, "the certificate has expired and the controller cannot be reached; starting, and renewing once it can");
            return Ok(expired);
        }
        Err(_) => {
            tracing::warn!(not_after = %at, "the certificate has expired and the controller did not answer in time; starting, and renewing once it does");
            return Ok(expired);
        }
    };
    Err(ConnectorError::ExpiredUnrenewed { at, error })
}

/// How long a start waits for the renewal of an expired certificate.
const RENEW_AT_START: Duration = Duration::from_secs(10);

/// Whether `identity` can serve as this connector's at `now`: a connector's, not expired.
fn usable(identity: &TlsIdentity, now: SystemTime) -> Result<(), ConnectorError> {
    if identity.peer.id.role != Role::Connector {
        return Err(ConnectorError::WrongRole(identity.peer.id.role));
    }
    if identity.peer.not_after <= now {
        return Err(ConnectorError::Expired(umbra_pki::rfc3339(
            identity.peer.not_after,
        )));
    }
    Ok(())
}

/// A running connector.
pub struct Connector {
    /// This process's hold on the identity directory (`umbra_pki::lock_instance`).
    _instance: std::fs::File,
    identity: String,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Set once the connector cannot go on (its certificate expired unrenewed).
    failed: watch::Receiver<Option<String>>,
}

/// Longest wait for the tasks at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Connector {
    /// Loads the identity, cached targets and broker list from `cfg.identity_dir`, then starts
    /// the links, the controller sync and certificate renewal. Returns once everything is
    /// started; links come up in the background.
    pub async fn start(cfg: ConnectorConfig) -> Result<Connector, ConnectorError> {
        cfg.validate()?;
        let dir = cfg.identity_dir.clone();
        let identity = TlsIdentity::load_dir(&dir).map_err(ConnectorError::Identity)?;
        let instance = umbra_pki::lock_instance(&dir)
            .map_err(|e| ConnectorError::Lock(dir.clone(), e))?
            .ok_or_else(|| ConnectorError::AlreadyRunning(dir.clone()))?;
        let swept = umbra_pki::sweep_temp_files(&dir, SystemTime::now());
        if swept > 0 {
            tracing::info!(dir = %dir.display(), swept, "removed temporary files an earlier stop left");
        }
        let identity = match usable(&identity, SystemTime::now()) {
            Ok(()) => identity,
            Err(ConnectorError::Expired(at)) => renew_expired(&dir, at, identity).await?,
            Err(e) => return Err(e),
        };
        let cref = load_controller_ref(&dir).map_err(ConnectorError::ControllerRef)?;
        let me = identity.peer.id.id.clone();
        let uri = identity.peer.id.to_uri();

        let published = sync::load_cached(&dir, &me).unwrap_or_else(|| PublishedConfig {
            connector_id: me.clone(),
            version: 0,
            targets: vec![],
        });
        sync::publish_gauges(published.version, None);
        tracing::info!(
            identity = %uri,
            version = published.version,
            targets = published.targets.len(),
            brokers = cref.brokers.len(),
            "connector starting"
        );
        let (published_tx, published_rx) = watch::channel(Arc::new(published));
        let (brokers_tx, brokers_rx) = watch::channel(Arc::new(cref.brokers.clone()));
        // Unattended: renewal goes on past an expiry until the controller renews or refuses.
        let identity_rx = spawn_renewal_until_refused(dir.clone(), Arc::new(identity));

        let cancel = CancellationToken::new();
        let link_ctx = Arc::new(links::LinkCtx {
            link_cfg: LinkConfig {
                max_streams: cfg.max_streams_per_link,
                ..LinkConfig::default().with_stream_window_kib(cfg.stream_window_kib)
            },
            identity: identity_rx.clone(),
            serve: Arc::new(serve::ServeCtx {
                published: published_rx,
                dial_timeout: cfg.dial_timeout(),
                idle_timeout: cfg.idle_timeout(),
            }),
            cfg,
        });
        let (failed_tx, failed) = watch::channel(None);
        let tasks = vec![
            tokio::spawn(watch_expiry(identity_rx.clone(), failed_tx, cancel.clone())),
            tokio::spawn(links::supervise(link_ctx, brokers_rx, cancel.clone())),
            tokio::spawn(sync::poll_published(
                umbra_link::RenewingClient::new(cref.url.clone(), identity_rx.clone()),
                dir.clone(),
                me,
                published_tx,
                cancel.clone(),
            )),
            tokio::spawn(sync::poll_brokers(
                identity_rx,
                dir,
                cref,
                brokers_tx,
                cancel.clone(),
            )),
        ];
        Ok(Connector {
            _instance: instance,
            identity: uri,
            cancel,
            tasks,
            failed,
        })
    }

    /// Resolves if the connector cannot go on: its certificate expired without a renewal
    /// (the controller was away for a third of its lifetime, or refused it). Brokers refuse
    /// it and renewal needs a valid certificate, so it has stopped its links; enroll it
    /// again. Pending for as long as it runs well.
    pub async fn failed(&self) -> ConnectorError {
        let mut rx = self.failed.clone();
        loop {
            if let Some(at) = rx.borrow_and_update().clone() {
                return ConnectorError::Expired(at);
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// This connector's identity, `umbra://ORG/connector/ID`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Closes every link and stops the background tasks (streams in flight are cut).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let all = join_all(std::mem::take(&mut self.tasks));
        if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
            tracing::warn!("connector tasks did not stop in time");
        }
        tracing::info!(identity = %self.identity, "connector stopped");
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Waits for renewal to end for good (the controller refused it) with the certificate in use
/// expired; then says why and stops the connector's links. A controller away does not end
/// it: the connector runs on and renews once the controller is back.
async fn watch_expiry(
    identity: watch::Receiver<Arc<TlsIdentity>>,
    failed: watch::Sender<Option<String>>,
    cancel: CancellationToken,
) {
    let not_after = tokio::select! {
        () = cancel.cancelled() => return,
        at = umbra_link::enroll::until_renewal_ends(identity) => at,
    };
    let e = ConnectorError::Expired(umbra_pki::rfc3339(not_after));
    tracing::error!(error = %e, "certificate expired without a renewal; stopping");
    let _ = failed.send(Some(umbra_pki::rfc3339(not_after)));
    cancel.cancel();
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use umbra_pki::Ca;

    use super::*;

    #[test]
    fn only_a_valid_connector_identity_starts() {
        let now = SystemTime::now();
        let ca = Ca::generate("test", now).unwrap();
        let id = umbra_pki::test_util::identity(&ca, Role::Connector, "c1").unwrap();
        assert!(usable(&id, now).is_ok());
        // Past its end (an hour): refused, naming when it ended and what to do.
        let later = id.peer.not_after + Duration::from_secs(1);
        match usable(&id, later) {
            Err(e @ ConnectorError::Expired(_)) => {
                let said = e.to_string();
                assert!(
                    said.contains(&umbra_pki::rfc3339(id.peer.not_after)),
                    "{said}"
                );
                assert!(said.contains("umbra connector enroll"), "{said}");
            }
            other => panic!("expected Expired, got {other:?}"),
        }
        assert!(matches!(
            usable(&id, id.peer.not_after),
            Err(ConnectorError::Expired(_))
        ));
        let agent = umbra_pki::test_util::identity(&ca, Role::Agent, "d1").unwrap();
        assert!(matches!(
            usable(&agent, now),
            Err(ConnectorError::WrongRole(Role::Agent))
        ));
    }
}
