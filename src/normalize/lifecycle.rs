//! The rest of a message's life: recall, edit, read report and read receipt. Each callback
//! becomes a record of its own kind (schema `im-relay.c2c-<kind>.v1`), carrying `message_id`,
//! the id of the message it concerns, so a consumer can join them; a recall, an edit and a
//! receipt are keyed like the message itself, so they share its partition
//! (https://www.tencentcloud.com/document/product/1047/43466,
//! https://cloud.tencent.com/document/product/269/128224,
//! https://www.tencentcloud.com/document/product/1047/43465,
//! https://cloud.tencent.com/document/product/269/128223).
//!
//! Identities, stable across retries of one event: a recall happens once per message, so its
//! id leaves `EventTime` out (a recall rebuilt from history has none); an edit's includes
//! `EventTime`, or a digest of the new content when there is none; a read report's is the app,
//! the reader, the peer and `LastReadTime`.

use serde::Serialize;

use super::element::{self, Element};
use super::fields::{Extra, FieldError, Obj, Problem};
use super::{
    Context, NormalizeError, Output, Source, conversation, derive_msg_key, digest_of, headers,
    id_error, message_id, message_key, received_at, required, required_msg_key, rfc3339_ms,
    to_json, untyped, user,
};
use crate::domain::{MsgKey, Relayed, SdkAppId, UserId};
use crate::json::{Json, Object};
use crate::record::Target;

pub const RECALL_SCHEMA: &str = "im-relay.c2c-recall.v1";
pub const RECALL_TYPE: &str = "com.tencent.im.c2c.after_msg_withdraw.v1";
pub const EDIT_SCHEMA: &str = "im-relay.c2c-edit.v1";
pub const EDIT_TYPE: &str = "com.tencent.im.c2c.after_modify_msg.v1";
pub const READ_REPORT_SCHEMA: &str = "im-relay.c2c-read-report.v1";
pub const READ_REPORT_TYPE: &str = "com.tencent.im.c2c.after_msg_report.v1";
pub const READ_RECEIPT_SCHEMA: &str = "im-relay.c2c-read-receipt.v1";
pub const READ_ALL_SCHEMA: &str = "im-relay.c2c-read-all.v1";
pub const READ_ALL_TYPE: &str = "com.tencent.im.c2c.after_msg_read_all.v1";
pub const READ_RECEIPT_TYPE: &str = "com.tencent.im.c2c.after_msg_read_receipt.v1";

/// What every lifecycle record starts with.
#[derive(Serialize)]
struct Common<'a> {
    schema: &'static str,
    id: &'a str,
    source: Source,
    sdk_app_id: SdkAppId,
    callback_command: &'static str,
}

/// What every record ends with: where the callback came from and when.
#[derive(Serialize)]
struct Arrival<'a> {
    client_ip: Option<&'a str>,
    opt_platform: Option<&'a str>,
    received_at: &'a str,
}

#[derive(Serialize)]
struct Recall<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    message_id: &'a str,
    msg_key: &'a MsgKey<'a>,
    from_account: UserId<'a>,
    to_account: UserId<'a>,
    event_time_ms: Option<i64>,
    unread_msg_num: Option<i64>,
    #[serde(flatten)]
    arrival: Arrival<'a>,
    extra: Extra<'a>,
}

#[derive(Serialize)]
struct Edit<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    message_id: &'a str,
    msg_key: &'a MsgKey<'a>,
    msg_key_derived: bool,
    operator_account: Option<&'a str>,
    from_account: UserId<'a>,
    to_account: UserId<'a>,
    msg_seq: Option<u32>,
    msg_random: Option<u32>,
    msg_time: Option<i64>,
    event_time_ms: Option<i64>,
    /// The content after the edit; `null` when the callback carried no `MsgBody`.
    elements: Option<&'a [Element<'a>]>,
    /// `null` when the callback carried no `CloudCustomData`.
    cloud_custom_data: Option<&'a str>,
    #[serde(flatten)]
    arrival: Arrival<'a>,
    extra: Extra<'a>,
}

#[derive(Serialize)]
struct ReadReport<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    conversation: &'a str,
    report_account: UserId<'a>,
    peer_account: UserId<'a>,
    last_read_time: i64,
    unread_msg_num: Option<i64>,
    event_time_ms: Option<i64>,
    #[serde(flatten)]
    arrival: Arrival<'a>,
    extra: Extra<'a>,
}

#[derive(Serialize)]
struct ReadAll<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    report_account: UserId<'a>,
    event_time_ms: Option<i64>,
    #[serde(flatten)]
    arrival: Arrival<'a>,
    extra: Extra<'a>,
}

