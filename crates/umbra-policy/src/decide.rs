//! The access decision: pure, no clock, no I/O.
//!
//! Order of checks in [`Engine::decide`], first match wins:
//! 1. device not in the snapshot -> [`Reason::UnknownDevice`]
//! 2. device revoked -> [`Reason::RevokedDevice`]
//! 3. the device's owner unknown or disabled -> [`Reason::DisabledUser`]
//! 4. service not published -> [`Reason::UnknownService`] (after Cedar has been asked all the
//!    same, so that an unknown name costs what a forbidden one does: no timing oracle)
//! 5. Cedar, with the owner as principal, `Umbra::Action::"connect"`, the service as resource:
//!    a satisfied `forbid` -> [`Reason::Forbidden`]; else any evaluation error ->
//!    [`Reason::Error`]; else a satisfied `permit` -> [`Reason::Permitted`]; else
//!    [`Reason::NoPermit`] (default deny: no policy, no access).
//!
//! Evaluation errors deny even when some `permit` holds. Cedar itself skips a policy whose
//! evaluation fails, so an erroring `forbid` would otherwise be silently ignored.
//!
//! Only the `Reason` tells denials apart; it is for the audit log. What the peer sees is the
//! broker's business (one answer for every denial).

use cedar_policy::{Context, Decision as CedarDecision, EntityUid, Request, RestrictedExpression};

use crate::engine::Engine;
use crate::schema::uid;

/// One connection attempt: a device asks for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRequest<'a> {
    /// Device id from the agent's verified certificate. The user is the device's owner in the
    /// snapshot.
    pub device: &'a str,
    /// Service name from the agent's `Open` frame.
    pub service: &'a str,
    pub ctx: RequestContext,
}

/// Facts about the request that are not in the snapshot. Becomes Cedar's `context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestContext {
    /// The caller's clock, Unix seconds (`context.now`). Injected, never read here.
    pub now_unix: i64,
    /// The link transport, `"quic"` or `"tcp"` (`context.transport`).
    pub transport: &'static str,
}

/// The outcome of [`Engine::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    /// The user the decision was made for (the device's owner), when the device is known.
    pub user: Option<String>,
}

/// Why access was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Allowed by these `permit` policies (sorted ids).
    Permitted { policies: Vec<String> },
    /// Denied: no `permit` applies (default deny).
    NoPermit,
    /// Denied by these `forbid` policies (sorted ids), whatever permits too.
    Forbidden { policies: Vec<String> },
    /// Denied: the service is not published.
    UnknownService,
    /// Denied: the device is not in the snapshot.
    UnknownDevice,
    /// Denied: the device was revoked.
    RevokedDevice,
    /// Denied: the device's owner is disabled or not in the snapshot.
    DisabledUser,
    /// Denied: the request could not be evaluated (evaluation error in a policy, or a request
    /// that does not fit the schema). Holds the details for the audit log.
    Error(String),
}

impl Reason {
    /// Stable snake_case name for logs, metrics and audit records.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Permitted { .. } => "permitted",
            Reason::NoPermit => "no_permit",
            Reason::Forbidden { .. } => "forbidden",
            Reason::UnknownService => "unknown_service",
            Reason::UnknownDevice => "unknown_device",
            Reason::RevokedDevice => "revoked_device",
            Reason::DisabledUser => "disabled_user",
            Reason::Error(_) => "error",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Permitted { policies } | Reason::Forbidden { policies } => {
                write!(f, "{} by {}", self.as_str(), policies.join(", "))
            }
            Reason::Error(e) => write!(f, "error: {e}"),
            _ => f.write_str(self.as_str()),
        }
    }
}

impl Engine {
    /// Decides whether `req.device`'s owner may connect to `req.service`. See the module docs
    /// for the order of checks.
    pub fn decide(&self, req: &AccessRequest<'_>) -> Decision {
        let Some(device) = self.facts.devices.get(req.device) else {
            return Decision::deny(Reason::UnknownDevice, None);
        };
        let user = Some(device.owner.clone());
        if device.revoked {
            return Decision::deny(Reason::RevokedDevice, user);
        }
        if !self.facts.user_enabled(&device.owner) {
            return Decision::deny(Reason::DisabledUser, user);
        }
        // Evaluated before the service is looked up, and for an unknown service thrown away:
        // refusing an unknown name without asking Cedar would answer faster than refusing a
        // forbidden one, and a peer timing its answers could tell which names are published.
        let reason = self.evaluate(&device.owner, req.device, req.service, &req.ctx);
        if !self.facts.services.contains(req.service) {
            return Decision::deny(Reason::UnknownService, user);
        }
        Decision {
            allow: matches!(reason, Reason::Permitted { .. }),
            reason,
            user,
        }
    }

