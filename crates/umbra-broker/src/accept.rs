//! Accept: links in, admitted or refused; streams on agent links dispatched by their first
//! frame. One tracing span per link and per stream.
//!
//! The stage order of one stream, as a newcomer reads it: [`serve_stream`] reads the header
//! frame -> the device's rate of opens ([`rate_limited`] beyond it) ->
//! [`crate::authz::authorize`] -> [`open_to_connector`] (route + dial) -> reply to the agent ->
//! [`crate::relay::run`].
//!
//! Header frames a peer must not send close that peer's whole link, not just the stream: bytes
//! that are not a frame (bad version, unknown kind, a length over the limit, a bad field, a
//! frame cut short) and well-formed frames of the wrong kind mean the peer is broken or
//! hostile. That holds for an agent's request ([`agent_request`]) and for a connector's answer
//! to a `Dial` ([`dial_answer`]); each such frame is logged (`warn`, with the peer and the
//! frame error) and counted in `umbra_broker_bad_frames_total{from}`. An agent's stream that
//! ends, is reset or sends nothing within the open timeout before its request is no bad frame
//! (an agent may give up on a stream at any time): that stream alone ends, and the agent's
//! other streams keep going, as on the connector. A connector whose stream ends,
//! fails or times out before its answer keeps its link; the stream goes to the next connector.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::{Instrument, debug, info, info_span, warn};
use umbra_link::{Link, LinkError, Refusal, Stream};
use umbra_proto::{DialCode, Flow, Frame, OpenCode};

use crate::Shared;
use crate::authn::{LinkPeer, admit};
use crate::authority::Authority;
use crate::authz::{
    CERTIFICATE_EXPIRED, CONNECTOR_CERTIFICATE_EXPIRED, OpenFacts, authorize, certificate_expired,
};
use crate::relay::{End, LiveEntry};
use crate::route::{LoadGuard, PeerLink};

/// Accepts links until the listener closes.
pub(crate) async fn accept_links(shared: Arc<Shared>, listener: Arc<umbra_link::Listener>) {
    while let Some(link) = listener.accept().await {
        let key = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!(
            "link",
            key,
            peer = %link.peer().id,
            transport = link.transport().as_str(),
            remote = %link.remote_addr(),
        );
        let shared = shared.clone();
        tokio::spawn(async move { serve_link(shared, link, key).await }.instrument(span));
    }
}

