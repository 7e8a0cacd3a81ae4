//! One typed configuration, loaded one way: defaults → optional TOML file (`--config`) →
//! `IM_RELAY_*` environment → command-line flags. Every bad value is reported at once, before
//! any port is bound. Secrets (tokens, the SASL password) come only from the environment, a
//! `…_FILE` or the config file — never from flags, which `ps` would show — and never print.
//!
//! Every setting has one name in three spellings: `kafka_brokers` in the file,
//! `IM_RELAY_KAFKA_BROKERS` in the environment, `--kafka-brokers` on the command line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches};
use ipnet::IpNet;

use crate::domain::SdkAppId;
use crate::normalize::KeyMode;
use crate::spool::{Fsync, SpoolConfig};

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
    pub tls: Option<TlsFiles>,
    pub max_body_bytes: usize,
    pub sign_max_skew_ms: u64,
    pub shutdown_drain_ms: u64,
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// A spool append not done by then is answered 503 (the record may still be written:
    /// a duplicate at worst, never a loss).
    pub spool_append_timeout_ms: u64,
    pub max_connections: usize,
    pub allow_cidrs: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
    pub spool: SpoolConfig,
    pub dedup_window_records: usize,
    pub dedup_window_ms: u64,
    pub publish_max_in_flight: usize,
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for a new certificate.
    pub reload_ms: u64,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub quarantine_topic: String,
    pub key: KeyMode,
    pub compression: String,
    pub linger_ms: u64,
    pub queue_max_messages: u64,
    pub message_timeout_ms: u64,
    pub message_max_bytes: u64,
    pub flush_timeout_ms: u64,
    pub security_protocol: String,
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    pub ssl_ca_location: Option<PathBuf>,
    /// librdkafka options passed through as given, for what has no typed field.
    pub options: BTreeMap<String, String>,
}

struct Setting {
    key: &'static str,
    default: Option<&'static str>,
    secret: bool,
    help: &'static str,
}

const fn s(key: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
    Setting {
        key,
        default,
        secret: false,
        help,
    }
}

const fn secret(key: &'static str, help: &'static str) -> Setting {
    Setting {
        key,
        default: None,
        secret: true,
        help,
    }
}

