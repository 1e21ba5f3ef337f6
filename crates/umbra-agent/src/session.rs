//! A held link to the current broker, and failover when it stops answering.
//!
//! [`Session::open`] asks the current broker for a stream to a service. If the link is dead, or
//! the broker does not answer within `open_timeout` nor a ping sent then within half of it,
//! that broker is marked down for a while (its link takes no new streams, but is not closed
//! under the live connections it carries: a blip that cost one request must not cut them),
//! the next one in [`failover_order`] is dialed
//! (bounded by `connect_timeout`) and the request is retried there, so a killed broker costs a
//! new connection at most one and a half open timeouts plus one connect. A broker that answers
//! the ping is busy, not dead (trying connectors, or a connector waiting for a slow target): its
//! answer is awaited up to [`ANSWER_WAIT`]. A `Denied` answer is the policy's decision and is final
//! (every broker holds the same policy); so is a `RateLimited` one (this device opens streams
//! faster than the broker allows: going to another broker would get around the bound). A `Stale` answer (the broker's policy is too old to
//! authorize anything) fails over: another broker may hold a fresh one. An `Unavailable` answer
//! (allowed, but this broker has no live link to a connector of the service, e.g. just after it
//! restarted) tries the other brokers once each without marking this one down, over side links kept
//! for such services: the nearest broker stays the one every new stream asks first.
//!
//! An answer to `Open` that is not a frame (bad version, unknown kind, a length over the
//! limit, a bad field, a frame cut short) or not an `OpenReply` means the broker is broken or
//! hostile: its link is closed at once (not just the stream), a warning names the broker and
//! the frame error, and the request fails over like for any failed broker. A broker that is
//! silent, or whose link fails, fails over too, after the link is checked for a refusal. A
//! stream reset or ended while its link stays up (a broker resets the streams of a device
//! over its `max_streams_per_device`) fails that request only: it tries the other brokers
//! once each, and the link, with the live connections it carries, is kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Mutex, watch};
use umbra_link::{Link, LinkError, LinkHold, Stream};
use umbra_pki::TlsIdentity;
use umbra_proto::api::BrokerInfo;
use umbra_proto::{Flow, Frame, OpenCode};

use crate::brokers::{self, DOWN_FOR, DownMarks, Probe, failover_order};
use crate::config::AgentConfig;

/// Why a stream to a service was not opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The broker refused: not allowed, or no such service.
    #[error("access to {0} denied")]
    Denied(String),
    /// Allowed, but no connector could reach the service.
    #[error("{0} is unavailable (no connector could reach it)")]
    Unavailable(String),
    /// The broker refused to decide: this device opened streams faster than it allows. Final
    /// for this connection (another broker would be a way around the bound, not a cure); the
    /// next one, a moment later, is decided again.
    #[error(
        "broker {0} is rate limiting this device: it opened new connections faster than the \
         broker allows (its stream_opens_per_sec); try again in a moment"
    )]
    RateLimited(String),
    /// The broker does not serve this kind of flow.
    #[error("the broker does not serve this flow kind")]
    UnsupportedFlow,
    /// Every broker failed; the last failure.
    #[error("no broker reachable: {0}")]
    NoBroker(String),
    /// The broker refused this device's identity (revoked, or of another organisation).
    /// Final: every broker would say the same (a broker that merely does not know the
    /// device yet closes the link without refusing it).
    #[error("{}", LinkError::Refused)]
    Refused,
    /// This device's certificate expired (at the time given) and was not renewed. Final: it
    /// authorizes nothing, not even on a link dialed while it was valid.
    #[error(
        "this device's certificate expired at {0} and was not renewed in time (the renewal \
         goes on while the controller allows; see the log). If the controller refuses it (the \
         device revoked, its user disabled, expired too long ago), enroll this device again \
         with a new token from your administrator"
    )]
    Expired(String),
}

/// Why one `Open` attempt on a link failed.
enum Failure {
    /// The broker refused the link itself.
    Refused,
    /// The broker failed: the link failed, or it was silent.
    Broker(String),
    /// The broker reset this one stream and kept the link (it does so to a device over its
    /// `max_streams_per_device`): the link, and the streams it carries, are fine.
    Stream(String),
    /// The broker answered with a malformed frame, or not with an `OpenReply`.
    Malformed(String),
}

/// What was read in answer to an `Open` (see the module docs). Pure.
enum Reply {
    Code(OpenCode),
    /// Bytes that are not a frame, or a frame that is not an `OpenReply`.
    Malformed(String),
    /// No frame: the stream or the link failed.
    Failed(LinkError),
}

fn reply(read: Result<Frame, LinkError>) -> Reply {
    match read {
        Ok(Frame::OpenReply { code }) => Reply::Code(code),
        Ok(other) => Reply::Malformed(format!("unexpected frame {other:?}")),
        Err(e @ LinkError::Frame(_)) => Reply::Malformed(e.to_string()),
        Err(e) => Reply::Failed(e),
    }
}

/// How long a broker that answers pings may take to answer an `Open`: it may try several
/// connectors, each for up to its dial timeout (7 s by default), and a connector may be
/// connecting to a slow target.
const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// How long a new connection waits for the renewal of an expired certificate (after a
/// resume, the renewal wakes within `RENEW_WAKE_INTERVAL` of `umbra_link::enroll`).
const EXPIRED_OPEN_WAIT: Duration = Duration::from_secs(20);

/// Whether a broker measured at `rtt` is clearly nearer than the current one at `current`:
/// by at least a third and 5 ms, so that measurement noise between brokers about as near as
/// each other never moves the agent.
fn clearly_nearer(rtt: Duration, current: Duration) -> bool {
    rtt + Duration::from_millis(5) < current && rtt * 3 < current * 2
}

