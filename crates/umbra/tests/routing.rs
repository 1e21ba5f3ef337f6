//! Routing and the local decision, end to end in one process (see `stack_util`): a real
//! controller, one broker, real connectors and agents over real sockets and TLS.
//!
//! - `spread_and_failover`: two connectors serve one service; held streams are spread
//!   least-loaded (checked through the admin API's live stream list), the survivor of a
//!   connector shutdown takes every new stream while its live ones keep echoing, and with no
//!   connector left a new stream is answered `Unavailable` at once.
//! - `denied_never_reaches_connector`: a forbidden and an unknown service get the same
//!   `Denied`, and no connector ever sees a `Dial` for them (the connectors' stream counter and
//!   the target's accept count do not move); the allowed twin moves each by exactly one.
//!
//! - `a_silent_connector_is_passed_over`: a connector whose link is up but which leaves a
//!   `Dial` unanswered costs one stream the dial timeout (that stream is then served by the
//!   other connector); the streams after it are not offered to it at all, and a service it
//!   alone serves is answered `Unavailable` at once instead of waiting the dial timeout, until
//!   the connector answers the broker's pings again.
//!
//! All run once per transport (agent links and connector links alike): `::quic`, `::tcp`.
//!
//! The connectors' and brokers' Prometheus counters are read in-process from a recorder this
//! file installs; the tests of this file hold one lock so that, also under `cargo test` (one
//! process, many threads), no other test moves those counters meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod stack_util;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use stack_util::*;
use umbra_agent::TransportPref;
use umbra_connector::{Connector, ConnectorConfig};
use umbra_link::Transport;
use umbra_proto::OpenCode;

const ALICE: &str = "alice@example.test";
/// Served by two connectors, allowed to alice.
const PAIR: &str = "pair";
/// Published (counting target), no policy.
const GUARDED: &str = "guarded";
/// Published (same counting target), allowed to alice: the twin of `GUARDED`.
const ALLOWED: &str = "allowed";
/// Published by no one.
const NOSUCH: &str = "nosuch";
/// The second connector's name.
const CONN2: &str = "conn2";
/// Served by the second connector alone.
const SOLO: &str = "solo";
/// How soon a connector's departure must be noticed, and a cut stream seen closed.
const ENFORCE: Duration = Duration::from_secs(3);
/// Held streams in the spread check.
const HELD: usize = 6;

both_transports!(spread_and_failover);
both_transports!(denied_never_reaches_connector);
both_transports!(a_silent_connector_is_passed_over);

// ---------------------------------------------------------------------------------------------
// Helpers

/// One test of this file at a time in a process (the metrics recorder is process-wide).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The process-wide Prometheus recorder, installed once: the brokers' and connectors'
/// `metrics::counter!` calls land here.
fn metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("no other metrics recorder");
            handle
        })
        .clone()
}

