//! The tables, in SQLite or PostgreSQL: versioned migrations, and one transaction per batch of
//! changes. The SQL is shared; changes go in multi-row upserts (`plan`) whose `DO UPDATE`
//! merges each fact in (min, max, latest version), so applying a batch twice — after a crash,
//! a redelivery — leaves the same rows.
//!
//! Times are integer Unix milliseconds. `elements` and `cloud_custom_data` are JSON text, byte
//! for byte as in the record (not `jsonb`): a `\u0000` inside stays escaped, which is text
//! PostgreSQL can store.

use std::fmt;

use rusqlite::OptionalExtension;
use std::time::Duration;

use crate::config::Database;
use crate::domain::unix_millis;

use super::change::{Change, MessageFacts};

/// A record the tables cannot take: kept in `dead_letters` with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub error: String,
}

/// One item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Change(Change),
    DeadLetter(DeadLetter),
    /// Where the batch ends on a partition, written with its rows: the database, not the
    /// consumer group, says where sync resumes.
    Offset(Position),
}

/// The next offset sync reads on a partition, for its consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub next: i64,
}

/// Whose the database is: the consumer group and topics that first wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub group: String,
    /// The topics, sorted, comma-separated.
    pub topics: String,
}

/// What `claim` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The database is this group's and topics'.
    Ours,
    /// It was no one's: now this group's. Partitions it holds no position for start at their
    /// beginning — a database written before positions were kept in it too (migration 3): the
    /// topic is applied again, to the same rows, rather than trusting the group's offsets,
    /// which may belong to another database.
    New,
}

/// Why a batch was not applied. `data`: this item can never be stored (it goes to the
/// dead-letter table); otherwise the database is unreachable or busy and the batch waits.
/// `fatal`: the database is not one sync can use whatever the wait (tables of the same names
/// that are not its own): sync stops with the reason. `conflict`: another writer's transaction
/// got in the way (a deadlock, a serialization failure): the batch is tried again at once.
#[derive(Debug)]
pub struct StoreError {
    pub data: bool,
    pub fatal: bool,
    pub conflict: bool,
    pub message: String,
}

/// The relations the migrations make: finding one where no migration ran means another
/// application's table (or view, or index) stands in the way.
const OWN_TABLES: [&str; 6] = [
    "messages",
    "read_marks",
    "read_all_marks",
    "dead_letters",
    "messages_by_conversation",
    "messages_by_conversation_history",
];

fn not_ours(table: &str) -> StoreError {
    StoreError::fatal(format!(
        "a table `{table}` exists but is not im-relay's (no im_relay_migrations record): \
         give sync a database of its own, or a schema (IM_RELAY_SYNC_SCHEMA, PostgreSQL)"
    ))
}

impl StoreError {
    /// A database sync cannot use, whatever the wait.
    fn fatal(message: String) -> StoreError {
        StoreError {
            data: false,
            fatal: true,
            conflict: false,
            message,
        }
    }

    /// Not now: the batch waits and is tried again.
    fn unavailable(message: String) -> StoreError {
        StoreError {
            data: false,
            fatal: false,
            conflict: false,
            message,
        }
    }
}

