//! Events of the callback listener: requests answered, refused, quarantined; connections;
//! the traffic statistics of accepted messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};

use super::{Event, Labelled, activity, cached};
use crate::domain::{Relayed, unix_seconds};
use crate::error::Reason;
use crate::normalize::Kind;

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
    const LABELS: [&'static str; 5] = ["accepted", "ignored", "rejected", "duplicate", "replayed"];

    pub(super) fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Ignored => "ignored",
            Outcome::Rejected => "rejected",
            Outcome::Duplicate => "duplicate",
            Outcome::Replayed => "replayed",
        }
    }
}

/// The statuses `im_relay_http_requests_total` names; any other is `other`.
const STATUSES: [&str; 10] = [
    "200", "400", "401", "403", "404", "405", "408", "413", "503", "other",
];

/// A callback answered; `elapsed` is the time from the request's start to our answer (the
/// ack latency Tencent sees, less the network).
pub struct CallbackFinished {
    pub outcome: Outcome,
    pub status: u16,
    pub elapsed: Duration,
}

impl Event for CallbackFinished {
    fn emit(&self) {
        let outcome = self.outcome.label();
        cached!(
            Labelled<Counter>,
            Labelled::new(
                &Outcome::LABELS,
                |o| counter!("im_relay_callbacks_total", "outcome" => o)
            )
        )
        .get(outcome)
        .increment(1);
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
        cached!(
            Labelled<Counter>,
            Labelled::new(
                &STATUSES,
                |s| counter!("im_relay_http_requests_total", "status" => s)
            )
        )
        .get(status)
        .increment(1);
        cached!(
            Labelled<Histogram>,
            Labelled::new(&Outcome::LABELS, |o| {
                histogram!("im_relay_request_duration_seconds", "outcome" => o)
            })
        )
        .get(outcome)
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

impl Event for CallbackReceived {
    fn emit(&self) {
        cached!(
            Labelled<Counter>,
            Labelled::new(&Relayed::ALL.map(Relayed::label), |c| {
                counter!("im_relay_callbacks_received_total", "command" => c)
            })
        )
        .get(self.command)
        .increment(1);
        if let Some(skew) = self.skew_seconds {
            cached!(Histogram, histogram!("im_relay_signature_skew_seconds")).record(skew as f64);
        }
        cached!(Histogram, histogram!("im_relay_request_body_bytes"))
            .record(self.body_bytes as f64);
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

pub(super) static ACTIVITY: LazyLock<Mutex<activity::Activity>> = LazyLock::new(Default::default);

impl Event for MessageAccepted<'_> {
    fn emit(&self) {
        // Each flag as true, false or unknown: 0, 1, 2.
        let tri = |b: Option<bool>| b.map_or(2, |b| usize::from(!b));
        cached!(
            [Counter; 9],
            std::array::from_fn(|i| {
                counter!(
                    "im_relay_messages_total",
                    "result" => ["delivered", "failed", "unknown"][i / 3],
                    "online_only" => ["true", "false", "unknown"][i % 3],
                )
            })
        )[tri(self.delivered) * 3 + tri(self.online_only)]
        .increment(1);
        for t in self.element_types {
            cached!(
                Labelled<Counter>,
                Labelled::new(
                    &Kind::LABELS,
                    |t| counter!("im_relay_message_elements_total", "type" => t)
                )
            )
            .get(t)
            .increment(1);
        }
        if let Some(age) = self.age_seconds {
            cached!(Histogram, histogram!("im_relay_message_age_seconds")).record(age);
        }
        if let Ok(mut a) = ACTIVITY.lock() {
            a.record(self.from, self.to, unix_seconds());
        }
    }
}

/// A command we do not relay (one app has one callback URL, so all its commands come here).
/// Counted by `CallbackFinished` as `ignored`; its text, chosen by the caller, only goes to
/// the log.
pub struct CallbackIgnored<'a> {
    pub command: &'a str,
}

impl Event for CallbackIgnored<'_> {
    fn emit(&self) {
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

impl Event for CallbackRejected<'_> {
    fn emit(&self) {
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

impl Event for CallbackQuarantined {
    fn emit(&self) {
        let reason = self.reason.label();
        counter!("im_relay_callbacks_quarantined_total", "reason" => reason).increment(1);
        tracing::debug!(reason, "callback quarantined");
    }
}

/// A connection to the public listener was accepted.
pub struct ConnectionOpened;

impl Event for ConnectionOpened {
    fn emit(&self) {
        gauge!("im_relay_http_open_connections").increment(1.0);
    }
}

/// A connection to the public listener ended.
pub struct ConnectionClosed;

impl Event for ConnectionClosed {
    fn emit(&self) {
        gauge!("im_relay_http_open_connections").decrement(1.0);
    }
}

/// A connection over `max_connections` was closed at once.
pub struct ConnectionRefused;

impl Event for ConnectionRefused {
    fn emit(&self) {
        counter!("im_relay_http_connections_refused_total").increment(1);
    }
}

/// Records a relayed callback put in the spool, by command (a read receipt brings one per
/// message it covers).
pub struct RecordsAccepted {
    pub command: &'static str,
    pub records: usize,
}

impl Event for RecordsAccepted {
    fn emit(&self) {
        cached!(
            Labelled<Counter>,
            Labelled::new(&Relayed::ALL.map(Relayed::label), |c| {
                counter!("im_relay_records_accepted_total", "command" => c)
            })
        )
        .get(self.command)
        .increment(self.records as u64);
    }
}

/// Elements kept raw because their type or shape was not one we know.
pub struct ElementsUntyped(pub usize);

impl Event for ElementsUntyped {
    fn emit(&self) {
        if self.0 > 0 {
            counter!("im_relay_elements_untyped_total").increment(self.0 as u64);
            tracing::debug!(count = self.0, "elements kept untyped");
        }
    }
}