/// Closes the links in `links` that carry nothing any more (no [`umbra_link::LinkHold`]
/// taken on them), and forgets the closed ones.
fn close_idle(links: &mut Vec<Link>) {
    links.retain(|l| {
        if l.held() == 0 {
            l.close();
        }
        !l.is_closed()
    });
}

/// The agent's connection to the broker fabric.
pub(crate) struct Session {
    cfg: AgentConfig,
    identity: watch::Receiver<Arc<TlsIdentity>>,
    state: Mutex<State>,
}

struct State {
    /// Brokers by id, nearest first.
    brokers: Vec<BrokerInfo>,
    ranked: Vec<String>,
    current: Option<(String, Link)>,
    /// Expiry of the certificate `current` was dialed with: a renewed one links again.
    dialed_with: SystemTime,
    /// Links dialed with an older certificate, kept for the streams they still carry. Each
    /// ends when its broker closes it at that certificate's expiry, or with the session.
    retiring: Vec<Link>,
    /// Links to other brokers, for services the current one has no connector for
    /// (`Unavailable`): the current broker stays the one new streams try first.
    side: Vec<(String, Link)>,
    down: DownMarks,
    /// When the last dial to a broker failed, and why (cleared when one succeeds): requests
    /// that began before do not dial it again (see [`Session::link`]).
    dial_failed: HashMap<String, (Instant, String)>,
    /// Some broker did not answer the last measurement: it may be nearer once it is back.
    some_unmeasured: bool,
    /// Brokers that failed a request lately (a stale policy, a refused stream): answering
    /// pings does not make one the current broker again before its mark ends.
    failed_requests: DownMarks,
}

/// Failed attempts of one request, and why each broker failed it.
struct Attempts {
    tried: Vec<String>,
    /// Broker id and why, in the order tried; one entry per broker (its latest reason).
    failures: Vec<(String, String)>,
    /// When the request began: a broker marked down since then (by a request served
    /// before it) is not dialed again for it.
    started: Instant,
}

