//! One typed configuration, loaded one way: defaults → optional TOML file (`--config`) →
//! `IM_RELAY_*` environment → command-line flags. Every bad value is reported at once, before
//! any port is bound. Secrets (tokens, the SASL password) come only from the environment, a
//! `…_FILE` or the config file — never from flags, which `ps` would show — and never print.
//!
//! Every setting has one name in three spellings: `kafka_brokers` in the file,
//! `IM_RELAY_KAFKA_BROKERS` in the environment, `--kafka-brokers` on the command line — all
//! derived from its one constant in `settings::key`, which the table and the parsers share.

mod kafka;
mod settings;
mod sync;
mod tencent;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ArgMatches;
use ipnet::IpNet;

use crate::domain::{Relayed, SdkAppId};
use crate::spool::{Fsync, SpoolConfig};

pub use kafka::{
    Compression, KafkaConfig, SaslMechanism, SecurityProtocol, client_config, connection_config,
};
pub use settings::Group;
pub use settings::{backfill_command, reconcile_command, serve_command, sync_command};
use settings::{env_name, key, setting};
pub use sync::{Database, PgSsl, SslMode, SyncConfig, split_ssl};
pub use tencent::{BackfillConfig, ReconcileConfig, TencentConfig};

/// A secret value: never printed, never compared in variable time by us.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub sdk_app_ids: Vec<SdkAppId>,
    /// Current token first, then the next one during a rotation. Empty: no signature check
    /// (only with `allow_unsigned`).
    pub tokens: Vec<Secret>,
    pub allow_unsigned: bool,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub callback_path: String,
    /// `GET` here on the callback port answers readiness, for a load balancer's checker.
    pub health_path: String,
    pub tls: Option<TlsFiles>,
    pub max_body_bytes: usize,
    pub sign_max_skew: Duration,
    pub shutdown_drain: Duration,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// A spool append not done by then is answered 503 (the record may still be written:
    /// a duplicate at worst, never a loss).
    pub spool_append_timeout: Duration,
    pub max_connections: usize,
    /// The commands relayed; any other is answered `OK` and not published.
    pub relay_commands: BTreeSet<Relayed>,
    pub allow_cidrs: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
    pub spool: SpoolConfig,
    pub dedup_window_records: usize,
    pub dedup_window: Duration,
    pub publish_max_in_flight: usize,
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for a new certificate.
    pub reload: Duration,
}

/// A secret kept in a file (`…_FILE`, a mounted Kubernetes Secret). Files written by `echo` end
/// in a newline that is not part of the secret.
pub fn read_secret_file(path: &str) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// The callback token for `sign` and `bench`: from the environment, never a flag (a flag
/// shows in `ps` to every user of the machine).
pub fn token_from_env() -> Option<Secret> {
    let token = std::env::var("IM_RELAY_TOKEN").ok().or_else(|| {
        let path = std::env::var("IM_RELAY_TOKEN_FILE").ok()?;
        read_secret_file(&path).ok()
    });
    let token = token.filter(|t| !t.is_empty()).map(Secret::new);
    if token.is_none() {
        eprintln!("set IM_RELAY_TOKEN (or IM_RELAY_TOKEN_FILE) to the callback token");
    }
    token
}

/// All the problems found in a configuration.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Loads the configuration from parsed `serve` flags (if any), an environment lookup and
    /// the config file they name. `env` is a parameter so tests need not touch the process's.
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let (values, options, errors) =
            settings::load_raw(flags, env, &[Group::Serve, Group::App, Group::Kafka]);
        let mut p = Parser { values, errors };
        let config = p.config(options);
        p.finish(config)
    }
}

/// Turns raw strings into typed values, collecting every error.
struct Parser {
    values: BTreeMap<&'static str, String>,
    errors: Vec<String>,
}

