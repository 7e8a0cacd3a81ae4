//! Transport bounds: open connections, request-head size, and the source allowlist.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

fn addr(app: &TestApp) -> String {
    format!("127.0.0.1:{}", app.base.rsplit(':').next().unwrap())
}

/// True when the relay closes `s` without a word within a few seconds.
fn closed_by_relay(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_bound_are_closed_and_room_comes_back() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_MAX_CONNECTIONS", "2")]).await;
    let a = addr(&app);
    let (held, third) = tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut third = TcpStream::connect(&a).unwrap();
        let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        (held, closed_by_relay(&mut third))
    })
    .await
    .unwrap();
    assert!(third, "a third connection was served over a bound of two");
    assert!(
        app.metrics()
            .await
            .contains("im_relay_http_connections_refused_total")
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Room again: a fresh client (no pooled connection) is served.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let resp = client
        .post(format!("{}?{}", app.url, after_send_query()))
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_request_head_is_refused() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[]).await;
    let a = addr(&app);
    let query = after_send_query();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(a).unwrap();
        let big = "x".repeat(20 * 1024);
        let _ = write!(
            s,
            "POST /im/callback?{query} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
        );
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    // Served normally right after.
    assert_eq!(app.post_signed(DOC_SAMPLE).await, (200, ok_body()));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_allowed_sources_get_in_and_forwarded_for_needs_a_trusted_proxy() {
    let broker = Broker::start();
    let closed = spawn_app(&broker, &[("IM_RELAY_ALLOW_CIDRS", "10.0.0.0/8")]).await;
    let (status, reply) = closed.post_signed(DOC_SAMPLE).await;
    assert_eq!(status, 403);
    assert_eq!(reply["ErrorInfo"], "source address not allowed");
    // Claiming an allowed address does not help a peer that is not a trusted proxy.
    let resp = closed
        .http
        .post(format!("{}?{}", closed.url, after_send_query()))
        .header("X-Forwarded-For", "10.1.2.3")
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    closed.stop().await;

    let behind_lb = spawn_app(
        &broker,
        &[
            ("IM_RELAY_ALLOW_CIDRS", "10.0.0.0/8"),
            ("IM_RELAY_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    let resp = behind_lb
        .http
        .post(format!("{}?{}", behind_lb.url, after_send_query()))
        .header("X-Forwarded-For", "10.1.2.3")
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(behind_lb.records(1).await.len(), 1);
    behind_lb.stop().await;
}
