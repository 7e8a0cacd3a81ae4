//! What the topic already holds: the ids (`ce_id`) of the records that can belong to the
//! window, kept as 128-bit digests in a sorted vector (16 bytes an id, whatever its length),
//! and the conversations it saw. Memory follows the window, not the topic: records are read
//! from the window's start to the end of the topic (a late copy — delivered after an outage,
//! or backfilled — can sit anywhere after it), but an id is kept only when its record's time
//! (`ce_time`: a message's send time) falls in the window give or take a margin. A recall's
//! time is when it happened or reached the relay, so every recall from the window's start on
//! is kept: recalls are a small share of the traffic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Error, unix_ms};
use crate::config::{KafkaConfig, connection_config};
use crate::domain::{Relayed, SdkAppId};

/// Record ids seen (or published by this run), and the pairs of users that spoke.
#[derive(Default)]
pub struct Seen {
    /// Sorted, read from the topic.
    read: Vec<u128>,
    /// Added by this run.
    added: HashSet<u128>,
    pub pairs: BTreeSet<(String, String)>,
}

/// 128 bits of SHA-256: a collision (a missing message taken as present) is out of reach.
pub fn digest(id: &str) -> u128 {
    let d = Sha256::digest(id.as_bytes());
    u128::from_le_bytes(d[..16].try_into().expect("16 of 32 bytes"))
}

impl Seen {
    pub fn has(&self, id: &str) -> bool {
        let d = digest(id);
        self.read.binary_search(&d).is_ok() || self.added.contains(&d)
    }

    /// `false` if it was there already.
    pub fn add(&mut self, id: &str) -> bool {
        let d = digest(id);
        self.read.binary_search(&d).is_err() && self.added.insert(d)
    }

    pub fn len(&self) -> usize {
        self.read.len() + self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn finish(&mut self) {
        self.read.sort_unstable();
        self.read.dedup();
        self.read.shrink_to_fit();
    }
}

/// What to read: the topics, from which Kafka timestamp on, which record times to keep, and
/// (for `--pairs-from-topic`) the timestamps whose messages name the pairs.
pub struct Scan {
    pub topics: Vec<String>,
    pub since_ms: i64,
    /// Record times (`ce_time`, ms) whose ids are kept.
    pub keep_ms: (i64, i64),
    /// A recall's, or a record's without `ce_time`, from this time on, however late.
    pub open_since_ms: i64,
    pub pairs_between_ms: Option<(i64, i64)>,
    pub app: SdkAppId,
    /// Each topic's deletion settings.
    pub retention: Vec<Retention>,
    /// Read even where records of the window may have been deleted.
    pub allow_lost: bool,
}

/// What a topic's settings say about deletion (`None`: the broker did not say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub topic: String,
    pub compacted: bool,
    pub ms: Option<i64>,
    pub bytes: Option<i64>,
    /// `max.message.bytes`: with `held` records, a partition is at most this many times
    /// bigger.
    pub max_message: Option<i64>,
    /// Records deleted there lose no message (the quarantine topic: at worst a line is
    /// quarantined again): said, not refused.
    pub advisory: bool,
}

impl Retention {
    /// Whether retention may have deleted records Kafka took at `since_ms` or later, by
    /// `now_ms`, from a partition holding `held` records. Size retention deletes a segment only
    /// while `retention.bytes` stay behind it: it never empties a partition, and cannot have
    /// touched one whose records could not fill the limit.
    fn may_reach(&self, since_ms: i64, now_ms: i64, held: i64) -> bool {
        let by_time = self.ms.is_none_or(|r| r >= 0 && since_ms < now_ms - r);
        let by_size = match (self.bytes, self.max_message) {
            (Some(b), _) if b < 0 => false,
            (Some(_), _) if held == 0 => false,
            (Some(b), Some(m)) => held.saturating_mul(m.max(1)) >= b,
            _ => true,
        };
        by_time || by_size
    }
}

