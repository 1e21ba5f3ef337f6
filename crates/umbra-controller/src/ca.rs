//! CA custody: the organisation CA is created once, stored sealed, and unsealed at each start.
//!
//! The private key is stored only sealed (AES-256-GCM) under a key-encryption key (KEK) kept
//! outside the database: the `ca_key` config field, else the `UMBRA_CA_KEY` environment
//! variable, else `<data_dir>/ca.kek`. If none exists when the CA is first created, a KEK is
//! generated into `<data_dir>/ca.kek` (mode 0600) with a warning: that is convenient, but a
//! copy of the data directory then holds both the sealed key and its KEK.
//!
//! This module also issues the controller's own HTTPS server certificate.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use umbra_pki::{Ca, KeyEncryptionKey, PkiError, SealedCa, ServerCertSlot, TlsIdentity};
use umbra_proto::{PeerId, Role};

use crate::audit;
use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::state::Clock;
use crate::store::{Store, peers};

/// File name of a generated KEK inside the data directory.
pub(crate) const KEK_FILE: &str = "ca.kek";
/// Environment variable consulted when `ca_key` is not configured.
pub(crate) const KEK_ENV: &str = "UMBRA_CA_KEY";

/// Where the KEK came from (named in errors; never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KekSource {
    Config,
    Env,
    File(PathBuf),
}

impl KekSource {
    fn describe(&self) -> String {
        match self {
            KekSource::Config => "the ca_key setting".into(),
            KekSource::Env => format!("the {KEK_ENV} environment variable"),
            KekSource::File(p) => format!("the key file {}", p.display()),
        }
    }
}

/// Finds the KEK. `env_key` is the value of [`KEK_ENV`], read by the caller. If no key is
/// given anywhere and `ca_exists` is false, generates one into `<data_dir>/ca.kek`.
pub(crate) fn resolve_kek(
    cfg: &ControllerConfig,
    env_key: Option<&str>,
    ca_exists: bool,
) -> Result<(KeyEncryptionKey, KekSource), ControllerError> {
    if let Some(k) = &cfg.ca_key {
        let kek = KeyEncryptionKey::parse(k).map_err(|_| {
            ControllerError::CaKey("ca_key is not 32 bytes of hex or base64".into())
        })?;
        return Ok((kek, KekSource::Config));
    }
    // Set but empty is an error, not "unset": a secret injection that came out empty must not
    // make the controller seal a new CA under a key it writes beside the database.
    if let Some(k) = env_key {
        let kek = KeyEncryptionKey::parse(k).map_err(|_| {
            ControllerError::CaKey(format!(
                "{KEK_ENV} is not 32 bytes of hex or base64{}",
                if k.trim().is_empty() {
                    " (it is set, and empty)"
                } else {
                    ""
                }
            ))
        })?;
        return Ok((kek, KekSource::Env));
    }
    let path = cfg.data_dir.join(KEK_FILE);
    // Like a private key: refused if another user owns it or may read it.
    match umbra_pki::check_private_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ControllerError::Io {
                op: "use",
                path,
                source: e,
            });
        }
        _ => {}
    }
    match fs::read_to_string(&path) {
        Ok(text) => {
            let kek = KeyEncryptionKey::parse(&text).map_err(|_| {
                ControllerError::CaKey(format!(
                    "{} is not 32 bytes of hex or base64",
                    path.display()
                ))
            })?;
            return Ok((kek, KekSource::File(path)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ControllerError::Io {
                op: "read",
                path,
                source,
            });
        }
    }
    if ca_exists {
        return Err(ControllerError::CaKey(format!(
            "the CA in the database is sealed and no key was given: set ca_key or {KEK_ENV}, \
             or restore {}",
            path.display()
        )));
    }
    let kek = KeyEncryptionKey::generate();
    write_new_secret_file(&path, &kek.to_base64())?;
    tracing::warn!(
        path = %path.display(),
        "generated the CA key-encryption key into the data directory; anyone with a copy of \
         this directory can unseal the CA. Set ca_key or {KEK_ENV} from a secret store instead",
    );
    Ok((kek, KekSource::File(path)))
}

