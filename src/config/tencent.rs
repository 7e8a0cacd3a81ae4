//! Settings for Tencent's REST API — `im-relay backfill`'s and `im-relay reconcile`'s.
//! The secret key signs every UserSig: env, `_FILE` or config file only, never a flag.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ArgMatches;

use super::settings::{Group, key, load_raw};
use super::{ConfigErrors, KafkaConfig, Parser, Secret};
use crate::domain::SdkAppId;

#[derive(Debug, Clone)]
pub struct TencentConfig {
    pub sdk_app_id: SdkAppId,
    /// `https://adminapisgp.im.qcloud.com`, or any base URL (tests use a local fake).
    pub api_url: String,
    pub admin: String,
    pub secret_key: Secret,
    pub timeout: Duration,
    /// Senders and platforms (`MsgFromPlatform`) whose messages Tencent sends no callback for.
    pub no_callback_senders: BTreeSet<String>,
    pub no_callback_platforms: BTreeSet<String>,
    /// How far before the window roam reads, for recalls.
    pub recall_lookback: Duration,
}

impl TencentConfig {
    /// Whether Tencent sends no callback for this REST message (a sender or platform named
    /// in `no_callback_*`).
    pub fn quiet(&self, message: &serde_json::Map<String, serde_json::Value>) -> bool {
        let named = |field: &str, names: &BTreeSet<String>| {
            message
                .get(field)
                .and_then(|v| v.as_str())
                .is_some_and(|v| names.contains(v))
        };
        named("From_Account", &self.no_callback_senders)
            || named("MsgFromPlatform", &self.no_callback_platforms)
    }
}

/// `im-relay reconcile`'s settings: backfill's, and its own place to run.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    pub tencent: TencentConfig,
    pub kafka: KafkaConfig,
    pub admin_listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Downloads go here; `None`: the system's temporary directory.
    pub temp_dir: Option<PathBuf>,
    /// How long after an hour ends it is reconciled.
    pub delay: Duration,
    /// The relays' admin addresses (`host:port`), asked about their spools.
    pub relays: Vec<String>,
    pub allow_lost: bool,
}

impl ReconcileConfig {
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ReconcileConfig, ConfigErrors> {
        let (values, options, errors) = load_raw(
            flags,
            env,
            &[Group::App, Group::Tencent, Group::Kafka, Group::Reconcile],
        );
        let mut p = Parser { values, errors };
        let BackfillConfig { tencent, kafka } = p.backfill(options);
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let admin_listen = p.parse(key::RECONCILE_ADMIN_LISTEN, "an address (host:port)", any);
        let state_dir = PathBuf::from(p.opt(key::RECONCILE_STATE_DIR).unwrap_or("").trim());
        if state_dir.as_os_str().is_empty() {
            p.fail(key::RECONCILE_STATE_DIR, "must be set");
        }
        let temp_dir = p
            .opt(key::RECONCILE_TEMP_DIR)
            .map(|d| PathBuf::from(d.trim()));
        let delay = p.millis(key::RECONCILE_DELAY_MS);
        let relays = p.list(key::RECONCILE_RELAYS);
        for relay in &relays {
            let port = relay.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if !matches!(port, Some(Ok(_))) {
                p.fail(
                    key::RECONCILE_RELAYS,
                    format_args!("`{relay}` is not host:port (the relay's admin_listen port)"),
                );
            }
        }
        let allow_lost = p.parse(key::RECONCILE_ALLOW_MISSING_RECORDS, "true or false", false);
        let config = ReconcileConfig {
            tencent,
            kafka,
            admin_listen,
            state_dir,
            temp_dir,
            delay,
            relays,
            allow_lost,
        };
        p.finish(config)
    }
}

/// `im-relay backfill`'s settings: one app, its REST API, Kafka.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    pub tencent: TencentConfig,
    pub kafka: KafkaConfig,
}

impl BackfillConfig {
    pub fn load(
        flags: Option<&ArgMatches>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<BackfillConfig, ConfigErrors> {
        let (values, options, errors) =
            load_raw(flags, env, &[Group::App, Group::Tencent, Group::Kafka]);
        let mut p = Parser { values, errors };
        let config = p.backfill(options);
        p.finish(config)
    }
}

impl Parser {
    /// One app, its REST API, Kafka.
    fn backfill(&mut self, options: std::collections::BTreeMap<String, String>) -> BackfillConfig {
        let ids = self.sdk_app_ids();
        if ids.len() > 1 {
            self.fail(key::SDK_APP_ID, "reads one app: name exactly one id");
        }
        let tencent = self.tencent(ids.first().copied().unwrap_or(SdkAppId::from(0)));
        let kafka = self.kafka(options);
        BackfillConfig {
            tencent: tencent.unwrap_or_else(|| TencentConfig {
                sdk_app_id: SdkAppId::from(0),
                api_url: String::new(),
                admin: String::new(),
                secret_key: Secret::new(""),
                timeout: Duration::ZERO,
                no_callback_senders: BTreeSet::new(),
                no_callback_platforms: BTreeSet::new(),
                recall_lookback: Duration::ZERO,
            }),
            kafka,
        }
    }

