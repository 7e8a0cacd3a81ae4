//! Roam: one conversation at a time through `admin_getroammsg`.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::{Error, ROAM_PAGE, Row, Run};
use crate::json::Object;
use crate::normalize::Obj;

impl Run<'_> {
    /// Both parties' views of one conversation over the window (they can differ: cleared
    /// history, deleted messages), newest first, page by page.
    pub(super) async fn roam(
        &mut self,
        a: &str,
        b: &str,
        skip_unknown: bool,
    ) -> Result<Row, Error> {
        let mut row = Row {
            name: format!("{a}:{b}"),
            ..Row::default()
        };
        let mut counted = HashSet::new();
        let window = (self.job.from.unix_timestamp(), self.job.to.unix_timestamp());
        // 90003/90008: an account missing or unknown.
        let unknown: &[i64] = if skip_unknown { &[90003, 90008] } else { &[] };
        for (operator, peer) in [(a, b), (b, a)] {
            let mut request = json!({
                "Operator_Account": operator,
                "Peer_Account": peer,
                "MaxCnt": ROAM_PAGE,
                "MinTime": (self.job.from - self.tencent.recall_lookback).unix_timestamp(),
                "MaxTime": self.job.to.unix_timestamp(),
            });
            let mut last = None;
            loop {
                let Some(page) = self
                    .rest
                    .call_unless("openim", "admin_getroammsg", &request, unknown)
                    .await?
                else {
                    tracing::warn!(pair = %row.name, "an account of a conversation the topic saw is unknown to Tencent: skipped");
                    row.unknown_account = true;
                    return Ok(row);
                };
                let list = page["MsgList"].as_array().cloned().unwrap_or_default();
                for m in &list {
                    if let Value::Object(m) = m {
                        self.message(m, &mut row, None, Some(window), &mut counted)
                            .await?;
                    }
                }
                let what = |problem: &str| {
                    Error::Other(format!("admin_getroammsg for {operator}:{peer}: {problem}"))
                };
                // Without `Complete` the end of the conversation is unknown: never assumed.
                let empty = Map::new();
                let fields = Object::from_map(page.as_object().unwrap_or(&empty));
                match Obj(&fields).i64("Complete") {
                    Ok(Some(0)) if list.is_empty() => {
                        return Err(what("an empty page that says there is more"));
                    }
                    Ok(Some(0)) => {}
                    Ok(Some(_)) => break,
                    _ => return Err(what("an answer without Complete")),
                }
                let next = (page["LastMsgTime"].clone(), page["LastMsgKey"].clone());
                if last.as_ref() == Some(&next) || next.1.as_str().is_none() {
                    return Err(what("paging did not advance"));
                }
                request["MaxTime"] = next.0.clone();
                request["LastMsgKey"] = next.1.clone();
                last = Some(next);
            }
        }
        self.sink.flush().await?;
        Ok(row)
    }
}
