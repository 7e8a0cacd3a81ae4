//! Stage 5 of the road: **publish**. A background thread reads the spool from its committed
//! position, produces each record with an idempotent librdkafka producer (`acks=all`), and
//! advances the committed position only over records whose delivery Kafka confirmed — the
//! contiguous prefix, since reports arrive out of order across partitions. Failed deliveries
//! are retried from memory with backoff; a fatal (idempotence) error rebuilds the producer and
//! resends every unconfirmed record. Knows Kafka and spool positions; never HTTP.

pub mod entry;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};

use crate::config::KafkaConfig;
use crate::domain::unix_millis;
use crate::spool;
use crate::telemetry::{
    KafkaStatistics, PublishFailed, PublishRetried, PublisherGauges, RecordPublished,
};
pub use entry::{Entry, Target};

/// What wakes the publisher thread.
pub enum Event {
    /// The spool has new records.
    Appended,
    Delivered {
        generation: u64,
        seq: u64,
        error: Option<KafkaError>,
    },
    Stop,
}

/// Producer callbacks: delivery reports go to the publisher thread; librdkafka's logs become
/// ours.
pub struct Reporter {
    events: mpsc::Sender<Event>,
    /// Which producer instance this is: reports from a replaced one are ignored.
    generation: u64,
}

impl ClientContext for Reporter {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        KafkaStatistics(&statistics).emit();
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker connection errors land here; librdkafka reconnects by itself, and the spool
        // holds the records meanwhile.
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for Reporter {
    /// The record's spool sequence number.
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Box<u64>) {
        let _ = self.events.send(Event::Delivered {
            generation: self.generation,
            seq: *seq,
            error: result.as_ref().err().map(|(e, _)| e.clone()),
        });
    }
}

/// The librdkafka configuration for our settings: idempotent, `acks=all`, batches compressed.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "im-relay")
        // Idempotence implies acks=all and bounded in-flight requests; both stated for clarity.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.queue_max_messages.to_string(),
        )
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        // Feeds the broker gauges (RTT, in-flight, retries, errors).
        .set("statistics.interval.ms", "5000")
        .set("security.protocol", &cfg.security_protocol);
    if let Some(m) = &cfg.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &cfg.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &cfg.sasl_password {
        c.set("sasl.password", p.expose());
    }
    if let Some(ca) = &cfg.ssl_ca_location {
        c.set("ssl.ca.location", ca.to_string_lossy());
    }
    c
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub kafka: KafkaConfig,
    /// Records handed to the producer and not yet confirmed, at most. Bounds memory while
    /// Kafka is away: the backlog waits on disk, not in RAM.
    pub max_in_flight: usize,
}

struct Pending {
    entry: Entry,
    attempts: u32,
    retry_at: Instant,
}

pub struct Publisher {
    cfg: PublisherConfig,
    reader: spool::Reader,
    shared: Arc<spool::Shared>,
    producer: ThreadedProducer<Reporter>,
    generation: u64,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    /// Read from the spool and not yet confirmed, by sequence number.
    pending: BTreeMap<u64, Pending>,
    /// The pending records not with the producer: waiting to be (re)sent, oldest first. The
    /// rest are in librdkafka's hands, awaiting their delivery report.
    unsent: BTreeSet<u64>,
    last_gauges: Instant,
    /// When Kafka last confirmed a record, and when the producer was last (re)built.
    last_delivery: Instant,
    built_at: Instant,
    rebuild: bool,
    read_buf: VecDeque<(u64, Vec<u8>)>,
}

fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(100u64 << attempts.min(6)).min(Duration::from_secs(5))
}