    /// The REST API's settings; `None` (with the problems recorded) when any is missing.
    pub(super) fn tencent(&mut self, sdk_app_id: SdkAppId) -> Option<TencentConfig> {
        let api_url = self
            .opt(key::TENCENT_API_URL)
            .unwrap_or("")
            .trim_end_matches('/')
            .to_owned();
        // The UserSig travels in the query: plain http only to this machine (tests, a local
        // proxy that adds TLS).
        let loopback = |u: &reqwest::Url| {
            let host = u.host_str().unwrap_or("").trim_matches(['[', ']']);
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        };
        match reqwest::Url::parse(&api_url) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
            Ok(u) if u.scheme() == "http" && loopback(&u) => {}
            Ok(u) if u.scheme() == "http" => self.fail(
                key::TENCENT_API_URL,
                "must be https (the UserSig travels in the query); plain http only to localhost",
            ),
            _ => self.fail(
                key::TENCENT_API_URL,
                "must be the REST API's base URL for the app's region, e.g. \
                 https://adminapisgp.im.qcloud.com",
            ),
        }
        let admin = self.opt(key::TENCENT_ADMIN).unwrap_or("").trim().to_owned();
        if admin.is_empty() {
            self.fail(key::TENCENT_ADMIN, "must be set");
        }
        let secret_key = self.secret(key::TENCENT_SECRET_KEY);
        if secret_key.is_none() {
            self.fail(
                key::TENCENT_SECRET_KEY,
                "must be set (the app's key from the IM console; env or _FILE, never a flag)",
            );
        }
        let timeout = self.millis(key::TENCENT_TIMEOUT_MS);
        if timeout.is_zero() {
            self.fail(key::TENCENT_TIMEOUT_MS, "must be above 0");
        }
        let recall_lookback = self.millis(key::ROAM_RECALL_LOOKBACK_MS);
        Some(TencentConfig {
            sdk_app_id,
            api_url,
            admin,
            secret_key: secret_key?,
            timeout,
            no_callback_senders: self.list(key::NO_CALLBACK_SENDERS).into_iter().collect(),
            no_callback_platforms: self.list(key::NO_CALLBACK_PLATFORMS).into_iter().collect(),
            recall_lookback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(pairs: &[(&str, &str)]) -> Result<BackfillConfig, ConfigErrors> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BackfillConfig::load(None, &|k| env.get(k).cloned())
    }

    #[test]
    fn backfill_needs_one_app_its_api_and_a_secret_key_but_no_token() {
        let err = load(&[("IM_RELAY_SDK_APP_ID", "1,2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one id"), "{err}");
        assert!(err.contains("IM_RELAY_TENCENT_API_URL"), "{err}");
        assert!(err.contains("IM_RELAY_TENCENT_SECRET_KEY"), "{err}");
        assert!(!err.contains("IM_RELAY_TOKEN"), "{err}");
        let c = load(&[
            ("IM_RELAY_SDK_APP_ID", "1400000000"),
            (
                "IM_RELAY_TENCENT_API_URL",
                "https://adminapisgp.im.qcloud.com/",
            ),
            ("IM_RELAY_TENCENT_SECRET_KEY", "s3cr3t-key"),
        ])
        .unwrap();
        assert_eq!(c.tencent.api_url, "https://adminapisgp.im.qcloud.com");
        let with_url = |url| {
            load(&[
                ("IM_RELAY_SDK_APP_ID", "1400000000"),
                ("IM_RELAY_TENCENT_API_URL", url),
                ("IM_RELAY_TENCENT_SECRET_KEY", "s3cr3t-key"),
            ])
        };
        assert!(with_url("http://127.0.0.1:8080").is_ok());
        assert!(with_url("http://localhost:8080").is_ok());
        let err = with_url("http://adminapisgp.im.qcloud.com")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be https"), "{err}");
        assert_eq!(c.tencent.admin, "administrator");
        assert_eq!(c.tencent.sdk_app_id, SdkAppId::from(1400000000));
        assert!(!format!("{c:?}").contains("s3cr3t-key"));
    }

    #[test]
    fn messages_tencent_sends_no_callback_for_are_told_by_sender_or_platform() {
        let c = load(&[
            ("IM_RELAY_SDK_APP_ID", "1400000000"),
            (
                "IM_RELAY_TENCENT_API_URL",
                "https://adminapisgp.im.qcloud.com",
            ),
            ("IM_RELAY_TENCENT_SECRET_KEY", "s3cr3t-key"),
            ("IM_RELAY_NO_CALLBACK_SENDERS", " bot , admin,"),
            ("IM_RELAY_NO_CALLBACK_PLATFORMS", "RESTAPI"),
        ])
        .unwrap();
        let message = |v: serde_json::Value| v.as_object().unwrap().clone();
        let quiet = |v| c.tencent.quiet(&message(v));
        assert!(quiet(serde_json::json!({"From_Account": "bot"})));
        assert!(quiet(
            serde_json::json!({"From_Account": "u", "MsgFromPlatform": "RESTAPI"})
        ));
        assert!(!quiet(
            serde_json::json!({"From_Account": "u", "MsgFromPlatform": "iOS"})
        ));
        assert!(!quiet(serde_json::json!({"From_Account": "bott"})));
    }

    #[test]
    fn the_secret_key_is_never_a_flag() {
        let cmd = super::super::backfill_command();
        assert!(
            cmd.get_arguments()
                .all(|a| a.get_id().as_str() != key::TENCENT_SECRET_KEY)
        );
    }
}
