//! One outbound link to every broker, kept up for as long as the broker is listed.
//!
//! The connector never listens: it dials each broker (QUIC first, TLS over TCP when QUIC fails
//! and the transport is `auto`), and the broker opens streams on that link. A task per broker
//! redials with full-jitter backoff; when the broker list changes the supervisor starts and
//! stops tasks from a pure [`plan`] of the difference. New links use the newest identity: when
//! the certificate is renewed each task links again at once, and the old link serves what it
//! still carries until the broker closes it at the old certificate's expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use umbra_link::backoff::Backoff;
use umbra_link::{Link, LinkConfig, Refusal};
use umbra_proto::api::BrokerInfo;

use crate::config::ConnectorConfig;
use crate::serve::{ServeCtx, handle_stream};
use crate::sync::{BrokersRx, IdentityRx};

/// What the supervisor must do to go from the running set to the wanted one.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Broker ids whose task must stop (gone, or changed address or name).
    pub(crate) stop: Vec<String>,
    /// Brokers to start a task for.
    pub(crate) start: Vec<BrokerInfo>,
}

/// Pure diff of broker lists, keyed by broker id. A broker whose entry changed in any field is
/// stopped and started again (its addresses or server name may be different). Later
/// duplicates of an id in `wanted` are ignored.
pub(crate) fn plan(running: &[BrokerInfo], wanted: &[BrokerInfo]) -> Plan {
    let mut seen = std::collections::HashSet::new();
    let wanted: Vec<&BrokerInfo> = wanted.iter().filter(|b| seen.insert(&b.id)).collect();
    let mut p = Plan::default();
    for r in running {
        match wanted.iter().find(|w| w.id == r.id) {
            Some(w) if *w == r => {}
            _ => p.stop.push(r.id.clone()),
        }
    }
    for w in wanted {
        match running.iter().find(|r| r.id == w.id) {
            Some(r) if r == w => {}
            _ => p.start.push(w.clone()),
        }
    }
    p
}

/// Shared by every broker task.
pub(crate) struct LinkCtx {
    pub(crate) cfg: ConnectorConfig,
    pub(crate) link_cfg: LinkConfig,
    pub(crate) identity: IdentityRx,
    pub(crate) serve: Arc<ServeCtx>,
}

struct Running {
    info: BrokerInfo,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Keeps one task per listed broker until `cancel`, then stops them all.
pub(crate) async fn supervise(
    ctx: Arc<LinkCtx>,
    mut brokers: BrokersRx,
    cancel: CancellationToken,
) {
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        let wanted = brokers.borrow_and_update().clone();
        let current: Vec<BrokerInfo> = running.values().map(|r| r.info.clone()).collect();
        let p = plan(&current, &wanted);
        for id in &p.stop {
            if let Some(r) = running.remove(id) {
                tracing::info!(broker = %r.info.name, "broker no longer listed; closing its link");
                r.cancel.cancel();
            }
        }
        for info in p.start {
            let child = cancel.child_token();
            let span = tracing::info_span!("link", broker = %info.name, broker_id = %info.id);
            let task = tokio::spawn(
                broker_task(ctx.clone(), info.clone(), child.clone()).instrument(span),
            );
            running.insert(
                info.id.clone(),
                Running {
                    info,
                    cancel: child,
                    task,
                },
            );
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            r = brokers.changed() => if r.is_err() { break },
        }
    }
    for r in running.values() {
        r.cancel.cancel();
    }
    for (_, r) in running {
        let _ = r.task.await;
    }
}