/// A row of `READ_POSITIONS`, its partition number checked.
fn position(topic: String, partition: i64, next: i64) -> Result<(String, i32, i64), StoreError> {
    let partition = i32::try_from(partition)
        .map_err(|_| StoreError::fatal(format!("im_relay_offsets holds partition {partition}")))?;
    Ok((topic, partition, next))
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub trait Store: Send {
    /// Applies `items` in one transaction: all or none.
    fn apply(&mut self, items: &[Item]) -> Result<(), StoreError>;

    /// The positions kept in the database: (topic, partition) → next offset. The database's
    /// own, whichever group wrote them (it has one owner; a moved database keeps them).
    fn positions(&mut self) -> Result<Vec<(String, i32, i64)>, StoreError>;

    /// Makes the database `owner`'s, or says it is another's (a `fatal` error).
    fn claim(&mut self, owner: &Owner) -> Result<Claim, StoreError>;
}

/// The claim's decision, shared by the backends: `found` is the owner row.
fn decide_claim(owner: &Owner, found: Option<Owner>) -> Result<Claim, StoreError> {
    match found {
        Some(f) if f == *owner => Ok(Claim::Ours),
        Some(f) => Err(StoreError::fatal(format!(
            "this database belongs to consumer group `{}` reading [{}], not to `{}` \
             reading [{}]: two deployments must not share one database (give each its own, \
             or its own schema); to move it on purpose, `DELETE FROM im_relay_owner` first",
            f.group, f.topics, owner.group, owner.topics
        ))),
        None => Ok(Claim::New),
    }
}

const READ_OWNER: &str = "SELECT consumer_group, topics FROM im_relay_owner WHERE id = 1";
const WRITE_OWNER: &str =
    "INSERT INTO im_relay_owner (id, consumer_group, topics, claimed_at) VALUES ($1, $2, $3, $4)";
const READ_POSITIONS: &str = "SELECT topic, kafka_partition, next_offset FROM im_relay_offsets";

/// Opens the database and brings its tables up to the latest migration.
pub fn open(db: &Database) -> Result<Box<dyn Store>, StoreError> {
    open_with(db, false)
}

/// `open`; `redact_recalled`: a recalled message's content is written as NULL.
pub fn open_with(db: &Database, redact_recalled: bool) -> Result<Box<dyn Store>, StoreError> {
    match db {
        Database::Mysql { url, password } => Ok(Box::new(mysql::Mysql::open(
            url,
            password.as_ref().map(|p| p.expose().to_owned()),
            redact_recalled,
        )?)),
        Database::Sqlite(path) => Ok(Box::new(Sqlite::open(path, redact_recalled)?)),
        Database::Postgres {
            url,
            password,
            ssl,
            schema,
        } => Ok(Box::new(Postgres::open(
            url,
            password.as_ref().map(|p| p.expose().to_owned()),
            ssl,
            schema.clone(),
            redact_recalled,
        )?)),
    }
}

/// Migrations, in order; `{bytes}` is the dialect's binary type, `{c}` what makes a text
/// comparison byte-wise (SQLite's is already). Never edit one that shipped: add the next.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
    1,
    "messages, read marks, dead letters",
    "CREATE TABLE messages (
        sdk_app_id BIGINT NOT NULL,
        id TEXT NOT NULL,
        msg_key TEXT NOT NULL,
        from_account TEXT NOT NULL,
        to_account TEXT NOT NULL,
        arrived BIGINT NOT NULL,
        msg_time BIGINT,
        elements TEXT,
        cloud_custom_data TEXT,
        recalled_at BIGINT,
        edited_at BIGINT,
        read_at BIGINT,
        elements_version_time BIGINT,
        elements_version_id TEXT,
        ccd_version_time BIGINT,
        ccd_version_id TEXT,
        edit_version_time BIGINT,
        edit_version_id TEXT,
        PRIMARY KEY (sdk_app_id, id)
    );
    CREATE INDEX messages_by_conversation
        ON messages (sdk_app_id, from_account, to_account, msg_time);
    CREATE TABLE read_marks (
        sdk_app_id BIGINT NOT NULL,
        reader TEXT NOT NULL,
        peer TEXT NOT NULL,
        last_read_time BIGINT NOT NULL,
        PRIMARY KEY (sdk_app_id, reader, peer)
    );
    CREATE TABLE dead_letters (
        topic TEXT NOT NULL,
        kafka_partition BIGINT NOT NULL,
        kafka_offset BIGINT NOT NULL,
        record_key {bytes},
        payload {bytes} NOT NULL,
        error TEXT NOT NULL,
        failed_at BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition, kafka_offset)
    );",
    ),
    (
        2,
        "delivery status, online-only, sequence, conversation, updated_at",
        // conv_low/conv_high: the two accounts in byte order, so one index serves a
        // conversation's history whichever way each message went.
        "ALTER TABLE messages ADD COLUMN msg_seq BIGINT;
    ALTER TABLE messages ADD COLUMN send_result BIGINT;
    ALTER TABLE messages ADD COLUMN online_only BIGINT;
    ALTER TABLE messages ADD COLUMN conv_low TEXT;
    ALTER TABLE messages ADD COLUMN conv_high TEXT;
    ALTER TABLE messages ADD COLUMN updated_at BIGINT;
    UPDATE messages SET
        conv_low = CASE WHEN from_account{c} <= to_account{c} THEN from_account ELSE to_account END,
        conv_high = CASE WHEN from_account{c} <= to_account{c} THEN to_account ELSE from_account END;
    CREATE INDEX messages_by_conversation_history
        ON messages (sdk_app_id, conv_low, conv_high, msg_time, msg_seq);",
    ),
    (
        3,
        "offsets kept with the rows, the database's owner",
        "CREATE TABLE im_relay_offsets (
        consumer_group TEXT NOT NULL,
        topic TEXT NOT NULL,
        kafka_partition BIGINT NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition)
    );
    CREATE TABLE im_relay_owner (
        id BIGINT PRIMARY KEY,
        consumer_group TEXT NOT NULL,
        topics TEXT NOT NULL,
        claimed_at BIGINT NOT NULL
    );",
    ),
    (
        4,
        "read-all marks",
        "CREATE TABLE read_all_marks (
        sdk_app_id BIGINT NOT NULL,
        reader TEXT NOT NULL,
        read_all_time BIGINT NOT NULL,
        PRIMARY KEY (sdk_app_id, reader)
    );",
    ),
];