    /// The published services `user` may reach from `device` in context `ctx`, sorted by name.
    ///
    /// Runs the same checks as [`decide`](Self::decide) with `user` as the principal (pass
    /// [`device_owner`](Self::device_owner) to match `decide` exactly). Empty when the device is
    /// unknown or revoked or the user is unknown or disabled.
    pub fn services_for(&self, user: &str, device: &str, ctx: &RequestContext) -> Vec<String> {
        let device_ok = self.facts.devices.get(device).is_some_and(|d| !d.revoked);
        if !device_ok || !self.facts.user_enabled(user) {
            return Vec::new();
        }
        self.facts
            .services
            .iter()
            .filter(|service| {
                matches!(
                    self.evaluate(user, device, service, ctx),
                    Reason::Permitted { .. }
                )
            })
            .cloned()
            .collect()
    }

    /// Asks Cedar. The caller has checked that user, device and service exist.
    fn evaluate(&self, user: &str, device: &str, service: &str, ctx: &RequestContext) -> Reason {
        let device_uid = uid(&self.types.device, device);
        let request = cedar_context(device_uid, ctx).and_then(|context| {
            Request::new(
                uid(&self.types.user, user),
                self.types.connect.clone(),
                uid(&self.types.service, service),
                context,
                Some(&self.schema),
            )
            .map_err(|e| e.to_string())
        });
        let request = match request {
            Ok(r) => r,
            Err(e) => return Reason::Error(format!("request does not fit the schema: {e}")),
        };

        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &self.entities);
        let diagnostics = response.diagnostics();
        let mut policies: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        policies.sort_unstable();
        if response.decision() == CedarDecision::Deny && !policies.is_empty() {
            return Reason::Forbidden { policies };
        }
        let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        if !errors.is_empty() {
            return Reason::Error(errors.join("; "));
        }
        match response.decision() {
            CedarDecision::Allow => Reason::Permitted { policies },
            CedarDecision::Deny => Reason::NoPermit,
        }
    }
}

impl Decision {
    fn deny(reason: Reason, user: Option<String>) -> Decision {
        Decision {
            allow: false,
            reason,
            user,
        }
    }
}