const SETTINGS: &[Setting] = &[
    s(
        "sdk_app_id",
        None,
        "Tencent IM SdkAppid(s) served, comma-separated (required)",
    ),
    secret(
        "token",
        "callback token set in the IM console; enables signature checks",
    ),
    secret(
        "token_next",
        "second token accepted during a token rotation",
    ),
    s(
        "allow_unsigned",
        Some("false"),
        "run without a token (no signature checks): true | false",
    ),
    s(
        "listen",
        Some("0.0.0.0:8080"),
        "address for Tencent's callbacks",
    ),
    s(
        "admin_listen",
        Some("0.0.0.0:8081"),
        "address for /metrics, /livez, /readyz",
    ),
    s(
        "callback_path",
        Some("/im/callback"),
        "path of the callback URL",
    ),
    s(
        "tls_cert",
        None,
        "PEM certificate chain; serve HTTPS when set with tls_key",
    ),
    s("tls_key", None, "PEM private key for tls_cert"),
    s(
        "tls_reload_ms",
        Some("10000"),
        "how often the certificate files are checked for changes",
    ),
    s(
        "max_body_bytes",
        Some("65536"),
        "largest callback body accepted",
    ),
    s(
        "sign_max_skew_ms",
        Some("60000"),
        "accepted |now - RequestTime|",
    ),
    s(
        "shutdown_drain_ms",
        Some("10000"),
        "time in-flight requests get on shutdown",
    ),
    s(
        "header_read_timeout_ms",
        Some("10000"),
        "time a client gets to send a request's headers (slowloris guard)",
    ),
    s(
        "request_timeout_ms",
        Some("10000"),
        "time a client gets to send a request's body",
    ),
    s(
        "max_connections",
        Some("4096"),
        "open connections to the callback listener, at most",
    ),
    s(
        "allow_cidrs",
        None,
        "networks allowed to call, comma-separated (empty: any)",
    ),
    s(
        "trusted_proxies",
        None,
        "networks whose X-Forwarded-For is believed, comma-separated",
    ),
    s(
        "spool_dir",
        Some("spool"),
        "durable spool directory (one relay per directory)",
    ),
    s(
        "spool_max_bytes",
        Some("1073741824"),
        "bound on the spool; beyond it: 503",
    ),
    s(
        "spool_segment_bytes",
        Some("67108864"),
        "size at which a new spool segment starts",
    ),
    s(
        "spool_fsync",
        Some("always"),
        "always | interval:<ms> | never",
    ),
    s(
        "spool_append_timeout_ms",
        Some("1000"),
        "a spool write taking longer is answered 503 and turns readiness red (Tencent waits 2 s)",
    ),
    s(
        "dedup_window_records",
        Some("100000"),
        "record ids remembered against duplicates (0: off)",
    ),
    s(
        "dedup_window_ms",
        Some("600000"),
        "how long a record id is remembered",
    ),
    s(
        "publish_max_in_flight",
        Some("2000"),
        "records sent to Kafka, not yet confirmed, at most",
    ),
    s(
        "kafka_brokers",
        Some("127.0.0.1:9092"),
        "bootstrap brokers, comma-separated",
    ),
    s(
        "topic",
        Some("im.c2c.messages"),
        "topic for message records",
    ),
    s(
        "quarantine_topic",
        Some("im.c2c.quarantine"),
        "topic for callbacks that cannot be relayed",
    ),
    s("key", Some("msgkey"), "record key: msgkey | conversation"),
    s(
        "kafka_compression",
        Some("zstd"),
        "none | gzip | snappy | lz4 | zstd",
    ),
    s(
        "kafka_linger_ms",
        Some("5"),
        "time the producer waits to fill a batch",
    ),
    s(
        "kafka_queue_max_messages",
        Some("100000"),
        "records the producer may hold in memory",
    ),
    s(
        "kafka_message_timeout_ms",
        Some("60000"),
        "time librdkafka tries a record before we retry it",
    ),
    s(
        "kafka_message_max_bytes",
        Some("1000000"),
        "largest record; larger ones go to quarantine",
    ),
    s(
        "kafka_flush_timeout_ms",
        Some("10000"),
        "time to flush the producer on shutdown",
    ),
    s(
        "kafka_security_protocol",
        Some("plaintext"),
        "plaintext | ssl | sasl_plaintext | sasl_ssl",
    ),
    s(
        "kafka_sasl_mechanism",
        None,
        "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512",
    ),
    s("kafka_sasl_username", None, "SASL user name"),
    secret("kafka_sasl_password", "SASL password"),
    s(
        "kafka_ssl_ca_location",
        None,
        "PEM file of the CA that signed the brokers' certificates",
    ),
];

/// librdkafka options set by typed settings (or fixed by us); the pass-through may not touch them.
const OWNED_KAFKA_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "compression.type",
    "compression.codec",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "message.max.bytes",
    "statistics.interval.ms",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
];

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