impl Publisher {
    /// Creates the producer (so bad Kafka settings fail at startup) around an open spool.
    pub fn new(
        cfg: PublisherConfig,
        reader: spool::Reader,
        shared: Arc<spool::Shared>,
        events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    ) -> Result<Self, KafkaError> {
        let producer = Self::producer(&cfg.kafka, events.0.clone(), 0)?;
        Ok(Publisher {
            cfg,
            reader,
            shared,
            producer,
            generation: 0,
            events_tx: events.0,
            events: events.1,
            pending: BTreeMap::new(),
            unsent: BTreeSet::new(),
            last_gauges: Instant::now(),
            last_delivery: Instant::now(),
            built_at: Instant::now(),
            rebuild: false,
            read_buf: VecDeque::new(),
        })
    }

    fn producer(
        cfg: &KafkaConfig,
        events: mpsc::Sender<Event>,
        generation: u64,
    ) -> Result<ThreadedProducer<Reporter>, KafkaError> {
        client_config(cfg).create_with_context(Reporter { events, generation })
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

    fn run(&mut self) {
        loop {
            let idle = Duration::from_millis(100);
            let wait = self
                .unsent
                .iter()
                .filter_map(|seq| self.pending.get(seq))
                .map(|p| p.retry_at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(idle)
                .min(idle);
            let mut stop = false;
            if let Ok(first) = self.events.recv_timeout(wait) {
                stop |= self.handle(first);
                while let Ok(more) = self.events.try_recv() {
                    stop |= self.handle(more);
                }
            }
            if stop {
                return;
            }
            if self.rebuild {
                self.rebuild_producer();
            }
            self.send_due();
            self.fill();
            self.commit(false);
        }
    }

    /// Returns true on `Stop`.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Appended => false,
            Event::Stop => true,
            Event::Delivered { generation, .. } if generation != self.generation => false,
            Event::Delivered {
                seq, error: None, ..
            } => {
                self.last_delivery = Instant::now();
                self.unsent.remove(&seq);
                if let Some(p) = self.pending.remove(&seq) {
                    RecordPublished {
                        latency: Duration::from_millis(
                            unix_millis().saturating_sub(p.entry.received_at_ms),
                        ),
                    }
                    .emit();
                }
                false
            }
            Event::Delivered {
                seq,
                error: Some(error),
                ..
            } => {
                if self.producer.client().fatal_error().is_some() {
                    self.rebuild = true;
                }
                // Failing, and nothing confirmed for a whole message timeout: the producer may
                // be stuck in a state it does not leave by itself (seen after a broker froze
                // for a minute: every resend timed out until a restart). A new one starts
                // clean; the records wait in `pending` and in the spool meanwhile.
                let stuck = Duration::from_millis(self.cfg.kafka.message_timeout_ms);
                if self.last_delivery.elapsed() >= stuck && self.built_at.elapsed() >= stuck {
                    self.rebuild = true;
                }
                if let Some(p) = self.pending.get_mut(&seq) {
                    self.unsent.insert(seq);
                    p.attempts += 1;
                    p.retry_at = Instant::now() + backoff(p.attempts);
                    PublishRetried {
                        error: &error,
                        attempts: p.attempts,
                    }
                    .emit();
                }
                false
            }
        }
    }

    /// A fatal error (the idempotent producer lost its sequence state), or no delivery for a
    /// whole message timeout: start a new producer and resend everything unconfirmed, in order.
    fn rebuild_producer(&mut self) {
        let fatal = self
            .producer
            .client()
            .fatal_error()
            .map(|(_, reason)| reason);
        tracing::error!(
            in_flight = self.pending.len(),
            fatal,
            since_last_delivery_s = self.last_delivery.elapsed().as_secs(),
            "rebuilding the producer"
        );
        self.built_at = Instant::now();
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        match Self::producer(&self.cfg.kafka, self.events_tx.clone(), self.generation + 1) {
            Ok(p) => {
                self.producer = p;
                self.generation += 1;
                self.rebuild = false;
                for p in self.pending.values_mut() {
                    p.retry_at = Instant::now();
                }
                self.unsent = self.pending.keys().copied().collect();
            }
            Err(error) => tracing::error!(%error, "cannot rebuild the producer; will retry"),
        }
    }

