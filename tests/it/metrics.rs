//! After an end-to-end run, `/metrics` has the named series with the right values. Its own test
//! binary: the metrics recorder is process-wide, so counts here are exact.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

/// `name{labels} value` lines, labels sorted.
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value.parse().ok()?))
        })
        .collect()
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
}

fn message(from: &str, to: &str, key: &str, extra: serde_json::Value) -> String {
    let mut m = json!({
        "CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": from, "To_Account": to,
        "MsgKey": key, "MsgTime": now() - 2, "SendMsgResult": 0, "OnlineOnlyFlag": 0,
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}],
    });
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    m.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened() {
    let broker = Broker::start();
    let app = spawn_process_app(&broker, &[]).await;
    let image =
        json!({"MsgType": "TIMImageElem", "MsgContent": {"UUID": "u", "ImageInfoArray": []}});
    let bodies = [
        message(
            "alice",
            "bob",
            "m1",
            json!({"MsgBody": [
            {"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}, image]}),
        ),
        message(
            "alice",
            "carol",
            "m2",
            json!({"SendMsgResult": 80001, "OnlineOnlyFlag": 1}),
        ),
        message(
            "dave",
            "erin",
            "m3",
            json!({"MsgBody": [{"MsgType": "TIMNewElem", "MsgContent": {}}]}),
        ),
    ];
    for b in &bodies {
        assert_eq!(app.post_signed(b).await, (200, ok_body()));
    }
    // A retry (another RequestTime, same message): a duplicate. Far enough in the past that it
    // cannot equal the first request's time, which would make it a replay instead.
    let retry = signed_query("C2C.CallbackAfterSendMsg", TOKEN, now() - 30);
    assert_eq!(app.post(&retry, bodies[0].clone()).await, (200, ok_body()));
    // Another command: ignored. A forgery and a stranger's app: rejected.
    let group = signed_query("Group.CallbackAfterSendMsg", TOKEN, now());
    assert_eq!(
        app.post(
            &group,
            r#"{"CallbackCommand":"Group.CallbackAfterSendMsg"}"#
        )
        .await
        .0,
        200
    );
    let forged = signed_query("C2C.CallbackAfterSendMsg", "guess", now());
    assert_eq!(app.post(&forged, bodies[0].clone()).await.0, 401);
    let stranger = after_send_query().replace("SdkAppid=1400000000", "SdkAppid=1");
    assert_eq!(app.post(&stranger, bodies[0].clone()).await.0, 403);
    assert_eq!(app.records(3).await.len(), 3);

    // Published counts arrive with Kafka's confirmations; computed gauges with the next refresh.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = app.metrics().await;
        let published = value(&text, "im_relay_records_published_total", &[]);
        let active = value(
            &text,
            "im_relay_active_users",
            &[("role", "sender"), ("window", "1m")],
        );
        let kafka = value(&text, "im_relay_kafka_queue_messages", &[]);
        if published == Some(3.0) && active == Some(2.0) && kafka.is_some() {
            break text;
        }
        assert!(Instant::now() < deadline, "metrics never settled:\n{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
    let callbacks = "im_relay_callbacks_total";
    assert_eq!(v(callbacks, &[("outcome", "accepted")]), Some(3.0));
    assert_eq!(v(callbacks, &[("outcome", "duplicate")]), Some(1.0));
    assert_eq!(v(callbacks, &[("outcome", "ignored")]), Some(1.0));
    assert_eq!(v(callbacks, &[("outcome", "rejected")]), Some(2.0));
    let rejected = "im_relay_callbacks_rejected_total";
    assert_eq!(v(rejected, &[("reason", "bad_signature")]), Some(1.0));
    assert_eq!(v(rejected, &[("reason", "unknown_sdk_app_id")]), Some(1.0));
    let received = "im_relay_callbacks_received_total";
    assert_eq!(v(received, &[("command", "c2c_after_send_msg")]), Some(4.0));
    assert_eq!(
        v(received, &[("command", "group_after_send_msg")]),
        Some(1.0)
    );
    assert_eq!(
        v("im_relay_http_requests_total", &[("status", "200")]),
        Some(5.0)
    );
    assert_eq!(
        v("im_relay_http_requests_total", &[("status", "401")]),
        Some(1.0)
    );
    assert_eq!(
        v("im_relay_http_requests_total", &[("status", "403")]),
        Some(1.0)
    );
    // Histograms have their samples.
    let ack = "im_relay_request_duration_seconds_count";
    assert_eq!(v(ack, &[("outcome", "accepted")]), Some(3.0));
    assert_eq!(v("im_relay_record_delivery_seconds_count", &[]), Some(3.0));
    assert_eq!(v("im_relay_signature_skew_seconds_count", &[]), Some(5.0));
    assert_eq!(v("im_relay_request_body_bytes_count", &[]), Some(5.0));
    assert_eq!(v("im_relay_message_age_seconds_count", &[]), Some(3.0));
    // Statistics of the traffic.
    let messages = "im_relay_messages_total";
    assert_eq!(
        v(
            messages,
            &[("result", "delivered"), ("online_only", "false")]
        ),
        Some(2.0)
    );
    assert_eq!(
        v(messages, &[("result", "failed"), ("online_only", "true")]),
        Some(1.0)
    );
    let elements = "im_relay_message_elements_total";
    assert_eq!(v(elements, &[("type", "text")]), Some(2.0));
    assert_eq!(v(elements, &[("type", "image")]), Some(1.0));
    assert_eq!(v(elements, &[("type", "unknown")]), Some(1.0));
    let active = "im_relay_active_users";
    assert_eq!(
        v(active, &[("role", "sender"), ("window", "24h")]),
        Some(2.0)
    );
    assert_eq!(
        v(active, &[("role", "recipient"), ("window", "1h")]),
        Some(3.0)
    );
    // Spool, process and build.
    assert_eq!(v("im_relay_spool_appended_records_total", &[]), Some(3.0));
    assert!(v("im_relay_spool_syncs_total", &[]).is_some_and(|n| n >= 1.0));
    assert!(v("im_relay_http_open_connections", &[]).is_some());
    assert!(v("process_resident_memory_bytes", &[]).is_some_and(|b| b > 0.0));
    assert_eq!(v("im_relay_build_info", &[]), Some(1.0));
    // No label carries a user id or a key.
    for needle in ["alice", "carol", "m1", "1400000000:"] {
        assert!(!text.contains(needle), "{needle} in metrics");
    }
    app.stop().await;
}
