//! A callback body's JSON, read strictly and without copying: strings and keys borrow from the
//! request's bytes (an owned copy only where an escape had to be decoded), objects are sorted
//! vectors. It reads and writes like a `serde_json::Value` — the same numbers, the same escapes,
//! the same key order when written — but a repeated key is an error rather than a silent "last
//! one wins": two `From_Account`s would leave us guessing which one Tencent meant, and a later
//! reader might guess differently.
//!
//! Why not `serde_json::Value`: building, walking and dropping its tree (a `String` per key and
//! per string, a B-tree per object) was a quarter of the workers' time per callback
//! (BENCHMARKS.md, "Half the CPU").

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Number, Value};

/// One JSON value; `'a` is the lifetime of the bytes it was read from.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A JSON object, each key once. Up to `SMALL` members are kept in the order they came: a
/// look-up compares lengths first, and sorting them was a seventh of reading a body. A larger
/// object is kept sorted by key, for binary search. Either way it is iterated, written and
/// compared in key order (byte order, as `serde_json::Map` keeps it).
#[derive(Debug, Clone, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

const SMALL: usize = 32;

mod read;
mod write;
pub use write::to_vec;

/// Parses `bytes` as one JSON value; errors name the line and column.
pub fn parse(bytes: &[u8]) -> Result<Json<'_>, serde_json::Error> {
    match read::read(bytes) {
        Some(value) => Ok(value),
        None => parse_with_serde_json(bytes),
    }
}

/// Whether the fast reader agrees with the reference on `bytes`: the same value when it reads
/// them, nothing when the reference refuses them. Says whether the fast reader took them.
#[cfg(test)]
pub(crate) fn fast_reader_agrees(bytes: &[u8]) -> bool {
    match (read::read(bytes), parse_with_serde_json(bytes)) {
        (Some(fast), Ok(reference)) => {
            assert_eq!(fast, reference, "{:?}", String::from_utf8_lossy(bytes));
            true
        }
        (Some(fast), Err(e)) => panic!("read {fast:?} where serde_json refused: {e}"),
        (None, _) => false,
    }
}

/// The reference reading: what `read` gives up on, and every error's message.
fn parse_with_serde_json(bytes: &[u8]) -> Result<Json<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

impl<'a> Json<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The same tree, borrowing from a `serde_json::Value` (for bodies built rather than
    /// received: backfill, tests).
    pub fn from_value(v: &'a Value) -> Json<'a> {
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.clone()),
            Value::String(s) => Json::String(Cow::Borrowed(s)),
            Value::Array(a) => Json::Array(a.iter().map(Json::from_value).collect()),
            Value::Object(m) => Json::Object(Object::from_map(m)),
        }
    }
}

