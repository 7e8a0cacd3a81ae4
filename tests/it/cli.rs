//! The `im-relay` binary as a user runs it: bad settings, `--help`, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn relay() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_im-relay"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

#[test]
fn sync_asks_no_callback_token_and_refuses_a_password_on_the_command_line() {
    let out = relay()
        .args([
            "sync",
            "--database",
            "postgres://sync:hunter2@db.example/im",
        ])
        .args(["--sync-batch-max", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must not hold a password"), "{stderr}");
    assert!(stderr.contains("IM_RELAY_SYNC_BATCH_MAX"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // Nothing about a token or an app id: those are serve's.
    assert!(!stderr.contains("IM_RELAY_TOKEN"), "{stderr}");
    assert!(!stderr.contains("IM_RELAY_SDK_APP_ID"), "{stderr}");
    // And no flag takes the password itself.
    let out = relay()
        .args(["sync", "--sync-database-password", "hunter2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_settings_are_all_reported_and_the_exit_code_is_2() {
    let out = relay()
        .arg("serve")
        .args(["--listen", "not-an-address"])
        .env("IM_RELAY_SDK_APP_ID", "abc")
        .env("IM_RELAY_TOKEN", "super-secret-token")
        .env("IM_RELAY_MAX_BODY_BYTES", "lots")
        .env("IM_RELAY_KEY", "random")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "IM_RELAY_LISTEN",
        "IM_RELAY_SDK_APP_ID",
        "IM_RELAY_MAX_BODY_BYTES",
        "IM_RELAY_KEY",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("super-secret-token"));
}

#[test]
fn help_never_shows_secrets() {
    let out = relay()
        .args(["serve", "--help"])
        .env("IM_RELAY_TOKEN", "super-secret-token")
        .env("IM_RELAY_KAFKA_SASL_PASSWORD", "super-secret-password")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--kafka-brokers"), "{help}");
    assert!(help.contains("IM_RELAY_TOKEN"), "{help}");
    assert!(!help.contains("super-secret"));
    assert!(!help.contains("--token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_flushes_and_exits_zero() {
    let broker = Broker::start();
    let topic = format!("im.c2c.cli-{}", unique());
    broker.create_topic(&topic).await;
    broker.create_topic(&quarantine_topic(&topic)).await;
    let spool = tempfile::tempdir().unwrap();
    let mut child = relay()
        .arg("serve")
        .envs(test_env(&broker, &topic, spool.path(), &[]))
        .env("IM_RELAY_KAFKA_LINGER_MS", "500")
        // Everything the relay says, to show secrets are in none of it.
        .env("IM_RELAY_LOG", "debug")
        .env("IM_RELAY_TOKEN_NEXT", "next-secret-token")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first log line that names the bound ports.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving: Value = loop {
        let line = lines.next().expect("relay logged before exiting").unwrap();
        let v: Value = serde_json::from_str(&line).expect("JSON log lines");
        if v["message"] == "im-relay serving" {
            break v;
        }
    };
    assert!(line_has_no_secret(&serving.to_string()));
    let listen = serving["listen"].as_str().unwrap().to_owned();
    let url = format!("http://{listen}/im/callback?{}", after_send_query());
    let resp = reqwest::Client::new()
        .post(url)
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Failing authentication, logged (rate-limited) without the secret.
    let forged = signed_query("C2C.CallbackAfterSendMsg", "guess", now());
    let resp = reqwest::Client::new()
        .post(format!("http://{listen}/im/callback?{forged}"))
        .body(DOC_SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}, log: {rest:#?}");
    assert!(
        rest.iter().any(|l| l.contains("publisher stopped")),
        "{rest:#?}"
    );
    assert!(rest.iter().all(|l| line_has_no_secret(l)));
    assert!(
        rest.iter().any(|l| l.contains("bad_signature")),
        "the refusal is logged: {rest:#?}"
    );

    let bootstrap = broker.bootstrap();
    let records = tokio::task::spawn_blocking(move || {
        read_records(&bootstrap, &topic, 1, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value["from_account"], "jared");
}

fn line_has_no_secret(line: &str) -> bool {
    !line.contains(TOKEN) && !line.contains("next-secret-token")
}

#[test]
fn sign_prints_the_spec_test_vector() {
    let out = relay()
        .args(["sign", "--time", "1669872112"])
        .env("IM_RELAY_TOKEN", "xxxxyyyy")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "RequestTime=1669872112&Sign=17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061\n"
    );
}