/// A partition's offsets, as the scan needs them.
pub trait Offsets {
    /// The partitions of `topic`.
    fn partitions(&self, topic: &str) -> Result<Vec<i32>, String>;
    /// The log start offset and the high watermark.
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), String>;
    /// The first offset whose timestamp is at or after `ms`: `Ok(None)` past the end, `Err`
    /// where the broker cannot tell.
    fn offset_for_time(&self, topic: &str, partition: i32, ms: i64) -> Result<Option<i64>, String>;
}

/// Where each partition's reading starts and ends, or why it must not be read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ranges: Vec<(String, i32, i64, i64)>,
    /// Why records of the window may be missing from the topic (retention, compaction).
    pub lost: Vec<String>,
    /// The same, where it loses no message.
    pub warnings: Vec<String>,
}

/// The scan's plan. Records of the window may have been deleted when the topic's settings let
/// retention reach them (time or size; unknown settings may) and a partition's log start is
/// above 0 with its first remaining record at or after `since_ms` (what came before it is
/// gone, and could have been the window's), or the partition was emptied, or the broker cannot
/// say; a compacted topic keeps one record a key. Reading starts at `since_ms`; the window at
/// `window_ms`.
pub fn plan(
    source: &dyn Offsets,
    topics: &[Retention],
    (since_ms, window_ms): (i64, i64),
    now_ms: i64,
) -> Result<Plan, Error> {
    let fail = |e: String| Error::Other(format!("reading the topic: {e}"));
    let mut plan = Plan::default();
    for t in topics {
        let topic = &t.topic;
        let mut lost = Vec::new();
        if t.compacted {
            lost.push(format!(
                "topic `{topic}` is compacted: a message's record can be replaced by a later one \
                 with its key"
            ));
        }
        for p in source.partitions(topic).map_err(fail)? {
            let (low, high) = source.watermarks(topic, p).map_err(fail)?;
            // A broker that cannot look offsets up by time leaves the scan at the start:
            // slower, never wrong.
            let first = source.offset_for_time(topic, p, since_ms);
            // Loss is judged from the window's start (what roam reads before it, for recalls,
            // only spares a duplicate).
            let in_window = if window_ms == since_ms {
                first.clone()
            } else {
                source.offset_for_time(topic, p, window_ms)
            };
            if low > 0 && t.may_reach(window_ms, now_ms, high - low) {
                let why = match &in_window {
                    Ok(Some(at)) if *at <= low => {
                        Some("its first record left is from the window or later")
                    }
                    Ok(None) if low >= high => Some("it was emptied"),
                    Err(_) => Some(
                        "the broker cannot say from when its records are (or could not answer: run again)",
                    ),
                    _ => None,
                };
                if let Some(why) = why {
                    lost.push(format!(
                        "topic `{topic}` partition {p} starts at offset {low} and {why}: older \
                         records were deleted (retention)"
                    ));
                }
            }
            let start = match first {
                Ok(Some(at)) => at.max(low),
                Ok(None) => high,
                Err(_) => low,
            };
            if high > start {
                plan.ranges.push((topic.clone(), p, start, high));
            }
        }
        if t.advisory {
            plan.warnings.extend(lost);
        } else {
            plan.lost.extend(lost);
        }
    }
    Ok(plan)
}

impl<C: rdkafka::consumer::ConsumerContext> Offsets for BaseConsumer<C> {
    fn partitions(&self, topic: &str) -> Result<Vec<i32>, String> {
        let metadata = self
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|e| e.to_string())?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(format!("topic `{topic}` not found"));
        };
        if let Some(e) = t.error() {
            return Err(format!(
                "topic `{topic}`: {}",
                rdkafka::types::RDKafkaErrorCode::from(e)
            ));
        }
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), String> {
        self.fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn offset_for_time(&self, topic: &str, partition: i32, ms: i64) -> Result<Option<i64>, String> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(ms))
            .map_err(|e| e.to_string())?;
        let found = self
            .offsets_for_times(list, TIMEOUT)
            .map_err(|e| e.to_string())?;
        let e = found
            .find_partition(topic, partition)
            .ok_or("no answer for the partition")?;
        e.error().map_err(|e| e.to_string())?;
        match e.offset() {
            Offset::Offset(n) => Ok(Some(n)),
            Offset::End => Ok(None),
            other => Err(format!("an offset of {other:?}")),
        }
    }
}

