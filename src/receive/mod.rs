//! Stage 1 of the road: **receive**. The public HTTP endpoint Tencent calls. It reads the
//! request in the order that spends least on strangers — query and signature first, the body
//! (capped before it is read) only after — hands it down the road, and answers in Tencent's
//! shape, always. `OK` is sent only once the record is in the spool.
//!
//! A callback that passed authentication but cannot be relayed (bad JSON, wrong types, a
//! command mismatch, a record too large for Kafka) is still kept: its raw body goes through
//! the spool to the quarantine topic, and the caller gets the 4xx that says why.

mod connections;
mod dedup;
mod source;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use time::OffsetDateTime;

pub use connections::ConnectionLimit;
pub use dedup::DedupWindow;
pub use source::SourcePolicy;

use crate::config::Config;
use crate::domain::{CallbackCommand, Relayed};
use crate::error::{Ack, Reason, Rejection};
use crate::json::{self, Json};
use crate::normalize::{self, KeyMode, Source};
use crate::record::{Quarantined, Record, message_entry};
use crate::spool::{AppendError, Appender};
use crate::telemetry::Event as _;
use crate::telemetry::{
    CallbackFinished, CallbackIgnored, CallbackQuarantined, CallbackReceived, CallbackRejected,
    ElementsUntyped, MessageAccepted, Outcome, RecordsAccepted,
};
use crate::validate::{CallbackQuery, Verifier};

/// What the callback endpoint needs, built once by `startup`.
pub struct Receiver {
    pub sources: SourcePolicy,
    pub verifier: Verifier,
    pub spool: Appender,
    pub dedup: Mutex<DedupWindow>,
    /// Signed requests seen within the freshness window (digest of query and body).
    pub replays: Mutex<DedupWindow>,
    pub key_mode: KeyMode,
    /// The commands relayed; the others are answered `OK` and counted.
    pub relay_commands: BTreeSet<Relayed>,
    pub max_body_bytes: usize,
    /// Time the body may take to arrive (headers are bounded by the server).
    pub request_timeout: std::time::Duration,
    /// Records larger than this would be refused by Kafka: they go to quarantine instead.
    pub max_record_bytes: usize,
    /// A spool append not done by then is answered 503, well inside Tencent's 2 s.
    pub append_timeout: std::time::Duration,
}

impl Receiver {
    /// The listener's state for `config`, appending to `spool`.
    pub fn new(config: &Config, spool: Appender) -> Receiver {
        Receiver {
            sources: SourcePolicy {
                allow: config.allow_cidrs.clone(),
                trusted_proxies: config.trusted_proxies.clone(),
            },
            verifier: Verifier::new(
                config.sdk_app_ids.clone(),
                config.tokens.clone(),
                config.sign_max_skew.as_millis() as u64,
            ),
            spool,
            dedup: Mutex::new(DedupWindow::new(
                config.dedup_window_records,
                config.dedup_window,
            )),
            // A replay older than twice the skew window is refused as stale anyway.
            replays: Mutex::new(DedupWindow::new(
                config.dedup_window_records,
                2 * config.sign_max_skew + Duration::from_secs(1),
            )),
            key_mode: config.kafka.key,
            relay_commands: config.relay_commands.clone(),
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
            // Room for the headers and the batch overhead Kafka counts too.
            max_record_bytes: (config.kafka.message_max_bytes as usize).saturating_sub(4096),
            append_timeout: config.spool_append_timeout,
        }
    }
}

/// Why the relay cannot take callbacks now (`starting`, `draining`, a spool in trouble), if
/// it cannot: what `/readyz` says.
pub type Readiness = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

/// The callback endpoint at `path`, and the load balancer's health check at `health.0`.
pub fn router(receiver: Arc<Receiver>, path: &str, health: (&str, Readiness)) -> Router {
    let (health_path, ready) = health;
    // Cloud load balancers check `GET` on the serving port (GKE Ingress, AWS ALB) from their
    // own address ranges: answered before the source policy and outside the callback
    // metrics, and saying only up or down.
    let health = get(move || async move {
        match ready() {
            None => (StatusCode::OK, "ok\n"),
            Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n"),
        }
    });
    Router::new()
        .route(
            path,
            post(callback).fallback(|| refuse(Reason::MethodNotAllowed)),
        )
        .route(health_path, health)
        .fallback(|| refuse(Reason::NotFound))
        .with_state(receiver)
}

async fn refuse(reason: Reason) -> Response {
    finish(Err(reason.into()), Instant::now(), None)
}

async fn callback(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    let started = Instant::now();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let result = match peer {
        Some(p) if !receiver.sources.allows(p.ip(), request.headers()) => {
            Err(Reason::SourceNotAllowed.into())
        }
        _ => handle(&receiver, request).await,
    };
    finish(result, started, peer)
}

