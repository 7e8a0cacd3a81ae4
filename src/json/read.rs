//! The reader every callback body goes through first: one pass over bytes already checked to be
//! UTF-8, strings borrowed, integers read as `serde_json` reads them (other numbers by
//! `serde_json` itself). It takes only what it is sure of and gives up (`None`) on anything
//! else — a lone surrogate, a repeated key, deep nesting, any syntax error — and the caller then
//! reads the body with `serde_json`, whose result and error messages are the reference. So it
//! can only be wrong by accepting, or reading differently, what `serde_json` would not: the
//! differential tests (`json` and `normalize/tests.rs`) hold it to that.
//!
//! Why: `serde_json`'s reader, driven through its visitor, was 1.3 µs of a callback's 3.5
//! (BENCHMARKS.md, "Half the CPU", third round).

use std::borrow::Cow;

use serde_json::Number;

use super::{Json, Object, plain_len};

/// Deeper than this is left to `serde_json` (which refuses at 128).
const MAX_DEPTH: u32 = 100;

/// The whole of `bytes` as one JSON value, or `None` when `serde_json` must decide.
pub(super) fn read(bytes: &[u8]) -> Option<Json<'_>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut r = Reader {
        text,
        bytes,
        pos: 0,
        depth: 0,
        // A callback's largest object and array fit at once.
        members: Vec::with_capacity(24),
        items: Vec::with_capacity(8),
    };
    let value = r.value()?;
    r.skip_whitespace();
    (r.pos == bytes.len()).then_some(value)
}

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: u32,
    /// Members of the objects being read, innermost last: each object takes its own off the
    /// end into a vector of exactly its size.
    members: Vec<(Cow<'a, str>, Json<'a>)>,
    items: Vec<Json<'a>>,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// The next byte after whitespace, consumed.
    fn next_token(&mut self) -> Option<u8> {
        self.skip_whitespace();
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    // Scalars are read in place, inlined here: a value handed back through memory from a call
    // of its own was read before its parts were written through (a store-forwarding stall per
    // value, a third of the reader's time). Objects and arrays are calls.
    #[inline(always)]
    fn value(&mut self) -> Option<Json<'a>> {
        match self.next_token()? {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => self.string().map(Json::String),
            b't' => self.literal(b"rue", Json::Bool(true)),
            b'f' => self.literal(b"alse", Json::Bool(false)),
            b'n' => self.literal(b"ull", Json::Null),
            b'-' | b'0'..=b'9' => {
                self.pos -= 1;
                self.number()
            }
            _ => None,
        }
    }

    fn literal(&mut self, rest: &[u8], value: Json<'a>) -> Option<Json<'a>> {
        let end = self.pos + rest.len();
        (self.bytes.get(self.pos..end)? == rest).then(|| {
            self.pos = end;
            value
        })
    }

    /// A number: an integer read here as `serde_json` reads one (`u64` when not negative,
    /// `i64` when negative and not zero); anything else (`-0`, a fraction, an exponent, beyond
    /// 64 bits) read by `serde_json` itself, from its characters alone. Taking every character
    /// a number can hold is safe: in JSON a number is never followed by another of them.
    #[inline(always)]
    fn number(&mut self) -> Option<Json<'a>> {
        let start = self.pos;
        let negative = self.bytes[start] == b'-';
        let digits = start + usize::from(negative);
        let mut n: Option<u64> = Some(0);
        self.pos = digits;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.and_then(|n| n.checked_mul(10)?.checked_add(u64::from(d - b'0')));
            self.pos += 1;
        }
        let plain = self.pos > digits
            && (self.pos == digits + 1 || self.bytes[digits] != b'0')
            && !matches!(self.peek(), Some(b'.' | b'e' | b'E' | b'+' | b'-'));
        match (plain, negative, n) {
            (true, false, Some(n)) => return Some(Json::Number(n.into())),
            // `serde_json` reads `-0`, and a magnitude beyond 2^63, as floats.
            (true, true, Some(n @ 1..=0x8000_0000_0000_0000)) => {
                return Some(Json::Number((n as i64).wrapping_neg().into()));
            }
            _ => {}
        }
        self.other_number(start)
    }

    #[cold]
    #[inline(never)]
    fn other_number(&mut self, start: usize) -> Option<Json<'a>> {
        while let Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') = self.peek() {
            self.pos += 1;
        }
        let number: Number = serde_json::from_str(&self.text[start..self.pos]).ok()?;
        Some(Json::Number(number))
    }

    /// A string's content after its opening quote: borrowed unless it holds an escape.
    #[inline(always)]
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.pos;
        self.run();
        match self.peek()? {
            b'"' => {
                self.pos += 1;
                // Quotes are ASCII, so both ends are character boundaries.
                Some(Cow::Borrowed(&self.text[start..self.pos - 1]))
            }
            b'\\' => self.escaped_string(start).map(Cow::Owned),
            _ => None,
        }
    }

    /// The rest of a string from its first backslash, `start` where its content began.
    #[cold]
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Option<String> {
        let mut owned = String::with_capacity(self.pos - start + 16);
        owned.push_str(&self.text[start..self.pos]);
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(owned);
                }
                b'\\' => {
                    self.pos += 1;
                    owned.push(self.escape()?);
                }
                _ => return None,
            }
            let from = self.pos;
            self.run();
            owned.push_str(&self.text[from..self.pos]);
        }
    }

    /// Moves past plain string content, to the next quote, backslash or control byte (or the
    /// end).
    fn run(&mut self) {
        self.pos += plain_len(&self.bytes[self.pos..]);
    }

    /// One escape after its backslash. A surrogate must come as a pair, as `serde_json`
    /// requires; anything else gives up.
    fn escape(&mut self) -> Option<char> {
        let b = self.peek()?;
        self.pos += 1;
        Some(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4()?;
                if !(0xD800..=0xDBFF).contains(&high) {
                    return char::from_u32(u32::from(high));
                }
                if self.bytes.get(self.pos..self.pos + 2)? != b"\\u" {
                    return None;
                }
                self.pos += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                return char::from_u32(c);
            }
            _ => return None,
        })
    }

    fn hex4(&mut self) -> Option<u16> {
        let digits = self.bytes.get(self.pos..self.pos + 4)?;
        let mut n = 0u16;
        for &d in digits {
            n = n << 4 | (char::from(d).to_digit(16)? as u16);
        }
        self.pos += 4;
        Some(n)
    }

    /// The members of an object or the items of an array, up to `close`, each read by `one`
    /// after its separator.
    #[inline(always)]
    fn list(&mut self, close: u8, mut one: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.skip_whitespace();
        if self.peek() == Some(close) {
            self.pos += 1;
        } else {
            loop {
                one(self)?;
                match self.next_token()? {
                    b',' => continue,
                    b if b == close => break,
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(())
    }

    #[inline(never)]
    fn object(&mut self) -> Option<Json<'a>> {
        let base = self.members.len();
        self.list(b'}', |r| {
            if r.next_token()? != b'"' {
                return None;
            }
            let key = r.string()?;
            if r.next_token()? != b':' {
                return None;
            }
            let value = r.value()?;
            r.members.push((key, value));
            Some(())
        })?;
        let members: Vec<_> = self.members.drain(base..).collect();
        Object::from_members(members).ok().map(Json::Object)
    }

    #[inline(never)]
    fn array(&mut self) -> Option<Json<'a>> {
        let base = self.items.len();
        self.list(b']', |r| {
            let item = r.value()?;
            r.items.push(item);
            Some(())
        })?;
        Some(Json::Array(self.items.drain(base..).collect()))
    }
}
