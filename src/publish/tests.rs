//! The publisher against librdkafka's mock cluster: the faults a real broker here cannot
//! produce (authorization failures, a fatal idempotent-producer state, refusals for good).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::*;
use crate::config::KafkaConfig;
use crate::record::Record;
use crate::spool::{self, Fsync, SpoolConfig};

const TOPIC: &str = "im.c2c.mock";
const QUARANTINE: &str = "im.c2c.mock.quarantine";

struct Harness {
    dir: tempfile::TempDir,
    mock: MockCluster<'static, DefaultProducerContext>,
    appender: spool::Appender,
    shared: Arc<spool::Shared>,
    events: mpsc::Sender<Event>,
    publisher: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

fn harness(
    before_start: impl FnOnce(&MockCluster<'static, DefaultProducerContext>, &KafkaSink),
) -> Harness {
    let (mut h, publisher) = unstarted(&[], before_start);
    h.publisher = Some(publisher.spawn(Duration::from_secs(5)).unwrap());
    h
}

/// A harness whose publisher is not running yet.
fn unstarted(
    extra_env: &[(&'static str, &str)],
    before_start: impl FnOnce(&MockCluster<'static, DefaultProducerContext>, &KafkaSink),
) -> (Harness, Publisher<KafkaSink>) {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, 3, 1).unwrap();
    mock.create_topic(QUARANTINE, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let env: BTreeMap<&str, String> = [
        ("IM_RELAY_KAFKA_BROKERS", bootstrap),
        ("IM_RELAY_TOPIC", TOPIC.to_owned()),
        ("IM_RELAY_QUARANTINE_TOPIC", QUARANTINE.to_owned()),
        ("IM_RELAY_KAFKA_LINGER_MS", "1".to_owned()),
    ]
    .into_iter()
    .chain(extra_env.iter().map(|&(k, v)| (k, v.to_owned())))
    .collect();
    let kafka = KafkaConfig::load(None, &|k| env.get(k).cloned()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel();
    let wake = tx.clone();
    let opened = spool::open(
        &SpoolConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 26,
            segment_bytes: 1 << 20,
            fsync: Fsync::Always,
        },
        move || {
            let _ = wake.send(Event::Appended);
        },
    )
    .unwrap();
    let sink = KafkaSink::new(&kafka, tx.clone(), 0).unwrap();
    before_start(&mock, &sink);
    let publisher = Publisher::with_sink(
        PublisherConfig {
            kafka,
            max_in_flight: 100,
        },
        opened.reader,
        opened.shared.clone(),
        sink,
        Some(rx),
        Instant::now(),
    );
    let h = Harness {
        dir,
        mock,
        appender: opened.appender,
        shared: opened.shared,
        events: tx,
        publisher: None,
        writer: Some(opened.writer),
    };
    (h, publisher)
}

fn entry(id: &str) -> Record {
    Record {
        target: Target::Messages,
        key: Some(id.as_bytes().to_vec()),
        headers: vec![
            ("ce_id".into(), id.as_bytes().to_vec()),
            ("ce_type".into(), b"test".to_vec()),
        ],
        value: id.as_bytes().to_vec(),
        received_at_ms: 0,
    }
}

impl Harness {
    async fn append(&self, ids: &[String]) {
        for id in ids {
            self.appender.append(entry(id).encode()).await.unwrap();
        }
    }

    /// Waits until the backlog is delivered (committed).
    fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.shared.backlog() > 0 {
            assert!(
                Instant::now() < deadline,
                "backlog {} never drained",
                self.shared.backlog()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ce_id` → the quarantine reason header (empty on the messages topic), for `topic`.
    fn read(&self, topic: &str, want: usize) -> BTreeMap<String, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.mock.bootstrap_servers())
            .set(
                "group.id",
                format!("mock-reader-{topic}-{}", std::process::id()),
            )
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let mut got = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < want && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|h| h.key == name))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                // Sent as spooled: the key, the value, every header to the last.
                let (id, reason) = (header("ce_id"), header("im_quarantine_reason"));
                assert_eq!(m.key(), Some(id.as_bytes()));
                assert_eq!(m.payload(), Some(id.as_bytes()));
                assert_eq!(header("ce_type"), "test");
                assert!(reason.is_empty() || !header("im_quarantine_detail").is_empty());
                got.insert(id, reason);
            }
        }
        got
    }

    fn stop(mut self) -> tempfile::TempDir {
        drop(self.appender);
        if let Some(w) = self.writer.take() {
            w.join().unwrap();
        }
        let _ = self.events.send(Event::Stop);
        if let Some(p) = self.publisher.take() {
            p.join().unwrap();
        }
        self.dir
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// `Stop` can come in the same turn as the wake-up for the last records appended (the
/// publisher gathers events for a moment): those records were acknowledged, and the publisher
/// still reads and delivers them before it ends.
#[tokio::test(flavor = "multi_thread")]
async fn records_appended_just_before_stop_are_delivered_at_shutdown() {
    stop_with_records_waiting(&[], 50).await;
}

/// A producer queue smaller than the in-flight window: records wait in the ledger for room
/// (`QueueFull`) while nothing is with the producer, and shutdown still sends them.
#[tokio::test(flavor = "multi_thread")]
async fn records_waiting_for_room_in_the_producer_are_delivered_at_shutdown() {
    stop_with_records_waiting(&[("IM_RELAY_KAFKA_QUEUE_MAX_MESSAGES", "5")], 100).await;
}

async fn stop_with_records_waiting(env: &[(&'static str, &str)], n: usize) {
    let (h, publisher) = unstarted(env, |_, _| {});
    let sent = ids("last", n);
    h.append(&sent).await;
    h.events.send(Event::Stop).unwrap();
    publisher
        .spawn(Duration::from_secs(5))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(h.shared.backlog(), 0, "everything appended was committed");
    let got = h.read(TOPIC, sent.len());
    assert_eq!(
        got.into_keys().collect::<Vec<_>>(),
        sent.into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    h.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_failures_make_records_wait_then_deliver_them_all() {
    let h = harness(|mock, _| {
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 12],
        );
    });
    let sent = ids("auth", 30);
    h.append(&sent).await;
    h.wait_drained();
    let got = h.read(TOPIC, sent.len());
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), {
        let mut s = sent.clone();
        s.sort();
        s
    });
    h.stop();
}

/// Kafka deletes a topic while records flow: produce requests fail, the metadata says the
/// topic is gone, and librdkafka then refuses records for it at once — the synchronous error
/// that made the publisher drop every record before the fix. They wait instead, and all of
/// them arrive once the topic is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_deleted_while_running_holds_its_records_until_it_is_back() {
    use RDKafkaRespErr::{RD_KAFKA_RESP_ERR_NO_ERROR, RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART};
    let h = harness(|_, _| {});
    let before = ids("before", 10);
    h.append(&before).await;
    h.wait_drained();
    h.mock
        .topic_error(TOPIC, RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        .unwrap();
    h.mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART; 1000],
    );
    let during = ids("deleted", 20);
    h.append(&during).await;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        h.shared.backlog(),
        20,
        "records for a deleted topic must wait in the spool"
    );
    h.mock
        .topic_error(TOPIC, RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    h.mock.clear_request_errors(RDKafkaApiKey::Produce);
    h.wait_drained();
    let got = h.read(TOPIC, 30);
    for id in before.iter().chain(&during) {
        assert!(got.contains_key(id), "{id} missing");
    }
    h.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_producer_state_reported_with_nothing_in_flight_rebuilds_the_producer() {
    // Fatal before a single record was sent: it arrives through the error callback only.
    let h = harness(|_, sink| sink.inject_fatal());
    std::thread::sleep(Duration::from_millis(200));
    let sent = ids("fatal", 20);
    h.append(&sent).await;
    h.wait_drained();
    assert_eq!(h.read(TOPIC, sent.len()).len(), sent.len());
    h.stop();
}

/// Refused credentials block publishing with their reason at once; readiness hears of it only
/// while no broker has accepted this process yet (a later refusal must not pull a serving
/// relay: Tencent would lose the callbacks the spool could hold).
#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_turn_readiness_red_only_before_a_broker_accepted_them() {
    use std::sync::atomic::Ordering::Relaxed;
    let (h, mut p) = unstarted(&[], |_, _| {});
    let state = p.credentials();
    let now = Instant::now();
    assert_eq!(state.load(Relaxed), CREDENTIALS_UNKNOWN);
    p.handle(Event::CredentialsRefused { generation: 0 }, now);
    assert_eq!(state.load(Relaxed), CREDENTIALS_REFUSED);
    assert_eq!(p.blocked, Some(Blocked::AuthenticationFailed));
    // A report from a replaced producer says nothing about this one.
    p.handle(Event::CredentialsAccepted { generation: 9 }, now);
    assert_eq!(state.load(Relaxed), CREDENTIALS_REFUSED);
    p.handle(Event::CredentialsAccepted { generation: 0 }, now);
    assert_eq!(state.load(Relaxed), CREDENTIALS_ACCEPTED);
    assert_eq!(p.blocked, None);
    p.handle(Event::CredentialsRefused { generation: 0 }, now);
    assert_eq!(state.load(Relaxed), CREDENTIALS_ACCEPTED, "stays ready");
    assert_eq!(p.blocked, Some(Blocked::AuthenticationFailed));
    drop(p);
    h.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_refused_for_good_goes_to_the_quarantine_topic_with_its_reason() {
    let h = harness(|_, _| {});
    // Refused, then refused again when sent alone.
    h.mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 2],
    );
    let first = ids("big", 1);
    h.append(&first).await;
    h.wait_drained();
    let rest = ids("fine", 10);
    h.append(&rest).await;
    h.wait_drained();
    let quarantined = h.read(QUARANTINE, 1);
    assert_eq!(
        quarantined.get("big-0").map(String::as_str),
        Some("kafka_refused")
    );
    assert_eq!(h.read(TOPIC, rest.len()).len(), rest.len());
    h.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_both_topics_refuse_is_kept_in_the_dead_letter_directory() {
    let h = harness(|_, _| {});
    // Refused by each topic in a batch, and again alone.
    h.mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 4],
    );
    h.append(&ids("refused", 1)).await;
    h.wait_drained();
    let rest = ids("after", 5);
    h.append(&rest).await;
    h.wait_drained();
    assert_eq!(h.read(TOPIC, rest.len()).len(), rest.len());
    let dir = h.stop();
    let dead = dead_letters(dir.path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (entry, reason) = &dead[0];
    assert_eq!(entry.headers[0].1, b"refused-0");
    assert_eq!(entry.target, Target::Quarantine);
    assert!(reason.contains("too large"), "{reason}");
}

/// Kafka refuses a whole batch for one record too large for the topic: the records that
/// lingered beside it are sent again alone and delivered; none of them is quarantined.
#[tokio::test(flavor = "multi_thread")]
async fn records_refused_with_a_batch_are_sent_again_alone_and_delivered() {
    let (h, publisher) = unstarted(&[("IM_RELAY_KAFKA_LINGER_MS", "50")], |mock, _| {
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
    });
    let sent = ids("lingered", 10);
    // One spool write, one read: they reach the producer together and share its batch.
    h.appender
        .append_all(sent.iter().map(|id| entry(id).encode()).collect())
        .await
        .unwrap();
    let mut h = h;
    h.publisher = Some(publisher.spawn(Duration::from_secs(5)).unwrap());
    h.wait_drained();
    let got = h.read(TOPIC, sent.len());
    assert_eq!(got.len(), sent.len(), "{got:?}");
    assert!(got.values().all(String::is_empty), "{got:?}");
    h.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_timestamp_or_a_corrupt_batch_waits_and_is_delivered() {
    use RDKafkaRespErr::{RD_KAFKA_RESP_ERR_INVALID_MSG, RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP};
    for error in [
        RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP,
        RD_KAFKA_RESP_ERR_INVALID_MSG,
    ] {
        let h = harness(|mock, _| mock.request_errors(RDKafkaApiKey::Produce, &[error; 3]));
        let sent = ids("skewed", 5);
        h.append(&sent).await;
        h.wait_drained();
        let got = h.read(TOPIC, sent.len());
        assert_eq!(got.len(), sent.len(), "{error:?}: {got:?}");
        assert!(got.values().all(String::is_empty), "{error:?}: {got:?}");
        let dir = h.stop();
        assert!(dead_letters(dir.path()).is_empty());
    }
}

/// Entries this version cannot read hold the commit, but not the window: more of them than
/// the in-flight bound (100 here) still let the records behind them through.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_entries_beyond_the_window_hold_the_commit_not_the_records_behind_them() {
    let h = harness(|_, _| {});
    for i in 0..150 {
        let mut future = entry(&format!("future-{i}")).encode();
        future[0] = 9;
        h.appender.append(future).await.unwrap();
    }
    let behind = ids("behind", 10);
    h.append(&behind).await;
    let got = h.read(TOPIC, behind.len());
    assert_eq!(got.len(), behind.len(), "{got:?}");
    assert_eq!(
        h.shared.backlog(),
        160,
        "the unreadable entries hold the commit"
    );
    h.stop();
}

/// A producer whose fatal state comes straight back after every rebuild.
struct AlwaysFatal {
    rebuilds: usize,
}

impl Sink for AlwaysFatal {
    fn send(&mut self, _: &str, _: u64, _: &View<'_>) -> Result<(), SendError> {
        Err(SendError::Failed(Failure {
            disposition: Disposition::Wait(Blocked::ProducerFatal),
            error: "fenced".into(),
        }))
    }
    fn rebuild(&mut self, _: u64) -> Result<(), String> {
        self.rebuilds += 1;
        Ok(())
    }
    fn fatal(&self) -> Option<String> {
        Some("fenced".into())
    }
}

#[tokio::test]
async fn a_fatal_state_that_comes_straight_back_is_rebuilt_with_backoff_not_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let opened = spool::open(
        &SpoolConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 26,
            segment_bytes: 1 << 20,
            fsync: Fsync::Always,
        },
        || {},
    )
    .unwrap();
    opened.appender.append(entry("one").encode()).await.unwrap();
    let env = |k: &str| (k == "IM_RELAY_KAFKA_BROKERS").then(|| "127.0.0.1:1".to_owned());
    let start = Instant::now();
    let mut p = Publisher::with_sink(
        PublisherConfig {
            kafka: KafkaConfig::load(None, &env).unwrap(),
            max_in_flight: 100,
        },
        opened.reader,
        opened.shared,
        AlwaysFatal { rebuilds: 0 },
        None,
        start,
    );
    // A minute of turns, 10 ms apart, with the fatal state reported after every rebuild.
    for turn in 0..6000 {
        let now = start + Duration::from_millis(10 * turn);
        p.handle(
            Event::Fatal {
                generation: p.generation,
            },
            now,
        );
        p.step(now);
    }
    // 1 + 2 + 4 + 8 + 16 + 32 s apart: at most 7 rebuilds in the minute.
    let rebuilds = p.sink.rebuilds;
    assert!(
        (2..=7).contains(&rebuilds),
        "{rebuilds} rebuilds in a minute"
    );
    drop(p);
    drop(opened.appender);
    opened.writer.join().unwrap();
}

fn dead_letters(spool: &Path) -> Vec<(Record, String)> {
    let dir = spool.join(spool::DEAD_LETTER_DIR);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "entry") {
            let entry = Record::decode(&std::fs::read(&path).unwrap()).unwrap();
            let reason = std::fs::read_to_string(path.with_extension("reason")).unwrap();
            out.push((entry, reason));
        }
    }
    out
}

#[test]
fn every_kafka_error_is_classified_and_only_refusals_leave_the_topic() {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    let of = |c| classify(&KafkaError::MessageProduction(c)).disposition;
    assert_eq!(of(C::MessageSizeTooLarge), Disposition::Refused);
    assert_eq!(of(C::InvalidRecord), Disposition::Refused);
    assert_eq!(
        of(C::UnknownTopic),
        Disposition::Wait(Blocked::TopicMissing)
    );
    assert_eq!(
        of(C::UnknownTopicOrPartition),
        Disposition::Wait(Blocked::TopicMissing)
    );
    assert_eq!(
        of(C::TopicAuthorizationFailed),
        Disposition::Wait(Blocked::NotAuthorized)
    );
    assert_eq!(
        of(C::ClusterAuthorizationFailed),
        Disposition::Wait(Blocked::NotAuthorized)
    );
    assert_eq!(
        of(C::SaslAuthenticationFailed),
        Disposition::Wait(Blocked::AuthenticationFailed)
    );
    assert_eq!(of(C::Fatal), Disposition::Wait(Blocked::ProducerFatal));
    assert_eq!(
        of(C::MessageTimedOut),
        Disposition::Wait(Blocked::BrokerUnavailable)
    );
    assert_eq!(
        of(C::InvalidTimestamp),
        Disposition::Wait(Blocked::TimestampRefused)
    );
    assert_eq!(
        of(C::InvalidMessage),
        Disposition::Wait(Blocked::CorruptInTransit)
    );
    // Anything not named waits: dropping is never the default.
    assert_eq!(of(C::PolicyViolation), Disposition::Wait(Blocked::Other));
    assert_eq!(of(C::Unknown), Disposition::Wait(Blocked::Other));
}
