//! Kafka: the typed settings, the librdkafka options they own, and the client configuration
//! built from them — one module, so a setting and what it sets in librdkafka stay together.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::config::ClientConfig;

use clap::ArgMatches;

use super::settings::{Group, load_raw};
use super::{ConfigErrors, Parser, Secret};
use crate::normalize::KeyMode;

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

impl KafkaConfig {
    /// The Kafka settings alone (for a command that only talks to Kafka, and for tests): no
    /// callback token or app id is asked for.
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<KafkaConfig, ConfigErrors> {
        let (values, options, errors) = load_raw(flags, env, &[Group::Kafka]);
        let mut p = Parser { values, errors };
        let kafka = p.kafka(options);
        if p.errors.is_empty() {
            Ok(kafka)
        } else {
            Err(ConfigErrors(p.errors))
        }
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
    "ssl.ca.location",
];

impl Parser {
    pub(super) fn kafka(&mut self, options: BTreeMap<String, String>) -> KafkaConfig {
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

/// The librdkafka configuration for our settings: idempotent, `acks=all`, batches compressed.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "im-relay")
        // Idempotence implies acks=all and bounded in-flight requests; both stated for clarity.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.queue_max_messages.to_string(),
        )
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        // Feeds the broker gauges (RTT, in-flight, retries, errors).
        .set("statistics.interval.ms", "5000")
        .set("security.protocol", &cfg.security_protocol);
    if let Some(m) = &cfg.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &cfg.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &cfg.sasl_password {
        c.set("sasl.password", p.expose());
    }
    if let Some(ca) = &cfg.ssl_ca_location {
        c.set("ssl.ca.location", ca.to_string_lossy());
    }
    c
}
