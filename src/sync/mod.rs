//! `im-relay sync`: the downstream half. Consumes the topic(s) in a consumer group and keeps a
//! database equal to the conversations' state: one transaction per poll batch, the offsets
//! committed only after it; a database that is down stops the consuming (nothing is
//! committed) until it is back; a record that cannot be applied goes to the `dead_letters`
//! table — counted, logged, never skipped silently.

pub mod change;
pub mod store;
mod tls;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{SyncConfig, connection_config};
use crate::record::Target;
use crate::telemetry::Event as _;
use crate::telemetry::{
    SyncApplied, SyncCommitFailed, SyncConflict, SyncDatabaseFailed, SyncDeadLettered, SyncLag,
};
use change::Kind;
use store::{DeadLetter, Item, Store, StoreError};

/// What `/readyz` reports for a running sync.
#[derive(Default)]
pub struct SyncHealth {
    /// The last attempt to reach the database failed.
    pub database_down: AtomicBool,
    /// Migrations ran and the consumer is subscribed.
    pub started: AtomicBool,
}

impl SyncHealth {
    pub fn trouble(&self) -> Option<&'static str> {
        if !self.started.load(Ordering::Relaxed) {
            Some("starting")
        } else if self.database_down.load(Ordering::Relaxed) {
            Some("database unavailable")
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A database sync cannot use, whatever the wait.
    #[error("database: {0}")]
    Database(String),
}

/// The topics the records live on: the messages topic and any per-kind one.
pub fn topics(cfg: &SyncConfig) -> Vec<String> {
    let mut topics: Vec<String> = [
        Target::Messages,
        Target::Recalls,
        Target::Edits,
        Target::ReadReports,
        Target::ReadReceipts,
    ]
    .iter()
    .map(|t| cfg.kafka.topic_for(*t).to_owned())
    .collect();
    topics.sort();
    topics.dedup();
    topics
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5))
}

/// Sleeps `d` in short steps; false when asked to stop meanwhile.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Runs until `stop` is set: the batch in hand is finished (applied and committed) first.
pub fn run(cfg: &SyncConfig, stop: &AtomicBool, health: &SyncHealth) -> Result<(), SyncError> {
    crate::telemetry::register_sync_counters();
    let mut store = {
        let mut attempt = 0;
        loop {
            match store::open(&cfg.database) {
                Ok(s) => break s,
                Err(e) if e.fatal => return Err(SyncError::Database(e.message)),
                Err(e) => {
                    health.database_down.store(true, Ordering::Relaxed);
                    SyncDatabaseFailed { error: &e }.emit();
                    attempt += 1;
                    if !nap(backoff(attempt), stop) {
                        return Ok(());
                    }
                }
            }
        }
    };
    health.database_down.store(false, Ordering::Relaxed);
    let consumer: BaseConsumer = connection_config(&cfg.kafka)
        .set("group.id", &cfg.group)
        .set("client.id", "im-relay-sync")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let topics = topics(cfg);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    health.started.store(true, Ordering::Relaxed);
    tracing::info!(
        database = %cfg.database.describe(),
        group = %cfg.group,
        topics = ?topics,
        "sync started"
    );
    let mut lag_checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let batch = poll_batch(&consumer, cfg.batch_max, stop)?;
        if !batch.messages.is_empty() {
            let Some(applied) = apply(store.as_mut(), &batch, stop, health) else {
                // Stopped while the database was down: nothing committed, all redelivered.
                break;
            };
            for kind in Kind::ALL {
                let records = batch
                    .kinds
                    .iter()
                    .zip(&applied)
                    .filter(|(k, item)| **k == Some(kind) && matches!(item, Item::Change(_)))
                    .count() as u64;
                SyncApplied {
                    kind: kind.label(),
                    records,
                }
                .emit();
            }
            commit(&consumer, &batch.messages);
        }
        if lag_checked.elapsed() >= Duration::from_secs(5) {
            lag_checked = Instant::now();
            SyncLag(lag(&consumer)).emit();
        }
    }
    tracing::info!("sync stopped");
    Ok(())
}

struct Batch {
    items: Vec<Item>,
    /// Where each item came from, for a dead letter made later.
    origins: Vec<DeadLetter>,
    /// (topic, partition) → the highest offset in the batch.
    messages: BTreeMap<(String, i32), i64>,
    /// Each item's kind (`None`: a dead letter from the start).
    kinds: Vec<Option<Kind>>,
}

/// A dead letter for `origin`; the error is stored as text, so a NUL (PostgreSQL's `text`
/// refuses it) is written out.
fn dead_letter(origin: &DeadLetter, error: &str) -> Item {
    Item::DeadLetter(DeadLetter {
        error: error.replace('\0', "\\0"),
        ..origin.clone()
    })
}

