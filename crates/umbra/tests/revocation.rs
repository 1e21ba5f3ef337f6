//! Revoking a broker, end to end in one process (see `stack_util`): a real controller, two
//! brokers, a connector and an agent forward over real sockets and TLS.
//!
//! The agent follows the broker list by long poll on the controller (default settings). A
//! revoked broker leaves that list: the agent closes its link to it, which ends the streams
//! it carried there, and takes every new connection to the other broker. Until then the list
//! alone moves nothing: the twin keeps its stream on the same broker while other admin changes
//! are made. Runs once per transport.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod stack_util;

use std::time::Duration;

use stack_util::*;
use umbra_agent::{Forwarder, TransportPref};

const ALICE: &str = "alice@example.test";

/// The broker (index) carrying exactly `n` live streams, the other carrying none.
async fn carrier(s: &Stack, n: usize) -> usize {
    poll("one broker carries the streams", SOON, || async {
        let live: Vec<usize> = s
            .brokers
            .iter()
            .map(|b| b.running().live_streams())
            .collect();
        match live.as_slice() {
            [a, 0] if *a == n => Ok(0),
            [0, b] if *b == n => Ok(1),
            other => Err(format!("live streams per broker: {other:?}")),
        }
    })
    .await
}

async fn revoked_broker_is_left(t: TransportPref) {
    init();
    let s = Stack::start(Opts {
        brokers: vec![86_400, 86_400],
        users: vec![ALICE],
    })
    .await;
    s.brokers_registered().await;
    let cfg = s.agent("alice").config(t);
    let fwd = Forwarder::start(cfg, ECHO, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let addr = fwd.local_addr();
    poll("alice reaches echo", SOON, || echo_ok(addr)).await;

    // The twin first: a live stream stays where it is while admin changes that leave the
    // broker list as it was wake the controller's long polls.
    let mut live = LiveConn::open(addr).await.unwrap();
    let used = carrier(&s, 1).await;
    for i in 0..3 {
        s.admin
            .ok(
                "POST",
                "/v1/users",
                Some(serde_json::json!({ "id": format!("bystander-{i}@example.com") })),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    live.echo(b"after three admin changes").await.unwrap();
    assert_eq!(
        carrier(&s, 1).await,
        used,
        "[{t}] an unchanged broker list moved the stream"
    );

    // Revoked: the agent drops that broker at once; its live stream ends.
    s.admin
        .ok(
            "POST",
            &format!("/v1/brokers/{}/revoke", s.brokers[used].id),
            None,
        )
        .await;
    live.closed_within(Duration::from_secs(5)).await.unwrap();
    // New connections go to the other broker, and only there.
    let mut next = LiveConn::open(addr).await.unwrap();
    next.echo(b"through the other broker").await.unwrap();
    assert_eq!(
        carrier(&s, 1).await,
        1 - used,
        "[{t}] the revoked broker is still used"
    );
    for _ in 0..3 {
        echo_ok(addr).await.unwrap();
    }
    assert_eq!(
        s.brokers[used].running().live_streams(),
        0,
        "[{t}] a stream went to the revoked broker"
    );
    drop(next);
    fwd.shutdown().await;
}
both_transports!(revoked_broker_is_left);
