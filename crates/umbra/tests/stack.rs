//! The whole system in one process: a real controller, brokers, a connector, agents' forwards
//! and a TCP echo target, on loopback with real TLS and real enrollments (see `stack_util`).
//!
//! Every refusal is checked next to its legitimate twin in the same deployment, so a case
//! cannot pass because everything is broken. Data-path cases run once per agent transport
//! (QUIC, and TLS over TCP): `data_path::quic`, `data_path::tcp`, and so on.
//!
//! Malformed, oversized and unknown header frames are sent on each hop by a stand-in for the
//! peer: an agent dialed by hand (`data_path`, step 9), a connector dialed by hand with the
//! connector's identity (`malformed_dial_replies`), a broker stand-in in front of a real agent
//! (`malformed_open_replies`); the connector's side is `umbra-connector/tests/serve.rs`. Each
//! case asserts that the offending link is closed, that the error was logged naming the peer
//! (log lines are captured, see `stack_util::logged`), that no task panicked, and that a
//! legitimate link still works afterwards.
//!
//! `RUST_LOG=info cargo test -p umbra --test stack -- --nocapture` shows the components' logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod stack_util;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use stack_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use umbra_agent::TransportPref;
use umbra_link::Transport;
use umbra_pki::TlsIdentity;
use umbra_proto::{DialCode, Frame, OpenCode, PeerId, Role};

const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const CAROL: &str = "carol@example.test";
/// Published by no one.
const NOSUCH: &str = "nosuch";
/// How soon revocations and policy removals must take effect.
const ENFORCE: Duration = Duration::from_secs(3);

both_transports!(data_path);
both_transports!(brokers_and_controller_away);
both_transports!(malformed_dial_replies);
both_transports!(malformed_open_replies);

