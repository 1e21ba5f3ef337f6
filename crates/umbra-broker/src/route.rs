//! Routing: which connector link carries an allowed stream, and the tables of live links.
//!
//! Connectors hold links to every broker; several may serve one service. The registry maps
//! connector ids to their live links with a count of active streams; a stream goes to the
//! least-loaded live link among the connectors the service names. The lock is taken once per
//! stream open and close, never per chunk.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use umbra_link::Link;

/// One peer's link (a connector's, or an agent's).
pub(crate) struct PeerLink {
    /// Connector id or device id.
    pub(crate) peer: String,
    pub(crate) link: Link,
    pub(crate) key: u64,
    active: AtomicUsize,
}

impl PeerLink {
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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
    pub(crate) fn add(&self, peer: &str, link: Link, key: u64) -> Arc<PeerLink> {
        let c = Arc::new(PeerLink {
            peer: peer.to_owned(),
            link,
            key,
            active: AtomicUsize::new(0),
        });
        self.lock()
            .entry(peer.to_owned())
            .or_default()
            .push(c.clone());
        c
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

    /// Live links of the given connectors, least loaded first: one per connector, its newest
    /// (see [`newest`]).
    pub(crate) fn candidates(&self, connectors: &[String]) -> Vec<Arc<PeerLink>> {
        let m = self.lock();
        let mut out: Vec<Arc<PeerLink>> = connectors
            .iter()
            .filter_map(|id| m.get(id))
            .filter_map(|links| {
                let live: Vec<&Arc<PeerLink>> =
                    links.iter().filter(|c| !c.link.is_closed()).collect();
                newest(&live, |c| (c.link.peer().not_after, c.key)).map(|c| (*c).clone())
            })
            .collect();
        drop(m);
        rank(&mut out, |c| c.active());
        out
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
fn newest<T, K: Ord>(links: &[T], key: impl Fn(&T) -> K) -> Option<&T> {
    links.iter().max_by_key(|c| key(c))
}

/// Orders by load, stable, so ties keep registration order. Pure.
fn rank<T>(v: &mut [T], load: impl Fn(&T) -> usize) {
    v.sort_by_key(|c| load(c));
}

#[cfg(test)]
mod tests {
    use super::rank;

    #[test]
    fn newest_link_of_a_connector_gets_new_streams() {
        // (certificate expiry, registration key)
        let links = [(100, 1), (200, 2), (200, 3), (150, 4)];
        assert_eq!(super::newest(&links, |l| *l), Some(&(200, 3)));
        assert_eq!(super::newest(&links[..1], |l| *l), Some(&(100, 1)));
        assert_eq!(super::newest::<(u8, u8), _>(&[], |l| *l), None);
    }

    #[test]
    fn least_loaded_first_and_stable() {
        let mut v = vec![("a", 3), ("b", 1), ("c", 1), ("d", 0)];
        rank(&mut v, |x| x.1);
        assert_eq!(v.iter().map(|x| x.0).collect::<String>(), "dbca");
    }
}
