//! Stage 5 of the road: **publish**. A background thread reads the spool from its committed
//! position, produces each record with an idempotent librdkafka producer (`acks=all`), and
//! advances the committed position only over records whose delivery Kafka confirmed — the
//! contiguous prefix, since reports arrive out of order across partitions. Knows Kafka and
//! spool positions; never HTTP.
//!
//! The rule: an acknowledged record leaves the spool only when Kafka confirmed it, on its
//! topic or — refused there for good — on the quarantine topic with its reason; refused by
//! that too, it is kept in the spool's dead-letter directory. Every other error makes it wait
//! (`classify` is the one table), with the reason in `im_relay_publish_blocked{reason}`.

pub mod durability;
mod kafka;
pub mod ledger;
mod left;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::KafkaConfig;
use crate::domain::unix_millis;
use crate::record::{Entry, Target, View};
use crate::spool;
use crate::telemetry::Event as _;
use crate::telemetry::{
    Blocked, ProducerRebuilt, PublishBlocked, PublishRetried, PublisherGauges, RecordDeadLettered,
    RecordPublished, RecordRefused, SpoolCommitFailed, SpoolEntryUnreadable, SpoolReadFailed,
};
pub use kafka::{KafkaSink, Reporter, classify};
use ledger::Ledger;
pub use left::{Drained, drain};

/// What to do with a record Kafka did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Keep it and retry with backoff (rebuilding the producer for `ProducerFatal`).
    Wait(Blocked),
    /// Refused for good: to the quarantine topic with the reason (or, refused there too, to
    /// the dead-letter directory).
    Refused,
}

/// Why Kafka did not take a record: what to do, and the error's text for the log and the
/// quarantine header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub disposition: Disposition,
    pub error: String,
}

/// What wakes the publisher thread.
pub enum Event {
    /// The spool has new records.
    Appended,
    Delivered {
        generation: u64,
        seq: u64,
        result: Result<(), Failure>,
    },
    /// The producer reported a fatal error outside any delivery (error callback).
    Fatal {
        generation: u64,
    },
    /// A broker refused the client's credentials (SASL), outside any delivery: records would
    /// only time out, much later, as if the broker were away.
    CredentialsRefused {
        generation: u64,
    },
    /// A broker is up for this client (connected and, with SASL, authenticated): librdkafka's
    /// statistics say so every few seconds, traffic or not.
    CredentialsAccepted {
        generation: u64,
    },
    Stop,
}

/// Where records go: librdkafka in production, a simulated broker in the simulation tests.
/// Delivery reports come back as `Event::Delivered` with the sink's generation.
pub trait Sink {
    /// Hands one record to the producer.
    fn send(&mut self, topic: &str, seq: u64, entry: &View<'_>) -> Result<(), SendError>;
    /// Replaces the producer (purging the old one's queue); reports from the old one are
    /// ignored from now on.
    fn rebuild(&mut self, generation: u64) -> Result<(), String>;
    /// The producer's fatal error, if it is in a fatal state.
    fn fatal(&self) -> Option<String>;
    /// Why records for `topic` time out, when the cluster's metadata says: a missing topic
    /// or a refused authorization (librdkafka reports both as a timeout while it still
    /// waits for the topic to appear). May block for a second.
    fn explain(&mut self, _topic: &str) -> Option<Blocked> {
        None
    }
}

pub enum SendError {
    /// The producer's queue is full: try again shortly.
    QueueFull,
    Failed(Failure),
}

/// Records refused by both topics held in memory while their dead-letter write fails (a
/// full disk), beyond the in-flight bound. Past it, reading stops until the disk has room.
const MAX_DEAD_LETTERS_WAITING: usize = 1024;

/// Unreadable entries held (by number, a few dozen bytes each) beyond the in-flight bound.
/// Past it, reading stops until an operator drops them (`im-relay spool drop
/// --all-unreadable`).
const MAX_UNREADABLE_HELD: usize = 100_000;

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub kafka: KafkaConfig,
    /// Records handed to the producer and not yet confirmed, at most. Bounds memory while
    /// Kafka is away: the backlog waits on disk, not in RAM.
    pub max_in_flight: usize,
}