/// One deployment, cases in order from harmless to destructive: allowed bytes, denials, policy
/// removal, hand-made links (chain lending, garbage frames, foreign CA, forged leaf), device
/// revocation, connector revocation.
///
/// Users: alice and bob forward through their agents; carol's identity is used by hand at
/// the frame level.
async fn data_path(t: TransportPref) {
    init();
    let lt = link_transport(t);
    let s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE, BOB, CAROL],
    })
    .await;
    let b0 = &s.brokers[0];
    let alice = s.forward("alice", t, ECHO).await;
    let bob = s.forward("bob", t, ECHO).await;
    let (fa, fb) = (alice.local_addr(), bob.local_addr());
    poll("alice reaches echo", SOON, || echo_ok(fa)).await;
    poll("bob reaches echo", SOON, || echo_ok(fb)).await;
    let carol = s.agent("carol").identity();

    // 1. Allowed: 8 MiB each way, intact; then half-close.
    let big = pattern(8 << 20);
    let started = Instant::now();
    round_trip(fa, &big, Duration::from_secs(60)).await.unwrap();
    eprintln!("[{t}] 8 MiB each way in {:?}", started.elapsed());
    half_close(fa).await;

    // 1b. A forward where other hosts could connect is refused unless allowed; allowed, it
    // serves like any other.
    let mut cfg = s.agent("alice").config(t);
    match umbra_agent::Forwarder::start(cfg.clone(), ECHO, "0.0.0.0:0".parse().unwrap()).await {
        Err(e @ umbra_agent::AgentError::RemoteListen(_)) => {
            assert!(e.to_string().contains("--allow-remote-clients"), "{e}")
        }
        Err(e) => panic!("[{t}] forward on 0.0.0.0: {e}"),
        Ok(f) => panic!("[{t}] a forward listens on {}", f.local_addr()),
    }
    cfg.allow_remote_clients = true;
    let shared = umbra_agent::Forwarder::start(cfg, ECHO, "0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    assert!(shared.local_addr().ip().is_unspecified(), "[{t}]");
    echo_ok(([127, 0, 0, 1], shared.local_addr().port()).into())
        .await
        .unwrap();
    shared.shutdown().await;

    // 2. Denied (published, no policy) and unknown service: the forward closes without a
    // byte, the broker answers both with the same Denied, the audit log tells them apart.
    let secret = s.forward("alice", t, SECRET).await;
    let nosuch = s.forward("alice", t, NOSUCH).await;
    refused(secret.local_addr()).await.unwrap();
    refused(nosuch.local_addr()).await.unwrap();
    echo_ok(fa).await.unwrap();
    let link = dial(b0, lt, &carol).await.unwrap();
    assert_eq!(open_code(&link, SECRET).await.unwrap(), OpenCode::Denied);
    assert_eq!(open_code(&link, NOSUCH).await.unwrap(), OpenCode::Denied);
    let (code, mut st) = open(&link, ECHO).await.unwrap();
    assert_eq!(code, OpenCode::Ok);
    stream_echo(&mut st, b"carol's twin").await.unwrap();
    link.close();
    let carol_device = s.agent("carol").device.clone();
    poll("deny events in the audit log", SOON, || async {
        let audit = s.admin.audit().await;
        let denied = |service: &str, reason: &str| {
            audit.iter().any(|e| {
                e["action"] == "stream.open"
                    && e["result"] == "deny"
                    && e["target"] == service
                    && e["detail"]["reason"] == reason
                    && e["detail"]["device"] == carol_device.as_str()
            })
        };
        if denied(SECRET, "no_permit") && denied(NOSUCH, "unknown_service") {
            Ok(())
        } else {
            Err(format!("{} entries, deny events missing", audit.len()))
        }
    })
    .await;
    secret.shutdown().await;
    nosuch.shutdown().await;

    // 2b. Allowed, but the target refuses the connector: Unavailable, and the record says
    // the connector tried and why, with the policy that allowed it (not "no connector").
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    s.admin
        .ok(
            "PATCH",
            &format!("/v1/services/{ECHO}"),
            Some(json!({ "target": dead.to_string() })),
        )
        .await;
    s.converge().await;
    let link = dial(b0, lt, &carol).await.unwrap();
    assert_eq!(open_code(&link, ECHO).await.unwrap(), OpenCode::Unavailable);
    link.close();
    poll("the failed dial in the audit log", SOON, || async {
        let audit = s.admin.audit().await;
        let found = audit.iter().any(|e| {
            e["action"] == "stream.open"
                && e["result"] == "error"
                && e["target"] == ECHO
                && e["detail"]["device"] == carol_device.as_str()
                && e["detail"]["reason"] == "connector_failed"
                && e["detail"]["connectors_tried"] == 1
                && e["detail"]["error"].as_str().is_some_and(|x| !x.is_empty())
                && e["detail"]["policies"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p == "carol-echo"))
        });
        if found {
            Ok(())
        } else {
            Err(format!(
                "{} entries, no connector_failed record",
                audit.len()
            ))
        }
    })
    .await;
    s.admin
        .ok(
            "PATCH",
            &format!("/v1/services/{ECHO}"),
            Some(json!({ "target": s.echo.to_string() })),
        )
        .await;
    poll("alice reaches echo again", SOON, || echo_ok(fa)).await;

    // 4. Policy removed: the live stream is cut, new ones refused; bob unaffected; re-adding
    // restores access.
    let live = LiveConn::open(fa).await.unwrap();
    s.admin.ok("DELETE", "/v1/policies/alice-echo", None).await;
    live.closed_within(ENFORCE).await.unwrap();
    poll("alice refused without a policy", ENFORCE, || refused(fa)).await;
    echo_ok(fb).await.unwrap();
    s.admin.allow("alice-echo", ALICE, ECHO).await;
    poll("alice restored by the policy", SOON, || echo_ok(fa)).await;

    // 8. Chain lending: [carol's leaf, the connector's certificate] with carol's key is carol,
    // an agent: Open works; it is never taken for the connector.
    let mut lending = carol.clone();
    let connector_cert =
        CertificateDer::from_pem_slice(pem(&s.connector_dir, "cert.pem").as_bytes()).unwrap();
    lending.cert_chain.push(connector_cert);
    let lend = dial(b0, lt, &lending).await.unwrap();
    assert!(
        lend.is_opener(),
        "the dialer opens streams on an agent link"
    );
    let (code, mut st) = open(&lend, ECHO).await.unwrap();
    assert_eq!(code, OpenCode::Ok);
    stream_echo(&mut st, b"lent chain, own identity")
        .await
        .unwrap();

    // 9. Garbage from an agent closes that link, and the broker logs it naming the agent; the
    // broker serves everyone else.
    let carol_uri = carol.peer.id.to_uri();
    let garbage: [(&str, Vec<u8>, &str); 4] = [
        (
            "bad version",
            vec![2, 1, 0, 0],
            "unsupported frame version 2",
        ),
        (
            "unknown kind 0x7f",
            vec![0x01, 0x7f, 0, 0],
            "unknown frame kind 0x7f",
        ),
        (
            "length 0xffff",
            vec![0x01, 0x01, 0xff, 0xff],
            "frame payload of 65535 bytes exceeds the limit",
        ),
        (
            "a broker-bound reply frame",
            Frame::DialReply { code: DialCode::Ok }.to_bytes().unwrap(),
            "unexpected frame DialReply",
        ),
    ];
    for (what, bytes, says) in garbage {
        let link = dial(b0, lt, &carol).await.unwrap();
        ping(&link).await.unwrap();
        let mut st = link.open().await.unwrap();
        st.send_chunk(Bytes::from(bytes)).await.unwrap();
        // SOON, not ENFORCE: on QUIC the close may only arrive by the idle timeout
        // (`stack_util::HAND_IDLE`).
        let closed = tokio::time::timeout(SOON, link.closed()).await;
        assert!(closed.is_ok(), "[{t}] {what}: the link stayed open");
        let line = logged(
            &format!("[{t}] {what}: the broker's warning"),
            SOON,
            &[
                "WARN",
                "malformed frame from agent; closing its link",
                &carol_uri,
                says,
            ],
        )
        .await;
        eprintln!("[{t}] {what}: {line}");
    }
    // A frame cut short by the end of its stream is malformed too.
    let link = dial(b0, lt, &carol).await.unwrap();
    let mut st = link.open().await.unwrap();
    st.send_chunk(Bytes::from_static(&[0x01, 0x01, 0, 10, 1, 2]))
        .await
        .unwrap();
    st.finish().await.unwrap();
    let closed = tokio::time::timeout(SOON, link.closed()).await;
    assert!(
        closed.is_ok(),
        "[{t}] truncated frame: the link stayed open"
    );
    logged(
        &format!("[{t}] truncated frame: the broker's warning"),
        SOON,
        &[
            "WARN",
            "malformed frame from agent; closing its link",
            &carol_uri,
            "frame payload truncated",
        ],
    )
    .await;
    // Its twins: a stream that ends, or is reset, before any byte is no bad frame (an agent
    // may give up on a stream): that stream alone ends; the link and its live streams stay.
    let link = dial(b0, lt, &carol).await.unwrap();
    let (code, mut live) = open(&link, ECHO).await.unwrap();
    assert_eq!(code, OpenCode::Ok, "[{t}]");
    // The ended ones are held: a stream whose handles are dropped is reset, and may then end
    // before the broker has read it.
    let mut ended = Vec::new();
    for _ in 0..3 {
        let mut st = link.open().await.unwrap();
        st.finish().await.unwrap();
        ended.push(st);
        let mut reset = link.open().await.unwrap();
        reset.reset();
    }
    for st in &mut ended {
        // The broker ends each of them in turn.
        let end = tokio::time::timeout(SOON, st.recv_chunk()).await;
        assert!(end.is_ok(), "[{t}] an empty stream was left open");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!link.is_closed(), "[{t}] an empty stream closed the link");
    stream_echo(&mut live, b"still relayed").await.unwrap();
    ping(&link).await.unwrap();
    let (code, mut st) = open(&link, ECHO).await.unwrap();
    assert_eq!(code, OpenCode::Ok, "[{t}]");
    stream_echo(&mut st, b"a new stream on the same link")
        .await
        .unwrap();
    link.close();
    served(b0, lt, &carol).await.unwrap();
    echo_ok(fa).await.unwrap();
    assert_eq!(worker_panics(), Vec::<String>::new(), "[{t}]");

    // 6. An identity from another CA (same org name, carol's device id) is refused.
    let foreign = foreign_ca_identity(&s, &s.agent("carol").device);
    let r = assert_refused(b0, lt, &foreign, "foreign CA").await;
    eprintln!("[{t}] foreign CA: {r:?}");
    assert!(refused_by_tls(&r), "[{t}] foreign CA: {r:?}");
    served(b0, lt, &carol).await.unwrap();

    // 7. A leaf naming the connector, signed with carol's device key (CA:false) and chained
    // to carol's certificate, is refused.
    let forged = forged_connector_identity(&s, "carol");
    let r = assert_refused(b0, lt, &forged, "leaf signed by a device key").await;
    eprintln!("[{t}] forged leaf: {r:?}");
    assert!(refused_by_tls(&r), "[{t}] forged leaf: {r:?}");
    served(b0, lt, &carol).await.unwrap();
    // Both refusals are in the audit trail: the broker's own denials, naming the address
    // (the peer proved no identity) and why.
    poll(
        &format!("[{t}] handshake refusals audited"),
        SOON,
        || async {
            let audit = s.admin.audit().await;
            let refusals: Vec<&Value> = audit
                .iter()
                .filter(|e| {
                    e["action"] == "link.handshake"
                        && e["result"] == "deny"
                        && e["target"] == "127.0.0.1"
                        && e["detail"]["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("certificate"))
                })
                .collect();
            if refusals.len() >= 2 {
                Ok(())
            } else {
                Err(format!("{refusals:?}"))
            }
        },
    )
    .await;

    // 3. Device revoked: alice's live stream is cut and her new connections fail within 3 s;
    // bob keeps working; her identity is turned away at the link.
    let live = LiveConn::open(fa).await.unwrap();
    let alice_id = s.agent("alice").identity();
    // A link of hers that carries no stream: the broker closes it too, refusing her
    // identity, and records why; a link of bob's stays up.
    let held = dial(b0, lt, &alice_id).await.unwrap();
    let bobs = dial(b0, lt, &s.agent("bob").identity()).await.unwrap();
    s.revoke_device(&s.agent("alice").device).await;
    tokio::time::timeout(ENFORCE, held.closed())
        .await
        .unwrap_or_else(|_| panic!("[{t}] a revoked device's idle link stayed up"));
    assert_eq!(held.refused(), Some(umbra_link::Refusal::Identity), "[{t}]");
    assert!(!bobs.is_closed(), "[{t}] bob's link was closed too");
    poll("the link's revocation audited", ENFORCE, || async {
        let audit = s.admin.audit().await;
        let uri = alice_id.peer.id.to_uri();
        if audit
            .iter()
            .any(|e| e["action"] == "link.revoke" && e["actor"] == uri.as_str())
        {
            Ok(())
        } else {
            Err("no link.revoke record".to_string())
        }
    })
    .await;
    live.closed_within(ENFORCE).await.unwrap();
    poll("alice refused after revocation", ENFORCE, || refused(fa)).await;
    echo_ok(fb).await.unwrap();
    let r = assert_refused(b0, lt, &alice_id, "revoked device").await;
    eprintln!("[{t}] revoked device: {r:?}");
    // The broker says "refused" (not which reason): the agent tells its user to ask an
    // administrator instead of reporting every broker unreachable.
    assert!(
        matches!(
            r,
            Refusal::ClosedAfterHandshake {
                refused: Some(umbra_link::Refusal::Identity),
                ..
            }
        ),
        "[{t}] {r:?}"
    );
    match umbra_agent::services(&s.agent("alice").config(t)).await {
        Err(e @ umbra_agent::AgentError::Refused) => {
            assert!(e.to_string().contains("ask an administrator"), "{e}")
        }
        other => panic!("[{t}] services of a revoked device: {other:?}"),
    }
    let st = umbra_agent::status(&s.agent("alice").config(t))
        .await
        .unwrap();
    assert!(
        st.brokers.iter().all(|b| b.refused && b.rtt.is_err()),
        "[{t}] {:?}",
        st.brokers
    );
    // The twin: bob's device is served, and its links are not refused.
    assert!(
        umbra_agent::services(&s.agent("bob").config(t))
            .await
            .unwrap()
            .contains(&ECHO.to_string())
    );
    let st = umbra_agent::status(&s.agent("bob").config(t))
        .await
        .unwrap();
    assert!(
        st.brokers.iter().all(|b| !b.refused && b.rtt.is_ok()),
        "[{t}] {:?}",
        st.brokers
    );

    // 3b. Connector revoked: it stops serving. The lending link is still up and still an
    // agent: no connector for it either, and no stream ever arrives on it.
    let mut bob_live = LiveConn::open(fb).await.unwrap();
    bob_live.echo(b"before").await.unwrap();
    s.admin
        .ok(
            "POST",
            &format!("/v1/connectors/{}/revoke", s.connector_id),
            None,
        )
        .await;
    bob_live.closed_within(ENFORCE).await.unwrap();
    poll("bob refused without a connector", ENFORCE, || refused(fb)).await;
    let link = dial(b0, lt, &carol).await.unwrap();
    assert_eq!(open_code(&link, ECHO).await.unwrap(), OpenCode::Unavailable);
    assert!(!lend.is_closed(), "the lending link was closed");
    assert_eq!(open_code(&lend, ECHO).await.unwrap(), OpenCode::Unavailable);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), lend.accept())
            .await
            .is_err(),
        "the broker opened a stream toward the lending link"
    );
}

