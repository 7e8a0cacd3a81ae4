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

/// A JSON object: its members sorted by key (byte order, as `serde_json::Map` keeps them),
/// each key once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

/// Parses `bytes` as one JSON value; errors name the line and column.
pub fn parse(bytes: &[u8]) -> Result<Json<'_>, serde_json::Error> {
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

    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        // A callback's objects are small, and their names mostly differ in length: comparing
        // lengths first beats the ordered comparisons of a binary search (measured: the lookups
        // were a quarter of normalize's time); a large object is searched in order.
        if self.0.len() <= 32 {
            return self
                .0
                .iter()
                .find(|(k, _)| k.len() == key.len() && k.as_ref() == key)
                .map(|(_, v)| v);
        }
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
        for (k, v) in &self.0 {
            map.serialize_entry(k.as_ref(), v)?;
        }
        map.end()
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
        // Sorted once, then a repeat is a neighbour: n·log n whatever the sender crafted.
        members.sort_by(|(a, _), (b, _)| a.cmp(b));
        if let Some(w) = members.windows(2).find(|w| w[0].0 == w[1].0) {
            let shown: String = w[0].0.chars().take(40).collect();
            return Err(A::Error::custom(format_args!("duplicate key `{shown}`")));
        }
        Ok(Json::Object(Object(members)))
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
