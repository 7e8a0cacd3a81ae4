//! `im-relay reconcile`: each hour, once its file can be ready (`reconcile_delay_ms` after it
//! ends) and every relay's spool has published what arrived before it ended, compared with
//! the topic and what is missing published. One process per app, beside the relays: the
//! callback servers never hold Tencent's secret key, and there is one copy of what is found.
//!
//! Where it got to is kept in its state directory (a file naming the next hour, written
//! durably); an outage of reconciliation itself is caught up when it is back (files are kept 7
//! days), a few hours per reading of the topic. A state file that cannot be read, or names a
//! future hour, stops reconciliation with an alert: hours are never skipped silently.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::{Error, Job, Source, beijing_hour, hours, run, unix_ms};
use crate::config::ReconcileConfig;
use crate::telemetry::Event;
use crate::telemetry::reconcile::{
    ReconcileFailed, ReconcilePostponed, ReconcileStarted, ReconcileStateBroken, Reconciled,
};

/// The file, in the state directory, naming the next hour to reconcile.
pub const STATE_FILE: &str = "next-hour";
/// Tencent keeps an hour's file 7 days; an hour older than this cannot be reconciled (its file
/// is gone before a catch-up reaches it).
const OLDEST: Duration = Duration::hours(7 * 24 - 3);
/// Records produced this long after an hour ended may still belong to it (clock skew between
/// Tencent and us, the time a callback takes to arrive).
const ARRIVAL_MARGIN: Duration = Duration::minutes(5);
/// Hours reconciled by one reading of the topic when catching up: the ids kept follow the
/// hours read together (at 500 messages/s, ~30 MB an hour).
pub const CATCH_UP_HOURS: usize = 6;
/// How often the relays are asked again while a spool holds an hour.
const RELAY_RECHECK: Duration = Duration::seconds(10);
/// How long a relay's `/spool` may take to answer.
const RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn hour_of(t: OffsetDateTime) -> OffsetDateTime {
    hours(t, t + Duration::SECOND)[0]
}

/// Whether a relay whose oldest unpublished record arrived at `oldest_unpublished_ms` (`None`:
/// nothing waits) may still hold a record of the hour ending at `hour_end`.
pub fn spool_covers(oldest_unpublished_ms: Option<i64>, hour_end: OffsetDateTime) -> bool {
    oldest_unpublished_ms.is_some_and(|ms| ms < unix_ms(hour_end + ARRIVAL_MARGIN))
}

/// The hour to start from: the one after the last reconciled; on the first start, the next
/// hour to fall due (earlier hours are `im-relay backfill`'s).
pub fn first_hour(
    saved: Option<OffsetDateTime>,
    now: OffsetDateTime,
    delay: Duration,
) -> OffsetDateTime {
    saved.unwrap_or_else(|| hour_of(now - delay))
}

/// The next hour to reconcile, kept in a file.
pub struct State {
    path: PathBuf,
}

impl State {
    pub fn new(dir: &Path) -> State {
        State {
            path: dir.join(STATE_FILE),
        }
    }

    /// `Ok(None)` when there is no file (the first start); an error when the file cannot be
    /// read, does not name an hour, or names one in the future.
    pub fn load(&self, now: OffsetDateTime) -> Result<Option<OffsetDateTime>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        let next = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
            format!(
                "{} holds `{}`, not an hour (RFC 3339, e.g. 2026-11-27T14:00:00Z)",
                self.path.display(),
                text.trim().chars().take(40).collect::<String>()
            )
        })?;
        if hour_of(next) != next {
            return Err(format!(
                "{} names {}, not the start of an hour",
                self.path.display(),
                text.trim()
            ));
        }
        if next > hour_of(now) + Duration::HOUR {
            return Err(format!(
                "{} names {}, an hour in the future (a clock set wrong, or an edited file)",
                self.path.display(),
                text.trim()
            ));
        }
        Ok(Some(next))
    }

    /// Written aside, flushed to the disk, renamed over, and the directory flushed: after a
    /// crash the file names the old hour or the new one, never less.
    pub fn save(&self, next: OffsetDateTime) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let text = next.format(&Rfc3339).map_err(std::io::Error::other)?;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }

    /// When an hour was last recorded as reconciled.
    pub fn written(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path).ok()?.modified().ok()
    }
}

