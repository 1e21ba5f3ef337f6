//! Audit events raised by the broker: every stream decision, refused link and failed dial.
//!
//! Each event is logged at once as a structured line (target `audit`), numbered, appended to
//! the spool (`audit.spool` in the broker's directory) and queued for the next heartbeat,
//! which stores it in the controller's audit table. A new event wakes the heartbeat early (see
//! [`AuditQueue::pending`]), so events reach the store within a fraction of a second.
//!
//! The spool makes them survive a crash: the append is one `write` (no fsync), so a broker
//! killed at any point loses nothing (a power cut may lose what the page cache held). At
//! start the spool is read back and whatever the controller has not acknowledged is queued
//! again. Numbers (`epoch`, `seq`) travel with each heartbeat, and the controller stores each
//! number once, so a resend after a crash or a lost answer does not duplicate events. A torn
//! last line (the crash hit mid-write) is skipped. The spool is rewritten with only the
//! unacknowledged events (and the number the next one gets) once it passes [`COMPACT_AT`], and never grows much past
//! [`SPOOL_MAX`] even when nothing is acknowledged (the oldest events are dropped then).
//!
//! The queue is bounded: if the controller is away for long, the oldest events are dropped
//! from it (they are still in the log) and counted. So that a flood of refusals cannot push
//! real events out, denials and errors have a budget per actor (the identity that asked) and
//! in all ([`DENIALS`]): beyond it they are counted and logged (each audit line says
//! `stored`, false for these) but not stored, and the actor's next stored one says how many were skipped (`skipped` in
//! its detail). Allowed streams have no budget (every access is recorded), so a device that
//! opens streams as fast as it can would fill a backlog on its own: while the queue is half
//! full (the controller away or slow), an actor that already holds [`ACTOR_SHARE`] of it has
//! its new events logged and counted the same way, not queued, and the others' events keep
//! their room. Refusals of peers that proved no identity beyond their budget are counted
//! only (a debug line): anyone can make them as fast as handshakes fail.
//!
//! A record's target may be what a peer asked for (a service name): it is escaped and bounded
//! as the controller's own are ([`umbra_proto::audit_target`]), since the controller refuses
//! a record with a longer one and the rest of the record (who, the decision) would be lost
//! with it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use umbra_link::budget::{Budget, BudgetConfig, Verdict};
use umbra_proto::api::{AuditRecord, AuditSeq};

const CAP: usize = 10_000;
/// Most queued events one actor may hold while the queue is at least half full (see the
/// module docs).
const ACTOR_SHARE: usize = CAP / 10;

/// Which budget a denial or an error is recorded within.
#[derive(Debug, Clone, Copy)]
enum Budgeted<'a> {
    /// The actor's budget of denials; over it, the record is still a log line.
    Identity,
    /// The actor's budget of denials; over it, counted with a debug line only.
    Flood,
    /// The source's budget among refusals of peers that proved no identity; over it,
    /// counted with a debug line only.
    Unauthenticated(&'a str),
}

/// The budget of `deny` and `error` records (see the module docs): per actor a burst of 20,
/// then one per 2 s; in all a burst of 1000, then 50 per second, well above what policy
/// denials of real users add up to.
const DENIALS: BudgetConfig = BudgetConfig {
    key_burst: 20.0,
    key_every: Duration::from_secs(2),
    global_burst: 1000.0,
    global_per_sec: 50.0,
    max_keys: 4096,
};

/// The budget of refusals of peers that proved no identity (a handshake refused for its
/// certificate), apart from identities' denials: per source address a burst of 5, then one
/// per 10 s; in all a burst of 100, then 2 per second. However many addresses a flood comes
/// from, it cannot spend the budget real users' denials are recorded within.
const UNAUTHENTICATED: BudgetConfig = BudgetConfig {
    key_burst: 5.0,
    key_every: Duration::from_secs(10),
    global_burst: 100.0,
    global_per_sec: 2.0,
    max_keys: 1024,
};

/// Spool size past which an acknowledgement rewrites it with only what is still unsent (or
/// twice the size of the last rewrite, whichever is larger).
pub(crate) const COMPACT_AT: u64 = 1 << 20;
/// Spool size past which a new event rewrites it with the queue as it is, acknowledged or not
/// (a controller away for long): the spool never holds much more than the bounded queue.
pub(crate) const SPOOL_MAX: u64 = 16 << 20;

/// One line of the spool. Written with a borrowed record (`Line<&AuditRecord>`: no copy of
/// the event), read back owned.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line<R = AuditRecord> {
    /// First line: the spool's epoch.
    Epoch { epoch: u64 },
    /// An event and its number.
    Event { seq: u64, rec: R },
    /// The controller stored every event up to this number.
    Acked { acked: u64 },
    /// Written by every rewrite, right after the epoch: the number the next event gets. A
    /// rewrite may keep no event and no acknowledgement, and without this line the numbering
    /// would start again at 1 under the same epoch, below what the controller has stored
    /// (which then takes the new events for resends and drops them).
    Next { next: u64 },
}

/// Events taken for one heartbeat.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) seq: AuditSeq,
    pub(crate) records: Vec<AuditRecord>,
}

pub(crate) struct AuditQueue {
    epoch: u64,
    inner: Mutex<Inner>,
    queued: tokio::sync::Notify,
}

struct Inner {
    /// Unsent events, oldest first, numbered without gaps.
    q: VecDeque<(u64, AuditRecord)>,
    /// How many events of `q` each actor holds (actors with none are absent).
    held: Shares,
    next_seq: u64,
    spool: Option<Spool>,
    denials: Budget<String>,
    /// Refusals of peers that proved no identity, by source address.
    unauthenticated: Budget<String>,
    /// The number this run started numbering at, until a heartbeat's answer confirmed (or
    /// moved) it: see [`AuditQueue::confirm`]. `None` once confirmed.
    unconfirmed_from: Option<u64>,
}

struct Spool {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// Size right after the last rewrite: compaction waits until the spool has doubled, so a
    /// large backlog is not rewritten at every acknowledgement.
    base: u64,
    /// Write errors are logged once, then only counted.
    failing: bool,
    /// Lines were appended since the last [`AuditQueue::durable`].
    unsynced: bool,
}

impl Default for AuditQueue {
    /// In memory only (tests).
    fn default() -> Self {
        AuditQueue::with(new_epoch(), VecDeque::new(), 1, None)
    }
}

