//! A fake of Tencent IM's REST API, written from `../shared/spec/tencent-im-rest.md`: it checks
//! every call's query and UserSig, pages `admin_getroammsg` backwards in ~13 KB pages, lists
//! `get_history` files and serves them gzipped with their sizes and MD5s — and misbehaves on
//! request: rate-limit answers, expired file links, a corrupt first download, slow pages.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use md5::{Digest, Md5};
use serde_json::{Value, json};

use crate::common::APP_ID;

pub const ADMIN: &str = "administrator";
pub const SECRET_KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

/// One hourly file as served.
#[derive(Clone)]
pub struct File {
    pub gz: Vec<u8>,
    pub plain_size: usize,
    pub plain_md5: String,
    /// Its first listing gives an expired link (403), the next a good one.
    pub expired_first: bool,
    /// Its first download is corrupt (a flipped byte).
    pub corrupt_first: bool,
}

impl File {
    pub fn new(text: &str) -> File {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(text.as_bytes()).unwrap();
        File {
            gz: z.finish().unwrap(),
            plain_size: text.len(),
            plain_md5: hex::encode(Md5::digest(text.as_bytes())),
            expired_first: false,
            corrupt_first: false,
        }
    }
}

#[derive(Default)]
pub struct FakeState {
    /// Messages in the REST shape (`From_Account`, `To_Account`, `MsgTimeStamp`, …); both
    /// parties' views hold them all.
    pub messages: Vec<Value>,
    /// Beijing hour `YYYYMMDDHH` → its files.
    pub hours: HashMap<String, Vec<File>>,
    /// Every Nth REST call is answered 60007 (too many calls).
    pub rate_limit_every: u64,
    /// Paused before answering each roam page.
    pub page_delay: Duration,
    /// Accounts Tencent no longer knows (deleted): roam answers 90003.
    pub unknown_accounts: std::collections::HashSet<String>,
    pub calls: u64,
    pub bad_signatures: u64,
    pub listings: HashMap<String, u64>,
    pub downloads: HashMap<String, u64>,
}

