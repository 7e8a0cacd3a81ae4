//! The `im-relay` command: a thin shell over the library (telemetry → config → build → run).

use std::process::ExitCode;

/// glibc's malloc spent about a sixth of the relay's CPU under load (perf: `_int_malloc`,
/// `malloc_consolidate`, `unlink_chunk`, `_int_free`); mimalloc's thread-local free lists
/// cost a fraction of that (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use im_relay::config::{self, Config};
use im_relay::domain::{unix_millis, unix_seconds};
use im_relay::startup::Application;
use im_relay::{record, spool, telemetry, validate};

fn cli() -> clap::Command {
    clap::Command::new("im-relay")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Relays Tencent Cloud IM one-to-one message callbacks to Kafka")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(config::serve_command())
        .subcommand(
            clap::Command::new("spool")
                .about("Inspect the durable spool, or give up one record in it")
                .subcommand_required(true)
                .subcommand(
                    clap::Command::new("status")
                        .about("Backlog, oldest unpublished record, segments, damage (read-only; safe while the relay runs)")
                        .arg(spool_dir_arg()),
                )
                .subcommand(
                    clap::Command::new("drop")
                        .about("Give up one waiting record for good (relay stopped): it is kept in DIR/dead-letter/ and skipped from then on")
                        .arg(spool_dir_arg())
                        .arg(
                            clap::Arg::new("seq")
                                .long("seq")
                                .value_name("N")
                                .required(true)
                                .value_parser(clap::value_parser!(u64))
                                .help("sequence number of the record (the relay's log names it)"),
                        )
                        .arg(
                            clap::Arg::new("reason")
                                .long("reason")
                                .value_name("TEXT")
                                .required(true)
                                .help("why: kept beside the record and logged"),
                        ),
                ),
        )
        .subcommand(bench_command())
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

fn spool_dir_arg() -> clap::Arg {
    clap::Arg::new("spool_dir")
        .long("spool-dir")
        .value_name("DIR")
        .help("spool directory [env: IM_RELAY_SPOOL_DIR] [default: spool]")
}

fn main() -> ExitCode {
    telemetry::init_logging();
    let matches = cli().get_matches();
    match matches.subcommand() {
        Some(("serve", flags)) => serve(flags),
        Some(("sign", flags)) => sign(flags),
        Some(("bench", flags)) => bench(flags),
        Some(("spool", sub)) => match sub.subcommand() {
            Some(("status", flags)) => spool_status(flags),
            Some(("drop", flags)) => spool_drop(flags),
            _ => ExitCode::from(2),
        },
        _ => ExitCode::from(2),
    }
}

fn spool_dir(flags: &clap::ArgMatches) -> std::path::PathBuf {
    flags
        .get_one::<String>("spool_dir")
        .cloned()
        .or_else(|| std::env::var("IM_RELAY_SPOOL_DIR").ok())
        .unwrap_or_else(|| "spool".into())
        .into()
}

fn spool_status(flags: &clap::ArgMatches) -> ExitCode {
    let dir = &spool_dir(flags);
    let mut oldest = None;
    let report = spool::inspect(dir).and_then(|r| {
        spool::each_pending(dir, |_, payload| {
            oldest = Some(payload.to_vec());
            false
        })?;
        Ok(r)
    });
    let r = match report {
        Ok(found) => found,
        Err(error) => {
            eprintln!("cannot read the spool in {}: {error}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let age = oldest
        .and_then(|payload| record::Record::decode(&payload))
        .map(|e| {
            format!(
                "{:.1}s",
                unix_millis().saturating_sub(e.received_at_ms) as f64 / 1000.0
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
    println!("dropped records:     {}", r.dropped);
    ExitCode::SUCCESS
}

/// The only way an acknowledged record leaves the spool without Kafka's word: an operator's.
fn spool_drop(flags: &clap::ArgMatches) -> ExitCode {
    let dir = &spool_dir(flags);
    let seq = flags.get_one::<u64>("seq").copied().unwrap_or_default();
    let reason = flags
        .get_one::<String>("reason")
        .cloned()
        .unwrap_or_default();
    match spool::drop_record(dir, seq, &reason) {
        Ok(()) => {
            tracing::warn!(seq, reason, dir = %dir.display(), "spool record dropped by an operator");
            println!(
                "dropped record {seq}; kept in {}",
                dir.join(spool::DEAD_LETTER_DIR).display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot drop record {seq} in {}: {error}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The callback token for `sign` and `bench`: from the environment, never a flag (a flag
/// shows in `ps` to every user of the machine).
fn token_from_env() -> Option<config::Secret> {
    let token = std::env::var("IM_RELAY_TOKEN").ok().or_else(|| {
        let path = std::env::var("IM_RELAY_TOKEN_FILE").ok()?;
        config::read_secret_file(&path).ok()
    });
    let token = token.filter(|t| !t.is_empty()).map(config::Secret::new);
    if token.is_none() {
        eprintln!("set IM_RELAY_TOKEN (or IM_RELAY_TOKEN_FILE) to the callback token");
    }
    token
}

fn sign(flags: &clap::ArgMatches) -> ExitCode {
    let Some(token) = token_from_env() else {
        return ExitCode::from(2);
    };
    let time = flags
        .get_one::<u64>("time")
        .copied()
        .unwrap_or_else(unix_seconds);
    let time = time.to_string();
    let sign = validate::sign_of(&token, &time);
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

fn bench_command() -> clap::Command {
    use clap::{Arg, ArgAction, value_parser};
    clap::Command::new("bench")
        .about("Send signed, realistic callbacks to a relay; report throughput and latency; verify in Kafka")
        .after_help(
            "The token is read from IM_RELAY_TOKEN (or the file named by IM_RELAY_TOKEN_FILE).\n\
             Exit status: 0 when every acknowledged callback was found (or nothing was verified),\n\
             1 when one is missing or nothing was acknowledged, 2 on bad usage.\n\n\
             Check a deployment:  im-relay bench --rate 1 --duration 10s --url https://relay.example.com/im/callback",
        )
        .arg(Arg::new("url").long("url").default_value("http://127.0.0.1:8080/im/callback"))
        .arg(
            Arg::new("sdk_app_id")
                .long("sdk-app-id")
                .value_parser(value_parser!(u64))
                .default_value("1400000000"),
        )
        .arg(
            Arg::new("rate")
                .long("rate")
                .value_name("PER_SECOND|max")
                .default_value("max")
                .help("Fixed request rate (open model), or max: as fast as the connections go"),
        )
        .arg(Arg::new("duration").long("duration").default_value("10s").help("e.g. 500ms, 10s, 2m"))
        .arg(
            Arg::new("connections")
                .long("connections")
                .short('c')
                .value_parser(value_parser!(u16).range(1..))
                .default_value("32"),
        )
        .arg(
            Arg::new("threads")
                .long("threads")
                .value_parser(value_parser!(u16).range(1..))
                .default_value("1")
                .help("Sender threads (the sender shares the machine with what it measures)"),
        )
        .arg(Arg::new("run_id").long("run-id").help("MsgKey prefix [default: bench-<unix time>]"))
        .arg(
            Arg::new("verify_brokers")
                .long("verify-brokers")
                .value_name("HOST:PORT,…")
                .requires("verify_topic")
                .help("After the run, read the topic back and report every acknowledged callback missing from it"),
        )
        .arg(Arg::new("verify_topic").long("verify-topic").value_name("TOPIC"))
        .arg(
            Arg::new("verify_property")
                .short('X')
                .value_name("KEY=VALUE")
                .action(ArgAction::Append)
                .help("librdkafka setting for reading the topic (SASL, TLS)"),
        )
        .arg(
            Arg::new("verify_patience")
                .long("verify-patience")
                .default_value("30s")
                .help("Stop reading when no awaited record arrived for this long"),
        )
        .arg(
            Arg::new("verify_nudge")
                .long("verify-nudge")
                .action(ArgAction::SetTrue)
                .help("Write a marker record per partition if records lag (test brokers that hold back a tail)"),
        )
        .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Print one JSON line instead of the table"))
}

fn bench(flags: &clap::ArgMatches) -> ExitCode {
    use im_relay::bench::{self, VerifyOptions};
    let usage = |msg: String| {
        eprintln!("im-relay bench: {msg}");
        ExitCode::from(2)
    };
    let Some(token) = token_from_env() else {
        return ExitCode::from(2);
    };
    let arg = |name: &str| flags.get_one::<String>(name).cloned().unwrap_or_default();
    let url = match arg("url").parse::<hyper::Uri>() {
        Ok(u) => u,
        Err(e) => return usage(format!("--url: {e}")),
    };
    let rate = match arg("rate").as_str() {
        "max" => None,
        r => match r.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Some(r),
            _ => {
                return usage(format!(
                    "--rate: {r:?} is neither a positive number nor max"
                ));
            }
        },
    };
    let (duration, patience) = match (
        parse_duration(&arg("duration")),
        parse_duration(&arg("verify_patience")),
    ) {
        (Some(d), Some(p)) => (d, p),
        _ => return usage("durations look like 500ms, 10s or 2m".into()),
    };
    let mut properties = Vec::new();
    for p in flags
        .get_many::<String>("verify_property")
        .into_iter()
        .flatten()
    {
        match p.split_once('=') {
            Some((k, v)) => properties.push((k.to_owned(), v.to_owned())),
            None => return usage(format!("-X {p}: expected KEY=VALUE")),
        }
    }
    let verify = flags
        .get_one::<String>("verify_brokers")
        .map(|brokers| VerifyOptions {
            brokers: brokers.clone(),
            topic: arg("verify_topic"),
            properties,
            patience,
            nudge: flags.get_flag("verify_nudge"),
        });
    let run_id = flags
        .get_one::<String>("run_id")
        .cloned()
        .unwrap_or_else(|| format!("bench-{}", unix_millis()));
    let opts = bench::Options {
        url,
        token,
        sdk_app_id: flags
            .get_one::<u64>("sdk_app_id")
            .copied()
            .unwrap_or_default(),
        rate,
        duration,
        connections: usize::from(flags.get_one::<u16>("connections").copied().unwrap_or(32)),
        run_id,
    };
    let threads = usize::from(flags.get_one::<u16>("threads").copied().unwrap_or(1));
    let start = match verify.as_ref().map(bench::verify::start).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("im-relay bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build();
    let report = match runtime
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(bench::run(opts)))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("im-relay bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let verification = match (&verify, &start) {
        (Some(v), Some(s)) => match bench::verify::verify(v, s, &report.acked) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("im-relay bench: verifying: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    if flags.get_flag("json") {
        println!("{}", bench::json(&report, verification.as_ref()));
    } else {
        bench::print(&report, verification.as_ref());
    }
    let missing = verification.as_ref().is_some_and(|v| !v.missing.is_empty());
    if missing || report.acked.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `500ms`, `10s`, `2m`.
fn parse_duration(s: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .ok()
        .filter(|n: &f64| *n >= 0.0 && n.is_finite())?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}