impl AuditQueue {
    fn with(
        epoch: u64,
        q: VecDeque<(u64, AuditRecord)>,
        next_seq: u64,
        spool: Option<Spool>,
    ) -> Self {
        AuditQueue {
            epoch,
            inner: Mutex::new(Inner {
                held: Shares::of_queue(&q),
                q,
                next_seq,
                spool,
                denials: Budget::new(DENIALS, Instant::now()),
                unauthenticated: Budget::new(UNAUTHENTICATED, Instant::now()),
                unconfirmed_from: Some(next_seq),
            }),
            queued: tokio::sync::Notify::new(),
        }
    }

    /// Opens the spool at `path`, queueing what an earlier run recorded and the controller
    /// did not acknowledge; a missing spool starts a new epoch.
    ///
    /// A spool that cannot be rewritten (a full disk) does not keep the broker from starting:
    /// enforcing access matters more than a durable trail, and every event is in the log as
    /// well. The spool it read is kept and appended to, under its own numbering; when that
    /// fails too, events are kept in memory only (under the spool's epoch if it had one, else
    /// a new one). Either way it is said in the log, and the first heartbeat's answer says
    /// where to number on ([`AuditQueue::confirm`]).
    pub(crate) fn open(path: &Path) -> io::Result<AuditQueue> {
        Self::open_with(path, rewrite)
    }

    /// [`AuditQueue::open`], with the function that rewrites the spool (tests make it fail).
    fn open_with(
        path: &Path,
        rewrite: impl FnOnce(&Path, u64, &VecDeque<(u64, AuditRecord)>, u64) -> io::Result<Spool>,
    ) -> io::Result<AuditQueue> {
        let (read, (known, pending, next_seq)) = match std::fs::read(path) {
            Ok(bytes) => {
                let r = read_spool(&bytes);
                (Some(bytes), r)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, (None, VecDeque::new(), 1)),
            Err(e) => return Err(e),
        };
        let epoch = known.unwrap_or_else(new_epoch);
        if !pending.is_empty() {
            tracing::info!(
                events = pending.len(),
                "audit events from before the restart queued again"
            );
        }
        let spool = match rewrite(path, epoch, &pending, next_seq) {
            Ok(s) => Some(s),
            Err(e) => {
                let kept = match (known, &read) {
                    (Some(_), Some(bytes)) => append_to(path, bytes).ok(),
                    _ => None,
                };
                if kept.is_some() {
                    tracing::warn!(error = %e, path = %path.display(), "cannot rewrite the audit spool; appending to it as it is");
                } else {
                    tracing::warn!(error = %e, path = %path.display(), "cannot write the audit spool; audit events are kept in memory only until a restart (they are in the log too)");
                }
                kept
            }
        };
        let q = AuditQueue::with(epoch, pending, next_seq, spool);
        q.queued.notify_one();
        Ok(q)
    }

