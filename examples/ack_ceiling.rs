//! The ceiling the relay is measured against: the same HTTP server (axum on axum-server, the
//! same hyper limits, the same multi-threaded tokio runtime) that reads each body and answers
//! Tencent's constant `OK` without doing anything else. `scripts/bench` runs it.
//!
//!     cargo run --release --example ack_ceiling -- 127.0.0.1:18090

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".into())
        .parse()
        .map_err(std::io::Error::other)?;
    let app = Router::new().route(
        "/im/callback",
        post(|_body: Bytes| async { im_relay::error::Ack }),
    );
    let mut server = axum_server::bind(addr);
    im_relay::startup::http_limits(server.http_builder(), Duration::from_secs(5));
    eprintln!("ack ceiling listening on {addr}");
    server
        .serve(app.into_make_service_with_connect_info::<SocketAddr>())
        .await
}
