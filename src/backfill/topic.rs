//! What the topic already holds: every record id (`ce_id`) from a moment on, kept as 128-bit
//! digests (16 bytes an id, whatever its length), and the conversations it saw.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

use super::Error;
use crate::config::{KafkaConfig, connection_config};
use crate::domain::{Relayed, SdkAppId};

/// Record ids seen (or published by this run), and the pairs of users that spoke.
#[derive(Default)]
pub struct Seen {
    ids: HashSet<u128>,
    pub pairs: BTreeSet<(String, String)>,
}

/// 128 bits of SHA-256: a collision (a missing message taken as present) is out of reach.
pub fn digest(id: &str) -> u128 {
    let d = Sha256::digest(id.as_bytes());
    u128::from_le_bytes(d[..16].try_into().expect("16 of 32 bytes"))
}

impl Seen {
    pub fn has(&self, id: &str) -> bool {
        self.ids.contains(&digest(id))
    }

    /// `false` if it was there already.
    pub fn add(&mut self, id: &str) -> bool {
        self.ids.insert(digest(id))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What to read: the topics, from which Kafka timestamp on, and (for `--pairs-from-topic`)
/// the timestamps whose messages name the pairs.
pub struct Scan {
    pub topics: Vec<String>,
    pub since_ms: i64,
    pub pairs_between_ms: Option<(i64, i64)>,
    pub app: SdkAppId,
}

/// Reads each topic from `since_ms` (Kafka's offsets by timestamp; from the start where the
/// broker cannot tell) to its end as it was when the scan began. Blocking.
pub fn scan(kafka: &KafkaConfig, what: &Scan) -> Result<Seen, Error> {
    let fail = |e: rdkafka::error::KafkaError| Error(format!("reading the topic: {e}"));
    let consumer: BaseConsumer = connection_config(kafka)
        .set("group.id", "im-relay-backfill")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(fail)?;
    let timeout = Duration::from_secs(10);
    let mut start = TopicPartitionList::new();
    let mut end: HashMap<(String, i32), i64> = HashMap::new();
    for topic in &what.topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(fail)?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(Error(format!("topic `{topic}` not found")));
        };
        if let Some(e) = t.error() {
            return Err(Error(format!(
                "topic `{topic}`: {}",
                rdkafka::types::RDKafkaErrorCode::from(e)
            )));
        }
        let mut by_time = TopicPartitionList::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(fail)?;
            if high > low {
                end.insert((topic.clone(), p.id()), high);
                by_time
                    .add_partition_offset(topic, p.id(), Offset::Offset(what.since_ms))
                    .map_err(fail)?;
                start
                    .add_partition_offset(topic, p.id(), Offset::Offset(low))
                    .map_err(fail)?;
            }
        }
        // A broker that cannot look offsets up by time leaves the scan at the start: slower,
        // never wrong.
        if let Ok(found) = consumer.offsets_for_times(by_time, timeout) {
            for e in found.elements() {
                let key = (e.topic().to_owned(), e.partition());
                let at = match e.offset() {
                    Offset::Offset(n) if e.error().is_ok() => n,
                    Offset::End => end[&key],
                    _ => continue,
                };
                start
                    .set_partition_offset(e.topic(), e.partition(), Offset::Offset(at))
                    .map_err(fail)?;
                if at >= end[&key] {
                    end.remove(&key);
                }
            }
        }
    }
    let mut seen = Seen::default();
    if end.is_empty() {
        return Ok(seen);
    }
    consumer.assign(&start).map_err(fail)?;
    let mut last_progress = Instant::now();
    while !end.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let key = (m.topic().to_owned(), m.partition());
                if end.get(&key).is_some_and(|&high| m.offset() + 1 >= high) {
                    end.remove(&key);
                }
                take(&m, what, &mut seen);
            }
            Some(Err(e)) => return Err(fail(e)),
            None if last_progress.elapsed() > Duration::from_secs(30) => {
                return Err(Error(format!(
                    "reading the topic: no progress for 30 s with {} partitions unread",
                    end.len()
                )));
            }
            None => {}
        }
    }
    Ok(seen)
}

fn take(m: &rdkafka::message::BorrowedMessage<'_>, what: &Scan, seen: &mut Seen) {
    let Some(headers) = m.headers() else {
        return;
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let Some(id) = header("ce_id") else {
        return;
    };
    seen.add(id);
    let Some((lo, hi)) = what.pairs_between_ms else {
        return;
    };
    let at = m.timestamp().to_millis().unwrap_or(0);
    let app = what.app.to_string();
    if (lo..=hi).contains(&at)
        && header("im_callback_command") == Some(Relayed::AfterSendMsg.as_str())
        && header("im_sdk_app_id") == Some(app.as_str())
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
        && let (Some(a), Some(b)) = (v["from_account"].as_str(), v["to_account"].as_str())
    {
        let pair = if a <= b { (a, b) } else { (b, a) };
        seen.pairs.insert((pair.0.to_owned(), pair.1.to_owned()));
    }
}