    /// Logs, numbers, spools and queues one event. A denial or an error counts against its
    /// actor's budget.
    pub(crate) fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: serde_json::Value,
    ) {
        self.record_within(Budgeted::Identity, actor, action, target, result, detail);
    }

    /// [`AuditQueue::record`] of a refusal that the actor can repeat as fast as it can send
    /// (a device over its rate of stream opens): within the actor's budget of denials, and
    /// beyond it counted with a debug line only, so that the flood the refusal stops is not
    /// a flood of log lines either. The next stored refusal says how many were skipped.
    pub(crate) fn record_flood(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) {
        self.record_within(Budgeted::Flood, actor, action, target, "deny", detail);
    }

    /// [`AuditQueue::record`] of a refusal of a peer that proved no identity (a handshake
    /// refused for its certificate), recorded as the broker's own (`actor`): it counts against
    /// `source`'s budget among such refusals ([`UNAUTHENTICATED`]), never against the budget
    /// identities' denials are recorded within.
    pub(crate) fn record_unauthenticated(
        &self,
        source: &str,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) {
        self.record_within(
            Budgeted::Unauthenticated(source),
            actor,
            action,
            target,
            "deny",
            detail,
        );
    }

    /// Records one event; a denial or an error counts against its actor's budget, or for an
    /// unauthenticated peer, against that source's budget among unauthenticated refusals.
    fn record_within(
        &self,
        budget: Budgeted<'_>,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        mut detail: serde_json::Value,
    ) {
        // The target may be what a peer asked for (a service name): escaped and bounded, so
        // that it cannot forge lines where records are shown, and so that the controller
        // stores the record.
        let target = &*umbra_proto::audit_target(target);
        // Whether the record goes to the store too (the log line is written either way).
        let mut stored = true;
        // Under one lock: whether the actor holds its share of a backlog (the event is then
        // counted, not queued), else the denial budget, and the count of its events not
        // queued for its share since its last queued one, which this one reports if stored.
        let (verdict, over_share) = {
            let mut inner = self.lock();
            let Inner {
                q,
                held,
                denials,
                unauthenticated: anonymous,
                ..
            } = &mut *inner;
            if q.len() >= CAP / 2 && held.of(actor) >= ACTOR_SHARE {
                held.skip(actor);
                stored = false;
                metrics::counter!("umbra_broker_audit_dropped_total").increment(1);
                (None, 0)
            } else {
                let verdict = (result == "deny" || result == "error").then(|| match budget {
                    Budgeted::Unauthenticated(source) => {
                        anonymous.on_event(Some(source.to_owned()), Instant::now())
                    }
                    Budgeted::Identity | Budgeted::Flood => {
                        denials.on_event(Some(actor.to_owned()), Instant::now())
                    }
                });
                // A denial over its budget is not stored either: the count waits.
                let over_share = match verdict {
                    Some(Verdict::Skip) => 0,
                    _ => held.take_skipped(actor),
                };
                (verdict, over_share)
            }
        };
        match verdict {
            Some(Verdict::Skip) => {
                metrics::counter!("umbra_broker_audit_skipped_total", "action" => action.to_owned())
                        .increment(1);
                if !matches!(budget, Budgeted::Identity) {
                    // Anyone can make these, as fast as handshakes fail, or the actor as
                    // fast as it can ask: a flood of them must not flood the log either.
                    // Counted.
                    tracing::debug!(
                        actor,
                        action,
                        object = target,
                        result,
                        "over the audit budget: counted, not recorded"
                    );
                    return;
                }
                // An identity's decision is still an audit line in the log (its rate is
                // bounded by its links and streams); only the store is spared, and the
                // actor's next stored record counts what was not.
                stored = false;
            }
            Some(Verdict::Record { skipped }) if skipped > 0 => {
                if let Some(d) = detail.as_object_mut() {
                    d.insert("skipped".into(), skipped.into());
                }
            }
            _ => {}
        }
        if over_share > 0
            && let Some(d) = detail.as_object_mut()
        {
            let before = d
                .get("skipped")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            d.insert("skipped".into(), (before + over_share).into());
        }
        tracing::info!(
            target: "audit",
            actor,
            action,
            object = target,
            result,
            detail = %detail,
            stored,
            "audit"
        );
        if !stored {
            return;
        }
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
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if let Some(spool) = &mut inner.spool {
            spool.append(&Line::Event { seq, rec: &rec });
        }
        let Inner {
            q,
            held,
            spool,
            next_seq,
            ..
        } = &mut *inner;
        if q.len() >= CAP
            && let Some((_, old)) = q.pop_front()
        {
            held.remove(&old.actor);
            metrics::counter!("umbra_broker_audit_dropped_total").increment(1);
        }
        held.add(&rec.actor);
        q.push_back((seq, rec));
        if let Some(s) = spool
            && s.bytes >= SPOOL_MAX
        {
            // Keep the newest events that fit in half the bound; the older ones are dropped
            // from the queue too (still in the log), as when the queue is full.
            let dropped = trim_to(q, held, SPOOL_MAX / 2);
            if dropped > 0 {
                metrics::counter!("umbra_broker_audit_dropped_total").increment(dropped as u64);
            }
            match rewrite(&s.path, self.epoch, q, *next_seq) {
                Ok(new) => *s = new,
                Err(e) => tracing::warn!(error = %e, "cannot compact the audit spool"),
            }
        }
        drop(inner);
        self.queued.notify_one();
    }

    /// Resolves once an event has been queued since the last call.
    pub(crate) async fn pending(&self) {
        self.queued.notified().await;
    }

    /// Takes up to `max` queued events for a heartbeat (possibly none: the numbering still
    /// goes along). The heartbeat takes none before the numbering is confirmed
    /// ([`AuditQueue::confirmed`]).
    pub(crate) fn take(&self, max: usize) -> Batch {
        let mut inner = self.lock();
        let first = inner.q.front().map_or(inner.next_seq, |(s, _)| *s);
        // A batch is numbered from its first event on: it ends before any gap (a spool a
        // full disk left with holes), and the rest goes in the next one.
        let n = inner
            .q
            .iter()
            .take(max)
            .enumerate()
            .take_while(|(i, (s, _))| *s == first.saturating_add(*i as u64))
            .count();
        let Inner { q, held, .. } = &mut *inner;
        let records: Vec<AuditRecord> = q.drain(..n).map(|(_, r)| r).collect();
        for r in &records {
            held.remove(&r.actor);
        }
        Batch {
            seq: AuditSeq {
                epoch: self.epoch,
                first,
            },
            records,
        }
    }

    /// Makes the spool's lines so far durable (fsync), if any were appended since the last
    /// time; called before a heartbeat sends events. Once the controller has stored an event
    /// it never takes that number again, and a power cut that lost the spool's tail would
    /// restart the numbering below it: the controller would drop every new event as a
    /// resend. Off the stream path: the file is synced through a handle of its own, without
    /// the queue's lock.
    ///
    /// `false` if the sync failed: the events must wait (they are not on disk), and the
    /// next call tries again.
    pub(crate) async fn durable(&self) -> bool {
        let file = {
            let mut inner = self.lock();
            match &mut inner.spool {
                Some(s) if s.unsynced => match s.file.try_clone() {
                    Ok(f) => {
                        s.unsynced = false;
                        f
                    }
                    Err(_) => return false,
                },
                _ => return true,
            }
        };
        let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
        if matches!(synced, Ok(Ok(()))) {
            return true;
        }
        metrics::counter!("umbra_broker_audit_spool_errors_total").increment(1);
        if let Some(s) = &mut self.lock().spool {
            s.unsynced = true;
        }
        false
    }

    /// The controller answered a heartbeat: where it has this broker's numbering (`stored`:
    /// epoch and the last number stored; `None` from a controller that does not say). The
    /// first answer of a run confirms the numbering this run started with, or moves it.
    ///
    /// A spool can be behind what the controller stored: lines a full disk refused were
    /// still sent (in memory, numbered right), and a restart numbers on from the spool. Its
    /// new events would get numbers the controller has stored and be dropped as resends. So
    /// no event goes out before this, and when the controller holds the same epoch at or
    /// past where this run started, this run's events are numbered again after it (and
    /// spooled again under the new numbers). Events replayed from the spool are then all at
    /// or below what it stored (they were sent before this run), and are dropped here.
    pub(crate) fn confirm(&self, stored: Option<(u64, u64)>) {
        self.confirm_numbering(stored);
        if !self.lock().q.is_empty() {
            self.queued.notify_one();
        }
    }

    /// Whether a heartbeat's answer confirmed this run's numbering: events may go out.
    pub(crate) fn confirmed(&self) -> bool {
        self.lock().unconfirmed_from.is_none()
    }

    fn confirm_numbering(&self, stored: Option<(u64, u64)>) {
        let mut inner = self.lock();
        let Some(start) = inner.unconfirmed_from.take() else {
            return;
        };
        let Some((epoch, last)) = stored else { return };
        if epoch != self.epoch || last < start {
            return;
        }
        let shift = last + 1 - start;
        tracing::warn!(
            from = start,
            to = last + 1,
            "the audit spool was behind what the controller stored (a disk that was full?); numbering this run's events after it"
        );
        let Inner {
            q,
            held,
            spool,
            next_seq,
            ..
        } = &mut *inner;
        // Replayed from the spool, numbered below this run's start, so at or below what the
        // controller stored: it has them. What is left is this run's, numbered without gaps.
        q.retain(|(seq, rec)| {
            if *seq < start {
                held.remove(&rec.actor);
            }
            *seq >= start
        });
        for (seq, rec) in q.iter_mut() {
            *seq = seq.saturating_add(shift);
            if let Some(s) = spool.as_mut() {
                s.append(&Line::Event {
                    seq: *seq,
                    rec: &*rec,
                });
            }
        }
        *next_seq = next_seq.saturating_add(shift);
        if let Some(s) = spool.as_mut() {
            // Everything up to the controller's mark is stored there: the old lines of this
            // run's events, under their first numbers, are not to be sent again.
            s.append(&Line::<&AuditRecord>::Acked { acked: last });
            s.append(&Line::<&AuditRecord>::Next { next: *next_seq });
        }
    }

    /// Puts a batch back at the front after a failed heartbeat.
    pub(crate) fn requeue(&self, batch: Batch) {
        let mut inner = self.lock();
        let Inner { q, held, .. } = &mut *inner;
        for (i, rec) in batch.records.into_iter().enumerate().rev() {
            if q.len() >= CAP {
                break;
            }
            held.add(&rec.actor);
            q.push_front((batch.seq.first + i as u64, rec));
        }
    }

    /// The controller stored the batch: remember that in the spool, and rewrite the spool
    /// with only the unsent events once it has grown past [`COMPACT_AT`].
    pub(crate) fn acked(&self, batch: &Batch) {
        if batch.records.is_empty() {
            return;
        }
        let last = batch.seq.first + batch.records.len() as u64 - 1;
        let mut inner = self.lock();
        let Inner {
            q, spool, next_seq, ..
        } = &mut *inner;
        let Some(s) = spool else { return };
        s.append(&Line::<&AuditRecord>::Acked { acked: last });
        if s.bytes >= COMPACT_AT.max(2 * s.base) {
            match rewrite(&s.path, self.epoch, q, *next_seq) {
                Ok(new) => *s = new,
                Err(e) => tracing::warn!(error = %e, "cannot compact the audit spool"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Spool {
    fn append(&mut self, line: &Line<&AuditRecord>) {
        let mut buf = match serde_json::to_vec(line) {
            Ok(b) => b,
            Err(_) => return,
        };
        buf.push(b'\n');
        // A line a failed write left torn (a full disk) is cut off first: the next line
        // would be glued to it, and both lost at the next start.
        if self.failing && self.file.set_len(self.bytes).is_err() {
            metrics::counter!("umbra_broker_audit_spool_errors_total").increment(1);
            return;
        }
        // One write call per line, so that a crash leaves at most the last line torn.
        match self.file.write_all(&buf) {
            Ok(()) => {
                self.bytes += buf.len() as u64;
                self.failing = false;
                self.unsynced = true;
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, path = %self.path.display(), "cannot write the audit spool; events are kept in memory only");
                }
                self.failing = true;
                metrics::counter!("umbra_broker_audit_spool_errors_total").increment(1);
            }
        }
    }
}

/// Drops the oldest events until the spool lines of the rest take at most `budget` bytes;
/// returns how many were dropped.
fn trim_to(q: &mut VecDeque<(u64, AuditRecord)>, held: &mut Shares, budget: u64) -> usize {
    let mut total = 0u64;
    let mut keep = 0usize;
    for (seq, rec) in q.iter().rev() {
        let line =
            serde_json::to_vec(&Line::Event { seq: *seq, rec }).map_or(0, |l| l.len() as u64 + 1);
        if total + line > budget {
            break;
        }
        total += line;
        keep += 1;
    }
    let dropped = q.len() - keep;
    for (_, rec) in q.drain(..dropped) {
        held.remove(&rec.actor);
    }
    dropped
}

/// How many queued events each actor holds, and how many of an actor's events were not
/// queued for its share since its last queued one (the `skipped` its next one reports).
#[derive(Debug, Default)]
struct Shares {
    held: std::collections::HashMap<String, usize>,
    skipped: std::collections::HashMap<String, u64>,
}

impl Shares {
    fn of_queue(q: &VecDeque<(u64, AuditRecord)>) -> Shares {
        let mut s = Shares::default();
        for (_, r) in q {
            s.add(&r.actor);
        }
        s
    }

    fn of(&self, actor: &str) -> usize {
        self.held.get(actor).copied().unwrap_or(0)
    }

    fn add(&mut self, actor: &str) {
        match self.held.get_mut(actor) {
            Some(n) => *n += 1,
            None => {
                self.held.insert(actor.to_owned(), 1);
            }
        }
    }

    fn remove(&mut self, actor: &str) {
        if let Some(n) = self.held.get_mut(actor) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(actor);
            }
        }
    }

    /// One of `actor`'s events was not queued (it holds its share). Only actors that held a
    /// full share have a count, each until its next queued event.
    fn skip(&mut self, actor: &str) {
        *self.skipped.entry(actor.to_owned()).or_default() += 1;
    }

    /// The count of `actor`'s events not queued since its last queued one; resets it.
    fn take_skipped(&mut self, actor: &str) -> u64 {
        self.skipped.remove(actor).unwrap_or(0)
    }
}

