//! Every rejection reason: its status, Tencent's FAIL body, its metric — and nothing is kept,
//! while a valid callback right after still goes through. The table runs in process (router
//! and spool); one case, the raw-HTTP ones and the quarantine run end to end.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::common::*;
use im_relay::error::Reason;
use serde_json::json;

/// A message between the same two users as the sentinel: with conversation keys every such
/// record shares one partition, so anything wrongly published would show up before it.
fn message(key: &str) -> String {
    json!({
        "CallbackCommand": "C2C.CallbackAfterSendMsg", "From_Account": "alice", "To_Account": "bob",
        "MsgSeq": 1, "MsgRandom": 2, "MsgTime": 1700000000, "MsgKey": format!("k-{key}"),
        "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}],
    })
    .to_string()
}

struct Case {
    reason: Reason,
    method: &'static str,
    path: &'static str,
    query: String,
    body: Vec<u8>,
}

fn case(reason: Reason, query: String, body: impl Into<Vec<u8>>) -> Case {
    Case {
        reason,
        method: "POST",
        path: "/im/callback",
        query,
        body: body.into(),
    }
}

fn cases() -> Vec<Case> {
    let t = now();
    let good = message("alice");
    let q =
        |rest: &str| format!("SdkAppid={APP_ID}&CallbackCommand=C2C.CallbackAfterSendMsg{rest}");
    let sign = |time: i64| signed_query("C2C.CallbackAfterSendMsg", TOKEN, time);
    let with_time = |time: &str| q(&format!("&RequestTime={time}&Sign={}", "0".repeat(64)));
    vec![
        Case {
            path: "/elsewhere",
            ..case(Reason::NotFound, sign(t), good.clone())
        },
        Case {
            method: "GET",
            ..case(Reason::MethodNotAllowed, sign(t), "")
        },
        Case {
            method: "PUT",
            ..case(Reason::MethodNotAllowed, sign(t), good.clone())
        },
        case(
            Reason::DuplicateQueryParam,
            format!("{}&SdkAppid={APP_ID}", sign(t)),
            good.clone(),
        ),
        case(
            Reason::DuplicateQueryParam,
            format!("{}&Sign=abc", sign(t)),
            good.clone(),
        ),
        case(
            Reason::MissingSdkAppId,
            "CallbackCommand=C2C.CallbackAfterSendMsg".into(),
            good.clone(),
        ),
        case(Reason::MissingSdkAppId, String::new(), good.clone()),
        case(
            Reason::InvalidSdkAppId,
            sign(t).replace(&APP_ID.to_string(), "14000x"),
            good.clone(),
        ),
        case(
            Reason::UnknownSdkAppId,
            sign(t).replace(&APP_ID.to_string(), "1400000001"),
            good.clone(),
        ),
        case(Reason::MissingSignature, q(""), good.clone()),
        case(
            Reason::MissingSignature,
            q(&format!("&RequestTime={t}")),
            good.clone(),
        ),
        case(
            Reason::InvalidRequestTime,
            with_time("yesterday"),
            good.clone(),
        ),
        case(Reason::InvalidRequestTime, with_time("1.5"), good.clone()),
        case(Reason::StaleRequestTime, sign(t - 61), good.clone()),
        case(Reason::StaleRequestTime, sign(t + 120), good.clone()),
        case(
            Reason::MalformedSignature,
            q(&format!("&RequestTime={t}&Sign=abc")),
            good.clone(),
        ),
        case(
            Reason::MalformedSignature,
            q(&format!("&RequestTime={t}&Sign={}", "x".repeat(64))),
            good.clone(),
        ),
        case(
            Reason::BadSignature,
            signed_query("C2C.CallbackAfterSendMsg", "wrong-token", t),
            good.clone(),
        ),
        case(
            Reason::MissingCallbackCommand,
            sign(t).replace("CallbackCommand=C2C.CallbackAfterSendMsg&", ""),
            good.clone(),
        ),
        case(Reason::EmptyBody, sign(t), ""),
        case(Reason::InvalidJson, sign(t), "{\"From_Account\": "),
        case(Reason::InvalidJson, sign(t), "[1, 2]"),
        case(
            Reason::InvalidJson,
            sign(t),
            b"{\"Text\": \"\xff\xfe\"}".to_vec(),
        ),
        case(
            Reason::CommandMismatch,
            sign(t),
            good.replace("C2C.CallbackAfterSendMsg", "C2C.CallbackBeforeSendMsg"),
        ),
        case(
            Reason::CommandMismatch,
            signed_query("C2C.CallbackAfterMsgWithDraw", TOKEN, t),
            good.clone(),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"From_Account\"", "\"Sender\""),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"MsgSeq\":1", "\"MsgSeq\":\"one\""),
        ),
        // Elements that are not objects are not "unknown elements": refused, kept in
        // quarantine.
        case(
            Reason::InvalidMessage,
            sign(t),
            json!({"From_Account": "alice", "To_Account": "bob", "MsgBody": [1, 2]}).to_string(),
        ),
        // The lifecycle commands are held to the same rules.
        case(
            Reason::InvalidMessage,
            signed_query("C2C.CallbackAfterMsgWithDraw", TOKEN, t),
            json!({"From_Account": "alice", "To_Account": "bob"}).to_string(),
        ),
        case(
            Reason::CommandMismatch,
            signed_query("C2C.CallbackAfterModifyMsg", TOKEN, t),
            good.clone(),
        ),
        // A control character in a query value we carry into the record.
        case(
            Reason::InvalidQueryParam,
            sign(t).replace("OptPlatform=Android", "OptPlatform=iOS%00x"),
            good.clone(),
        ),
        case(
            Reason::InvalidQueryParam,
            sign(t).replace("ClientIP=203.0.113.7", "ClientIP=203.0.113.7%0D%0Ax"),
            good.clone(),
        ),
        // Methods and paths.
        Case {
            method: "DELETE",
            ..case(Reason::MethodNotAllowed, sign(t), "")
        },
        Case {
            method: "PATCH",
            ..case(Reason::MethodNotAllowed, sign(t), good.clone())
        },
        Case {
            path: "/im/callback/extra",
            ..case(Reason::NotFound, sign(t), good.clone())
        },
        Case {
            path: "/",
            ..case(Reason::NotFound, sign(t), good.clone())
        },
        // Query parameters: duplicated, not numbers, wrong length.
        case(
            Reason::DuplicateQueryParam,
            format!("{}&CallbackCommand=C2C.CallbackAfterSendMsg", sign(t)),
            good.clone(),
        ),
        case(
            Reason::DuplicateQueryParam,
            format!("{}&RequestTime={t}", sign(t)),
            good.clone(),
        ),
        case(
            Reason::InvalidSdkAppId,
            sign(t).replace("SdkAppid=", "SdkAppid=%2B"),
            good.clone(),
        ),
        case(
            Reason::InvalidSdkAppId,
            sign(t).replace("SdkAppid=1400000000", "SdkAppid=1400000000.0"),
            good.clone(),
        ),
        case(
            Reason::InvalidSdkAppId,
            sign(t).replace("SdkAppid=", "SdkAppid=%20"),
            good.clone(),
        ),
        case(Reason::InvalidRequestTime, with_time(""), good.clone()),
        case(
            Reason::InvalidRequestTime,
            with_time("99999999999999999999"),
            good.clone(),
        ),
        case(
            Reason::MalformedSignature,
            q(&format!("&RequestTime={t}&Sign={}", "a".repeat(63))),
            good.clone(),
        ),
        case(
            Reason::MalformedSignature,
            q(&format!("&RequestTime={t}&Sign={}", "a".repeat(65))),
            good.clone(),
        ),
        case(
            Reason::BadSignature,
            {
                // A genuine Sign, but for another second.
                let other = signed_query("C2C.CallbackAfterSendMsg", TOKEN, t - 1);
                let sign_of_other = other.rsplit("Sign=").next().unwrap().to_owned();
                q(&format!("&RequestTime={t}&Sign={sign_of_other}"))
            },
            good.clone(),
        ),
        // Bodies that are not one JSON object.
        case(Reason::InvalidJson, sign(t), "   "),
        case(Reason::InvalidJson, sign(t), "null"),
        case(Reason::InvalidJson, sign(t), "\"hello\""),
        case(Reason::InvalidJson, sign(t), format!("{good}x")),
        case(
            Reason::InvalidJson,
            sign(t),
            good.replace(
                "\"To_Account\":\"bob\"",
                "\"To_Account\":\"bob\",\"To_Account\":\"eve\"",
            ),
        ),
        case(
            Reason::InvalidJson,
            sign(t),
            format!("{}{}", "{\"a\":[".repeat(200), "]}".repeat(200)),
        ),
        case(
            Reason::InvalidJson,
            sign(t),
            good.replace("\"MsgSeq\":1", "\"MsgSeq\":1e400"),
        ),
        case(
            Reason::InvalidJson,
            sign(t),
            good.replace("\"Text\":\"hi\"", "\"Text\":\"h\u{1}i\""),
        ),
        // JSON objects that are not messages.
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"MsgBody\":[", "\"MsgBody\":\"[\",\"X\":["),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"To_Account\":\"bob\"", "\"To_Account\":42"),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace(
                "\"From_Account\":\"alice\"",
                &format!("\"From_Account\":\"{}\"", "a".repeat(300)),
            ),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"MsgRandom\":2", "\"MsgRandom\":-2"),
        ),
        case(
            Reason::InvalidMessage,
            sign(t),
            good.replace("\"MsgTime\":1700000000", "\"MsgTime\":1700000000.5"),
        ),
        case(
            Reason::CommandMismatch,
            sign(t),
            good.replace(
                "\"CallbackCommand\":\"C2C.CallbackAfterSendMsg\"",
                "\"CallbackCommand\":7",
            ),
        ),
    ]
}

