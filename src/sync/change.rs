//! From a record on the topic to the change it makes to the tables. Pure: the record's JSON
//! in, a `Change` out — or why it cannot be applied (it then goes to the dead-letter table).
//!
//! Every change is a *fact* the tables merge in an order-free way (earliest recall, latest
//! edit by `EventTime` then id, earliest read, furthest read mark), so duplicates, redelivery
//! and any arrival order end in the same rows.

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::normalize::{
    EDIT_SCHEMA, READ_ALL_SCHEMA, READ_RECEIPT_SCHEMA, READ_REPORT_SCHEMA, RECALL_SCHEMA,
    SCHEMA as MESSAGE_SCHEMA,
};

/// What kind of record a change came from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    Recall,
    Edit,
    ReadReport,
    ReadReceipt,
    ReadAll,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Message,
        Kind::Recall,
        Kind::Edit,
        Kind::ReadReport,
        Kind::ReadReceipt,
        Kind::ReadAll,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Recall => "recall",
            Kind::Edit => "edit",
            Kind::ReadReport => "read_report",
            Kind::ReadReceipt => "read_receipt",
            Kind::ReadAll => "read_all",
        }
    }
}

/// Which of two contents is the current one: the later `time`, then the greater `id`. A
/// message's own content has time −1, so any edit wins over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub time: i64,
    pub id: String,
}

/// One row's worth of facts about a message; `None` means "says nothing about it".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFacts {
    pub sdk_app_id: i64,
    /// The message's record id (`SdkAppid:min:max:MsgKey`).
    pub id: String,
    pub msg_key: String,
    pub from_account: String,
    pub to_account: String,
    /// The message itself (not only an event about it) was seen.
    pub arrived: bool,
    /// Send time, Unix ms.
    pub msg_time: Option<i64>,
    /// The content as JSON text, byte for byte as in the record.
    pub elements: Option<(String, Version)>,
    /// `CloudCustomData` as JSON text (a string literal, or `null`), byte for byte.
    pub cloud_custom_data: Option<(Option<String>, Version)>,
    pub recalled_at: Option<i64>,
    /// When the edit happened, with the edit's version: the latest edit's wins.
    pub edited_at: Option<(i64, Version)>,
    pub read_at: Option<i64>,
    /// The message's own facts (from its record; events say nothing of them): Tencent's
    /// sequence number (history orders by time, then by it), the send result (0 = delivered,
    /// else the error Tencent gave, e.g. a word filter's), and whether it was online-only (a
    /// typing signal, never in history).
    pub msg_seq: Option<i64>,
    pub send_result: Option<i64>,
    pub online_only: Option<bool>,
}

impl MessageFacts {
    /// The conversation, whichever way the message went: the two accounts in byte order.
    pub fn conversation(&self) -> (&str, &str) {
        let (a, b) = (self.from_account.as_str(), self.to_account.as_str());
        if a.as_bytes() <= b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Message(Box<MessageFacts>),
    /// `reader` has read everything from `peer` up to `last_read_time` (Unix ms).
    ReadMark {
        sdk_app_id: i64,
        reader: String,
        peer: String,
        last_read_time: i64,
    },
    /// `reader` has read every one-to-one message received up to `read_all_time` (Unix ms).
    ReadAll {
        sdk_app_id: i64,
        reader: String,
        read_all_time: i64,
    },
}

/// The fields of every record kind `sync` reads; the rest is ignored.
#[derive(Deserialize)]
struct Wire {
    schema: String,
    id: String,
    sdk_app_id: u64,
    message_id: Option<String>,
    msg_key: Option<String>,
    from_account: Option<String>,
    to_account: Option<String>,
    msg_time: Option<i64>,
    event_time_ms: Option<i64>,
    elements: Option<Box<RawValue>>,
    cloud_custom_data: Option<Box<RawValue>>,
    report_account: Option<String>,
    peer_account: Option<String>,
    last_read_time: Option<i64>,
    received_at: Option<String>,
    msg_seq: Option<i64>,
    send_result: Option<i64>,
    online_only: Option<bool>,
    source: Option<String>,
}

fn need<T>(v: Option<T>, field: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("{field} is missing"))
}

