//! Cross-cutting: the only place that wires the stages together. `Application::build` binds
//! and serves the admin listener at once (`/livez` answers while a large spool is scanned;
//! `/readyz` says `starting`), then checks what can fail (TLS files, the spool, the producer),
//! binds the callback listener and reports the ports it got; `run_until_stopped` serves until the shutdown future resolves, then stops in
//! order: go unready, stop accepting, drain in-flight requests, close the spool, give the
//! publisher a bounded time to deliver — what is left stays in the spool for the next start.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::publish::{Event, Publisher, PublisherConfig};
use crate::receive::{self, ConnectionLimit, Receiver};
use crate::spool;
use crate::telemetry;
use crate::telemetry::Event as _;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot load the TLS certificate or key: {0}")]
    Tls(#[source] io::Error),
    #[error("cannot open the spool: {0}")]
    Spool(#[source] io::Error),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] io::Error),
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[source] rdkafka::error::KafkaError),
}

pub struct Application {
    config: Config,
    public: TcpListener,
    admin_addr: SocketAddr,
    /// The admin server, serving since `build` began; stopped last.
    admin: tokio::task::JoinHandle<io::Result<()>>,
    admin_stop: Arc<tokio::sync::Notify>,
    tls: Option<RustlsConfig>,
    appender: spool::Appender,
    writer: std::thread::JoinHandle<()>,
    publisher: Publisher,
    events: mpsc::Sender<Event>,
    ready: Arc<AtomicBool>,
    /// What `/readyz` says; the callback port's health path says it too.
    readiness: receive::Readiness,
    metrics: PrometheusHandle,
    spool: Arc<spool::Shared>,
}

