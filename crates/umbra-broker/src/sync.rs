//! The broker's two conversations with the controller: the snapshot long poll (policy in)
//! and the heartbeat (live streams and audit events out).
//!
//! Neither is on the stream path: a stream is decided from the snapshot already held, so the
//! controller being slow or away changes nothing for streams until the staleness limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};
use umbra_link::{ControllerClient, Refusal};
use umbra_proto::Snapshot;
use umbra_proto::api::BrokerHeartbeat;

use crate::Shared;
use crate::audit::Batch;
use crate::authn::admit;
use crate::authority::{Authority, store_cached_or_forget, unix};
use crate::authz::{certificate_expired, recheck};
use crate::relay::LiveEntry;

const RETRY: Duration = Duration::from_secs(1);
/// Wait before asking again after refusing a snapshot.
const REFUSED_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// How long a heartbeat woken by a new audit event waits for more before it goes.
const AUDIT_BATCH: Duration = Duration::from_millis(50);
/// Least time between two heartbeats woken early by audit events.
const MIN_SPACING: Duration = Duration::from_millis(200);
/// Longest time between two heartbeats that carry the live-stream list (for byte counts).
const STREAMS_REFRESH: Duration = Duration::from_secs(10);
/// Most audit events one heartbeat carries. With heartbeats at most every [`MIN_SPACING`],
/// 12,500 events a second reach the controller: allowed streams, which are not budgeted
/// (every access is recorded), would have to be set up faster than that for the bounded
/// queue to drop old events while the controller is up. A broker's record is at most about
/// 5 KiB (the controller's bounds on its fields and detail), so a full batch stays within the
/// controller's 16 MiB body limit.
const AUDIT_PER_HEARTBEAT: usize = 2_500;
/// Most live streams one heartbeat lists (the rest are counted): a stream is at most about
/// 650 bytes of JSON (a 254-byte user id, names of 63), so a full list takes up to about
/// 10.2 MiB of the controller's 16 MiB body limit.
const MAX_REPORTED_STREAMS: usize = 16_384;
/// Most audit events a heartbeat carries beside the stream list: at about 5 KiB each at
/// most, 4.9 MiB, so that the two at their largest stay within the body limit.
const AUDIT_WITH_LIST: usize = 1_000;
/// Longest the controller holds a snapshot poll open.
const MAX_POLL_WAIT_SECS: u64 = 25;

/// How long to let the controller hold a snapshot poll. Its empty answer is what confirms the
/// snapshot held, so it must come well within the staleness limit, or a broker with a healthy
/// controller and no policy changes would go stale. Pure.
fn poll_wait_secs(max_staleness: Duration) -> u64 {
    (max_staleness.as_secs() / 2).clamp(1, MAX_POLL_WAIT_SECS)
}