impl Attempts {
    fn new() -> Attempts {
        Attempts {
            tried: Vec::new(),
            failures: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Broker `id` failed this request for `why`.
    fn failed(&mut self, id: &str, why: String) {
        match self.failures.iter_mut().find(|(b, _)| b == id) {
            Some(f) => f.1 = why,
            None => self.failures.push((id.to_owned(), why)),
        }
    }

    /// Every broker's failure, named (`name` gives a broker's name from its id): the one
    /// that matters may not be the last tried (a broker that refused the stream for a stale
    /// policy, then one that could not be reached). Pure.
    fn summary(&self, name: impl Fn(&str) -> Option<String>) -> String {
        if self.failures.is_empty() {
            return "no brokers known".into();
        }
        self.failures
            .iter()
            .map(|(id, why)| format!("{}: {why}", name(id).unwrap_or_else(|| id.clone())))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Why broker `id` failed this request, if it did.
    fn reason(&self, id: &str) -> Option<&str> {
        self.failures
            .iter()
            .find(|(b, _)| b == id)
            .map(|(_, why)| why.as_str())
    }
}

impl Session {
    /// Measures the brokers, keeps a link to the nearest that answered, closes the others.
    pub(crate) async fn connect(
        cfg: AgentConfig,
        identity: watch::Receiver<Arc<TlsIdentity>>,
        brokers: Vec<BrokerInfo>,
    ) -> Session {
        let id = identity.borrow().clone();
        let probes = brokers::probe_all(&cfg, &id, &brokers).await;
        let mut current = None;
        let mut ranked_brokers = Vec::with_capacity(probes.len());
        let mut down = DownMarks::default();
        let mut some_unmeasured = false;
        let now = Instant::now();
        for Probe { broker, result, .. } in probes {
            match result {
                Ok((rtt, link)) => {
                    tracing::debug!(broker = %broker.name, rtt_ms = rtt.as_secs_f64() * 1e3, transport = link.transport().as_str(), "broker measured");
                    if current.is_none() {
                        tracing::info!(broker = %broker.name, rtt_ms = rtt.as_secs_f64() * 1e3, transport = link.transport().as_str(), kx = link.kx_group(), "using nearest broker");
                        current = Some((broker.id.clone(), link));
                    } else {
                        link.close();
                    }
                }
                Err(e) => {
                    tracing::info!(broker = %broker.name, error = %e, "broker not reachable");
                    down.mark(&broker.id, now, DOWN_FOR);
                    some_unmeasured = true;
                }
            }
            ranked_brokers.push(broker);
        }
        Session {
            cfg,
            identity,
            state: Mutex::new(State {
                ranked: ranked_brokers.iter().map(|b| b.id.clone()).collect(),
                brokers: ranked_brokers,
                current,
                dialed_with: id.peer.not_after,
                retiring: Vec::new(),
                side: Vec::new(),
                some_unmeasured,
                failed_requests: DownMarks::default(),
                down,
                dial_failed: HashMap::new(),
            }),
        }
    }

    /// Measures every broker again and ranks them nearest first. New streams move to the
    /// nearest that answers (and has not just failed a request) only when the current broker
    /// is gone, or the other is clearly nearer ([`clearly_nearer`]): round trips that differ
    /// by noise must not make the agent hop between brokers. The old link stays for the
    /// streams it carries and is closed once it carries none.
    pub(crate) async fn reprobe(&self) {
        let brokers = self.state.lock().await.brokers.clone();
        if brokers.is_empty() {
            return;
        }
        let identity = self.identity.borrow().clone();
        let probes = brokers::probe_all(&self.cfg, &identity, &brokers).await;
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let mut ranked = Vec::with_capacity(probes.len());
        let mut nearest: Option<(BrokerInfo, Duration, Link)> = None;
        let mut current_rtt = None;
        st.some_unmeasured = false;
        let current_id = st.current.as_ref().map(|(id, _)| id.clone());
        for Probe { broker, result, .. } in probes {
            // The list may have changed during the probes: only listed brokers count.
            if !st.brokers.iter().any(|b| b.id == broker.id) {
                if let Ok((_, link)) = result {
                    link.close();
                }
                continue;
            }
            match result {
                Ok((rtt, link)) => {
                    if current_id.as_deref() == Some(broker.id.as_str()) {
                        current_rtt = Some(rtt);
                    }
                    // It answers: no longer down for being unreachable. But one that failed a
                    // request lately (stale, refused a stream) is not chosen again before its
                    // mark ends, whatever its pings say.
                    let failed = st.failed_requests.is_down(&broker.id, now);
                    if !failed {
                        st.down.clear(&broker.id);
                    }
                    if nearest.is_none() && !failed {
                        nearest = Some((broker.clone(), rtt, link));
                    } else {
                        link.close();
                    }
                }
                Err(_) => {
                    st.down.mark(&broker.id, now, DOWN_FOR);
                    st.some_unmeasured = true;
                }
            }
            ranked.push(broker.id);
        }
        for id in st.ranked.clone() {
            if !ranked.contains(&id) {
                ranked.push(id);
            }
        }
        st.ranked = ranked;
        close_idle(&mut st.retiring);
        let Some((broker, rtt, link)) = nearest else {
            return;
        };
        let current_up = st.current.as_ref().is_some_and(|(_, l)| !l.is_closed());
        let is_current = current_id.as_deref() == Some(broker.id.as_str());
        let better = !current_up || current_rtt.is_none_or(|c| clearly_nearer(rtt, c));
        // A renewal during the probes: the next request links again with the new
        // certificate; this link was made with the old one.
        if (current_up && is_current) || !better || identity.peer.not_after != st.dialed_with {
            link.close();
            // Kept: it ranks first, so that failover order and `off_nearest` agree with the
            // choice (else the agent would measure every tick, the nearest by noise).
            if current_up && let Some(id) = &current_id {
                st.ranked.retain(|r| r != id);
                st.ranked.insert(0, id.clone());
            }
            return;
        }
        tracing::info!(broker = %broker.name, rtt_ms = rtt.as_secs_f64() * 1e3, transport = link.transport().as_str(), "a nearer broker answers; new connections go there");
        if let Some((_, old)) = st.current.take() {
            st.retiring.push(old);
            close_idle(&mut st.retiring);
        }
        st.current = Some((broker.id, link));
    }

    /// Whether new streams may not be going to the nearest broker: none is current, its link
    /// is down, the agent failed over to another one, or some broker could not be measured
    /// (it may be nearer once it is back).
    pub(crate) async fn off_nearest(&self) -> bool {
        let st = self.state.lock().await;
        if st.some_unmeasured {
            return true;
        }
        match (&st.current, st.ranked.first()) {
            (Some((id, link)), Some(first)) => id != first || link.is_closed(),
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }

    /// Replaces the broker list (a refresh from the controller): known brokers keep their
    /// rank, new ones go to the back.
    pub(crate) async fn update_brokers(&self, list: Vec<BrokerInfo>) {
        let mut st = self.state.lock().await;
        let mut ranked: Vec<String> = st
            .ranked
            .iter()
            .filter(|id| list.iter().any(|b| &b.id == *id))
            .cloned()
            .collect();
        for b in &list {
            if !ranked.contains(&b.id) {
                ranked.push(b.id.clone());
            }
        }
        // A broker no longer listed (revoked or retired) carries nothing more: every link to
        // it is closed, the streams on them with it.
        if let Some((id, link)) = &st.current
            && !ranked.contains(id)
        {
            link.close();
            st.current = None;
        }
        st.side.retain(|(id, link)| {
            let listed = ranked.contains(id);
            if !listed {
                link.close();
            }
            listed
        });
        st.retiring.retain(|link| {
            let listed = ranked.contains(&link.peer().id.id);
            if !listed {
                link.close();
            }
            listed
        });
        st.ranked = ranked;
        st.brokers = list;
    }

    /// Waits up to `wait` for the renewal to publish a certificate valid now (after a resume
    /// the renewal may not have run yet: the controller renews an expired certificate for a
    /// while); whether one came.
    async fn renewed_within(&self, wait: Duration) -> bool {
        let mut identity = self.identity.clone();
        let valid = |id: &umbra_pki::TlsIdentity| id.peer.not_after > SystemTime::now();
        tokio::time::timeout(wait, async {
            loop {
                if valid(&identity.borrow_and_update()) {
                    return true;
                }
                if identity.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Opens a stream to `service` through the current broker, failing over as described in
    /// the module documentation. On success the stream's reply has been read and application
    /// bytes may flow.
    pub(crate) async fn open(&self, service: &str) -> Result<(Stream, LinkHold), OpenError> {
        // Brokers check the certificate's validity at the handshake only: a link dialed while
        // it was valid would go on carrying new streams. Renewal replaces it well before it
        // expires; when that failed, stop here, and drop the link.
        let not_after = self.identity.borrow().peer.not_after;
        if not_after <= SystemTime::now() && !self.renewed_within(EXPIRED_OPEN_WAIT).await {
            self.close().await;
            return Err(OpenError::Expired(umbra_pki::rfc3339(not_after)));
        }
        let mut attempts = Attempts::new();
        // Some broker allowed the stream but had no connector for it.
        let mut unavailable = false;
        // Further attempts go over side links: the current link is fine and stays current.
        let mut aside = false;
        loop {
            let (broker_id, link, hold) = match self.link(&mut attempts, aside).await {
                Ok(l) => l,
                // Some broker allowed the stream but none could reach a connector.
                Err(_) if unavailable => return Err(OpenError::Unavailable(service.to_owned())),
                Err(e) => return Err(e),
            };
            match self.try_open(&link, service).await {
                Ok((OpenCode::Ok, stream)) => return Ok((stream, hold)),
                Ok((OpenCode::Denied, _)) => return Err(OpenError::Denied(service.to_owned())),
                Ok((OpenCode::Unavailable, _)) => {
                    // This broker has no live link to a connector of the service (it may
                    // have just restarted); another broker may have one. The broker itself
                    // is fine, so it is not marked down.
                    tracing::info!(broker = %broker_id, service, "broker has no connector for the service; trying the next");
                    unavailable = true;
                    aside = true;
                    attempts.tried.push(broker_id);
                    continue;
                }
                Ok((OpenCode::UnsupportedFlow, _)) => return Err(OpenError::UnsupportedFlow),
                Ok((OpenCode::RateLimited, _)) => {
                    return Err(OpenError::RateLimited(broker_id.to_string()));
                }
                Ok((OpenCode::Stale, _)) => {
                    attempts.failed(&broker_id, "broker policy is stale".into());
                }
                Err(Failure::Refused) => {
                    self.mark_failed(&broker_id).await;
                    return Err(OpenError::Refused);
                }
                Err(Failure::Broker(e)) => attempts.failed(&broker_id, e),
                Err(Failure::Stream(e)) => {
                    // The link is fine: closing it, or replacing it as the current one, would
                    // end every live connection it carries. The other brokers are tried over
                    // side links.
                    tracing::info!(broker = %broker_id, service, error = %e, "broker reset the stream; trying the next");
                    attempts.failed(&broker_id, e);
                    aside = true;
                    attempts.tried.push(broker_id);
                    continue;
                }
                Err(Failure::Malformed(error)) => {
                    tracing::warn!(broker = %broker_id, peer = %link.peer().id, %error, "malformed answer to Open from broker; closing its link");
                    link.close();
                    attempts.failed(
                        &broker_id,
                        format!("malformed answer from the broker: {error}"),
                    );
                }
            }
            tracing::warn!(broker = %broker_id, reason = attempts.reason(&broker_id).unwrap_or("-"), "broker failed; failing over");
            self.mark_failed(&broker_id).await;
            attempts.tried.push(broker_id);
        }
    }

    /// The link to use: the current one if it is alive and not tried yet for this request,
    /// else one to the next broker in failover order. With `aside` (the current broker has
    /// no connector for the service, or reset the stream while its link stays up) that one
    /// is a side link: kept for such services, while the current broker stays current.
    ///
    /// The link comes with a hold taken under the session's lock, so that a re-measurement
    /// retiring it meanwhile does not close it as idle under the request.
    ///
    /// A side link is dialed without holding the session's lock: the current link is fine,
    /// and the streams other requests open on it must not wait for a dial to a broker that
    /// may be far or unreachable. A new current link is dialed under the lock: the current
    /// one failed, every request needs the new one, and one dial serves them all.
    async fn link(
        &self,
        attempts: &mut Attempts,
        aside: bool,
    ) -> Result<(String, Link, LinkHold), OpenError> {
        loop {
            let mut st = self.state.lock().await;
            close_idle(&mut st.retiring);
            st.side.retain(|(_, l)| !l.is_closed());
            let cert = self.identity.borrow().peer.not_after;
            if cert != st.dialed_with {
                // Renewed: new streams go over links made with the new certificate (to the
                // same broker, first in the failover order); the old ones keep what they carry.
                if let Some((id, old)) = st.current.take() {
                    tracing::info!(broker = %id, "certificate renewed; linking again with it");
                    st.retiring.push(old);
                }
                let side: Vec<Link> = st.side.drain(..).map(|(_, l)| l).collect();
                st.retiring.extend(side);
                st.dialed_with = cert;
            }
            let current = st.current.as_ref().map(|(id, _)| id.clone());
            if !aside && let Some((id, link)) = &st.current {
                if !link.is_closed() && !attempts.tried.contains(id) {
                    return Ok((id.clone(), link.clone(), link.hold()));
                }
                if link.is_closed() {
                    let id = id.clone();
                    st.down.mark(&id, Instant::now(), DOWN_FOR);
                    st.current = None;
                }
            }
            let now = Instant::now();
            // A side link goes to a broker other than the current one.
            let next = failover_order(&st.ranked, &st.down, &attempts.tried, now)
                .into_iter()
                .find(|id| !aside || current.as_deref() != Some(*id))
                .map(str::to_owned);
            let Some(id) = next else {
                let name = |id: &str| {
                    st.brokers
                        .iter()
                        .find(|b| b.id == id)
                        .map(|b| b.name.clone())
                };
                return Err(OpenError::NoBroker(attempts.summary(name)));
            };
            if aside && let Some((_, link)) = st.side.iter().find(|(b, _)| *b == id) {
                return Ok((id, link.clone(), link.hold()));
            }
            let Some(info) = st.brokers.iter().find(|b| b.id == id).cloned() else {
                attempts.tried.push(id);
                continue;
            };
            // Requests waiting their turn while brokers cannot be reached would each dial
            // every broker again, one after the other (seconds each): one that failed while
            // this request waited is not tried again for it.
            if let Some((at, why)) = st.dial_failed.get(&id)
                && *at > attempts.started
            {
                attempts.failed(&id, why.clone());
                attempts.tried.push(id);
                continue;
            }
            let identity = self.identity.borrow().clone();
            let dialed = if aside {
                drop(st);
                let r = brokers::dial(&self.cfg, &identity, &info).await;
                st = self.state.lock().await;
                r
            } else {
                brokers::dial(&self.cfg, &identity, &info).await
            };
            match dialed {
                Ok(link) => {
                    st.down.clear(&id);
                    st.dial_failed.remove(&id);
                    if aside {
                        // The broker list may have dropped it during the dial (revoked or
                        // retired): a broker no longer listed carries nothing.
                        if !st.ranked.contains(&id) {
                            link.close();
                            attempts.tried.push(id);
                            continue;
                        }
                        // Another request may have linked to the same broker meanwhile, or the
                        // certificate was renewed during the dial: keep one link, made with
                        // the certificate held now.
                        if let Some((_, held)) =
                            st.side.iter().find(|(b, l)| *b == id && !l.is_closed())
                        {
                            let held = held.clone();
                            link.close();
                            let hold = held.hold();
                            return Ok((id, held, hold));
                        }
                        if identity.peer.not_after != st.dialed_with {
                            link.close();
                            continue;
                        }
                        tracing::info!(broker = %info.name, transport = link.transport().as_str(), "linked to another broker for a service the current one cannot serve");
                        st.side.push((id.clone(), link.clone()));
                    } else {
                        tracing::info!(broker = %info.name, transport = link.transport().as_str(), kx = link.kx_group(), "switched broker");
                        if let Some((_, old)) = st.current.take() {
                            old.close();
                        }
                        st.dialed_with = identity.peer.not_after;
                        st.current = Some((id.clone(), link.clone()));
                    }
                    let hold = link.hold();
                    return Ok((id, link, hold));
                }
                Err(e) => {
                    tracing::warn!(broker = %info.name, error = %e, "cannot reach broker");
                    let why = e.to_string();
                    st.down.mark(&id, now, DOWN_FOR);
                    st.dial_failed
                        .insert(id.clone(), (Instant::now(), why.clone()));
                    attempts.failed(&id, why);
                    attempts.tried.push(id);
                }
            }
        }
    }

    async fn mark_failed(&self, broker_id: &str) {
        let mut st = self.state.lock().await;
        // Its links take no new streams but are retired, not closed: one request that went
        // unanswered for a second may be a blip of the network that the link outlives, and
        // the live connections riding it (an ssh session, a transfer) must not be cut for
        // it. A retired link is closed once nothing rides it; if the broker is really gone,
        // its keepalive ends it (and what rode it) within the link's idle timeout.
        let failed = std::mem::take(&mut st.side);
        for (id, link) in failed {
            if id == broker_id {
                st.retiring.push(link);
            } else {
                st.side.push((id, link));
            }
        }
        st.down.mark(broker_id, Instant::now(), DOWN_FOR);
        st.failed_requests.mark(broker_id, Instant::now(), DOWN_FOR);
        if st.current.as_ref().is_some_and(|(id, _)| id == broker_id)
            && let Some((_, link)) = st.current.take()
        {
            st.retiring.push(link);
        }
        close_idle(&mut st.retiring);
    }

    /// One `Open` on `link`, bounded by the open timeout. `Err` means the broker failed or
    /// refused the link, not that it denied the service (that is an answer).
    async fn try_open(&self, link: &Link, service: &str) -> Result<(OpenCode, Stream), Failure> {
        // Opening the stream or sending the request failed: the link did. Otherwise the
        // stream comes back with what was read.
        let exchange = async {
            let mut s = link.open().await?;
            s.write_frame(&Frame::Open {
                flow: Flow::Tcp,
                service: service.to_owned(),
                credential: Vec::new(),
            })
            .await?;
            let read = s.read_frame().await;
            Ok::<_, LinkError>((reply(read), s))
        };
        tokio::pin!(exchange);
        let open_timeout = self.cfg.open_timeout();
        let answered = match tokio::time::timeout(open_timeout, &mut exchange).await {
            Ok(r) => r,
            Err(_) => {
                // No answer yet: a dead broker, or a live one still trying connectors (each
                // may take its dial timeout) or waiting for a slow target. A ping on another
                // stream tells which; only a broker that does not answer it is failed over.
                let pinged = tokio::select! {
                    r = &mut exchange => Some(r),
                    p = brokers::ping(link, open_timeout / 2) => {
                        if p.is_err() {
                            return Err(Failure::Broker(format!(
                                "no answer within {} ms, nor to a ping",
                                open_timeout.as_millis()
                            )));
                        }
                        None
                    }
                };
                match pinged {
                    Some(r) => r,
                    None => match tokio::time::timeout(ANSWER_WAIT, &mut exchange).await {
                        Ok(r) => r,
                        // The broker is up (it answered the ping): this request failed, not
                        // the link, which the other live connections ride on. The stream is
                        // reset as the exchange is dropped; other brokers are tried aside.
                        Err(_) => {
                            return Err(Failure::Stream(format!(
                                "the broker answers pings but not the Open within {} s",
                                ANSWER_WAIT.as_secs()
                            )));
                        }
                    },
                }
            }
        };
        let failed = match answered {
            Ok((Reply::Code(code), s)) => return Ok((code, s)),
            Ok((Reply::Malformed(why), _s)) => return Err(Failure::Malformed(why)),
            Ok((Reply::Failed(e), _)) | Err(e) => e,
        };
        // A link error: was it the broker refusing this identity? Or only this stream?
        match link.explain(failed).await {
            LinkError::Refused => Err(Failure::Refused),
            e @ (LinkError::StreamReset(_) | LinkError::StreamEnded) if !link.is_closed() => {
                Err(Failure::Stream(e.to_string()))
            }
            e => Err(Failure::Broker(e.to_string())),
        }
    }

    /// Closes the held link.
    pub(crate) async fn close(&self) {
        let mut st = self.state.lock().await;
        if let Some((_, link)) = st.current.take() {
            link.close();
        }
        for link in st.retiring.drain(..) {
            link.close();
        }
        for (_, link) in st.side.drain(..) {
            link.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use umbra_proto::DialCode;
    use umbra_proto::frame::FrameError;

    use super::*;

    /// Only a clearly nearer broker takes new streams: noise between brokers about as near
    /// as each other does not move the agent.
    #[test]
    fn only_a_clearly_nearer_broker_takes_over() {
        let ms = Duration::from_millis;
        assert!(clearly_nearer(ms(10), ms(60)));
        assert!(clearly_nearer(Duration::from_micros(500), ms(6)));
        assert!(!clearly_nearer(ms(9), ms(10)), "10% nearer");
        assert!(!clearly_nearer(ms(1), ms(5)), "within 5 ms");
        assert!(!clearly_nearer(ms(40), ms(50)), "a fifth nearer");
        assert!(!clearly_nearer(ms(60), ms(10)));
    }

    /// A broker at the transport level that hands every stream of every link to `serve`.
    /// Returns its info and its links.
    async fn stand_in<F, Fut>(
        ca: &umbra_pki::Ca,
        id: &str,
        serve: F,
    ) -> (BrokerInfo, Arc<tokio::sync::Mutex<Vec<Link>>>)
    where
        F: Fn(Stream) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let tls = umbra_pki::test_util::identity(ca, umbra_proto::Role::Broker, id).unwrap();
        let server = umbra_pki::server_config(
            &tls,
            umbra_pki::ClientAuth::Required,
            &[umbra_link::ALPN],
            false,
        )
        .unwrap();
        let listener = umbra_link::Listener::bind(
            None,
            Some("127.0.0.1:0".parse().unwrap()),
            Arc::new(server),
            umbra_link::LinkConfig::default(),
        )
        .await
        .unwrap();
        let info = BrokerInfo {
            id: id.into(),
            name: id.into(),
            quic_addr: None,
            tcp_addr: listener.tcp_addr().map(|a| a.to_string()),
            server_name: umbra_pki::broker_server_name(id),
        };
        let links = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let held = links.clone();
        tokio::spawn(async move {
            while let Some(link) = listener.accept().await {
                held.lock().await.push(link.clone());
                let serve = serve.clone();
                tokio::spawn(async move {
                    while let Some(s) = link.accept().await {
                        tokio::spawn(serve(s));
                    }
                });
            }
        });
        (info, links)
    }

    /// A broker at the transport level: answers pings, and every `Open` with `code` (with
    /// `Unavailable`, the broker itself is fine; it has no connector). Returns its info and
    /// its links.
    async fn answering_broker(
        ca: &umbra_pki::Ca,
        id: &str,
        code: OpenCode,
    ) -> (BrokerInfo, Arc<tokio::sync::Mutex<Vec<Link>>>) {
        stand_in(ca, id, move |mut s: Stream| async move {
            let answer = match s.read_frame().await {
                Ok(Frame::Ping { nonce }) => Frame::Pong { nonce },
                Ok(Frame::Open { .. }) => Frame::OpenReply { code },
                _ => return,
            };
            let _ = s.write_frame(&answer).await;
            let _ = s.finish().await;
        })
        .await
    }

    /// A broker address that takes TCP connections and never answers (a black hole past
    /// the handshake timeout); counts the connections.
    async fn black_hole(id: &str) -> (BrokerInfo, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let info = BrokerInfo {
            id: id.into(),
            name: id.into(),
            quic_addr: None,
            tcp_addr: Some(l.local_addr().unwrap().to_string()),
            server_name: umbra_pki::broker_server_name(id),
        };
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(c);
            }
        });
        (info, n)
    }

    /// While no broker can be reached, requests that queued behind one that tried them all
    /// fail at once instead of each dialing every broker again in turn (seconds per broker,
    /// for every local connection a browser opens). The twin: a request made after that
    /// round dials again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_do_not_redial_brokers_that_just_failed() {
        umbra_pki::install_crypto_provider();
        let ca = umbra_pki::Ca::generate("default", SystemTime::now()).unwrap();
        let (a, a_dials) = black_hole("b-a").await;
        let (b, b_dials) = black_hole("b-b").await;
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let (_tx, rx) = watch::channel(Arc::new(id));
        let cfg = AgentConfig {
            transport: umbra_link::TransportPref::Tcp,
            connect_timeout_ms: 300,
            ..AgentConfig::default()
        };
        let session = Arc::new(Session::connect(cfg, rx, vec![a, b]).await);
        let dials = || {
            a_dials.load(std::sync::atomic::Ordering::SeqCst)
                + b_dials.load(std::sync::atomic::Ordering::SeqCst)
        };
        let before = dials();
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let session = session.clone();
            requests.spawn(async move { session.open("svc").await.map(|_| ()) });
        }
        while let Some(r) = requests.join_next().await {
            assert!(matches!(r.unwrap(), Err(OpenError::NoBroker(_))));
        }
        // One round of dials (each broker once), not one per request.
        let round = dials() - before;
        assert!(round <= 2, "{round} dials for 6 requests to 2 brokers");
        // A request after that round dials again (the network may be back).
        let r = session.open("svc").await.map(|_| ());
        assert!(matches!(r, Err(OpenError::NoBroker(_))), "{r:?}");
        // The answer names every broker and why it failed, not only the last tried.
        let said = r.unwrap_err().to_string();
        assert!(
            said.contains("b-a: ") && said.contains("; b-b: ")
                || said.contains("b-b: ") && said.contains("; b-a: "),
            "{said}"
        );
        assert!(
            dials() > before + round,
            "a later request did not dial again"
        );
    }

    /// A broker that rate limits this device answers for this connection: the agent does not
    /// take the request to another broker (that would get around the bound), says which
    /// broker and why, and keeps the link; the next request is asked again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rate_limited_open_is_final_and_names_the_broker() {
        umbra_pki::install_crypto_provider();
        let ca = umbra_pki::Ca::generate("default", SystemTime::now()).unwrap();
        let (a, a_links) = answering_broker(&ca, "b-a", OpenCode::RateLimited).await;
        let (b, b_links) = answering_broker(&ca, "b-b", OpenCode::Unavailable).await;
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let (_tx, rx) = watch::channel(Arc::new(id));
        let cfg = AgentConfig {
            transport: umbra_link::TransportPref::Tcp,
            ..AgentConfig::default()
        };
        // `b-a` alone is measured, so it is current; `b-b` is there to be (not) tried.
        let session = Arc::new(Session::connect(cfg.clone(), rx.clone(), vec![a.clone()]).await);
        session.update_brokers(vec![a, b.clone()]).await;
        for _ in 0..2 {
            let r = session.open("svc").await.map(|_| ());
            let said = match r {
                Err(e @ OpenError::RateLimited(_)) => e.to_string(),
                other => panic!("{other:?}"),
            };
            assert!(
                said.contains("b-a") && said.contains("rate limiting"),
                "{said}"
            );
        }
        assert!(b_links.lock().await.is_empty(), "b-b was asked");
        let links = a_links.lock().await;
        assert_eq!(links.len(), 1, "one link to b-a, kept");
        assert!(!links[0].is_closed());
        drop(links);
        // The twin: the same brokers, with an answer that is not final first (no connector
        // there): the request does go on to b-b.
        let (c, _) = answering_broker(&ca, "b-c", OpenCode::Unavailable).await;
        let session = Arc::new(Session::connect(cfg, rx, vec![c.clone()]).await);
        session.update_brokers(vec![c, b]).await;
        let r = session.open("svc").await.map(|_| ());
        assert!(matches!(r, Err(OpenError::Unavailable(_))), "{r:?}");
        assert!(!b_links.lock().await.is_empty(), "b-b was not asked");
    }

    /// A broker at the transport level whose every `Open` is answered `Ok` and then echoed,
    /// and which, while `mute` is set, answers neither new `Open`s nor pings (a blip of the
    /// network as new requests see it); the streams already open echo on.
    async fn muting_broker(
        ca: &umbra_pki::Ca,
        id: &str,
        mute: Arc<std::sync::atomic::AtomicBool>,
    ) -> (BrokerInfo, Arc<tokio::sync::Mutex<Vec<Link>>>) {
        stand_in(ca, id, move |mut s: Stream| {
            let muted = mute.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                let first = s.read_frame().await;
                if muted {
                    // Never answered; the stream is held until the agent drops it.
                    let _ = s.recv_chunk().await;
                    return;
                }
                match first {
                    Ok(Frame::Ping { nonce }) => {
                        let _ = s.write_frame(&Frame::Pong { nonce }).await;
                        let _ = s.finish().await;
                    }
                    Ok(Frame::Open { .. }) => {
                        let ok = Frame::OpenReply { code: OpenCode::Ok };
                        if s.write_frame(&ok).await.is_err() {
                            return;
                        }
                        while let Ok(Some(c)) = s.recv_chunk().await {
                            if s.send_chunk(c).await.is_err() {
                                return;
                            }
                        }
                        let _ = s.finish().await;
                    }
                    _ => {}
                }
            }
        })
        .await
    }

    /// A request that goes unanswered for a moment (a blip) fails over to the next broker,
    /// and the connection already open on the first broker's link goes on: the link is
    /// retired (no new streams), not closed under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_request_does_not_cut_the_live_connections() {
        umbra_pki::install_crypto_provider();
        let ca = umbra_pki::Ca::generate("default", SystemTime::now()).unwrap();
        let mute = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, a_links) = muting_broker(&ca, "b-a", mute.clone()).await;
        let (b, _) = muting_broker(&ca, "b-b", Arc::default()).await;
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let (_tx, rx) = watch::channel(Arc::new(id));
        let cfg = AgentConfig {
            transport: umbra_link::TransportPref::Tcp,
            open_timeout_ms: 300,
            ..AgentConfig::default()
        };
        let session = Arc::new(Session::connect(cfg, rx, vec![a.clone()]).await);
        session.update_brokers(vec![a, b]).await;
        let (mut live, _live_hold) = session.open("svc").await.unwrap();
        async fn echo(s: &mut Stream, what: &'static [u8]) -> Option<bytes::Bytes> {
            let fut = async {
                s.send_chunk(bytes::Bytes::from_static(what)).await.ok()?;
                s.recv_chunk().await.ok()?
            };
            tokio::time::timeout(Duration::from_secs(5), fut)
                .await
                .ok()?
        }
        let got = echo(&mut live, b"before").await;
        assert_eq!(got.as_deref(), Some(&b"before"[..]));
        // The blip: b-a answers nothing new, and the request goes to b-b.
        mute.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_other, _other_hold) = session.open("svc").await.unwrap();
        mute.store(false, std::sync::atomic::Ordering::SeqCst);
        let current = session.state.lock().await.current.clone().map(|(id, _)| id);
        assert_eq!(current.as_deref(), Some("b-b"));
        // The live connection on b-a's link goes on.
        let got = echo(&mut live, b"after").await;
        assert_eq!(got.as_deref(), Some(&b"after"[..]));
        assert!(!a_links.lock().await[0].is_closed());
        // Once nothing rides it, the retired link is closed.
        drop((live, _live_hold));
        session.reprobe().await;
        let t0 = std::time::Instant::now();
        while !a_links.lock().await[0].is_closed() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the retired link stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One reason per broker, the latest, in the order tried; names where known.
    #[test]
    fn a_failed_request_names_every_broker_and_why() {
        let mut a = Attempts::new();
        assert_eq!(a.summary(|_| None), "no brokers known");
        a.failed("b-1", "broker policy is stale".into());
        a.failed("b-2", "connection refused".into());
        a.failed("b-1", "timed out".into());
        let name = |id: &str| (id == "b-1").then(|| "eu-1".to_owned());
        assert_eq!(a.summary(name), "eu-1: timed out; b-2: connection refused");
        assert_eq!(a.reason("b-1"), Some("timed out"));
        assert_eq!(a.reason("b-3"), None);
    }

