//! The settings table — every setting's key, default, help, whether it is a secret — and how
//! raw values are layered: defaults → TOML file → `IM_RELAY_*` environment → flags.

use std::collections::BTreeMap;

use clap::{Arg, ArgAction, ArgMatches};

use super::kafka::OWNED_KAFKA_OPTIONS;
use super::read_secret_file;

/// What a setting configures. Each subcommand loads the groups it uses: `serve` all of them;
/// a command that only talks to Kafka loads `Kafka` and is never asked for a callback token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Receiving callbacks: ids, tokens, listeners, limits, the spool, the publisher.
    Serve,
    /// The brokers, topics, keys and the producer's settings.
    Kafka,
    /// `im-relay sync`: its database, consumer group and admin listener.
    Sync,
    /// The Tencent IM application: `serve` takes callbacks for it, `backfill` reads its history.
    App,
    /// Tencent's REST API (`backfill` and `reconcile`).
    Tencent,
    /// `im-relay reconcile`: its state, temporary files, admin listener, the relays it asks.
    Reconcile,
}

pub(super) struct Setting {
    pub(super) key: &'static str,
    /// The flag's name when it is not the key's (`--database` for `sync_database_url`).
    flag: Option<&'static str>,
    pub(super) group: Group,
    default: Option<&'static str>,
    pub(super) secret: bool,
    help: &'static str,
}

const fn s(
    group: Group,
    key: &'static str,
    default: Option<&'static str>,
    help: &'static str,
) -> Setting {
    Setting {
        key,
        flag: None,
        group,
        default,
        secret: false,
        help,
    }
}

impl Setting {
    const fn flag(self, flag: &'static str) -> Setting {
        Setting {
            flag: Some(flag),
            ..self
        }
    }
}

const fn secret(group: Group, key: &'static str, help: &'static str) -> Setting {
    Setting {
        key,
        flag: None,
        group,
        default: None,
        secret: true,
        help,
    }
}

use Group::{App, Kafka, Reconcile, Serve, Sync, Tencent};

