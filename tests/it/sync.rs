//! `im-relay sync` end to end: signed callbacks for a conversation's whole life through the
//! relay into the real broker, then `sync` (its own process) into SQLite and into a real
//! PostgreSQL; the tables compared with the conversation's true state. Then the faults: the
//! sync killed mid-batch, the database killed under it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::lifecycle::{Life, life};
use crate::pg::Postgres;
use im_relay::domain::{Relayed, SdkAppId};
use im_relay::json::Object;
use im_relay::normalize::{self, Context, KeyMode, Source};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

/// The columns compared: every one but the bookkeeping (`*_version_*`).
const MESSAGES: &str = "SELECT sdk_app_id, id, msg_key, from_account, to_account, arrived, \
     msg_time, elements, cloud_custom_data, recalled_at, edited_at, read_at \
     FROM messages ORDER BY id";
const READ_MARKS: &str = "SELECT sdk_app_id, reader, peer, last_read_time FROM read_marks \
     WHERE reader <> 'zz-marker' ORDER BY reader, peer";
const READ_ALL_MARKS: &str =
    "SELECT sdk_app_id, reader, read_all_time FROM read_all_marks ORDER BY reader";
const DEAD_LETTERS: &str = "SELECT COUNT(*) FROM dead_letters";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Int(Option<i64>),
    Text(Option<String>),
}

fn cell_text(c: &Cell) -> String {
    match c {
        Cell::Int(Some(i)) => i.to_string(),
        Cell::Text(Some(t)) => t.clone(),
        _ => "NULL".into(),
    }
}

/// The database's tables as lines of `|`-separated cells.
trait Tables {
    fn query(&mut self, sql: &str) -> Option<Vec<Vec<Cell>>>;

    fn state(&mut self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for sql in [MESSAGES, READ_MARKS, READ_ALL_MARKS] {
            out.extend(self.lines(sql)?);
        }
        Some(out)
    }

    /// `sql`'s rows as lines.
    fn lines(&mut self, sql: &str) -> Option<Vec<String>> {
        let rows = self.query(sql)?;
        Some(
            rows.iter()
                .map(|row| row.iter().map(cell_text).collect::<Vec<_>>().join("|"))
                .collect(),
        )
    }

    fn dead_letters(&mut self) -> i64 {
        match self.query(DEAD_LETTERS).as_deref() {
            Some([row]) => match row[0] {
                Cell::Int(Some(n)) => n,
                _ => 0,
            },
            _ => 0,
        }
    }
}

struct Sqlite<'a>(&'a Path);

impl Tables for Sqlite<'_> {
    fn query(&mut self, sql: &str) -> Option<Vec<Vec<Cell>>> {
        let conn = rusqlite::Connection::open(self.0).ok()?;
        let mut stmt = conn.prepare(sql).ok()?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| match r.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Integer(v) => Cell::Int(Some(v)),
                        rusqlite::types::ValueRef::Text(t) => {
                            Cell::Text(Some(String::from_utf8_lossy(t).into_owned()))
                        }
                        _ => Cell::Text(None),
                    })
                    .collect())
            })
            .ok()?;
        rows.collect::<Result<_, _>>().ok()
    }
}

struct Pg(String);

