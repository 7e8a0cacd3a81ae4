//! Cross-cutting: the only place that wires the stages together. `Application::build` checks
//! what can fail (TLS files, the producer), binds both listeners and reports the ports it got;
//! `run_until_stopped` serves until the shutdown future resolves, then stops in order: go
//! unready, stop accepting, drain in-flight requests, flush the producer — each step bounded.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::publish::Publisher;
use crate::receive::{self, Receiver};
use crate::telemetry;
use crate::validate::Verifier;

#[derive(Debug)]
pub enum StartupError {
    Tls(io::Error),
    Bind(SocketAddr, io::Error),
    Kafka(rdkafka::error::KafkaError),
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartupError::Tls(e) => write!(f, "cannot load the TLS certificate or key: {e}"),
            StartupError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartupError::Kafka(e) => write!(f, "cannot create the Kafka producer: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

pub struct Application {
    config: Config,
    public: TcpListener,
    admin: TcpListener,
    tls: Option<RustlsConfig>,
    publisher: Arc<Publisher>,
    ready: Arc<AtomicBool>,
    metrics: PrometheusHandle,
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
        let publisher = Arc::new(Publisher::new(&config.kafka).map_err(StartupError::Kafka)?);
        let public = bind(config.listen)?;
        let admin = bind(config.admin_listen)?;
        Ok(Application {
            config,
            public,
            admin,
            tls,
            publisher,
            ready: Arc::new(AtomicBool::new(true)),
            metrics,
        })
    }

    pub fn port(&self) -> u16 {
        self.public.local_addr().map_or(0, |a| a.port())
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.local_addr().map_or(0, |a| a.port())
    }

    /// Serves until `shutdown` resolves, then shuts down in order (see the module note).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let config = &self.config;
        let receiver = Arc::new(Receiver {
            verifier: Verifier::new(
                config.sdk_app_ids.clone(),
                config.tokens.clone(),
                config.sign_max_skew_ms,
            ),
            publisher: self.publisher.clone(),
            key_mode: config.kafka.key,
            max_body_bytes: config.max_body_bytes,
        });
        let app = receive::router(receiver, &config.callback_path)
            .into_make_service_with_connect_info::<SocketAddr>();
        let handle = Handle::new();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let public_addr = self.public.local_addr()?;
        let admin_addr = self.admin.local_addr()?;
        let public = match self.tls {
            Some(tls) => {
                let server = axum_server::tls_rustls::from_tcp_rustls(self.public, tls)?;
                tokio::spawn(server.handle(handle.clone()).serve(app))
            }
            None => {
                let server = axum_server::from_tcp(self.public)?;
                tokio::spawn(server.handle(handle.clone()).serve(app))
            }
        };

        let admin_stop = Arc::new(tokio::sync::Notify::new());
        let admin = {
            let listener = tokio::net::TcpListener::from_std(self.admin)?;
            let stop = admin_stop.clone();
            let router = admin_router(self.ready.clone(), self.metrics.clone());
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.notified().await })
                    .await
            })
        };
        let upkeep = {
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
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
            return Err(error);
        }

        tracing::info!("shutting down: unready, draining requests");
        self.ready.store(false, Ordering::SeqCst);
        handle.graceful_shutdown(Some(Duration::from_millis(config.shutdown_drain_ms)));
        let _ = public.await;

        let flush_timeout = Duration::from_millis(config.kafka.flush_timeout_ms);
        let publisher = self.publisher.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            publisher
                .flush(flush_timeout)
                .map_err(|e| (e, publisher.in_flight()))
        })
        .await;
        match flushed {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err((error, in_flight))) => {
                tracing::error!(%error, in_flight, "producer not flushed; records still in flight are lost")
            }
            Err(error) => tracing::error!(%error, "producer flush panicked"),
        }
        upkeep.abort();
        admin_stop.notify_one();
        let _ = admin.await;
        tracing::info!("stopped");
        Ok(())
    }
}

fn admin_router(ready: Arc<AtomicBool>, metrics: PrometheusHandle) -> Router {
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
                if ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                }
            }),
        )
}