/// Every setting's key, spelled once: the table and the parsers name them through these.
pub mod key {
    pub const SDK_APP_ID: &str = "sdk_app_id";
    pub const TOKEN: &str = "token";
    pub const TOKEN_NEXT: &str = "token_next";
    pub const ALLOW_UNSIGNED: &str = "allow_unsigned";
    pub const LISTEN: &str = "listen";
    pub const ADMIN_LISTEN: &str = "admin_listen";
    pub const CALLBACK_PATH: &str = "callback_path";
    pub const HEALTH_PATH: &str = "health_path";
    pub const TLS_CERT: &str = "tls_cert";
    pub const TLS_RELOAD_MS: &str = "tls_reload_ms";
    pub const MAX_BODY_BYTES: &str = "max_body_bytes";
    pub const SIGN_MAX_SKEW_MS: &str = "sign_max_skew_ms";
    pub const SHUTDOWN_DRAIN_MS: &str = "shutdown_drain_ms";
    pub const HEADER_READ_TIMEOUT_MS: &str = "header_read_timeout_ms";
    pub const REQUEST_TIMEOUT_MS: &str = "request_timeout_ms";
    pub const MAX_CONNECTIONS: &str = "max_connections";
    pub const ALLOW_CIDRS: &str = "allow_cidrs";
    pub const TRUSTED_PROXIES: &str = "trusted_proxies";
    pub const SPOOL_DIR: &str = "spool_dir";
    pub const SPOOL_MAX_BYTES: &str = "spool_max_bytes";
    pub const SPOOL_SEGMENT_BYTES: &str = "spool_segment_bytes";
    pub const SPOOL_FSYNC: &str = "spool_fsync";
    pub const SPOOL_APPEND_TIMEOUT_MS: &str = "spool_append_timeout_ms";
    pub const DEDUP_WINDOW_RECORDS: &str = "dedup_window_records";
    pub const DEDUP_WINDOW_MS: &str = "dedup_window_ms";
    pub const PUBLISH_MAX_IN_FLIGHT: &str = "publish_max_in_flight";
    pub const KAFKA_BROKERS: &str = "kafka_brokers";
    pub const TOPIC: &str = "topic";
    pub const QUARANTINE_TOPIC: &str = "quarantine_topic";
    pub const RECALL_TOPIC: &str = "recall_topic";
    pub const EDIT_TOPIC: &str = "edit_topic";
    pub const READ_REPORT_TOPIC: &str = "read_report_topic";
    pub const READ_RECEIPT_TOPIC: &str = "read_receipt_topic";
    pub const RELAY_COMMANDS: &str = "relay_commands";
    pub const SYNC_DATABASE_URL: &str = "sync_database_url";
    pub const SYNC_DATABASE_PASSWORD: &str = "sync_database_password";
    pub const SYNC_GROUP: &str = "sync_group";
    pub const SYNC_ADMIN_LISTEN: &str = "sync_admin_listen";
    pub const SYNC_BATCH_MAX: &str = "sync_batch_max";
    pub const SYNC_SCHEMA: &str = "sync_schema";
    pub const SYNC_REDACT_RECALLED: &str = "sync_redact_recalled";
    pub const KEY: &str = "key";
    pub const KAFKA_COMPRESSION: &str = "kafka_compression";
    pub const KAFKA_LINGER_MS: &str = "kafka_linger_ms";
    pub const KAFKA_QUEUE_MAX_MESSAGES: &str = "kafka_queue_max_messages";
    pub const KAFKA_MESSAGE_TIMEOUT_MS: &str = "kafka_message_timeout_ms";
    pub const KAFKA_MESSAGE_MAX_BYTES: &str = "kafka_message_max_bytes";
    pub const KAFKA_FLUSH_TIMEOUT_MS: &str = "kafka_flush_timeout_ms";
    pub const KAFKA_SECURITY_PROTOCOL: &str = "kafka_security_protocol";
    pub const KAFKA_SASL_MECHANISM: &str = "kafka_sasl_mechanism";
    pub const KAFKA_SSL_CA_LOCATION: &str = "kafka_ssl_ca_location";
    pub const TLS_KEY: &str = "tls_key";
    pub const KAFKA_SASL_USERNAME: &str = "kafka_sasl_username";
    pub const KAFKA_SASL_PASSWORD: &str = "kafka_sasl_password";
    pub const KAFKA_OIDC_TOKEN_ENDPOINT_URL: &str = "kafka_oidc_token_endpoint_url";
    pub const KAFKA_OIDC_CLIENT_ID: &str = "kafka_oidc_client_id";
    pub const KAFKA_OIDC_CLIENT_SECRET: &str = "kafka_oidc_client_secret";
    pub const KAFKA_OIDC_SCOPE: &str = "kafka_oidc_scope";
    pub const TENCENT_API_URL: &str = "tencent_api_url";
    pub const TENCENT_ADMIN: &str = "tencent_admin";
    pub const TENCENT_SECRET_KEY: &str = "tencent_secret_key";
    pub const TENCENT_TIMEOUT_MS: &str = "tencent_timeout_ms";
    pub const NO_CALLBACK_SENDERS: &str = "no_callback_senders";
    pub const NO_CALLBACK_PLATFORMS: &str = "no_callback_platforms";
    pub const ROAM_RECALL_LOOKBACK_MS: &str = "roam_recall_lookback_ms";
    pub const RECONCILE: &str = "reconcile";
    pub const RECONCILE_DELAY_MS: &str = "reconcile_delay_ms";
    pub const RECONCILE_ADMIN_LISTEN: &str = "reconcile_admin_listen";
    pub const RECONCILE_STATE_DIR: &str = "reconcile_state_dir";
    pub const RECONCILE_TEMP_DIR: &str = "reconcile_temp_dir";
    pub const RECONCILE_RELAYS: &str = "reconcile_relays";
    pub const RECONCILE_ALLOW_MISSING_RECORDS: &str = "reconcile_allow_missing_records";
}

