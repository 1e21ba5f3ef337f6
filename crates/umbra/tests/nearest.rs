//! The agent uses the nearest broker: two brokers in one process (see `stack_util`), one of
//! them reached through a relay that delays every chunk by `DELAY` each way, the way a far
//! point of presence is. The agent measures both and carries its streams through the near one;
//! with the delay moved to the other broker, it picks that one. Which broker carries a stream
//! is read from the controller's live stream list.
//!
//! The delayed broker listens on 127.0.0.1 and advertises 127.0.0.2, where the relay listens
//! on the same port (TLS over TCP; the agents here use that transport).
//!
//! An agent that failed over to the far broker while the near one was down returns to the
//! near one once it answers again (its brokers are measured again while it runs).
//!
//! A service whose one connector is linked to the far broker only is served through the far
//! broker (a side link: the near broker stays the agent's first choice). Revoking the far
//! broker ends that side link and its stream, not the near broker's. Once the connector links
//! to the near one too, the same agent's new streams go through the near one again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod stack_util;

use std::net::SocketAddr;
use std::time::Duration;

use stack_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use umbra_agent::{Forwarder, TransportPref};

const ALICE: &str = "alice@example.test";
/// Added to each direction of every chunk through the relay.
const DELAY: Duration = Duration::from_millis(25);
/// The far broker's advertised address.
const FAR_HOST: &str = "127.0.0.2";
/// A service whose connector links to the far broker first, to the near one later.
const LATE: &str = "late";

/// Relays `127.0.0.2:port` to `127.0.0.1:port`, each chunk held back by [`DELAY`].
async fn delay_relay(port: u16) -> JoinHandle<()> {
    let l = TcpListener::bind((FAR_HOST, port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(delayed(ri, wo), delayed(ro, wi));
            });
        }
    })
}

async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tokio::time::sleep(DELAY).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A broker named `name` on 127.0.0.1 (TCP only) that advertises `advertise`; its port.
async fn add_broker(s: &mut Stack, name: &str, advertise: &str) -> SocketAddr {
    let token = s.admin.token("broker", None, Some(name)).await;
    let dir = s.dir.path().join(name);
    umbra_link::enroll::enroll(&s.url, &token, &dir, umbra_proto::Role::Broker)
        .await
        .unwrap();
    let slot = s
        .start_broker(name, dir, |c| {
            c.listen_quic = None;
            c.advertise_host = Some(advertise.into());
        })
        .await;
    slot.tcp
}

