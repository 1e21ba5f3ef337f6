//! How many streams a QUIC link lets its peer open at once: small to start, grown with use.
//!
//! quinn keeps state for every stream the peer may open concurrently, made when the
//! connection is created and whenever the limit rises (two hash-map entries per stream,
//! about 70 bytes). Advertising `LinkConfig::max_streams` (65,536) from the start cost about
//! 5 MiB per connection: before the handshake had proved anything, and on every link of every
//! agent and connector after it. So a link starts at [`INITIAL`] and doubles its limit
//! whenever three quarters of it is in use, up to `max_streams`: memory follows the streams
//! a peer really holds. A peer at the limit waits for credit (QUIC's own flow control); it is
//! not refused. Counted per accepted stream, never per packet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Concurrent streams a QUIC link allows its peer at first (and before the handshake ends).
pub(crate) const INITIAL: u32 = 256;

/// The limit a link starts with, given the most it may reach.
pub(crate) fn initial(max: u32) -> u32 {
    INITIAL.min(max)
}

/// The next limit when `live` streams are open under `limit`; `None` to keep it. Pure.
pub(crate) fn grown(live: u32, limit: u32, max: u32) -> Option<u32> {
    if limit >= max || u64::from(live) * 4 < u64::from(limit) * 3 {
        return None;
    }
    Some(limit.saturating_mul(2).clamp(1, max))
}

/// The streams one link's peer has open, and the limit advertised to it.
pub(crate) struct StreamCredit {
    live: Arc<AtomicU32>,
    limit: AtomicU32,
    max: u32,
}

/// Held by an accepted stream; counts it closed when dropped.
pub(crate) struct Held(Arc<AtomicU32>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamCredit {
    pub(crate) fn new(max: u32) -> StreamCredit {
        StreamCredit {
            live: Arc::default(),
            limit: AtomicU32::new(initial(max)),
            max,
        }
    }

    /// Counts an accepted stream. Returns its guard, and the new limit to advertise when it
    /// should grow (only one caller gets each raise). The raise and its advertisement are
    /// two steps: with two tasks accepting on one link, a smaller raise could be advertised
    /// after a larger one. Each link has one accept loop (`Link::accept`'s callers).
    /// Counting follows the accepted stream's receiving half, which the relays keep until
    /// both directions end.
    pub(crate) fn accepted(&self) -> (Held, Option<u32>) {
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        let held = Held(self.live.clone());
        let limit = self.limit.load(Ordering::Relaxed);
        let raise = grown(live, limit, self.max).filter(|&next| {
            self.limit
                .compare_exchange(limit, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        });
        (held, raise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_doubling_at_three_quarters_up_to_the_most() {
        assert_eq!(grown(100, 256, 65_536), None);
        assert_eq!(grown(191, 256, 65_536), None);
        assert_eq!(grown(192, 256, 65_536), Some(512));
        assert_eq!(grown(49_152, 65_536, 65_536), None);
        assert_eq!(grown(40_000, 50_000, 65_536), Some(65_536));
        assert_eq!(grown(u32::MAX, u32::MAX - 1, u32::MAX), Some(u32::MAX));
        assert_eq!(initial(65_536), INITIAL);
        assert_eq!(initial(10), 10);
    }

    #[test]
    fn credit_counts_held_streams_and_raises_once() {
        let c = StreamCredit::new(1024);
        let mut held = Vec::new();
        let mut raises = Vec::new();
        for _ in 0..600 {
            let (h, r) = c.accepted();
            held.push(h);
            raises.extend(r);
        }
        assert_eq!(raises, vec![512, 1024]);
        // Streams that ended no longer count: no raise while few are open.
        held.clear();
        let c = StreamCredit::new(65_536);
        for _ in 0..1000 {
            let (h, r) = c.accepted();
            assert_eq!(r, None, "one stream at a time never needs more");
            drop(h);
        }
    }
}
