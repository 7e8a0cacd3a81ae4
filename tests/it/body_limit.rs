//! The body cap holds while a body without `Content-Length` streams in. Its own test binary:
//! it reads a process-wide metric, which other tests would move.

use crate::common::*;

fn rejected_too_large(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("im_relay_callbacks_rejected_total{reason=\"body_too_large\"} ")
        })
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_chunked_body_is_refused_while_streaming() {
    let broker = Broker::start();
    let app = spawn_process_app(&broker, &[("IM_RELAY_MAX_BODY_BYTES", "1024")]).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 512])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let sent = app
        .http
        .post(format!("{}?{}", app.url, after_send_query()))
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            assert_eq!(resp.status(), 413);
            let reply: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(reply["ActionStatus"], "FAIL");
        }
        // The relay answers and hangs up without reading the other 31 KiB; the client may see
        // the hang-up while still writing. Either way the relay must have refused it:
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    assert_eq!(rejected_too_large(&app.metrics().await), 1.0);

    // Just under the cap is fine.
    let body = DOC_SAMPLE.to_owned();
    let padded = format!("{body}{}", " ".repeat(1024 - body.len()));
    assert_eq!(app.post_signed(&padded).await, (200, ok_body()));
    assert_eq!(app.records(1).await.len(), 1);
    app.stop().await;
}