/// `new` replaces `old` when it says something and `old` is absent or earlier: by time, then
/// id, then (two different edits in the same millisecond share an id; copies of one message
/// share its version) by `value` when given — a value beats none, then the byte-wise greater.
/// Every text comparison is byte-wise (`{c}`), so no collation picks the winner.
fn newer(col: &str, value: Option<&str>) -> String {
    let tie = value.map_or(String::new(), |v| {
        format!(
            " OR (excluded.{col}_version_id = messages.{col}_version_id \
               AND excluded.{v} IS NOT NULL \
               AND (messages.{v} IS NULL OR excluded.{v}{{c}} > messages.{v}{{c}}))"
        )
    });
    format!(
        "(excluded.{col}_version_time IS NOT NULL AND (messages.{col}_version_time IS NULL \
         OR excluded.{col}_version_time > messages.{col}_version_time \
         OR (excluded.{col}_version_time = messages.{col}_version_time \
             AND (excluded.{col}_version_id{{c}} > messages.{col}_version_id{{c}}{tie}))))"
    )
}

/// The version columns of `col`, replaced when `newer` holds.
///
/// The id before the time, and (in `versioned`) the value before both: MySQL evaluates an
/// `ON DUPLICATE KEY UPDATE` left to right, each assignment seeing the ones before it. In
/// this order a later `newer` can differ from the first only where the column it sets
/// already equals the new value (a tie decided by the value leaves the id and time equal).
fn version(col: &str, newer: &str) -> String {
    format!(
        "{col}_version_id = CASE WHEN {newer} THEN excluded.{col}_version_id \
             ELSE messages.{col}_version_id END, \
         {col}_version_time = CASE WHEN {newer} THEN excluded.{col}_version_time \
             ELSE messages.{col}_version_time END"
    )
}

/// `value` and its version, replaced together by a newer version. `redact`: the value is
/// NULL once the message is recalled (the versions still merge).
fn versioned(value: &str, col: &str, redact: bool) -> String {
    let n = newer(col, Some(value));
    let mut merged = format!("CASE WHEN {n} THEN excluded.{value} ELSE messages.{value} END");
    if redact {
        merged = format!(
            "CASE WHEN COALESCE(excluded.recalled_at, messages.recalled_at) IS NOT NULL \
             THEN NULL ELSE {merged} END"
        );
    }
    format!("{value} = {merged}, {}", version(col, &n))
}

/// `edited_at`: the latest edit's time. Copies of one edit (same version) may carry different
/// arrival times when Tencent sent no `EventTime`: the earliest is kept, whatever the order.
fn edited_at() -> String {
    let n = newer("edit", None);
    let same = "(excluded.edit_version_time = messages.edit_version_time \
                 AND excluded.edit_version_id = messages.edit_version_id)";
    format!(
        "edited_at = CASE WHEN {n} THEN excluded.edited_at \
             WHEN {same} AND excluded.edited_at < messages.edited_at THEN excluded.edited_at \
             ELSE messages.edited_at END, {}",
        version("edit", &n)
    )
}

fn least(col: &str) -> String {
    format!(
        "{col} = CASE WHEN excluded.{col} IS NOT NULL AND (messages.{col} IS NULL \
         OR excluded.{col} < messages.{col}) THEN excluded.{col} ELSE messages.{col} END"
    )
}

