//! After a run: read the topic back from where it ended before the run, and match every record
//! key against the acknowledged `MsgKey`s. What is acknowledged and not found is reported by
//! key — the one number a relay must keep at zero.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

pub struct VerifyOptions {
    pub brokers: String,
    pub topic: String,
    /// How to reach the brokers (security settings, `-X` options); `brokers` is added.
    pub client: ClientConfig,
    /// Give up when no awaited record arrived for this long.
    pub patience: Duration,
    /// If records are still missing after a pause, write one marker record per partition and
    /// read on: a workaround for test brokers that hold back a partition's newest batch
    /// (seen with tansu). Never needed with Apache Kafka; it writes to the topic.
    pub nudge: bool,
}

pub struct Verification {
    pub found: usize,
    pub missing: Vec<String>,
    /// Records of this run seen more than once (at-least-once delivery allows it).
    pub duplicates: usize,
}

/// Where each partition ends now: the run's records will be at or after these offsets.
pub struct Start(TopicPartitionList);

fn client(opts: &VerifyOptions) -> ClientConfig {
    let mut c = opts.client.clone();
    c.set("bootstrap.servers", &opts.brokers);
    c
}

fn consumer(opts: &VerifyOptions) -> Result<BaseConsumer, String> {
    client(opts)
        .set("group.id", "im-relay-bench")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("kafka consumer: {e}"))
}

pub fn start(opts: &VerifyOptions) -> Result<Start, String> {
    let consumer = consumer(opts)?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(&opts.topic), timeout)
        .map_err(|e| format!("kafka metadata for {}: {e}", opts.topic))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("topic {} not found", opts.topic))?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let (_, high) = consumer
            .fetch_watermarks(&opts.topic, p, timeout)
            .map_err(|e| format!("kafka watermarks of {}/{p}: {e}", opts.topic))?;
        list.add_partition_offset(&opts.topic, p, rdkafka::Offset::Offset(high))
            .map_err(|e| e.to_string())?;
    }
    Ok(Start(list))
}

/// Reads from `start` until every key in `acked` was seen or `patience` passed without one.
pub fn verify(
    opts: &VerifyOptions,
    start: &Start,
    acked: &[String],
) -> Result<Verification, String> {
    let consumer = consumer(opts)?;
    consumer.assign(&start.0).map_err(|e| e.to_string())?;
    let mut awaited: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let mut seen: HashSet<Vec<u8>> = HashSet::with_capacity(acked.len());
    let (mut found, mut duplicates) = (0, 0);
    let mut progress = Instant::now();
    let mut nudged = !opts.nudge;
    while !awaited.is_empty() && progress.elapsed() < opts.patience {
        if !nudged && progress.elapsed() > Duration::from_secs(3) {
            nudge(opts, start)?;
            nudged = true;
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.map_err(|e| format!("kafka: {e}"))?;
        let Some(key) = message.key() else { continue };
        if let Ok(k) = std::str::from_utf8(key)
            && awaited.remove(k)
        {
            found += 1;
            progress = Instant::now();
            seen.insert(key.to_vec());
        } else if seen.contains(key) {
            duplicates += 1;
        }
    }
    let mut missing: Vec<String> = awaited.into_iter().map(str::to_owned).collect();
    missing.sort();
    Ok(Verification {
        found,
        missing,
        duplicates,
    })
}

fn nudge(opts: &VerifyOptions, start: &Start) -> Result<(), String> {
    let producer: BaseProducer = client(opts)
        .create()
        .map_err(|e| format!("kafka producer: {e}"))?;
    for element in start.0.elements() {
        let record = BaseRecord::<[u8], [u8]>::to(&opts.topic)
            .partition(element.partition())
            .key(b"im-relay-bench-marker")
            .payload(b"{}");
        producer.send(record).map_err(|(e, _)| e.to_string())?;
    }
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| e.to_string())
}