async fn serve_link(shared: Arc<Shared>, link: Link, key: u64) {
    let authority = shared.authority.load_full();
    let peer = link.peer().clone();
    let max = shared.cfg.max_links_per_peer;
    match admit(&peer, &authority, &shared.org) {
        Err(r) => {
            if !r.is_final() {
                info!(
                    version = authority.snapshot.version,
                    "this broker's snapshot does not know the identity"
                );
            }
            deny_link(&shared, &peer, &link, r.as_str());
            crate::sync::close_unadmitted(&link, r);
        }
        Ok(LinkPeer::Connector { id }) => {
            if shared
                .connectors
                .try_add(&id, link.clone(), key, max)
                .is_none()
            {
                return refuse(&shared, &peer, &link, TOO_MANY_LINKS, Refusal::TooManyLinks);
            }
            info!(kx_group = link.kx_group(), "connector link up");
            let transport = link.transport().as_str();
            metrics::gauge!("umbra_broker_links", "role" => "connector", "transport" => transport)
                .increment(1.0);
            if let Err(why) = still_admitted(&shared, &peer, &authority) {
                // Recorded as every other refusal is.
                deny_link(&shared, &peer, &link, why.as_str());
                crate::sync::close_unadmitted(&link, why);
            }
            tokio::select! {
                () = link.closed() => {}
                () = shared.shutdown.cancelled() => link.close(),
                () = expiry(&peer) => close_expired(&shared, &link, &peer),
            }
            shared.connectors.remove(&id, key);
            metrics::gauge!("umbra_broker_links", "role" => "connector", "transport" => transport)
                .decrement(1.0);
            info!("connector link down");
        }
        Ok(LinkPeer::Agent { device }) => {
            if shared
                .agents
                .try_add(&device, link.clone(), key, max)
                .is_none()
            {
                return refuse(&shared, &peer, &link, TOO_MANY_LINKS, Refusal::TooManyLinks);
            }
            info!(kx_group = link.kx_group(), "agent link up");
            let transport = link.transport().as_str();
            metrics::gauge!("umbra_broker_links", "role" => "agent", "transport" => transport)
                .increment(1.0);
            if let Err(why) = still_admitted(&shared, &peer, &authority) {
                // Recorded as every other refusal is.
                deny_link(&shared, &peer, &link, why.as_str());
                crate::sync::close_unadmitted(&link, why);
            }
            let device: Arc<str> = device.into();
            // One timer for the link, not one per stream accepted.
            let expired = expiry(&peer);
            tokio::pin!(expired);
            loop {
                let stream = tokio::select! {
                    s = link.accept() => s,
                    () = shared.shutdown.cancelled() => { link.close(); None }
                    () = &mut expired => { close_expired(&shared, &link, &peer); None }
                };
                let Some(mut stream) = stream else { break };
                let Some(quota) = shared.device_streams.take(&device) else {
                    // Reset at once: no task, no decision, no connector (its `Open` is not
                    // read, so the record names no service). Audited within the device's
                    // budget of denials, so a device over its bound cannot flood the log.
                    debug!(
                        max = shared.device_streams.max(),
                        "device at max_streams_per_device; stream reset"
                    );
                    metrics::counter!("umbra_broker_streams_refused_total", "reason" => "max_streams_per_device").increment(1);
                    stream.reset();
                    shared.audit.record(
                        &peer.id.to_uri(),
                        "stream.open",
                        &shared.name,
                        "deny",
                        serde_json::json!({
                            "reason": "max_streams_per_device", "device": &*device,
                            "max": shared.device_streams.max(), "transport": transport,
                            "broker": shared.name,
                        }),
                    );
                    continue;
                };
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("stream", id);
                let (shared, link, device) = (shared.clone(), link.clone(), device.clone());
                // The span is entered while the stream is set up, not while it relays: that
                // task is polled for every chunk (see `Established::relay`).
                tokio::spawn(async move {
                    let open = serve_stream(shared, link, device, stream, id)
                        .instrument(span.clone())
                        .await;
                    if let Some(open) = open {
                        open.relay(&span).await;
                    }
                    drop(quota);
                });
            }
            shared.agents.remove(&device, key);
            metrics::gauge!("umbra_broker_links", "role" => "agent", "transport" => transport)
                .decrement(1.0);
            info!("agent link down");
        }
    }
}

/// Writes a reply frame to an agent stream within `open_timeout_ms`; `false` if it failed or
/// did not go out in time. An agent that never opens its stream window would otherwise hold
/// the stream's task, its place in the device's quota and, after a dial, a connector stream
/// with the app's connection behind it, for as long as its link lives.
async fn reply(s: &mut Stream, f: &Frame, shared: &Shared) -> bool {
    match tokio::time::timeout(shared.cfg.open_timeout(), s.write_frame(f)).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            debug!("the agent did not take the reply in time; stream reset");
            metrics::counter!("umbra_broker_streams_refused_total", "reason" => "reply_timeout")
                .increment(1);
            s.reset();
            false
        }
    }
}

/// Why a link is refused when its peer already has `max_links_per_peer` links up.
const TOO_MANY_LINKS: &str = "too_many_links";

/// Refuses a link (the peer learns it was refused, and whether for its identity or for its
/// number of links, not that the broker failed), with an audit record and a count of `reason`.
fn refuse(
    shared: &Shared,
    peer: &umbra_pki::PeerCert,
    link: &Link,
    reason: &'static str,
    why: Refusal,
) {
    deny_link(shared, peer, link, reason);
    link.refuse(why);
}

/// The log line, audit record and count of a link not admitted, for `reason`.
/// Policies named in one decision's record, at most this many: the controller refuses a
/// broker's record with a detail over 4 KiB, and would lose who asked with it.
const POLICIES_LISTED: usize = 16;

