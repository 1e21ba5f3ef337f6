//! What the connector learns from the controller: its published targets and the brokers.
//!
//! Owns the two holders the rest of the connector reads (`watch` channels: readers take the
//! current value without locking the data path) and keeps them fresh:
//! - published targets by long poll (`GET /v1/connector/config?after=N`), cached on disk in
//!   `<identity_dir>/published.json` so that a restart while the controller is away still
//!   serves what was last published;
//! - brokers by long poll (`GET /v1/brokers?have=TAG`), starting from the list in
//!   `controller.json` (which is updated when the list changes).
//!
//! Failures to reach the controller never clear what is held: the connector goes on serving
//! the last known targets through the last known brokers.

use std::fs;
use std::io::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use umbra_link::RenewingClient;
use umbra_link::backoff::Backoff;
use umbra_link::enroll::{ControllerRef, save_controller_ref};
use umbra_pki::TlsIdentity;
use umbra_proto::api::{BrokerInfo, ConnectorConfig as PublishedConfig};

/// Cache of the published targets, next to the identity.
pub(crate) const PUBLISHED_FILE: &str = "published.json";
/// Longest wait between tries to fetch the broker list while the controller is away.
const BROKER_RETRY_CAP: Duration = Duration::from_secs(10);
/// Retry delays after a failed long poll. The cap bounds how long targets published just
/// after a controller outage wait to be served: as for the broker list.
const POLL_RETRY_BASE: Duration = Duration::from_millis(500);
const POLL_RETRY_CAP: Duration = BROKER_RETRY_CAP;

/// The published targets as held: shared by every stream handler.
pub(crate) type PublishedRx = watch::Receiver<Arc<PublishedConfig>>;
pub(crate) type BrokersRx = watch::Receiver<Arc<Vec<BrokerInfo>>>;
pub(crate) type IdentityRx = watch::Receiver<Arc<TlsIdentity>>;

/// Reads `published.json`; `None` if there is none yet, or if it is unreadable or belongs to
/// another connector (logged), in which case nothing is published until the controller
/// answers.
pub(crate) fn load_cached(dir: &Path, connector_id: &str) -> Option<PublishedConfig> {
    let path = dir.join(PUBLISHED_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the published targets cache");
            return None;
        }
    };
    match serde_json::from_slice::<PublishedConfig>(&bytes) {
        Ok(c) if c.connector_id == connector_id => Some(c),
        Ok(c) => {
            tracing::warn!(path = %path.display(), cached_for = %c.connector_id, "published targets cache belongs to another connector; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "published targets cache is damaged; ignored");
            None
        }
    }
}

/// Writes `published.json` atomically (temporary file, fsync, rename), mode 0600; when that
/// fails, removes the copy there: it holds older
/// targets, perhaps one since unpublished, which a restart while the controller is away must
/// not serve. Without a copy, a restart serves nothing until the controller answers.
pub(crate) fn save_cached_or_forget(dir: &Path, cfg: &PublishedConfig) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(cfg).map_err(io::Error::other)?;
    umbra_pki::write_private_file_or_remove(&dir.join(PUBLISHED_FILE), &bytes).map_err(|(e, _)| e)
}

/// Sets the published-targets gauges: the version held (at start, from the cache, and on
/// each update) and, with `answered_at`, when the controller last answered its poll (Unix
/// seconds; `time() - umbra_connector_controller_answered_timestamp_seconds` is how long the
/// connector has served targets it could not confirm).
pub(crate) fn publish_gauges(version: u64, answered_at: Option<std::time::SystemTime>) {
    metrics::gauge!("umbra_connector_targets_version").set(version as f64);
    if let Some(t) = answered_at {
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        metrics::gauge!("umbra_connector_controller_answered_timestamp_seconds").set(secs as f64);
    }
}

/// Whether a configuration from the controller should replace the one held: another
/// version for this very connector. The controller sends an older one only when it holds
/// nothing newer (its store was restored from a backup): then that is what is published.
pub(crate) fn accept_update(held: &PublishedConfig, new: &PublishedConfig, me: &str) -> bool {
    new.connector_id == me && new.version != held.version
}

/// What the connector logs (a warning) when the controller first fails to answer its
/// published-targets poll; retries after it are logged at debug level only.
pub const TARGETS_UNREACHABLE: &str =
    "cannot fetch the published targets; serving the last known ones until the controller answers";
/// What it logs at the first answer after failures.
pub const TARGETS_FOLLOWING_AGAIN: &str =
    "controller reachable again; following the published targets";

