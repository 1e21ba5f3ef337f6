//! What `umbra agent status` and `umbra agent services` show: who this device is, how far each
//! broker is, and which services the user may reach.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use umbra_link::Transport;
use umbra_proto::Frame;
use umbra_proto::api::BrokerInfo;

use crate::brokers::{self, Probe};
use crate::config::AgentConfig;
use crate::{AgentError, identity};

/// The agent's identity and its view of the brokers.
#[derive(Debug, Clone)]
pub struct Status {
    /// `umbra://ORG/agent/ID`.
    pub identity: String,
    /// The user this device is bound to.
    pub user: Option<String>,
    /// When the device certificate expires (it is renewed while a forward runs, and by any
    /// agent command once due).
    pub cert_not_after: SystemTime,
    /// Where its renewal stands.
    pub renewal: identity::Renewal,
    /// Every known broker, nearest first; unreachable ones last.
    pub brokers: Vec<BrokerStatus>,
}

/// One broker as measured now.
#[derive(Debug, Clone)]
pub struct BrokerStatus {
    pub info: BrokerInfo,
    /// Median round trip time of three pings, or why it could not be measured.
    pub rtt: Result<Duration, String>,
    /// The transport the measurement used; for an unreachable broker, the last one tried.
    pub transport: Transport,
    /// The broker answered, but refused this device (revoked, or not enrolled).
    pub refused: bool,
}

/// Reads the identity and measures every broker (in parallel).
pub async fn status(cfg: &AgentConfig) -> Result<Status, AgentError> {
    cfg.validate()?;
    let (id, cref, renewal) =
        identity::load_usable(cfg, SystemTime::now(), identity::RenewWhen::Due).await?;
    let id = Arc::new(id);
    let cref = identity::refresh_brokers(cfg, &id, cref).await;
    let probes = brokers::probe_all(cfg, &id, &cref.brokers).await;
    let last_tried = cfg
        .transport
        .order()
        .last()
        .copied()
        .unwrap_or(Transport::Tls);
    let brokers = probes
        .into_iter()
        .map(
            |Probe {
                 broker,
                 result,
                 refused,
             }| match result {
                Ok((rtt, link)) => {
                    let transport = link.transport();
                    link.close();
                    BrokerStatus {
                        info: broker,
                        rtt: Ok(rtt),
                        transport,
                        refused,
                    }
                }
                Err(e) => BrokerStatus {
                    info: broker,
                    rtt: Err(e),
                    transport: last_tried,
                    refused,
                },
            },
        )
        .collect();
    Ok(Status {
        identity: id.peer.id.to_uri(),
        user: cref.user,
        cert_not_after: id.peer.not_after,
        renewal,
        brokers,
    })
}

/// The services this device's user may reach, sorted, as the nearest answering broker says.
pub async fn services(cfg: &AgentConfig) -> Result<Vec<String>, AgentError> {
    cfg.validate()?;
    let (id, cref, _) =
        identity::load_usable(cfg, SystemTime::now(), identity::RenewWhen::Due).await?;
    let id = Arc::new(id);
    let cref = identity::refresh_brokers(cfg, &id, cref).await;
    let probes = brokers::probe_all(cfg, &id, &cref.brokers).await;
    // Every broker's failure: the one that matters may not be the last asked.
    let mut failures = Vec::new();
    let mut answer = None;
    let mut refused = false;
    for p in &probes {
        let Ok((_, link)) = &p.result else {
            if let Err(e) = &p.result {
                refused |= p.refused;
                failures.push(format!("{}: {e}", p.broker.name));
            }
            continue;
        };
        if answer.is_none() {
            match list_services(link, cfg.open_timeout()).await {
                Ok(list) => answer = Some(list),
                Err(e) => failures.push(format!("{}: {e}", p.broker.name)),
            }
        }
    }
    let failures = if failures.is_empty() {
        "no brokers known".to_owned()
    } else {
        failures.join("; ")
    };
    for p in &probes {
        if let Ok((_, link)) = &p.result {
            link.close();
        }
    }
    match answer {
        Some(list) => Ok(list),
        // A refusal is final (revoked): one speaks for all brokers.
        None if refused => Err(AgentError::Refused),
        None => Err(AgentError::NoBroker(failures)),
    }
}

/// Most services a broker's list may hold: a bound on what the agent keeps for a broker
/// that would not stop.
const MAX_LISTED: usize = 1 << 16;

async fn list_services(link: &umbra_link::Link, timeout: Duration) -> Result<Vec<String>, String> {
    let exchange = async {
        let mut s = link.open().await.map_err(|e| e.to_string())?;
        s.write_frame(&Frame::ListServices)
            .await
            .map_err(|e| e.to_string())?;
        let _ = s.finish().await;
        // One frame or several (a long list, possibly empty); the end of the stream, after at
        // least one, ends the list.
        let mut list = Vec::new();
        let mut frames = 0usize;
        loop {
            match s.read_frame().await {
                Ok(Frame::ServiceList { services }) => {
                    if list.len() + services.len() > MAX_LISTED {
                        return Err(format!("more than {MAX_LISTED} services listed"));
                    }
                    list.extend(services);
                    frames += 1;
                }
                Ok(other) => return Err(format!("unexpected answer to ListServices: {other:?}")),
                Err(umbra_link::LinkError::StreamEnded) if frames > 0 => return Ok(list),
                // What a broker does instead of listing: its policy is stale (it authorizes
                // nothing), or this device asked too often.
                Err(umbra_link::LinkError::StreamReset(_)) => {
                    return Err(
                        "the broker would not list (its policy is stale, or services were \
                         asked for too often)"
                            .to_owned(),
                    );
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "no answer within the open timeout".to_owned())?
}
