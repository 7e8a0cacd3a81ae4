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

mod history;
pub mod periodic;
pub mod rest;
pub mod topic;
pub mod usersig;

use std::collections::HashSet;
use std::fmt;
use std::io::{BufReader, Seek};

use md5::Digest;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::{Map, Value, json};
use time::macros::format_description;
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::config::{KafkaConfig, TencentConfig, client_config};
use crate::domain::{Relayed, SdkAppId};
use crate::json::Object;
use crate::normalize::{self, Context, Obj, Output};
use crate::record::{Quarantined, Record, Target};
use history::Item;
use rest::{DownloadError, Rest};
use topic::{Scan, Seen};

#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

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
}

/// One line of the summary: a conversation (`roam`) or a Beijing-time hour (`history`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub name: String,
    /// Messages Tencent has in the window.
    pub found: u64,
    /// Of those, already on the topic.
    pub on_topic: u64,
    /// Message records published (or, dry, that would be).
    pub published: u64,
    pub recalls_published: u64,
    pub unparsable: u64,
    /// The hour's file cannot be ready yet: nothing was concluded about it.
    pub not_ready: bool,
    /// A conversation the topic saw whose account Tencent no longer knows (deleted since):
    /// skipped, its messages beyond reach.
    pub unknown_account: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub rows: Vec<Row>,
}

impl Summary {
    pub fn total(&self) -> Row {
        let mut t = Row {
            name: "total".into(),
            ..Row::default()
        };
        for r in &self.rows {
            t.found += r.found;
            t.on_topic += r.on_topic;
            t.published += r.published;
            t.recalls_published += r.recalls_published;
            t.unparsable += r.unparsable;
            t.not_ready |= r.not_ready;
            t.unknown_account |= r.unknown_account;
        }
        t
    }

    /// The table printed at the end of a run.
    pub fn table(&self, dry_run: bool) -> String {
        let verb = if dry_run {
            "would publish"
        } else {
            "published"
        };
        let mut out = format!(
            "{:<40} {:>8} {:>9} {:>10} {:>9} {:>11}\n",
            "conversation / hour", "found", "on topic", verb, "recalls", "unparsable"
        );
        for r in self.rows.iter().chain(std::iter::once(&self.total())) {
            if r.not_ready {
                out.push_str(&format!("{:<40} not ready yet\n", r.name));
                continue;
            }
            if r.unknown_account && r.name != "total" {
                out.push_str(&format!(
                    "{:<40} an account Tencent no longer knows: skipped\n",
                    r.name
                ));
                continue;
            }
            out.push_str(&format!(
                "{:<40} {:>8} {:>9} {:>10} {:>9} {:>11}\n",
                r.name, r.found, r.on_topic, r.published, r.recalls_published, r.unparsable
            ));
        }
        out
    }
}

/// Kafka's timestamps are produce times: a little after the send time, or much later after
/// a broker outage. The topic is read from this long before the window, to its end.
const TOPIC_MARGIN: Duration = Duration::hours(1);
/// An hour with no files this soon after it ended may not be written yet *(unconfirmed: the
/// page says only "about an hour, later for big hours")*.
const EMPTY_SETTLE: Duration = Duration::hours(6);
/// A message sent this long before the window may be recalled inside it: roam reads it too,
/// for its recall only (Tencent's recall limit is 2 minutes by default, longer if configured).
const RECALL_LOOKBACK: Duration = Duration::hours(1);
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

/// A REST message as the callback body the relay would have received: `MsgTimeStamp` is the
/// callback's `MsgTime`; what else Tencent sent stays, kept verbatim under the record's `extra`.
fn as_callback(message: &Map<String, Value>, command: Relayed) -> Map<String, Value> {
    let mut body = message.clone();
    for alias in ["MsgTimeStamp", "MsgTimestamp"] {
        if let Some(t) = body.remove(alias) {
            body.entry("MsgTime").or_insert(t);
        }
    }
    // Not in a callback: the REST answer's own fields (the flag is read by `recalled`).
    for field in ["ClientIP", "MsgFromPlatform", "MsgFlagBits", "IsPeerRead"] {
        body.remove(field);
    }
    body.insert("CallbackCommand".into(), command.as_str().into());
    body
}

