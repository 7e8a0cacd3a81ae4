//! `im-relay sync`: the downstream half. Consumes the topic(s) in a consumer group and keeps a
//! database equal to the conversations' state: one transaction per poll batch, holding the
//! rows and where the batch ends on each partition — the database, not the group, says where
//! sync resumes, so a new or restored database is filled from where *it* stands. A database
//! that is down stops the consuming until it is back; a record that cannot be applied goes to
//! the `dead_letters` table; records the broker deleted before sync read them are counted and
//! logged with their offsets — nothing is skipped silently.

pub mod change;
pub mod store;
mod tls;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{SyncConfig, connection_config};
use crate::record::Target;
use crate::telemetry::Event as _;
use crate::telemetry::{
    SyncApplied, SyncCommitFailed, SyncConflict, SyncConsumerError, SyncDatabaseFailed,
    SyncDeadLettered, SyncLag, SyncSkipped,
};
use change::Kind;
use store::{DeadLetter, Item, Owner, Position, Store, StoreError};

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
    let topics = topics(cfg);
    let owner = Owner {
        group: cfg.group.clone(),
        topics: topics.join(","),
    };
    let Some((store, claim)) = retry_database(stop, health, || {
        let mut store = store::open_with(&cfg.database, cfg.redact_recalled)?;
        let claim = store.claim(&owner)?;
        Ok((store, claim))
    })?
    else {
        return Ok(());
    };
    health.database_down.store(false, Ordering::Relaxed);
    let placement = Placement {
        store: Mutex::new(store),
        positions: Mutex::new(BTreeMap::new()),
        fatal: Mutex::new(None),
    };
    let consumer: BaseConsumer<Placement> = connection_config(&cfg.kafka)
        .set("group.id", &cfg.group)
        .set("client.id", "im-relay-sync")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A position the broker no longer holds (retention overtook sync) resumes at the
        // oldest record left; the records in between are counted and logged (`gaps`), never
        // skipped silently.
        .set("auto.offset.reset", "earliest")
        .create_with_context(placement)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    health.started.store(true, Ordering::Relaxed);
    tracing::info!(
        database = %cfg.database.describe(),
        group = %cfg.group,
        topics = ?topics,
        claim = ?claim,
        "sync started"
    );
    let mut lag_checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let expected = consumer
            .context()
            .positions
            .lock()
            .expect("not poisoned")
            .clone();
        let mut batch = poll_batch(&consumer, cfg.batch_max, stop, &expected)?;
        // Records of a partition taken away meanwhile are its new owner's to apply (from the
        // database's position, at or below them): writing them here would move that
        // position under the new owner.
        if let Ok(assigned) = consumer.assignment() {
            let assigned: std::collections::BTreeSet<(String, i32)> = assigned
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            batch.keep(|tp| assigned.contains(tp));
        }
        if let Some(why) = consumer
            .context()
            .fatal
            .lock()
            .expect("not poisoned")
            .take()
        {
            return Err(SyncError::Database(why));
        }
        if !batch.messages.is_empty() {
            let ends: Vec<Item> = batch
                .messages
                .iter()
                .map(|((topic, partition), last)| {
                    Item::Offset(Position {
                        group: cfg.group.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        next: last + 1,
                    })
                })
                .collect();
            let applied = {
                let mut store = consumer.context().store.lock().expect("not poisoned");
                apply(store.as_mut(), &batch, &ends, stop, health)
            };
            let Some(applied) = applied else {
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
            let mut positions = consumer.context().positions.lock().expect("not poisoned");
            for ((topic, partition), last) in &batch.messages {
                positions.insert((topic.clone(), *partition), last + 1);
            }
            drop(positions);
            // The group's offsets too, for lag tools; the database's are the ones sync reads.
            commit(&consumer, &batch.messages);
            // Counted once the batch is in, so a restart does not count them again.
            for skip in skipped(&batch.gaps, &consumer) {
                SyncSkipped {
                    topic: &skip.topic,
                    partition: skip.partition,
                    from: skip.from,
                    to: skip.to,
                    reason: skip.reason,
                }
                .emit();
            }
        }
        if lag_checked.elapsed() >= Duration::from_secs(5) {
            lag_checked = Instant::now();
            SyncLag(lag(&consumer)).emit();
        }
    }
    tracing::info!("sync stopped");
    Ok(())
}

