//! `im-relay bench`: the load generator and deployment check. Sends correctly signed,
//! realistic callbacks over keep-alive connections — at a fixed rate (open model: latency is
//! counted from when a request was due, so a slow server cannot hide its stalls by slowing the
//! sender) or as fast as the connections allow — records every answer in an HDR histogram,
//! and, given a broker, reads the topic back to prove that every acknowledged callback landed.

pub mod cli;
mod payload;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use payload::callback;
pub use verify::{Verification, VerifyOptions};

use crate::config::Secret;
use crate::domain::unix_seconds;
use crate::validate::sign_of;

pub struct Options {
    pub url: hyper::Uri,
    pub token: Secret,
    pub sdk_app_id: u64,
    /// Requests per second to start, whatever the answers do; `None`: as fast as possible.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub connections: usize,
    /// Prefix of every `MsgKey` sent, so the run's records can be told apart in Kafka.
    pub run_id: String,
}

/// What one run saw. Latencies are in microseconds.
pub struct Report {
    pub elapsed: Duration,
    /// Answered `200` with Tencent's `OK`, by `MsgKey`.
    pub acked: Vec<String>,
    /// Answers other than `OK`, by HTTP status.
    pub refused: BTreeMap<u16, u64>,
    /// Requests that got no answer (connect, write or read failed).
    pub errors: u64,
    pub latency_us: Histogram<u64>,
}