impl Tables for Pg {
    fn query(&mut self, sql: &str) -> Option<Vec<Vec<Cell>>> {
        let url = crate::pg::with_password(&self.0);
        let mut c = postgres::Client::connect(&url, postgres::NoTls).ok()?;
        let rows = c.query(sql, &[]).ok()?;
        Some(
            rows.iter()
                .map(|r| {
                    r.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, col)| match *col.type_() {
                            postgres::types::Type::INT8 => Cell::Int(r.get(i)),
                            _ => Cell::Text(r.get(i)),
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

struct Maria(String);

impl Tables for Maria {
    fn query(&mut self, sql: &str) -> Option<Vec<Vec<Cell>>> {
        use mysql::prelude::Queryable;
        let url = crate::mariadb::with_password(&self.0);
        let mut c = mysql::Conn::new(mysql::Opts::from_url(&url).ok()?).ok()?;
        let rows: Vec<mysql::Row> = c.query(sql).ok()?;
        Some(
            rows.into_iter()
                .map(|r| {
                    r.unwrap()
                        .into_iter()
                        .map(|v| match v {
                            mysql::Value::Int(i) => Cell::Int(Some(i)),
                            mysql::Value::Bytes(b) => {
                                Cell::Text(Some(String::from_utf8_lossy(&b).into_owned()))
                            }
                            _ => Cell::Text(None),
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

/// A valid record on every partition (a read report between two marker users, left out of
/// the comparison): tansu has been seen to hold a partition's newest batch back until
/// another write, and a marker `sync` could not read would be a dead letter.
fn nudge(bootstrap: &str, topic: &str) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    let body = json!({"Report_Account": "zz-marker", "Peer_Account": "zz-peer",
                      "LastReadTime": im_relay::domain::unix_seconds()});
    let Value::Object(body) = body else {
        unreachable!()
    };
    let out = normalize::normalize(
        &context(),
        Relayed::AfterMsgReport,
        &Object::from_map(&body),
    )
    .unwrap();
    for p in 0..PARTITIONS {
        let _ = producer.send(
            BaseRecord::to(topic)
                .key(&out[0].key)
                .payload(&out[0].value)
                .partition(p),
        );
    }
    let _ = producer.flush(Duration::from_secs(5));
}

fn context() -> Context<'static> {
    Context {
        sdk_app_id: SdkAppId::from(APP_ID),
        client_ip: None,
        opt_platform: None,
        received_at: time::OffsetDateTime::now_utc(),
        key_mode: KeyMode::MsgKey,
        source: Source::Callback,
    }
}

/// Waits until `db`'s tables equal `expected`, nudging the broker now and then.
fn converge(db: &mut dyn Tables, expected: &[String], bootstrap: &str, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut nudged = Instant::now();
    loop {
        let got = db.state();
        if got.as_deref() == Some(expected) {
            return;
        }
        if Instant::now() > deadline {
            let got = got.unwrap_or_default();
            let missing: Vec<&String> = expected.iter().filter(|e| !got.contains(e)).collect();
            let extra: Vec<&String> = got.iter().filter(|g| !expected.contains(g)).collect();
            panic!(
                "tables never converged: {} rows, {} expected; {} missing (first: {:?}), \
                 {} unexpected (first: {:?})",
                got.len(),
                expected.len(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>(),
            );
        }
        if nudged.elapsed() > Duration::from_secs(3) {
            nudge(bootstrap, topic);
            nudged = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sync_env(bootstrap: &str, topic: &str, database: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("IM_RELAY_KAFKA_BROKERS", bootstrap.to_owned()),
        ("IM_RELAY_TOPIC", topic.to_owned()),
        ("IM_RELAY_QUARANTINE_TOPIC", quarantine_topic(topic)),
        ("IM_RELAY_SYNC_DATABASE_URL", database.to_owned()),
        ("IM_RELAY_SYNC_GROUP", format!("sync-{}", unique())),
        ("IM_RELAY_SYNC_ADMIN_LISTEN", free_addr()),
        ("IM_RELAY_SYNC_BATCH_MAX", "50".to_owned()),
        // A killed sync's partitions come back after this, not after the default 45 s.
        (
            "IM_RELAY_KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=1000".to_owned(),
        ),
        ("IM_RELAY_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if database.starts_with("postgres") {
        // The password never in the URL: on its own, as an operator would set it.
        env.insert(
            "IM_RELAY_SYNC_DATABASE_PASSWORD".into(),
            crate::pg::PASSWORD.into(),
        );
    }
    env
}

fn start_sync(env: &HashMap<String, String>, log: &Path) -> RelayProcess {
    let p = RelayProcess::spawn_command("sync", env, log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.ready() != Some(true) {
        assert!(
            Instant::now() < deadline,
            "sync not ready: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// What the tables hold once `life("m1")` and the extra messages are applied, whatever the
/// order the callbacks came in.
fn expected_life() -> Vec<String> {
    let text = |t: &str| format!(r#"[{{"type":"text","text":"{t}"}}]"#);
    vec![
        format!(
            "1400000000|1400000000:alice:bob:m1|m1|alice|bob|1|1700000000000|{}|\"v1700000200000\"|1700000300000|1700000200000|1700000060000",
            text("hello, edited twice")
        ),
        format!(
            "1400000000|1400000000:alice:bob:m1-2|m1-2|alice|bob|1|1700000000000|{}|\"v0\"|NULL|NULL|1700000060000",
            text("second")
        ),
        // A NUL inside a message is legal JSON: kept escaped in the JSON text.
        format!(
            "1400000000|1400000000:alice:bob:nul|nul|alice|bob|1|1700000000000|{}|\"c\\u0000d\"|NULL|NULL|NULL",
            text("a\\u0000b")
        ),
        "1400000000|bob|alice|1700000050000".to_owned(),
        "1400000000|bob|1700000070000".to_owned(),
    ]
}

/// Posts the whole life, recall and an edit before the message, duplicates, plus a message
/// holding NUL characters.
async fn post_whole_life(app: &TestApp, l: &Life) {
    crate::lifecycle::post_life(app, l).await;
    let nul = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": "nul",
        "MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1_700_000_000,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "a\u{0}b"}}],
        "CloudCustomData": "c\u{0}d"})
    .to_string();
    assert_eq!(app.post_signed(&nul).await, (200, ok_body()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_keeps_sqlite_equal_to_the_conversation() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    post_whole_life(&app, &life("m1")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.db");
    let env = sync_env(
        &broker.bootstrap(),
        &app.topic,
        &format!("sqlite://{}", file.display()),
    );
    let sync = start_sync(&env, &dir.path().join("sync.log"));
    let (bootstrap, topic) = (broker.bootstrap(), app.topic.clone());
    let file2 = file.clone();
    tokio::task::spawn_blocking(move || {
        converge(&mut Sqlite(&file2), &expected_life(), &bootstrap, &topic);
    })
    .await
    .unwrap();
    assert_eq!(Sqlite(&file).dead_letters(), 0);
    let metrics = sync.metrics();
    assert!(
        metrics.contains("im_relay_sync_applied_total{kind=\"recall\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("im_relay_sync_dead_letters_total 0"),
        "{metrics}"
    );
    // SIGTERM: the batch in hand finishes, the process exits cleanly.
    assert!(sync.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_keeps_postgresql_equal_to_the_conversation() {
    // The blocking PostgreSQL client runs its own runtime: never on this one's threads.
    let database = tokio::task::spawn_blocking(|| Postgres::shared().database())
        .await
        .unwrap();
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    post_whole_life(&app, &life("m1")).await;
    let dir = tempfile::tempdir().unwrap();
    let env = sync_env(&broker.bootstrap(), &app.topic, &database);
    let _sync = start_sync(&env, &dir.path().join("sync.log"));
    let (bootstrap, topic) = (broker.bootstrap(), app.topic.clone());
    tokio::task::spawn_blocking(move || {
        converge(
            &mut Pg(database.clone()),
            &expected_life(),
            &bootstrap,
            &topic,
        );
        assert_eq!(Pg(database).dead_letters(), 0);
    })
    .await
    .unwrap();
}

/// The same life through the relay and Kafka into MariaDB: the third backend ends in the same
/// rows, its password asked for.
#[tokio::test(flavor = "multi_thread")]
async fn sync_keeps_mariadb_equal_to_the_conversation() {
    let database = tokio::task::spawn_blocking(|| crate::mariadb::Mariadb::shared().database())
        .await
        .unwrap();
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    post_whole_life(&app, &life("m1")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = sync_env(&broker.bootstrap(), &app.topic, &database);
    env.insert(
        "IM_RELAY_SYNC_DATABASE_PASSWORD".into(),
        crate::mariadb::PASSWORD.into(),
    );
    let _sync = start_sync(&env, &dir.path().join("sync.log"));
    let (bootstrap, topic) = (broker.bootstrap(), app.topic.clone());
    tokio::task::spawn_blocking(move || {
        converge(
            &mut Maria(database.clone()),
            &expected_life(),
            &bootstrap,
            &topic,
        );
        assert_eq!(Maria(database).dead_letters(), 0);
        // A wrong password: unready, the log saying why, the password never in it.
        let mut wrong = env.clone();
        wrong.insert(
            "IM_RELAY_SYNC_DATABASE_PASSWORD".into(),
            "not-the-password".into(),
        );
        wrong.insert("IM_RELAY_SYNC_ADMIN_LISTEN".into(), free_addr());
        let log = dir.path().join("wrong.log");
        let sync = RelayProcess::spawn_command("sync", &wrong, &log);
        wait_for_log(&log, "Access denied for user 'im'");
        assert_eq!(sync.ready(), Some(false));
        assert!(
            !std::fs::read_to_string(&log)
                .unwrap()
                .contains("not-the-password")
        );
    })
    .await
    .unwrap();
}

/// Records straight onto the topic, as the relay makes them: `n` messages, each edited once.
/// One record per produce batch: tansu 0.6 answers a fetch that starts inside a batch with
/// the *next* batch (probed: fetching from offset 5 of a 10-record batch returns 10…), so a
/// consumer resuming from a committed offset mid-batch would silently skip records there —
/// the broker's bug, not the sync's; Apache Kafka returns the whole batch.
fn produce_messages(bootstrap: &str, topic: &str, n: usize) -> Vec<String> {
    produce_batched(bootstrap, topic, n, 1)
}

/// `produce_messages` with up to `per_batch` records in a produce batch: for a benchmark that
/// never resumes mid-batch, so the broker is measured, not one batch per record.
fn produce_batched(bootstrap: &str, topic: &str, n: usize, per_batch: usize) -> Vec<String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("queue.buffering.max.messages", "1000000")
        .set("batch.num.messages", per_batch.to_string())
        .create()
        .expect("producer");
    let mut expected = Vec::new();
    for i in 0..n {
        let key = format!("k{i:05}");
        let send = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": key,
            "MsgTime": 1_700_000_000, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "x"}}]});
        let edit = json!({"From_Account": "alice", "To_Account": "bob", "MsgKey": key,
            "EventTime": 1_700_000_100_000i64 + i as i64,
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": format!("edit {i}")}}]});
        for (command, body) in [
            (Relayed::AfterSendMsg, send),
            (Relayed::AfterModifyMsg, edit),
        ] {
            let Value::Object(body) = body else {
                unreachable!()
            };
            for out in normalize::normalize(&context(), command, &Object::from_map(&body)).unwrap()
            {
                producer
                    .send(BaseRecord::to(topic).key(&out.key).payload(&out.value))
                    .expect("queued");
            }
        }
        expected.push(format!(
            "1400000000|1400000000:alice:bob:{key}|{key}|alice|bob|1|1700000000000|[{{\"type\":\"text\",\"text\":\"edit {i}\"}}]|NULL|NULL|{}|NULL",
            1_700_000_100_000i64 + i as i64
        ));
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
    expected
}

/// A topic of its own on `broker`.
async fn sync_topic(broker: &Broker) -> String {
    let topic = format!("im.c2c.sync-{}", unique());
    broker.create_topic(&topic).await;
    topic
}

/// Two `sync` processes of one deployment (one group) on one PostgreSQL database: the
/// partitions are split between them, each writes its rows and positions, and the tables end
/// complete — no deadlock stops either, nothing is skipped.
#[tokio::test(flavor = "multi_thread")]
async fn two_sync_replicas_share_one_database() {
    let database = tokio::task::spawn_blocking(|| Postgres::shared().database())
        .await
        .unwrap();
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let env = sync_env(&bootstrap, &topic, &database);
        let mut second = env.clone();
        second.insert("IM_RELAY_SYNC_ADMIN_LISTEN".into(), free_addr());
        let a = start_sync(&env, &dir.path().join("a.log"));
        let b = start_sync(&second, &dir.path().join("b.log"));
        // Both in the group before the records come, so both get partitions.
        for log in ["a.log", "b.log"] {
            wait_for_log(&dir.path().join(log), "partition assigned");
        }
        std::thread::sleep(Duration::from_secs(2));
        let expected = produce_messages(&bootstrap, &topic, 1000);
        converge(&mut Pg(database.clone()), &expected, &bootstrap, &topic);
        assert_eq!(Pg(database.clone()).dead_letters(), 0);
        // Both did work: the group split the partitions between them.
        for (name, sync) in [("a", &a), ("b", &b)] {
            assert!(
                applied(&sync.metrics()) > 0,
                "replica {name} applied nothing"
            );
            assert_eq!(
                series_value(&sync.metrics(), "im_relay_sync_database_errors_total"),
                Some(0.0),
                "replica {name}"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_killed_mid_batch_resumes_with_the_tables_right() {
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.db");
    let log = dir.path().join("sync.log");
    tokio::task::spawn_blocking(move || {
        let expected = produce_messages(&bootstrap, &topic, 2000);
        let mut env = sync_env(&bootstrap, &topic, &format!("sqlite://{}", file.display()));
        env.insert("IM_RELAY_SYNC_BATCH_MAX".into(), "10".into());
        let sync = start_sync(&env, &log);
        // Killed once a quarter is in: mid-stream, most likely mid-transaction.
        let deadline = Instant::now() + Duration::from_secs(60);
        let at_kill = loop {
            let n = Sqlite(&file).state().map_or(0, |s| s.len());
            if n >= 500 {
                break n;
            }
            assert!(Instant::now() < deadline, "sync applied only {n}");
            std::thread::sleep(Duration::from_millis(5));
        };
        sync.kill9();
        let after = Sqlite(&file).state().map_or(0, |s| s.len());
        assert!(
            at_kill >= 500 && after < 2000,
            "the kill came after the end ({after})"
        );
        let _sync = start_sync(&env, &log);
        converge(&mut Sqlite(&file), &expected, &bootstrap, &topic);
        assert_eq!(Sqlite(&file).dead_letters(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_down_stops_the_sync_until_it_is_back() {
    let (mut pg, database) = tokio::task::spawn_blocking(|| {
        let pg = Postgres::start();
        let database = pg.database();
        (pg, database)
    })
    .await
    .unwrap();
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sync.log");
    tokio::task::spawn_blocking(move || {
        let first = produce_messages(&bootstrap, &topic, 50);
        let env = sync_env(&bootstrap, &topic, &database);
        let sync = start_sync(&env, &log);
        converge(&mut Pg(database.clone()), &first, &bootstrap, &topic);
        // The database dies; more records arrive meanwhile.
        pg.kill9();
        let all = produce_messages(&bootstrap, &topic, 120);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sync.ready() != Some(false) {
            assert!(Instant::now() < deadline, "readiness stayed green");
            nudge(&bootstrap, &topic);
            std::thread::sleep(Duration::from_millis(200));
        }
        let metrics = sync.metrics();
        assert!(
            !metrics.contains("im_relay_sync_database_errors_total 0"),
            "{metrics}"
        );
        // Back: everything applied, nothing lost while it was away.
        pg.run();
        converge(&mut Pg(database.clone()), &all, &bootstrap, &topic);
        assert_eq!(sync.ready(), Some(true));
        assert_eq!(Pg(database).dead_letters(), 0);
    })
    .await
    .unwrap();
}

/// Managed PostgreSQL wants TLS and a password: `sync` verifies the server against the CA
/// `sslrootcert` names (`verify-full`: chain and host name), its connection is encrypted (the
/// server says so), and a wrong CA or a wrong password keeps it unready with the reason in
/// its log. Before: `NoTls` only, and `sslmode=verify-full` refused as not a URL.
#[tokio::test(flavor = "multi_thread")]
async fn sync_reaches_postgresql_over_verified_tls_and_refusals_say_why() {
    let (database, ca) = tokio::task::spawn_blocking(|| {
        let pg = Postgres::shared();
        (pg.database(), pg.ca.clone())
    })
    .await
    .unwrap();
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let expected = produce_messages(&bootstrap, &topic, 20);
        // By the name on the server's certificate.
        let by_name = database.replace("@127.0.0.1:", "@localhost:");
        let tls_url = |ca: &std::path::Path| {
            format!("{by_name}?sslmode=verify-full&sslrootcert={}", ca.display())
        };
        let mut env = sync_env(&bootstrap, &topic, &tls_url(&ca));
        let sync = start_sync(&env, &dir.path().join("sync.log"));
        converge(&mut Pg(database.clone()), &expected, &bootstrap, &topic);
        let name = database.rsplit('/').next().unwrap().to_owned();
        let encrypted = Pg(database.clone()).query(&format!(
            "SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = '{name}' AND a.application_name = 'im-relay-sync'"
        ));
        assert_eq!(
            encrypted,
            Some(vec![vec![Cell::Text(Some("true".into()))]]),
            "sync's connection is TLS"
        );
        assert!(sync.terminate().success());

        // A CA that did not sign the server's certificate: refused, and the log says why.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, other.cert.pem()).unwrap();
        env.insert("IM_RELAY_SYNC_DATABASE_URL".into(), tls_url(&other_ca));
        env.insert("IM_RELAY_SYNC_ADMIN_LISTEN".into(), free_addr());
        let log = dir.path().join("wrong-ca.log");
        let refused = RelayProcess::spawn_command("sync", &env, &log);
        wait_for_log(&log, "invalid peer certificate");
        assert_ne!(refused.ready(), Some(true));
        drop(refused);

        // A wrong password: refused by the server (SCRAM), and said so.
        env.insert("IM_RELAY_SYNC_DATABASE_URL".into(), tls_url(&ca));
        env.insert(
            "IM_RELAY_SYNC_DATABASE_PASSWORD".into(),
            "not-the-password".into(),
        );
        env.insert("IM_RELAY_SYNC_ADMIN_LISTEN".into(), free_addr());
        let log = dir.path().join("wrong-password.log");
        let refused = RelayProcess::spawn_command("sync", &env, &log);
        wait_for_log(&log, "password authentication failed");
        assert_ne!(refused.ready(), Some(true));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains("not-the-password"),
            "the password is never logged"
        );
    })
    .await
    .unwrap();
}

/// A database where another application already has a `messages` table: sync stops at once
/// with the reason (before: "relation already exists", retried for ever), and runs beside it
/// in a schema of its own (`IM_RELAY_SYNC_SCHEMA`), the other table untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_that_is_not_syncs_is_a_clear_stop_and_a_schema_of_its_own_avoids_it() {
    let database = tokio::task::spawn_blocking(|| {
        let database = Postgres::shared().database();
        let mut c =
            postgres::Client::connect(&crate::pg::with_password(&database), postgres::NoTls)
                .unwrap();
        c.batch_execute(
            "CREATE TABLE messages (body TEXT); INSERT INTO messages VALUES ('theirs')",
        )
        .unwrap();
        database
    })
    .await
    .unwrap();
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let expected = produce_messages(&bootstrap, &topic, 10);
        let mut env = sync_env(&bootstrap, &topic, &database);
        let log = dir.path().join("clash.log");
        let mut stopped = RelayProcess::spawn_command("sync", &env, &log);
        let status = stopped.exited_within(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| !s.success()),
            "sync stops: {status:?}"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("exists but is not im-relay's"), "{text}");

        env.insert("IM_RELAY_SYNC_SCHEMA".into(), "im_relay".into());
        env.insert("IM_RELAY_SYNC_ADMIN_LISTEN".into(), free_addr());
        let _sync = start_sync(&env, &dir.path().join("schema.log"));
        let count = |sql: &str| {
            Pg(database.clone())
                .query(sql)
                .and_then(|rows| rows.first()?.first().cloned())
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while count("SELECT COUNT(*)::BIGINT FROM im_relay.messages")
            != Some(Cell::Int(Some(expected.len() as i64)))
        {
            assert!(Instant::now() < deadline, "sync did not fill its schema");
            nudge(&bootstrap, &topic);
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            count("SELECT body FROM public.messages"),
            Some(Cell::Text(Some("theirs".into()))),
            "the other application's table is untouched"
        );
    })
    .await
    .unwrap();
}

/// Records applied by a sync, every kind, from its metrics.
fn applied(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("im_relay_sync_applied_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Records applied per second into SQLite and into PostgreSQL with `fsync=on`, beside what the
/// broker delivers to a consumer that only counts (`./scripts/bench-sync`; not in CI). Timed
/// from the first applied record (the group join left out) to the last; with
/// `SYNC_BENCH_BEFORE` (another build of the binary) that build is measured in the same run.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: ./scripts/bench-sync"]
async fn sync_throughput() {
    let n: usize = std::env::var("SYNC_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    tokio::task::spawn_blocking(move || {
        // n messages and an edit of each: 2n records, every one a write.
        let expected = produce_batched(&bootstrap, &topic, n, 1000);
        let records = 2 * n;
        let consumed = consume_only(&bootstrap, &topic, records);
        eprintln!(
            "SYNC_BENCH consume-only: {records} records in {consumed:.2} s = {:.0} records/s",
            records as f64 / consumed
        );
        let pg = Postgres::start_durable();
        let dir = tempfile::tempdir().unwrap();
        let mut builds = vec![(
            "after",
            std::path::PathBuf::from(env!("CARGO_BIN_EXE_im-relay")),
        )];
        if let Some(before) = std::env::var_os("SYNC_BENCH_BEFORE") {
            builds.insert(0, ("before", before.into()));
        }
        for (build, binary) in &builds {
            for name in ["sqlite", "postgres"] {
                let file = dir.path().join(format!("{build}.db"));
                let url = match name {
                    "sqlite" => format!("sqlite://{}", file.display()),
                    _ => pg.database(),
                };
                let mut env = sync_env(&bootstrap, &topic, &url);
                env.remove("IM_RELAY_SYNC_BATCH_MAX");
                let log = dir.path().join("sync.log");
                let sync = RelayProcess::spawn_binary(binary, "sync", &env, &log);
                let applied = || sync.get("/metrics").map_or(0, |(_, m)| applied(&m));
                let deadline = Instant::now() + Duration::from_secs(900);
                let (mut first, mut at_first) = (None, 0);
                loop {
                    let done = applied();
                    if done > 0 && first.is_none() {
                        first = Some(Instant::now());
                        at_first = done;
                    }
                    if done >= records {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{build} {name}: {done} of {records}"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                let secs = first.unwrap().elapsed().as_secs_f64();
                eprintln!(
                    "SYNC_BENCH {build} {name}: {} records in {secs:.2} s = {:.0} records/s",
                    records - at_first,
                    (records - at_first) as f64 / secs
                );
                let mut db: Box<dyn Tables> = match name {
                    "sqlite" => Box::new(Sqlite(&file)),
                    _ => Box::new(Pg(url.clone())),
                };
                // The messages only: a build from before has no read_all_marks table.
                assert_eq!(db.lines(MESSAGES).unwrap_or_default(), expected);
                drop(sync);
            }
        }
    })
    .await
    .unwrap();
}

/// Seconds a consumer that does nothing but count takes from the first of `records` to the
/// last: what the broker can deliver, the ceiling of any sync.
fn consume_only(bootstrap: &str, topic: &str, records: usize) -> f64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("count-{}", unique()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let (mut seen, mut first) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(900);
    while seen < records {
        assert!(Instant::now() < deadline, "consumed {seen} of {records}");
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    first.unwrap().elapsed().as_secs_f64()
}

/// Offsets live in the database, written with the rows: a new database under the same group
/// is filled from the topic's beginning (with the offsets only in the group, it stayed empty
/// for ever), and a database another group wrote is refused with the reason instead of
/// splitting the topic between two deployments.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_database_under_the_same_group_is_filled_and_another_group_s_is_refused() {
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let expected = produce_messages(&bootstrap, &topic, 50);
        let first = dir.path().join("first.db");
        let env = sync_env(&bootstrap, &topic, &format!("sqlite://{}", first.display()));
        let sync = start_sync(&env, &dir.path().join("first.log"));
        converge(&mut Sqlite(&first), &expected, &bootstrap, &topic);
        drop(sync);
        // The same group (its offsets committed at the end of the topic), a new database.
        let second = dir.path().join("second.db");
        let mut same_group = env.clone();
        same_group.insert(
            "IM_RELAY_SYNC_DATABASE_URL".into(),
            format!("sqlite://{}", second.display()),
        );
        let sync = start_sync(&same_group, &dir.path().join("second.log"));
        converge(&mut Sqlite(&second), &expected, &bootstrap, &topic);
        drop(sync);
        // Another deployment's group on the first database.
        let mut other = env.clone();
        other.insert("IM_RELAY_SYNC_GROUP".into(), "another-deployment".into());
        let log = dir.path().join("other.log");
        let mut sync = RelayProcess::spawn_command("sync", &other, &log);
        let status = sync
            .exited_within(Duration::from_secs(30))
            .expect("sync stops");
        assert!(!status.success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("belongs to consumer group `sync-")
                && text.contains("another-deployment"),
            "{text}"
        );
    })
    .await
    .unwrap();
}

/// Records a partition does not deliver are counted and logged with their offsets, not
/// skipped silently. No broker here deletes records, but tansu 0.6 answers a fetch that starts
/// inside a batch with the next batch: a database whose position is offset 5 of a 10-record
/// batch is handed offset 10 — five records never delivered (`not_delivered`; a position below
/// the log start would be `deleted`, tested against a fake in the unit tests).
#[tokio::test(flavor = "multi_thread")]
async fn records_the_broker_does_not_deliver_are_counted_with_their_offsets() {
    let broker = Broker::start();
    let (topic, bootstrap) = (sync_topic(&broker).await, broker.bootstrap());
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("batch.num.messages", "10")
            .set("linger.ms", "200")
            .create()
            .unwrap();
        for batch in 0..2 {
            for i in batch * 10..batch * 10 + 10 {
                let v = json!({"schema": im_relay::normalize::READ_REPORT_SCHEMA,
                    "id": format!("rr{i}"), "sdk_app_id": 1400000000,
                    "report_account": format!("r{i:02}"), "peer_account": "p",
                    "last_read_time": i});
                let v = v.to_string();
                producer
                    .send(BaseRecord::to(&topic).partition(0).key("k").payload(&v))
                    .expect("queued");
            }
            producer.flush(Duration::from_secs(10)).unwrap();
        }
        // A database that stands at offset 5 of partition 0, as this sync's.
        let file = dir.path().join("state.db");
        let env = sync_env(&bootstrap, &topic, &format!("sqlite://{}", file.display()));
        let mut store =
            im_relay::sync::store::open(&im_relay::config::Database::Sqlite(file.clone())).unwrap();
        store
            .claim(&im_relay::sync::store::Owner {
                group: env["IM_RELAY_SYNC_GROUP"].clone(),
                topics: topic.clone(),
            })
            .unwrap();
        store
            .apply(&[im_relay::sync::store::Item::Offset(
                im_relay::sync::store::Position {
                    group: env["IM_RELAY_SYNC_GROUP"].clone(),
                    topic: topic.clone(),
                    partition: 0,
                    next: 5,
                },
            )])
            .unwrap();
        drop(store);
        let log = dir.path().join("sync.log");
        let sync = start_sync(&env, &log);
        let series = "im_relay_sync_skipped_records_total{reason=\"not_delivered\"}";
        let deadline = Instant::now() + Duration::from_secs(60);
        while series_value(&sync.metrics(), series) != Some(5.0) {
            assert!(
                Instant::now() < deadline,
                "{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(r#""from_offset":5,"to_offset":10,"reason":"not_delivered""#),
            "{text}"
        );
        let readers = Sqlite(&file)
            .query("SELECT reader FROM read_marks ORDER BY reader")
            .unwrap();
        assert_eq!(readers.len(), 10, "offsets 10..20 applied: {readers:?}");
        assert_eq!(
            series_value(
                &sync.metrics(),
                "im_relay_sync_skipped_records_total{reason=\"deleted\"}"
            ),
            Some(0.0)
        );
    })
    .await
    .unwrap();
}
