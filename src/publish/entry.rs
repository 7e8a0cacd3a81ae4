//! What the publisher keeps in the spool for one Kafka record: which topic, key, headers,
//! value, and when the callback arrived. A small length-prefixed binary layout, versioned by
//! its first byte.

/// Which topic an entry goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Messages,
    Quarantine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub target: Target,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
    /// Unix milliseconds; for the delivery latency and the backlog's age.
    pub received_at_ms: u64,
}

const VERSION: u8 = 1;

impl Entry {
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
        let key_len = self.key.as_ref().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(32 + key_len + self.value.len() + 64 * self.headers.len());
        out.push(VERSION);
        out.push(match self.target {
            Target::Messages => 0,
            Target::Quarantine => 1,
        });
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        match &self.key {
            Some(k) => put(&mut out, k),
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (name, value) in &self.headers {
            put(&mut out, name.as_bytes());
            put(&mut out, value);
        }
        put(&mut out, &self.value);
        out
    }

    /// `None` for bytes that are not an entry (the spool's checksum makes that unlikely).
    pub fn decode(mut b: &[u8]) -> Option<Entry> {
        let [version, target, rest @ ..] = b else {
            return None;
        };
        if *version != VERSION {
            return None;
        }
        let target = match target {
            0 => Target::Messages,
            1 => Target::Quarantine,
            _ => return None,
        };
        b = rest;
        let received_at_ms = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let key = if b.get(..4)? == u32::MAX.to_le_bytes() {
            b = &b[4..];
            None
        } else {
            Some(get(&mut b)?.to_vec())
        };
        let count = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        let mut headers = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            let name = String::from_utf8(get(&mut b)?.to_vec()).ok()?;
            headers.push((name, get(&mut b)?.to_vec()));
        }
        let value = get(&mut b)?.to_vec();
        b.is_empty().then_some(Entry {
            target,
            key,
            headers,
            value,
            received_at_ms,
        })
    }
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

    #[test]
    fn round_trips_and_refuses_truncation() {
        let e = Entry {
            target: Target::Quarantine,
            key: Some(b"k".to_vec()),
            headers: vec![("a".into(), b"1".to_vec()), ("ce_id".into(), "你好".into())],
            value: b"{\"x\":1}".to_vec(),
            received_at_ms: 1_700_000_000_123,
        };
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(Entry::decode(&bytes[..cut]), None, "cut {cut}");
        }
        let keyless = Entry { key: None, ..e };
        assert_eq!(Entry::decode(&keyless.encode()), Some(keyless));
    }
}
