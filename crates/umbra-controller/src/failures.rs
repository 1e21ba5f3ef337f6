//! How many audit records refused requests may write, per source address and in all.
//!
//! The API must be reachable by devices that have no credential yet (enrollment), so anyone
//! can send it requests that fail: a wrong admin token, a bad enrollment token, a renewal with
//! a revoked certificate. Each refusal is worth an audit record, but without a bound every
//! such request is a durable write, and a flood of them fills the disk. So each source has a
//! budget (a burst, then a steady rate), and all sources together have one. A refusal beyond
//! the budget still gets its answer and is counted, but writes no record; the next record from
//! that source says how many were skipped, so the trail keeps the count of every attempt.
//!
//! Sources are IPv4 addresses and IPv6 /64 prefixes (one host holds a whole /64). At most
//! [`MAX_SOURCES`] are tracked; beyond that, new sources share one budget. Pure: the caller
//! passes the time.

use std::net::IpAddr;
use std::time::{Duration, Instant};

pub(crate) use umbra_link::budget::Verdict;
use umbra_link::budget::{Budget, BudgetConfig};

/// Records one source may write at once.
const SOURCE_BURST: f64 = 20.0;
/// After the burst, one record per this long per source.
const SOURCE_EVERY: Duration = Duration::from_secs(2);
/// Records all sources together may write at once.
const GLOBAL_BURST: f64 = 200.0;
/// After that burst, at most this many records per second in all.
const GLOBAL_PER_SEC: f64 = 5.0;
/// Sources tracked one by one.
pub(crate) const MAX_SOURCES: usize = 4096;

/// The budgets (see the module docs), keyed by source ([`source_key`]).
#[derive(Debug)]
pub(crate) struct FailureBudget(Budget<IpAddr>);

impl FailureBudget {
    pub(crate) fn new(now: Instant) -> FailureBudget {
        FailureBudget(Budget::new(
            BudgetConfig {
                key_burst: SOURCE_BURST,
                key_every: SOURCE_EVERY,
                global_burst: GLOBAL_BURST,
                global_per_sec: GLOBAL_PER_SEC,
                max_keys: MAX_SOURCES,
            },
            now,
        ))
    }

    /// One refusal from `source` at `now`.
    pub(crate) fn on_refusal(&mut self, source: Option<IpAddr>, now: Instant) -> Verdict {
        self.0.on_event(source.map(source_key), now)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.0.tracked()
    }
}

/// The address a budget belongs to: IPv4 as is (also when IPv4-mapped), IPv6 by its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn records(v: &[Verdict]) -> usize {
        v.iter()
            .filter(|v| matches!(v, Verdict::Record { .. }))
            .count()
    }

    #[test]
    fn a_source_gets_a_burst_then_a_steady_rate_and_the_count_of_what_was_skipped() {
        let t0 = Instant::now();
        let mut b = FailureBudget::new(t0);
        let burst: Vec<Verdict> = (0..100)
            .map(|_| b.on_refusal(ip("192.0.2.1"), t0))
            .collect();
        assert_eq!(records(&burst), SOURCE_BURST as usize);
        assert!(
            burst[..20]
                .iter()
                .all(|v| *v == Verdict::Record { skipped: 0 })
        );
        assert!(burst[20..].iter().all(|v| *v == Verdict::Skip));
        // One budget unit later: one record, carrying the 80 skipped.
        let t1 = t0 + SOURCE_EVERY;
        assert_eq!(
            b.on_refusal(ip("192.0.2.1"), t1),
            Verdict::Record { skipped: 80 }
        );
        assert_eq!(b.on_refusal(ip("192.0.2.1"), t1), Verdict::Skip);
        // Another source is not held back by the first.
        assert_eq!(
            b.on_refusal(ip("192.0.2.2"), t1),
            Verdict::Record { skipped: 0 }
        );
        // After a long quiet spell the burst is whole again.
        let t2 = t1 + SOURCE_EVERY * 100;
        let again: Vec<Verdict> = (0..20).map(|_| b.on_refusal(ip("192.0.2.1"), t2)).collect();
        assert_eq!(again[0], Verdict::Record { skipped: 1 });
        assert_eq!(records(&again), 20);
    }

    #[test]
    fn ipv6_hosts_share_their_64_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut b = FailureBudget::new(t0);
        for i in 0..20u16 {
            let a = format!("2001:db8:1:2::{i:x}");
            assert!(matches!(b.on_refusal(ip(&a), t0), Verdict::Record { .. }));
        }
        assert_eq!(b.on_refusal(ip("2001:db8:1:2:ffff::1"), t0), Verdict::Skip);
        assert!(matches!(
            b.on_refusal(ip("2001:db8:1:3::1"), t0),
            Verdict::Record { .. }
        ));
        for _ in 0..20 {
            b.on_refusal(ip("198.51.100.7"), t0);
        }
        assert_eq!(b.on_refusal(ip("::ffff:198.51.100.7"), t0), Verdict::Skip);
    }

    #[test]
    fn all_sources_together_are_bounded() {
        let t0 = Instant::now();
        let mut b = FailureBudget::new(t0);
        // Many sources, two refusals each: only the global burst is written.
        let mut written = 0;
        for i in 0..1000u32 {
            let a = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            for _ in 0..2 {
                if let Verdict::Record { .. } = b.on_refusal(Some(a), t0) {
                    written += 1;
                }
            }
        }
        assert_eq!(written, GLOBAL_BURST as usize);
        // One second later, the global rate allows a few more.
        let t1 = t0 + Duration::from_secs(1);
        let more = (0..100u8)
            .filter(|i| {
                matches!(
                    b.on_refusal(Some(IpAddr::from([172, 16, 0, *i])), t1),
                    Verdict::Record { .. }
                )
            })
            .count();
        assert_eq!(more, GLOBAL_PER_SEC as usize);
    }

    #[test]
    fn tracked_sources_are_bounded_and_idle_ones_are_forgotten() {
        let t0 = Instant::now();
        let mut b = FailureBudget::new(t0);
        // Spread over time so that the global budget never runs out.
        let mut t = t0;
        for i in 0..(MAX_SOURCES as u32 + 500) {
            t += Duration::from_millis(250);
            let a = IpAddr::from(i.to_be_bytes());
            b.on_refusal(Some(a), t);
            assert!(b.tracked() <= MAX_SOURCES);
        }
        // Once full, the sources whose budget was whole again were forgotten (all but the
        // last few seconds' worth), and the map grew again from there.
        assert!(b.tracked() < 600, "{}", b.tracked());
        let later = t + SOURCE_EVERY * 100;
        assert!(matches!(
            b.on_refusal(ip("203.0.113.9"), later),
            Verdict::Record { .. }
        ));
    }

    #[test]
    fn refusals_with_no_source_share_one_budget() {
        let t0 = Instant::now();
        let mut b = FailureBudget::new(t0);
        let v: Vec<Verdict> = (0..30).map(|_| b.on_refusal(None, t0)).collect();
        assert_eq!(records(&v), SOURCE_BURST as usize);
    }
}
