//! Stage 3 of the road: **normalize**. A validated body of one of the relayed commands goes
//! in; its Kafka records come out — key, value bytes and headers (one record, or one per message
//! a read receipt covers). Pure: no HTTP, no Kafka, no files, and the only clock is the
//! `received_at` it is handed.
//!
//! Records are **lossless**: every field Tencent sent appears, typed fields in snake_case,
//! anything unknown verbatim under `extra`, elements we cannot type kept raw. Each kind has its
//! JSON Schema in `schema/`: `c2c-message.v2.json` here, the lifecycle kinds in `lifecycle`.

mod element;
mod fields;
mod lifecycle;
pub use lifecycle::{
    EDIT_SCHEMA, READ_ALL_SCHEMA, READ_RECEIPT_SCHEMA, READ_REPORT_SCHEMA, RECALL_SCHEMA,
};

use std::borrow::Cow;

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::domain::{MsgKey, Relayed, SdkAppId, UserId};
use crate::json::{Json, Object};
use crate::record::Target;
pub use element::{Element, Kind};
pub use fields::{Extra, FieldError, Obj, Problem};

/// Names the record's shape; bump the suffix on any breaking change. v2 added `source`.
pub const SCHEMA: &str = "im-relay.c2c-message.v2";
/// CloudEvents `type` of the record.
pub const EVENT_TYPE: &str = "com.tencent.im.c2c.after_send_msg.v2";

/// The JSON Schema of each record kind, by its `schema` value.
pub const SCHEMAS: [(&str, &str); 6] = [
    (SCHEMA, include_str!("../../schema/c2c-message.v2.json")),
    (
        lifecycle::RECALL_SCHEMA,
        include_str!("../../schema/c2c-recall.v1.json"),
    ),
    (
        lifecycle::EDIT_SCHEMA,
        include_str!("../../schema/c2c-edit.v1.json"),
    ),
    (
        lifecycle::READ_REPORT_SCHEMA,
        include_str!("../../schema/c2c-read-report.v1.json"),
    ),
    (
        lifecycle::READ_RECEIPT_SCHEMA,
        include_str!("../../schema/c2c-read-receipt.v1.json"),
    ),
    (
        lifecycle::READ_ALL_SCHEMA,
        include_str!("../../schema/c2c-read-all.v1.json"),
    ),
];

/// Where a record's content came from: a callback Tencent sent us, or Tencent's history
/// fetched afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Callback,
    Backfill,
}

/// How records are keyed in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyMode {
    /// By `MsgKey`: spreads load evenly, no ordering promise.
    #[default]
    MsgKey,
    /// By `SdkAppid:min(From,To):max(From,To)`: every message of one conversation, in both
    /// directions, lands on one partition, in order.
    Conversation,
}

/// What the query told us about the callback; already validated.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub sdk_app_id: SdkAppId,
    pub client_ip: Option<&'a str>,
    pub opt_platform: Option<&'a str>,
    pub received_at: OffsetDateTime,
    pub key_mode: KeyMode,
    pub source: Source,
}

/// A record ready for Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Which kind's topic it goes to.
    pub target: Target,
    /// Dedup identity, also the CloudEvents `id`.
    pub id: String,
    pub key: String,
    pub value: Vec<u8>,
    /// Named by CloudEvents and us; the fixed values are not copied.
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    /// Elements kept raw because their type or shape was unknown.
    pub untyped_elements: usize,
    /// What the traffic statistics count (messages only).
    pub stats: Option<Stats>,
}

/// Figures about the message for the traffic statistics (not part of the record).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub element_types: Vec<&'static str>,
    pub delivered: Option<bool>,
    pub online_only: Option<bool>,
    /// `received_at − MsgTime`, in seconds.
    pub age_seconds: Option<f64>,
    pub from: String,
    pub to: String,
}

/// The callback is not a message we can relay: the public text names the field.
pub type NormalizeError = FieldError;

const TOP_LEVEL_FIELDS: &[&str] = &[
    "CallbackCommand",
    "From_Account",
    "To_Account",
    "MsgSeq",
    "MsgRandom",
    "MsgTime",
    "MsgKey",
    "MsgId",
    "OnlineOnlyFlag",
    "SendMsgResult",
    "ErrorInfo",
    "UnreadMsgNum",
    "MsgBody",
    "CloudCustomData",
    "EventTime",
];