/// What `Application::open` makes.
struct Parts {
    public: TcpListener,
    tls: Option<RustlsConfig>,
    appender: spool::Appender,
    spool: Arc<spool::Shared>,
    writer: std::thread::JoinHandle<()>,
    publisher: Publisher,
    events: mpsc::Sender<Event>,
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    let listener = TcpListener::bind(addr).map_err(|e| StartupError::Bind(addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| StartupError::Bind(addr, e))?;
    Ok(listener)
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let metrics = telemetry::metrics_handle();
        telemetry::register_alerting_counters();
        let admin = bind(config.admin_listen)?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| StartupError::Bind(config.admin_listen, e))?;
        // Liveness from the first moment: the spool scan below reads every segment, minutes
        // for a large backlog, and a liveness probe left unanswered kills the pod mid-scan.
        let ready = Arc::new(AtomicBool::new(true));
        let spool_slot = Arc::new(OnceLock::new());
        let credentials_slot = Arc::new(OnceLock::new());
        // With SASL, a broker's word on the credentials comes within seconds (librdkafka's
        // statistics every 5 s): readiness waits that long for it, so a rollout whose new pod
        // has a wrong password stops there rather than racing past it.
        let sasl = matches!(
            config.kafka.security_protocol,
            crate::config::SecurityProtocol::SaslPlaintext
                | crate::config::SecurityProtocol::SaslSsl
        );
        let health = Health {
            ready: ready.clone(),
            spool: spool_slot.clone(),
            credentials: credentials_slot.clone(),
            confirm_by: sasl.then(|| std::time::Instant::now() + Duration::from_secs(15)),
            room_bytes: 4 * config.max_body_bytes as u64,
            append_timeout: config.spool_append_timeout,
        };
        let readiness: receive::Readiness = Arc::new(move || health.trouble());
        let admin_stop = Arc::new(tokio::sync::Notify::new());
        let admin = {
            let listener = tokio::net::TcpListener::from_std(admin)
                .map_err(|e| StartupError::Bind(admin_addr, e))?;
            let trouble = readiness.clone();
            let spool = spool_slot.clone();
            let router = admin_router(move || trouble(), metrics.clone()).route(
                "/spool",
                get(move || async move { axum::Json(spool_position(spool.get())) }),
            );
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.notified().await })
                    .await
            })
        };
        let p = match Self::open(&config).await {
            Ok(parts) => parts,
            Err(e) => {
                admin_stop.notify_one();
                let _ = admin.await;
                return Err(e);
            }
        };
        let _ = credentials_slot.set(p.publisher.credentials());
        let _ = spool_slot.set(p.spool.clone());
        Ok(Application {
            config,
            public: p.public,
            admin_addr,
            admin,
            admin_stop,
            tls: p.tls,
            appender: p.appender,
            writer: p.writer,
            publisher: p.publisher,
            events: p.events,
            ready,
            readiness,
            metrics,
            spool: p.spool,
        })
    }

    /// What can fail after the listeners: the TLS files, the spool (scanned off the async
    /// threads, so the admin listener keeps answering), the producer.
    async fn open(config: &Config) -> Result<Parts, StartupError> {
        let tls = match &config.tls {
            Some(files) => {
                // One provider for the process; a second install (tests) is harmless.
                let _ = rustls::crypto::ring::default_provider().install_default();
                Some(
                    RustlsConfig::from_pem_chain_file(&files.cert, &files.key)
                        .await
                        .map_err(StartupError::Tls)?,
                )
            }
            None => None,
        };
        let (events, events_rx) = mpsc::channel();
        let wake = events.clone();
        let spool_config = config.spool.clone();
        let opened = tokio::task::spawn_blocking(move || {
            spool::open(&spool_config, move || {
                let _ = wake.send(Event::Appended);
            })
        })
        .await
        .map_err(|e| StartupError::Spool(io::Error::other(e)))?
        .map_err(StartupError::Spool)?;
        let r = &opened.recovery;
        tracing::info!(
            dir = %config.spool.dir.display(),
            pending = r.pending,
            segments = r.segments,
            bytes = r.bytes,
            damaged = r.damaged,
            "spool opened"
        );
        telemetry::RecordsDropped(r.dropped_ahead).emit();
        telemetry::SpoolSetAsideHeld(r.set_aside_held).emit();
        let publisher = Publisher::new(
            PublisherConfig {
                kafka: config.kafka.clone(),
                max_in_flight: config.publish_max_in_flight,
            },
            opened.reader,
            opened.shared.clone(),
            (events.clone(), events_rx),
        )
        .map_err(StartupError::Kafka)?;
        // Bound only now: while the spool is scanned a callback is refused at once, not left
        // waiting in the accept queue (readiness says `starting` meanwhile).
        let public = bind(config.listen)?;
        Ok(Parts {
            public,
            tls,
            appender: opened.appender,
            spool: opened.shared,
            writer: opened.writer,
            publisher,
            events,
        })
    }

    pub fn port(&self) -> u16 {
        self.public.local_addr().map_or(0, |a| a.port())
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_addr.port()
    }

    /// Serves until `shutdown` resolves, then shuts down in order (see the module note).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let config = &self.config;
        let flush_timeout = config.kafka.flush_timeout;
        let publisher = self.publisher.spawn(flush_timeout)?;
        let receiver = Arc::new(Receiver::new(config, self.appender));
        let health = (config.health_path.as_str(), self.readiness.clone());
        let app = receive::router(receiver, &config.callback_path, health)
            .into_make_service_with_connect_info::<SocketAddr>();
        let handle = Handle::new();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let public_addr = self.public.local_addr()?;
        let admin_addr = self.admin_addr;
        // A client that trickles its headers is cut off (slowloris); the body has its own
        // deadline in `receive`, the TLS handshake axum-server's 10 s.
        let header_timeout = config.header_read_timeout;
        let reloader = match (&self.tls, &config.tls) {
            (Some(tls), Some(files)) => {
                Some(tokio::spawn(reload_certificate(tls.clone(), files.clone())))
            }
            _ => None,
        };
        let limit = ConnectionLimit::new(config.max_connections);
        let public = match self.tls {
            Some(tls) => {
                let acceptor = RustlsAcceptor::new(tls).acceptor(limit);
                let mut server = axum_server::from_tcp(self.public)?.acceptor(acceptor);
                http_limits(server.http_builder(), header_timeout);
                tokio::spawn(server.handle(handle.clone()).serve(app))
            }
            None => {
                let mut server = axum_server::from_tcp(self.public)?.acceptor(limit);
                http_limits(server.http_builder(), header_timeout);
                tokio::spawn(server.handle(handle.clone()).serve(app))
            }
        };
        if config.tokens.is_empty() {
            tracing::warn!(
                "no callback token: signatures are not checked and anyone who can reach this \
                 port can post callbacks (IM_RELAY_ALLOW_UNSIGNED=true)"
            );
        }

        let durability = tokio::spawn(crate::publish::durability::watch(config.kafka.clone()));
        let upkeep = {
            let metrics = self.metrics.clone();
            let process = metrics_process::Collector::default();
            telemetry::describe_process(&process);
            tokio::spawn(async move {
                let mut every_second = tokio::time::interval(Duration::from_secs(1));
                // After a stall, one late turn rather than a burst of them.
                every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for n in 0u64.. {
                    every_second.tick().await;
                    if n % 5 == 0 {
                        telemetry::refresh_gauges(&process);
                    }
                    // Histogram samples wait, one by one, until upkeep folds them in: at
                    // 37,000 callbacks/s, five seconds of them were 15 MiB of the peak RSS.
                    metrics.run_upkeep();
                }
            })
        };
        tracing::info!(
            listen = %public_addr,
            scheme,
            path = %config.callback_path,
            admin = %admin_addr,
            topic = %config.kafka.topic,
            signed = !config.tokens.is_empty(),
            "im-relay serving"
        );

        let mut public = public;
        let served = tokio::select! {
            () = shutdown => None,
            r = &mut public => Some(r),
        };
        if let Some(result) = served {
            // The server stopped by itself: that is a failure, not a shutdown.
            let error = match result {
                Ok(Err(e)) => e,
                Ok(Ok(())) => io::Error::other("public listener stopped"),
                Err(e) => io::Error::other(e),
            };
            tracing::error!(%error, "public listener failed");
            self.admin_stop.notify_one();
            return Err(error);
        }

        tracing::info!("shutting down: unready, draining requests");
        self.ready.store(false, Ordering::SeqCst);
        handle.graceful_shutdown(Some(config.shutdown_drain));
        let _ = public.await;

        // The server and its handlers are gone, and with them every appender: the writer
        // syncs what it wrote and ends. Then the publisher gets its bounded flush.
        let writer = self.writer;
        let events = self.events;
        let stopped = tokio::task::spawn_blocking(move || {
            if writer.join().is_err() {
                tracing::error!("spool writer panicked");
            }
            let _ = events.send(Event::Stop);
            if publisher.join().is_err() {
                tracing::error!("publisher panicked");
            }
        });
        let patience = flush_timeout + Duration::from_secs(5);
        if tokio::time::timeout(patience, stopped).await.is_err() {
            tracing::error!("spool or publisher did not stop in time");
        }
        let left = self.spool.backlog();
        if left > 0 {
            // After a scale-in no relay may start on this volume again: say what is owed.
            tracing::warn!(
                left,
                dir = %config.spool.dir.display(),
                "records left in the spool: published when a relay starts on it again, or by \
                 `im-relay spool drain --spool-dir DIR` (deploy/kubernetes/spool-drain-job.yaml)"
            );
        }
        upkeep.abort();
        durability.abort();
        if let Some(r) = reloader {
            r.abort();
        }
        self.admin_stop.notify_one();
        let _ = self.admin.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Bounds on what one connection may ask of us: header size and count, HTTP/2 streams.
