//! The spool's on-disk frame: `magic u32 | len u32 | seq u64 | crc32c u32 | payload`, all
//! little-endian; the checksum covers `len`, `seq` and the payload — and, in `IMR2` frames, the
//! segment's generation: its first sequence number, which names its file. A segment may be
//! written over a recycled one (`segments::spare_name`): a frame left from the file's earlier
//! use holds a number below the segment's first and is never read as a frame of this use (an
//! `IMR2` one would not even check). The magic lets a scan find the next frame after a damaged
//! one, so one flipped byte costs one record, not a segment.
//!
//! This version reads both and writes `IMR1`: the previous version cannot read `IMR2` and would
//! cut such frames off at its start, so a rollback would lose what waits in the spool. The
//! next version, which every later rollback reaches first, can write `IMR2`.

pub const MAGIC: u32 = 0x3252_4d49; // "IMR2" read little-endian
const LEGACY_MAGIC: u32 = 0x3152_4d49; // "IMR1"
/// What `encode` writes (see above).
const WRITTEN_MAGIC: u32 = LEGACY_MAGIC;
pub const HEADER_BYTES: usize = 20;
/// No frame is larger: a callback body is capped far below, and a length beyond this is damage.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_PAYLOAD_BYTES;

fn checksum(magic: u32, len: u32, seq: u64, generation: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 20];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..12].copy_from_slice(&seq.to_le_bytes());
    head[12..].copy_from_slice(&generation.to_le_bytes());
    let head = if magic == LEGACY_MAGIC {
        &head[..12]
    } else {
        &head[..]
    };
    crc32c::crc32c_append(crc32c::crc32c(head), payload)
}

/// Appends one encoded frame of the segment whose first sequence number is `generation`.
pub fn encode(generation: u64, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    encode_as(WRITTEN_MAGIC, generation, seq, payload, out)
}

fn encode_as(magic: u32, generation: u64, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(seq >= generation);
    let len = u32::try_from(payload.len()).expect("payload bounded by MAX_PAYLOAD_BYTES");
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&checksum(magic, len, seq, generation, payload).to_le_bytes());
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

/// `(magic, len, seq)` of a header that claims to start a frame of segment `generation` here.
fn header(buf: &[u8], generation: u64) -> Option<(u32, u32, u64)> {
    let head = buf.get(..HEADER_BYTES)?;
    let magic = u32_at(head, 0);
    let len = u32_at(head, 4);
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let ours = (magic == MAGIC || magic == LEGACY_MAGIC)
        && len as usize <= MAX_PAYLOAD_BYTES
        && seq >= generation;
    ours.then_some((magic, len, seq))
}

/// What is at the start of `buf`, in the segment whose first sequence number is `generation`.
pub fn decode(buf: &[u8], generation: u64) -> Decoded<'_> {
    if buf.len() < HEADER_BYTES {
        let prefix = &buf[..buf.len().min(4)];
        let ours = |m: u32| m.to_le_bytes().starts_with(prefix);
        return if ours(MAGIC) || ours(LEGACY_MAGIC) {
            Decoded::Incomplete
        } else {
            Decoded::Damaged
        };
    }
    let Some((magic, len, seq)) = header(buf, generation) else {
        return Decoded::Damaged;
    };
    let size = HEADER_BYTES + len as usize;
    if buf.len() < size {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER_BYTES..size];
    if checksum(magic, len, seq, generation, payload) != u32_at(buf, 16) {
        return Decoded::Damaged;
    }
    Decoded::Frame { seq, payload, size }
}

/// What follows the last intact frame of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Nothing, or only what an earlier use of the file left (or a spare's zeros).
    Clean,
    /// A write cut short (never acknowledged): this many bytes of it.
    Torn(usize),
    /// A frame of this segment that does not check: at least one record lost.
    Damaged,
}

