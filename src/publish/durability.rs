//! Whether the topics can keep what `acks=all` promises. An acknowledged callback is only as
//! safe as the topic it lands on: with one replica, or `min.insync.replicas=1`, a broker's disk
//! lost after Kafka confirmed a record loses it, and the spool has already let it go. So the
//! relay reads each topic's replication factor, `min.insync.replicas` and
//! `unclean.leader.election.enable` at start and every few minutes, exports them, and warns
//! when a cluster that could do better (three brokers or more) does not.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::config::{KafkaConfig, connection_config};
use crate::telemetry::Event as _;
use crate::telemetry::TopicDurability;

/// How often the topics are looked at again (settings change without the relay knowing).
pub const EVERY: Duration = Duration::from_secs(300);

/// What one topic's settings allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    pub topic: String,
    /// The smallest replica count of any partition.
    pub replication_factor: usize,
    pub min_insync_replicas: Option<i64>,
    pub unclean_leader_election: Option<bool>,
    pub brokers: usize,
}

impl Durability {
    /// What cannot keep an acknowledged record through one broker's loss, on a cluster large
    /// enough to do so; empty when nothing.
    pub fn risks(&self) -> Vec<&'static str> {
        let mut risks = Vec::new();
        if self.brokers < 3 {
            return risks;
        }
        if self.replication_factor < 3 {
            risks.push("replication factor below 3");
        }
        if self.min_insync_replicas.is_some_and(|m| m < 2) {
            risks.push("min.insync.replicas below 2");
        }
        if self.unclean_leader_election == Some(true) {
            risks.push("unclean.leader.election.enable is true");
        }
        risks
    }
}

/// Reads the settings of `topics` from the cluster. Wholly on a blocking thread: librdkafka's
/// client is created (reading CA files), asked for metadata, and destroyed (joining its
/// threads) there, never on the threads that answer Tencent.
pub async fn check(cfg: &KafkaConfig, topics: &[&str]) -> Result<Vec<Durability>, String> {
    let cfg = cfg.clone();
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || check_blocking(&handle, &cfg, &topics))
        .await
        .map_err(|e| format!("topic durability check: {e}"))?
}

fn check_blocking(
    handle: &tokio::runtime::Handle,
    cfg: &KafkaConfig,
    topics: &[String],
) -> Result<Vec<Durability>, String> {
    let admin: AdminClient<DefaultClientContext> = connection_config(cfg)
        .create()
        .map_err(|e| format!("kafka admin client: {e}"))?;
    let timeout = Duration::from_secs(10);
    let metadata = admin
        .inner()
        .fetch_metadata(None, timeout)
        .map_err(|e| format!("kafka metadata: {e}"))?;
    let brokers = metadata.brokers().len();
    let specifiers: Vec<_> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let configs = handle
        .block_on(admin.describe_configs(&specifiers, &options))
        .map_err(|e| format!("kafka describe configs: {e}"))?;
    let mut out = Vec::new();
    for (topic, config) in topics.iter().zip(configs) {
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        if t.partitions().is_empty() {
            continue;
        }
        let config = config.ok();
        let value = |name: &str| {
            let entry = config.as_ref()?.get(name)?;
            entry.value.clone()
        };
        out.push(Durability {
            topic: topic.clone(),
            replication_factor: t
                .partitions()
                .iter()
                .map(|p| p.replicas().len())
                .min()
                .unwrap_or(0),
            min_insync_replicas: value("min.insync.replicas").and_then(|v| v.parse().ok()),
            unclean_leader_election: value("unclean.leader.election.enable")
                .map(|v| v.eq_ignore_ascii_case("true")),
            brokers,
        });
    }
    Ok(out)
}

/// Checks the relay's topics now and every `EVERY`; runs until aborted.
pub async fn watch(cfg: KafkaConfig) {
    let mut topics: Vec<String> = [
        &cfg.topic,
        &cfg.quarantine_topic,
        &cfg.recall_topic,
        &cfg.edit_topic,
        &cfg.read_report_topic,
        &cfg.read_receipt_topic,
    ]
    .into_iter()
    .cloned()
    .collect();
    topics.sort();
    topics.dedup();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut first = true;
    loop {
        match check(&cfg, &names).await {
            Ok(found) => {
                for d in &found {
                    TopicDurability(d).emit();
                }
            }
            // Kafka away, or no DescribeConfigs right (an ACL): said once, tried again.
            Err(error) if first => tracing::warn!(%error, "topic durability not checked"),
            Err(error) => tracing::debug!(%error, "topic durability not checked"),
        }
        first = false;
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(brokers: usize, rf: usize, min_isr: i64, unclean: bool) -> Durability {
        Durability {
            topic: "t".into(),
            replication_factor: rf,
            min_insync_replicas: Some(min_isr),
            unclean_leader_election: Some(unclean),
            brokers,
        }
    }

    #[test]
    fn a_cluster_of_three_brokers_must_give_three_replicas_and_two_in_sync() {
        assert!(topic(3, 3, 2, false).risks().is_empty());
        assert_eq!(
            topic(3, 2, 2, false).risks(),
            ["replication factor below 3"]
        );
        assert_eq!(
            topic(5, 3, 1, false).risks(),
            ["min.insync.replicas below 2"]
        );
        assert_eq!(
            topic(3, 3, 2, true).risks(),
            ["unclean.leader.election.enable is true"]
        );
        // A smaller cluster cannot do better: nothing to warn about.
        assert!(topic(1, 1, 1, false).risks().is_empty());
        assert!(topic(2, 2, 1, true).risks().is_empty());
    }
}
