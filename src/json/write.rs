//! Writes a `Serialize` value as compact JSON, byte for byte what `serde_json::to_vec` writes,
//! with strings scanned eight bytes at a time: `serde_json` looks at each byte of each string
//! and key on its own, and that loop was a fifth of a callback's hot path (BENCHMARKS.md, "Half
//! the CPU", third round). Numbers are written by `serde_json` itself. What it does not write
//! the same way (a map key that is not a string, a `RawValue`) it refuses, and the caller
//! writes with `serde_json`. A field's name is written as it is: a compile-time name of ours
//! that needs no escaping (debug builds assert it). In tests, every record `normalize` writes
//! is also written by `serde_json` and the two compared.

use std::fmt::{self, Display};

use serde::ser::{self, Serialize};

use super::plain_len;

/// `value` as JSON, in a buffer of `capacity` bytes to start with.
pub fn to_vec(value: &(impl Serialize + ?Sized), capacity: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(capacity);
    value.serialize(&mut Writer { out: &mut out })?;
    Ok(out)
}

/// Why a value could not be written (a map key that is not a string, or the value's own
/// error).
#[derive(Debug)]
pub struct Error(String);

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

struct Writer<'o> {
    out: &'o mut Vec<u8>,
}

/// `s` as a JSON string, escaped as `serde_json` escapes: `"`, `\\` and control characters.
fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let n = plain_len(bytes);
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if n == bytes.len() {
        out.extend_from_slice(bytes);
    } else {
        escaped(out, bytes, n);
    }
    out.push(b'"');
}

/// `bytes` escaped, the first `n` known to need nothing.
#[cold]
fn escaped(out: &mut Vec<u8>, mut bytes: &[u8], mut n: usize) {
    loop {
        out.extend_from_slice(&bytes[..n]);
        let Some((&b, rest)) = bytes[n..].split_first() else {
            return;
        };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\x0c' => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        bytes = rest;
        n = plain_len(bytes);
    }
}

impl Writer<'_> {
    fn number(&mut self, n: impl Serialize) -> Result<(), Error> {
        serde_json::to_writer(&mut *self.out, &n).map_err(ser::Error::custom)
    }
}

/// An array or object being written: whether a member has been.
struct Compound<'w, 'o> {
    w: &'w mut Writer<'o>,
    first: bool,
    /// Closes the value: `]`, `}`, or `}}` for a variant.
    close: &'static [u8],
}

impl<'w, 'o> Compound<'w, 'o> {
    fn open(w: &'w mut Writer<'o>, open: &[u8], close: &'static [u8]) -> Self {
        w.out.extend_from_slice(open);
        Compound {
            w,
            first: true,
            close,
        }
    }

    /// `{"variant":` and a compound within.
    fn variant(w: &'w mut Writer<'o>, name: &str, open: &[u8], close: &'static [u8]) -> Self {
        w.out.push(b'{');
        string(w.out, name);
        Compound::open(w, open, close)
    }

    fn comma(&mut self) {
        if !self.first {
            self.w.out.push(b',');
        }
        self.first = false;
    }

    fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        self.comma();
        v.serialize(&mut *self.w)
    }

    fn key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Error> {
        self.comma();
        let at = self.w.out.len();
        k.serialize(&mut *self.w)?;
        // Keys are strings here; `serde_json` would quote a number, we have none to write.
        if self.w.out.get(at) != Some(&b'"') {
            return Err(Error("a map key must be a string".into()));
        }
        self.w.out.push(b':');
        Ok(())
    }

    /// A field's or a newtype variant's name is written without the look for what would need
    /// escaping (on the short names of a record, that look was 1,700 instructions of a
    /// 45,000-instruction callback): it is a compile-time name of ours, and every one we write
    /// is plain ASCII. A `rename` could break that; debug builds, which every test runs,
    /// assert it.
    fn field<T: Serialize + ?Sized>(&mut self, k: &'static str, v: &T) -> Result<(), Error> {
        debug_assert_eq!(plain_len(k.as_bytes()), k.len(), "{k:?} needs escaping");
        self.comma();
        let out = &mut *self.w.out;
        out.reserve(k.len() + 3);
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        v.serialize(&mut *self.w)
    }

    fn close(self) -> Result<(), Error> {
        self.w.out.extend_from_slice(self.close);
        Ok(())
    }
}

impl<'w, 'o> ser::Serializer for &'w mut Writer<'o> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'w, 'o>;
    type SerializeTuple = Compound<'w, 'o>;
    type SerializeTupleStruct = Compound<'w, 'o>;
    type SerializeTupleVariant = Compound<'w, 'o>;
    type SerializeMap = Compound<'w, 'o>;
    type SerializeStruct = Compound<'w, 'o>;
    type SerializeStructVariant = Compound<'w, 'o>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        string(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        string(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        ser::Serializer::collect_seq(self, v)
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Error> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, v: &'static str) -> Result<(), Error> {
        self.serialize_str(v)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<(), Error> {
        let mut c = Compound::open(self, b"{", b"}");
        c.field(variant, v)?;
        c.close()
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::open(self, b"[", b"]"))
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::open(self, b"[", b"]"))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::open(self, b"[", b"]"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::variant(self, variant, b":[", b"]}"))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::open(self, b"{", b"}"))
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Compound<'w, 'o>, Error> {
        // `serde_json::value::RawValue` is written verbatim by `serde_json` alone, through a
        // struct of this private name; refused, so the caller's fallback writes it.
        if name == "$serde_json::private::RawValue" {
            return Err(Error("a RawValue is written by serde_json".into()));
        }
        Ok(Compound::open(self, b"{", b"}"))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'w, 'o>, Error> {
        Ok(Compound::variant(self, variant, b":{", b"}}"))
    }
}

/// The compound kinds serde tells apart, written alike: members of an array, fields of an
/// object.
macro_rules! members {
    ($($kind:ident :: $method:ident ($($key:ident)?)),* $(,)?) => {$(
        impl ser::$kind for Compound<'_, '_> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($key: &'static str,)?
                v: &T,
            ) -> Result<(), Error> {
                members!(@one self $($key)?, v)
            }
            fn end(self) -> Result<(), Error> {
                self.close()
            }
        }
    )*};
    (@one $self:ident, $v:ident) => { $self.element($v) };
    (@one $self:ident $key:ident, $v:ident) => { $self.field($key, $v) };
}

members!(
    SerializeSeq::serialize_element(),
    SerializeTuple::serialize_element(),
    SerializeTupleStruct::serialize_field(),
    SerializeTupleVariant::serialize_field(),
    SerializeStruct::serialize_field(k),
    SerializeStructVariant::serialize_field(k),
);

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Error> {
        self.key(k)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Error> {
        v.serialize(&mut *self.w)
    }
    fn end(self) -> Result<(), Error> {
        self.close()
    }
}
