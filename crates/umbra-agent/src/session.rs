//! A held link to the current broker, and failover when it stops answering.
//!
//! [`Session::open`] asks the current broker for a stream to a service. If the link is dead or
//! the broker does not answer within `open_timeout`, that broker is marked down for a while,
//! the next one in [`failover_order`] is dialed (bounded by `connect_timeout`) and the request
//! is retried there, so a killed broker costs a new connection at most one open timeout plus
//! one connect. A `Denied` answer is the policy's decision and is final (every broker holds
//! the same policy). A `Stale` answer (the broker's policy is too old to authorize anything)
//! fails over: another broker may hold a fresh one. An `Unavailable` answer (allowed, but this
//! broker has no live link to a connector of the service, e.g. just after it restarted) tries
//! the other brokers once each without marking this one down.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, watch};
use umbra_link::{Link, LinkError, Stream};
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
    /// The broker does not serve this kind of flow.
    #[error("the broker does not serve this flow kind")]
    UnsupportedFlow,
    /// Every broker failed; the last failure.
    #[error("no broker reachable: {0}")]
    NoBroker(String),
    /// The broker refused this device's identity (revoked or not enrolled). Final: every
    /// broker holds the same snapshot.
    #[error("{}", LinkError::Refused)]
    Refused,
}

/// Why one `Open` attempt on a link failed.
enum Failure {
    /// The broker refused the link itself.
    Refused,
    /// The broker failed (transport error, garbage, or silence).
    Broker(String),
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
    down: DownMarks,
}

/// Failed attempts of one request, and the reason of the latest.
struct Attempts {
    tried: Vec<String>,
    last: String,
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
                down,
            }),
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
        if let Some((id, link)) = &st.current
            && !ranked.contains(id)
        {
            link.close();
            st.current = None;
        }
        st.ranked = ranked;
        st.brokers = list;
    }

    /// Opens a stream to `service` through the current broker, failing over as described in
    /// the module documentation. On success the stream's reply has been read and application
    /// bytes may flow.
    pub(crate) async fn open(&self, service: &str) -> Result<Stream, OpenError> {
        let mut attempts = Attempts {
            tried: Vec::new(),
            last: "no brokers known".into(),
        };
        let mut unavailable = false;
        loop {
            let (broker_id, link) = match self.link(&mut attempts).await {
                Ok(l) => l,
                // Some broker allowed the stream but none could reach a connector.
                Err(_) if unavailable => return Err(OpenError::Unavailable(service.to_owned())),
                Err(e) => return Err(e),
            };
            match self.try_open(&link, service).await {
                Ok((OpenCode::Ok, stream)) => return Ok(stream),
                Ok((OpenCode::Denied, _)) => return Err(OpenError::Denied(service.to_owned())),
                Ok((OpenCode::Unavailable, _)) => {
                    // This broker has no live link to a connector of the service (it may
                    // have just restarted); another broker may have one. The broker itself
                    // is fine, so it is not marked down.
                    tracing::info!(broker = %broker_id, service, "broker has no connector for the service; trying the next");
                    unavailable = true;
                    attempts.tried.push(broker_id);
                    continue;
                }
                Ok((OpenCode::UnsupportedFlow, _)) => return Err(OpenError::UnsupportedFlow),
                Ok((OpenCode::Stale, _)) => {
                    attempts.last = "broker policy is stale".into();
                }
                Err(Failure::Refused) => {
                    self.mark_failed(&broker_id).await;
                    return Err(OpenError::Refused);
                }
                Err(Failure::Broker(e)) => attempts.last = e,
            }
            tracing::warn!(broker = %broker_id, reason = %attempts.last, "broker failed; failing over");
            self.mark_failed(&broker_id).await;
            attempts.tried.push(broker_id);
        }
    }

    /// The link to use: the current one if it is alive and not tried yet for this request,
    /// else a new one to the next broker in failover order.
    async fn link(&self, attempts: &mut Attempts) -> Result<(String, Link), OpenError> {
        let mut st = self.state.lock().await;
        if let Some((id, link)) = &st.current {
            if !link.is_closed() && !attempts.tried.contains(id) {
                return Ok((id.clone(), link.clone()));
            }
            if link.is_closed() {
                let id = id.clone();
                st.down.mark(&id, Instant::now(), DOWN_FOR);
                st.current = None;
            }
        }
        loop {
            let now = Instant::now();
            let next = failover_order(&st.ranked, &st.down, &attempts.tried, now)
                .first()
                .map(|s| s.to_string());
            let Some(id) = next else {
                return Err(OpenError::NoBroker(attempts.last.clone()));
            };
            let Some(info) = st.brokers.iter().find(|b| b.id == id).cloned() else {
                attempts.tried.push(id);
                continue;
            };
            let identity = self.identity.borrow().clone();
            match brokers::dial(&self.cfg, &identity, &info).await {
                Ok(link) => {
                    tracing::info!(broker = %info.name, transport = link.transport().as_str(), kx = link.kx_group(), "switched broker");
                    if let Some((_, old)) = st.current.take() {
                        old.close();
                    }
                    st.down.clear(&id);
                    st.current = Some((id.clone(), link.clone()));
                    return Ok((id, link));
                }
                Err(e) => {
                    tracing::warn!(broker = %info.name, error = %e, "cannot reach broker");
                    attempts.last = e.to_string();
                    st.down.mark(&id, now, DOWN_FOR);
                    attempts.tried.push(id);
                }
            }
        }
    }

    async fn mark_failed(&self, broker_id: &str) {
        let mut st = self.state.lock().await;
        st.down.mark(broker_id, Instant::now(), DOWN_FOR);
        if st.current.as_ref().is_some_and(|(id, _)| id == broker_id)
            && let Some((_, link)) = st.current.take()
        {
            link.close();
        }
    }

    /// One `Open` on `link`, bounded by the open timeout. `Err` means the broker failed or
    /// refused the link, not that it denied the service (that is an answer).
    async fn try_open(&self, link: &Link, service: &str) -> Result<(OpenCode, Stream), Failure> {
        // Outer error: the link or stream failed; inner: the broker answered nonsense.
        let exchange = async {
            let mut s = link.open().await?;
            s.write_frame(&Frame::Open {
                flow: Flow::Tcp,
                service: service.to_owned(),
                credential: Vec::new(),
            })
            .await?;
            match s.read_frame().await? {
                Frame::OpenReply { code } => Ok(Ok((code, s))),
                other => {
                    s.reset();
                    Ok(Err(format!("unexpected answer to Open: {other:?}")))
                }
            }
        };
        match tokio::time::timeout(self.cfg.open_timeout(), exchange).await {
            Ok(Ok(Ok(r))) => Ok(r),
            Ok(Ok(Err(garbage))) => Err(Failure::Broker(garbage)),
            // A link error: was it the broker refusing this identity?
            Ok(Err(e)) => match link.explain(e).await {
                LinkError::Refused => Err(Failure::Refused),
                e => Err(Failure::Broker(e.to_string())),
            },
            Err(_) => Err(Failure::Broker(format!(
                "no answer within {} ms",
                self.cfg.open_timeout().as_millis()
            ))),
        }
    }

    /// Closes the held link.
    pub(crate) async fn close(&self) {
        if let Some((_, link)) = self.state.lock().await.current.take() {
            link.close();
        }
    }
}
