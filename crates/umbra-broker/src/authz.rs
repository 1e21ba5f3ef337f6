//! Stream authorization: may this device open a stream to this service, now?
//!
//! Decided locally from the current [`Authority`], with no controller round trip. Every deny
//! carries its reason for the audit log, but the wire answer for an unknown service and a
//! forbidden one is the same [`OpenCode::Denied`], so the answer is no oracle of what exists.
//!
//! The peer's certificate is part of every decision: past its `not_after` (wall clock, the
//! `now` the decision is given) a stream is denied as [`CERTIFICATE_EXPIRED`], new or live.
//! The link's expiry timer alone would not do: it runs on tokio's monotonic clock, which
//! stands still while the machine is suspended and does not follow wall-clock steps; and once
//! a certificate has expired the controller drops its serial from the revoked list, so a
//! revoked certificate that outlives its expiry on a link is denied by nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use umbra_policy::{AccessRequest, Reason, RequestContext};
use umbra_proto::snapshot::ServiceFacts;
use umbra_proto::{Flow, OpenCode};

use crate::authority::{Authority, unix};
use crate::relay::LiveEntry;

/// Facts about one `Open` request.
pub(crate) struct OpenFacts<'a> {
    pub(crate) device: &'a str,
    pub(crate) serial_hex: &'a str,
    /// End of validity of the certificate the link was made with.
    pub(crate) not_after: SystemTime,
    pub(crate) service: &'a str,
    pub(crate) flow: Flow,
    pub(crate) transport: &'static str,
}

/// The broker's decision on an `Open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// What the agent is told.
    pub(crate) code: OpenCode,
    /// Why, for the audit log (`permitted`, `no_permit`, `unknown_service`, `stale`...).
    pub(crate) reason: String,
    /// The device's user, when known.
    pub(crate) user: Option<String>,
    /// Policies that decided it: the `permit`s that allowed it, or the `forbid`s that denied
    /// it.
    pub(crate) policies: Vec<String>,
    /// Why the policies could not be evaluated (reason `error`), for the audit record.
    pub(crate) error: Option<String>,
}

impl Verdict {
    fn deny(code: OpenCode, reason: &str, user: Option<String>) -> Self {
        Verdict {
            code,
            reason: reason.into(),
            user,
            policies: vec![],
            error: None,
        }
    }

    /// Whether the link the stream came on must close too: its certificate has expired, so
    /// no stream of it may run.
    pub(crate) fn ends_link(&self) -> bool {
        self.reason == CERTIFICATE_EXPIRED
    }
}

/// Why a stream of a peer whose certificate has expired is denied (or ends).
pub(crate) const CERTIFICATE_EXPIRED: &str = "certificate_expired";

/// Why a stream ends whose connector's link was made with a certificate that has expired.
pub(crate) const CONNECTOR_CERTIFICATE_EXPIRED: &str = "connector_certificate_expired";

/// Whether a certificate valid until `not_after` has expired at `now`. Pure.
pub(crate) fn certificate_expired(not_after: SystemTime, now: SystemTime) -> bool {
    not_after <= now
}

/// The live streams that may no longer run under `a` at `now`, each with why: the reason of
/// the decision that now denies it (also [`CERTIFICATE_EXPIRED`]), or `route_changed` when
/// its service no longer has its target through its connector ([`LiveEntry::routed_by`]). Streams of one device
/// certificate to one service over one transport share a decision, made once per call, so a
/// re-check costs one evaluation per distinct access and a few hash lookups per stream. Pure.
pub(crate) fn recheck<'e>(
    live: &'e [Arc<LiveEntry>],
    a: &Authority,
    now: SystemTime,
    max_staleness: Duration,
) -> Vec<(&'e LiveEntry, String)> {
    let mut decided: HashMap<(&str, &str, &str, &str), Option<String>> = HashMap::new();
    let services: HashMap<&str, &ServiceFacts> = a
        .snapshot
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut out = Vec::new();
    for e in live {
        let key = (
            e.device.as_str(),
            e.serial_hex.as_str(),
            e.service.as_str(),
            e.transport,
        );
        let denied = decided
            .entry(key)
            .or_insert_with(|| {
                let v = authorize(
                    a,
                    &OpenFacts {
                        device: &e.device,
                        serial_hex: &e.serial_hex,
                        not_after: e.not_after,
                        service: &e.service,
                        flow: Flow::Tcp,
                        transport: e.transport,
                    },
                    now,
                    max_staleness,
                );
                (v.code != OpenCode::Ok).then_some(v.reason)
            })
            .clone();
        let routed = e.routed_by(services.get(e.service.as_str()).copied());
        let why = denied.or_else(|| (!routed).then(|| ROUTE_CHANGED.into()));
        if let Some(why) = why {
            out.push((&**e, why));
        }
    }
    out
}

