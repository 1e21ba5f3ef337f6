//! Changes an administrator makes in place, end to end in one process (see `stack_util`): a
//! real controller, a broker, the connector and two users' agent forwards over real sockets
//! and TLS. Each change is one snapshot version, so there is no moment in between: a live
//! stream that the new state still allows runs on across it (a remove and add would cut it),
//! and one that it no longer allows ends within [`ENFORCE`] while new ones are refused.
//!
//! In order, alice's live stream through each change, bob's forward as the bystander:
//! 1. a policy's text replaced by one that still allows alice (through a group): her stream
//!    runs on; an invalid text is refused and changes nothing;
//! 2. replaced by one that no longer allows her (checked first: the dry run names her live
//!    stream, not bob's, and changes nothing): her stream ends, new ones are refused, bob is
//!    served; the old text back, she is served again;
//! 3. alice disabled: the broker reports the change in force (`GET /v1/rollout`), her stream
//!    ends and new ones are refused (audited as `disabled_user`, the reason
//!    `GET /v1/access` gives too), bob is served; enabled again, her enrolled device is
//!    served at once;
//! 4. the service given a second connector: the route of live streams is unchanged, they run
//!    on; then given a new target: live streams to the old target end, and new connections
//!    reach the new target only;
//! 5. no change at all, but time: alice's policy allows her only until a second a few seconds
//!    ahead (`context.now`). Her live stream runs until then and ends at the broker's next
//!    re-check after it (every second here), never before; bob's runs on.
//!
//! Runs once per transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod stack_util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use stack_util::*;
use umbra_agent::TransportPref;
use umbra_policy::{PolicySubject, allow_policy};

const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
/// How soon a change must cut what it no longer allows.
const ENFORCE: Duration = Duration::from_secs(3);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

both_transports!(changes_in_place);