/// The table, in process (router + spool, no sockets): every reason's status, body and
/// metric; nothing spooled for the messages topic but the valid callback sent after each —
/// in order.
#[tokio::test(flavor = "multi_thread")]
async fn every_reason_has_its_status_body_and_metric_and_spools_nothing() {
    let app = InProcess::new(&[("IM_RELAY_KEY", "conversation")]);
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (i, c) in cases.iter().enumerate() {
        let uri = format!("{}?{}", c.path, c.query);
        let (status, body) = app.call(c.method, &uri, c.body.clone()).await;
        let label = c.reason.label();
        assert_eq!(status, c.reason.status().as_u16(), "{label}: {}", c.query);
        assert_eq!(body["ActionStatus"], "FAIL", "{label}");
        assert_eq!(body["ErrorCode"], 1, "{label}");
        let info = body["ErrorInfo"].as_str().unwrap();
        assert!(info.starts_with(c.reason.public_info()), "{label}: {info}");
        assert!(!info.contains(TOKEN));
        // A valid callback right after still goes through.
        assert_eq!(
            app.post_signed(&message(&format!("after-{i}"))).await,
            (200, ok_body()),
            "after {label}"
        );
    }
    // Bodies that cannot be relayed are spooled for the quarantine topic; nothing else is.
    let ids: Vec<String> = app
        .spooled()
        .iter()
        .filter(|r| r.target != im_relay::record::Target::Quarantine)
        .map(|r| {
            let (_, id) = r.headers.iter().find(|(k, _)| k == "ce_id").expect("ce_id");
            String::from_utf8(id.clone()).unwrap()
        })
        .collect();
    let expected: Vec<String> = (0..cases.len())
        .map(|i| format!("1400000000:alice:bob:k-after-{i}"))
        .collect();
    assert_eq!(ids, expected);
    // The metrics recorder is shared by the whole test process: each series exists.
    let metrics = im_relay::telemetry::metrics_handle().render();
    for c in &cases {
        let series = format!(
            "im_relay_callbacks_rejected_total{{reason=\"{}\"}}",
            c.reason.label()
        );
        assert!(metrics.contains(&series), "missing {series}");
    }
}