    /// A broker the controller drops from the list while the agent is dialing it for a side
    /// link (revoked, say) carries nothing: the new link is closed, not used. The dial is
    /// slowed by a TCP relay that waits before it forwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_dropped_from_the_list_during_a_side_dial_is_not_used() {
        umbra_pki::install_crypto_provider();
        let ca = umbra_pki::Ca::generate("default", SystemTime::now()).unwrap();
        let (a, _) = answering_broker(&ca, "b-a", OpenCode::Unavailable).await;
        let (mut b, b_links) = answering_broker(&ca, "b-b", OpenCode::Unavailable).await;
        let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = b
            .tcp_addr
            .replace(slow.local_addr().unwrap().to_string())
            .unwrap();
        let delay = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dialing = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (delaying, dialed, released) = (delay.clone(), dialing.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = slow.accept().await {
                let (to, delaying, dialed, released) = (
                    to.clone(),
                    delaying.clone(),
                    dialed.clone(),
                    released.clone(),
                );
                tokio::spawn(async move {
                    if delaying.load(std::sync::atomic::Ordering::SeqCst) {
                        // The side dial is under way: the test drops the broker now, and
                        // lets the dial go on only once it has.
                        dialed.notify_one();
                        let _ = tokio::time::timeout(Duration::from_secs(10), released.notified())
                            .await;
                    }
                    let mut u = tokio::net::TcpStream::connect(&to).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                });
            }
        });
        let id = umbra_pki::test_util::identity(&ca, umbra_proto::Role::Agent, "d1").unwrap();
        let (_tx, rx) = watch::channel(Arc::new(id));
        let cfg = AgentConfig {
            transport: umbra_link::TransportPref::Tcp,
            ..AgentConfig::default()
        };
        // `b-a` alone is measured, so it is current however loaded the machine; `b-b` joins the
        // list after it (a refresh puts new brokers last).
        let session = Arc::new(Session::connect(cfg, rx, vec![a.clone()]).await);
        session.update_brokers(vec![a.clone(), b.clone()]).await;
        let current = session
            .state
            .lock()
            .await
            .current
            .as_ref()
            .map(|(id, _)| id.clone());
        assert_eq!(current.as_deref(), Some("b-a"));
        delay.store(true, std::sync::atomic::Ordering::SeqCst);

        let opening = tokio::spawn({
            let session = session.clone();
            async move { session.open("svc").await }
        });
        tokio::time::timeout(Duration::from_secs(10), dialing.notified())
            .await
            .expect("the side dial to b-b did not start");
        session.update_brokers(vec![a]).await;
        release.notify_one();
        let r = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Err(OpenError::Unavailable(_))), "{r:?}");
        // The side link reached b-b, is closed, and is not kept.
        assert!(session.state.lock().await.side.is_empty());
        let t0 = std::time::Instant::now();
        loop {
            let links = b_links.lock().await;
            if !links.is_empty() && links.iter().all(Link::is_closed) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "b-b's links: {} accepted, {} open",
                links.len(),
                links.iter().filter(|l| !l.is_closed()).count()
            );
            drop(links);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn reply_table() {
        assert!(matches!(
            reply(Ok(Frame::OpenReply {
                code: OpenCode::Denied
            })),
            Reply::Code(OpenCode::Denied)
        ));
        // Malformed bytes and frames that are not an OpenReply: the link is closed.
        for e in [
            FrameError::Version(2),
            FrameError::UnknownKind(0x7f),
            FrameError::TooLong(0xffff),
            FrameError::Truncated,
            FrameError::BadValue("open code"),
        ] {
            let want = LinkError::Frame(e.clone()).to_string();
            assert!(
                matches!(reply(Err(LinkError::Frame(e))), Reply::Malformed(m) if m == want),
                "{want}"
            );
        }
        for f in [
            Frame::DialReply { code: DialCode::Ok },
            Frame::Pong { nonce: 1 },
            Frame::Open {
                flow: Flow::Tcp,
                service: "echo".into(),
                credential: vec![],
            },
        ] {
            assert!(matches!(reply(Ok(f.clone())), Reply::Malformed(_)), "{f:?}");
        }
        // No frame: the link is checked for a refusal, not blamed for a bad frame.
        for e in [
            LinkError::StreamEnded,
            LinkError::StreamReset(0),
            LinkError::Closed,
        ] {
            assert!(matches!(reply(Err(e)), Reply::Failed(_)));
        }
    }
}
