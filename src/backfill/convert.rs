//! A REST message as the records the relay would have made of its callback.

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::domain::{Relayed, SdkAppId};
use crate::json::Object;
use crate::normalize::{self, Context, Obj, Output};

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
pub(super) fn records(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Target;
    use serde_json::json;

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

#[cfg(test)]
mod fixture {
    use super::*;
    use crate::record::Target;

    /// What a callback carries and Tencent's REST history does not, so a backfilled record
    /// cannot know (`null` there; docs/backfill.md lists them): the send's outcome
    /// (`SendMsgResult`, `ErrorInfo`, and `delivered` from them), `OnlineOnlyFlag`, `MsgId`,
    /// `EventTime`, `UnreadMsgNum`; and the source (the arrival, `received_at`, differs by
    /// nature and is left out of the comparison).
    const UNKNOWABLE: &[&str] = &[
        "delivered",
        "error_info",
        "event_time_ms",
        "msg_id",
        "online_only",
        "send_result",
        "source",
        "unread_msg_num",
    ];

    /// The record backfill makes of a message equals, field for field that it can know, the
    /// one the relay made of the real callback (Tencent's documented sample) of the same
    /// message — not a callback rebuilt from the REST message.
    #[test]
    fn a_backfilled_record_equals_the_real_callback_s_but_for_what_history_lacks() {
        let text = include_str!("../../tests/fixtures/doc_sample.json");
        let callback: Map<String, Value> = serde_json::from_str(text).unwrap();
        let app = SdkAppId::from(1400000000);
        let ctx = Context {
            sdk_app_id: app,
            client_ip: Some("203.0.113.7"),
            opt_platform: Some("iOS"),
            received_at: OffsetDateTime::now_utc(),
            key_mode: normalize::KeyMode::MsgKey,
            source: normalize::Source::Callback,
        };
        let relayed =
            normalize::normalize(&ctx, Relayed::AfterSendMsg, &Object::from_map(&callback))
                .unwrap();
        // The same message as `get_history` / `admin_getroammsg` hold it (the spec's fields).
        let mut rest = Map::new();
        for field in [
            "From_Account",
            "To_Account",
            "MsgSeq",
            "MsgRandom",
            "MsgKey",
            "MsgBody",
            "CloudCustomData",
        ] {
            rest.insert(field.into(), callback[field].clone());
        }
        rest.insert("MsgTimeStamp".into(), callback["MsgTime"].clone());
        rest.insert("MsgFlagBits".into(), 0.into());
        rest.insert("IsPeerRead".into(), 0.into());
        rest.insert("ClientIP".into(), "203.0.113.7".into());
        rest.insert("MsgFromPlatform".into(), "iOS".into());
        let (_, backfilled) = records(app, normalize::KeyMode::MsgKey, &rest).unwrap();
        assert_eq!(backfilled.len(), 1);
        assert_eq!(relayed[0].target, Target::Messages);
        let (a, b) = (&relayed[0], &backfilled[0]);
        assert_eq!((&a.id, &a.key, a.target), (&b.id, &b.key, b.target));
        let value = |o: &Output| -> Map<String, Value> {
            let mut v: Map<String, Value> = serde_json::from_slice(&o.value).unwrap();
            assert!(v.remove("received_at").is_some());
            v
        };
        let (a, b) = (value(a), value(b));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let differ: Vec<&str> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(String::as_str)
            .collect();
        assert_eq!(differ, UNKNOWABLE, "relayed {a:?}\nbackfilled {b:?}");
    }
}