fn env_name(key: &str) -> String {
    format!("IM_RELAY_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// The `serve` command's flags, generated from the settings table.
pub fn serve_command() -> clap::Command {
    let mut cmd = clap::Command::new("serve")
        .about("Receive Tencent IM callbacks and publish them to Kafka")
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .help("TOML file with settings [env: IM_RELAY_CONFIG]"),
        )
        .arg(
            Arg::new("kafka_option")
                .long("kafka-option")
                .value_name("KEY=VALUE")
                .action(ArgAction::Append)
                .help("librdkafka option passed through, repeatable [env: IM_RELAY_KAFKA_OPTIONS, comma-separated]"),
        );
    for setting in SETTINGS.iter().filter(|s| !s.secret) {
        let default = setting
            .default
            .map(|d| format!(" [default: {d}]"))
            .unwrap_or_default();
        cmd = cmd.arg(
            Arg::new(setting.key)
                .long(flag_name(setting.key))
                .value_name("VALUE")
                .help(format!(
                    "{} [env: {}]{default}",
                    setting.help,
                    env_name(setting.key)
                )),
        );
    }
    cmd.after_help(
        "Secrets are read only from the environment or the config file: IM_RELAY_TOKEN, \
         IM_RELAY_TOKEN_NEXT, IM_RELAY_KAFKA_SASL_PASSWORD, or the same names ending in _FILE \
         naming a file that holds the value. Logs: IM_RELAY_LOG_FORMAT=json|pretty (default json), \
         IM_RELAY_LOG=<filter> (default info, e.g. info,librdkafka=warn).",
    )
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

/// The layered raw values, before parsing.
struct Layers<'a> {
    flags: Option<&'a ArgMatches>,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: toml::Table,
    errors: Vec<String>,
}

impl Layers<'_> {
    fn file_value(&mut self, key: &str) -> Option<String> {
        match self.file.get(key)? {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Array(items) => Some(
                items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => {
                self.errors
                    .push(format!("{key} (config file): expected a string or number"));
                None
            }
        }
    }

    fn raw(&mut self, setting: &Setting) -> Option<String> {
        let from_flag = self
            .flags
            .filter(|_| !setting.secret)
            .and_then(|m| m.get_one::<String>(setting.key).cloned());
        if from_flag.is_some() {
            return from_flag;
        }
        let env = env_name(setting.key);
        if setting.secret {
            if let Some(v) = self.secret_value(setting.key, &env) {
                return Some(v);
            }
        } else if let Some(v) = (self.env)(&env) {
            return Some(v);
        }
        self.file_value(setting.key)
            .or_else(|| setting.default.map(str::to_owned))
    }

    /// A secret from `NAME`, or from the file named by `NAME_FILE`; the config file's
    /// `key`/`key_file` are read by `raw` after this.
    fn secret_value(&mut self, key: &str, env: &str) -> Option<String> {
        let direct = (self.env)(env);
        let file_env = format!("{env}_FILE");
        let file = (self.env)(&file_env).or_else(|| self.file_value(&format!("{key}_file")));
        match (direct, file) {
            (Some(_), Some(_)) => {
                self.errors
                    .push(format!("{env} and {file_env}: set one, not both"));
                None
            }
            (Some(v), None) => Some(v),
            (None, Some(path)) => match read_secret_file(&path) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.errors
                        .push(format!("{file_env}: cannot read `{path}`: {}", e.kind()));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn kafka_options(&mut self) -> BTreeMap<String, String> {
        let mut options = BTreeMap::new();
        match self.file.remove("kafka_options") {
            Some(toml::Value::Table(t)) => {
                for (k, v) in t {
                    let v = match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    options.insert(k, v);
                }
            }
            Some(_) => self
                .errors
                .push("kafka_options (config file): expected a table".into()),
            None => {}
        }
        let env_pairs = (self.env)("IM_RELAY_KAFKA_OPTIONS").unwrap_or_default();
        let flag_pairs: Vec<String> = self
            .flags
            .and_then(|m| m.get_many::<String>("kafka_option"))
            .map(|v| v.cloned().collect())
            .unwrap_or_default();
        let pairs = env_pairs
            .split(',')
            .map(str::to_owned)
            .chain(flag_pairs)
            .filter(|p| !p.trim().is_empty());
        for pair in pairs {
            match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    options.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                _ => self
                    .errors
                    .push(format!("kafka option `{pair}`: expected KEY=VALUE")),
            }
        }
        for k in options.keys() {
            if OWNED_KAFKA_OPTIONS.contains(&k.as_str()) {
                self.errors.push(format!(
                    "kafka option `{k}`: set by a typed setting (or fixed by im-relay); use that instead"
                ));
            }
        }
        options
    }

    fn check_file_keys(&mut self) {
        let known = |k: &str| {
            SETTINGS
                .iter()
                .any(|s| s.key == k || (s.secret && k.strip_suffix("_file") == Some(s.key)))
                || k == "kafka_options"
        };
        let unknown: Vec<String> = self
            .file
            .keys()
            .filter(|k| !known(k))
            .map(|k| format!("{k} (config file): unknown setting"))
            .collect();
        self.errors.extend(unknown);
    }
}

fn setting(key: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no setting named {key}"))
}

impl Config {
    /// Loads the configuration from parsed `serve` flags (if any), an environment lookup and
    /// the config file they name. `env` is a parameter so tests need not touch the process's.
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let path = flags
            .and_then(|m| m.get_one::<String>("config").cloned())
            .or_else(|| env("IM_RELAY_CONFIG"));
        let file = match path {
            None => toml::Table::new(),
            Some(p) => match std::fs::read_to_string(&p) {
                Ok(text) => text.parse::<toml::Table>().unwrap_or_else(|e| {
                    errors.push(format!("config file `{p}`: {}", e.message()));
                    toml::Table::new()
                }),
                Err(e) => {
                    errors.push(format!("config file `{p}`: {}", e.kind()));
                    toml::Table::new()
                }
            },
        };
        let mut layers = Layers {
            flags,
            env,
            file,
            errors,
        };
        layers.check_file_keys();
        let options = layers.kafka_options();
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        for s in SETTINGS {
            if let Some(v) = layers.raw(s) {
                values.insert(s.key, v);
            }
        }
        let mut p = Parser {
            values,
            errors: layers.errors,
        };
        let config = p.config(options);
        if p.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(p.errors))
        }
    }
}

