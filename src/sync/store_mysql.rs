//! MariaDB and MySQL: the same statements and merge rules as the other backends, in MySQL's
//! words — `ON DUPLICATE KEY UPDATE` with `VALUES(c)` for `excluded.c` (the shared SQL orders
//! its assignments for MySQL's left-to-right evaluation: see `version`). Ids, accounts and
//! keys are `VARBINARY`: compared byte by byte with no padding (`utf8mb4_bin` ignores
//! trailing spaces: `'bob'` and `'bob '` would be one key), their lengths in bytes as the
//! relay bounds them (an id up to 800, an account or `MsgKey` up to 256), under InnoDB's
//! 3,072-byte key limit. JSON text is `LONGTEXT` in `utf8mb4`.

use std::time::Duration;

use mysql::prelude::Queryable;

use super::{
    Claim, Item, MIGRATIONS_TABLE, OWN_TABLES, Owner, Param, READ_OWNER, READ_POSITIONS, Store,
    StoreError, WRITE_OWNER, decide_claim, not_ours, params, plan, position, sql, statements,
};
use crate::domain::unix_millis;

/// The tables as the other backends' migrations leave them (this backend started there):
/// version 4 is the first MySQL has.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    4,
    "messages, read marks, read-all marks, dead letters, offsets, owner",
    "CREATE TABLE IF NOT EXISTS messages (
        sdk_app_id BIGINT NOT NULL,
        id VARBINARY(800) NOT NULL,
        msg_key VARBINARY(256) NOT NULL,
        from_account VARBINARY(256) NOT NULL,
        to_account VARBINARY(256) NOT NULL,
        arrived BIGINT NOT NULL,
        msg_time BIGINT,
        elements LONGTEXT,
        cloud_custom_data LONGTEXT,
        recalled_at BIGINT,
        edited_at BIGINT,
        read_at BIGINT,
        elements_version_time BIGINT,
        elements_version_id VARBINARY(2048),
        ccd_version_time BIGINT,
        ccd_version_id VARBINARY(2048),
        edit_version_time BIGINT,
        edit_version_id VARBINARY(2048),
        msg_seq BIGINT,
        send_result BIGINT,
        online_only BIGINT,
        conv_low VARBINARY(256),
        conv_high VARBINARY(256),
        updated_at BIGINT,
        PRIMARY KEY (sdk_app_id, id),
        INDEX messages_by_conversation_history (sdk_app_id, conv_low, conv_high, msg_time, msg_seq)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
    CREATE TABLE IF NOT EXISTS read_marks (
        sdk_app_id BIGINT NOT NULL,
        reader VARBINARY(256) NOT NULL,
        peer VARBINARY(256) NOT NULL,
        last_read_time BIGINT NOT NULL,
        PRIMARY KEY (sdk_app_id, reader, peer)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
    CREATE TABLE IF NOT EXISTS read_all_marks (
        sdk_app_id BIGINT NOT NULL,
        reader VARBINARY(256) NOT NULL,
        read_all_time BIGINT NOT NULL,
        PRIMARY KEY (sdk_app_id, reader)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
    CREATE TABLE IF NOT EXISTS dead_letters (
        topic VARBINARY(249) NOT NULL,
        kafka_partition BIGINT NOT NULL,
        kafka_offset BIGINT NOT NULL,
        record_key LONGBLOB,
        payload LONGBLOB NOT NULL,
        error LONGTEXT NOT NULL,
        failed_at BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition, kafka_offset)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
    CREATE TABLE IF NOT EXISTS im_relay_offsets (
        consumer_group LONGBLOB NOT NULL,
        topic VARBINARY(249) NOT NULL,
        kafka_partition BIGINT NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (topic, kafka_partition)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
    CREATE TABLE IF NOT EXISTS im_relay_owner (
        id BIGINT PRIMARY KEY,
        consumer_group LONGBLOB NOT NULL,
        topics LONGBLOB NOT NULL,
        claimed_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
)];

/// A shared statement in MySQL's words.
fn translate(q: &str) -> String {
    let q = q.replace("{c}", "");
    let q = match q.split_once(" ON CONFLICT (") {
        Some((head, tail)) => {
            let (_, action) = tail.split_once(") DO ").expect("ON CONFLICT (…) DO …");
            match action.strip_prefix("UPDATE SET ") {
                Some(set) => format!("{head} ON DUPLICATE KEY UPDATE {set}"),
                // DO NOTHING: an assignment that changes nothing (INSERT IGNORE would also
                // swallow the errors that make a dead letter).
                None => format!("{head} ON DUPLICATE KEY UPDATE kafka_offset = kafka_offset"),
            }
        }
        None => q,
    };
    // excluded.col → VALUES(col)
    let mut out = String::with_capacity(q.len());
    let mut rest = q.as_str();
    while let Some(at) = rest.find("excluded.") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "excluded.".len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        out.push_str(&format!("VALUES({})", &after[..end]));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `$N` parameters as MySQL's `?` (they appear in order in the shared statements).
fn positional(q: &str) -> String {
    let mut out = String::with_capacity(q.len());
    let mut chars = q.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// Values the table cannot take: incorrect string, too long, out of range, bad date, NULL in
/// a NOT NULL column.
const DATA_ERRORS: [u16; 5] = [1366, 1406, 1264, 1292, 1048];
/// Another writer: deadlock, lock wait timeout.
const CONFLICT_ERRORS: [u16; 2] = [1213, 1205];

fn code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}

/// Whether a connection that returned `e` is still good to use (the error was about the data
/// or another writer, and the transaction was rolled back).
fn connection_kept(e: &mysql::Error) -> bool {
    code(e).is_some_and(|c| DATA_ERRORS.contains(&c) || CONFLICT_ERRORS.contains(&c))
}

/// A statement larger than the server takes (`max_allowed_packet`); the server closes the
/// connection after it.
fn too_large(e: &mysql::Error) -> bool {
    matches!(
        e,
        mysql::Error::DriverError(mysql::DriverError::PacketTooLarge)
    ) || matches!(e, mysql::Error::MySqlError(m) if matches!(m.code, 1153 | 1301))
}

fn mysql_error(e: mysql::Error) -> StoreError {
    // One record larger than the server takes is this item's fault too (statements are
    // split to fit).
    let data = code(&e).is_some_and(|c| DATA_ERRORS.contains(&c)) || too_large(&e);
    let conflict = code(&e).is_some_and(|c| CONFLICT_ERRORS.contains(&c));
    StoreError {
        data,
        fatal: false,
        conflict,
        message: format!("mysql: {e}"),
    }
}

pub(super) struct Mysql {
    opts: mysql::Opts,
    conn: Option<mysql::Conn>,
    sql: [String; 5],
    /// Parameter bytes one statement may carry: half the server's `max_allowed_packet`.
    budget: usize,
}

impl Mysql {
    pub(super) fn open(
        url: &str,
        password: Option<String>,
        redact: bool,
    ) -> Result<Mysql, StoreError> {
        let opts =
            mysql::Opts::from_url(url).map_err(|e| StoreError::fatal(format!("mysql URL: {e}")))?;
        let mut builder = mysql::OptsBuilder::from_opts(opts);
        if password.is_some() {
            builder = builder.pass(password);
        }
        let opts: mysql::Opts = builder
            .tcp_connect_timeout(Some(Duration::from_secs(5)))
            // A half-open connection fails instead of hanging.
            .read_timeout(Some(Duration::from_secs(60)))
            .write_timeout(Some(Duration::from_secs(60)))
            .tcp_keepalive_time_ms(Some(10_000))
            .prefer_socket(false)
            .init(vec![
                "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
                // Refuse what does not fit rather than cut it.
                "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
            ])
            .into();
        let mut s = Mysql {
            opts,
            conn: None,
            sql: statements(redact).map(|q| translate(&q)),
            budget: 1 << 20,
        };
        s.migrate()?;
        Ok(s)
    }

    fn conn(&mut self) -> Result<&mut mysql::Conn, StoreError> {
        if self.conn.is_none() {
            let mut conn = mysql::Conn::new(self.opts.clone()).map_err(mysql_error)?;
            let max: Option<u64> = conn
                .query_first("SELECT @@max_allowed_packet")
                .map_err(mysql_error)?;
            self.budget = max.map_or(1 << 20, |m| (m / 2) as usize).max(64 << 10);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Runs `f`; a failure that is not about the data drops the connection (made again next
    /// time).
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut mysql::Conn) -> Result<T, mysql::Error>,
    ) -> Result<T, StoreError> {
        let result = f(self.conn()?);
        if result
            .as_ref()
            .is_err_and(|e| !connection_kept(e) || too_large(e))
        {
            self.conn = None;
        }
        result.map_err(mysql_error)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // Two syncs starting together: one migrates, the other waits and finds it done.
        self.with(|c| locked(c, "migrate", migrate_locked))?
    }
}

/// `f` under the server lock `name` of this database (syncs of other databases on the server
/// do not wait for it), released whatever `f` did: a lock left held by a kept connection would
/// stall every later start.
fn locked<T>(
    c: &mut mysql::Conn,
    name: &str,
    f: impl FnOnce(&mut mysql::Conn) -> Result<Result<T, StoreError>, mysql::Error>,
) -> Result<Result<T, StoreError>, mysql::Error> {
    let got: Option<Option<i64>> = c.exec_first(
        "SELECT GET_LOCK(CONCAT('im_relay_', ?, ':', DATABASE()), 60)",
        (name,),
    )?;
    if got.flatten() != Some(1) {
        return Ok(Err(StoreError::unavailable(format!(
            "mysql: another sync holds the {name} lock"
        ))));
    }
    let outcome = f(c);
    c.exec_drop(
        "SELECT RELEASE_LOCK(CONCAT('im_relay_', ?, ':', DATABASE()))",
        (name,),
    )?;
    outcome
}

/// The migrations not applied yet (DDL commits by itself in MySQL: each is recorded once
/// done; one that fails half-way is a clear error, not retried silently).
fn migrate_locked(c: &mut mysql::Conn) -> Result<Result<(), StoreError>, mysql::Error> {
    c.query_drop(format!(
        "{MIGRATIONS_TABLE} ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ))?;
    let done: i64 = c
        .query_first("SELECT COALESCE(MAX(version), 0) FROM im_relay_migrations")?
        .unwrap_or(0);
    let begun: Option<i64> =
        c.query_first("SELECT version FROM im_relay_migrations WHERE version < 0")?;
    if done == 0 && begun.is_none() {
        for table in OWN_TABLES {
            let found: Option<i64> = c.exec_first(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_name = ?",
                (table,),
            )?;
            if found.unwrap_or(0) > 0 {
                return Ok(Err(not_ours(table)));
            }
        }
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > done) {
        // DDL commits statement by statement: a marker (the version, negated) says a
        // migration began, so one cut short resumes (every CREATE is IF NOT EXISTS) instead of
        // taking its own first table for another application's.
        c.exec_drop(
            "INSERT IGNORE INTO im_relay_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (-version, format!("{name} (begun)"), unix_millis() as i64),
        )?;
        for statement in sql.split(";\n") {
            c.query_drop(statement)?;
        }
        c.exec_drop(
            "INSERT INTO im_relay_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (version, name, unix_millis() as i64),
        )?;
        c.exec_drop(
            "DELETE FROM im_relay_migrations WHERE version = ?",
            (-version,),
        )?;
    }
    Ok(Ok(()))
}

/// `rows` in statements of at most `budget` parameter bytes, halving (sizes stay powers of
/// two); a single row over it goes alone, and the server says whether it fits.
fn fit<'a>(which: usize, rows: &[&'a Item], budget: usize, out: &mut Vec<(usize, Vec<&'a Item>)>) {
    let bytes: usize = rows
        .iter()
        .flat_map(|i| params(i))
        .map(|p| match p {
            Param::Int(_) => 8,
            Param::Text(t) => t.map_or(0, str::len),
            Param::Bytes(b) => b.map_or(0, <[u8]>::len),
        })
        .sum();
    if bytes <= budget || rows.len() == 1 {
        out.push((which, rows.to_vec()));
    } else {
        let (a, b) = rows.split_at(rows.len() / 2);
        fit(which, a, budget, out);
        fit(which, b, budget, out);
    }
}

fn value(p: Param<'_>) -> mysql::Value {
    match p {
        Param::Int(v) => v.map_or(mysql::Value::NULL, mysql::Value::Int),
        Param::Text(v) => v.map_or(mysql::Value::NULL, |t| mysql::Value::Bytes(t.into())),
        Param::Bytes(v) => v.map_or(mysql::Value::NULL, |b| mysql::Value::Bytes(b.to_vec())),
    }
}

impl Store for Mysql {
    fn apply(&mut self, items: &[Item]) -> Result<(), StoreError> {
        self.conn()?;
        let mut pieces = Vec::new();
        for (which, rows) in plan(items) {
            fit(which, &rows, self.budget, &mut pieces);
        }
        let statements: Vec<(String, Vec<mysql::Value>)> = pieces
            .into_iter()
            .map(|(which, rows)| {
                let q = sql(&self.sql[which], which, rows.len(), &|_| "?".into());
                let values = rows.iter().flat_map(|i| params(i)).map(value).collect();
                (q, values)
            })
            .collect();
        self.with(|c| {
            let mut tx = c.start_transaction(mysql::TxOpts::default())?;
            for (q, values) in statements {
                tx.exec_drop(q, mysql::Params::Positional(values))?;
            }
            tx.commit()
        })
    }

    fn positions(&mut self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let rows: Vec<(String, i64, i64)> = self.with(|c| c.query(READ_POSITIONS))?;
        rows.into_iter()
            .map(|(t, p, o)| position(t, p, o))
            .collect()
    }

    fn claim(&mut self, owner: &Owner) -> Result<Claim, StoreError> {
        let owner = owner.clone();
        // Two syncs starting together on one database: one claims, the other sees it.
        self.with(|c| {
            locked(c, "claim", |c| {
                let found: Option<(String, String)> = c.query_first(READ_OWNER)?;
                let found = found.map(|(group, topics)| Owner { group, topics });
                let claim = decide_claim(&owner, found);
                if matches!(claim, Ok(Claim::New)) {
                    c.exec_drop(
                        positional(WRITE_OWNER),
                        (1i64, &owner.group, &owner.topics, unix_millis() as i64),
                    )?;
                }
                Ok(claim)
            })
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::translate;

    #[test]
    fn shared_statements_read_in_mysql_s_words() {
        let q = translate(
            "INSERT INTO read_marks (a) VALUES (?) ON CONFLICT (a) DO UPDATE SET \
             t = CASE WHEN excluded.t > read_marks.t THEN excluded.t ELSE read_marks.t END",
        );
        assert_eq!(
            q,
            "INSERT INTO read_marks (a) VALUES (?) ON DUPLICATE KEY UPDATE \
             t = CASE WHEN VALUES(t) > read_marks.t THEN VALUES(t) ELSE read_marks.t END"
        );
        let q = translate("INSERT INTO d (x) VALUES (?) ON CONFLICT (x) DO NOTHING");
        assert!(
            q.ends_with("ON DUPLICATE KEY UPDATE kafka_offset = kafka_offset"),
            "{q}"
        );
    }
}
