//! The publisher's bookkeeping, free of Kafka: the records read from the spool and not yet
//! confirmed, which of them wait to be (re)sent, and how far the spool may be committed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::record::{Entry, Target};
use crate::spool::plant;

pub struct Pending {
    pub entry: Option<Entry>,
    pub attempts: u32,
    pub retry_at: Instant,
}

#[derive(Default)]
pub struct Ledger {
    /// Read from the spool and not yet confirmed, by sequence number.
    pending: BTreeMap<u64, Pending>,
    /// Of those, the ones waiting to be (re)sent. The rest are with the producer.
    unsent: BTreeSet<u64>,
    /// Spool entries this version cannot read: never sent, each holds the commit until an
    /// operator drops it. Kept by number only, outside `pending`, so they take no room in the
    /// in-flight window: the records behind them are still delivered.
    unreadable: BTreeSet<u64>,
    /// Refused by both topics: to be written to the dead-letter directory, with the reason.
    /// Never sent again, and holding no other record back: on a full disk, the segments
    /// freed by the records behind it make the room its write needs.
    dead: BTreeMap<u64, String>,
    /// Refused once: sent again alone before the refusal counts. Kafka refuses a whole batch
    /// for one record in it (`MSG_SIZE_TOO_LARGE` against the topic's `max.message.bytes`),
    /// so the records that lingered beside it were refused too. While any record of a topic is
    /// here, that topic's records go one at a time, each once the producer holds none of that
    /// topic's (a batch is one topic's); other topics flow.
    alone: BTreeSet<u64>,
}

fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(100u64 << attempts.min(6)).min(Duration::from_secs(5))
}

impl Ledger {
    pub fn add(&mut self, seq: u64, entry: Option<Entry>, now: Instant) {
        if entry.is_none() {
            self.unreadable.insert(seq);
            return;
        }
        self.unsent.insert(seq);
        self.pending.insert(
            seq,
            Pending {
                entry,
                attempts: 0,
                retry_at: now,
            },
        );
    }

