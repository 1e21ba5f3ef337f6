//! The audit trail: who did what to what, and the outcome.
//!
//! Every enrollment, renewal, revocation and admin change (successful or refused) becomes a
//! row in the `audit` table and a `tracing` event with target `audit`. Rows for a change are
//! written in the change's own transaction, so the trail and the state never disagree; the
//! event is logged after the commit. Brokers report their stream decisions in heartbeats and
//! those are stored too (with the broker as `source`).
//!
//! Details are built here from known fields only: never a token, key or request body.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sqlx::SqliteConnection;
use umbra_proto::api::AuditRecord;

use crate::store::{self, AUDIT_SEQ, WriteTx, peers};

/// `source` of rows written by the controller itself.
pub(crate) const CONTROLLER: &str = "controller";
/// Actor of admin API calls.
pub(crate) const ADMIN: &str = "admin";
/// Actor of unauthenticated calls.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// Builds a record.
pub(crate) fn record(
    now: SystemTime,
    actor: &str,
    action: &str,
    target: &str,
    ok: bool,
    detail: Value,
) -> AuditRecord {
    AuditRecord {
        at_ms: unix_ms(now),
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: umbra_proto::audit_target(target),
        result: if ok { "ok" } else { "error" }.to_owned(),
        detail,
    }
}

/// Longest field of a record a broker reports (actor, target; brokers bound their targets
/// with [`umbra_proto::audit_target`]).
const BROKER_FIELD_MAX: usize = umbra_proto::AUDIT_TARGET_MAX;
/// Longest `detail` of a record a broker reports, as JSON.
const BROKER_DETAIL_MAX: usize = 4096;

/// Whether a broker may report `rec`: a record of its own decisions (`link.*`, `stream.*`),
/// by an identity of this organisation (the agent or connector it acted for, or itself),
/// with a decision's result and bounded fields. A compromised broker can still misreport
/// its own decisions; it cannot write records that read as the administrator's or the
/// controller's (`actor` "admin", "controller", "anonymous"), nor unbounded ones. Every
/// stored record also names its source. `Err` says why not.
pub(crate) fn broker_may_report(org: &str, rec: &AuditRecord) -> Result<(), &'static str> {
    let action_ok = ["link.", "stream."].iter().any(|p| {
        rec.action
            .strip_prefix(p)
            .is_some_and(|rest| !rest.is_empty() && rest.len() <= 32)
    });
    if !action_ok {
        return Err("action is not a broker's (link.*, stream.*)");
    }
    let actor_ok = rec
        .actor
        .strip_prefix("umbra://")
        .and_then(|rest| rest.strip_prefix(org))
        .is_some_and(|rest| rest.starts_with('/'));
    if !actor_ok || rec.actor.len() > BROKER_FIELD_MAX {
        return Err("actor is not an identity of this organisation");
    }
    if rec.target.len() > BROKER_FIELD_MAX {
        return Err("target too long");
    }
    // A newline or a terminal escape would let it forge lines where records are shown
    // (brokers escape what their peers asked for before they report it).
    if [&rec.actor, &rec.action, &rec.target, &rec.result]
        .iter()
        .any(|f| umbra_proto::has_controls(f))
    {
        return Err("control character in a field");
    }
    if !["allow", "deny", "ok", "error"].contains(&rec.result.as_str()) {
        return Err("result is not allow, deny, ok or error");
    }
    if rec.detail.to_string().len() > BROKER_DETAIL_MAX {
        return Err("detail too long");
    }
    Ok(())
}

/// Whether a broker may list `s` as one of its live streams: a stream of a device of this
/// organisation, for the device's own user (`owners`: device id -> user), with bounded
/// fields. The admin stream list and policy checks read these, so a broker cannot make up
/// streams of other users; what it says of its own devices' streams it is trusted with, as
/// with its decisions. `Err` says why not.
pub(crate) fn broker_may_list(
    s: &umbra_proto::api::LiveStream,
    owners: &std::collections::HashMap<String, String>,
) -> Result<(), &'static str> {
    if owners.get(&s.device) != Some(&s.user) {
        return Err("stream of a device that is not this user's, or not enrolled");
    }
    if [&s.service, &s.connector, &s.transport]
        .iter()
        .any(|f| f.len() > BROKER_FIELD_MAX)
    {
        return Err("stream field too long");
    }
    if [&s.service, &s.connector, &s.transport]
        .iter()
        .any(|f| umbra_proto::has_controls(f))
    {
        return Err("control character in a stream field");
    }
    Ok(())
}