/// Why `entry`, allowed under `decided` and registered as live since, may not relay after all
/// under `held` (the state held now) at `now`; `None` if it may.
///
/// The re-checks of live streams (on a new snapshot, and every `reverify_secs` or when the
/// state goes stale) read the list of live streams, and one that ran while this stream was
/// being set up (the connector dialing) did not see it. It is decided again here when one of
/// them could have ended it: another snapshot was installed; the state has gone stale (which
/// changes no version; the timed re-check may have swept just before the stream was
/// registered, and would not look again for up to `reverify_secs`); or its certificate has
/// expired. Otherwise a stream registered before the staleness limit is still in the list
/// when the re-check at the limit reads it. The usual path (none of these) costs no policy
/// evaluation. Pure.
pub(crate) fn recheck_registered(
    entry: &Arc<LiveEntry>,
    decided: &Authority,
    held: &Authority,
    now: SystemTime,
    max_staleness: Duration,
) -> Option<String> {
    let missed = held.snapshot.version != decided.snapshot.version
        || !held.is_fresh(now, max_staleness)
        || certificate_expired(entry.not_after, now);
    if !missed {
        return None;
    }
    recheck(std::slice::from_ref(entry), held, now, max_staleness)
        .pop()
        .map(|(_, why)| why)
}

/// Why a live stream ends whose service no longer routes as it did.
pub(crate) const ROUTE_CHANGED: &str = "route_changed";