/// The services a broker lists on `link` (one `ListServices` exchange; every answer frame up
/// to the end of the stream).
async fn listed(link: &umbra_link::Link) -> Vec<String> {
    let mut st = link.open().await.unwrap();
    st.write_frame(&Frame::ListServices).await.unwrap();
    let mut all = Vec::new();
    loop {
        match tokio::time::timeout(SOON, st.read_frame()).await.unwrap() {
            Ok(Frame::ServiceList { services }) => all.extend(services),
            Err(umbra_link::LinkError::StreamEnded) => return all,
            other => panic!("unexpected answer to ListServices: {other:?}"),
        }
    }
}

/// The broker's bytes that are not an answer to `Open`, as a broker stand-in would send them.
fn bad_open_replies() -> [(&'static str, Vec<u8>, &'static str); 5] {
    [
        (
            "bad version",
            vec![2, 2, 0, 1, 0],
            "unsupported frame version 2",
        ),
        (
            "unknown kind",
            vec![1, 0x7f, 0, 0],
            "unknown frame kind 0x7f",
        ),
        (
            "oversized length",
            vec![1, 2, 0xff, 0xff],
            "frame payload of 65535 bytes exceeds the limit",
        ),
        (
            "unknown reply code",
            vec![1, 2, 0, 1, 9],
            "invalid open code",
        ),
        (
            "a frame that is not an OpenReply",
            Frame::DialReply { code: DialCode::Ok }.to_bytes().unwrap(),
            "unexpected frame DialReply",
        ),
    ]
}

/// 9b. A connector's answer to `Dial` that is malformed, oversized, of an unknown kind or not
/// a `DialReply` closes that connector link at the broker, which logs a warning naming the
/// connector and the frame error, and answers the agent `Unavailable`. The twin: a new link
/// with the same identity that answers properly carries the stream.
///
/// The real connector is stopped first; a link dialed by hand with its identity stands in.
async fn malformed_dial_replies(t: TransportPref) {
    init();
    let lt = link_transport(t);
    let mut s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![CAROL],
    })
    .await;
    let carol = s.agent("carol").identity();
    let connector = TlsIdentity::load_dir(&s.connector_dir).unwrap();
    let connector_uri = connector.peer.id.to_uri();
    s.connector.take().unwrap().shutdown().await;
    let b0 = &s.brokers[0];
    let agent = dial(b0, lt, &carol).await.unwrap();
    poll("the broker has no connector left", SOON, || async {
        match open_code(&agent, ECHO).await? {
            OpenCode::Unavailable => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let mut bad_field = Frame::DialReply { code: DialCode::Ok }.to_bytes().unwrap();
    bad_field[4] = 9; // the code byte
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "bad version",
            vec![2, 4, 0, 1, 0],
            "unsupported frame version 2",
        ),
        (
            "unknown kind",
            vec![1, 0x7f, 0, 0],
            "unknown frame kind 0x7f",
        ),
        (
            "oversized length",
            vec![1, 4, 0xff, 0xff],
            "frame payload of 65535 bytes exceeds the limit",
        ),
        ("unknown reply code", bad_field, "invalid dial code"),
        (
            "a frame that is not a DialReply",
            Frame::OpenReply { code: OpenCode::Ok }.to_bytes().unwrap(),
            "unexpected frame OpenReply",
        ),
    ];
    for (what, bytes, says) in cases {
        let stand_in = dial(b0, lt, &connector).await.unwrap();
        assert!(!stand_in.is_opener(), "the broker opens connector streams");
        let dials = Arc::new(AtomicUsize::new(0));
        tokio::spawn(stand_in_connector(
            stand_in.clone(),
            Some(bytes),
            dials.clone(),
        ));
        let code = poll(
            &format!("[{t}] {what}: the broker dials the stand-in"),
            SOON,
            || async {
                let code = open_code(&agent, ECHO).await?;
                if dials.load(Ordering::SeqCst) > 0 {
                    Ok(code)
                } else {
                    Err(format!("{code:?} before any Dial"))
                }
            },
        )
        .await;
        assert_eq!(code, OpenCode::Unavailable, "[{t}] {what}");
        // SOON: see `stack_util::HAND_IDLE`.
        let closed = tokio::time::timeout(SOON, stand_in.closed()).await;
        assert!(closed.is_ok(), "[{t}] {what}: the connector link stayed up");
        let line = logged(
            &format!("[{t}] {what}: the broker's warning"),
            SOON,
            &[
                "WARN",
                "malformed answer to Dial from connector; closing its link",
                &connector_uri,
                says,
            ],
        )
        .await;
        eprintln!("[{t}] {what}: {line}");
    }

    // The twin: the same identity on a new link, answering properly, carries the stream.
    let stand_in = dial(b0, lt, &connector).await.unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    tokio::spawn(stand_in_connector(stand_in.clone(), None, dials.clone()));
    let mut st = poll(&format!("[{t}] the twin serves"), SOON, || async {
        match open(&agent, ECHO).await? {
            (OpenCode::Ok, st) => Ok(st),
            (other, _) => Err(format!("{other:?}")),
        }
    })
    .await;
    stream_echo(&mut st, b"through a well-behaved connector link")
        .await
        .unwrap();
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert!(!stand_in.is_closed(), "[{t}] the twin's link was closed");
    assert!(!agent.is_closed(), "[{t}] the agent's link was closed");
    assert_eq!(worker_panics(), Vec::<String>::new(), "[{t}]");
}

/// 9c. A broker's answer to `Open` that is malformed, oversized, of an unknown kind or not an
/// `OpenReply` makes a real agent (its forward) close that broker link and log a warning
/// naming the broker and the frame error; the local connection is closed without a byte. The
/// twin: the next connection redials and is served. The broker is a stand-in with its own CA.
async fn malformed_open_replies(t: TransportPref) {
    init();
    let id = format!("bad-open-replies-{t}");
    let mut broker = StandInBroker::start("standin", &id).await;
    for (what, bytes, says) in bad_open_replies() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = broker.agent(dir.path(), "d-1", t);
        broker.script.lock().unwrap().push_back(bytes);
        let fwd = umbra_agent::Forwarder::start(cfg, ECHO, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        // The link the agent measured the broker on, and holds.
        let held = broker.next_link().await;
        refused(fwd.local_addr()).await.unwrap();
        // SOON: see `stack_util::HAND_IDLE`.
        let closed = tokio::time::timeout(SOON, held.closed()).await;
        assert!(closed.is_ok(), "[{t}] {what}: the agent kept the link");
        let line = logged(
            &format!("[{t}] {what}: the agent's warning"),
            SOON,
            &[
                "WARN",
                "malformed answer to Open from broker; closing its link",
                &broker.uri,
                says,
            ],
        )
        .await;
        eprintln!("[{t}] {what}: {line}");

        // The twin: the next connection goes through a new link and is served.
        echo_ok(fwd.local_addr()).await.unwrap();
        let twin = broker.next_link().await;
        assert!(!twin.is_closed(), "[{t}] {what}: the new link was closed");
        fwd.shutdown().await;
    }
    assert_eq!(worker_panics(), Vec::<String>::new(), "[{t}]");
}

