//! The `im-relay` command: a thin shell over the library (telemetry → config → build → run).

use std::process::ExitCode;

use im_relay::config::{self, Config};
use im_relay::startup::Application;
use im_relay::telemetry;

fn cli() -> clap::Command {
    clap::Command::new("im-relay")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Relays Tencent Cloud IM one-to-one message callbacks to Kafka")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(config::serve_command())
}

fn main() -> ExitCode {
    telemetry::init_logging();
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("serve", flags)) => serve(flags),
        _ => ExitCode::from(2),
    }
}

fn serve(flags: &clap::ArgMatches) -> ExitCode {
    let config = match Config::load(Some(flags), &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match app.run_until_stopped(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        }
    })
}

/// SIGTERM (Kubernetes, systemd) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
