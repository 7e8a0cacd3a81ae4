//! The sync's merge rules through the real SQLite code: any order, any duplication and any
//! batching of a conversation's records end in the same tables as the in-order stream.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use time::macros::datetime;

use super::change::{self, Change, Kind};
use super::store::{self, DeadLetter, Item};
use crate::config::Database;
use crate::domain::{Relayed, SdkAppId};
use crate::normalize::{self, Context, KeyMode, Source};

fn ctx() -> Context<'static> {
    ctx_at(datetime!(2026-11-28 01:00:00.5 UTC))
}

fn ctx_at(received_at: time::OffsetDateTime) -> Context<'static> {
    Context {
        sdk_app_id: SdkAppId::from(1400000000),
        client_ip: None,
        opt_platform: None,
        received_at,
        key_mode: KeyMode::MsgKey,
        source: Source::Callback,
    }
}

fn body(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// Record values, as the relay makes them, for a conversation's whole life.
pub fn conversation() -> Vec<Vec<u8>> {
    let text = |t: &str| json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": t}}]);
    let send = |key: &str, t: &str| {
        json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": key,
               "MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1_700_000_000, "MsgBody": text(t),
               "CloudCustomData": "v0"})
    };
    let edit = |key: &str, at: Option<i64>, t: Option<&str>, ccd: Option<&str>| {
        let mut b = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": key,
                           "MsgTime": 1_700_000_000});
        if let Some(at) = at {
            b["EventTime"] = json!(at);
        }
        if let Some(t) = t {
            b["MsgBody"] = text(t);
        }
        if let Some(c) = ccd {
            b["CloudCustomData"] = json!(c);
        }
        b
    };
    let calls = [
        (Relayed::AfterSendMsg, send("a", "hello")),
        (Relayed::AfterSendMsg, send("b", "sec\u{0}ond")),
        (
            Relayed::AfterModifyMsg,
            edit("a", Some(200), Some("a v2"), None),
        ),
        (
            Relayed::AfterModifyMsg,
            edit("a", Some(300), None, Some("c3")),
        ),
        // Two different edits in one millisecond share an id: the content breaks the tie.
        (
            Relayed::AfterModifyMsg,
            edit("a", Some(300), Some("a v3 tie"), None),
        ),
        (
            Relayed::AfterModifyMsg,
            edit("a", Some(300), Some("a v3 other"), None),
        ),
        (
            Relayed::AfterModifyMsg,
            edit("a", None, Some("timeless"), None),
        ),
        (
            Relayed::AfterModifyMsg,
            edit("c", Some(50), Some("edited before sent"), None),
        ),
        (
            Relayed::AfterMsgWithDraw,
            json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": "b", "EventTime": 400}),
        ),
        (
            Relayed::AfterMsgWithDraw,
            json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": "never-seen"}),
        ),
        (
            Relayed::AfterMsgReadReceipt,
            json!({"Operator_Account": "bob", "Peer_Account": "alice", "EventTime": 500,
                   "C2CMsgInfo": [
                       {"From_Account": "alice", "To_Account": "bob", "MsgKey": "a"},
                       {"From_Account": "alice", "To_Account": "bob", "MsgKey": "b"}]}),
        ),
        (
            Relayed::AfterMsgReport,
            json!({"Report_Account": "bob", "Peer_Account": "alice", "LastReadTime": 1_700_000_100}),
        ),
        (
            Relayed::AfterMsgReport,
            json!({"Report_Account": "bob", "Peer_Account": "alice", "LastReadTime": 1_700_000_050}),
        ),
        (Relayed::AfterSendMsg, send("c", "original c")),
        (Relayed::AfterSendMsg, send("d", "original d")),
    ];
    let mut values: Vec<Vec<u8>> = calls
        .into_iter()
        .flat_map(|(command, b)| normalize::normalize_map(&ctx(), command, &body(b)).unwrap())
        .map(|out| out.value)
        .collect();
    // One edit without EventTime, relayed twice at different times (a retry past the dedup
    // window): the earliest arrival is its time, whatever the order.
    for at in [
        datetime!(2026-11-28 01:00:07 UTC),
        datetime!(2026-11-28 01:00:03 UTC),
    ] {
        let b = body(edit("d", None, Some("d edited"), None));
        let out = normalize::normalize_map(&ctx_at(at), Relayed::AfterModifyMsg, &b).unwrap();
        values.push(out[0].value.clone());
    }
    values
}