/// The one statement every message fact goes through. `redact`: once any record says the
/// message was recalled, its content is NULL — whatever came before or comes after.
fn merge_message_sql(redact: bool) -> String {
    // The parties (and the key, and the conversation made of them): the message's own copy
    // over what an event said, and between copies that differ (two senders sharing a
    // `MsgKey`), the byte-wise least (from, to) — whatever came first.
    let better = "(excluded.arrived > messages.arrived OR (excluded.arrived = messages.arrived \
         AND (excluded.from_account{c} < messages.from_account{c} \
         OR (excluded.from_account = messages.from_account \
             AND excluded.to_account{c} < messages.to_account{c}))))";
    let party = |col: &str| {
        format!("{col} = CASE WHEN {better} THEN excluded.{col} ELSE messages.{col} END")
    };
    format!(
        "INSERT INTO messages (sdk_app_id, id, msg_key, from_account, to_account, arrived, \
             msg_time, elements, elements_version_time, elements_version_id, cloud_custom_data, \
             ccd_version_time, ccd_version_id, recalled_at, edited_at, edit_version_time, \
             edit_version_id, read_at, msg_seq, send_result, online_only, conv_low, conv_high, \
             updated_at) \
         VALUES {{values}} \
         ON CONFLICT (sdk_app_id, id) DO UPDATE SET \
             {}, {}, {}, {}, {}, \
             arrived = CASE WHEN excluded.arrived = 1 THEN 1 ELSE messages.arrived END, \
             {}, {}, {}, {}, {}, {}, {}, {}, {}, updated_at = excluded.updated_at",
        // `to` before `from`, `arrived` after all (see `version`): `better` reads them.
        party("msg_key"),
        party("conv_low"),
        party("conv_high"),
        party("to_account"),
        party("from_account"),
        least("msg_time"),
        versioned("elements", "elements", redact),
        versioned("cloud_custom_data", "ccd", redact),
        least("recalled_at"),
        edited_at(),
        least("read_at"),
        // The message's own facts; copies that differ (a callback's and a backfill's) give
        // the least, whatever their order.
        least("msg_seq"),
        least("send_result"),
        least("online_only"),
    )
}

const MERGE_READ_MARK: &str = "INSERT INTO read_marks (sdk_app_id, reader, peer, last_read_time) \
     VALUES {values} \
     ON CONFLICT (sdk_app_id, reader, peer) DO UPDATE SET last_read_time = \
         CASE WHEN excluded.last_read_time > read_marks.last_read_time \
         THEN excluded.last_read_time ELSE read_marks.last_read_time END";

// Latest writer wins, not the greatest: a topic made again starts at 0, and going back only
// means records applied twice (the same rows).
const WRITE_OFFSET: &str = "INSERT INTO im_relay_offsets (consumer_group, topic, \
         kafka_partition, next_offset, updated_at) \
     VALUES {values} \
     ON CONFLICT (topic, kafka_partition) DO UPDATE SET \
         consumer_group = excluded.consumer_group, next_offset = excluded.next_offset, \
         updated_at = excluded.updated_at";

const MERGE_READ_ALL: &str = "INSERT INTO read_all_marks (sdk_app_id, reader, read_all_time) \
     VALUES {values} \
     ON CONFLICT (sdk_app_id, reader) DO UPDATE SET read_all_time = \
         CASE WHEN excluded.read_all_time > read_all_marks.read_all_time \
         THEN excluded.read_all_time ELSE read_all_marks.read_all_time END";

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, \
         record_key, payload, error, failed_at) \
     VALUES {values} \
     ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING";

/// A statement parameter, in the types both drivers take.
enum Param<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Bytes(Option<&'a [u8]>),
}

/// An item's parameters, in its statement's column order.
fn params(item: &Item) -> Vec<Param<'_>> {
    use Param::{Bytes, Int, Text};
    match item {
        Item::Change(Change::Message(f)) => message_params(f),
        Item::Change(Change::ReadMark {
            sdk_app_id,
            reader,
            peer,
            last_read_time,
        }) => vec![
            Int(Some(*sdk_app_id)),
            Text(Some(reader)),
            Text(Some(peer)),
            Int(Some(*last_read_time)),
        ],
        Item::Change(Change::ReadAll {
            sdk_app_id,
            reader,
            read_all_time,
        }) => vec![
            Int(Some(*sdk_app_id)),
            Text(Some(reader)),
            Int(Some(*read_all_time)),
        ],
        Item::Offset(p) => vec![
            Text(Some(&p.group)),
            Text(Some(&p.topic)),
            Int(Some(i64::from(p.partition))),
            Int(Some(p.next)),
            Int(Some(unix_millis() as i64)),
        ],
        Item::DeadLetter(d) => vec![
            Text(Some(&d.topic)),
            Int(Some(i64::from(d.partition))),
            Int(Some(d.offset)),
            Bytes(d.key.as_deref()),
            Bytes(Some(&d.payload)),
            Text(Some(&d.error)),
            Int(Some(unix_millis() as i64)),
        ],
    }
}