/// Writes, reads the echo, writes more, finishes the write half: the rest still comes back,
/// then EOF.
async fn half_close(addr: std::net::SocketAddr) {
    let run = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        s.write_all(b"after which I stop").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after which I stop");
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("half-close round trip");
}

/// carol's device id in a certificate from a CA of the same name that is not the
/// organisation's. The broker's own certificate is still verified against the real CA.
fn foreign_ca_identity(s: &Stack, device: &str) -> TlsIdentity {
    let now = SystemTime::now();
    let ca = umbra_pki::Ca::generate("default", now).unwrap();
    let issued = umbra_pki::test_util::issue_pems(
        &ca,
        PeerId::new("default", Role::Agent, device).unwrap(),
        vec![],
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let key = issued.key_pem;
    let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    TlsIdentity {
        peer: umbra_pki::peer_cert(&leaf).unwrap(),
        cert_chain: vec![leaf],
        key: PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        ca: s.ca.clone(),
    }
}

/// A leaf for `umbra://default/connector/<the real connector id>` issued by the agent's own
/// certificate and key, presented as [forged leaf, agent certificate].
fn forged_connector_identity(s: &Stack, agent: &str) -> TlsIdentity {
    let a = s.agent(agent);
    let device = a.identity();
    let device_key = KeyPair::from_pem(&pem(&a.dir, "key.pem")).unwrap();
    let uri = format!("umbra://default/connector/{}", s.connector_id);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, uri.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri.clone().try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_der(&device.cert_chain[0], &device_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    let peer = umbra_pki::peer_cert(leaf.der()).unwrap();
    assert_eq!(peer.id.to_uri(), uri);
    TlsIdentity {
        peer,
        cert_chain: vec![leaf.der().clone(), device.cert_chain[0].clone()],
        key: PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
        ca: s.ca.clone(),
    }
}

/// Two brokers (the second with a 3 s staleness limit). 12: the broker in use goes away and
/// the next connection goes through the other. 11: the controller goes away; live and new
/// streams keep working, a broker restarted meanwhile serves from its cached snapshot, and the
/// 3 s broker turns Stale.
async fn brokers_and_controller_away(t: TransportPref) {
    init();
    let lt = link_transport(t);
    let mut s = Stack::start(Opts {
        brokers: vec![86_400, 3],
        users: vec![ALICE],
    })
    .await;
    let alice_id = s.agent("alice").identity();
    let fwd = s.forward("alice", t, ECHO).await;
    let fa = fwd.local_addr();
    poll("alice reaches echo", SOON, || echo_ok(fa)).await;

    // 12. Failover.
    let live = LiveConn::open(fa).await.unwrap();
    let used = poll("the broker carrying the stream", ENFORCE, || async {
        let carrying: Vec<usize> = (0..s.brokers.len())
            .filter(|&i| s.brokers[i].running().live_streams() == 1)
            .collect();
        match carrying[..] {
            [i] => Ok(i),
            _ => Err(format!("{carrying:?}")),
        }
    })
    .await;
    s.brokers[used].stop().await;
    live.closed_within(ENFORCE).await.unwrap();
    let started = Instant::now();
    poll(
        "the next connection through the other broker",
        ENFORCE,
        || echo_ok(fa),
    )
    .await;
    eprintln!(
        "[{t}] failover from broker-{used} in {:?}",
        started.elapsed()
    );
    s.brokers[used].start_again().await;
    {
        let b = &s.brokers[used];
        poll("the restarted broker serves", SOON, || {
            served(b, lt, &alice_id)
        })
        .await;
    }

    // The 3 s broker re-checks live streams only hourly from here: its staleness cut below
    // must not wait for that.
    s.brokers[1].stop().await;
    s.brokers[1].cfg.reverify_secs = 3600;
    s.brokers[1].start_again().await;
    {
        let b = &s.brokers[1];
        poll("the 3 s broker serves again", SOON, || {
            served(b, lt, &alice_id)
        })
        .await;
    }

    // A 3 s staleness limit holds while the controller is up: the broker hears from it more
    // often than that, also when nothing changes (the pace below is not an assertion).
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        served(&s.brokers[1], lt, &alice_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A broker enrolled now, started only once the controller is gone: it has no snapshot.
    let late_token = s.admin.token("broker", None, Some("broker-late")).await;
    let late_dir = s.dir.path().join("broker-late");
    umbra_link::enroll::enroll(&s.url, &late_token, &late_dir, Role::Broker)
        .await
        .unwrap();

    // 11. Controller away.
    let mut live = LiveConn::open(fa).await.unwrap();
    served(&s.brokers[1], lt, &alice_id).await.unwrap();
    // A stream held open on the 3 s broker, to see it end when that broker turns stale.
    let stale_link = dial(&s.brokers[1], lt, &alice_id).await.unwrap();
    let (code, mut on_stale) = open(&stale_link, ECHO).await.unwrap();
    assert_eq!(code, OpenCode::Ok, "[{t}]");
    on_stale.send_chunk(Bytes::from_static(b"x")).await.unwrap();
    let first = tokio::time::timeout(SOON, on_stale.recv_chunk()).await;
    assert!(
        matches!(first, Ok(Ok(Some(ref c))) if &c[..] == b"x"),
        "[{t}] {first:?}"
    );
    served(&s.brokers[0], lt, &alice_id).await.unwrap();
    s.stop_controller().await;
    live.echo(b"the controller is gone").await.unwrap();
    echo_ok(fa).await.unwrap();

    s.brokers[0].stop().await;
    s.brokers[0].start_again().await;
    {
        let b = &s.brokers[0];
        poll("broker restarted without a controller serves", SOON, || {
            served(b, lt, &alice_id)
        })
        .await;
    }
    poll("forward works after the restart", SOON, || echo_ok(fa)).await;

    let b1 = &s.brokers[1];
    poll(
        "the 3 s broker turns stale",
        Duration::from_secs(10),
        || async {
            let link = dial(b1, lt, &alice_id).await?;
            let code = open_code(&link, ECHO).await;
            link.close();
            match code? {
                OpenCode::Stale => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // A stale broker does not list (what it knows may be out of date, and it opens
    // nothing): it resets the stream, where an empty list would say "nothing allowed". The
    // twin: the broker whose limit is a day lists what alice may reach.
    let link = dial(b1, lt, &alice_id).await.unwrap();
    let mut st = link.open().await.unwrap();
    st.write_frame(&Frame::ListServices).await.unwrap();
    match tokio::time::timeout(SOON, st.read_frame()).await.unwrap() {
        Err(umbra_link::LinkError::StreamReset(_)) => {}
        other => panic!("[{t}] a stale broker's list: {other:?}"),
    }
    link.close();
    let link = dial(&s.brokers[0], lt, &alice_id).await.unwrap();
    assert!(listed(&link).await.contains(&ECHO.to_owned()), "[{t}]");
    link.close();
    // The agent asks the next broker when one will not list: whichever it measured nearest,
    // alice's services are listed (was: an empty list when the stale one was nearest).
    for _ in 0..3 {
        let listed = umbra_agent::services(&s.agent("alice").config(t)).await;
        assert!(
            listed.as_ref().is_ok_and(|l| l.contains(&ECHO.to_owned())),
            "[{t}] {listed:?}"
        );
    }
    // The broker without a snapshot knows no device: it closes alice's link without calling
    // it a refusal (another broker, or a later try, may serve her); a revoked identity is
    // refused everywhere (case 7).
    s.start_broker("broker-late", late_dir, |_| {}).await;
    let late = s.brokers.last().unwrap();
    match assert_refused(late, lt, &alice_id, "a broker without a snapshot").await {
        Refusal::ClosedAfterHandshake { refused: None, .. } => {}
        other => panic!("[{t}] a broker without a snapshot: {other:?}"),
    }

    // Its live stream ends with the staleness limit, not at the next hourly re-check.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(Some(_)) = on_stale.recv_chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "[{t}] a stream on the stale broker runs on");
    stale_link.close();
    // Its twin with a day of staleness allowed still serves, and the agent goes there.
    served(&s.brokers[0], lt, &alice_id).await.unwrap();
    for _ in 0..3 {
        echo_ok(fa).await.unwrap();
    }
}

/// 5. A certificate past its end is refused at the handshake; a fresh one works. The
/// controller issues 2 s certificates after a restart; the broker keeps its day-long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate() {
    init();
    let mut s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    let fresh = s.agent("alice").identity();
    let short = umbra_controller::ControllerConfig {
        cert_lifetime_secs: 2,
        ..s.ctl_cfg.clone()
    };
    s.restart_controller(short).await;
    let dir = s.enroll_agent(ALICE, "short").await.dir.clone();
    let expired = TlsIdentity::load_dir(&dir).unwrap();
    let not_after = expired.peer.not_after;
    assert!(not_after <= SystemTime::now() + Duration::from_secs(3));
    // A peer holding such a short-lived certificate renews it, but never in a tight loop
    // (certificates start a minute early, so its renewal time is already past).
    let mut renewed =
        umbra_link::enroll::spawn_renewal(dir.clone(), std::sync::Arc::new(expired.clone()));
    let mut renewals = 0;
    let window = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(window);
    loop {
        tokio::select! {
            // Renewal stops for good once the held certificate expired unrenewed.
            r = renewed.changed() => { if r.is_err() { break; } renewals += 1; }
            () = &mut window => break,
        }
    }
    assert!((1..=2).contains(&renewals), "{renewals} renewals in 3 s");
    drop(renewed);
    s.converge().await;
    poll("the certificate expires", SOON, || async {
        if SystemTime::now() > not_after + Duration::from_secs(1) {
            Ok(())
        } else {
            Err("still valid".to_string())
        }
    })
    .await;
    let b0 = &s.brokers[0];
    for t in [Transport::Quic, Transport::Tls] {
        let r = assert_refused(b0, t, &expired, "expired certificate").await;
        eprintln!("[{t:?}] expired: {r:?}");
        assert!(refused_by_tls(&r), "[{t:?}] expired: {r:?}");
        served(b0, t, &fresh).await.unwrap();
    }
}

/// 10. 300 TCP connections that never speak and a burst of UDP garbage do not keep a real
/// agent from a new link and a stream within 2 s, on either transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes() {
    init();
    let s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    let b0 = &s.brokers[0];
    let alice = s.agent("alice").identity();
    served(b0, Transport::Quic, &alice).await.unwrap();

    let mut silent = Vec::with_capacity(300);
    for _ in 0..300 {
        silent.push(TcpStream::connect(b0.tcp).await.unwrap());
    }
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2_000 {
        let d: [u8; 1200] = umbra_pki::random_bytes();
        let len = [1200, 1, 64, 300][i % 4];
        let _ = udp.send_to(&d[..len], b0.quic).await;
    }

    for t in [TransportPref::Quic, TransportPref::Tcp] {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            served(b0, link_transport(t), &alice),
        )
        .await;
        let link_took = started.elapsed();
        let started = Instant::now();
        let fwd = tokio::time::timeout(Duration::from_secs(2), async {
            let f = s.forward("alice", t, ECHO).await;
            echo_ok(f.local_addr()).await.map(|()| f)
        })
        .await;
        let fwd_took = started.elapsed();
        eprintln!("[{t}] new link and stream: {link_took:?}; new forward: {fwd_took:?}");
        assert!(
            matches!(r, Ok(Ok(()))),
            "[{t}] new link under a handshake flood: {r:?} after {link_took:?}"
        );
        assert!(
            matches!(fwd, Ok(Ok(_))),
            "[{t}] new forward under a handshake flood: failed after {fwd_took:?}"
        );
    }
    drop(silent);
}

/// Users alice and bob, and one broker "bounded" started with `tweak`, serving alice over
/// `t` (so its snapshot knows her; the probe's link is closed).
async fn bounded_broker(
    tweak: impl FnOnce(&mut umbra_broker::BrokerConfig),
    t: TransportPref,
) -> (Stack, TlsIdentity, TlsIdentity) {
    init();
    let mut s = Stack::start(Opts {
        brokers: vec![],
        users: vec![ALICE, BOB],
    })
    .await;
    s.add_broker_with("bounded", tweak).await;
    let alice = s.agent("alice").identity();
    let bob = s.agent("bob").identity();
    let (b0, tr) = (&s.brokers[0], link_transport(t));
    poll("the broker serves alice", SOON, || served(b0, tr, &alice)).await;
    (s, alice, bob)
}

/// One identity may hold at most `max_links_per_peer` links to a broker (4 here): the next is
/// refused (the dialer is told so, and it is audited), while another user's link is served,
/// and closing one of the first makes room again. The dialer learns that it was this limit,
/// not a revocation: the agent says so instead of "revoked", and goes to another broker.
async fn links_per_identity_are_bounded(t: TransportPref) {
    let (mut s, alice, bob) = bounded_broker(|c| c.max_links_per_peer = 4, t).await;
    let b0 = &s.brokers[0];
    let tr = link_transport(t);
    let mut held = Vec::new();
    for i in 0..4 {
        // Retried: the probes' links above may take a moment to leave the broker's count.
        let link = poll(&format!("[{t}] link {i} of 4"), SOON, || async {
            let link = dial(b0, tr, &alice).await?;
            ping(&link).await.map(|()| link)
        })
        .await;
        held.push(link);
    }
    match assert_refused(b0, tr, &alice, "a fifth link").await {
        Refusal::ClosedAfterHandshake {
            refused: Some(umbra_link::Refusal::TooManyLinks),
            ..
        } => {}
        other => panic!("[{t}] a fifth link: {other:?}"),
    }
    // Another identity is not held back; the first four still work.
    served(b0, tr, &bob).await.unwrap();
    for l in &held {
        ping(l).await.unwrap();
    }
    // The agent, with this broker its only one, says why it cannot link; it is not told
    // that its identity was refused (which would send its user to enroll again).
    let cfg = s.agent("alice").config(t);
    let e = umbra_agent::services(&cfg).await.unwrap_err();
    let said = e.to_string();
    assert!(
        matches!(e, umbra_agent::AgentError::NoBroker(_)) && said.contains("as many links"),
        "[{t}] {e:?}: {said}"
    );
    assert!(!said.contains("revoked"), "[{t}] {said}");
    // With another broker to go to, the agent is served there.
    s.add_broker("other", 3600).await;
    let listed = poll("alice served by the other broker", SOON, || async {
        umbra_agent::services(&cfg).await.map_err(|e| e.to_string())
    })
    .await;
    eprintln!("[{t}] alice's services through the other broker: {listed:?}");
    let b0 = &s.brokers[0];
    // Room again once one of them closes.
    held.pop().unwrap().close();
    poll("a link after one closed", SOON, || async {
        let link = dial(b0, tr, &alice).await?;
        let r = ping(&link).await;
        link.close();
        r
    })
    .await;
    drop(held);
}
both_transports!(links_per_identity_are_bounded);

/// One device may have at most `max_streams_per_device` streams open at a broker (3 here),
/// over all its links: the next is reset before any decision or dial, while another user's
/// streams are served, and closing one makes room again. The agent turns the reset into one
/// closed connection: its live ones, on the same link, run on.
async fn streams_per_device_are_bounded(t: TransportPref) {
    let (s, alice, bob) = bounded_broker(|c| c.max_streams_per_device = 3, t).await;
    let b0 = &s.brokers[0];
    let tr = link_transport(t);
    // Three streams held open, over two links.
    let links = [
        dial(b0, tr, &alice).await.unwrap(),
        dial(b0, tr, &alice).await.unwrap(),
    ];
    let mut held = Vec::new();
    for i in 0..3 {
        let (code, st) = poll(&format!("[{t}] stream {i} of 3"), SOON, || {
            open(&links[i % 2], ECHO)
        })
        .await;
        assert_eq!(code, OpenCode::Ok, "[{t}] stream {i}");
        held.push(st);
    }
    for l in &links {
        // Reset before any decision: no OpenReply at all (not a Denied or Unavailable).
        let r = open(l, ECHO).await;
        assert!(
            r.is_err(),
            "[{t}] a fourth stream got an answer: {:?}",
            r.map(|(c, _)| c)
        );
    }
    served(b0, tr, &bob).await.unwrap();
    for st in &mut held {
        stream_echo(st, b"still served").await.unwrap();
    }
    // Each reset is a denial in the audit log, naming the bound.
    let device = alice.peer.id.id.clone();
    s.admin
        .wait_audited(&format!("[{t}] the resets audited"), 2, |e| {
            e["action"] == "stream.open"
                && e["result"] == "deny"
                && e["detail"]["reason"] == "max_streams_per_device"
                && e["detail"]["device"] == device.as_str()
        })
        .await;
    // The held streams have ended (echoed and finished): room again.
    drop(held);
    let (code, _) = poll("a stream after the others ended", SOON, || {
        open(&links[0], ECHO)
    })
    .await;
    assert_eq!(code, OpenCode::Ok);

    // Through the agent: a connection beyond the bound is closed, and the live ones run on
    // (the broker reset one stream; the agent keeps the link that carries the others).
    for l in &links {
        l.close();
    }
    let f = s.forward("alice", t, ECHO).await;
    let fa = f.local_addr();
    let mut live = Vec::new();
    for i in 0..3 {
        let c = poll(
            &format!("[{t}] connection {i} of 3 through the agent"),
            SOON,
            || LiveConn::open(fa),
        )
        .await;
        live.push(c);
    }
    refused(fa).await.unwrap();
    for (i, c) in live.iter_mut().enumerate() {
        c.echo(b"the link was kept")
            .await
            .unwrap_or_else(|e| panic!("[{t}] live connection {i}: {e}"));
    }
    // One ends: room again for the next.
    drop(live.pop());
    poll("a connection after one ended", SOON, || LiveConn::open(fa)).await;
}
both_transports!(streams_per_device_are_bounded);

/// Opens on `link` until the broker answers `RateLimited`; how many it allowed first, and the
/// first allowed stream (kept open).
async fn open_until_rate_limited(
    link: &umbra_link::Link,
    t: TransportPref,
) -> (usize, Option<umbra_link::Stream>) {
    let mut held = None;
    let mut allowed = 0;
    loop {
        let (code, st) = open(link, ECHO).await.unwrap();
        match code {
            OpenCode::Ok => {
                allowed += 1;
                held.get_or_insert(st);
            }
            OpenCode::RateLimited => return (allowed, held),
            other => panic!("[{t}] {other:?}"),
        }
        assert!(
            allowed < 100,
            "[{t}] {allowed} streams allowed, none rate limited"
        );
    }
}

/// A device opens at most `stream_opens_per_sec` streams a second at a broker, after a burst
/// of `stream_open_burst` (1 and 3 here): the next are answered `RateLimited` before any
/// decision or dial, and audited within the device's budget of denials, while another user's
/// streams are served and the device's live streams go on. The agent turns the answer into a
/// refused connection; a moment later the device may open again.
async fn stream_opens_per_device_are_rate_limited(t: TransportPref) {
    let (s, alice, bob) = bounded_broker(
        |c| {
            c.stream_open_burst = 3;
            c.stream_opens_per_sec = 1;
        },
        t,
    )
    .await;
    let b0 = &s.brokers[0];
    let tr = link_transport(t);
    let link = dial(b0, tr, &alice).await.unwrap();
    // The setup's probes spent some of alice's burst: let it fill up again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let (allowed, held) = open_until_rate_limited(&link, t).await;
    // The burst, plus what came back while they were opened.
    let most = 3 + started.elapsed().as_secs() as usize + 1;
    assert!(
        (3..=most).contains(&allowed),
        "[{t}] {allowed} allowed before the first RateLimited (burst 3, at most {most})"
    );
    // Asked again at once: still limited, and the link is kept.
    assert_eq!(
        open_code(&link, ECHO).await.unwrap(),
        OpenCode::RateLimited,
        "[{t}]"
    );
    // Another device is not held back, and alice's live stream runs on.
    served(b0, tr, &bob).await.unwrap();
    stream_echo(&mut held.unwrap(), b"still served")
        .await
        .unwrap();
    // Audited as a denial that names the bound.
    let device = alice.peer.id.id.clone();
    poll(&format!("[{t}] the rate limit audited"), SOON, || async {
        let n = s
            .admin
            .audit()
            .await
            .iter()
            .filter(|e| {
                e["action"] == "stream.open"
                    && e["result"] == "deny"
                    && e["target"] == ECHO
                    && e["detail"]["reason"] == "open_rate"
                    && e["detail"]["code"] == "rate_limited"
                    && e["detail"]["device"] == device.as_str()
            })
            .count();
        if n > 0 {
            Ok(())
        } else {
            Err("none yet".to_string())
        }
    })
    .await;
    // Through the agent: a connection while over the rate is refused. (Tried again if a
    // token came back between the last `RateLimited` and the agent's open.)
    let f = s.forward("alice", t, ECHO).await;
    let fa = f.local_addr();
    poll(
        &format!("[{t}] a connection refused while over the rate"),
        SOON,
        || async {
            open_until_rate_limited(&link, t).await;
            refused(fa).await
        },
    )
    .await;
    // A moment later: served again, at the rate.
    poll(&format!("[{t}] alice served again"), SOON, || echo_ok(fa)).await;
}
both_transports!(stream_opens_per_device_are_rate_limited);

/// 13. Bad admin requests answer 400 with a reason and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_requests_change_nothing() {
    init();
    let s = Stack::controller_only(&[ALICE]).await;
    s.admin.allow("alice-echo", ALICE, ECHO).await;
    let policies = s.admin.get("/v1/policies").await;
    let users = s.admin.get("/v1/users").await;
    let version = s.controller().snapshot_version();
    let valid = umbra_policy::allow_policy(&umbra_policy::PolicySubject::User(ALICE.into()), ECHO);

    let cases: [(&str, &str, Value, &str, &str); 4] = [
        (
            "Cedar syntax error",
            "/v1/policies",
            json!({ "name": "broken", "text": "permit(principal, action, resource" }),
            "text",
            "invalid policy",
        ),
        (
            "Cedar schema error",
            "/v1/policies",
            json!({ "name": "broken", "text":
                "permit(principal, action, resource) when { context.nosuch == 1 };" }),
            "text",
            "invalid policy",
        ),
        (
            "unknown field in a policy",
            "/v1/policies",
            json!({ "name": "another", "text": valid, "colour": "red" }),
            "colour",
            "colour",
        ),
        (
            "unknown field in a user",
            "/v1/users",
            json!({ "id": "eve@example.test", "groups": [], "admin": true }),
            "admin",
            "admin",
        ),
    ];
    for (what, path, body, field, says) in cases {
        let (status, answer) = s.admin.call("POST", path, Some(body)).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["field"], field, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{what}: {answer}");
        eprintln!("{what}: {error}");
    }

    assert_eq!(s.admin.get("/v1/policies").await, policies);
    assert_eq!(s.admin.get("/v1/users").await, users);
    assert_eq!(s.controller().snapshot_version(), version);

    // The CLI sees the same list.
    let dir = s.dir.path();
    std::fs::write(dir.join("admin.token"), &s.admin_token).unwrap();
    std::fs::write(dir.join("ca.pem"), s.controller().ca_pem()).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("UMBRA_") {
            cmd.env_remove(&k);
        }
    }
    let out = cmd
        .env("HOME", dir)
        .args(["admin", "--controller", &s.url, "--token-file"])
        .arg(dir.join("admin.token"))
        .arg("--ca-file")
        .arg(dir.join("ca.pem"))
        .args(["-o", "json", "policy", "list"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "umbra admin policy list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, policies);
}

/// Admin changes reach every broker's enforced snapshot within a second: five changes (users
/// and a policy), each timed from the admin write's answer until both brokers hold the
/// controller's new version. The median must be within 1 s, as the issue asks, and the
/// slowest within the 3 s the other tests allow for enforcement (a loaded CI machine may
/// stall one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_reach_brokers_within_a_second() {
    init();
    let s = Stack::start(Opts {
        brokers: vec![86_400, 86_400],
        users: vec![ALICE],
    })
    .await;
    let mut took = Vec::new();
    for i in 0..5 {
        let started = std::time::Instant::now();
        if i == 4 {
            s.admin.allow("alice-secret", ALICE, SECRET).await;
        } else {
            s.admin
                .post(
                    "/v1/users",
                    serde_json::json!({ "id": format!("u{i}@example.test"), "groups": [] }),
                )
                .await;
        }
        let want = s.controller().snapshot_version();
        poll("both brokers hold the change", ENFORCE, || async {
            let behind: Vec<u64> = s
                .brokers
                .iter()
                .filter_map(|b| b.broker.as_ref())
                .map(|b| b.snapshot_version())
                .filter(|v| *v < want)
                .collect();
            if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("{behind:?} < {want}"))
            }
        })
        .await;
        took.push(started.elapsed());
    }
    took.sort();
    eprintln!("admin change to both brokers: {took:?}");
    assert!(took[2] <= Duration::from_secs(1), "median {:?}", took[2]);
}