pub struct Publisher<S: Sink = KafkaSink> {
    cfg: PublisherConfig,
    reader: spool::Reader,
    shared: Arc<spool::Shared>,
    sink: S,
    generation: u64,
    events: Option<mpsc::Receiver<Event>>,
    ledger: Ledger,
    blocked: Option<Blocked>,
    last_gauges: Instant,
    /// When Kafka last confirmed a record, and when the producer was last (re)built.
    last_delivery: Instant,
    built_at: Instant,
    rebuild: bool,
    rebuild_after: Instant,
    /// Rebuilds since Kafka last confirmed a record: the next one waits `rebuild_backoff`.
    rebuilds: u32,
    read_buf: VecDeque<(u64, Vec<u8>)>,
    read_failing: bool,
    /// What the metadata said about the last timeouts, and when it was asked.
    /// The last metadata answer per topic, and when it was asked.
    explained: BTreeMap<String, (Instant, Option<Blocked>)>,
    /// What Kafka made of this process's credentials, shared with `/readyz` (see
    /// `credentials`).
    credentials: Arc<AtomicU8>,
    /// A broker refused the credentials, and none has been up since.
    refused_now: bool,
}

/// `Publisher::credentials`: no word from Kafka yet.
pub const CREDENTIALS_UNKNOWN: u8 = 0;
/// A broker was up for this process at least once (or took a record).
pub const CREDENTIALS_ACCEPTED: u8 = 1;
/// Refused, and never accepted since this process started.
pub const CREDENTIALS_REFUSED: u8 = 2;

/// The longest the loop sleeps with nothing to do (gauges are refreshed on its turns).
const IDLE: Duration = Duration::from_millis(100);

impl Publisher<KafkaSink> {
    /// Creates the producer (so bad Kafka settings fail at startup) around an open spool.
    pub fn new(
        cfg: PublisherConfig,
        reader: spool::Reader,
        shared: Arc<spool::Shared>,
        events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let sink = KafkaSink::new(&cfg.kafka, events.0, 0)?;
        let now = Instant::now();
        Ok(Self::with_sink(
            cfg,
            reader,
            shared,
            sink,
            Some(events.1),
            now,
        ))
    }

    /// Runs until `Event::Stop`, then flushes for up to `flush_timeout` and commits.
    pub fn spawn(mut self, flush_timeout: Duration) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                self.run();
                self.drain(flush_timeout);
            })
    }
}

impl<S: Sink> Publisher<S> {
    pub fn with_sink(
        cfg: PublisherConfig,
        reader: spool::Reader,
        shared: Arc<spool::Shared>,
        sink: S,
        events: Option<mpsc::Receiver<Event>>,
        now: Instant,
    ) -> Self {
        Publisher {
            cfg,
            reader,
            shared,
            sink,
            generation: 0,
            events,
            ledger: Ledger::default(),
            blocked: None,
            last_gauges: now,
            last_delivery: now,
            built_at: now,
            rebuild: false,
            rebuild_after: now,
            rebuilds: 0,
            read_buf: VecDeque::new(),
            read_failing: false,
            explained: BTreeMap::new(),
            credentials: Arc::new(AtomicU8::new(CREDENTIALS_UNKNOWN)),
            refused_now: false,
        }
    }

    /// What Kafka made of the credentials (`CREDENTIALS_*`). `/readyz` is red while they are
    /// refused and were never accepted since start: a relay started with a wrong password is
    /// not ready, so a rollout with a bad Secret stops at its first pod while the old ones
    /// serve. A relay a broker has accepted stays ready when credentials fail later: pulling
    /// every pod would refuse Tencent's callbacks, which are never sent again; the spool holds
    /// them, the blocked reason and its alert say why.
    pub fn credentials(&self) -> Arc<AtomicU8> {
        self.credentials.clone()
    }

