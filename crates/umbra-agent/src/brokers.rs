//! Choosing a broker: measure, rank, remember which ones are down.
//!
//! The pure part ([`rank`], [`DownMarks`], [`failover_order`], [`fastest`]) takes measurements
//! and `now` in and hands an order out. The driver ([`probe_all`], [`dial`]) dials every broker
//! in parallel (QUIC, falling back to TLS over TCP), sends three `Ping` frames, each on a new
//! stream, and takes the fastest time to the `Pong` as the broker's round trip time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use umbra_link::{Link, LinkConfig, LinkError};
use umbra_pki::TlsIdentity;
use umbra_proto::Frame;
use umbra_proto::api::BrokerInfo;

use crate::config::AgentConfig;

/// Pings per broker; the fastest is its round trip time.
pub(crate) const PINGS: usize = 3;
/// How long a broker that failed stays at the back of the line.
pub(crate) const DOWN_FOR: Duration = Duration::from_secs(30);

/// Orders brokers nearest first: measured ones by round trip time, then failed ones in their
/// original order. Returns indices into `rtts`. Ties keep the original order.
pub(crate) fn rank<E>(rtts: &[Result<Duration, E>]) -> Vec<usize> {
    let mut keyed: Vec<(usize, Option<Duration>)> = rtts
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.as_ref().ok().copied()))
        .collect();
    // Stable sort: equal keys keep their original order.
    keyed.sort_by_key(|&(_, rtt)| match rtt {
        Some(d) => (false, d),
        None => (true, Duration::ZERO),
    });
    keyed.into_iter().map(|(i, _)| i).collect()
}

/// The shortest of some round trips: the estimate of a broker's distance. What delays a ping
/// beyond the path (queues, scheduling, and on a new QUIC link the pacing of its first
/// packets) only ever adds, so the fastest sample is the closest to the path itself; a median
/// let two slowed pings out of three rank a near broker behind a far one.
pub(crate) fn fastest(v: &[Duration]) -> Option<Duration> {
    v.iter().min().copied()
}

/// Brokers recently seen failing, each until an expiry.
#[derive(Debug, Default, Clone)]
pub(crate) struct DownMarks {
    until: HashMap<String, Instant>,
}

impl DownMarks {
    /// Marks `id` down from `now` for `for_how_long`.
    pub(crate) fn mark(&mut self, id: &str, now: Instant, for_how_long: Duration) {
        self.until.insert(id.to_owned(), now + for_how_long);
    }

    /// Whether `id` is marked down at `now`.
    pub(crate) fn is_down(&self, id: &str, now: Instant) -> bool {
        self.until.get(id).is_some_and(|&t| now < t)
    }

    /// Forgets a mark (the broker answered).
    pub(crate) fn clear(&mut self, id: &str) {
        self.until.remove(id);
    }
}

/// The order in which to try brokers: the ranked ids that are up first, then those marked
/// down (as a last resort, in rank order), leaving out any already tried for this request.
pub(crate) fn failover_order<'a>(
    ranked: &'a [String],
    down: &DownMarks,
    tried: &[String],
    now: Instant,
) -> Vec<&'a str> {
    let untried = || ranked.iter().filter(|id| !tried.contains(id));
    let up = untried().filter(|id| !down.is_down(id, now));
    let down = untried().filter(|id| down.is_down(id, now));
    up.chain(down).map(String::as_str).collect()
}

/// A measured broker.
pub(crate) struct Probe {
    pub(crate) broker: BrokerInfo,
    /// Round trip time and the link that measured it, or why there is none.
    pub(crate) result: Result<(Duration, Link), String>,
    /// The broker refused this identity (revoked or not enrolled).
    pub(crate) refused: bool,
}

