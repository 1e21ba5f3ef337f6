//! Enrollment and renewal: how a device, connector or broker gets its certificate.
//!
//! An administrator creates a one-time token for a role (agent tokens name the user the device
//! will belong to; connector and broker tokens name the peer). The token is a random 32-byte
//! secret shown once, as `umb1.<CA hash>.<secret>`; only its SHA-256 is stored. Redemption
//! (`POST /v1/enroll`) runs in one transaction: a conditional `UPDATE` claims the token (so of
//! concurrent redeemers exactly one wins), then the peer row, the certificate (issued by the CA
//! from the peer's CSR, with an identity the controller chooses) and the audit row are written.
//! Any failure rolls everything back, including the claim.
//!
//! Renewal (`POST /v1/renew`) needs a valid client certificate whose serial and holder are not
//! revoked, and issues a new certificate for the same identity.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use umbra_pki::{IssueRequest, Issued, PeerCert, PkiError};
use umbra_proto::api::{
    CreateEnrollToken, CredentialState, EnrollRequest, EnrollToken, EnrollTokenCreated, IssuedCert,
    RenewRequest,
};
use umbra_proto::{PeerId, Role};

use crate::admin_token::Presented;
use crate::audit;
use crate::config::MAX_TOKEN_TTL;
use crate::error::ApiFailure;
use crate::state::{ConnPeer, Ctx, new_id};
use crate::store::peers::{self, Kind, TokenRow};
use crate::store::{admin, to_i64};
use crate::validate;

/// A new token secret: 32 random bytes, base64url (43 characters).
fn new_secret() -> String {
    URL_SAFE_NO_PAD.encode(umbra_pki::random_bytes::<32>())
}

/// How a token secret is stored.
pub(crate) fn secret_hash(secret: &str) -> String {
    hex::encode(umbra_pki::sha256(secret.as_bytes()))
}

fn parse_role(s: &str) -> Result<Kind, ApiFailure> {
    match s {
        "agent" => Ok(Kind::Device),
        "connector" => Ok(Kind::Connector),
        "broker" => Ok(Kind::Broker),
        _ => Err(ApiFailure::invalid(
            "role",
            "role must be agent, connector or broker",
        )),
    }
}

/// `POST /v1/enrollment-tokens`, for the administrator whose token is `admin` (checked
/// again in the transaction that stores the token, see [`Ctx::admin_write`]).
pub(crate) async fn create_token(
    ctx: &Ctx,
    admin: &Presented,
    req: CreateEnrollToken,
) -> Result<EnrollTokenCreated, ApiFailure> {
    let kind = parse_role(&req.role)?;
    let ttl = match req.ttl_secs {
        None => ctx.token_ttl,
        Some(s) if s > 0 && s <= MAX_TOKEN_TTL.as_secs() => Duration::from_secs(s),
        Some(_) => {
            return Err(ApiFailure::invalid(
                "ttl_secs",
                format!("ttl_secs must be between 1 and {}", MAX_TOKEN_TTL.as_secs()),
            ));
        }
    };
    let (user, name) = match kind {
        Kind::Device => {
            if req.name.is_some() {
                return Err(ApiFailure::invalid(
                    "name",
                    "agent tokens take a user, not a name",
                ));
            }
            let user = req
                .user
                .as_deref()
                .ok_or_else(|| ApiFailure::invalid("user", "agent tokens need a user"))?;
            (Some(validate::user_id(user, "user")?), None)
        }
        Kind::Connector | Kind::Broker => {
            if req.user.is_some() {
                return Err(ApiFailure::invalid(
                    "user",
                    "connector and broker tokens take a name, not a user",
                ));
            }
            let name = req.name.as_deref().ok_or_else(|| {
                ApiFailure::invalid("name", "connector and broker tokens need a name")
            })?;
            (None, Some(validate::peer_name(name, "name")?))
        }
    };
    let now = ctx.now();
    let now_secs = ctx.now_secs();
    let expires_at = now_secs.saturating_add(to_i64(ttl.as_secs()));
    let secret = new_secret();
    let row = TokenRow {
        id: new_id("t"),
        hash: secret_hash(&secret),
        role: kind.role().as_str().to_owned(),
        user_id: user.clone(),
        name: name.clone(),
        created_at: now_secs,
        expires_at,
        used_at: None,
        used_by: None,
    };
    let mut w = ctx.admin_write(admin).await?;
    if let Some(u) = &user
        && admin::user_disabled(w.conn(), &ctx.org, u).await?.is_none()
    {
        return Err(ApiFailure::not_found("user", format!("no user {u}")));
    }
    peers::token_insert(w.conn(), &ctx.org, &row).await?;
    let rec = audit::record(
        now,
        audit::ADMIN,
        "enroll_token.create",
        &row.id,
        true,
        json!({ "role": row.role, "user": user, "name": name, "expires_at": expires_at }),
    );
    // Tokens are in no snapshot, config or broker list: nothing for brokers to fetch.
    ctx.commit_quiet(w, &[rec]).await?;
    let token = EnrollToken {
        ca_sha256: ctx.ca.sha256(),
        secret,
    };
    Ok(EnrollTokenCreated {
        id: row.id,
        token: token.to_string(),
        role: row.role,
        expires_at: crate::store::to_u64(expires_at),
        user,
        name,
    })
}