#[derive(Serialize)]
struct ReadReceipt<'a> {
    #[serde(flatten)]
    common: Common<'a>,
    message_id: &'a str,
    msg_key: MsgKey<'a>,
    msg_id: Option<&'a str>,
    operator_account: Option<&'a str>,
    peer_account: Option<&'a str>,
    from_account: UserId<'a>,
    to_account: UserId<'a>,
    event_time_ms: Option<i64>,
    #[serde(flatten)]
    arrival: Arrival<'a>,
    extra: Extra<'a>,
    /// Unknown fields of this message's `C2CMsgInfo` entry.
    info_extra: Extra<'a>,
}

fn common<'a>(ctx: &Context<'_>, id: &'a str, schema: &'static str, cmd: Relayed) -> Common<'a> {
    Common {
        schema,
        id,
        source: ctx.source,
        sdk_app_id: ctx.sdk_app_id,
        callback_command: cmd.as_str(),
    }
}

fn arrival<'a>(ctx: &Context<'a>, received_at: &'a str) -> Arrival<'a> {
    Arrival {
        client_ip: ctx.client_ip,
        opt_platform: ctx.opt_platform,
        received_at,
    }
}

/// The record around a serialized lifecycle value. CloudEvents `time` is when the event
/// happened (`EventTime`) when Tencent says, else when it reached us.
struct Made<'a> {
    target: Target,
    id: String,
    key: String,
    event_type: &'static str,
    command: Relayed,
    event_time_ms: Option<i64>,
    received_at: &'a str,
    untyped_elements: usize,
}

impl Made<'_> {
    fn output(self, ctx: &Context<'_>, record: &impl Serialize) -> Output {
        let value = to_json(record);
        let time = self
            .event_time_ms
            .and_then(rfc3339_ms)
            .unwrap_or_else(|| self.received_at.to_owned());
        let headers = headers(ctx, &self.id, self.event_type, time, self.command);
        Output {
            target: self.target,
            id: self.id,
            key: self.key,
            value,
            headers,
            untyped_elements: self.untyped_elements,
            stats: None,
        }
    }
}

const RECALL_FIELDS: &[&str] = &[
    "CallbackCommand",
    "From_Account",
    "To_Account",
    "MsgKey",
    "UnreadMsgNum",
    "EventTime",
];

/// `C2C.CallbackAfterMsgWithDraw`: `MsgKey` is the only join to the message, so it is required.
pub fn recall(ctx: &Context<'_>, body: &Object<'_>) -> Result<Output, NormalizeError> {
    let b = Obj(body);
    let from = user(b, "From_Account")?;
    let to = user(b, "To_Account")?;
    let msg_key = required_msg_key(b)?;
    let conversation = conversation(ctx.sdk_app_id, from, to);
    let message = message_id(&conversation, &msg_key);
    let id = format!("{message}#recall");
    let received_at = received_at(ctx);
    let event_time_ms = b.i64("EventTime")?;
    let record = Recall {
        common: common(ctx, &id, RECALL_SCHEMA, Relayed::AfterMsgWithDraw),
        message_id: &message,
        msg_key: &msg_key,
        from_account: from,
        to_account: to,
        event_time_ms,
        unread_msg_num: b.i64("UnreadMsgNum")?,
        arrival: arrival(ctx, &received_at),
        extra: b.extra(RECALL_FIELDS),
    };
    let made = Made {
        target: Target::Recalls,
        key: message_key(ctx.key_mode, &msg_key, &conversation),
        id: id.clone(),
        event_type: RECALL_TYPE,
        command: Relayed::AfterMsgWithDraw,
        event_time_ms,
        received_at: &received_at,
        untyped_elements: 0,
    };
    Ok(made.output(ctx, &record))
}

const EDIT_FIELDS: &[&str] = &[
    "CallbackCommand",
    "Operator_Account",
    "From_Account",
    "To_Account",
    "MsgSeq",
    "MsgRandom",
    "MsgTime",
    "MsgKey",
    "EventTime",
    "MsgBody",
    "CloudCustomData",
];