#[derive(Serialize)]
struct Record<'a> {
    schema: &'static str,
    id: &'a str,
    source: Source,
    sdk_app_id: SdkAppId,
    callback_command: &'static str,
    msg_key: &'a MsgKey<'a>,
    msg_key_derived: bool,
    msg_id: Option<&'a str>,
    from_account: UserId<'a>,
    to_account: UserId<'a>,
    msg_seq: Option<u32>,
    msg_random: Option<u32>,
    msg_time: Option<i64>,
    msg_time_rfc3339: Option<String>,
    event_time_ms: Option<i64>,
    online_only: Option<bool>,
    send_result: Option<i64>,
    delivered: Option<bool>,
    error_info: Option<&'a str>,
    unread_msg_num: Option<i64>,
    elements: &'a [Element<'a>],
    cloud_custom_data: Option<&'a str>,
    client_ip: Option<&'a str>,
    opt_platform: Option<&'a str>,
    received_at: &'a str,
    extra: Extra<'a>,
}

fn required<T>(field: &'static str, v: Option<T>) -> Result<T, FieldError> {
    v.ok_or(FieldError {
        field,
        problem: Problem::Missing,
    })
}

/// A required user id field (`From_Account`, `Report_Account`, …).
fn user<'a>(b: Obj<'a>, field: &'static str) -> Result<UserId<'a>, FieldError> {
    UserId::parse(required(field, b.str(field)?)?).map_err(id_error(field))
}