both_transports!(forwards_share_one_link);

/// One forwarder for several services: each local address reaches its own service (an
/// allowed one, a denied one, the allowed one again), all over one link to the broker. One
/// bad forward fails the whole start and leaves nothing listening.
async fn forwards_share_one_link(t: TransportPref) {
    init();
    let s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    // Ports outside the kernel's own range: checked free again below, after the shutdown,
    // when a port the kernel had picked could have gone to any new socket.
    let at = || std::net::SocketAddr::from(([127, 0, 0, 1], restartable_port()));
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = s.agent("alice").config(t);
    let f = umbra_agent::Forwarder::start_many(
        cfg.clone(),
        &[
            (ECHO.into(), at()),
            (SECRET.into(), at()),
            (ECHO.into(), at()),
        ],
    )
    .await
    .unwrap();
    let [(_, echo1), (_, secret), (_, echo2)] = f.forwards() else {
        panic!("[{t}] {:?}", f.forwards());
    };
    poll("the first echo forward", SOON, || echo_ok(*echo1)).await;
    echo_ok(*echo2).await.unwrap();
    refused(*secret).await.unwrap();
    let mut held = Vec::new();
    for addr in [echo1, echo2, echo1] {
        held.push(LiveConn::open(*addr).await.unwrap());
    }
    let b = s.brokers[0].running();
    assert_eq!(b.live_streams(), 3, "[{t}]");
    // (Polled: the links that ranked the brokers at start may still be closing.)
    poll("three forwards, one link", SOON, || async {
        match b.agent_links() {
            1 => Ok(()),
            n => Err(format!("[{t}] {n} agent links")),
        }
    })
    .await;
    for mut c in held {
        c.echo(b"still here").await.unwrap();
    }
    let bound: Vec<std::net::SocketAddr> = f.forwards().iter().map(|(_, a)| *a).collect();
    f.shutdown().await;
    // Shut down, it holds nothing: no address, no link.
    for a in bound {
        std::net::TcpListener::bind(a).unwrap_or_else(|e| panic!("[{t}] {a} still bound: {e}"));
    }
    poll("the link closed", SOON, || async {
        match b.agent_links() {
            0 => Ok(()),
            n => Err(format!("[{t}] {n} agent links")),
        }
    })
    .await;

    // A bad name, or an address in use, fails the start, and nothing stays bound.
    let first = at();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    match umbra_agent::Forwarder::start_many(
        cfg.clone(),
        &[(ECHO.into(), first), (ECHO.into(), busy)],
    )
    .await
    {
        Err(umbra_agent::AgentError::Listen(a, _)) => assert_eq!(a, busy, "[{t}]"),
        Err(e) => panic!("[{t}] {e}"),
        Ok(f) => panic!("[{t}] started on a busy address: {:?}", f.forwards()),
    }
    match umbra_agent::Forwarder::start_many(
        cfg,
        &[(ECHO.into(), first), ("Not A Name".into(), any)],
    )
    .await
    {
        Err(umbra_agent::AgentError::ServiceName(n)) => assert_eq!(n, "Not A Name", "[{t}]"),
        Err(e) => panic!("[{t}] {e}"),
        Ok(f) => panic!("[{t}] started with a bad name: {:?}", f.forwards()),
    }
    std::net::TcpListener::bind(first).expect("the refused start left its first address bound");
}