/// The sum of every series of `name` whose labels contain all of `labels` (`k="v"` each).
fn metric(h: &PrometheusHandle, name: &str, labels: &[&str]) -> f64 {
    h.render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Every stream dial a connector of this process handled, whatever its result (the connector
/// counts each `Dial` it reads, and every malformed or missing request).
fn connector_dials(h: &PrometheusHandle) -> f64 {
    metric(h, "umbra_connector_streams_total", &[])
}

/// The stack with one broker and alice, its connector (which dials with `auto`) started again
/// over the transport under test.
async fn stack_over(t: TransportPref) -> Stack {
    let mut s = Stack::start(Opts {
        brokers: vec![86_400],
        users: vec![ALICE],
    })
    .await;
    s.connector.take().unwrap().shutdown().await;
    s.connector = Some(start_connector(&s.connector_dir, t).await);
    s
}

/// Enrolls one more connector named `name` the way `Stack::start` enrolls the first; its
/// identity directory and id.
async fn enroll_connector(s: &Stack, name: &str) -> (PathBuf, String) {
    let token = s.admin.token("connector", None, Some(name)).await;
    let dir = s.dir.path().join(name);
    let issued = umbra_link::enroll::enroll(&s.url, &token, &dir, umbra_proto::Role::Connector)
        .await
        .unwrap();
    let id = issued.identity.rsplit('/').next().unwrap().to_owned();
    (dir, id)
}

/// Starts a connector from `dir` as `Stack::start_connector` does, dialing brokers over `t`.
async fn start_connector(dir: &Path, t: TransportPref) -> Connector {
    Connector::start(ConnectorConfig {
        identity_dir: dir.to_path_buf(),
        transport: t,
        reconnect_base_ms: 100,
        reconnect_cap_ms: 1_000,
        ..ConnectorConfig::default()
    })
    .await
    .unwrap()
}

/// Publishes `name` -> `target` for `connectors` (names).
async fn publish(s: &Stack, name: &str, target: SocketAddr, connectors: &[&str]) {
    s.admin
        .post(
            "/v1/services",
            json!({ "name": name, "target": target.to_string(), "connectors": connectors }),
        )
        .await;
}

/// Waits until the connector in `dir` holds `service` -> `target` among its published targets
/// (it caches them in `published.json` as they arrive).
async fn published(dir: &Path, service: &str, target: SocketAddr) {
    let path = dir.join("published.json");
    poll(
        &format!("{} publishes {service}", dir.display()),
        SOON,
        || {
            let path = path.clone();
            async move {
                let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let held = v["targets"].as_array().cloned().unwrap_or_default();
                if held
                    .iter()
                    .any(|p| p["service"] == service && p["target"] == target.to_string().as_str())
                {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
}

/// Waits until the broker holds exactly `n` connector links, all over `t` (its
/// `umbra_broker_links` gauge).
async fn connector_links(h: &PrometheusHandle, n: usize, t: Transport) {
    let over = format!("transport=\"{}\"", t.as_str());
    poll(&format!("{n} connector links over {t:?}"), SOON, || async {
        let all = metric(h, "umbra_broker_links", &["role=\"connector\""]);
        let over_t = metric(h, "umbra_broker_links", &["role=\"connector\"", &over]);
        if all == n as f64 && over_t == n as f64 {
            Ok(())
        } else {
            Err(format!("{all} links, {over_t} over {t:?}"))
        }
    })
    .await;
}

/// Live streams of `service` in the admin API: stream id -> connector id.
async fn live_streams(s: &Stack, service: &str) -> BTreeMap<u64, String> {
    let v = s.admin.get("/v1/streams").await;
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["service"] == service)
        .map(|e| {
            (
                e["id"].as_u64().unwrap(),
                e["connector"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls the live stream list of `service` until `ok` accepts it.
async fn streams_until(
    s: &Stack,
    service: &str,
    what: &str,
    ok: impl Fn(&BTreeMap<u64, String>) -> bool,
) -> BTreeMap<u64, String> {
    poll(what, SOON, || async {
        let l = live_streams(s, service).await;
        if ok(&l) { Ok(l) } else { Err(format!("{l:?}")) }
    })
    .await
}

fn per_connector(l: &BTreeMap<u64, String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in l.values() {
        *m.entry(c.clone()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Cases

/// (A) Several connectors serve one service: held streams go to the least-loaded one; the
/// survivor of a shutdown takes every new stream and keeps its live ones; with none left, a
/// new stream is answered `Unavailable` promptly.
async fn spread_and_failover(t: TransportPref) {
    init();
    let _serial = serial().await;
    let prom = metrics();
    let lt = link_transport(t);
    let mut s = stack_over(t).await;
    let conn1 = s.connector_id.clone();
    let (dir2, conn2) = enroll_connector(&s, CONN2).await;
    let c2 = start_connector(&dir2, t).await;

    let (target, accepted, _echo) = counting_echo().await;
    publish(&s, PAIR, target, &[CONNECTOR, CONN2]).await;
    s.admin.allow("alice-pair", ALICE, PAIR).await;
    s.converge().await;
    published(&s.connector_dir, PAIR, target).await;
    published(&dir2, PAIR, target).await;
    connector_links(&prom, 2, lt).await;

    let fwd = s.forward("alice", t, PAIR).await;
    let fa = fwd.local_addr();
    poll("alice reaches pair", SOON, || echo_ok(fa)).await;
    streams_until(&s, PAIR, "the probe stream ends", BTreeMap::is_empty).await;

    // 1. Held streams, opened one after the other: each goes to the connector carrying fewer,
    // so the counts never differ by more than one, and end 3/3.
    let before = accepted.load(Ordering::SeqCst);
    // (connection, stream id, connector id)
    let mut held: Vec<(LiveConn, u64, String)> = Vec::new();
    for i in 1..=HELD {
        let conn = LiveConn::open(fa).await.unwrap();
        let known: BTreeSet<u64> = held.iter().map(|h| h.1).collect();
        let l = streams_until(&s, PAIR, &format!("{i} live streams listed"), |l| {
            l.len() == i
        })
        .await;
        let (id, via) = l
            .iter()
            .find(|(id, _)| !known.contains(id))
            .map(|(id, c)| (*id, c.clone()))
            .unwrap();
        let counts = per_connector(&l);
        let (a, b) = (
            counts.get(&conn1).copied().unwrap_or(0),
            counts.get(&conn2).copied().unwrap_or(0),
        );
        assert_eq!(a + b, i, "[{t}] streams on unknown connectors: {l:?}");
        assert!(a.abs_diff(b) <= 1, "[{t}] after {i} streams: {l:?}");
        eprintln!("[{t}] stream {i} (id {id}) via {via}: {a}/{b}");
        held.push((conn, id, via));
    }
    let counts = per_connector(&live_streams(&s, PAIR).await);
    assert_eq!(counts.get(&conn1), Some(&3), "[{t}] {counts:?}");
    assert_eq!(counts.get(&conn2), Some(&3), "[{t}] {counts:?}");
    assert_eq!(accepted.load(Ordering::SeqCst) - before, HELD);
    for (c, _, _) in &mut held {
        c.echo(b"all six carry bytes").await.unwrap();
    }

    // 2. conn1 goes away: its streams are cut, conn2's keep echoing, and every new stream
    // goes through conn2 within a few seconds.
    s.connector.take().unwrap().shutdown().await;
    let started = Instant::now();
    let mut survivors = Vec::new();
    for (c, _, via) in held {
        if via == conn1 {
            c.closed_within(ENFORCE).await.unwrap();
        } else {
            survivors.push(c);
        }
    }
    assert_eq!(survivors.len(), 3);
    for c in &mut survivors {
        c.echo(b"still here after conn1 left").await.unwrap();
    }
    let first = poll("a new stream through conn2", ENFORCE, || LiveConn::open(fa)).await;
    eprintln!(
        "[{t}] first new stream after conn1 left: {:?}",
        started.elapsed()
    );
    survivors.push(first);
    for _ in 0..2 {
        // Healthy pick: no new stream is offered to the departed connector.
        survivors.push(LiveConn::open(fa).await.unwrap());
    }
    let l = streams_until(&s, PAIR, "six streams, all via conn2", |l| {
        l.len() == HELD && l.values().all(|c| *c == conn2)
    })
    .await;
    eprintln!("[{t}] after conn1 left: {l:?}");
    for c in &mut survivors {
        c.echo(b"conn2 carries everything").await.unwrap();
    }

    // 3. The twin: with no connector left, a new stream is answered Unavailable (not left
    // hanging), the live ones are cut, and the forward closes without a byte.
    c2.shutdown().await;
    for c in survivors {
        c.closed_within(ENFORCE).await.unwrap();
    }
    let alice = s.agent("alice").identity();
    let link = dial(&s.brokers[0], lt, &alice).await.unwrap();
    let started = Instant::now();
    // `open_code` gives up after 3 s: an answer at all is the "not hanging" half.
    let code = poll("an answer with no connector", ENFORCE, || {
        open_code(&link, PAIR)
    })
    .await;
    assert_eq!(code, OpenCode::Unavailable, "[{t}]");
    eprintln!("[{t}] Unavailable after {:?}", started.elapsed());
    // Every later stream too, each answered (within open_code's 3 s).
    assert_eq!(open_code(&link, PAIR).await.unwrap(), OpenCode::Unavailable);
    refused(fa).await.unwrap();
    link.close();
    poll("no_connector in the audit log", SOON, || async {
        let audit = s.admin.audit().await;
        if audit.iter().any(|e| {
            e["action"] == "stream.open"
                && e["target"] == PAIR
                && e["result"] == "error"
                && e["detail"]["reason"] == "no_connector"
        }) {
            Ok(())
        } else {
            Err(format!("{} entries", audit.len()))
        }
    })
    .await;
}

/// (B) The broker decides before any byte reaches a connector: a forbidden service and an
/// unknown one get the same `Denied`, the connectors read no `Dial`, the target accepts
/// nothing; the allowed twin reaches the target exactly once.
async fn denied_never_reaches_connector(t: TransportPref) {
    init();
    let _serial = serial().await;
    let prom = metrics();
    let lt = link_transport(t);
    let s = stack_over(t).await;
    let (target, accepted, _echo) = counting_echo().await;
    publish(&s, GUARDED, target, &[CONNECTOR]).await;
    publish(&s, ALLOWED, target, &[CONNECTOR]).await;
    s.admin.allow("alice-allowed", ALICE, ALLOWED).await;
    s.converge().await;
    // The connector would dial the guarded target if asked: it is published for it.
    published(&s.connector_dir, GUARDED, target).await;
    published(&s.connector_dir, ALLOWED, target).await;
    connector_links(&prom, 1, lt).await;
    let b0 = &s.brokers[0];
    let alice = s.agent("alice").identity();
    let link = dial(b0, lt, &alice).await.unwrap();
    // Warm-up: the allowed path works end to end.
    poll("allowed reaches the target", SOON, || async {
        let (code, mut st) = open(&link, ALLOWED).await?;
        if code != OpenCode::Ok {
            return Err(format!("{code:?}"));
        }
        stream_echo(&mut st, b"warm-up").await
    })
    .await;
    let guarded_fwd = s.forward("alice", t, GUARDED).await;
    let nosuch_fwd = s.forward("alice", t, NOSUCH).await;

    let accepts0 = accepted.load(Ordering::SeqCst);
    let dials0 = connector_dials(&prom);
    let ok0 = metric(&prom, "umbra_connector_streams_total", &["result=\"ok\""]);
    let denied0 = metric(
        &prom,
        "umbra_broker_decisions_total",
        &["result=\"denied\""],
    );
    let audit0 = s.admin.audit().await.len();

    // Forbidden and unknown: the same answer, frame level and through the agent.
    assert_eq!(open_code(&link, GUARDED).await.unwrap(), OpenCode::Denied);
    assert_eq!(open_code(&link, NOSUCH).await.unwrap(), OpenCode::Denied);
    refused(guarded_fwd.local_addr()).await.unwrap();
    refused(nosuch_fwd.local_addr()).await.unwrap();
    assert_eq!(
        metric(
            &prom,
            "umbra_broker_decisions_total",
            &["result=\"denied\""]
        ) - denied0,
        4.0,
        "[{t}] the broker decided four denials"
    );

    // The legitimate twin, after the denials on the same link: reaches the target once.
    let (code, mut st) = open(&link, ALLOWED).await.unwrap();
    assert_eq!(code, OpenCode::Ok);
    stream_echo(&mut st, b"the twin").await.unwrap();
    poll("the twin counted by the connector", SOON, || async {
        let ok = metric(&prom, "umbra_connector_streams_total", &["result=\"ok\""]);
        if ok - ok0 >= 1.0 {
            Ok(())
        } else {
            Err(format!("{ok} ok dials"))
        }
    })
    .await;
    // Any Dial sent for the denied streams went out before the twin's on the same link, so
    // it would have been read (and counted) by now.
    assert_eq!(
        accepted.load(Ordering::SeqCst) - accepts0,
        1,
        "[{t}] the target accepted something besides the twin"
    );
    assert_eq!(
        connector_dials(&prom) - dials0,
        1.0,
        "[{t}] the connector read a Dial besides the twin's:\n{}",
        prom.render()
    );

    // The audit log: the two denials with their reasons, no route or dial for them.
    let audit = poll("denials and the twin in the audit log", SOON, || async {
        let audit = s.admin.audit().await;
        let new = &audit[audit0.min(audit.len())..];
        let denied = |service: &str, reason: &str| {
            new.iter()
                .filter(|e| {
                    e["action"] == "stream.open"
                        && e["result"] == "deny"
                        && e["target"] == service
                        && e["detail"]["reason"] == reason
                })
                .count()
        };
        let twin = new.iter().any(|e| {
            e["action"] == "stream.open" && e["result"] == "allow" && e["target"] == ALLOWED
        });
        if denied(GUARDED, "no_permit") == 2 && denied(NOSUCH, "unknown_service") == 2 && twin {
            Ok(new.to_vec())
        } else {
            Err(format!("{} new entries", new.len()))
        }
    })
    .await;
    for e in &audit {
        // The stack's own readiness checks on `echo` (in `Stack::start`, while the connector
        // may not have its targets yet) can land after `audit0`: brokers report in batches.
        if e["target"] == ECHO {
            continue;
        }
        let about_denied = e["target"] == GUARDED || e["target"] == NOSUCH;
        assert!(
            !(about_denied && (e["result"] != "deny" || e["detail"].get("connector").is_some())),
            "[{t}] a denied stream went further: {e}"
        );
        assert_ne!(e["action"], "stream.dial", "[{t}] {e}");
    }
    assert!(
        live_streams(&s, GUARDED).await.is_empty() && live_streams(&s, NOSUCH).await.is_empty()
    );
    link.close();
    guarded_fwd.shutdown().await;
    nosuch_fwd.shutdown().await;
}

async fn a_silent_connector_is_passed_over(t: TransportPref) {
    init();
    let _serial = serial().await;
    let prom = metrics();
    let lt = link_transport(t);
    let s = stack_over(t).await;
    let (dir2, _) = enroll_connector(&s, CONN2).await;
    let (target, _accepted, _echo) = counting_echo().await;
    publish(&s, PAIR, target, &[CONNECTOR, CONN2]).await;
    s.admin.allow("alice-pair", ALICE, PAIR).await;
    s.converge().await;
    published(&s.connector_dir, PAIR, target).await;
    connector_links(&prom, 1, lt).await;
    // The second connector: linked, keeps its link alive, never answers a Dial.
    let id2 = umbra_pki::TlsIdentity::load_dir(&dir2).unwrap();
    let silent = dial(&s.brokers[0], lt, &id2).await.unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    let pongs = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(stand_in_connector_with(
        silent.clone(),
        Some(Vec::new()),
        dials.clone(),
        pongs.clone(),
    ));
    connector_links(&prom, 2, lt).await;

    let fwd = s.forward("alice", t, PAIR).await;
    let fa = fwd.local_addr();
    // A held stream loads one connector, so the next is offered to the other: within a few
    // streams the silent one is offered one. That stream waits out the broker's dial timeout
    // there (5 s, longer than the agent's open timeout: the agent pings, finds the broker alive
    // and waits) and is then served by the real connector.
    // (Any of these may be the one offered to the silent connector, and wait 5 s.)
    let mut held = LiveConn(tokio::net::TcpStream::connect(fa).await.unwrap());
    tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.0.write_all(b"held").await?;
        held.0.read_exact(&mut [0u8; 4]).await.map(|_| ())
    })
    .await
    .expect("the held stream is served")
    .unwrap();
    for i in 0..3 {
        if dials.load(Ordering::SeqCst) > 0 {
            break;
        }
        round_trip(fa, b"through whichever", Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("[{t:?}] stream {i} not served: {e}"));
    }
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "[{t:?}] the silent one was tried once"
    );
    // From now on it is passed over, though it carries nothing.
    for i in 0..4 {
        echo_ok(fa)
            .await
            .unwrap_or_else(|e| panic!("[{t:?}] stream {i}: {e}"));
    }
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "[{t:?}] streams were offered to the connector that had not answered"
    );
    assert!(!silent.is_closed(), "[{t:?}] the silent link is still up");
    held.echo(b"still held").await.unwrap();

    // A service that only the silent connector serves: its streams are not sent to wait out
    // the dial timeout there one after another, they are answered `Unavailable` at once (an
    // agent then asks another broker), and no `Dial` reaches the silent link.
    publish(&s, SOLO, target, &[CONN2]).await;
    s.admin.allow("alice-solo", ALICE, SOLO).await;
    s.converge().await;
    let alice = s.agent("alice").identity();
    let link = dial(&s.brokers[0], lt, &alice).await.unwrap();
    for i in 0..3 {
        // `open_code` gives up after 3 s, within the broker's dial timeout (5 s here) that a
        // Dial on the silent link would wait out: an answer at all is the "at once" half.
        let code = open_code(&link, SOLO).await.unwrap();
        assert_eq!(code, OpenCode::Unavailable, "[{t:?}] stream {i}");
    }
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "[{t:?}] a Dial reached the silent link"
    );
    // The audit record says why: a connector passed over, not none linked.
    s.admin
        .wait_audited(&format!("[{t:?}] the silent connector named"), 3, |e| {
            e["action"] == "stream.open"
                && e["target"] == SOLO
                && e["detail"]["reason"] == "connector_silent"
        })
        .await;
    // Once it answers the broker's pings again, it is offered streams again: within a ping or
    // two, not at the end of the 30 s pass (a short outage costs seconds).
    pongs.store(true, Ordering::SeqCst);
    poll(
        &format!("[{t:?}] the silent connector taken back"),
        SOON,
        || async {
            let link = link.clone();
            tokio::spawn(async move { open_code(&link, SOLO).await });
            tokio::time::sleep(Duration::from_millis(300)).await;
            match dials.load(Ordering::SeqCst) {
                1 => Err("not offered a stream yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    link.close();
}
