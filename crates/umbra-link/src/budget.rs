//! A budget of events per key and in all: a burst, then a steady rate. Shared by the roles
//! that must record what peers make them refuse without letting a flood of refusals become a
//! flood of durable writes: the controller (refused requests, keyed by source address) and the
//! broker (denied links and streams, keyed by the identity that asked).
//!
//! An event beyond the budget is counted against its key, and the key's next event that is
//! recorded says how many were skipped, so the trail keeps the count of every attempt. At
//! most `max_keys` keys are tracked; beyond that, new keys share one budget. Pure: the
//! caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The sizes of a [`Budget`].
#[derive(Debug, Clone, Copy)]
pub struct BudgetConfig {
    /// Events one key may record at once.
    pub key_burst: f64,
    /// After its burst, one event per this long per key.
    pub key_every: Duration,
    /// Events all keys together may record at once.
    pub global_burst: f64,
    /// After that burst, at most this many events per second in all.
    pub global_per_sec: f64,
    /// Keys tracked one by one.
    pub max_keys: usize,
}

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Record it; `skipped` events of the same key were not recorded since its last one.
    Record { skipped: u64 },
    /// Over budget: count it, record nothing.
    Skip,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    skipped: u64,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            at: now,
            skipped: 0,
        }
    }

    fn refill(&mut self, capacity: f64, per_sec: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(capacity);
        self.at = now;
    }
}

/// The budgets (see the module docs).
#[derive(Debug)]
pub struct Budget<K> {
    cfg: BudgetConfig,
    keys: HashMap<K, Bucket>,
    /// Shared by keys beyond `max_keys`, and by events with no key.
    overflow: Bucket,
    global: Bucket,
}

impl<K: Hash + Eq> Budget<K> {
    pub fn new(cfg: BudgetConfig, now: Instant) -> Budget<K> {
        Budget {
            cfg,
            keys: HashMap::new(),
            overflow: Bucket::full(cfg.key_burst, now),
            global: Bucket::full(cfg.global_burst, now),
        }
    }

    /// One event of `key` at `now`.
    pub fn on_event(&mut self, key: Option<K>, now: Instant) -> Verdict {
        let c = self.cfg;
        let per_key = 1.0 / c.key_every.as_secs_f64();
        self.global.refill(c.global_burst, c.global_per_sec, now);
        if let Some(k) = &key
            && !self.keys.contains_key(k)
            && self.keys.len() >= c.max_keys
        {
            // Forget keys whose budget is whole again: they hold nothing worth keeping.
            self.keys.retain(|_, b| {
                b.refill(c.key_burst, per_key, now);
                b.skipped > 0 || b.tokens < c.key_burst
            });
        }
        let bucket = match key {
            Some(k) if self.keys.len() < c.max_keys || self.keys.contains_key(&k) => self
                .keys
                .entry(k)
                .or_insert_with(|| Bucket::full(c.key_burst, now)),
            _ => &mut self.overflow,
        };
        bucket.refill(c.key_burst, per_key, now);
        if bucket.tokens >= 1.0 && self.global.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            self.global.tokens -= 1.0;
            let skipped = std::mem::take(&mut bucket.skipped);
            Verdict::Record { skipped }
        } else {
            bucket.skipped += 1;
            Verdict::Skip
        }
    }

    /// Keys tracked one by one now.
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BudgetConfig = BudgetConfig {
        key_burst: 3.0,
        key_every: Duration::from_secs(1),
        global_burst: 5.0,
        global_per_sec: 1.0,
        max_keys: 2,
    };

    #[test]
    fn burst_then_rate_and_the_next_record_counts_the_skipped() {
        let t0 = Instant::now();
        let mut b = Budget::new(CFG, t0);
        let v: Vec<Verdict> = (0..5).map(|_| b.on_event(Some("a"), t0)).collect();
        assert_eq!(v[..3], [Verdict::Record { skipped: 0 }; 3]);
        assert_eq!(v[3..], [Verdict::Skip; 2]);
        assert_eq!(
            b.on_event(Some("a"), t0 + Duration::from_secs(1)),
            Verdict::Record { skipped: 2 }
        );
    }

    #[test]
    fn all_keys_together_and_the_keys_tracked_are_bounded() {
        let t0 = Instant::now();
        let mut b = Budget::new(CFG, t0);
        let recorded = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .filter(|k| matches!(b.on_event(Some(**k), t0), Verdict::Record { .. }))
            .count();
        assert_eq!(recorded, 5, "the global burst");
        assert!(b.tracked() <= 2);
    }
}
