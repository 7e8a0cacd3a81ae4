//! Cross-cutting: what happens along the road, told once. Each event is a struct whose `emit()`
//! writes the metric and the log line together, so the two never drift. Metric names follow
//! Prometheus conventions; labels come from small fixed sets, never ids or keys.

pub mod activity;
pub mod catalog;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::domain::unix_seconds;
use crate::error::Reason;

/// Installs the log subscriber: JSON lines unless `IM_RELAY_LOG_FORMAT=pretty`; the level
/// filter comes from `IM_RELAY_LOG` (or `RUST_LOG`), `info` by default.
pub fn init_logging() {
    let filter = std::env::var("IM_RELAY_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let pretty = std::env::var("IM_RELAY_LOG_FORMAT").is_ok_and(|f| f == "pretty");
    // A second call (tests spawn many apps in one process) keeps the first subscriber.
    let _ = if pretty {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}

/// The process-wide metrics recorder. The `metrics` facade allows one per process, so every
/// app built in this process shares it (tests compare before/after values).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ];
            let skew = [
                -60.0, -30.0, -10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ];
            let bytes = [
                256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
            ];
            let age = [
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
            ];
            let delivery = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0,
            ];
            let buckets: [(&str, &[f64]); 6] = [
                ("im_relay_request_duration_seconds", &latency),
                ("im_relay_record_delivery_seconds", &delivery),
                ("im_relay_signature_skew_seconds", &skew),
                ("im_relay_request_body_bytes", &bytes),
                ("im_relay_message_age_seconds", &age),
                ("im_relay_spool_sync_duration_seconds", &latency),
            ];
            let recorder = buckets
                .into_iter()
                .try_fold(PrometheusBuilder::new(), |b, (name, list)| {
                    b.set_buckets_for_metric(Matcher::Full(name.into()), list)
                })
                .map(PrometheusBuilder::build_recorder)
                .expect("bucket lists are non-empty");
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program's); ours still
            // renders what is recorded through it.
            let _ = metrics::set_global_recorder(recorder);
            catalog::describe();
            handle
        })
        .clone()
}

/// How a callback ended, for `im_relay_callbacks_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed: handed on towards Kafka.
    Accepted,
    /// A command we do not relay: acknowledged, not published.
    Ignored,
    Rejected,
    /// Already accepted within the dedup window: acknowledged, not published again.
    Duplicate,
    /// The very same signed request seen again within the freshness window.
    Replayed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored => "ignored",
            Outcome::Rejected => "rejected",
            Outcome::Duplicate => "duplicate",
            Outcome::Replayed => "replayed",
        }
    }
}

/// A callback answered; `elapsed` is the time from the request's start to our answer (the
/// ack latency Tencent sees, less the network).
pub struct CallbackFinished {
    pub outcome: Outcome,
    pub status: u16,
    pub elapsed: Duration,
}

impl CallbackFinished {
    pub fn emit(&self) {
        let outcome = self.outcome.label();
        counter!("im_relay_callbacks_total", "outcome" => outcome).increment(1);
        let status = match self.status {
            200 => "200",
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            405 => "405",
            408 => "408",
            413 => "413",
            503 => "503",
            _ => "other",
        };
        counter!("im_relay_http_requests_total", "status" => status).increment(1);
        histogram!("im_relay_request_duration_seconds", "outcome" => outcome)
            .record(self.elapsed.as_secs_f64());
        tracing::trace!(outcome, "callback answered");
    }
}

/// An authenticated callback, by command (a fixed set of Tencent's names, then `other`).
pub struct CallbackReceived {
    pub command: &'static str,
    /// `now − RequestTime` of a signed request, in seconds: a drifting clock shows here first.
    pub skew_seconds: Option<i64>,
    pub body_bytes: usize,
}

impl CallbackReceived {
    pub fn emit(&self) {
        counter!("im_relay_callbacks_received_total", "command" => self.command).increment(1);
        if let Some(skew) = self.skew_seconds {
            histogram!("im_relay_signature_skew_seconds").record(skew as f64);
        }
        histogram!("im_relay_request_body_bytes").record(self.body_bytes as f64);
    }
}

