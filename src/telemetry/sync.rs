//! Events of `im-relay sync`: records applied, dead letters, database and commit failures, lag.

use metrics::{counter, gauge};

use super::Event;

/// Records applied to the database in one committed transaction, by kind.
pub struct SyncApplied {
    pub kind: &'static str,
    pub records: u64,
}

impl Event for SyncApplied {
    fn emit(&self) {
        if self.records > 0 {
            counter!("im_relay_sync_applied_total", "kind" => self.kind).increment(self.records);
        }
    }
}

/// A record the tables cannot take, kept in `dead_letters`.
pub struct SyncDeadLettered<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub error: &'a str,
}

impl Event for SyncDeadLettered<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_dead_letters_total").increment(1);
        tracing::error!(
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            error = self.error,
            "record kept in the dead_letters table"
        );
    }
}

/// The database refused or could not be reached: the batch waits, nothing is committed.
pub struct SyncDatabaseFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl Event for SyncDatabaseFailed<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_database_errors_total").increment(1);
        tracing::warn!(error = %self.error, "database unavailable; retrying, offsets not committed");
    }
}

/// Another writer's transaction got in the way (a deadlock, a serialization failure): the
/// batch is applied again at once.
pub struct SyncConflict<'a> {
    pub error: &'a dyn std::fmt::Display,
}

impl Event for SyncConflict<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_conflicts_total").increment(1);
        tracing::info!(error = %self.error, "transaction conflict; applying the batch again");
    }
}

/// The consumer reported an error (librdkafka retries by itself; a position out of range is
/// handled as `SyncSkipped`).
pub struct SyncConsumerError<'a> {
    pub error: &'a rdkafka::error::KafkaError,
}

impl Event for SyncConsumerError<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_consumer_errors_total").increment(1);
        tracing::warn!(error = %self.error, "kafka consumer error");
    }
}

/// Records a partition did not deliver, `from..to`: `deleted` (retention overtook sync) or
/// `not_delivered` (compaction, transaction markers, records librdkafka could not read) — not
/// in the database.
pub struct SyncSkipped<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub reason: &'static str,
}

impl Event for SyncSkipped<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_skipped_records_total", "reason" => self.reason)
            .increment((self.to - self.from) as u64);
        tracing::error!(
            topic = self.topic,
            partition = self.partition,
            from_offset = self.from,
            to_offset = self.to,
            reason = self.reason,
            "records the broker did not deliver: offsets from_offset..to_offset are not in the \
             database (deleted: retention overtook sync; backfill restores what Tencent still \
             holds)"
        );
    }
}

/// Committing offsets failed: the batch will be applied again (same rows).
pub struct SyncCommitFailed<'a> {
    pub error: &'a rdkafka::error::KafkaError,
}

impl Event for SyncCommitFailed<'_> {
    fn emit(&self) {
        counter!("im_relay_sync_commit_failures_total").increment(1);
        tracing::warn!(error = %self.error, "offset commit failed; the batch will come again");
    }
}

/// Records on the assigned partitions not yet applied.
pub struct SyncLag(pub i64);

impl Event for SyncLag {
    fn emit(&self) {
        gauge!("im_relay_sync_lag_records").set(self.0 as f64);
    }
}

/// The counters sync's alerts watch, at 0 from the start.
pub fn register_sync_counters() {
    for name in [
        "im_relay_sync_dead_letters_total",
        "im_relay_sync_database_errors_total",
        "im_relay_sync_commit_failures_total",
        "im_relay_sync_conflicts_total",
        "im_relay_sync_consumer_errors_total",
    ] {
        counter!(name).increment(0);
    }
    for reason in ["deleted", "not_delivered"] {
        counter!("im_relay_sync_skipped_records_total", "reason" => reason).increment(0);
    }
    gauge!("im_relay_sync_lag_records").set(0.0);
}