/// Epoch, unacknowledged events in order, and the next number, from a spool's bytes. The
/// epoch is `None` when the spool does not say where its numbering is: no `next` line, no
/// event and no acknowledgement (a spool an older version rewrote with nothing unsent). Its
/// numbering would start over at 1 under an epoch whose numbers the controller has seen, and
/// the controller would drop those events as resends; a new epoch numbers them afresh.
fn read_spool(bytes: &[u8]) -> (Option<u64>, VecDeque<(u64, AuditRecord)>, u64) {
    let mut epoch = None;
    let mut events = Vec::new();
    let mut acked = 0;
    let mut next = 1;
    let mut numbered = false;
    let mut skipped = 0usize;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Epoch { epoch: e }) => epoch = epoch.or(Some(e)),
            Ok(Line::Event { seq, rec }) => {
                events.push((seq, rec));
                numbered = true;
            }
            Ok(Line::Acked { acked: a }) => {
                acked = acked.max(a);
                numbered = true;
            }
            Ok(Line::Next { next: n }) => {
                next = next.max(n);
                numbered = true;
            }
            Err(_) => skipped += 1,
        }
    }
    if !numbered {
        epoch = None;
    }
    if skipped > 0 {
        tracing::warn!(
            lines = skipped,
            "unreadable audit spool lines skipped (a torn write at a crash)"
        );
    }
    // Saturating: the spool is a file, and a damaged one must not overflow the numbering.
    let next = events
        .iter()
        .map(|(s, _)| s.saturating_add(1))
        .max()
        .unwrap_or(1)
        .max(acked.saturating_add(1))
        .max(next);
    events.sort_by_key(|(s, _)| *s);
    events.dedup_by_key(|(s, _)| *s);
    let mut pending: VecDeque<_> = events.into_iter().filter(|(s, _)| *s > acked).collect();
    while pending.len() > CAP {
        pending.pop_front();
    }
    (epoch, pending, next)
}