async fn changes_in_place(t: TransportPref) {
    init();
    let mut s = Stack::start(Opts {
        brokers: vec![],
        users: vec![ALICE, BOB],
    })
    .await;
    s.add_broker_with("reverifying", |c| c.reverify_secs = 1)
        .await;
    s.brokers_registered().await;
    s.ready().await;
    let alice = s.forward("alice", t, ECHO).await;
    let bob = s.forward("bob", t, ECHO).await;
    let (fa, fb) = (alice.local_addr(), bob.local_addr());
    poll("alice reaches echo", SOON, || echo_ok(fa)).await;
    poll("bob reaches echo", SOON, || echo_ok(fb)).await;
    let policy = "/v1/policies/alice-echo";
    let alice_only = allow_policy(&PolicySubject::User(ALICE.into()), ECHO);

    // 1. Replaced by a text that still allows alice: her stream runs on across the change.
    s.admin.post("/v1/groups", json!({ "name": "staff" })).await;
    s.admin
        .post("/v1/groups/staff/members", json!({ "user": ALICE }))
        .await;
    s.converge().await;
    let mut live = LiveConn::open(fa).await.unwrap();
    let staff = allow_policy(&PolicySubject::Group("staff".into()), ECHO);
    s.admin
        .ok("PUT", policy, Some(json!({ "text": staff })))
        .await;
    s.converge().await;
    live.echo(b"the group's policy allows this too")
        .await
        .unwrap();
    echo_ok(fa).await.unwrap();
    let (status, v) = s
        .admin
        .call("PUT", policy, Some(json!({ "text": "permit(" })))
        .await;
    assert_eq!(status, 400, "[{t}] {v}");
    assert_eq!(v["field"], "text", "[{t}] {v}");
    assert_eq!(
        s.admin.get("/v1/policies").await.as_array().unwrap().len(),
        2,
        "[{t}] alice's and bob's policies, nothing more"
    );
    live.echo(b"a refused change moves nothing").await.unwrap();

    // 2. Replaced by a text that no longer allows alice. Checked first: the check names her
    // live stream (as the broker reported it) and changes nothing.
    let bob_only = allow_policy(&PolicySubject::User(BOB.into()), ECHO);
    let check = format!("{policy}/check");
    let version = s.controller().snapshot_version();
    let mut bob_live = LiveConn::open(fb).await.unwrap();
    poll(
        "the check names alice's live stream, not bob's",
        SOON,
        || async {
            let r = s.admin.post(&check, json!({ "text": bob_only })).await;
            let ends: Vec<&str> = r["ends"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e["stream"]["user"].as_str())
                .collect();
            if ends == [ALICE] && r["live"].as_u64() == Some(2) {
                Ok(())
            } else {
                Err(format!("{r}"))
            }
        },
    )
    .await;
    assert_eq!(s.controller().snapshot_version(), version, "[{t}]");
    live.echo(b"a check moves nothing").await.unwrap();
    bob_live.echo(b"bob's stream is not named").await.unwrap();
    s.admin
        .ok("PUT", policy, Some(json!({ "text": bob_only })))
        .await;
    live.closed_within(ENFORCE).await.unwrap();
    poll("alice refused", ENFORCE, || refused(fa)).await;
    echo_ok(fb).await.unwrap();
    s.admin
        .ok("PUT", policy, Some(json!({ "text": alice_only })))
        .await;
    poll("alice served again", SOON, || echo_ok(fa)).await;

    // 3. Alice disabled, then enabled again.
    let live = LiveConn::open(fa).await.unwrap();
    let user = format!("/v1/users/{ALICE}");
    let u = s
        .admin
        .ok("PATCH", &user, Some(json!({ "disabled": true })))
        .await;
    assert_eq!(u["disabled"], true, "[{t}] {u}");
    // The broker confirms it has the change in force (its heartbeat reports the version
    // once the streams it ends are ended), as `umbra admin ... --wait` asks.
    let r = s.admin.get("/v1/rollout?wait=10").await;
    assert_eq!(
        (&r["applied"], &r["behind"]),
        (&json!(1), &json!(0)),
        "[{t}] {r}"
    );
    assert_eq!(r["brokers"][0]["state"], "applied", "[{t}] {r}");
    live.closed_within(ENFORCE).await.unwrap();
    poll("disabled alice refused", ENFORCE, || refused(fa)).await;
    echo_ok(fb).await.unwrap();
    let device = s.agent("alice").device.clone();
    poll("the denial says why", SOON, || async {
        let audit = s.admin.audit().await;
        let why = audit.iter().any(|e| {
            e["action"] == "stream.open"
                && e["result"] == "deny"
                && e["detail"]["device"] == device.as_str()
                && e["detail"]["reason"] == "disabled_user"
        });
        if why {
            Ok(())
        } else {
            Err(format!("{} entries, no disabled_user denial", audit.len()))
        }
    })
    .await;
    // The controller's answer to "may alice reach echo?" is the broker's.
    let asked = format!("/v1/access?user={ALICE}&service={ECHO}");
    let v = s.admin.get(&asked).await;
    assert_eq!(v["decisions"][0]["reason"], "disabled_user", "[{t}] {v}");
    s.admin
        .ok("PATCH", &user, Some(json!({ "disabled": false })))
        .await;
    poll("enabled alice served again", SOON, || echo_ok(fa)).await;

    // 4. The service's route: a second connector leaves the live route as it was; a new
    // target ends the streams to the old one.
    let mut live = LiveConn::open(fa).await.unwrap();
    let mut bob_live = LiveConn::open(fb).await.unwrap();
    s.admin.token("connector", None, Some("spare")).await;
    let service = format!("/v1/services/{ECHO}");
    let v = s
        .admin
        .ok(
            "PATCH",
            &service,
            Some(json!({ "connectors": [CONNECTOR, "spare"] })),
        )
        .await;
    assert_eq!(v["connectors"], json!([CONNECTOR, "spare"]), "[{t}] {v}");
    s.converge().await;
    live.echo(b"same target, same connector").await.unwrap();
    bob_live.echo(b"same for bob").await.unwrap();

    let (moved, accepted, task) = counting_echo().await;
    let v = s
        .admin
        .ok(
            "PATCH",
            &service,
            Some(json!({ "target": moved.to_string() })),
        )
        .await;
    assert_eq!(v["target"], moved.to_string(), "[{t}] {v}");
    live.closed_within(ENFORCE).await.unwrap();
    bob_live.closed_within(ENFORCE).await.unwrap();
    // The connector learns the new target by its own long poll; until then it refuses it.
    poll("alice reaches the new target", SOON, || echo_ok(fa)).await;
    let reached = accepted.load(Ordering::SeqCst);
    assert!(reached >= 1, "[{t}] the new target was never dialed");
    echo_ok(fb).await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        reached + 1,
        "[{t}] bob's new connection goes to the new target"
    );

    // 5. Time alone: allowed until `until`, then not, with no admin change in between.
    let until = unix_now() + 5;
    let text = format!(
        r#"permit(principal == Umbra::User::"{ALICE}", action, resource == Umbra::Service::"{ECHO}") when {{ context.now < {until} }};"#
    );
    s.admin
        .ok("PUT", policy, Some(json!({ "text": text })))
        .await;
    s.converge().await;
    let live = LiveConn::open(fa).await.unwrap();
    let mut bob_live = LiveConn::open(fb).await.unwrap();
    live.closed_within(Duration::from_secs(5 + 1) + ENFORCE)
        .await
        .unwrap();
    let closed_at = unix_now();
    assert!(
        closed_at >= until,
        "[{t}] alice's stream ended at {closed_at}, before her access ran out at {until}"
    );
    bob_live.echo(b"bob's policy has no end").await.unwrap();
    let v = s.admin.get(&asked).await;
    assert_eq!(v["decisions"][0]["reason"], "no_permit", "[{t}] {v}");
    refused(fa).await.unwrap();
    poll("the end is audited with its reason", SOON, || async {
        let audit = s.admin.audit().await;
        let why = audit.iter().any(|e| {
            e["action"] == "stream.revoke"
                && e["detail"]["device"] == device.as_str()
                && e["detail"]["reason"] == "no_permit"
        });
        if why {
            Ok(())
        } else {
            Err(format!(
                "{} entries, no stream.revoke for no_permit",
                audit.len()
            ))
        }
    })
    .await;
    task.abort();
    alice.shutdown().await;
    bob.shutdown().await;
}
