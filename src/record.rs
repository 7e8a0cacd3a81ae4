//! The record envelope: one Kafka record as it waits in the spool — which topic, key,
//! headers, value, and when the callback arrived — with its two constructors, a relayed message
//! and a quarantined body. Pure: `receive` builds records, the spool stores their bytes,
//! `publish` sends them. A small length-prefixed binary layout, versioned by its first byte.

use std::borrow::Cow;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Which topic a record goes to: the messages topic, a lifecycle kind's own topic (the
/// messages topic unless configured), or the quarantine topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Messages,
    Quarantine,
    Recalls,
    Edits,
    ReadReports,
    ReadReceipts,
}

impl Target {
    /// Its byte in an entry; a version-1 entry only ever holds 0 or 1, so entries spooled by
    /// an older relay read the same.
    fn byte(self) -> u8 {
        match self {
            Target::Messages => 0,
            Target::Quarantine => 1,
            Target::Recalls => 2,
            Target::Edits => 3,
            Target::ReadReports => 4,
            Target::ReadReceipts => 5,
        }
    }

    fn from_byte(b: u8) -> Option<Target> {
        [
            Target::Messages,
            Target::Quarantine,
            Target::Recalls,
            Target::Edits,
            Target::ReadReports,
            Target::ReadReceipts,
        ]
        .into_iter()
        .find(|t| t.byte() == b)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub target: Target,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
    /// Unix milliseconds; for the delivery latency and the backlog's age.
    pub received_at_ms: u64,
}

const VERSION: u8 = 1;

/// Why an authenticated callback could not be relayed, and what it came with.
pub struct Quarantined<'a> {
    /// A fixed label (`invalid_json`, `kafka_refused`, …).
    pub reason: &'a str,
    pub detail: Option<&'a str>,
    pub sdk_app_id: String,
    pub command: &'a str,
    /// The callback's query as received; its `Sign` is dropped here.
    pub raw_query: &'a str,
    pub received_at: OffsetDateTime,
}

fn unix_ms(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Record {
    /// A relayed record for `target`: `normalize`'s key, headers and value, plus the caller's
    /// trace context (W3C `traceparent`) when there is one.
    pub fn message(
        target: Target,
        key: String,
        headers: Vec<(&'static str, Cow<'static, str>)>,
        value: Vec<u8>,
        received_at: OffsetDateTime,
        traceparent: Option<String>,
    ) -> Record {
        let mut headers: Vec<(String, Vec<u8>)> = headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_owned().into_bytes()))
            .collect();
        if let Some(tp) = traceparent {
            headers.push(("traceparent".to_owned(), tp.into_bytes()));
        }
        Record {
            target,
            key: Some(key.into_bytes()),
            headers,
            value,
            received_at_ms: unix_ms(received_at),
        }
    }

    /// An authenticated body we cannot relay, kept as it came (bytes untouched) on the
    /// quarantine topic, with the reason and where it came from.
    pub fn quarantined(body: &[u8], why: &Quarantined<'_>) -> Record {
        // `Sign` is a credential for the rest of its freshness window: not kept.
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(
                form_urlencoded::parse(why.raw_query.as_bytes()).filter(|(k, _)| k != "Sign"),
            )
            .finish();
        let mut headers = vec![
            ("im_quarantine_reason", why.reason.to_owned()),
            ("im_sdk_app_id", why.sdk_app_id.clone()),
            ("im_callback_command", why.command.to_owned()),
            ("im_query", query),
            (
                "im_received_at",
                why.received_at.format(&Rfc3339).unwrap_or_default(),
            ),
            ("content-type", "application/octet-stream".to_owned()),
        ];
        if let Some(detail) = why.detail {
            headers.push(("im_quarantine_detail", detail.to_owned()));
        }
        Record {
            target: Target::Quarantine,
            key: None,
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into_bytes()))
                .collect(),
            value: body.to_vec(),
            received_at_ms: unix_ms(why.received_at),
        }
    }

    /// Re-targets a record Kafka refused to the quarantine topic, saying why in the same
    /// headers a quarantined callback carries.
    pub fn quarantine(&mut self, reason: &str, detail: &str) {
        self.target = Target::Quarantine;
        self.headers
            .retain(|(k, _)| k != "im_quarantine_reason" && k != "im_quarantine_detail");
        self.headers
            .push(("im_quarantine_reason".into(), reason.as_bytes().to_vec()));
        let detail: String = detail.chars().take(200).collect();
        self.headers
            .push(("im_quarantine_detail".into(), detail.into_bytes()));
    }

    pub fn encode(&self) -> Vec<u8> {
        let headers = self.headers.iter().map(|(k, v)| (k.as_bytes(), &v[..]));
        encode(
            self.target,
            self.received_at_ms,
            self.key.as_deref(),
            headers,
            &self.value,
        )
    }

    /// `None` for bytes that are not an entry (the spool's checksum makes that unlikely).
    pub fn decode(b: &[u8]) -> Option<Record> {
        View::parse(b).map(|v| v.to_record())
    }
}

