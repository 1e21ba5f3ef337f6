//! Audit events raised by the broker: every stream decision, refused link and failed dial.
//!
//! Each event is logged at once as a structured line (target `audit`) and queued for the next
//! heartbeat, which stores it in the controller's audit table. A new event wakes the heartbeat
//! early (see [`AuditQueue::pending`]), so events reach the store within a fraction of a
//! second rather than a heartbeat interval: a broker that crashes loses at most what it
//! recorded in that short window (still in its log). The queue is bounded: if the controller is
//! away for long, the oldest events are dropped from the queue (they are still in the log) and
//! counted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use umbra_proto::api::AuditRecord;

const CAP: usize = 10_000;

#[derive(Default)]
pub(crate) struct AuditQueue {
    q: Mutex<VecDeque<AuditRecord>>,
    queued: tokio::sync::Notify,
}

impl AuditQueue {
    /// Logs and queues one event.
    pub(crate) fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: serde_json::Value,
    ) {
        tracing::info!(
            target: "audit",
            actor,
            action,
            object = target,
            result,
            detail = %detail,
            "audit"
        );
        let rec = AuditRecord {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            result: result.to_owned(),
            detail,
        };
        let mut q = self.lock();
        if q.len() >= CAP {
            q.pop_front();
            metrics::counter!("umbra_broker_audit_dropped_total").increment(1);
        }
        q.push_back(rec);
        drop(q);
        self.queued.notify_one();
    }

    /// Resolves once an event has been queued since the last call.
    pub(crate) async fn pending(&self) {
        self.queued.notified().await;
    }

    /// Takes up to `max` queued events for a heartbeat.
    pub(crate) fn take(&self, max: usize) -> Vec<AuditRecord> {
        let mut q = self.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Puts events back at the front after a failed heartbeat.
    pub(crate) fn requeue(&self, events: Vec<AuditRecord>) {
        let mut q = self.lock();
        for e in events.into_iter().rev() {
            if q.len() >= CAP {
                break;
            }
            q.push_front(e);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<AuditRecord>> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_event_wakes_the_sender() {
        let a = AuditQueue::default();
        // Nothing queued: nothing to wake for.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), a.pending())
                .await
                .is_err()
        );
        a.record("x", "stream.open", "demo", "deny", serde_json::Value::Null);
        tokio::time::timeout(std::time::Duration::from_secs(5), a.pending())
            .await
            .expect("woken by the event");
        assert_eq!(a.take(10).len(), 1);
    }

    #[test]
    fn bounded_and_ordered() {
        let a = AuditQueue::default();
        for i in 0..CAP + 5 {
            a.record(
                "x",
                "stream.open",
                &i.to_string(),
                "deny",
                serde_json::Value::Null,
            );
        }
        let first = a.take(3);
        assert_eq!(first[0].target, "5", "oldest dropped first");
        a.requeue(first);
        assert_eq!(a.take(1)[0].target, "5", "requeued at the front");
    }
}
