//! The producer side of a run: the relay's idempotent settings and its road to Kafka — each
//! error read through the publisher's table (`publish::classify`), a record refused for good
//! sent again alone, then to the quarantine topic with its reason, as the relay would have.
//! What Kafka only cannot take yet (or the quarantine topic refuses too) fails the run, to be
//! run again: nothing is given up.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use super::{Error, IN_FLIGHT};
use crate::config::{KafkaConfig, client_config};
use crate::publish::{Disposition, classify};
use crate::record::{Record, Target};
use crate::telemetry::{Event, RecordRefused};

/// Deliveries awaited in groups; or, dry, a line on stdout per record.
pub(super) struct Sink {
    kafka: KafkaConfig,
    producer: Option<FutureProducer>,
    pending: Vec<(DeliveryFuture, Record, String)>,
    /// Records Kafka refused for good, now on the quarantine topic.
    pub(super) refused: u64,
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
                    .map_err(|e| Error::Other(format!("cannot make the Kafka producer: {e}")))?,
            )
        };
        Ok(Sink {
            kafka: kafka.clone(),
            producer,
            pending: Vec::new(),
            refused: 0,
        })
    }

    fn message<'r>(&'r self, record: &'r Record) -> FutureRecord<'r, [u8], [u8]> {
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let message = FutureRecord::to(self.kafka.topic_for(record.target))
            .payload(record.value.as_slice())
            .headers(headers);
        match &record.key {
            Some(key) => message.key(key.as_slice()),
            None => message,
        }
    }

    pub(super) async fn send(&mut self, record: Record, id: &str) -> Result<(), Error> {
        let Some(producer) = self.producer.clone() else {
            println!(
                "would publish {id} to {}",
                self.kafka.topic_for(record.target)
            );
            return Ok(());
        };
        loop {
            match producer.send_result(self.message(&record)) {
                Ok(delivery) => {
                    self.pending.push((delivery, record, id.to_owned()));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.flush().await?;
                }
                Err((e, _)) => {
                    self.failed(&producer, record, id, &e).await?;
                    break;
                }
            }
        }
        if self.pending.len() >= IN_FLIGHT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits for every record handed over (all of them, whatever one of them met: the first
    /// error is returned once every delivery is known).
    pub(super) async fn flush(&mut self) -> Result<(), Error> {
        let Some(producer) = self.producer.clone() else {
            return Ok(());
        };
        let mut first = None;
        for (delivery, record, id) in std::mem::take(&mut self.pending) {
            let outcome = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => self.failed(&producer, record, &id, &e).await,
                Err(_) => Err(Error::Kafka("the Kafka producer went away".into())),
            };
            if let Err(e) = outcome {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// A record Kafka did not take: refused for good, it is sent again alone (a batch is
    /// refused whole for one record in it), then quarantined; anything else fails the run.
    async fn failed(
        &mut self,
        producer: &FutureProducer,
        mut record: Record,
        id: &str,
        error: &KafkaError,
    ) -> Result<(), Error> {
        let failure = classify(error);
        let not_taken =
            |what: &str, error: &str| Error::Kafka(format!("Kafka did not take {what}: {error}"));
        if failure.disposition != Disposition::Refused {
            return Err(not_taken(id, &failure.error));
        }
        if record.target == Target::Quarantine {
            return Err(not_taken(
                &format!("{id} on the quarantine topic"),
                &failure.error,
            ));
        }
        let alone = producer
            .send(self.message(&record), Timeout::Never)
            .await
            .map_err(|(e, _)| classify(&e));
        match alone {
            Ok(_) => return Ok(()),
            Err(again) if again.disposition == Disposition::Refused => {}
            Err(again) => return Err(not_taken(id, &again.error)),
        }
        RecordRefused {
            error: &failure.error,
        }
        .emit();
        record.quarantine("kafka_refused", &failure.error);
        producer
            .send(self.message(&record), Timeout::Never)
            .await
            .map_err(|(e, _)| {
                not_taken(
                    &format!("{id} on the quarantine topic either"),
                    &e.to_string(),
                )
            })?;
        self.refused += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::collections::HashMap;

    fn record(id: &str) -> Record {
        Record {
            target: Target::Messages,
            key: Some(id.as_bytes().to_vec()),
            headers: vec![("ce_id".into(), id.as_bytes().to_vec())],
            value: id.as_bytes().to_vec(),
            received_at_ms: 0,
        }
    }

    fn ids(mock: &MockCluster<'static, DefaultProducerContext>, topic: &str) -> Vec<String> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "t")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut start = rdkafka::TopicPartitionList::new();
        start
            .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&start).unwrap();
        let mut out = Vec::new();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < until {
            if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
                let id = m.headers().unwrap().iter().find(|h| h.key == "ce_id");
                out.push(String::from_utf8(id.unwrap().value.unwrap().to_vec()).unwrap());
            }
        }
        out
    }

    /// Before, one record Kafka refused for good stopped the run (and reconciliation retried
    /// the hour for six days): now it goes to the quarantine topic and the run goes on.
    #[tokio::test]
    async fn a_record_refused_for_good_is_quarantined_and_the_run_goes_on() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("m", 1, 1).unwrap();
        mock.create_topic("q", 1, 1).unwrap();
        let env: HashMap<&str, String> = [
            ("IM_RELAY_KAFKA_BROKERS", mock.bootstrap_servers()),
            ("IM_RELAY_TOPIC", "m".into()),
            ("IM_RELAY_QUARANTINE_TOPIC", "q".into()),
        ]
        .into();
        let kafka = KafkaConfig::load(None, &|k| env.get(k).cloned()).unwrap();
        let mut sink = Sink::new(&kafka, false).unwrap();
        sink.send(record("before"), "before").await.unwrap();
        sink.flush().await.unwrap();
        // Refused in its batch, then alone.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 2],
        );
        sink.send(record("big"), "big").await.unwrap();
        sink.flush().await.unwrap();
        sink.send(record("after"), "after").await.unwrap();
        sink.flush().await.unwrap();
        assert_eq!(sink.refused, 1);
        assert_eq!(ids(&mock, "m"), ["before", "after"]);
        assert_eq!(ids(&mock, "q"), ["big"]);
        // Refused everywhere: the run fails, to be run again.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 3],
        );
        sink.send(record("huge"), "huge").await.unwrap();
        let error = sink.flush().await.unwrap_err();
        assert!(
            matches!(&error, Error::Kafka(e) if e.contains("quarantine topic")),
            "{error}"
        );
    }
}
