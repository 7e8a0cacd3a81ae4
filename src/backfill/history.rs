//! Tencent's hourly message files, read without depending on their layout. There is no
//! official schema *(unconfirmed)*: the sample is a `{"MsgList":[ … ]}` object, one message a
//! line. A file is read twice after download: `check` hashes it (size, MD5) and, in the same
//! pass, tells whether it is JSON as a whole — a sequence of objects, each a message or a
//! `MsgList` array of them, whatever its indentation or line breaks; `items` then hands out its
//! messages one at a time, streamed, so memory is one message whatever the file's size or the
//! length of its lines. A file that is not JSON as a whole is read line by line instead: each
//! line a message, a whole object, or structure, and anything else handed back as unparsable,
//! for the quarantine topic.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use md5::{Digest, Md5};
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess};
use serde_json::{Map, Value};

/// A message (or line) longer than this is not one: the file is refused.
pub const MAX_MESSAGE_BYTES: u64 = 64 << 20;

#[derive(Debug, PartialEq)]
pub enum Item {
    Message(Map<String, Value>),
    Unparsable(String),
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// JSON as a whole: parsed as JSON, however laid out.
    Json,
    /// Not JSON as a whole: a message per line, what does not parse quarantined.
    Lines,
}

/// Fields a message has (any one of them): a top-level object with none of them and no
/// `MsgList` is a document of a shape not known here.
const MESSAGE_FIELDS: &[&str] = &["MsgKey", "From_Account", "MsgBody", "MsgSeq"];

/// Skips a UTF-8 byte order mark (serde_json refuses one).
fn skip_bom(reader: &mut impl BufRead) -> io::Result<()> {
    if reader.fill_buf()?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(())
}

/// What a decompressed file is: its size, its MD5, and how to read it. One pass. JSON of a
/// shape not known here (a wrapper around `MsgList`, say) is an error: read by lines, its
/// messages would be quarantined and the hour taken as done.
pub fn check(file: impl Read) -> io::Result<(u64, [u8; 16], Result<Layout, String>)> {
    let mut hashing = BufReader::new(Hashing {
        inner: file,
        md5: Md5::new(),
        size: 0,
    });
    skip_bom(&mut hashing)?;
    let layout = {
        let mut de = serde_json::Deserializer::from_reader(&mut hashing);
        let mut layout = Ok(Layout::Json);
        while layout == Ok(Layout::Json) && de.end().is_err() {
            if let Err(e) = de.deserialize_any(Shape) {
                layout = match e.classify() {
                    serde_json::error::Category::Data => {
                        Err(format!("an hourly file of a shape not known here: {e}"))
                    }
                    _ => Ok(Layout::Lines),
                };
            }
        }
        layout
    };
    // The rest (after a parse error) is hashed too; a read error is the file's, not JSON's.
    io::copy(&mut hashing, &mut io::sink())?;
    let Hashing { md5, size, .. } = hashing.into_inner();
    Ok((size, md5.finalize().into(), layout))
}

/// Hands each item of the file to `emit`, in order; `emit` answers `false` to stop.
pub fn items(
    file: impl Read,
    layout: Layout,
    emit: &mut dyn FnMut(Item) -> bool,
) -> io::Result<()> {
    match layout {
        // Each line is bounded by itself.
        Layout::Lines => {
            let mut reader = BufReader::new(file);
            skip_bom(&mut reader)?;
            lines(reader, emit)
        }
        Layout::Json => {
            let (read, start) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
            let mut reader = BufReader::new(Counted {
                inner: file,
                read: read.clone(),
                start: start.clone(),
            });
            skip_bom(&mut reader)?;
            let mut de = serde_json::Deserializer::from_reader(&mut reader);
            let mut stopped = false;
            let mut emit = Emit {
                emit,
                read: &read,
                start: &start,
                stopped: &mut stopped,
            };
            while de.end().is_err() {
                if let Err(e) = de.deserialize_any(Top(&mut emit)) {
                    if stopped {
                        return Ok(());
                    }
                    return Err(match e.io_error_kind() {
                        Some(_) => io::Error::other(e.to_string()),
                        None => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                    });
                }
            }
            Ok(())
        }
    }
}

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    md5: Md5,
    size: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Refuses to read more than `MAX_MESSAGE_BYTES` past `start` (set at each message's
/// beginning, give or take a buffer): one message's memory is bounded.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
    start: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read.get() - self.start.get() > MAX_MESSAGE_BYTES {
            return Err(io::Error::other(format!(
                "a message longer than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// The first pass: objects at the top, and `MsgList`, where there is one, an array.
struct Shape;

impl<'de> de::Visitor<'de> for Shape {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message or an object with MsgList")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut known = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "MsgList" {
                map.next_value_seed(ListShape)?;
                known = true;
            } else {
                known |= MESSAGE_FIELDS.contains(&key.as_str());
                map.next_value::<IgnoredAny>()?;
            }
        }
        if known {
            Ok(())
        } else {
            Err(de::Error::custom(
                "an object that is neither a message nor has MsgList",
            ))
        }
    }

    /// An array of messages at the top.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(m) = seq.next_element::<Value>()? {
            if !matches!(&m, Value::Object(o) if is_message(o)) {
                return Err(de::Error::custom(
                    "an array of something other than messages",
                ));
            }
        }
        Ok(())
    }
}

