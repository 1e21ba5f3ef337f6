//! Routing: which connector link carries an allowed stream, and the tables of live links.
//!
//! Connectors hold links to every broker; several may serve one service. The registry maps
//! connector ids to their live links with a count of active streams; a stream goes to the
//! least-loaded live link among the connectors the service names. The lock is taken once per
//! stream open and close, never per chunk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use umbra_link::Link;

/// How long at most a connector link that let a `Dial` go unanswered is passed over: offered
/// no stream, even when it is the service's only one (the stream is then answered
/// `Unavailable` at once, and the agent asks another broker, instead of every new stream
/// waiting out the dial timeout on a link that is blackholed). Meanwhile the broker pings the
/// link every [`PROBE_EVERY`], and the first `Pong` ends the pass (a short outage costs
/// seconds, not this); a link that is really dead is closed by its keepalive (the connector
/// links again).
pub(crate) const SILENT_FOR: Duration = Duration::from_secs(30);

/// How often a silent connector link is pinged, and how long each ping may take.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Milliseconds on the broker's monotonic clock (since its first call), for [`PeerLink`]'s
/// health marks.
pub(crate) fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One peer's link (a connector's, or an agent's).
pub(crate) struct PeerLink {
    /// Connector id or device id.
    pub(crate) peer: String,
    pub(crate) link: Link,
    pub(crate) key: u64,
    active: AtomicUsize,
    /// [`now_ms`] until which this link is passed over (0: it answers).
    silent_until: AtomicU64,
    /// Whether a task is pinging this silent link (at most one).
    probing: std::sync::atomic::AtomicBool,
}

impl PeerLink {
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A `Dial` on this link went unanswered within the dial timeout, at `now` ([`now_ms`]).
    pub(crate) fn mark_silent(&self, now: u64) {
        let until = now.saturating_add(u64::try_from(SILENT_FOR.as_millis()).unwrap_or(u64::MAX));
        self.silent_until.store(until, Ordering::Relaxed);
    }

    /// The connector answered on this link (whatever it answered).
    pub(crate) fn mark_answering(&self) {
        self.silent_until.store(0, Ordering::Relaxed);
    }

    pub(crate) fn silent(&self, now: u64) -> bool {
        self.silent_until.load(Ordering::Relaxed) > now
    }

    /// Whether the caller is to ping this link until it answers (no one else is).
    pub(crate) fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }
}

/// Holds one stream's share of a connector link's load; releases it on drop.
pub(crate) struct LoadGuard(Arc<PeerLink>);

impl LoadGuard {
    pub(crate) fn new(c: Arc<PeerLink>) -> Self {
        c.active.fetch_add(1, Ordering::Relaxed);
        LoadGuard(c)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Live links by peer id (connector id or device id).
#[derive(Default)]
pub(crate) struct Registry {
    links: Mutex<HashMap<String, Vec<Arc<PeerLink>>>>,
}

impl Registry {
    /// Adds `link` for `peer` unless `peer` already has `max` links open (then `None`).
    pub(crate) fn try_add(
        &self,
        peer: &str,
        link: Link,
        key: u64,
        max: usize,
    ) -> Option<Arc<PeerLink>> {
        let mut m = self.lock();
        let links = m.entry(peer.to_owned()).or_default();
        // Closed links leave with their task; do not count one that is on its way out.
        if links.iter().filter(|c| !c.link.is_closed()).count() >= max {
            return None;
        }
        let c = Arc::new(PeerLink {
            peer: peer.to_owned(),
            link,
            key,
            active: AtomicUsize::new(0),
            silent_until: AtomicU64::new(0),
            probing: Default::default(),
        });
        links.push(c.clone());
        Some(c)
    }

    pub(crate) fn remove(&self, peer: &str, key: u64) {
        let mut m = self.lock();
        if let Some(v) = m.get_mut(peer) {
            v.retain(|c| c.key != key);
            if v.is_empty() {
                m.remove(peer);
            }
        }
    }

    /// Live links of the given connectors, one per connector (its newest, see [`newest`]),
    /// but none recently silent (see [`SILENT_FOR`]); least loaded first. `now` is
    /// [`now_ms`].
    pub(crate) fn candidates(&self, connectors: &[String], now: u64) -> Vec<Arc<PeerLink>> {
        let m = self.lock();
        let mut out: Vec<Arc<PeerLink>> = connectors
            .iter()
            .filter_map(|id| m.get(id))
            .filter_map(|links| {
                let live = links.iter().filter(|c| !c.link.is_closed());
                newest(live, |c| (c.link.peer().not_after, c.key)).cloned()
            })
            .collect();
        drop(m);
        out.retain(|c| !c.silent(now));
        rank(&mut out, |c| c.active());
        out
    }

    /// Whether a live link of one of `connectors` is passed over for silence now: why a
    /// stream found no link to go to, when it found none.
    pub(crate) fn any_silent(&self, connectors: &[String], now: u64) -> bool {
        let m = self.lock();
        connectors
            .iter()
            .filter_map(|id| m.get(id))
            .flatten()
            .any(|c| !c.link.is_closed() && c.silent(now))
    }

    /// Number of live links, for metrics.
    pub(crate) fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Every live link, to re-check admission after a policy change.
    pub(crate) fn all(&self) -> Vec<Arc<PeerLink>> {
        self.lock().values().flatten().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<PeerLink>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every mutation
        // is a single call), so a poisoned lock is still usable.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The link a connector's new streams go to when it has several to this broker: the one with
/// the latest certificate expiry, then the latest registered. A connector that renewed its
/// certificate dials a new link; its old link keeps the streams it carries until they end or
/// its certificate expires (the broker then closes it), and gets no new ones. Pure.
fn newest<T, K: Ord>(links: impl IntoIterator<Item = T>, key: impl Fn(&T) -> K) -> Option<T> {
    links.into_iter().max_by_key(|c| key(c))
}

/// Orders by `key` (health, then load), stable, so ties keep registration order. Each key is
/// read once: health and load are live counters that other streams change during the sort,
/// and a sort whose comparisons disagree with each other may panic. Pure.
fn rank<T, K: Ord>(v: &mut [T], key: impl Fn(&T) -> K) {
    v.sort_by_cached_key(|c| key(c));
}

#[cfg(test)]
mod tests {
    use super::rank;

    /// Keys that change while the sort runs (other streams open and close meanwhile) are
    /// read once each: no panic, and the order is that of the keys as read.
    #[test]
    fn ranking_reads_each_key_once() {
        let calls = std::cell::Cell::new(0u64);
        let mut v: Vec<u64> = (0..64).collect();
        rank(&mut v, |x| {
            calls.set(calls.get() + 1);
            // A different answer on every call, as a live counter can give.
            (x * 7919 + calls.get() * 104_729) % 1000
        });
        assert_eq!(calls.get(), 64);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_ne!(v, sorted, "the keys ordered it, not the values");
    }

    #[test]
    fn newest_link_of_a_connector_gets_new_streams() {
        // (certificate expiry, registration key)
        let links = [(100, 1), (200, 2), (200, 3), (150, 4)];
        assert_eq!(super::newest(links, |l| *l), Some((200, 3)));
        assert_eq!(super::newest(&links[..1], |l| **l), Some(&(100, 1)));
        assert_eq!(super::newest(Vec::<(u8, u8)>::new(), |l| *l), None);
    }

    #[test]
    fn least_loaded_first_and_stable() {
        let mut v = vec![("a", 3), ("b", 1), ("c", 1), ("d", 0)];
        rank(&mut v, |x| x.1);
        assert_eq!(v.iter().map(|x| x.0).collect::<String>(), "dbca");
    }
}