pub fn http_limits(
    b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    header_timeout: Duration,
) {
    // 16 KiB of request head (hyper's floor is 8 KiB); Tencent sends well under 1 KiB.
    b.http1()
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .max_headers(64);
    b.http2()
        .max_concurrent_streams(64)
        .max_header_list_size(16 * 1024);
}

/// Swaps in a renewed certificate (cert-manager, certbot) without a restart: the files are
/// checked every `reload`; new connections get the new certificate, a broken pair is logged
/// and the old one kept.
async fn reload_certificate(tls: RustlsConfig, files: crate::config::TlsFiles) {
    let stamp = |f: &crate::config::TlsFiles| {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&f.cert), m(&f.key))
    };
    let mut seen = stamp(&files);
    loop {
        tokio::time::sleep(files.reload).await;
        let now = stamp(&files);
        if now == seen {
            continue;
        }
        match tls.reload_from_pem_file(&files.cert, &files.key).await {
            Ok(()) => {
                seen = now;
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            // Possibly caught between writing the two files: try again next round.
            Err(error) => {
                tracing::warn!(%error, "new TLS certificate not loaded; keeping the old one")
            }
        }
    }
}

/// What `/readyz` looks at. Kafka being away is not on the list: the spool takes callbacks
/// meanwhile, and refusing Tencent would lose them. Credentials Kafka refused from the start
/// are (`Publisher::credentials_refused`): a new pod with a wrong Secret stops its rollout.
#[derive(Clone)]
struct Health {
    ready: Arc<AtomicBool>,
    /// Set once the spool is open; until then `/readyz` says `starting`.
    spool: Arc<OnceLock<Arc<spool::Shared>>>,
    /// What Kafka made of the credentials (`publish::CREDENTIALS_*`).
    credentials: Arc<OnceLock<Arc<AtomicU8>>>,
    /// With SASL: until then, credentials Kafka has not yet accepted keep `/readyz` red.
    confirm_by: Option<std::time::Instant>,
    /// Room the spool must have left to count as able to take callbacks.
    room_bytes: u64,
    /// A spool write in progress for longer than this: the disk is hanging.
    append_timeout: Duration,
}

