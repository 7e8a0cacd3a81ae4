//! Roam: conversation by conversation through `admin_getroammsg`
//! (https://www.tencentcloud.com/document/product/1047/35478). Conversations are fetched
//! several at a time — throughput is then set by Tencent's rate (200 calls/s, which `Rest`
//! keeps), not by one call's round trip — and handled in order.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

use super::rest::Rest;
use super::{Error, ROAM_PAGE, Row, Run};

/// Conversations fetched at once. Each holds its messages of the window and the recall
/// look-back until its turn.
const AHEAD: usize = 8;

/// One page of the answer, read leniently: `Complete` and `LastMsgTime` may come as numeric
/// strings (as the relay reads callbacks), a `MsgList` that is not an array holds nothing,
/// and `LastMsgKey` matters only when there is a next page.
#[derive(Deserialize)]
struct Page {
    #[serde(rename = "MsgList", default)]
    list: Option<Value>,
    #[serde(rename = "Complete", default, deserialize_with = "lenient")]
    complete: Option<i64>,
    #[serde(rename = "LastMsgTime", default, deserialize_with = "lenient")]
    last_time: Option<i64>,
    #[serde(rename = "LastMsgKey", default)]
    last_key: Option<Value>,
}

/// An integer, or a string holding one; anything else is `None`.
fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// A conversation to read: its accounts, and whether an unknown account skips it (a pair the
/// topic saw) rather than failing the run (a pair named).
type Pair = (String, String, bool);

/// A conversation's messages, and whether an account was unknown (the views read before it
/// still count).
type Fetched = (Vec<Map<String, Value>>, bool);

/// Both parties' views of one conversation from `min_time` to `max_time` (they can differ:
/// cleared history, deleted messages), newest first, page by page; what was read until an
/// account turned out unknown, with `skip_unknown`.
async fn conversation(
    rest: Arc<Rest>,
    (a, b, skip_unknown): Pair,
    (min_time, max_time): (i64, i64),
) -> Result<Fetched, Error> {
    // 90003/90008: an account missing or unknown.
    let unknown: &[i64] = if skip_unknown { &[90003, 90008] } else { &[] };
    let mut messages = Vec::new();
    for (operator, peer) in [(&a, &b), (&b, &a)] {
        let what = |problem: &str| {
            Error::Other(format!("admin_getroammsg for {operator}:{peer}: {problem}"))
        };
        let mut request = json!({
            "Operator_Account": operator,
            "Peer_Account": peer,
            "MaxCnt": ROAM_PAGE,
            "MinTime": min_time,
            "MaxTime": max_time,
        });
        let mut last = None;
        loop {
            let Some(answer) = rest
                .call_unless("openim", "admin_getroammsg", &request, unknown)
                .await?
            else {
                return Ok((messages, true));
            };
            let page = Page::deserialize(&answer).map_err(|e| what(&e.to_string()))?;
            let list = match page.list {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            };
            let empty = list.is_empty();
            messages.extend(list.into_iter().filter_map(|m| match m {
                Value::Object(m) => Some(m),
                _ => None,
            }));
            // Without `Complete` the end of the conversation is unknown: never assumed.
            match page.complete {
                Some(0) if empty => return Err(what("an empty page that says there is more")),
                Some(0) => {}
                Some(_) => break,
                None => return Err(what("an answer without Complete")),
            }
            let key = page
                .last_key
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned);
            let (Some(time), Some(key)) = (page.last_time, key) else {
                return Err(what("paging did not advance"));
            };
            if last.as_ref() == Some(&(time, key.clone())) {
                return Err(what("paging did not advance"));
            }
            request["MaxTime"] = time.into();
            request["LastMsgKey"] = key.clone().into();
            last = Some((time, key));
        }
    }
    Ok((messages, false))
}

/// The fetches under way; dropped, they stop.
struct Ahead(VecDeque<(Pair, JoinHandle<Result<Fetched, Error>>)>);

impl Drop for Ahead {
    fn drop(&mut self) {
        for (_, fetch) in &self.0 {
            fetch.abort();
        }
    }
}

impl Run<'_> {
    /// Every conversation of `pairs`, a row each, in order.
    pub(super) async fn roam(
        &mut self,
        pairs: Vec<Pair>,
        mut each: impl FnMut(usize, usize, Row),
    ) -> Result<(), Error> {
        let times = (
            (self.job.from - self.tencent.recall_lookback).unix_timestamp(),
            self.job.to.unix_timestamp(),
        );
        let total = pairs.len();
        let mut waiting = pairs.into_iter();
        let mut ahead = Ahead(VecDeque::new());
        for done in 1..=total {
            while ahead.0.len() < AHEAD
                && let Some(pair) = waiting.next()
            {
                let fetch = tokio::spawn(conversation(self.rest.clone(), pair.clone(), times));
                ahead.0.push_back((pair, fetch));
            }
            let Some(((a, b, _), fetch)) = ahead.0.pop_front() else {
                break;
            };
            let fetched = fetch
                .await
                .map_err(|e| Error::Other(format!("reading {a}:{b}: {e}")))??;
            let row = self.conversation_row(&a, &b, fetched).await?;
            each(done, total, row);
        }
        Ok(())
    }

    /// One conversation's messages counted and what is missing published.
    async fn conversation_row(&mut self, a: &str, b: &str, fetched: Fetched) -> Result<Row, Error> {
        let mut row = Row {
            name: format!("{a}:{b}"),
            ..Row::default()
        };
        let (messages, unknown) = fetched;
        if unknown {
            tracing::warn!(pair = %row.name, "an account of a conversation the topic saw is unknown to Tencent: skipped");
            row.unknown_account = true;
        }
        let window = (self.job.from.unix_timestamp(), self.job.to.unix_timestamp());
        let mut counted = HashSet::new();
        for m in &messages {
            self.message(m, &mut row, None, Some(window), &mut counted)
                .await?;
        }
        self.sink.flush().await?;
        Ok(row)
    }
}
