//! im-relay: Tencent Cloud IM after-send callbacks in, Kafka records out.
//!
//! A callback walks one road, one module per stage:
//!
//! ```text
//!  Tencent ──HTTP──▶ receive ──▶ validate ──▶ normalize ──▶ publish ──▶ Kafka
//!                   (axum,       (SdkAppid,   (typed,       (idempotent
//!                    body cap,    Sign,        lossless      producer,
//!                    Tencent      freshness)   record +      delivery
//!                    answers)                  headers)      reports)
//! ```
//!
//! `receive` reads the query first and the (capped) body only after `validate` accepted the
//! query; `normalize` is pure — callback in, record bytes and headers out; `publish` knows
//! Kafka and nothing of HTTP. Around the road: `domain` holds the parsed identities the stages
//! share, `error` the one answer shape at the HTTP edge, `config` the typed settings,
//! `telemetry` the events (log line + metric), and `startup`, the only module that wires the
//! stages together, owns listeners and shutdown.

pub mod config;
pub mod domain;
pub mod error;
pub mod normalize;
pub mod publish;
pub mod receive;
pub mod spool;
pub mod startup;
pub mod telemetry;
pub mod validate;
