//! `im-relay sync`'s settings: the database, the consumer group, its admin listener — and
//! Kafka's. No callback token or app id is asked for.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::ArgMatches;

use super::settings::{Group, key, load_raw};
use super::{ConfigErrors, KafkaConfig, Parser, Secret};

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub database: Database,
    pub group: String,
    pub admin_listen: SocketAddr,
    pub batch_max: usize,
    /// A recalled message's content is blanked in the tables.
    pub redact_recalled: bool,
    pub kafka: KafkaConfig,
}

/// Where the tables live.
#[derive(Debug, Clone)]
pub enum Database {
    /// An embedded file, created if missing.
    Sqlite(PathBuf),
    /// A server: the URL as given, without `sslmode` and `sslrootcert` (never with a password:
    /// that comes on its own).
    Postgres {
        url: String,
        password: Option<Secret>,
        ssl: PgSsl,
        /// The schema of sync's tables (`sync_schema`); `None`: the search path's first.
        schema: Option<String>,
    },
    /// MariaDB or MySQL (`mysql://` or `mariadb://`): the URL as given, `mysql://` (never
    /// with a password).
    Mysql {
        url: String,
        password: Option<Secret>,
    },
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// TLS to PostgreSQL: `sslmode` (default `prefer`, as libpq) and `sslrootcert` (a PEM file, or
/// `system`), taken out of the URL here: the `postgres` crate refuses the verify modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSsl {
    pub mode: SslMode,
    pub root_cert: Option<String>,
}

const SSL_MODES: &[(&str, SslMode)] = &[
    ("disable", SslMode::Disable),
    ("prefer", SslMode::Prefer),
    ("require", SslMode::Require),
    ("verify-ca", SslMode::VerifyCa),
    ("verify-full", SslMode::VerifyFull),
];

/// `url` without its `sslmode` and `sslrootcert` parameters, and what they said. Other
/// parameters stay, in order.
pub fn split_ssl(url: &str) -> Result<(String, PgSsl), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut ssl = PgSsl {
        mode: SslMode::Prefer,
        root_cert: None,
    };
    let mut kept = Vec::new();
    let mut mode_given = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                mode_given = true;
                ssl.mode = SSL_MODES
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| {
                        format!(
                            "sslmode `{v}` is not one of disable, prefer, require, verify-ca, \
                             verify-full"
                        )
                    })?;
            }
            "sslrootcert" => ssl.root_cert = Some(percent_decode(v)?),
            _ => kept.push(pair),
        }
    }
    // Anyone can get a publicly trusted certificate for a name of their own: with the host's
    // roots only the name proves who answers (libpq 16 likewise).
    if ssl.root_cert.as_deref() == Some("system") {
        if !mode_given {
            ssl.mode = SslMode::VerifyFull;
        } else if ssl.mode != SslMode::VerifyFull {
            return Err("sslrootcert=system needs sslmode=verify-full".into());
        }
    }
    if matches!(ssl.mode, SslMode::VerifyCa | SslMode::VerifyFull) && ssl.root_cert.is_none() {
        return Err(
            "sslmode verify-ca and verify-full need sslrootcert (a PEM file, or system)".into(),
        );
    }
    if ssl.mode == SslMode::Disable && ssl.root_cert.is_some() {
        return Err("sslrootcert is given but sslmode is disable".into());
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, ssl))
}

fn percent_decode(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or("a `%` without two hex digits")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "a `%` without two hex digits")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "sslrootcert is not UTF-8".into())
}

impl Database {
    /// What a log line may say about it.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Mysql { url, .. } => url.clone(),
            Database::Postgres { url, ssl, .. } => {
                let mode = SSL_MODES.iter().find(|(_, m)| *m == ssl.mode);
                format!("{url} (sslmode {})", mode.map_or("", |(name, _)| name))
            }
        }
    }
}

impl SyncConfig {
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SyncConfig, ConfigErrors> {
        let (values, options, errors) = load_raw(flags, env, &[Group::Sync, Group::Kafka]);
        let mut p = Parser { values, errors };
        let database = p.database();
        let group = p.opt(key::SYNC_GROUP).unwrap_or("").to_owned();
        if group.is_empty() {
            p.fail(key::SYNC_GROUP, "must be set");
        }
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let admin_listen = p.parse(key::SYNC_ADMIN_LISTEN, "an address (host:port)", any);
        let batch_max = p.parse(key::SYNC_BATCH_MAX, "a count", 1usize);
        let redact_recalled = p.parse(key::SYNC_REDACT_RECALLED, "true or false", false);
        if batch_max == 0 {
            p.fail(key::SYNC_BATCH_MAX, "must be at least 1");
        }
        let kafka = p.kafka(options);
        let config = SyncConfig {
            database,
            group,
            admin_listen,
            batch_max,
            redact_recalled,
            kafka,
        };
        p.finish(config)
    }
}

