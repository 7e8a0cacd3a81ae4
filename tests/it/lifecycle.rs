//! A message's whole life — send, edit, recall, read report, read receipt — relayed through
//! real HTTP into a real broker, each as its own kind of record, keyed like its message; and
//! the commands the relay answers without publishing.

use std::collections::BTreeMap;

use crate::common::*;
use im_relay::record::Target;
use serde_json::{Value, json};

const SEND: &str = "C2C.CallbackAfterSendMsg";
const RECALL: &str = "C2C.CallbackAfterMsgWithDraw";
const EDIT: &str = "C2C.CallbackAfterModifyMsg";
const REPORT: &str = "C2C.CallbackAfterMsgReport";
const RECEIPT: &str = "C2C.CallbackAfterMsgReadReceipt";
const READ_ALL: &str = "C2C.CallbackAfterMsgReadAll";

/// One message from alice to bob, and the bodies of everything that happens to it.
pub struct Life {
    pub send: String,
    pub other_send: String,
    pub edit: String,
    pub later_edit: String,
    pub recall: String,
    pub report: String,
    pub receipt: String,
    pub read_all: String,
}

pub fn life(key: &str) -> Life {
    let other = format!("{key}-2");
    let send = |k: &str, text: &str| {
        json!({
            "CallbackCommand": SEND, "From_Account": "alice", "To_Account": "bob",
            "MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1_700_000_000, "MsgKey": k,
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}],
            "CloudCustomData": "v0",
        })
        .to_string()
    };
    let edit = |at: i64, text: &str| {
        json!({
            "CallbackCommand": EDIT, "Operator_Account": "alice",
            "From_Account": "alice", "To_Account": "bob", "MsgKey": key,
            "MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1_700_000_000, "EventTime": at,
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": text}}],
            "CloudCustomData": format!("v{at}"),
        })
        .to_string()
    };
    Life {
        send: send(key, "hello"),
        other_send: send(&other, "second"),
        edit: edit(1_700_000_100_000, "hello, edited"),
        later_edit: edit(1_700_000_200_000, "hello, edited twice"),
        recall: json!({
            "CallbackCommand": RECALL, "From_Account": "alice", "To_Account": "bob",
            "MsgKey": key, "UnreadMsgNum": 0, "EventTime": 1_700_000_300_000i64,
        })
        .to_string(),
        report: json!({
            "CallbackCommand": REPORT, "Report_Account": "bob", "Peer_Account": "alice",
            "LastReadTime": 1_700_000_050, "UnreadMsgNum": 0, "EventTime": 1_700_000_050_000i64,
        })
        .to_string(),
        receipt: json!({
            "CallbackCommand": RECEIPT, "Operator_Account": "bob", "Peer_Account": "alice",
            "C2CMsgInfo": [
                {"From_Account": "alice", "To_Account": "bob", "MsgKey": key},
                {"From_Account": "alice", "To_Account": "bob", "MsgKey": other},
            ],
            "EventTime": 1_700_000_060_000i64,
        })
        .to_string(),
        read_all: json!({
            "CallbackCommand": READ_ALL, "Report_Account": "bob",
            "EventTime": 1_700_000_070_000i64,
            "GroupReadInfo": [{"GroupId": "@TGS#1", "MsgSeq": 3}],
        })
        .to_string(),
    }
}