/// The earliest arrival (ms) of a record some relay has not published yet, over every address
/// of every relay named: `Ok(None)` when nothing waits; an error when a relay cannot say.
pub async fn relays_oldest_unpublished(
    http: &reqwest::Client,
    relays: &[String],
) -> Result<Option<i64>, String> {
    let mut oldest: Option<i64> = None;
    for relay in relays {
        let addrs: Vec<_> = tokio::net::lookup_host(relay)
            .await
            .map_err(|e| format!("relay `{relay}`: cannot resolve: {e}"))?
            .collect();
        // No address: no relay can say what it holds (a headless Service lists none while
        // every pod is away).
        if addrs.is_empty() {
            return Err(format!("relay `{relay}` resolves to no address"));
        }
        for addr in addrs {
            let answer = http
                .get(format!("http://{addr}/spool"))
                .timeout(RELAY_TIMEOUT)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            let failed =
                |e: &dyn std::fmt::Display| format!("relay `{relay}` ({addr}): /spool: {e}");
            let bytes = match answer {
                Ok(a) => a.bytes().await.map_err(|e| failed(&e))?,
                Err(e) => return Err(failed(&e)),
            };
            let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| failed(&e))?;
            let waiting = match (
                body["backlog"].as_u64(),
                body["oldest_unpublished_ms"].as_i64(),
            ) {
                (Some(0), _) => None,
                (Some(_), Some(ms)) => Some(ms),
                // Records wait whose age is not known yet (just started): as old as can be.
                (Some(_), None) => Some(0),
                (None, _) => {
                    return Err(format!(
                        "relay `{relay}` ({addr}): its spool is not open yet"
                    ));
                }
            };
            oldest = match (oldest, waiting) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(oldest)
}

/// Reconciles hour after hour until `stop` is notified.
pub async fn reconcile(cfg: Arc<ReconcileConfig>, stop: Arc<tokio::sync::Notify>) {
    tokio::select! {
        () = turns(&cfg) => {}
        () = stop.notified() => {}
    }
}

async fn turns(cfg: &ReconcileConfig) {
    let delay = Duration::try_from(cfg.delay).unwrap_or(Duration::HOUR);
    let state = State::new(&cfg.state_dir);
    ReconcileStarted {
        last_written: state.written(),
    }
    .emit();
    if cfg.relays.is_empty() {
        tracing::warn!(
            "reconcile_relays is empty: hours are reconciled without asking the relays whether \
             their spools still hold records of them (what a relay is about to publish may be \
             published twice, same ids)"
        );
    }
    let http = reqwest::Client::new();
    let nap = |d: std::time::Duration| tokio::time::sleep(d);
    let mut announced = false;
    loop {
        let now = OffsetDateTime::now_utc();
        let saved = match state.load(now) {
            Ok(saved) => saved,
            Err(why) => {
                ReconcileStateBroken { why: Some(&why) }.emit();
                nap(std::time::Duration::from_secs(60)).await;
                continue;
            }
        };
        ReconcileStateBroken { why: None }.emit();
        let mut next = first_hour(saved, now, delay);
        if saved.is_none() && !announced {
            tracing::warn!(
                from = %beijing_hour(next),
                "no record of a reconciled hour in the state directory: reconciling from this \
                 hour (UTC+8) on; earlier hours of an outage need `im-relay backfill --source \
                 history`"
            );
        }
        announced = true;
        // A reconciliation stopped (or failing) longer than Tencent keeps files: what is gone
        // is gone, and said so.
        let oldest = hour_of(now - OLDEST);
        if next < oldest {
            let error = Error::Other(format!(
                "hours {} to {} (UTC+8) are older than Tencent keeps files and were not \
                 reconciled",
                beijing_hour(next),
                beijing_hour(oldest - Duration::HOUR)
            ));
            ReconcileFailed {
                hour: next,
                error: &error,
            }
            .emit();
            next = oldest;
        }
        if saved != Some(next)
            && let Err(error) = state.save(next)
        {
            let why = format!("cannot write {}: {error}", cfg.state_dir.display());
            ReconcileStateBroken { why: Some(&why) }.emit();
            nap(std::time::Duration::from_secs(60)).await;
            continue;
        }
        // The hours due: their files can be ready, and no relay still holds their records.
        let oldest_waiting = if cfg.relays.is_empty() {
            Ok(None)
        } else {
            relays_oldest_unpublished(&http, &cfg.relays).await
        };
        let waiting = match oldest_waiting {
            Ok(w) => w,
            Err(why) => {
                ReconcilePostponed {
                    hour: next,
                    why: &why,
                }
                .emit();
                nap(RELAY_RECHECK.try_into().unwrap_or_default()).await;
                continue;
            }
        };
        let mut end = next;
        while end + Duration::HOUR + delay <= now
            && !spool_covers(waiting, end + Duration::HOUR)
            && end < next + Duration::HOUR * CATCH_UP_HOURS as u32
        {
            end += Duration::HOUR;
        }
        if end == next {
            let due = next + Duration::HOUR + delay - now;
            let wait = if due.is_positive() {
                due.min(Duration::MINUTE)
            } else {
                ReconcilePostponed {
                    hour: next,
                    why: "a relay's spool still holds records from before the hour ended",
                }
                .emit();
                RELAY_RECHECK
            };
            nap(wait.try_into().unwrap_or_default()).await;
            continue;
        }
        let mut job = Job::new(Source::History, next, end);
        job.ready_after = delay;
        job.allow_lost = cfg.allow_lost;
        job.temp_dir = cfg.temp_dir.clone();
        // Each hour is recorded as it is done, in order; one not ready stops the recording.
        let mut recorded = next;
        let mut blocked = false;
        let outcome = run(&cfg.tencent, &cfg.kafka, &job, |_, _, row| {
            let hour = recorded;
            if blocked || row.not_ready {
                blocked = true;
                return;
            }
            Reconciled { hour, row }.emit();
            match state.save(hour + Duration::HOUR) {
                Ok(()) => recorded = hour + Duration::HOUR,
                Err(error) => {
                    let why = format!("cannot write {}: {error}", cfg.state_dir.display());
                    ReconcileStateBroken { why: Some(&why) }.emit();
                    blocked = true;
                }
            }
        })
        .await;
        if let Some(error) = outcome.error {
            ReconcileFailed {
                hour: recorded,
                error: &error,
            }
            .emit();
            nap(std::time::Duration::from_secs(300)).await;
            continue;
        }
        if recorded < end {
            ReconcilePostponed {
                hour: recorded,
                why: "Tencent's file is not ready yet",
            }
            .emit();
            nap(std::time::Duration::from_secs(600)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn an_hour_waits_for_the_spool_records_from_before_its_end() {
        let end = datetime!(2026-11-27 15:00 UTC);
        let ms = |t: OffsetDateTime| Some(unix_ms(t));
        assert!(spool_covers(ms(datetime!(2026-11-27 14:59 UTC)), end));
        assert!(spool_covers(ms(datetime!(2026-11-27 15:04 UTC)), end));
        assert!(!spool_covers(ms(datetime!(2026-11-27 15:06 UTC)), end));
        assert!(!spool_covers(None, end));
    }

    #[test]
    fn it_starts_after_the_last_reconciled_hour_or_with_the_next_due() {
        let now = datetime!(2026-11-27 15:30 UTC);
        let two_hours = Duration::hours(2);
        assert_eq!(
            first_hour(None, now, two_hours),
            datetime!(2026-11-27 13:00 UTC)
        );
        let saved = datetime!(2026-11-27 09:00 UTC);
        assert_eq!(first_hour(Some(saved), now, two_hours), saved);
        // Older than Tencent keeps: kept, so the loop says which hours are lost.
        let ancient = datetime!(2026-11-01 09:00 UTC);
        assert_eq!(first_hour(Some(ancient), now, two_hours), ancient);
    }

    /// Before, an empty or corrupt file read as "no state" (reconciliation restarted from
    /// now − delay, skipping the hours between) and a future hour stalled it silently.
    #[test]
    fn the_state_is_durable_and_a_broken_one_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        let now = datetime!(2026-11-27 15:30 UTC);
        assert_eq!(state.load(now), Ok(None));
        state.save(datetime!(2026-11-27 09:00 UTC)).unwrap();
        assert_eq!(state.load(now), Ok(Some(datetime!(2026-11-27 09:00 UTC))));
        assert!(state.written().is_some());
        assert!(!dir.path().join("next-hour.tmp").exists());
        let path = dir.path().join(STATE_FILE);
        for (text, says) in [
            ("", "not an hour"),
            ("2026-11-27T0", "not an hour"),
            ("2026-11-27T09:30:00Z", "not the start of an hour"),
            ("2026-11-28T09:00:00Z", "in the future"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = state.load(now).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
        std::fs::write(&path, "2026-11-27T16:00:00Z").unwrap();
        assert!(
            state.load(now).is_ok(),
            "the hour now due is not the future"
        );
    }
}
