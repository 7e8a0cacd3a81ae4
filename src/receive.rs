//! Stage 1 of the road: **receive**. The public HTTP endpoint Tencent calls. It reads the
//! request in the order that spends least on strangers — query and signature first, the body
//! (capped before it is read) only after — then hands it down the road and answers in
//! Tencent's shape, always.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use time::OffsetDateTime;

use crate::domain::CallbackCommand;
use crate::error::{Ack, Reason, Rejection};
use crate::normalize::{self, KeyMode};
use crate::publish::{Publisher, SendError};
use crate::telemetry::{
    CallbackFinished, CallbackIgnored, CallbackRejected, ElementsUntyped, Outcome,
};
use crate::validate::Verifier;

/// What the callback endpoint needs, built once by `startup`.
pub struct Receiver {
    pub verifier: Verifier,
    pub publisher: Arc<Publisher>,
    pub key_mode: KeyMode,
    pub max_body_bytes: usize,
}

pub fn router(receiver: Arc<Receiver>, path: &str) -> Router {
    Router::new()
        .route(
            path,
            post(callback).fallback(|| refuse(Reason::MethodNotAllowed)),
        )
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
    let result = handle(&receiver, request).await;
    finish(result, started, peer)
}

fn finish(
    result: Result<Outcome, Rejection>,
    started: Instant,
    peer: Option<SocketAddr>,
) -> Response {
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
    let query = receiver
        .verifier
        .verify(parts.uri.query(), received_at.unix_timestamp())?;
    let bytes = read_body(&parts.headers, body, receiver.max_body_bytes).await?;
    if bytes.is_empty() {
        return Err(Reason::EmptyBody.into());
    }
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(Rejection::with_detail(Reason::InvalidJson, "not an object")),
        Err(e) => {
            return Err(Rejection::with_detail(
                Reason::InvalidJson,
                format!(
                    "{:?} at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            ));
        }
    };
    // Tencent repeats the command in the body; a disagreement means someone edited one of them.
    match body.get("CallbackCommand") {
        None => {}
        Some(Value::String(c)) if c == query.command.as_str() => {}
        Some(_) => return Err(Reason::CommandMismatch.into()),
    }
    if let CallbackCommand::Other(command) = &query.command {
        CallbackIgnored { command }.emit();
        return Ok(Outcome::Ignored);
    }
    let ctx = normalize::Context {
        sdk_app_id: query.sdk_app_id,
        client_ip: query.client_ip.as_deref(),
        opt_platform: query.opt_platform.as_deref(),
        received_at,
        key_mode: receiver.key_mode,
    };
    let record = normalize::normalize(&ctx, &body)
        .map_err(|e| Rejection::with_detail(Reason::InvalidMessage, e.to_string()))?;
    ElementsUntyped(record.untyped_elements).emit();
    receiver.publisher.send(&record).map_err(|e| match e {
        SendError::QueueFull => Rejection::from(Reason::Overloaded),
        SendError::TooLarge => {
            Rejection::with_detail(Reason::PublishUnavailable, "record too large")
        }
        SendError::Other(error) => {
            tracing::error!(%error, "producer refused a record");
            Rejection::from(Reason::PublishUnavailable)
        }
    })?;
    Ok(Outcome::Accepted)
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