/// The row an item writes: its statement (the variant's order: messages, read marks, dead
/// letters) and its primary key.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Message(i64, &'a str),
    ReadMark(i64, &'a str, &'a str),
    ReadAll(i64, &'a str),
    DeadLetter(&'a str, i32, i64),
    Offset(&'a str, i32),
}

impl Key<'_> {
    fn of(item: &Item) -> Key<'_> {
        match item {
            Item::Change(Change::Message(f)) => Key::Message(f.sdk_app_id, &f.id),
            Item::Change(Change::ReadMark {
                sdk_app_id,
                reader,
                peer,
                ..
            }) => Key::ReadMark(*sdk_app_id, reader, peer),
            Item::Change(Change::ReadAll {
                sdk_app_id, reader, ..
            }) => Key::ReadAll(*sdk_app_id, reader),
            Item::DeadLetter(d) => Key::DeadLetter(&d.topic, d.partition, d.offset),
            Item::Offset(p) => Key::Offset(&p.topic, p.partition),
        }
    }

    /// Index into `statements()` and `WIDTHS`.
    fn statement(&self) -> usize {
        match self {
            Key::Message(..) => 0,
            Key::ReadMark(..) => 1,
            Key::DeadLetter(..) => 2,
            Key::Offset(..) => 3,
            Key::ReadAll(..) => 4,
        }
    }
}

/// Parameters per row of each statement.
const WIDTHS: [usize; 5] = [24, 4, 7, 5, 3];

/// Rows per statement: enough to spare the round trips, few enough for SQLite's 32,766
/// parameters.
const ROWS: usize = 256;

/// The statements a batch runs, `(statement, rows)`: up to `ROWS` rows each, no row twice in
/// one (an upsert cannot touch a row twice; a repeated key goes to a later round), keys
/// ascending, so two writers take row locks in the same order and cannot deadlock (a later
/// round only meets rows the first already locked). Order changes nothing else: the merge
/// is a function of the set of records.
fn plan(items: &[Item]) -> Vec<(usize, Vec<&Item>)> {
    let mut keyed: Vec<(Key<'_>, &Item)> = items.iter().map(|i| (Key::of(i), i)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut round = vec![0usize; keyed.len()];
    for i in 1..keyed.len() {
        if keyed[i].0 == keyed[i - 1].0 {
            round[i] = round[i - 1] + 1;
        }
    }
    let mut order: Vec<usize> = (0..keyed.len()).collect();
    order.sort_by_key(|&i| round[i]);
    let mut out: Vec<(usize, Vec<&Item>)> = Vec::new();
    let mut last = None;
    for i in order {
        let which = keyed[i].0.statement();
        match out.last_mut() {
            Some((_, rows)) if last == Some((round[i], which)) && rows.len() < ROWS => {
                rows.push(keyed[i].1);
            }
            _ => out.push((which, vec![keyed[i].1])),
        }
        last = Some((round[i], which));
    }
    // In pieces of a power of two rows: a few statement shapes to prepare, not one per size.
    out.into_iter()
        .flat_map(|(which, rows)| {
            let mut pieces = Vec::new();
            let mut rest = &rows[..];
            while !rest.is_empty() {
                let n = 1 << rest.len().ilog2();
                pieces.push((which, rest[..n].to_vec()));
                rest = &rest[n..];
            }
            pieces
        })
        .collect()
}

/// Statement `which` for `rows` rows, parameter N written `mark(N)`.
fn sql(template: &str, which: usize, rows: usize, mark: &dyn Fn(usize) -> String) -> String {
    let width = WIDTHS[which];
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let cols: Vec<String> = (1..=width).map(|c| mark(r * width + c)).collect();
            format!("({})", cols.join(", "))
        })
        .collect();
    template.replace("{values}", &values.join(", "))
}

