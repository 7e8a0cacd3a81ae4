//! What a downstream sync job starts from: consume im-relay's topic and print each record with
//! its key, partition, offset and headers.
//!
//! ```sh
//! cargo run --example consume -- --brokers 127.0.0.1:9092 --topic im.c2c.messages
//! ```
//!
//! Delivery is at-least-once: a record may arrive twice. Deduplicate on the `ce_id` header (the
//! record's `id`), which is the same for every copy of one message.

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "im.c2c.messages")]
    topic: String,
    /// Consumer group; offsets are committed, so a restart resumes where it stopped.
    #[arg(long, default_value = "im-relay-example")]
    group: String,
    /// Stop after this many records (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    max: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&args.topic])?;
    eprintln!(
        "reading {} from {} as group {}",
        args.topic, args.brokers, args.group
    );

    let mut seen = HashSet::new();
    let mut printed = 0;
    while args.max == 0 || printed < args.max {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg?;
        let mut ce_id = None;
        let mut headers = Vec::new();
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                if h.key == "ce_id" {
                    ce_id = Some(value.clone());
                }
                headers.push(format!("{}={value}", h.key));
            }
        }
        if let Some(id) = &ce_id
            && !seen.insert(id.clone())
        {
            eprintln!("duplicate {id} skipped");
            continue;
        }
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default());
        let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        println!(
            "key={key} partition={} offset={}\n  headers: {}\n{}",
            msg.partition(),
            msg.offset(),
            headers.join(" "),
            serde_json::to_string_pretty(&value)?
        );
        printed += 1;
    }
    Ok(())
}