impl Health {
    /// Why `/readyz` is red, if it is.
    fn trouble(&self) -> Option<&'static str> {
        match self.spool.get() {
            None => Some("starting"),
            Some(_) if !self.ready.load(Ordering::SeqCst) => Some("draining"),
            Some(spool) => spool
                .trouble(self.room_bytes, self.append_timeout)
                .or_else(|| self.credentials_trouble()),
        }
    }
}

impl Health {
    fn credentials_trouble(&self) -> Option<&'static str> {
        use crate::publish::{CREDENTIALS_REFUSED, CREDENTIALS_UNKNOWN};
        match self.credentials.get()?.load(Ordering::Relaxed) {
            CREDENTIALS_REFUSED => Some("kafka refuses the credentials"),
            CREDENTIALS_UNKNOWN
                if self
                    .confirm_by
                    .is_some_and(|t| std::time::Instant::now() < t) =>
            {
                Some("starting: kafka has not accepted the credentials yet")
            }
            _ => None,
        }
    }
}

/// What `/spool` tells `im-relay reconcile`: how many records wait, and when the oldest of them
/// arrived (`null` when none is known: none waits, or the spool is not open yet — then
/// `backlog` is `null` too, and the relay cannot say).
fn spool_position(spool: Option<&Arc<crate::spool::Shared>>) -> serde_json::Value {
    match spool {
        Some(s) => serde_json::json!({
            "backlog": s.backlog(),
            "oldest_unpublished_ms": s.oldest_unpublished_ms(),
        }),
        None => serde_json::json!({"backlog": null, "oldest_unpublished_ms": null}),
    }
}

/// `/metrics`, `/livez`, and `/readyz` green unless `trouble` names a reason.
pub fn admin_router(
    trouble: impl Fn() -> Option<&'static str> + Clone + Send + Sync + 'static,
    metrics: PrometheusHandle,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<PrometheusHandle>| async move { m.render() }),
        )
        .with_state(metrics)
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                match trouble() {
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    None => (StatusCode::OK, "ready\n".to_owned()),
                }
            }),
        )
}
