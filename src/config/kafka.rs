//! Kafka: the typed settings, the librdkafka options they own, and the client configuration
//! built from them — one module, so a setting and what it sets in librdkafka stay together.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::config::ClientConfig;

use clap::ArgMatches;

use super::settings::{Group, key, load_raw};
use super::{ConfigErrors, Parser, Secret};
use crate::normalize::KeyMode;
use crate::record::Target;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub quarantine_topic: String,
    /// Per-kind topics, each `topic` unless set.
    pub recall_topic: String,
    pub edit_topic: String,
    pub read_report_topic: String,
    pub read_receipt_topic: String,
    pub key: KeyMode,
    pub compression: Compression,
    pub linger: Duration,
    pub queue_max_messages: u64,
    pub message_timeout: Duration,
    pub message_max_bytes: u64,
    pub flush_timeout: Duration,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    /// OAUTHBEARER through an OIDC provider (librdkafka's `oidc` method): the client
    /// credentials grant against the provider's token endpoint.
    pub oidc: Option<Oidc>,
    pub ssl_ca_location: Option<PathBuf>,
    /// librdkafka options passed through as given, for what has no typed field.
    pub options: BTreeMap<String, String>,
}

/// `sasl.oauthbearer.method=oidc`: librdkafka fetches and refreshes the token itself.
#[derive(Debug, Clone)]
pub struct Oidc {
    pub token_endpoint_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: Option<String>,
}

/// Batch compression (`compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// How the client talks to the brokers (`security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    OAuthBearer,
}

// The external names, once: the setting's values and librdkafka's are the same words.
const COMPRESSIONS: &[(&str, Compression)] = &[
    ("none", Compression::None),
    ("gzip", Compression::Gzip),
    ("snappy", Compression::Snappy),
    ("lz4", Compression::Lz4),
    ("zstd", Compression::Zstd),
];
const PROTOCOLS: &[(&str, SecurityProtocol)] = &[
    ("plaintext", SecurityProtocol::Plaintext),
    ("ssl", SecurityProtocol::Ssl),
    ("sasl_plaintext", SecurityProtocol::SaslPlaintext),
    ("sasl_ssl", SecurityProtocol::SaslSsl),
];
const MECHANISMS: &[(&str, SaslMechanism)] = &[
    ("PLAIN", SaslMechanism::Plain),
    ("SCRAM-SHA-256", SaslMechanism::ScramSha256),
    ("SCRAM-SHA-512", SaslMechanism::ScramSha512),
    ("OAUTHBEARER", SaslMechanism::OAuthBearer),
];

