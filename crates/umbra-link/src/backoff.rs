//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Owns only the arithmetic. The caller supplies the random number (a uniform value in
//! `[0, 1)`) so that the delays are reproducible in tests, and does the sleeping itself.
//!
//! Full jitter (the delay is uniform in `[0, min(cap, base * 2^attempt))`) spreads the
//! reconnects of many connectors and agents after a broker restart instead of having them
//! arrive in synchronised waves.

use std::time::Duration;

/// Backoff state for one reconnecting task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap`. A `cap` below `base` is raised
    /// to `base`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// How many delays were handed out since the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay, before jitter: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // 2^31 * any useful base is far beyond any cap; saturate instead of overflowing.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, `rand01 * ceiling()`, and one more attempt counted.
    ///
    /// `rand01` is clamped into `[0, 1]`; NaN counts as 0.
    pub fn next_delay(&mut self, rand01: f64) -> Duration {
        let r = if rand01.is_nan() {
            0.0
        } else {
            rand01.clamp(0.0, 1.0)
        };
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        // Float rounding may land a hair above the ceiling (or overflow for huge caps).
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * r).map_or(ceiling, |d| d.min(ceiling))
    }

    /// Start over from `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniform random number in `[0, 1)` from the operating system's generator, for drivers
/// that feed [`Backoff::next_delay`].
pub fn random_unit() -> f64 {
    let b = umbra_pki::random_bytes::<8>();
    // 53 random bits: every value is exactly representable and strictly below 1.
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling());
            b.next_delay(0.5);
        }
        assert_eq!(
            ceilings,
            vec![100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
    }

    #[test]
    fn delay_is_within_bounds() {
        for r in [0.0, 0.25, 0.999_999, 1.0, -3.0, 7.0, f64::NAN] {
            let mut b = Backoff::new(100 * MS, 1000 * MS);
            for _ in 0..40 {
                let ceiling = b.ceiling();
                let d = b.next_delay(r);
                assert!(d <= ceiling, "{d:?} > {ceiling:?} for {r}");
                assert!(d <= 1000 * MS);
            }
        }
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(1.0), 200 * MS);
        assert_eq!(b.next_delay(0.5), 200 * MS);
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::MAX);
        for _ in 0..200 {
            b.next_delay(1.0);
        }
        assert_eq!(b.attempt(), 200);
        assert!(b.ceiling() <= Duration::MAX);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..5 {
            b.next_delay(1.0);
        }
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(1.0), 100 * MS);
    }

    #[test]
    fn cap_below_base_is_raised() {
        let b = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(b.ceiling(), 500 * MS);
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..1000 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
    }
}
