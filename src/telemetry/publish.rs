//! Events of the publisher: deliveries, retries, refusals, dead letters, the blocked state,
//! producer rebuilds, and librdkafka's statistics.

use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};

use super::{Event, cached};

/// librdkafka's own statistics (every `statistics.interval.ms`): levels as gauges, cumulative
/// counts as counters.
pub struct KafkaStatistics<'a>(pub &'a rdkafka::Statistics);

impl Event for KafkaStatistics<'_> {
    fn emit(&self) {
        let s = self.0;
        gauge!("im_relay_kafka_queue_messages").set(s.msg_cnt as f64);
        gauge!("im_relay_kafka_queue_bytes").set(s.msg_size as f64);
        for b in s.brokers.values() {
            // Bootstrap pseudo-brokers come and go; the real ones are bounded by the cluster.
            if b.nodeid < 0 {
                continue;
            }
            let broker = b.nodename.clone();
            if let Some(rtt) = &b.rtt {
                gauge!("im_relay_kafka_broker_rtt_seconds", "broker" => broker.clone())
                    .set(rtt.avg as f64 / 1e6);
            }
            gauge!("im_relay_kafka_broker_requests_in_flight", "broker" => broker.clone())
                .set(b.waitresp_cnt as f64);
            // Cumulative in librdkafka (from 0 again when the producer is rebuilt, which
            // Prometheus reads as a counter reset).
            counter!("im_relay_kafka_broker_retries_total", "broker" => broker.clone())
                .absolute(b.txretries);
            counter!("im_relay_kafka_broker_errors_total", "broker" => broker.clone())
                .absolute(b.txerrs);
            counter!("im_relay_kafka_broker_request_timeouts_total", "broker" => broker.clone())
                .absolute(b.req_timeouts);
            // What compression saves shows here: bytes on the wire per record published.
            counter!("im_relay_kafka_broker_sent_bytes_total", "broker" => broker)
                .absolute(b.txbytes);
        }
    }
}

/// Kafka confirmed a record.
pub struct RecordPublished {
    pub latency: Duration,
}

impl Event for RecordPublished {
    fn emit(&self) {
        cached!(Counter, counter!("im_relay_records_published_total")).increment(1);
        cached!(Histogram, histogram!("im_relay_record_delivery_seconds"))
            .record(self.latency.as_secs_f64());
    }
}

/// A delivery failed and will be retried from the spool's copy.
pub struct PublishRetried<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub attempts: u32,
}

impl Event for PublishRetried<'_> {
    fn emit(&self) {
        counter!("im_relay_publish_retries_total").increment(1);
        // The first failure of a record says why; later ones would repeat it.
        if self.attempts == 1 {
            tracing::warn!(error = %self.error, "delivery failed; retrying");
        }
    }
}

/// The producer was replaced (a fatal state, or nothing confirmed for a whole message
/// timeout); every unconfirmed record goes again. WARN: records wait meanwhile, none is lost.
pub struct ProducerRebuilt<'a> {
    pub in_flight: usize,
    pub fatal: Option<&'a str>,
    pub since_last_delivery: Duration,
    /// The new producer could not be made (tried again a second later).
    pub failed: Option<&'a String>,
}

impl Event for ProducerRebuilt<'_> {
    fn emit(&self) {
        let result = if self.failed.is_some() {
            "failed"
        } else {
            "ok"
        };
        counter!("im_relay_producer_rebuilds_total", "result" => result).increment(1);
        tracing::warn!(
            in_flight = self.in_flight,
            fatal = self.fatal,
            since_last_delivery_s = self.since_last_delivery.as_secs(),
            error = self.failed.map(String::as_str),
            "{}",
            if self.failed.is_some() {
                "cannot rebuild the producer; trying again in a second"
            } else {
                "producer rebuilt; unconfirmed records sent again"
            }
        );
    }
}

/// The publisher's view of the backlog, refreshed on every turn of its loop.
pub struct PublisherGauges {
    pub backlog_records: u64,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub in_flight: usize,
    pub oldest_unpublished: Duration,
}

impl Event for PublisherGauges {
    fn emit(&self) {
        gauge!("im_relay_spool_backlog_records").set(self.backlog_records as f64);
        gauge!("im_relay_spool_bytes").set(self.spool_bytes as f64);
        gauge!("im_relay_spool_max_bytes").set(self.spool_max_bytes as f64);
        gauge!("im_relay_publish_in_flight_records").set(self.in_flight as f64);
        gauge!("im_relay_spool_oldest_unpublished_age_seconds")
            .set(self.oldest_unpublished.as_secs_f64());
    }
}

/// Why the publisher cannot move records to Kafka right now. A small fixed set: the label of
/// `im_relay_publish_blocked{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// The topic (or partition) does not exist.
    TopicMissing,
    /// The ACLs refuse this client the topic (or the cluster).
    NotAuthorized,
    /// The brokers refuse the client's credentials (SASL): a wrong password, user or
    /// mechanism.
    AuthenticationFailed,
    /// The idempotent producer reached a fatal state; it is rebuilt.
    ProducerFatal,
    /// Brokers down or not answering in time.
    BrokerUnavailable,
    /// The broker refused the record's timestamp: a clock is off (`INVALID_TIMESTAMP`).
    TimestampRefused,
    /// A batch arrived damaged (`CORRUPT_MESSAGE`): resent.
    CorruptInTransit,
    /// Any other error Kafka gave: retried, never dropped.
    Other,
    /// A spool entry this version cannot read (written by another version): it waits for an
    /// operator (`im-relay spool drop`) or the version that wrote it.
    EntryUnreadable,
    /// The dead-letter directory cannot be written.
    DeadLetterFailing,
}

