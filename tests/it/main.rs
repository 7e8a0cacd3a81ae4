//! The integration tests, in one binary (one link instead of eleven; a module per suite).
//! `common` is the shared harness: a tansu broker per test, the app in this process or as its
//! own process (for exact metric counts: the recorder is one per process), signed callbacks,
//! records read back from Kafka.

mod common;
mod tencent;

mod backfill;
#[cfg(feature = "load-tool")]
mod bench;
mod body_limit;
mod cli;
mod e2e;
mod lifecycle;
mod limits;
mod mariadb;
mod memory;
mod merge;
mod metrics;
mod pg;
mod rejections;
mod secure_kafka;
mod slow_clients;
mod sync;
mod tls;
mod zero_loss;
