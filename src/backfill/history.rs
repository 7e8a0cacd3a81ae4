//! Tencent's hourly message files, read tolerantly. There is no official schema *(unconfirmed)*:
//! the sample is a `{"MsgList":[ … ]}` object with one message per line. Each line is taken as
//! a message, a whole object with `MsgList`, or structure (`{"MsgList":[`, `]}`); anything else
//! is handed back as unparsable, for the quarantine topic. Bounded memory: one line at a time.

use std::io::BufRead;

use serde_json::{Map, Value};

/// A line longer than this is not a message: the file is refused.
pub const MAX_LINE_BYTES: usize = 64 << 20;

#[derive(Debug, PartialEq)]
pub enum Item {
    Message(Map<String, Value>),
    Unparsable(String),
}

fn is_structure(line: &str) -> bool {
    line.chars()
        .all(|c| matches!(c, '[' | ']' | '{' | '}' | ','))
        || (line.ends_with('[') && line.contains("MsgList"))
}

/// One line's items (none for structure).
fn line_items(line: &str, out: &mut impl FnMut(Item)) {
    let trimmed = line.trim().trim_end_matches(',');
    if trimmed.is_empty() || is_structure(trimmed) {
        return;
    }
    // The last message may carry the document's closing brackets on its line.
    let candidates = [
        trimmed,
        trimmed.trim_end_matches(['}', ']']).trim_end_matches(','),
    ];
    for (i, text) in candidates.iter().enumerate() {
        let text = if i == 1 {
            format!("{text}}}")
        } else {
            (*text).to_owned()
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut o)) => match o.remove("MsgList") {
                Some(Value::Array(list)) => {
                    for m in list {
                        match m {
                            Value::Object(m) => out(Item::Message(m)),
                            other => out(Item::Unparsable(other.to_string())),
                        }
                    }
                    return;
                }
                Some(other) => {
                    o.insert("MsgList".into(), other);
                    out(Item::Unparsable(Value::Object(o).to_string()));
                    return;
                }
                None => {
                    out(Item::Message(o));
                    return;
                }
            },
            _ => continue,
        }
    }
    out(Item::Unparsable(trimmed.to_owned()));
}

/// A decompressed file's items, a batch at a time (bounded memory, whatever the file's size).
pub struct Reader<R> {
    reader: R,
    line: Vec<u8>,
}

impl<R: BufRead> Reader<R> {
    pub fn new(reader: R) -> Self {
        Reader {
            reader,
            line: Vec::new(),
        }
    }

    /// Appends the items of up to `lines` more lines to `out`; `false` at the end of the file.
    pub fn next_batch(&mut self, out: &mut Vec<Item>, lines: usize) -> std::io::Result<bool> {
        let mut push = |i| out.push(i);
        for _ in 0..lines {
            self.line.clear();
            let n = std::io::Read::take(&mut self.reader, MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut self.line)?;
            if n == 0 {
                return Ok(false);
            }
            if self.line.len() > MAX_LINE_BYTES {
                return Err(std::io::Error::other(format!(
                    "a line longer than {MAX_LINE_BYTES} bytes"
                )));
            }
            match std::str::from_utf8(&self.line) {
                Ok(text) => line_items(text, &mut push),
                Err(_) => push(Item::Unparsable(
                    String::from_utf8_lossy(&self.line).into_owned(),
                )),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Item> {
        let mut got = Vec::new();
        let mut reader = Reader::new(text.as_bytes());
        while reader.next_batch(&mut got, 1).unwrap() {}
        got
    }

    fn keys(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Item::Message(m) => m["MsgKey"].as_str().unwrap_or("?").to_owned(),
                Item::Unparsable(t) => format!("bad:{t}"),
            })
            .collect()
    }

    #[test]
    fn one_message_per_line_inside_the_object() {
        let text = "{\"MsgList\":[\n{\"MsgKey\":\"a\"},\n{\"MsgKey\":\"b\"}\n]}\n";
        assert_eq!(keys(&parse(text)), ["a", "b"]);
        let closing_on_last = "{\"MsgList\": [\n  {\"MsgKey\":\"a\"},\n  {\"MsgKey\":\"b\"}]}";
        assert_eq!(keys(&parse(closing_on_last)), ["a", "b"]);
    }

    #[test]
    fn the_object_on_one_line_and_bare_lines() {
        assert_eq!(
            keys(&parse(
                "{\"MsgList\":[{\"MsgKey\":\"a\"},{\"MsgKey\":\"b\"}]}"
            )),
            ["a", "b"]
        );
        assert_eq!(
            keys(&parse("{\"MsgKey\":\"a\"}\n{\"MsgKey\":\"b\"}\n")),
            ["a", "b"]
        );
    }

    #[test]
    fn what_does_not_parse_is_handed_back() {
        let text = "{\"MsgList\":[\n{\"MsgKey\":\"a\"},\n{\"MsgKey\":\"b\" oops\n42,\n]}\n";
        assert_eq!(
            keys(&parse(text)),
            ["a", "bad:{\"MsgKey\":\"b\" oops", "bad:42"]
        );
    }
}