    fn credentials_accepted(&mut self) {
        self.credentials
            .store(CREDENTIALS_ACCEPTED, Ordering::Relaxed);
        if std::mem::take(&mut self.refused_now) {
            self.unblock();
        }
    }

    fn run(&mut self) {
        const GATHER: Duration = Duration::from_millis(1);
        let Some(events) = self.events.take() else {
            return;
        };
        loop {
            let now = Instant::now();
            let wait = self
                .ledger
                .next_retry()
                .map_or(IDLE, |at| at.saturating_duration_since(now).min(IDLE));
            let mut stop = false;
            if let Ok(first) = events.recv_timeout(wait) {
                // Woken: a moment for the spool's next batches and the producer's next
                // delivery reports to arrive, so that one turn takes them all. A wake-up per
                // batch and per report cost more CPU than the work (BENCHMARKS.md). It adds up
                // to 1 ms to a record's way to Kafka (the producer lingers longer anyway),
                // nothing to its acknowledgement. `Stop` may come in the same turn as the last
                // records: `drain` reads the spool to its end.
                std::thread::sleep(GATHER);
                let now = Instant::now();
                stop |= self.handle(first, now);
                while let Ok(more) = events.try_recv() {
                    stop |= self.handle(more, now);
                }
            }
            if stop {
                self.events = Some(events);
                return;
            }
            self.step(Instant::now());
        }
    }

    /// One turn of the loop after the events: rebuild if due, send what is due, read more,
    /// commit.
    pub fn step(&mut self, now: Instant) {
        if self.rebuild && now >= self.rebuild_after {
            self.rebuild_sink(now);
        }
        self.write_dead_letters(now);
        self.send_due(now);
        self.fill(now);
        self.commit(false, now);
    }

