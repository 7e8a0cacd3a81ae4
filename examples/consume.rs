//! The downstream pattern to copy: consume im-relay's topic, keep the kinds of record you
//! handle (by the `ce_type` header, without parsing the value), process each, and only then
//! let its offset be committed — a crash replays what was not finished, never skips it.
//!
//! ```sh
//! cargo run --example consume -- --brokers 127.0.0.1:9092 --topic im.c2c.messages \
//!     --types com.tencent.im.c2c.after_send_msg.v2,com.tencent.im.c2c.after_msg_withdraw.v1
//! ```
//!
//! Delivery is at-least-once: a record may arrive twice. Make the processing idempotent — an
//! upsert on the record's `id` (the `ce_id` header), which is the same for every copy of one
//! message or event. Tencent promises no order between callbacks: a recall may come before
//! its message (keep a tombstone), edits are ordered by `event_time_ms`. `im-relay sync` is
//! this pattern with a database behind it.

use std::time::Duration;

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "im.c2c.messages")]
    topic: String,
    /// Consumer group; offsets are committed after processing, so a restart resumes there.
    #[arg(long, default_value = "im-relay-example")]
    group: String,
    /// The `ce_type`s to process, comma-separated (empty: every kind). Others are passed over
    /// — their offsets committed all the same.
    #[arg(long, default_value = "", value_delimiter = ',')]
    types: Vec<String>,
    /// Stop after processing this many records (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    max: usize,
}

/// A header's value, as text.
fn header(msg: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
}

/// The work: here, printing. Replace with an idempotent write keyed by `id`.
fn process(msg: &BorrowedMessage<'_>, ce_type: &str) -> Result<(), Box<dyn std::error::Error>> {
    let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
    println!(
        "{ce_type} id={} partition={} offset={}\n{}",
        value["id"],
        msg.partition(),
        msg.offset(),
        serde_json::to_string_pretty(&value)?
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let types: Vec<String> = args.types.into_iter().filter(|t| !t.is_empty()).collect();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        // librdkafka commits in the background, but only offsets stored below — after
        // processing. With the default (true), it would commit what was merely fetched.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()?;
    consumer.subscribe(&[&args.topic])?;
    eprintln!(
        "reading {} from {} as group {}",
        args.topic, args.brokers, args.group
    );

    let mut processed = 0;
    while args.max == 0 || processed < args.max {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg?;
        let ce_type = header(&msg, "ce_type").unwrap_or_default();
        if types.is_empty() || types.contains(&ce_type) {
            // A failure stops here, before the offset is stored: the record comes again.
            process(&msg, &ce_type)?;
            processed += 1;
        }
        consumer.store_offset_from_message(&msg)?;
    }
    // What was stored is committed before leaving (nothing new to commit is not an error).
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        eprintln!("final commit: {e}");
    }
    Ok(())
}
