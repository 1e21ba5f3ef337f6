//! Accept: links in, admitted or refused; streams on agent links dispatched by their first
//! frame. One tracing span per link and per stream.
//!
//! The stage order of one stream, as a newcomer reads it: [`serve_stream`] reads the header
//! frame -> [`crate::authz::authorize`] -> [`open_to_connector`] (route + dial) -> reply to the
//! agent -> [`crate::relay::run`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::{Instrument, debug, info, info_span, warn};
use umbra_link::{Link, Stream};
use umbra_proto::{DialCode, Flow, Frame, OpenCode};

use crate::Shared;
use crate::authn::{LinkPeer, admit};
use crate::authority::Authority;
use crate::authz::{OpenFacts, authorize};
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
    match admit(&peer, &authority, &shared.org) {
        Err(r) => {
            warn!(reason = r.as_str(), "link refused");
            shared.audit.record(
                &peer.id.to_uri(),
                "link.open",
                &shared.name,
                "deny",
                serde_json::json!({ "reason": r.as_str(), "transport": link.transport().as_str() }),
            );
            metrics::counter!("umbra_broker_links_refused_total", "reason" => r.as_str())
                .increment(1);
            link.refuse();
        }
        Ok(LinkPeer::Connector { id }) => {
            info!(kx_group = link.kx_group(), "connector link up");
            let transport = link.transport().as_str();
            metrics::gauge!("umbra_broker_links", "role" => "connector", "transport" => transport)
                .increment(1.0);
            shared.connectors.add(&id, link.clone(), key);
            if !still_admitted(&shared, &peer, &authority) {
                link.refuse();
            }
            tokio::select! {
                () = link.closed() => {}
                () = shared.shutdown.cancelled() => link.close(),
            }
            shared.connectors.remove(&id, key);
            metrics::gauge!("umbra_broker_links", "role" => "connector", "transport" => transport)
                .decrement(1.0);
            info!("connector link down");
        }
        Ok(LinkPeer::Agent { device }) => {
            info!(kx_group = link.kx_group(), "agent link up");
            let transport = link.transport().as_str();
            metrics::gauge!("umbra_broker_links", "role" => "agent", "transport" => transport)
                .increment(1.0);
            shared.agents.add(&device, link.clone(), key);
            if !still_admitted(&shared, &peer, &authority) {
                link.refuse();
            }
            let device: Arc<str> = device.into();
            loop {
                let stream = tokio::select! {
                    s = link.accept() => s,
                    () = shared.shutdown.cancelled() => { link.close(); None }
                };
                let Some(stream) = stream else { break };
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
                });
            }
            shared.agents.remove(&device, key);
            metrics::gauge!("umbra_broker_links", "role" => "agent", "transport" => transport)
                .decrement(1.0);
            info!("agent link down");
        }
    }
}