/// Classifies `rest`, the bytes after the last intact frame of segment `generation`.
pub fn tail(rest: &[u8], generation: u64) -> Tail {
    if rest.is_empty() {
        return Tail::Clean;
    }
    if decode(rest, generation) == Decoded::Incomplete {
        return Tail::Torn(rest.len());
    }
    let claimed = |at: usize| header(&rest[at..], generation).map(|h| HEADER_BYTES + h.1 as usize);
    // A frame begun over a recycled file's old bytes: the file does not end where it does.
    if let Some(size) = claimed(0)
        && size < rest.len()
    {
        return Tail::Torn(size);
    }
    if headers_from(rest, 0, generation).next().is_some() {
        Tail::Damaged
    } else {
        Tail::Clean
    }
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
pub fn scan(buf: &[u8], generation: u64) -> Scan {
    let mut frames = Vec::new();
    let (damaged, valid_end) = visit(buf, generation, |seq, at, size| {
        frames.push((seq, at, size))
    });
    Scan {
        frames,
        damaged,
        valid_end,
    }
}

/// The same pass, keeping nothing: `f(seq, offset, size)` for every intact frame. Returns
/// (damaged stretches, end of the last intact frame). Recovery uses this, so its memory does
/// not grow with the spool.
pub fn visit(buf: &[u8], generation: u64, mut f: impl FnMut(u64, usize, usize)) -> (usize, usize) {
    let (mut damaged, mut valid_end) = (0, 0);
    let mut at = 0;
    while at < buf.len() {
        if let Decoded::Frame { seq, size, .. } = decode(&buf[at..], generation) {
            f(seq, at, size);
            at += size;
            valid_end = at;
            continue;
        }
        // Damaged here (a torn tail is damage too: one record was lost there).
        damaged += 1;
        match next_frame(buf, at + 1, generation) {
            Some(next) => at = next,
            None => break,
        }
    }
    (damaged, valid_end)
}

/// Offset of the first intact frame at or after `from`.
fn next_frame(buf: &[u8], from: usize, generation: u64) -> Option<usize> {
    headers_from(buf, from, generation)
        .find(|&i| matches!(decode(&buf[i..], generation), Decoded::Frame { .. }))
}

/// Offsets at or after `from` where a header of segment `generation` starts. Both magics
/// begin with the same byte, so only where it stands is a header tried: byte by byte, the
/// zeros after a recycled segment's last frame (64 MiB after a crash) took recovery seconds,
/// and an unoptimized build restarting under load past a 20 s readiness wait.
fn headers_from(buf: &[u8], from: usize, generation: u64) -> impl Iterator<Item = usize> + '_ {
    const FIRST: u8 = MAGIC.to_le_bytes()[0];
    const _: () = assert!(LEGACY_MAGIC.to_le_bytes()[0] == FIRST);
    memchr::memchr_iter(FIRST, buf.get(from..).unwrap_or_default())
        .map(move |i| from + i)
        .filter(move |&i| header(&buf[i..], generation).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segment `generation` holding `payloads` as records `generation`, `generation + 1`, …
    fn segment_of(generation: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode(generation, generation + i as u64, p, &mut out);
        }
        out
    }

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        segment_of(1, payloads)
    }

    fn seqs(s: &Scan) -> Vec<u64> {
        s.frames.iter().map(|f| f.0).collect()
    }

    #[test]
    fn round_trip() {
        let buf = segment(&[b"one", b"", b"three"]);
        let s = scan(&buf, 1);
        assert_eq!(seqs(&s), [1, 2, 3]);
        assert_eq!(s.damaged, 0);
        assert_eq!(s.valid_end, buf.len());
        match decode(&buf[s.frames[2].1..], 1) {
            Decoded::Frame { payload, .. } => assert_eq!(payload, b"three"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tail_cut_anywhere_keeps_every_whole_frame() {
        let buf = segment(&[b"alpha", b"beta", b"gamma"]);
        let whole = scan(&buf, 1).frames;
        for cut in 0..buf.len() {
            let s = scan(&buf[..cut], 1);
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
        let second = scan(&buf, 1).frames[1];
        for i in second.1..second.1 + second.2 {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            let s = scan(&bad, 1);
            assert_eq!(seqs(&s), [1, 3], "byte {i}");
            assert_eq!(s.damaged, 1, "byte {i}");
            assert_eq!(s.valid_end, buf.len(), "byte {i}");
        }
    }

    #[test]
    fn garbage_is_never_a_frame() {
        assert_eq!(decode(b"garbage garbage garbage", 1), Decoded::Damaged);
        let mut huge = Vec::new();
        huge.extend_from_slice(&MAGIC.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&huge, 1), Decoded::Damaged);
    }

    #[test]
    fn a_frame_is_read_only_in_its_own_generation() {
        for magic in [MAGIC, LEGACY_MAGIC] {
            let mut buf = Vec::new();
            encode_as(magic, 10, 12, b"payload", &mut buf);
            assert!(matches!(decode(&buf, 10), Decoded::Frame { seq: 12, .. }));
            // The same bytes in a file now used by a later segment: never a record there.
            assert_eq!(decode(&buf, 13), Decoded::Damaged, "{magic:x}");
        }
        // `IMR2` does not even check under another generation at or below its number.
        let mut buf = Vec::new();
        encode_as(MAGIC, 10, 12, b"payload", &mut buf);
        assert_eq!(decode(&buf, 11), Decoded::Damaged);
    }

    #[test]
    fn this_version_writes_what_the_previous_one_reads() {
        // The previous version's decoder: magic IMR1, checksum over len | seq | payload.
        let mut buf = Vec::new();
        encode(5, 7, b"for a rollback", &mut buf);
        assert_eq!(u32_at(&buf, 0), 0x3152_4d49);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[4..16]), b"for a rollback");
        assert_eq!(u32_at(&buf, 16), crc);
        match decode(&buf, 5) {
            Decoded::Frame { seq, payload, .. } => {
                assert_eq!((seq, payload), (7, &b"for a rollback"[..]))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A recycled file: segment 100's frames written over what segment 1 left.
    fn written_over(new: &[u8]) -> Vec<u8> {
        let old: Vec<Vec<u8>> = (0..40).map(|i| vec![b'o'; 30 + i]).collect();
        let mut file = Vec::new();
        for (i, p) in old.iter().enumerate() {
            // Old frames of both kinds.
            let magic = if i % 2 == 0 { MAGIC } else { LEGACY_MAGIC };
            encode_as(magic, 1, 1 + i as u64, p, &mut file);
        }
        file[..new.len()].copy_from_slice(new);
        file
    }

    #[test]
    fn what_an_earlier_use_left_is_neither_a_record_nor_damage() {
        let new = segment_of(100, &[b"alpha", b"beta", b"gamma"]);
        let file = written_over(&new);
        let s = scan(&file, 100);
        assert_eq!(seqs(&s), [100, 101, 102]);
        assert_eq!(s.valid_end, new.len());
        assert_eq!(tail(&file[s.valid_end..], 100), Tail::Clean);
        // A pre-allocated spare holds zeros.
        let mut zeros = new.clone();
        zeros.resize(4096, 0);
        assert_eq!(scan(&zeros, 100).frames.len(), 3);
        assert_eq!(tail(&zeros[new.len()..], 100), Tail::Clean);
    }

    #[test]
    fn a_write_cut_short_over_old_bytes_is_torn() {
        let new = segment_of(100, &[b"alpha", b"beta", b"gamma"]);
        for cut in new.len() - 5 + HEADER_BYTES..new.len() - 1 {
            // `gamma`'s header reached the file, the end of its payload did not.
            let gamma = new.len() - (HEADER_BYTES + 5);
            let file = written_over(&new[..cut]);
            let s = scan(&file, 100);
            assert_eq!(seqs(&s), [100, 101], "cut at {cut}");
            assert_eq!(
                tail(&file[s.valid_end..], 100),
                Tail::Torn(HEADER_BYTES + 5)
            );
            assert_eq!(s.valid_end, gamma);
        }
    }

    #[test]
    fn a_flipped_byte_over_old_bytes_is_still_damage() {
        let new = segment_of(100, &[b"alpha", b"beta", b"gamma"]);
        let second = scan(&new, 100).frames[1];
        let mut file = written_over(&new);
        file[second.1 + HEADER_BYTES + 1] ^= 0x40;
        let s = scan(&file, 100);
        assert_eq!(seqs(&s), [100, 102]);
        assert_eq!(
            s.damaged, 2,
            "the flipped frame, and the old bytes after the last"
        );
        assert_eq!(tail(&file[s.valid_end..], 100), Tail::Clean);
        // The last frame flipped, old bytes after it: no different from a write cut short, so
        // it counts as torn (the record is lost either way; only which count says so differs).
        let mut file = written_over(&new);
        file[new.len() - 2] ^= 0x40;
        let s = scan(&file, 100);
        assert_eq!(seqs(&s), [100, 101]);
        assert_eq!(
            tail(&file[s.valid_end..], 100),
            Tail::Torn(HEADER_BYTES + 5)
        );
        // In a file that ends with it, it is damage, as before recycling.
        let mut whole = new.clone();
        whole[new.len() - 2] ^= 0x40;
        let s = scan(&whole, 100);
        assert_eq!(tail(&whole[s.valid_end..], 100), Tail::Damaged);
    }
}
