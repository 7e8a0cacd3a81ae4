//! A secured Kafka, for real: tansu requiring SCRAM (SHA-256 and SHA-512) behind a TLS
//! terminator (Debian's stunnel4) whose certificate a private CA signed, advertised as the
//! broker's listener. tansu 0.6 cannot serve TLS itself (`--cert` and `--key` are mutually
//! exclusive), so the TLS the clients verify is stunnel's; the SCRAM exchange inside it is
//! tansu's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

const USER_512: (&str, &str) = ("relay", "relay-password-512");
const USER_256: (&str, &str) = ("reader", "reader-password-256");

/// tansu with `--authentication` on 127.0.0.1, stunnel in front of it on `port`.
struct SecureBroker {
    broker: Child,
    stunnel: Child,
    /// The storage, certificates and the two logs (`tansu-*.log`, `stunnel.log`).
    _dir: tempfile::TempDir,
    port: u16,
    ca: PathBuf,
}

fn stunnel_bin() -> &'static str {
    for bin in ["stunnel4", "stunnel"] {
        if Command::new(bin).arg("-version").output().is_ok() {
            return bin;
        }
    }
    panic!("no stunnel4: ./scripts/test installs Debian's stunnel4 (apt-get install stunnel4)")
}

impl SecureBroker {
    /// Users are made on `sqlite://` storage while the broker is open, then it restarts with
    /// `--authentication` (tansu has no other way to make them).
    async fn start(topics: &[&str]) -> SecureBroker {
        let dir = tempfile::tempdir().unwrap();
        let (inner, port) = (free_port(), free_port());
        let tansu = |auth: bool, advertised: &str| {
            let listen = format!("tcp://127.0.0.1:{inner}");
            let mut c = Command::new(tansu_bin());
            c.current_dir(dir.path())
                .args(["broker", "--listener-url", &listen])
                .args(["--advertised-listener-url", advertised])
                .args(["--storage-engine", "sqlite://kafka.db"])
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join(format!("tansu-{auth}.log"))).unwrap(),
                );
            if auth {
                c.arg("--authentication");
            }
            let child = c.spawn().expect("tansu starts");
            wait_listening(inner, "tansu");
            child
        };
        let mut open = tansu(false, &format!("tcp://127.0.0.1:{inner}"));
        for ((user, password), mechanism) in [(USER_512, "scram512"), (USER_256, "scram256")] {
            let ok = Command::new(tansu_bin())
                .args([
                    "user",
                    "create",
                    "--broker",
                    &format!("tcp://127.0.0.1:{inner}"),
                ])
                .args(["--mechanism", mechanism, user, password])
                .status()
                .expect("tansu user create runs")
                .success();
            assert!(ok, "tansu user create {user}");
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{inner}"))
            .create()
            .unwrap();
        let new: Vec<_> = topics
            .iter()
            .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        for r in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.expect("topic created");
        }
        drop(admin);
        open.kill().unwrap();
        open.wait().unwrap();

        // The private CA and the certificate it signs for `localhost`.
        let pki = private_ca("im-relay test CA", &["localhost"]);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_pem).unwrap();
        std::fs::write(dir.path().join("broker.pem"), pki.cert_pem).unwrap();
        std::fs::write(dir.path().join("broker.key"), pki.key_pem).unwrap();
        let conf = dir.path().join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{inner}\ncert = {d}/broker.pem\nkey = {d}/broker.key\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let broker = tansu(true, &format!("tcp://localhost:{port}"));
        let stunnel = Command::new(stunnel_bin())
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stunnel.log")).unwrap())
            .spawn()
            .expect("stunnel starts");
        wait_listening(port, "stunnel");
        SecureBroker {
            broker,
            stunnel,
            _dir: dir,
            port,
            ca,
        }
    }

    fn bootstrap(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// The relay's settings for this broker as `user` with `password`.
    fn settings(&self, mechanism: &str, user: &str, password: &str) -> Vec<(String, String)> {
        [
            ("IM_RELAY_KAFKA_BROKERS", self.bootstrap()),
            ("IM_RELAY_KAFKA_SECURITY_PROTOCOL", "sasl_ssl".into()),
            ("IM_RELAY_KAFKA_SASL_MECHANISM", mechanism.into()),
            ("IM_RELAY_KAFKA_SASL_USERNAME", user.into()),
            ("IM_RELAY_KAFKA_SASL_PASSWORD", password.into()),
            (
                "IM_RELAY_KAFKA_SSL_CA_LOCATION",
                self.ca.display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Whether a client with these librdkafka settings gets the cluster's metadata.
    fn admits(&self, settings: &[(&str, &str)]) -> bool {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("group.id", "probe");
        for (k, v) in settings {
            c.set(*k, *v);
        }
        let consumer: BaseConsumer = c.create().unwrap();
        consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .is_ok()
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        for child in [&mut self.broker, &mut self.stunnel] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn relay_env(
    k: &SecureBroker,
    topic: &str,
    spool: &Path,
    password: &str,
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("IM_RELAY_SDK_APP_ID", APP_ID.to_string()),
        ("IM_RELAY_TOKEN", TOKEN.to_owned()),
        ("IM_RELAY_LISTEN", free_addr()),
        ("IM_RELAY_ADMIN_LISTEN", free_addr()),
        ("IM_RELAY_TOPIC", topic.to_owned()),
        ("IM_RELAY_QUARANTINE_TOPIC", quarantine_topic(topic)),
        ("IM_RELAY_SPOOL_DIR", spool.display().to_string()),
        ("IM_RELAY_KAFKA_LINGER_MS", "1".to_owned()),
        ("IM_RELAY_SHUTDOWN_DRAIN_MS", "200".to_owned()),
        ("IM_RELAY_KAFKA_FLUSH_TIMEOUT_MS", "500".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(k.settings("SCRAM-SHA-512", USER_512.0, password));
    env
}

async fn post(env: &HashMap<String, String>, key: &str) -> u16 {
    let body = DOC_SAMPLE.replace("48374_2837546_1557481126", key);
    let url = format!(
        "http://{}/im/callback?{}",
        env["IM_RELAY_LISTEN"],
        after_send_query()
    );
    reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_over_tls_from_a_private_ca_and_wrong_credentials_wait_not_lose() {
    let topic = format!("im.c2c.secure-{}", unique());
    let k = SecureBroker::start(&[&topic, &quarantine_topic(&topic)]).await;
    let ca = k.ca.display().to_string();
    let tls = [
        ("security.protocol", "sasl_ssl"),
        ("ssl.ca.location", ca.as_str()),
    ];
    let with = |mechanism: &'static str, (user, password): (&'static str, &'static str)| {
        let mut s = tls.to_vec();
        s.extend([
            ("sasl.mechanism", mechanism),
            ("sasl.username", user),
            ("sasl.password", password),
        ]);
        s
    };

    // The controls: the broker takes both mechanisms with the right passwords, and refuses a
    // wrong password, a user of the other mechanism, no credentials, and a client that does
    // not trust the private CA.
    assert!(k.admits(&with("SCRAM-SHA-512", USER_512)));
    assert!(k.admits(&with("SCRAM-SHA-256", USER_256)));
    assert!(!k.admits(&with("SCRAM-SHA-512", (USER_512.0, "not-the-password"))));
    assert!(!k.admits(&with("SCRAM-SHA-512", USER_256)));
    assert!(!k.admits(&[("security.protocol", "ssl"), ("ssl.ca.location", &ca)]));
    let mut untrusting = with("SCRAM-SHA-512", USER_512);
    untrusting.retain(|(key, _)| *key != "ssl.ca.location");
    assert!(!k.admits(&untrusting));

    // A relay with a wrong password: callbacks are acknowledged into the spool, publishing is
    // blocked with its reason, readiness is red, the log says so; nothing reaches the topic.
    let spool = tempfile::tempdir().unwrap();
    let log = spool.path().join("relay.log");
    let env = relay_env(&k, &topic, &spool.path().join("spool"), "not-the-password");
    let relay = RelayProcess::spawn(&env, &log);
    // Not ready (that is the point): wait for the callback port itself.
    wait_for("the relay's callback port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&env["IM_RELAY_LISTEN"]).is_ok()
    });
    let keys: Vec<String> = (0..5).map(|i| format!("secure-{i}")).collect();
    for key in &keys {
        assert_eq!(post(&env, key).await, 200, "acknowledged into the spool");
    }
    wait_for("the blocked reason", Duration::from_secs(20), || {
        series_value(
            &relay.metrics(),
            "im_relay_publish_blocked{reason=\"authentication_failed\"}",
        ) == Some(1.0)
    });
    assert_eq!(relay.ready(), Some(false), "readiness is red");
    let (status, body) = relay.get("/readyz").unwrap();
    assert_eq!(
        (status, body.trim()),
        (503, "kafka refuses the credentials")
    );
    // The gauges follow every few seconds.
    wait_for("the backlog gauge", Duration::from_secs(15), || {
        series_value(&relay.metrics(), "im_relay_spool_backlog_records") == Some(5.0)
    });
    assert_eq!(
        series_value(&relay.metrics(), "im_relay_records_published_total").unwrap_or(0.0),
        0.0
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("publishing blocked") && text.contains("authentication_failed"),
        "a clear log line: {text}"
    );
    assert!(
        !text.contains("not-the-password"),
        "the password never reaches the log"
    );
    assert!(relay.terminate().success());

    // Fixed by a restart with the right password, on the same spool: everything delivered.
    let mut env = env;
    env.extend(k.settings("SCRAM-SHA-512", USER_512.0, USER_512.1));
    let relay = RelayProcess::start(&env, &log);
    wait_for("the backlog delivered", Duration::from_secs(30), || {
        series_value(&relay.metrics(), "im_relay_spool_backlog_records") == Some(0.0)
    });
    let metrics = relay.metrics();
    assert_eq!(
        series_value(&metrics, "im_relay_records_published_total"),
        Some(5.0)
    );
    assert_eq!(
        series_value(
            &metrics,
            "im_relay_publish_blocked{reason=\"authentication_failed\"}"
        ),
        Some(0.0)
    );

    // `sync` reads them back as the SHA-256 user, into SQLite.
    let db = spool.path().join("sync.db");
    let mut sync_env: HashMap<String, String> = [
        ("IM_RELAY_TOPIC", topic.clone()),
        ("IM_RELAY_QUARANTINE_TOPIC", quarantine_topic(&topic)),
        (
            "IM_RELAY_SYNC_DATABASE_URL",
            format!("sqlite://{}", db.display()),
        ),
        ("IM_RELAY_SYNC_GROUP", format!("sync-{}", unique())),
        ("IM_RELAY_SYNC_ADMIN_LISTEN", free_addr()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    sync_env.extend(k.settings("SCRAM-SHA-256", USER_256.0, USER_256.1));
    let sync = RelayProcess::spawn_command("sync", &sync_env, &spool.path().join("sync.log"));
    wait_for("sync ready", Duration::from_secs(30), || {
        sync.ready() == Some(true)
    });
    // tansu holds a partition's newest batch back until another write: a few more records.
    let mut more = 0;
    let synced = |db: &Path| -> usize {
        let Ok(conn) = rusqlite::Connection::open(db) else {
            return 0;
        };
        keys.iter()
            .filter(|key| {
                conn.query_row(
                    "SELECT count(*) FROM messages WHERE msg_key = ?1",
                    [key.as_str()],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap_or(0)
                    == 1
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while synced(&db) < keys.len() {
        assert!(Instant::now() < deadline, "sync did not apply all five");
        assert_eq!(post(&env, &format!("nudge-{more}")).await, 200);
        more += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(sync);

    // `bench --verify` reads the topic with the same settings from the environment.
    #[cfg(feature = "load-tool")]
    {
        let url = format!("http://{}/im/callback", env["IM_RELAY_LISTEN"]);
        let out = Command::new(env!("CARGO_BIN_EXE_im-relay"))
            .env_clear()
            .envs(k.settings("SCRAM-SHA-256", USER_256.0, USER_256.1))
            .env("IM_RELAY_TOKEN", TOKEN)
            .env("IM_RELAY_LOG", "warn")
            .args(["bench", "--json", "--duration", "1s", "--rate", "50"])
            .args(["--url", &url, "--verify-patience", "8s", "--verify-nudge"])
            .args(["--verify-brokers", &k.bootstrap(), "--verify-topic", &topic])
            .output()
            .expect("bench runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "bench printed no JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(out.status.code(), Some(0), "{report}");
        assert!(
            report["verified"]["found"].as_u64().unwrap_or(0) > 0,
            "{report}"
        );
    }
    assert!(relay.terminate().success());
}
