//! Reading one field of a Tencent JSON object, the way real senders write it: absent or `null`
//! means "not sent", and integers may arrive as numeric strings
//! (https://www.tencentcloud.com/document/product/1047/34365).

use std::collections::BTreeMap;
use std::fmt;

use crate::json::{Json, Object};

/// Fields we did not recognise, kept verbatim so the record stays lossless.
pub type Extra<'a> = BTreeMap<&'a str, &'a Json<'a>>;

/// What was wrong with one field; `field` is Tencent's spelling so senders can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing,
    Expected(&'static str),
    OutOfRange,
    Invalid(String),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field;
        match &self.problem {
            Problem::Missing => write!(f, "{field} is missing"),
            Problem::Expected(what) => write!(f, "{field} must be {what}"),
            Problem::OutOfRange => write!(f, "{field} is out of range"),
            Problem::Invalid(why) => write!(f, "{field} {why}"),
        }
    }
}

/// A borrowed JSON object with typed, lenient getters.
#[derive(Clone, Copy)]
pub struct Obj<'a>(pub &'a Object<'a>);

impl<'a> Obj<'a> {
    fn get(&self, field: &'static str) -> Option<&'a Json<'a>> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn err(field: &'static str, problem: Problem) -> FieldError {
        FieldError { field, problem }
    }

    pub fn str(&self, field: &'static str) -> Result<Option<&'a str>, FieldError> {
        match self.get(field) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::err(field, Problem::Expected("a string"))),
        }
    }

    pub fn array(&self, field: &'static str) -> Result<Option<&'a [Json<'a>]>, FieldError> {
        match self.get(field) {
            None => Ok(None),
            Some(Json::Array(a)) => Ok(Some(a)),
            Some(_) => Err(Self::err(field, Problem::Expected("an array"))),
        }
    }

    pub fn u32(&self, field: &'static str) -> Result<Option<u32>, FieldError> {
        self.u64(field)?
            .map(|n| u32::try_from(n).map_err(|_| Self::err(field, Problem::OutOfRange)))
            .transpose()
    }

    pub fn u64(&self, field: &'static str) -> Result<Option<u64>, FieldError> {
        self.integer(field, serde_json::Number::as_u64, |s| s.parse().ok())
    }

    pub fn i64(&self, field: &'static str) -> Result<Option<i64>, FieldError> {
        self.integer(field, serde_json::Number::as_i64, |s| s.parse().ok())
    }

    fn integer<T>(
        &self,
        field: &'static str,
        from_number: impl Fn(&serde_json::Number) -> Option<T>,
        from_text: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, FieldError> {
        let expected = || Self::err(field, Problem::Expected("an integer"));
        match self.get(field) {
            None => Ok(None),
            Some(Json::Number(n)) => {
                if n.is_f64() {
                    // serde_json gives f64 to both fractions and integers beyond 64 bits.
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    return Err(if f.fract() == 0.0 {
                        Self::err(field, Problem::OutOfRange)
                    } else {
                        expected()
                    });
                }
                from_number(n)
                    .map(Some)
                    .ok_or_else(|| Self::err(field, Problem::OutOfRange))
            }
            Some(Json::String(s)) => {
                let digits = s.strip_prefix('-').unwrap_or(s);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(expected());
                }
                from_text(s)
                    .map(Some)
                    .ok_or_else(|| Self::err(field, Problem::OutOfRange))
            }
            Some(_) => Err(expected()),
        }
    }

    pub fn f64(&self, field: &'static str) -> Result<Option<f64>, FieldError> {
        let expected = || Self::err(field, Problem::Expected("a number"));
        match self.get(field) {
            None => Ok(None),
            Some(Json::Number(n)) => n.as_f64().map(Some).ok_or_else(expected),
            Some(Json::String(s)) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(expected()),
            },
            Some(_) => Err(expected()),
        }
    }

    /// `0`/`1` flags (`OnlineOnlyFlag`); a JSON boolean is taken too.
    pub fn flag(&self, field: &'static str) -> Result<Option<bool>, FieldError> {
        if let Some(Json::Bool(b)) = self.get(field) {
            return Ok(Some(*b));
        }
        Ok(self.i64(field)?.map(|n| n != 0))
    }

    /// Every field not in `known`, verbatim.
    pub fn extra(&self, known: &[&str]) -> Extra<'a> {
        self.0
            .members()
            .filter(|(k, _)| !known.iter().any(|known| crate::json::same_key(k, known)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value, json};

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test helper takes objects"),
        }
    }

    #[test]
    fn integers_accept_numbers_and_numeric_strings() {
        let m = obj(json!({"a": 2563141290u64, "b": "2804799576", "c": "-1", "d": -1, "n": null}));
        let m = Object::from_map(&m);
        let o = Obj(&m);
        assert_eq!(o.u32("a"), Ok(Some(2563141290)));
        assert_eq!(o.u32("b"), Ok(Some(2804799576)));
        assert_eq!(o.i64("c"), Ok(Some(-1)));
        assert_eq!(o.i64("d"), Ok(Some(-1)));
        assert_eq!(o.u32("n"), Ok(None));
        assert_eq!(o.u32("absent"), Ok(None));
    }

    #[test]
    fn integers_refuse_what_is_not_an_integer() {
        let m = obj(json!({
            "neg": -1, "big": 4294967296u64, "frac": 1.5, "huge": 1e30,
            "text": "12a", "empty": "", "bool": true, "space": " 1",
        }));
        let m = Object::from_map(&m);
        let o = Obj(&m);
        let problem = |f: &'static str| o.u32(f).unwrap_err().problem;
        assert_eq!(problem("neg"), Problem::OutOfRange);
        assert_eq!(problem("big"), Problem::OutOfRange);
        assert_eq!(problem("frac"), Problem::Expected("an integer"));
        assert_eq!(problem("huge"), Problem::OutOfRange);
        for f in ["text", "empty", "bool", "space"] {
            assert_eq!(problem(f), Problem::Expected("an integer"), "{f}");
        }
        let m = obj(json!({"s": "99999999999999999999"}));
        assert_eq!(
            Obj(&Object::from_map(&m)).i64("s").unwrap_err().problem,
            Problem::OutOfRange
        );
    }

    #[test]
    fn floats_flags_and_extras() {
        let m =
            obj(json!({"lat": "22.54", "lng": 114.05, "bad": "NaN", "f": 1, "t": true, "x": [1]}));
        let m = Object::from_map(&m);
        let o = Obj(&m);
        assert_eq!(o.f64("lat"), Ok(Some(22.54)));
        assert_eq!(o.f64("lng"), Ok(Some(114.05)));
        assert!(o.f64("bad").is_err());
        assert_eq!(o.flag("f"), Ok(Some(true)));
        assert_eq!(o.flag("t"), Ok(Some(true)));
        let extra = o.extra(&["lat", "lng", "bad", "f", "t"]);
        assert_eq!(extra.len(), 1);
        assert_eq!(extra["x"].to_string(), "[1]");
    }
}