/// Decides an `Open`. Only `OpenCode::Ok` lets bytes reach a connector.
pub(crate) fn authorize(
    a: &Authority,
    req: &OpenFacts<'_>,
    now: SystemTime,
    max_staleness: Duration,
) -> Verdict {
    // First: whatever the snapshot says, this credential no longer vouches for anyone.
    if certificate_expired(req.not_after, now) {
        return Verdict::deny(OpenCode::Denied, CERTIFICATE_EXPIRED, None);
    }
    if !a.is_fresh(now, max_staleness) {
        return Verdict::deny(OpenCode::Stale, "stale_snapshot", None);
    }
    if a.serial_revoked(req.serial_hex) {
        return Verdict::deny(OpenCode::Denied, "revoked_certificate", None);
    }
    let d = a.engine.decide(&AccessRequest {
        device: req.device,
        service: req.service,
        ctx: RequestContext {
            now_unix: unix(now) as i64,
            transport: req.transport,
        },
    });
    if !d.allow {
        let mut v = Verdict::deny(OpenCode::Denied, d.reason.as_str(), d.user);
        match d.reason {
            Reason::Forbidden { policies } => v.policies = policies,
            // Bounded: the evaluator's message may quote a policy.
            Reason::Error(e) => v.error = Some(umbra_proto::bounded(&e, 1024).into_owned()),
            _ => {}
        }
        return v;
    }
    // Flow support is checked only after the decision, so that it reveals nothing about
    // services the device may not reach.
    if req.flow != Flow::Tcp {
        return Verdict::deny(OpenCode::UnsupportedFlow, "unsupported_flow", d.user);
    }
    let policies = match d.reason {
        Reason::Permitted { policies } => policies,
        _ => vec![],
    };
    Verdict {
        code: OpenCode::Ok,
        reason: "permitted".into(),
        user: d.user,
        policies,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use umbra_proto::Snapshot;
    use umbra_proto::snapshot::{DeviceFacts, PolicyText, ServiceFacts, UserFacts};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn snapshot(policies: Vec<PolicyText>) -> Snapshot {
        Snapshot {
            version: 5,
            org: "default".into(),
            issued_at: NOW,
            users: vec![UserFacts {
                id: "demo@example.test".into(),
                groups: vec![],
                disabled: false,
            }],
            devices: vec![DeviceFacts {
                id: "d1".into(),
                user: "demo@example.test".into(),
                revoked: false,
            }],
            services: vec![
                ServiceFacts {
                    name: "demo".into(),
                    target: "127.0.0.1:80".into(),
                    connectors: vec!["c1".into()],
                },
                ServiceFacts {
                    name: "db".into(),
                    target: "127.0.0.1:5432".into(),
                    connectors: vec!["c1".into()],
                },
            ],
            policies,
            revoked_serials: vec!["dead".into()],
            ..Snapshot::default()
        }
    }

    fn allow_demo() -> Vec<PolicyText> {
        vec![PolicyText {
            id: "demo-allow".into(),
            text: umbra_policy::allow_policy(
                &umbra_policy::PolicySubject::User("demo@example.test".into()),
                "demo",
            ),
        }]
    }

    /// End of validity of the device certificate in these tests: a day after `NOW`.
    const NOT_AFTER: u64 = NOW + 86_400;

    fn open<'a>(service: &'a str, serial: &'a str, flow: Flow) -> OpenFacts<'a> {
        OpenFacts {
            device: "d1",
            serial_hex: serial,
            not_after: at(NOT_AFTER),
            service,
            flow,
            transport: "quic",
        }
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    const MAX: Duration = Duration::from_secs(600);

    #[test]
    fn allowed_and_its_denied_twins() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let ok = authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!(ok.code, OpenCode::Ok);
        assert_eq!(ok.user.as_deref(), Some("demo@example.test"));
        assert_eq!(ok.policies, vec!["demo-allow".to_string()]);

        // Published but not permitted, and not published at all: same wire answer.
        let forbidden = authorize(&a, &open("db", "01", Flow::Tcp), at(NOW), MAX);
        let unknown = authorize(&a, &open("nope", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!(forbidden.code, OpenCode::Denied);
        assert_eq!(unknown.code, OpenCode::Denied);
        assert_ne!(
            forbidden.reason, unknown.reason,
            "the audit log still tells them apart"
        );

        // UDP on a forbidden service is Denied, not UnsupportedFlow (no oracle).
        assert_eq!(
            authorize(&a, &open("db", "01", Flow::Udp), at(NOW), MAX).code,
            OpenCode::Denied
        );
        assert_eq!(
            authorize(&a, &open("demo", "01", Flow::Udp), at(NOW), MAX).code,
            OpenCode::UnsupportedFlow
        );
    }

    /// A denial by a `forbid` names it, and one by a policy that fails to evaluate says why:
    /// the audit record carries both. The twin: the `permit` alone allows.
    #[test]
    fn a_denial_names_the_forbid_or_the_evaluation_error() {
        let mut policies = allow_demo();
        policies.push(PolicyText {
            id: "no-demo-at-night".into(),
            text: r#"forbid (principal == Umbra::User::"demo@example.test", action, resource == Umbra::Service::"demo") when { context.now > 0 };"#.into(),
        });
        let a = Authority::new(snapshot(policies.clone()), NOW).unwrap();
        let v = authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!((v.code, v.reason.as_str()), (OpenCode::Denied, "forbidden"));
        assert_eq!(v.policies, ["no-demo-at-night"]);
        assert_eq!(v.error, None);

        // Overflows at evaluation: that policy errs, and the request is denied.
        policies[1].text = r#"forbid (principal, action, resource) when { context.now * 9223372036854775807 > 0 };"#.into();
        let a = Authority::new(snapshot(policies), NOW).unwrap();
        let v = authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!((v.code, v.reason.as_str()), (OpenCode::Denied, "error"));
        assert!(
            v.error
                .as_deref()
                .is_some_and(|e| e.contains("no-demo-at-night") || e.contains("overflow")),
            "{:?}",
            v.error
        );

        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let v = authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!((v.code, v.error), (OpenCode::Ok, None));
    }

    #[test]
    fn no_policy_no_access() {
        let a = Authority::new(snapshot(vec![]), NOW).unwrap();
        let v = authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW), MAX);
        assert_eq!(v.code, OpenCode::Denied);
        assert_eq!(v.reason, "no_permit");
    }

    #[test]
    fn revoked_serial_is_denied() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let v = authorize(&a, &open("demo", "dead", Flow::Tcp), at(NOW), MAX);
        assert_eq!(v.code, OpenCode::Denied);
        assert_eq!(v.reason, "revoked_certificate");
    }

    /// From its `not_after` on, the certificate the link was made with opens nothing, by
    /// wall-clock `now` (the link's timer may not have fired: a suspended machine), fresh
    /// snapshot or not; up to the second before, the same request is allowed.
    #[test]
    fn an_expired_certificate_opens_nothing() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let soon = NOW + 60;
        let req = OpenFacts {
            not_after: at(soon),
            ..open("demo", "01", Flow::Tcp)
        };
        let before = authorize(&a, &req, at(soon) - Duration::from_millis(1), MAX);
        assert_eq!(before.code, OpenCode::Ok);
        assert!(!before.ends_link());

        let after = authorize(&a, &req, at(soon), MAX);
        assert_eq!(after.code, OpenCode::Denied);
        assert_eq!(after.reason, CERTIFICATE_EXPIRED);
        assert!(after.ends_link(), "the link it came on closes too");
        // Also when the snapshot is stale, and on every other denial's path: this reason.
        let late = at(NOW + 3_600);
        assert_eq!(authorize(&a, &req, late, MAX).reason, CERTIFICATE_EXPIRED);
        // Other denials do not end the link.
        let forbidden = authorize(&a, &open("db", "01", Flow::Tcp), at(NOW), MAX);
        assert!(!forbidden.ends_link());
    }

    /// A revoked certificate past its `not_after` is no longer in the snapshot's revoked
    /// serials (the controller drops them then): it is still denied, as expired.
    #[test]
    fn a_revoked_certificate_stays_denied_once_its_serial_is_dropped() {
        let mut s = snapshot(allow_demo());
        s.revoked_serials.clear();
        let a = Authority::new(s, NOW).unwrap();
        let req = OpenFacts {
            not_after: at(NOW),
            ..open("demo", "dead", Flow::Tcp)
        };
        let v = authorize(&a, &req, at(NOW + 1), MAX);
        assert_eq!(
            (v.code, v.reason.as_str()),
            (OpenCode::Denied, CERTIFICATE_EXPIRED)
        );
    }

    #[test]
    fn stale_snapshot_refuses_then_fresh_again() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        assert_eq!(
            authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW + 600), MAX).code,
            OpenCode::Ok
        );
        assert_eq!(
            authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW + 601), MAX).code,
            OpenCode::Stale
        );
        let a = a.confirmed(NOW + 601, std::time::Instant::now());
        assert_eq!(
            authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW + 601), MAX).code,
            OpenCode::Ok
        );
    }

    fn live(id: u64, service: &str, target: &str) -> Arc<LiveEntry> {
        Arc::new(LiveEntry {
            id,
            device: "d1".into(),
            serial_hex: "01".into(),
            not_after: at(NOT_AFTER),
            user: "demo@example.test".into(),
            service: service.into(),
            target: target.into(),
            connector: "c1".into(),
            connector_serial: "c1".into(),
            transport: "quic",
            started_at: UNIX_EPOCH,
            counters: Default::default(),
            cancel: Default::default(),
            ended_for: Default::default(),
        })
    }

    fn ended(v: Vec<(&LiveEntry, String)>) -> Vec<(u64, String)> {
        v.into_iter().map(|(e, why)| (e.id, why)).collect()
    }

    /// A policy on `context.now` ends live streams when its time is up, with no new snapshot:
    /// allowed up to the second before, ended from that second on, every stream of that
    /// access, and only those.
    #[test]
    fn live_streams_end_when_a_time_bound_policy_runs_out() {
        let until = NOW + 100;
        let policies = vec![
            PolicyText {
                id: "demo-until".into(),
                text: format!(
                    r#"permit(principal == Umbra::User::"demo@example.test", action, resource == Umbra::Service::"demo") when {{ context.now < {until} }};"#
                ),
            },
            PolicyText {
                id: "db-always".into(),
                text: umbra_policy::allow_policy(
                    &umbra_policy::PolicySubject::User("demo@example.test".into()),
                    "db",
                ),
            },
        ];
        let a = Authority::new(snapshot(policies), NOW).unwrap();
        let streams = [
            live(1, "demo", "127.0.0.1:80"),
            live(2, "db", "127.0.0.1:5432"),
            live(3, "demo", "127.0.0.1:80"),
        ];
        assert!(recheck(&streams, &a, at(until - 1), MAX).is_empty());
        assert_eq!(
            ended(recheck(&streams, &a, at(until), MAX)),
            vec![(1, "no_permit".into()), (3, "no_permit".into())]
        );
    }

    /// Past the staleness limit every live stream ends (the broker can no longer tell what
    /// the controller allows); a confirmation in time keeps them.
    #[test]
    fn live_streams_end_once_the_snapshot_is_stale() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let streams = [live(1, "demo", "127.0.0.1:80")];
        assert!(recheck(&streams, &a, at(NOW + 600), MAX).is_empty());
        assert_eq!(
            ended(recheck(&streams, &a, at(NOW + 601), MAX)),
            vec![(1, "stale_snapshot".into())]
        );
        let a = a.confirmed(NOW + 601, std::time::Instant::now());
        assert!(recheck(&streams, &a, at(NOW + 601), MAX).is_empty());
    }

    /// A live stream ends when a re-check finds its certificate expired, with no new
    /// snapshot and whatever the link's timer did; the streams of a certificate still valid
    /// run on.
    #[test]
    fn live_streams_end_when_their_certificate_expires() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let soon = NOW + 60;
        let expiring = Arc::new(LiveEntry {
            not_after: at(soon),
            serial_hex: "02".into(),
            ..Arc::into_inner(live(1, "demo", "127.0.0.1:80")).unwrap()
        });
        let streams = [expiring, live(2, "demo", "127.0.0.1:80")];
        assert!(recheck(&streams, &a, at(soon - 1), MAX).is_empty());
        assert_eq!(
            ended(recheck(&streams, &a, at(soon), MAX)),
            vec![(1, CERTIFICATE_EXPIRED.into())]
        );
    }

    /// A stream registered as live after a re-check's sweep is decided again when that sweep
    /// could have ended it: the state went stale meanwhile (no new version), another
    /// snapshot, its certificate expired. Within the limit, under the same snapshot, it runs.
    #[test]
    fn a_stream_registered_after_a_sweep_is_decided_again_when_it_missed_one() {
        let decided = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let e = live(1, "demo", "127.0.0.1:80");
        // Decided at the last second of freshness, registered once the connector answered.
        let limit = NOW + MAX.as_secs();
        assert_eq!(
            recheck_registered(&e, &decided, &decided, at(limit), MAX),
            None
        );
        assert_eq!(
            recheck_registered(&e, &decided, &decided, at(limit + 1), MAX).as_deref(),
            Some("stale_snapshot")
        );
        // A confirmation that came meanwhile keeps it.
        let confirmed = decided.confirmed(limit + 1, std::time::Instant::now());
        assert_eq!(
            recheck_registered(&e, &decided, &confirmed, at(limit + 1), MAX),
            None
        );
        // A new snapshot that no longer allows it.
        let mut newer = snapshot(vec![]);
        newer.version += 1;
        let newer = Authority::new(newer, NOW).unwrap();
        assert_eq!(
            recheck_registered(&e, &decided, &newer, at(NOW), MAX).as_deref(),
            Some("no_permit")
        );
        // Its certificate expired while the connector dialed.
        let expiring = Arc::new(LiveEntry {
            not_after: at(NOW + 60),
            ..Arc::into_inner(live(1, "demo", "127.0.0.1:80")).unwrap()
        });
        assert_eq!(
            recheck_registered(&expiring, &decided, &decided, at(NOW + 59), MAX),
            None
        );
        assert_eq!(
            recheck_registered(&expiring, &decided, &decided, at(NOW + 60), MAX).as_deref(),
            Some(CERTIFICATE_EXPIRED)
        );
    }

    /// A stream to a target its service no longer has ends as `route_changed`; a denial
    /// says why first.
    #[test]
    fn live_streams_on_an_old_route_end() {
        let a = Authority::new(snapshot(allow_demo()), NOW).unwrap();
        let streams = [
            live(1, "demo", "127.0.0.1:80"),
            live(2, "demo", "127.0.0.1:8080"),
            live(3, "db", "127.0.0.1:9999"),
        ];
        assert_eq!(
            ended(recheck(&streams, &a, at(NOW), MAX)),
            vec![(2, ROUTE_CHANGED.into()), (3, "no_permit".into())]
        );
    }
}
