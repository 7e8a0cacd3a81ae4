//! HTTPS with rustls, from a generated certificate: HTTP/1.1 and HTTP/2 (ALPN), records land.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn https_serves_http1_and_http2_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();

    let broker = Broker::start();
    let app = spawn_app(
        &broker,
        &[
            ("IM_RELAY_TLS_CERT", cert.to_str().unwrap()),
            ("IM_RELAY_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .await;
    assert!(app.url.starts_with("https://localhost:"), "{}", app.url);

    let root = reqwest::Certificate::from_pem(generated.cert.pem().as_bytes()).unwrap();
    for (i, (client, version)) in [
        (
            reqwest::Client::builder()
                .add_root_certificate(root.clone())
                .http1_only(),
            reqwest::Version::HTTP_11,
        ),
        (
            reqwest::Client::builder().add_root_certificate(root.clone()),
            reqwest::Version::HTTP_2,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // Distinct messages: the same one twice would be dropped as a duplicate.
        let body = DOC_SAMPLE.replace("48374_2837546_1557481126", &format!("tls-{i}"));
        let resp = client
            .build()
            .unwrap()
            .post(format!("{}?{}", app.url, after_send_query()))
            .body(body)
            .send()
            .await
            .expect("TLS handshake and request");
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<serde_json::Value>().await.unwrap(), ok_body());
    }

    // A client that does not trust the certificate cannot talk to it.
    let untrusting = reqwest::Client::new()
        .post(format!("{}?{}", app.url, after_send_query()))
        .body(DOC_SAMPLE)
        .send()
        .await;
    assert!(untrusting.is_err());

    let records = app.records(2).await;
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.value["from_account"] == "jared"));
    app.stop().await;
}