/// Wait before asking again after refusing a configuration from the controller.
const REFUSED_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// Long-polls the published targets until `cancel`.
pub(crate) async fn poll_published(
    mut ctl: RenewingClient,
    dir: PathBuf,
    me: String,
    tx: watch::Sender<Arc<PublishedConfig>>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(POLL_RETRY_BASE, POLL_RETRY_CAP);
    // Since when the controller has not answered, if it has not: the first failure is a
    // warning, the retries after it are not (an outage would fill the log), and the first
    // answer after them says how long it lasted.
    let mut failing: Option<std::time::Instant> = None;
    // The failure last warned of.
    let mut said = String::new();
    loop {
        let after = tx.borrow().version;
        // After a failure, a question answered at once (`wait=0`), not a long poll: whether
        // the controller is back is known as soon as it is.
        let path = match failing {
            None => format!("/v1/connector/config?after={after}"),
            Some(_) => format!("/v1/connector/config?after={after}&wait=0"),
        };
        let answer = tokio::select! {
            () = cancel.cancelled() => return,
            r = async {
                match ctl.client() {
                    Ok(c) => c.get_opt::<PublishedConfig>(&path).await,
                    Err(e) => Err(e),
                }
            } => r,
        };
        if answer.is_ok() {
            publish_gauges(tx.borrow().version, Some(std::time::SystemTime::now()));
        }
        if answer.is_ok()
            && let Some(since) = failing.take()
        {
            tracing::info!(
                unreachable_ms = since.elapsed().as_millis() as u64,
                "{TARGETS_FOLLOWING_AGAIN}"
            );
        }
        match answer {
            Ok(Some(new)) => {
                backoff.reset();
                if !accept_update(&tx.borrow(), &new, &me) {
                    tracing::warn!(
                        version = new.version,
                        connector = %new.connector_id,
                        "ignoring a configuration from the controller that is not another \
                         version of this connector's; asking again shortly"
                    );
                    // Asked again at once, it would answer the same at once.
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(REFUSED_CONFIG_WAIT) => {}
                    }
                    continue;
                }
                if let Err(e) = save_cached_or_forget(&dir, &new) {
                    tracing::warn!(
                        error = %e,
                        "cannot cache the published targets; a restart while the controller is \
                         away serves none"
                    );
                }
                publish_gauges(new.version, None);
                tracing::info!(
                    version = new.version,
                    targets = new.targets.len(),
                    "published targets updated"
                );
                tx.send_replace(Arc::new(new));
            }
            // Long poll timed out with nothing new: ask again.
            Ok(None) => backoff.reset(),
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                let retry_in_ms = delay.as_millis() as u64;
                // Warned of once per run of failures, and again when its cause changes (the
                // controller back, but refusing this connector's certificate).
                if failing.is_none() || e.failure_kind() != said {
                    failing.get_or_insert_with(std::time::Instant::now);
                    said = e.failure_kind();
                    tracing::warn!(error = %e, retry_in_ms, "{TARGETS_UNREACHABLE}");
                } else {
                    tracing::debug!(error = %e, retry_in_ms, "cannot fetch the published targets; still serving the last known ones");
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Follows the broker list until `cancel` (a long poll on the controller, see
/// [`umbra_link::follow_broker_list`]); a changed list is published to the link supervisor
/// and remembered in `controller.json`.
pub(crate) async fn poll_brokers(
    identity: IdentityRx,
    dir: PathBuf,
    mut cref: ControllerRef,
    tx: watch::Sender<Arc<Vec<BrokerInfo>>>,
    cancel: CancellationToken,
) {
    let url = cref.url.clone();
    let held = (**tx.borrow()).clone();
    umbra_link::follow_broker_list(&url, identity, held, BROKER_RETRY_CAP, cancel, |brokers| {
        tracing::info!(brokers = brokers.len(), "broker list changed");
        cref.brokers = brokers.clone();
        if let Err(e) = save_controller_ref(&dir, &cref) {
            tracing::warn!(error = %e, "cannot remember the broker list");
        }
        tx.send_replace(Arc::new(brokers));
        std::future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_proto::api::PublishedTarget;

    fn cfg(id: &str, version: u64) -> PublishedConfig {
        PublishedConfig {
            connector_id: id.into(),
            version,
            targets: vec![PublishedTarget {
                service: "web".into(),
                target: "127.0.0.1:80".into(),
            }],
        }
    }

    #[test]
    fn other_versions_for_me_are_accepted() {
        let held = cfg("c-1", 5);
        assert!(accept_update(&held, &cfg("c-1", 6), "c-1"));
        assert!(!accept_update(&held, &cfg("c-1", 5), "c-1"));
        // Older: the controller's store was restored, and this is what it publishes now.
        assert!(accept_update(&held, &cfg("c-1", 4), "c-1"));
        assert!(!accept_update(&held, &cfg("c-2", 9), "c-1"));
    }

    #[test]
    fn cache_round_trip() {
        let dir = std::env::temp_dir().join(format!(
            "umbra-connector-cache-{}",
            u64::from_le_bytes(umbra_pki::random_bytes::<8>())
        ));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load_cached(&dir, "c-1"), None);
        save_cached_or_forget(&dir, &cfg("c-1", 3)).unwrap();
        assert_eq!(load_cached(&dir, "c-1"), Some(cfg("c-1", 3)));
        // Another connector's cache is not served.
        assert_eq!(load_cached(&dir, "c-2"), None);
        fs::write(dir.join(PUBLISHED_FILE), b"{not json").unwrap();
        assert_eq!(load_cached(&dir, "c-1"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