/// A required `MsgKey` (the lifecycle callbacks cannot derive one: it is their only join).
pub(crate) fn required_msg_key(b: Obj<'_>) -> Result<MsgKey<'_>, FieldError> {
    MsgKey::parse(required("MsgKey", b.str("MsgKey")?)?).map_err(id_error("MsgKey"))
}

fn id_error(field: &'static str) -> impl Fn(crate::domain::IdError) -> FieldError {
    move |e| FieldError {
        field,
        problem: Problem::Invalid(e.to_string()),
    }
}

/// Turns one callback body of `command` into its Kafka records (one, or for a read receipt
/// one per message it covers; never none). A part that cannot be read fails the whole.
pub fn normalize(
    ctx: &Context<'_>,
    command: Relayed,
    body: &Object<'_>,
) -> Result<Vec<Output>, NormalizeError> {
    match normalize_parts(ctx, command, body)? {
        (out, set_aside) if set_aside.is_empty() => Ok(out),
        (_, set_aside) => Err(FieldError {
            field: "C2CMsgInfo",
            problem: Problem::Invalid(set_aside.join("; ")),
        }),
    }
}

/// `normalize`, keeping what can be read of a callback made of parts (a read receipt's
/// entries): its records, and why each part set aside was (empty: nothing was). An error only
/// when nothing can be read.
pub fn normalize_parts(
    ctx: &Context<'_>,
    command: Relayed,
    body: &Object<'_>,
) -> Result<(Vec<Output>, Vec<String>), NormalizeError> {
    let one = |o| (vec![o], Vec::new());
    match command {
        Relayed::AfterSendMsg => after_send(ctx, body).map(one),
        Relayed::AfterMsgWithDraw => lifecycle::recall(ctx, body).map(one),
        Relayed::AfterModifyMsg => lifecycle::edit(ctx, body).map(one),
        Relayed::AfterMsgReport => lifecycle::read_report(ctx, body).map(one),
        Relayed::AfterMsgReadReceipt => lifecycle::read_receipt(ctx, body),
        Relayed::AfterMsgReadAll => lifecycle::read_all(ctx, body).map(one),
    }
}

/// `normalize` for a body built as a `serde_json` map (tests build them with `json!`).
#[cfg(test)]
pub(crate) fn normalize_map(
    ctx: &Context<'_>,
    command: Relayed,
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<Output>, NormalizeError> {
    normalize(ctx, command, &Object::from_map(body))
}

/// One after-send callback body's record.
fn after_send(ctx: &Context<'_>, body: &Object<'_>) -> Result<Output, NormalizeError> {
    let b = Obj(body);
    let from = user(b, "From_Account")?;
    let to = user(b, "To_Account")?;
    let msg_body = required("MsgBody", b.array("MsgBody")?)?;
    let msg_seq = b.u32("MsgSeq")?;
    let msg_random = b.u32("MsgRandom")?;
    let msg_time = b.i64("MsgTime")?;
    let (msg_key, msg_key_derived) = match b.str("MsgKey")? {
        Some(k) => (MsgKey::parse(k).map_err(id_error("MsgKey"))?, false),
        None => (derive_msg_key(msg_seq, msg_random, msg_time, body), true),
    };
    let send_result = b.i64("SendMsgResult")?;
    let elements = element::elements(msg_body)?;

    let conversation = conversation(ctx.sdk_app_id, from, to);
    let id = message_id(&conversation, &msg_key);
    let received_at = received_at(ctx);
    let msg_time_rfc3339 =
        msg_time.and_then(|t| rfc3339(OffsetDateTime::from_unix_timestamp(t).ok()));

    let record = Record {
        schema: SCHEMA,
        id: &id,
        source: ctx.source,
        sdk_app_id: ctx.sdk_app_id,
        callback_command: Relayed::AfterSendMsg.as_str(),
        msg_key: &msg_key,
        msg_key_derived,
        msg_id: b.str("MsgId")?,
        from_account: from,
        to_account: to,
        msg_seq,
        msg_random,
        msg_time,
        msg_time_rfc3339: msg_time_rfc3339.clone(),
        event_time_ms: b.i64("EventTime")?,
        online_only: b.flag("OnlineOnlyFlag")?,
        send_result,
        delivered: send_result.map(|r| r == 0),
        error_info: b.str("ErrorInfo")?,
        unread_msg_num: b.i64("UnreadMsgNum")?,
        elements: &elements,
        cloud_custom_data: b.str("CloudCustomData")?,
        client_ip: ctx.client_ip,
        opt_platform: ctx.opt_platform,
        received_at: &received_at,
        extra: b.extra(TOP_LEVEL_FIELDS),
    };
    let value = to_json(&record);

    let key = message_key(ctx.key_mode, &msg_key, &conversation);
    // CloudEvents `time` is when the occurrence happened: the send time when we have it.
    let time = msg_time_rfc3339.unwrap_or_else(|| received_at.clone());
    let headers = headers(ctx, &id, EVENT_TYPE, time, Relayed::AfterSendMsg);
    let untyped_elements = untyped(&elements);
    let stats = Stats {
        element_types: elements.iter().map(|e| e.kind.label()).collect(),
        delivered: record.delivered,
        online_only: record.online_only,
        age_seconds: msg_time
            .map(|t| (ctx.received_at.unix_timestamp_nanos() as f64 / 1e9) - t as f64),
        from: from.as_str().to_owned(),
        to: to.as_str().to_owned(),
    };
    Ok(Output {
        target: Target::Messages,
        id,
        key,
        value,
        headers,
        untyped_elements,
        stats: Some(stats),
    })
}

/// A record's JSON, as `serde_json` writes it (in tests, checked against it for every record).
/// Sized for a typical message at once (`serde_json::to_vec` starts at 128 bytes and grows
/// four times for one). Writing borrowed strs, numbers and `Json`s cannot fail.
fn to_json(record: &impl Serialize) -> Vec<u8> {
    let value = crate::json::to_vec(record, 1536)
        .or_else(|_| serde_json::to_vec(record))
        .unwrap_or_default();
    #[cfg(test)]
    assert_eq!(
        String::from_utf8_lossy(&value),
        String::from_utf8_lossy(&serde_json::to_vec(record).unwrap_or_default())
    );
    value
}

/// `SdkAppid:min(a,b):max(a,b)`: one conversation, whichever side speaks.
fn conversation(app: SdkAppId, a: UserId<'_>, b: UserId<'_>) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut out = String::with_capacity(22 + lo.as_str().len() + hi.as_str().len());
    app.push_to(&mut out);
    for id in [lo, hi] {
        out.push(':');
        out.push_str(id.as_str());
    }
    out
}

/// A message's record id (and the join key of its lifecycle events):
/// `SdkAppid:min(From,To):max(From,To):MsgKey`.
fn message_id(conversation: &str, key: &MsgKey<'_>) -> String {
    let mut out = String::with_capacity(conversation.len() + 1 + key.as_str().len());
    out.push_str(conversation);
    out.push(':');
    out.push_str(key.as_str());
    out
}

/// A message and its own events share a key, so they share a partition.
fn message_key(mode: KeyMode, key: &MsgKey<'_>, conversation: &str) -> String {
    match mode {
        KeyMode::MsgKey => key.as_str().to_owned(),
        KeyMode::Conversation => conversation.to_owned(),
    }
}

/// Millisecond precision: enough to order arrivals, and a stable width for consumers.
fn received_at(ctx: &Context<'_>) -> String {
    let at = ctx.received_at;
    rfc3339(at.replace_millisecond(at.millisecond()).ok()).unwrap_or_default()
}

fn untyped(elements: &[Element<'_>]) -> usize {
    elements
        .iter()
        .filter(|e| matches!(e.kind, Kind::Unknown { .. }))
        .count()
}

/// The CloudEvents (binary mode) and im-relay headers every relayed record carries.
fn headers(
    ctx: &Context<'_>,
    id: &str,
    event_type: &'static str,
    time: String,
    command: Relayed,
) -> Vec<(&'static str, Cow<'static, str>)> {
    let mut app = String::with_capacity(20);
    ctx.sdk_app_id.push_to(&mut app);
    let mut headers = vec![
        ("ce_specversion", Cow::Borrowed("1.0")),
        ("ce_id", Cow::Owned(id.to_owned())),
        ("ce_source", Cow::Owned(["/tencent-im/", &app].concat())),
        ("ce_type", Cow::Borrowed(event_type)),
        ("ce_time", Cow::Owned(time)),
        ("content-type", Cow::Borrowed("application/json")),
        ("im_sdk_app_id", Cow::Owned(app)),
        ("im_callback_command", Cow::Borrowed(command.as_str())),
    ];
    if ctx.source == Source::Backfill {
        headers.push(("im_source", Cow::Borrowed("backfill")));
    }
    headers
}

/// Unix milliseconds as RFC 3339 (CloudEvents `time`).
fn rfc3339_ms(ms: i64) -> Option<String> {
    rfc3339(OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
}

/// `t` as RFC 3339, exactly as `time` writes it (`None` where `time` refuses: a year beyond
/// 0..=9999). UTC, the only offset records carry, is written here: `time`'s general formatter
/// was a tenth of `normalize`'s instructions for the two timestamps of a message.
fn rfc3339(t: Option<OffsetDateTime>) -> Option<String> {
    let t = t?;
    if t.offset() != time::UtcOffset::UTC || !(0..10_000).contains(&t.year()) {
        return t.format(&Rfc3339).ok();
    }
    let (year, month, day) = t.to_calendar_date();
    let (hour, minute, second, nanos) = t.to_hms_nano();
    let mut out = String::with_capacity(30);
    push_digits(&mut out, year as u32, 4);
    for (sep, n) in [
        ('-', month as u8),
        ('-', day),
        ('T', hour),
        (':', minute),
        (':', second),
    ] {
        out.push(sep);
        push_digits(&mut out, u32::from(n), 2);
    }
    if nanos != 0 {
        // Nanoseconds, trailing zeros dropped.
        let (mut n, mut width) = (nanos, 9);
        while n % 10 == 0 {
            n /= 10;
            width -= 1;
        }
        out.push('.');
        push_digits(&mut out, n, width);
    }
    out.push('Z');
    Some(out)
}

/// `n`'s last `width` decimal digits, zero-padded.
fn push_digits(out: &mut String, n: u32, width: u32) {
    for i in (0..width).rev() {
        out.push(char::from(b'0' + (n / 10u32.pow(i) % 10) as u8));
    }
}

/// Older payloads carry no `MsgKey`. Tencent's own identity of a one-to-one message is
/// (MsgSeq, MsgRandom, MsgTime), which is also how it usually spells `MsgKey`; without all three
/// we fall back to a hash of the canonical body so retries of the same callback still agree
/// (our rule; the fields: https://www.tencentcloud.com/document/product/1047/34365).
fn derive_msg_key(
    seq: Option<u32>,
    random: Option<u32>,
    time: Option<i64>,
    body: &Object<'_>,
) -> MsgKey<'static> {
    if let (Some(s), Some(r), Some(t)) = (seq, random, time) {
        return MsgKey::derived(format!("{s}_{r}_{t}"));
    }
    MsgKey::derived(digest_of(&[&Json::Object(body.clone())]))
}

/// `sha256_` and 32 hex digits of the canonical form of `values`, for ids that must agree
/// between retries of the same callback whatever order its keys came in.
fn digest_of(values: &[&Json<'_>]) -> String {
    let mut hasher = Sha256::new();
    for v in values {
        hash_canonical(&mut hasher, v);
    }
    let digest = hasher.finalize();
    format!("sha256_{}", hex::encode(&digest[..16]))
}

/// Feeds `v` to the hasher with object keys sorted, whatever order the map keeps them in.
fn hash_canonical(h: &mut Sha256, v: &Json<'_>) {
    match v {
        // An object's members are kept sorted by key.
        Json::Object(m) => {
            h.update(b"{");
            for (k, v) in m.iter() {
                hash_canonical(h, &Json::String(k.into()));
                h.update(b":");
                hash_canonical(h, v);
                h.update(b",");
            }
            h.update(b"}");
        }
        Json::Array(a) => {
            h.update(b"[");
            for item in a {
                hash_canonical(h, item);
                h.update(b",");
            }
            h.update(b"]");
        }
        scalar => h.update(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests;
