//! The admin bearer tokens: the first one, created at the very first start; rotation through
//! the API (`POST /v1/admin-token/rotate`); reset from the controller's host when the token is
//! lost or leaked ([`reset_admin_token`], `umbra controller --reset-admin-token`); and the
//! check every admin request passes.
//!
//! A token is shown once and stored only as its SHA-256. The check reads the stored hashes on
//! every admin request (admin requests are few), so a rotation or a reset takes effect at once,
//! in every controller that shares the store, with no cached copy left to honour an old token.
//! A request keeps the hash of the token it presented ([`Presented`]), and every admin write
//! checks it again inside the transaction that makes the change
//! (`Ctx::admin_write`): a request's body may arrive seconds after its headers were checked,
//! and a token rotated or reset meanwhile must not make the change.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sqlx::SqliteConnection;
use umbra_proto::api::{AdminTokenCreated, AuditRecord};

use crate::audit;
use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::state::new_id;
use crate::store::{self, Database, Store, peers};

/// Every admin token starts with this, so that it is recognisable in a secret scan.
const PREFIX: &str = "umbra-admin-";

/// A new random token (256 bits) and its hash.
fn generate() -> (String, [u8; 32]) {
    let token = format!(
        "{PREFIX}{}",
        URL_SAFE_NO_PAD.encode(umbra_pki::random_bytes::<32>())
    );
    let hash = umbra_pki::sha256(token.as_bytes());
    (token, hash)
}

/// An admin token as a request presented it: its hash only, so that the token itself is not
/// kept (or logged) for as long as the request lasts.
#[derive(Clone, Copy)]
pub(crate) struct Presented([u8; 32]);

impl Presented {
    pub(crate) fn new(token: &str) -> Self {
        Presented(umbra_pki::sha256(token.as_bytes()))
    }

    /// Whether this is a current admin token of `org`. Its hash is compared with every
    /// stored hash, each in constant time.
    pub(crate) async fn is_current(
        &self,
        c: &mut SqliteConnection,
        org: &str,
    ) -> Result<bool, sqlx::Error> {
        let stored = peers::admin_token_hashes(c, org).await?;
        Ok(stored.iter().fold(false, |ok, s| {
            let mut bytes = [0u8; 32];
            let decoded = hex::decode_to_slice(s, &mut bytes).is_ok();
            (decoded & umbra_pki::ct_eq(&self.0, &bytes)) | ok
        }))
    }
}

/// Whether `token` is a current admin token of `org` ([`Presented::is_current`]).
pub(crate) async fn check(
    c: &mut SqliteConnection,
    org: &str,
    token: &str,
) -> Result<bool, sqlx::Error> {
    Presented::new(token).is_current(c, org).await
}

/// Replaces every admin token of `org` with one new token, in the caller's transaction.
/// Returns the token (to show once) and the audit record of `action`, which names the new
/// token's id and how many were replaced, never a token.
pub(crate) async fn replace(
    c: &mut SqliteConnection,
    org: &str,
    now: SystemTime,
    actor: &str,
    action: &str,
) -> Result<(AdminTokenCreated, AuditRecord), sqlx::Error> {
    let replaced = peers::admin_tokens_delete(c, org).await?;
    let (token, hash) = generate();
    let id = new_id("a");
    let now_secs = store::to_i64(audit::unix_secs(now));
    peers::admin_token_insert(c, org, &id, &hex::encode(hash), now_secs).await?;
    let rec = audit::record(
        now,
        actor,
        action,
        &id,
        true,
        serde_json::json!({ "replaced": replaced }),
    );
    Ok((
        AdminTokenCreated {
            id,
            token,
            replaced,
        },
        rec,
    ))
}

/// At start: creates the first admin token if the organisation has none, and returns it
/// (`None`: tokens exist already).
pub(crate) async fn first(
    store: &Store,
    now: SystemTime,
) -> Result<Option<String>, ControllerError> {
    let org = store.org().to_owned();
    let mut w = store.write().await?;
    if !peers::admin_token_hashes(w.conn(), &org).await?.is_empty() {
        return Ok(None);
    }
    let (created, rec) =
        replace(w.conn(), &org, now, audit::CONTROLLER, "admin_token.create").await?;
    audit::commit(w, &org, std::slice::from_ref(&rec)).await?;
    Ok(Some(created.token))
}

/// Replaces every admin token of the controller whose data directory `cfg` names with a new
/// one, and returns it. For a lost or leaked token: whoever can run this can read the
/// controller's database anyway. Works whether or not that controller is running (a running
/// one checks the store on every admin request). Refuses a data directory that holds no
/// controller, rather than creating one.
pub async fn reset_admin_token(
    cfg: &ControllerConfig,
    now: SystemTime,
) -> Result<AdminTokenCreated, ControllerError> {
    cfg.validate()?;
    let db = cfg.database();
    if let Database::File(path) = &db
        && !path.is_file()
    {
        return Err(ControllerError::NotSetUp(path.clone()));
    }
    let store = Store::open(&db, &cfg.org).await?;
    let org = store.org().to_owned();
    let mut w = store.write().await?;
    let (created, rec) =
        replace(w.conn(), &org, now, audit::CONTROLLER, "admin_token.reset").await?;
    audit::commit(w, &org, std::slice::from_ref(&rec)).await?;
    store.close().await;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reset from the host runs in another process, past the in-process write lock. A write
    /// transaction takes SQLite's write lock when it begins, so a reset waits for a write that
    /// checked the token before it, and that write commits as checked; every write after the
    /// reset sees the new token. The twin: a write checked after the reset, with the new token,
    /// goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_elsewhere_waits_for_a_write_checked_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::File(dir.path().join("t.db"));
        let server = Store::open(&db, "t").await.unwrap();
        let host = Store::open(&db, "t").await.unwrap();
        let now = SystemTime::now();
        let old = Presented::new(&first(&server, now).await.unwrap().unwrap());

        let mut w = server.write().await.unwrap();
        assert!(old.is_current(w.conn(), "t").await.unwrap());
        let reset = tokio::spawn(async move {
            let mut r = host.write().await?;
            let (new, rec) =
                replace(r.conn(), "t", now, audit::CONTROLLER, "admin_token.reset").await?;
            audit::commit(r, "t", std::slice::from_ref(&rec)).await?;
            Ok::<_, sqlx::Error>(new.token)
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !reset.is_finished(),
            "the reset did not wait for the write that checked the old token"
        );
        store::bump(w.conn(), "t", store::SNAPSHOT_VERSION)
            .await
            .unwrap();
        w.commit().await.unwrap();
        let new = Presented::new(&reset.await.unwrap().unwrap());

        let mut w = server.write().await.unwrap();
        assert!(!old.is_current(w.conn(), "t").await.unwrap());
        assert!(new.is_current(w.conn(), "t").await.unwrap());
        store::bump(w.conn(), "t", store::SNAPSHOT_VERSION)
            .await
            .unwrap();
        w.commit().await.unwrap();
    }
}