impl Parser {
    fn database(&mut self) -> Database {
        let url = self.opt(key::SYNC_DATABASE_URL).unwrap_or("").to_owned();
        let password = self.secret(key::SYNC_DATABASE_PASSWORD);
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                self.fail(key::SYNC_DATABASE_URL, "sqlite:// needs a file name");
            }
            if password.is_some() {
                self.fail(
                    key::SYNC_DATABASE_PASSWORD,
                    "is for PostgreSQL; SQLite has none",
                );
            }
            if self.opt(key::SYNC_SCHEMA).is_some() {
                self.fail(key::SYNC_SCHEMA, "is for PostgreSQL; SQLite has none");
            }
            return Database::Sqlite(PathBuf::from(path));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (url, ssl) = match split_ssl(&url) {
                Ok(split) => split,
                Err(e) => {
                    self.fail(key::SYNC_DATABASE_URL, &e);
                    return Database::Sqlite(PathBuf::new());
                }
            };
            if let Some(root) = ssl.root_cert.as_deref().filter(|r| *r != "system")
                && !std::path::Path::new(root).is_file()
            {
                self.fail(
                    key::SYNC_DATABASE_URL,
                    format!("sslrootcert {root} is not a readable file"),
                );
            }
            match url.parse::<postgres::Config>() {
                // A password in the URL would show in `ps`, shell history and logs.
                Ok(c) if c.get_password().is_some() => self.fail(
                    key::SYNC_DATABASE_URL,
                    "must not hold a password: set IM_RELAY_SYNC_DATABASE_PASSWORD (or _FILE)",
                ),
                Ok(_) => {}
                Err(_) => self.fail(key::SYNC_DATABASE_URL, "is not a PostgreSQL URL"),
            }
            let schema = self.opt(key::SYNC_SCHEMA).map(str::to_owned);
            // An identifier as PostgreSQL folds it: used unquoted in the search path.
            if let Some(s) = &schema
                && (s.is_empty()
                    || s.starts_with("pg_")
                    || s.len() > 63
                    || !s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
            {
                self.fail(
                    key::SYNC_SCHEMA,
                    "must be a lower-case identifier (a-z, 0-9, _; 63 at most; not pg_…)",
                );
            }
            return Database::Postgres {
                url,
                password,
                ssl,
                schema,
            };
        }
        if let Some(rest) = url
            .strip_prefix("mysql://")
            .or_else(|| url.strip_prefix("mariadb://"))
        {
            let url = format!("mysql://{rest}");
            if self.opt(key::SYNC_SCHEMA).is_some() {
                self.fail(
                    key::SYNC_SCHEMA,
                    "is for PostgreSQL; with MariaDB/MySQL name the database in the URL",
                );
            }
            match mysql::Opts::from_url(&url) {
                Ok(o) if o.get_pass().is_some() => self.fail(
                    key::SYNC_DATABASE_URL,
                    "must not hold a password: set IM_RELAY_SYNC_DATABASE_PASSWORD (or _FILE)",
                ),
                Ok(o) if o.get_db_name().is_none() => self.fail(
                    key::SYNC_DATABASE_URL,
                    "must name the database (mysql://USER@HOST[:PORT]/DATABASE)",
                ),
                Ok(_) => {}
                Err(e) => self.fail(
                    key::SYNC_DATABASE_URL,
                    format!("is not a MariaDB/MySQL URL: {e}"),
                ),
            }
            return Database::Mysql { url, password };
        }
        self.fail(
            key::SYNC_DATABASE_URL,
            "must start with sqlite://, postgres:// or mysql:// (mariadb://)",
        );
        Database::Sqlite(PathBuf::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(pairs: &[(&str, &str)]) -> Result<SyncConfig, ConfigErrors> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SyncConfig::load(None, &|k| env.get(k).cloned())
    }

