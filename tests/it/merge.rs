//! The sync's merge is a function of the *set* of records: copies of one message that differ
//! (a callback's and a backfill's, one without custom data, two senders in opposite
//! directions sharing a `MsgKey`), its edits, recall, receipt and read reports — applied in
//! any order and any batching — end in the same row, and the same row on every backend:
//! SQLite, PostgreSQL, and PostgreSQL whose database collation is ICU's `en-US` (where
//! `'a' < 'B'`, unlike bytes).

use std::sync::atomic::{AtomicI64, Ordering};

use im_relay::config::{Database, PgSsl, SslMode};
use im_relay::normalize::{
    EDIT_SCHEMA, READ_ALL_SCHEMA, READ_RECEIPT_SCHEMA, READ_REPORT_SCHEMA, RECALL_SCHEMA, SCHEMA,
};
use im_relay::sync::change;
use im_relay::sync::store::{self, Item, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

use crate::pg::Postgres;

/// Texts whose order differs between bytes and a linguistic collation.
const TEXTS: [&str; 4] = ["a", "B", "\u{e9}", "b"];
const CCDS: [&str; 3] = ["\"x\"", "\"Y\"", "\"\u{e9}\""];
const EDIT_IDS: [&str; 3] = ["e-a", "e-B", "e-\u{e9}"];
const ID: &str = "1400:alice:bob:K";

/// One copy of the message itself.
#[derive(Debug, Clone)]
struct Copy {
    reverse: bool,
    text: usize,
    ccd: Option<usize>,
    seq: Option<i64>,
    result: Option<i64>,
    online: Option<bool>,
    backfill: bool,
    time: i64,
}

#[derive(Debug, Clone)]
enum Event {
    Recall(i64),
    Receipt(i64),
    Edit {
        id: usize,
        at: Option<i64>,
        text: Option<usize>,
        ccd: Option<usize>,
        arrived_s: i64,
        reverse: bool,
    },
    Report {
        reader: usize,
        t: i64,
    },
    ReadAll {
        reader: usize,
        t: i64,
    },
}

/// Readers of read reports and read-alls: `bob` and `bob ` are two accounts (a collation that
/// pads spaces would make them one key).
const READERS: [&str; 3] = ["alice", "bob", "bob "];

fn copy() -> impl Strategy<Value = Copy> {
    (
        any::<bool>(),
        0..TEXTS.len(),
        prop::option::of(0..CCDS.len()),
        prop::option::of(1..4i64),
        prop::option::of(prop::sample::select(vec![0i64, 80001])),
        prop::option::of(any::<bool>()),
        any::<bool>(),
        1_700_000_000..1_700_000_003i64,
    )
        .prop_map(
            |(reverse, text, ccd, seq, result, online, backfill, time)| Copy {
                reverse,
                text,
                ccd,
                seq,
                result,
                online,
                backfill,
                time,
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0..3i64).prop_map(|t| Event::Recall(1_700_000_100_000 + t)),
        (0..3i64).prop_map(|t| Event::Receipt(1_700_000_200_000 + t)),
        (
            0..EDIT_IDS.len(),
            prop::option::of(0..2i64),
            prop::option::of(0..TEXTS.len()),
            prop::option::of(0..CCDS.len()),
            0..3i64,
            any::<bool>(),
        )
            .prop_map(|(id, at, text, ccd, arrived_s, reverse)| Event::Edit {
                id,
                at: at.map(|a| 1_700_000_300_000 + a),
                text,
                ccd,
                arrived_s,
                reverse,
            }),
        (0..READERS.len(), 0..3i64).prop_map(|(reader, t)| Event::Report {
            reader,
            t: 1_700_000_000 + t
        }),
        (0..READERS.len(), 0..3i64).prop_map(|(reader, t)| Event::ReadAll {
            reader,
            t: 1_700_000_400_000 + t
        }),
    ]
}

fn parties(reverse: bool) -> (&'static str, &'static str) {
    if reverse {
        ("bob", "alice")
    } else {
        ("alice", "bob")
    }
}

fn elements(text: usize) -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": TEXTS[text]}}])
}