    /// Records held in memory (unreadable entries are not: see `unreadable`).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.unreadable.is_empty()
    }

    /// Records handed to the producer and awaiting their delivery report.
    pub fn with_producer(&self) -> usize {
        self.pending.len() - self.unsent.len() - self.dead.len()
    }

    /// Unreadable entries holding the commit.
    pub fn unreadable(&self) -> usize {
        self.unreadable.len()
    }

    /// Read but not handed to the producer yet: waiting for room in its queue or a retry.
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    pub fn has_unreadable(&self) -> bool {
        !self.unreadable.is_empty()
    }

    /// Whether a record that failed at least once is still unconfirmed (scans the window:
    /// asked only while publishing is marked blocked).
    pub fn has_failed(&self) -> bool {
        self.pending.values().any(|p| p.attempts > 0)
    }

    pub fn entry(&self, seq: u64) -> Option<&Entry> {
        self.pending.get(&seq)?.entry.as_ref()
    }

    pub fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.pending.get_mut(&seq)?.entry.as_mut()
    }

    /// The records to send now, oldest first. Per topic (`topic` names each target's),
    /// nothing is sent past a record still waiting for its retry: a record retried after a
    /// newer one of the same key was delivered would arrive out of order. Another topic goes
    /// on: a missing per-kind topic must not hold the messages back.
    pub fn due<'a>(&self, now: Instant, topic: impl Fn(Target) -> &'a str) -> Vec<u64> {
        let mut held: Vec<&str> = Vec::new();
        let single: Vec<&str> = self
            .alone
            .iter()
            .filter_map(|seq| self.entry(*seq))
            .map(|e| topic(e.target))
            .collect();
        if !single.is_empty() {
            let with_producer = self
                .pending
                .iter()
                .filter(|(seq, _)| !self.unsent.contains(seq) && !self.dead.contains_key(seq))
                .filter_map(|(_, p)| p.entry.as_ref())
                .map(|e| topic(e.target));
            held.extend(with_producer.filter(|t| single.contains(t)));
        }
        let mut due = Vec::new();
        for &seq in &self.unsent {
            let Some(p) = self.pending.get(&seq) else {
                continue;
            };
            let Some(entry) = &p.entry else { continue };
            let t = topic(entry.target);
            if held.contains(&t) {
                continue;
            }
            if p.retry_at <= now {
                due.push(seq);
                if single.contains(&t) {
                    held.push(t);
                }
            } else {
                held.push(t);
            }
        }
        due
    }

    /// When the next retry falls due, if any record waits for one.
    pub fn next_retry(&self) -> Option<Instant> {
        self.unsent
            .iter()
            .chain(self.dead.keys())
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
        self.unreadable.remove(&seq);
        self.unsent.remove(&seq);
        self.dead.remove(&seq);
        self.alone.remove(&seq);
        self.pending.remove(&seq)
    }

    /// Refused by Kafka: true when it was sent alone, so the refusal is its own and final;
    /// otherwise it is sent again, alone, at once.
    pub fn refused(&mut self, seq: u64, now: Instant) -> bool {
        if self.alone.remove(&seq) || plant::active(plant::Plant::RefusalInBatchIsFinal) {
            return true;
        }
        if self.pending.contains_key(&seq) {
            self.alone.insert(seq);
            self.resend(seq, now);
        }
        false
    }

    /// Refused by the quarantine topic too: from now on it waits for its dead-letter write.
    pub fn dead_letter(&mut self, seq: u64, reason: &str, now: Instant) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.retry_at = now;
            self.unsent.remove(&seq);
            self.dead.insert(seq, reason.to_owned());
        }
    }

    /// Records waiting for their dead-letter write.
    pub fn dead_letters(&self) -> usize {
        self.dead.len()
    }

    /// The records whose dead-letter write is due, with their reasons.
    pub fn dead_letters_due(&self, now: Instant) -> Vec<(u64, String)> {
        self.dead
            .iter()
            .filter(|(seq, _)| self.pending.get(seq).is_some_and(|p| p.retry_at <= now))
            .map(|(seq, reason)| (*seq, reason.clone()))
            .collect()
    }

    /// To be tried again after a backoff (sent, or written to the dead-letter directory);
    /// returns the attempts so far.
    pub fn retry(&mut self, seq: u64, now: Instant) -> Option<u32> {
        let p = self.pending.get_mut(&seq)?;
        p.attempts += 1;
        p.retry_at = now + backoff(p.attempts);
        if !self.dead.contains_key(&seq) {
            self.unsent.insert(seq);
        }
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
            if p.entry.is_some() && !self.dead.contains_key(seq) {
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
        let first = self.pending.keys().next().into_iter();
        match first.chain(self.unreadable.first()).min() {
            Some(first) => first - 1,
            None => last_read,
        }
    }

    /// Whether any record `lo..=hi` awaits confirmation (or is unreadable).
    pub fn pending_in(&self, lo: u64, hi: u64) -> bool {
        lo <= hi
            && (self.pending.range(lo..=hi).next().is_some()
                || self.unreadable.range(lo..=hi).next().is_some())
    }

    #[cfg(test)]
    pub fn describe(&self) -> String {
        let first: Vec<_> = self.pending.keys().take(20).collect();
        format!(
            "pending {} (first {first:?}), unsent {:?}, unreadable {:?}, dead {:?}, alone {:?}",
            self.pending.len(),
            self.unsent.iter().take(20).collect::<Vec<_>>(),
            self.unreadable,
            self.dead,
            self.alone,
        )
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

    /// Messages and recalls on one topic, edits on their own, quarantine on its own.
    fn topic(t: Target) -> &'static str {
        match t {
            Target::Quarantine => "quarantine",
            Target::Edits => "edits",
            _ => "messages",
        }
    }

    fn entry(target: Target) -> Option<Entry> {
        Some(Entry::from(&crate::record::Record {
            target,
            key: None,
            headers: vec![],
            value: vec![],
            received_at_ms: 0,
        }))
    }

    #[test]
    fn nothing_overtakes_a_record_waiting_for_its_retry_on_the_same_topic() {
        let now = Instant::now();
        let mut l = Ledger::default();
        for seq in 1..=3 {
            l.add(seq, entry(Target::Messages), now);
        }
        l.add(4, entry(Target::Quarantine), now);
        assert_eq!(l.due(now, topic), [1, 2, 3, 4]);
        for seq in 1..=4 {
            l.sent(seq);
        }
        l.retry(2, now);
        l.add(5, entry(Target::Messages), now);
        l.add(6, entry(Target::Quarantine), now);
        // 5 must wait for 2; the quarantine topic goes on.
        assert_eq!(l.due(now, topic), [6]);
        assert_eq!(l.due(now + Duration::from_secs(1), topic), [2, 5, 6]);
    }

    #[test]
    fn a_kind_on_its_own_topic_waits_alone() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.add(1, entry(Target::Edits), now);
        l.add(2, entry(Target::Recalls), now);
        for seq in 1..=2 {
            l.sent(seq);
        }
        // The edit topic is missing: its record waits; messages and recalls (one topic) flow.
        l.retry(1, now);
        l.add(3, entry(Target::Messages), now);
        l.add(4, entry(Target::Edits), now);
        l.add(5, entry(Target::Recalls), now);
        assert_eq!(l.due(now, topic), [3, 5]);
        // A recall waiting holds back a message on the same topic.
        l.sent(3);
        l.sent(5);
        l.retry(5, now);
        l.add(6, entry(Target::Messages), now);
        assert_eq!(l.due(now, topic), Vec::<u64>::new());
    }

    #[test]
    fn a_record_waiting_for_its_dead_letter_write_holds_nothing_back() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut l = Ledger::default();
        l.add(1, entry(Target::Quarantine), now);
        l.add(2, entry(Target::Quarantine), now);
        l.sent(1);
        l.dead_letter(1, "refused", now);
        assert_eq!(l.dead_letters_due(now), [(1, "refused".to_owned())]);
        l.retry(1, now); // the write failed: the disk is full
        assert_eq!(
            l.due(now, topic),
            [2],
            "2 is not held behind 1's dead-letter write"
        );
        assert!(l.dead_letters_due(now).is_empty());
        assert_eq!(l.dead_letters_due(later).len(), 1);
        l.resend_all(now);
        assert_eq!(
            l.due(later, topic),
            [2],
            "a new producer never gets 1 again"
        );
        assert_eq!(l.with_producer(), 0);
        l.confirmed(1);
        assert!(l.dead_letters_due(later).is_empty());
        assert_eq!(l.commit_point(2), 1);
    }

    #[test]
    fn a_refused_record_goes_again_alone_before_its_refusal_counts() {
        let now = Instant::now();
        let mut l = Ledger::default();
        for seq in 1..=4 {
            l.add(seq, entry(Target::Messages), now);
        }
        l.add(5, entry(Target::Quarantine), now);
        assert_eq!(l.due(now, topic), [1, 2, 3, 4, 5]);
        for seq in 1..=5 {
            l.sent(seq);
        }
        // One batch refused whole: 1 and 2 were in it.
        assert!(!l.refused(1, now));
        assert_eq!(
            l.due(now, topic),
            Vec::<u64>::new(),
            "3 and 4 still with the producer"
        );
        l.add(8, entry(Target::Quarantine), now);
        assert_eq!(l.due(now, topic), [8], "another topic flows");
        l.sent(8);
        l.confirmed(8);
        assert!(!l.refused(2, now));
        l.confirmed(3);
        l.confirmed(4);
        l.confirmed(5);
        assert_eq!(l.due(now, topic), [1], "one at a time");
        l.sent(1);
        assert_eq!(l.due(now, topic), Vec::<u64>::new(), "nothing beside it");
        assert!(l.refused(1, now), "refused alone: its own refusal");
        l.resend(1, now); // rerouted to the quarantine topic
        assert_eq!(l.due(now, topic), [1]);
        l.sent(1);
        l.confirmed(1);
        assert_eq!(l.due(now, topic), [2]);
        l.sent(2);
        l.confirmed(2);
        l.add(6, entry(Target::Messages), now);
        l.add(7, entry(Target::Messages), now);
        assert_eq!(l.due(now, topic), [6, 7], "batches again once none waits");
    }

    #[test]
    fn a_failed_record_counts_until_it_is_confirmed() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.add(1, entry(Target::Messages), now);
        l.add(2, entry(Target::Quarantine), now);
        l.sent(1);
        l.sent(2);
        assert!(!l.has_failed());
        l.retry(2, now);
        l.confirmed(1);
        assert!(l.has_failed(), "2 still waits for its topic");
        l.sent(2);
        assert!(l.has_failed(), "resent, not yet confirmed");
        l.confirmed(2);
        assert!(!l.has_failed());
    }

    #[test]
    fn the_commit_stops_below_the_oldest_unconfirmed_and_unreadable_record() {
        let now = Instant::now();
        let mut l = Ledger::default();
        l.add(1, entry(Target::Messages), now);
        l.add(2, None, now);
        l.add(3, entry(Target::Messages), now);
        assert_eq!(
            l.due(now, topic),
            [1, 3],
            "the unreadable one is never sent"
        );
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
