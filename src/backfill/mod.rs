//! Reconciliation: what Tencent's REST API says was sent, against what the topic holds,
//! publishing exactly what is missing. The durable spool protects what reached the relay;
//! this covers what never did (Tencent does not retry after-event callbacks by default).
//!
//! Two sources. `roam` pages one conversation at a time through `admin_getroammsg`
//! (https://www.tencentcloud.com/document/product/1047/35478) and also finds recalls
//! (`MsgFlagBits = 8`). `history` reads the app's hourly files from `get_history`
//! (https://www.tencentcloud.com/document/product/1047/34885), which hold every message but no
//! recall flag *(unconfirmed)*. Either way, a message becomes the record the relay would have
//! made of its callback — same schema, same id — with `source: "backfill"`, and is published
//! only if no record with its id is on the topic.

mod convert;
mod files;
mod history;
pub mod reconcile;
pub mod rest;
mod roam;
mod sink;
mod summary;
pub mod topic;
pub mod usersig;

use std::collections::HashSet;

use md5::Digest;
use serde_json::{Map, Value};
use time::macros::format_description;
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::config::{KafkaConfig, TencentConfig};
use crate::normalize::Output;
use crate::record::{Quarantined, Record, Target};
use convert::records;
use rest::Rest;
use sink::Sink;
pub use summary::{Row, Summary};
use topic::{Scan, Seen};

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Records of the window may be gone from the topic (retention, compaction): what is
    /// missing cannot be told from what was deleted.
    #[error("{0}")]
    Lost(String),
    /// `--max-publish` reached.
    #[error("{0}")]
    Limit(String),
    /// Kafka did not take a record (and, refused for good, the quarantine topic neither).
    #[error("{0}")]
    Kafka(String),
    /// Tencent's API, its files, the topic's reading, the machine.
    #[error("{0}")]
    Other(String),
}

/// Where Tencent's view comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// These conversations (`--pair`), and with `from_topic` those the topic saw around the
    /// window (`--pairs-from-topic`).
    Roam {
        pairs: Vec<(String, String)>,
        from_topic: bool,
    },
    /// Every hour overlapping the window, from its file.
    History,
}

/// One run: a source over `[from, to)`.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: Source,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub dry_run: bool,
    /// How long after an hour ends its file is taken as ready.
    pub ready_after: Duration,
    /// Read the topic even where records of the window may have been deleted (retention,
    /// compaction): every message it does not hold is published again.
    pub allow_lost: bool,
    /// The run stops before publishing more records than this.
    pub max_publish: Option<u64>,
    /// Where hourly files are downloaded; `None`: the system's temporary directory.
    pub temp_dir: Option<std::path::PathBuf>,
}

impl Job {
    /// A run over `[from, to)` with the defaults.
    pub fn new(source: Source, from: OffsetDateTime, to: OffsetDateTime) -> Job {
        Job {
            source,
            from,
            to,
            dry_run: false,
            ready_after: Duration::HOUR,
            allow_lost: false,
            max_publish: None,
            temp_dir: None,
        }
    }
}

/// Kafka's timestamps are produce times: a little after the send time, or much later after
/// a broker outage. The topic is read from this long before the window, to its end.
const TOPIC_MARGIN: Duration = Duration::hours(1);
/// An hour with no files this soon after it ended may not be written yet *(unconfirmed: the
/// page says only "about an hour, later for big hours")*.
const EMPTY_SETTLE: Duration = Duration::hours(6);
/// How long roam keeps messages on the default edition (30 or 90 days on higher ones).
pub const ROAM_KEPT: Duration = Duration::days(7);
/// Record times this far outside the window still count as the window's (clock skew between
/// Tencent and the relay; a file's hour and its messages' times).
const TIME_MARGIN: Duration = Duration::hours(1);
/// The largest hourly file (gzipped) downloaded; it is spooled to a temporary file.
const MAX_FILE_BYTES: u64 = 8 << 30;
/// How long Tencent keeps an hour's file.
pub const FILES_KEPT: Duration = Duration::days(7);
/// Times a file is fetched again (fresh URLs) after an expired link or a bad checksum.
const REFETCHES: u32 = 3;
/// Roam messages asked for per call (Tencent's maximum is undocumented; a page is ~13 KB).
const ROAM_PAGE: u32 = 100;
/// Deliveries awaited together.
const IN_FLIGHT: usize = 500;

/// The Beijing-time hour `YYYYMMDDHH` that `get_history` names the UTC hour starting `at` by.
pub fn beijing_hour(at: OffsetDateTime) -> String {
    let beijing = UtcOffset::from_hms(8, 0, 0).expect("a valid offset");
    at.to_offset(beijing)
        .format(format_description!("[year][month][day][hour]"))
        .unwrap_or_default()
}