pub struct FakeTencent {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTencent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = Arc<Mutex<FakeState>>;

impl FakeTencent {
    pub async fn start() -> FakeTencent {
        let state: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .route("/v4/{service}/{command}", post(rest))
            .route("/files/{hour}/{index}", get(download))
            .with_state((state.clone(), url.clone()));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        FakeTencent { url, state, task }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

fn query_of(uri: &Uri) -> HashMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn fail(code: i64, info: &str) -> Value {
    json!({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info})
}

async fn rest(
    State((state, base)): State<(Shared, String)>,
    Path((service, command)): Path<(String, String)>,
    uri: Uri,
    body: String,
) -> axum::Json<Value> {
    let query = query_of(&uri);
    let sig_ok = query.get("sdkappid").map(String::as_str) == Some(&APP_ID.to_string())
        && query.get("identifier").map(String::as_str) == Some(ADMIN)
        && query.get("contenttype").map(String::as_str) == Some("json")
        && query
            .get("random")
            .is_some_and(|r| r.parse::<u32>().is_ok())
        && query.get("usersig").is_some_and(|s| {
            im_relay::backfill::usersig::verify(s, SECRET_KEY, ADMIN, APP_ID, now())
        });
    let delay = {
        let mut s = state.lock().unwrap();
        s.calls += 1;
        if !sig_ok {
            s.bad_signatures += 1;
            return axum::Json(fail(70003, "Failed to parse Sig"));
        }
        if s.rate_limit_every > 0 && s.calls % s.rate_limit_every == 0 {
            return axum::Json(fail(60007, "too many calls"));
        }
        s.page_delay
    };
    let Ok(request) = serde_json::from_str::<Value>(&body) else {
        return axum::Json(fail(90001, "bad json"));
    };
    match (service.as_str(), command.as_str()) {
        ("openim", "admin_getroammsg") => {
            tokio::time::sleep(delay).await;
            axum::Json(roam(&state.lock().unwrap(), &request))
        }
        ("open_msg_svc", "get_history") => {
            axum::Json(history(&mut state.lock().unwrap(), &request, &base))
        }
        _ => axum::Json(fail(90001, "unknown command")),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Backwards in time (then `MsgSeq`), pages of at most `MaxCnt` messages and ~13 KB.
fn roam(s: &FakeState, r: &Value) -> Value {
    let (Some(op), Some(peer)) = (r["Operator_Account"].as_str(), r["Peer_Account"].as_str())
    else {
        return fail(90001, "Operator_Account and Peer_Account are required");
    };
    if s.unknown_accounts.contains(op) || s.unknown_accounts.contains(peer) {
        return fail(90003, "To_Account is not registered");
    }
    let (min, max) = (
        r["MinTime"].as_i64().unwrap_or(0),
        r["MaxTime"].as_i64().unwrap_or(0),
    );
    let max_cnt = r["MaxCnt"].as_u64().unwrap_or(0) as usize;
    if max_cnt == 0 {
        return fail(90001, "MaxCnt is required");
    }
    let mut view: Vec<&Value> = s
        .messages
        .iter()
        .filter(|m| {
            let (f, t) = (m["From_Account"].as_str(), m["To_Account"].as_str());
            let time = m["MsgTimeStamp"].as_i64().unwrap_or(0);
            ((f == Some(op) && t == Some(peer)) || (f == Some(peer) && t == Some(op)))
                && (min..=max).contains(&time)
        })
        .collect();
    view.sort_by_key(|m| std::cmp::Reverse((m["MsgTimeStamp"].as_i64(), m["MsgSeq"].as_i64())));
    if let Some(last) = r["LastMsgKey"].as_str() {
        match view.iter().position(|m| m["MsgKey"] == last) {
            Some(i) => view.drain(..=i),
            None => return fail(90001, "LastMsgKey not found"),
        };
    }
    let mut page = Vec::new();
    let mut bytes = 0;
    for m in &view {
        if page.len() == max_cnt || bytes > 13_000 {
            break;
        }
        bytes += m.to_string().len();
        page.push((*m).clone());
    }
    let complete = page.len() == view.len();
    let last = page.last().cloned().unwrap_or(Value::Null);
    json!({
        "ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "",
        "Complete": i32::from(complete), "MsgCnt": page.len(),
        "LastMsgTime": last["MsgTimeStamp"], "LastMsgKey": last["MsgKey"],
        "MsgList": page,
    })
}

fn history(s: &mut FakeState, r: &Value, base: &str) -> Value {
    if r["ChatType"] != "C2C" {
        return fail(90001, "ChatType");
    }
    let hour = r["MsgTime"].as_str().unwrap_or_default().to_owned();
    let listing = {
        let n = s.listings.entry(hour.clone()).or_default();
        *n += 1;
        *n
    };
    let files: Vec<Value> = s
        .hours
        .get(&hour)
        .map(|files| {
            files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let expired = f.expired_first && listing == 1;
                    json!({
                        "URL": format!("{base}/files/{hour}/{i}?expired={expired}"),
                        "ExpireTime": if expired { "2000-01-01 00:00:00" } else { "2099-01-01 00:00:00" },
                        "FileSize": f.plain_size, "FileMD5": f.plain_md5,
                        "GzipSize": f.gz.len(), "GzipMD5": hex::encode(Md5::digest(&f.gz)),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "File": files})
}

async fn download(
    State((state, _)): State<(Shared, String)>,
    Path((hour, index)): Path<(String, usize)>,
    uri: Uri,
) -> Response {
    let query = query_of(&uri);
    let mut s = state.lock().unwrap();
    let name = format!("{hour}/{index}");
    let n = {
        let n = s.downloads.entry(name).or_default();
        *n += 1;
        *n
    };
    let Some(file) = s.hours.get(&hour).and_then(|f| f.get(index)).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if query.get("expired").map(String::as_str) == Some("true") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut bytes = file.gz.clone();
    if file.corrupt_first && n == 1 {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    bytes.into_response()
}
