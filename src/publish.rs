//! Stage 5 of the road: **publish**. Hands normalized records to an idempotent librdkafka
//! producer (`acks=all`) and hears back, on librdkafka's thread, whether each was delivered.
//! Knows Kafka; never HTTP.

use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::config::KafkaConfig;
use crate::normalize::Output;
use crate::telemetry::{PublishFailed, RecordPublished};

/// Why a record was not taken; the caller answers 503 and Tencent keeps nothing from us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The producer's in-memory queue is full: Kafka is slower than the callbacks.
    QueueFull,
    /// Larger than `message.max.bytes`.
    TooLarge,
    Other(String),
}

/// Producer callbacks: delivery reports become metrics; librdkafka's logs become ours.
pub struct Reporter;

impl ClientContext for Reporter {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker connection errors land here; librdkafka retries them by itself.
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for Reporter {
    /// When the record was handed over, for the delivery latency.
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_at: Box<Instant>) {
        match result {
            Ok(_) => RecordPublished {
                latency: sent_at.elapsed(),
            }
            .emit(),
            Err((error, _)) => PublishFailed {
                kind: "delivery",
                error,
            }
            .emit(),
        }
    }
}

pub struct Publisher {
    producer: ThreadedProducer<Reporter>,
    topic: String,
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

impl Publisher {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let producer = client_config(cfg).create_with_context(Reporter)?;
        Ok(Publisher {
            producer,
            topic: cfg.topic.clone(),
        })
    }

    /// Hands one record to the producer without waiting for Kafka.
    pub fn send(&self, record: &Output) -> Result<(), SendError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            },
        );
        let base = BaseRecord::with_opaque_to(&self.topic, Box::new(Instant::now()))
            .key(record.key.as_bytes())
            .payload(record.value.as_slice())
            .headers(headers);
        self.producer.send(base).map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => SendError::QueueFull,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
                SendError::TooLarge
            }
            other => SendError::Other(other.to_string()),
        })
    }

    /// Waits up to `timeout` for every record handed over to be delivered or failed.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// Records handed over and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}