fn message_params(f: &MessageFacts) -> Vec<Param<'_>> {
    use Param::{Int, Text};
    let (low, high) = f.conversation();
    let (elements, e_time, e_id) = match &f.elements {
        Some((e, v)) => (Some(e.as_str()), Some(v.time), Some(v.id.as_str())),
        None => (None, None, None),
    };
    let (ccd, c_time, c_id) = match &f.cloud_custom_data {
        Some((c, v)) => (c.as_deref(), Some(v.time), Some(v.id.as_str())),
        None => (None, None, None),
    };
    let (edited, ed_time, ed_id) = match &f.edited_at {
        Some((at, v)) => (Some(*at), Some(v.time), Some(v.id.as_str())),
        None => (None, None, None),
    };
    vec![
        Int(Some(f.sdk_app_id)),
        Text(Some(&f.id)),
        Text(Some(&f.msg_key)),
        Text(Some(&f.from_account)),
        Text(Some(&f.to_account)),
        Int(Some(i64::from(f.arrived))),
        Int(f.msg_time),
        Text(elements),
        Int(e_time),
        Text(e_id),
        Text(ccd),
        Int(c_time),
        Text(c_id),
        Int(f.recalled_at),
        Int(edited),
        Int(ed_time),
        Text(ed_id),
        Int(f.read_at),
        Int(f.msg_seq),
        Int(f.send_result),
        Int(f.online_only.map(i64::from)),
        Text(Some(low)),
        Text(Some(high)),
        Int(Some(unix_millis() as i64)),
    ]
}

fn statements(redact: bool) -> [String; 5] {
    [
        merge_message_sql(redact),
        MERGE_READ_MARK.to_owned(),
        INSERT_DEAD_LETTER.to_owned(),
        WRITE_OFFSET.to_owned(),
        MERGE_READ_ALL.to_owned(),
    ]
}

#[path = "store_mysql.rs"]
mod mysql;

// --- SQLite -------------------------------------------------------------------------------

struct Sqlite {
    conn: rusqlite::Connection,
    sql: [String; 5],
}

fn sqlite_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    let data = matches!(
        e.sqlite_error_code(),
        Some(C::ConstraintViolation | C::TypeMismatch | C::TooBig)
    );
    StoreError {
        data,
        fatal: false,
        conflict: false,
        message: format!("sqlite: {e}"),
    }
}

impl Sqlite {
    fn open(path: &std::path::Path, redact: bool) -> Result<Sqlite, StoreError> {
        let conn = rusqlite::Connection::open(path).map_err(sqlite_error)?;
        // WAL for readers beside the writer; FULL so a committed batch survives a power cut
        // before its Kafka offsets are committed after it.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite_error)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sqlite_error)?;
        // One statement per (kind, row count) a batch uses.
        conn.set_prepared_statement_cache_capacity(64);
        let mut s = Sqlite {
            conn,
            // SQLite numbers parameters `?N`.
            sql: statements(redact).map(|q| q.replace("{c}", "")),
        };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sqlite_error)?;
        tx.execute_batch(MIGRATIONS_TABLE).map_err(sqlite_error)?;
        let done: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM im_relay_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(sqlite_error)?;
        if done == 0 {
            for table in OWN_TABLES {
                let found: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM sqlite_master WHERE name = ?1",
                        [table],
                        |r| r.get(0),
                    )
                    .map_err(sqlite_error)?;
                if found > 0 {
                    return Err(not_ours(table));
                }
            }
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > done) {
            tx.execute_batch(&sql.replace("{bytes}", "BLOB").replace("{c}", ""))
                .map_err(sqlite_error)?;
            tx.execute(
                "INSERT INTO im_relay_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![version, name, unix_millis() as i64],
            )
            .map_err(sqlite_error)?;
        }
        tx.commit().map_err(sqlite_error)
    }
}

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS im_relay_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

impl Store for Sqlite {
    fn apply(&mut self, items: &[Item]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(sqlite_error)?;
        for (which, rows) in plan(items) {
            let q = sql(&self.sql[which], which, rows.len(), &|n| format!("?{n}"));
            let mut stmt = tx.prepare_cached(&q).map_err(sqlite_error)?;
            let values: Vec<rusqlite::types::Value> = rows
                .iter()
                .flat_map(|item| params(item))
                .map(|p| match p {
                    Param::Int(v) => v.map_or(rusqlite::types::Value::Null, Into::into),
                    Param::Text(v) => v.map_or(rusqlite::types::Value::Null, |t| {
                        rusqlite::types::Value::Text(t.to_owned())
                    }),
                    Param::Bytes(v) => v.map_or(rusqlite::types::Value::Null, |b| {
                        rusqlite::types::Value::Blob(b.to_vec())
                    }),
                })
                .collect();
            stmt.execute(rusqlite::params_from_iter(values))
                .map_err(sqlite_error)?;
        }
        tx.commit().map_err(sqlite_error)
    }

