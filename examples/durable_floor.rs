//! The durable floor: the least a relay that syncs every callback before its `OK` and publishes
//! it to Kafka pays on this machine. The same HTTP server as `ack_ceiling`; each body goes to
//! one writer thread, which writes its group over a preallocated file, `fdatasync`s it, and only
//! then lets the group's answers go; then it produces each body, keyed by its `MsgKey` and with
//! six headers like the relay's CloudEvents ones, with the relay's own librdkafka settings
//! (idempotent, `acks=all`, compression, linger: the same `IM_RELAY_KAFKA_*` variables). It
//! counts every delivery report and never writes over a body Kafka has not confirmed. No
//! validation, no record of our own (the raw body), no retries, no recovery, no metrics: what
//! is left is the disk, the hand-offs between threads and Kafka. `scripts/bench` runs it next
//! to the ceiling, so that the relay's cost can be read against both.
//!
//!     IM_RELAY_KAFKA_BROKERS=127.0.0.1:9092 IM_RELAY_TOPIC=im.messages \
//!       cargo run --release --example durable_floor -- 127.0.0.1:18090 /tmp/floor

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use im_relay::config::{KafkaConfig, client_config};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::oneshot;

/// Written over and over, like the relay's recycled segments: a sync never allocates blocks.
const RING_BYTES: u64 = 64 << 20;

type Job = (Bytes, oneshot::Sender<()>);

/// Delivery reports received, successful or not.
#[derive(Default)]
struct Reports(AtomicU64);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            // Not retried: the bench's read-back counts it as missing.
            eprintln!("delivery failed: {e}");
        }
        self.0.fetch_add(1, Ordering::Release);
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18090".into())
        .parse()
        .map_err(std::io::Error::other)?;
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "durable-floor".into()));
    let kafka = KafkaConfig::load(None, &|k| std::env::var(k).ok())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let producer: ThreadedProducer<Reports> = client_config(&kafka)
        .create_with_context(Reports::default())
        .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(&dir)?;
    let mut ring = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.join("ring"))?;
    // Zeros written and synced before the first request: its blocks exist from the start.
    for _ in 0..RING_BYTES >> 20 {
        ring.write_all(&[0; 1 << 20])?;
    }
    ring.sync_all()?;
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("floor-writer".into())
        .spawn(move || write_then_publish(ring, rx, producer, kafka.topic))?;
    let app = Router::new()
        .route("/im/callback", post(callback))
        .with_state(tx);
    let mut server = axum_server::bind(addr);
    im_relay::startup::http_limits(server.http_builder(), Duration::from_secs(5));
    eprintln!("durable floor listening on {addr}");
    server
        .serve(app.into_make_service_with_connect_info::<SocketAddr>())
        .await
}

async fn callback(State(tx): State<mpsc::Sender<Job>>, body: Bytes) -> im_relay::error::Ack {
    let (done, synced) = oneshot::channel();
    tx.send((body, done))
        .expect("the writer runs as long as the server");
    synced.await.expect("the writer answers every job");
    im_relay::error::Ack
}

/// Group commit: whatever waits is written and synced as one, answered, then produced.
fn write_then_publish(
    ring: File,
    rx: mpsc::Receiver<Job>,
    producer: ThreadedProducer<Reports>,
    topic: String,
) {
    let (mut buf, mut at, mut produced) = (Vec::new(), 0u64, 0u64);
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter().take(4095));
        buf.clear();
        for (body, _) in &group {
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(body);
        }
        if at + buf.len() as u64 > RING_BYTES {
            // Back to the start: only over bodies Kafka has confirmed.
            while producer.context().0.load(Ordering::Acquire) < produced {
                std::thread::sleep(Duration::from_millis(1));
            }
            at = 0;
        }
        ring.write_all_at(&buf, at).expect("ring write");
        ring.sync_data().expect("ring sync");
        at += buf.len() as u64;
        let bodies: Vec<Bytes> = group
            .into_iter()
            .map(|(body, done)| {
                let _ = done.send(());
                body
            })
            .collect();
        let time = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        for body in &bodies {
            let key = msg_key(body);
            let headers = [
                ("ce_specversion", &b"1.0"[..]),
                ("ce_id", key),
                ("ce_source", b"/tencent-im/1400000000"),
                ("ce_type", im_relay::normalize::EVENT_TYPE.as_bytes()),
                ("ce_time", time.as_bytes()),
                ("content-type", b"application/json"),
            ];
            let headers =
                headers
                    .into_iter()
                    .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
                        h.insert(Header {
                            key,
                            value: Some(value),
                        })
                    });
            let mut record = BaseRecord::to(&topic)
                .key(key)
                .payload(&body[..])
                .headers(headers);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    // A full queue: wait for deliveries to make room, as the relay does.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    // Never queued, so no report will come: the bench's read-back counts it.
                    Err((e, _)) => {
                        eprintln!("produce: {e}");
                        producer.context().0.fetch_add(1, Ordering::Release);
                        break;
                    }
                }
            }
            produced += 1;
        }
    }
}

/// The body's `MsgKey` (the bench's bodies are compact JSON), or nothing.
fn msg_key(body: &[u8]) -> &[u8] {
    const FIELD: &[u8] = br#""MsgKey":""#;
    let Some(start) = body
        .windows(FIELD.len())
        .position(|w| w == FIELD)
        .map(|i| i + FIELD.len())
    else {
        return b"";
    };
    let len = body[start..].iter().position(|&b| b == b'"').unwrap_or(0);
    &body[start..start + len]
}