impl Probe {
    pub(crate) fn rtt(&self) -> Result<Duration, String> {
        match &self.result {
            Ok((d, _)) => Ok(*d),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Measures every broker in parallel; the result is ranked nearest first.
pub(crate) async fn probe_all(
    cfg: &AgentConfig,
    identity: &Arc<TlsIdentity>,
    brokers: &[BrokerInfo],
) -> Vec<Probe> {
    let mut set = JoinSet::new();
    for (i, b) in brokers.iter().enumerate() {
        let (cfg, identity, b) = (cfg.clone(), identity.clone(), b.clone());
        set.spawn(async move {
            let r = probe(&cfg, &identity, &b).await;
            let refused = matches!(
                r,
                Err(ProbeError::Link {
                    source: LinkError::Refused,
                    ..
                })
            );
            (
                i,
                Probe {
                    broker: b,
                    result: r.map_err(|e| e.to_string()),
                    refused,
                },
            )
        });
    }
    let mut out: Vec<Option<Probe>> = brokers.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, p)) = joined
            && let Some(slot) = out.get_mut(i)
        {
            *slot = Some(p);
        }
    }
    let probes: Vec<Probe> = out
        .into_iter()
        .zip(brokers)
        .map(|(p, b)| {
            p.unwrap_or_else(|| Probe {
                broker: b.clone(),
                result: Err("probe task failed".into()),
                refused: false,
            })
        })
        .collect();
    let order = rank(&probes.iter().map(Probe::rtt).collect::<Vec<_>>());
    let mut slots: Vec<Option<Probe>> = probes.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

/// Why a broker could not be measured or reached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error(transparent)]
    Dial(#[from] umbra_link::DialBrokerError),
    #[error("{transport}: {source}")]
    Link {
        transport: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("no pong within the open timeout")]
    PingTimeout,
    #[error("unexpected answer to a ping: {0}")]
    BadPong(String),
}

async fn probe(
    cfg: &AgentConfig,
    identity: &TlsIdentity,
    broker: &BrokerInfo,
) -> Result<(Duration, Link), ProbeError> {
    let link = dial(cfg, identity, broker).await?;
    let mut samples = Vec::with_capacity(PINGS);
    for _ in 0..PINGS {
        match ping(&link, cfg.open_timeout()).await {
            Ok(d) => samples.push(d),
            Err(ProbeError::Link { transport, source }) => {
                // Say so if the broker refused this identity rather than failed.
                let source = link.explain(source).await;
                link.close();
                return Err(ProbeError::Link { transport, source });
            }
            Err(e) => {
                link.close();
                return Err(e);
            }
        }
    }
    match fastest(&samples) {
        Some(d) => Ok((d, link)),
        None => Err(ProbeError::PingTimeout),
    }
}

/// One ping on a new stream; the time from sending `Ping` to reading the matching `Pong`.
pub(crate) async fn ping(link: &Link, timeout: Duration) -> Result<Duration, ProbeError> {
    let nonce = u64::from_le_bytes(umbra_pki::random_bytes::<8>());
    let exchange = async {
        let mut s = link.open().await.map_err(|source| ProbeError::Link {
            transport: link.transport().as_str(),
            source,
        })?;
        let sent = Instant::now();
        let io = |source| ProbeError::Link {
            transport: link.transport().as_str(),
            source,
        };
        s.write_frame(&Frame::Ping { nonce }).await.map_err(io)?;
        let answer = s.read_frame().await.map_err(io)?;
        let rtt = sent.elapsed();
        let _ = s.finish().await;
        match answer {
            Frame::Pong { nonce: n } if n == nonce => Ok(rtt),
            other => Err(ProbeError::BadPong(format!("{other:?}"))),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::PingTimeout)?
}

/// Dials `broker` with the allowed transports in order, each bounded by the connect timeout.
pub(crate) async fn dial(
    cfg: &AgentConfig,
    identity: &TlsIdentity,
    broker: &BrokerInfo,
) -> Result<Link, ProbeError> {
    let link_cfg = LinkConfig {
        handshake_timeout: cfg.connect_timeout(),
        ..LinkConfig::default()
    }
    .with_stream_window_kib(cfg.stream_window_kib);
    Ok(umbra_link::dial_broker(
        broker,
        cfg.transport,
        identity,
        &link_cfg,
        cfg.connect_timeout(),
    )
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rank_nearest_first_failures_last() {
        let r: Vec<Result<Duration, &str>> = vec![
            Ok(30 * MS),
            Err("refused"),
            Ok(5 * MS),
            Err("timeout"),
            Ok(12 * MS),
            Ok(5 * MS),
        ];
        assert_eq!(rank(&r), vec![2, 5, 4, 0, 1, 3]);
        assert_eq!(rank::<()>(&[]), Vec::<usize>::new());
        assert_eq!(rank(&[Err::<Duration, _>("x"), Err("y")]), vec![0, 1]);
    }

    #[test]
    fn fastest_of_three() {
        assert_eq!(fastest(&[9 * MS, 1 * MS, 5 * MS]), Some(1 * MS));
        assert_eq!(fastest(&[4 * MS]), Some(4 * MS));
        assert_eq!(fastest(&[]), None);
        // A near broker (2 ms) two of whose pings were held up ranks ahead of a steady far
        // one (3 ms); by the median it ranked behind.
        let near = fastest(&[9 * MS, 2 * MS, 8 * MS]);
        let far = fastest(&[3 * MS, 3 * MS, 3 * MS]);
        assert_eq!(
            rank::<()>(&[Ok(far.unwrap()), Ok(near.unwrap())]),
            vec![1, 0]
        );
    }

    #[test]
    fn down_marks_expire() {
        let t0 = Instant::now();
        let mut d = DownMarks::default();
        assert!(!d.is_down("a", t0));
        d.mark("a", t0, DOWN_FOR);
        assert!(d.is_down("a", t0));
        assert!(d.is_down("a", t0 + DOWN_FOR - MS));
        assert!(!d.is_down("a", t0 + DOWN_FOR));
        assert!(!d.is_down("b", t0));
        d.clear("a");
        assert!(!d.is_down("a", t0));
    }

    #[test]
    fn failover_order_table() {
        let t0 = Instant::now();
        let ranked: Vec<String> = ["near", "mid", "far"].map(String::from).to_vec();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut down = DownMarks::default();

        // Everything up: rank order.
        assert_eq!(
            failover_order(&ranked, &down, &[], t0),
            ["near", "mid", "far"]
        );
        // The nearest failed: the next one, the failed one last.
        down.mark("near", t0, DOWN_FOR);
        assert_eq!(
            failover_order(&ranked, &down, &[], t0),
            ["mid", "far", "near"]
        );
        // Tried ones are not tried again for the same request.
        assert_eq!(
            failover_order(&ranked, &down, &s(&["near"]), t0),
            ["mid", "far"]
        );
        down.mark("mid", t0, DOWN_FOR);
        assert_eq!(
            failover_order(&ranked, &down, &s(&["near", "mid"]), t0),
            ["far"]
        );
        assert_eq!(
            failover_order(&ranked, &down, &s(&["near", "mid", "far"]), t0),
            Vec::<&str>::new()
        );
        // All down: still tried, in rank order.
        down.mark("far", t0, DOWN_FOR);
        assert_eq!(
            failover_order(&ranked, &down, &[], t0),
            ["near", "mid", "far"]
        );
        // Marks expire: the nearest comes back first.
        assert_eq!(
            failover_order(&ranked, &down, &[], t0 + DOWN_FOR),
            ["near", "mid", "far"]
        );
        down.clear("mid");
        assert_eq!(
            failover_order(&ranked, &down, &[], t0),
            ["mid", "near", "far"]
        );
    }
}
