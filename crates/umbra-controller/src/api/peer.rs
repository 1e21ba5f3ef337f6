//! Public routes and the routes for enrolled peers (client certificate).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use umbra_pki::PeerCert;
use umbra_proto::Role;
use umbra_proto::api::{
    AuditSeq, BrokerHeartbeat, BrokerList, EnrollRequest, LiveStream, RenewRequest,
};

use super::ApiQuery;
use super::{ApiJson, HeartbeatConn};
use crate::audit;
use crate::distribution::{self, MAX_WAITING_PER_PEER};
use crate::enroll;
use crate::error::ApiFailure;
use crate::state::{ClientAddr, ConnPeer, Ctx};
use crate::store::{self, SNAPSHOT_VERSION, peers};
use crate::validate;
use umbra_link::quota::Place;

/// Longest long-poll wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(25);
/// Most streams and audit records one heartbeat may carry.
const MAX_HEARTBEAT_STREAMS: usize = 100_000;
const MAX_HEARTBEAT_AUDIT: usize = 10_000;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

pub(super) async fn ca_pem(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        ctx.ca.cert_pem().to_owned(),
    )
        .into_response()
}

pub(super) async fn enroll(
    State(ctx): State<Arc<Ctx>>,
    addr: Option<Extension<ClientAddr>>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Response, ApiFailure> {
    let source = addr.map(|Extension(a)| a.0.ip());
    let issued = enroll::redeem(&ctx, source, req).await?;
    Ok((StatusCode::OK, Json(issued)).into_response())
}

pub(super) async fn renew(
    State(ctx): State<Arc<Ctx>>,
    Extension(conn): Extension<ConnPeer>,
    addr: Option<Extension<ClientAddr>>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Response, ApiFailure> {
    let source = addr.map(|Extension(a)| a.0.ip());
    let issued = enroll::renew(&ctx, &conn, source, req).await?;
    Ok(Json(issued).into_response())
}

/// `?have=TAG` (the list the caller holds) and `?wait=S` (seconds, at most 25, default 25).
#[derive(Debug, Default, Deserialize)]
pub(super) struct BrokersQuery {
    #[serde(default)]
    have: Option<String>,
    #[serde(default)]
    wait: Option<u64>,
}

/// `GET /v1/brokers`: the list at once, or with `have`, once it differs from the caller's
/// (agents and connectors follow it this way, so that a revoked broker leaves them within a
/// second, and an admin change that leaves the list as it was wakes nobody).
pub(super) async fn brokers(
    State(ctx): State<Arc<Ctx>>,
    Extension(conn): Extension<ConnPeer>,
    ApiQuery(q): ApiQuery<BrokersQuery>,
) -> Result<Response, ApiFailure> {
    let wait = q
        .wait
        .map(Duration::from_secs)
        .map_or(MAX_WAIT, |w| w.min(MAX_WAIT));
    let deadline = tokio::time::Instant::now() + wait;
    let mut slot = None;
    loop {
        // Checked again after every wait: a peer revoked meanwhile gets its refusal.
        let (peer, _, _) = ctx
            .authorize_peer(&conn, &[Role::Agent, Role::Connector, Role::Broker])
            .await?;
        // Read before the list: a change committed in between makes the wait return at once.
        let seen = ctx.dist.current();
        let brokers = {
            let mut r = ctx.store.read().await?;
            peers::broker_infos(&mut r, &ctx.org).await?
        };
        let tag = list_tag(&brokers);
        if q.have.as_deref() != Some(tag.as_str()) {
            return Ok(Json(BrokerList { brokers, tag }).into_response());
        }
        if slot.is_none() {
            slot = Some(wait_slot(&ctx, &peer)?);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero()
            || ctx
                .dist
                .wait_newer(seen, left, ctx.shutdown.clone())
                .await
                .is_none()
        {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// A place for one more long poll of `peer`, or 429 when it has too many waiting.
fn wait_slot(ctx: &Ctx, peer: &PeerCert) -> Result<Place, ApiFailure> {
    ctx.dist.wait_slot(&peer.id.to_uri()).ok_or_else(|| {
        ApiFailure::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many requests waiting for this identity (at most {MAX_WAITING_PER_PEER})"),
            None,
        )
    })
}

/// A short digest of a broker list (hex): equal lists, equal tags.
fn list_tag(brokers: &[umbra_proto::api::BrokerInfo]) -> String {
    let bytes = serde_json::to_vec(brokers).unwrap_or_default();
    hex::encode(&umbra_pki::sha256(&bytes)[..16])
}

/// `?after=N` (default 0) and `?wait=S` (seconds, at most 25, default 25).
#[derive(Debug, Default, Deserialize)]
pub(super) struct PollQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    wait: Option<u64>,
}

impl PollQuery {
    fn wait(&self) -> Duration {
        self.wait
            .map(Duration::from_secs)
            .map_or(MAX_WAIT, |w| w.min(MAX_WAIT))
    }
}

/// How long a peer ahead of the store waits for its answer.
const AHEAD_PAUSE: Duration = Duration::from_secs(1);

/// Whether a long poll that holds version `after` gets an answer: once the version passes
/// it (`false` when the wait ends first). A peer ahead of the store gets one after
/// [`AHEAD_PAUSE`]: the store went back (restored from a backup, or the clock went back),
/// and waiting for its counter to pass the peer's again would leave the peer confirming
/// state that no longer exists, such as access for a device revoked since the restore.
/// Peers take the older version they are then sent.
async fn changed_since(ctx: &Ctx, after: u64, wait: Duration) -> Result<bool, ApiFailure> {
    if after > ctx.dist.current() {
        // The published version may only lag the store (`distribution::follow_store`).
        let stored = {
            let mut r = ctx.store.read().await?;
            store::counter(&mut r, &ctx.org, SNAPSHOT_VERSION).await?
        };
        ctx.dist.publish(stored);
        if after > stored {
            // Once a minute at most: any peer can send a large `after`.
            use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
            static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
            let now = audit::unix_secs(ctx.now());
            let last = LAST_WARNED.load(Relaxed);
            if now >= last.saturating_add(60)
                && LAST_WARNED
                    .compare_exchange(last, now, Relaxed, Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    peer_version = after,
                    stored,
                    "a peer holds a newer snapshot version than the store (was the store \
                     restored from a backup, or did the clock go back?); sending it the store's"
                );
            }
            // A short pause: a peer that cannot take the older version would ask again at
            // once, and this bounds that to one answer a second.
            tokio::time::sleep(AHEAD_PAUSE.min(wait)).await;
            return Ok(true);
        }
    }
    Ok(ctx
        .dist
        .wait_newer(after, wait, ctx.shutdown.clone())
        .await
        .is_some())
}

pub(super) async fn snapshot(
    State(ctx): State<Arc<Ctx>>,
    Extension(conn): Extension<ConnPeer>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Response, ApiFailure> {
    let (peer, _, _) = ctx.authorize_peer(&conn, &[Role::Broker]).await?;
    let _slot = wait_slot(&ctx, &peer)?;
    if !changed_since(&ctx, q.after.unwrap_or(0), q.wait()).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut r = ctx.store.read().await?;
    // Revoked while it waited (its own revocation is a change, so it wakes this poll): the
    // refusal, not the snapshot.
    ctx.check_peer(&mut r, &conn, &[Role::Broker]).await?;
    let snap = distribution::build_snapshot(&mut r, &ctx.org, ctx.now_secs()).await?;
    Ok(Json(snap).into_response())
}

pub(super) async fn connector_config(
    State(ctx): State<Arc<Ctx>>,
    Extension(conn): Extension<ConnPeer>,
    headers: axum::http::HeaderMap,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Response, ApiFailure> {
    let (peer, _, _) = ctx.authorize_peer(&conn, &[Role::Connector]).await?;
    let version = announced_version(&headers);
    remember_connector_version(&ctx, &peer.id.id, version).await?;
    let _slot = wait_slot(&ctx, &peer)?;
    if !changed_since(&ctx, q.after.unwrap_or(0), q.wait()).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut r = ctx.store.read().await?;
    // Revoked while it waited: the refusal, not the targets (as for snapshots).
    let (peer, row, _) = ctx.check_peer(&mut r, &conn, &[Role::Connector]).await?;
    let cfg = distribution::connector_config(&mut r, &ctx.org, &peer.id.id, &row.owner).await?;
    Ok(Json(cfg).into_response())
}

/// The version a peer announced in its `User-Agent` ([`validate::announced_version`]).
fn announced_version(headers: &axum::http::HeaderMap) -> Option<String> {
    validate::announced_version(
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Stores the version a connector announced, when it is not the one stored: a write at its
/// first poll after a start or an upgrade, none on the polls between.
async fn remember_connector_version(
    ctx: &Ctx,
    id: &str,
    version: Option<String>,
) -> Result<(), ApiFailure> {
    let stored = {
        let mut r = ctx.store.read().await?;
        peers::connector_versions(&mut r, &ctx.org, &[id])
            .await?
            .remove(id)
    };
    if stored == version {
        return Ok(());
    }
    let mut w = ctx.store.write().await?;
    peers::connector_set_version(w.conn(), &ctx.org, id, version.as_deref()).await?;
    w.commit().await?;
    Ok(())
}

/// Which of a heartbeat's `n` audit events are new, given the broker's last stored mark
/// `(epoch, number)`: skip the first `skip`, and store `mark` next. A new epoch (a broker whose
/// spool was wiped, or the first numbered heartbeat) starts over.
fn audit_to_store(stored: (u64, u64), given: AuditSeq, n: usize) -> (usize, (u64, u64)) {
    let n = n as u64;
    let last = given.first.saturating_add(n).saturating_sub(1);
    if stored.0 != given.epoch {
        return (0, (given.epoch, if n == 0 { 0 } else { last }));
    }
    let skip = (stored.1 + 1).saturating_sub(given.first).min(n);
    (skip as usize, (given.epoch, stored.1.max(last)))
}

/// Answer to a heartbeat.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HeartbeatAck {
    /// The controller's current snapshot version.
    pub(crate) snapshot_version: u64,
    /// The broker's audit numbering as stored here after this heartbeat: its epoch and the
    /// last number stored (absent for a heartbeat without numbering). A broker whose spool
    /// lost lines (a full disk) would otherwise number new events below it after a restart,
    /// and they would be taken for resends and dropped: it numbers on from here instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) audit_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) audit_last: Option<u64>,
}

pub(super) async fn heartbeat(
    State(ctx): State<Arc<Ctx>>,
    // Before the body: only a broker's connection gets it read, and only so many at once
    // (see `HeartbeatConn`); the place is held until this returns.
    HeartbeatConn { conn, _place }: HeartbeatConn,
    headers: axum::http::HeaderMap,
    ApiJson(hb): ApiJson<BrokerHeartbeat>,
) -> Result<Json<HeartbeatAck>, ApiFailure> {
    let version = announced_version(&headers);
    let quic = hb
        .quic_addr
        .as_deref()
        .map(|a| validate::advertised_addr(a, "quic_addr"))
        .transpose()?;
    let tcp = hb
        .tcp_addr
        .as_deref()
        .map(|a| validate::advertised_addr(a, "tcp_addr"))
        .transpose()?;
    if hb
        .streams
        .as_ref()
        .is_some_and(|s| s.len() > MAX_HEARTBEAT_STREAMS)
    {
        return Err(ApiFailure::invalid(
            "streams",
            "too many streams in one heartbeat",
        ));
    }
    if hb
        .audit_seq
        .is_some_and(|a| a.epoch > i64::MAX as u64 || a.first == 0)
    {
        return Err(ApiFailure::invalid(
            "audit_seq",
            "epoch must be below 2^63 and numbers start at 1",
        ));
    }
    if hb.audit.len() > MAX_HEARTBEAT_AUDIT {
        return Err(ApiFailure::invalid(
            "audit",
            "too many audit records in one heartbeat",
        ));
    }
    let now_secs = ctx.now_secs();
    let mut w = ctx.store.write().await?;
    let (peer, row, _) = ctx.check_peer(w.conn(), &conn, &[Role::Broker]).await?;
    // The broker's id names its streams; never trust a different one in the body. Streams
    // it may not list (`audit::broker_may_list`) are left out and counted as refusals.
    let (mut refused, mut why) = (0usize, "");
    let streams_json = match hb.streams {
        Some(streams) => {
            let named: std::collections::BTreeSet<&str> =
                streams.iter().map(|s| s.device.as_str()).collect();
            let owners = peers::device_owners(w.conn(), &ctx.org, &named).await?;
            let mut kept: Vec<LiveStream> = Vec::with_capacity(streams.len());
            for mut s in streams {
                match audit::broker_may_list(&s, &owners) {
                    Ok(()) => {
                        s.broker = peer.id.id.clone();
                        kept.push(s);
                    }
                    Err(e) => {
                        refused += 1;
                        if why.is_empty() {
                            why = e;
                        }
                    }
                }
            }
            Some(serde_json::to_string(&kept).map_err(|_| ApiFailure::internal())?)
        }
        None => None,
    };
    let (old_quic, old_tcp) = peers::broker_heartbeat(
        w.conn(),
        &ctx.org,
        &peer.id.id,
        quic.as_deref(),
        tcp.as_deref(),
        hb.snapshot_version,
        streams_json
            .as_deref()
            .map(|j| (j, hb.streams_omitted.unwrap_or(0))),
        version.as_deref(),
        now_secs,
    )
    .await?;
    let mut stored_mark = None;
    let fresh = match hb.audit_seq {
        Some(given) => {
            let stored = peers::broker_audit_mark(w.conn(), &ctx.org, &peer.id.id).await?;
            let (skip, mark) = audit_to_store(stored, given, hb.audit.len());
            stored_mark = Some(mark);
            if mark != stored {
                peers::broker_audit_set_mark(w.conn(), &ctx.org, &peer.id.id, mark).await?;
            }
            hb.audit.get(skip..).unwrap_or_default()
        }
        None => &hb.audit[..],
    };
    // What a broker may write is checked (`audit::broker_may_report`); what it may not is
    // left out, and that it tried is a record of the controller's own.
    let mut kept = Vec::with_capacity(fresh.len());
    for r in fresh {
        match audit::broker_may_report(&ctx.org, r) {
            Ok(()) => kept.push(r.clone()),
            Err(e) => {
                refused += 1;
                if why.is_empty() {
                    why = e;
                }
            }
        }
    }
    let received = audit::unix_ms((ctx.clock)());
    audit::stage(w.conn(), &ctx.org, &kept, &peer.id.to_uri(), Some(received)).await?;
    let refusal = (refused > 0).then(|| {
        metrics::counter!("umbra_controller_audit_refused_total").increment(refused as u64);
        audit::record(
            (ctx.clock)(),
            &peer.id.to_uri(),
            "audit.report",
            &peer.id.to_uri(),
            false,
            serde_json::json!({ "refused": refused, "reason": why }),
        )
    });
    // Where a broker can be reached is part of the snapshot and of every broker list. The
    // refusal record is committed and logged together (`commit_detached`), so a broker that
    // hangs up meanwhile cannot leave it stored and never logged.
    let moved = old_quic != quic || old_tcp != tcp;
    let records: Vec<_> = refusal.into_iter().collect();
    let bumped =
        audit::commit_detached(w, &ctx.org, &records, moved.then_some(SNAPSHOT_VERSION)).await?;
    let version = match bumped {
        Some(v) => {
            tracing::info!(broker = %peer.id, name = %row.owner, ?quic, ?tcp, "broker addresses changed");
            ctx.dist.publish(v);
            v
        }
        None => ctx.dist.current(),
    };
    Ok(Json(HeartbeatAck {
        snapshot_version: version,
        audit_epoch: stored_mark.map(|m| m.0),
        audit_last: stored_mark.map(|m| m.1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(epoch: u64, first: u64) -> AuditSeq {
        AuditSeq { epoch, first }
    }

    #[test]
    fn each_audit_event_is_stored_once() {
        // First numbered heartbeat: everything, and the mark moves to the last.
        assert_eq!(audit_to_store((0, 0), seq(7, 1), 3), (0, (7, 3)));
        // Next events.
        assert_eq!(audit_to_store((7, 3), seq(7, 4), 2), (0, (7, 5)));
        // A resend after a lost answer or a crash: the stored ones are skipped.
        assert_eq!(audit_to_store((7, 5), seq(7, 4), 4), (2, (7, 7)));
        assert_eq!(audit_to_store((7, 5), seq(7, 1), 3), (3, (7, 5)));
        // Nothing new to say.
        assert_eq!(audit_to_store((7, 5), seq(7, 6), 0), (0, (7, 5)));
        // A wiped broker starts a new epoch: all of it counts.
        assert_eq!(audit_to_store((7, 5), seq(9, 1), 2), (0, (9, 2)));
        assert_eq!(audit_to_store((7, 5), seq(9, 1), 0), (0, (9, 0)));
        // Events lost in between (a full queue dropped them): store what came.
        assert_eq!(audit_to_store((7, 5), seq(7, 9), 2), (0, (7, 10)));
    }
}
