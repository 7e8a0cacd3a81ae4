//! The spool's on-disk frame: `magic u32 | len u32 | seq u64 | crc32c u32 | payload`, all
//! little-endian; the checksum covers `len`, `seq` and the payload. The magic lets a scan find
//! the next frame after a damaged one, so one flipped byte costs one record, not a segment.

pub const MAGIC: u32 = 0x3152_4d49; // "IMR1" read little-endian
pub const HEADER_BYTES: usize = 20;
/// No frame is larger: a callback body is capped far below, and a length beyond this is damage.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_PAYLOAD_BYTES;

pub fn checksum(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Appends one encoded frame to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("payload bounded by MAX_PAYLOAD_BYTES");
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&checksum(len, seq, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What is at one offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Frame {
        seq: u64,
        payload: &'a [u8],
        size: usize,
    },
    /// Too few bytes for a whole frame: a torn tail, or a write still to come.
    Incomplete,
    /// Not a valid frame here.
    Damaged,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn decode(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < HEADER_BYTES {
        return if MAGIC.to_le_bytes().starts_with(&buf[..buf.len().min(4)]) {
            Decoded::Incomplete
        } else {
            Decoded::Damaged
        };
    }
    if u32_at(buf, 0) != MAGIC {
        return Decoded::Damaged;
    }
    let len = u32_at(buf, 4);
    if len as usize > MAX_PAYLOAD_BYTES {
        return Decoded::Damaged;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let size = HEADER_BYTES + len as usize;
    if buf.len() < size {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER_BYTES..size];
    if checksum(len, seq, payload) != u32_at(buf, 16) {
        return Decoded::Damaged;
    }
    Decoded::Frame { seq, payload, size }
}

/// One pass over a whole segment's bytes (tests and the simulation look at every frame).
#[cfg(test)]
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// `(seq, offset, size)` of every intact frame, in file order.
    pub frames: Vec<(u64, usize, usize)>,
    /// Damaged stretches skipped (each is at least one lost frame).
    pub damaged: usize,
    /// End of the last intact frame: anything after it is a torn tail.
    pub valid_end: usize,
}

/// Reads every intact frame; after damage, searches forward for the next valid frame.
#[cfg(test)]
pub fn scan(buf: &[u8]) -> Scan {
    let mut frames = Vec::new();
    let (damaged, valid_end) = visit(buf, |seq, at, size| frames.push((seq, at, size)));
    Scan {
        frames,
        damaged,
        valid_end,
    }
}

/// The same pass, keeping nothing: `f(seq, offset, size)` for every intact frame. Returns
/// (damaged stretches, end of the last intact frame). Recovery uses this, so its memory does
/// not grow with the spool.
pub fn visit(buf: &[u8], mut f: impl FnMut(u64, usize, usize)) -> (usize, usize) {
    let (mut damaged, mut valid_end) = (0, 0);
    let mut at = 0;
    while at < buf.len() {
        if let Decoded::Frame { seq, size, .. } = decode(&buf[at..]) {
            f(seq, at, size);
            at += size;
            valid_end = at;
            continue;
        }
        // Damaged here (a torn tail is damage too: one record was lost there).
        damaged += 1;
        match next_frame(buf, at + 1) {
            Some(next) => at = next,
            None => break,
        }
    }
    (damaged, valid_end)
}

/// Offset of the first intact frame at or after `from`.
fn next_frame(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    (from..buf.len().saturating_sub(HEADER_BYTES - 1))
        .filter(|&i| buf[i..].starts_with(&magic))
        .find(|&i| matches!(decode(&buf[i..]), Decoded::Frame { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode(i as u64 + 1, p, &mut out);
        }
        out
    }

    fn seqs(s: &Scan) -> Vec<u64> {
        s.frames.iter().map(|f| f.0).collect()
    }

    #[test]
    fn round_trip() {
        let buf = segment(&[b"one", b"", b"three"]);
        let s = scan(&buf);
        assert_eq!(seqs(&s), [1, 2, 3]);
        assert_eq!(s.damaged, 0);
        assert_eq!(s.valid_end, buf.len());
        match decode(&buf[s.frames[2].1..]) {
            Decoded::Frame { payload, .. } => assert_eq!(payload, b"three"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tail_cut_anywhere_keeps_every_whole_frame() {
        let buf = segment(&[b"alpha", b"beta", b"gamma"]);
        let whole = scan(&buf).frames;
        for cut in 0..buf.len() {
            let s = scan(&buf[..cut]);
            let intact: Vec<_> = whole.iter().filter(|f| f.1 + f.2 <= cut).copied().collect();
            assert_eq!(s.frames, intact, "cut at {cut}");
            let end = intact.last().map_or(0, |f| f.1 + f.2);
            assert_eq!(s.valid_end, end, "cut at {cut}");
            assert_eq!(s.damaged, usize::from(cut > end), "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_byte_costs_exactly_one_frame() {
        let buf = segment(&[b"alpha", b"beta", b"gamma"]);
        let second = scan(&buf).frames[1];
        for i in second.1..second.1 + second.2 {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            let s = scan(&bad);
            assert_eq!(seqs(&s), [1, 3], "byte {i}");
            assert_eq!(s.damaged, 1, "byte {i}");
            assert_eq!(s.valid_end, buf.len(), "byte {i}");
        }
    }

    #[test]
    fn garbage_is_never_a_frame() {
        assert_eq!(decode(b"garbage garbage garbage"), Decoded::Damaged);
        let mut huge = Vec::new();
        huge.extend_from_slice(&MAGIC.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&huge), Decoded::Damaged);
    }
}