/// Dials one broker, serves its streams while the link lives, redials with backoff.
async fn broker_task(ctx: Arc<LinkCtx>, broker: BrokerInfo, cancel: CancellationToken) {
    let mut backoff = Backoff::new(ctx.cfg.reconnect_base(), ctx.cfg.reconnect_cap());
    let name: Arc<str> = Arc::from(broker.name.as_str());
    // Links up to this broker: one, or two while a link of the old certificate drains.
    let gauge = metrics::gauge!("umbra_connector_links", "broker" => broker.name.clone());
    let mut identity = ctx.identity.clone();
    loop {
        identity.borrow_and_update();
        let dialed = tokio::select! {
            () = cancel.cancelled() => return,
            r = dial_broker(&ctx, &broker) => r,
        };
        match dialed {
            Ok(link) => {
                let up_at = tokio::time::Instant::now();
                gauge.increment(1.0);
                tracing::info!(
                    transport = link.transport().as_str(),
                    kx = link.kx_group(),
                    remote = %link.remote_addr(),
                    peer = %link.peer().id,
                    "link up"
                );
                if serve_link(&ctx, &link, &name, &cancel, Some(&mut identity)).await
                    == Ended::Renewed
                {
                    // The old link keeps serving what the broker still sends it (the broker
                    // gives new streams to the newest link) until its certificate expires
                    // and the broker closes it; the new certificate links again at once.
                    tracing::info!("certificate renewed; linking again with it");
                    let (ctx, name, cancel) = (ctx.clone(), name.clone(), cancel.clone());
                    let gauge = gauge.clone();
                    tokio::spawn(
                        async move {
                            serve_link(&ctx, &link, &name, &cancel, None).await;
                            gauge.decrement(1.0);
                        }
                        .in_current_span(),
                    );
                    backoff.reset();
                    continue;
                }
                gauge.decrement(1.0);
                if cancel.is_cancelled() {
                    return;
                }
                match after_link(link.refused(), up_at.elapsed(), &mut backoff) {
                    Some(Refusal::Identity) => tracing::warn!(
                        attempt = backoff.attempt(),
                        "the broker refused this connector's identity (revoked, or not enrolled): \
                         ask an administrator; redialing with growing delays"
                    ),
                    Some(Refusal::TooManyLinks) => tracing::warn!(
                        attempt = backoff.attempt(),
                        "the broker holds as many links for this connector's identity as it \
                         allows (do several connector processes share one identity? each \
                         needs its own enrollment); redialing with growing delays"
                    ),
                    None if backoff.attempt() == 0 => tracing::warn!("link down; redialing"),
                    None => tracing::warn!(
                        attempt = backoff.attempt(),
                        "link down again soon after it came up; redialing with growing delays"
                    ),
                }
            }
            Err(e) => {
                if backoff.attempt() == 0 || backoff.attempt().is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt = backoff.attempt(), "cannot reach broker");
                } else {
                    tracing::debug!(error = %e, attempt = backoff.attempt(), "cannot reach broker");
                }
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// A link up at least this long ended for an ordinary reason (a broker restart, a network
/// change): redial at once.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// After a link ended: a link that was up a while and merely went away is redialed at once
/// (the backoff starts over). One the broker refused, or one that went down soon after it
/// came up (a broker in a crash loop, or one that sends a frame this connector refuses),
/// keeps the backoff growing, since redialing at the base interval would only meet the
/// same end, a full handshake each time. Returns the refusal, if any.
fn after_link(
    refused: Option<Refusal>,
    lasted: Duration,
    backoff: &mut Backoff,
) -> Option<Refusal> {
    if refused.is_none() && lasted >= STABLE_LINK {
        backoff.reset();
    }
    refused
}

/// Why [`serve_link`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The link closed, or `cancel` (then the link was closed here).
    Closed,
    /// A renewed certificate arrived; the link is still up.
    Renewed,
}

/// Accepts the streams the broker opens until the link closes or `cancel`, or, given
/// `renewal`, until the identity changes. A stream whose request is malformed closes the
/// link (see `serve`); it is then redialed like any other.
async fn serve_link(
    ctx: &LinkCtx,
    link: &Link,
    broker: &Arc<str>,
    cancel: &CancellationToken,
    mut renewal: Option<&mut IdentityRx>,
) -> Ended {
    loop {
        let renewed = async {
            let changed = match renewal.as_deref_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                // No watch, or its sender is gone: never.
                std::future::pending::<()>().await;
            }
        };
        let stream = tokio::select! {
            () = cancel.cancelled() => {
                link.close();
                return Ended::Closed;
            }
            () = renewed => return Ended::Renewed,
            s = link.accept() => s,
        };
        let Some(stream) = stream else {
            return Ended::Closed;
        };
        let span = tracing::debug_span!("stream", id = stream.id());
        tokio::spawn(
            handle_stream(stream, link.clone(), ctx.serve.clone(), broker.clone()).instrument(span),
        );
    }
}