/// Puts the policies that decided a stream in its record's detail: `policies`, the first
/// [`POLICIES_LISTED`], and `policies_total` when there were more.
fn listed_policies(detail: &mut serde_json::Value, policies: &[String]) {
    let listed = &policies[..policies.len().min(POLICIES_LISTED)];
    detail["policies"] = serde_json::json!(listed);
    if policies.len() > POLICIES_LISTED {
        detail["policies_total"] = serde_json::json!(policies.len());
    }
}

/// Records each handshake the listener refused for the peer's credential (a certificate of
/// another CA, expired, not a leaf; none at all), as the broker's own denial: the peer proved
/// no identity, so the record names its address. These have a budget of their own, per address
/// and in all, apart from identities' denials: a flood from many addresses can neither fill
/// the trail nor keep a real user's denial out of it.
pub(crate) async fn audit_handshake_refusals(
    shared: Arc<Shared>,
    listener: Arc<umbra_link::Listener>,
    me: String,
) {
    while let Some(r) = listener.refused().await {
        let source = r.remote.ip().to_string();
        shared.audit.record_unauthenticated(
            &source,
            &me,
            "link.handshake",
            &source,
            serde_json::json!({
                "reason": r.reason, "remote": r.remote.to_string(),
                "transport": r.transport.as_str(), "broker": shared.name,
            }),
        );
    }
}

fn deny_link(shared: &Shared, peer: &umbra_pki::PeerCert, link: &Link, reason: &'static str) {
    warn!(reason, "link refused");
    shared.audit.record(
        &peer.id.to_uri(),
        "link.open",
        &shared.name,
        "deny",
        serde_json::json!({ "reason": reason, "transport": link.transport().as_str() }),
    );
    metrics::counter!("umbra_broker_links_refused_total", "reason" => reason).increment(1);
}

/// Resolves when the peer's certificate expires. TLS checks validity only at the handshake;
/// this ends a link whose credential lapsed while it was up, with every stream on it. A
/// holder renews well before (at two thirds of the lifetime) and links again with the new
/// certificate, so its new streams are on the new link by then.
///
/// The sleep runs on tokio's monotonic clock, which stands still while the machine is
/// suspended and does not follow wall-clock steps, so it may fire late: every stream decision
/// also checks the certificate by wall clock ([`crate::authz::CERTIFICATE_EXPIRED`]), and the
/// re-check of live streams closes such links too ([`crate::sync`]).
async fn expiry(peer: &umbra_pki::PeerCert) {
    let left = peer
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left).await;
}

pub(crate) fn close_expired(shared: &Shared, link: &Link, peer: &umbra_pki::PeerCert) {
    info!(
        not_after = %umbra_pki::rfc3339(peer.not_after),
        "peer certificate expired; closing its link"
    );
    metrics::counter!("umbra_broker_links_expired_total").increment(1);
    // The live streams this link carries are ended first, each audited (`stream.revoke`):
    // closed with the link, they would end as link errors with no record. An agent's, for its
    // own certificate; a connector's, naming the connector's.
    for e in shared.streams.entries() {
        if e.serial_hex == peer.serial_hex {
            e.end(CERTIFICATE_EXPIRED);
        } else if e.connector_serial == peer.serial_hex {
            e.end(CONNECTOR_CERTIFICATE_EXPIRED);
        }
    }
    link.close();
}

/// Whether a link admitted under `seen` is still admitted under the snapshot held now (why
/// not, if not). A snapshot installed between the admission and the registration re-checked
/// the links registered then, not this one.
fn still_admitted(
    shared: &Shared,
    peer: &umbra_pki::PeerCert,
    seen: &Authority,
) -> Result<(), crate::authn::Refusal> {
    let held = shared.authority.load_full();
    if held.snapshot.version == seen.snapshot.version {
        return Ok(());
    }
    admit(peer, &held, &shared.org).map(|_| ())
}

/// What an agent's first frame on a stream asks for (see the module docs). Pure.
#[derive(Debug, PartialEq, Eq)]
enum AgentRequest {
    Open {
        flow: Flow,
        service: String,
    },
    ListServices,
    Ping {
        nonce: u64,
    },
    /// Bytes that are not a frame, or a frame an agent does not send: close its link.
    Malformed(String),
    /// The stream ended or failed before a frame: reset that stream alone.
    NoFrame(String),
}