/// The Cedar `context` record (`ConnectContext` in the schema). New attributes go here.
fn cedar_context(device: EntityUid, ctx: &RequestContext) -> Result<Context, String> {
    Context::from_pairs([
        (
            "device".to_owned(),
            RestrictedExpression::new_entity_uid(device),
        ),
        (
            "transport".to_owned(),
            RestrictedExpression::new_string(ctx.transport.to_owned()),
        ),
        (
            "now".to_owned(),
            RestrictedExpression::new_long(ctx.now_unix),
        ),
    ])
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PolicyError, PolicySubject, allow_policy};
    use umbra_proto::Snapshot;
    use umbra_proto::snapshot::{DeviceFacts, PolicyText, ServiceFacts, UserFacts};

    const NOW: i64 = 1_700_000_000;
    const QUIC: RequestContext = RequestContext {
        now_unix: NOW,
        transport: "quic",
    };

    fn user(id: &str, groups: &[&str]) -> UserFacts {
        UserFacts {
            id: id.into(),
            groups: groups.iter().map(|g| (*g).into()).collect(),
            disabled: false,
        }
    }

    fn device(id: &str, owner: &str) -> DeviceFacts {
        DeviceFacts {
            id: id.into(),
            user: owner.into(),
            revoked: false,
        }
    }

    fn service(name: &str) -> ServiceFacts {
        ServiceFacts {
            name: name.into(),
            target: "127.0.0.1:80".into(),
            connectors: vec!["c1".into()],
        }
    }

    fn policy(id: &str, text: &str) -> PolicyText {
        PolicyText {
            id: id.into(),
            text: text.into(),
        }
    }

    /// alice (eng) on d-alice, bob (no group) on d-bob; services web, db, wiki.
    /// Policy: alice may reach web.
    fn base() -> Snapshot {
        Snapshot {
            version: 3,
            org: "acme".into(),
            groups: vec!["eng".into()],
            users: vec![
                user("alice@example.com", &["eng"]),
                user("bob@example.com", &[]),
            ],
            devices: vec![
                device("d-alice", "alice@example.com"),
                device("d-bob", "bob@example.com"),
            ],
            services: vec![service("web"), service("db"), service("wiki")],
            policies: vec![policy(
                "alice-web",
                &allow_policy(&PolicySubject::User("alice@example.com".into()), "web"),
            )],
            ..Snapshot::default()
        }
    }

    fn engine(s: &Snapshot) -> Engine {
        Engine::from_snapshot(s).unwrap()
    }

    fn decide(e: &Engine, device: &str, service: &str) -> Decision {
        e.decide(&AccessRequest {
            device,
            service,
            ctx: QUIC,
        })
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
    }

    #[test]
    fn allowed() {
        let e = engine(&base());
        let d = decide(&e, "d-alice", "web");
        assert_eq!(
            d,
            Decision {
                allow: true,
                reason: Reason::Permitted {
                    policies: vec!["alice-web".into()]
                },
                user: Some("alice@example.com".into()),
            }
        );
        assert_eq!(e.version(), 3);
        assert_eq!(e.device_owner("d-alice"), Some("alice@example.com"));
        assert_eq!(e.device_owner("nope"), None);
    }

    #[test]
    fn denied_without_policy() {
        let e = engine(&base());
        // Twin of `allowed`: same device, other service; other user, same service.
        let d = decide(&e, "d-alice", "db");
        assert!(!d.allow);
        assert_eq!(d.reason, Reason::NoPermit);
        assert_eq!(decide(&e, "d-bob", "web").reason, Reason::NoPermit);

        let mut s = base();
        s.policies.clear();
        let e = engine(&s);
        assert_eq!(decide(&e, "d-alice", "web").reason, Reason::NoPermit);
    }

    #[test]
    fn unknown_service() {
        let e = engine(&base());
        let d = decide(&e, "d-alice", "nope");
        assert!(!d.allow);
        assert_eq!(d.reason, Reason::UnknownService);
        assert_eq!(d.user.as_deref(), Some("alice@example.com"));
    }

    /// Cedar is asked for an unknown service too (see `decide`), and its answer never counts:
    /// even a policy that permits every resource lets no one reach a name not published.
    #[test]
    fn an_unknown_service_stays_denied_under_a_policy_for_every_resource() {
        let mut s = base();
        s.policies = vec![policy("all", "permit(principal, action, resource);")];
        let e = engine(&s);
        let d = decide(&e, "d-bob", "nope");
        assert!(!d.allow);
        assert_eq!(d.reason, Reason::UnknownService);
        // The twin: a published one is reached under it.
        assert!(decide(&e, "d-bob", "db").allow);
    }

    #[test]
    fn unknown_device() {
        let e = engine(&base());
        let d = decide(&e, "d-mallory", "web");
        assert_eq!(d, Decision::deny(Reason::UnknownDevice, None));
    }

    #[test]
    fn group_membership_permits() {
        let mut s = base();
        s.policies = vec![policy(
            "eng-db",
            &allow_policy(&PolicySubject::Group("eng".into()), "db"),
        )];
        let e = engine(&s);
        assert!(decide(&e, "d-alice", "db").allow);
        // bob is not in eng.
        assert_eq!(decide(&e, "d-bob", "db").reason, Reason::NoPermit);
    }

    #[test]
    fn everyone_permits_every_enabled_user() {
        let mut s = base();
        s.policies = vec![policy(
            "all-wiki",
            &allow_policy(&PolicySubject::Everyone, "wiki"),
        )];
        let e = engine(&s);
        assert!(decide(&e, "d-alice", "wiki").allow);
        assert!(decide(&e, "d-bob", "wiki").allow);
        assert!(!decide(&e, "d-bob", "web").allow);
    }

    #[test]
    fn forbid_overrides_permit() {
        let mut s = base();
        s.policies.push(policy(
            "no-eng-web",
            r#"forbid (principal in Umbra::Group::"eng", action, resource == Umbra::Service::"web");"#,
        ));
        s.policies.push(policy(
            "all-web",
            &allow_policy(&PolicySubject::Everyone, "web"),
        ));
        let e = engine(&s);
        let d = decide(&e, "d-alice", "web");
        assert!(!d.allow);
        assert_eq!(
            d.reason,
            Reason::Forbidden {
                policies: vec!["no-eng-web".into()]
            }
        );
        // Twin: bob is not in eng and still gets in.
        assert_eq!(
            decide(&e, "d-bob", "web").reason,
            Reason::Permitted {
                policies: vec!["all-web".into()]
            }
        );
    }

    #[test]
    fn revoked_device() {
        let mut s = base();
        s.devices[0].revoked = true;
        s.devices.push(device("d-alice-2", "alice@example.com"));
        let e = engine(&s);
        let d = decide(&e, "d-alice", "web");
        assert!(!d.allow);
        assert_eq!(d.reason, Reason::RevokedDevice);
        assert_eq!(d.user.as_deref(), Some("alice@example.com"));
        // Twin: alice's other device still works.
        assert!(decide(&e, "d-alice-2", "web").allow);
        assert!(
            e.services_for("alice@example.com", "d-alice", &QUIC)
                .is_empty()
        );
    }

    #[test]
    fn disabled_user() {
        let mut s = base();
        s.policies.push(policy(
            "all-web",
            &allow_policy(&PolicySubject::Everyone, "web"),
        ));
        s.users[0].disabled = true;
        let e = engine(&s);
        let d = decide(&e, "d-alice", "web");
        assert!(!d.allow);
        assert_eq!(d.reason, Reason::DisabledUser);
        // Twin: bob is unaffected.
        assert!(decide(&e, "d-bob", "web").allow);
        assert!(
            e.services_for("alice@example.com", "d-alice", &QUIC)
                .is_empty()
        );
    }

    #[test]
    fn owner_missing_from_snapshot_is_disabled() {
        let mut s = base();
        s.devices.push(device("d-ghost", "ghost@example.com"));
        s.policies.push(policy(
            "all-web",
            &allow_policy(&PolicySubject::Everyone, "web"),
        ));
        let e = engine(&s);
        let d = decide(&e, "d-ghost", "web");
        assert_eq!(d.reason, Reason::DisabledUser);
        assert_eq!(d.user.as_deref(), Some("ghost@example.com"));
    }

    #[test]
    fn check_order_device_before_service() {
        let mut s = base();
        s.devices[0].revoked = true;
        let e = engine(&s);
        assert_eq!(decide(&e, "d-alice", "nope").reason, Reason::RevokedDevice);
        assert_eq!(decide(&e, "d-x", "nope").reason, Reason::UnknownDevice);
    }

    #[test]
    fn removing_the_policy_denies() {
        let s = base();
        assert!(decide(&engine(&s), "d-alice", "web").allow);
        let mut next = s.clone();
        next.version += 1;
        next.policies.retain(|p| p.id != "alice-web");
        let e = engine(&next);
        assert_eq!(e.version(), 4);
        assert_eq!(decide(&e, "d-alice", "web").reason, Reason::NoPermit);
    }

    #[test]
    fn services_for_lists_exactly_the_permitted_services_sorted() {
        let mut s = base();
        s.services.push(service("admin"));
        s.policies.push(policy(
            "eng",
            &[
                allow_policy(&PolicySubject::Group("eng".into()), "wiki"),
                allow_policy(&PolicySubject::Group("eng".into()), "admin"),
            ]
            .concat(),
        ));
        s.policies.push(policy(
            "no-admin-on-tcp",
            r#"forbid (principal, action, resource == Umbra::Service::"admin") when { context.transport != "quic" };"#,
        ));
        let e = engine(&s);
        assert_eq!(
            e.services_for("alice@example.com", "d-alice", &QUIC),
            ["admin", "web", "wiki"]
        );
        let tcp = RequestContext {
            transport: "tcp",
            ..QUIC
        };
        assert_eq!(
            e.services_for("alice@example.com", "d-alice", &tcp),
            ["web", "wiki"]
        );
        assert!(e.services_for("bob@example.com", "d-bob", &QUIC).is_empty());
        assert!(
            e.services_for("alice@example.com", "d-nope", &QUIC)
                .is_empty()
        );
        assert!(
            e.services_for("nobody@example.com", "d-alice", &QUIC)
                .is_empty()
        );
        // The second policy of the stored text is reported as `eng#1`.
        assert_eq!(
            decide(&e, "d-alice", "admin").reason,
            Reason::Permitted {
                policies: vec!["eng#1".into()]
            }
        );
    }

    #[test]
    fn context_is_usable_in_policies() {
        let mut s = base();
        s.policies = vec![
            policy(
                "quic-only",
                r#"permit (principal, action, resource == Umbra::Service::"web") when { context.transport == "quic" };"#,
            ),
            policy(
                "until",
                r#"permit (principal, action, resource == Umbra::Service::"db") when { context.now < 1700000100 && context.device.owner == principal };"#,
            ),
        ];
        let e = engine(&s);
        let at = |device: &'static str, service: &'static str, now_unix, transport| {
            e.decide(&AccessRequest {
                device,
                service,
                ctx: RequestContext {
                    now_unix,
                    transport,
                },
            })
            .reason
        };
        assert_eq!(
            at("d-bob", "web", NOW, "quic"),
            Reason::Permitted {
                policies: vec!["quic-only".into()]
            }
        );
        assert_eq!(at("d-bob", "web", NOW, "tcp"), Reason::NoPermit);
        assert!(matches!(
            at("d-alice", "db", NOW + 99, "tcp"),
            Reason::Permitted { .. }
        ));
        assert_eq!(at("d-alice", "db", NOW + 100, "tcp"), Reason::NoPermit);
    }

    #[test]
    fn evaluation_error_denies_even_with_a_permit() {
        let mut s = base();
        // Overflows at evaluation time; the validator cannot see that.
        s.policies.push(policy(
            "overflow",
            r#"forbid (principal, action, resource == Umbra::Service::"web") when { context.now * 9223372036854775807 > 0 };"#,
        ));
        let e = engine(&s);
        let d = decide(&e, "d-alice", "web");
        assert!(!d.allow);
        assert!(
            matches!(&d.reason, Reason::Error(m) if m.contains("overflow")),
            "{:?}",
            d.reason
        );
        // Twin: other services are not affected by the broken policy.
        s.policies.push(policy(
            "bob-db",
            &allow_policy(&PolicySubject::User("bob@example.com".into()), "db"),
        ));
        assert!(decide(&engine(&s), "d-bob", "db").allow);
    }

    #[test]
    fn bad_stored_policy_fails_the_snapshot() {
        let mut s = base();
        s.policies.push(policy("broken", "permit (principal"));
        let err = Engine::from_snapshot(&s).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Stored { id, error } if id == "broken" && matches!(**error, PolicyError::Syntax(_))),
            "{err:?}"
        );

        let mut s = base();
        s.policies.push(policy(
            "typo",
            r#"permit (principal, action, resource) when { context.transprot == "quic" };"#,
        ));
        let err = Engine::from_snapshot(&s).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Stored { id, error } if id == "typo" && matches!(**error, PolicyError::Invalid(_))),
            "{err:?}"
        );

        let mut s = base();
        s.policies.push(s.policies[0].clone());
        assert_eq!(
            Engine::from_snapshot(&s).unwrap_err(),
            PolicyError::DuplicatePolicyId("alice-web".into())
        );
    }

    #[test]
    fn reason_names_are_stable() {
        let all = [
            (Reason::Permitted { policies: vec![] }, "permitted"),
            (Reason::NoPermit, "no_permit"),
            (Reason::Forbidden { policies: vec![] }, "forbidden"),
            (Reason::UnknownService, "unknown_service"),
            (Reason::UnknownDevice, "unknown_device"),
            (Reason::RevokedDevice, "revoked_device"),
            (Reason::DisabledUser, "disabled_user"),
            (Reason::Error("x".into()), "error"),
        ];
        for (reason, name) in all {
            assert_eq!(reason.as_str(), name);
        }
        let forbidden = Reason::Forbidden {
            policies: vec!["a".into(), "b#1".into()],
        };
        assert_eq!(forbidden.to_string(), "forbidden by a, b#1");
    }
}