impl Parser {
    /// `value`, unless anything was wrong: then every problem found, at once.
    fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    fn fail(&mut self, key: &str, problem: impl fmt::Display) {
        self.errors
            .push(format!("{key} ({}): {problem}", env_name(key)));
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// A value that has a default, so is always present unless set empty.
    fn parse<T: std::str::FromStr>(&mut self, key: &str, what: &str, fallback: T) -> T {
        match self.opt(key).map(|v| (v.trim().parse::<T>(), v.to_owned())) {
            Some((Ok(t), _)) => t,
            Some((Err(_), v)) => {
                let shown = if setting(key).secret { "***".into() } else { v };
                self.fail(key, format_args!("`{shown}` is not {what}"));
                fallback
            }
            None => {
                self.fail(key, "must be set");
                fallback
            }
        }
    }

    /// A `*_ms` setting: milliseconds outside, a `Duration` inside.
    fn millis(&mut self, key: &str) -> Duration {
        Duration::from_millis(self.parse(key, "milliseconds", 0))
    }

    /// One of a fixed set of names, as its typed value.
    fn choice<T: Copy>(&mut self, key: &str, table: &[(&str, T)]) -> T {
        let v = self.opt(key).unwrap_or_default().trim().to_owned();
        match table.iter().find(|(name, _)| *name == v) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                self.fail(
                    key,
                    format_args!("`{v}` is not one of {}", names.join(", ")),
                );
                table[0].1
            }
        }
    }

    fn one_of(&mut self, key: &str, allowed: &[&str]) -> String {
        let v = self.opt(key).unwrap_or_default().trim().to_owned();
        if !allowed.contains(&v.as_str()) {
            self.fail(
                key,
                format_args!("`{v}` is not one of {}", allowed.join(", ")),
            );
        }
        v
    }

    fn file(&mut self, key: &str) -> Option<PathBuf> {
        let path = PathBuf::from(self.opt(key)?);
        if !Path::new(&path).is_file() {
            self.fail(
                key,
                format_args!("`{}` is not a readable file", path.display()),
            );
        }
        Some(path)
    }

    fn secret(&mut self, key: &str) -> Option<Secret> {
        let v = self.values.get(key)?;
        if v.is_empty() {
            self.fail(key, "is empty");
            return None;
        }
        Some(Secret::new(v.clone()))
    }

    fn config(&mut self, options: BTreeMap<String, String>) -> Config {
        let sdk_app_ids = self.sdk_app_ids();
        let tokens: Vec<Secret> = [key::TOKEN, key::TOKEN_NEXT]
            .into_iter()
            .filter_map(|k| self.secret(k))
            .collect();
        if tokens.len() == 1 && self.values.contains_key(key::TOKEN_NEXT) {
            self.fail(key::TOKEN_NEXT, "is set but token is not");
        }
        let allow_unsigned = self.parse(key::ALLOW_UNSIGNED, "true or false", false);
        if tokens.is_empty() && !allow_unsigned {
            self.fail(
                key::TOKEN,
                "must be set: without it anyone can post callbacks \
                 (set IM_RELAY_ALLOW_UNSIGNED=true to run without signature checks anyway)",
            );
        }
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let listen = self.parse(key::LISTEN, "an address (host:port)", any);
        let admin_listen = self.parse(key::ADMIN_LISTEN, "an address (host:port)", any);
        if listen == admin_listen && listen.port() != 0 {
            self.fail(key::ADMIN_LISTEN, "must differ from listen");
        }
        // Literal paths: the router would read `{…}`, `:x` or `*x` as a pattern (and panic on
        // some), after the spool and the producer were opened.
        let literal = |p: &str| {
            p.starts_with('/')
                && !p.contains(['{', '}'])
                && !p.split('/').any(|seg| seg.starts_with([':', '*']))
        };
        const NOT_LITERAL: &str =
            "must start with `/` and hold no `{`, `}` or segment starting with `:` or `*`";
        let callback_path = self.opt(key::CALLBACK_PATH).unwrap_or("").to_owned();
        if !literal(&callback_path) {
            self.fail(key::CALLBACK_PATH, NOT_LITERAL);
        }
        let health_path = self.opt(key::HEALTH_PATH).unwrap_or("").to_owned();
        if !literal(&health_path) {
            self.fail(key::HEALTH_PATH, NOT_LITERAL);
        } else if health_path == callback_path {
            self.fail(key::HEALTH_PATH, "must differ from callback_path");
        }
        let tls = match (self.file(key::TLS_CERT), self.file(key::TLS_KEY)) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                reload: self
                    .millis(key::TLS_RELOAD_MS)
                    .max(Duration::from_millis(100)),
            }),
            (None, None) => None,
            (Some(_), None) => {
                self.fail(key::TLS_KEY, "must be set together with tls_cert");
                None
            }
            (None, Some(_)) => {
                self.fail(key::TLS_CERT, "must be set together with tls_key");
                None
            }
        };
        let max_body_bytes = self.parse(key::MAX_BODY_BYTES, "a byte count", 0usize);
        if max_body_bytes == 0 || max_body_bytes > 1 << 20 {
            self.fail(key::MAX_BODY_BYTES, "must be between 1 and 1048576");
        }
        let sign_max_skew = self.millis(key::SIGN_MAX_SKEW_MS);
        let shutdown_drain = self.millis(key::SHUTDOWN_DRAIN_MS);
        let header_read_timeout = self.millis(key::HEADER_READ_TIMEOUT_MS);
        let request_timeout = self.millis(key::REQUEST_TIMEOUT_MS);
        if header_read_timeout.is_zero() || request_timeout.is_zero() {
            self.fail(key::REQUEST_TIMEOUT_MS, "timeouts must be above 0");
        }
        let max_connections = self.parse(key::MAX_CONNECTIONS, "a count", 1);
        if max_connections == 0 {
            self.fail(key::MAX_CONNECTIONS, "must be at least 1");
        }
        let relay_commands = self.relay_commands();
        let allow_cidrs = self.networks(key::ALLOW_CIDRS);
        let trusted_proxies = self.networks(key::TRUSTED_PROXIES);
        let spool = SpoolConfig {
            dir: PathBuf::from(self.opt(key::SPOOL_DIR).unwrap_or("spool")),
            max_bytes: self.parse(key::SPOOL_MAX_BYTES, "a byte count", 0),
            segment_bytes: self.parse(key::SPOOL_SEGMENT_BYTES, "a byte count", 0),
            fsync: self.parse(
                key::SPOOL_FSYNC,
                "always, interval:<ms> or never",
                Fsync::Always,
            ),
        };
        // Two segments at least: a full active segment can only give its space back once a
        // new one has started beside it.
        if spool.segment_bytes < 4096 || spool.max_bytes < 2 * spool.segment_bytes {
            self.fail(
                key::SPOOL_SEGMENT_BYTES,
                "must be at least 4096 and at most half of spool_max_bytes",
            );
        }
        let spool_append_timeout = self.millis(key::SPOOL_APPEND_TIMEOUT_MS);
        if spool_append_timeout.is_zero() {
            self.fail(key::SPOOL_APPEND_TIMEOUT_MS, "must be above 0");
        }
        let dedup_window_records = self.parse(key::DEDUP_WINDOW_RECORDS, "a count", 0);
        let dedup_window = self.millis(key::DEDUP_WINDOW_MS);
        let publish_max_in_flight = self.parse(key::PUBLISH_MAX_IN_FLIGHT, "a count", 1);
        if publish_max_in_flight == 0 {
            self.fail(key::PUBLISH_MAX_IN_FLIGHT, "must be at least 1");
        }
        let kafka = self.kafka(options);
        // A callback too big as a record still goes to quarantine as its raw body: that must fit.
        if kafka.message_max_bytes < max_body_bytes as u64 + 16384 {
            self.fail(
                key::KAFKA_MESSAGE_MAX_BYTES,
                "must be at least max_body_bytes + 16384, so a quarantined body fits",
            );
        }
        // The callback server never holds Tencent's secret key, and N replicas would
        // publish N copies of what is missing.
        if self.opt(key::RECONCILE).is_some_and(|v| v.trim() != "off") {
            self.fail(
                key::RECONCILE,
                "serve no longer reconciles: run `im-relay reconcile` beside the relays (one \
                 process per app, docs/backfill.md) and remove this setting",
            );
        }
        Config {
            sdk_app_ids,
            tokens,
            allow_unsigned,
            listen,
            admin_listen,
            callback_path,
            health_path,
            tls,
            max_body_bytes,
            sign_max_skew,
            shutdown_drain,
            header_read_timeout,
            request_timeout,
            spool_append_timeout,
            max_connections,
            relay_commands,
            allow_cidrs,
            trusted_proxies,
            spool,
            dedup_window_records,
            dedup_window,
            publish_max_in_flight,
            kafka,
        }
    }

    /// A comma list's items, trimmed, empty ones left out.
    fn list(&self, key: &str) -> Vec<String> {
        self.opt(key)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn relay_commands(&mut self) -> BTreeSet<Relayed> {
        let mut chosen = BTreeSet::new();
        for name in self.list(key::RELAY_COMMANDS) {
            match Relayed::parse(&name) {
                Some(r) => {
                    chosen.insert(r);
                }
                None => self.fail(
                    key::RELAY_COMMANDS,
                    format_args!(
                        "`{name}` is not one of {}",
                        Relayed::ALL.map(Relayed::as_str).join(", ")
                    ),
                ),
            }
        }
        if chosen.is_empty() {
            self.fail(key::RELAY_COMMANDS, "must name at least one command");
        }
        chosen
    }

    /// A comma list of networks (`10.0.0.0/8`) or single addresses (`203.0.113.7`).
    fn networks(&mut self, key: &str) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for part in self.list(key) {
            let parsed = part
                .parse::<IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => nets.push(n),
                Err(_) => self.fail(key, format_args!("`{part}` is not a network or an address")),
            }
        }
        nets
    }

    fn topic(&mut self, key: &str) -> String {
        let topic = self.opt(key).unwrap_or("").to_owned();
        // Kafka's own rule for topic names.
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) {
            self.fail(
                key,
                format_args!("`{topic}` is not a valid Kafka topic name"),
            );
        }
        topic
    }

    fn sdk_app_ids(&mut self) -> Vec<SdkAppId> {
        let Some(raw) = self.opt(key::SDK_APP_ID).map(str::to_owned) else {
            self.fail(key::SDK_APP_ID, "must be set");
            return Vec::new();
        };
        let mut ids = Vec::new();
        for part in raw.split(',').map(str::trim) {
            match SdkAppId::parse(part) {
                Some(id) => ids.push(id),
                None => self.fail(
                    key::SDK_APP_ID,
                    format_args!("`{part}` is not a decimal id"),
                ),
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::KeyMode;
    use std::collections::HashMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let m = serve_command()
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("flags parse");
        Config::load(Some(&m), &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_apply() {
        let env = [
            ("IM_RELAY_SDK_APP_ID", "1400000000"),
            ("IM_RELAY_TOKEN", "t"),
        ];
        let c = load(&[], &env).unwrap();
        assert_eq!(c.sdk_app_ids, vec![SdkAppId::from(1400000000)]);
        assert_eq!(c.tokens.len(), 1);
        assert!(!c.allow_unsigned);
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:8081");
        assert_eq!(c.callback_path, "/im/callback");
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.topic, "im.c2c.messages");
        assert_eq!(c.kafka.key, KeyMode::MsgKey);
        assert_eq!(c.kafka.compression, kafka::Compression::Zstd);
    }

    #[test]
    fn paths_are_literal_and_the_health_path_is_not_the_callback_path() {
        let with = |path: &str, health: &str| {
            let env = [
                ("IM_RELAY_SDK_APP_ID", "1400000000"),
                ("IM_RELAY_TOKEN", "t"),
                ("IM_RELAY_CALLBACK_PATH", path),
                ("IM_RELAY_HEALTH_PATH", health),
            ];
            load(&[], &env)
                .map(|c| c.health_path)
                .map_err(|e| e.to_string())
        };
        assert_eq!(with("/im/callback", "/healthz"), Ok("/healthz".into()));
        assert_eq!(with("/im/callback", "/"), Ok("/".into()));
        let same = with("/im/callback", "/im/callback").unwrap_err();
        assert!(same.contains("must differ from callback_path"), "{same}");
        for bad in ["healthz", "/{x}", "/a/:id", "/*rest"] {
            let err = with("/im/callback", bad).unwrap_err();
            assert!(err.contains("health_path"), "{bad}: {err}");
            let err = with(bad, "/healthz").unwrap_err();
            assert!(err.contains("callback_path"), "{bad}: {err}");
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "sdk_app_id = [1400000000, 1400000001]\ntopic = \"from.file\"\nkey = \"conversation\"\n\
             listen = \"127.0.0.1:1\"\n[kafka_options]\n\"socket.keepalive.enable\" = true\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = load(
            &["--config", path, "--listen", "127.0.0.1:3"],
            &[
                ("IM_RELAY_TOPIC", "from.env"),
                ("IM_RELAY_LISTEN", "127.0.0.1:2"),
                ("IM_RELAY_ALLOW_UNSIGNED", "true"),
            ],
        )
        .unwrap();
        assert_eq!(c.sdk_app_ids.len(), 2);
        assert_eq!(c.kafka.topic, "from.env");
        assert_eq!(c.kafka.key, KeyMode::Conversation);
        assert_eq!(c.listen.to_string(), "127.0.0.1:3");
        assert_eq!(c.kafka.options["socket.keepalive.enable"], "true");
    }

    #[test]
    fn secrets_from_env_or_file_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret-from-file\n").unwrap();
        let c = load(
            &[],
            &[
                ("IM_RELAY_SDK_APP_ID", "1"),
                ("IM_RELAY_TOKEN_FILE", f.to_str().unwrap()),
                ("IM_RELAY_TOKEN_NEXT", "s3cret-next"),
            ],
        )
        .unwrap();
        assert_eq!(c.tokens[0].expose(), "s3cret-from-file");
        assert_eq!(c.tokens[1].expose(), "s3cret-next");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let help = serve_command().render_long_help().to_string();
        assert!(!help.contains("--token"));
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = load(
            &[
                "--listen",
                "nope",
                "--kafka-option",
                "acks=1",
                "--kafka-option",
                "junk",
            ],
            &[
                ("IM_RELAY_SDK_APP_ID", "1,x"),
                ("IM_RELAY_TOKEN", "a"),
                ("IM_RELAY_TOKEN_FILE", "/nonexistent"),
                ("IM_RELAY_MAX_BODY_BYTES", "-5"),
                ("IM_RELAY_KEY", "random"),
                ("IM_RELAY_TOPIC", "bad topic"),
                ("IM_RELAY_TLS_CERT", "/nonexistent.pem"),
                ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
                ("IM_RELAY_KAFKA_SASL_PASSWORD", "pw-never-shown"),
            ],
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "IM_RELAY_LISTEN",
            "acks",
            "`junk`",
            "`x`",
            "IM_RELAY_TOKEN and IM_RELAY_TOKEN_FILE",
            "IM_RELAY_MAX_BODY_BYTES",
            "IM_RELAY_KEY",
            "IM_RELAY_TOPIC",
            "IM_RELAY_TLS_CERT",
            "tls_key",
            "kafka_sasl_username",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("pw-never-shown"));
        assert!(err.0.len() >= 11, "{text}");
    }

    #[test]
    fn a_spool_that_cannot_work_is_refused_at_start() {
        let base = [
            ("IM_RELAY_SDK_APP_ID", "1400000000"),
            ("IM_RELAY_TOKEN", "a-token-of-some-length"),
        ];
        // A full active segment gives its space back only once a second one has started.
        let err = load(
            &[],
            &[
                base[0],
                base[1],
                ("IM_RELAY_SPOOL_MAX_BYTES", "100000"),
                ("IM_RELAY_SPOOL_SEGMENT_BYTES", "60000"),
                ("IM_RELAY_SPOOL_APPEND_TIMEOUT_MS", "0"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("half of spool_max_bytes"), "{err}");
        assert!(err.contains("IM_RELAY_SPOOL_APPEND_TIMEOUT_MS"), "{err}");
        let ok = load(
            &[],
            &[
                base[0],
                base[1],
                ("IM_RELAY_SPOOL_MAX_BYTES", "120000"),
                ("IM_RELAY_SPOOL_SEGMENT_BYTES", "60000"),
            ],
        )
        .unwrap();
        assert_eq!(ok.spool_append_timeout, Duration::from_millis(1000));
    }

    #[test]
    fn the_kafka_settings_load_alone_without_the_callback_settings() {
        let env: HashMap<String, String> = [
            ("IM_RELAY_KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("IM_RELAY_TOPIC", "chat"),
            // Another subcommand's setting in the same environment is not looked at.
            ("IM_RELAY_MAX_BODY_BYTES", "not a number"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let kafka = KafkaConfig::load(None, &|k| env.get(k).cloned()).expect("no token needed");
        assert_eq!(kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(kafka.topic, "chat");
        assert_eq!(kafka.quarantine_topic, "im.c2c.quarantine");
        // serve still asks for everything it uses.
        let serve = Config::load(None, &|k| env.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(
            serve.contains("IM_RELAY_SDK_APP_ID") && serve.contains("IM_RELAY_TOKEN"),
            "{serve}"
        );
        assert!(serve.contains("IM_RELAY_MAX_BODY_BYTES"), "{serve}");
    }

    #[test]
    fn a_token_is_required_unless_unsigned_is_allowed() {
        let err = load(&[], &[("IM_RELAY_SDK_APP_ID", "1")]).unwrap_err();
        assert!(
            err.to_string().contains("IM_RELAY_ALLOW_UNSIGNED=true"),
            "{err}"
        );
        let env = [
            ("IM_RELAY_SDK_APP_ID", "1"),
            ("IM_RELAY_ALLOW_UNSIGNED", "true"),
        ];
        let c = load(&[], &env).unwrap();
        assert!(c.tokens.is_empty() && c.allow_unsigned);
    }

    #[test]
    fn sdk_app_id_is_required_and_file_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "topik = \"typo\"\n").unwrap();
        let err = load(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sdk_app_id (IM_RELAY_SDK_APP_ID): must be set"),
            "{text}"
        );
        assert!(
            text.contains("topik (config file): unknown setting"),
            "{text}"
        );
    }
}