/// Why a redemption was refused, for the answer and the audit trail.
fn token_refusal(row: Option<&TokenRow>, presented_hash: &str) -> ApiFailure {
    match row {
        Some(t) if umbra_pki::ct_eq(t.hash.as_bytes(), presented_hash.as_bytes()) => {
            if t.used_at.is_some() {
                ApiFailure::forbidden("enrollment token already used")
            } else {
                ApiFailure::forbidden("enrollment token expired")
            }
        }
        _ => ApiFailure::unauthorized("unknown enrollment token"),
    }
}

/// The secret part of what the device sent: the printed token or only its secret.
fn presented_secret(ctx: &Ctx, token: &str) -> Result<String, ApiFailure> {
    let token = token.trim();
    if token.starts_with("umb1.") {
        let t = EnrollToken::parse(token)
            .map_err(|_| ApiFailure::invalid("token", "malformed enrollment token"))?;
        if t.ca_sha256 != ctx.ca.sha256() {
            return Err(ApiFailure::invalid(
                "token",
                "enrollment token was issued for another CA",
            ));
        }
        return Ok(t.secret);
    }
    if token.is_empty() || token.len() > 256 {
        return Err(ApiFailure::invalid("token", "malformed enrollment token"));
    }
    Ok(token.to_owned())
}

/// `POST /v1/enroll`.
pub(crate) async fn redeem(
    ctx: &Ctx,
    source: Option<IpAddr>,
    req: EnrollRequest,
) -> Result<IssuedCert, ApiFailure> {
    let mut role_label = "unknown";
    let mut target = String::from("-");
    let res = redeem_inner(ctx, &req, &mut role_label, &mut target).await;
    let result = if res.is_ok() { "ok" } else { "refused" };
    metrics::counter!("umbra_enrollments_total", "role" => role_label, "result" => result)
        .increment(1);
    if let Err(e) = &res {
        ctx.audit_refusal(source, audit::ANONYMOUS, "enroll", &target, e)
            .await;
    }
    res
}