/// The record value the relay (or backfill) would have published.
fn record(app: i64, r: &Result<Copy, Event>) -> Vec<u8> {
    let mut v = match r {
        Ok(c) => {
            let (from, to) = parties(c.reverse);
            let mut v = json!({"schema": SCHEMA, "id": ID, "msg_key": "K",
                "from_account": from, "to_account": to, "msg_time": c.time,
                "elements": elements(c.text),
                "source": if c.backfill { "backfill" } else { "callback" }});
            if let Some(i) = c.ccd {
                v["cloud_custom_data"] = serde_json::from_str(CCDS[i]).unwrap();
            }
            for (k, x) in [("msg_seq", c.seq), ("send_result", c.result)] {
                if let Some(x) = x {
                    v[k] = json!(x);
                }
            }
            if let Some(o) = c.online {
                v["online_only"] = json!(o);
            }
            v
        }
        Err(Event::Recall(at)) => json!({"schema": RECALL_SCHEMA, "id": "r",
            "message_id": ID, "msg_key": "K", "from_account": "alice", "to_account": "bob",
            "event_time_ms": at}),
        Err(Event::Receipt(at)) => json!({"schema": READ_RECEIPT_SCHEMA, "id": "rc",
            "message_id": ID, "msg_key": "K", "from_account": "alice", "to_account": "bob",
            "event_time_ms": at}),
        Err(Event::Edit {
            id,
            at,
            text,
            ccd,
            arrived_s,
            reverse,
        }) => {
            let (from, to) = parties(*reverse);
            let mut v = json!({"schema": EDIT_SCHEMA, "id": EDIT_IDS[*id], "message_id": ID,
                "msg_key": "K", "from_account": from, "to_account": to,
                "received_at": format!("2026-11-28T01:00:0{arrived_s}Z")});
            if let Some(at) = at {
                v["event_time_ms"] = json!(at);
            }
            if let Some(t) = text {
                v["elements"] = elements(*t);
            }
            if let Some(c) = ccd {
                v["cloud_custom_data"] = serde_json::from_str(CCDS[*c]).unwrap();
            }
            v
        }
        Err(Event::Report { reader, t }) => {
            let peer = if *reader == 0 { "bob" } else { "alice" };
            json!({"schema": READ_REPORT_SCHEMA, "id": "rp", "report_account": READERS[*reader],
                "peer_account": peer, "last_read_time": t})
        }
        Err(Event::ReadAll { reader, t }) => {
            json!({"schema": READ_ALL_SCHEMA, "id": "ra", "report_account": READERS[*reader],
                "event_time_ms": t})
        }
    };
    v["sdk_app_id"] = json!(app);
    serde_json::to_vec(&v).unwrap()
}

fn items(app: i64, records: &[Result<Copy, Event>]) -> Vec<Item> {
    records
        .iter()
        .map(|r| {
            Item::Change(
                change::parse(&record(app, r))
                    .expect("a record sync reads")
                    .1,
            )
        })
        .collect()
}

/// Every column of the app's rows but `updated_at` (when, not what), as text.
const MESSAGE_COLUMNS: &str = "id, msg_key, from_account, to_account, arrived, msg_time, \
     elements, cloud_custom_data, recalled_at, edited_at, read_at, elements_version_time, \
     elements_version_id, ccd_version_time, ccd_version_id, edit_version_time, edit_version_id, \
     msg_seq, send_result, online_only, conv_low, conv_high";

fn queries(app: i64) -> [String; 3] {
    [
        format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE sdk_app_id = {app}"),
        format!("SELECT reader, peer, last_read_time FROM read_marks WHERE sdk_app_id = {app}"),
        format!("SELECT reader, read_all_time FROM read_all_marks WHERE sdk_app_id = {app}"),
    ]
}

/// A backend under test: its store and a reader of its rows.
struct Backend {
    name: &'static str,
    store: Box<dyn Store>,
    rows: Box<dyn FnMut(i64) -> Vec<String>>,
}

fn sqlite(dir: &std::path::Path) -> Backend {
    let path = dir.join("merge.db");
    let store = store::open(&Database::Sqlite(path.clone())).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    Backend {
        name: "sqlite",
        store,
        rows: Box::new(move |app| {
            let mut out = Vec::new();
            for q in queries(app) {
                let mut stmt = conn.prepare(&q).unwrap();
                let n = stmt.column_count();
                let rows = stmt
                    .query_map([], |r| {
                        Ok((0..n)
                            .map(|i| match r.get_ref(i).unwrap() {
                                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8(t.to_vec()).unwrap()
                                }
                                rusqlite::types::ValueRef::Null => "NULL".into(),
                                other => format!("{other:?}"),
                            })
                            .collect::<Vec<_>>()
                            .join("|"))
                    })
                    .unwrap();
                out.extend(rows.map(Result::unwrap));
            }
            out.sort();
            out
        }),
    }
}

