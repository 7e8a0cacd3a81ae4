//! The producer side of a run.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::{Error, IN_FLIGHT};
use crate::config::{KafkaConfig, client_config};
use crate::record::Record;

/// The producer side: the relay's idempotent settings, deliveries awaited in groups; or, dry,
/// a line on stdout per record.
pub(super) struct Sink {
    kafka: KafkaConfig,
    producer: Option<FutureProducer>,
    pending: Vec<DeliveryFuture>,
}

impl Sink {
    pub(super) fn new(kafka: &KafkaConfig, dry_run: bool) -> Result<Sink, Error> {
        let producer = if dry_run {
            None
        } else {
            Some(
                client_config(kafka)
                    .set("client.id", "im-relay-backfill")
                    // The default context would log librdkafka's statistics at info.
                    .set("statistics.interval.ms", "0")
                    .create()
                    .map_err(|e| Error(format!("cannot make the Kafka producer: {e}")))?,
            )
        };
        Ok(Sink {
            kafka: kafka.clone(),
            producer,
            pending: Vec::new(),
        })
    }

    pub(super) async fn send(&mut self, record: Record, id: &str) -> Result<(), Error> {
        let topic = self.kafka.topic_for(record.target).to_owned();
        let Some(producer) = self.producer.clone() else {
            println!("would publish {id} to {topic}");
            return Ok(());
        };
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let mut message = FutureRecord::to(&topic)
            .payload(record.value.as_slice())
            .headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_slice());
        }
        let mut message = Some(message);
        loop {
            match producer.send_result(message.take().expect("set")) {
                Ok(delivery) => break self.pending.push(delivery),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    message = Some(back);
                    self.flush().await?;
                }
                Err((e, _)) => return Err(Error(format!("publishing {id}: {e}"))),
            }
        }
        if self.pending.len() >= IN_FLIGHT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits for every record handed over; any that Kafka refused fails the run.
    pub(super) async fn flush(&mut self) -> Result<(), Error> {
        for delivery in std::mem::take(&mut self.pending) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error(format!("Kafka refused a record: {e}"))),
                Err(_) => return Err(Error("the Kafka producer went away".into())),
            }
        }
        Ok(())
    }
}
