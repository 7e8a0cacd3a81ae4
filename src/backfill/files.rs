//! History: an hour's files from `get_history`, downloaded, checked and parsed.

use std::collections::HashSet;
use std::io::{BufReader, Seek};

use serde::Deserialize;
use serde_json::json;
use time::macros::format_description;
use time::{Duration, OffsetDateTime, UtcOffset};

use super::history::{self, Item};
use super::rest::DownloadError;
use super::{EMPTY_SETTLE, Error, FILES_KEPT, MAX_FILE_BYTES, REFETCHES, Row, Run, beijing_hour};

impl Run<'_> {
    /// One hour's files: listed, downloaded (streamed to a temporary file), checked (sizes,
    /// MD5s before and after gzip), parsed line by line.
    pub(super) async fn hour(&mut self, start: OffsetDateTime) -> Result<Row, Error> {
        let name = beijing_hour(start);
        let mut row = Row {
            name: format!("{name} (UTC+8)"),
            ..Row::default()
        };
        let end = start + Duration::HOUR;
        let now = OffsetDateTime::now_utc();
        if end + FILES_KEPT <= now {
            // Its file is gone: an empty listing must not read as a quiet hour.
            return Err(Error::Other(format!(
                "hour {name} (UTC+8) is older than the 7 days Tencent keeps hourly files \
                 (older messages: --source roam, if the app's edition keeps them longer)"
            )));
        }
        if now < end + self.job.ready_after {
            row.not_ready = true;
            return Ok(row);
        }
        // An hour the window covers whole keeps all its file holds; an edge hour, the window's.
        let whole = self.job.from <= start && end <= self.job.to;
        let window =
            (!whole).then(|| (self.job.from.unix_timestamp(), self.job.to.unix_timestamp()));
        let mut counted = HashSet::new();
        let mut done: HashSet<String> = HashSet::new();
        let mut refetches = 0;
        'list: loop {
            let answer = self
                .rest
                .call(
                    "open_msg_svc",
                    "get_history",
                    &json!({"ChatType": "C2C", "MsgTime": name}),
                )
                .await?;
            // Sizes and checksums are required: without them nothing proves a file whole.
            let files = Listing::deserialize(&answer).map_err(|e| {
                Error::Other(format!(
                    "hour {name}: a file listed without its URL, sizes or MD5s ({e})"
                ))
            })?;
            let files = files.files.unwrap_or_default();
            if files.is_empty() && now < end + EMPTY_SETTLE {
                row.not_ready = true;
                return Ok(row);
            }
            for file in &files {
                // Links change between listings; a file's checksums do not.
                let checksums = format!("{}:{}", file.gzip_md5, file.file_md5).to_ascii_lowercase();
                if done.contains(&checksums) {
                    continue;
                }
                match self.file(file, &name, window, &mut row, &mut counted).await {
                    Ok(()) => {
                        done.insert(checksums);
                    }
                    Err(FileError::Refetch(why)) => {
                        refetches += 1;
                        if refetches > REFETCHES {
                            return Err(Error::Other(format!(
                                "hour {name}: {why}, {REFETCHES} times"
                            )));
                        }
                        tracing::warn!(hour = %name, problem = %why, "fetching the hour's file list again");
                        tokio::time::sleep(std::time::Duration::from_secs(1 << refetches)).await;
                        continue 'list;
                    }
                    Err(FileError::Fatal(e)) => return Err(e),
                }
            }
            break;
        }
        self.sink.flush().await?;
        Ok(row)
    }

    async fn file(
        &mut self,
        file: &Listed,
        hour: &str,
        window: Option<(i64, i64)>,
        row: &mut Row,
        counted: &mut HashSet<u128>,
    ) -> Result<(), FileError> {
        let refetch = |s: &str| FileError::Refetch(s.to_owned());
        let fatal = |s: String| FileError::Fatal(Error::Other(s));
        if file
            .expires
            .is_some_and(|at| at <= OffsetDateTime::now_utc())
        {
            return Err(refetch("its file link has expired"));
        }
        let gzip_size = file.gzip_size;
        if gzip_size > MAX_FILE_BYTES {
            return Err(fatal(format!(
                "hour {hour}: a file of {gzip_size} bytes, above the {MAX_FILE_BYTES} taken"
            )));
        }
        let tmp = match &self.job.temp_dir {
            Some(dir) => tempfile::tempfile_in(dir),
            None => tempfile::tempfile(),
        };
        let mut tmp = tmp.map_err(|e| fatal(format!("a temporary file: {e}")))?;
        let (size, md5) = match self.rest.download(&file.url, &mut tmp, gzip_size).await {
            Ok(got) => got,
            Err(DownloadError::Again(why)) => return Err(FileError::Refetch(why)),
            Err(DownloadError::Failed(e)) => return Err(FileError::Fatal(e)),
        };
        let same = |want: &str, got: &[u8; 16]| want.eq_ignore_ascii_case(&hex::encode(got));
        if size != gzip_size || !same(&file.gzip_md5, &md5) {
            return Err(refetch("a downloaded file's size or MD5 did not match"));
        }
        // Decompressed once to check the file's own size and MD5 (and its layout), then
        // again to parse it, on a blocking thread, a message at a time.
        tmp.rewind().map_err(|e| fatal(e.to_string()))?;
        let gunzip = |file: &std::fs::File| -> std::io::Result<_> {
            Ok(flate2::read::MultiGzDecoder::new(BufReader::new(
                file.try_clone()?,
            )))
        };
        let (plain_size, plain_md5, layout) = gunzip(&tmp)
            .and_then(history::check)
            .map_err(|e| fatal(format!("hour {hour}: the file does not gunzip: {e}")))?;
        if plain_size != file.file_size || !same(&file.file_md5, &plain_md5) {
            return Err(refetch("a file's size or MD5 after gunzip did not match"));
        }
        let layout = layout.map_err(|e| fatal(format!("hour {hour}: {e}")))?;
        tmp.rewind().map_err(|e| fatal(e.to_string()))?;
        let gz = gunzip(&tmp).map_err(|e| fatal(e.to_string()))?;
        let (items, mut next) = tokio::sync::mpsc::channel(64);
        let parser = tokio::task::spawn_blocking(move || {
            history::items(gz, layout, &mut |item| items.blocking_send(item).is_ok())
        });
        while let Some(item) = next.recv().await {
            let handled = match item {
                Item::Message(m) => self.message(&m, row, Some(hour), window, counted).await,
                Item::Unparsable(text) => {
                    self.quarantine(&text, "not a JSON message", Some(hour), row)
                        .await
                }
            };
            handled.map_err(FileError::Fatal)?;
        }
        match parser.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(fatal(format!("hour {hour}: {e}"))),
            Err(e) => Err(fatal(format!("hour {hour}: the parser stopped: {e}"))),
        }
    }
}