fn mariadb(url: String) -> Backend {
    use mysql::prelude::Queryable;
    let url = crate::mariadb::with_password(&url);
    let store = store::open(&maria_db(&url)).unwrap();
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    Backend {
        name: "mariadb",
        store,
        rows: Box::new(move |app| {
            let mut out = Vec::new();
            for q in queries(app) {
                let rows: Vec<mysql::Row> = conn.query(q).unwrap();
                for r in rows {
                    let cells: Vec<String> = r
                        .unwrap()
                        .into_iter()
                        .map(|v| match v {
                            mysql::Value::NULL => "NULL".into(),
                            mysql::Value::Int(i) => i.to_string(),
                            mysql::Value::Bytes(b) => String::from_utf8(b).unwrap(),
                            other => format!("{other:?}"),
                        })
                        .collect();
                    out.push(cells.join("|"));
                }
            }
            out.sort();
            out
        }),
    }
}

/// A PostgreSQL database the test reaches without TLS, the password in `url`.
fn pg_db(url: &str) -> Database {
    Database::Postgres {
        url: url.to_owned(),
        password: None,
        ssl: PgSsl {
            mode: SslMode::Disable,
            root_cert: None,
        },
        schema: None,
    }
}

/// A MariaDB database, the password in `url`.
fn maria_db(url: &str) -> Database {
    Database::Mysql {
        url: url.to_owned(),
        password: None,
    }
}

/// A message from alice to bob with key `key`, as the relay records it.
fn plain_message(key: &str, msg_time: i64) -> Item {
    let v = json!({"schema": SCHEMA, "id": format!("1400:alice:bob:{key}"),
        "sdk_app_id": 1400, "msg_key": key, "from_account": "alice", "to_account": "bob",
        "msg_time": msg_time, "elements": elements(0)});
    Item::Change(change::parse(&serde_json::to_vec(&v).unwrap()).unwrap().1)
}

fn postgres(name: &'static str, url: String) -> Backend {
    let url = crate::pg::with_password(&url);
    let store = store::open(&pg_db(&url)).unwrap();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    Backend {
        name,
        store,
        rows: Box::new(move |app| {
            let mut out = Vec::new();
            for q in queries(app) {
                for r in client.query(&q, &[]).unwrap() {
                    let cells: Vec<String> = (0..r.len())
                        .map(|i| match *r.columns()[i].type_() {
                            postgres::types::Type::INT8 => r
                                .get::<_, Option<i64>>(i)
                                .map_or("NULL".into(), |v| v.to_string()),
                            _ => r.get::<_, Option<String>>(i).unwrap_or("NULL".into()),
                        })
                        .collect();
                    out.push(cells.join("|"));
                }
            }
            out.sort();
            out
        }),
    }
}