/// An entry's fields where they lie in its bytes: what the publisher sends, without a copy.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub target: Target,
    pub received_at_ms: u64,
    pub key: Option<&'a [u8]>,
    /// The headers as encoded, `count` of them, each name checked to be UTF-8.
    headers: &'a [u8],
    count: u32,
    pub value: &'a [u8],
}

impl<'a> View<'a> {
    /// `None` for bytes that are not an entry.
    pub fn parse(mut b: &'a [u8]) -> Option<View<'a>> {
        let [version, target, rest @ ..] = b else {
            return None;
        };
        if *version != VERSION {
            return None;
        }
        let target = Target::from_byte(*target)?;
        b = rest;
        let received_at_ms = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let key = if b.get(..4)? == u32::MAX.to_le_bytes() {
            b = &b[4..];
            None
        } else {
            Some(get(&mut b)?)
        };
        let count = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let headers = b;
        for _ in 0..count {
            std::str::from_utf8(get(&mut b)?).ok()?;
            get(&mut b)?;
        }
        let headers = &headers[..headers.len() - b.len()];
        let value = get(&mut b)?;
        b.is_empty().then_some(View {
            target,
            received_at_ms,
            key,
            headers,
            count,
            value,
        })
    }

    /// Name and value of each header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + use<'a> {
        let mut b = self.headers;
        (0..self.count).map(move |_| {
            let mut next = || get(&mut b).expect("parse checked the layout");
            let name = std::str::from_utf8(next()).expect("parse checked the names");
            (name, next())
        })
    }

    pub fn header_count(&self) -> usize {
        self.count as usize
    }

    pub fn to_record(&self) -> Record {
        Record {
            target: self.target,
            key: self.key.map(<[u8]>::to_vec),
            headers: self
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_vec()))
                .collect(),
            value: self.value.to_vec(),
            received_at_ms: self.received_at_ms,
        }
    }
}

/// A spool entry as the publisher holds it until Kafka confirms it: the bytes it was read
/// as (one allocation), checked by `new`; `view` walks their lengths again on each send,
/// copying nothing.
#[derive(Debug)]
pub struct Entry {
    bytes: Vec<u8>,
    pub target: Target,
    pub received_at_ms: u64,
}

impl Entry {
    /// `None` for bytes that are not an entry.
    pub fn new(bytes: Vec<u8>) -> Option<Entry> {
        let View {
            target,
            received_at_ms,
            ..
        } = View::parse(&bytes)?;
        Some(Entry {
            bytes,
            target,
            received_at_ms,
        })
    }

    pub fn view(&self) -> View<'_> {
        View::parse(&self.bytes).expect("checked by Entry::new")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Rerouted to the quarantine topic with `reason` (see `Record::quarantine`).
    pub fn quarantine(&mut self, reason: &str, detail: &str) {
        let mut record = self.view().to_record();
        record.quarantine(reason, detail);
        *self = Entry::from(&record);
    }
}

impl From<&Record> for Entry {
    fn from(record: &Record) -> Entry {
        Entry::new(record.encode()).expect("an encoded record parses")
    }
}

/// A relayed record's spool entry straight from `normalize`'s output: the bytes
/// `Record::message(…).encode()` makes, without building the record first (a dozen copies
/// fewer per callback).
pub fn message_entry(
    target: Target,
    key: &str,
    headers: &[(&'static str, Cow<'static, str>)],
    value: &[u8],
    received_at: OffsetDateTime,
    traceparent: Option<&str>,
) -> Vec<u8> {
    let traceparent = traceparent.map(|tp| ("traceparent", tp));
    let headers = headers
        .iter()
        .map(|(k, v)| (*k, v.as_ref()))
        .chain(traceparent)
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()));
    encode(
        target,
        unix_ms(received_at),
        Some(key.as_bytes()),
        headers,
        value,
    )
}