/// Writes records in the caller's transaction; returns the sequence number of the last one.
/// `received`: when the controller got them (Unix ms, its own clock), for records a peer
/// reported; `None` for the controller's own, whose time is already its clock's.
pub(crate) async fn stage(
    c: &mut SqliteConnection,
    org: &str,
    records: &[AuditRecord],
    source: &str,
    received: Option<u64>,
) -> Result<u64, sqlx::Error> {
    let n = records.len() as u64;
    if n == 0 {
        return store::counter(c, org, AUDIT_SEQ).await;
    }
    let last = store::bump_by(c, org, AUDIT_SEQ, n).await?;
    let first = last + 1 - n;
    for (i, rec) in records.iter().enumerate() {
        let received_ms = received.unwrap_or(rec.at_ms);
        peers::audit_insert(c, org, first + i as u64, rec, source, received_ms).await?;
    }
    Ok(last)
}

/// Logs a record as a structured event (call after the commit that stored it).
/// Stores `records` (the controller's own) in `w`, commits, then logs them: the log never
/// shows an event that the store does not hold.
pub(crate) async fn commit(
    w: WriteTx,
    org: &str,
    records: &[AuditRecord],
) -> Result<(), sqlx::Error> {
    commit_detached(w, org, records, None).await.map(|_| ())
}