fn finish(
    result: Result<Outcome, Rejection>,
    started: Instant,
    peer: Option<SocketAddr>,
) -> Response {
    let status = match &result {
        Ok(_) => 200,
        Err(r) => r.reason.status().as_u16(),
    };
    let outcome = match &result {
        Ok(o) => *o,
        Err(r) => {
            CallbackRejected {
                reason: r.reason,
                detail: r.detail.as_deref(),
                peer,
            }
            .emit();
            Outcome::Rejected
        }
    };
    CallbackFinished {
        outcome,
        status,
        elapsed: started.elapsed(),
    }
    .emit();
    match result {
        Ok(_) => Ack.into_response(),
        Err(r) => r.into_response(),
    }
}

async fn handle(receiver: &Receiver, request: Request) -> Result<Outcome, Rejection> {
    let received_at = OffsetDateTime::now_utc();
    let (parts, body) = request.into_parts();
    let raw_query = parts.uri.query().unwrap_or("");
    let query = receiver
        .verifier
        .verify(Some(raw_query), received_at.unix_timestamp())?;
    // Authenticated from here on: what cannot be relayed is quarantined, not dropped.
    let reading = read_body(&parts.headers, body, receiver.max_body_bytes);
    let bytes = tokio::time::timeout(receiver.request_timeout, reading)
        .await
        .map_err(|_| Rejection::from(Reason::RequestTimeout))??;
    CallbackReceived {
        command: query.command.label(),
        skew_seconds: query.request_time.map(|t| received_at.unix_timestamp() - t),
        body_bytes: bytes.len(),
    }
    .emit();
    // Routed on the query's command before the body is looked at: a command not relayed is
    // answered `OK` whatever its body — before-callbacks above all, whose answer could block or
    // change the message (https://www.tencentcloud.com/document/product/1047/34354).
    let command = match &query.command {
        CallbackCommand::Relayed(r) if receiver.relay_commands.contains(r) => *r,
        other => {
            CallbackIgnored {
                command: other.as_str(),
            }
            .emit();
            return Ok(Outcome::Ignored);
        }
    };
    if bytes.is_empty() {
        return Err(Reason::EmptyBody.into());
    }
    // W3C trace context, carried to the record so a trace can follow the message downstream.
    let traceparent = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    // A replay of an identical signed request within the freshness window: answered, not
    // processed again (the signature covers only the time, so this is all it can prove).
    let replay = query.request_time.map(|_| {
        let mut replays = lock(&receiver.replays);
        let key = replays.key(&(raw_query, &bytes[..]));
        (key, replays.contains(key, Instant::now()))
    });
    if let Some((_, true)) = replay {
        return Ok(Outcome::Replayed);
    }
    let outcome = relay(
        receiver,
        command,
        &query,
        raw_query,
        &bytes,
        received_at,
        traceparent,
    )
    .await?;
    if let Some((key, _)) = replay {
        lock(&receiver.replays).insert(key, Instant::now());
    }
    Ok(outcome)
}

