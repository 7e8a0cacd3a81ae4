//! The production `Sink`: librdkafka's threaded producer, its callbacks, its configuration,
//! and the one table that says what each Kafka error means for a record.

use std::sync::mpsc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};

use super::{Disposition, Event, Failure, SendError, Sink};
use crate::config::{KafkaConfig, client_config};
use crate::record::View;
use crate::telemetry::Event as _;
use crate::telemetry::{Blocked, KafkaStatistics};

/// What a Kafka error means for the record it hit. Unknown codes wait: dropping is never the
/// default. docs/zero-loss.md shows this table.
pub fn classify(error: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let disposition = match error.rdkafka_error_code() {
        // Refused for good: this record can never be written to this topic (once it was
        // refused alone: the publisher sends it again by itself first).
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidRecord | C::BadMessage) => {
            Disposition::Refused
        }
        // The record's timestamp is outside the broker's `message.timestamp.*.ms` window: the
        // relay's (or the broker's) clock is off, which is fixed there, not by moving the
        // whole stream to the quarantine topic.
        Some(C::InvalidTimestamp) => Disposition::Wait(Blocked::TimestampRefused),
        // CORRUPT_MESSAGE: the batch failed its CRC on the way; Kafka calls it retriable.
        Some(C::InvalidMessage) => Disposition::Wait(Blocked::CorruptInTransit),
        Some(
            C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition | C::UnknownTopicId,
        ) => Disposition::Wait(Blocked::TopicMissing),
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed,
        ) => Disposition::Wait(Blocked::NotAuthorized),
        Some(C::SaslAuthenticationFailed | C::Authentication) => {
            Disposition::Wait(Blocked::AuthenticationFailed)
        }
        Some(
            C::Fatal
            | C::OutOfOrderSequenceNumber
            | C::InvalidProducerEpoch
            | C::UnknownProducerId
            | C::ProducerFenced
            | C::InvalidProducerIdMapping,
        ) => Disposition::Wait(Blocked::ProducerFatal),
        Some(
            C::MessageTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::PurgeQueue
            | C::PurgeInflight,
        ) => Disposition::Wait(Blocked::BrokerUnavailable),
        _ => Disposition::Wait(Blocked::Other),
    };
    Failure {
        disposition,
        error: error.to_string(),
    }
}

/// Producer callbacks: delivery reports go to the publisher thread; librdkafka's logs become
/// ours.
pub struct Reporter {
    events: mpsc::Sender<Event>,
    /// Which producer instance this is: reports from a replaced one are ignored.
    generation: u64,
}

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

    fn stats(&self, statistics: rdkafka::Statistics) {
        KafkaStatistics(&statistics).emit();
        // UP: connected and, with SASL, authenticated.
        if statistics.brokers.values().any(|b| b.state == "UP") {
            let _ = self.events.send(Event::CredentialsAccepted {
                generation: self.generation,
            });
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker connection errors land here; librdkafka reconnects by itself, and the spool
        // holds the records meanwhile. A fatal error may arrive here with nothing in flight:
        // the publisher rebuilds the producer then too.
        let generation = self.generation;
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fatal) => {
                let _ = self.events.send(Event::Fatal { generation });
            }
            // librdkafka retries refused credentials by itself, reporting each refusal here
            // only: the records would just time out later, as if the broker were away.
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                let _ = self.events.send(Event::CredentialsRefused { generation });
            }
            _ => {}
        }
        tracing::warn!(target: "librdkafka", error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for Reporter {
    /// The record's spool sequence number, carried as the pointer-sized opaque itself: no
    /// allocation per record, made on one thread and freed on another.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let _ = self.events.send(Event::Delivered {
            generation: self.generation,
            seq: seq as u64,
            result: match result {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(classify(e)),
            },
        });
    }
}

/// librdkafka's threaded producer as the publisher's sink.
pub struct KafkaSink {
    cfg: KafkaConfig,
    events: mpsc::Sender<Event>,
    producer: ThreadedProducer<Reporter>,
}

impl KafkaSink {
    pub fn new(
        cfg: &KafkaConfig,
        events: mpsc::Sender<Event>,
        generation: u64,
    ) -> Result<Self, KafkaError> {
        let producer = client_config(cfg).create_with_context(Reporter {
            events: events.clone(),
            generation,
        })?;
        Ok(KafkaSink {
            cfg: cfg.clone(),
            events,
            producer,
        })
    }
}

// A spool sequence number travels as librdkafka's opaque pointer: 64 bits are needed.
const _: () = assert!(usize::BITS >= u64::BITS);

impl Sink for KafkaSink {
    fn send(&mut self, topic: &str, seq: u64, entry: &View<'_>) -> Result<(), SendError> {
        let headers = entry.headers().fold(
            OwnedHeaders::new_with_capacity(entry.header_count()),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut record = BaseRecord::with_opaque_to(topic, seq as usize)
            .payload(entry.value)
            .headers(headers);
        if let Some(key) = entry.key {
            record = record.key(key);
        }
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            // Refused before it left: an unknown topic, a record too large, a fatal state.
            Err((error, _)) => Err(SendError::Failed(classify(&error))),
        }
    }

    fn rebuild(&mut self, generation: u64) -> Result<(), String> {
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let next = KafkaSink::new(&self.cfg, self.events.clone(), generation)
            .map_err(|e| e.to_string())?;
        // The old producer's drop waits for its queue, already purged.
        let _ = self.producer.flush(Duration::from_millis(100));
        *self = next;
        Ok(())
    }

    fn fatal(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(_, reason)| reason)
    }

    fn explain(&mut self, topic: &str) -> Option<Blocked> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(1))
            .ok()?;
        let error = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)?
            .error()?;
        match classify(&KafkaError::MetadataFetch(error.into())).disposition {
            Disposition::Wait(reason @ (Blocked::TopicMissing | Blocked::NotAuthorized)) => {
                Some(reason)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
impl KafkaSink {
    /// librdkafka's own hook for tests: puts the producer in a fatal state, as a real
    /// idempotence failure would, reported through the error callback.
    pub(crate) fn inject_fatal(&self) {
        let reason = std::ffi::CString::new("injected by a test").expect("no NUL");
        // SAFETY: the pointer is this live producer's handle; the reason outlives the call.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                self.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }
}