#[test]
fn the_merge_is_a_function_of_the_set_of_records_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::shared();
    // The ICU collation is real: it orders `a` before `B`, bytes do not.
    let icu = pg.database_icu("en-US");
    let mut c =
        postgres::Client::connect(&crate::pg::with_password(&icu), postgres::NoTls).unwrap();
    let linguistic: bool = c.query_one("SELECT 'a' < 'B'", &[]).unwrap().get(0);
    assert!(linguistic, "the ICU database compares linguistically");
    let backends = std::cell::RefCell::new([
        sqlite(dir.path()),
        postgres("postgresql (C)", pg.database()),
        postgres("postgresql (ICU en-US)", icu),
        mariadb(crate::mariadb::Mariadb::shared().database()),
    ]);
    static APP: AtomicI64 = AtomicI64::new(1);
    let strategy = (
        prop::collection::vec(copy(), 1..4),
        prop::collection::vec(event(), 0..5),
    )
        .prop_flat_map(|(copies, events)| {
            let all: Vec<Result<Copy, Event>> = copies
                .into_iter()
                .map(Ok)
                .chain(events.into_iter().map(Err))
                .collect();
            let n = all.len();
            (
                Just(all.clone()),
                Just(all).prop_shuffle(),
                prop::collection::vec(1..4usize, n),
            )
        });
    let cases = if std::env::var_os("IM_RELAY_MERGE_CASES").is_some() {
        std::env::var("IM_RELAY_MERGE_CASES")
            .unwrap()
            .parse()
            .unwrap()
    } else {
        48
    };
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(records, shuffled, cuts)| {
        let mut first: Option<(&str, Vec<String>)> = None;
        for b in backends.borrow_mut().iter_mut() {
            // As generated, one transaction; shuffled, in batches of the cut sizes.
            let (a, s) = (
                APP.fetch_add(2, Ordering::Relaxed),
                APP.fetch_add(2, Ordering::Relaxed),
            );
            b.store.apply(&items(a, &records)).unwrap();
            let mut rest = &items(s, &shuffled)[..];
            for n in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*n).min(rest.len()));
                b.store.apply(head).unwrap();
                rest = tail;
            }
            let (in_order, any_order) = ((b.rows)(a), (b.rows)(s));
            prop_assert_eq!(&any_order, &in_order, "{}: order changed the row", b.name);
            match &first {
                None => first = Some((b.name, in_order)),
                Some((name, rows)) => prop_assert_eq!(
                    &in_order,
                    rows,
                    "{} and {} keep different rows",
                    b.name,
                    name
                ),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Two writers (two `sync` replicas, a rebalance's overlap) applying batches that share rows,
/// listed in opposite orders, at the same time: neither deadlocks. Each batch takes its row
/// locks in key order, so they queue instead of waiting on each other.
#[test]
fn two_writers_with_shared_rows_do_not_deadlock() {
    let databases = [
        pg_db(&crate::pg::with_password(&Postgres::shared().database())),
        maria_db(&crate::mariadb::with_password(
            &crate::mariadb::Mariadb::shared().database(),
        )),
    ];
    for db in &databases {
        two_writers(db);
    }
}

fn two_writers(db: &Database) {
    let open = || store::open(db).unwrap();
    let batch: Vec<Item> = (0..400)
        .map(|i| plain_message(&format!("{i:04}"), 1_700_000_000 + i))
        .collect();
    let reversed: Vec<Item> = batch.iter().rev().cloned().collect();
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for items in [&batch, &reversed] {
            let mut store = open();
            let barrier = &barrier;
            handles.push(s.spawn(move || {
                let mut errors = Vec::new();
                for round in 0..10 {
                    barrier.wait();
                    if let Err(e) = store.apply(items) {
                        errors.push(format!("round {round}: {e}"));
                    }
                }
                errors
            }));
        }
        let errors: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", db.describe());
    });
}

/// A deadlock PostgreSQL breaks by aborting sync's transaction is told apart from a database
/// failure: `conflict`, which `sync` retries at once (counted) instead of waiting as for an
/// outage.
#[test]
fn a_deadlock_is_a_conflict_not_an_outage() {
    let url = crate::pg::with_password(&Postgres::shared().database());
    let mut store = store::open(&pg_db(&url)).unwrap();
    let both = [
        plain_message("a", 1_700_000_000),
        plain_message("b", 1_700_000_000),
    ];
    store.apply(&both).unwrap();
    // Another writer holds b, sync's batch takes a then waits for b; the other then wants a.
    let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut tx = other.transaction().unwrap();
    tx.execute(
        "UPDATE messages SET updated_at = 1 WHERE msg_key = 'b'",
        &[],
    )
    .unwrap();
    std::thread::scope(|s| {
        let sync = s.spawn(|| store.apply(&both));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let theirs = tx.execute(
            "UPDATE messages SET updated_at = 1 WHERE msg_key = 'a'",
            &[],
        );
        let ours = sync.join().unwrap();
        // PostgreSQL aborts the first waiter: sync.
        let e = ours.expect_err("one of the two is aborted");
        assert!(e.conflict && !e.data && !e.fatal, "{e}");
        theirs.unwrap();
    });
    tx.commit().unwrap();
    store.apply(&both).unwrap();
}

/// The history query of docs/sync.md, as written there.
fn documented_history_query() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/sync.md")).unwrap();
    let start = doc.find("```sql\n").expect("docs/sync.md has an SQL block") + 7;
    let len = doc[start..].find("```").unwrap();
    let query = doc[start..start + len]
        .trim()
        .trim_end_matches(';')
        .to_owned();
    assert!(query.contains("conv_low = 'alice'"), "{query}");
    query
}