/// Posts every event of `life` (the recall and an edit before the message itself, retried
/// duplicates, a before-send callback); each is answered `OK`.
pub async fn post_life(app: &TestApp, l: &Life) {
    let before_send =
        json!({"CallbackCommand": "C2C.CallbackBeforeSendMsg", "From_Account": "alice",
        "To_Account": "bob", "MsgBody": []})
        .to_string();
    for (command, body) in [
        (RECALL, &l.recall),
        (EDIT, &l.later_edit),
        ("C2C.CallbackBeforeSendMsg", &before_send),
        (SEND, &l.send),
        (SEND, &l.other_send),
        (EDIT, &l.edit),
        (EDIT, &l.edit),
        (REPORT, &l.report),
        (RECEIPT, &l.receipt),
        (RECEIPT, &l.receipt),
        (READ_ALL, &l.read_all),
        (READ_ALL, &l.read_all),
        (RECALL, &l.recall),
    ] {
        assert_eq!(
            app.post_command(command, body).await,
            (200, ok_body()),
            "{command}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_s_whole_life_reaches_kafka_keyed_like_the_message() {
    let broker = Broker::start();
    let recalls = format!("im.c2c.recalls-{}", unique());
    broker.create_topic(&recalls).await;
    // Its own process: the metric counts below are exact.
    let app = spawn_process_app(&broker, &[("IM_RELAY_RECALL_TOPIC", recalls.as_str())]).await;
    let l = life("m1");
    post_life(&app, &l).await;

    // Two messages, two edits, a read report, a receipt per message, a read-all; duplicates
    // not again.
    let records = app.records(8).await;
    let mut by_id: BTreeMap<String, &Received> = BTreeMap::new();
    for r in &records {
        assert_schema_valid(&r.value);
        assert_eq!(r.headers["ce_id"], r.value["id"].as_str().unwrap());
        assert_eq!(r.headers["im_sdk_app_id"], "1400000000");
        assert_eq!(r.value["source"], "callback");
        by_id.insert(r.headers["ce_id"].clone(), r);
    }
    let message = "1400000000:alice:bob:m1";
    let ids: Vec<&str> = by_id.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            message.to_owned(),
            format!("{message}#edit@1700000100000"),
            format!("{message}#edit@1700000200000"),
            format!("{message}#read_receipt"),
            format!("{message}-2"),
            format!("{message}-2#read_receipt"),
            "1400000000:bob#read_all@1700000070000".to_owned(),
            // The reader first: app, reader, peer, LastReadTime.
            "1400000000:bob:alice#read_report@1700000050".to_owned(),
        ]
    );
    // The message's own events share its key, so its partition.
    for id in [
        message.to_owned(),
        format!("{message}#edit@1700000100000"),
        format!("{message}#read_receipt"),
    ] {
        let r = by_id[id.as_str()];
        assert_eq!(r.key, "m1", "{id}");
        assert_eq!(r.partition, by_id[message].partition, "{id}");
    }
    let edit = by_id[format!("{message}#edit@1700000100000").as_str()];
    assert_eq!(edit.value["message_id"], message);
    assert_eq!(edit.headers["im_callback_command"], EDIT);
    assert_eq!(
        edit.headers["ce_type"],
        "com.tencent.im.c2c.after_modify_msg.v1"
    );
    assert_eq!(edit.value["elements"][0]["text"], "hello, edited");
    let report = by_id["1400000000:bob:alice#read_report@1700000050"];
    assert_eq!(report.key, "1400000000:alice:bob");
    assert_eq!(report.value["last_read_time"], 1_700_000_050);
    let all = by_id["1400000000:bob#read_all@1700000070000"];
    assert_eq!(all.key, "1400000000:bob");
    assert_eq!(all.value["event_time_ms"], 1_700_000_070_000i64);
    assert_eq!(
        all.headers["ce_type"],
        "com.tencent.im.c2c.after_msg_read_all.v1"
    );

    // The recall went to its own topic, and nothing else did (read back by ce_id: tansu
    // keeps an idempotent producer's retries twice; the dedup window is asserted in process).
    let recalled = app.records_in(&recalls, 1).await;
    for r in &recalled {
        assert_eq!(r.headers["ce_id"], format!("{message}#recall"));
    }
    let r = &recalled[0];
    assert_schema_valid(&r.value);
    assert_eq!(r.value["id"], format!("{message}#recall"));
    assert_eq!(r.value["message_id"], message);
    assert_eq!(r.key, "m1");
    assert_eq!(r.headers["im_callback_command"], RECALL);

    let metrics = app.metrics().await;
    for (command, n) in [
        ("c2c_after_send_msg", 2),
        ("c2c_after_modify_msg", 2),
        ("c2c_after_msg_withdraw", 1),
        ("c2c_after_msg_report", 1),
        ("c2c_after_msg_read_receipt", 2),
        ("c2c_after_msg_read_all", 1),
    ] {
        let series = format!("im_relay_records_accepted_total{{command=\"{command}\"}} {n}");
        assert!(metrics.contains(&series), "missing {series}");
    }
}