/// Turns raw strings into typed values, collecting every error.
struct Parser {
    values: BTreeMap<&'static str, String>,
    errors: Vec<String>,
}

impl Parser {
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
        let tokens: Vec<Secret> = ["token", "token_next"]
            .into_iter()
            .filter_map(|k| self.secret(k))
            .collect();
        if tokens.len() == 1 && self.values.contains_key("token_next") {
            self.fail("token_next", "is set but token is not");
        }
        let allow_unsigned = self.parse("allow_unsigned", "true or false", false);
        if tokens.is_empty() && !allow_unsigned {
            self.fail(
                "token",
                "must be set: without it anyone can post callbacks \
                 (set IM_RELAY_ALLOW_UNSIGNED=true to run without signature checks anyway)",
            );
        }
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let listen = self.parse("listen", "an address (host:port)", any);
        let admin_listen = self.parse("admin_listen", "an address (host:port)", any);
        if listen == admin_listen && listen.port() != 0 {
            self.fail("admin_listen", "must differ from listen");
        }
        let callback_path = self.opt("callback_path").unwrap_or("").to_owned();
        if !callback_path.starts_with('/') {
            self.fail("callback_path", "must start with `/`");
        }
        let tls = match (self.file("tls_cert"), self.file("tls_key")) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                reload_ms: self.parse("tls_reload_ms", "milliseconds", 10_000).max(100),
            }),
            (None, None) => None,
            (Some(_), None) => {
                self.fail("tls_key", "must be set together with tls_cert");
                None
            }
            (None, Some(_)) => {
                self.fail("tls_cert", "must be set together with tls_key");
                None
            }
        };
        let max_body_bytes = self.parse("max_body_bytes", "a byte count", 0usize);
        if max_body_bytes == 0 || max_body_bytes > 1 << 20 {
            self.fail("max_body_bytes", "must be between 1 and 1048576");
        }
        let sign_max_skew_ms = self.parse("sign_max_skew_ms", "milliseconds", 0);
        let shutdown_drain_ms = self.parse("shutdown_drain_ms", "milliseconds", 0);
        let header_read_timeout_ms = self.parse("header_read_timeout_ms", "milliseconds", 1);
        let request_timeout_ms = self.parse("request_timeout_ms", "milliseconds", 1);
        if header_read_timeout_ms == 0 || request_timeout_ms == 0 {
            self.fail("request_timeout_ms", "timeouts must be above 0");
        }
        let max_connections = self.parse("max_connections", "a count", 1);
        if max_connections == 0 {
            self.fail("max_connections", "must be at least 1");
        }
        let allow_cidrs = self.networks("allow_cidrs");
        let trusted_proxies = self.networks("trusted_proxies");
        let spool = SpoolConfig {
            dir: PathBuf::from(self.opt("spool_dir").unwrap_or("spool")),
            max_bytes: self.parse("spool_max_bytes", "a byte count", 0),
            segment_bytes: self.parse("spool_segment_bytes", "a byte count", 0),
            fsync: self.parse(
                "spool_fsync",
                "always, interval:<ms> or never",
                Fsync::Always,
            ),
        };
        // Two segments at least: a full active segment can only give its space back once a
        // new one has started beside it.
        if spool.segment_bytes < 4096 || spool.max_bytes < 2 * spool.segment_bytes {
            self.fail(
                "spool_segment_bytes",
                "must be at least 4096 and at most half of spool_max_bytes",
            );
        }
        let spool_append_timeout_ms = self.parse("spool_append_timeout_ms", "milliseconds", 1);
        if spool_append_timeout_ms == 0 {
            self.fail("spool_append_timeout_ms", "must be above 0");
        }
        let dedup_window_records = self.parse("dedup_window_records", "a count", 0);
        let dedup_window_ms = self.parse("dedup_window_ms", "milliseconds", 0);
        let publish_max_in_flight = self.parse("publish_max_in_flight", "a count", 1);
        if publish_max_in_flight == 0 {
            self.fail("publish_max_in_flight", "must be at least 1");
        }
        let kafka = self.kafka(options);
        // A callback too big as a record still goes to quarantine as its raw body: that must fit.
        if kafka.message_max_bytes < max_body_bytes as u64 + 16384 {
            self.fail(
                "kafka_message_max_bytes",
                "must be at least max_body_bytes + 16384, so a quarantined body fits",
            );
        }
        Config {
            sdk_app_ids,
            tokens,
            allow_unsigned,
            listen,
            admin_listen,
            callback_path,
            tls,
            max_body_bytes,
            sign_max_skew_ms,
            shutdown_drain_ms,
            header_read_timeout_ms,
            request_timeout_ms,
            spool_append_timeout_ms,
            max_connections,
            allow_cidrs,
            trusted_proxies,
            spool,
            dedup_window_records,
            dedup_window_ms,
            publish_max_in_flight,
            kafka,
        }
    }

    /// A comma list of networks (`10.0.0.0/8`) or single addresses (`203.0.113.7`).
    fn networks(&mut self, key: &str) -> Vec<IpNet> {
        let raw = self.opt(key).unwrap_or("").to_owned();
        let mut nets = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
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
        let Some(raw) = self.opt("sdk_app_id").map(str::to_owned) else {
            self.fail("sdk_app_id", "must be set");
            return Vec::new();
        };
        let mut ids = Vec::new();
        for part in raw.split(',').map(str::trim) {
            match SdkAppId::parse(part) {
                Some(id) => ids.push(id),
                None => self.fail("sdk_app_id", format_args!("`{part}` is not a decimal id")),
            }
        }
        ids
    }

    fn kafka(&mut self, options: BTreeMap<String, String>) -> KafkaConfig {
        let brokers = self.opt("kafka_brokers").unwrap_or("").to_owned();
        if brokers.split(',').any(|b| b.trim().is_empty()) {
            self.fail(
                "kafka_brokers",
                "must be a comma-separated list of host:port",
            );
        }
        let topic = self.topic("topic");
        let quarantine_topic = self.topic("quarantine_topic");
        if topic == quarantine_topic {
            self.fail("quarantine_topic", "must differ from topic");
        }
        let key = match self.one_of("key", &["msgkey", "conversation"]).as_str() {
            "conversation" => KeyMode::Conversation,
            _ => KeyMode::MsgKey,
        };
        let compression = self.one_of(
            "kafka_compression",
            &["none", "gzip", "snappy", "lz4", "zstd"],
        );
        let linger_ms = self.parse("kafka_linger_ms", "milliseconds", 0);
        let queue_max_messages = self.parse("kafka_queue_max_messages", "a count", 1);
        let message_timeout_ms = self.parse("kafka_message_timeout_ms", "milliseconds", 0);
        let message_max_bytes = self.parse("kafka_message_max_bytes", "a byte count", 0);
        if !(10_000..=1_000_000_000).contains(&message_max_bytes) {
            self.fail(
                "kafka_message_max_bytes",
                "must be between 10000 and 1000000000",
            );
        }
        let flush_timeout_ms = self.parse("kafka_flush_timeout_ms", "milliseconds", 0);
        let security_protocol = self.one_of(
            "kafka_security_protocol",
            &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
        );
        let sasl = security_protocol.starts_with("sasl");
        let sasl_mechanism = self.opt("kafka_sasl_mechanism").map(str::to_owned);
        let sasl_username = self.opt("kafka_sasl_username").map(str::to_owned);
        let sasl_password = self.secret("kafka_sasl_password");
        if sasl {
            self.one_of(
                "kafka_sasl_mechanism",
                &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"],
            );
            if sasl_username.is_none() || sasl_password.is_none() {
                self.fail(
                    "kafka_security_protocol",
                    "sasl_* needs kafka_sasl_username and kafka_sasl_password",
                );
            }
        } else if sasl_mechanism.is_some() || sasl_username.is_some() || sasl_password.is_some() {
            self.fail(
                "kafka_security_protocol",
                "SASL settings are given but the protocol is not sasl_plaintext or sasl_ssl",
            );
        }
        let ssl_ca_location = self.file("kafka_ssl_ca_location");
        KafkaConfig {
            brokers,
            topic,
            quarantine_topic,
            key,
            compression,
            linger_ms,
            queue_max_messages,
            message_timeout_ms,
            message_max_bytes,
            flush_timeout_ms,
            security_protocol,
            sasl_mechanism,
            sasl_username,
            sasl_password,
            ssl_ca_location,
            options,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(c.kafka.compression, "zstd");
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
        assert_eq!(ok.spool_append_timeout_ms, 1000);
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