fn recalled(message: &Map<String, Value>) -> bool {
    Obj(&Object::from_map(message))
        .u64("MsgFlagBits")
        .ok()
        .flatten()
        .is_some_and(|bits| bits & 8 != 0)
}

/// The records the relay would have made of a message: the message, and for a recalled one
/// the recall a `C2C.CallbackAfterMsgWithDraw` would have brought (same id). A message
/// without `MsgKey` is refused: a key derived here might not match the callback's.
fn records(
    app: SdkAppId,
    key_mode: normalize::KeyMode,
    message: &Map<String, Value>,
) -> Result<(i64, Vec<Output>), String> {
    let ctx = Context {
        sdk_app_id: app,
        client_ip: message.get("ClientIP").and_then(Value::as_str),
        opt_platform: message.get("MsgFromPlatform").and_then(Value::as_str),
        received_at: OffsetDateTime::now_utc(),
        key_mode,
        source: normalize::Source::Backfill,
    };
    let body = as_callback(message, Relayed::AfterSendMsg);
    let body = Object::from_map(&body);
    // Read as the normalizer reads it: integers may come as numeric strings.
    let time = Obj(&body)
        .i64("MsgTime")
        .map_err(|e| e.to_string())?
        .ok_or("no MsgTimeStamp")?;
    normalize::required_msg_key(Obj(&body)).map_err(|e| e.to_string())?;
    let mut out =
        normalize::normalize(&ctx, Relayed::AfterSendMsg, &body).map_err(|e| e.to_string())?;
    if recalled(message) {
        let mut recall = Map::new();
        for field in ["From_Account", "To_Account", "MsgKey"] {
            let value = body.get(field).map(serde_json::to_value);
            recall.insert(field.into(), value.and_then(Result::ok).unwrap_or_default());
        }
        recall.insert(
            "CallbackCommand".into(),
            Relayed::AfterMsgWithDraw.as_str().into(),
        );
        out.extend(
            normalize::normalize(&ctx, Relayed::AfterMsgWithDraw, &Object::from_map(&recall))
                .map_err(|e| e.to_string())?,
        );
    }
    Ok((time, out))
}

/// The producer side: the relay's idempotent settings, deliveries awaited in groups; or, dry,
/// a line on stdout per record.
struct Sink {
    kafka: KafkaConfig,
    producer: Option<FutureProducer>,
    pending: Vec<DeliveryFuture>,
}

impl Sink {
    fn new(kafka: &KafkaConfig, dry_run: bool) -> Result<Sink, Error> {
        let producer = if dry_run {
            None
        } else {
            Some(
                client_config(kafka)
                    .set("client.id", "im-relay-backfill")
                    // The default context would log librdkafka's statistics at info.
                    .set("statistics.interval.ms", "0")
                    .create()
                    .map_err(|e| Error(format!("cannot make the Kafka producer: {e}")))?,
            )
        };
        Ok(Sink {
            kafka: kafka.clone(),
            producer,
            pending: Vec::new(),
        })
    }