    fn positions(&mut self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(READ_POSITIONS).map_err(sqlite_error)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sqlite_error)?;
        rows.collect::<Result<_, _>>().map_err(sqlite_error)
    }

    fn claim(&mut self, owner: &Owner) -> Result<Claim, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sqlite_error)?;
        let found = tx
            .query_row(READ_OWNER, [], |r| {
                Ok(Owner {
                    group: r.get(0)?,
                    topics: r.get(1)?,
                })
            })
            .optional()
            .map_err(sqlite_error)?;
        let claim = decide_claim(owner, found)?;
        if claim != Claim::Ours {
            tx.execute(
                &WRITE_OWNER.replace('$', "?"),
                rusqlite::params![1, owner.group, owner.topics, unix_millis() as i64],
            )
            .map_err(sqlite_error)?;
        }
        tx.commit().map_err(sqlite_error)?;
        Ok(claim)
    }
}

// --- PostgreSQL ---------------------------------------------------------------------------

struct Postgres {
    config: postgres::Config,
    /// `sync_schema`, made if missing.
    schema: Option<String>,
    /// `None`: `sslmode=disable`.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    client: Option<postgres::Client>,
    sql: [String; 5],
    /// Statements prepared on `client`, by (statement, rows).
    prepared: std::collections::HashMap<(usize, usize), postgres::Statement>,
}

fn pg_error(e: postgres::Error) -> StoreError {
    // Class 22 (data exception) and 23 (integrity): this item, not the server.
    let data = e
        .code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
    // 40P01 deadlock_detected, 40001 serialization_failure: retry, nothing is wrong.
    let conflict = e
        .code()
        .is_some_and(|c| matches!(c.code(), "40P01" | "40001"));
    // The cause is in the source chain ("error performing TLS handshake" alone says not which
    // certificate, "db error" not which refusal).
    let mut message = format!("postgres: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    StoreError {
        data,
        fatal: false,
        conflict,
        message,
    }
}

impl Postgres {
    fn open(
        url: &str,
        password: Option<String>,
        ssl: &crate::config::PgSsl,
        schema: Option<String>,
        redact: bool,
    ) -> Result<Postgres, StoreError> {
        use crate::config::SslMode;
        use postgres::config::Host;
        let mut config: postgres::Config = url.parse().map_err(pg_error)?;
        let config_error = |message: String| StoreError::fatal(format!("postgres TLS: {message}"));
        let hosts = config.get_hosts();
        let sockets = hosts.iter().filter(|h| matches!(h, Host::Unix(_))).count();
        // As libpq: no TLS over a Unix socket. A certificate is checked against `host`, so
        // TLS needs one (`hostaddr` alone names no certificate).
        let tls = if ssl.mode == SslMode::Disable || (sockets > 0 && sockets == hosts.len()) {
            None
        } else if sockets > 0 {
            return Err(config_error(
                "a Unix socket beside TCP hosts: give one kind, or sslmode=disable".into(),
            ));
        } else if hosts.is_empty() {
            return Err(config_error(
                "hostaddr without host: give host= (the name on the server's certificate)".into(),
            ));
        } else {
            super::tls::connector(ssl).map_err(config_error)?
        };
        config.ssl_mode(match (&tls, ssl.mode) {
            (None, _) => postgres::config::SslMode::Disable,
            (Some(_), SslMode::Prefer) => postgres::config::SslMode::Prefer,
            (Some(_), _) => postgres::config::SslMode::Require,
        });
        if let Some(p) = password {
            config.password(p);
        }
        config.connect_timeout(Duration::from_secs(5));
        config.application_name("im-relay-sync");
        // A half-open connection (a network partition) must fail, not hang: keepalives, a TCP
        // timeout and a statement timeout turn it into an error the batch is retried on.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(30));
        // Added to the URL's own `options`, not in their place.
        let mut ours = "-c statement_timeout=60000".to_owned();
        if let Some(schema) = &schema {
            ours.push_str(&format!(" -c search_path={schema}"));
        }
        let options = match config.get_options() {
            Some(given) => format!("{given} {ours}"),
            None => ours,
        };
        config.options(&options);
        let mut s = Postgres {
            config,
            schema,
            tls,
            client: None,
            prepared: Default::default(),
            sql: statements(redact).map(|q| q.replace("{c}", " COLLATE \"C\"")),
        };
        s.migrate()?;
        Ok(s)
    }