async fn redeem_inner(
    ctx: &Ctx,
    req: &EnrollRequest,
    role_label: &mut &'static str,
    target: &mut String,
) -> Result<IssuedCert, ApiFailure> {
    let secret = presented_secret(ctx, &req.token)?;
    let hash = secret_hash(&secret);
    let now = ctx.now();
    let now_secs = ctx.now_secs();
    let org = ctx.org.as_str();

    // Anyone may present a token: one that does not exist is refused from a read, without
    // queueing on the one write lock that revocations and admin changes take. A known one is
    // redeemed in the write transaction, the one step that decides who wins.
    {
        let mut r = ctx.store.read().await?;
        if peers::token_by_hash(&mut r, org, &hash).await?.is_none() {
            return Err(token_refusal(None, &hash));
        }
    }
    let mut w = ctx.store.write().await?;
    if !peers::token_redeem(w.conn(), org, &hash, now_secs).await? {
        let row = peers::token_by_hash(w.conn(), org, &hash).await?;
        if let Some(t) = &row {
            *target = t.id.clone();
            // A token reused or expired is still of a role: counted under it.
            *role_label = match t.role.as_str() {
                "agent" => "agent",
                "connector" => "connector",
                "broker" => "broker",
                _ => "unknown",
            };
        }
        return Err(token_refusal(row.as_ref(), &hash));
    }
    let token = peers::token_by_hash(w.conn(), org, &hash)
        .await?
        .filter(|t| umbra_pki::ct_eq(t.hash.as_bytes(), hash.as_bytes()))
        .ok_or_else(ApiFailure::internal)?;
    *target = token.id.clone();
    let kind = match token.role.as_str() {
        "agent" => Kind::Device,
        "connector" => Kind::Connector,
        "broker" => Kind::Broker,
        _ => return Err(ApiFailure::internal()),
    };
    *role_label = kind.role().as_str();
    // `umbra broker enroll` run with an agent's token would otherwise spend it and leave a
    // user's device key on a server: refused, and the claim rolled back with the transaction.
    if let Some(asked) = req.role.as_deref()
        && asked != kind.role().as_str()
    {
        let r = kind.role().as_str();
        let a = |role: &str| if role == "agent" { "an" } else { "a" };
        return Err(ApiFailure::invalid(
            "role",
            match asked {
                "agent" | "connector" | "broker" => format!(
                    "this token enrolls {} {r}, not {} {asked}: use `umbra {r} enroll`",
                    a(r),
                    a(asked)
                ),
                _ => "role must be agent, connector or broker".to_owned(),
            },
        ));
    }

    let id = new_id(kind.id_prefix());
    let identity = PeerId::new(org, kind.role(), &id).map_err(|_| ApiFailure::internal())?;
    let mut user = None;
    let mut detail = json!({ "role": kind.role().as_str(), "id": id, "token_id": token.id });
    match kind {
        Kind::Device => {
            let u = token.user_id.clone().ok_or_else(ApiFailure::internal)?;
            match admin::user_disabled(w.conn(), org, &u).await? {
                None => return Err(ApiFailure::forbidden("the token's user no longer exists")),
                Some(true) => return Err(ApiFailure::forbidden("the token's user is disabled")),
                Some(false) => {}
            }
            peers::device_insert(w.conn(), org, &id, &u, now_secs).await?;
            detail["user"] = json!(u);
            user = Some(u);
        }
        Kind::Connector => {
            let name = token.name.clone().ok_or_else(ApiFailure::internal)?;
            peers::connector_insert(w.conn(), org, &id, &name, now_secs).await?;
            detail["name"] = json!(name);
        }
        Kind::Broker => {
            let name = token.name.clone().ok_or_else(ApiFailure::internal)?;
            let server_name = umbra_pki::broker_server_name(&id);
            peers::broker_insert(w.conn(), org, &id, &name, &server_name, now_secs).await?;
            detail["name"] = json!(name);
        }
    }
    let issued = issue(ctx, &req.csr_pem, &identity, now)?;
    record_cert(ctx, &mut w, org, &issued, &identity, now_secs, None).await?;
    peers::token_set_used_by(w.conn(), org, &token.id, &identity.to_uri()).await?;
    let brokers = peers::broker_infos(w.conn(), org).await?;
    detail["serial"] = json!(issued.serial_hex);
    let rec = audit::record(
        now,
        audit::ANONYMOUS,
        "enroll",
        &identity.to_uri(),
        true,
        detail,
    );
    // A new device, connector or broker changes what brokers know: bump the snapshot.
    ctx.commit_change(w, &[rec]).await?;
    tracing::info!(identity = %identity, "enrolled");
    Ok(issued_cert(ctx, &identity, issued, user, brokers))
}

/// Signs `csr_pem` for `identity` (brokers also get their server name).
fn issue(
    ctx: &Ctx,
    csr_pem: &str,
    identity: &PeerId,
    now: SystemTime,
) -> Result<Issued, ApiFailure> {
    let dns_names = match identity.role {
        Role::Broker => vec![umbra_pki::broker_server_name(&identity.id)],
        _ => Vec::new(),
    };
    let req = IssueRequest {
        csr_pem,
        identity: identity.clone(),
        dns_names,
        lifetime: ctx.cert_lifetime,
    };
    ctx.ca
        .issue(&req, now, umbra_pki::random_bytes())
        .map_err(|e| match e {
            PkiError::Csr(reason) => {
                ApiFailure::invalid("csr_pem", format!("certificate request refused: {reason}"))
            }
            PkiError::Cert(_) | PkiError::Name(_) | PkiError::Key(_) | PkiError::Identity(_) => {
                ApiFailure::invalid("csr_pem", format!("certificate request refused: {e}"))
            }
            other => {
                tracing::error!(error = %other, "certificate issuance failed");
                ApiFailure::internal()
            }
        })
}

