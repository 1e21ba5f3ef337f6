//! The agent's identity directory as read at start, and the broker list refresh.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use umbra_link::ControllerClient;
use umbra_link::enroll::{ControllerRef, load_controller_ref, save_controller_ref};
use umbra_pki::TlsIdentity;
use umbra_proto::Role;
use umbra_proto::api::BrokerList;

use crate::AgentError;
use crate::config::AgentConfig;

/// Loads the identity and `controller.json`; the identity must be an agent's. An expired
/// certificate loads too: [`load_usable`] renews it while the controller still allows.
pub(crate) fn load(dir: &Path) -> Result<(TlsIdentity, ControllerRef), AgentError> {
    let id = TlsIdentity::load_dir(dir).map_err(|e| match &e {
        umbra_pki::PkiError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            AgentError::NotEnrolled(e)
        }
        _ => AgentError::Identity(e),
    })?;
    if id.peer.id.role != Role::Agent {
        return Err(AgentError::WrongRole(id.peer.id.role));
    }
    let cref = load_controller_ref(dir).map_err(AgentError::ControllerRef)?;
    Ok((id, cref))
}

/// When [`load_usable`] renews the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RenewWhen {
    /// Once its renewal time has passed (`status`, `services`).
    Due,
    /// Only if it has expired (a forward, whose own renewal takes over from there).
    Expired,
}

/// [`load`], then [`renew_if_due`] (or only if expired, by `when`): a certificate that expired
/// while the device slept renews within the controller's grace. One still expired after that
/// is refused with the controller's reason (brokers refuse it).
pub(crate) async fn load_usable(
    cfg: &AgentConfig,
    now: SystemTime,
    when: RenewWhen,
) -> Result<(TlsIdentity, ControllerRef, Renewal), AgentError> {
    let (id, cref) = load(&cfg.identity_dir)?;
    let expired = id.peer.not_after <= now;
    if when == RenewWhen::Expired && !expired {
        let due = umbra_link::enroll::renew_due(&cfg.identity_dir, &id);
        return Ok((id, cref, Renewal::NotDue(due)));
    }
    let (id, renewal) = renew_if_due(cfg, id, now).await;
    if let Renewal::Failed { error, .. } = &renewal
        && id.peer.not_after <= now
    {
        return Err(AgentError::ExpiredUnrenewed {
            at: umbra_pki::rfc3339(id.peer.not_after),
            error: error.clone(),
        });
    }
    // A renewal may have brought a new broker list into controller.json.
    let cref = match renewal {
        Renewal::Renewed => load_controller_ref(&cfg.identity_dir).unwrap_or(cref),
        _ => cref,
    };
    Ok((id, cref, renewal))
}

/// Where the certificate's renewal stands after an agent command looked at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Not due before this time.
    NotDue(SystemTime),
    /// It was due and was renewed now.
    Renewed,
    /// Due since this time; renewing failed (the held certificate is kept).
    Failed { due: SystemTime, error: String },
}