#[tokio::test]
async fn commands_not_chosen_are_answered_ok_and_never_spooled() {
    let app = InProcess::new(&[("IM_RELAY_RELAY_COMMANDS", SEND)]);
    let l = life("m2");
    for (command, body) in [
        (RECALL, &l.recall),
        (EDIT, &l.edit),
        (REPORT, &l.report),
        (RECEIPT, &l.receipt),
        (READ_ALL, &l.read_all),
    ] {
        assert_eq!(app.post_command(command, body).await, (200, ok_body()));
    }
    assert!(app.spooled().is_empty(), "{:?}", app.spooled());
    assert_eq!(app.post_command(SEND, &l.send).await, (200, ok_body()));
    assert_eq!(app.spooled().len(), 1);
}

#[tokio::test]
async fn a_read_receipt_is_spooled_as_one_record_per_message_in_one_write() {
    let app = InProcess::new(&[]);
    let l = life("m3");
    assert_eq!(
        app.post_command(RECEIPT, &l.receipt).await,
        (200, ok_body())
    );
    let spooled = app.spooled();
    assert_eq!(spooled.len(), 2);
    for r in &spooled {
        assert_eq!(r.target, Target::ReadReceipts);
        let value: Value = serde_json::from_slice(&r.value).unwrap();
        assert_schema_valid(&value);
    }
    let keys: Vec<&[u8]> = spooled.iter().filter_map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, [&b"m3"[..], b"m3-2"]);
    // Retried: nothing new.
    assert_eq!(
        app.post_command(RECEIPT, &l.receipt).await,
        (200, ok_body())
    );
    assert_eq!(app.spooled().len(), 2);
}

#[test]
fn an_unknown_relay_command_is_refused_at_start() {
    let env: std::collections::HashMap<&str, &str> = [
        ("IM_RELAY_SDK_APP_ID", "1400000000"),
        ("IM_RELAY_TOKEN", "t"),
        (
            "IM_RELAY_RELAY_COMMANDS",
            "C2C.CallbackAfterSendMsg,C2C.CallbackBeforeSendMsg",
        ),
    ]
    .into();
    let err = im_relay::config::Config::load(None, &|k| env.get(k).map(|v| v.to_string()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("relay_commands") && err.contains("C2C.CallbackBeforeSendMsg"),
        "{err}"
    );
}

#[tokio::test]
async fn a_receipt_naming_a_message_twice_spools_it_once() {
    let app = InProcess::new(&[]);
    let info = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": "m4"});
    let body = json!({"Operator_Account": "bob", "Peer_Account": "alice",
                      "C2CMsgInfo": [info, info], "EventTime": 1})
    .to_string();
    assert_eq!(app.post_command(RECEIPT, &body).await, (200, ok_body()));
    assert_eq!(app.spooled().len(), 1);
}

/// A read receipt with one entry that cannot be read: the others are relayed, the bad one is
/// quarantined (the raw body, with which entry and why) in the same write, and Tencent gets
/// `OK` — before, the whole receipt was refused with 400 and every read in it lost.
#[tokio::test]
async fn a_receipt_s_good_entries_are_relayed_and_its_bad_one_quarantined() {
    let app = InProcess::new(&[]);
    let good = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": "m5"});
    let bad = json!({"From_Account": "alice", "To_Account": "bob"});
    let body = json!({"Operator_Account": "bob", "Peer_Account": "alice",
                      "C2CMsgInfo": [good, bad], "EventTime": 1})
    .to_string();
    assert_eq!(app.post_command(RECEIPT, &body).await, (200, ok_body()));
    let spooled = app.spooled();
    assert_eq!(spooled.len(), 2, "{spooled:?}");
    assert_eq!(spooled[0].target, im_relay::record::Target::ReadReceipts);
    assert_eq!(spooled[0].key.as_deref(), Some(&b"m5"[..]));
    assert_eq!(spooled[1].target, im_relay::record::Target::Quarantine);
    let reason = spooled[1]
        .headers
        .iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        reason.contains("C2CMsgInfo[1]: MsgKey is missing"),
        "{reason}"
    );
}
