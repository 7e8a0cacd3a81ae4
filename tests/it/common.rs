//! Test harness: a real broker (tansu) on its own port, the real app on port 0, signed
//! callbacks over real HTTP, and the records read back from Kafka.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use im_relay::config::{Config, Secret};
use im_relay::startup::Application;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const APP_ID: u64 = 1400000000;
pub const TOKEN: &str = "test-token-0123456789";
pub const PARTITIONS: i32 = 3;
const MARKER_KEY: &str = "__im_relay_test_marker__";

pub const DOC_SAMPLE: &str = include_str!("../fixtures/doc_sample.json");
pub const ALL_ELEMENTS: &str = include_str!("../fixtures/all_elements.json");
pub const LEGACY_MINIMAL: &str = include_str!("../fixtures/legacy_minimal.json");
pub const NO_KEY_NO_SEQ: &str = include_str!("../fixtures/no_key_no_seq.json");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits up to 10 s for something to listen on 127.0.0.1:`port`; `what` names it if not.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A certificate authority of the test's own, and a server certificate it signed for `names`
/// (host names or IP addresses): the CA's PEM, the certificate's, its key's.
pub struct PrivateCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn private_ca(ca_name: &str, names: &[&str]) -> PrivateCa {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose subject is its issuer's reads as self-signed.
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut leaf = CertificateParams::new(names).unwrap();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    PrivateCa {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The value of the exposition line `series value` (name and labels exactly as written).
pub fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
}

/// The tansu binary: `TANSU_BIN`, else where `scripts/lib.sh` caches it.
pub fn tansu_bin() -> String {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return bin;
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = std::env::var("IM_RELAY_CACHE").unwrap_or(format!("{home}/.cache/im-relay"));
    let bin = format!("{cache}/tansu-0.6.0/bin/tansu");
    assert!(
        std::path::Path::new(&bin).exists(),
        "no tansu broker at {bin}: run ./scripts/test (it installs one) or set TANSU_BIN"
    );
    bin
}

/// A Kafka-compatible broker process of this test's own, in memory, killed on drop.
pub struct Broker {
    child: Child,
    pub port: u16,
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        wait_listening(port, "tansu");
        Broker { child, port }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_topic(&self, name: &str) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin client");
        let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(&[topic], &AdminOptions::new())
            .await
            .expect("create_topics answered");
        for r in results {
            r.expect("topic created");
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the broker process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Received {
    pub raw: Vec<u8>,
    pub key: String,
    pub headers: BTreeMap<String, String>,
    pub value: Value,
    pub partition: i32,
}

/// Reads the topic from the beginning until `want` records (markers excluded) are in, or
/// `timeout` passes.
pub fn read_records(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> Vec<Received> {
    read_until(bootstrap, topic, timeout, |got| got.len() >= want)
}

/// Reads the topic from the beginning until `done` says so, or `timeout` passes. tansu
/// sometimes keeps a partition's newest batch from readers until another record lands there,
/// so after a quiet spell a marker is written to every partition.
pub fn read_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", unique()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut last_progress = Instant::now();
    let mut marked = false;
    // `done` may look at every record: on big reads, ask it only now and then.
    let mut idle = true;
    while Instant::now() < deadline {
        if (idle || got.len() < 1000 || got.len() % 1000 == 0) && done(&got) {
            break;
        }
        idle = false;
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if key == MARKER_KEY {
                    continue;
                }
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                                (h.key.to_owned(), v.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let raw = m.payload().unwrap_or_default().to_vec();
                // Quarantined bodies need not be JSON.
                let value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                got.push(Received {
                    raw,
                    key,
                    headers,
                    value,
                    partition: m.partition(),
                });
                last_progress = Instant::now();
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                idle = true;
                if !marked && last_progress.elapsed() > Duration::from_secs(3) {
                    write_markers(bootstrap, topic);
                    marked = true;
                }
            }
        }
    }
    got
}

pub fn write_markers(bootstrap: &str, topic: &str) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("marker producer");
    for p in 0..PARTITIONS {
        let _ = producer.send(
            BaseRecord::<str, str>::to(topic)
                .key(MARKER_KEY)
                .payload("{}")
                .partition(p),
        );
    }
    let _ = producer.flush(Duration::from_secs(5));
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn now() -> i64 {
    im_relay::domain::unix_seconds() as i64
}

/// Tencent's query string for `command`, signed with `token` at `time`.
pub fn signed_query(command: &str, token: &str, time: i64) -> String {
    let sign = hex::encode(im_relay::validate::sign_of(
        &Secret::new(token),
        &time.to_string(),
    ));
    format!(
        "SdkAppid={APP_ID}&CallbackCommand={command}&contenttype=json&ClientIP=203.0.113.7\
         &OptPlatform=Android&RequestTime={time}&Sign={sign}"
    )
}

pub fn after_send_query() -> String {
    signed_query("C2C.CallbackAfterSendMsg", TOKEN, now())
}

/// The app, running on port 0 against `broker`, publishing to its own topic.
pub struct TestApp {
    /// The spool's directory, removed when the app is dropped.
    _spool: tempfile::TempDir,
    pub base: String,
    pub url: String,
    pub admin: String,
    pub topic: String,
    pub bootstrap: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// Set when the app runs as its own process (`spawn_process_app`).
    process: Option<RelayProcess>,
}

pub fn quarantine_topic(topic: &str) -> String {
    format!("{topic}.quarantine")
}

/// A value in `extra` that removes the variable instead of setting it.
pub const UNSET: &str = "\0unset";

/// Settings for a test app; `extra` overrides, adds or (with `UNSET`) removes `IM_RELAY_*`
/// variables.
pub fn test_env(
    broker: &Broker,
    topic: &str,
    spool_dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("IM_RELAY_QUARANTINE_TOPIC", quarantine_topic(topic)),
        ("IM_RELAY_SPOOL_DIR", spool_dir.display().to_string()),
        ("IM_RELAY_SDK_APP_ID", APP_ID.to_string()),
        ("IM_RELAY_TOKEN", TOKEN.to_owned()),
        ("IM_RELAY_LISTEN", "127.0.0.1:0".to_owned()),
        ("IM_RELAY_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("IM_RELAY_KAFKA_BROKERS", broker.bootstrap()),
        ("IM_RELAY_TOPIC", topic.to_owned()),
        ("IM_RELAY_KAFKA_LINGER_MS", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        if *v == UNSET {
            env.remove(*k);
        } else {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
    }
    env
}

pub async fn spawn_app(broker: &Broker, extra: &[(&str, &str)]) -> TestApp {
    let topic = format!("im.c2c.test-{}", unique());
    broker.create_topic(&topic).await;
    broker.create_topic(&quarantine_topic(&topic)).await;
    let spool = tempfile::tempdir().expect("spool dir");
    let env = test_env(broker, &topic, spool.path(), extra);
    let config = Config::load(None, &|k| env.get(k).cloned()).expect("test config is valid");
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let path = config.callback_path.clone();
    let app = Application::build(config).await.expect("app builds");
    let base = format!("{scheme}://localhost:{}", app.port());
    let admin = format!("http://127.0.0.1:{}", app.admin_port());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        _spool: spool,
        url: format!("{base}{path}"),
        base,
        admin,
        topic,
        bootstrap: broker.bootstrap(),
        http: reqwest::Client::new(),
        stop: Some(stop),
        task: Some(task),
        process: None,
    }
}

/// The same app as its own process: for tests that count metrics exactly. The metrics
/// recorder is one per process, and the in-process apps of other tests running at the same
/// time in this test binary count into it too.
pub async fn spawn_process_app(broker: &Broker, extra: &[(&str, &str)]) -> TestApp {
    let topic = format!("im.c2c.test-{}", unique());
    broker.create_topic(&topic).await;
    broker.create_topic(&quarantine_topic(&topic)).await;
    let spool = tempfile::tempdir().expect("spool dir");
    let (listen, admin) = (free_addr(), free_addr());
    let mut all = vec![
        ("IM_RELAY_LISTEN", listen.as_str()),
        ("IM_RELAY_ADMIN_LISTEN", admin.as_str()),
    ];
    all.extend_from_slice(extra);
    let env = test_env(broker, &topic, &spool.path().join("spool"), &all);
    let path = env
        .get("IM_RELAY_CALLBACK_PATH")
        .cloned()
        .unwrap_or_else(|| "/im/callback".into());
    let log = spool.path().join("relay.log");
    let process = tokio::task::spawn_blocking(move || RelayProcess::start(&env, &log))
        .await
        .expect("relay started");
    let base = format!("http://{listen}");
    TestApp {
        url: format!("{base}{path}"),
        base,
        admin: format!("http://{admin}"),
        topic,
        bootstrap: broker.bootstrap(),
        http: reqwest::Client::new(),
        stop: None,
        task: None,
        process: Some(process),
        _spool: spool,
    }
}

impl TestApp {
    /// POSTs `body` with `query` and returns (status, parsed JSON body).
    pub async fn post(&self, query: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}?{query}", self.url))
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body read");
        let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        (status, json)
    }

    pub async fn post_signed(&self, body: &str) -> (u16, Value) {
        self.post(&after_send_query(), body.to_owned()).await
    }

    /// POSTs `body` as a signed callback of `command`.
    pub async fn post_command(&self, command: &str, body: &str) -> (u16, Value) {
        let query = signed_query(command, TOKEN, now());
        self.post(&query, body.to_owned()).await
    }

    pub async fn records(&self, want: usize) -> Vec<Received> {
        self.records_in(&self.topic, want).await
    }

    pub async fn quarantined(&self, want: usize) -> Vec<Received> {
        self.records_in(&quarantine_topic(&self.topic), want).await
    }

    pub async fn records_in(&self, topic: &str, want: usize) -> Vec<Received> {
        let (bootstrap, topic) = (self.bootstrap.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            read_records(&bootstrap, &topic, want, Duration::from_secs(30))
        })
        .await
        .expect("reader ran")
    }

