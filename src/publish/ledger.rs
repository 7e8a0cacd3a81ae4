//! The publisher's bookkeeping, free of Kafka: the records read from the spool and not yet
//! confirmed, which of them wait to be (re)sent, and how far the spool may be committed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::entry::{Entry, Target};
use crate::spool::plant;

pub struct Pending {
    /// `None`: the spool held bytes this version cannot read; never sent, it holds the commit
    /// until an operator drops it.
    pub entry: Option<Entry>,
    pub attempts: u32,
    pub retry_at: Instant,
}

#[derive(Default)]
pub struct Ledger {
    /// Read from the spool and not yet confirmed, by sequence number.
    pending: BTreeMap<u64, Pending>,
    /// Of those, the ones waiting to be (re)sent. The rest are with the producer, or
    /// unreadable.
    unsent: BTreeSet<u64>,
    unreadable: BTreeSet<u64>,
}

fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(100u64 << attempts.min(6)).min(Duration::from_secs(5))
}

impl Ledger {
    pub fn add(&mut self, seq: u64, entry: Option<Entry>, now: Instant) {
        if entry.is_some() {
            self.unsent.insert(seq);
        } else {
            self.unreadable.insert(seq);
        }
        self.pending.insert(
            seq,
            Pending {
                entry,
                attempts: 0,
                retry_at: now,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records handed to the producer and awaiting their delivery report.
    pub fn with_producer(&self) -> usize {
        self.pending.len() - self.unsent.len() - self.unreadable.len()
    }

    pub fn has_unreadable(&self) -> bool {
        !self.unreadable.is_empty()
    }

    pub fn entry(&self, seq: u64) -> Option<&Entry> {
        self.pending.get(&seq)?.entry.as_ref()
    }

    pub fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.pending.get_mut(&seq)?.entry.as_mut()
    }

    /// The records to send now, oldest first. Per topic, nothing is sent past a record still
    /// waiting for its retry: a record retried after a newer one of the same key was
    /// delivered would arrive out of order.
    pub fn due(&self, now: Instant) -> Vec<u64> {
        let mut held = [false; 2];
        let mut due = Vec::new();
        for &seq in &self.unsent {
            let Some(p) = self.pending.get(&seq) else {
                continue;
            };
            let Some(entry) = &p.entry else { continue };
            let t = usize::from(entry.target == Target::Quarantine);
            if held[t] {
                continue;
            }
            if p.retry_at <= now {
                due.push(seq);
            } else {
                held[t] = true;
            }
        }
        due
    }

    /// When the next retry falls due, if any record waits for one.
    pub fn next_retry(&self) -> Option<Instant> {
        self.unsent
            .iter()
            .filter_map(|seq| self.pending.get(seq))
            .map(|p| p.retry_at)
            .min()
    }

    /// Handed to the producer.
    pub fn sent(&mut self, seq: u64) {
        self.unsent.remove(&seq);
    }

    /// Kafka confirmed it (or it was kept elsewhere for good): done.
    pub fn confirmed(&mut self, seq: u64) -> Option<Pending> {
        self.unsent.remove(&seq);
        self.pending.remove(&seq)
    }

    /// To be sent again after a backoff; returns the attempts so far.
    pub fn retry(&mut self, seq: u64, now: Instant) -> Option<u32> {
        let p = self.pending.get_mut(&seq)?;
        p.attempts += 1;
        p.retry_at = now + backoff(p.attempts);
        self.unsent.insert(seq);
        Some(p.attempts)
    }

    /// To be sent again at once (rerouted, say).
    pub fn resend(&mut self, seq: u64, now: Instant) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.retry_at = now;
            self.unsent.insert(seq);
        }
    }

    /// A new producer: everything readable and unconfirmed goes again, in order.
    pub fn resend_all(&mut self, now: Instant) {
        for (seq, p) in &mut self.pending {
            if p.entry.is_some() {
                p.retry_at = now;
                self.unsent.insert(*seq);
            }
        }
    }

    /// How far the spool may be committed: below the oldest unconfirmed record, or through
    /// `last_read` when nothing is pending.
    pub fn commit_point(&self, last_read: u64) -> u64 {
        if plant::active(plant::Plant::CommitPastUnconfirmed) {
            return last_read;
        }
        match self.pending.keys().next() {
            Some(first) => first - 1,
            None => last_read,
        }
    }

    /// Whether any record `lo..=hi` awaits confirmation.
    pub fn pending_in(&self, lo: u64, hi: u64) -> bool {
        lo <= hi && self.pending.range(lo..=hi).next().is_some()
    }

    /// Unix ms the oldest pending record arrived (sequence order is arrival order).
    pub fn oldest_received_ms(&self) -> Option<u64> {
        self.pending
            .values()
            .find_map(|p| p.entry.as_ref())
            .map(|e| e.received_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: Target) -> Option<Entry> {
        Some(Entry {
            target,
            key: None,
            headers: vec![],
            value: vec![],
            received_at_ms: 0,
        })
    }

    #[test]
    fn nothing_overtakes_a_record_waiting_for_its_retry_on_the_same_topic() {
        let now = Instant::now();
        let mut l = Ledger::default();
        for seq in 1..=3 {
            l.add(seq, entry(Target::Messages), now);
        }
        l.add(4, entry(Target::Quarantine), now);
        assert_eq!(l.due(now), [1, 2, 3, 4]);
        for seq in 1..=4 {
            l.sent(seq);
        }
        l.retry(2, now);
        l.add(5, entry(Target::Messages), now);
        l.add(6, entry(Target::Quarantine), now);
        // 5 must wait for 2; the quarantine topic goes on.
        assert_eq!(l.due(now), [6]);
        assert_eq!(l.due(now + Duration::from_secs(1)), [2, 5, 6]);
    }

    #[test]
    fn the_commit_stops_below_the_oldest_unconfirmed_and_unreadable_record() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.add(1, entry(Target::Messages), now);
        l.add(2, None, now);
        l.add(3, entry(Target::Messages), now);
        assert_eq!(l.due(now), [1, 3], "the unreadable one is never sent");
        l.sent(1);
        l.sent(3);
        assert_eq!(l.with_producer(), 2);
        l.confirmed(3);
        assert_eq!(l.commit_point(3), 0);
        l.confirmed(1);
        assert_eq!(l.commit_point(3), 1, "held by the unreadable record");
        assert!(l.has_unreadable());
        l.confirmed(2);
        assert_eq!(l.commit_point(3), 3);
    }
}
