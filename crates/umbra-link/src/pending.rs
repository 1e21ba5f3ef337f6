//! A bound on handshakes in progress, for the broker's listeners and for the controller's
//! HTTPS server (which also bounds its unauthenticated connections with it).
//!
//! At most `max` handshakes run at once. When a new connection arrives and all slots are
//! taken, the *oldest* handshake in progress is evicted (cancelled) to make room, instead of
//! the newcomer waiting. A flood of connections that stall (send nothing, or a ClientHello
//! byte by byte) therefore cannot keep a real peer out by holding slots: the real peer's
//! handshake starts at once. Each handshake is also bounded by the handshake timeout (the
//! caller's).
//!
//! Eviction alone would let one source evict everyone else: a bare TCP connect costs nothing,
//! and a flood of them faster than `max` per handshake round trip evicts every handshake that
//! takes longer, which is every distant peer's. So one source (an IPv4 address, or an IPv6
//! /64, what one host or one customer of a provider usually holds) has at most an eighth of
//! the slots: a newcomer from a source at its share evicts that source's own oldest handshake,
//! never another source's. Only a flood from many sources at once still evicts the oldest of
//! all. Evictions are counted in `umbra_link_handshakes_evicted_total{reason}` (`source_share`,
//! `all_taken`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

/// Slots in use, oldest first; at most `max`, at most `per_source` of one source (see the
/// module docs).
#[derive(Debug)]
pub struct Pending {
    max: usize,
    per_source: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    running: VecDeque<(u64, IpAddr, CancellationToken)>,
    /// Slots in `running` per source.
    held: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove_at(&mut self, i: usize) -> Option<CancellationToken> {
        let (_, source, token) = self.running.remove(i)?;
        if let Some(n) = self.held.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&source);
            }
        }
        Some(token)
    }
}

/// The source a peer's address counts for: an IPv4 address (also written as IPv4-mapped
/// IPv6), or an IPv6 /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// One handshake's slot: `evicted` fires if a newer connection needs the slot. Dropping the
/// slot frees it.
#[derive(Debug)]
pub struct Slot {
    pending: Arc<Pending>,
    id: u64,
    pub evicted: CancellationToken,
}

impl Pending {
    pub fn new(max: usize) -> Arc<Pending> {
        let max = max.max(1);
        Arc::new(Pending {
            max,
            per_source: (max / 8).max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Takes a slot for a new handshake from `peer`, evicting that source's oldest one if it
    /// holds its share, and the oldest of all if all are taken.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Slot {
        let source = source_of(peer);
        let evicted = CancellationToken::new();
        // The lock guards short queue operations once per connection, never per chunk; a
        // poisoned lock still holds a consistent queue.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.held.get(&source).copied().unwrap_or(0) >= self.per_source
            && let Some(i) = inner.running.iter().position(|(_, s, _)| *s == source)
            && let Some(own) = inner.remove_at(i)
        {
            own.cancel();
            metrics::counter!("umbra_link_handshakes_evicted_total", "reason" => "source_share")
                .increment(1);
        }
        while inner.running.len() >= self.max {
            match inner.remove_at(0) {
                Some(oldest) => oldest.cancel(),
                None => break,
            }
            metrics::counter!("umbra_link_handshakes_evicted_total", "reason" => "all_taken")
                .increment(1);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.running.push_back((id, source, evicted.clone()));
        *inner.held.entry(source).or_insert(0) += 1;
        Slot {
            pending: self.clone(),
            id,
            evicted,
        }
    }

    /// Whether at least half the slots are taken: a listener then asks new QUIC peers to
    /// prove their address first (a Retry), so that spoofed Initials cannot evict.
    pub fn busy(&self) -> bool {
        self.running() * 2 >= self.max
    }

    /// Handshakes in progress now.
    pub fn running(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self
            .pending
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Usually near the front (handshakes finish roughly in arrival order).
        if let Some(i) = inner.running.iter().position(|(id, _, _)| *id == self.id) {
            inner.remove_at(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_evicts_the_oldest_and_drop_frees() {
        let p = Pending::new(2);
        let a = p.admit(ip("192.0.2.11"));
        let b = p.admit(ip("192.0.2.12"));
        assert_eq!(p.running(), 2);
        let c = p.admit(ip("192.0.2.13"));
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(p.running(), 2);
        drop(a); // already evicted: nothing else changes
        assert_eq!(p.running(), 2);
        drop(b);
        assert_eq!(p.running(), 1);
        let d = p.admit(ip("192.0.2.14"));
        assert!(!c.evicted.is_cancelled() && !d.evicted.is_cancelled());
        drop((c, d));
        assert_eq!(p.running(), 0);
    }

    #[test]
    fn busy_from_half() {
        let p = Pending::new(4);
        let a = p.admit(ip("192.0.2.15"));
        assert!(!p.busy());
        let b = p.admit(ip("192.0.2.16"));
        assert!(p.busy());
        drop(a);
        assert!(!p.busy());
        drop(b);
    }

    #[test]
    fn zero_means_one() {
        let p = Pending::new(0);
        let a = p.admit(ip("192.0.2.17"));
        let b = p.admit(ip("192.0.2.18"));
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled());
    }

    /// One source floods with new connections: it evicts only its own handshakes (it holds
    /// at most an eighth of the slots), and another source's slow handshake lives on.
    #[test]
    fn a_flood_from_one_source_evicts_only_its_own() {
        let p = Pending::new(16);
        let far = p.admit(ip("198.51.100.7"));
        let flood: Vec<Slot> = (0..1000).map(|_| p.admit(A)).collect();
        assert!(
            !far.evicted.is_cancelled(),
            "another source's handshake was evicted"
        );
        let live = flood.iter().filter(|s| !s.evicted.is_cancelled()).count();
        assert_eq!(live, 2, "the flood holds its share (16 / 8)");
        assert_eq!(p.running(), 3);
        // The twin: many sources, each within its share, fill the slots and then evict the
        // oldest of all, as before.
        let many: Vec<Slot> = (0..20)
            .map(|i| p.admit(ip(&format!("203.0.113.{i}"))))
            .collect();
        assert!(far.evicted.is_cancelled());
        assert!(
            many.iter()
                .rev()
                .take(16)
                .all(|s| !s.evicted.is_cancelled())
        );
        drop((flood, many, far));
        assert_eq!(p.running(), 0);
        assert!(p.inner.lock().unwrap().held.is_empty());
    }

    /// An IPv6 /64 is one source; an IPv4 address written IPv4-mapped is that IPv4 address.
    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source_of(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:3::1")),
            source_of(ip("2001:db8:1:2::1"))
        );
        assert_eq!(source_of(ip("::ffff:192.0.2.1")), A);
        assert_eq!(source_of(A), A);
        let p = Pending::new(8);
        let first = p.admit(ip("2001:db8:1:2::1"));
        let second = p.admit(ip("2001:db8:1:2::2"));
        assert!(first.evicted.is_cancelled() && !second.evicted.is_cancelled());
    }
}