/// An agent whose links never open a stream window (it takes no reply) gets its `Open`
/// reset once the broker's reply has waited `open_timeout_ms`, instead of holding the
/// broker's task, its device's stream quota and the app connection behind the dial for as
/// long as the link lives. Its twin, a normal link of the same device, is served.
/// Over QUIC only: the TLS multiplexer announces windows of at least 16 KiB (its HELLO
/// refuses less), so a TLS link cannot refuse a reply this way (the broker's reply path is
/// the same for both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_takes_no_reply_holds_nothing() {
    let t = TransportPref::Quic;
    init();
    let lt = link_transport(t);
    let s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    let alice = s.agent("alice").identity();
    let b = &s.brokers[0];
    let link = dial_with(b, lt, &alice, |c| c.stream_window = 0)
        .await
        .unwrap();
    let mut st = link.open().await.unwrap();
    st.write_frame(&Frame::Open {
        flow: umbra_proto::Flow::Tcp,
        service: ECHO.to_owned(),
        credential: Vec::new(),
    })
    .await
    .unwrap();
    let limit = Duration::from_millis(b.cfg.open_timeout_ms);
    let answer = tokio::time::timeout(limit + Duration::from_secs(5), st.read_frame()).await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "[{t}] a reply nobody takes held the stream: {answer:?}"
    );
    poll("the stream is gone from the broker", SOON, || async {
        match b.running().live_streams() {
            0 => Ok(()),
            n => Err(format!("{n} live")),
        }
    })
    .await;
    link.close();
    served(b, lt, &alice).await.unwrap();
}