/// Statistics of the traffic itself, for each message accepted into the spool.
pub struct MessageAccepted<'a> {
    pub element_types: &'a [&'static str],
    pub delivered: Option<bool>,
    pub online_only: Option<bool>,
    /// `received_at − MsgTime`.
    pub age_seconds: Option<f64>,
    pub from: &'a str,
    pub to: &'a str,
}

static ACTIVITY: LazyLock<Mutex<activity::Activity>> = LazyLock::new(Default::default);

impl MessageAccepted<'_> {
    pub fn emit(&self) {
        let tri = |b: Option<bool>, yes: &'static str, no: &'static str| match b {
            Some(true) => yes,
            Some(false) => no,
            None => "unknown",
        };
        counter!(
            "im_relay_messages_total",
            "result" => tri(self.delivered, "delivered", "failed"),
            "online_only" => tri(self.online_only, "true", "false"),
        )
        .increment(1);
        for t in self.element_types {
            counter!("im_relay_message_elements_total", "type" => *t).increment(1);
        }
        if let Some(age) = self.age_seconds {
            histogram!("im_relay_message_age_seconds").record(age);
        }
        if let Ok(mut a) = ACTIVITY.lock() {
            a.record(self.from, self.to, unix_seconds());
        }
    }
}

/// Refreshes the gauges computed rather than counted: active users, process figures.
pub fn refresh_gauges(process: &metrics_process::Collector) {
    if let Ok(mut a) = ACTIVITY.lock() {
        for (window, senders, recipients) in a.estimates(unix_seconds()) {
            gauge!("im_relay_active_users", "role" => "sender", "window" => window)
                .set(senders as f64);
            gauge!("im_relay_active_users", "role" => "recipient", "window" => window)
                .set(recipients as f64);
        }
    }
    process.collect();
}

/// `im_relay_build_info{version, git_sha} 1`, and the process metrics' descriptions.
pub fn describe_process(process: &metrics_process::Collector) {
    gauge!(
        "im_relay_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => env!("IM_RELAY_GIT_SHA"),
    )
    .set(1.0);
    process.describe();
}

/// librdkafka's own statistics (every `statistics.interval.ms`): levels as gauges, cumulative
/// counts as counters.
pub struct KafkaStatistics<'a>(pub &'a rdkafka::Statistics);

impl KafkaStatistics<'_> {
    pub fn emit(&self) {
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
            counter!("im_relay_kafka_broker_request_timeouts_total", "broker" => broker)
                .absolute(b.req_timeouts);
        }
    }
}

/// A command we do not relay (one app has one callback URL, so all its commands come here).
/// Counted by `CallbackFinished` as `ignored`; its text, chosen by the caller, only goes to
/// the log.
pub struct CallbackIgnored<'a> {
    pub command: &'a str,
}

impl CallbackIgnored<'_> {
    pub fn emit(&self) {
        tracing::debug!(command = self.command, "callback command not relayed");
    }
}

/// A request refused. Logged at most once a second (a flood of bad requests must not become
/// a flood of log lines), with the count of those not logged.
pub struct CallbackRejected<'a> {
    pub reason: Reason,
    /// Safe-to-show detail (a field name); never a secret.
    pub detail: Option<&'a str>,
    pub peer: Option<std::net::SocketAddr>,
}

impl CallbackRejected<'_> {
    pub fn emit(&self) {
        let reason = self.reason.label();
        counter!("im_relay_callbacks_rejected_total", "reason" => reason).increment(1);
        static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
        static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
        let now = unix_seconds();
        if LAST_SECOND.swap(now, Ordering::Relaxed) == now {
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            reason,
            detail = self.detail,
            peer = self.peer.map(tracing::field::display),
            suppressed,
            "callback rejected"
        );
    }
}

/// An authenticated callback that cannot be relayed was spooled for the quarantine topic.
pub struct CallbackQuarantined {
    pub reason: Reason,
}

