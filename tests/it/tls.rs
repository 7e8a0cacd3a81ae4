//! HTTPS with rustls, from a generated certificate: HTTP/1.1 and HTTP/2 (ALPN), records land.

use crate::common::*;

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

    // The load balancer's health check, over HTTPS on the same port.
    let health = reqwest::Client::builder()
        .add_root_certificate(root.clone())
        .build()
        .unwrap()
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("health over TLS");
    assert_eq!(health.status(), 200);

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

fn write_pair(dir: &std::path::Path, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let generated =
        rcgen::generate_simple_self_signed(vec![name.to_owned(), "localhost".to_owned()]).unwrap();
    // Write to temporary names, then rename: a reader never sees half a file.
    for (file, pem) in [
        ("cert.pem", generated.cert.pem()),
        ("key.pem", generated.signing_key.serialize_pem()),
    ] {
        let tmp = dir.join(format!("{file}.tmp"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }
    generated
}

async fn post_trusting(
    app: &TestApp,
    root: &rcgen::Certificate,
    key: &str,
) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let body = DOC_SAMPLE.replace("48374_2837546_1557481126", key);
    let resp = client
        .post(format!("{}?{}", app.url, after_send_query()))
        .body(body)
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_pair(dir.path(), "first.example");
    let broker = Broker::start();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let app = spawn_app(
        &broker,
        &[
            ("IM_RELAY_TLS_CERT", cert.to_str().unwrap()),
            ("IM_RELAY_TLS_KEY", key.to_str().unwrap()),
            ("IM_RELAY_TLS_RELOAD_MS", "100"),
        ],
    )
    .await;
    assert_eq!(
        post_trusting(&app, &first.cert, "before").await.unwrap(),
        200
    );

    // Renewal: the files change under the running relay.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = write_pair(dir.path(), "second.example");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // A fresh client each time, trusting only the new certificate.
        if post_trusting(&app, &second.cert, "after").await.ok() == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // And the old one is no longer served.
    assert!(post_trusting(&app, &first.cert, "stale").await.is_err());
    app.stop().await;
}