/// A service list longer than one frame (16 KiB) arrives whole, in several frames; and a
/// device asking for its list in a loop (one Cedar decision per service each time) is held
/// to a budget (a burst of 10, then one per 500 ms), while another device is served.
async fn long_service_lists_arrive_whole_and_asking_is_bounded(t: TransportPref) {
    let (s, alice, bob) = bounded_broker(|_| {}, t).await;
    let names: Vec<String> = (0..400)
        .map(|i| format!("svc-{i:03}-{}", "x".repeat(55)))
        .collect();
    for n in &names {
        s.admin
            .post(
                "/v1/services",
                json!({ "name": n, "target": s.echo.to_string(), "connectors": [CONNECTOR] }),
            )
            .await;
    }
    s.admin
        .post(
            "/v1/policies",
            json!({ "name": "everything", "text": "permit (principal, action, resource);" }),
        )
        .await;
    let mut want: Vec<String> = names.clone();
    want.extend([ECHO.to_owned(), SECRET.to_owned()]);
    want.sort();
    let cfg = s.agent("bob").config(t);
    lists_soon(&format!("[{t}] bob's whole list"), &cfg, &want).await;

    // Alice asks 60 times at once on one link.
    let b0 = &s.brokers[0];
    let link = dial(b0, link_transport(t), &alice).await.unwrap();
    let started = Instant::now();
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let link = link.clone();
        asks.spawn(async move {
            let mut st = link.open().await.map_err(|e| e.to_string())?;
            st.write_frame(&Frame::ListServices)
                .await
                .map_err(|e| e.to_string())?;
            match st.read_frame().await {
                Ok(Frame::ServiceList { .. }) => Ok(true),
                Ok(other) => Err(format!("unexpected {other:?}")),
                Err(_) => Ok(false),
            }
        });
    }
    let mut answered = 0;
    while let Some(r) = asks.join_next().await {
        if r.unwrap().unwrap() {
            answered += 1;
        }
    }
    let refills = started.elapsed().as_millis() / 500 + 1;
    eprintln!(
        "[{t}] {answered} of 60 asks answered in {:?}",
        started.elapsed()
    );
    assert!(answered >= 1, "[{t}] the burst was not served");
    assert!(
        answered <= 10 + refills,
        "[{t}] {answered} answered, over the budget of 10 + {refills}"
    );
    // Bob is not held back by alice's asking; alice is served again once her budget refills.
    served(b0, link_transport(t), &bob).await.unwrap();
    // (Polled: bob's own polls above may have spent his burst while the list converged.)
    lists_soon(
        &format!("[{t}] bob's list beside alice's asking"),
        &cfg,
        &want,
    )
    .await;
    let alice_cfg = s.agent("alice").config(t);
    lists_soon(
        &format!("[{t}] alice's list after a pause"),
        &alice_cfg,
        &want,
    )
    .await;
}
both_transports!(long_service_lists_arrive_whole_and_asking_is_bounded);

