//! The broker's view of policy: the last good snapshot, the engine compiled from it, and when
//! the controller last confirmed it.
//!
//! Swapped atomically as a whole ([`arc_swap::ArcSwap`]): a stream reads one consistent
//! `Authority` at open time and never takes a lock. Persisted next to the identity so a
//! restarted broker enforces the same snapshot while the controller is away, and keeps
//! counting staleness from the last confirmation, not from its own restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use umbra_policy::Engine;
use umbra_proto::Snapshot;

/// One consistent policy state.
pub(crate) struct Authority {
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) engine: Arc<Engine>,
    /// The snapshot's revoked serials, for a lookup per stream instead of a scan.
    revoked: Arc<HashSet<String>>,
    /// Device id -> revoked, and connector id -> revoked: every link is admitted again on each
    /// new snapshot, and a scan of every device ever enrolled per link would not scale.
    devices: Arc<HashMap<String, bool>>,
    connectors: Arc<HashMap<String, bool>>,
    /// Last time the controller said this snapshot is current (Unix seconds).
    pub(crate) confirmed_at: u64,
    /// The same moment on this process's monotonic clock, when this process saw it (`None`
    /// for a snapshot loaded from disk).
    confirmed_mono: Option<Instant>,
}

impl Authority {
    /// No snapshot yet: an empty policy set, which denies everything.
    pub(crate) fn empty() -> Result<Self, umbra_policy::PolicyError> {
        Self::new(Snapshot::default(), 0)
    }

    pub(crate) fn new(
        snapshot: Snapshot,
        confirmed_at: u64,
    ) -> Result<Self, umbra_policy::PolicyError> {
        Ok(Authority {
            engine: Arc::new(Engine::from_snapshot(&snapshot)?),
            revoked: Arc::new(snapshot.revoked_serials.iter().cloned().collect()),
            devices: Arc::new(
                snapshot
                    .devices
                    .iter()
                    .map(|d| (d.id.clone(), d.revoked))
                    .collect(),
            ),
            connectors: Arc::new(
                snapshot
                    .connectors
                    .iter()
                    .map(|c| (c.id.clone(), c.revoked))
                    .collect(),
            ),
            snapshot: Arc::new(snapshot),
            confirmed_at,
            confirmed_mono: None,
        })
    }

    /// This state, confirmed by the controller at `at` (Unix seconds), which this process
    /// saw at `mono` on its monotonic clock.
    pub(crate) fn confirmed(&self, at: u64, mono: Instant) -> Self {
        Authority {
            engine: self.engine.clone(),
            snapshot: self.snapshot.clone(),
            revoked: self.revoked.clone(),
            devices: self.devices.clone(),
            connectors: self.connectors.clone(),
            confirmed_at: at,
            confirmed_mono: Some(mono),
        }
    }

    /// Whether this state may still authorize new streams at `now`.
    pub(crate) fn is_fresh(&self, now: SystemTime, max_staleness: Duration) -> bool {
        self.snapshot.version > 0 && self.age(now) <= max_staleness.as_secs()
    }

    /// How long until this state stops being fresh at the current confirmation; `None` if it
    /// is not fresh now. Freshness counts whole seconds, so it ends at the start of the first
    /// second past the limit.
    pub(crate) fn fresh_for(&self, now: SystemTime, max_staleness: Duration) -> Option<Duration> {
        if !self.is_fresh(now, max_staleness) {
            return None;
        }
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let stale_at = Duration::from_secs(
            self.confirmed_at
                .saturating_add(max_staleness.as_secs())
                .saturating_add(1),
        );
        let by_wall = stale_at.saturating_sub(now);
        let by_mono = self.confirmed_mono.map_or(Duration::MAX, |m| {
            (max_staleness + Duration::from_secs(1)).saturating_sub(m.elapsed())
        });
        Some(by_wall.min(by_mono))
    }

    /// Seconds since the controller last confirmed the snapshot: by the wall clock, or by
    /// this process's monotonic clock where that counts more. A wall clock stepped back (a
    /// time sync correcting it) must not stretch the enforcement of an old snapshot past the
    /// staleness limit. Not the other way round: across a suspend the monotonic clock stands
    /// still, and the wall clock is the one that is right. (The monotonic part reads the
    /// process's clock; a state made with [`Authority::new`] has none and is pure.)
    pub(crate) fn age(&self, now: SystemTime) -> u64 {
        let wall = unix(now).saturating_sub(self.confirmed_at);
        let mono = self.confirmed_mono.map_or(0, |m| m.elapsed().as_secs());
        wall.max(mono)
    }

    /// `Some(revoked)` for a device the snapshot knows.
    pub(crate) fn device_revoked(&self, id: &str) -> Option<bool> {
        self.devices.get(id).copied()
    }

    /// `Some(revoked)` for a connector the snapshot knows.
    pub(crate) fn connector_revoked(&self, id: &str) -> Option<bool> {
        self.connectors.get(id).copied()
    }

    /// Whether the certificate serial is revoked.
    pub(crate) fn serial_revoked(&self, serial_hex: &str) -> bool {
        self.revoked.contains(serial_hex)
    }
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What goes to disk.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    confirmed_at: u64,
    snapshot: Snapshot,
}

/// Where the last good snapshot is kept.
pub(crate) fn cache_path(identity_dir: &Path) -> PathBuf {
    identity_dir.join("snapshot.json")
}

