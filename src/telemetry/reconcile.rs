//! Events of `im-relay reconcile`, against Tencent's hourly files.

use std::time::SystemTime;

use metrics::{counter, gauge};
use time::OffsetDateTime;

use super::Event;
use crate::backfill::{Error, Row, beijing_hour};

/// Reconciliation starts: every series an alert watches exists from the first scrape, and
/// the last success is the state file's time (when an hour was last recorded), or now when
/// there is none — so `ImRelayReconcileStale` can fire after a restart.
pub struct ReconcileStarted {
    pub last_written: Option<SystemTime>,
}

impl Event for ReconcileStarted {
    fn emit(&self) {
        for reason in ["gap", "no_callback"] {
            counter!("im_relay_reconcile_missing_total", "reason" => reason).increment(0);
        }
        counter!("im_relay_reconcile_failures_total").increment(0);
        counter!("im_relay_reconcile_hours_total").increment(0);
        counter!("im_relay_records_refused_total").increment(0);
        gauge!("im_relay_reconcile_state_broken").set(0.0);
        gauge!("im_relay_reconcile_records_lost").set(0.0);
        let since = self.last_written.unwrap_or_else(SystemTime::now);
        let seconds = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        gauge!("im_relay_reconcile_last_success_timestamp_seconds").set(seconds);
    }
}

/// An hour compared with the topic; what was missing is published.
pub struct Reconciled<'a> {
    pub hour: OffsetDateTime,
    pub row: &'a Row,
}

impl Event for Reconciled<'_> {
    fn emit(&self) {
        let gap = self.row.missing();
        let expected = self.row.no_callback;
        counter!("im_relay_reconcile_hours_total").increment(1);
        counter!("im_relay_reconcile_missing_total", "reason" => "gap").increment(gap);
        counter!("im_relay_reconcile_missing_total", "reason" => "no_callback").increment(expected);
        gauge!("im_relay_reconcile_last_success_timestamp_seconds")
            .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
        gauge!("im_relay_reconcile_records_lost").set(0.0);
        let hour = beijing_hour(self.hour);
        if gap > 0 || self.row.unparsable > 0 {
            tracing::warn!(
                hour,
                found = self.row.found,
                missing = gap,
                no_callback = expected,
                unparsable = self.row.unparsable,
                "reconciliation found messages the relay never received and published them"
            );
        } else {
            tracing::info!(
                hour,
                found = self.row.found,
                no_callback = expected,
                "hour reconciled: nothing missing"
            );
        }
    }
}

/// The hour is not ready (its file, or a relay's spool from before its end): later.
pub struct ReconcilePostponed<'a> {
    pub hour: OffsetDateTime,
    pub why: &'a str,
}

impl Event for ReconcilePostponed<'_> {
    fn emit(&self) {
        tracing::info!(
            hour = beijing_hour(self.hour),
            why = self.why,
            "reconciliation of the hour postponed"
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
        if matches!(self.error, Error::Lost(_)) {
            gauge!("im_relay_reconcile_records_lost").set(1.0);
        }
        tracing::error!(hour = beijing_hour(self.hour), error = %self.error, "reconciliation failed; retrying in 5 minutes");
    }
}

/// The state file cannot be read or written, or names a future hour: reconciliation stops
/// (an operator decides) rather than skip hours. `why: None` once it reads again.
pub struct ReconcileStateBroken<'a> {
    pub why: Option<&'a str>,
}

impl Event for ReconcileStateBroken<'_> {
    fn emit(&self) {
        gauge!("im_relay_reconcile_state_broken").set(f64::from(u8::from(self.why.is_some())));
        if let Some(why) = self.why {
            tracing::error!(
                why,
                "reconciliation stopped: its state is broken (fix or remove the file — removing \
                 it starts from the next hour due, and earlier hours then need `im-relay \
                 backfill`); checked again every minute"
            );
        }
    }
}
