//! Events of the spool: batches written and synced, failures, damage, reads and commits.

use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};

use super::{Event, cached};

/// Reading the spool failed; the publisher tries again next turn. Logged once per streak.
pub struct SpoolReadFailed<'a> {
    pub error: &'a std::io::Error,
    pub first: bool,
}

impl Event for SpoolReadFailed<'_> {
    fn emit(&self) {
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

impl Event for SpoolCommitFailed<'_> {
    fn emit(&self) {
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

impl Event for SpoolEntryUnreadable {
    fn emit(&self) {
        tracing::error!(
            seq = self.seq,
            version = self.version,
            "spool entry not understood; it waits (im-relay spool drop gives it up)"
        );
    }
}

/// A write to the spool failed: the callbacks in it were refused (`503`). ERROR: Tencent does
/// not retry them.
pub struct SpoolWriteFailed<'a> {
    pub error: &'a std::io::Error,
}

impl Event for SpoolWriteFailed<'_> {
    fn emit(&self) {
        counter!("im_relay_spool_write_failures_total").increment(1);
        tracing::error!(error = %self.error, "spool write failed; callbacks refused until it succeeds");
    }
}

/// A background sync of the spool failed (`Interval`): what was acknowledged since the last
/// good sync would not survive a power cut. ERROR.
pub struct SpoolSyncFailed<'a> {
    pub error: &'a std::io::Error,
}

impl Event for SpoolSyncFailed<'_> {
    fn emit(&self) {
        counter!("im_relay_spool_sync_failures_total").increment(1);
        tracing::error!(error = %self.error, "spool sync failed");
    }
}

/// A damaged stretch of a spool segment was skipped: the record(s) in it are lost. ERROR.
pub struct SpoolDamage {
    /// First sequence number of the segment (its file name).
    pub segment: u64,
    pub bytes: usize,
}

impl Event for SpoolDamage {
    fn emit(&self) {
        counter!("im_relay_spool_damaged_frames_total").increment(1);
        tracing::error!(
            segment = self.segment,
            bytes = self.bytes,
            "damaged spool frames skipped"
        );
    }
}

/// Recovery set a segment aside (it overlaps an earlier one, or lies beyond any number this
/// spool gives): its records are owed and published by `im-relay spool drain` on `dir`.
pub struct SpoolSegmentSetAside<'a> {
    pub segment: &'a str,
    pub first: u64,
    pub last: Option<u64>,
    pub dir: &'a str,
}

impl Event for SpoolSegmentSetAside<'_> {
    fn emit(&self) {
        tracing::error!(
            segment = self.segment,
            first = self.first,
            last = self.last,
            dir = self.dir,
            "spool segment overlaps another; set aside, its records wait for \
             `im-relay spool drain --spool-dir <spool>/<dir>`"
        );
    }
}

/// Segments with records set aside in the spool's `foreign` directories (at open): the gauge
/// an alert watches until an operator has drained them.
pub struct SpoolSetAsideHeld(pub usize);

impl Event for SpoolSetAsideHeld {
    fn emit(&self) {
        gauge!("im_relay_spool_set_aside_segments").set(self.0 as f64);
        if self.0 > 0 {
            tracing::error!(
                segments = self.0,
                "spool segments set aside hold records: publish them with \
                 `im-relay spool drain --spool-dir <spool>/foreign` (and foreign.2, …)"
            );
        }
    }
}

/// One group-committed batch of records was written to the spool.
pub struct SpoolAppended {
    pub records: usize,
    pub bytes: usize,
}

impl Event for SpoolAppended {
    fn emit(&self) {
        cached!(Counter, counter!("im_relay_spool_appended_records_total"))
            .increment(self.records as u64);
        cached!(Counter, counter!("im_relay_spool_appended_bytes_total"))
            .increment(self.bytes as u64);
        cached!(Counter, counter!("im_relay_spool_writes_total")).increment(1);
    }
}

/// The spool's active segment was synced to disk.
pub struct SpoolSynced {
    pub elapsed: Duration,
}

impl Event for SpoolSynced {
    fn emit(&self) {
        cached!(Counter, counter!("im_relay_spool_syncs_total")).increment(1);
        cached!(
            Histogram,
            histogram!("im_relay_spool_sync_duration_seconds")
        )
        .record(self.elapsed.as_secs_f64());
    }
}