/// Renews the certificate in `cfg.identity_dir` once, if its renewal time has passed: a
/// forward renews it while it runs, but an agent that only runs now and then, or a laptop that
/// slept through the renewal time, must not let it lapse (an expired certificate renews only
/// within the controller's grace; after that the device must enroll again). Bounded by twice
/// the connect timeout (plus the wait for another process renewing it); on failure the held identity is kept and the failure reported.
pub(crate) async fn renew_if_due(
    cfg: &AgentConfig,
    id: TlsIdentity,
    now: SystemTime,
) -> (TlsIdentity, Renewal) {
    let due = umbra_link::enroll::renew_due(&cfg.identity_dir, &id);
    if now < due {
        return (id, Renewal::NotDue(due));
    }
    // Bounded as a request to the controller is, plus the wait for another process of this
    // device renewing at the same time (whose certificate it then takes).
    let renewed = tokio::time::timeout(
        cfg.connect_timeout() * 2 + umbra_link::enroll::RENEW_LOCK_WAIT,
        umbra_link::enroll::renew(&cfg.identity_dir, &id),
    )
    .await;
    let error = match renewed {
        Ok(Ok(_)) => match TlsIdentity::load_dir(&cfg.identity_dir) {
            Ok(fresh) => return (fresh, Renewal::Renewed),
            Err(e) => e.to_string(),
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the controller did not answer in time".to_owned(),
    };
    // Another process sharing the directory (a forward, another command) may have renewed
    // it meanwhile.
    if let Some(on_disk) = umbra_link::enroll::renewed_elsewhere(&cfg.identity_dir, &id, now) {
        return (on_disk, Renewal::Renewed);
    }
    tracing::warn!(%error, due = %umbra_pki::rfc3339(due), "certificate renewal is due and failed");
    (id, Renewal::Failed { due, error })
}

/// Stores `brokers` as the list in `controller.json` (a failure is logged: the list in memory
/// is what counts, the file is for the next start).
pub(crate) fn remember_brokers(
    cfg: &AgentConfig,
    cref: &mut ControllerRef,
    brokers: Vec<umbra_proto::api::BrokerInfo>,
) {
    cref.brokers = brokers;
    if let Err(e) = save_controller_ref(&cfg.identity_dir, cref) {
        tracing::warn!(error = %e, "cannot remember the broker list");
    }
}

/// Asks the controller for the current broker list (bounded by twice the connect timeout) and
/// remembers a changed list in `controller.json`. When the controller cannot be reached the
/// last known list is kept: brokers work without the controller.
pub(crate) async fn refresh_brokers(
    cfg: &AgentConfig,
    id: &Arc<TlsIdentity>,
    mut cref: ControllerRef,
) -> ControllerRef {
    let fetch = async {
        let client = ControllerClient::new(&cref.url, &id.ca, Some(id))?;
        client.get::<BrokerList>("/v1/brokers").await
    };
    match tokio::time::timeout(cfg.connect_timeout() * 2, fetch).await {
        Ok(Ok(list)) if list.brokers != cref.brokers => {
            tracing::info!(brokers = list.brokers.len(), "broker list updated");
            remember_brokers(cfg, &mut cref, list.brokers);
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot refresh the broker list; using the last known one")
        }
        Err(_) => {
            tracing::debug!("controller did not answer in time; using the last known broker list")
        }
    }
    cref
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use umbra_pki::Ca;
    use umbra_proto::PeerId;

    use super::*;

    /// An agent identity directory whose certificate is valid for an hour from `now`.
    fn enrolled(dir: &Path, now: SystemTime, role: Role) -> TlsIdentity {
        let ca = Ca::generate("acme", now).unwrap();
        let pid = PeerId::new("acme", role, "d-1").unwrap();
        let p = umbra_pki::test_util::issue_pems(
            &ca,
            pid.clone(),
            vec![],
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
        umbra_pki::write_identity_dir(dir, &p.key_pem, &p.cert_pem, ca.cert_pem()).unwrap();
        save_controller_ref(
            dir,
            &ControllerRef {
                url: "https://127.0.0.1:1".into(),
                identity: pid.to_string(),
                user: Some("alice@acme.test".into()),
                brokers: vec![],
            },
        )
        .unwrap();
        TlsIdentity::load_dir(dir).unwrap()
    }

    /// An empty directory is a device not enrolled, and says to enroll; a damaged identity
    /// says what is wrong, not to enroll (the device is enrolled).
    #[test]
    fn a_missing_identity_is_told_from_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).err().unwrap();
        assert!(matches!(e, AgentError::NotEnrolled(_)), "{e}");
        assert!(e.to_string().contains("enroll this device first"), "{e}");
        std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a CA").unwrap();
        let e = load(dir.path()).err().unwrap();
        assert!(matches!(e, AgentError::Identity(_)), "{e}");
        assert!(!e.to_string().contains("enroll this device first"), "{e}");
    }

    #[test]
    fn a_valid_certificate_loads_and_so_does_an_expired_one() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let id = enrolled(dir.path(), now, Role::Agent);
        let (loaded, cref) = load(dir.path()).unwrap();
        assert_eq!(loaded.peer, id.peer);
        assert_eq!(cref.user.as_deref(), Some("alice@acme.test"));
    }

    /// An expired certificate the controller does not renew (here: it cannot be reached) is
    /// refused with the reason and the way out; a forward does not try to renew a valid one
    /// before it starts, while status and services renew a due one.
    #[tokio::test]
    async fn an_expired_certificate_that_does_not_renew_says_why_and_to_enroll_again() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let id = enrolled(dir.path(), now, Role::Agent);
        let cfg = AgentConfig {
            identity_dir: dir.path().to_path_buf(),
            connect_timeout_ms: 200,
            ..AgentConfig::default()
        };
        for when in [RenewWhen::Due, RenewWhen::Expired] {
            for later in [id.peer.not_after, now + Duration::from_secs(48 * 3600)] {
                match load_usable(&cfg, later, when).await {
                    Err(e @ AgentError::ExpiredUnrenewed { .. }) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&umbra_pki::rfc3339(id.peer.not_after)),
                            "{msg}"
                        );
                        assert!(msg.contains("umbra agent enroll"), "{msg}");
                    }
                    Err(e) => panic!("expected ExpiredUnrenewed, got {e}"),
                    Ok(_) => panic!("an expired identity was used"),
                }
            }
        }
        // Valid: a forward starts with it, renewal not even tried; status tried (it is due
        // at two thirds of the hour) and kept it.
        let (_, _, r) = load_usable(&cfg, now + Duration::from_secs(3000), RenewWhen::Expired)
            .await
            .unwrap();
        assert!(matches!(r, Renewal::NotDue(_)), "{r:?}");
        let (kept, _, r) = load_usable(&cfg, now + Duration::from_secs(3000), RenewWhen::Due)
            .await
            .unwrap();
        assert!(matches!(r, Renewal::Failed { .. }), "{r:?}");
        assert_eq!(kept.peer, id.peer);
    }

    #[test]
    fn a_connector_identity_is_not_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        enrolled(dir.path(), now, Role::Connector);
        assert!(matches!(
            load(dir.path()),
            Err(AgentError::WrongRole(Role::Connector))
        ));
    }
}
