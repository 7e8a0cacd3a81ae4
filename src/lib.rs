//! im-relay: Tencent Cloud IM after-send callbacks in, Kafka records out, nothing acknowledged
//! ever lost.
//!
//! A callback walks one road, one module per stage:
//!
//! ```text
//!  Tencent ─HTTP─▶ receive ─▶ validate ─▶ normalize ─▶ spool ══▶ publish ─▶ Kafka
//!                 (axum, body  (SdkAppid,  (typed,      (durable   (idempotent
//!                  cap, answers Sign,       lossless     log; OK    producer,
//!                  in Tencent's freshness)  record +     only once  commits what
//!                  shape)                   headers)     written)   Kafka confirmed)
//! ```
//!
//! The record envelope (`record`: topic, key, headers, value) is its own module: `receive`
//! builds records, the spool stores their bytes, `publish` sends them.
//!
//! `receive` reads the query first and the (capped) body only after `validate` accepted it;
//! `normalize` is pure — callback in, record bytes and headers out; the `spool` knows frames,
//! bytes and positions, not Tencent nor Kafka; `publish` runs on its own thread, reads the
//! spool and knows Kafka, never HTTP. Around the road: `domain` holds the parsed identities the
//! stages share, `error` the one answer shape at the HTTP edge, `config` the typed settings,
//! `telemetry` the events (log line + metric), and `startup`, the only module that wires the
//! stages together, owns listeners and the order of shutdown.

pub mod backfill;
#[cfg(feature = "load-tool")]
pub mod bench;
pub mod config;
pub mod domain;
pub mod error;
pub mod json;
pub mod normalize;
pub mod publish;
pub mod receive;
pub mod record;
pub mod spool;
pub mod startup;
pub mod sync;
pub mod telemetry;
pub mod validate;