    /// The connection, made again after it was lost.
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.as_ref().is_none_or(postgres::Client::is_closed) {
            // Statements live on their connection.
            self.prepared.clear();
            let client = match &self.tls {
                Some(tls) => self.config.connect(tls.clone()),
                None => self.config.connect(postgres::NoTls),
            };
            self.client = Some(client.map_err(pg_error)?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let schema = self.schema.clone();
        let client = self.client()?;
        let mut tx = client.transaction().map_err(pg_error)?;
        // Two syncs starting together: one migrates, the other waits and finds it done.
        tx.execute("SELECT pg_advisory_xact_lock(7302241)", &[])
            .map_err(pg_error)?;
        // A migration over a large table (an UPDATE of every row, an index) may take longer
        // than the statement timeout every other statement gets.
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .map_err(pg_error)?;
        if let Some(schema) = &schema {
            // Made only when missing: CREATE SCHEMA IF NOT EXISTS asks for the database's
            // CREATE privilege even when the schema exists (a DBA may have made it for us).
            let exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    &[schema],
                )
                .map_err(pg_error)?
                .get(0);
            if !exists {
                // Checked by the configuration: a lower-case identifier; quoted all the same.
                tx.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
                    .map_err(pg_error)?;
            }
        }
        tx.batch_execute(MIGRATIONS_TABLE).map_err(pg_error)?;
        let done: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM im_relay_migrations",
                &[],
            )
            .map_err(pg_error)?
            .get(0);
        if done == 0 {
            for table in OWN_TABLES {
                // In the search path's first schema, where migration 1 would make it.
                let found: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_class \
                         WHERE relnamespace = current_schema()::regnamespace AND relname = $1)",
                        &[&table],
                    )
                    .map_err(pg_error)?
                    .get(0);
                if found {
                    return Err(not_ours(table));
                }
            }
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > done) {
            tx.batch_execute(
                &sql.replace("{bytes}", "BYTEA")
                    .replace("{c}", " COLLATE \"C\""),
            )
            .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO im_relay_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[version, name, &(unix_millis() as i64)],
            )
            .map_err(pg_error)?;
        }
        tx.commit().map_err(pg_error)
    }
}

impl Store for Postgres {
    fn apply(&mut self, items: &[Item]) -> Result<(), StoreError> {
        let result = self.apply_once(items);
        if result.is_err() {
            // A statement the server no longer has (a pooler that does not keep them) would
            // fail every batch after: prepare again.
            self.prepared.clear();
        }
        result
    }

    fn positions(&mut self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let rows = self
            .client()?
            .query(READ_POSITIONS, &[])
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| position(r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    fn claim(&mut self, owner: &Owner) -> Result<Claim, StoreError> {
        let mut tx = self.client()?.transaction().map_err(pg_error)?;
        // Two syncs starting together on one database: one claims, the other sees it.
        tx.execute("LOCK TABLE im_relay_owner IN EXCLUSIVE MODE", &[])
            .map_err(pg_error)?;
        let found = tx
            .query_opt(READ_OWNER, &[])
            .map_err(pg_error)?
            .map(|r| Owner {
                group: r.get(0),
                topics: r.get(1),
            });
        let claim = decide_claim(owner, found)?;
        if claim != Claim::Ours {
            tx.execute(
                WRITE_OWNER,
                &[&1i64, &owner.group, &owner.topics, &(unix_millis() as i64)],
            )
            .map_err(pg_error)?;
        }
        tx.commit().map_err(pg_error)?;
        Ok(claim)
    }
}

impl Postgres {
    fn apply_once(&mut self, items: &[Item]) -> Result<(), StoreError> {
        self.client()?;

        let Postgres {
            client,
            prepared,
            sql: templates,
            ..
        } = self;
        let mut tx = client
            .as_mut()
            .expect("connected above")
            .transaction()
            .map_err(pg_error)?;
        for (which, rows) in plan(items) {
            let statement = match prepared.get(&(which, rows.len())) {
                Some(s) => s.clone(),
                None => {
                    let s = tx
                        .prepare(&sql(&templates[which], which, rows.len(), &|n| {
                            format!("${n}")
                        }))
                        .map_err(pg_error)?;
                    prepared.insert((which, rows.len()), s.clone());
                    s
                }
            };
            let boxed: Vec<Box<dyn postgres::types::ToSql + Sync + '_>> = rows
                .iter()
                .flat_map(|item| params(item))
                .map(|p| -> Box<dyn postgres::types::ToSql + Sync + '_> {
                    match p {
                        Param::Int(v) => Box::new(v),
                        Param::Text(v) => Box::new(v),
                        Param::Bytes(v) => Box::new(v),
                    }
                })
                .collect();
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                boxed.iter().map(|b| b.as_ref()).collect();
            tx.execute(&statement, &refs).map_err(pg_error)?;
        }
        tx.commit().map_err(pg_error)
    }
}
