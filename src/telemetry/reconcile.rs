//! Events of `serve`'s reconciliation against Tencent's hourly files.

use metrics::{counter, gauge};
use time::OffsetDateTime;

use super::Event;
use crate::backfill::{Error, Row, beijing_hour};

/// An hour compared with the topic; what was missing is published.
pub struct Reconciled<'a> {
    pub hour: OffsetDateTime,
    pub row: &'a Row,
}

impl Event for Reconciled<'_> {
    fn emit(&self) {
        let missing = self.row.published + self.row.recalls_published;
        counter!("im_relay_reconcile_hours_total").increment(1);
        counter!("im_relay_reconcile_missing_total").increment(missing);
        gauge!("im_relay_reconcile_last_success_timestamp_seconds")
            .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
        let hour = beijing_hour(self.hour);
        if missing > 0 || self.row.unparsable > 0 {
            tracing::warn!(
                hour,
                found = self.row.found,
                missing,
                unparsable = self.row.unparsable,
                "reconciliation found messages the relay never received and published them"
            );
        } else {
            tracing::info!(
                hour,
                found = self.row.found,
                "hour reconciled: nothing missing"
            );
        }
    }
}

/// The hour is not ready (its file, or the spool's backlog from before its end): later.
pub struct ReconcilePostponed {
    pub hour: OffsetDateTime,
}

impl Event for ReconcilePostponed {
    fn emit(&self) {
        tracing::info!(
            hour = beijing_hour(self.hour),
            "reconciliation of the hour postponed: not ready yet"
        );
    }
}

pub struct ReconcileFailed<'a> {
    pub hour: OffsetDateTime,
    pub error: &'a Error,
}

impl Event for ReconcileFailed<'_> {
    fn emit(&self) {
        counter!("im_relay_reconcile_failures_total").increment(1);
        tracing::error!(hour = beijing_hour(self.hour), error = %self.error, "reconciliation failed; retrying in 5 minutes");
    }
}
