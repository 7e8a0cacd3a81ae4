//! Every metric the relay exports, in one table: the `# HELP` lines come from it, and the
//! metric list in docs/operations.md is checked against it (and it against the code) by the tests below.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

#[rustfmt::skip]
pub const METRICS: &[Metric] = &[
    // Callbacks.
    m("im_relay_callbacks_received_total", Counter, &["command"],
        "Authenticated callbacks received, by command."),
    m("im_relay_records_accepted_total", Counter, &["command"],
        "Records spooled from relayed callbacks, by command (a read receipt: one per message it covers)."),
    m("im_relay_callbacks_total", Counter, &["outcome"],
        "Callbacks answered: accepted, ignored (a command not relayed), duplicate, replayed, rejected."),
    m("im_relay_callbacks_rejected_total", Counter, &["reason"],
        "Callbacks refused, by reason."),
    m("im_relay_callbacks_quarantined_total", Counter, &["reason"],
        "Authenticated bodies that could not be relayed, kept on the quarantine topic, by reason."),
    m("im_relay_request_duration_seconds", Histogram, &["outcome"],
        "Time from a request's start to our answer (the ack latency Tencent sees, less the network)."),
    m("im_relay_request_body_bytes", Histogram, &[], "Size of callback bodies."),
    m("im_relay_signature_skew_seconds", Histogram, &[],
        "Our clock minus the request's RequestTime; beyond 60 s either way requests are refused."),
    m("im_relay_http_requests_total", Counter, &["status"], "HTTP requests answered, by status."),
    m("im_relay_http_open_connections", Gauge, &[], "Open client connections."),
    m("im_relay_http_connections_refused_total", Counter, &[],
        "Connections refused at the connection limit."),
    // Messages.
    m("im_relay_messages_total", Counter, &["result", "online_only"],
        "Messages relayed, by Tencent's send result and online-only flag."),
    m("im_relay_message_elements_total", Counter, &["type"], "Message elements, by type."),
    m("im_relay_elements_untyped_total", Counter, &[],
        "Message elements of a type the schema does not name (kept raw)."),
    m("im_relay_message_age_seconds", Histogram, &[],
        "Receive time minus MsgTime: how late Tencent calls."),
    m("im_relay_active_users", Gauge, &["role", "window"],
        "Distinct senders and recipients over 1 min, 1 h and 24 h (HyperLogLog, about 1.6 %)."),
    // Spool.
    m("im_relay_spool_appended_records_total", Counter, &[], "Records written to the spool."),
    m("im_relay_spool_appended_bytes_total", Counter, &[], "Bytes written to the spool."),
    m("im_relay_spool_writes_total", Counter, &[], "Spool write batches."),
    m("im_relay_spool_syncs_total", Counter, &[], "Spool fsyncs."),
    m("im_relay_spool_sync_duration_seconds", Histogram, &[], "Time a spool fsync took."),
    m("im_relay_spool_write_failures_total", Counter, &[],
        "Spool writes the disk refused (the callbacks got 503)."),
    m("im_relay_spool_sync_failures_total", Counter, &[],
        "Spool fsyncs that failed (durability at risk until one succeeds)."),
    m("im_relay_spool_damaged_frames_total", Counter, &[],
        "Damaged spool stretches skipped on reading: records lost to the disk."),
    m("im_relay_spool_backlog_records", Gauge, &[], "Acknowledged records not yet confirmed by Kafka."),
    m("im_relay_spool_set_aside_segments", Gauge, &[],
        "Segments with records that recovery set aside in foreign/ (they overlapped another): im-relay spool drain publishes them."),
    m("im_relay_spool_bytes", Gauge, &[], "Bytes the spool holds."),
    m("im_relay_spool_max_bytes", Gauge, &[], "The spool's bound (IM_RELAY_SPOOL_MAX_BYTES)."),
    m("im_relay_spool_oldest_unpublished_age_seconds", Gauge, &[],
        "Age of the oldest record not yet confirmed by Kafka."),
    // Publishing.
    m("im_relay_records_published_total", Counter, &[], "Records Kafka confirmed."),
    m("im_relay_record_delivery_seconds", Histogram, &[],
        "Time from a callback's arrival to Kafka's confirmation of its record."),
    m("im_relay_publish_retries_total", Counter, &[], "Records sent to Kafka again after an error."),
    m("im_relay_publish_in_flight_records", Gauge, &[],
        "Records read from the spool and not yet confirmed."),
    m("im_relay_publish_blocked", Gauge, &["reason"],
        "1 while publishing waits for the reason (topic_missing, not_authorized, …), else 0."),
    m("im_relay_records_refused_total", Counter, &[],
        "Records Kafka refused for good, moved to the quarantine topic."),
    m("im_relay_dead_letter_records_total", Counter, &[],
        "Records both topics refused, kept in the spool's dead-letter directory."),
    m("im_relay_records_dropped_total", Counter, &[],
        "Acknowledged records an operator gave up (im-relay spool drop)."),
    m("im_relay_producer_rebuilds_total", Counter, &["result"],
        "Producers replaced after a fatal state or a whole message timeout without a delivery."),
    m("im_relay_spool_read_failures_total", Counter, &[],
        "Spool reads that failed (the publisher tries again)."),
    m("im_relay_spool_commit_failures_total", Counter, &[],
        "Committed-position writes that failed (delivered records may be sent again after a restart)."),
    // The topics' durability (checked at start and every 5 minutes).
    m("im_relay_kafka_brokers", Gauge, &[], "Brokers in the cluster's metadata."),
    m("im_relay_kafka_topic_replication_factor", Gauge, &["topic"],
        "Smallest replica count of the topic's partitions."),
    m("im_relay_kafka_topic_min_insync_replicas", Gauge, &["topic"],
        "The topic's min.insync.replicas."),
    m("im_relay_kafka_topic_unclean_leader_election", Gauge, &["topic"],
        "1 when the topic's unclean.leader.election.enable is true."),
    m("im_relay_kafka_topic_at_risk", Gauge, &["topic"],
        "1 when a cluster of 3+ brokers gives the topic fewer than 3 replicas, min.insync.replicas below 2, or unclean leader election."),
    // librdkafka's statistics.
    m("im_relay_kafka_queue_messages", Gauge, &[], "Records in the producer's queue."),
    m("im_relay_kafka_queue_bytes", Gauge, &[], "Bytes in the producer's queue."),
    m("im_relay_kafka_broker_rtt_seconds", Gauge, &["broker"], "Average request round trip."),
    m("im_relay_kafka_broker_requests_in_flight", Gauge, &["broker"],
        "Requests awaiting a response."),
    m("im_relay_kafka_broker_retries_total", Counter, &["broker"],
        "Requests retried (since the producer was built)."),
    m("im_relay_kafka_broker_errors_total", Counter, &["broker"],
        "Request errors (since the producer was built)."),
    m("im_relay_kafka_broker_request_timeouts_total", Counter, &["broker"],
        "Requests timed out (since the producer was built)."),
    m("im_relay_kafka_broker_sent_bytes_total", Counter, &["broker"],
        "Bytes sent to the broker, requests and their framing included (since the producer \
         was built)."),
    // The build.
    m("im_relay_build_info", Gauge, &["version", "git_sha"], "Always 1: the running build."),
    // `im-relay reconcile`.
    m("im_relay_reconcile_hours_total", Counter, &[],
        "Hours compared with Tencent's hourly message files."),
    m("im_relay_reconcile_missing_total", Counter, &["reason"],
        "Records Tencent's files held and the topic did not, published: reason gap (callbacks that never reached the relay) or no_callback (senders and platforms Tencent sends no callback for)."),
    m("im_relay_reconcile_failures_total", Counter, &[],
        "Reconciliation attempts that failed (REST API, file, Kafka, records gone from the topic); retried after 5 minutes."),
    m("im_relay_reconcile_last_success_timestamp_seconds", Gauge, &[],
        "When an hour was last reconciled (Unix time); at start, when the state file was last written, or the start itself."),
    m("im_relay_reconcile_state_broken", Gauge, &[],
        "1 while the state file cannot be read or written or names a future hour: reconciliation is stopped."),
    m("im_relay_reconcile_records_lost", Gauge, &[],
        "1 while records of the hour being reconciled may be gone from the topic (retention, compaction): it is not reconciled."),
    // `im-relay sync`.
    m("im_relay_sync_applied_total", Counter, &["kind"],
        "Records applied to the database (committed), by kind: message, recall, edit, read_report, read_receipt, read_all."),
    m("im_relay_sync_dead_letters_total", Counter, &[],
        "Records the tables cannot take, kept in the dead_letters table."),
    m("im_relay_sync_database_errors_total", Counter, &[],
        "Failed attempts to reach or write the database; the batch waits, offsets are not committed."),
    m("im_relay_sync_commit_failures_total", Counter, &[],
        "Offset commits that failed after a batch was applied (the batch comes again: same rows)."),
    m("im_relay_sync_consumer_errors_total", Counter, &[],
        "Errors the Kafka consumer reported (librdkafka retries by itself)."),
    m("im_relay_sync_skipped_records_total", Counter, &["reason"],
        "Records a partition did not deliver, not in the database (the log names the offsets): deleted (retention overtook sync), not_delivered (compaction, transaction markers, unreadable records)."),
    m("im_relay_sync_conflicts_total", Counter, &[],
        "Transactions another writer got in the way of (deadlock, serialization failure), applied again at once."),
    m("im_relay_sync_lag_records", Gauge, &[],
        "Records on sync's partitions not yet applied."),
];

