//! `im-relay bench` as a user runs it against a relay and a real broker: it reports what was
//! acknowledged, and its Kafka check finds every record — or says which are missing and fails.

use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

async fn bench(app: &TestApp, token: &str, topic: &str, rate: &str) -> (Option<i32>, Value) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_im-relay"));
    c.env_clear()
        .env("IM_RELAY_TOKEN", token)
        .env("IM_RELAY_LOG", "warn")
        .args(["bench", "--json", "--duration", "2s", "--connections", "4"])
        .args(["--rate", rate, "--url", &app.url, "--verify-patience", "8s"])
        .args(["--verify-brokers", &app.bootstrap, "--verify-topic", topic])
        .arg("--verify-nudge");
    let out: Output = tokio::task::spawn_blocking(move || c.output().expect("bench runs"))
        .await
        .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_sends_at_the_rate_asked_and_finds_every_acknowledged_callback() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let (code, report) = bench(&app, TOKEN, &app.topic, "100").await;
    assert_eq!(code, Some(0), "{report}");
    // 2 s at 100/s: the schedule decides how many are sent, not the server's speed.
    assert_eq!(report["sent"], 200, "{report}");
    assert_eq!(report["acked"], 200, "{report}");
    assert_eq!(report["verified"]["found"], 200, "{report}");
    assert_eq!(report["verified"]["missing"], 0, "{report}");
    assert!(report["latency_us"]["p50"].as_u64() > Some(0), "{report}");
    // What it sends is what Tencent sends: every record is a valid, typed message.
    let records = app.records(200).await;
    let keys: std::collections::HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 200);
    for r in &records {
        assert_schema_valid(&r.value);
        let raw = String::from_utf8_lossy(&r.raw);
        assert!(!raw.contains(r#""type":"unknown""#), "{raw}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_fails_when_acknowledged_callbacks_are_not_in_the_topic() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    // Verified against a topic the relay does not write to: every acknowledged one is missing.
    let (code, report) = bench(&app, TOKEN, &quarantine_topic(&app.topic), "50").await;
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["acked"], 100, "{report}");
    assert_eq!(report["verified"]["missing"], 100, "{report}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_with_a_wrong_token_counts_refusals_and_fails() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let (code, report) = bench(&app, "not-the-token", &app.topic, "50").await;
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["acked"], 0, "{report}");
    assert_eq!(report["refused"], 100, "{report}");
    app.stop().await;
}
