//! Slow clients are cut off while valid traffic keeps flowing: headers trickled byte by byte
//! (slowloris) hit the header deadline, a body that stalls gets 408.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

fn port(app: &TestApp) -> String {
    app.base.rsplit(':').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn trickled_headers_are_cut_off_and_valid_traffic_flows() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let addr = format!("127.0.0.1:{}", port(&app));
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let header = b"POST /im/callback?SdkAppid=1400000000 HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let started = Instant::now();
        // One byte every 100 ms for up to 15 s: far past the 1 s deadline, well inside the
        // 30 s that hyper would allow by itself.
        for b in header.iter().copied().chain(std::iter::repeat(b'a')) {
            if started.elapsed() > Duration::from_secs(15) {
                return false;
            }
            if s.write_all(&[b]).is_err() {
                return true;
            }
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(0) => return true, // closed by the relay
                Ok(_) => return true, // an error answer, then close
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    });
    // Meanwhile, real callbacks are served.
    for i in 0..5 {
        let body = DOC_SAMPLE.replace("48374_2837546_1557481126", &format!("during-{i}"));
        assert_eq!(app.post_signed(&body).await, (200, ok_body()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_off = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(
        cut_off,
        "a client trickling headers for 15 s was never cut off"
    );
    assert_eq!(app.records(5).await.len(), 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_gets_408_with_a_fail_body() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_REQUEST_TIMEOUT_MS", "500")]).await;
    let addr = format!("127.0.0.1:{}", port(&app));
    let query = after_send_query();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // Headers complete, then half the body, then silence (the connection stays open).
        write!(
            s,
            "POST /im/callback?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"From"
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"ActionStatus\":\"FAIL\""), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_deadline() {
    let broker = Broker::start();
    let app = spawn_app(&broker, &[("IM_RELAY_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let addr = format!("127.0.0.1:{}", port(&app));
    let query = after_send_query();
    let (first, then) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /im/callback?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{DOC_SAMPLE}",
            DOC_SAMPLE.len()
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        // Kept alive after the answer, then closed once idle past the deadline.
        (first, s.read(&mut buf).map_err(|e| e.kind()))
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(then, Ok(0), "the idle connection was not closed");
    app.stop().await;
}