/// `attempt` until the database answers (`None`: asked to stop first); a `fatal` error ends it.
fn retry_database<T>(
    stop: &AtomicBool,
    health: &SyncHealth,
    mut attempt: impl FnMut() -> Result<T, StoreError>,
) -> Result<Option<T>, SyncError> {
    let mut tries = 0;
    loop {
        match attempt() {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.fatal => return Err(SyncError::Database(e.message)),
            Err(e) => {
                health.database_down.store(true, Ordering::Relaxed);
                SyncDatabaseFailed { error: &e }.emit();
                tries += 1;
                if !nap(backoff(tries), stop) {
                    return Ok(None);
                }
            }
        }
    }
}

/// The consumer's context: each assignment starts where the database says.
struct Placement {
    store: Mutex<Box<dyn Store>>,
    /// (topic, partition) → the next offset, for the assigned partitions the database knows.
    positions: Mutex<BTreeMap<(String, i32), i64>>,
    /// Why sync must stop, found inside a callback.
    fatal: Mutex<Option<String>>,
}

impl ClientContext for Placement {}

impl ConsumerContext for Placement {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Placement>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if !self.place(tpl) {
                    // Not assigned at all (not at the group's offsets): sync stops, and its
                    // restart waits for the database.
                    return;
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut positions = self.positions.lock().expect("not poisoned");
                for e in tpl.elements() {
                    positions.remove(&(e.topic().to_owned(), e.partition()));
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            *self.fatal.lock().expect("not poisoned") = Some(format!("assignment failed: {e}"));
        }
    }
}

impl Placement {
    /// Sets each assigned partition's offset to the database's position, or its beginning
    /// when the database has none (it has never held a record of it). False when the database
    /// cannot say.
    fn place(&self, tpl: &mut TopicPartitionList) -> bool {
        let kept = {
            let mut store = self.store.lock().expect("not poisoned");
            let mut tries = 0;
            loop {
                match store.positions() {
                    Ok(kept) => break kept,
                    // A rebalance cannot wait long (max.poll.interval.ms): a restart will.
                    Err(e) if tries >= 5 || e.fatal => {
                        *self.fatal.lock().expect("not poisoned") = Some(format!(
                            "reading the database's offsets at a rebalance: {e}"
                        ));
                        return false;
                    }
                    Err(e) => {
                        SyncDatabaseFailed { error: &e }.emit();
                        tries += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        };
        let kept: BTreeMap<(String, i32), i64> =
            kept.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        let assigned: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut positions = self.positions.lock().expect("not poisoned");
        for (topic, partition) in assigned {
            let offset = match kept.get(&(topic.clone(), partition)) {
                Some(&next) => {
                    positions.insert((topic.clone(), partition), next);
                    Offset::Offset(next)
                }
                None => Offset::Beginning,
            };
            tracing::info!(%topic, partition, ?offset, "partition assigned: resuming where the database stands");
            if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                tracing::warn!(error = %e, "cannot set an assigned partition's offset");
            }
        }
        true
    }
}

/// A partition's low watermark (a broker; a fake in the tests: no broker here can delete
/// records).
pub trait Watermarks {
    fn low(&self, topic: &str, partition: i32) -> Result<i64, String>;
}

impl<C: ConsumerContext> Watermarks for BaseConsumer<C> {
    fn low(&self, topic: &str, partition: i32) -> Result<i64, String> {
        self.fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map(|(low, _)| low)
            .map_err(|e| e.to_string())
    }
}

/// Records a partition did not deliver: offsets `from..to`, and why — `deleted` (below the
/// log start: retention overtook sync) or `not_delivered` (compaction, transaction markers,
/// records librdkafka could not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub reason: &'static str,
}

/// The skips behind each gap `(topic, partition, expected, seen)`: the database needed
/// `expected` next, the partition gave `seen`. The log start splits them (unknown: all are
/// counted as not delivered).
pub fn skipped(gaps: &[(String, i32, i64, i64)], source: &dyn Watermarks) -> Vec<Skip> {
    let mut out = Vec::new();
    for (topic, partition, expected, seen) in gaps {
        let low = match source.low(topic, *partition) {
            Ok(low) => low,
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "cannot read the log start");
                *expected
            }
        };
        let mut push = |from: i64, to: i64, reason| {
            if from < to {
                out.push(Skip {
                    topic: topic.clone(),
                    partition: *partition,
                    from,
                    to,
                    reason,
                });
            }
        };
        push(*expected, low.min(*seen), "deleted");
        push((*expected).max(low), *seen, "not_delivered");
    }
    out
}