    /// Reads new records from the spool, up to the in-flight bound, and sends them.
    fn fill(&mut self) {
        let room = self.cfg.max_in_flight.saturating_sub(self.pending.len());
        if room == 0 {
            return;
        }
        if let Err(error) = self.reader.read(room, &mut self.read_buf) {
            tracing::error!(%error, "cannot read the spool");
            return;
        }
        while let Some((seq, bytes)) = self.read_buf.pop_front() {
            let Some(entry) = Entry::decode(&bytes) else {
                // Checksummed, so only a bug (or a spool from another version) gets here.
                PublishFailed {
                    kind: "undecodable",
                    error: &"spool entry not understood",
                }
                .emit();
                continue;
            };
            self.pending.insert(
                seq,
                Pending {
                    entry,
                    attempts: 0,
                    retry_at: Instant::now(),
                },
            );
            self.unsent.insert(seq);
            self.send(seq);
        }
    }

    /// Sends every pending record whose retry time has come, oldest first.
    fn send_due(&mut self) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .unsent
            .iter()
            .copied()
            .filter(|seq| self.pending.get(seq).is_some_and(|p| p.retry_at <= now))
            .collect();
        for seq in due {
            if !self.send(seq) {
                break;
            }
        }
    }

    /// Hands one pending record to the producer; false when its queue is full.
    fn send(&mut self, seq: u64) -> bool {
        let Some(p) = self.pending.get_mut(&seq) else {
            return true;
        };
        let topic = match p.entry.target {
            Target::Messages => &self.cfg.kafka.topic,
            Target::Quarantine => &self.cfg.kafka.quarantine_topic,
        };
        let headers = p.entry.headers.iter().fold(
            OwnedHeaders::new_with_capacity(p.entry.headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(seq))
            .payload(p.entry.value.as_slice())
            .headers(headers);
        if let Some(key) = &p.entry.key {
            record = record.key(key.as_slice());
        }
        match self.producer.send(record) {
            Ok(()) => {
                self.unsent.remove(&seq);
                true
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                p.retry_at = Instant::now() + Duration::from_millis(10);
                false
            }
            Err((error, _)) => {
                // Refused outright (too large for the broker, say): retrying cannot help.
                PublishFailed {
                    kind: "refused",
                    error: &error,
                }
                .emit();
                self.pending.remove(&seq);
                self.unsent.remove(&seq);
                true
            }
        }
    }

    /// Commits the contiguous prefix of confirmed records.
    fn commit(&mut self, force: bool) {
        let committed = match self.pending.keys().next() {
            Some(first) => first - 1,
            None => self.reader.last_read(),
        };
        if let Err(error) = self.reader.commit(committed, force) {
            tracing::error!(%error, "cannot persist the spool position");
        }
        // Gauges are read at scrape time: ten updates a second are plenty.
        if !force && self.last_gauges.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_gauges = Instant::now();
        // Sequence order is arrival order: the first pending record is the oldest.
        let oldest =
            self.pending.values().next().map(|p| {
                Duration::from_millis(unix_millis().saturating_sub(p.entry.received_at_ms))
            });
        PublisherGauges {
            backlog_records: self.shared.backlog(),
            spool_bytes: self.shared.bytes(),
            spool_max_bytes: self.shared.max_bytes(),
            in_flight: self.pending.len(),
            oldest_unpublished: oldest.unwrap_or_default(),
        }
        .emit();
    }

    /// On shutdown: give what was handed over `timeout` to be confirmed, then commit. What is
    /// left stays in the spool for the next start.
    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.send_due();
        // Records with the producer: pending and not waiting to be sent.
        while self.pending.len() > self.unsent.len() && Instant::now() < deadline {
            if let Ok(e) = self.events.recv_timeout(Duration::from_millis(20)) {
                self.handle(e);
            }
        }
        self.commit(true);
        tracing::info!(
            left_in_spool = self.shared.backlog(),
            "publisher stopped; the rest is published on the next start"
        );
    }
}
