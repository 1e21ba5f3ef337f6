//! A bound on handshakes in progress, for the broker's listeners and for the controller's
//! HTTPS server (which also bounds its unauthenticated connections with it).
//!
//! At most `max` handshakes run at once. When a new connection arrives and all slots are
//! taken, the *oldest* handshake in progress is evicted (cancelled) to make room, instead of
//! the newcomer waiting. A flood of connections that stall (send nothing, or a ClientHello
//! byte by byte) therefore cannot keep a real peer out: the real peer's handshake starts at
//! once, and an attacker has to open `max` new connections within that handshake's round
//! trips to evict it, not merely hold `max` idle ones. Each handshake is also bounded by the
//! handshake timeout (the caller's).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

/// Slots in use, oldest first; at most `max` (see the module docs).
#[derive(Debug)]
pub struct Pending {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    running: VecDeque<(u64, CancellationToken)>,
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
        Arc::new(Pending {
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Takes a slot for a new handshake, evicting the oldest one if all are taken.
    pub fn admit(self: &Arc<Self>) -> Slot {
        let evicted = CancellationToken::new();
        // The lock guards a short queue operation once per connection, never per chunk; a
        // poisoned lock still holds a consistent queue.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        while inner.running.len() >= self.max {
            match inner.running.pop_front() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.running.push_back((id, evicted.clone()));
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
        if let Some(i) = inner.running.iter().position(|(id, _)| *id == self.id) {
            inner.running.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_evicts_the_oldest_and_drop_frees() {
        let p = Pending::new(2);
        let a = p.admit();
        let b = p.admit();
        assert_eq!(p.running(), 2);
        let c = p.admit();
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(p.running(), 2);
        drop(a); // already evicted: nothing else changes
        assert_eq!(p.running(), 2);
        drop(b);
        assert_eq!(p.running(), 1);
        let d = p.admit();
        assert!(!c.evicted.is_cancelled() && !d.evicted.is_cancelled());
        drop((c, d));
        assert_eq!(p.running(), 0);
    }

    #[test]
    fn busy_from_half() {
        let p = Pending::new(4);
        let a = p.admit();
        assert!(!p.busy());
        let b = p.admit();
        assert!(p.busy());
        drop(a);
        assert!(!p.busy());
        drop(b);
    }

    #[test]
    fn zero_means_one() {
        let p = Pending::new(0);
        let a = p.admit();
        let b = p.admit();
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled());
    }
}
