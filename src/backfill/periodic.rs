//! `serve`'s reconciliation (`reconcile = history`): each hour, once its file can be ready
//! (`reconcile_delay_ms` after it ends), compared with the topic and what is missing published
//! — unless the spool still holds records from before the hour ended (the topic is not
//! complete for it yet). Where it got to is kept in the spool directory, so the hours of an
//! outage of the relay itself are reconciled when it is back (files are kept 7 days).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use super::{Job, Source, hours, run};
use crate::config::{KafkaConfig, Reconcile};
use crate::spool::Shared;
use crate::telemetry::Event;
use crate::telemetry::reconcile::{ReconcileFailed, ReconcilePostponed, Reconciled};

/// The file, in the spool directory, naming the next hour to reconcile.
pub const STATE_FILE: &str = "reconcile-next-hour";
/// Tencent keeps an hour's file 7 days; older hours cannot be reconciled.
const OLDEST: Duration = Duration::days(6);
/// Records produced this long after an hour ended may still belong to it (clock skew between
/// Tencent and us, the time a callback takes to arrive).
const ARRIVAL_MARGIN: Duration = Duration::minutes(5);

fn hour_of(t: OffsetDateTime) -> OffsetDateTime {
    hours(t, t + Duration::SECOND)[0]
}

/// Whether the spool may still hold a record that arrived before `hour_end` (plus a margin):
/// the topic is not complete for that hour yet. A backlog the publisher has not read yet
/// (just after a start) has no known age: it counts as covering.
pub fn spool_covers(
    oldest_unpublished_ms: Option<u64>,
    backlog: u64,
    hour_end: OffsetDateTime,
) -> bool {
    let limit = (hour_end + ARRIVAL_MARGIN).unix_timestamp() * 1000;
    match oldest_unpublished_ms {
        Some(ms) => (ms as i64) < limit,
        None => backlog > 0,
    }
}

/// The hour to start from: the one after the last reconciled, not older than Tencent keeps;
/// on the first start, the next hour to fall due (earlier hours are `im-relay backfill`'s).
pub fn first_hour(
    saved: Option<OffsetDateTime>,
    now: OffsetDateTime,
    delay: Duration,
) -> OffsetDateTime {
    match saved {
        Some(next) => next.max(hour_of(now - OLDEST)),
        None => hour_of(now - delay),
    }
}

fn load(path: &Path) -> Option<OffsetDateTime> {
    let text = std::fs::read_to_string(path).ok()?;
    OffsetDateTime::parse(text.trim(), &Rfc3339).ok()
}

/// Written aside and renamed over: a crash leaves the old or the new hour, never half.
fn save(path: &Path, next: OffsetDateTime) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = next.format(&Rfc3339).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Reconciles hour after hour until `stop` is notified. Runs on its own thread and runtime:
/// file downloads and parsing never share the callbacks' workers.
pub fn spawn(
    cfg: Reconcile,
    kafka: KafkaConfig,
    spool: Arc<Shared>,
    dir: PathBuf,
    stop: Arc<tokio::sync::Notify>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("reconcile".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "cannot start reconciliation");
                    return;
                }
            };
            let state = dir.join(STATE_FILE);
            runtime.block_on(async move {
                tokio::select! {
                    () = reconcile(&cfg, &kafka, &spool, &state) => {}
                    () = stop.notified() => {}
                }
            });
        })
}

async fn reconcile(cfg: &Reconcile, kafka: &KafkaConfig, spool: &Shared, state: &Path) {
    let delay = Duration::try_from(cfg.delay).unwrap_or(Duration::HOUR);
    let saved = load(state);
    let mut next = first_hour(saved, OffsetDateTime::now_utc(), delay);
    if saved.is_none() {
        tracing::warn!(
            from = %super::beijing_hour(next),
            "no record of a reconciled hour in the spool directory: reconciling from this hour \
             (UTC+8) on; earlier hours of an outage need `im-relay backfill --source history`"
        );
    }
    let nap = |d: std::time::Duration| tokio::time::sleep(d);
    loop {
        let now = OffsetDateTime::now_utc();
        // A relay stopped (or failing) longer than Tencent keeps files: what is gone is gone.
        let oldest = hour_of(now - OLDEST);
        if next < oldest {
            let error = super::Error(format!(
                "hours up to {} are older than Tencent keeps files and were not reconciled",
                super::beijing_hour(oldest)
            ));
            ReconcileFailed {
                hour: next,
                error: &error,
            }
            .emit();
            next = oldest;
        }
        let end = next + Duration::HOUR;
        if now < end + delay {
            let wait = (end + delay - now).clamp(Duration::SECOND, Duration::MINUTE);
            nap(wait.try_into().unwrap_or_default()).await;
            continue;
        }
        if spool_covers(spool.oldest_unpublished_ms(), spool.backlog(), end) {
            ReconcilePostponed { hour: next }.emit();
            nap(std::time::Duration::from_secs(60)).await;
            continue;
        }
        let job = Job {
            source: Source::History,
            from: next,
            to: end,
            dry_run: false,
            ready_after: delay,
        };
        let outcome = run(&cfg.tencent, kafka, &job, |_, _, _| {}).await;
        if let Some(error) = outcome.error {
            ReconcileFailed {
                hour: next,
                error: &error,
            }
            .emit();
            nap(std::time::Duration::from_secs(300)).await;
            continue;
        }
        let row = outcome.summary.total();
        if row.not_ready {
            ReconcilePostponed { hour: next }.emit();
            nap(std::time::Duration::from_secs(600)).await;
            continue;
        }
        Reconciled {
            hour: next,
            row: &row,
        }
        .emit();
        next = end;
        if let Err(error) = save(state, next) {
            tracing::warn!(%error, "cannot record the reconciled hour; it may be reconciled again after a restart");
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
        let ms = |t: OffsetDateTime| Some((t.unix_timestamp() * 1000) as u64);
        assert!(spool_covers(ms(datetime!(2026-11-27 14:59 UTC)), 1, end));
        assert!(spool_covers(ms(datetime!(2026-11-27 15:04 UTC)), 1, end));
        assert!(!spool_covers(ms(datetime!(2026-11-27 15:06 UTC)), 1, end));
        assert!(!spool_covers(None, 0, end));
        // Not read yet: its age is unknown.
        assert!(spool_covers(None, 3, end));
    }

    #[test]
    fn it_starts_after_the_last_reconciled_hour_within_what_tencent_keeps() {
        let now = datetime!(2026-11-27 15:30 UTC);
        let two_hours = Duration::hours(2);
        assert_eq!(
            first_hour(None, now, two_hours),
            datetime!(2026-11-27 13:00 UTC)
        );
        let saved = datetime!(2026-11-27 09:00 UTC);
        assert_eq!(first_hour(Some(saved), now, two_hours), saved);
        let ancient = datetime!(2026-11-01 09:00 UTC);
        assert_eq!(
            first_hour(Some(ancient), now, two_hours),
            datetime!(2026-11-21 15:00 UTC)
        );
    }
}