struct Batch {
    items: Vec<Item>,
    /// Where each item came from, for a dead letter made later.
    origins: Vec<DeadLetter>,
    /// (topic, partition) → the highest offset in the batch.
    messages: BTreeMap<(String, i32), i64>,
    /// Each item's kind (`None`: a dead letter from the start).
    kinds: Vec<Option<Kind>>,
    /// Partitions that jumped: (topic, partition, the offset expected, the one that came).
    gaps: Vec<(String, i32, i64, i64)>,
}

impl Batch {
    /// Only the records of the partitions `keep` says.
    fn keep(&mut self, keep: impl Fn(&(String, i32)) -> bool) {
        // `items`, `kinds` and `origins` run in parallel: one mask for the three.
        let mask: Vec<bool> = self
            .origins
            .iter()
            .map(|o| keep(&(o.topic.clone(), o.partition)))
            .collect();
        fn masked<T>(v: &mut Vec<T>, mask: &[bool]) {
            let all = std::mem::take(v);
            v.extend(
                all.into_iter()
                    .zip(mask)
                    .filter(|(_, k)| **k)
                    .map(|(x, _)| x),
            );
        }
        masked(&mut self.items, &mask);
        masked(&mut self.kinds, &mask);
        masked(&mut self.origins, &mask);
        self.messages.retain(|k, _| keep(k));
        self.gaps.retain(|(t, p, ..)| keep(&(t.clone(), *p)));
    }
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
/// `expected`: each partition's next offset as the database has it; a record past it is a gap.
fn poll_batch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    max: usize,
    stop: &AtomicBool,
    expected: &BTreeMap<(String, i32), i64>,
) -> Result<Batch, SyncError> {
    let mut batch = Batch {
        items: Vec::new(),
        origins: Vec::new(),
        messages: BTreeMap::new(),
        kinds: Vec::new(),
        gaps: Vec::new(),
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
                SyncConsumerError { error: &e }.emit();
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
        let tp = (message.topic().to_owned(), message.partition());
        let next = batch.messages.get(&tp).map(|last| last + 1);
        match next.or_else(|| expected.get(&tp).copied()) {
            Some(next) if message.offset() > next => {
                batch.gaps.push((tp.0, tp.1, next, message.offset()));
            }
            Some(next) if message.offset() < next && !batch.messages.contains_key(&tp) => {
                // The partition restarted below the database's position (made again, or a
                // position past its end): applied again, to the same rows.
                tracing::info!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    position = next,
                    "records below the database's position: applying them again"
                );
            }
            _ => {}
        }
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

/// Applies the batch and its partitions' new positions (`ends`) in one transaction, retrying
/// while the database is unreachable. A data
/// error (an item the database refuses for good) sends that item to the dead-letter table and
/// applies the rest. The items as applied; `None` when asked to stop before.
fn apply(
    store: &mut dyn Store,
    batch: &Batch,
    ends: &[Item],
    stop: &AtomicBool,
    health: &SyncHealth,
) -> Option<Vec<Item>> {
    let mut items = batch.items.clone();
    let mut attempt = 0;
    let mut conflicts = 0;
    loop {
        let result = store.apply(&[&items[..], ends].concat());
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
fn commit<C: ConsumerContext>(consumer: &BaseConsumer<C>, messages: &BTreeMap<(String, i32), i64>) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in messages {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1)) {
            tracing::warn!(error = %e, "cannot name an offset to commit");
        }
    }
    // A failed commit (a rebalance took the partition) only means this batch comes again:
    // applying it twice leaves the same rows.
    if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
        SyncCommitFailed { error: &error }.emit();
    }
}

/// Records on the assigned partitions not yet consumed.
fn lag<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> i64 {
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
