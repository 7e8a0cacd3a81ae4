//! The `im-relay` command: a thin shell over the library (telemetry → config → build → run).

use std::process::ExitCode;

use im_relay::config::{self, Config};
use im_relay::startup::Application;
use im_relay::{publish, spool, telemetry, validate};

fn cli() -> clap::Command {
    clap::Command::new("im-relay")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Relays Tencent Cloud IM one-to-one message callbacks to Kafka")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(config::serve_command())
        .subcommand(
            clap::Command::new("spool")
                .about("Inspect the durable spool (read-only; safe while the relay runs)")
                .subcommand_required(true)
                .subcommand(
                    clap::Command::new("status")
                        .about("Backlog, oldest unpublished record, segments, damage")
                        .arg(
                            clap::Arg::new("spool_dir")
                                .long("spool-dir")
                                .value_name("DIR")
                                .help("spool directory [env: IM_RELAY_SPOOL_DIR] [default: spool]"),
                        ),
                ),
        )
        .subcommand(
            clap::Command::new("sign")
                .about("Print a signed query suffix (RequestTime=…&Sign=…), as Tencent would send it")
                .after_help("The token is read from IM_RELAY_TOKEN (or the file named by IM_RELAY_TOKEN_FILE).")
                .arg(
                    clap::Arg::new("time")
                        .long("time")
                        .value_name("UNIX_SECONDS")
                        .value_parser(clap::value_parser!(u64))
                        .help("RequestTime to sign [default: now]"),
                ),
        )
}

fn main() -> ExitCode {
    telemetry::init_logging();
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("serve", flags)) => serve(flags),
        Some(("sign", flags)) => sign(flags),
        Some(("spool", sub)) => match sub.subcommand() {
            Some(("status", flags)) => spool_status(flags),
            _ => ExitCode::from(2),
        },
        _ => ExitCode::from(2),
    }
}

fn spool_status(flags: &clap::ArgMatches) -> ExitCode {
    let dir = flags
        .get_one::<String>("spool_dir")
        .cloned()
        .or_else(|| std::env::var("IM_RELAY_SPOOL_DIR").ok())
        .unwrap_or_else(|| "spool".into());
    let dir = std::path::Path::new(&dir);
    let report = spool::inspect(dir).and_then(|(r, _)| Ok((r, spool::oldest_pending(dir)?)));
    let (r, oldest) = match report {
        Ok(found) => found,
        Err(error) => {
            eprintln!("cannot read the spool in {}: {error}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let age = oldest
        .and_then(|payload| publish::Entry::decode(&payload))
        .map(|e| {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            format!(
                "{:.1}s",
                now_ms.saturating_sub(e.received_at_ms) as f64 / 1000.0
            )
        })
        .unwrap_or_else(|| "-".into());
    println!("spool:               {}", dir.display());
    println!("committed position:  {}", r.committed);
    println!("backlog records:     {}", r.pending);
    println!("oldest unpublished:  {age}");
    println!("segments:            {}", r.segments);
    println!("bytes:               {}", r.bytes);
    println!("damaged frames:      {}", r.damaged);
    println!("torn tail bytes:     {}", r.torn_bytes);
    ExitCode::SUCCESS
}

fn sign(flags: &clap::ArgMatches) -> ExitCode {
    let token = std::env::var("IM_RELAY_TOKEN").ok().or_else(|| {
        let path = std::env::var("IM_RELAY_TOKEN_FILE").ok()?;
        config::read_secret_file(&path).ok()
    });
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        eprintln!("set IM_RELAY_TOKEN (or IM_RELAY_TOKEN_FILE) to the callback token");
        return ExitCode::from(2);
    };
    let time = flags.get_one::<u64>("time").copied().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let time = time.to_string();
    let sign = validate::sign_of(&config::Secret::new(token), &time);
    println!("RequestTime={time}&Sign={}", hex::encode(sign));
    ExitCode::SUCCESS
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