/// Tries the allowed transports in order with the current identity.
async fn dial_broker(
    ctx: &LinkCtx,
    broker: &BrokerInfo,
) -> Result<Link, umbra_link::DialBrokerError> {
    let identity = ctx.identity.borrow().clone();
    // The link bounds its own handshake; this outer bound only guards against a dial that
    // never returns.
    let bound = ctx.link_cfg.handshake_timeout + Duration::from_secs(1);
    umbra_link::dial_broker(broker, ctx.cfg.transport, &identity, &ctx.link_cfg, bound).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, quic: &str) -> BrokerInfo {
        BrokerInfo {
            id: id.into(),
            name: format!("name-{id}"),
            quic_addr: Some(quic.into()),
            tcp_addr: Some("127.0.0.1:443".into()),
            server_name: format!("{id}.broker.umbra.internal"),
        }
    }

    #[test]
    fn a_refused_or_short_link_keeps_the_backoff_growing() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let grown = |b: &mut Backoff| {
            for _ in 0..5 {
                b.next_delay(1.0);
            }
        };
        grown(&mut backoff);
        let long = Duration::from_secs(3600);
        for r in [Refusal::Identity, Refusal::TooManyLinks] {
            assert_eq!(after_link(Some(r), long, &mut backoff), Some(r));
            assert_eq!(backoff.attempt(), 5, "{r:?}: the next delay keeps growing");
        }
        // A link that went down right after it came up, without a refusal, as well.
        assert_eq!(
            after_link(None, Duration::from_millis(5), &mut backoff),
            None
        );
        assert_eq!(backoff.attempt(), 5);
        assert_eq!(
            after_link(None, STABLE_LINK - Duration::from_millis(1), &mut backoff),
            None
        );
        assert_eq!(backoff.attempt(), 5);
        // The twin: a link that was up a while and went away starts over.
        assert_eq!(after_link(None, STABLE_LINK, &mut backoff), None);
        assert_eq!(backoff.attempt(), 0);
    }

    #[test]
    fn plan_table() {
        let a = b("a", "127.0.0.1:1");
        let a2 = b("a", "127.0.0.1:2");
        let bb = b("b", "127.0.0.1:3");
        let c = b("c", "127.0.0.1:4");
        let ids = |v: &[BrokerInfo]| v.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        struct Case<'a> {
            running: Vec<BrokerInfo>,
            wanted: Vec<BrokerInfo>,
            stop: &'a [&'a str],
            start: &'a [&'a str],
        }
        let cases = [
            Case {
                running: vec![],
                wanted: vec![a.clone(), bb.clone()],
                stop: &[],
                start: &["a", "b"],
            },
            Case {
                running: vec![a.clone(), bb.clone()],
                wanted: vec![bb.clone(), a.clone()],
                stop: &[],
                start: &[],
            },
            Case {
                running: vec![a.clone(), bb.clone()],
                wanted: vec![bb.clone(), c.clone()],
                stop: &["a"],
                start: &["c"],
            },
            Case {
                running: vec![a.clone()],
                wanted: vec![a2.clone()],
                stop: &["a"],
                start: &["a"],
            },
            Case {
                running: vec![a.clone(), bb.clone()],
                wanted: vec![],
                stop: &["a", "b"],
                start: &[],
            },
            Case {
                running: vec![],
                wanted: vec![a.clone(), a2.clone()],
                stop: &[],
                start: &["a"],
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let p = plan(&c.running, &c.wanted);
            assert_eq!(p.stop, c.stop, "case {i} stop");
            assert_eq!(ids(&p.start), c.start, "case {i} start");
        }
        // The duplicate keeps the first entry.
        assert_eq!(plan(&[], &[a.clone(), a2]).start, vec![a]);
    }
}