/// Waits until the agent of `cfg` lists exactly `want`.
async fn lists_soon(what: &str, cfg: &umbra_agent::AgentConfig, want: &[String]) {
    poll(what, SOON, || async {
        let got = umbra_agent::services(cfg)
            .await
            .map_err(|e| e.to_string())?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{} of {} listed", got.len(), want.len()))
        }
    })
    .await;
}

/// Whether a refusal came from the TLS handshake (the certificate did not verify: the dial
/// failed, or the link closed with no word from the broker), not from a check after it.
fn refused_by_tls(r: &Refusal) -> bool {
    matches!(
        r,
        Refusal::Handshake(_) | Refusal::ClosedAfterHandshake { refused: None, .. }
    )
}

/// One process per broker or connector identity: a second started on a directory in use is
/// refused, saying why, and the first serves on; once the first has stopped, the directory
/// can be used again. (Two on one identity would take turns on every link and share one
/// audit spool.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_identity_is_refused() {
    init();
    let mut s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    let mut second = s.brokers[0].cfg.clone();
    second.listen_quic = Some("127.0.0.1:0".parse().unwrap());
    second.listen_tcp = Some("127.0.0.1:0".parse().unwrap());
    let e = umbra_broker::Broker::start(second.clone())
        .await
        .err()
        .expect("a second broker on one identity started");
    assert!(e.to_string().contains("another broker is running"), "{e}");
    let c = umbra_connector::Connector::start(umbra_connector::ConnectorConfig {
        identity_dir: s.connector_dir.clone(),
        ..umbra_connector::ConnectorConfig::default()
    })
    .await
    .err()
    .expect("a second connector on one identity started");
    assert!(
        c.to_string().contains("another connector is running"),
        "{c}"
    );
    // The first ones still serve.
    s.converge().await;
    let alice = s.agent("alice").identity();
    for t in [Transport::Quic, Transport::Tls] {
        served(&s.brokers[0], t, &alice).await.unwrap();
    }
    // Stopped, the broker's directory takes a new process.
    s.brokers[0].stop().await;
    let b = umbra_broker::Broker::start(second)
        .await
        .expect("the directory of a stopped broker");
    b.shutdown().await;
}

/// An agent stream that never sends its header frame (which service it wants) is reset once
/// the broker has waited `open_timeout_ms` for it, on both transports: a silent stream holds
/// neither a broker task nor the device's stream quota for as long as the link lives. The
/// twin: a stream on the same link that says what it wants is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_names_its_service_is_reset() {
    init();
    let s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    let alice = s.agent("alice").identity();
    let b = &s.brokers[0];
    let limit = Duration::from_millis(b.cfg.open_timeout_ms);
    for t in [Transport::Quic, Transport::Tls] {
        let link = dial(b, t, &alice).await.unwrap();
        let mut silent = link.open().await.unwrap();
        // A stream is only seen by the peer once something is sent on it: send a byte of a
        // frame header and nothing more.
        silent.send_chunk(Bytes::from_static(&[0])).await.unwrap();
        let started = Instant::now();
        let answer =
            tokio::time::timeout(limit + Duration::from_secs(5), silent.read_frame()).await;
        assert!(
            matches!(answer, Ok(Err(_))),
            "[{t:?}] a silent stream was held: {answer:?}"
        );
        eprintln!("[{t:?}] silent stream reset after {:?}", started.elapsed());
        assert!(
            started.elapsed() + Duration::from_millis(500) >= limit,
            "[{t:?}] reset before the open timeout: {:?}",
            started.elapsed()
        );
        assert_eq!(b.running().live_streams(), 0, "[{t:?}]");
        let (code, mut st) = open(&link, ECHO).await.unwrap();
        assert_eq!(code, OpenCode::Ok, "[{t:?}]");
        stream_echo(&mut st, b"after a silent stream")
            .await
            .unwrap();
        link.close();
    }
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `at` (root only). `None` where that cannot be done, which
    /// fails the test when UMBRA_E2E_REQUIRED=1 (as in CI) and skips it, saying so, otherwise.
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_owned())),
            other => {
                let why = format!("cannot mount a tmpfs (root needed): {other:?}");
                if std::env::var("UMBRA_E2E_REQUIRED").is_ok_and(|v| v == "1") {
                    panic!("{why} (UMBRA_E2E_REQUIRED=1)");
                }
                eprintln!("skipped: {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A broker whose disk is full keeps auditing every decision, across a restart on the still
/// full disk: its spool cannot record the events (nor be rewritten at start), yet each
/// reaches the controller once, and none of those after the restart is taken for a resend
/// of what was stored before it (the controller's answer says where the numbering stands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_a_full_disk_loses_no_audit_event() {
    init();
    let mut s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE, BOB],
    })
    .await;
    // The broker moves to a small disk of its own.
    let full = s.dir.path().join("full");
    let Some(_disk) = Tmpfs::mount(&full, "2M") else {
        return;
    };
    s.brokers[0].stop().await;
    let old = s.brokers[0].cfg.identity_dir.clone();
    for e in std::fs::read_dir(&old).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), full.join(e.file_name())).unwrap();
        }
    }
    s.brokers[0].cfg.identity_dir = full.clone();
    s.brokers[0].start_again().await;
    s.converge().await;
    // Bob's decisions are counted (`ready` streams as the first agent, alice).
    s.ready().await;
    let alice = s.agent("bob").identity();
    let device = s.agent("bob").device.clone();
    async fn stored(s: &Stack, device: &str) -> usize {
        s.admin
            .audit()
            .await
            .iter()
            .filter(|e| {
                e["action"] == "stream.open"
                    && e["result"] == "allow"
                    && e["detail"]["device"] == device
            })
            .count()
    }
    async fn streams(s: &Stack, alice: &TlsIdentity, n: usize) {
        let b = &s.brokers[0];
        let link = poll("a link to the broker", SOON, || {
            dial(b, Transport::Quic, alice)
        })
        .await;
        for i in 0..n {
            let (code, mut st) = open(&link, ECHO).await.unwrap();
            assert_eq!(code, OpenCode::Ok);
            stream_echo(&mut st, format!("stream {i}").as_bytes())
                .await
                .unwrap();
        }
        link.close();
    }
    async fn reach(s: &Stack, device: &str, want: usize) {
        poll("the decisions at the controller", SOON, || async {
            let n = stored(s, device).await;
            if n == want {
                Ok(())
            } else {
                Err(format!("{n} of {want}"))
            }
        })
        .await;
    }
    let before = stored(&s, &device).await;

    // Full: nothing more fits.
    let mut filler = std::fs::File::create(full.join("filler")).unwrap();
    let zeros = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut filler, &zeros).is_ok() {}
    drop(filler);
    streams(&s, &alice, 10).await;
    reach(&s, &device, before + 10).await;

    // Restarted on the full disk: it starts (the spool cannot be rewritten), and what it
    // decides next is stored too, not dropped as resends of the first ten.
    s.brokers[0].stop().await;
    s.brokers[0].start_again().await;
    s.ready().await;
    streams(&s, &alice, 5).await;
    reach(&s, &device, before + 15).await;
    // And once there is room again, the same after another restart.
    std::fs::remove_file(full.join("filler")).unwrap();
    s.brokers[0].stop().await;
    s.brokers[0].start_again().await;
    s.ready().await;
    streams(&s, &alice, 3).await;
    reach(&s, &device, before + 18).await;
    s.brokers[0].stop().await;
}
