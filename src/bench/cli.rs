//! `im-relay bench` on the command line: flags, the run, the report, the exit status.

use std::process::ExitCode;

use crate::domain::unix_millis;

/// `im-relay bench`'s flags.
pub fn command() -> clap::Command {
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
                .help("librdkafka setting for reading the topic; SASL and TLS come from IM_RELAY_KAFKA_* as for serve"),
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

/// Runs `im-relay bench`.
pub fn main(flags: &clap::ArgMatches) -> ExitCode {
    use super::{self as bench, VerifyOptions};
    let usage = |msg: String| {
        eprintln!("im-relay bench: {msg}");
        ExitCode::from(2)
    };
    let Some(token) = crate::config::token_from_env() else {
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
    // The relay's own Kafka security settings (IM_RELAY_KAFKA_SECURITY_PROTOCOL, SASL, CA)
    // reach the check from the environment, so no password is ever a flag; -X comes after.
    let env = |k: &str| std::env::var(k).ok();
    let verifying = flags.get_one::<String>("verify_brokers").is_some();
    let mut client = match verifying.then(|| crate::config::KafkaConfig::load(None, &env)) {
        Some(Ok(kafka)) => crate::config::connection_config(&kafka),
        Some(Err(e)) => return usage(e.to_string()),
        None => rdkafka::ClientConfig::new(),
    };
    for p in flags
        .get_many::<String>("verify_property")
        .into_iter()
        .flatten()
    {
        match p.split_once('=') {
            Some((k, v)) => {
                client.set(k, v);
            }
            None => return usage(format!("-X {p}: expected KEY=VALUE")),
        }
    }
    let verify = flags
        .get_one::<String>("verify_brokers")
        .map(|brokers| VerifyOptions {
            brokers: brokers.clone(),
            topic: arg("verify_topic"),
            client: client.clone(),
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