    async fn send(&mut self, record: Record, id: &str) -> Result<(), Error> {
        let topic = self.kafka.topic_for(record.target).to_owned();
        let Some(producer) = self.producer.clone() else {
            println!("would publish {id} to {topic}");
            return Ok(());
        };
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let mut message = FutureRecord::to(&topic)
            .payload(record.value.as_slice())
            .headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_slice());
        }
        let mut message = Some(message);
        loop {
            match producer.send_result(message.take().expect("set")) {
                Ok(delivery) => break self.pending.push(delivery),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    message = Some(back);
                    self.flush().await?;
                }
                Err((e, _)) => return Err(Error(format!("publishing {id}: {e}"))),
            }
        }
        if self.pending.len() >= IN_FLIGHT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits for every record handed over; any that Kafka refused fails the run.
    async fn flush(&mut self) -> Result<(), Error> {
        for delivery in std::mem::take(&mut self.pending) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error(format!("Kafka refused a record: {e}"))),
                Err(_) => return Err(Error("the Kafka producer went away".into())),
            }
        }
        Ok(())
    }
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
    let ms = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    let from_topic = matches!(
        job.source,
        Source::Roam {
            from_topic: true,
            ..
        }
    );
    let scan = Scan {
        topics: topics(kafka),
        since_ms: ms(job.from - TOPIC_MARGIN - RECALL_LOOKBACK),
        pairs_between_ms: from_topic
            .then(|| (ms(job.from - TOPIC_MARGIN), ms(job.to + TOPIC_MARGIN))),
        app: tencent.sdk_app_id,
    };
    let seen = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || topic::scan(&kafka, &scan))
            .await
            .map_err(|e| Error(format!("reading the topic: {e}")))??
    };
    tracing::info!(ids = seen.len(), "read what the topic holds");
    let mut run = Run {
        tencent,
        kafka,
        rest: Rest::new(tencent)?,
        sink: Sink::new(kafka, job.dry_run)?,
        seen,
        job,
    };
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
            for (i, (a, b, named)) in all.iter().enumerate() {
                let row = run.roam(a, b, !named).await?;
                progress(i + 1, all.len(), &row);
                summary.rows.push(row);
            }
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
    run.sink.flush().await
}

/// A run in progress: the REST client, what the topic holds, the producer.
struct Run<'a> {
    tencent: &'a TencentConfig,
    kafka: &'a KafkaConfig,
    rest: Rest,
    seen: Seen,
    sink: Sink,
    job: &'a Job,
}

