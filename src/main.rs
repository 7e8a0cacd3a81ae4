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
        .subcommand(config::sync_command())
        .subcommand(backfill_command())
        .subcommand(config::reconcile_command())
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
                    clap::Command::new("drain")
                        .about("Publish what a stopped relay left in its spool directory, then exit (after a scale-in with Kafka away)")
                        .after_help("Kafka settings as for `serve` (IM_RELAY_KAFKA_*, IM_RELAY_TOPIC…, or IM_RELAY_CONFIG). Exits 0 once nothing is left, 1 if records are still waiting at the timeout, 2 on bad settings.")
                        .arg(spool_dir_arg())
                        .arg(
                            clap::Arg::new("timeout")
                                .long("timeout-seconds")
                                .value_name("S")
                                .value_parser(clap::value_parser!(u64))
                                .help("give up after S seconds [default: wait until drained]"),
                        ),
                )
                .subcommand(
                    clap::Command::new("drop")
                        .about("Give up waiting records for good (relay stopped): each is kept in DIR/dead-letter/ and skipped from then on")
                        .arg(spool_dir_arg())
                        .arg(
                            clap::Arg::new("seq")
                                .long("seq")
                                .value_name("N")
                                .value_parser(clap::value_parser!(u64))
                                .help("sequence number of the record (the relay's log names it)"),
                        )
                        .arg(
                            clap::Arg::new("from")
                                .long("from")
                                .value_name("N")
                                .requires("to")
                                .value_parser(clap::value_parser!(u64))
                                .help("every waiting record from N…"),
                        )
                        .arg(
                            clap::Arg::new("to")
                                .long("to")
                                .value_name("M")
                                .requires("from")
                                .value_parser(clap::value_parser!(u64))
                                .help("…to M, both included"),
                        )
                        .arg(
                            clap::Arg::new("all_unreadable")
                                .long("all-unreadable")
                                .action(clap::ArgAction::SetTrue)
                                .help("every waiting entry this version cannot read (written by another version)"),
                        )
                        .group(
                            clap::ArgGroup::new("which")
                                .args(["seq", "from", "all_unreadable"])
                                .required(true),
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
    let cli = cli();
    // The load generator is built only with `--features load-tool` (scripts/bench).
    #[cfg(feature = "load-tool")]
    let cli = cli.subcommand(im_relay::bench::cli::command());
    let matches = cli.get_matches();
    match matches.subcommand() {
        Some(("serve", flags)) => serve(flags),
        Some(("sync", flags)) => sync(flags),
        Some(("backfill", flags)) => backfill(flags),
        Some(("reconcile", flags)) => reconcile(flags),
        Some(("sign", flags)) => sign(flags),
        #[cfg(feature = "load-tool")]
        Some(("bench", flags)) => im_relay::bench::cli::main(flags),
        Some(("spool", sub)) => match sub.subcommand() {
            Some(("status", flags)) => spool_status(flags),
            Some(("drop", flags)) => spool_drop(flags),
            Some(("drain", flags)) => spool_drain(flags),
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
    println!(
        "overlapping:         {} (set aside at the next start)",
        r.overlapping
    );
    println!(
        "set aside:           {} segment(s) with records in {}*/ (publish with spool drain)",
        r.set_aside_held,
        dir.join(spool::FOREIGN_DIR).display()
    );
    ExitCode::SUCCESS
}

/// A spool directory no relay will start on again, published through the relay's own road.
fn spool_drain(flags: &clap::ArgMatches) -> ExitCode {
    let dir = &spool_dir(flags);
    let kafka = match config::KafkaConfig::load(None, &|k| std::env::var(k).ok()) {
        Ok(kafka) => kafka,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    let timeout = flags
        .get_one::<u64>("timeout")
        .map(|s| std::time::Duration::from_secs(*s));
    let publisher = im_relay::publish::PublisherConfig {
        kafka,
        max_in_flight: 2000,
    };
    let every = std::time::Duration::from_secs(10);
    match im_relay::publish::drain(dir, publisher, timeout, every) {
        Ok(d) => {
            println!(
                "{}: {} record(s) were waiting, {} published, {} left",
                dir.display(),
                d.found,
                d.found.saturating_sub(d.left),
                d.left
            );
            if d.set_aside > 0 {
                eprintln!(
                    "{} segment(s) of it overlapped others and were set aside in {}*/: \
                     drain those too",
                    d.set_aside,
                    dir.join(spool::FOREIGN_DIR).display()
                );
            }
            if d.left == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "records still wait in {}: run this again once Kafka takes them \
                     (the log above says why they wait)",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The only way an acknowledged record leaves the spool without Kafka's word: an operator's.
fn spool_drop(flags: &clap::ArgMatches) -> ExitCode {
    let dir = &spool_dir(flags);
    let number = |name| flags.get_one::<u64>(name).copied();
    let reason = flags
        .get_one::<String>("reason")
        .cloned()
        .unwrap_or_default();
    let dropped = if let Some(seq) = number("seq") {
        spool::drop_record(dir, seq, &reason).map(|()| vec![seq])
    } else if let (Some(from), Some(to)) = (number("from"), number("to")) {
        spool::drop_records(dir, |seq, _| (from..=to).contains(&seq), &reason)
    } else {
        spool::drop_records(
            dir,
            |_, entry| record::View::parse(entry).is_none(),
            &reason,
        )
    };
    match dropped {
        Ok(seqs) => {
            for seq in &seqs {
                tracing::warn!(seq, reason, dir = %dir.display(), "spool record dropped by an operator");
            }
            println!(
                "dropped {} record(s){}; kept in {}",
                seqs.len(),
                match (seqs.first(), seqs.last()) {
                    (Some(a), Some(b)) if a != b => format!(" ({a} to {b})"),
                    (Some(a), _) => format!(" ({a})"),
                    _ => String::new(),
                },
                dir.join(spool::DEAD_LETTER_DIR).display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot drop records in {}: {error}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn sign(flags: &clap::ArgMatches) -> ExitCode {
    let Some(token) = config::token_from_env() else {
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
    let loaded = Config::load(Some(flags), &|k| std::env::var(k).ok());
    run_async(loaded, |config| async {
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

/// A subcommand's settings, every problem reported at once (exit 2), then `main` on a new
/// async runtime.
fn run_async<C, F: std::future::Future<Output = ExitCode>>(
    loaded: Result<C, config::ConfigErrors>,
    main: impl FnOnce(C) -> F,
) -> ExitCode {
    let config = match loaded {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main(config)),
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            ExitCode::FAILURE
        }
    }
}

/// `im-relay sync`: the consumer loop on its own thread, the admin listener beside it; a
/// signal lets the batch in hand finish (applied and committed) before it stops.
fn sync(flags: &clap::ArgMatches) -> ExitCode {
    let loaded = config::SyncConfig::load(Some(flags), &|k| std::env::var(k).ok());
    run_async(loaded, |config| async move {
        let health = std::sync::Arc::new(im_relay::sync::SyncHealth::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin = {
            let health = health.clone();
            match serve_admin(config.admin_listen, move || health.trouble()).await {
                Some(admin) => admin,
                None => return ExitCode::FAILURE,
            }
        };
        // Its own thread, outside the runtime: the database clients block.
        let (done, mut finished) = tokio::sync::oneshot::channel();
        {
            let (health, stop) = (health.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = done.send(im_relay::sync::run(&config, &stop, &health));
            });
        }
        let result = tokio::select! {
            result = &mut finished => result,
            () = shutdown_signal() => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                finished.await
            }
        };
        admin.abort();
        match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => {
                tracing::error!(%error, "sync failed");
                ExitCode::FAILURE
            }
            Err(_) => {
                tracing::error!("sync stopped unexpectedly");
                ExitCode::FAILURE
            }
        }
    })
}

fn backfill_command() -> clap::Command {
    use clap::{Arg, ArgAction};
    config::backfill_command()
        .arg(
            Arg::new("source")
                .long("source")
                .required(true)
                .value_parser(["roam", "history"])
                .help("roam: named conversations, minutes old, with recalls; history: every message, from Tencent's hourly files (ready ~1 h after the hour, kept 7 days)"),
        )
        .arg(
            Arg::new("pair")
                .long("pair")
                .value_name("A:B")
                .action(ArgAction::Append)
                .help("a conversation to read (roam), split on the first `:`; repeatable"),
        )
        .arg(
            Arg::new("pairs_from_topic")
                .long("pairs-from-topic")
                .action(ArgAction::SetTrue)
                .help("read the conversations the topic saw from an hour before the window to an hour after it (roam)"),
        )
        .arg(
            Arg::new("from")
                .long("from")
                .required(true)
                .value_name("RFC3339")
                .help("start of the window (inclusive), e.g. 2026-11-27T14:00:00Z"),
        )
        .arg(
            Arg::new("to")
                .long("to")
                .required(true)
                .value_name("RFC3339")
                .help("end of the window (exclusive)"),
        )
        .arg(
            Arg::new("dry_run")
                .long("dry-run")
                .action(ArgAction::SetTrue)
                .help("print what would be published; publish nothing"),
        )
        .arg(
            Arg::new("allow_missing_records")
                .long("allow-missing-records")
                .action(ArgAction::SetTrue)
                .help("run even where records of the window may have been deleted from the topic (retention, compaction): every message it does not hold is published"),
        )
        .arg(
            Arg::new("max_publish")
                .long("max-publish")
                .value_name("N")
                .value_parser(clap::value_parser!(u64))
                .help("stop (exit 1) before publishing more than N records"),
        )
        .arg(
            Arg::new("relay")
                .long("relay")
                .value_name("HOST:PORT")
                .action(ArgAction::Append)
                .help("a relay's admin address (repeatable; a name may resolve to every replica): the run waits (exit 75) while a relay's spool holds records from before the window's end"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("print the summary as one JSON object instead of the table (its last line, after --dry-run's)"),
        )
}

/// The run's own flags as a job, or what is wrong with them.
fn backfill_job(flags: &clap::ArgMatches) -> Result<im_relay::backfill::Job, String> {
    use im_relay::backfill::{Job, Source};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    let at = |name: &str| {
        let text = flags.get_one::<String>(name).cloned().unwrap_or_default();
        OffsetDateTime::parse(&text, &Rfc3339).map_err(|_| {
            format!("--{name} `{text}` is not an RFC 3339 time (2026-11-27T14:00:00Z)")
        })
    };
    let (from, to) = (at("from")?, at("to")?);
    if from >= to {
        return Err("--from must be before --to".into());
    }
    let mut pairs = Vec::new();
    for p in flags.get_many::<String>("pair").into_iter().flatten() {
        match p.split_once(':') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                pairs.push((a.to_owned(), b.to_owned()))
            }
            _ => return Err(format!("--pair `{p}` is not A:B")),
        }
    }
    let from_topic = flags.get_flag("pairs_from_topic");
    let source = match flags.get_one::<String>("source").map(String::as_str) {
        Some("history") if !pairs.is_empty() || from_topic => {
            return Err("--pair and --pairs-from-topic are for --source roam".into());
        }
        Some("history") => Source::History,
        _ if pairs.is_empty() && !from_topic => {
            return Err("--source roam needs --pair A:B or --pairs-from-topic".into());
        }
        _ => Source::Roam { pairs, from_topic },
    };
    let mut job = Job::new(source, from, to);
    job.dry_run = flags.get_flag("dry_run");
    job.allow_lost = flags.get_flag("allow_missing_records");
    job.max_publish = flags.get_one::<u64>("max_publish").copied();
    Ok(job)
}

/// `im-relay backfill`: exit 0 done, 1 an error, 2 bad settings or flags, 75 (EX_TEMPFAIL)
/// some hour's file cannot be ready yet.
fn backfill(flags: &clap::ArgMatches) -> ExitCode {
    use std::io::IsTerminal;
    let job = match backfill_job(flags) {
        Ok(job) => job,
        Err(problem) => {
            eprintln!("{problem}");
            return ExitCode::from(2);
        }
    };
    let relays: Vec<String> = flags
        .get_many::<String>("relay")
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let json = flags.get_flag("json");
    let loaded = config::BackfillConfig::load(Some(flags), &|k| std::env::var(k).ok());
    run_async(loaded, |config| async move {
        use im_relay::backfill::{Source, reconcile};
        if let Source::Roam { .. } = job.source {
            let reach = time::OffsetDateTime::now_utc() - im_relay::backfill::ROAM_KEPT;
            let lookback = job.from - config.tencent.recall_lookback;
            if lookback < reach {
                eprintln!(
                    "note: roam keeps 7 days of messages on the default edition; before {} it \
                     finds nothing unless the app's edition keeps more",
                    reach.date()
                );
            }
        }
        if !relays.is_empty() {
            let http = reqwest::Client::new();
            match reconcile::relays_oldest_unpublished(&http, &relays).await {
                Ok(waiting) if reconcile::spool_covers(waiting, job.to) => {
                    eprintln!(
                        "a relay's spool still holds records from before the window's end: they \
                         are about to be published; run again once it has drained"
                    );
                    return ExitCode::from(75);
                }
                Ok(_) => {}
                Err(why) => {
                    eprintln!("cannot ask the relays about their spools: {why}");
                    return ExitCode::from(75);
                }
            }
        }
        let terminal = std::io::stderr().is_terminal();
        let outcome =
            im_relay::backfill::run(&config.tencent, &config.kafka, &job, |done, of, row| {
                let line = format!(
                    "[{done}/{of}] {}: found {}, on topic {}, published {}",
                    row.name, row.found, row.on_topic, row.published
                );
                // A terminal gets one line redrawn; a log, a line each.
                if terminal {
                    eprint!("\r{line}          ");
                } else {
                    eprintln!("{line}");
                }
            })
            .await;
        if terminal {
            eprintln!();
        }
        if json {
            println!("{}", outcome.summary.json());
        } else {
            print!("{}", outcome.summary.table(job.dry_run));
        }
        match outcome.error {
            Some(error) => {
                eprintln!("backfill failed: {error}");
                ExitCode::FAILURE
            }
            None if outcome.summary.total().not_ready => {
                eprintln!(
                    "some hours cannot be ready yet (Tencent writes an hour's file about an hour after it ends): run again later"
                );
                ExitCode::from(75)
            }
            None => ExitCode::SUCCESS,
        }
    })
}

/// `im-relay reconcile`: hour after hour, with its admin listener; a signal stops it at its
/// next await (what it published is on the topic; the hour is done again next time).
fn reconcile(flags: &clap::ArgMatches) -> ExitCode {
    let loaded = config::ReconcileConfig::load(Some(flags), &|k| std::env::var(k).ok());
    run_async(loaded, |config| async move {
        if let Err(error) = std::fs::create_dir_all(&config.state_dir) {
            tracing::error!(%error, dir = %config.state_dir.display(), "cannot make the state directory");
            return ExitCode::FAILURE;
        }
        let Some(admin) = serve_admin(config.admin_listen, || None).await else {
            return ExitCode::FAILURE;
        };
        let stop = std::sync::Arc::new(tokio::sync::Notify::new());
        let work = tokio::spawn(im_relay::backfill::reconcile::reconcile(
            std::sync::Arc::new(config),
            stop.clone(),
        ));
        shutdown_signal().await;
        stop.notify_one();
        let _ = work.await;
        admin.abort();
        ExitCode::SUCCESS
    })
}

/// The admin listener of `sync` and `reconcile` (`/metrics`, `/livez`, `/readyz` red while
/// `trouble` names a reason); `None`, logged, when its address cannot be bound.
async fn serve_admin(
    addr: std::net::SocketAddr,
    trouble: impl Fn() -> Option<&'static str> + Clone + Send + Sync + 'static,
) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, %addr, "cannot bind the admin listener");
            return None;
        }
    };
    let router = im_relay::startup::admin_router(trouble, telemetry::metrics_handle());
    Some(tokio::spawn(
        async move { axum::serve(listener, router).await },
    ))
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