/// Stores `records` in `w`, bumps the counter `bump` if given, commits, and logs the records,
/// in a task of its own: a request dropped meanwhile (its client gone) cannot leave a change
/// committed with its log lines never written. Returns the bumped counter's new value.
pub(crate) async fn commit_detached(
    mut w: WriteTx,
    org: &str,
    records: &[AuditRecord],
    bump: Option<&'static str>,
) -> Result<Option<u64>, sqlx::Error> {
    let org = org.to_owned();
    let records = records.to_vec();
    let task = tokio::spawn(async move {
        stage(w.conn(), &org, &records, CONTROLLER, None).await?;
        let v = match bump {
            Some(name) => Some(crate::store::bump(w.conn(), &org, name).await?),
            None => None,
        };
        w.commit().await?;
        for r in &records {
            emit(r);
        }
        Ok(v)
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(sqlx::Error::Io(std::io::Error::other(e.to_string()))),
    }
}

pub(crate) fn emit(rec: &AuditRecord) {
    if rec.result == "ok" || rec.result == "allow" {
        tracing::info!(
            target: "audit",
            actor = %rec.actor,
            action = %rec.action,
            object = %rec.target,
            result = %rec.result,
            detail = %rec.detail,
            "audit"
        );
    } else {
        tracing::warn!(
            target: "audit",
            actor = %rec.actor,
            action = %rec.action,
            object = %rec.target,
            result = %rec.result,
            detail = %rec.detail,
            "audit"
        );
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_broker_may_list() {
        let owners: std::collections::HashMap<String, String> =
            [("d-1".to_owned(), "ann@example.test".to_owned())].into();
        let ok = umbra_proto::api::LiveStream {
            id: 1,
            broker: "b-1".into(),
            user: "ann@example.test".into(),
            device: "d-1".into(),
            service: "web".into(),
            connector: "c-1".into(),
            transport: "quic".into(),
            started_at: 1,
            bytes_up: 0,
            bytes_down: 0,
        };
        assert_eq!(broker_may_list(&ok, &owners), Ok(()));
        for bad in [
            umbra_proto::api::LiveStream {
                user: "ben@example.test".into(),
                ..ok.clone()
            },
            umbra_proto::api::LiveStream {
                device: "d-2".into(),
                ..ok.clone()
            },
            umbra_proto::api::LiveStream {
                connector: "c".repeat(BROKER_FIELD_MAX + 1),
                ..ok.clone()
            },
            umbra_proto::api::LiveStream {
                service: "web\u{1b}[1A".into(),
                ..ok.clone()
            },
            umbra_proto::api::LiveStream {
                transport: "quic\nb-2".into(),
                ..ok.clone()
            },
        ] {
            assert!(broker_may_list(&bad, &owners).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn what_a_broker_may_report() {
        let ok = AuditRecord {
            at_ms: 1,
            actor: "umbra://acme/agent/d-1".into(),
            action: "stream.open".into(),
            target: "web".into(),
            result: "allow".into(),
            detail: serde_json::json!({ "policies": ["p"] }),
        };
        assert_eq!(broker_may_report("acme", &ok), Ok(()));
        for (what, r) in [
            (
                "link refusal",
                AuditRecord {
                    action: "link.open".into(),
                    result: "deny".into(),
                    ..ok.clone()
                },
            ),
            (
                "dial failure by a connector",
                AuditRecord {
                    actor: "umbra://acme/connector/c-1".into(),
                    action: "stream.dial".into(),
                    result: "error".into(),
                    ..ok.clone()
                },
            ),
            (
                "a peer's odd request, escaped by the broker",
                AuditRecord {
                    target: umbra_proto::escape_controls("web\u{1b}[2K").into_owned(),
                    result: "deny".into(),
                    ..ok.clone()
                },
            ),
        ] {
            assert_eq!(broker_may_report("acme", &r), Ok(()), "{what}");
        }
        let long = "x".repeat(257);
        for (what, r) in [
            (
                "admin's action",
                AuditRecord {
                    action: "user.delete".into(),
                    ..ok.clone()
                },
            ),
            (
                "admin as actor",
                AuditRecord {
                    actor: "admin".into(),
                    ..ok.clone()
                },
            ),
            (
                "controller as actor",
                AuditRecord {
                    actor: "controller".into(),
                    ..ok.clone()
                },
            ),
            (
                "another organisation",
                AuditRecord {
                    actor: "umbra://other/agent/d-1".into(),
                    ..ok.clone()
                },
            ),
            (
                "organisation prefix",
                AuditRecord {
                    actor: "umbra://acmex/agent/d-1".into(),
                    ..ok.clone()
                },
            ),
            (
                "bare prefix",
                AuditRecord {
                    action: "stream.".into(),
                    ..ok.clone()
                },
            ),
            (
                "long target",
                AuditRecord {
                    target: long.clone(),
                    ..ok.clone()
                },
            ),
            (
                "long actor",
                AuditRecord {
                    actor: format!("umbra://acme/agent/{long}"),
                    ..ok.clone()
                },
            ),
            (
                "newline in the action",
                AuditRecord {
                    action: "stream.x\n42  admin  user.delete  bob  ok".into(),
                    ..ok.clone()
                },
            ),
            (
                "terminal escape in the target",
                AuditRecord {
                    target: "web\u{1b}[2K".into(),
                    ..ok.clone()
                },
            ),
            (
                "carriage return in the actor",
                AuditRecord {
                    actor: "umbra://acme/agent/d-1\r".into(),
                    ..ok.clone()
                },
            ),
            (
                "odd result",
                AuditRecord {
                    result: "granted".into(),
                    ..ok.clone()
                },
            ),
            (
                "long detail",
                AuditRecord {
                    detail: serde_json::json!({ "x": "y".repeat(5000) }),
                    ..ok.clone()
                },
            ),
        ] {
            assert!(broker_may_report("acme", &r).is_err(), "{what}");
        }
    }

    #[test]
    fn record_shape() {
        let r = record(
            UNIX_EPOCH + std::time::Duration::from_millis(1500),
            ADMIN,
            "user.create",
            "a@b.c",
            false,
            serde_json::json!({"error": "x"}),
        );
        assert_eq!(r.at_ms, 1500);
        assert_eq!(r.result, "error");
        // A target from a request path: control characters escaped, length bounded.
        let odd = record(
            UNIX_EPOCH,
            ADMIN,
            "group.delete",
            "a\nb",
            false,
            Value::Null,
        );
        assert_eq!(odd.target, "a\\nb");
        let long = record(
            UNIX_EPOCH,
            ADMIN,
            "group.delete",
            &"é".repeat(300),
            false,
            Value::Null,
        );
        assert!(
            long.target.len() <= umbra_proto::AUDIT_TARGET_MAX,
            "{}",
            long.target.len()
        );
        assert!(long.target.ends_with('…'));
    }
}
