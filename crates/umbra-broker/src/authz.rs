//! Stream authorization: may this device open a stream to this service, now?
//!
//! Decided locally from the current [`Authority`], with no controller round trip. Every deny
//! carries its reason for the audit log, but the wire answer for an unknown service and a
//! forbidden one is the same [`OpenCode::Denied`], so the answer is no oracle of what exists.

use std::time::{Duration, SystemTime};

use umbra_policy::{AccessRequest, Reason, RequestContext};
use umbra_proto::{Flow, OpenCode};

use crate::authority::{Authority, unix};

/// Facts about one `Open` request.
pub(crate) struct OpenFacts<'a> {
    pub(crate) device: &'a str,
    pub(crate) serial_hex: &'a str,
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
    /// Policies that decided it.
    pub(crate) policies: Vec<String>,
}

impl Verdict {
    fn deny(code: OpenCode, reason: &str, user: Option<String>) -> Self {
        Verdict {
            code,
            reason: reason.into(),
            user,
            policies: vec![],
        }
    }
}

/// Decides an `Open`. Only `OpenCode::Ok` lets bytes reach a connector.
pub(crate) fn authorize(
    a: &Authority,
    req: &OpenFacts<'_>,
    now: SystemTime,
    max_staleness: Duration,
) -> Verdict {
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
        return Verdict::deny(OpenCode::Denied, d.reason.as_str(), d.user);
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

    fn open<'a>(service: &'a str, serial: &'a str, flow: Flow) -> OpenFacts<'a> {
        OpenFacts {
            device: "d1",
            serial_hex: serial,
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
        let a = a.confirmed(NOW + 601);
        assert_eq!(
            authorize(&a, &open("demo", "01", Flow::Tcp), at(NOW + 601), MAX).code,
            OpenCode::Ok
        );
    }
}