/// Registers every metric's help text (and unit) with the recorder.
pub fn describe() {
    for metric in METRICS {
        let unit = if metric.name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else if metric.name.ends_with("_bytes") || metric.name.ends_with("_bytes_total") {
            Some(Unit::Bytes)
        } else {
            None
        };
        match (metric.kind, unit) {
            (Kind::Counter, Some(u)) => describe_counter!(metric.name, u, metric.help),
            (Kind::Counter, None) => describe_counter!(metric.name, metric.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(metric.name, u, metric.help),
            (Kind::Gauge, None) => describe_gauge!(metric.name, metric.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(metric.name, u, metric.help),
            (Kind::Histogram, None) => describe_histogram!(metric.name, metric.help),
        }
    }
}

/// The list in docs/operations.md: one line per metric.
pub fn markdown() -> String {
    METRICS
        .iter()
        .map(|m| {
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let labels = if m.labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", m.labels.join(", "))
            };
            format!("| `{}{labels}` | {kind} | {} |\n", m.name, m.help)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every `"im_relay_…"` name recorded in the code.
    fn names_in_code() -> BTreeSet<String> {
        fn walk(dir: &std::path::Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|x| x == "rs")
                    && !path.ends_with("catalog.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for piece in text.split("\"im_relay_").skip(1) {
                        let name: String = piece
                            .chars()
                            .take_while(|c| {
                                c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'
                            })
                            .collect();
                        if piece[name.len()..].starts_with('"') {
                            out.insert(format!("im_relay_{name}"));
                        }
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut out,
        );
        out
    }

    #[test]
    fn the_catalog_names_exactly_the_metrics_the_code_records() {
        let catalog: BTreeSet<String> = METRICS.iter().map(|m| m.name.to_owned()).collect();
        assert_eq!(catalog.len(), METRICS.len(), "a metric listed twice");
        let code = names_in_code();
        let missing: Vec<_> = code.difference(&catalog).collect();
        let stale: Vec<_> = catalog.difference(&code).collect();
        assert!(
            missing.is_empty(),
            "recorded but not in the catalog: {missing:?}"
        );
        assert!(
            stale.is_empty(),
            "in the catalog but never recorded: {stale:?}"
        );
        for m in METRICS {
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                _ => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
        }
    }

    #[test]
    fn the_operations_doc_lists_every_metric() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
                .unwrap();
        let (begin, end) = ("<!-- metrics:begin -->\n", "<!-- metrics:end -->");
        let start = readme
            .find(begin)
            .expect("docs/operations.md has the metrics markers")
            + begin.len();
        let stop = readme[start..]
            .find(end)
            .expect("docs/operations.md closes the metrics list")
            + start;
        let want = format!("| metric | type | what |\n|---|---|---|\n{}", markdown());
        assert!(
            readme[start..stop] == want,
            "docs/operations.md's metric list is stale; replace it with:\n{want}"
        );
    }
}