    /// Returns true on `Stop`.
    pub fn handle(&mut self, event: Event, now: Instant) -> bool {
        match event {
            Event::Appended => false,
            Event::Stop => true,
            Event::Delivered { generation, .. }
            | Event::Fatal { generation }
            | Event::CredentialsRefused { generation }
            | Event::CredentialsAccepted { generation }
                if generation != self.generation =>
            {
                false
            }
            Event::Fatal { .. } => {
                let error = self.sink.fatal().unwrap_or_else(|| "fatal error".into());
                self.set_blocked(Some(Blocked::ProducerFatal), &error);
                self.rebuild = true;
                false
            }
            Event::CredentialsRefused { .. } => {
                self.refused_now = true;
                let _ = self.credentials.compare_exchange(
                    CREDENTIALS_UNKNOWN,
                    CREDENTIALS_REFUSED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                self.set_blocked(
                    Some(Blocked::AuthenticationFailed),
                    &"a broker refused the SASL credentials (user and password or mechanism, or \
                      the OIDC token)",
                );
                false
            }
            Event::CredentialsAccepted { .. } => {
                self.credentials_accepted();
                false
            }
            Event::Delivered {
                seq,
                result: Ok(()),
                ..
            } => {
                self.last_delivery = now;
                self.rebuilds = 0;
                self.credentials_accepted();
                if let Some(p) = self.ledger.confirmed(seq)
                    && let Some(entry) = p.entry
                {
                    RecordPublished {
                        latency: Duration::from_millis(
                            unix_millis().saturating_sub(entry.received_at_ms),
                        ),
                    }
                    .emit();
                }
                self.unblock();
                false
            }
            Event::Delivered {
                seq,
                result: Err(failure),
                ..
            } => {
                self.failed(seq, failure, now);
                false
            }
        }
    }

    /// A record Kafka did not take, synchronously or in its delivery report.
    fn failed(&mut self, seq: u64, failure: Failure, now: Instant) {
        match failure.disposition {
            Disposition::Wait(mut reason) => {
                if reason == Blocked::BrokerUnavailable {
                    reason = if self.refused_now {
                        // Timed out because no broker takes the credentials.
                        Blocked::AuthenticationFailed
                    } else {
                        self.explain(seq, now).unwrap_or(reason)
                    };
                }
                if reason == Blocked::ProducerFatal || self.sink.fatal().is_some() {
                    self.rebuild = true;
                }
                // Failing, and nothing confirmed for a whole message timeout: the producer may
                // be stuck in a state it does not leave by itself (seen after a broker froze
                // for a minute: every resend timed out until a restart). A new one starts
                // clean; the records wait in the ledger and in the spool meanwhile.
                let stuck = self.cfg.kafka.message_timeout;
                if now.duration_since(self.last_delivery) >= stuck
                    && now.duration_since(self.built_at) >= stuck
                {
                    self.rebuild = true;
                }
                self.set_blocked(Some(reason), &failure.error);
                if let Some(attempts) = self.ledger.retry(seq, now) {
                    PublishRetried {
                        error: &failure.error,
                        attempts,
                    }
                    .emit();
                }
            }
            Disposition::Refused => self.refused(seq, &failure.error, now),
        }
    }

    /// A timeout may hide a missing topic: asks the metadata, at most every 5 s (the answer is
    /// kept meanwhile, also across deliveries that succeed: with one topic failing and the
    /// other flowing, asking on every timeout would stall this thread a second each time), so
    /// the blocked reason tells the operator what to fix.
    fn explain(&mut self, seq: u64, now: Instant) -> Option<Blocked> {
        const EVERY: Duration = Duration::from_secs(5);
        let target = self.ledger.entry(seq)?.target;
        let topic = self.cfg.kafka.topic_for(target);
        if let Some((at, reason)) = self.explained.get(topic)
            && now.duration_since(*at) < EVERY
        {
            return *reason;
        }
        let reason = self.sink.explain(topic);
        self.explained.insert(topic.to_owned(), (now, reason));
        reason
    }

    /// Refused for good: a message goes to the quarantine topic with the reason; a record the
    /// quarantine topic refused goes to the dead-letter directory. Only once it was refused
    /// alone: a batch is refused whole for one record in it.
    fn refused(&mut self, seq: u64, error: &str, now: Instant) {
        if !self.ledger.refused(seq, now) {
            tracing::info!(seq, error, "record refused by Kafka; sent again alone");
            return;
        }
        let Some(entry) = self.ledger.entry_mut(seq) else {
            return;
        };
        match entry.target {
            Target::Messages
            | Target::Recalls
            | Target::Edits
            | Target::ReadReports
            | Target::ReadReceipts => {
                RecordRefused { error: &error }.emit();
                entry.quarantine("kafka_refused", error);
                self.ledger.resend(seq, now);
            }
            Target::Quarantine => {
                self.ledger.dead_letter(seq, error, now);
                self.write_dead_letters(now);
            }
        }
    }

    /// Writes the records both topics refused to the dead-letter directory; a failed write (a
    /// full disk) is tried again later, holding no other record back.
    fn write_dead_letters(&mut self, now: Instant) {
        for (seq, error) in self.ledger.dead_letters_due(now) {
            let Some(entry) = self.ledger.entry(seq) else {
                continue;
            };
            match self.reader.dead_letter(seq, entry.bytes(), &error) {
                Ok(()) => {
                    RecordDeadLettered { seq, error: &error }.emit();
                    self.ledger.confirmed(seq);
                    self.unblock();
                }
                Err(io) => {
                    self.set_blocked(Some(Blocked::DeadLetterFailing), &io);
                    self.ledger.retry(seq, now);
                }
            }
        }
    }

    /// Something went through: no longer blocked — unless by an unreadable entry, or while a
    /// record that failed still waits (one topic missing while the other flows must not flip
    /// the gauge back to 0 on every delivery, or the alert's `for` never elapses).
    fn unblock(&mut self) {
        if self.blocked.is_some() {
            let still = if self.ledger.has_unreadable() {
                Some(Blocked::EntryUnreadable)
            } else if self.ledger.has_failed() {
                self.blocked
            } else {
                None
            };
            self.set_blocked(still, &"");
        }
    }

    fn set_blocked(&mut self, reason: Option<Blocked>, error: &dyn std::fmt::Display) {
        if self.blocked != reason {
            self.blocked = reason;
            PublishBlocked { reason, error }.emit();
        }
    }

    /// A fatal error, or no delivery for a whole message timeout: a new producer, and every
    /// unconfirmed record again, in order. The next rebuild waits 1 s, doubling up to 32 s
    /// until a record is confirmed, whether this one succeeded or not: a fatal state that
    /// comes straight back (a fenced or misconfigured producer) must not rebuild in a loop.
    fn rebuild_sink(&mut self, now: Instant) {
        self.built_at = now;
        let fatal = self.sink.fatal();
        let result = self.sink.rebuild(self.generation + 1);
        ProducerRebuilt {
            in_flight: self.ledger.len(),
            fatal: fatal.as_deref(),
            since_last_delivery: now.duration_since(self.last_delivery),
            failed: result.as_ref().err(),
        }
        .emit();
        self.rebuild_after = now + Duration::from_secs(1 << self.rebuilds.min(5));
        self.rebuilds = self.rebuilds.saturating_add(1);
        if result.is_ok() {
            self.generation += 1;
            self.rebuild = false;
            self.ledger.resend_all(now);
        }
    }

    /// Reads new records from the spool, up to the in-flight bound, and sends them.
    fn fill(&mut self, now: Instant) {
        // Records waiting for their dead-letter write (on a full disk) take no room: reading
        // on delivers the records behind them, which frees the segments that write needs.
        // They are bounded on their own.
        let max = self.cfg.max_in_flight;
        let dead = self.ledger.dead_letters();
        let room = if dead >= max.max(MAX_DEAD_LETTERS_WAITING)
            || self.ledger.unreadable() >= MAX_UNREADABLE_HELD
        {
            0
        } else {
            max.saturating_sub(self.ledger.len() - dead)
        };
        if room > 0 {
            // On an error, what was read before it is in `read_buf`; the next turn reads on
            // from there.
            match self.reader.read(room, &mut self.read_buf) {
                Ok(_) => self.read_failing = false,
                Err(error) => {
                    if spool::plant::active(spool::plant::Plant::ReadBufferDroppedOnError) {
                        self.read_buf.clear();
                    }
                    SpoolReadFailed {
                        error: &error,
                        first: !self.read_failing,
                    }
                    .emit();
                    self.read_failing = true;
                }
            }
        }
        if self.read_buf.is_empty() {
            return;
        }
        while let Some((seq, bytes)) = self.read_buf.pop_front() {
            let version = bytes.first().copied();
            let entry = Entry::new(bytes);
            if entry.is_none() {
                // Checksummed, so another version's format (an upgrade or a rollback): it
                // waits, holding the commit, for that version or an operator's drop.
                SpoolEntryUnreadable { seq, version }.emit();
                self.set_blocked(Some(Blocked::EntryUnreadable), &"unreadable spool entry");
            }
            self.ledger.add(seq, entry, now);
        }
        self.send_due(now);
    }

    /// Sends every record whose time has come, oldest first; stops at the first that is not
    /// taken.
    fn send_due(&mut self, now: Instant) {
        let kafka = &self.cfg.kafka;
        for seq in self.ledger.due(now, |t| kafka.topic_for(t)) {
            let Some(entry) = self.ledger.entry(seq) else {
                continue;
            };
            match self
                .sink
                .send(self.cfg.kafka.topic_for(entry.target), seq, &entry.view())
            {
                Ok(()) => self.ledger.sent(seq),
                Err(SendError::QueueFull) => {
                    self.ledger.resend(seq, now + Duration::from_millis(10));
                    break;
                }
                Err(SendError::Failed(_))
                    if spool::plant::active(spool::plant::Plant::SendFailureTakenAsSent) =>
                {
                    self.ledger.sent(seq);
                }
                Err(SendError::Failed(failure)) => {
                    self.failed(seq, failure, now);
                    break;
                }
            }
        }
    }

    /// Commits the contiguous prefix of confirmed records.
    fn commit(&mut self, force: bool, now: Instant) {
        let committed = self.ledger.commit_point(self.reader.last_read());
        let ledger = &self.ledger;
        let unconfirmed = |lo, hi| ledger.pending_in(lo, hi);
        if let Err(error) = self.reader.commit(committed, force, now, unconfirmed) {
            SpoolCommitFailed { error: &error }.emit();
        }
        // Gauges are read at scrape time: ten updates a second are plenty.
        if !force && now.duration_since(self.last_gauges) < Duration::from_millis(100) {
            return;
        }
        self.last_gauges = now;
        let oldest_ms = self.ledger.oldest_received_ms();
        self.shared.set_oldest_unpublished_ms(oldest_ms);
        let oldest = oldest_ms.map(|at| Duration::from_millis(unix_millis().saturating_sub(at)));
        PublisherGauges {
            backlog_records: self.shared.backlog(),
            spool_bytes: self.shared.bytes(),
            spool_max_bytes: self.shared.max_bytes(),
            in_flight: self.ledger.len(),
            oldest_unpublished: oldest.unwrap_or_default(),
        }
        .emit();
    }

    /// On shutdown: give what was handed over `timeout` to be confirmed, then commit. What is
    /// left stays in the spool for the next start.
    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let events = self.events.take();
        // The spool is read to its end too, not only what the ledger holds: the last records'
        // wake-up can arrive in the same turn as `Stop`, and they were acknowledged. Records
        // waiting in the ledger (for room in the producer's queue, or a retry) are waited for.
        loop {
            let now = Instant::now();
            let read_before = self.reader.last_read();
            self.write_dead_letters(now);
            self.send_due(now);
            self.fill(now);
            let read_more = self.reader.last_read() != read_before;
            let settled =
                !read_more && self.ledger.with_producer() == 0 && !self.ledger.has_unsent();
            let now = Instant::now();
            let Some(events) = events.as_ref().filter(|_| !settled && now < deadline) else {
                break;
            };
            let wait = self
                .ledger
                .next_retry()
                .map_or(IDLE, |at| at.saturating_duration_since(now).min(IDLE))
                .min(deadline - now);
            if let Ok(first) = events.recv_timeout(wait) {
                let now = Instant::now();
                self.handle(first, now);
                while let Ok(more) = events.try_recv() {
                    self.handle(more, now);
                }
            }
        }
        self.commit(true, Instant::now());
        tracing::info!(
            left_in_spool = self.shared.backlog(),
            "publisher stopped; the rest is published on the next start"
        );
    }

    /// The ledger, the sink and the reader, for the simulation tests.
    #[cfg(test)]
    pub(crate) fn parts(&mut self) -> (&Ledger, &mut S, &mut spool::Reader) {
        (&self.ledger, &mut self.sink, &mut self.reader)
    }

    /// What the publisher holds and why, for a stuck simulation's report.
    #[cfg(test)]
    pub(crate) fn describe(&self) -> String {
        format!(
            "blocked {:?}, read failing {}, buffered {}, last read {}, {}",
            self.blocked,
            self.read_failing,
            self.read_buf.len(),
            self.reader.last_read(),
            self.ledger.describe()
        )
    }

    /// A simulated sink starts at the broker's generation.
    #[cfg(test)]
    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }
}
