//! End to end: real HTTP into the real app, into a real broker, records read back.

use std::collections::HashSet;

use crate::common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn doc_sample_lands_in_kafka_with_key_headers_and_value() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;

    let (status, body) = app.post_signed(DOC_SAMPLE).await;
    assert_eq!((status, body), (200, ok_body()));

    let records = app.records(1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    let id = "1400000000:Jonh:jared:48374_2837546_1557481126";
    assert_eq!(r.key, "48374_2837546_1557481126");
    let h = |k: &str| r.headers.get(k).map(String::as_str);
    assert_eq!(h("ce_specversion"), Some("1.0"));
    assert_eq!(h("ce_id"), Some(id));
    assert_eq!(h("ce_source"), Some("/tencent-im/1400000000"));
    assert_eq!(h("ce_type"), Some("com.tencent.im.c2c.after_send_msg.v2"));
    assert_eq!(h("ce_time"), Some("2019-05-10T09:38:46Z"));
    assert_eq!(h("content-type"), Some("application/json"));
    assert_eq!(h("im_sdk_app_id"), Some("1400000000"));
    assert_eq!(h("im_callback_command"), Some("C2C.CallbackAfterSendMsg"));

    let v = &r.value;
    assert_schema_valid(v);
    assert_eq!(v["schema"], "im-relay.c2c-message.v2");
    assert_eq!(v["source"], "callback");
    assert_eq!(v["id"], id);
    assert_eq!(v["sdk_app_id"], 1400000000u64);
    assert_eq!(v["msg_key"], "48374_2837546_1557481126");
    assert_eq!(v["msg_key_derived"], false);
    assert_eq!(v["msg_id"], "144115233406643804-1727580296-4026038328");
    assert_eq!(v["from_account"], "jared");
    assert_eq!(v["to_account"], "Jonh");
    assert_eq!(v["msg_seq"], 48374);
    assert_eq!(v["msg_random"], 2837546);
    assert_eq!(v["msg_time"], 1557481126);
    assert_eq!(v["msg_time_rfc3339"], "2019-05-10T09:38:46Z");
    assert_eq!(v["online_only"], true);
    assert_eq!(v["send_result"], 0);
    assert_eq!(v["delivered"], true);
    assert_eq!(v["error_info"], "send msg succeed");
    assert_eq!(v["unread_msg_num"], 0);
    assert_eq!(v["event_time_ms"], 1670574414123u64);
    assert_eq!(
        v["elements"],
        json!([{"type": "text", "text": "red packet"}])
    );
    assert_eq!(v["cloud_custom_data"], "your cloud custom data");
    assert_eq!(v["client_ip"], "203.0.113.7");
    assert_eq!(v["opt_platform"], "Android");
    assert_eq!(v["extra"], json!({}));
    let received = v["received_at"].as_str().unwrap();
    assert!(
        received.starts_with("20") && received.ends_with('Z'),
        "{received}"
    );

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("im_relay_callbacks_total{outcome=\"accepted\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("im_relay_records_published_total"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_shapes_round_trip_field_by_field() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    for body in [ALL_ELEMENTS, LEGACY_MINIMAL, NO_KEY_NO_SEQ] {
        let (status, reply) = app.post_signed(body).await;
        assert_eq!((status, reply), (200, ok_body()), "{body}");
    }
    let records = app.records(3).await;
    assert_eq!(records.len(), 3);
    let by_from = |from: &str| {
        records
            .iter()
            .find(|r| r.value["from_account"] == from)
            .unwrap_or_else(|| panic!("no record from {from}"))
    };
    for r in &records {
        assert_schema_valid(&r.value);
        assert_eq!(r.headers["ce_id"], r.value["id"].as_str().unwrap());
        assert_eq!(r.key, r.value["msg_key"].as_str().unwrap());
    }

    let all = &by_from("0b9f3c9e-1a2b-4c5d-8e9f-0a1b2c3d4e5f").value;
    assert_eq!(all["to_account"], "@RBT#001");
    assert_eq!(all["msg_time"], 2563141290u64);
    assert_eq!(all["msg_time_rfc3339"], "2051-03-22T23:41:30Z");
    assert_eq!(all["delivered"], false);
    assert_eq!(all["unread_msg_num"], -1);
    assert_eq!(all["elements"][0]["text"], "你好 👋 a&b=c \u{0} end");
    let types: Vec<&str> = all["elements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "text", "location", "face", "custom", "sound", "image", "file", "video", "relay",
            "unknown", "unknown"
        ]
    );
    assert_eq!(
        all["extra"]["SomeFutureField"],
        json!({"nested": [1, "two"]})
    );

    let legacy = &by_from("user_a").value;
    assert_eq!(legacy["msg_key"], "123_2804799576_2563141290");
    assert_eq!(legacy["msg_key_derived"], true);
    assert_eq!(legacy["msg_seq"], 123);
    assert_eq!(legacy["send_result"], Value::Null);

    let bare = by_from("zed");
    assert!(bare.key.starts_with("sha256_"));
    assert_eq!(bare.value["id"], format!("1400000000:amy:zed:{}", bare.key));

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("im_relay_elements_untyped_total"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_commands_are_acknowledged_and_not_published() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_KEY", "conversation")]).await;
    let group = r#"{"CallbackCommand": "Group.CallbackAfterSendMsg", "GroupId": "g1", "Type": "Public",
                    "From_Account": "a", "Operator_Account": "a", "Random": 1, "MsgBody": []}"#;
    let query = signed_query("Group.CallbackAfterSendMsg", TOKEN, now());
    assert_eq!(app.post(&query, group).await, (200, ok_body()));
    // A message afterwards is the only record in the topic.
    assert_eq!(app.post_signed(DOC_SAMPLE).await, (200, ok_body()));
    let records = app
        .records_through("1400000000:Jonh:jared:48374_2837546_1557481126")
        .await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].value["from_account"], "jared");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("im_relay_callbacks_total{outcome=\"ignored\"}"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conversation_keys_put_both_directions_on_one_partition() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_KEY", "conversation")]).await;
    let mut sent = 0;
    for i in 0..6 {
        let (from, to) = if i % 2 == 0 {
            ("alice", "bob")
        } else {
            ("bob", "alice")
        };
        let body = json!({
            "CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": from, "To_Account": to,
            "MsgSeq": i, "MsgRandom": 7, "MsgTime": 1700000000 + i, "MsgKey": format!("{i}_7_{}", 1700000000 + i),
            "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": format!("m{i}")}}],
        });
        assert_eq!(app.post_signed(&body.to_string()).await, (200, ok_body()));
        sent += 1;
    }
    let records = app.records(sent).await;
    assert_eq!(records.len(), sent);
    let keys: HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, HashSet::from(["1400000000:alice:bob"]));
    let partitions: HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 1);
    // One partition keeps send order.
    let texts: Vec<&str> = records
        .iter()
        .map(|r| r.value["elements"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_flushes_what_was_acknowledged() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_KAFKA_LINGER_MS", "200")]).await;
    let mut ids = HashSet::new();
    for i in 0..50u32 {
        let key = format!("{i}_1_1700000000");
        let body = json!({
            "CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": "a", "To_Account": "b",
            "MsgKey": key, "MsgBody": [],
        });
        assert_eq!(app.post_signed(&body.to_string()).await, (200, ok_body()));
        ids.insert(format!("1400000000:a:b:{key}"));
    }
    let (bootstrap, topic) = (app.bootstrap.clone(), app.topic.clone());
    let admin = app.admin.clone();
    app.stop().await;
    // The admin listener is gone with the app.
    assert!(reqwest::get(format!("{admin}/livez")).await.is_err());
    // Distinct ids: tansu keeps an idempotent retry twice.
    let distinct = |got: &[Received]| {
        let ids: HashSet<&str> = got.iter().filter_map(|r| r.value["id"].as_str()).collect();
        ids.len() >= 50
    };
    let records = tokio::task::spawn_blocking(move || {
        read_until(
            &bootstrap,
            &topic,
            std::time::Duration::from_secs(30),
            distinct,
        )
    })
    .await
    .unwrap();
    let got: HashSet<String> = records
        .iter()
        .map(|r| r.value["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids, "every acknowledged callback is in the topic");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_and_http2() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let live = reqwest::get(format!("{}/livez", app.admin)).await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = reqwest::get(format!("{}/readyz", app.admin)).await.unwrap();
    assert_eq!(ready.status(), 200);
    // Cleartext HTTP/2 with prior knowledge, for load balancers that speak it.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(format!("{}?{}", app.url, after_send_query()))
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), ok_body());
    assert_eq!(app.records(1).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_rotation_accepts_both_tokens_and_nothing_else() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_TOKEN_NEXT", "next-token")]).await;
    let command = "C2C.CallbackAfterSendMsg";
    let t = now();
    assert_eq!(
        app.post(&signed_query(command, TOKEN, t), DOC_SAMPLE).await,
        (200, ok_body())
    );
    let other = DOC_SAMPLE.replace("48374_2837546_1557481126", "rotated");
    assert_eq!(
        app.post(&signed_query(command, "next-token", t), other)
            .await,
        (200, ok_body())
    );
    let (status, _) = app
        .post(&signed_query(command, "old-token", t), DOC_SAMPLE)
        .await;
    assert_eq!(status, 401);
    let keys: HashSet<String> = app.records(2).await.into_iter().map(|r| r.key).collect();
    assert_eq!(
        keys,
        HashSet::from(["48374_2837546_1557481126".into(), "rotated".into()])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_unsigned_callbacks_are_relayed() {
    let broker = Broker::start();
    let app = spawn_app(
        &broker,
        &[
            ("IM_RELAY_TOKEN", UNSET),
            ("IM_RELAY_ALLOW_UNSIGNED", "true"),
        ],
    )
    .await;
    let query =
        format!("SdkAppid={APP_ID}&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json");
    assert_eq!(app.post(&query, DOC_SAMPLE).await, (200, ok_body()));
    let records = app.records(1).await;
    assert_eq!(records[0].value["client_ip"], Value::Null);
    assert_eq!(records[0].value["opt_platform"], Value::Null);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn traceparent_is_carried_to_the_record() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app
        .http
        .post(format!("{}?{}", app.url, after_send_query()))
        .header("traceparent", tp)
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let records = app.records(1).await;
    assert_eq!(records[0].headers["traceparent"], tp);
    app.stop().await;
}

/// The callback metrics as `/metrics` shows them (what a health check must not move).
fn callback_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| {
            [
                "im_relay_callbacks_",
                "im_relay_http_requests_total",
                "im_relay_request_",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// GKE Ingress and AWS ALB check `GET` on the serving port, from addresses the source policy
/// does not list: the health path answers them, outside the callback metrics, and callbacks
/// keep working on the same port.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_balancer_checks_health_on_the_callback_port() {
    let broker = Broker::start();
    let app = spawn_process_app(
        &broker,
        &[
            ("IM_RELAY_ALLOW_CIDRS", "10.0.0.0/8"),
            ("IM_RELAY_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    let before = callback_series(&app.metrics().await);
    assert!(!before.is_empty(), "callback counters exist from startup");
    for _ in 0..3 {
        let resp = app
            .http
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok\n");
    }
    let head = app
        .http
        .head(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        callback_series(&app.metrics().await),
        before,
        "health checks are not callbacks"
    );
    // The source policy still guards the callback path on the same port.
    let (status, _) = app.post_signed(DOC_SAMPLE).await;
    assert_eq!(status, 403);
    let resp = app
        .http
        .post(format!("{}?{}", app.url, after_send_query()))
        .header("X-Forwarded-For", "10.1.2.3")
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.records(1).await.len(), 1);
    app.stop().await;
}

/// The relay reads its topics' durability settings from the cluster and exports them.
#[tokio::test(flavor = "multi_thread")]
async fn the_topics_durability_is_read_from_the_cluster_and_exported() {
    let broker = Broker::start();
    let app = spawn_process_app(&broker, &[]).await;
    let want = [
        "im_relay_kafka_brokers 1".to_owned(),
        format!(
            "im_relay_kafka_topic_replication_factor{{topic=\"{}\"}} 1",
            app.topic
        ),
        // One broker cannot do better: not at risk.
        format!("im_relay_kafka_topic_at_risk{{topic=\"{}\"}} 0", app.topic),
    ];
    // ImRelayRecordsLost reads the process's start time (from the metrics-process crate).
    assert!(
        app.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("process_start_time_seconds ")),
        "process_start_time_seconds is exported"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = app.metrics().await;
        if want.iter().all(|w| metrics.lines().any(|l| l == w)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "want {want:?} in:\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("im_relay_kafka_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    app.stop().await;
}