fn agent_request(read: Result<Frame, LinkError>) -> AgentRequest {
    match read {
        Ok(Frame::Open { flow, service, .. }) => AgentRequest::Open { flow, service },
        Ok(Frame::ListServices) => AgentRequest::ListServices,
        Ok(Frame::Ping { nonce }) => AgentRequest::Ping { nonce },
        Ok(other) => AgentRequest::Malformed(format!("unexpected frame {other:?}")),
        Err(e @ LinkError::Frame(_)) => AgentRequest::Malformed(e.to_string()),
        Err(e) => AgentRequest::NoFrame(e.to_string()),
    }
}

/// Serves one agent stream from its header frame on; an allowed `Open` comes back ready to
/// relay.
async fn serve_stream(
    shared: Arc<Shared>,
    link: Link,
    device: Arc<str>,
    mut s: Stream,
    id: u64,
) -> Option<Established> {
    let read = match tokio::time::timeout(shared.cfg.open_timeout(), s.read_frame()).await {
        Err(_) => {
            debug!("no header frame in time");
            s.reset();
            return None;
        }
        Ok(r) => r,
    };
    match agent_request(read) {
        AgentRequest::Open { flow, service } => {
            // Before any decision or dial: the flood this stops is of both.
            let verdict = shared
                .opens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .on_event(Some(device.clone()), std::time::Instant::now());
            if verdict == umbra_link::budget::Verdict::Skip {
                rate_limited(&shared, &link, &device, s, id, &service).await;
                return None;
            }
            return open(shared, &link, &device, s, id, flow, service).await;
        }
        AgentRequest::ListServices => {
            // One Cedar decision per published service: a device asking in a loop would
            // take the broker's cores from everyone's relays.
            let verdict = shared
                .listings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .on_event(Some(device.clone()), std::time::Instant::now());
            if verdict == umbra_link::budget::Verdict::Skip {
                debug!("service list asked for too often; stream reset");
                metrics::counter!("umbra_broker_streams_refused_total", "reason" => "list_rate")
                    .increment(1);
                s.reset();
                return None;
            }
            let a = shared.authority.load_full();
            let owner = a.engine.device_owner(&device).map(str::to_owned);
            let now = SystemTime::now();
            // A stale snapshot authorizes nothing, but an empty list would read as "nothing
            // allowed": the stream is reset, and the agent asks another broker.
            if !a.is_fresh(now, shared.cfg.max_staleness()) {
                debug!("service list asked of a stale snapshot; stream reset");
                metrics::counter!("umbra_broker_streams_refused_total", "reason" => "stale")
                    .increment(1);
                s.reset();
                return None;
            }
            let services = match owner {
                Some(user) if !certificate_expired(link.peer().not_after, now) => {
                    a.engine.services_for(
                        &user,
                        &device,
                        &umbra_policy::RequestContext {
                            now_unix: crate::authority::unix(now) as i64,
                            transport: link.transport().as_str(),
                        },
                    )
                }
                _ => vec![],
            };
            // Several frames for a long list; the stream's end ends it.
            for f in Frame::service_lists(services) {
                if !reply(&mut s, &f, &shared).await {
                    return None;
                }
            }
            let _ = s.finish().await;
        }
        AgentRequest::Ping { nonce } => {
            if reply(&mut s, &Frame::Pong { nonce }, &shared).await {
                let _ = s.finish().await;
            }
        }
        AgentRequest::Malformed(error) => {
            // The link's span names the agent.
            warn!(%error, "malformed frame from agent; closing its link");
            metrics::counter!("umbra_broker_bad_frames_total", "from" => "agent").increment(1);
            link.close();
        }
        AgentRequest::NoFrame(why) => {
            debug!(reason = %why, "agent stream ended before its request");
            s.reset();
        }
    }
    None
}

