//! Per-identity quotas: how many of something (the controller's long polls waiting and
//! connections open, the broker's streams per device) one peer identity may hold at once. A place is taken by [`Quota::take`] and given back when its
//! [`Place`] is dropped; identities holding nothing take no memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// At most `max` places per key.
#[derive(Debug)]
pub struct Quota {
    max: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One place of a key, given back when dropped.
#[derive(Debug)]
pub struct Place {
    quota: Arc<Quota>,
    key: String,
}

impl Quota {
    pub fn new(max: usize) -> Arc<Quota> {
        Arc::new(Quota {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The most places one key may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for `key`, or `None` when it already holds `max`.
    pub fn take(self: &Arc<Self>, key: &str) -> Option<Place> {
        let mut held = self.lock();
        let n = held.entry(key.to_owned()).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                held.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Place {
            quota: self.clone(),
            key: key.to_owned(),
        })
    }

    #[cfg(test)]
    fn held(&self, key: &str) -> Option<usize> {
        self.lock().get(key).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Every mutation is one step: a poisoned map is still consistent.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.quota.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_per_key_and_given_back() {
        let q = Quota::new(3);
        let mut held: Vec<Place> = (0..3).map(|_| q.take("a").unwrap()).collect();
        assert!(q.take("a").is_none());
        // Another key is not held back.
        let b = q.take("b").unwrap();
        held.pop();
        let again = q.take("a");
        assert!(again.is_some());
        assert_eq!(q.held("a"), Some(3));
        drop((b, again));
        // Nothing is kept for keys holding nothing.
        assert_eq!(q.held("b"), None);
        assert_eq!(q.held("a"), Some(2));
        drop(held);
        assert_eq!(q.held("a"), None);
    }

    #[test]
    fn zero_refuses_and_keeps_nothing() {
        let q = Quota::new(0);
        assert!(q.take("a").is_none());
        assert_eq!(q.held("a"), None);
    }
}