impl<'a> Object<'a> {
    /// `m`'s members, borrowed (a `serde_json::Map` is already sorted and unique).
    pub fn from_map(m: &'a serde_json::Map<String, Value>) -> Object<'a> {
        Object(
            m.iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), Json::from_value(v)))
                .collect(),
        )
    }

    /// An object of `members` in any order; a repeated key is given back. A small object's
    /// pairs are compared once each, lengths first; a large one is sorted once, then a repeat is
    /// a neighbour (n·log n whatever the sender crafted).
    fn from_members(mut members: Vec<(Cow<'a, str>, Json<'a>)>) -> Result<Self, Cow<'a, str>> {
        let repeat = if members.len() <= SMALL {
            (0..members.len()).find(|&i| {
                let key = &members[i].0;
                members[i + 1..].iter().any(|(k, _)| same_key(k, key))
            })
        } else {
            members.sort_unstable_by(|(a, _), (b, _)| key_order(a.as_bytes(), b.as_bytes()));
            members.windows(2).position(|w| w[0].0 == w[1].0)
        };
        match repeat {
            Some(i) => Err(members.swap_remove(i).0),
            None => Ok(Object(members)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        // A callback's objects are small, and their names mostly differ in length: comparing
        // lengths first beats the ordered comparisons of a binary search (measured: the lookups
        // were a quarter of normalize's time); a large object is searched in order.
        if self.0.len() <= SMALL {
            return self
                .0
                .iter()
                .find(|(k, _)| same_key(k, key))
                .map(|(_, v)| v);
        }
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The members in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        let small = self.0.len() <= SMALL;
        let n = if small { self.0.len() } else { 0 };
        let mut order = [0u8; SMALL];
        for (i, o) in order[..n].iter_mut().enumerate() {
            *o = i as u8;
        }
        order[..n].sort_unstable_by(|&a, &b| {
            key_order(
                self.0[a as usize].0.as_bytes(),
                self.0[b as usize].0.as_bytes(),
            )
        });
        let sorted = &self.0[n..];
        order
            .into_iter()
            .take(n)
            .map(|i| &self.0[usize::from(i)])
            .chain(sorted)
            .map(|(k, v)| (k.as_ref(), v))
    }

    /// The members in no particular order, for a caller that orders them itself.
    pub fn members(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `a == b`, the lengths and last bytes compared before the rest: a callback's keys of one
/// length mostly differ at their end (`MsgSeq`, `MsgKey`), and this spares a `memcmp` call
/// for each that does.
pub fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.as_bytes().last() == b.as_bytes().last() && a == b
}

/// How many bytes of `bytes` come before the first that a JSON string cannot hold as it is:
/// `"`, `\\` or a control character. Eight bytes at a time, as `serde_json`'s reader does: most
/// of a body, and of a record, is string content.
fn plain_len(bytes: &[u8]) -> usize {
    let mut chunks = bytes.chunks_exact(8);
    let mut n = 0;
    for chunk in chunks.by_ref() {
        if let Some(i) = first_stop(chunk.try_into().unwrap_or_default()) {
            return n + i;
        }
        n += 8;
    }
    let tail = chunks.remainder();
    n + tail
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .unwrap_or(tail.len())
}

/// Where the first of eight bytes is below 0x20, `"` or `\\`.
fn first_stop(bytes: [u8; 8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    let word = u64::from_le_bytes(bytes);
    // The high bit of each byte below 0x20, or equal to `"` or `\\`; bytes above one found
    // may be flagged falsely (a borrow), the lowest flagged one is exact.
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let found = (word.wrapping_sub(ONES * 0x20) & !word
        | quote.wrapping_sub(ONES) & !quote
        | backslash.wrapping_sub(ONES) & !backslash)
        & ONES << 7;
    (found != 0).then(|| found.trailing_zeros() as usize / 8)
}

/// Byte order, as `str`'s `Ord`, without a call to `memcmp` for keys that differ early (a
/// callback's keys mostly differ in their first bytes, and that call was most of the sort).
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    match a.iter().zip(b).find(|(x, y)| x != y) {
        Some((x, y)) => x.cmp(y),
        None => a.len().cmp(&b.len()),
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for item in a {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(o) => o.serialize(s),
        }
    }
}

impl Serialize for Object<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The same members, whatever order each object keeps them in.
impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.iter().eq(other.iter())
    }
}

/// The value as JSON text (what `serde_json::Value`'s `Display` writes).
impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Json<'de>, E> {
        Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(Strict)? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let value = map.next_value_seed(Strict)?;
            members.push((key, value));
        }
        Object::from_members(members)
            .map(Json::Object)
            .map_err(|key| {
                let shown: String = key.chars().take(40).collect();
                A::Error::custom(format_args!("duplicate key `{shown}`"))
            })
    }
}