/// Pings a connector link passed over for silence (see [`crate::route::SILENT_FOR`]) every
/// [`crate::route::PROBE_EVERY`], and takes it back at the first `Pong`; gives up when the
/// pass ends by itself, the link closes, or the broker stops.
async fn probe_silent(c: Arc<PeerLink>, shutdown: tokio_util::sync::CancellationToken) {
    use crate::route::{PROBE_EVERY, now_ms};
    let mut nonce = 0u64;
    while c.silent(now_ms()) && !c.link.is_closed() {
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            () = shutdown.cancelled() => break,
        }
        nonce += 1;
        let ping = async {
            let mut s = c.link.open().await?;
            s.write_frame(&Frame::Ping { nonce }).await?;
            s.read_frame().await
        };
        if let Ok(Ok(Frame::Pong { nonce: n })) = tokio::time::timeout(PROBE_EVERY, ping).await
            && n == nonce
        {
            c.mark_answering();
            info!(connector = %c.peer, "connector answers again; its link takes streams");
            break;
        }
    }
    c.end_probe();
}

/// Answers an `Open` of a device over its rate of stream opens (`stream_opens_per_sec`): no
/// decision, no dial. Recorded within the device's budget of denials, with no log line beyond
/// it (see `AuditQueue::record_flood`), and counted.
async fn rate_limited(
    shared: &Shared,
    link: &Link,
    device: &str,
    mut agent: Stream,
    id: u64,
    service: &str,
) {
    let code = OpenCode::RateLimited;
    metrics::counter!("umbra_broker_decisions_total", "result" => code.as_str()).increment(1);
    metrics::counter!("umbra_broker_streams_refused_total", "reason" => "open_rate").increment(1);
    shared.audit.record_flood(
        &link.peer().id.to_uri(),
        "stream.open",
        service,
        serde_json::json!({
            "stream": id, "device": device, "reason": "open_rate", "code": code.as_str(),
            "per_sec": shared.cfg.stream_opens_per_sec, "burst": shared.cfg.stream_open_burst,
            "transport": link.transport().as_str(), "broker": shared.name,
        }),
    );
    if reply(&mut agent, &Frame::OpenReply { code }, shared).await {
        let _ = agent.finish().await;
    }
}

