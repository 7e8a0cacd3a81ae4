//! A client for Tencent IM's REST API that behaves: a UserSig made in-process and cached until
//! near its expiry (never logged: it travels in the query, so no error here names the URL), a
//! fresh `random` per call, the documented rate per command, retries with backoff on
//! 60007/60018/91000 and network trouble, a timeout on every call, and errors that say what to
//! fix. Calling convention: https://trtc.io/document/34620; error codes:
//! https://trtc.io/document/34348.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use md5::{Digest, Md5};
use serde_json::Value;
use tokio::time::Instant;

use super::{Error, usersig};
use crate::config::TencentConfig;
use crate::domain::unix_seconds;

/// A UserSig lives a day (Tencent recommends at least that) and is renewed an hour before.
const SIG_LIFETIME: u64 = 86_400;
const SIG_RENEW_BEFORE: u64 = 3_600;
const ATTEMPTS: u32 = 6;
/// An answer larger than this is not one of the documented ones (a roam page is ~13 KB).
const MAX_ANSWER_BYTES: usize = 4 << 20;

pub struct Rest {
    cfg: TencentConfig,
    http: reqwest::Client,
    /// The cached UserSig and when it stops being valid (Unix seconds).
    sig: Mutex<Option<(String, u64)>>,
    /// Per command, the earliest moment of its next call.
    next_slot: Mutex<HashMap<&'static str, Instant>>,
}

/// Why a download failed.
#[derive(Debug)]
pub enum DownloadError {
    /// Worth another try with a fresh link: the link expired, the network or the storage
    /// failed.
    Again(String),
    Failed(Error),
}

/// Calls per second Tencent allows each command (roam: 200/s; hourly files: 10/s, the
/// Chinese page's figure, stricter than older pages' 100/s).
fn rate(command: &str) -> u32 {
    match command {
        "get_history" => 10,
        _ => 200,
    }
}

/// What an error code asks of the operator, when it is not worth retrying.
fn advice(code: i64, cfg: &TencentConfig) -> Option<String> {
    Some(match code {
        60010 | 90009 => format!(
            "`{}` is not an app administrator: set IM_RELAY_TENCENT_ADMIN to one (IM console, \
             administrator accounts)",
            cfg.admin
        ),
        60020 => {
            "the app's plan has expired or does not include this API (IM console, billing)".into()
        }
        60026 => "IM_RELAY_TENCENT_API_URL is not the app's data centre: use the domain of the \
                  region the app was created in"
            .into(),
        70050 => "UserSig checks keep failing and Tencent now rate-limits them: fix \
                  IM_RELAY_TENCENT_SECRET_KEY / IM_RELAY_TENCENT_ADMIN, then wait a minute"
            .into(),
        70000..=70999 => "the UserSig was refused: check IM_RELAY_TENCENT_SECRET_KEY, \
                          IM_RELAY_TENCENT_ADMIN and IM_RELAY_SDK_APP_ID"
            .into(),
        _ => return None,
    })
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(250) * 2u32.pow(attempt.min(5));
    base.min(Duration::from_secs(8)) + Duration::from_millis(rand::random::<u64>() % 100)
}