    #[test]
    fn sync_needs_no_callback_token_and_defaults_to_sqlite() {
        let c = load(&[]).expect("defaults are valid");
        assert!(
            matches!(c.database, Database::Sqlite(ref p) if p == &PathBuf::from("im-relay-sync.db"))
        );
        assert_eq!(c.group, "im-relay-sync");
        assert_eq!(c.admin_listen.port(), 8082);
    }

    #[test]
    fn a_password_comes_on_its_own_never_in_the_url() {
        let err = load(&[(
            "IM_RELAY_SYNC_DATABASE_URL",
            "postgres://sync:hunter2@db/im",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("must not hold a password"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let c = load(&[
            ("IM_RELAY_SYNC_DATABASE_URL", "postgres://sync@db:5433/im"),
            ("IM_RELAY_SYNC_DATABASE_PASSWORD", "hunter2"),
        ])
        .unwrap();
        let Database::Postgres { url, password, .. } = &c.database else {
            panic!("{c:?}")
        };
        assert_eq!(url, "postgres://sync@db:5433/im");
        assert_eq!(password.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = load(&[("IM_RELAY_SYNC_DATABASE_URL", "oracle://db/im")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sqlite://, postgres:// or mysql://"), "{err}");
    }

    #[test]
    fn a_mariadb_or_mysql_url_names_its_database_and_holds_no_password() {
        let c = load(&[
            ("IM_RELAY_SYNC_DATABASE_URL", "mariadb://sync@db:3307/im"),
            ("IM_RELAY_SYNC_DATABASE_PASSWORD", "hunter2"),
        ])
        .unwrap();
        let Database::Mysql { url, password } = &c.database else {
            panic!("{c:?}")
        };
        assert_eq!(url, "mysql://sync@db:3307/im");
        assert_eq!(password.as_ref().map(Secret::expose), Some("hunter2"));
        for (value, want) in [
            ("mysql://sync:hunter2@db/im", "must not hold a password"),
            ("mysql://sync@db", "must name the database"),
            (
                "mysql://sync@db/im?no_such_option=1",
                "is not a MariaDB/MySQL URL",
            ),
        ] {
            let err = load(&[("IM_RELAY_SYNC_DATABASE_URL", value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{value}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = load(&[
            ("IM_RELAY_SYNC_DATABASE_URL", "mysql://sync@db/im"),
            ("IM_RELAY_SYNC_SCHEMA", "chat"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("is for PostgreSQL"), "{err}");
    }

    /// libpq's `sslmode` words, which the `postgres` crate refuses beyond `require`: taken out
    /// of the URL, the rest of it kept in order.
    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url_and_checked() {
        let (url, ssl) = split_ssl(
            "postgres://s@db/im?options=-c%20search_path%3Dchat&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://s@db/im?options=-c%20search_path%3Dchat&connect_timeout=3"
        );
        assert_eq!(ssl.mode, SslMode::VerifyFull);
        assert_eq!(ssl.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (url, ssl) = split_ssl("postgres://s@db/im").unwrap();
        assert_eq!(
            (url.as_str(), ssl.mode),
            ("postgres://s@db/im", SslMode::Prefer)
        );
        assert_eq!(
            split_ssl("postgres://s@db/im?sslmode=require")
                .unwrap()
                .1
                .mode,
            SslMode::Require
        );
        // The host's roots prove nothing without the name: verify-full, or nothing.
        let (_, ssl) = split_ssl("postgres://s@db/im?sslrootcert=system").unwrap();
        assert_eq!(ssl.mode, SslMode::VerifyFull);
        for (bad, says) in [
            (
                "postgres://s@db/im?sslmode=require&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            ("postgres://s@db/im?sslmode=verify-ca", "need sslrootcert"),
            ("postgres://s@db/im?sslmode=always", "not one of disable"),
            (
                "postgres://s@db/im?sslmode=disable&sslrootcert=/etc/ca.pem",
                "sslmode is disable",
            ),
        ] {
            let err = split_ssl(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = load(&[(
            "IM_RELAY_SYNC_DATABASE_URL",
            "postgres://s@db/im?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a readable file"), "{err}");
        let c = load(&[(
            "IM_RELAY_SYNC_DATABASE_URL",
            "postgres://s@db/im?sslmode=verify-full&sslrootcert=system",
        )])
        .unwrap();
        assert_eq!(
            c.database.describe(),
            "postgres://s@db/im (sslmode verify-full)"
        );
    }
}