/// Creates `path` with mode 0600, failing if it exists; a crash leaves no file or the whole
/// one (an empty key file would fail every later start).
fn write_new_secret_file(path: &Path, contents: &str) -> Result<(), ControllerError> {
    umbra_pki::create_private_file(path, format!("{contents}\n").as_bytes()).map_err(|source| {
        ControllerError::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Loads the organisation CA from the store, or creates and stores it on first start.
pub(crate) async fn load_or_create(
    store: &Store,
    cfg: &ControllerConfig,
    env_key: Option<&str>,
    now: SystemTime,
) -> Result<Ca, ControllerError> {
    let org = store.org().to_owned();
    let mut w = store.write().await?;
    let existing = peers::ca_load(w.conn(), &org).await?;
    let (kek, source) = resolve_kek(cfg, env_key, existing.is_some())?;
    if let Some((cert_pem, sealed_key)) = existing {
        drop(w);
        let sealed = SealedCa {
            cert_pem,
            sealed_key,
        };
        return match Ca::unseal(&sealed, &kek) {
            Ok(ca) => {
                tracing::info!(org = %org, ca_sha256 = %hex::encode(ca.sha256()), "CA unsealed");
                Ok(ca)
            }
            Err(PkiError::Unseal) => Err(ControllerError::CaUnseal {
                source_name: source.describe(),
            }),
            Err(e) => Err(e.into()),
        };
    }
    let ca = Ca::generate(&org, now)?;
    let sealed = ca.seal(&kek)?;
    let now_secs = crate::store::to_i64(audit::unix_secs(now));
    peers::ca_insert(
        w.conn(),
        &org,
        &sealed.cert_pem,
        &sealed.sealed_key,
        now_secs,
    )
    .await?;
    let rec = audit::record(
        now,
        audit::CONTROLLER,
        "ca.create",
        &org,
        true,
        serde_json::json!({ "ca_sha256": hex::encode(ca.sha256()) }),
    );
    audit::commit(w, &org, std::slice::from_ref(&rec)).await?;
    tracing::info!(org = %org, ca_sha256 = %hex::encode(ca.sha256()), "CA created");
    Ok(ca)
}

/// The controller's identity in its server certificate.
pub(crate) fn controller_identity(org: &str) -> Result<PeerId, ControllerError> {
    PeerId::new(org, Role::Controller, "controller")
        .map_err(|e| ControllerError::CaKey(format!("controller identity: {e}")))
}

/// Issues a fresh server certificate for `names` (recorded in the store like every other).
pub(crate) async fn server_identity(
    ca: &Ca,
    store: &Store,
    names: &[String],
    now: SystemTime,
) -> Result<TlsIdentity, ControllerError> {
    let org = store.org().to_owned();
    let identity = controller_identity(&org)?;
    let (issued, key_pem) = ca.issue_server(
        &identity,
        names,
        umbra_pki::MAX_LIFETIME,
        now,
        umbra_pki::random_bytes(),
    )?;
    let mut w = store.write().await?;
    peers::cert_insert(
        w.conn(),
        &org,
        &peers::NewCert {
            serial: &issued.serial_hex,
            role: Role::Controller,
            subject: "controller",
            issued_at: crate::store::to_i64(audit::unix_secs(now)),
            not_after: crate::store::to_i64(audit::unix_secs(issued.not_after)),
            renewed_from: None,
        },
    )
    .await?;
    let now_secs = crate::store::to_i64(audit::unix_secs(now));
    peers::certs_forget_expired(
        w.conn(),
        &org,
        Role::Controller,
        "controller",
        &issued.serial_hex,
        now_secs,
        now_secs,
    )
    .await?;
    // Every certificate the CA signs is in the trail, the controller's own included.
    let rec = audit::record(
        now,
        audit::CONTROLLER,
        "cert.issue",
        &identity.to_uri(),
        true,
        serde_json::json!({
            "serial": issued.serial_hex,
            "names": names,
            "not_after": umbra_pki::rfc3339(issued.not_after),
            "reason": "controller server certificate",
        }),
    );
    audit::commit(w, &org, std::slice::from_ref(&rec)).await?;
    Ok(TlsIdentity::from_pem(
        &issued.cert_pem,
        &key_pem,
        ca.cert_pem(),
    )?)
}

/// How long past the renewal grace an expired client certificate still passes the
/// controller's handshake, to be refused by the renewal route with its reason.
pub(crate) const REFUSAL_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

/// The TLS server configuration: TLS 1.3, HTTP/2 or HTTP/1.1, client certificates optional
/// but verified against the CA, by the controller's `clock`, when sent; one expired at most
/// `expired_grace` ago passes too, for `POST /v1/renew` alone (every route checks expiry
/// again, `Ctx::check_cert`). The certificate can be replaced through the slot.
pub(crate) fn server_tls(
    id: &TlsIdentity,
    expired_grace: std::time::Duration,
    clock: Clock,
) -> Result<(Arc<rustls::ServerConfig>, ServerCertSlot), ControllerError> {
    let (cfg, slot) = umbra_pki::server_config_renewing(
        id,
        &[b"h2", b"http/1.1"],
        expired_grace,
        Arc::new(ClockTime(clock)),
    )?;
    Ok((Arc::new(cfg), slot))
}

/// The controller's clock as the TLS library's: handshakes judge certificates by the same
/// time as the routes behind them.
struct ClockTime(Clock);

impl std::fmt::Debug for ClockTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClockTime")
    }
}

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let since = (self.0)().duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> ControllerConfig {
        ControllerConfig {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        }
    }

    #[test]
    fn kek_precedence_and_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        // Nothing given, CA exists: refuse rather than invent a key that cannot open it.
        assert!(matches!(
            resolve_kek(&c, None, true),
            Err(ControllerError::CaKey(_))
        ));
        // Nothing given, first start: generate a 0600 file.
        let (k1, src) = resolve_kek(&c, None, false).unwrap();
        assert!(matches!(src, KekSource::File(_)));
        let path = dir.path().join(KEK_FILE);
        let mode = fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        // Later starts read the same file.
        let (k2, _) = resolve_kek(&c, None, true).unwrap();
        assert_eq!(k1.to_base64(), k2.to_base64());
        // Not once other users may read it (a copy made with the wrong mode): refused, named.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_kek(&c, None, true).unwrap_err().to_string();
        assert!(err.contains("ca.kek") && err.contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(resolve_kek(&c, None, true).is_ok());
        // The environment beats the file, the config beats both.
        let hex_key = "11".repeat(32);
        let (_, src) = resolve_kek(&c, Some(&hex_key), true).unwrap();
        assert_eq!(src, KekSource::Env);
        c.ca_key = Some("22".repeat(32));
        let (_, src) = resolve_kek(&c, Some(&hex_key), true).unwrap();
        assert_eq!(src, KekSource::Config);
        // A malformed key is an error that does not echo the key.
        let err = resolve_kek(&c, Some("zz"), true);
        assert!(err.is_ok());
        c.ca_key = None;
        let err = resolve_kek(&c, Some("not-a-key"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains(KEK_ENV) && !err.contains("not-a-key"), "{err}");
    }

    /// `UMBRA_CA_KEY` set and empty (a secret injection that came out empty) fails, naming it,
    /// at the first start too: no key is generated into the data directory for it.
    #[test]
    fn an_empty_key_in_the_environment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        for empty in ["", "  \n"] {
            let err = resolve_kek(&c, Some(empty), false).unwrap_err().to_string();
            assert!(err.contains(KEK_ENV) && err.contains("empty"), "{err}");
        }
        assert!(!dir.path().join(KEK_FILE).exists());
        // The twin: unset, the first start generates one.
        assert!(matches!(
            resolve_kek(&c, None, false),
            Ok((_, KekSource::File(_)))
        ));
    }
}
