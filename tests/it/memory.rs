//! Memory stays bounded under a flood of rejected requests and many idle connections. Measured
//! on the real binary (VmRSS from /proc), reported, and held to a generous bound.

use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rss_stays_bounded_under_floods_and_idle_connections() {
    let broker = Broker::start();
    let topic = format!("im.c2c.mem-{}", unique());
    broker.create_topic(&topic).await;
    broker.create_topic(&quarantine_topic(&topic)).await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let env = test_env(
        &broker,
        &topic,
        &dir.path().join("spool"),
        &[
            ("IM_RELAY_LISTEN", listen.as_str()),
            ("IM_RELAY_ADMIN_LISTEN", admin.as_str()),
            ("IM_RELAY_MAX_CONNECTIONS", "4096"),
            ("IM_RELAY_LOG", "warn"),
        ],
    );
    let relay = RelayProcess::start(&env, &dir.path().join("relay.log"));
    let pid = relay.pid();
    let idle = rss_kib(pid);

    // A flood of forged requests: 16 senders, 20,000 requests, each refused.
    let url = format!("http://{listen}/im/callback");
    let client = reqwest::Client::new();
    let mut senders = Vec::new();
    for s in 0..16 {
        let (client, url) = (client.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let mut refused = 0;
            for i in 0..1250 {
                let forged = signed_query("C2C.CallbackAfterSendMsg", "guess", now());
                let body = DOC_SAMPLE.replace("48374_2837546_1557481126", &format!("f{s}-{i}"));
                let r = client
                    .post(format!("{url}?{forged}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                refused += usize::from(r.status() == 401);
            }
            refused
        }));
    }
    let mut refused = 0;
    for s in senders {
        refused += s.await.unwrap();
    }
    assert_eq!(refused, 20_000);
    let after_flood = rss_kib(pid);

    // Many idle connections, each having sent half a request head.
    let conns: Vec<TcpStream> = (0..2000)
        .map(|_| {
            use std::io::Write;
            let mut s = TcpStream::connect(&listen).unwrap();
            let _ = s.write_all(b"POST /im/callback HTTP/1.1\r\nHost: x\r\n");
            s
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_idle = rss_kib(pid);
    drop(conns);

    eprintln!(
        "RSS: idle {} KiB, after 20,000 refused requests {} KiB, with 2,000 idle connections {} KiB",
        idle, after_flood, with_idle
    );
    let peak = after_flood.max(with_idle);
    assert!(peak < 128 * 1024, "RSS {peak} KiB exceeds 128 MiB");
    // The refusals were counted, and the relay still serves.
    let ok = reqwest::Client::new()
        .post(format!("{url}?{}", after_send_query()))
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(relay.terminate().success());
}