impl CallbackQuarantined {
    pub fn emit(&self) {
        let reason = self.reason.label();
        counter!("im_relay_callbacks_quarantined_total", "reason" => reason).increment(1);
        tracing::debug!(reason, "callback quarantined");
    }
}

/// A connection to the public listener was accepted.
pub struct ConnectionOpened;

impl ConnectionOpened {
    pub fn emit(&self) {
        gauge!("im_relay_http_open_connections").increment(1.0);
    }
}

/// A connection to the public listener ended.
pub struct ConnectionClosed;

impl ConnectionClosed {
    pub fn emit(&self) {
        gauge!("im_relay_http_open_connections").decrement(1.0);
    }
}

/// A connection over `max_connections` was closed at once.
pub struct ConnectionRefused;

impl ConnectionRefused {
    pub fn emit(&self) {
        counter!("im_relay_http_connections_refused_total").increment(1);
    }
}

/// Elements kept raw because their type or shape was not one we know.
pub struct ElementsUntyped(pub usize);

impl ElementsUntyped {
    pub fn emit(&self) {
        if self.0 > 0 {
            counter!("im_relay_elements_untyped_total").increment(self.0 as u64);
            tracing::debug!(count = self.0, "elements kept untyped");
        }
    }
}

/// Kafka confirmed a record.
pub struct RecordPublished {
    pub latency: Duration,
}

impl RecordPublished {
    pub fn emit(&self) {
        counter!("im_relay_records_published_total").increment(1);
        histogram!("im_relay_record_delivery_seconds").record(self.latency.as_secs_f64());
    }
}

/// A delivery failed and will be retried from the spool's copy.
pub struct PublishRetried<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub attempts: u32,
}

impl PublishRetried<'_> {
    pub fn emit(&self) {
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

impl ProducerRebuilt<'_> {
    pub fn emit(&self) {
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

/// Reading the spool failed; the publisher tries again next turn. Logged once per streak.
pub struct SpoolReadFailed<'a> {
    pub error: &'a std::io::Error,
    pub first: bool,
}

impl SpoolReadFailed<'_> {
    pub fn emit(&self) {
        counter!("im_relay_spool_read_failures_total").increment(1);
        if self.first {
            tracing::error!(error = %self.error, "cannot read the spool; trying again");
        }
    }
}

/// The committed position could not be written: delivered records will be sent again after
/// a restart (duplicates, never a loss).
pub struct SpoolCommitFailed<'a> {
    pub error: &'a std::io::Error,
}

impl SpoolCommitFailed<'_> {
    pub fn emit(&self) {
        counter!("im_relay_spool_commit_failures_total").increment(1);
        tracing::error!(error = %self.error, "cannot persist the spool position");
    }
}

/// A checksummed spool entry in a format this version does not know (an upgrade or a
/// rollback): it waits, holding the commit (`im_relay_publish_blocked{reason="entry_unreadable"}`).
pub struct SpoolEntryUnreadable {
    pub seq: u64,
    pub version: Option<u8>,
}