/// 12,000 messages over 300 conversations, and alice↔bob's 60 both ways, some undelivered,
/// online-only, recalled, or only heard of (a recall before the message).
fn history_rows() -> (Vec<Item>, Vec<String>) {
    let mut items = Vec::new();
    let mut expected = Vec::new();
    let mut add = |from: &str, to: &str, key: String, time: i64, seq: i64, extra: Value| {
        let (low, high) = if from < to { (from, to) } else { (to, from) };
        let mut v = json!({"schema": SCHEMA, "id": format!("1400000000:{low}:{high}:{key}"),
            "sdk_app_id": 1400000000, "msg_key": key, "from_account": from, "to_account": to,
            "msg_time": time, "msg_seq": seq, "send_result": 0, "online_only": false,
            "elements": elements(0)});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        items.push(Item::Change(
            change::parse(&serde_json::to_vec(&v).unwrap()).unwrap().1,
        ));
    };
    for i in 0..12_000i64 {
        let (a, b) = (format!("u{:03}", i % 300), format!("v{:03}", (i / 7) % 300));
        add(&a, &b, format!("m{i}"), 1_700_000_000 + i, i, json!({}));
    }
    for i in 0..60i64 {
        let (from, to) = if i % 3 == 0 {
            ("bob", "alice")
        } else {
            ("alice", "bob")
        };
        // Two per second: the sequence orders them.
        let (time, seq) = (1_700_100_000 + i / 2, 1000 + i);
        let extra = match i % 10 {
            4 => json!({"send_result": 80001}),
            7 => json!({"online_only": true}),
            _ => json!({}),
        };
        let key = format!("ab{i:02}");
        if !matches!(i % 10, 4 | 7) {
            expected.push(format!("1400000000:alice:bob:{key}|{from}|{}", time * 1000));
        }
        add(from, to, key, time, seq, extra);
    }
    // A recall of a message never seen: a row that is not history.
    let v = json!({"schema": RECALL_SCHEMA, "id": "r", "sdk_app_id": 1400000000,
        "message_id": "1400000000:alice:bob:ghost", "msg_key": "ghost", "from_account": "alice",
        "to_account": "bob", "event_time_ms": 1_700_200_000_000i64});
    items.push(Item::Change(
        change::parse(&serde_json::to_vec(&v).unwrap()).unwrap().1,
    ));
    expected.reverse();
    expected.truncate(50);
    (items, expected)
}