/// `C2C.CallbackAfterModifyMsg`. The message is named by `MsgKey`, or (an older shape) by
/// `MsgSeq`/`MsgRandom`/`MsgTime` the way after-send derives its key; an edit naming neither
/// cannot be joined to its message and is refused.
pub fn edit(ctx: &Context<'_>, body: &Object<'_>) -> Result<Output, NormalizeError> {
    let b = Obj(body);
    let from = user(b, "From_Account")?;
    let to = user(b, "To_Account")?;
    let msg_seq = b.u32("MsgSeq")?;
    let msg_random = b.u32("MsgRandom")?;
    let msg_time = b.i64("MsgTime")?;
    let (msg_key, msg_key_derived) = match b.str("MsgKey")? {
        Some(k) => (MsgKey::parse(k).map_err(id_error("MsgKey"))?, false),
        None if msg_seq.is_some() && msg_random.is_some() && msg_time.is_some() => {
            (derive_msg_key(msg_seq, msg_random, msg_time, body), true)
        }
        None => {
            return Err(FieldError {
                field: "MsgKey",
                problem: Problem::Missing,
            });
        }
    };
    let elements = b
        .array("MsgBody")?
        .map(|a| element::elements(a))
        .transpose()?;
    let cloud_custom_data = b.str("CloudCustomData")?;
    let event_time_ms = b.i64("EventTime")?;
    let conversation = conversation(ctx.sdk_app_id, from, to);
    let message = message_id(&conversation, &msg_key);
    // Two edits of one message differ in their time, or else in what they made of it.
    let version = match event_time_ms {
        Some(t) => t.to_string(),
        None => digest_of(&[
            body.get("MsgBody").unwrap_or(&Json::Null),
            body.get("CloudCustomData").unwrap_or(&Json::Null),
        ]),
    };
    let id = format!("{message}#edit@{version}");
    let received_at = received_at(ctx);
    let record = Edit {
        common: common(ctx, &id, EDIT_SCHEMA, Relayed::AfterModifyMsg),
        message_id: &message,
        msg_key: &msg_key,
        msg_key_derived,
        operator_account: b.str("Operator_Account")?,
        from_account: from,
        to_account: to,
        msg_seq,
        msg_random,
        msg_time,
        event_time_ms,
        elements: elements.as_deref(),
        cloud_custom_data,
        arrival: arrival(ctx, &received_at),
        extra: b.extra(EDIT_FIELDS),
    };
    let made = Made {
        target: Target::Edits,
        key: message_key(ctx.key_mode, &msg_key, &conversation),
        id: id.clone(),
        event_type: EDIT_TYPE,
        command: Relayed::AfterModifyMsg,
        event_time_ms,
        received_at: &received_at,
        untyped_elements: elements.as_deref().map_or(0, untyped),
    };
    Ok(made.output(ctx, &record))
}

const READ_REPORT_FIELDS: &[&str] = &[
    "CallbackCommand",
    "Report_Account",
    "Peer_Account",
    "LastReadTime",
    "UnreadMsgNum",
    "EventTime",
];

/// `C2C.CallbackAfterMsgReport`: a watermark for a whole conversation, keyed by it.
pub fn read_report(ctx: &Context<'_>, body: &Object<'_>) -> Result<Output, NormalizeError> {
    let b = Obj(body);
    let reader = user(b, "Report_Account")?;
    let peer = user(b, "Peer_Account")?;
    let last_read_time = required("LastReadTime", b.i64("LastReadTime")?)?;
    let conversation = conversation(ctx.sdk_app_id, reader, peer);
    let id = format!(
        "{}:{}:{}#read_report@{last_read_time}",
        ctx.sdk_app_id,
        reader.as_str(),
        peer.as_str()
    );
    let received_at = received_at(ctx);
    let event_time_ms = b.i64("EventTime")?;
    let record = ReadReport {
        common: common(ctx, &id, READ_REPORT_SCHEMA, Relayed::AfterMsgReport),
        conversation: &conversation,
        report_account: reader,
        peer_account: peer,
        last_read_time,
        unread_msg_num: b.i64("UnreadMsgNum")?,
        event_time_ms,
        arrival: arrival(ctx, &received_at),
        extra: b.extra(READ_REPORT_FIELDS),
    };
    let made = Made {
        target: Target::ReadReports,
        id: id.clone(),
        key: conversation.clone(),
        event_type: READ_REPORT_TYPE,
        command: Relayed::AfterMsgReport,
        event_time_ms,
        received_at: &received_at,
        untyped_elements: 0,
    };
    Ok(made.output(ctx, &record))
}

/// `GroupReadInfo` is read and left out: the group part is not a one-to-one fact.
const READ_ALL_FIELDS: &[&str] = &[
    "CallbackCommand",
    "Report_Account",
    "EventTime",
    "GroupReadInfo",
];

