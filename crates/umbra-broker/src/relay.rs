//! Live streams: the registry of what is relaying now, and the relay itself.
//!
//! The registry is touched when a stream starts and ends, never per chunk; bytes are counted
//! with relaxed atomics inside the relay. On every policy change the broker re-decides each
//! live stream and cancels those no longer allowed, so removing a policy or revoking a device
//! tears down access that is already open, not just the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use umbra_link::{Counters, Stream};
use umbra_proto::api::LiveStream;

use crate::authority::unix;

/// One relaying stream.
pub(crate) struct LiveEntry {
    pub(crate) id: u64,
    pub(crate) device: String,
    pub(crate) serial_hex: String,
    /// End of validity of the agent's certificate: the stream ends then
    /// ([`crate::authz::CERTIFICATE_EXPIRED`]).
    pub(crate) not_after: SystemTime,
    pub(crate) user: String,
    pub(crate) service: String,
    /// The service's `host:port` when the stream was opened (what the connector dialed).
    pub(crate) target: String,
    pub(crate) connector: String,
    /// Serial of the certificate of the connector's link carrying it: the stream ends with
    /// that certificate ([`crate::authz::CONNECTOR_CERTIFICATE_EXPIRED`]).
    pub(crate) connector_serial: String,
    pub(crate) transport: &'static str,
    pub(crate) started_at: SystemTime,
    pub(crate) counters: Counters,
    /// Cancelled by [`LiveEntry::end`] when the broker ends the stream.
    pub(crate) cancel: CancellationToken,
    /// Why the broker ended it (the first reason given), for its `stream.revoke` record.
    pub(crate) ended_for: OnceLock<String>,
}

impl LiveEntry {
    /// Ends the stream because it may no longer run, for `why` (a decision's reason, such as
    /// `certificate_expired`, or `route_changed`). The first reason given is the one recorded.
    pub(crate) fn end(&self, why: &str) {
        let _ = self.ended_for.set(why.to_owned());
        self.cancel.cancel();
    }

    /// Whether `service`, what a snapshot says of this stream's service (`None`: not
    /// published), still routes this stream: the same target, served by its connector. A
    /// stream to a target since unpublished, or through a connector since taken off the
    /// service, is ended like one the policy no longer allows (with a policy check alone it
    /// would run on, when a service is removed and added again with another target between
    /// two snapshots the broker installs).
    pub(crate) fn routed_by(&self, service: Option<&umbra_proto::snapshot::ServiceFacts>) -> bool {
        service.is_some_and(|s| s.target == self.target && s.connectors.contains(&self.connector))
    }
}

/// What is relaying now.
#[derive(Default)]
pub(crate) struct LiveStreams {
    m: Mutex<HashMap<u64, Arc<LiveEntry>>>,
    /// Bumped whenever a stream starts or ends: heartbeats resend the list only when it moved
    /// (or to refresh byte counts).
    generation: AtomicU64,
}

impl LiveStreams {
    pub(crate) fn insert(&self, e: Arc<LiveEntry>) {
        self.lock().insert(e.id, e);
        self.generation.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("umbra_broker_streams_active").increment(1.0);
    }

    pub(crate) fn remove(&self, id: u64) {
        if self.lock().remove(&id).is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!("umbra_broker_streams_active").decrement(1.0);
        }
    }

    /// Changes with every stream that starts or ends.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub(crate) fn entries(&self) -> Vec<Arc<LiveEntry>> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The admin view: at most `max` streams (the oldest, by id), and how many more there
    /// are. A heartbeat's body is bounded, and a broker with more live streams than one
    /// carries says so rather than having its whole list refused.
    pub(crate) fn report(&self, broker: &str, max: usize) -> (Vec<LiveStream>, u64) {
        // Under the lock only the entries are taken; they are described after it.
        let (mut kept, total): (Vec<Arc<LiveEntry>>, usize) = {
            let m = self.lock();
            (m.values().cloned().collect(), m.len())
        };
        kept.sort_unstable_by_key(|e| e.id);
        kept.truncate(max);
        let omitted = (total - kept.len()) as u64;
        let v = kept
            .iter()
            .map(|e| LiveStream {
                id: e.id,
                broker: broker.to_owned(),
                user: e.user.clone(),
                device: e.device.clone(),
                service: e.service.clone(),
                connector: e.connector.clone(),
                transport: e.transport.to_owned(),
                started_at: unix(e.started_at),
                bytes_up: e.counters.up.load(Ordering::Relaxed),
                bytes_down: e.counters.down.load(Ordering::Relaxed),
            })
            .collect();
        (v, omitted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveEntry>>> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Both sides finished, or one reset.
    Done,
    /// The policy no longer allows it.
    Revoked,
    /// The broker is shutting down.
    Shutdown,
    /// Transport error or idle timeout.
    Error,
}

impl End {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            End::Done => "done",
            End::Revoked => "revoked",
            End::Shutdown => "shutdown",
            End::Error => "error",
        }
    }
}