fn millis_of(rfc3339: Option<&str>) -> Option<i64> {
    let t = OffsetDateTime::parse(rfc3339?, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Reads one record's value. `Err` says why it cannot be applied.
pub fn parse(value: &[u8]) -> Result<(Kind, Change), String> {
    let w: Wire = serde_json::from_slice(value).map_err(|e| {
        let e: String = e.to_string().chars().take(200).collect();
        format!("not a record: {e}")
    })?;
    let kind = match w.schema.as_str() {
        // v1 lacks only `source`: records written before the upgrade still apply.
        MESSAGE_SCHEMA | "im-relay.c2c-message.v1" => Kind::Message,
        RECALL_SCHEMA => Kind::Recall,
        EDIT_SCHEMA => Kind::Edit,
        READ_REPORT_SCHEMA => Kind::ReadReport,
        READ_RECEIPT_SCHEMA => Kind::ReadReceipt,
        READ_ALL_SCHEMA => Kind::ReadAll,
        other => {
            let other: String = other.chars().take(64).collect();
            return Err(format!("unknown schema {other:?}"));
        }
    };
    let sdk_app_id = i64::try_from(w.sdk_app_id).map_err(|_| "sdk_app_id out of range")?;
    // When Tencent did not say when the event happened: when it reached the relay.
    let at = w
        .event_time_ms
        .or_else(|| millis_of(w.received_at.as_deref()));
    let change = if kind == Kind::ReadAll {
        Change::ReadAll {
            sdk_app_id,
            reader: need(w.report_account, "report_account")?,
            read_all_time: need(at, "event_time_ms")?,
        }
    } else if kind == Kind::ReadReport {
        let last = need(w.last_read_time, "last_read_time")?;
        Change::ReadMark {
            sdk_app_id,
            reader: need(w.report_account, "report_account")?,
            peer: need(w.peer_account, "peer_account")?,
            last_read_time: last.saturating_mul(1000),
        }
    } else {
        let id = match kind {
            Kind::Message => w.id.clone(),
            _ => need(w.message_id, "message_id")?,
        };
        let mut facts = MessageFacts {
            sdk_app_id,
            id,
            msg_key: need(w.msg_key, "msg_key")?,
            from_account: need(w.from_account, "from_account")?,
            to_account: need(w.to_account, "to_account")?,
            arrived: kind == Kind::Message,
            msg_time: w.msg_time.map(|t| t.saturating_mul(1000)),
            elements: None,
            cloud_custom_data: None,
            recalled_at: None,
            edited_at: None,
            read_at: None,
            msg_seq: None,
            send_result: None,
            online_only: None,
        };
        let raw = |v: Option<Box<RawValue>>| {
            v.map(|r| r.get().to_owned())
                .filter(|text| text.as_str() != "null")
        };
        match kind {
            Kind::Message => {
                facts.msg_seq = w.msg_seq;
                facts.send_result = w.send_result;
                facts.online_only = w.online_only;
                // Tencent's history holds only delivered messages that were not online-only
                // (https://www.tencentcloud.com/document/product/1047/35478): a copy fetched
                // from it says so by being there.
                if w.source.as_deref() == Some("backfill") {
                    facts.send_result = facts.send_result.or(Some(0));
                    facts.online_only = facts.online_only.or(Some(false));
                }
                let own = Version { time: -1, id: w.id };
                let elements = need(raw(w.elements), "elements")?;
                facts.elements = Some((elements, own.clone()));
                facts.cloud_custom_data = Some((raw(w.cloud_custom_data), own));
            }
            Kind::Edit => {
                // An edit without EventTime sorts first; the id breaks ties either way.
                let version = Version {
                    time: w.event_time_ms.unwrap_or(0),
                    id: w.id,
                };
                facts.elements = raw(w.elements).map(|e| (e, version.clone()));
                facts.cloud_custom_data =
                    raw(w.cloud_custom_data).map(|c| (Some(c), version.clone()));
                facts.edited_at = at.map(|at| (at, version));
            }
            Kind::Recall => facts.recalled_at = at,
            Kind::ReadReceipt => facts.read_at = at,
            Kind::ReadReport | Kind::ReadAll => unreachable!("handled above"),
        }
        Change::Message(Box::new(facts))
    };
    if change.texts().any(|t| t.contains('\0')) {
        // Legal in JSON, refused by PostgreSQL's text: the record is kept aside, not cut.
        return Err("a text field holds a NUL character".into());
    }
    Ok((kind, change))
}

impl Change {
    /// Every text the change would store (JSON text holds NUL only escaped).
    fn texts(&self) -> impl Iterator<Item = &str> {
        let v: Vec<&str> = match self {
            Change::Message(f) => vec![&f.id, &f.msg_key, &f.from_account, &f.to_account],
            Change::ReadMark { reader, peer, .. } => vec![reader, peer],
            Change::ReadAll { reader, .. } => vec![reader],
        };
        v.into_iter()
    }
}
