//! A bounded window of recently accepted record ids, so that a callback Tencent retries (when
//! the console's retry-on-timeout is on) is acknowledged but not published twice. Bounded in
//! count and age; in memory only, so a restart forgets it (consumers still dedupe on `ce_id`).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

/// An id as a window knows it (`DedupWindow::key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64);

pub struct DedupWindow {
    max_records: usize,
    max_age: Duration,
    /// 64-bit keyed hashes of ids (collisions are negligible at this size, memory is fixed),
    /// with when each was accepted, in nanoseconds since `epoch`: 16 bytes an entry, not 24.
    seen: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
    order: VecDeque<(u64, u64)>,
    epoch: Instant,
    hasher: RandomState,
}

/// Saturates past 584 years (a window configured absurdly long is simply unbounded in age).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The map's keys are hashes already: used as they are, not hashed again.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

impl DedupWindow {
    pub fn new(max_records: usize, max_age: Duration) -> Self {
        DedupWindow {
            max_records,
            max_age,
            seen: HashMap::default(),
            order: VecDeque::new(),
            epoch: Instant::now(),
            hasher: RandomState::new(),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }

    fn evict(&mut self, now: Instant) {
        let now = self.stamp(now);
        let max_age = nanos(self.max_age);
        while let Some(&(h, at)) = self.order.front() {
            if self.order.len() <= self.max_records && now.saturating_sub(at) < max_age {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&h) == Some(&at) {
                self.seen.remove(&h);
            }
        }
    }

    /// What the window keeps of `id`: its 64-bit hash under this window's random key (a
    /// sender cannot aim at a collision it cannot compute).
    pub fn key(&self, id: &(impl Hash + ?Sized)) -> Key {
        Key(self.hasher.hash_one(id))
    }

    /// The items whose ids were not accepted within the window, with their keys, each id once
    /// (a read receipt may name a message twice). A set past the first item, so a receipt
    /// naming thousands of messages costs linear time under the window's lock.
    pub fn unseen<T>(
        &mut self,
        items: Vec<T>,
        id: impl Fn(&T) -> &str,
        now: Instant,
    ) -> Vec<(Key, T)> {
        let mut named: HashSet<u64, BuildHasherDefault<Prehashed>> = HashSet::default();
        let several = items.len() > 1;
        let mut fresh = Vec::with_capacity(items.len());
        for item in items {
            let key = self.key(id(&item));
            if !self.contains(key, now) && (!several || named.insert(key.0)) {
                fresh.push((key, item));
            }
        }
        fresh
    }

    /// True when `key` was accepted within the window.
    pub fn contains(&mut self, key: Key, now: Instant) -> bool {
        self.evict(now);
        self.max_records > 0 && self.seen.contains_key(&key.0)
    }

    /// Remembers `key` as accepted (call only once it is safely stored).
    pub fn insert(&mut self, Key(h): Key, now: Instant) {
        if self.max_records == 0 {
            return;
        }
        let at = self.stamp(now);
        self.seen.insert(h, at);
        self.order.push_back((h, at));
        self.evict(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unseen_keeps_each_new_id_once() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(100, Duration::from_secs(60));
        w.insert(w.key("old"), t0);
        let items = vec!["a", "old", "b", "a", "c", "b"];
        let fresh = w.unseen(items, |s| s, t0);
        let ids: Vec<&str> = fresh.iter().map(|(_, s)| *s).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(fresh.iter().all(|(k, s)| *k == w.key(*s)));
        assert_eq!(w.unseen(vec!["old"], |s| s, t0).len(), 0);
        assert_eq!(w.unseen(vec!["new"], |s| s, t0).len(), 1);
    }

    #[test]
    fn an_absurdly_long_window_keeps_entries() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(10, Duration::MAX);
        let a = w.key("a");
        w.insert(a, t0);
        assert!(w.contains(a, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn remembers_within_count_and_age() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(3, Duration::from_secs(60));
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|id| w.key(id));
        assert!(!w.contains(a, t0));
        w.insert(a, t0);
        assert!(w.contains(a, t0));
        for k in [b, c, d] {
            w.insert(k, t0);
        }
        // Count bound: "a" is the oldest of four.
        assert!(!w.contains(a, t0));
        assert!(w.contains(d, t0));
        // Age bound.
        assert!(!w.contains(d, t0 + Duration::from_secs(61)));
        assert!(w.seen.is_empty() && w.order.is_empty());
    }

    #[test]
    fn zero_disables_it() {
        let mut w = DedupWindow::new(0, Duration::from_secs(60));
        let a = w.key("a");
        w.insert(a, Instant::now());
        assert!(!w.contains(a, Instant::now()));
    }
}