fn changes(values: &[Vec<u8>]) -> Vec<Item> {
    values
        .iter()
        .map(|v| Item::Change(change::parse(v).expect("a record sync reads").1))
        .collect()
}

/// Every table's rows, in a stable order.
fn dump(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut out = Vec::new();
    for q in [
        "SELECT * FROM messages ORDER BY sdk_app_id, id",
        "SELECT * FROM read_marks ORDER BY sdk_app_id, reader, peer",
    ] {
        let mut stmt = conn.prepare(q).unwrap();
        // `updated_at` is when a row was last written: not a fact of the records.
        let keep: Vec<usize> = (0..stmt.column_count())
            .filter(|&i| stmt.column_name(i).unwrap() != "updated_at")
            .collect();
        let rows = stmt
            .query_map([], |r| {
                let cols: Vec<String> = keep
                    .iter()
                    .map(|&i| match r.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Text(t) => {
                            format!("Text({:?})", String::from_utf8_lossy(t))
                        }
                        other => format!("{other:?}"),
                    })
                    .collect();
                Ok(cols.join(" | "))
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

fn applied(batches: &[Vec<Item>]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sync.db");
    let mut store = store::open(&Database::Sqlite(path.clone())).unwrap();
    for b in batches {
        store.apply(b).unwrap();
    }
    drop(store);
    dump(&path)
}

#[test]
fn the_in_order_stream_gives_the_conversation_s_true_state() {
    let rows = applied(&[changes(&conversation())]);
    let text = rows.join("\n");
    // a: latest edit by EventTime, a tie at 300 broken by id; its custom data from the one
    // edit that carried some; read by the receipt.
    let a = rows.iter().find(|r| r.contains("alice:bob:a\"")).unwrap();
    assert!(
        a.contains(r#"[{\"type\":\"text\",\"text\":\"a v3 tie\"}]"#),
        "{a}"
    );
    assert!(a.contains(r#"Text("\"c3\"")"#), "{a}");
    assert!(a.contains("Integer(500)"), "{a}");
    // b: the NUL of its text is JSON-escaped text, storable anywhere; recalled. c: edited
    // before it was sent, the edit still wins. never-seen: a tombstone, not arrived.
    let b = rows.iter().find(|r| r.contains("alice:bob:b\"")).unwrap();
    assert!(b.contains(r#"sec\\u0000ond"#), "{b}");
    assert!(b.contains("Integer(400)"), "{b}");
    // d: edited without EventTime, seen twice: the earlier arrival (01:00:03).
    let d = rows.iter().find(|r| r.contains("alice:bob:d\"")).unwrap();
    assert!(
        d.contains("d edited") && d.contains("Integer(1795827603000)"),
        "{d}"
    );
    let c = rows.iter().find(|r| r.contains("alice:bob:c\"")).unwrap();
    assert!(c.contains("edited before sent"), "{c}");
    let never = rows.iter().find(|r| r.contains("never-seen")).unwrap();
    assert!(never.contains("Integer(0)"), "{never}");
    // The read mark only moved forward.
    assert!(text.contains("Integer(1700000100000)"), "{text}");
    assert!(!text.contains("Integer(1700000050000)"), "{text}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_order_duplication_and_batching_ends_in_the_same_tables(
        order in Just((0..conversation().len()).collect::<Vec<_>>()).prop_shuffle(),
        again in prop::collection::vec(0..18usize, 0..12),
        cuts in prop::collection::vec(1..6usize, 1..8),
    ) {
        let values = conversation();
        let expected = applied(&[changes(&values)]);
        let mut stream: Vec<Vec<u8>> = order.iter().map(|i| values[*i].clone()).collect();
        for i in again {
            let v = values[i % values.len()].clone();
            let at = i % (stream.len() + 1);
            stream.insert(at, v);
        }
        let items = changes(&stream);
        let mut batches = Vec::new();
        let mut rest = &items[..];
        for n in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at((*n).min(rest.len()));
            batches.push(head.to_vec());
            rest = tail;
        }
        // A redelivered batch, applied twice.
        batches.push(batches[0].clone());
        prop_assert_eq!(applied(&batches), expected);
    }
}

#[test]
fn what_sync_cannot_apply_says_why() {
    assert!(
        change::parse(b"not json")
            .unwrap_err()
            .starts_with("not a record")
    );
    let other = br#"{"schema":"someone-else.v1","id":"x","sdk_app_id":1}"#;
    assert_eq!(
        change::parse(other).unwrap_err(),
        r#"unknown schema "someone-else.v1""#
    );
    // What a dead letter says is text PostgreSQL can store.
    let nul = br#"{"schema":"\u0000x","id":"x","sdk_app_id":1}"#;
    assert!(!change::parse(nul).unwrap_err().contains('\0'));
    // Records written before `source` existed (v1) still apply.
    let v1 = br#"{"schema":"im-relay.c2c-message.v1","id":"1:a:b:k","sdk_app_id":1,
        "msg_key":"k","from_account":"a","to_account":"b","elements":[]}"#;
    assert_eq!(change::parse(v1).unwrap().0, Kind::Message);
    // A NUL in an account: legal JSON, refused by PostgreSQL's text — kept aside.
    let out = normalize::normalize_map(
        &ctx(),
        Relayed::AfterMsgWithDraw,
        &body(json!({"From_Account": "al\u{0}ice", "To_Account": "bob", "MsgKey": "k"})),
    )
    .unwrap();
    assert_eq!(
        change::parse(&out[0].value).unwrap_err(),
        "a text field holds a NUL character"
    );
    // The elements are kept byte for byte as the record spells them.
    let send = normalize::normalize_map(
        &ctx(),
        Relayed::AfterSendMsg,
        &body(
            json!({"From_Account": "a", "To_Account": "b", "MsgKey": "k",
                     "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "é\u{1}"}}]}),
        ),
    )
    .unwrap();
    let (kind, Change::Message(facts)) = change::parse(&send[0].value).unwrap() else {
        panic!("a message")
    };
    assert_eq!(kind, Kind::Message);
    let record = String::from_utf8(send[0].value.clone()).unwrap();
    let elements = facts.elements.unwrap().0;
    assert!(
        record.contains(&format!("\"elements\":{elements}")),
        "{record}"
    );
    assert_eq!(elements, r#"[{"type":"text","text":"é\u0001"}]"#);
}

/// Another application's `read_marks` in the file: a stop with the reason, not a retry loop;
/// the file is left as it was. A second open of sync's own file migrates nothing again.
#[test]
fn a_table_of_the_same_name_that_is_not_syncs_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE read_marks (x TEXT)")
        .unwrap();
    let err = match store::open(&Database::Sqlite(path.clone())) {
        Err(e) => e,
        Ok(_) => panic!("opened a file whose read_marks is not sync's"),
    };
    assert!(err.fatal, "{}", err.message);
    assert!(
        err.message
            .contains("`read_marks` exists but is not im-relay's"),
        "{}",
        err.message
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let ours: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'messages'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(ours, 0, "nothing made beside it");

    let own = dir.path().join("own.db");
    drop(store::open(&Database::Sqlite(own.clone())).unwrap());
    assert!(
        store::open(&Database::Sqlite(own)).is_ok(),
        "its own tables are no clash"
    );
}

/// The message's own facts get columns of their own: a message Tencent's word filter stopped
/// (`SendMsgResult` ≠ 0) and a typing signal (`OnlineOnlyFlag: 1`) are told apart from history,
/// the sequence number orders a second's messages, and both directions of a conversation share
/// `conv_low`/`conv_high` (byte order). Before: none of these columns existed.
#[test]
fn delivery_status_online_only_sequence_and_conversation_are_columns() {
    let text = json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]);
    let send = |from: &str, to: &str, key: &str, seq: i64, result: i64, online: i64| {
        json!({"From_Account": from, "To_Account": to, "MsgKey": key, "MsgSeq": seq,
               "MsgRandom": 1, "MsgTime": 1_700_000_000, "MsgBody": text,
               "SendMsgResult": result, "OnlineOnlyFlag": online})
    };
    let values: Vec<Vec<u8>> = [
        send("zoe", "adam", "k1", 7, 0, 0),
        send("adam", "zoe", "k2", 8, 80001, 0),
        send("zoe", "adam", "k3", 9, 0, 1),
    ]
    .into_iter()
    .flat_map(|b| normalize::normalize_map(&ctx(), Relayed::AfterSendMsg, &body(b)).unwrap())
    .map(|out| out.value)
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sync.db");
    let mut store = store::open(&Database::Sqlite(path.clone())).unwrap();
    store.apply(&changes(&values)).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT msg_key, msg_seq, send_result, online_only, conv_low, conv_high, \
             updated_at IS NOT NULL FROM messages ORDER BY msg_key",
        )
        .unwrap();
    let rows: Vec<(String, i64, i64, i64, String, String, bool)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let row = |k: &str, seq, result, online| {
        (
            k.to_owned(),
            seq,
            result,
            online,
            "adam".to_owned(),
            "zoe".to_owned(),
            true,
        )
    };
    assert_eq!(
        rows,
        vec![
            row("k1", 7, 0, 0),
            row("k2", 8, 80001, 0),
            row("k3", 9, 0, 1)
        ]
    );
}

/// A copy fetched from Tencent's history (`source: backfill`) has no send result or online
/// flag, but history holds only delivered messages that were not online-only: it says so.
#[test]
fn a_backfilled_copy_counts_as_delivered_and_not_online_only() {
    let b = body(
        json!({"From_Account": "a", "To_Account": "b", "MsgKey": "k", "MsgSeq": 3,
        "MsgRandom": 1, "MsgTime": 1_700_000_000,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
    );
    let mut ctx = ctx();
    ctx.source = Source::Backfill;
    let out = normalize::normalize_map(&ctx, Relayed::AfterSendMsg, &b).unwrap();
    let (_, Change::Message(facts)) = change::parse(&out[0].value).unwrap() else {
        panic!("a message")
    };
    assert_eq!(
        (facts.send_result, facts.online_only),
        (Some(0), Some(false))
    );
}

/// A database made before these columns: migration 2 adds them and fills the conversation of
/// the rows already there.
#[test]
fn an_older_database_gains_the_columns_with_its_rows_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE im_relay_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
             applied_at BIGINT NOT NULL)",
        )
        .unwrap();
        let (version, name, sql) = store::MIGRATIONS[0];
        conn.execute_batch(&sql.replace("{bytes}", "BLOB")).unwrap();
        conn.execute(
            "INSERT INTO im_relay_migrations VALUES (?1, ?2, 0)",
            rusqlite::params![version, name],
        )
        .unwrap();
        conn.execute_batch(
            "INSERT INTO messages (sdk_app_id, id, msg_key, from_account, to_account, arrived) \
             VALUES (1, '1:bob:carol:k', 'k', 'carol', 'bob', 1)",
        )
        .unwrap();
    }
    drop(store::open(&Database::Sqlite(path.clone())).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let conv: (String, String) = conn
        .query_row("SELECT conv_low, conv_high FROM messages", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(conv, ("bob".to_owned(), "carol".to_owned()));
}

/// A broker that can delete records, as far as the gap decision sees one: no broker here can
/// (tansu's `delete_records` is unimplemented; the mock cluster has none).
struct FakeWatermarks(std::collections::BTreeMap<(String, i32), i64>);

impl super::Watermarks for FakeWatermarks {
    fn low(&self, topic: &str, partition: i32) -> Result<i64, String> {
        self.0
            .get(&(topic.to_owned(), partition))
            .copied()
            .ok_or_else(|| "unknown partition".into())
    }
}

#[test]
fn records_a_partition_did_not_deliver_are_told_apart_by_the_log_start() {
    use super::{Skip, skipped};
    let t = |p: i32| ("im.c2c".to_owned(), p);
    // Partition 0's log starts at 40, partition 1's at 0, partition 2's is unknown.
    let broker = FakeWatermarks([(t(0), 40), (t(1), 0)].into());
    let skip = |partition, from, to, reason| Skip {
        topic: "im.c2c".into(),
        partition,
        from,
        to,
        reason,
    };
    let gaps = |p: i32, expected, seen| vec![(t(p).0, p, expected, seen)];
    // Retention overtook the position (15): 15..40 deleted, and 40..42 not delivered.
    assert_eq!(
        skipped(&gaps(0, 15, 42), &broker),
        [skip(0, 15, 40, "deleted"), skip(0, 40, 42, "not_delivered")]
    );
    // Deleted up to the first record seen: nothing else.
    assert_eq!(
        skipped(&gaps(0, 15, 40), &broker),
        [skip(0, 15, 40, "deleted")]
    );
    // Above the log start: compaction, markers, unreadable records.
    assert_eq!(
        skipped(&gaps(1, 15, 18), &broker),
        [skip(1, 15, 18, "not_delivered")]
    );
    // The log start unknown: counted all the same.
    assert_eq!(
        skipped(&gaps(2, 5, 7), &broker),
        [skip(2, 5, 7, "not_delivered")]
    );
}

#[test]
fn a_database_is_one_group_s_and_one_topic_set_s() {
    use store::{Claim, Owner};
    let dir = tempfile::tempdir().unwrap();
    let db = Database::Sqlite(dir.path().join("sync.db"));
    let owner = |group: &str, topics: &str| Owner {
        group: group.into(),
        topics: topics.into(),
    };
    let mut store = store::open(&db).unwrap();
    assert_eq!(store.claim(&owner("g", "a,b")).unwrap(), Claim::New);
    assert_eq!(store.claim(&owner("g", "a,b")).unwrap(), Claim::Ours);
    for other in [owner("h", "a,b"), owner("g", "a")] {
        let e = store.claim(&other).unwrap_err();
        assert!(
            e.fatal
                && e.message
                    .contains("belongs to consumer group `g` reading [a,b]"),
            "{e}"
        );
    }
    // Positions are the database's, written with the rows; the latest write holds.
    let at = |group: &str, next| {
        Item::Offset(store::Position {
            group: group.into(),
            topic: "a".into(),
            partition: 0,
            next,
        })
    };
    store.apply(&[at("g", 5)]).unwrap();
    store.apply(&[at("g", 9)]).unwrap();
    assert_eq!(store.positions().unwrap(), vec![("a".to_owned(), 0, 9)]);
    // Moved on purpose to another group: it keeps where it stands.
    let conn = rusqlite::Connection::open(dir.path().join("sync.db")).unwrap();
    conn.execute("DELETE FROM im_relay_owner", []).unwrap();
    assert_eq!(store.claim(&owner("h", "a,b")).unwrap(), Claim::New);
    assert_eq!(store.positions().unwrap(), vec![("a".to_owned(), 0, 9)]);
    store.apply(&[at("h", 12)]).unwrap();
    assert_eq!(store.positions().unwrap(), vec![("a".to_owned(), 0, 12)]);
}

#[test]
fn a_batch_keeps_only_the_records_of_the_partitions_it_is_told_in_step() {
    use std::collections::BTreeMap;
    let origin = |partition, offset| DeadLetter {
        topic: "t".into(),
        partition,
        offset,
        key: None,
        payload: Vec::new(),
        error: String::new(),
    };
    let origins = vec![origin(0, 1), origin(1, 7), origin(0, 2)];
    let mut batch = super::Batch {
        items: origins
            .iter()
            .map(|o| Item::DeadLetter(o.clone()))
            .collect(),
        origins,
        messages: BTreeMap::from([(("t".into(), 0), 2), (("t".into(), 1), 7)]),
        kinds: vec![Some(Kind::Message), Some(Kind::Edit), None],
        gaps: vec![("t".into(), 1, 5, 7)],
    };
    batch.keep(|(_, p)| *p == 0);
    let offsets = |items: &[Item]| -> Vec<i64> {
        items
            .iter()
            .map(|i| match i {
                Item::DeadLetter(d) => d.offset,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(offsets(&batch.items), [1, 2]);
    assert_eq!(batch.kinds, [Some(Kind::Message), None]);
    assert_eq!(
        batch.origins.iter().map(|o| o.offset).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(batch.messages.len(), 1);
    assert!(batch.gaps.is_empty());
}