/// The documented history query runs on every backend and returns the conversation's
/// delivered, not online-only messages, newest first (time, then sequence); on PostgreSQL, with
/// the table analyzed and sequential scans allowed, its plan uses the conversation index.
#[test]
fn the_documented_history_query_runs_on_every_backend_and_uses_the_index() {
    let query = documented_history_query();
    let (items, expected) = history_rows();
    let first_three = |rows: Vec<Vec<String>>| -> Vec<String> {
        rows.into_iter().map(|r| r[..3].join("|")).collect()
    };
    // SQLite.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    store::open(&Database::Sqlite(path.clone()))
        .unwrap()
        .apply(&items)
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn.prepare(&query).unwrap();
    let rows: Vec<Vec<String>> = stmt
        .query_map([], |r| {
            Ok(vec![
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?.to_string(),
            ])
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(first_three(rows), expected, "sqlite");
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter()
            .any(|p| p.contains("messages_by_conversation_history")),
        "sqlite plan: {plan:?}"
    );
    // PostgreSQL.
    let url = crate::pg::with_password(&Postgres::shared().database());
    store::open(&pg_db(&url)).unwrap().apply(&items).unwrap();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute("ANALYZE messages").unwrap();
    let rows: Vec<Vec<String>> = c
        .query(&query, &[])
        .unwrap()
        .iter()
        .map(|r| {
            vec![
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2).to_string(),
            ]
        })
        .collect();
    assert_eq!(first_three(rows), expected, "postgresql");
    let enabled: String = c.query_one("SHOW enable_seqscan", &[]).unwrap().get(0);
    assert_eq!(enabled, "on");
    let plan: Vec<String> = c
        .query(&format!("EXPLAIN {query}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|p| p.contains("messages_by_conversation_history")),
        "postgresql plan: {plan:#?}"
    );
    // MariaDB.
    use mysql::prelude::Queryable;
    let url = crate::mariadb::with_password(&crate::mariadb::Mariadb::shared().database());
    store::open(&maria_db(&url)).unwrap().apply(&items).unwrap();
    let mut c = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    c.query_drop("ANALYZE TABLE messages").unwrap();
    let rows: Vec<Vec<String>> = c
        .query_map(&query, |r: mysql::Row| {
            vec![
                r.get::<String, _>(0).unwrap(),
                r.get::<String, _>(1).unwrap(),
                r.get::<i64, _>(2).unwrap().to_string(),
            ]
        })
        .unwrap();
    assert_eq!(first_three(rows), expected, "mariadb");
    let plan: Vec<mysql::Row> = c.query(format!("EXPLAIN {query}")).unwrap();
    let keys: Vec<Option<String>> = plan.iter().map(|r| r.get("key").flatten()).collect();
    assert!(
        keys.iter()
            .any(|k| k.as_deref() == Some("messages_by_conversation_history")),
        "mariadb plan keys: {keys:?}"
    );
}

/// `--redact-recalled`: once a recall is applied the content is NULL on every backend, whether
/// the recall came before the message, after it, or before a later edit; other messages keep
/// theirs.
#[test]
fn a_recalled_message_s_content_is_blanked_when_asked_whatever_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let pg = crate::pg::with_password(&Postgres::shared().database());
    let maria = crate::mariadb::with_password(&crate::mariadb::Mariadb::shared().database());
    let databases = [
        Database::Sqlite(dir.path().join("redact.db")),
        pg_db(&pg),
        maria_db(&maria),
    ];
    let copy = Copy {
        reverse: false,
        text: 0,
        ccd: Some(0),
        seq: Some(1),
        result: Some(0),
        online: Some(false),
        backfill: false,
        time: 1_700_000_000,
    };
    let edit = Event::Edit {
        id: 0,
        at: Some(1_700_000_300_000),
        text: Some(1),
        ccd: Some(1),
        arrived_s: 0,
        reverse: false,
    };
    let orders: [Vec<Result<Copy, Event>>; 3] = [
        vec![Ok(copy.clone()), Err(Event::Recall(1_700_000_100_000))],
        vec![Err(Event::Recall(1_700_000_100_000)), Ok(copy.clone())],
        vec![
            Ok(copy.clone()),
            Err(Event::Recall(1_700_000_100_000)),
            Err(edit),
        ],
    ];
    for db in &databases {
        let mut store = store::open_with(db, true).unwrap();
        for (n, records) in orders.iter().enumerate() {
            let app = 9_000 + n as i64;
            for one in records {
                store.apply(&items(app, std::slice::from_ref(one))).unwrap();
            }
            // Not recalled: kept.
            store.apply(&items(app + 100, &[Ok(copy.clone())])).unwrap();
        }
        drop(store);
        let query = "SELECT sdk_app_id, elements IS NULL, cloud_custom_data IS NULL, \
                     recalled_at IS NOT NULL FROM messages WHERE sdk_app_id >= 9000 \
                     ORDER BY sdk_app_id";
        let rows: Vec<(i64, bool, bool, bool)> = match db {
            Database::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                let mut stmt = conn.prepare(query).unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
            Database::Mysql { .. } => {
                use mysql::prelude::Queryable;
                let mut c = mysql::Conn::new(mysql::Opts::from_url(&maria).unwrap()).unwrap();
                c.query_map(query, |(a, b, cc, d): (i64, i64, i64, i64)| {
                    (a, b == 1, cc == 1, d == 1)
                })
                .unwrap()
            }
            _ => postgres::Client::connect(&pg, postgres::NoTls)
                .unwrap()
                .query(query, &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect(),
        };
        let recalled = (true, true, true);
        let kept = (false, false, false);
        let want: Vec<(i64, bool, bool, bool)> = [
            (9000, recalled),
            (9001, recalled),
            (9002, recalled),
            (9100, kept),
            (9101, kept),
            (9102, kept),
        ]
        .into_iter()
        .map(|(app, (a, b, c))| (app, a, b, c))
        .collect();
        assert_eq!(rows, want, "{db:?}");
    }
}