/// A message, not a document around messages.
fn is_message(o: &Map<String, Value>) -> bool {
    !o.contains_key("MsgList") && MESSAGE_FIELDS.iter().any(|f| o.contains_key(*f))
}

struct ListShape;

impl<'de> DeserializeSeed<'de> for ListShape {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> de::Visitor<'de> for ListShape {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    /// Never a document of its own inside (its messages would be quarantined as one); an
    /// element that is not a message is quarantined when read, as the relay would.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(m) = seq.next_element::<Value>()? {
            if matches!(&m, Value::Object(o) if o.contains_key("MsgList")) {
                return Err(de::Error::custom("a MsgList element that is not a message"));
            }
        }
        Ok(())
    }
}

/// The second pass's output, and where the message being read began.
struct Emit<'a> {
    emit: &'a mut dyn FnMut(Item) -> bool,
    read: &'a Cell<u64>,
    start: &'a Cell<u64>,
    stopped: &'a mut bool,
}

impl Emit<'_> {
    /// Hands `item` on; the next message's bound starts here.
    fn send<E: de::Error>(&mut self, item: Item) -> Result<(), E> {
        self.start.set(self.read.get());
        if (self.emit)(item) {
            Ok(())
        } else {
            *self.stopped = true;
            Err(E::custom("stopped"))
        }
    }
}

/// A top-level object: a message, or `MsgList` (its elements streamed one by one).
struct Top<'a, 'b>(&'a mut Emit<'b>);

impl<'de> de::Visitor<'de> for Top<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message or an object with MsgList")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut fields = Map::new();
        let mut listed = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "MsgList" {
                map.next_value_seed(List(&mut *self.0))?;
                listed = true;
            } else {
                fields.insert(key, map.next_value()?);
            }
        }
        // Beside `MsgList`, the document's own fields, not a message.
        if !listed {
            self.0.send(Item::Message(fields))?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        List(self.0).visit_seq(seq)
    }
}

struct List<'a, 'b>(&'a mut Emit<'b>);

impl<'de> DeserializeSeed<'de> for List<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> de::Visitor<'de> for List<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(m) = seq.next_element::<Value>()? {
            self.0.send(match m {
                Value::Object(m) => Item::Message(m),
                other => Item::Unparsable(other.to_string()),
            })?;
        }
        Ok(())
    }
}