impl Report {
    fn empty() -> Self {
        Report {
            elapsed: Duration::ZERO,
            acked: Vec::new(),
            refused: BTreeMap::new(),
            errors: 0,
            // 1 µs to 1 min, three significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }

    pub fn sent(&self) -> u64 {
        self.acked.len() as u64 + self.refused.values().sum::<u64>() + self.errors
    }

    pub fn acked_per_second(&self) -> f64 {
        self.acked.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What every connection of a run shares: the options, the schedule, the next request number.
struct Plan {
    opts: Options,
    next: AtomicU64,
    start: Instant,
    end: Instant,
    host: String,
    path: String,
}

/// Runs the load and returns what it saw; connection failures are counted, not fatal.
pub async fn run(opts: Options) -> Result<Report, String> {
    let scheme = opts.url.scheme_str().unwrap_or("http");
    if scheme != "http" && scheme != "https" {
        return Err(format!("{}: only http and https URLs", opts.url));
    }
    let host = opts
        .url
        .authority()
        .ok_or_else(|| format!("{}: no host", opts.url))?
        .to_string();
    let path = opts.url.path().to_owned();
    let start = Instant::now();
    let plan = Arc::new(Plan {
        host,
        path,
        next: AtomicU64::new(0),
        start,
        end: start + opts.duration,
        opts,
    });
    let tasks: Vec<_> = (0..plan.opts.connections.max(1))
        .map(|_| tokio::spawn(connection(plan.clone())))
        .collect();
    let mut report = Report::empty();
    for task in tasks {
        let part = task.await.map_err(|e| e.to_string())?;
        report.acked.extend(part.acked);
        for (status, n) in part.refused {
            *report.refused.entry(status).or_default() += n;
        }
        report.errors += part.errors;
        report
            .latency_us
            .add(&part.latency_us)
            .map_err(|e| e.to_string())?;
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// One keep-alive connection, sending requests one after another until the run ends.
async fn connection(plan: Arc<Plan>) -> Report {
    let opts = &plan.opts;
    let mut part = Report::empty();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut signed = Signed::default();
    loop {
        let n = plan.next.fetch_add(1, Ordering::Relaxed);
        // When the request is due: on the fixed schedule, or now.
        let due = match opts.rate {
            Some(rate) => plan.start + Duration::from_secs_f64(n as f64 / rate),
            None => Instant::now(),
        };
        if due >= plan.end {
            break;
        }
        // Latency counts from when the request was due, unless we were early and slept: then
        // from when the timer woke us (its slack is the sender's, not the server's).
        let counted_from = if due > Instant::now() {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            sender = match connect(&opts.url, &plan.host).await {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::debug!(%error, "bench: connect failed");
                    part.errors += 1;
                    // Don't spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
        }
        let Some(s) = sender.as_mut() else { continue };
        let now = unix_seconds();
        let (body, key) = payload::callback(&opts.run_id, n, now);
        let request = Request::post(format!(
            "{}?SdkAppid={}&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&{}",
            plan.path,
            opts.sdk_app_id,
            signed.query(&opts.token, now)
        ))
        .header(hyper::header::HOST, &plan.host)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
        let answer = async {
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match answer.await {
            Ok((200, body)) if is_ok(&body) => {
                let us = counted_from.elapsed().as_micros() as u64;
                part.latency_us.saturating_record(us.max(1));
                part.acked.push(key);
            }
            Ok((status, _)) => *part.refused.entry(status).or_default() += 1,
            Err(error) => {
                tracing::debug!(%error, "bench: request failed");
                part.errors += 1;
                sender = None;
            }
        }
    }
    part
}

/// Tencent's acknowledgement: `{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}`.
fn is_ok(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["ActionStatus"] == "OK" && v["ErrorCode"] == 0)
}

/// `RequestTime=…&Sign=…` for the current second, signed once per second.
#[derive(Default)]
struct Signed {
    second: u64,
    query: String,
}

impl Signed {
    fn query(&mut self, token: &Secret, now: u64) -> &str {
        if self.second != now || self.query.is_empty() {
            let time = now.to_string();
            let sign = hex::encode(sign_of(token, &time));
            self.query = format!("RequestTime={time}&Sign={sign}");
            self.second = now;
        }
        &self.query
    }
}

async fn connect(url: &hyper::Uri, host: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let name = url.host().unwrap_or("localhost");
    let tcp = TcpStream::connect((name, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let server = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name}: {e}"))?;
        let tls = tls_connector()
            .connect(server, tcp)
            .await
            .map_err(|e| format!("{host}: TLS: {e}"))?;
        handshake(TokioIo::new(tls)).await
    } else {
        handshake(TokioIo::new(tcp)).await
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// TLS with the Mozilla root set, or the roots in `SSL_CERT_FILE` when it is set (a private CA).
fn tls_connector() -> tokio_rustls::TlsConnector {
    use std::sync::OnceLock;
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Ok(path) = std::env::var("SSL_CERT_FILE")
            && let Ok(certs) = CertificateDer::pem_file_iter(path)
        {
            for cert in certs.flatten() {
                let _ = roots.add(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// Prints the report as a table for people.
pub fn print(report: &Report, verification: Option<&Verification>) {
    let h = &report.latency_us;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "sent {} in {:.1}s: {} acknowledged ({:.0}/s), {} refused {:?}, {} without answer",
        report.sent(),
        report.elapsed.as_secs_f64(),
        report.acked.len(),
        report.acked_per_second(),
        report.refused.values().sum::<u64>(),
        report.refused,
        report.errors
    );
    if !h.is_empty() {
        println!(
            "ack latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max())
        );
    }
    if let Some(v) = verification {
        println!(
            "kafka: {} of {} acknowledged callbacks found, {} missing, {} duplicate records",
            v.found,
            report.acked.len(),
            v.missing.len(),
            v.duplicates
        );
        for key in v.missing.iter().take(20) {
            println!("  missing MsgKey {key}");
        }
    }
}

/// One JSON line, for scripts.
pub fn json(report: &Report, verification: Option<&Verification>) -> serde_json::Value {
    let h = &report.latency_us;
    let q = |p: f64| {
        if !h.is_empty() {
            h.value_at_quantile(p)
        } else {
            0
        }
    };
    serde_json::json!({
        "sent": report.sent(),
        "acked": report.acked.len(),
        "refused": report.refused.values().sum::<u64>(),
        "errors": report.errors,
        "seconds": report.elapsed.as_secs_f64(),
        "acked_per_second": report.acked_per_second(),
        "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": h.max()},
        "verified": verification.map(|v| serde_json::json!({
            "found": v.found, "missing": v.missing.len(), "duplicates": v.duplicates
        })),
    })
}