async fn open(
    shared: Arc<Shared>,
    link: &Link,
    device: &str,
    mut agent: Stream,
    id: u64,
    flow: Flow,
    service: String,
) -> Option<Established> {
    let transport = link.transport().as_str();
    let serial = link.peer().serial_hex.clone();
    let authority = shared.authority.load_full();
    let verdict = authorize(
        &authority,
        &OpenFacts {
            device,
            serial_hex: &serial,
            not_after: link.peer().not_after,
            service: &service,
            flow,
            transport,
        },
        SystemTime::now(),
        shared.cfg.max_staleness(),
    );
    let actor = link.peer().id.to_uri();
    let user = verdict.user.clone().unwrap_or_default();
    metrics::counter!("umbra_broker_decisions_total", "result" => verdict.code.as_str())
        .increment(1);
    if verdict.code != OpenCode::Ok {
        info!(service, code = verdict.code.as_str(), reason = %verdict.reason, "stream denied");
        let mut detail = serde_json::json!({
            "stream": id, "user": user, "device": device, "reason": verdict.reason,
            "code": verdict.code.as_str(), "transport": transport, "broker": shared.name,
        });
        // Which `forbid` denied it, or why no policy could be evaluated: what an operator
        // with many policies needs to find the one at fault.
        if !verdict.policies.is_empty() {
            listed_policies(&mut detail, &verdict.policies);
        }
        if let Some(e) = &verdict.error {
            detail["error"] = serde_json::json!(e);
        }
        shared
            .audit
            .record(&actor, "stream.open", &service, "deny", detail);
        if reply(
            &mut agent,
            &Frame::OpenReply { code: verdict.code },
            &shared,
        )
        .await
        {
            let _ = agent.finish().await;
        }
        if verdict.ends_link() {
            close_expired(&shared, link, link.peer());
        }
        return None;
    }
    let Some(svc) = authority.snapshot.service(&service) else {
        // Unreachable by construction (a permit needs the service); deny to be safe.
        reply(
            &mut agent,
            &Frame::OpenReply {
                code: OpenCode::Denied,
            },
            &shared,
        )
        .await;
        return None;
    };
    let routed =
        open_to_connector(&shared, id, &svc.connectors, &service, &svc.target, &user).await;
    let (connector_stream, via, _load) = match routed {
        Ok(r) => r,
        Err(failed) => {
            // Allowed, then not served: say which (no connector linked, or the ones tried
            // could not dial the target, and the last one's reason), and which policies had
            // allowed it.
            let reason = match &failed {
                // Its links are up but passed over until they answer a ping again.
                None if shared
                    .connectors
                    .any_silent(&svc.connectors, crate::route::now_ms()) =>
                {
                    "connector_silent"
                }
                None => "no_connector",
                Some(_) => "connector_failed",
            };
            info!(
                service,
                reason,
                last_error = failed.as_ref().map(|f| f.1.as_str()),
                "stream allowed but not served"
            );
            let mut detail = serde_json::json!({
                "stream": id, "user": user, "device": device, "reason": reason,
                "code": "unavailable", "transport": transport, "broker": shared.name,
            });
            if let Some((tried, last)) = failed {
                detail["connectors_tried"] = serde_json::json!(tried);
                detail["error"] = serde_json::json!(last);
            }
            if !verdict.policies.is_empty() {
                listed_policies(&mut detail, &verdict.policies);
            }
            shared
                .audit
                .record(&actor, "stream.open", &service, "error", detail);
            if reply(
                &mut agent,
                &Frame::OpenReply {
                    code: OpenCode::Unavailable,
                },
                &shared,
            )
            .await
            {
                let _ = agent.finish().await;
            }
            return None;
        }
    };
    let mut detail = serde_json::json!({
        "stream": id, "user": user, "device": device,
        "connector": via.peer, "transport": transport, "broker": shared.name,
    });
    listed_policies(&mut detail, &verdict.policies);
    shared
        .audit
        .record(&actor, "stream.open", &service, "allow", detail);
    if !reply(
        &mut agent,
        &Frame::OpenReply { code: OpenCode::Ok },
        &shared,
    )
    .await
    {
        // Dropping the connector stream resets it: the connector lets the app go.
        return None;
    }
    // The audit event above already says who, what and why; this is for tracing.
    debug!(service, connector = %via.peer, "stream open");
    let entry = Arc::new(LiveEntry {
        id,
        device: device.to_owned(),
        serial_hex: serial,
        not_after: link.peer().not_after,
        user,
        service,
        target: svc.target.clone(),
        connector: via.peer.clone(),
        connector_serial: via.link.peer().serial_hex.clone(),
        transport,
        started_at: SystemTime::now(),
        counters: Default::default(),
        cancel: Default::default(),
        ended_for: Default::default(),
    });
    shared.streams.insert(entry.clone());
    // A re-check of the live streams that ran while the connector was dialing (a new
    // snapshot, the staleness limit) did not see this one: decide it again if one could
    // have ended it.
    let held = shared.authority.load_full();
    if let Some(why) = crate::authz::recheck_registered(
        &entry,
        &authority,
        &held,
        SystemTime::now(),
        shared.cfg.max_staleness(),
    ) {
        info!(reason = %why, "no longer allowed once set up; closing the stream");
        entry.end(&why);
        if why == CERTIFICATE_EXPIRED {
            close_expired(&shared, link, link.peer());
        }
    }
    metrics::counter!("umbra_broker_streams_total").increment(1);
    Some(Established {
        shared,
        entry,
        agent,
        connector: connector_stream,
        actor,
        _load,
    })
}

/// An allowed stream, answered and registered, ready to relay.
struct Established {
    shared: Arc<Shared>,
    entry: Arc<LiveEntry>,
    agent: Stream,
    connector: Stream,
    actor: String,
    /// Holds the connector link's stream count until the relay ends.
    _load: LoadGuard,
}

impl Established {
    /// Relays until the stream ends, then reports it in `span` (entered only for that).
    async fn relay(self, span: &tracing::Span) {
        let Established {
            shared,
            entry,
            agent,
            connector,
            actor,
            _load,
        } = self;
        let end = crate::relay::run(
            &entry,
            agent,
            connector,
            shared.cfg.idle_timeout(),
            &shared.shutdown,
        )
        .await;
        shared.streams.remove(entry.id);
        let up = entry.counters.up.load(Ordering::Relaxed);
        let down = entry.counters.down.load(Ordering::Relaxed);
        let _entered = span.enter();
        info!(
            end = end.as_str(),
            bytes_up = up,
            bytes_down = down,
            "stream closed"
        );
        if end == End::Revoked {
            shared.audit.record(
                &actor,
                "stream.revoke",
                &entry.service,
                "ok",
                serde_json::json!({
                    "stream": entry.id,
                    "user": entry.user,
                    "device": entry.device,
                    "reason": entry.ended_for.get(),
                }),
            );
        }
    }
}