/// Writes a fresh spool (epoch line, the next number, then `pending`) atomically, 0600, and
/// opens it for appending.
fn rewrite(
    path: &Path,
    epoch: u64,
    pending: &VecDeque<(u64, AuditRecord)>,
    next_seq: u64,
) -> io::Result<Spool> {
    let mut text = String::new();
    let mut push = |l: &Line<&AuditRecord>| {
        if let Ok(s) = serde_json::to_string(l) {
            text.push_str(&s);
            text.push('\n');
        }
    };
    push(&Line::Epoch { epoch });
    push(&Line::Next { next: next_seq });
    for (seq, rec) in pending {
        push(&Line::Event { seq: *seq, rec });
    }
    umbra_pki::write_private_file(path, text.as_bytes())
        .map_err(|e| io::Error::other(e.to_string()))?;
    let file = OpenOptions::new().append(true).open(path)?;
    Ok(Spool {
        path: path.to_owned(),
        file,
        bytes: text.len() as u64,
        base: text.len() as u64,
        failing: false,
        unsynced: false,
    })
}

/// Opens the spool at `path`, whose contents were `read`, to append to it as it is: cut back
/// to its last whole line first (a torn one would swallow the next), which needs no room on
/// disk. It must not have changed since it was read (the broker's instance lock).
fn append_to(path: &Path, read: &[u8]) -> io::Result<Spool> {
    let end = read
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i as u64 + 1);
    if end == 0 {
        return Err(io::Error::other("no whole line to go on from"));
    }
    let file = OpenOptions::new().append(true).open(path)?;
    file.set_len(end)?;
    Ok(Spool {
        path: path.to_owned(),
        file,
        bytes: end,
        base: end,
        failing: false,
        unsynced: false,
    })
}