/// The end-to-end case: a refused request over real HTTP publishes nothing, and the valid
/// callback after it reaches Kafka alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_request_over_http_publishes_nothing() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_KEY", "conversation")]).await;
    let forged = format!(
        "SdkAppid={APP_ID}&CallbackCommand=C2C.CallbackAfterSendMsg&RequestTime={}&Sign={}",
        now(),
        "0".repeat(64)
    );
    let (status, body) = app.post(&forged, message("forged")).await;
    assert_eq!(status, 401);
    assert_eq!(body["ActionStatus"], "FAIL");
    assert_eq!(
        app.post_signed(&message("sentinel")).await,
        (200, ok_body())
    );
    let records = app.records_through("1400000000:alice:bob:k-sentinel").await;
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1400000000:alice:bob:k-sentinel"]);
    app.stop().await;
}

/// Sends raw HTTP/1.1 bytes, half-closes, and returns everything the relay answered.
async fn raw_exchange(app: &TestApp, request: String) -> String {
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_oversize_is_refused_before_the_body_is_sent() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    // Only the headers: the relay must answer from Content-Length alone.
    let request = format!(
        "POST /im/callback?{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        after_send_query(),
        64 * 1024 + 1
    );
    let answer = raw_exchange(&app, request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"ActionStatus\":\"FAIL\""), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_body_gets_a_fail_answer() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let request = format!(
        "POST /im/callback?{} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"From",
        after_send_query()
    );
    let answer = raw_exchange(&app, request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"ActionStatus\":\"FAIL\""), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_cannot_be_relayed_is_quarantined_with_its_reason() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_KAFKA_MESSAGE_MAX_BYTES", "90000")]).await;
    // Empty video elements: 47 bytes each in the body, five times that in the record.
    let empty_video = r#"{"MsgType":"TIMVideoFileElem","MsgContent":{}}"#;
    let elements = vec![empty_video; 1200].join(",");
    let big = message("big").replace(
        r#"[{"MsgContent":{"Text":"hi"},"MsgType":"TIMTextElem"}]"#,
        &format!("[{elements}]"),
    );
    assert!(big.len() < 65536 && big.contains("TIMVideoFileElem"));
    let cases = [
        (Reason::InvalidJson, "{\"From_Account\": ".to_owned()),
        (
            Reason::InvalidMessage,
            message("a").replace("\"MsgSeq\":1", "\"MsgSeq\":\"one\""),
        ),
        (
            Reason::CommandMismatch,
            message("b").replace("C2C.CallbackAfterSendMsg", "C2C.CallbackBeforeSendMsg"),
        ),
        (Reason::RecordTooLarge, big),
    ];
    for (reason, body) in &cases {
        let (status, reply) = app.post_signed(body).await;
        assert_eq!(status, reason.status().as_u16(), "{reason:?}");
        assert_eq!(reply["ActionStatus"], "FAIL");
    }
    // Unauthenticated garbage is never stored.
    let (status, _) = app.post("SdkAppid=1400000000&CallbackCommand=x", "{").await;
    assert_eq!(status, 401);

    let kept = app.quarantined(cases.len()).await;
    assert_eq!(kept.len(), cases.len());
    // Keyless records spread over partitions: match them by reason, not by order.
    for (reason, body) in &cases {
        let r = kept
            .iter()
            .find(|r| r.headers["im_quarantine_reason"] == reason.label())
            .unwrap_or_else(|| panic!("{reason:?} not quarantined"));
        assert_eq!(r.raw, body.as_bytes(), "{reason:?}");
        assert_eq!(r.headers["im_sdk_app_id"], "1400000000");
        let query = &r.headers["im_query"];
        assert!(
            query.contains("RequestTime=") && !query.contains("Sign="),
            "{query}"
        );
    }
    let invalid = kept
        .iter()
        .find(|r| r.headers["im_quarantine_reason"] == "invalid_message")
        .unwrap();
    assert_eq!(
        invalid.headers["im_quarantine_detail"],
        "MsgSeq must be an integer"
    );
    let metrics = app.metrics().await;
    assert!(metrics.contains("im_relay_callbacks_quarantined_total{reason=\"record_too_large\"}"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_callback_is_acknowledged_once_and_published_once() {
    let broker = Broker::start();
    let app = spawn_process_app(&broker, &[("IM_RELAY_KEY", "conversation")]).await;
    // A retry by Tencent is a new request: another RequestTime, the same message.
    let t = now();
    for age in 0..3 {
        let query = signed_query("C2C.CallbackAfterSendMsg", TOKEN, t - age);
        assert_eq!(app.post(&query, message("dup")).await, (200, ok_body()));
    }
    assert_eq!(
        app.post_signed(&message("sentinel")).await,
        (200, ok_body())
    );
    let records = app.records_through("1400000000:alice:bob:k-sentinel").await;
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        app.metrics()
            .await
            .contains("im_relay_callbacks_total{outcome=\"duplicate\"} 2")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_request_is_answered_but_not_processed_again() {
    let broker = Broker::start();
    let app = spawn_process_app(&broker, &[("IM_RELAY_KEY", "conversation")]).await;
    let query = after_send_query();
    // Same signed URL, same body: a replay. Same signed URL, another body: processed (Tencent
    // signs only the time, so one second's callbacks share a Sign).
    assert_eq!(app.post(&query, message("r1")).await, (200, ok_body()));
    assert_eq!(app.post(&query, message("r1")).await, (200, ok_body()));
    assert_eq!(app.post(&query, message("r2")).await, (200, ok_body()));
    let records = app.records_through("1400000000:alice:bob:k-r2").await;
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["1400000000:alice:bob:k-r1", "1400000000:alice:bob:k-r2"]
    );
    assert!(
        app.metrics()
            .await
            .contains("im_relay_callbacks_total{outcome=\"replayed\"} 1")
    );
    app.stop().await;
}

/// A command the relay does not relay is answered `OK` whatever its body, never quarantined:
/// a before-send callback's answer decides whether the message is sent (Tencent's webhook
/// overview, https://www.tencentcloud.com/document/product/1047/34354). Before: a body that
/// was not JSON, or empty, got 400 (and was quarantined), and Tencent could hold the message.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_not_relayed_is_answered_ok_whatever_its_body() {
    let app = InProcess::new(&[]);
    for body in [
        "not json",
        "",
        "[1, 2]",
        r#"{"CallbackCommand": "C2C.CallbackAfterSendMsg"}"#,
    ] {
        for command in ["C2C.CallbackBeforeSendMsg", "Group.CallbackAfterSendMsg"] {
            assert_eq!(
                app.post_command(command, body).await,
                (200, ok_body()),
                "{command} {body:?}"
            );
        }
    }
    assert!(
        app.spooled().is_empty(),
        "nothing spooled, nothing quarantined"
    );
}