/// An object's key, borrowed unless it held an escape.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_values_and_same_text_as_serde_json() {
        let text = r#"{"z": 1, "a": [1, -2, 3.5, "x\u0000y", null, true, {"b": {}}], "big": 18446744073709551615, "neg": -9223372036854775808, "f": 1e300, "esc\"k": "\ud83d\udc4b\n", "huge": 123456789012345678901234567890}"#;
        let json = parse(text.as_bytes()).unwrap();
        let value: Value = serde_json::from_str(text).unwrap();
        assert_eq!(json, Json::from_value(&value));
        assert_eq!(
            serde_json::to_string(&json).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
        assert_eq!(json.to_string(), value.to_string());
        let Json::Object(o) = &json else {
            unreachable!()
        };
        assert_eq!(o.get("esc\"k").and_then(Json::as_str), Some("👋\n"));
        assert_eq!(o.get("missing"), None);
        assert_eq!(o.len(), 7);
    }

    #[test]
    fn the_fast_reader_takes_the_common_and_leaves_the_rest() {
        let taken = [
            &br#" {"a" : [1, -2, true, false, null, "", "x\"\u00e9\ud83d\udc4b\/\b\f\n\r\t\u0000"], "b": {}} "#[..],
            b"0",
            b"-9223372036854775808",
            b"18446744073709551615",
            br#"{"\u006b": 1}"#,
            br#""\uD83D\uDC4B""#,
            // Numbers other than 64-bit integers, read by serde_json from their characters.
            b"-0",
            b"[1.5, -0.0, 1e2, 1E+2, 2.5e-308]",
            b"-9223372036854775809",
            b"18446744073709551616",
            b"123456789012345678901234567890",
        ];
        for bytes in taken {
            assert!(
                fast_reader_agrees(bytes),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let left = [
            b"01".to_vec(),
            b"-".to_vec(),
            b"1.".to_vec(),
            b"1e400".to_vec(),
            b"[1-2]".to_vec(),
            br#""\ud83d""#.to_vec(),
            br#""\ud83d\u0041""#.to_vec(),
            br#""\udc4b""#.to_vec(),
            br#""\x""#.to_vec(),
            b"\"a\x01\"".to_vec(),
            b"\"\xff\"".to_vec(),
            br#"{"k": 1, "k": 2}"#.to_vec(),
            br#"{"a": 1,}"#.to_vec(),
            b"[1,]".to_vec(),
            b"[1 2]".to_vec(),
            b"tru".to_vec(),
            b"nul".to_vec(),
            b"".to_vec(),
            b"1 2".to_vec(),
            deep(101).into_bytes(),
            deep(127).into_bytes(),
            deep(128).into_bytes(),
        ];
        for bytes in &left {
            assert!(
                !fast_reader_agrees(bytes),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert!(fast_reader_agrees(deep(100).as_bytes()));
        // Past 32 members an object is kept sorted (and searched by halves): read, looked up,
        // compared and written like a small one, whatever order its keys came in.
        for n in [31, 32, 33, 40] {
            let members: Vec<String> = (0..n).rev().map(|i| format!("\"k{i:02}\": {i}")).collect();
            let text = format!("{{{}}}", members.join(", "));
            assert!(fast_reader_agrees(text.as_bytes()), "{n}");
            let value: Value = serde_json::from_str(&text).unwrap();
            let Json::Object(o) = parse(text.as_bytes()).unwrap() else {
                unreachable!()
            };
            assert_eq!(Json::Object(o.clone()), Json::from_value(&value));
            assert_eq!(to_vec(&o, 0).unwrap(), serde_json::to_vec(&value).unwrap());
            assert_eq!(o.get("k00"), Some(&Json::Number(0.into())), "{n}");
            assert!(o.get(&format!("k{:02}", n - 1)).is_some());
            assert_eq!(o.get("k99"), None);
            let repeated = format!("{{{}, \"k00\": 1}}", members.join(", "));
            assert!(!fast_reader_agrees(repeated.as_bytes()));
            let err = parse(repeated.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("duplicate key `k00`"), "{err}");
        }
        // What it leaves, the reference still reads.
        assert!(parse(b"-0").is_ok() && parse(deep(127).as_bytes()).is_ok());
        assert!(parse(deep(128).as_bytes()).is_err());
    }

    proptest::proptest! {
        /// Strings of any content at any offset (the reader looks at eight bytes at a time):
        /// raw, where quotes, backslashes and control characters must stop it, and escaped.
        #[test]
        fn the_fast_reader_agrees_on_any_string(
            pad in 0usize..9,
            s in "[a-z\"\\\\\u{0}-\u{1f}\u{7f}-\u{a0}é中👋]{0,40}",
        ) {
            let padding = " ".repeat(pad);
            let raw = format!("{padding}[\"{s}\", 1]");
            fast_reader_agrees(raw.as_bytes());
            let escaped = format!("{padding}[{}, 1]", serde_json::to_string(&s).unwrap());
            proptest::prop_assert_eq!(
                to_vec(&s, 0).unwrap(),
                serde_json::to_vec(&s).unwrap()
            );
            proptest::prop_assert!(fast_reader_agrees(escaped.as_bytes()));
        }
    }

    /// The writer against `serde_json` over the whole of serde's data model, strings of every
    /// escape and numbers of every kind.
    #[test]
    fn the_writer_writes_what_serde_json_writes() {
        #[derive(Serialize)]
        enum E {
            Unit,
            Newtype(i8),
            Tuple(u8, char),
            Struct { a: Option<f32>, b: () },
        }
        #[derive(Serialize)]
        struct Unit;
        #[derive(Serialize)]
        struct Tuple(i128, u128);
        #[derive(Serialize)]
        struct S<'a> {
            e: Vec<E>,
            unit: Unit,
            tuple: Tuple,
            #[serde(with = "serde_bytes_like")]
            bytes: &'a [u8],
            map: std::collections::BTreeMap<&'a str, Json<'a>>,
            nan: f64,
            inf: f32,
            text: String,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(b)
            }
        }
        let text: String = (0u8..=0x7f)
            .map(char::from)
            .chain("é中👋".chars())
            .collect();
        let big = parse(b"[-0, 0.1, 1e300, -9223372036854775808, 18446744073709551615]").unwrap();
        let value = S {
            e: vec![
                E::Unit,
                E::Newtype(-1),
                E::Tuple(7, '"'),
                E::Struct {
                    a: Some(1.5),
                    b: (),
                },
                E::Struct { a: None, b: () },
            ],
            unit: Unit,
            tuple: Tuple(i128::MIN, u128::MAX),
            bytes: &[0, 1, 255],
            map: [("k\n\"", big), ("", Json::Object(Object::default()))].into(),
            nan: f64::NAN,
            inf: f32::INFINITY,
            text,
        };
        assert_eq!(
            String::from_utf8(to_vec(&value, 0).unwrap()).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
        let keyed: std::collections::BTreeMap<u8, u8> = [(1, 2)].into();
        assert!(to_vec(&keyed, 0).is_err());
        // Written verbatim by serde_json alone: refused, for the caller to fall back.
        let raw = serde_json::value::RawValue::from_string("[1,  2]".into()).unwrap();
        assert!(to_vec(&raw, 0).is_err());
    }

    /// Field names are written unescaped: one that would need escaping is caught in debug
    /// builds, where every test runs.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "needs escaping")]
    fn a_field_name_that_needs_escaping_is_caught() {
        #[derive(Serialize)]
        struct Odd {
            #[serde(rename = "a\"b")]
            a: u8,
        }
        let _ = to_vec(&Odd { a: 1 }, 0);
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let Ok(Json::Object(o)) = parse(br#"{"From_Account": "a", "Text": "b\"c"}"#) else {
            unreachable!()
        };
        assert!(matches!(o.0[0].0, Cow::Borrowed("From_Account")));
        assert!(matches!(o.0[0].1, Json::String(Cow::Borrowed("a"))));
        assert!(matches!(o.0[1].1, Json::String(Cow::Owned(_))));
    }

    #[test]
    fn refuses_what_serde_json_lets_through_or_refuses() {
        let dup = parse(br#"{"From_Account": "a", "To_Account": "b", "From_Account": "c"}"#);
        assert!(
            dup.unwrap_err()
                .to_string()
                .contains("duplicate key `From_Account`")
        );
        let nested = parse(br#"{"x": {"k": 1, "k": 2}}"#);
        assert!(
            nested
                .unwrap_err()
                .to_string()
                .contains("duplicate key `k`")
        );
        // Spelled differently, the same key once decoded.
        assert!(parse(br#"{"k": 1, "\u006b": 2}"#).is_err());
        for bad in [
            &b"{"[..],
            b"{} {}",
            b"\xff",
            b"[1,]",
            b"1e400",
            &[b'['; 200][..],
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