/// Relays agent <-> connector until both halves end, the policy cancels it, or shutdown.
/// Dropping the relay on cancellation resets both streams.
pub(crate) async fn run(
    entry: &LiveEntry,
    agent: Stream,
    connector: Stream,
    idle: Duration,
    shutdown: &CancellationToken,
) -> End {
    tokio::select! {
        // Cancellation first: a stream revoked while it was set up relays nothing, not even
        // what is already waiting on either side.
        biased;
        () = entry.cancel.cancelled() => End::Revoked,
        () = shutdown.cancelled() => End::Shutdown,
        r = umbra_link::relay_streams(agent, connector, idle, &entry.counters) => match r {
            Ok(()) => End::Done,
            Err(e) => {
                tracing::debug!(error = %e, "relay ended");
                End::Error
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umbra_proto::snapshot::ServiceFacts;

    fn entry() -> LiveEntry {
        LiveEntry {
            id: 1,
            device: "d-1".into(),
            serial_hex: "01".into(),
            not_after: SystemTime::UNIX_EPOCH,
            user: "alice@example.com".into(),
            service: "web".into(),
            target: "10.0.0.1:80".into(),
            connector: "c-1".into(),
            connector_serial: "c1".into(),
            transport: "quic",
            started_at: SystemTime::UNIX_EPOCH,
            counters: Counters::default(),
            cancel: CancellationToken::new(),
            ended_for: OnceLock::new(),
        }
    }

    fn snapshot(target: &str, connectors: &[&str]) -> umbra_proto::Snapshot {
        umbra_proto::Snapshot {
            services: vec![ServiceFacts {
                name: "web".into(),
                target: target.into(),
                connectors: connectors.iter().map(|c| (*c).to_owned()).collect(),
            }],
            ..Default::default()
        }
    }

    /// A report lists at most so many streams, the oldest, and counts the rest; under the
    /// limit it lists them all and counts none.
    #[test]
    fn a_report_lists_the_oldest_streams_and_counts_the_rest() {
        let live = LiveStreams::default();
        for id in [7, 3, 9, 1, 5] {
            live.insert(Arc::new(LiveEntry { id, ..entry() }));
        }
        let (listed, omitted) = live.report("b1", 3);
        let ids: Vec<u64> = listed.iter().map(|s| s.id).collect();
        assert_eq!((ids, omitted), (vec![1, 3, 5], 2));
        assert!(listed.iter().all(|s| s.broker == "b1"));
        let (listed, omitted) = live.report("b1", 5);
        assert_eq!((listed.len(), omitted), (5, 0));
        let (listed, omitted) = live.report("b1", 0);
        assert_eq!((listed.len(), omitted), (0, 5));
    }

    #[test]
    fn a_live_stream_needs_its_route_still_published() {
        let e = entry();
        let routed = |s: umbra_proto::Snapshot| e.routed_by(s.service("web"));
        assert!(routed(snapshot("10.0.0.1:80", &["c-1"])));
        assert!(routed(snapshot("10.0.0.1:80", &["c-2", "c-1"])));
        // Another target, the connector taken off, the service gone.
        assert!(!routed(snapshot("10.0.0.2:80", &["c-1"])));
        assert!(!routed(snapshot("10.0.0.1:80", &["c-2"])));
        assert!(!routed(umbra_proto::Snapshot::default()));
    }
}
