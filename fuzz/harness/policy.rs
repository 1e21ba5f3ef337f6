//! One input of the `policy` fuzz target: Cedar policy text, as an administrator stores it
//! (`validate_policy`, the controller's check at write time) and as every broker compiles it
//! from a snapshot (`Engine::from_snapshot`), then decides requests with it.
//!
//! Shared, through `#[path]`, by `fuzz/fuzz_targets/policy.rs` (libFuzzer) and by
//! `crates/umbra-policy/tests/fuzz_corpus.rs` (replays the corpus under `cargo test`). Uses
//! only crates `umbra-policy` itself depends on.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use umbra_policy::{AccessRequest, Engine, Reason, RequestContext, validate_policy};
use umbra_proto::Snapshot;
use umbra_proto::snapshot::{DeviceFacts, PolicyText, ServiceFacts, UserFacts};

/// Alice's device (she is in group `eng`).
pub(crate) const ALICE_DEVICE: &str = "d-0123456789abcdef";
/// Bob's device (his account is disabled).
pub(crate) const BOB_DEVICE: &str = "d-fedcba9876543210";
/// A revoked device of Alice's.
pub(crate) const REVOKED_DEVICE: &str = "d-00000000000000aa";
const ALICE: &str = "alice@example.test";

/// The facts every input is judged against, with `text` as the one stored policy.
pub(crate) fn snapshot(text: &str) -> Snapshot {
    Snapshot {
        version: 9,
        org: "acme".into(),
        issued_at: 1_800_000_000,
        users: vec![
            UserFacts {
                id: ALICE.into(),
                groups: vec!["eng".into()],
                disabled: false,
            },
            UserFacts {
                id: "bob@example.test".into(),
                groups: vec!["eng".into()],
                disabled: true,
            },
        ],
        groups: vec!["eng".into(), "ops".into()],
        devices: vec![
            DeviceFacts {
                id: ALICE_DEVICE.into(),
                user: ALICE.into(),
                revoked: false,
            },
            DeviceFacts {
                id: BOB_DEVICE.into(),
                user: "bob@example.test".into(),
                revoked: false,
            },
            DeviceFacts {
                id: REVOKED_DEVICE.into(),
                user: ALICE.into(),
                revoked: true,
            },
        ],
        services: ["demo", "wiki"]
            .into_iter()
            .map(|name| ServiceFacts {
                name: name.into(),
                target: "127.0.0.1:8080".into(),
                connectors: vec!["c-0123456789abcdef".into()],
            })
            .collect(),
        policies: vec![PolicyText {
            id: "fuzzed".into(),
            text: text.into(),
        }],
        ..Snapshot::default()
    }
}

/// Policy text (UTF-8): never panics; what the controller accepts at write time every broker
/// compiles (or one write would leave every broker on the snapshot before it); whatever
/// compiles decides deterministically, denies by default what does not exist or may not
/// (unknown service or device, revoked device, disabled user), allows only by a `permit`, and
/// lists exactly the services it allows. True if the controller would store the text.
pub(crate) fn policy(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let written = validate_policy(text);
    let loaded = Engine::from_snapshot(&snapshot(text));
    if let Ok(n) = &written {
        assert!(*n >= 1, "{n} policies accepted");
        if let Err(e) = &loaded {
            panic!("stored at write time, refused by brokers: {e}");
        }
    }
    let Ok(engine) = &loaded else {
        return written.is_ok();
    };
    for transport in ["quic", "tcp"] {
        let ctx = RequestContext {
            now_unix: 1_800_000_000,
            transport,
        };
        let decide = |device, service| {
            engine.decide(&AccessRequest {
                device,
                service,
                ctx,
            })
        };
        for device in [
            ALICE_DEVICE,
            BOB_DEVICE,
            REVOKED_DEVICE,
            "d-1111111111111111",
        ] {
            for service in ["demo", "wiki", "unpublished"] {
                let d = decide(device, service);
                assert_eq!(d, decide(device, service), "not deterministic");
                let may_allow = device == ALICE_DEVICE && service != "unpublished";
                assert!(!d.allow || may_allow, "{device} allowed {service}: {d:?}");
                assert_eq!(
                    d.allow,
                    matches!(d.reason, Reason::Permitted { .. }),
                    "{d:?}"
                );
            }
        }
        let listed = engine.services_for(ALICE, ALICE_DEVICE, &ctx);
        let allowed: Vec<String> = ["demo", "wiki"]
            .into_iter()
            .filter(|s| decide(ALICE_DEVICE, s).allow)
            .map(String::from)
            .collect();
        assert_eq!(listed, allowed, "services listed differ from those decided");
        for device in [BOB_DEVICE, REVOKED_DEVICE] {
            let owner = engine.device_owner(device).unwrap();
            assert!(
                engine.services_for(owner, device, &ctx).is_empty(),
                "{device}"
            );
        }
    }
    written.is_ok()
}