impl Run<'_> {
    /// Publishes a message's records the topic lacks, counting them in `row` (the message as
    /// found on the topic only on its first sighting in this row).
    async fn offer(
        &mut self,
        outputs: Vec<Output>,
        row: &mut Row,
        first_sighting: bool,
    ) -> Result<(), Error> {
        for o in outputs {
            if self.seen.has(&o.id) {
                if first_sighting && o.target == Target::Messages {
                    row.on_topic += 1;
                }
                continue;
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
            if o.target == Target::Recalls {
                row.recalls_published += 1;
            } else {
                row.published += 1;
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
                if let Some((from, to)) = window {
                    if time >= to {
                        return Ok(());
                    }
                    if time < from {
                        outputs.retain(|o| o.target == Target::Recalls);
                        return self.offer(outputs, row, false).await;
                    }
                }
                let first = counted.insert(topic::digest(&outputs[0].id));
                row.found += u64::from(first);
                self.offer(outputs, row, first).await
            }
            Err(why) => {
                let text = Value::Object(m.clone()).to_string();
                self.quarantine(&text, &why, hour, row).await
            }
        }
    }

    /// Both parties' views of one conversation over the window (they can differ: cleared
    /// history, deleted messages), newest first, page by page.
    async fn roam(&mut self, a: &str, b: &str, skip_unknown: bool) -> Result<Row, Error> {
        let mut row = Row {
            name: format!("{a}:{b}"),
            ..Row::default()
        };
        let mut counted = HashSet::new();
        let window = (self.job.from.unix_timestamp(), self.job.to.unix_timestamp());
        // 90003/90008: an account missing or unknown.
        let unknown: &[i64] = if skip_unknown { &[90003, 90008] } else { &[] };
        for (operator, peer) in [(a, b), (b, a)] {
            let mut request = json!({
                "Operator_Account": operator,
                "Peer_Account": peer,
                "MaxCnt": ROAM_PAGE,
                "MinTime": (self.job.from - RECALL_LOOKBACK).unix_timestamp(),
                "MaxTime": self.job.to.unix_timestamp(),
            });
            let mut last = None;
            loop {
                let Some(page) = self
                    .rest
                    .call_unless("openim", "admin_getroammsg", &request, unknown)
                    .await?
                else {
                    tracing::warn!(pair = %row.name, "an account of a conversation the topic saw is unknown to Tencent: skipped");
                    row.unknown_account = true;
                    return Ok(row);
                };
                let list = page["MsgList"].as_array().cloned().unwrap_or_default();
                for m in &list {
                    if let Value::Object(m) = m {
                        self.message(m, &mut row, None, Some(window), &mut counted)
                            .await?;
                    }
                }
                let what = |problem: &str| {
                    Error(format!("admin_getroammsg for {operator}:{peer}: {problem}"))
                };
                // Without `Complete` the end of the conversation is unknown: never assumed.
                let empty = Map::new();
                let fields = Object::from_map(page.as_object().unwrap_or(&empty));
                match Obj(&fields).i64("Complete") {
                    Ok(Some(0)) if list.is_empty() => {
                        return Err(what("an empty page that says there is more"));
                    }
                    Ok(Some(0)) => {}
                    Ok(Some(_)) => break,
                    _ => return Err(what("an answer without Complete")),
                }
                let next = (page["LastMsgTime"].clone(), page["LastMsgKey"].clone());
                if last.as_ref() == Some(&next) || next.1.as_str().is_none() {
                    return Err(what("paging did not advance"));
                }
                request["MaxTime"] = next.0.clone();
                request["LastMsgKey"] = next.1.clone();
                last = Some(next);
            }
        }
        self.sink.flush().await?;
        Ok(row)
    }

    /// One hour's files: listed, downloaded (streamed to a temporary file), checked (sizes,
    /// MD5s before and after gzip), parsed line by line.
    async fn hour(&mut self, start: OffsetDateTime) -> Result<Row, Error> {
        let name = beijing_hour(start);
        let mut row = Row {
            name: format!("{name} (UTC+8)"),
            ..Row::default()
        };
        let end = start + Duration::HOUR;
        let now = OffsetDateTime::now_utc();
        if end + FILES_KEPT <= now {
            // Its file is gone: an empty listing must not read as a quiet hour.
            return Err(Error(format!(
                "hour {name} (UTC+8) is older than the 7 days Tencent keeps hourly files \
                 (older messages: --source roam, if the app's edition keeps them longer)"
            )));
        }
        if now < end + self.job.ready_after {
            row.not_ready = true;
            return Ok(row);
        }
        // An hour the window covers whole keeps all its file holds; an edge hour, the window's.
        let whole = self.job.from <= start && end <= self.job.to;
        let window =
            (!whole).then(|| (self.job.from.unix_timestamp(), self.job.to.unix_timestamp()));
        let mut counted = HashSet::new();
        let mut done: HashSet<String> = HashSet::new();
        let mut refetches = 0;
        'list: loop {
            let answer = self
                .rest
                .call(
                    "open_msg_svc",
                    "get_history",
                    &json!({"ChatType": "C2C", "MsgTime": name}),
                )
                .await?;
            let files = answer["File"].as_array().cloned().unwrap_or_default();
            if files.is_empty() && now < end + EMPTY_SETTLE {
                row.not_ready = true;
                return Ok(row);
            }
            for file in &files {
                // Sizes and checksums are required: without them nothing proves a file whole.
                let Some(file) = Listed::of(file) else {
                    return Err(Error(format!(
                        "hour {name}: a file listed without its URL, sizes or MD5s"
                    )));
                };
                // Links change between listings; a file's checksums do not.
                let checksums = format!("{}:{}", file.gzip_md5, file.file_md5).to_ascii_lowercase();
                if done.contains(&checksums) {
                    continue;
                }
                match self
                    .file(&file, &name, window, &mut row, &mut counted)
                    .await
                {
                    Ok(()) => {
                        done.insert(checksums);
                    }
                    Err(FileError::Refetch(why)) => {
                        refetches += 1;
                        if refetches > REFETCHES {
                            return Err(Error(format!("hour {name}: {why}, {REFETCHES} times")));
                        }
                        tracing::warn!(hour = %name, problem = %why, "fetching the hour's file list again");
                        tokio::time::sleep(std::time::Duration::from_secs(1 << refetches)).await;
                        continue 'list;
                    }
                    Err(FileError::Fatal(e)) => return Err(e),
                }
            }
            break;
        }
        self.sink.flush().await?;
        Ok(row)
    }

    async fn file(
        &mut self,
        file: &Listed<'_>,
        hour: &str,
        window: Option<(i64, i64)>,
        row: &mut Row,
        counted: &mut HashSet<u128>,
    ) -> Result<(), FileError> {
        let refetch = |s: &str| FileError::Refetch(s.to_owned());
        let fatal = |s: String| FileError::Fatal(Error(s));
        if file
            .expires
            .is_some_and(|at| at <= OffsetDateTime::now_utc())
        {
            return Err(refetch("its file link has expired"));
        }
        let gzip_size = file.gzip_size;
        if gzip_size > MAX_FILE_BYTES {
            return Err(fatal(format!(
                "hour {hour}: a file of {gzip_size} bytes, above the {MAX_FILE_BYTES} taken"
            )));
        }
        let mut tmp = tempfile::tempfile().map_err(|e| fatal(format!("a temporary file: {e}")))?;
        let (size, md5) = match self.rest.download(file.url, &mut tmp, gzip_size).await {
            Ok(got) => got,
            Err(DownloadError::Again(why)) => return Err(FileError::Refetch(why)),
            Err(DownloadError::Failed(e)) => return Err(FileError::Fatal(e)),
        };
        let same = |want: &str, got: &[u8; 16]| want.eq_ignore_ascii_case(&hex::encode(got));
        if size != gzip_size || !same(file.gzip_md5, &md5) {
            return Err(refetch("a downloaded file's size or MD5 did not match"));
        }
        // Decompressed once to check the file's own size and MD5 (and its layout), then
        // again to parse it, on a blocking thread, a message at a time.
        tmp.rewind().map_err(|e| fatal(e.to_string()))?;
        let gunzip = |file: &std::fs::File| -> std::io::Result<_> {
            Ok(flate2::read::MultiGzDecoder::new(BufReader::new(
                file.try_clone()?,
            )))
        };
        let (plain_size, plain_md5, layout) = gunzip(&tmp)
            .and_then(history::check)
            .map_err(|e| fatal(format!("hour {hour}: the file does not gunzip: {e}")))?;
        if plain_size != file.file_size || !same(file.file_md5, &plain_md5) {
            return Err(refetch("a file's size or MD5 after gunzip did not match"));
        }
        tmp.rewind().map_err(|e| fatal(e.to_string()))?;
        let gz = gunzip(&tmp).map_err(|e| fatal(e.to_string()))?;
        let (items, mut next) = tokio::sync::mpsc::channel(1024);
        let parser = tokio::task::spawn_blocking(move || {
            history::items(gz, layout, &mut |item| items.blocking_send(item).is_ok())
        });
        while let Some(item) = next.recv().await {
            let handled = match item {
                Item::Message(m) => self.message(&m, row, Some(hour), window, counted).await,
                Item::Unparsable(text) => {
                    self.quarantine(&text, "not a JSON message", Some(hour), row)
                        .await
                }
            };
            handled.map_err(FileError::Fatal)?;
        }
        match parser.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(fatal(format!("hour {hour}: {e}"))),
            Err(e) => Err(fatal(format!("hour {hour}: the parser stopped: {e}"))),
        }
    }
}