fn encode<'h>(
    target: Target,
    received_at_ms: u64,
    key: Option<&[u8]>,
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    value: &[u8],
) -> Vec<u8> {
    let (count, header_bytes) = headers
        .clone()
        .fold((0, 0), |(n, b), (k, v)| (n + 1, b + 8 + k.len() + v.len()));
    let key_len = key.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(22 + key_len + header_bytes + 4 + value.len());
    out.push(VERSION);
    out.push(target.byte());
    out.extend_from_slice(&received_at_ms.to_le_bytes());
    match key {
        Some(k) => put(&mut out, k),
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (name, value) in headers {
        put(&mut out, name);
        put(&mut out, value);
    }
    put(&mut out, value);
    out
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = b.split_at_checked(n)?;
    *b = rest;
    Some(head)
}

fn get<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?);
    take(b, len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn a_message_carries_its_key_headers_and_trace() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let r = Record::message(
            Target::Messages,
            "k".into(),
            vec![("ce_id", "1".into())],
            b"{}".to_vec(),
            at,
            Some("00-abc-def-01".into()),
        );
        assert_eq!(r.target, Target::Messages);
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(header(&r, "ce_id"), Some("1"));
        assert_eq!(header(&r, "traceparent"), Some("00-abc-def-01"));
        assert_eq!(r.received_at_ms, 1_700_000_000_000);
        let untraced = Record::message(Target::Messages, "k".into(), vec![], vec![], at, None);
        assert_eq!(header(&untraced, "traceparent"), None);
    }

    #[test]
    fn a_message_entry_is_the_encoded_record() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let headers = vec![
            ("ce_id", "1:a:b:k".to_owned().into()),
            ("ce_type", "t".into()),
        ];
        for (target, traceparent) in [
            (Target::Messages, Some("00-abc-def-01")),
            (Target::ReadReceipts, None),
        ] {
            let entry = message_entry(target, "k", &headers, b"{\"a\":1}", at, traceparent);
            let record = Record::message(
                target,
                "k".into(),
                headers.clone(),
                b"{\"a\":1}".to_vec(),
                at,
                traceparent.map(str::to_owned),
            );
            assert_eq!(entry, record.encode());
            assert_eq!(Record::decode(&entry), Some(record));
        }
    }

    #[test]
    fn a_quarantined_body_is_kept_as_it_came_without_the_signature() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let why = Quarantined {
            reason: "invalid_json",
            detail: Some("EOF at line 1"),
            sdk_app_id: "1400000000".into(),
            command: "C2C.CallbackAfterSendMsg",
            raw_query: "SdkAppid=1400000000&Sign=secret&RequestTime=1&contenttype=json",
            received_at: at,
        };
        let r = Record::quarantined(b"{\"From", &why);
        assert_eq!(r.target, Target::Quarantine);
        assert_eq!(r.key, None);
        assert_eq!(r.value, b"{\"From");
        let query = header(&r, "im_query").unwrap();
        assert!(
            !query.contains("Sign") && !query.contains("secret"),
            "{query}"
        );
        assert!(query.contains("RequestTime=1"), "{query}");
        assert_eq!(header(&r, "im_quarantine_reason"), Some("invalid_json"));
        assert_eq!(header(&r, "im_quarantine_detail"), Some("EOF at line 1"));
        assert_eq!(header(&r, "im_received_at"), Some("2023-11-14T22:13:20Z"));
        assert_eq!(header(&r, "im_sdk_app_id"), Some("1400000000"));
    }

    /// A record with a key, two headers (one not ASCII) and a value.
    fn sample(target: Target) -> Record {
        Record {
            target,
            key: Some(b"k".to_vec()),
            headers: vec![("a".into(), b"1".to_vec()), ("ce_id".into(), "你好".into())],
            value: b"{\"x\":1}".to_vec(),
            received_at_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn round_trips_and_refuses_truncation() {
        let e = sample(Target::Quarantine);
        let bytes = e.encode();
        assert_eq!(Record::decode(&bytes), Some(e.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(Record::decode(&bytes[..cut]), None, "cut {cut}");
        }
        let keyless = Record { key: None, ..e };
        assert_eq!(Record::decode(&keyless.encode()), Some(keyless));
    }

    #[test]
    fn an_entry_is_seen_in_place_and_rerouted_by_a_new_encoding() {
        let e = sample(Target::Edits);
        let mut entry = Entry::new(e.encode()).unwrap();
        let (target, received_at_ms) = (entry.target, entry.received_at_ms);
        assert_eq!((target, received_at_ms), (e.target, e.received_at_ms));
        let view = entry.view();
        assert_eq!(view.key, Some(&b"k"[..]));
        assert_eq!(view.value, b"{\"x\":1}");
        assert_eq!(view.header_count(), 2);
        let headers: Vec<_> = view.headers().collect();
        assert_eq!(headers, [("a", &b"1"[..]), ("ce_id", "你好".as_bytes())]);
        assert_eq!(view.to_record(), e);
        // Borrowed from the entry's bytes, not copied.
        let bytes = entry.bytes().as_ptr_range();
        assert!(bytes.contains(&view.value.as_ptr()));

        entry.quarantine("kafka_refused", "too large");
        let mut rerouted = e.clone();
        rerouted.quarantine("kafka_refused", "too large");
        assert_eq!(entry.target, Target::Quarantine);
        assert_eq!(entry.bytes(), rerouted.encode());

        // A header name that is not UTF-8 makes no entry.
        let mut bad = e.encode();
        let at = bad.windows(5).position(|w| w == b"ce_id").unwrap();
        bad[at] = 0xff;
        assert!(Entry::new(bad.clone()).is_none() && Record::decode(&bad).is_none());
    }
}