/// Up to `max` records, waiting at most 200 ms once the first is in.
fn poll_batch(consumer: &BaseConsumer, max: usize, stop: &AtomicBool) -> Result<Batch, SyncError> {
    let mut batch = Batch {
        items: Vec::new(),
        origins: Vec::new(),
        messages: BTreeMap::new(),
        kinds: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_millis(200);
    while batch.items.len() < max && !stop.load(Ordering::Relaxed) {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Some(result) = consumer.poll(wait.max(Duration::from_millis(1))) else {
            if Instant::now() >= deadline {
                break;
            }
            continue;
        };
        let message = match result {
            Ok(m) => m,
            Err(e) => {
                // librdkafka retries by itself; the batch in hand is not held back by it.
                tracing::warn!(error = %e, "kafka consumer error");
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let payload = message.payload().unwrap_or_default();
        let origin = DeadLetter {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            error: String::new(),
        };
        let (kind, item) = match change::parse(payload) {
            Ok((kind, change)) => (Some(kind), Item::Change(change)),
            Err(error) => (None, dead_letter(&origin, &error)),
        };
        batch.kinds.push(kind);
        batch.items.push(item);
        batch.origins.push(origin);
        let at = batch
            .messages
            .entry((message.topic().to_owned(), message.partition()))
            .or_insert(message.offset());
        *at = (*at).max(message.offset());
        if Instant::now() >= deadline {
            break;
        }
    }
    Ok(batch)
}

/// Applies the batch in one transaction, retrying while the database is unreachable. A data
/// error (an item the database refuses for good) sends that item to the dead-letter table and
/// applies the rest. The items as applied; `None` when asked to stop before.
fn apply(
    store: &mut dyn Store,
    batch: &Batch,
    stop: &AtomicBool,
    health: &SyncHealth,
) -> Option<Vec<Item>> {
    let mut items = batch.items.clone();
    let mut attempt = 0;
    let mut conflicts = 0;
    loop {
        let result = store.apply(&items);
        let error = match result {
            Ok(()) => {
                health.database_down.store(false, Ordering::Relaxed);
                for item in &items {
                    if let Item::DeadLetter(d) = item {
                        SyncDeadLettered {
                            topic: &d.topic,
                            partition: d.partition,
                            offset: d.offset,
                            error: &d.error,
                        }
                        .emit();
                    }
                }
                return Some(items);
            }
            Err(e) => e,
        };
        if error.conflict && conflicts < 10 {
            // Another replica's transaction: not the database failing.
            conflicts += 1;
            SyncConflict { error: &error }.emit();
            continue;
        }
        if error.data {
            // Find the items the database refuses, one transaction each; if that finds none
            // (the refusal was not about one item), wait and try again like any failure.
            let dead = |items: &[Item]| {
                items
                    .iter()
                    .filter(|i| matches!(i, Item::DeadLetter(_)))
                    .count()
            };
            let before = dead(&items);
            items = isolate(store, items, &batch.origins, &error);
            if dead(&items) > before {
                continue;
            }
        }
        health.database_down.store(true, Ordering::Relaxed);
        SyncDatabaseFailed { error: &error }.emit();
        attempt += 1;
        if !nap(backoff(attempt), stop) {
            return None;
        }
    }
}

/// The batch with every item the database refuses for good replaced by its dead letter.
fn isolate(
    store: &mut dyn Store,
    items: Vec<Item>,
    origins: &[DeadLetter],
    first: &StoreError,
) -> Vec<Item> {
    tracing::warn!(error = %first, "the database refused an item: applying one by one");
    items
        .into_iter()
        .zip(origins)
        .map(
            |(item, origin)| match store.apply(std::slice::from_ref(&item)) {
                Err(e) if e.data && matches!(item, Item::Change(_)) => {
                    Item::DeadLetter(DeadLetter {
                        error: e.message,
                        ..origin.clone()
                    })
                }
                _ => item,
            },
        )
        .collect()
}

/// Commits the offsets after the batch: what was applied is not read again.
fn commit(consumer: &BaseConsumer, messages: &BTreeMap<(String, i32), i64>) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in messages {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1)) {
            tracing::warn!(error = %e, "cannot name an offset to commit");
        }
    }
    // A failed commit (a rebalance took the partition) only means this batch comes again:
    // applying it twice leaves the same rows.
    if let Err(error) = consumer.commit(&tpl, CommitMode::Sync) {
        SyncCommitFailed { error: &error }.emit();
    }
}

/// Records on the assigned partitions not yet consumed.
fn lag(consumer: &BaseConsumer) -> i64 {
    let Ok(position) = consumer.position() else {
        return 0;
    };
    position
        .elements()
        .iter()
        .filter_map(|e| {
            let (_, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(1))
                .ok()?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => return None,
            };
            Some((high - at).max(0))
        })
        .sum()
}

#[cfg(test)]
mod tests;