fn lines(mut reader: impl BufRead, emit: &mut dyn FnMut(Item) -> bool) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_MESSAGE_BYTES + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() as u64 > MAX_MESSAGE_BYTES {
            return Err(io::Error::other(format!(
                "a line longer than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let mut go = true;
        match std::str::from_utf8(&line) {
            Ok(text) => line_items(text, &mut |i| go = go && emit(i)),
            Err(_) => {
                go = emit(Item::Unparsable(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
        }
        if !go {
            return Ok(());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Layout, Vec<Item>) {
        let (size, md5, layout) = check(text.as_bytes()).unwrap();
        let layout = layout.unwrap();
        assert_eq!(size, text.len() as u64);
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(text.as_bytes())));
        let mut got = Vec::new();
        items(text.as_bytes(), layout, &mut |i| {
            got.push(i);
            true
        })
        .unwrap();
        (layout, got)
    }

    fn keys(text: &str) -> Vec<String> {
        parse(text)
            .1
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
        assert_eq!(keys(text), ["a", "b"]);
        let closing_on_last = "{\"MsgList\": [\n  {\"MsgKey\":\"a\"},\n  {\"MsgKey\":\"b\"}]}";
        assert_eq!(keys(closing_on_last), ["a", "b"]);
    }

    #[test]
    fn the_object_on_one_line_and_bare_lines() {
        assert_eq!(
            keys("{\"MsgList\":[{\"MsgKey\":\"a\"},{\"MsgKey\":\"b\"}]}"),
            ["a", "b"]
        );
        assert_eq!(keys("{\"MsgKey\":\"a\"}\n{\"MsgKey\":\"b\"}\n"), ["a", "b"]);
    }

    /// The layouts a line reader got wrong: an indented file (2 of its 3 messages missed, its
    /// lines quarantined), a message sharing the opening line (missed), a message ending in
    /// a nested object with `]}` on its line (quarantined).
    #[test]
    fn the_layout_does_not_matter() {
        let list = json_list(&["a", "b", "c"]);
        let doc = serde_json::json!({ "MsgList": list, "ErrorCode": 0 });
        let indented = serde_json::to_string_pretty(&doc).unwrap();
        assert_eq!(parse(&indented).0, Layout::Json);
        assert_eq!(keys(&indented), ["a", "b", "c"], "{indented}");
        let sharing = "{\"MsgList\":[{\"MsgKey\":\"a\"},\n{\"MsgKey\":\"b\"}\n]}";
        assert_eq!(keys(sharing), ["a", "b"]);
        let nested = "{\"MsgList\":[\n{\"MsgKey\":\"a\"},\n{\"MsgKey\":\"b\",\"MsgBody\":[{\"MsgContent\":{\"Data\":\"x\"}}]}]}";
        assert_eq!(keys(nested), ["a", "b"]);
        let compact = doc.to_string();
        assert_eq!(keys(&compact), ["a", "b", "c"]);
        // A number in MsgList is not a message; the rest are.
        assert_eq!(
            keys("{\"MsgList\":[{\"MsgKey\":\"a\"}, 42]}"),
            ["a", "bad:42"]
        );
    }

    fn json_list(keys: &[&str]) -> Value {
        keys.iter()
            .map(|k| serde_json::json!({"MsgKey": k, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "]}"}}]}))
            .collect()
    }

    #[test]
    fn a_file_that_is_not_json_as_a_whole_is_read_line_by_line() {
        let text = "{\"MsgList\":[\n{\"MsgKey\":\"a\"},\n{\"MsgKey\":\"b\" oops\n42,\n]}\n";
        assert_eq!(parse(text).0, Layout::Lines);
        assert_eq!(keys(text), ["a", "bad:{\"MsgKey\":\"b\" oops", "bad:42"]);
    }

    /// JSON of a shape not known here fails the hour (read by lines, its messages were
    /// quarantined and the hour taken as done); a byte order mark, a top-level array and a
    /// file over 64 MiB read by lines are fine.
    #[test]
    fn an_unknown_shape_is_an_error_and_known_variants_are_read() {
        for text in [
            "{\"Data\":{\"MsgList\":[{\"MsgKey\":\"a\"}]}}",
            "[{\"MsgList\":[{\"MsgKey\":\"a\"}]}]",
            "{\"MsgList\":[{\"MsgList\":[{\"MsgKey\":\"a\"}]}]}",
            "{\"MsgList\": 3}",
            "[1, 2]",
            "42",
        ] {
            let (_, _, layout) = check(text.as_bytes()).unwrap();
            assert!(layout.is_err(), "{text}: {layout:?}");
        }
        assert_eq!(keys("\u{feff}{\"MsgList\":[{\"MsgKey\":\"a\"}]}"), ["a"]);
        assert_eq!(keys("[{\"MsgKey\":\"a\"},{\"MsgKey\":\"b\"}]"), ["a", "b"]);
        let line = format!(
            "{{\"MsgKey\":\"a\",\"MsgBody\":\"{}\"}}\n",
            "x".repeat(1 << 20)
        );
        let big = format!("{}oops\n", line.repeat(70));
        let mut n = 0;
        items(big.as_bytes(), Layout::Lines, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 71, "70 MiB read by lines");
    }

    /// One line holding every message: streamed, a message at a time; a single message over
    /// the bound refuses the file.
    #[test]
    fn one_huge_line_is_streamed_and_one_huge_message_refused() {
        let many: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let text = serde_json::json!({ "MsgList": json_list(&refs) }).to_string();
        let mut n = 0;
        items(text.as_bytes(), Layout::Json, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 20_000);
        let huge = format!(
            "{{\"MsgList\":[{{\"MsgKey\":\"a\"}},{{\"MsgKey\":\"{}\"}}]}}",
            "x".repeat(MAX_MESSAGE_BYTES as usize + 100_000)
        );
        let mut got = 0;
        let error = items(huge.as_bytes(), Layout::Json, &mut |_| {
            got += 1;
            true
        })
        .unwrap_err();
        assert_eq!(got, 1);
        assert!(error.to_string().contains("longer than"), "{error}");
        // Stopping is not an error.
        let mut seen = 0;
        items(text.as_bytes(), Layout::Json, &mut |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
        assert_eq!(seen, 3);
    }
}