/// `t` in Unix milliseconds, as Kafka's timestamps and the spool's arrival times are.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The UTC hours (their starts) overlapping `[from, to)`.
pub fn hours(from: OffsetDateTime, to: OffsetDateTime) -> Vec<OffsetDateTime> {
    let mut at = from
        .to_offset(UtcOffset::UTC)
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(from);
    let mut out = Vec::new();
    while at < to {
        out.push(at);
        at += Duration::HOUR;
    }
    out
}

/// How a run ended: its summary so far, and the error that stopped it, if any.
pub struct Outcome {
    pub summary: Summary,
    pub error: Option<Error>,
}

/// The topics whose ids count as "on the topic": messages, recalls and the quarantine topic
/// (what cannot be relayed is quarantined once).
fn topics(kafka: &KafkaConfig) -> Vec<String> {
    let mut topics = vec![
        kafka.topic.clone(),
        kafka.topic_for(Target::Recalls).to_owned(),
        kafka.quarantine_topic.clone(),
    ];
    topics.sort();
    topics.dedup();
    topics
}

/// Runs `job`: reads what the topic holds, then each conversation or hour in turn, calling
/// `progress(done, of, row)` after each.
pub async fn run(
    tencent: &TencentConfig,
    kafka: &KafkaConfig,
    job: &Job,
    mut progress: impl FnMut(usize, usize, &Row),
) -> Outcome {
    let mut summary = Summary::default();
    let error = run_rows(tencent, kafka, job, &mut summary, &mut progress)
        .await
        .err();
    Outcome { summary, error }
}

async fn run_rows(
    tencent: &TencentConfig,
    kafka: &KafkaConfig,
    job: &Job,
    summary: &mut Summary,
    progress: &mut impl FnMut(usize, usize, &Row),
) -> Result<(), Error> {
    let from_topic = matches!(
        job.source,
        Source::Roam {
            from_topic: true,
            ..
        }
    );
    let topics = topics(kafka);
    let retention = topic::retention(kafka, &topics).await?;
    // Roam publishes the recall of a message sent up to `recall_lookback` before the window:
    // the topic is read from there, so a recall it already holds is found (I/O, not memory:
    // only recall ids are kept from before the window).
    let since = match job.source {
        Source::Roam { .. } => job.from - tencent.recall_lookback - TOPIC_MARGIN,
        Source::History => job.from - TOPIC_MARGIN,
    };
    let scan = Scan {
        topics,
        since_ms: unix_ms(since),
        keep_ms: (
            unix_ms(job.from - TIME_MARGIN),
            unix_ms(job.to + TIME_MARGIN),
        ),
        open_since_ms: unix_ms(since.min(job.from - TIME_MARGIN)),
        pairs_between_ms: from_topic.then(|| {
            (
                unix_ms(job.from - TOPIC_MARGIN),
                unix_ms(job.to + TOPIC_MARGIN),
            )
        }),
        app: tencent.sdk_app_id,
        retention,
        allow_lost: job.allow_lost,
    };
    let seen = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || topic::scan(&kafka, &scan))
            .await
            .map_err(|e| Error::Other(format!("reading the topic: {e}")))??
    };
    tracing::info!(ids = seen.len(), "read what the topic holds");
    summary.ids_kept = seen.len();
    let mut run = Run {
        tencent,
        kafka,
        rest: std::sync::Arc::new(Rest::new(tencent)?),
        sink: Sink::new(kafka, job.dry_run)?,
        seen,
        job,
        published: 0,
    };
    let result = rows(&mut run, job, summary, progress).await;
    // What was handed to Kafka is awaited whatever stopped the run: the summary counts it.
    let flushed = run.sink.flush().await;
    summary.refused = run.sink.refused;
    result.and(flushed)
}

/// Each conversation or hour of the job, in turn.
async fn rows(
    run: &mut Run<'_>,
    job: &Job,
    summary: &mut Summary,
    progress: &mut impl FnMut(usize, usize, &Row),
) -> Result<(), Error> {
    match &job.source {
        Source::Roam { pairs, .. } => {
            // Named pairs first: an unknown account there is a mistake to report; in a pair
            // the topic saw, an account deleted since.
            let mut all: Vec<(String, String, bool)> = Vec::new();
            let mut names = HashSet::new();
            let found = std::mem::take(&mut run.seen.pairs);
            let named = pairs.iter().cloned().map(|(a, b)| (a, b, true));
            for (a, b, named) in named.chain(found.into_iter().map(|(a, b)| (a, b, false))) {
                let sorted = if a <= b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                };
                if names.insert(sorted) {
                    all.push((a, b, named));
                }
            }
            // An unknown account skips a pair the topic saw; one named is an error.
            let all = all
                .into_iter()
                .map(|(a, b, named)| (a, b, !named))
                .collect();
            run.roam(all, |done, of, row| {
                progress(done, of, &row);
                summary.rows.push(row);
            })
            .await?;
        }
        Source::History => {
            let hours = hours(job.from, job.to);
            for (i, start) in hours.iter().enumerate() {
                let row = run.hour(*start).await?;
                progress(i + 1, hours.len(), &row);
                summary.rows.push(row);
            }
        }
    }
    Ok(())
}

