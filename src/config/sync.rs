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
    pub kafka: KafkaConfig,
}

/// Where the tables live.
#[derive(Debug, Clone)]
pub enum Database {
    /// An embedded file, created if missing.
    Sqlite(PathBuf),
    /// A server: the URL as given (never with a password: that comes on its own).
    Postgres {
        url: String,
        password: Option<Secret>,
    },
}

impl Database {
    /// What a log line may say about it.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres { url, .. } => url.clone(),
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
        if batch_max == 0 {
            p.fail(key::SYNC_BATCH_MAX, "must be at least 1");
        }
        let kafka = p.kafka(options);
        let config = SyncConfig {
            database,
            group,
            admin_listen,
            batch_max,
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
            return Database::Sqlite(PathBuf::from(path));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.parse::<postgres::Config>() {
                // A password in the URL would show in `ps`, shell history and logs.
                Ok(c) if c.get_password().is_some() => self.fail(
                    key::SYNC_DATABASE_URL,
                    "must not hold a password: set IM_RELAY_SYNC_DATABASE_PASSWORD (or _FILE)",
                ),
                Ok(_) => {}
                Err(_) => self.fail(key::SYNC_DATABASE_URL, "is not a PostgreSQL URL"),
            }
            return Database::Postgres { url, password };
        }
        self.fail(
            key::SYNC_DATABASE_URL,
            "must start with sqlite:// or postgres://",
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
        let Database::Postgres { url, password } = &c.database else {
            panic!("{c:?}")
        };
        assert_eq!(url, "postgres://sync@db:5433/im");
        assert_eq!(password.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = load(&[("IM_RELAY_SYNC_DATABASE_URL", "mysql://db/im")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sqlite:// or postgres://"), "{err}");
    }
}
