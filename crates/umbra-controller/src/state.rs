//! What every request handler shares: the store, the CA, the clock, the snapshot version
//! channel, and the checks that run before a handler may act (admin bearer token, peer
//! certificate).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::{SqliteConnection, Transaction};
use tokio::sync::watch;
use umbra_link::quota::Quota;
use umbra_pki::{Ca, PeerCert};
use umbra_proto::Role;
use umbra_proto::api::AuditRecord;

use crate::admin_token::Presented;
use crate::audit;
use crate::distribution::Distribution;
use crate::error::ApiFailure;
use crate::failures::{FailureBudget, Verdict};
use crate::store::peers::{self, Kind, PeerRow};
use crate::store::{self, Db, SNAPSHOT_VERSION, Store, WriteTx};

/// Source of the current time. Injected so tests can move it (token expiry) without sleeping.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The client certificate of the connection a request came on, as verified by the TLS
/// handshake (`None`: no client certificate). Inserted into every request's extensions.
#[derive(Clone, Default)]
pub(crate) struct ConnPeer(pub(crate) Option<Arc<PeerCert>>);

/// The address the request's connection came from. Inserted into every request's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) org: String,
    pub(crate) ca: Ca,
    pub(crate) clock: Clock,
    pub(crate) cert_lifetime: Duration,
    /// How long after expiry a certificate may still renew (`renew_grace_secs`).
    pub(crate) renew_grace: Duration,
    pub(crate) token_ttl: Duration,
    pub(crate) dist: Distribution,
    /// Heartbeats in flight, per broker identity (`api::HeartbeatConn`).
    pub(crate) heartbeats: Arc<Quota>,
    /// How many refusals may still be audited one by one (`failures.rs`).
    pub(crate) failures: std::sync::Mutex<FailureBudget>,
    /// Becomes `true` when the controller shuts down; long polls end early.
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Ctx {
    pub(crate) fn now(&self) -> SystemTime {
        (self.clock)()
    }

    pub(crate) fn now_secs(&self) -> i64 {
        store::to_i64(audit::unix_secs(self.now()))
    }

    /// Whether `admin` is a current admin token (read from the store each time, see
    /// `admin_token.rs`).
    pub(crate) async fn admin_ok(&self, admin: &Presented) -> Result<bool, ApiFailure> {
        let mut r = self.store.read().await?;
        Ok(admin.is_current(&mut r, &self.org).await?)
    }

    /// Starts the write transaction of an admin change; every admin write gets its
    /// transaction here. The token the request presented was checked on its headers, but its
    /// body may arrive seconds later: it is checked again in this transaction, and a token
    /// rotated or reset since is answered 401 with nothing changed. The check holds until the
    /// commit: writers in this process wait for the store's write lock (a rotation is a
    /// write), and the transaction holds SQLite's write lock from its start, so a reset from
    /// the host waits for it.
    pub(crate) async fn admin_write(&self, admin: &Presented) -> Result<WriteTx, ApiFailure> {
        let mut w = self.store.write().await?;
        if !admin.is_current(w.conn(), &self.org).await? {
            return Err(token_replaced());
        }
        Ok(w)
    }

    /// [`Ctx::admin_write`] for an admin request that reads after its body arrived: a read
    /// transaction, in which the token has been checked again.
    pub(crate) async fn admin_read(
        &self,
        admin: &Presented,
    ) -> Result<Transaction<'static, Db>, ApiFailure> {
        let mut r = self.store.read().await?;
        if !admin.is_current(&mut r, &self.org).await? {
            return Err(token_replaced());
        }
        Ok(r)
    }

    /// Commits an admin change: stores its audit record, bumps the snapshot version, commits,
    /// then logs the event and wakes long-pollers. Returns the new version.
    pub(crate) async fn commit_change(
        &self,
        w: WriteTx,
        records: &[AuditRecord],
    ) -> Result<u64, ApiFailure> {
        let v = audit::commit_detached(w, &self.org, records, Some(SNAPSHOT_VERSION))
            .await?
            .unwrap_or_default();
        // A request dropped before this leaves the wake-up to `follow_store`.
        self.dist.publish(v);
        Ok(v)
    }

    /// Commits a change that does not alter the snapshot (renewal), with its audit record.
    pub(crate) async fn commit_quiet(
        &self,
        w: WriteTx,
        records: &[AuditRecord],
    ) -> Result<(), ApiFailure> {
        Ok(audit::commit(w, &self.org, records).await?)
    }

    /// Records a refused or failed operation in its own transaction (the operation's own
    /// transaction was rolled back). A failure to write is logged, not returned: the caller
    /// answers with the original error.
    pub(crate) async fn audit_failure(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        err: &ApiFailure,
    ) {
        self.store_failure(actor, action, target, failure_detail(err))
            .await;
    }

    /// [`Ctx::audit_failure`] for a request that nobody authenticated, or whose credential was
    /// refused: the record names the source address, and is written only within the source's
    /// budget (`failures.rs`); a refusal beyond it is counted in
    /// `umbra_audit_skipped_total{action}` and in the `skipped` of the source's next record.
    pub(crate) async fn audit_refusal(
        &self,
        source: Option<IpAddr>,
        actor: &str,
        action: &str,
        target: &str,
        err: &ApiFailure,
    ) {
        let verdict = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .on_refusal(source, std::time::Instant::now());
        let Verdict::Record { skipped } = verdict else {
            metrics::counter!("umbra_audit_skipped_total", "action" => action.to_owned())
                .increment(1);
            return;
        };
        let mut detail = failure_detail(err);
        detail["source"] = source.map_or(serde_json::Value::Null, |ip| {
            serde_json::Value::String(ip.to_canonical().to_string())
        });
        if skipped > 0 {
            detail["skipped"] = skipped.into();
        }
        self.store_failure(actor, action, target, detail).await;
    }

    async fn store_failure(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) {
        let rec = audit::record(self.now(), actor, action, target, false, detail);
        let res = async {
            let w = self.store.write().await?;
            audit::commit(w, &self.org, std::slice::from_ref(&rec)).await
        }
        .await;
        if let Err(e) = res {
            // Logged all the same: the refusal must leave a trace somewhere.
            tracing::error!(error = %e, "cannot store audit record");
            audit::emit(&rec);
        }
    }

    /// Audits `res` if it is an error, and passes it on.
    pub(crate) async fn audited<T>(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        res: Result<T, ApiFailure>,
    ) -> Result<T, ApiFailure> {
        if let Err(e) = &res {
            self.audit_failure(actor, action, target, e).await;
        }
        res
    }

    /// [`Ctx::audited`] whose failure record also holds `about` (the keys a success record of
    /// the action holds beside its target, such as the member a group change is about), so
    /// that success and failure share one target and one way to search them.
    pub(crate) async fn audited_about<T>(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        about: serde_json::Value,
        res: Result<T, ApiFailure>,
    ) -> Result<T, ApiFailure> {
        if let Err(e) = &res {
            let mut detail = failure_detail(e);
            if let (Some(d), serde_json::Value::Object(extra)) = (detail.as_object_mut(), about) {
                d.extend(extra);
            }
            self.store_failure(actor, action, target, detail).await;
        }
        res
    }

    /// The peer's certificate must be present, of this organisation, of one of `roles`, not
    /// revoked, and its holder enrolled and not revoked.
    pub(crate) async fn check_peer(
        &self,
        c: &mut SqliteConnection,
        conn: &ConnPeer,
        roles: &[Role],
    ) -> Result<(Arc<PeerCert>, PeerRow, Kind), ApiFailure> {
        let peer = self.check_cert(conn, roles)?;
        self.check_stored(c, peer).await
    }

    /// The second part of [`Ctx::check_peer`]: the certificate is one this controller issued
    /// and did not revoke, and its holder is known and not revoked.
    pub(crate) async fn check_stored(
        &self,
        c: &mut SqliteConnection,
        peer: Arc<PeerCert>,
    ) -> Result<(Arc<PeerCert>, PeerRow, Kind), ApiFailure> {
        let seen = match peers::cert_revoked(c, &self.org, &peer.serial_hex).await? {
            Some((false, seen)) => seen,
            Some((true, _)) => return Err(ApiFailure::forbidden("certificate revoked")),
            None => {
                return Err(ApiFailure::forbidden(
                    "certificate unknown to this controller",
                ));
            }
        };
        let kind = Kind::from_role(peer.id.role)
            .ok_or_else(|| ApiFailure::forbidden("this route is not for the controller"))?;
        let row = peers::peer_get(c, &self.org, kind, &peer.id.id)
            .await?
            .ok_or_else(|| ApiFailure::forbidden(format!("unknown {}", peer.id.role)))?;
        if row.revoked_at.is_some() {
            return Err(ApiFailure::forbidden(format!("{} revoked", peer.id.role)));
        }
        if !seen {
            self.mark_seen(&peer.serial_hex);
        }
        Ok((peer, row, kind))
    }

    /// Records, in a write of its own (once per certificate, off the request's path), that
    /// `serial` has authenticated a request: from then on the certificate it was renewed
    /// from no longer renews after expiry (see `enroll::renew`).
    fn mark_seen(&self, serial: &str) {
        let store = self.store.clone();
        let org = self.org.clone();
        let serial = serial.to_owned();
        let now = self.now_secs();
        tokio::spawn(async move {
            let r = async {
                let mut w = store.write().await?;
                peers::cert_mark_seen(w.conn(), &org, &serial, now).await?;
                w.commit().await
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, %serial, "cannot record a certificate's first use");
            }
        });
    }

    /// The first part of [`Ctx::check_peer`], without the store: the connection's certificate
    /// (which the TLS handshake verified against this CA) is present, of this organisation
    /// and of one of `roles`.
    pub(crate) fn check_cert(
        &self,
        conn: &ConnPeer,
        roles: &[Role],
    ) -> Result<Arc<PeerCert>, ApiFailure> {
        self.check_cert_within(conn, roles, Duration::ZERO)
    }

    /// [`Ctx::check_cert`], letting through a certificate expired at most `grace` ago (the
    /// renewal route, with `renew_grace`).
    pub(crate) fn check_cert_within(
        &self,
        conn: &ConnPeer,
        roles: &[Role],
        grace: Duration,
    ) -> Result<Arc<PeerCert>, ApiFailure> {
        let Some(peer) = conn.0.clone() else {
            return Err(ApiFailure::unauthorized(
                "a client certificate issued by this controller is required",
            ));
        };
        if peer.id.org != self.org {
            return Err(ApiFailure::forbidden(
                "certificate belongs to another organisation",
            ));
        }
        // TLS checked validity at the handshake only; a connection may outlive its
        // certificate (HTTP/2 keeps it open), and an expired one must not renew or poll on.
        if self.now() > peer.not_after + grace {
            // The expiry is named, judged by this controller's clock: a peer whose own clock
            // says otherwise can tell that one of the two is wrong. (Not the time now: peers
            // log a refusal again when its text changes, and this one must not change.)
            let at = umbra_pki::rfc3339(peer.not_after);
            return Err(ApiFailure::unauthorized(if grace.is_zero() {
                format!(
                    "certificate expired at {at} by the controller's clock: renew it, or \
                     enroll again (if it has not expired by this host's clock, one of the two \
                     clocks is wrong)"
                )
            } else {
                format!(
                    "certificate expired at {at} by the controller's clock, longer ago than \
                     renewal allows: enroll again (if it has not expired by this host's clock, \
                     one of the two clocks is wrong)"
                )
            }));
        }
        if !roles.contains(&peer.id.role) {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(ApiFailure::forbidden(format!(
                "this route is for {} certificates",
                names.join(" or ")
            )));
        }
        Ok(peer)
    }

    /// [`Ctx::check_peer`] on a fresh read.
    pub(crate) async fn authorize_peer(
        &self,
        conn: &ConnPeer,
        roles: &[Role],
    ) -> Result<(Arc<PeerCert>, PeerRow, Kind), ApiFailure> {
        let mut r = self.store.read().await?;
        self.check_peer(&mut r, conn, roles).await
    }
}

/// 401 for a request whose admin token was current when its headers arrived, and was rotated
/// or reset before it could act.
fn token_replaced() -> ApiFailure {
    ApiFailure::unauthorized(
        "admin token replaced (rotated or reset) while the request was under way",
    )
}

/// A fresh random id for a peer or token: `<prefix>-<16 hex digits>`.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(umbra_pki::random_bytes::<8>()))
}

/// What a failure record says about the failure.
fn failure_detail(err: &ApiFailure) -> serde_json::Value {
    serde_json::json!({
        "status": err.status.as_u16(),
        // An error may quote the request (a name from its path): bounded like the target.
        "error": umbra_proto::bounded(&err.error, 2048),
        "field": err.field,
    })
}