fn name_of<T: PartialEq>(table: &[(&'static str, T)], value: &T) -> &'static str {
    table
        .iter()
        .find(|(_, t)| t == value)
        .map_or("", |(name, _)| name)
}

impl KafkaConfig {
    /// The topic a record for `target` goes to.
    pub fn topic_for(&self, target: Target) -> &str {
        match target {
            Target::Messages => &self.topic,
            Target::Quarantine => &self.quarantine_topic,
            Target::Recalls => &self.recall_topic,
            Target::Edits => &self.edit_topic,
            Target::ReadReports => &self.read_report_topic,
            Target::ReadReceipts => &self.read_receipt_topic,
        }
    }

    /// The Kafka settings alone (for a command that only talks to Kafka, and for tests): no
    /// callback token or app id is asked for.
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<KafkaConfig, ConfigErrors> {
        let (values, options, errors) = load_raw(flags, env, &[Group::Kafka]);
        let mut p = Parser { values, errors };
        let kafka = p.kafka(options);
        p.finish(kafka)
    }
}

/// librdkafka options set by typed settings (or fixed by us); the pass-through may not touch them.
pub(super) const OWNED_KAFKA_OPTIONS: &[&str] = &[
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
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.scope",
    "ssl.ca.location",
];

impl Parser {
    pub(super) fn kafka(&mut self, options: BTreeMap<String, String>) -> KafkaConfig {
        let brokers = self.opt(key::KAFKA_BROKERS).unwrap_or("").to_owned();
        if brokers.split(',').any(|b| b.trim().is_empty()) {
            self.fail(
                key::KAFKA_BROKERS,
                "must be a comma-separated list of host:port",
            );
        }
        let topic = self.topic(key::TOPIC);
        let quarantine_topic = self.topic(key::QUARANTINE_TOPIC);
        if topic == quarantine_topic {
            self.fail(key::QUARANTINE_TOPIC, "must differ from topic");
        }
        let kind_topic = |parser: &mut Self, k: &str| {
            if parser.opt(k).is_none() {
                return topic.clone();
            }
            let t = parser.topic(k);
            if t == quarantine_topic {
                parser.fail(k, "must differ from quarantine_topic");
            }
            t
        };
        let recall_topic = kind_topic(self, key::RECALL_TOPIC);
        let edit_topic = kind_topic(self, key::EDIT_TOPIC);
        let read_report_topic = kind_topic(self, key::READ_REPORT_TOPIC);
        let read_receipt_topic = kind_topic(self, key::READ_RECEIPT_TOPIC);
        let key = match self.one_of(key::KEY, &["msgkey", "conversation"]).as_str() {
            "conversation" => KeyMode::Conversation,
            _ => KeyMode::MsgKey,
        };
        let compression = self.choice(key::KAFKA_COMPRESSION, COMPRESSIONS);
        let linger = self.millis(key::KAFKA_LINGER_MS);
        let queue_max_messages = self.parse(key::KAFKA_QUEUE_MAX_MESSAGES, "a count", 1);
        let message_timeout = self.millis(key::KAFKA_MESSAGE_TIMEOUT_MS);
        let message_max_bytes = self.parse(key::KAFKA_MESSAGE_MAX_BYTES, "a byte count", 0);
        if !(10_000..=1_000_000_000).contains(&message_max_bytes) {
            self.fail(
                key::KAFKA_MESSAGE_MAX_BYTES,
                "must be between 10000 and 1000000000",
            );
        }
        let flush_timeout = self.millis(key::KAFKA_FLUSH_TIMEOUT_MS);
        let security_protocol = self.choice(key::KAFKA_SECURITY_PROTOCOL, PROTOCOLS);
        let sasl = matches!(
            security_protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        let sasl_mechanism = self
            .opt(key::KAFKA_SASL_MECHANISM)
            .is_some()
            .then(|| self.choice(key::KAFKA_SASL_MECHANISM, MECHANISMS));
        let sasl_username = self.opt(key::KAFKA_SASL_USERNAME).map(str::to_owned);
        let sasl_password = self.secret(key::KAFKA_SASL_PASSWORD);
        let endpoint = self
            .opt(key::KAFKA_OIDC_TOKEN_ENDPOINT_URL)
            .map(str::to_owned);
        let client_id = self.opt(key::KAFKA_OIDC_CLIENT_ID).map(str::to_owned);
        let client_secret = self.secret(key::KAFKA_OIDC_CLIENT_SECRET);
        let scope = self.opt(key::KAFKA_OIDC_SCOPE).map(str::to_owned);
        let oidc_given = endpoint.is_some() || client_id.is_some() || client_secret.is_some();
        let oauth = sasl_mechanism == Some(SaslMechanism::OAuthBearer);
        let oidc = match (endpoint, client_id, client_secret) {
            (Some(token_endpoint_url), Some(client_id), Some(client_secret)) if oauth => {
                Some(Oidc {
                    token_endpoint_url,
                    client_id,
                    client_secret,
                    scope,
                })
            }
            _ if oauth => {
                self.fail(
                    key::KAFKA_SASL_MECHANISM,
                    "OAUTHBEARER needs kafka_oidc_token_endpoint_url, kafka_oidc_client_id and \
                     kafka_oidc_client_secret",
                );
                None
            }
            _ => {
                if oidc_given {
                    self.fail(
                        key::KAFKA_SASL_MECHANISM,
                        "OIDC settings are given but the mechanism is not OAUTHBEARER",
                    );
                }
                None
            }
        };
        if sasl {
            if sasl_mechanism.is_none() {
                self.fail(
                    key::KAFKA_SASL_MECHANISM,
                    "must be set for sasl_* protocols",
                );
            }
            if !oauth && (sasl_username.is_none() || sasl_password.is_none()) {
                self.fail(
                    key::KAFKA_SECURITY_PROTOCOL,
                    "sasl_* needs kafka_sasl_username and kafka_sasl_password",
                );
            }
        } else if sasl_mechanism.is_some() || sasl_username.is_some() || sasl_password.is_some() {
            self.fail(
                key::KAFKA_SECURITY_PROTOCOL,
                "SASL settings are given but the protocol is not sasl_plaintext or sasl_ssl",
            );
        }
        let ssl_ca_location = self.file(key::KAFKA_SSL_CA_LOCATION);
        KafkaConfig {
            brokers,
            topic,
            quarantine_topic,
            recall_topic,
            edit_topic,
            read_report_topic,
            read_receipt_topic,
            key,
            compression,
            linger,
            queue_max_messages,
            message_timeout,
            message_max_bytes,
            flush_timeout,
            security_protocol,
            sasl_mechanism,
            sasl_username,
            sasl_password,
            oidc,
            ssl_ca_location,
            options,
        }
    }
}

/// The librdkafka configuration for our settings: idempotent, `acks=all`, batches compressed.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = connection_config(cfg);
    c.set("client.id", "im-relay")
        // Idempotence implies acks=all and bounded in-flight requests; both stated for clarity.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", name_of(COMPRESSIONS, &cfg.compression))
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.queue_max_messages.to_string(),
        )
        .set(
            "message.timeout.ms",
            cfg.message_timeout.as_millis().to_string(),
        )
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        // Feeds the broker gauges (RTT, in-flight, retries, errors).
        .set("statistics.interval.ms", "5000");
    c
}

/// Where the brokers are and how to reach them (security, pass-through options): what a
/// producer and a consumer share.
pub fn connection_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers).set(
        "security.protocol",
        name_of(PROTOCOLS, &cfg.security_protocol),
    );
    if let Some(m) = &cfg.sasl_mechanism {
        c.set("sasl.mechanism", name_of(MECHANISMS, m));
    }
    if let Some(u) = &cfg.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &cfg.sasl_password {
        c.set("sasl.password", p.expose());
    }
    if let Some(o) = &cfg.oidc {
        c.set("sasl.oauthbearer.method", "oidc")
            .set("sasl.oauthbearer.token.endpoint.url", &o.token_endpoint_url)
            .set("sasl.oauthbearer.client.id", &o.client_id)
            .set("sasl.oauthbearer.client.secret", o.client_secret.expose());
        if let Some(scope) = &o.scope {
            c.set("sasl.oauthbearer.scope", scope);
        }
    }
    if let Some(ca) = &cfg.ssl_ca_location {
        c.set("ssl.ca.location", ca.to_string_lossy());
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn typed_settings_reach_librdkafka_under_their_external_names() {
        let env: HashMap<&str, &str> = [
            ("IM_RELAY_KAFKA_COMPRESSION", "zstd"),
            ("IM_RELAY_KAFKA_LINGER_MS", "7"),
            ("IM_RELAY_KAFKA_MESSAGE_TIMEOUT_MS", "45000"),
            ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("IM_RELAY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("IM_RELAY_KAFKA_SASL_USERNAME", "relay"),
            ("IM_RELAY_KAFKA_SASL_PASSWORD", "pw"),
        ]
        .into();
        let cfg = KafkaConfig::load(None, &|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(cfg.compression, Compression::Zstd);
        assert_eq!(cfg.linger, Duration::from_millis(7));
        assert_eq!(cfg.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        let c = client_config(&cfg);
        for (key, want) in [
            ("compression.type", "zstd"),
            ("linger.ms", "7"),
            ("message.timeout.ms", "45000"),
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "relay"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
        ] {
            assert_eq!(c.get(key), Some(want), "{key}");
        }
        let missing: HashMap<&str, &str> = [
            ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext"),
            ("IM_RELAY_KAFKA_SASL_USERNAME", "relay"),
            ("IM_RELAY_KAFKA_SASL_PASSWORD", "pw"),
            ("IM_RELAY_KAFKA_COMPRESSION", "brotli"),
        ]
        .into();
        let err = KafkaConfig::load(None, &|k| missing.get(k).map(|v| v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka_sasl_mechanism"), "{err}");
        assert!(err.contains("`brotli` is not one of none, gzip"), "{err}");
    }

    /// Not tested against an identity provider: the settings reach librdkafka, which this
    /// build lets take them (it is built with libcurl, which its `oidc` method needs).
    #[test]
    fn oidc_settings_reach_librdkafka_and_a_producer_takes_them() {
        let env: HashMap<&str, &str> = [
            ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("IM_RELAY_KAFKA_SASL_MECHANISM", "OAUTHBEARER"),
            (
                "IM_RELAY_KAFKA_OIDC_TOKEN_ENDPOINT_URL",
                "https://idp.example.com/oauth2/token",
            ),
            ("IM_RELAY_KAFKA_OIDC_CLIENT_ID", "im-relay"),
            ("IM_RELAY_KAFKA_OIDC_CLIENT_SECRET", "s3cret"),
            ("IM_RELAY_KAFKA_OIDC_SCOPE", "kafka"),
        ]
        .into();
        let cfg = KafkaConfig::load(None, &|k| env.get(k).map(|v| v.to_string())).unwrap();
        let c = client_config(&cfg);
        for (key, want) in [
            ("sasl.mechanism", "OAUTHBEARER"),
            ("sasl.oauthbearer.method", "oidc"),
            (
                "sasl.oauthbearer.token.endpoint.url",
                "https://idp.example.com/oauth2/token",
            ),
            ("sasl.oauthbearer.client.id", "im-relay"),
            ("sasl.oauthbearer.client.secret", "s3cret"),
            ("sasl.oauthbearer.scope", "kafka"),
        ] {
            assert_eq!(c.get(key), Some(want), "{key}");
        }
        assert!(
            !format!("{cfg:?}").contains("s3cret"),
            "the secret is not printed"
        );
        let producer: Result<rdkafka::producer::BaseProducer, _> = c.create();
        assert!(
            producer.is_ok(),
            "librdkafka takes them: {:?}",
            producer.err()
        );

        let half: HashMap<&str, &str> = [
            ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("IM_RELAY_KAFKA_SASL_MECHANISM", "OAUTHBEARER"),
            ("IM_RELAY_KAFKA_OIDC_CLIENT_ID", "im-relay"),
        ]
        .into();
        let err = KafkaConfig::load(None, &|k| half.get(k).map(|v| v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka_oidc_token_endpoint_url"), "{err}");
    }
}