pub(super) const SETTINGS: &[Setting] = &[
    s(
        App,
        key::SDK_APP_ID,
        None,
        "Tencent IM SdkAppid(s) served, comma-separated (required; backfill takes one)",
    ),
    secret(
        Serve,
        key::TOKEN,
        "callback token set in the IM console; enables signature checks",
    ),
    secret(
        Serve,
        key::TOKEN_NEXT,
        "second token accepted during a token rotation",
    ),
    s(
        Serve,
        key::ALLOW_UNSIGNED,
        Some("false"),
        "run without a token (no signature checks): true | false",
    ),
    s(
        Serve,
        key::LISTEN,
        Some("0.0.0.0:8080"),
        "address for Tencent's callbacks",
    ),
    s(
        Serve,
        key::ADMIN_LISTEN,
        Some("0.0.0.0:8081"),
        "address for /metrics, /livez, /readyz",
    ),
    s(
        Serve,
        key::CALLBACK_PATH,
        Some("/im/callback"),
        "path of the callback URL",
    ),
    s(
        Serve,
        key::HEALTH_PATH,
        Some("/healthz"),
        "GET path on the callback port for load balancer health checks: 200 ready, 503 not",
    ),
    s(
        Serve,
        key::TLS_CERT,
        None,
        "PEM certificate chain; serve HTTPS when set with tls_key",
    ),
    s(Serve, key::TLS_KEY, None, "PEM private key for tls_cert"),
    s(
        Serve,
        key::TLS_RELOAD_MS,
        Some("10000"),
        "how often the certificate files are checked for changes",
    ),
    s(
        Serve,
        key::MAX_BODY_BYTES,
        Some("65536"),
        "largest callback body accepted",
    ),
    s(
        Serve,
        key::SIGN_MAX_SKEW_MS,
        Some("60000"),
        "accepted |now - RequestTime|",
    ),
    s(
        Serve,
        key::SHUTDOWN_DRAIN_MS,
        Some("10000"),
        "time in-flight requests get on shutdown",
    ),
    s(
        Serve,
        key::HEADER_READ_TIMEOUT_MS,
        Some("10000"),
        "time a client gets to send a request's headers (slowloris guard)",
    ),
    s(
        Serve,
        key::REQUEST_TIMEOUT_MS,
        Some("10000"),
        "time a client gets to send a request's body",
    ),
    s(
        Serve,
        key::MAX_CONNECTIONS,
        Some("4096"),
        "open connections to the callback listener, at most",
    ),
    s(
        Serve,
        key::RELAY_COMMANDS,
        Some(
            "C2C.CallbackAfterSendMsg,C2C.CallbackAfterMsgWithDraw,C2C.CallbackAfterModifyMsg,\
             C2C.CallbackAfterMsgReport,C2C.CallbackAfterMsgReadReceipt,\
             C2C.CallbackAfterMsgReadAll",
        ),
        "callbacks relayed, comma-separated; any other is answered OK and not published",
    ),
    s(
        Serve,
        key::ALLOW_CIDRS,
        None,
        "networks allowed to call, comma-separated (empty: any)",
    ),
    s(
        Serve,
        key::TRUSTED_PROXIES,
        None,
        "networks whose X-Forwarded-For is believed, comma-separated",
    ),
    s(
        Serve,
        key::SPOOL_DIR,
        Some("spool"),
        "durable spool directory (one relay per directory)",
    ),
    s(
        Serve,
        key::SPOOL_MAX_BYTES,
        Some("1073741824"),
        "bound on the spool; beyond it: 503",
    ),
    s(
        Serve,
        key::SPOOL_SEGMENT_BYTES,
        Some("67108864"),
        "size at which a new spool segment starts",
    ),
    s(
        Serve,
        key::SPOOL_FSYNC,
        Some("always"),
        "always | interval:<ms> | never",
    ),
    s(
        Serve,
        key::SPOOL_APPEND_TIMEOUT_MS,
        Some("1000"),
        "a spool write taking longer is answered 503 and turns readiness red (Tencent waits 2 s)",
    ),
    s(
        Serve,
        key::DEDUP_WINDOW_RECORDS,
        Some("100000"),
        "record ids remembered against duplicates (0: off)",
    ),
    s(
        Serve,
        key::DEDUP_WINDOW_MS,
        Some("600000"),
        "how long a record id is remembered",
    ),
    s(
        Serve,
        key::PUBLISH_MAX_IN_FLIGHT,
        Some("2000"),
        "records sent to Kafka, not yet confirmed, at most",
    ),
    s(
        Serve,
        key::RECONCILE,
        Some("off"),
        "off (serve no longer reconciles: run `im-relay reconcile`, one per app)",
    ),
    s(
        Reconcile,
        key::RECONCILE_DELAY_MS,
        Some("7200000"),
        "how long after an hour ends its reconciliation starts (Tencent's file is ready ~1 h after)",
    ),
    s(
        Reconcile,
        key::RECONCILE_ADMIN_LISTEN,
        Some("0.0.0.0:8083"),
        "metrics and health listener (serve's is 8081, sync's 8082)",
    ),
    s(
        Reconcile,
        key::RECONCILE_STATE_DIR,
        Some("reconcile-state"),
        "directory keeping the next hour to reconcile (a volume that outlives the process)",
    ),
    s(
        Reconcile,
        key::RECONCILE_TEMP_DIR,
        None,
        "directory for downloaded hourly files (writable; under a read-only root, a mounted volume) [default: the system's, TMPDIR]",
    ),
    s(
        Reconcile,
        key::RECONCILE_RELAYS,
        None,
        "the relays' admin addresses (host:port, comma-separated; a name may resolve to every replica, e.g. a headless Service): an hour waits until each relay's spool has published what arrived before it ended",
    ),
    s(
        Reconcile,
        key::RECONCILE_ALLOW_MISSING_RECORDS,
        Some("false"),
        "true: reconcile even where records of the hour may have been deleted from the topic (retention, compaction), publishing every message it does not hold",
    ),
    s(
        Tencent,
        key::TENCENT_API_URL,
        None,
        "base URL of Tencent IM's REST API for the app's region, e.g. https://adminapisgp.im.qcloud.com",
    ),
    s(
        Tencent,
        key::TENCENT_ADMIN,
        Some("administrator"),
        "an app administrator account (the REST API's identifier)",
    ),
    secret(
        Tencent,
        key::TENCENT_SECRET_KEY,
        "the app's secret key, which signs UserSigs",
    ),
    s(
        Tencent,
        key::TENCENT_TIMEOUT_MS,
        Some("10000"),
        "time one REST call (or a file download's silence) may take",
    ),
    s(
        Tencent,
        key::NO_CALLBACK_SENDERS,
        None,
        "accounts whose messages Tencent sends no callback for (administrators sending with callbacks forbidden, bots, imports), comma-separated: what reconciliation finds of theirs is counted apart, not as a gap",
    ),
    s(
        Tencent,
        key::NO_CALLBACK_PLATFORMS,
        None,
        "MsgFromPlatform values of messages Tencent sends no callback for (e.g. RESTAPI when the app's server sends with callbacks forbidden), comma-separated",
    ),
    s(
        Tencent,
        key::ROAM_RECALL_LOOKBACK_MS,
        Some("604800000"),
        "roam also reads messages sent this long before the window, for their recalls (default 7 days, what roam keeps)",
    ),
    s(
        Kafka,
        key::KAFKA_BROKERS,
        Some("127.0.0.1:9092"),
        "bootstrap brokers, comma-separated",
    ),
    s(
        Kafka,
        key::TOPIC,
        Some("im.c2c.messages"),
        "topic for message records",
    ),
    s(
        Kafka,
        key::QUARANTINE_TOPIC,
        Some("im.c2c.quarantine"),
        "topic for callbacks that cannot be relayed",
    ),
    s(
        Kafka,
        key::RECALL_TOPIC,
        None,
        "topic for recall records (empty: topic)",
    ),
    s(
        Kafka,
        key::EDIT_TOPIC,
        None,
        "topic for edit records (empty: topic)",
    ),
    s(
        Kafka,
        key::READ_REPORT_TOPIC,
        None,
        "topic for read-report records (empty: topic)",
    ),
    s(
        Kafka,
        key::READ_RECEIPT_TOPIC,
        None,
        "topic for read-receipt records (empty: topic)",
    ),
    s(
        Kafka,
        key::KEY,
        Some("msgkey"),
        "record key: msgkey | conversation",
    ),
    s(
        Kafka,
        key::KAFKA_COMPRESSION,
        Some("zstd"),
        "none | gzip | snappy | lz4 | zstd",
    ),
    s(
        Kafka,
        key::KAFKA_LINGER_MS,
        // 20, not librdkafka's 5: a batch per partition four times fuller halves the broker's
        // CPU per record and sends a third fewer bytes; it adds about 8 ms to a record's way to
        // Kafka and nothing to its acknowledgement (BENCHMARKS.md, issue 14's fourth round).
        Some("20"),
        "time the producer waits to fill a batch",
    ),
    s(
        Kafka,
        key::KAFKA_QUEUE_MAX_MESSAGES,
        Some("100000"),
        "records the producer may hold in memory",
    ),
    s(
        Kafka,
        key::KAFKA_MESSAGE_TIMEOUT_MS,
        Some("60000"),
        "time librdkafka tries a record before we retry it",
    ),
    s(
        Kafka,
        key::KAFKA_MESSAGE_MAX_BYTES,
        Some("1000000"),
        "largest record; larger ones go to quarantine",
    ),
    s(
        Kafka,
        key::KAFKA_FLUSH_TIMEOUT_MS,
        Some("10000"),
        "time to flush the producer on shutdown",
    ),
    s(
        Kafka,
        key::KAFKA_SECURITY_PROTOCOL,
        Some("plaintext"),
        "plaintext | ssl | sasl_plaintext | sasl_ssl",
    ),
    s(
        Kafka,
        key::KAFKA_SASL_MECHANISM,
        None,
        "PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER (with the kafka_oidc_* settings)",
    ),
    s(Kafka, key::KAFKA_SASL_USERNAME, None, "SASL user name"),
    secret(Kafka, key::KAFKA_SASL_PASSWORD, "SASL password"),
    s(
        Kafka,
        key::KAFKA_OIDC_TOKEN_ENDPOINT_URL,
        None,
        "OAUTHBEARER: the identity provider's token endpoint (client credentials grant)",
    ),
    s(
        Kafka,
        key::KAFKA_OIDC_CLIENT_ID,
        None,
        "OAUTHBEARER: the client id",
    ),
    secret(
        Kafka,
        key::KAFKA_OIDC_CLIENT_SECRET,
        "OAUTHBEARER: the client secret",
    ),
    s(
        Kafka,
        key::KAFKA_OIDC_SCOPE,
        None,
        "OAUTHBEARER: the scope asked for (optional)",
    ),
    s(
        Kafka,
        key::KAFKA_SSL_CA_LOCATION,
        None,
        "PEM file of the CA that signed the brokers' certificates",
    ),
    s(
        Sync,
        key::SYNC_DATABASE_URL,
        Some("sqlite://im-relay-sync.db"),
        "sqlite://FILE (created if missing) or postgres://USER@HOST[:PORT]/DB (no password here)",
    )
    .flag("database"),
    secret(Sync, key::SYNC_DATABASE_PASSWORD, "PostgreSQL password"),
    s(
        Sync,
        key::SYNC_GROUP,
        Some("im-relay-sync"),
        "Kafka consumer group",
    ),
    s(
        Sync,
        key::SYNC_ADMIN_LISTEN,
        Some("0.0.0.0:8082"),
        "metrics and health listener (serve's is admin_listen, 8081)",
    ),
    s(
        Sync,
        key::SYNC_BATCH_MAX,
        Some("500"),
        "records applied per database transaction, at most",
    ),
    s(
        Sync,
        key::SYNC_SCHEMA,
        None,
        "PostgreSQL: the schema sync's tables live in (created if missing) [default: the search path's]",
    ),
    s(
        Sync,
        key::SYNC_REDACT_RECALLED,
        Some("false"),
        "true: a recalled message's content (elements, custom data) is blanked (NULL) in the tables",
    )
    .flag("redact-recalled"),
];