impl Blocked {
    pub const ALL: [Blocked; 10] = [
        Blocked::TopicMissing,
        Blocked::NotAuthorized,
        Blocked::AuthenticationFailed,
        Blocked::ProducerFatal,
        Blocked::BrokerUnavailable,
        Blocked::TimestampRefused,
        Blocked::CorruptInTransit,
        Blocked::Other,
        Blocked::EntryUnreadable,
        Blocked::DeadLetterFailing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Blocked::TopicMissing => "topic_missing",
            Blocked::NotAuthorized => "not_authorized",
            Blocked::AuthenticationFailed => "authentication_failed",
            Blocked::ProducerFatal => "producer_fatal",
            Blocked::BrokerUnavailable => "broker_unavailable",
            Blocked::TimestampRefused => "timestamp_refused",
            Blocked::CorruptInTransit => "corrupt_in_transit",
            Blocked::Other => "other",
            Blocked::EntryUnreadable => "entry_unreadable",
            Blocked::DeadLetterFailing => "dead_letter_failing",
        }
    }
}

/// The publisher's blocked state changed (`None`: moving again). One log line per change; the
/// gauge is 1 for the current reason and 0 for every other.
pub struct PublishBlocked<'a> {
    pub reason: Option<Blocked>,
    pub error: &'a dyn std::fmt::Display,
}

impl Event for PublishBlocked<'_> {
    fn emit(&self) {
        for r in Blocked::ALL {
            gauge!("im_relay_publish_blocked", "reason" => r.label())
                .set(f64::from(u8::from(self.reason == Some(r))));
        }
        match self.reason {
            Some(r) => tracing::warn!(
                reason = r.label(),
                error = %self.error,
                "publishing blocked; records wait in the spool"
            ),
            None => tracing::info!("publishing moving again"),
        }
    }
}

/// Kafka refused a record for good (too large for the broker, invalid): it goes to the
/// quarantine topic with the reason instead.
pub struct RecordRefused<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl Event for RecordRefused<'_> {
    fn emit(&self) {
        counter!("im_relay_records_refused_total").increment(1);
        tracing::warn!(error = %self.error, "Kafka refused a record for good; quarantining it");
    }
}

/// Not even the quarantine topic took a record: it is kept in the spool's dead-letter
/// directory. Needs an operator: ERROR.
pub struct RecordDeadLettered<'a> {
    pub seq: u64,
    pub error: &'a dyn std::fmt::Display,
}

impl Event for RecordDeadLettered<'_> {
    fn emit(&self) {
        counter!("im_relay_dead_letter_records_total").increment(1);
        tracing::error!(
            seq = self.seq,
            error = %self.error,
            "record refused by the quarantine topic too; kept in the dead-letter directory"
        );
    }
}

/// Records an operator dropped (`im-relay spool drop`), skipped by this run. Data given up on
/// purpose: ERROR, so it stands out.
pub struct RecordsDropped(pub usize);

impl Event for RecordsDropped {
    fn emit(&self) {
        counter!("im_relay_records_dropped_total").increment(self.0 as u64);
        if self.0 > 0 {
            tracing::error!(
                records = self.0,
                "spool records dropped by an operator are skipped (kept in dead-letter/)"
            );
        }
    }
}

/// What a topic's settings allow (`publish::durability`): exported, and a warning while they
/// cannot keep an acknowledged record through a broker's loss.
pub struct TopicDurability<'a>(pub &'a crate::publish::durability::Durability);

impl Event for TopicDurability<'_> {
    fn emit(&self) {
        let d = self.0;
        let topic = d.topic.clone();
        gauge!("im_relay_kafka_brokers").set(d.brokers as f64);
        gauge!("im_relay_kafka_topic_replication_factor", "topic" => topic.clone())
            .set(d.replication_factor as f64);
        if let Some(m) = d.min_insync_replicas {
            gauge!("im_relay_kafka_topic_min_insync_replicas", "topic" => topic.clone())
                .set(m as f64);
        }
        if let Some(u) = d.unclean_leader_election {
            gauge!("im_relay_kafka_topic_unclean_leader_election", "topic" => topic.clone())
                .set(f64::from(u8::from(u)));
        }
        let risks = d.risks();
        gauge!("im_relay_kafka_topic_at_risk", "topic" => topic)
            .set(f64::from(u8::from(!risks.is_empty())));
        if !risks.is_empty() {
            tracing::warn!(
                topic = %d.topic,
                replication_factor = d.replication_factor,
                min_insync_replicas = d.min_insync_replicas,
                unclean_leader_election = d.unclean_leader_election,
                brokers = d.brokers,
                risks = %risks.join(", "),
                "topic cannot keep acknowledged records through a broker's loss"
            );
        }
    }
}