/// A connector's answer to a `Dial` (see the module docs). Pure.
#[derive(Debug, PartialEq, Eq)]
enum DialAnswer {
    /// Connected: relay.
    Connected,
    /// A refusal code, or the stream ended or failed: this connector cannot serve this
    /// stream; its link stays up.
    CannotServe(String),
    /// Bytes that are not a frame, or a frame that is not a `DialReply`: close its link.
    Malformed(String),
}

fn dial_answer(read: Result<Frame, LinkError>) -> DialAnswer {
    match read {
        Ok(Frame::DialReply { code: DialCode::Ok }) => DialAnswer::Connected,
        Ok(Frame::DialReply { code }) => DialAnswer::CannotServe(code.as_str().to_owned()),
        Ok(other) => DialAnswer::Malformed(format!("unexpected frame {other:?}")),
        Err(e @ LinkError::Frame(_)) => DialAnswer::Malformed(e.to_string()),
        Err(e) => DialAnswer::CannotServe(e.to_string()),
    }
}

/// Opens a stream to the least-loaded live connector for the service and asks it to dial the
/// published target; tries the next connector if one fails. The load guard holds the chosen
/// link's stream count until the relay ends. A connector that answers with a malformed frame
/// has its link closed before the next is tried.
async fn open_to_connector(
    shared: &Shared,
    id: u64,
    connectors: &[String],
    service: &str,
    target: &str,
    user: &str,
) -> Result<(Stream, Arc<PeerLink>, LoadGuard), Option<(usize, String)>> {
    // How many connectors were tried, and the last one's reason; `None`: none to try.
    let mut failed = None;
    for c in shared
        .connectors
        .candidates(connectors, crate::route::now_ms())
    {
        let guard = LoadGuard::new(c.clone());
        let dial = async {
            let mut s = c.link.open().await?;
            s.write_frame(&Frame::Dial {
                flow: Flow::Tcp,
                stream_id: id,
                service: service.to_owned(),
                target: target.to_owned(),
                principal: user.to_owned(),
            })
            .await?;
            let answer = dial_answer(s.read_frame().await);
            Ok::<_, LinkError>((answer, s))
        };
        let reason = match tokio::time::timeout(shared.cfg.dial_timeout(), dial).await {
            Ok(Ok((DialAnswer::Connected, s))) => {
                c.mark_answering();
                return Ok((s, c.clone(), guard));
            }
            Ok(Ok((DialAnswer::Malformed(error), _s))) => {
                warn!(
                    connector = %c.link.peer().id,
                    %error,
                    "malformed answer to Dial from connector; closing its link"
                );
                metrics::counter!("umbra_broker_bad_frames_total", "from" => "connector")
                    .increment(1);
                c.link.close();
                format!("malformed answer: {error}")
            }
            Ok(Ok((DialAnswer::CannotServe(reason), _s))) => {
                c.mark_answering();
                reason
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                // Its next streams would wait as long: pass it over until it answers a ping.
                c.mark_silent(crate::route::now_ms());
                info!(
                    connector = %c.peer,
                    silent_for_secs = crate::route::SILENT_FOR.as_secs(),
                    "connector did not answer in time; passing its link over until it answers a ping"
                );
                if c.start_probe() {
                    tokio::spawn(probe_silent(c.clone(), shared.shutdown.clone()));
                }
                "timeout".to_owned()
            }
        };
        info!(connector = %c.peer, reason, "connector could not serve the stream");
        shared.audit.record(
            &format!("umbra://{}/connector/{}", shared.org, c.peer),
            "stream.dial",
            service,
            "error",
            serde_json::json!({ "stream": id, "reason": reason, "broker": shared.name }),
        );
        let tried = failed.as_ref().map_or(0, |(n, _)| *n) + 1;
        failed = Some((tried, reason));
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use umbra_proto::frame::FrameError;

    use super::*;

    /// A decision by many policies names the first 16 and how many there were, so that its
    /// record stays within what the controller stores; the twin: a few are all named.
    #[test]
    fn a_record_names_a_bounded_number_of_policies() {
        let many: Vec<String> = (0..100)
            .map(|i| format!("{}#{i}", "p".repeat(63)))
            .collect();
        let mut detail = serde_json::json!({ "stream": 1 });
        listed_policies(&mut detail, &many);
        assert_eq!(detail["policies"].as_array().unwrap().len(), 16);
        assert_eq!(detail["policies"][0], many[0].as_str());
        assert_eq!(detail["policies_total"], 100);
        assert!(
            detail.to_string().len() < 2048,
            "{}",
            detail.to_string().len()
        );
        let mut detail = serde_json::json!({});
        listed_policies(&mut detail, &many[..2]);
        assert_eq!(
            detail,
            serde_json::json!({ "policies": [&many[0], &many[1]] })
        );
    }

    fn frame_errors() -> Vec<LinkError> {
        vec![
            LinkError::Frame(FrameError::Version(2)),
            LinkError::Frame(FrameError::UnknownKind(0x7f)),
            LinkError::Frame(FrameError::TooLong(0xffff)),
            LinkError::Frame(FrameError::Truncated),
            LinkError::Frame(FrameError::BadValue("dial code")),
        ]
    }

    #[test]
    fn agent_request_table() {
        assert_eq!(
            agent_request(Ok(Frame::Open {
                flow: Flow::Tcp,
                service: "echo".into(),
                credential: vec![1],
            })),
            AgentRequest::Open {
                flow: Flow::Tcp,
                service: "echo".into()
            }
        );
        assert_eq!(
            agent_request(Ok(Frame::ListServices)),
            AgentRequest::ListServices
        );
        assert_eq!(
            agent_request(Ok(Frame::Ping { nonce: 4 })),
            AgentRequest::Ping { nonce: 4 }
        );
        for e in frame_errors() {
            let want = e.to_string();
            assert_eq!(agent_request(Err(e)), AgentRequest::Malformed(want));
        }
        for f in [
            Frame::DialReply { code: DialCode::Ok },
            Frame::OpenReply { code: OpenCode::Ok },
            Frame::Pong { nonce: 1 },
            Frame::ServiceList { services: vec![] },
        ] {
            assert!(
                matches!(agent_request(Ok(f.clone())), AgentRequest::Malformed(_)),
                "{f:?}"
            );
        }
        for e in [
            LinkError::StreamEnded,
            LinkError::StreamReset(0),
            LinkError::Closed,
        ] {
            assert!(matches!(agent_request(Err(e)), AgentRequest::NoFrame(_)));
        }
    }

    #[test]
    fn dial_answer_table() {
        assert_eq!(
            dial_answer(Ok(Frame::DialReply { code: DialCode::Ok })),
            DialAnswer::Connected
        );
        assert_eq!(
            dial_answer(Ok(Frame::DialReply {
                code: DialCode::NotPublished
            })),
            DialAnswer::CannotServe("not_published".into())
        );
        for e in frame_errors() {
            let want = e.to_string();
            assert_eq!(dial_answer(Err(e)), DialAnswer::Malformed(want));
        }
        for f in [
            Frame::OpenReply { code: OpenCode::Ok },
            Frame::Pong { nonce: 1 },
            Frame::Dial {
                flow: Flow::Tcp,
                stream_id: 1,
                service: "echo".into(),
                target: "127.0.0.1:1".into(),
                principal: "p".into(),
            },
        ] {
            assert!(
                matches!(dial_answer(Ok(f.clone())), DialAnswer::Malformed(_)),
                "{f:?}"
            );
        }
        // A stream that ended or failed is no protocol violation: the link stays up.
        for e in [
            LinkError::StreamEnded,
            LinkError::StreamReset(0),
            LinkError::Closed,
        ] {
            assert!(matches!(dial_answer(Err(e)), DialAnswer::CannotServe(_)));
        }
    }
}