async fn record_cert(
    ctx: &Ctx,
    w: &mut crate::store::WriteTx,
    org: &str,
    issued: &Issued,
    identity: &PeerId,
    now_secs: i64,
    renewed_from: Option<&str>,
) -> Result<(), ApiFailure> {
    peers::cert_insert(
        w.conn(),
        org,
        &peers::NewCert {
            serial: &issued.serial_hex,
            role: identity.role,
            subject: &identity.id,
            issued_at: now_secs,
            not_after: to_i64(audit::unix_secs(issued.not_after)),
            renewed_from,
        },
    )
    .await?;
    // Kept through the renewal grace after expiry: an expired certificate may still renew.
    let grace = to_i64(ctx.renew_grace.as_secs());
    peers::certs_forget_expired(
        w.conn(),
        org,
        identity.role,
        &identity.id,
        &issued.serial_hex,
        now_secs.saturating_sub(grace),
        now_secs - RENEWAL_WINDOW,
    )
    .await?;
    Ok(())
}

fn issued_cert(
    ctx: &Ctx,
    identity: &PeerId,
    issued: Issued,
    user: Option<String>,
    brokers: Vec<umbra_proto::snapshot::BrokerInfo>,
) -> IssuedCert {
    IssuedCert {
        identity: identity.to_uri(),
        cert_pem: issued.cert_pem,
        ca_pem: ctx.ca.cert_pem().to_owned(),
        serial: issued.serial_hex,
        not_after: audit::unix_secs(issued.not_after),
        user,
        brokers,
    }
}

/// `POST /v1/renew`.
pub(crate) async fn renew(
    ctx: &Ctx,
    conn: &ConnPeer,
    source: Option<IpAddr>,
    req: RenewRequest,
) -> Result<IssuedCert, ApiFailure> {
    let actor = conn
        .0
        .as_ref()
        .map(|p| p.id.to_uri())
        .unwrap_or_else(|| audit::ANONYMOUS.to_owned());
    let res = renew_inner(ctx, conn, &req).await;
    let role = conn
        .0
        .as_ref()
        .map(|p| p.id.role.as_str())
        .unwrap_or("unknown");
    metrics::counter!(
        "umbra_renewals_total",
        "role" => role,
        "result" => if res.is_ok() { "ok" } else { "refused" }
    )
    .increment(1);
    if let Err(e) = &res {
        ctx.audit_refusal(source, &actor, "renew", &actor, e).await;
    }
    res
}

/// Most certificates one identity may be issued within [`RENEWAL_WINDOW`] when they live
/// `lifetime`: a renewal beyond it is refused (429) until the oldest of them leaves the window.
/// An identity renews once per two thirds of a lifetime (5400 / lifetime seconds an hour);
/// twice that, plus 8 for a few processes sharing one identity directory or answers lost on
/// the way. A fixed 8 would refuse the renewals a lifetime under 11 minutes needs, and its
/// certificates would expire. The whole allowance may be spent in a burst, so an identity
/// holds at most this many valid certificates (the serials a revocation puts in every
/// snapshot) per hour of lifetime, rounded up: 192 for a day, 26 for 10 minutes. Pure.
fn max_issued_in_window(lifetime: std::time::Duration) -> i64 {
    let secs = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX).max(1);
    8 + 2 * 5400 / secs
}
const RENEWAL_WINDOW: i64 = 3600;

/// Where a holder's latest certificate stands, as [`renew`] would judge it at `now`: the
/// state, and the last second at which a renewal would be granted (`None` once revoked).
/// `not_after` is `None` when no certificate is on record. A disabled user's device renews
/// nothing while the user stays disabled, but would within the same bounds once enabled:
/// it says so rather than "lapsed". What `renew` checks beyond this (a successor already in
/// use) never applies to the latest certificate.
pub(crate) fn credential_state(
    now: u64,
    not_after: Option<u64>,
    grace_secs: u64,
    revoked: bool,
    user_disabled: bool,
) -> (CredentialState, Option<u64>) {
    let Some(not_after) = not_after else {
        return (CredentialState::Unknown, None);
    };
    if revoked {
        return (CredentialState::Revoked, None);
    }
    let until = not_after.saturating_add(grace_secs);
    let state = if now > until {
        CredentialState::Lapsed
    } else if user_disabled {
        CredentialState::UserDisabled
    } else if now <= not_after {
        CredentialState::Valid
    } else {
        CredentialState::Renewable
    };
    (state, Some(until))
}