/// Whether a link admitted under `seen` is still admitted under the snapshot held now. A
/// snapshot installed between the admission and the registration re-checked the links
/// registered then, not this one.
fn still_admitted(shared: &Shared, peer: &umbra_pki::PeerCert, seen: &Authority) -> bool {
    let held = shared.authority.load_full();
    held.snapshot.version == seen.snapshot.version || admit(peer, &held, &shared.org).is_ok()
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
    let frame = match tokio::time::timeout(shared.cfg.open_timeout(), s.read_frame()).await {
        Err(_) => {
            debug!("no header frame in time");
            s.reset();
            return None;
        }
        Ok(Err(e)) => {
            // A peer that sends bytes that are not a frame is broken or hostile: close its
            // link, not just the stream.
            warn!(error = %e, "malformed frame from agent; closing link");
            metrics::counter!("umbra_broker_bad_frames_total").increment(1);
            link.close();
            return None;
        }
        Ok(Ok(f)) => f,
    };
    match frame {
        Frame::Open { flow, service, .. } => {
            return open(shared, &link, &device, s, id, flow, service).await;
        }
        Frame::ListServices => {
            let a = shared.authority.load_full();
            let owner = a.engine.device_owner(&device).map(str::to_owned);
            let services = match owner {
                Some(user) if a.is_fresh(SystemTime::now(), shared.cfg.max_staleness()) => {
                    a.engine.services_for(
                        &user,
                        &device,
                        &umbra_policy::RequestContext {
                            now_unix: crate::authority::unix(SystemTime::now()) as i64,
                            transport: link.transport().as_str(),
                        },
                    )
                }
                _ => vec![],
            };
            if s.write_frame(&Frame::ServiceList { services })
                .await
                .is_ok()
            {
                let _ = s.finish().await;
            }
        }
        Frame::Ping { nonce } => {
            if s.write_frame(&Frame::Pong { nonce }).await.is_ok() {
                let _ = s.finish().await;
            }
        }
        other => {
            warn!(frame = ?other, "unexpected frame from agent; closing link");
            metrics::counter!("umbra_broker_bad_frames_total").increment(1);
            link.close();
        }
    }
    None
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
        shared.audit.record(
            &actor,
            "stream.open",
            &service,
            "deny",
            serde_json::json!({
                "stream": id, "user": user, "device": device, "reason": verdict.reason,
                "code": verdict.code.as_str(), "transport": transport, "broker": shared.name,
            }),
        );
        if agent
            .write_frame(&Frame::OpenReply { code: verdict.code })
            .await
            .is_ok()
        {
            let _ = agent.finish().await;
        }
        return None;
    }
    let Some(svc) = authority.snapshot.service(&service) else {
        // Unreachable by construction (a permit needs the service); deny to be safe.
        let _ = agent
            .write_frame(&Frame::OpenReply {
                code: OpenCode::Denied,
            })
            .await;
        return None;
    };
    let routed =
        open_to_connector(&shared, id, &svc.connectors, &service, &svc.target, &user).await;
    let Some((connector_stream, via, _load)) = routed else {
        info!(service, "no connector reachable");
        shared.audit.record(
            &actor,
            "stream.open",
            &service,
            "error",
            serde_json::json!({
                "stream": id, "user": user, "device": device, "reason": "no_connector",
                "code": "unavailable", "transport": transport, "broker": shared.name,
            }),
        );
        if agent
            .write_frame(&Frame::OpenReply {
                code: OpenCode::Unavailable,
            })
            .await
            .is_ok()
        {
            let _ = agent.finish().await;
        }
        return None;
    };
    shared.audit.record(
        &actor,
        "stream.open",
        &service,
        "allow",
        serde_json::json!({
            "stream": id, "user": user, "device": device, "policies": verdict.policies,
            "connector": via.peer, "transport": transport, "broker": shared.name,
        }),
    );
    if agent
        .write_frame(&Frame::OpenReply { code: OpenCode::Ok })
        .await
        .is_err()
    {
        return None;
    }
    // The audit event above already says who, what and why; this is for tracing.
    debug!(service, connector = %via.peer, "stream open");
    let entry = Arc::new(LiveEntry {
        id,
        device: device.to_owned(),
        serial_hex: serial,
        user,
        service,
        connector: via.peer.clone(),
        transport,
        started_at: SystemTime::now(),
        counters: Default::default(),
        cancel: Default::default(),
    });
    shared.streams.insert(entry.clone());
    // A snapshot installed while the connector was dialing re-decided the streams registered
    // then, not this one: decide it again under the snapshot held now.
    let held = shared.authority.load_full();
    if held.snapshot.version != authority.snapshot.version
        && authorize(
            &held,
            &OpenFacts {
                device,
                serial_hex: &entry.serial_hex,
                service: &entry.service,
                flow,
                transport,
            },
            SystemTime::now(),
            shared.cfg.max_staleness(),
        )
        .code
            != OpenCode::Ok
    {
        info!("policy changed while the stream was being set up; closing it");
        entry.cancel.cancel();
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
                serde_json::json!({ "stream": entry.id, "user": entry.user, "device": entry.device }),
            );
        }
    }
}

/// Opens a stream to the least-loaded live connector for the service and asks it to dial the
/// published target; tries the next connector if one fails. The load guard holds the chosen
/// link's stream count until the relay ends.
async fn open_to_connector(
    shared: &Shared,
    id: u64,
    connectors: &[String],
    service: &str,
    target: &str,
    user: &str,
) -> Option<(Stream, Arc<PeerLink>, LoadGuard)> {
    for c in shared.connectors.candidates(connectors) {
        let guard = LoadGuard::new(c.clone());
        let dial = async {
            let mut s = c.link.open().await.map_err(|e| e.to_string())?;
            s.write_frame(&Frame::Dial {
                flow: Flow::Tcp,
                stream_id: id,
                service: service.to_owned(),
                target: target.to_owned(),
                principal: user.to_owned(),
            })
            .await
            .map_err(|e| e.to_string())?;
            match s.read_frame().await.map_err(|e| e.to_string())? {
                Frame::DialReply { code: DialCode::Ok } => Ok(s),
                Frame::DialReply { code } => Err(code.as_str().to_owned()),
                other => Err(format!("unexpected frame {other:?}")),
            }
        };
        match tokio::time::timeout(shared.cfg.dial_timeout(), dial).await {
            Ok(Ok(s)) => return Some((s, c.clone(), guard)),
            Ok(Err(reason)) => {
                info!(connector = %c.peer, reason, "connector could not serve the stream");
                shared.audit.record(
                    &format!("umbra://{}/connector/{}", shared.org, c.peer),
                    "stream.dial",
                    service,
                    "error",
                    serde_json::json!({ "stream": id, "reason": reason, "broker": shared.name }),
                );
            }
            Err(_) => info!(connector = %c.peer, "connector did not answer in time"),
        }
    }
    None
}