impl Rest {
    pub fn new(cfg: &TencentConfig) -> Result<Rest, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .build()
            .map_err(|e| {
                Error::Other(format!("cannot make the HTTP client: {}", e.without_url()))
            })?;
        Ok(Rest {
            cfg: cfg.clone(),
            http,
            sig: Mutex::new(None),
            next_slot: Mutex::new(HashMap::new()),
        })
    }

    fn usersig(&self, renew: bool) -> String {
        let now = unix_seconds();
        let mut cached = self.sig.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((sig, until)) if !renew && now + SIG_RENEW_BEFORE < *until => sig.clone(),
            _ => {
                let sig = usersig::make(
                    self.cfg.secret_key.expose(),
                    &self.cfg.admin,
                    self.cfg.sdk_app_id.get(),
                    now,
                    SIG_LIFETIME,
                );
                *cached = Some((sig.clone(), now + SIG_LIFETIME));
                sig
            }
        }
    }

    /// Waits for this command's next slot under its rate.
    async fn pace(&self, command: &'static str) {
        let interval = Duration::from_secs(1) / rate(command);
        let at = {
            let mut slots = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = slots.entry(command).or_insert(now);
            let at = (*slot).max(now);
            *slot = at + interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// One REST call; `Ok` holds the answer of a call Tencent reports done (`ErrorCode` 0).
    pub async fn call(
        &self,
        service: &str,
        command: &'static str,
        body: &Value,
    ) -> Result<Value, Error> {
        let answer = self.call_unless(service, command, body, &[]).await?;
        Ok(answer.expect("no code is accepted"))
    }

    /// A call where Tencent answering one of `accepted` is an answer (`None`), not an error.
    pub async fn call_unless(
        &self,
        service: &str,
        command: &'static str,
        body: &Value,
        accepted: &[i64],
    ) -> Result<Option<Value>, Error> {
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            self.pace(command).await;
            let url = format!(
                "{}/v4/{service}/{command}?sdkappid={}&identifier={}&usersig={}&random={}&contenttype=json",
                self.cfg.api_url,
                self.cfg.sdk_app_id,
                form_urlencoded::byte_serialize(self.cfg.admin.as_bytes()).collect::<String>(),
                self.usersig(false),
                rand::random::<u32>(),
            );
            let retry = match self.post(&url, body).await {
                Ok(answer) => {
                    let code = answer["ErrorCode"].as_i64().unwrap_or(-1);
                    let info = answer["ErrorInfo"].as_str().unwrap_or("").to_owned();
                    match code {
                        0 => return Ok(Some(answer)),
                        code if accepted.contains(&code) => return Ok(None),
                        // Too many calls; Tencent's internal error.
                        60007 | 60018 | 91000 => format!("error {code}: {info}"),
                        // Expired: a new UserSig, once.
                        70001 if !renewed => {
                            renewed = true;
                            self.usersig(true);
                            continue;
                        }
                        _ => {
                            let fix = advice(code, &self.cfg)
                                .map(|a| format!(" — {a}"))
                                .unwrap_or_default();
                            return Err(Error::Other(format!(
                                "{command}: Tencent answered error {code} ({info}){fix}"
                            )));
                        }
                    }
                }
                Err(trouble) => trouble,
            };
            attempt += 1;
            if attempt >= ATTEMPTS {
                return Err(Error::Other(format!(
                    "{command}: gave up after {ATTEMPTS} attempts: {retry}"
                )));
            }
            tracing::warn!(command, attempt, problem = %retry, "Tencent REST call retried");
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// The answer's JSON, or why the call should be tried again.
    async fn post(&self, url: &str, body: &Value) -> Result<Value, String> {
        let sent = self
            .http
            .post(url)
            .timeout(self.cfg.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let mut response = sent.map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("answer is not JSON: {e}"))
    }

    /// Streams `url` into `to` (at most `max` bytes), returning its size and MD5. The URL is
    /// a signed link to Tencent's storage: never in an error either. The whole download has a
    /// deadline: the call timeout plus a second per 256 KiB announced.
    pub async fn download(
        &self,
        url: &str,
        to: &mut std::fs::File,
        max: u64,
    ) -> Result<(u64, [u8; 16]), DownloadError> {
        let failed =
            |e: String| DownloadError::Failed(Error::Other(format!("downloading a file: {e}")));
        let again = |e: String| DownloadError::Again(format!("downloading a file: {e}"));
        let deadline = self.cfg.timeout + Duration::from_secs(max / (256 << 10));
        let mut response = self
            .http
            .get(url)
            .timeout(deadline)
            .send()
            .await
            .map_err(|e| again(e.without_url().to_string()))?;
        let status = response.status();
        if matches!(status.as_u16(), 403 | 404 | 410) {
            return Err(DownloadError::Again("its file link has expired".into()));
        }
        if !status.is_success() {
            return Err(again(format!("HTTP {status}")));
        }
        let (mut size, mut md5) = (0u64, Md5::new());
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| again(e.without_url().to_string()))?
        {
            size += chunk.len() as u64;
            if size > max {
                return Err(failed(format!("larger than the {max} bytes announced")));
            }
            md5.update(&chunk);
            to.write_all(&chunk).map_err(|e| failed(e.to_string()))?;
        }
        Ok((size, md5.finalize().into()))
    }
}