/// A run in progress: the REST client, what the topic holds, the producer.
struct Run<'a> {
    tencent: &'a TencentConfig,
    kafka: &'a KafkaConfig,
    rest: std::sync::Arc<Rest>,
    seen: Seen,
    sink: Sink,
    job: &'a Job,
    /// Records published (or, dry, that would be) by this run.
    published: u64,
}

impl Run<'_> {
    /// Publishes a message's records the topic lacks, counting them in `row` (the message as
    /// found on the topic only on its first sighting in this row).
    async fn offer(
        &mut self,
        outputs: Vec<Output>,
        row: &mut Row,
        first_sighting: bool,
        quiet: bool,
    ) -> Result<(), Error> {
        for o in outputs {
            if self.seen.has(&o.id) {
                if first_sighting && o.target == Target::Messages {
                    row.on_topic += 1;
                }
                continue;
            }
            if let Some(max) = self.job.max_publish
                && self.published >= max
            {
                return Err(Error::Limit(format!(
                    "stopped before publishing more than --max-publish {max} records (what \
                     was published stays; run again with a higher limit to go on)"
                )));
            }
            let record = Record::message(
                o.target,
                o.key,
                o.headers,
                o.value,
                OffsetDateTime::now_utc(),
                None,
            );
            self.sink.send(record, &o.id).await?;
            self.seen.add(&o.id);
            self.published += 1;
            if o.target == Target::Recalls {
                row.recalls_published += 1;
            } else {
                row.published += 1;
                row.no_callback += u64::from(quiet);
            }
        }
        Ok(())
    }

    /// What cannot be relayed, from an hour's file or (`hour` `None`) a roam page.
    async fn quarantine(
        &mut self,
        text: &str,
        why: &str,
        hour: Option<&str>,
        row: &mut Row,
    ) -> Result<(), Error> {
        row.unparsable += 1;
        // An id, so a second run does not quarantine the same line again.
        let id = format!(
            "backfill:{}:{}",
            hour.unwrap_or("roam"),
            hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
        );
        if !self.seen.add(&id) {
            return Ok(());
        }
        let (command, query) = match hour {
            Some(hour) => ("get_history", format!("MsgTime={hour}")),
            None => ("admin_getroammsg", String::new()),
        };
        let mut record = Record::quarantined(
            text.as_bytes(),
            &Quarantined {
                reason: "backfill_unparsable",
                detail: Some(why),
                sdk_app_id: self.tencent.sdk_app_id.to_string(),
                command,
                raw_query: &query,
                received_at: OffsetDateTime::now_utc(),
            },
        );
        record
            .headers
            .push(("ce_id".into(), id.clone().into_bytes()));
        self.sink.send(record, &id).await
    }

    /// One message from Tencent: counted if inside `window` (Unix seconds; `None`: all of an
    /// hour the window covers whole, whatever time its file gives a message), once though both
    /// views or two files hold it, and published if missing. Before the window (roam's recall
    /// look-back), only its recall counts. What cannot be relayed is quarantined, as the relay
    /// would have.
    async fn message(
        &mut self,
        m: &Map<String, Value>,
        row: &mut Row,
        hour: Option<&str>,
        window: Option<(i64, i64)>,
        counted: &mut HashSet<u128>,
    ) -> Result<(), Error> {
        match records(self.tencent.sdk_app_id, self.kafka.key, m) {
            Ok((time, mut outputs)) => {
                let quiet = self.tencent.quiet(m);
                if let Some((from, to)) = window {
                    if time >= to {
                        return Ok(());
                    }
                    if time < from {
                        outputs.retain(|o| o.target == Target::Recalls);
                        return self.offer(outputs, row, false, quiet).await;
                    }
                }
                let first = counted.insert(topic::digest(&outputs[0].id));
                row.found += u64::from(first);
                self.offer(outputs, row, first, quiet).await
            }
            Err(why) => {
                let text = Value::Object(m.clone()).to_string();
                self.quarantine(&text, &why, hour, row).await
            }
        }
    }
}