/// `C2C.CallbackAfterMsgReadAll`: a reader cleared every unread message — a watermark over all
/// of the reader's one-to-one conversations, keyed by the reader.
pub fn read_all(ctx: &Context<'_>, body: &Object<'_>) -> Result<Output, NormalizeError> {
    let b = Obj(body);
    let reader = user(b, "Report_Account")?;
    let received_at = received_at(ctx);
    let event_time_ms = b.i64("EventTime")?;
    // Without EventTime, its arrival tells copies apart (a retry is then a second mark at
    // nearly the same time: harmless, the latest counts).
    let at = event_time_ms.map_or_else(|| format!("r{received_at}"), |t| t.to_string());
    let key = format!("{}:{}", ctx.sdk_app_id, reader.as_str());
    let id = format!("{key}#read_all@{at}");
    let record = ReadAll {
        common: common(ctx, &id, READ_ALL_SCHEMA, Relayed::AfterMsgReadAll),
        report_account: reader,
        event_time_ms,
        arrival: arrival(ctx, &received_at),
        extra: b.extra(READ_ALL_FIELDS),
    };
    let made = Made {
        target: Target::ReadReports,
        id: id.clone(),
        key,
        event_type: READ_ALL_TYPE,
        command: Relayed::AfterMsgReadAll,
        event_time_ms,
        received_at: &received_at,
        untyped_elements: 0,
    };
    Ok(made.output(ctx, &record))
}

const READ_RECEIPT_FIELDS: &[&str] = &[
    "CallbackCommand",
    "Operator_Account",
    "Peer_Account",
    "C2CMsgInfo",
    "EventTime",
];
const MSG_INFO_FIELDS: &[&str] = &["From_Account", "To_Account", "MsgKey", "MsgId"];

/// `C2C.CallbackAfterMsgReadReceipt`: one record per message it covers, each keyed like that
/// message. A message is read once, so each id is the message's id and `#read_receipt`.
/// An entry that cannot be read does not cost the others theirs: it is set aside with why
/// (the second list); only a receipt none of whose entries can be read is an error.
pub fn read_receipt(
    ctx: &Context<'_>,
    body: &Object<'_>,
) -> Result<(Vec<Output>, Vec<String>), NormalizeError> {
    let b = Obj(body);
    let infos = required("C2CMsgInfo", b.array("C2CMsgInfo")?)?;
    if infos.is_empty() {
        return Err(FieldError {
            field: "C2CMsgInfo",
            problem: Problem::Invalid("must name at least one message".into()),
        });
    }
    let operator = b.str("Operator_Account")?;
    let peer = b.str("Peer_Account")?;
    let event_time_ms = b.i64("EventTime")?;
    let extra = b.extra(READ_RECEIPT_FIELDS);
    let received_at = received_at(ctx);
    let mut out = Vec::with_capacity(infos.len());
    let mut set_aside = Vec::new();
    let mut first_error = None;
    for (n, info) in infos.iter().enumerate() {
        match receipt_entry(
            ctx,
            info,
            operator,
            peer,
            event_time_ms,
            &extra,
            &received_at,
        ) {
            Ok(record) => out.push(record),
            Err(e) => {
                set_aside.push(format!("C2CMsgInfo[{n}]: {e}"));
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if out.is_empty() => Err(e),
        _ => Ok((out, set_aside)),
    }
}

/// One entry of a read receipt's `C2CMsgInfo`.
fn receipt_entry(
    ctx: &Context<'_>,
    info: &Json<'_>,
    operator: Option<&str>,
    peer: Option<&str>,
    event_time_ms: Option<i64>,
    extra: &Extra,
    received_at: &str,
) -> Result<Output, NormalizeError> {
    {
        let Json::Object(info) = info else {
            return Err(FieldError {
                field: "C2CMsgInfo",
                problem: Problem::Invalid("must hold objects only".into()),
            });
        };
        let i = Obj(info);
        let from = user(i, "From_Account")?;
        let to = user(i, "To_Account")?;
        let msg_key = required_msg_key(i)?;
        let conversation = conversation(ctx.sdk_app_id, from, to);
        let message = message_id(&conversation, &msg_key);
        let id = format!("{message}#read_receipt");
        let key = message_key(ctx.key_mode, &msg_key, &conversation);
        let record = ReadReceipt {
            common: common(ctx, &id, READ_RECEIPT_SCHEMA, Relayed::AfterMsgReadReceipt),
            message_id: &message,
            msg_id: i.str("MsgId")?,
            msg_key,
            operator_account: operator,
            peer_account: peer,
            from_account: from,
            to_account: to,
            event_time_ms,
            arrival: arrival(ctx, received_at),
            extra: extra.clone(),
            info_extra: i.extra(MSG_INFO_FIELDS),
        };
        let made = Made {
            target: Target::ReadReceipts,
            id: id.clone(),
            key,
            event_type: READ_RECEIPT_TYPE,
            command: Relayed::AfterMsgReadReceipt,
            event_time_ms,
            received_at,
            untyped_elements: 0,
        };
        Ok(made.output(ctx, &record))
    }
}