/// From an authenticated body to a spooled record (or a quarantined body).
async fn relay(
    receiver: &Receiver,
    command: Relayed,
    query: &CallbackQuery<'_>,
    raw_query: &str,
    bytes: &Bytes,
    received_at: OffsetDateTime,
    traceparent: Option<&str>,
) -> Result<Outcome, Rejection> {
    let quarantine = |rejection: Rejection| Quarantine {
        receiver,
        query,
        raw_query,
        body: bytes,
        received_at,
        rejection,
    };
    let body = match json::parse(bytes) {
        Ok(Json::Object(map)) => map,
        Ok(_) => {
            let r = Rejection::with_detail(Reason::InvalidJson, "not an object");
            return quarantine(r).keep().await;
        }
        Err(e) => {
            // serde_json's message names the problem and where; it never echoes the input.
            let detail: String = e.to_string().chars().take(120).collect();
            let r = Rejection::with_detail(Reason::InvalidJson, detail);
            return quarantine(r).keep().await;
        }
    };
    // Tencent repeats the command in the body; a disagreement means someone edited one of them.
    match body.get("CallbackCommand") {
        None => {}
        Some(Json::String(c)) if c.as_ref() == query.command.as_str() => {}
        Some(_) => return quarantine(Reason::CommandMismatch.into()).keep().await,
    }
    let ctx = normalize::Context {
        sdk_app_id: query.sdk_app_id,
        client_ip: query.client_ip.as_deref(),
        opt_platform: query.opt_platform.as_deref(),
        received_at,
        key_mode: receiver.key_mode,
        source: Source::Callback,
    };
    let (records, set_aside) = match normalize::normalize_parts(&ctx, command, &body) {
        Ok(r) => r,
        Err(e) => {
            let r = Rejection::with_detail(Reason::InvalidMessage, e.to_string());
            return quarantine(r).keep().await;
        }
    };
    if records
        .iter()
        .any(|r| r.value.len() > receiver.max_record_bytes)
    {
        return quarantine(Reason::RecordTooLarge.into()).keep().await;
    }
    ElementsUntyped(records.iter().map(|r| r.untyped_elements).sum()).emit();
    let now = Instant::now();
    // A retried read receipt may add messages to what an earlier one covered: only the new
    // ones are appended, each once (a receipt may name a message twice).
    let fresh = lock(&receiver.dedup).unseen(records, |r| r.id.as_str(), now);
    // Parts that could not be read (a read receipt's bad entries) go to quarantine in the same
    // write as the records of the others, which are answered for: `OK`.
    let partly = (!set_aside.is_empty()).then(|| {
        // Bounded: a receipt of thousands of bad entries names the first few.
        let mut detail = set_aside
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if set_aside.len() > 5 {
            detail.push_str(&format!("; and {} more", set_aside.len() - 5));
        }
        let r = Rejection::with_detail(Reason::InvalidMessage, detail);
        let entry = quarantine(r.clone()).entry();
        (r, entry)
    });
    if fresh.is_empty() && partly.is_none() {
        return Ok(Outcome::Duplicate);
    }
    let records = fresh.len();
    let mut ids = Vec::with_capacity(records);
    let mut stats = Vec::new();
    let mut entries = Vec::with_capacity(records);
    for (key, r) in fresh {
        entries.push(message_entry(
            r.target,
            &r.key,
            &r.headers,
            &r.value,
            received_at,
            traceparent,
        ));
        ids.push(key);
        stats.extend(r.stats);
    }
    if let Some((_, entry)) = &partly {
        entries.push(entry.clone());
    }
    append(receiver, entries).await?;
    if let Some((r, _)) = partly {
        CallbackQuarantined { reason: r.reason }.emit();
    }
    {
        let mut dedup = lock(&receiver.dedup);
        for key in ids {
            dedup.insert(key, now);
        }
    }
    RecordsAccepted {
        command: command.label(),
        records,
    }
    .emit();
    for s in &stats {
        MessageAccepted {
            element_types: &s.element_types,
            delivered: s.delivered,
            online_only: s.online_only,
            age_seconds: s.age_seconds,
            from: &s.from,
            to: &s.to,
        }
        .emit();
    }
    Ok(Outcome::Accepted)
}

fn lock(m: &Mutex<DedupWindow>) -> std::sync::MutexGuard<'_, DedupWindow> {
    // The window holds no invariant a panic could break: keep using it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `OK` only once the records are in the spool (all of them, or none is acknowledged); a disk
/// that does not answer in time gets the sender a 503 (the write may still land later: a
/// duplicate at worst, never a loss).
async fn append(receiver: &Receiver, entries: Vec<Vec<u8>>) -> Result<u64, Rejection> {
    let appended =
        tokio::time::timeout(receiver.append_timeout, receiver.spool.append_all(entries));
    match appended.await {
        Ok(Ok(seq)) => Ok(seq),
        Ok(Err(AppendError::Full)) => Err(Reason::SpoolFull.into()),
        Ok(Err(AppendError::Io { .. })) | Err(_) => Err(Reason::SpoolUnavailable.into()),
    }
}

/// An authenticated callback we cannot relay, on its way to the quarantine topic.
struct Quarantine<'a> {
    receiver: &'a Receiver,
    query: &'a CallbackQuery<'a>,
    raw_query: &'a str,
    body: &'a Bytes,
    received_at: OffsetDateTime,
    rejection: Rejection,
}

impl Quarantine<'_> {
    /// Spools the raw callback with its reason; answers with the rejection (or 503 when even
    /// that cannot be stored, so a retrying sender tries again).
    async fn keep(self) -> Result<Outcome, Rejection> {
        append(self.receiver, vec![self.entry()]).await?;
        CallbackQuarantined {
            reason: self.rejection.reason,
        }
        .emit();
        Err(self.rejection)
    }

    /// The spool entry: the raw callback with its reason.
    fn entry(&self) -> Vec<u8> {
        Record::quarantined(
            self.body,
            &Quarantined {
                reason: self.rejection.reason.label(),
                detail: self.rejection.detail.as_deref(),
                sdk_app_id: self.query.sdk_app_id.to_string(),
                command: self.query.command.as_str(),
                raw_query: self.raw_query,
                received_at: self.received_at,
            },
        )
        .encode()
    }
}

/// Reads the body, refusing it as soon as it is known to exceed `limit` — from
/// `Content-Length` before a byte is read, or while streaming when there is none.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Reason::BodyTooLarge.into());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Reason::BodyTooLarge.into()),
        Err(_) => Err(Reason::BodyReadFailed.into()),
    }
}