/// Each topic's `cleanup.policy`, `retention.ms` and `retention.bytes`, from the admin API (a
/// setting the broker does not report is `None`).
pub async fn retention(kafka: &KafkaConfig, topics: &[String]) -> Result<Vec<Retention>, Error> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let fail =
        |e: rdkafka::error::KafkaError| Error::Other(format!("reading the topics' settings: {e}"));
    let admin: AdminClient<DefaultClientContext> =
        connection_config(kafka).create().map_err(fail)?;
    let specs: Vec<ResourceSpecifier> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let mut out = Vec::new();
    for (topic, result) in topics.iter().zip(
        admin
            .describe_configs(&specs, &options)
            .await
            .map_err(fail)?,
    ) {
        let resource =
            result.map_err(|e| Error::Other(format!("reading topic `{topic}`'s settings: {e}")))?;
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        let number = |name: &str| value(name).and_then(|v| v.parse::<i64>().ok());
        out.push(Retention {
            topic: topic.clone(),
            compacted: value("cleanup.policy").is_some_and(|p| p.contains("compact")),
            ms: number("retention.ms"),
            bytes: number("retention.bytes"),
            max_message: number("max.message.bytes"),
            advisory: topic == &kafka.quarantine_topic,
        });
    }
    Ok(out)
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reads each topic from `since_ms` (Kafka's offsets by timestamp; from the start where the
/// broker cannot tell) to its end as it was when the scan began. Blocking.
pub fn scan(kafka: &KafkaConfig, what: &Scan) -> Result<Seen, Error> {
    let fail = |e: rdkafka::error::KafkaError| Error::Other(format!("reading the topic: {e}"));
    let consumer: BaseConsumer = connection_config(kafka)
        .set("group.id", "im-relay-backfill")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(fail)?;
    let now_ms = unix_ms(OffsetDateTime::now_utc());
    let plan = plan(
        &consumer,
        &what.retention,
        (what.since_ms, what.keep_ms.0),
        now_ms,
    )?;
    if !plan.lost.is_empty() && !what.allow_lost {
        return Err(Error::Lost(format!(
            "records of the window may be gone from the topic, so what is missing cannot be \
             told from what was deleted ({}); pass --allow-missing-records to publish every \
             message the topic does not hold",
            plan.lost.join("; ")
        )));
    }
    for why in plan.lost.iter().chain(&plan.warnings) {
        tracing::warn!(%why, "records of the window may be gone from the topic: read anyway");
    }
    let mut seen = Seen::default();
    let mut start = TopicPartitionList::new();
    let mut end: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, p, from, high) in &plan.ranges {
        start
            .add_partition_offset(topic, *p, Offset::Offset(*from))
            .map_err(fail)?;
        end.insert((topic.clone(), *p), *high);
    }
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
            None => {
                // A partition whose last offsets are never delivered (transaction markers,
                // what compaction removed) is done once the consumer's position reaches its end.
                if let Ok(positions) = consumer.position() {
                    for e in positions.elements() {
                        let key = (e.topic().to_owned(), e.partition());
                        if let Offset::Offset(at) = e.offset()
                            && end.get(&key).is_some_and(|&high| at >= high)
                        {
                            end.remove(&key);
                        }
                    }
                }
                if !end.is_empty() && last_progress.elapsed() > Duration::from_secs(30) {
                    return Err(Error::Other(format!(
                        "reading the topic: no progress for 30 s with {} partitions unread",
                        end.len()
                    )));
                }
            }
        }
    }
    seen.finish();
    Ok(seen)
}