/// Alice's agent forwarding `service` over TLS/TCP. Its probes and opens get 5 s (1 s by
/// default): on a loaded machine a slow answer must not make the near broker look dead.
async fn forward(s: &Stack, service: &str) -> Forwarder {
    let mut cfg = s.agent("alice").config(TransportPref::Tcp);
    cfg.open_timeout_ms = 5_000;
    Forwarder::start(cfg, service, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

/// The broker (name or id) carrying alice's one live stream to `service`.
async fn carrier(s: &Stack, service: &str) -> String {
    poll("the live stream is listed", SOON, || async {
        let v = s.admin.get("/v1/streams").await;
        let live: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["service"] == service)
            .map(|e| e["broker"].as_str().unwrap().to_owned())
            .collect();
        match live.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Two brokers, broker `far` (0 or 1) behind the delay relay; a connector linked to both
/// serving echo; alice enrolled and allowed. Returns the stack and what must stay alive.
async fn two_brokers(far: usize) -> (Stack, JoinHandle<()>, JoinHandle<()>) {
    init();
    let mut s = Stack::controller_only(&[ALICE]).await;
    let mut ports = Vec::new();
    for i in 0..2 {
        let host = if i == far { FAR_HOST } else { "127.0.0.1" };
        ports.push(add_broker(&mut s, &format!("broker-{i}"), host).await);
    }
    let relay = delay_relay(ports[far].port()).await;
    let (echo, echo_task) = echo_server().await;
    s.echo = echo;
    // The connector and the agent learn the brokers from the controller: wait until both
    // have reported their (advertised) addresses.
    s.brokers_registered().await;
    let token = s.admin.token("connector", None, Some(CONNECTOR)).await;
    umbra_link::enroll::enroll(
        &s.url,
        &token,
        &s.connector_dir,
        umbra_proto::Role::Connector,
    )
    .await
    .unwrap();
    s.admin
        .post(
            "/v1/services",
            serde_json::json!({ "name": ECHO, "target": echo.to_string(), "connectors": [CONNECTOR] }),
        )
        .await;
    s.start_connector().await;
    s.admin.allow("alice-echo", ALICE, ECHO).await;
    s.enroll_agent(ALICE, "alice").await;
    s.converge().await;

    // Both brokers serve echo (the connector has linked to each) before the agent starts:
    // otherwise its first stream would fail over to the far one for want of a connector.
    let id = s.agent("alice").identity();
    for b in &s.brokers {
        poll(&format!("{} serves echo", b.cfg.name), SOON, || {
            served(b, umbra_link::Transport::Tls, &id)
        })
        .await;
    }
    (s, relay, echo_task)
}

async fn nearest_is_used(far: usize) {
    let (s, _relay, _echo_task) = two_brokers(far).await;
    let fwd = forward(&s, ECHO).await;
    let mut held_near = poll("alice reaches echo", SOON, || {
        LiveConn::open(fwd.local_addr())
    })
    .await;
    let near = &s.brokers[1 - far];
    let got = carrier(&s, ECHO).await;
    assert!(
        got == near.cfg.name || got == near.id,
        "the stream went through {got}, not the near broker {} ({})",
        near.cfg.name,
        near.id
    );
    held_near.echo(b"still there").await.unwrap();

    // A service whose one connector (a stand-in) is linked to the far broker only: the near
    // broker answers `Unavailable`, and the same agent gets it through the far one.
    let token = s.admin.token("connector", None, Some("late")).await;
    let dir = s.dir.path().join("late");
    umbra_link::enroll::enroll(&s.url, &token, &dir, umbra_proto::Role::Connector)
        .await
        .unwrap();
    s.admin
        .post(
            "/v1/services",
            serde_json::json!({ "name": LATE, "target": "127.0.0.1:9", "connectors": ["late"] }),
        )
        .await;
    s.admin.allow("alice-late", ALICE, LATE).await;
    s.converge().await;
    let id = umbra_pki::TlsIdentity::load_dir(&dir).unwrap();
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let link_to = |b: usize| {
        let (id, dials, slot) = (id.clone(), dials.clone(), &s.brokers[b]);
        async move {
            let link = dial(slot, umbra_link::Transport::Tls, &id).await.unwrap();
            tokio::spawn(stand_in_connector(link.clone(), None, dials));
            link
        }
    };
    let _far_link = link_to(far).await;
    let late_fwd = forward(&s, LATE).await;
    let held = poll("late through the far broker", SOON, || {
        LiveConn::open(late_fwd.local_addr())
    })
    .await;
    let farb = &s.brokers[far];
    let got = carrier(&s, LATE).await;
    assert!(got == farb.cfg.name || got == farb.id, "{got}");
    // Revoking the far broker ends the agent's side link to it and the stream on it; the
    // stream through the near broker goes on.
    s.admin
        .ok("POST", &format!("/v1/brokers/{}/revoke", farb.id), None)
        .await;
    held.closed_within(Duration::from_secs(5)).await.unwrap();
    held_near.echo(b"the near broker's stream").await.unwrap();
    // Once the connector links to the near broker too, the same agent's new streams go
    // through the near one again: the far broker only stood in.
    let _near_link = link_to(1 - far).await;
    poll("late through the near broker again", SOON, || async {
        let c = LiveConn::open(late_fwd.local_addr()).await?;
        let got = carrier(&s, LATE).await;
        drop(c);
        if got == near.cfg.name || got == near.id {
            Ok(())
        } else {
            Err(format!("through {got}"))
        }
    })
    .await;
}

/// The near broker is down when the forward starts: its streams go through the far one. Once
/// the near broker is back, new streams go through it again (a stream already on the far one
/// stays there), without restarting the forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_returns_to_the_nearest_broker() {
    let far = 1;
    let (mut s, _relay, _echo_task) = two_brokers(far).await;
    // The near broker goes away; the forward starts on the far one.
    s.brokers[1 - far].stop().await;
    let mut cfg = s.agent("alice").config(TransportPref::Tcp);
    cfg.open_timeout_ms = 5_000;
    cfg.reprobe_secs = 1;
    let fwd = Forwarder::start(cfg, ECHO, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let mut on_far = poll("alice reaches echo", SOON, || {
        LiveConn::open(fwd.local_addr())
    })
    .await;
    let farb = &s.brokers[far];
    let got = carrier(&s, ECHO).await;
    assert!(got == farb.cfg.name || got == farb.id, "{got}");
    // Back: new streams go to it again; the one on the far broker goes on.
    s.brokers[1 - far].start_again().await;
    let near = &s.brokers[1 - far];
    poll(
        "new streams through the near broker again",
        Duration::from_secs(20),
        || async {
            let c = LiveConn::open(fwd.local_addr()).await?;
            // Held until its broker's next heartbeat lists it.
            let mut last = serde_json::Value::Null;
            for _ in 0..15 {
                last = s.admin.get("/v1/streams").await;
                let through_near = last.as_array().unwrap().iter().any(|e| {
                    e["service"] == ECHO
                        && (e["broker"] == near.cfg.name.as_str()
                            || e["broker"] == near.id.as_str())
                });
                if through_near {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(c);
            Err(format!("{last}"))
        },
    )
    .await;
    on_far.echo(b"still on the far broker").await.unwrap();
    fwd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_broker_is_used_far_second() {
    nearest_is_used(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_broker_is_used_far_first() {
    nearest_is_used(0).await;
}
