//! Cross-cutting: what happens along the road, told once. Each event is a struct whose
//! `Event::emit` writes the metric and the log line together, so the two never drift; they
//! live by area (`callbacks`, `spool`, `publish`). Metric names follow
//! Prometheus conventions; labels come from small fixed sets, never ids or keys.

pub mod activity;
mod callbacks;
pub mod catalog;
mod publish;
pub mod reconcile;
mod spool;
mod sync;

pub use callbacks::*;
pub use publish::*;
pub use spool::*;
pub use sync::*;

use std::sync::OnceLock;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::domain::unix_seconds;

/// Something that happened, told once: its metric and its log line.
pub trait Event {
    fn emit(&self);
}

/// A metric handle resolved in the registry once, kept in a static: `cached!(Counter,
/// counter!(…))`. Resolving it at each use (hashing the name and labels, a lock, a list of
/// labels built) cost more than the update itself, a dozen times per callback. Our recorder
/// is installed first, or a handle resolved before it would stay a no-op.
macro_rules! cached {
    ($handle:ty, $resolve:expr) => {{
        static HANDLE: std::sync::LazyLock<$handle> = std::sync::LazyLock::new(|| {
            $crate::telemetry::metrics_handle();
            $resolve
        });
        &*HANDLE
    }};
}
pub(crate) use cached;

/// One metric's handles for a fixed set of label values, for `cached!`; a value outside the
/// set is resolved at its use.
pub(crate) struct Labelled<H> {
    handles: Vec<(&'static str, H)>,
    resolve: fn(&'static str) -> H,
}

impl<H: Clone> Labelled<H> {
    pub(crate) fn new(values: &[&'static str], resolve: fn(&'static str) -> H) -> Self {
        Labelled {
            handles: values.iter().map(|v| (*v, resolve(v))).collect(),
            resolve,
        }
    }

    pub(crate) fn get(&self, value: &'static str) -> std::borrow::Cow<'_, H> {
        match self.handles.iter().find(|(v, _)| *v == value) {
            Some((_, h)) => std::borrow::Cow::Borrowed(h),
            None => std::borrow::Cow::Owned((self.resolve)(value)),
        }
    }
}

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

/// Refreshes the gauges computed rather than counted: active users, process figures.
pub fn refresh_gauges(process: &metrics_process::Collector) {
    if let Ok(mut a) = callbacks::ACTIVITY.lock() {
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
    let after_send = crate::domain::Relayed::AfterSendMsg.label();
    counter!("im_relay_callbacks_received_total", "command" => after_send).increment(0);
    for r in Blocked::ALL {
        gauge!("im_relay_publish_blocked", "reason" => r.label()).set(0.0);
    }
    // ImRelayQuarantining: every reason a callback is quarantined for, at 0.
    use crate::error::Reason;
    for r in [
        Reason::InvalidJson,
        Reason::CommandMismatch,
        Reason::InvalidMessage,
        Reason::RecordTooLarge,
    ] {
        counter!("im_relay_callbacks_quarantined_total", "reason" => r.label()).increment(0);
    }
}