/// A random epoch below 2^63 (the controller stores it as a signed 64-bit number), never 0.
fn new_epoch() -> u64 {
    (u64::from_le_bytes(umbra_pki::random_bytes::<8>()) >> 1) | 1
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
        assert_eq!(a.take(10).records.len(), 1);
    }

    /// A damaged spool whose numbers reach the top of the range is read without an overflow
    /// (a panic in a debug build, a wrap to 0 in release); a plain one as it says.
    #[test]
    fn spool_numbers_at_the_top_of_the_range() {
        let rec = r#"{"at_ms":1,"actor":"x","action":"stream.open","target":"t","result":"allow","detail":null}"#;
        let damaged = format!(
            "{{\"epoch\":7}}\n{{\"seq\":{max},\"rec\":{rec}}}\n{{\"acked\":{max}}}\n",
            max = u64::MAX
        );
        let (epoch, pending, next) = read_spool(damaged.as_bytes());
        assert_eq!((epoch, pending.len(), next), (Some(7), 0, u64::MAX));
        let plain = format!("{{\"epoch\":7}}\n{{\"seq\":4,\"rec\":{rec}}}\n{{\"acked\":3}}\n");
        let (epoch, pending, next) = read_spool(plain.as_bytes());
        assert_eq!((epoch, pending.len(), next), (Some(7), 1, 5));
    }

    #[test]
    fn bounded_and_ordered() {
        let a = AuditQueue::default();
        // Many actors, none holding its share of the queue.
        for i in 0..CAP + 5 {
            a.record(
                &format!("x{}", i % 20),
                "stream.open",
                &i.to_string(),
                "allow",
                serde_json::Value::Null,
            );
        }
        let first = a.take(3);
        assert_eq!(first.records[0].target, "5", "oldest dropped first");
        assert_eq!(first.seq.first, 6, "numbers stay with their events");
        a.requeue(first);
        let again = a.take(1);
        assert_eq!(again.records[0].target, "5", "requeued at the front");
        assert_eq!(again.seq.first, 6);
    }

    fn rec(a: &AuditQueue, target: &str) {
        a.record(
            "x",
            "stream.open",
            target,
            "allow",
            serde_json::json!({"r": 1}),
        );
    }

    /// What a peer asked for is recorded with its control characters escaped (the controller
    /// refuses records holding any); plain text as it is.
    #[test]
    fn a_peers_words_are_recorded_escaped() {
        let a = AuditQueue::default();
        rec(&a, "web\nWARN forged\u{1b}[2K");
        rec(&a, "web");
        let got = a.take(10);
        assert_eq!(got.records[0].target, "web\\nWARN forged\\u{1b}[2K");
        assert!(!umbra_proto::has_controls(&got.records[0].target));
        assert_eq!(got.records[1].target, "web");
    }

    /// A name of control characters, escaped, is several times its length: it is cut to what
    /// the controller accepts, visibly, and the record (who, the decision) is kept. A name
    /// within the bound is recorded whole.
    #[test]
    fn a_long_escaped_target_is_cut_and_the_record_kept() {
        let a = AuditQueue::default();
        let device = "umbra://default/agent/d-1";
        let hostile = "\u{1}".repeat(255);
        a.record(
            device,
            "stream.open",
            &hostile,
            "deny",
            serde_json::json!({"reason": "unknown_service"}),
        );
        let fits = "s".repeat(umbra_proto::AUDIT_TARGET_MAX);
        rec(&a, &fits);
        rec(&a, "demo");
        // Multi-byte characters: escaped, then cut on a boundary.
        let wide = "é".repeat(umbra_proto::AUDIT_TARGET_MAX);
        rec(&a, &wide);
        let got = a.take(10).records;
        assert_eq!(got.len(), 4, "every record kept");

        let cut = &got[0];
        assert!(
            cut.target.len() <= umbra_proto::AUDIT_TARGET_MAX,
            "{} bytes",
            cut.target.len()
        );
        assert!(cut.target.starts_with("\\u{1}\\u{1}"));
        assert!(cut.target.ends_with('…'));
        assert!(!umbra_proto::has_controls(&cut.target));
        assert_eq!((cut.actor.as_str(), cut.result.as_str()), (device, "deny"));
        assert_eq!(cut.detail["reason"], "unknown_service");

        assert_eq!(got[1].target, fits, "at the bound: whole");
        assert_eq!(got[2].target, "demo");
        assert!(got[3].target.len() <= umbra_proto::AUDIT_TARGET_MAX);
        assert!(got[3].target.ends_with('…'));
        // Escaped, as every character outside printable ASCII (no name Umbra stores has one).
        assert!(
            got[3].target.starts_with("\\u{e9}\\u{e9}"),
            "{}",
            got[3].target
        );
    }

    /// While a backlog builds (nothing taken: the controller away), one device opening
    /// streams as fast as it can fills half the queue and then holds its share: another
    /// actor's event still finds room, and the device's next queued event says how many of
    /// its own were not queued. The twin: with the queue taken as heartbeats take it, every
    /// event of the same flood is queued.
    #[test]
    fn one_actor_cannot_fill_a_backlog_alone() {
        let q = AuditQueue::default();
        let flood = |q: &AuditQueue, n: usize| {
            for _ in 0..n {
                q.record(
                    "umbra://o/agent/d-flood",
                    "stream.open",
                    "web",
                    "allow",
                    serde_json::json!({}),
                );
            }
        };
        flood(&q, 4 * CAP);
        q.record(
            "umbra://o/agent/d-other",
            "stream.open",
            "web",
            "deny",
            serde_json::json!({}),
        );
        let all = q.take(CAP).records;
        let of = |who: &str| all.iter().filter(|r| r.actor.ends_with(who)).count();
        assert_eq!(of("d-other"), 1);
        assert_eq!(of("d-flood"), CAP / 2);
        // Sent: the device's next event is queued, and counts what was not.
        flood(&q, 1);
        let next = q.take(CAP).records;
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].detail["skipped"], 4 * CAP - CAP / 2);
        // Taken as heartbeats take it, the same flood is all queued.
        let q = AuditQueue::default();
        let mut taken = 0;
        for _ in 0..20 {
            flood(&q, 2_000);
            taken += q.take(2_500).records.len();
        }
        assert_eq!(taken, 40_000);
    }

    /// The count of a device's events not queued for its share goes to its next stored
    /// record, also when the event right after is a denial over its budget (not stored).
    #[test]
    fn the_share_count_waits_for_a_stored_record() {
        let q = AuditQueue::default();
        let rec = |result: &str| {
            q.record(
                "umbra://o/agent/d-x",
                "stream.open",
                "web",
                result,
                serde_json::json!({}),
            );
        };
        // Its denial budget spent first (those denials are stored), then a flood of allowed
        // streams while nothing is taken: half the queue is its, the rest counted.
        for _ in 0..DENIALS.key_burst as usize {
            rec("deny");
        }
        for _ in 0..CAP {
            rec("allow");
        }
        assert_eq!(q.take(2 * CAP).records.len(), CAP / 2);
        // A denial over its budget: not stored, and the count is not spent on it.
        rec("deny");
        assert!(q.take(CAP).records.is_empty());
        rec("allow");
        let next = q.take(CAP).records;
        assert_eq!(next.len(), 1);
        assert_eq!(
            next[0].detail["skipped"],
            (CAP + DENIALS.key_burst as usize) - CAP / 2
        );
    }

    /// A flood of denials of one identity keeps its burst, and pushes out neither another
    /// identity's denials nor any allowed stream's record.
    #[test]
    fn denials_have_a_budget_per_actor() {
        let a = AuditQueue::default();
        let (d1, d2) = ("umbra://o/agent/d-1", "umbra://o/agent/d-2");
        for _ in 0..100 {
            a.record(d1, "stream.open", "web", "deny", serde_json::json!({}));
        }
        a.record(d2, "link.open", "b1", "deny", serde_json::json!({}));
        for _ in 0..30 {
            a.record(d1, "stream.open", "web", "allow", serde_json::json!({}));
        }
        let b = a.take(1000);
        let count = |actor: &str, result: &str| {
            b.records
                .iter()
                .filter(|r| r.actor == actor && r.result == result)
                .count()
        };
        assert_eq!(count(d1, "deny"), 20);
        assert_eq!(count(d2, "deny"), 1);
        assert_eq!(count(d1, "allow"), 30);
    }

    /// What the budget keeps out of the store is still an audit line in the log, saying it
    /// was not stored: every decision about an identity is logged. Unauthenticated refusals
    /// beyond their budget are not (anyone can make them).
    #[test]
    fn decisions_beyond_the_budget_are_still_logged() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer({
                let buf = buf.clone();
                move || buf.clone()
            })
            .finish();
        let a = AuditQueue::default();
        tracing::subscriber::with_default(sub, || {
            for _ in 0..30 {
                a.record(
                    "umbra://o/agent/d-1",
                    "stream.open",
                    "web",
                    "deny",
                    serde_json::json!({"n": 1}),
                );
            }
            // A device over its rate of opens: refusals it repeats as fast as it can ask.
            for _ in 0..30 {
                a.record_flood(
                    "umbra://o/agent/d-2",
                    "stream.open",
                    "web",
                    serde_json::json!({"reason": "open_rate"}),
                );
            }
            for i in 0..150 {
                a.record_unauthenticated(
                    &format!("10.0.0.{i}:1"),
                    "umbra://o/broker/b-1",
                    "link.open",
                    "handshake",
                    serde_json::json!({}),
                );
            }
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let of = |actor: &str| -> Vec<&serde_json::Value> {
            lines
                .iter()
                .filter(|l| l["target"] == "audit" && l["fields"]["actor"] == actor)
                .collect()
        };
        let user = of("umbra://o/agent/d-1");
        assert_eq!(user.len(), 30, "{text}");
        let unstored = user
            .iter()
            .filter(|l| l["fields"]["stored"] == false)
            .count();
        assert_eq!(unstored, 10);
        assert_eq!(
            a.take(1000)
                .records
                .iter()
                .filter(|r| r.actor.contains("d-1"))
                .count(),
            20
        );
        // The unauthenticated ones: only those within the budget (burst 100) are lines.
        assert_eq!(of("umbra://o/broker/b-1").len(), 100);
        // The flood: only those within the device's budget (burst 20) are lines, each stored;
        // the rest are counted.
        let flood = of("umbra://o/agent/d-2");
        assert_eq!(flood.len(), 20, "{text}");
        assert!(flood.iter().all(|l| l["fields"]["stored"] == true));
    }

    /// Refusals of unauthenticated peers from many addresses are bounded in all (burst 100),
    /// and spend nothing of the budget identities' denials are recorded within: a user's
    /// denial after the flood is recorded.
    #[test]
    fn a_flood_of_unauthenticated_refusals_leaves_users_denials_alone() {
        let a = AuditQueue::default();
        let me = "umbra://o/broker/b-1";
        for round in 0..10 {
            for ip in 0..300 {
                a.record_unauthenticated(
                    &format!("10.0.{round}.{ip}"),
                    me,
                    "link.handshake",
                    "10.0.0.1",
                    serde_json::json!({}),
                );
            }
        }
        for _ in 0..25 {
            a.record(
                "umbra://o/agent/d-1",
                "stream.open",
                "web",
                "deny",
                serde_json::json!({}),
            );
        }
        let b = a.take(CAP);
        let count = |actor: &str| b.records.iter().filter(|r| r.actor == actor).count();
        assert_eq!(count(me), 100);
        assert_eq!(count("umbra://o/agent/d-1"), 20);
    }

    #[test]
    fn what_the_controller_did_not_store_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let epoch = a.epoch;
        for t in ["a", "b", "c"] {
            rec(&a, t);
        }
        let sent = a.take(2);
        assert_eq!(sent.seq, AuditSeq { epoch, first: 1 });
        a.acked(&sent);
        rec(&a, "d");
        // A failed heartbeat: taken, not acknowledged.
        let lost = a.take(10);
        assert_eq!(lost.records.len(), 2);
        // The process dies here (nothing flushed on the way out).
        drop(a);

        let b = AuditQueue::open(&path).unwrap();
        assert_eq!(b.epoch, epoch, "same spool, same numbering");
        let again = b.take(10);
        assert_eq!(again.seq, AuditSeq { epoch, first: 3 });
        let targets: Vec<_> = again.records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["c", "d"]);
        assert_eq!(again.records[0].detail, serde_json::json!({"r": 1}));
        // Numbering goes on after the replayed events.
        b.requeue(again);
        rec(&b, "e");
        let all = b.take(10);
        assert_eq!(all.seq.first, 3);
        assert_eq!(all.records.len(), 3);
        b.acked(&all);
        drop(b);

        // Everything acknowledged: nothing to resend, numbers continue.
        let c = AuditQueue::open(&path).unwrap();
        let none = c.take(10);
        assert!(none.records.is_empty());
        assert_eq!(none.seq, AuditSeq { epoch, first: 6 });
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_a_missing_spool_starts_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        rec(&a, "whole");
        let epoch = a.epoch;
        drop(a);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":2,"rec":{"at_ms":1,"act"#).unwrap();
        drop(f);
        let b = AuditQueue::open(&path).unwrap();
        let got = b.take(10);
        assert_eq!(got.seq, AuditSeq { epoch, first: 1 });
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].target, "whole");
        drop(b);

        std::fs::remove_file(&path).unwrap();
        let c = AuditQueue::open(&path).unwrap();
        assert_ne!(c.epoch, epoch);
        assert_eq!(c.take(10).seq.first, 1);
    }

    /// A write a full disk cut short leaves a torn line; the next event, once there is room
    /// again, is not glued to it (both would be lost at the next start): every event but the
    /// torn one comes back, and the torn one is still queued in memory.
    #[test]
    fn a_line_torn_by_a_full_disk_does_not_take_the_next_one_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        rec(&a, "before");
        {
            // What a short write leaves: part of a line, counted nowhere, the spool failing.
            let mut inner = a.lock();
            let s = inner.spool.as_mut().unwrap();
            (&s.file)
                .write_all(br#"{"seq":2,"rec":{"at_ms":1,"act"#)
                .unwrap();
            s.failing = true;
        }
        rec(&a, "after");
        drop(a);
        let b = AuditQueue::open(&path).unwrap();
        let got = b.take(10);
        let targets: Vec<_> = got.records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["before", "after"], "{got:?}");
        assert_eq!(got.seq.first, 1);
    }

    /// A spool that cannot be rewritten at start (a full disk) keeps the broker going: the
    /// one it read is appended to under its numbering, a torn last line cut off first, and
    /// everything comes back at the next start. With no spool to go on from, events are kept
    /// in memory under a new epoch. The twin: a start that can rewrite does so.
    #[test]
    fn a_spool_that_cannot_be_rewritten_at_start_stops_nothing() {
        let full = |_: &Path, _: u64, _: &VecDeque<(u64, AuditRecord)>, _: u64| {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let epoch = a.epoch;
        for t in ["a", "b"] {
            rec(&a, t);
        }
        let sent = a.take(1);
        a.acked(&sent);
        drop(a);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"rec":{"at_ms":1,"act"#).unwrap();
        drop(f);

        let b = AuditQueue::open_with(&path, full).unwrap();
        assert!(b.lock().spool.is_some(), "appending to the spool it read");
        rec(&b, "c");
        let got = b.take(10);
        assert_eq!(got.seq, AuditSeq { epoch, first: 2 });
        let targets: Vec<_> = got.records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["b", "c"]);
        drop(b);
        // Room again: all of it comes back, under the same numbering.
        let c = AuditQueue::open(&path).unwrap();
        let again = c.take(10);
        assert_eq!(again.seq, AuditSeq { epoch, first: 2 });
        let targets: Vec<_> = again.records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["b", "c"]);
        drop(c);

        // No spool yet: memory only, numbered afresh; nothing written.
        let fresh = dir.path().join("other.spool");
        let d = AuditQueue::open_with(&fresh, full).unwrap();
        assert!(d.lock().spool.is_none());
        rec(&d, "kept");
        let got = d.take(10);
        assert_eq!((got.seq.first, got.records.len()), (1, 1));
        assert!(!fresh.exists());
    }

    /// A run whose spool is behind what the controller stored (lines a full disk refused
    /// were sent anyway) numbers its events after the controller's mark once the first
    /// answer says where it is: none of them is taken for a resend and dropped. The spool
    /// follows, so the next start numbers on from there. The twins: a controller at or below
    /// where the run started, one of another epoch, and one that says nothing change nothing.
    #[test]
    fn a_spool_behind_the_controller_numbers_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let epoch = a.epoch;
        for t in ["a", "b", "c"] {
            rec(&a, t);
        }
        // Events 1-3 on disk; 4-9 were sent and stored while the disk refused their lines.
        drop(a);
        let b = AuditQueue::open(&path).unwrap();
        assert!(!b.confirmed());
        for t in ["d", "e"] {
            rec(&b, t);
        }
        b.confirm(Some((epoch, 9)));
        assert!(b.confirmed());
        let got = b.take(10);
        assert_eq!(got.seq, AuditSeq { epoch, first: 10 });
        let targets: Vec<_> = got.records.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(
            targets,
            ["d", "e"],
            "the replayed ones were stored: dropped"
        );
        // A second answer changes nothing.
        b.requeue(got);
        b.confirm(Some((epoch, 50)));
        assert_eq!(b.take(10).seq.first, 10);
        drop(b);
        // The next start numbers on from the spool, after the renumbered events.
        let c = AuditQueue::open(&path).unwrap();
        rec(&c, "f");
        let got = c.take(10);
        assert_eq!(got.seq.epoch, epoch);
        let last = got.seq.first + got.records.len() as u64 - 1;
        assert_eq!(last, 12, "{got:?}");
        assert_eq!(got.records.last().unwrap().target, "f");
        drop(c);

        // Twins: nothing to move.
        for stored in [Some((epoch, 12)), Some((epoch ^ 1, 99)), None] {
            let d = AuditQueue::open(&path).unwrap();
            rec(&d, "g");
            let before = d.take(0).seq;
            d.confirm(stored);
            assert_eq!(d.take(0).seq, before, "{stored:?}");
        }
    }

    /// Lines appended since the last heartbeat are synced before the next one sends events;
    /// with nothing new, nothing is synced.
    #[tokio::test]
    async fn events_are_made_durable_before_they_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let unsynced = |a: &AuditQueue| a.lock().spool.as_ref().unwrap().unsynced;
        assert!(!unsynced(&a), "a fresh spool is written durably");
        rec(&a, "x");
        assert!(unsynced(&a));
        assert!(a.durable().await);
        assert!(!unsynced(&a));
        assert!(a.durable().await);
        assert!(!unsynced(&a));
    }

    #[test]
    fn without_acknowledgements_the_spool_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let big = "y".repeat(20_000);
        // Well past SPOOL_MAX in all, none acknowledged (the controller is away).
        let n = (SPOOL_MAX / 20_000) as usize * 2;
        for _ in 0..n {
            rec(&a, &big);
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= SPOOL_MAX + 40_000, "{len} bytes");
        drop(a);
        // What is left is the newest part of the queue, still in order.
        let b = AuditQueue::open(&path).unwrap();
        let got = b.take(CAP);
        assert!(!got.records.is_empty());
        assert_eq!(got.seq.first + got.records.len() as u64 - 1, n as u64);
    }

    #[test]
    fn the_spool_is_compacted_to_what_is_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let big = "x".repeat(2_000);
        let mut n = 0;
        while std::fs::metadata(&path).unwrap().len() < COMPACT_AT {
            rec(&a, &big);
            n += 1;
        }
        let sent = a.take(n);
        rec(&a, "after");
        a.acked(&sent);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len < 4_000,
            "compacted to the epoch and one event: {len} bytes"
        );
        drop(a);
        let b = AuditQueue::open(&path).unwrap();
        let left = b.take(10);
        assert_eq!(left.records.len(), 1);
        assert_eq!(left.records[0].target, "after");
        assert_eq!(left.seq.first, n as u64 + 1);
    }

    /// A rewrite that keeps no event (a restart with nothing unsent, a compaction at an
    /// acknowledgement that left the queue empty) must not restart the numbering: the
    /// controller would take the next events for resends of what it stored and drop them.
    #[test]
    fn the_numbering_survives_rewrites_that_keep_no_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        let a = AuditQueue::open(&path).unwrap();
        let epoch = a.epoch;
        for t in ["a", "b", "c"] {
            rec(&a, t);
        }
        let sent = a.take(10);
        a.acked(&sent);
        drop(a);
        // Two restarts with no event between them: the first rewrites the spool with
        // nothing to keep.
        drop(AuditQueue::open(&path).unwrap());
        let b = AuditQueue::open(&path).unwrap();
        rec(&b, "d");
        assert_eq!(b.take(10).seq, AuditSeq { epoch, first: 4 });
        drop(b);

        // Compaction at an acknowledgement with the queue empty, then a restart.
        let c = AuditQueue::open(&path).unwrap();
        let big = "x".repeat(2_000);
        let mut n = 4;
        while std::fs::metadata(&path).unwrap().len() < COMPACT_AT {
            rec(&c, &big);
            n += 1;
        }
        let sent = c.take(CAP);
        c.acked(&sent);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < 200, "compacted to its first lines: {len} bytes");
        drop(c);
        let d = AuditQueue::open(&path).unwrap();
        rec(&d, "after");
        assert_eq!(
            d.take(10).seq,
            AuditSeq {
                epoch,
                first: n + 1
            }
        );
    }

    /// A spool an older version rewrote with nothing unsent holds its epoch alone, and no
    /// word of its numbering: its next events go under a new epoch, not numbered from 1 again
    /// under the old one (whose numbers the controller has seen, and would drop as resends).
    /// The twin: a spool that says where its numbering is keeps its epoch.
    #[test]
    fn a_spool_with_its_epoch_alone_starts_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.spool");
        std::fs::write(&path, "{\"epoch\":77}\n").unwrap();
        let a = AuditQueue::open(&path).unwrap();
        rec(&a, "after the upgrade");
        let seq = a.take(10).seq;
        assert_ne!(seq.epoch, 77);
        assert_eq!(seq.first, 1);
        drop(a);
        std::fs::write(&path, "{\"epoch\":77}\n{\"next\":9}\n").unwrap();
        let b = AuditQueue::open(&path).unwrap();
        rec(&b, "numbered");
        assert_eq!(
            b.take(10).seq,
            AuditSeq {
                epoch: 77,
                first: 9
            }
        );
    }
}