impl SpoolEntryUnreadable {
    pub fn emit(&self) {
        tracing::error!(
            seq = self.seq,
            version = self.version,
            "spool entry not understood; it waits (im-relay spool drop gives it up)"
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

impl PublisherGauges {
    pub fn emit(&self) {
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
    /// Authentication or authorization failed.
    NotAuthorized,
    /// The idempotent producer reached a fatal state; it is rebuilt.
    ProducerFatal,
    /// Brokers down or not answering in time.
    BrokerUnavailable,
    /// Any other error Kafka gave: retried, never dropped.
    Other,
    /// A spool entry this version cannot read (written by another version): it waits for an
    /// operator (`im-relay spool drop`) or the version that wrote it.
    EntryUnreadable,
    /// The dead-letter directory cannot be written.
    DeadLetterFailing,
}

impl Blocked {
    pub const ALL: [Blocked; 7] = [
        Blocked::TopicMissing,
        Blocked::NotAuthorized,
        Blocked::ProducerFatal,
        Blocked::BrokerUnavailable,
        Blocked::Other,
        Blocked::EntryUnreadable,
        Blocked::DeadLetterFailing,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Blocked::TopicMissing => "topic_missing",
            Blocked::NotAuthorized => "not_authorized",
            Blocked::ProducerFatal => "producer_fatal",
            Blocked::BrokerUnavailable => "broker_unavailable",
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

impl PublishBlocked<'_> {
    pub fn emit(&self) {
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

impl RecordRefused<'_> {
    pub fn emit(&self) {
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

impl RecordDeadLettered<'_> {
    pub fn emit(&self) {
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

impl RecordsDropped {
    pub fn emit(&self) {
        counter!("im_relay_records_dropped_total").increment(self.0 as u64);
        if self.0 > 0 {
            tracing::error!(
                records = self.0,
                "spool records dropped by an operator are skipped (kept in dead-letter/)"
            );
        }
    }
}

/// A write to the spool failed: the callbacks in it were refused (`503`). ERROR: Tencent does
/// not retry them.
pub struct SpoolWriteFailed<'a> {
    pub error: &'a std::io::Error,
}

impl SpoolWriteFailed<'_> {
    pub fn emit(&self) {
        counter!("im_relay_spool_write_failures_total").increment(1);
        tracing::error!(error = %self.error, "spool write failed; callbacks refused until it succeeds");
    }
}

/// A background sync of the spool failed (`Interval`): what was acknowledged since the last
/// good sync would not survive a power cut. ERROR.
pub struct SpoolSyncFailed<'a> {
    pub error: &'a std::io::Error,
}

impl SpoolSyncFailed<'_> {
    pub fn emit(&self) {
        counter!("im_relay_spool_sync_failures_total").increment(1);
        tracing::error!(error = %self.error, "spool sync failed");
    }
}

/// The counters an alert watches, at 0 from the start: an alert on `increase()` needs the
/// series before the first event.
pub fn register_alerting_counters() {
    for name in [
        "im_relay_spool_damaged_frames_total",
        "im_relay_records_dropped_total",
        "im_relay_dead_letter_records_total",
        "im_relay_records_refused_total",
        "im_relay_spool_write_failures_total",
        "im_relay_spool_sync_failures_total",
    ] {
        counter!(name).increment(0);
    }
    // ImRelayNoCallbacks watches it: at 0 from startup, so a relay that never hears from
    // Tencent alerts too.
    let after_send = crate::domain::CallbackCommand::C2cAfterSendMsg.label();
    counter!("im_relay_callbacks_received_total", "command" => after_send).increment(0);
    for r in Blocked::ALL {
        gauge!("im_relay_publish_blocked", "reason" => r.label()).set(0.0);
    }
}

/// A damaged stretch of a spool segment was skipped: the record(s) in it are lost. ERROR.
pub struct SpoolDamage {
    /// First sequence number of the segment (its file name).
    pub segment: u64,
    pub bytes: usize,
}

impl SpoolDamage {
    pub fn emit(&self) {
        counter!("im_relay_spool_damaged_frames_total").increment(1);
        tracing::error!(
            segment = self.segment,
            bytes = self.bytes,
            "damaged spool frames skipped"
        );
    }
}

/// One group-committed batch of records was written to the spool.
pub struct SpoolAppended {
    pub records: usize,
    pub bytes: usize,
}

impl SpoolAppended {
    pub fn emit(&self) {
        counter!("im_relay_spool_appended_records_total").increment(self.records as u64);
        counter!("im_relay_spool_appended_bytes_total").increment(self.bytes as u64);
        counter!("im_relay_spool_writes_total").increment(1);
    }
}

/// The spool's active segment was synced to disk.
pub struct SpoolSynced {
    pub elapsed: Duration,
}

impl SpoolSynced {
    pub fn emit(&self) {
        counter!("im_relay_spool_syncs_total").increment(1);
        histogram!("im_relay_spool_sync_duration_seconds").record(self.elapsed.as_secs_f64());
    }
}