/// Loads the cached snapshot, if there is a readable one. A damaged cache is ignored (the
/// broker then denies until the controller answers), never fatal.
pub(crate) fn load_cached(path: &Path) -> Option<Authority> {
    let bytes = std::fs::read(path).ok()?;
    let stored: Stored = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable snapshot cache");
            return None;
        }
    };
    match Authority::new(stored.snapshot, stored.confirmed_at) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring snapshot cache with invalid policies");
            None
        }
    }
}

/// Writes the snapshot and its confirmation to the cache (atomically, 0600); when that fails,
/// removes the copy already there (`Err` holds the failure, and whether no copy is left): it
/// holds an older snapshot, one a revocation may since have replaced, and a restart while the
/// controller is away must not enforce it. Without a copy, a restart denies until the
/// controller answers.
pub(crate) fn store_cached_or_forget(
    path: &Path,
    a: &Authority,
) -> Result<(), (std::io::Error, bool)> {
    let stored = Stored {
        confirmed_at: a.confirmed_at,
        snapshot: (*a.snapshot).clone(),
    };
    let bytes = serde_json::to_vec(&stored).map_err(|e| (std::io::Error::other(e), false))?;
    umbra_pki::write_private_file_or_remove(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache that cannot be written is not left holding the previous snapshot; the twin: a
    /// cache that can is replaced.
    #[test]
    fn a_failed_cache_write_leaves_no_older_copy() {
        let dir = tempfile::tempdir().unwrap();
        let a1 = Authority::new(snap(1), 1_000).unwrap();
        let a2 = Authority::new(snap(2), 2_000).unwrap();
        let fine = dir.path().join("snapshot.json");
        store_cached_or_forget(&fine, &a1).unwrap();
        store_cached_or_forget(&fine, &a2).unwrap();
        assert_eq!(load_cached(&fine).unwrap().snapshot.version, 2);
        // The file's own name fits; the temporary file's beside it is too long to create.
        let doomed = dir.path().join("s".repeat(250));
        std::fs::write(
            &doomed,
            serde_json::to_vec(&Stored {
                confirmed_at: 1_000,
                snapshot: snap(1),
            })
            .unwrap(),
        )
        .unwrap();
        assert!(load_cached(&doomed).is_some());
        let (_, gone) = store_cached_or_forget(&doomed, &a2).unwrap_err();
        assert!(gone && !doomed.exists());
    }

    fn snap(version: u64) -> Snapshot {
        Snapshot {
            version,
            org: "default".into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn staleness() {
        let a = Authority::new(snap(3), 1_000).unwrap();
        let max = Duration::from_secs(60);
        assert!(a.is_fresh(UNIX_EPOCH + Duration::from_secs(1_000), max));
        assert!(a.is_fresh(UNIX_EPOCH + Duration::from_secs(1_060), max));
        assert!(!a.is_fresh(UNIX_EPOCH + Duration::from_secs(1_061), max));
        // A clock that went backwards does not make it stale.
        assert!(a.is_fresh(UNIX_EPOCH + Duration::from_secs(10), max));
        assert!(
            !Authority::empty()
                .unwrap()
                .is_fresh(UNIX_EPOCH + Duration::from_secs(1), max)
        );
    }

    /// A wall clock stepped back after the confirmation (by more than the limit) does not
    /// keep the state fresh: this process has measured the time that passed. The twins: just
    /// confirmed, it is fresh; a wall clock stepped forward makes it stale at once (the next
    /// confirmation mends it).
    #[test]
    fn a_wall_clock_stepped_back_does_not_stretch_freshness() {
        let max = Duration::from_secs(60);
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(120))
            .expect("the monotonic clock is past 120 s");
        let a = Authority::new(snap(3), 1_000)
            .unwrap()
            .confirmed(1_000, long_ago);
        // By the wall clock 10 s passed; by this process's, 120.
        assert!(!a.is_fresh(at(1_010), max));
        assert_eq!(a.fresh_for(at(1_010), max), None);
        assert!(a.age(at(1_010)) >= 120);
        let b = a.confirmed(1_000, Instant::now());
        assert!(b.is_fresh(at(1_010), max));
        let left = b.fresh_for(at(1_010), max).unwrap();
        assert!(left <= Duration::from_secs(51), "{left:?}");
        assert!(!b.is_fresh(at(1_061), max), "wall clock stepped forward");
    }

    #[test]
    fn fresh_for_ends_where_freshness_ends() {
        let a = Authority::new(snap(3), 1_000).unwrap();
        let max = Duration::from_secs(60);
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(
            a.fresh_for(at(1_000_000), max),
            Some(Duration::from_secs(61))
        );
        assert_eq!(
            a.fresh_for(at(1_060_250), max),
            Some(Duration::from_millis(750))
        );
        // Waking when it said, the state is stale: no wake-up too early to see it.
        let left = a.fresh_for(at(1_060_250), max).unwrap();
        assert!(!a.is_fresh(at(1_060_250) + left, max));
        assert_eq!(a.fresh_for(at(1_061_000), max), None);
        assert_eq!(Authority::empty().unwrap().fresh_for(at(5), max), None);
    }

    #[test]
    fn cache_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = cache_path(dir.path());
        assert!(load_cached(&p).is_none());
        store_cached_or_forget(&p, &Authority::new(snap(7), 42).unwrap()).unwrap();
        let a = load_cached(&p).unwrap();
        assert_eq!(a.snapshot.version, 7);
        assert_eq!(a.confirmed_at, 42);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(load_cached(&p).is_none());
    }
}