    /// Every record up to and including the one whose `id` is `id`.
    pub async fn records_through(&self, id: &str) -> Vec<Received> {
        let (bootstrap, topic, id) = (self.bootstrap.clone(), self.topic.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || {
            read_until(&bootstrap, &topic, Duration::from_secs(30), |got| {
                got.iter().any(|r| r.value["id"] == id.as_str())
            })
        })
        .await
        .expect("reader ran")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics body")
    }

    /// Triggers shutdown and waits for the app to finish it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app stopped cleanly");
        }
        if let Some(process) = self.process.take() {
            let status = tokio::task::spawn_blocking(move || process.terminate())
                .await
                .expect("relay stopped");
            assert!(status.success(), "relay exit: {status}");
        }
    }
}

pub fn ok_body() -> Value {
    serde_json::json!({"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0})
}

/// Asserts `record` validates against the published schema its `schema` names.
pub fn assert_schema_valid(record: &Value) {
    let name = record["schema"].as_str().expect("a schema name");
    let (_, text) = im_relay::normalize::SCHEMAS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a published schema");
    let schema: Value = serde_json::from_str(text).expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(record)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "schema violations: {errors:#?}");
}

/// The `im-relay` binary run as a child process, so a test can `kill -9` it.
pub struct RelayProcess {
    child: Child,
    pub env: HashMap<String, String>,
}

impl RelayProcess {
    /// Starts the binary with `env` (fixed ports, so restarts keep the same address) and
    /// waits until `/readyz` answers 200.
    pub fn start(env: &HashMap<String, String>, log: &std::path::Path) -> RelayProcess {
        let p = RelayProcess::spawn(env, log);
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.ready() != Some(true) {
            assert!(
                Instant::now() < deadline,
                "relay not ready; log: {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Starts the binary without waiting for anything.
    pub fn spawn(env: &HashMap<String, String>, log: &std::path::Path) -> RelayProcess {
        RelayProcess::spawn_command("serve", env, log)
    }

    /// Starts `im-relay <command>` (`serve`, `sync`) without waiting for anything.
    pub fn spawn_command(
        command: &str,
        env: &HashMap<String, String>,
        log: &std::path::Path,
    ) -> RelayProcess {
        RelayProcess::spawn_binary(env!("CARGO_BIN_EXE_im-relay").as_ref(), command, env, log)
    }

    /// `spawn_command` with another build of the binary (a benchmark's baseline).
    pub fn spawn_binary(
        binary: &std::path::Path,
        command: &str,
        env: &HashMap<String, String>,
        log: &std::path::Path,
    ) -> RelayProcess {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(binary)
            .arg(command)
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("relay starts");
        RelayProcess {
            child,
            env: env.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn admin(&self) -> String {
        let own = [
            "IM_RELAY_SYNC_ADMIN_LISTEN",
            "IM_RELAY_RECONCILE_ADMIN_LISTEN",
        ];
        let own = own.iter().find_map(|k| self.env.get(*k));
        own.unwrap_or_else(|| &self.env["IM_RELAY_ADMIN_LISTEN"])
            .clone()
    }

    /// `Some(true)` ready, `Some(false)` answering but not ready, `None` not answering.
    pub fn ready(&self) -> Option<bool> {
        self.get("/readyz").map(|(status, _)| status == 200)
    }

    /// An admin endpoint's status and body; `None` when nothing answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(self.admin()).ok()?;
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((status, body.to_owned()))
    }

    /// Peak resident memory (`VmHWM`), bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib * 1024
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").expect("admin answers").1
    }

    /// SIGKILL: no drain, no flush, no goodbye.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    /// Waits up to `timeout` for the process to end by itself; its status, if it did.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and waits for the exit code.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for RelayProcess {
    /// A failed test must not leave a relay running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 30 s for `what` to appear in the log file.
pub fn wait_for_log(log: &std::path::Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{what}` in the log: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free `127.0.0.1:port`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A steady stream of signed callbacks with unique keys from `workers` concurrent senders,
/// until `stop` is set; returns the ids that were answered `OK`.
pub async fn drive(
    url: String,
    workers: usize,
    prefix: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, url, stop, prefix) =
            (client.clone(), url.clone(), stop.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{prefix}-{w}-{n}");
                n += 1;
                let body = serde_json::json!({
                    "CallbackCommand": "C2C.CallbackAfterSendMsg",
                    "From_Account": format!("user{w}"), "To_Account": "sink",
                    "MsgKey": key, "MsgTime": now(),
                    "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "load"}}],
                });
                let sent = client
                    .post(format!("{url}?{}", after_send_query()))
                    .body(body.to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        if r.json::<Value>().await.ok() == Some(ok_body()) {
                            acked.push(format!("{APP_ID}:sink:user{w}:{key}"));
                        }
                    }
                    // Refused or relay down: not acknowledged, so not owed.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// `missing_and_duplicates` off the async runtime.
pub async fn missing_after(
    bootstrap: String,
    topic: String,
    acked: Vec<String>,
    timeout: Duration,
) -> (Vec<String>, usize) {
    tokio::task::spawn_blocking(move || missing_and_duplicates(&bootstrap, &topic, &acked, timeout))
        .await
        .expect("reader ran")
}

/// Reads `topic` until every id in `acked` is there (or `timeout`); returns
/// (missing ids, duplicate count).
pub fn missing_and_duplicates(
    bootstrap: &str,
    topic: &str,
    acked: &[String],
    timeout: Duration,
) -> (Vec<String>, usize) {
    use std::collections::HashSet;
    let want: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let records = read_until(bootstrap, topic, timeout, |got| {
        let have: HashSet<&str> = got.iter().filter_map(|r| r.value["id"].as_str()).collect();
        want.is_subset(&have)
    });
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.value["id"].as_str())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    let missing = want.difference(&unique).map(|s| s.to_string()).collect();
    (missing, ids.len() - unique.len())
}

/// A tmpfs of `size` (e.g. "1m") mounted on a fresh directory, unmounted on drop. The tests
/// run as root; under `CI=true` a failure to mount fails the test, elsewhere it is skipped
/// out loud.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

pub fn tmpfs(size: &str) -> Option<Tmpfs> {
    let dir = tempfile::tempdir().expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot mount a tmpfs: CI runs the tests as root, where this must work"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return None;
    }
    Some(Tmpfs { dir })
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The in-process tier: the callback router driven with `tower::ServiceExt::oneshot` over a
/// temp-dir spool — no sockets, no broker. What it accepted is read back from the spool.
pub struct InProcess {
    router: axum::Router,
    dir: tempfile::TempDir,
}

impl InProcess {
    pub fn new(extra: &[(&str, &str)]) -> InProcess {
        // The process's recorder, as the app installs it: events before it are not counted.
        im_relay::telemetry::metrics_handle();
        let dir = tempfile::tempdir().expect("spool dir");
        let mut env: HashMap<String, String> = [
            ("IM_RELAY_SDK_APP_ID", APP_ID.to_string()),
            ("IM_RELAY_TOKEN", TOKEN.to_owned()),
            ("IM_RELAY_SPOOL_DIR", dir.path().display().to_string()),
            ("IM_RELAY_KAFKA_BROKERS", "127.0.0.1:1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        let config = Config::load(None, &|k| env.get(k).cloned()).expect("test config is valid");
        let opened = im_relay::spool::open(&config.spool, || {}).expect("spool opens");
        // The writer thread ends when the router (and its appender) is dropped.
        drop(opened.writer);
        let receiver = im_relay::receive::Receiver::new(&config, opened.appender);
        let health: im_relay::receive::Readiness = std::sync::Arc::new(|| None);
        let health = (config.health_path.as_str(), health);
        let router =
            im_relay::receive::router(std::sync::Arc::new(receiver), &config.callback_path, health);
        InProcess { router, dir }
    }

    /// One request from 127.0.0.1; (status, JSON answer).
    pub async fn call(&self, method: &str, uri: &str, body: Vec<u8>) -> (u16, Value) {
        use tower::ServiceExt;
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::from(body))
            .expect("a request");
        let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("answered");
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body read");
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    pub async fn post_signed(&self, body: &str) -> (u16, Value) {
        self.post_command("C2C.CallbackAfterSendMsg", body).await
    }

    /// POSTs `body` as a signed callback of `command`.
    pub async fn post_command(&self, command: &str, body: &str) -> (u16, Value) {
        let uri = format!("/im/callback?{}", signed_query(command, TOKEN, now()));
        self.call("POST", &uri, body.as_bytes().to_vec()).await
    }

    /// What the spool holds, oldest first.
    pub fn spooled(&self) -> Vec<im_relay::record::Record> {
        let mut out = Vec::new();
        im_relay::spool::each_pending(self.dir.path(), |_, payload| {
            out.push(im_relay::record::Record::decode(payload).expect("a record"));
            true
        })
        .expect("spool readable");
        out
    }
}