pub(super) fn env_name(key: &str) -> String {
    format!("IM_RELAY_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// The `serve` command's flags, generated from the settings table.
pub fn serve_command() -> clap::Command {
    command(
        "serve",
        "Receive Tencent IM callbacks and publish them to Kafka",
        &[Serve, App, Kafka],
    )
    .after_help(
        "Secrets are read only from the environment or the config file: IM_RELAY_TOKEN, \
         IM_RELAY_TOKEN_NEXT, IM_RELAY_KAFKA_SASL_PASSWORD, IM_RELAY_KAFKA_OIDC_CLIENT_SECRET, \
         or the same names ending in _FILE \
         naming a file that holds the value. Logs: IM_RELAY_LOG_FORMAT=json|pretty (default json), \
         IM_RELAY_LOG=<filter> (default info, e.g. info,librdkafka=warn).",
    )
}

/// The `sync` command's flags: its own settings and Kafka's, no callback token.
pub fn sync_command() -> clap::Command {
    command(
        "sync",
        "Keep a database (SQLite or PostgreSQL) equal to the conversations the topic describes",
        &[Sync, Kafka],
    )
    .after_help(
        "Secrets are read only from the environment or the config file: \
         IM_RELAY_SYNC_DATABASE_PASSWORD, IM_RELAY_KAFKA_SASL_PASSWORD, or the same names ending \
         in _FILE naming a file that holds the value; a --database URL holding a password is \
         refused.",
    )
}

/// The `backfill` command's settings flags (its run's own flags are added by `backfill`).
pub fn backfill_command() -> clap::Command {
    command(
        "backfill",
        "Publish what Tencent's history holds and the topic does not (after an outage)",
        &[App, Tencent, Kafka],
    )
    .after_help(
        "Secrets are read only from the environment or the config file: \
         IM_RELAY_TENCENT_SECRET_KEY, IM_RELAY_KAFKA_SASL_PASSWORD, or the same names ending in \
         _FILE naming a file that holds the value. Exit status: 0 done, 1 an error, 2 bad \
         settings, 75 an hour's file cannot be ready yet (run again later).",
    )
}

/// The `reconcile` command's flags.
pub fn reconcile_command() -> clap::Command {
    command(
        "reconcile",
        "Reconcile every hour with Tencent's hourly files, for good (one process per app)",
        &[App, Tencent, Kafka, Reconcile],
    )
    .after_help(
        "Secrets are read only from the environment or the config file: \
         IM_RELAY_TENCENT_SECRET_KEY, IM_RELAY_KAFKA_SASL_PASSWORD, or the same names ending in \
         _FILE naming a file that holds the value.",
    )
}

/// A subcommand with a flag for every non-secret setting of `groups`.
fn command(name: &'static str, about: &'static str, groups: &[Group]) -> clap::Command {
    let mut cmd = clap::Command::new(name)
        .about(about)
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
    for setting in SETTINGS
        .iter()
        .filter(|s| !s.secret && groups.contains(&s.group))
    {
        let default = setting
            .default
            .map(|d| format!(" [default: {d}]"))
            .unwrap_or_default();
        let flag = setting
            .flag
            .map_or_else(|| flag_name(setting.key), str::to_owned);
        cmd = cmd.arg(
            Arg::new(setting.key)
                .long(flag)
                .value_name("VALUE")
                .help(format!(
                    "{} [env: {}]{default}",
                    setting.help,
                    env_name(setting.key)
                )),
        );
    }
    cmd
}

/// The layered raw values, before parsing.
pub(super) struct Layers<'a> {
    pub(super) flags: Option<&'a ArgMatches>,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) file: toml::Table,
    pub(super) errors: Vec<String>,
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

    pub(super) fn raw(&mut self, setting: &Setting) -> Option<String> {
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

    pub(super) fn kafka_options(&mut self) -> BTreeMap<String, String> {
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

    pub(super) fn check_file_keys(&mut self) {
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

/// The raw values of the settings in `groups`, layered, with the pass-through Kafka options and
/// every problem met so far.
pub(super) fn load_raw(
    flags: Option<&ArgMatches>,
    env: &dyn Fn(&str) -> Option<String>,
    groups: &[Group],
) -> (
    BTreeMap<&'static str, String>,
    BTreeMap<String, String>,
    Vec<String>,
) {
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
    // Against every setting: one file may serve several subcommands.
    layers.check_file_keys();
    let options = if groups.contains(&Group::Kafka) {
        layers.kafka_options()
    } else {
        BTreeMap::new()
    };
    let mut values = BTreeMap::new();
    for s in SETTINGS.iter().filter(|s| groups.contains(&s.group)) {
        if let Some(v) = layers.raw(s) {
            values.insert(s.key, v);
        }
    }
    (values, options, layers.errors)
}

pub(super) fn setting(key: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no setting named {key}"))
}