/// Whether a record's id can matter to the window: by its time, an open-ended one's (a
/// recall's) from `open_since_ms` on.
fn kept(what: &Scan, open_ended: bool, at_ms: i64) -> bool {
    if open_ended {
        at_ms >= what.open_since_ms
    } else {
        (what.keep_ms.0..=what.keep_ms.1).contains(&at_ms)
    }
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
    let produced = m.timestamp().to_millis().unwrap_or(0);
    let command = header("im_callback_command");
    // A record without `ce_time` (one backfill quarantined) counts from when Kafka took it,
    // and, like a recall, from the window's start on: it was written after its hour.
    let (at, open_ended) =
        match header("ce_time").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) {
            Some(t) => (
                unix_ms(t),
                command == Some(Relayed::AfterMsgWithDraw.as_str()),
            ),
            None => (produced, true),
        };
    if kept(what, open_ended, at) {
        seen.read.push(digest(id));
    }
    let Some((lo, hi)) = what.pairs_between_ms else {
        return;
    };
    let app = what.app.to_string();
    if (lo..=hi).contains(&produced)
        && command == Some(Relayed::AfterSendMsg.as_str())
        && header("im_sdk_app_id") == Some(app.as_str())
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
        && let (Some(a), Some(b)) = (v["from_account"].as_str(), v["to_account"].as_str())
    {
        let pair = if a <= b { (a, b) } else { (b, a) };
        seen.pairs.insert((pair.0.to_owned(), pair.1.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker's offsets, made up: (low, high, first offset at or after the window) by
    /// partition; `None` for a broker that cannot look offsets up by time.
    struct Fake {
        partitions: Vec<(i64, i64, Option<Option<i64>>)>,
    }

    impl Offsets for Fake {
        fn partitions(&self, _: &str) -> Result<Vec<i32>, String> {
            Ok((0..self.partitions.len() as i32).collect())
        }
        fn watermarks(&self, _: &str, p: i32) -> Result<(i64, i64), String> {
            let (low, high, _) = self.partitions[p as usize];
            Ok((low, high))
        }
        fn offset_for_time(&self, _: &str, p: i32, _: i64) -> Result<Option<i64>, String> {
            self.partitions[p as usize]
                .2
                .ok_or_else(|| "unsupported".to_owned())
        }
    }

    const NOW: i64 = 10_000_000;
    const SINCE: i64 = 1000;

    fn plan_of(partitions: Vec<(i64, i64, Option<Option<i64>>)>, retention: Retention) -> Plan {
        let fake = Fake { partitions };
        let topics = [Retention {
            topic: "t".into(),
            ..retention
        }];
        plan(&fake, &topics, (SINCE, SINCE), NOW).unwrap()
    }

    fn lost(partitions: Vec<(i64, i64, Option<Option<i64>>)>, compacted: bool) -> Vec<String> {
        let unknown = Retention {
            compacted,
            ..Retention::default()
        };
        plan_of(partitions, unknown).lost
    }

    #[test]
    fn deleted_records_of_the_window_are_told_from_a_young_topic() {
        // A young topic that never lost a record: fine, wherever the window starts.
        assert!(
            lost(
                vec![(0, 100, Some(Some(0))), (0, 50, Some(Some(20)))],
                false
            )
            .is_empty()
        );
        // Retention deleted older records, but the first left is older than the window.
        assert!(lost(vec![(40, 100, Some(Some(60)))], false).is_empty());
        // The first record left is from the window or later: what was before it may have been.
        let gone = lost(
            vec![(0, 10, Some(Some(3))), (40, 100, Some(Some(40)))],
            false,
        );
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert!(
            gone[0].contains("partition 1 starts at offset 40"),
            "{gone:?}"
        );
        // Emptied by retention: what it held cannot be known.
        assert_eq!(lost(vec![(100, 100, Some(None))], false).len(), 1);
        // Records left, all older than the window: the window never had any here.
        assert!(lost(vec![(50, 100, Some(None))], false).is_empty());
        // A broker that cannot say: deleted records cannot be ruled out.
        assert_eq!(lost(vec![(40, 100, None)], false).len(), 1);
        assert!(lost(vec![(0, 100, None)], false).is_empty());
        // Compaction.
        let compacted = lost(vec![(0, 100, Some(Some(0)))], true);
        assert!(compacted[0].contains("compacted"), "{compacted:?}");
    }

    /// A quiet partition whose old records all aged out, then took one inside the window:
    /// its settings say retention could not have reached the window, so nothing is refused.
    #[test]
    fn retention_that_cannot_reach_the_window_loses_nothing() {
        let quiet = || vec![(40, 41, Some(Some(40)))];
        let week = Retention {
            ms: Some(7 * 86_400_000),
            bytes: Some(-1),
            ..Retention::default()
        };
        assert!(plan_of(quiet(), week.clone()).lost.is_empty());
        // Time retention shorter than the lag reaches the window.
        let short = Retention {
            ms: Some(NOW - SINCE - 1),
            ..week.clone()
        };
        assert_eq!(plan_of(quiet(), short).lost.len(), 1);
        // A size limit reaches a partition that could fill it, not a quiet one, and never
        // empties one; without max.message.bytes, it may reach anything.
        let sized = Retention {
            bytes: Some(1 << 30),
            max_message: Some(1 << 20),
            ..week.clone()
        };
        assert!(plan_of(quiet(), sized.clone()).lost.is_empty());
        assert!(
            plan_of(vec![(40, 40, Some(None))], sized.clone())
                .lost
                .is_empty()
        );
        let full = vec![(40, 5000, Some(Some(40)))];
        assert_eq!(plan_of(full, sized.clone()).lost.len(), 1);
        let unknown = Retention {
            max_message: None,
            ..sized
        };
        assert_eq!(plan_of(quiet(), unknown).lost.len(), 1);
        // The quarantine topic: said, not refused.
        let advisory = plan_of(
            quiet(),
            Retention {
                advisory: true,
                ..Retention::default()
            },
        );
        assert!(advisory.lost.is_empty());
        assert_eq!(advisory.warnings.len(), 1);
    }

    #[test]
    fn the_plan_reads_from_the_window_to_the_end() {
        let plan = plan_of(
            vec![(0, 100, Some(Some(60))), (0, 10, Some(None)), (5, 9, None)],
            Retention::default(),
        );
        assert_eq!(
            plan.ranges,
            vec![("t".to_owned(), 0, 60, 100), ("t".to_owned(), 2, 5, 9)]
        );
    }

    #[test]
    fn an_id_is_kept_by_its_record_s_time_a_recall_s_from_its_own_start() {
        let scan = Scan {
            topics: vec![],
            since_ms: 0,
            keep_ms: (1000, 2000),
            open_since_ms: 500,
            pairs_between_ms: None,
            app: SdkAppId::from(1),
            retention: vec![],
            allow_lost: false,
        };
        assert!(kept(&scan, false, 1000) && kept(&scan, false, 2000));
        assert!(!kept(&scan, false, 999) && !kept(&scan, false, 2001));
        assert!(kept(&scan, true, 9_000_000) && kept(&scan, true, 500) && !kept(&scan, true, 499));
    }

    #[test]
    fn seen_finds_what_was_read_and_what_was_added() {
        let mut seen = Seen {
            read: vec![digest("b"), digest("a"), digest("a")],
            ..Seen::default()
        };
        seen.finish();
        assert_eq!(seen.len(), 2);
        assert!(seen.has("a") && seen.has("b") && !seen.has("c"));
        assert!(!seen.add("a"));
        assert!(seen.add("c") && seen.has("c") && !seen.add("c"));
    }
}