/// One file of a `get_history` listing.
struct Listed<'a> {
    url: &'a str,
    gzip_size: u64,
    gzip_md5: &'a str,
    file_size: u64,
    file_md5: &'a str,
    expires: Option<OffsetDateTime>,
}

impl<'a> Listed<'a> {
    fn of(file: &'a Value) -> Option<Listed<'a>> {
        Some(Listed {
            url: file["URL"].as_str()?,
            gzip_size: file["GzipSize"].as_u64()?,
            gzip_md5: file["GzipMD5"].as_str()?,
            file_size: file["FileSize"].as_u64()?,
            file_md5: file["FileMD5"].as_str()?,
            expires: file["ExpireTime"].as_str().and_then(beijing_time),
        })
    }
}

enum FileError {
    /// Ask for the hour's file list again (fresh links) and retry.
    Refetch(String),
    Fatal(Error),
}

/// `ExpireTime` as Tencent writes it: `2015-12-02 16:45:23`, Beijing time *(unconfirmed)*.
fn beijing_time(text: &str) -> Option<OffsetDateTime> {
    let t = time::PrimitiveDateTime::parse(
        text,
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    )
    .ok()?;
    Some(t.assume_offset(UtcOffset::from_hms(8, 0, 0).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records_of(message: Value) -> Result<(i64, Vec<Output>), String> {
        let Value::Object(m) = message else {
            unreachable!()
        };
        records(SdkAppId::from(1400000000), normalize::KeyMode::MsgKey, &m)
    }

    fn message(extra: Value) -> Value {
        let mut m = json!({
            "From_Account": "bob", "To_Account": "alice", "MsgSeq": 7, "MsgRandom": 9,
            "MsgTimeStamp": 1764300000, "MsgKey": "7_9_1764300000", "MsgFlagBits": 0,
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}],
        });
        m.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        m
    }

    #[test]
    fn a_message_becomes_the_record_its_callback_would_have_made() {
        let (time, out) = records_of(message(json!({}))).unwrap();
        assert_eq!(time, 1764300000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, "1400000000:alice:bob:7_9_1764300000");
        let value: Value = serde_json::from_slice(&out[0].value).unwrap();
        assert_eq!(value["source"], "backfill", "{value}");
    }

    #[test]
    fn a_backfilled_record_is_the_callbacks_but_for_source_and_arrival() {
        let m =
            message(json!({"IsPeerRead": 1, "ClientIP": "203.0.113.7", "MsgFromPlatform": "iOS"}));
        let (_, backfilled) = records_of(m.clone()).unwrap();
        let mut callback = m.as_object().unwrap().clone();
        for field in ["IsPeerRead", "ClientIP", "MsgFromPlatform", "MsgFlagBits"] {
            callback.remove(field);
        }
        let t = callback.remove("MsgTimeStamp").unwrap();
        callback.insert("MsgTime".into(), t);
        callback.insert("CallbackCommand".into(), "C2C.CallbackAfterSendMsg".into());
        let ctx = Context {
            sdk_app_id: SdkAppId::from(1400000000),
            client_ip: Some("203.0.113.7"),
            opt_platform: Some("iOS"),
            received_at: OffsetDateTime::now_utc(),
            key_mode: normalize::KeyMode::MsgKey,
            source: normalize::Source::Callback,
        };
        let callback = Object::from_map(&callback);
        let relayed = normalize::normalize(&ctx, Relayed::AfterSendMsg, &callback).unwrap();
        let comparable = |o: &Output| {
            let mut v: Value = serde_json::from_slice(&o.value).unwrap();
            let v = v.as_object_mut().unwrap();
            for field in ["source", "received_at"] {
                v.remove(field);
            }
            (o.id.clone(), o.key.clone(), v.clone())
        };
        assert_eq!(comparable(&backfilled[0]), comparable(&relayed[0]));
    }

    #[test]
    fn numbers_may_come_as_strings_as_the_normalizer_reads_them() {
        let (time, out) = records_of(message(
            json!({"MsgTimeStamp": "1764300000", "MsgFlagBits": "8"}),
        ))
        .unwrap();
        assert_eq!(time, 1764300000);
        assert_eq!(out.len(), 2, "the recall too");
        assert_eq!(out[1].target, Target::Recalls);
        assert_eq!(out[1].id, format!("{}#recall", out[0].id));
    }

    #[test]
    fn a_message_without_msgkey_or_time_is_refused_not_guessed() {
        let no_key = records_of(message(json!({"MsgKey": null}))).unwrap_err();
        assert_eq!(no_key, "MsgKey is missing");
        let no_time = records_of(message(json!({"MsgTimeStamp": null}))).unwrap_err();
        assert_eq!(no_time, "no MsgTimeStamp");
        let bad_time = records_of(message(json!({"MsgTimeStamp": "soon"}))).unwrap_err();
        assert!(bad_time.contains("MsgTime"), "{bad_time}");
    }
}