/// Long-polls the controller for newer snapshots until shutdown.
pub(crate) async fn snapshot_loop(shared: Arc<Shared>, client: Arc<ArcSwap<ControllerClient>>) {
    let wait = poll_wait_secs(shared.cfg.max_staleness());
    // The first poll, and the first after a failure, is answered at once (`wait=0`): a
    // broker restarted with its cached snapshot, or back from an outage, learns at once
    // whether it is current, instead of at the end of a long poll while its staleness runs.
    let mut at_once = true;
    // Polls failed in a row: the first is worth a warning (the broker enforces what it holds
    // from then on, while its staleness runs), the others are not.
    let mut failures: u32 = 0;
    // Whether this run of failures has said the controller's answer cannot be read.
    let mut unreadable_said = false;
    // The failure last warned of: a run of failures whose cause changes (the controller
    // back, but refusing this broker's certificate) is warned of again, once per cause.
    let mut said = String::new();
    loop {
        let after = shared.authority.load().snapshot.version;
        let path = if at_once {
            format!("/v1/snapshot?after={after}&wait=0")
        } else {
            format!("/v1/snapshot?after={after}&wait={wait}")
        };
        let c = client.load_full();
        let r = tokio::select! {
            r = c.get_opt::<Snapshot>(&path) => r,
            () = shared.shutdown.cancelled() => return,
        };
        at_once = r.is_err();
        match &r {
            // An answer this broker cannot read: every poll would get the same. Said once,
            // also after an outage (a controller restarted into a newer version).
            Err(e @ umbra_link::LinkError::Api { status: 200, .. }) if !unreadable_said => {
                unreadable_said = true;
                let a = shared.authority.load();
                tracing::error!(
                    error = %e,
                    version = a.snapshot.version,
                    "cannot read the controller's policy snapshot (a controller newer than this \
                     broker? upgrade the broker); enforcing the one held until it is stale, \
                     without the controller's changes since"
                );
            }
            Err(e) if failures == 0 || e.failure_kind() != said => {
                said = e.failure_kind();
                let a = shared.authority.load();
                warn!(
                    error = %e,
                    version = a.snapshot.version,
                    "cannot get the policy snapshot from the controller; enforcing the one held \
                     until it is stale"
                );
            }
            Err(e) => debug!(error = %e, "snapshot poll failed; retrying"),
            Ok(_) if failures > 0 => {
                info!(failures, "the controller answers the snapshot poll again");
            }
            Ok(_) => {}
        }
        if r.is_ok() {
            unreadable_said = false;
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
        }
        match r {
            Ok(Some(s)) => {
                if !install(&shared, s, SystemTime::now()) {
                    // Asked again at once, the controller would send the same at once.
                    tokio::select! {
                        () = tokio::time::sleep(REFUSED_SNAPSHOT_WAIT) => {}
                        () = shared.shutdown.cancelled() => return,
                    }
                }
            }
            Ok(None) => confirm(&shared, SystemTime::now()),
            Err(e) => {
                // An answer (a refusal, a snapshot this build cannot read) would come again
                // at once: asked every second, the controller would build it every second.
                let pause = if matches!(e, umbra_link::LinkError::Api { .. }) {
                    REFUSED_SNAPSHOT_WAIT
                } else {
                    RETRY
                };
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shared.shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// The controller said the snapshot held is current. The confirmation is written to disk
/// too, now and then ([`persist_due`]), so that a broker restarted while the controller is
/// away counts staleness from about when it was last confirmed, not from the last change.
fn confirm(shared: &Shared, now: SystemTime) {
    let a = Arc::new(
        shared
            .authority
            .load()
            .confirmed(unix(now), std::time::Instant::now()),
    );
    shared.authority.store(a.clone());
    publish_gauges(&a, now);
    let persisted = shared.persisted_confirmation.load(Ordering::Relaxed);
    if persist_due(persisted, a.confirmed_at, shared.cfg.max_staleness()) {
        persist(shared, &a);
    }
}

/// Sets the snapshot gauges from the state held: at start (a cached snapshot), on each install
/// and confirmation, and on every re-check and heartbeat (the age grows with no event at all,
/// and most while the controller is away).
pub(crate) fn publish_gauges(a: &Authority, now: SystemTime) {
    metrics::gauge!("umbra_broker_snapshot_version").set(a.snapshot.version as f64);
    metrics::gauge!("umbra_broker_snapshot_age_seconds").set(a.age(now) as f64);
}

/// Writes `a` (snapshot and confirmation) to the cache, and remembers when it was confirmed.
fn persist(shared: &Shared, a: &Authority) {
    match store_cached_or_forget(&shared.snapshot_path, a) {
        Ok(()) => shared
            .persisted_confirmation
            .store(a.confirmed_at, Ordering::Relaxed),
        Err((e, old_copy_gone)) => warn!(
            error = %e,
            old_copy_gone,
            "could not persist the snapshot; a restart while the controller is away denies"
        ),
    }
}

/// Whether a confirmation at `now` should be written, the last one written being at
/// `persisted`: once it is a quarter of the staleness limit old (at least 1 s, at most
/// 5 min apart). A restarted broker then counts at most that much staleness it did not have.
/// Pure.
fn persist_due(persisted: u64, now: u64, max_staleness: Duration) -> bool {
    let every = (max_staleness.as_secs() / 4).clamp(1, 300);
    now.saturating_sub(persisted) >= every
}

/// Installs a snapshot the controller sent (newer, or older after a restore of its store):
/// compile, swap, persist, then re-decide what is live.
/// Returns `false` if it refused the snapshot (the one held stays in force).
pub(crate) fn install(shared: &Shared, s: Snapshot, now: SystemTime) -> bool {
    if s.org != shared.org {
        warn!(org = %s.org, "ignoring snapshot of another organisation");
        return false;
    }
    let held = shared.authority.load().snapshot.version;
    if s.version == held {
        confirm(shared, now);
        return true;
    }
    let version = s.version;
    if version < held {
        // The controller answers with an older version only when it holds nothing newer:
        // its store went back (restored from a backup). What it holds now is what is true.
        warn!(
            version,
            held,
            "the controller's snapshot version went back (was its store restored?); installing its snapshot"
        );
    }
    let a = match Authority::new(s, unix(now)) {
        Ok(a) => Arc::new(a.confirmed(unix(now), std::time::Instant::now())),
        Err(e) => {
            // Keep enforcing the last good one rather than opening or closing everything.
            warn!(version, held, error = %e, "snapshot with invalid policies; keeping the one held");
            return false;
        }
    };
    shared.authority.store(a.clone());
    publish_gauges(&a, now);
    info!(version, "snapshot installed");
    // Live streams the new snapshot ends are ended before it is written to disk: an fsync on
    // a busy disk must not keep a revoked device's streams relaying.
    reevaluate(shared, &a, now);
    shared.applied.store(version, Ordering::Release);
    persist(shared, &a);
    true
}

/// Re-decides every live link and stream under a new snapshot; closes what is no longer
/// allowed (a policy removed, a device or connector revoked, a certificate expired).
fn reevaluate(shared: &Shared, a: &Authority, now: SystemTime) {
    // Streams first, each ended and audited with why: a link closed before would end its
    // streams as link errors, with no record naming the user, service and bytes.
    end_disallowed(shared, &shared.streams.entries(), a, now);
    for l in shared
        .agents
        .all()
        .into_iter()
        .chain(shared.connectors.all())
    {
        // A link refused already (a QUIC close waits a moment) is not refused and recorded
        // again.
        if l.link.is_closed() {
            continue;
        }
        if let Err(r) = admit(l.link.peer(), a, &shared.org) {
            info!(peer = %l.link.peer().id, reason = r.as_str(), "closing link no longer admitted");
            shared.audit.record(
                &l.link.peer().id.to_uri(),
                "link.revoke",
                &shared.name,
                "ok",
                serde_json::json!({ "reason": r.as_str() }),
            );
            close_unadmitted(&l.link, r);
        }
    }
    close_expired_links(shared, now);
}

/// Closes every link whose peer's certificate has expired at `now` (wall clock). Each link
/// has a timer for that, on tokio's monotonic clock, which stands still while the machine
/// is suspended and does not follow wall-clock steps; this catches what it missed. Its
/// streams were ended first, by [`end_disallowed`], so that each is audited with why.
fn close_expired_links(shared: &Shared, now: SystemTime) {
    for l in shared
        .agents
        .all()
        .into_iter()
        .chain(shared.connectors.all())
    {
        if !l.link.is_closed() && certificate_expired(l.link.peer().not_after, now) {
            crate::accept::close_expired(shared, &l.link, l.link.peer());
        }
    }
}

/// Closes a link whose peer is no longer admitted: refused when every broker would say the
/// same (revoked), plainly closed when the snapshot merely does not know the peer (a store
/// restored to before its enrollment), so that it tries again rather than gives up.
pub(crate) fn close_unadmitted(link: &umbra_link::Link, why: crate::authn::Refusal) {
    if why.is_final() {
        link.refuse(Refusal::Identity);
    } else {
        link.close();
    }
}

/// Ends the streams of `live` that `a` no longer allows at `now` (see [`recheck`]). `a` must
/// be at least as new as every snapshot that admitted one of them: read the list first.
fn end_disallowed(shared: &Shared, live: &[Arc<LiveEntry>], a: &Authority, now: SystemTime) {
    for (e, why) in recheck(live, a, now, shared.cfg.max_staleness()) {
        info!(stream = e.id, service = %e.service, reason = %why, "a live stream may no longer run; closing it");
        e.end(&why);
    }
}

/// Re-decides the live streams every `reverify_secs`, also when no snapshot arrives: a
/// decision can change with time alone (a policy on `context.now`, the staleness limit, a
/// certificate's expiry), and closes the links whose certificate has expired. When the
/// snapshot goes stale before the next re-check, it wakes then instead, so that live streams
/// end at the staleness limit whatever `reverify_secs` is (a stream registered after this
/// loop read the list is decided again by its opener, see
/// [`crate::authz::recheck_registered`]).
pub(crate) async fn reverify_loop(shared: Arc<Shared>) {
    let every = shared.cfg.reverify();
    let max_staleness = shared.cfg.max_staleness();
    let mut wait = next_recheck(
        &shared.authority.load(),
        SystemTime::now(),
        every,
        max_staleness,
    );
    // Logged once each way: stale (every stream refused from then on), and fresh again.
    let mut was_fresh = true;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // The list before the state: a stream admitted under a snapshot installed meanwhile
        // is either not in the list, or judged by that snapshot (or a newer one), never by
        // an older one that would end it wrongly.
        let live = shared.streams.entries();
        let a = shared.authority.load_full();
        let now = SystemTime::now();
        let fresh = a.is_fresh(now, max_staleness);
        if !fresh && was_fresh {
            warn!(
                version = a.snapshot.version,
                max_staleness_secs = max_staleness.as_secs(),
                "the policy snapshot is stale (the controller has not confirmed it within \
                 max_staleness_secs): every stream is refused until it answers"
            );
        } else if fresh && !was_fresh {
            info!(
                version = a.snapshot.version,
                "the policy snapshot is fresh again"
            );
        }
        was_fresh = fresh;
        publish_gauges(&a, now);
        end_disallowed(&shared, &live, &a, now);
        close_expired_links(&shared, now);
        wait = next_recheck(&a, now, every, max_staleness);
    }
}

/// Time to the next re-check: `every`, or less if the state goes stale sooner. A
/// confirmation that arrives meanwhile only makes that wake-up find nothing to end. A state
/// not fresh now is looked at again within the staleness limit: one confirmed meanwhile
/// goes stale no sooner than that, so its staleness is not missed. Pure.
fn next_recheck(
    a: &Authority,
    now: SystemTime,
    every: Duration,
    max_staleness: Duration,
) -> Duration {
    match a.fresh_for(now, max_staleness) {
        Some(left) => every.min(left),
        None => every.min(max_staleness.saturating_add(Duration::from_secs(1))),
    }
}

/// The live-stream list the controller last accepted from this broker.
#[derive(Debug, Clone, Copy)]
struct Reported {
    generation: u64,
    at: tokio::time::Instant,
}

/// Whether a heartbeat carries the live-stream list: when the controller has none from this
/// broker yet (or the last heartbeat failed); when streams started or ended since, at most
/// once per `min_gap` (under churn, heartbeats woken early for audit events do not each resend
/// the list); and every [`STREAMS_REFRESH`] so that byte counts
/// stay current. Otherwise the controller keeps the list it has.
///
/// `refused`: when the controller last refused a heartbeat for what the list held (more
/// streams than it takes in one, say). The list is then left out for [`STREAMS_REFRESH`]:
/// audit events travel in the same heartbeat, and must not stop with it.
fn streams_due(
    last: Option<Reported>,
    refused: Option<tokio::time::Instant>,
    generation: u64,
    now: tokio::time::Instant,
    min_gap: Duration,
) -> bool {
    if refused.is_some_and(|at| now.duration_since(at) < STREAMS_REFRESH) {
        return false;
    }
    let Some(r) = last else { return true };
    let age = now.duration_since(r.at);
    (r.generation != generation && age >= min_gap) || age >= STREAMS_REFRESH
}

/// Reports live streams and audit events to the controller until shutdown.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>, client: Arc<ArcSwap<ControllerClient>>) {
    let mut tick = tokio::time::interval(shared.cfg.heartbeat());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = tokio::time::Instant::now();
    let mut reported: Option<Reported> = None;
    let mut refused: Option<tokio::time::Instant> = None;
    // Whether the controller refuses heartbeats for something other than the stream list: the
    // first refusal is a warning (nothing this broker reports is stored meanwhile), not each.
    let mut refusing = false;
    let mut failing = ServerFailing::default();
    loop {
        tokio::select! {
            // Biased: the first tick is immediate, so a starting broker registers its
            // addresses at once even with spooled events waiting.
            biased;
            _ = tick.tick() => {}
            // Audit events go out promptly; the pause batches a burst of them, and the spacing
            // keeps a burst of streams from turning heartbeats (which carry every live stream)
            // into a flood.
            () = shared.audit.pending() => {
                let spacing = MIN_SPACING.saturating_sub(last_sent.elapsed());
                tokio::time::sleep(spacing.max(AUDIT_BATCH)).await;
            }
            () = shared.shutdown.cancelled() => return,
        }
        last_sent = tokio::time::Instant::now();
        let now = SystemTime::now();
        let a = shared.authority.load();
        publish_gauges(&a, now);
        metrics::gauge!("umbra_broker_connector_links").set(shared.connectors.len() as f64);
        // Read before the list, so that a stream starting meanwhile makes the next one due.
        let generation = shared.streams.generation();
        // Half an interval: a regular tick always finds the gap passed.
        let min_gap = shared.cfg.heartbeat() / 2;
        let with_list = streams_due(reported, refused, generation, last_sent, min_gap);
        // No event goes out before the controller has said where it has this broker's
        // numbering (the first answer of a run; see `AuditQueue::confirm`).
        let mut batch = shared
            .audit
            .take(match (shared.audit.confirmed(), with_list) {
                (false, _) => 0,
                // Fewer beside a full list: both at their largest stay within the body limit.
                (true, true) => AUDIT_WITH_LIST,
                (true, false) => AUDIT_PER_HEARTBEAT,
            });
        // What the controller is about to store must be on disk here first (see `durable`):
        // when the sync fails, the events wait for a heartbeat after one that succeeds.
        if !shared.audit.durable().await {
            shared.audit.requeue(batch);
            batch = shared.audit.take(0);
        }
        let (streams, streams_omitted) = if with_list {
            let (list, omitted) = shared.streams.report(&shared.name, MAX_REPORTED_STREAMS);
            (Some(list), (omitted > 0).then_some(omitted))
        } else {
            (None, None)
        };
        let hb = BrokerHeartbeat {
            name: shared.name.clone(),
            quic_addr: shared.quic_addr.clone(),
            tcp_addr: shared.tcp_addr.clone(),
            server_name: shared.server_name.clone(),
            snapshot_version: shared.applied.load(Ordering::Acquire),
            streams,
            streams_omitted,
            audit: batch.records,
            audit_seq: Some(batch.seq),
        };
        drop(a);
        match client
            .load_full()
            .post::<_, serde_json::Value>("/v1/broker/heartbeat", &hb)
            .await
        {
            Ok(ack) => {
                refusing = false;
                if failing.succeeded() {
                    info!("the controller takes this broker's heartbeats again");
                }
                let n = |k: &str| ack.get(k).and_then(serde_json::Value::as_u64);
                shared.audit.confirm(n("audit_epoch").zip(n("audit_last")));
                if hb.streams.is_some() {
                    reported = Some(Reported {
                        generation,
                        at: last_sent,
                    });
                    refused = None;
                }
                shared.audit.acked(&Batch {
                    seq: batch.seq,
                    records: hb.audit,
                });
            }
            Err(e) => {
                // Refused for what it carried (not lost on the way): if that was the stream
                // list, the next ones go without it for a while.
                match (&hb.streams, &e) {
                    (Some(list), umbra_link::LinkError::Api { status, error })
                        if *status == 413
                            || (*status == 400 && error.field.as_deref() == Some("streams")) =>
                    {
                        warn!(streams = list.len(), error = %e, "the controller refused the live-stream list; sending audit events without it for {} s", STREAMS_REFRESH.as_secs());
                        refused = Some(last_sent);
                    }
                    // Refused for something else: a controller older than this broker (a field
                    // it does not know) refuses every heartbeat alike.
                    (_, umbra_link::LinkError::Api { status: 400, error }) => {
                        if !refusing {
                            // A field it names is a value of this broker's it refuses (an
                            // address); one it does not know is likely a newer broker's.
                            let cause = match error.field.as_deref() {
                                Some(f @ ("quic_addr" | "tcp_addr")) => format!(
                                    "it refuses this broker's {f}: check --advertise-host and the listen addresses"
                                ),
                                Some(f) => format!("it refuses the heartbeat's {f}"),
                                None => "a controller older than this broker? upgrade the \
                                         controller first"
                                    .to_owned(),
                            };
                            warn!(
                                error = %e,
                                "the controller refuses this broker's heartbeats: its addresses, \
                                 live streams and audit events are not stored ({cause})"
                            );
                        }
                        refusing = true;
                        // The stream list may have been it after all: leave it out a while.
                        if hb.streams.is_some() {
                            refused = Some(last_sent);
                        }
                    }
                    // The controller is reachable but fails them (its store full or broken):
                    // the operator of this broker is told once, not at every heartbeat.
                    (_, umbra_link::LinkError::Api { status, .. }) if failing.failed(*status) => {
                        warn!(
                            error = %e,
                            "the controller fails this broker's heartbeats: its audit events \
                             wait in the spool here, and its live streams are not shown there \
                             (see the controller's log)"
                        );
                    }
                    _ => debug!(error = %e, "heartbeat failed"),
                }
                reported = None;
                shared.audit.requeue(Batch {
                    seq: batch.seq,
                    records: hb.audit,
                });
            }
        }
    }
}

/// Whether the controller is failing this broker's heartbeats with server errors (5xx): a
/// streak is said once when it starts, and once when a heartbeat goes through again.
#[derive(Debug, Default)]
struct ServerFailing(bool);

impl ServerFailing {
    /// A heartbeat was answered with `status`: whether this starts a streak of server errors.
    fn failed(&mut self, status: u16) -> bool {
        (500..600).contains(&status) && !std::mem::replace(&mut self.0, true)
    }

    /// A heartbeat went through: whether this ends a streak.
    fn succeeded(&mut self) -> bool {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// Server errors are said once per streak, and the end of a streak once; other answers
    /// (a refusal, which has its own line) start nothing.
    #[test]
    fn a_streak_of_server_errors_is_said_once() {
        let mut f = ServerFailing::default();
        assert!(!f.failed(400) && !f.failed(413));
        assert!(!f.succeeded(), "no streak to end");
        assert!(f.failed(507), "the first server error is said");
        assert!(!f.failed(507) && !f.failed(500), "and not the next ones");
        assert!(f.succeeded(), "the end of the streak is said");
        assert!(!f.succeeded());
        assert!(f.failed(503), "a new streak is said again");
    }

    #[test]
    fn the_stream_list_goes_out_when_it_changed_or_got_old() {
        let t0 = tokio::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let last = Some(Reported {
            generation: 5,
            at: t0,
        });
        let gap = Duration::from_secs(1);
        // Nothing accepted yet (first heartbeat, or the last one failed): always.
        assert!(streams_due(None, None, 5, t0, gap));
        // Unchanged and recent: the heartbeats in between leave it out.
        assert!(!streams_due(last, None, 5, at(200), gap));
        assert!(!streams_due(last, None, 5, at(9_999), gap));
        // A stream started or ended: on the next heartbeat a full interval after the last
        // list, not on every audit-woken one before that.
        assert!(!streams_due(last, None, 6, at(200), gap));
        assert!(streams_due(last, None, 6, at(1_000), gap));
        // Byte counts refresh.
        assert!(streams_due(last, None, 5, at(10_000), gap));
    }

    /// A list the controller refused (too many streams for one heartbeat) is left out for a
    /// while, so that the heartbeats carrying audit events go through; then it is tried again.
    #[test]
    fn a_refused_stream_list_is_left_out_for_a_while() {
        let t0 = tokio::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let gap = Duration::from_secs(1);
        let refused = Some(t0);
        assert!(!streams_due(None, refused, 5, at(200), gap));
        assert!(!streams_due(None, refused, 6, at(9_999), gap));
        assert!(streams_due(None, refused, 6, at(10_000), gap));
    }

    #[test]
    fn a_recheck_comes_when_the_snapshot_goes_stale() {
        let a = Authority::new(
            Snapshot {
                version: 2,
                ..Snapshot::default()
            },
            1_000,
        )
        .unwrap();
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let every = Duration::from_secs(10);
        let max = Duration::from_secs(2);
        // Stale at 1,003: the re-check comes then, not 10 s later.
        assert_eq!(
            next_recheck(&a, at(1_000), every, max),
            Duration::from_secs(3)
        );
        assert_eq!(
            next_recheck(&a, at(1_002), every, max),
            Duration::from_secs(1)
        );
        // Already stale: again within the limit (a confirmation meanwhile goes stale no
        // sooner than that). Far from stale: the usual interval.
        assert_eq!(
            next_recheck(&a, at(1_003), every, max),
            Duration::from_secs(3)
        );
        assert_eq!(
            next_recheck(&a, at(1_000), every, Duration::from_secs(3600)),
            every
        );
    }

    #[test]
    fn confirmations_are_written_a_quarter_of_the_limit_apart() {
        let day = Duration::from_secs(24 * 3600);
        assert!(!persist_due(1_000, 1_299, day));
        assert!(persist_due(1_000, 1_300, day));
        let ten_minutes = Duration::from_secs(600);
        assert!(!persist_due(1_000, 1_149, ten_minutes));
        assert!(persist_due(1_000, 1_150, ten_minutes));
        // A tiny limit: every second at most.
        assert!(!persist_due(1_000, 1_000, Duration::from_secs(2)));
        assert!(persist_due(1_000, 1_001, Duration::from_secs(2)));
        // A clock that went back writes nothing.
        assert!(!persist_due(1_000, 900, day));
    }

    #[test]
    fn polls_confirm_within_the_staleness_limit() {
        let w = |s| poll_wait_secs(Duration::from_secs(s));
        assert_eq!(w(1), 1);
        assert_eq!(w(2), 1);
        assert_eq!(w(10), 5);
        assert_eq!(w(50), 25);
        assert_eq!(w(24 * 3600), MAX_POLL_WAIT_SECS);
    }
}