/// `get_history`'s answer (https://www.tencentcloud.com/document/product/1047/34885).
#[derive(Deserialize)]
struct Listing {
    /// Absent or `null`: no files.
    #[serde(rename = "File", default)]
    files: Option<Vec<Listed>>,
}

/// One file of a `get_history` listing.
#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "URL")]
    url: String,
    #[serde(rename = "GzipSize")]
    gzip_size: u64,
    #[serde(rename = "GzipMD5")]
    gzip_md5: String,
    #[serde(rename = "FileSize")]
    file_size: u64,
    #[serde(rename = "FileMD5")]
    file_md5: String,
    #[serde(rename = "ExpireTime", default, deserialize_with = "expire_time")]
    expires: Option<OffsetDateTime>,
}

/// `ExpireTime`, when it reads as a time.
fn expire_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
    Ok(Option::<String>::deserialize(d)
        .ok()
        .flatten()
        .and_then(|t| beijing_time(&t)))
}

enum FileError {
    /// Ask for the hour's file list again (fresh links) and retry.
    Refetch(String),
    Fatal(Error),
}

/// `ExpireTime` as Tencent writes it: `2015-12-02 16:45:23`, Beijing time *(unconfirmed)*.
fn beijing_time(text: &str) -> Option<OffsetDateTime> {
    let t = time::PrimitiveDateTime::parse(
        text,
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    )
    .ok()?;
    Some(t.assume_offset(UtcOffset::from_hms(8, 0, 0).ok()?))
}