async fn renew_inner(
    ctx: &Ctx,
    conn: &ConnPeer,
    req: &RenewRequest,
) -> Result<IssuedCert, ApiFailure> {
    let now = ctx.now();
    let now_secs = ctx.now_secs();
    let org = ctx.org.as_str();
    let roles = [Role::Agent, Role::Connector, Role::Broker];
    // No certificate, a foreign one or one expired beyond the grace: refused before queueing
    // on the write lock.
    if ctx.renew_grace.is_zero() && conn.0.as_ref().is_some_and(|p| now > p.not_after) {
        // Said before the general check, whose advice ("renew it") would be wrong here.
        return Err(ApiFailure::unauthorized(
            "certificate expired, and this controller renews no expired certificate \
             (renew_grace_secs = 0): enroll again",
        ));
    }
    let peer = ctx.check_cert_within(conn, &roles, ctx.renew_grace)?;
    let mut w = ctx.store.write().await?;
    // Checked inside the write transaction so a revocation cannot slip in between.
    let (peer, row, kind): (std::sync::Arc<PeerCert>, _, _) =
        ctx.check_stored(w.conn(), peer).await?;
    // A certificate renews only while no certificate renewed from it was ever used: a
    // renewal whose answer was lost, or never reached the holder's disk, may be retried.
    // Once the new certificate is in use, the old one (with a key its holder has since
    // discarded) renews nothing, expired or not: whoever copied it and its key before the
    // renewal cannot fork the identity, and later lock its holder out. (The holder's own
    // processes renew from the newest certificate on disk.)
    let expired_secs = now
        .duration_since(peer.not_after)
        .ok()
        .filter(|d| !d.is_zero())
        .map(|d| d.as_secs());
    let (role, subject, serial) = (peer.id.role, &peer.id.id, &peer.serial_hex);
    if peers::cert_successor_seen(w.conn(), org, role, subject, serial).await? {
        return Err(ApiFailure::forbidden(
            "this certificate was renewed before, and the renewed certificate is in use: it \
             renews no more (if this holder did not renew it, a copy of its key is in other \
             hands: revoke the identity); enroll again",
        ));
    }
    let mut unused = Vec::new();
    if expired_secs.is_some() {
        unused = peers::cert_unseen_successors(w.conn(), org, serial).await?;
    }
    // A disabled user's devices keep their certificates (enabling the user again restores
    // them) but get no new ones, so disabling takes every credential away within a lifetime.
    if kind == Kind::Device && admin::user_disabled(w.conn(), org, &row.owner).await? != Some(false)
    {
        return Err(ApiFailure::forbidden("the device's user is disabled"));
    }
    let identity = peer.id.clone();
    // Each renewal is a durable write under the one write lock, and a revocation lists every
    // serial still valid in every snapshot: an identity renewing in a loop would stall the
    // controller's writes and swell the snapshots. A rate, not a count of valid certificates:
    // a device whose answers were lost must still renew before its certificate expires.
    let recent = peers::certs_issued_between(
        w.conn(),
        org,
        identity.role,
        &identity.id,
        now_secs - RENEWAL_WINDOW,
        now_secs,
    )
    .await?;
    if recent >= max_issued_in_window(ctx.cert_lifetime) {
        return Err(ApiFailure::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!(
                "renewed too often: {recent} certificates issued to this identity in the last \
                 hour; try again later"
            ),
            None,
        ));
    }
    let issued = issue(ctx, &req.csr_pem, &identity, now)?;
    record_cert(
        ctx,
        &mut w,
        org,
        &issued,
        &identity,
        now_secs,
        Some(&peer.serial_hex),
    )
    .await?;
    // In this transaction, not later (`Ctx::mark_seen`): the certificate it renewed from
    // must not renew again once this renewal is committed.
    peers::cert_mark_seen(w.conn(), org, &peer.serial_hex, now_secs).await?;
    let brokers = peers::broker_infos(w.conn(), org).await?;
    let user = (kind == Kind::Device).then(|| row.owner.clone());
    let rec = audit::record(
        now,
        &identity.to_uri(),
        "renew",
        &identity.to_uri(),
        true,
        match expired_secs {
            None => json!({ "old_serial": peer.serial_hex, "serial": issued.serial_hex }),
            // A renewal after expiry says so: how long the identity went without one, and
            // the certificates of earlier renewals from the same one that were never used
            // (answers lost, or someone else holding its key: the trail shows both).
            Some(secs) => json!({
                "old_serial": peer.serial_hex,
                "serial": issued.serial_hex,
                "expired_secs": secs,
                "earlier_unused": unused,
            }),
        },
    );
    ctx.commit_quiet(w, &[rec]).await?;
    Ok(issued_cert(ctx, &identity, issued, user, brokers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    /// Each state at its edges: valid up to and at `not_after`, renewable up to and at
    /// `not_after + grace`, lapsed one second later; never renewable when revoked or when the
    /// holder may not renew (then no `renew_until` either); a grace of 0 renews until expiry.
    #[test]
    fn credential_states_follow_the_renewal_rules() {
        use CredentialState::*;
        let (na, g) = (1_000, 100);
        let until = Some(1_100);
        assert_eq!(
            credential_state(999, Some(na), g, false, false),
            (Valid, until)
        );
        assert_eq!(
            credential_state(1_000, Some(na), g, false, false),
            (Valid, until)
        );
        assert_eq!(
            credential_state(1_001, Some(na), g, false, false),
            (Renewable, until)
        );
        assert_eq!(
            credential_state(1_100, Some(na), g, false, false),
            (Renewable, until)
        );
        assert_eq!(
            credential_state(1_101, Some(na), g, false, false),
            (Lapsed, until)
        );
        assert_eq!(
            credential_state(1_001, Some(na), 0, false, false),
            (Lapsed, Some(1_000))
        );
        // A disabled user's device, before and after expiry, until the grace ends.
        assert_eq!(
            credential_state(999, Some(na), g, false, true),
            (UserDisabled, until)
        );
        assert_eq!(
            credential_state(1_050, Some(na), g, false, true),
            (UserDisabled, until)
        );
        assert_eq!(
            credential_state(1_101, Some(na), g, false, true),
            (Lapsed, until)
        );
        assert_eq!(
            credential_state(999, Some(na), g, true, false),
            (Revoked, None)
        );
        assert_eq!(
            credential_state(999, None, g, false, false),
            (Unknown, None)
        );
        assert_eq!(
            credential_state(0, Some(u64::MAX), g, false, false),
            (Valid, Some(u64::MAX))
        );
    }

    /// The renewal rate a lifetime needs (an hour over two thirds of it) is always allowed
    /// twice over; a day's lifetime keeps the bound of 8 an hour.
    #[test]
    fn the_renewal_rate_follows_the_lifetime() {
        use std::time::Duration;
        assert_eq!(max_issued_in_window(Duration::from_secs(86_400)), 8);
        assert_eq!(max_issued_in_window(Duration::from_secs(7 * 86_400)), 8);
        for secs in [1, 12, 60, 600, 3_600, 20_000] {
            let needed = 3_600 / (secs * 2 / 3).max(1);
            let allowed = max_issued_in_window(Duration::from_secs(secs));
            assert!(
                allowed >= 2 * needed as i64 && allowed >= 8,
                "{secs}: {allowed} < 2 × {needed}"
            );
        }
        assert_eq!(max_issued_in_window(Duration::ZERO), 8 + 10_800);
    }

    #[test]
    fn secrets_fit_the_token_format() {
        let s = new_secret();
        assert_eq!(s.len(), 43);
        let t = EnrollToken {
            ca_sha256: [7; 32],
            secret: s.clone(),
        };
        assert_eq!(EnrollToken::parse(&t.to_string()).unwrap().secret, s);
        assert_ne!(new_secret(), s);
    }

    #[test]
    fn refusal_reasons() {
        let row = TokenRow {
            id: "t-1".into(),
            hash: secret_hash("x"),
            role: "agent".into(),
            user_id: None,
            name: None,
            created_at: 0,
            expires_at: 10,
            used_at: Some(5),
            used_by: None,
        };
        let h = secret_hash("x");
        assert_eq!(
            token_refusal(Some(&row), &h).error,
            "enrollment token already used"
        );
        let mut exp = row.clone();
        exp.used_at = None;
        assert_eq!(
            token_refusal(Some(&exp), &h).error,
            "enrollment token expired"
        );
        assert_eq!(token_refusal(None, &h).status, StatusCode::UNAUTHORIZED);
    }
}
