//! The spool's files: segment names and listing, the committed position's two slots, the
//! dropped list, the dead-letter directory and its space reserve, spare segments, the scan
//! recovery and `spool status` make, the operator's drop, the directory lock.

use super::*;

pub(super) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// `(first_seq, name)` of every segment, oldest first. Only names the writer gives
/// (`<20 digits>.seg`) count; anything else in the directory is left alone.
pub(super) fn list_segments(storage: &dyn Storage) -> io::Result<Vec<(u64, String)>> {
    list_numbered(storage, ".seg")
}

/// A file the writer starts its next segment in instead of a new one: a delivered segment
/// kept rather than deleted, or zeros written ahead. Writing over blocks a file already has
/// spares each sync the block allocation and the size change (on ext4 each `fdatasync` of a
/// growing file writes the inode too; BENCHMARKS.md has the figures). Named
/// `<bound>.spare`: no frame in it has a sequence number above `bound`, and recovery never
/// hands out such a number again, so an old frame can never stand for a new record.
pub(super) fn spare_name(bound: u64) -> String {
    format!("{bound:020}.spare")
}

/// `(bound, name)` of every spare.
pub(super) fn list_spares(storage: &dyn Storage) -> io::Result<Vec<(u64, String)>> {
    list_numbered(storage, ".spare")
}

/// Where zeros are written before they become a spare (removed at open if a crash left it).
pub(super) const SPARE_FILLING: &str = "spare.filling";

/// Writes `bytes` of zeros, durably, and names them a spare. What a crash leaves half done
/// is `SPARE_FILLING`, which no one reads.
pub(super) fn make_spare(storage: &dyn Storage, bytes: u64) -> io::Result<String> {
    let made = (|| {
        let file = storage.open(SPARE_FILLING, true)?;
        file.set_len(0)?;
        let zeros = vec![0; bytes.min(1 << 20) as usize];
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(zeros.len() as u64);
            file.write_at(at, &zeros[..n as usize])?;
            at += n;
        }
        file.sync()?;
        let name = spare_name(0);
        storage.rename(SPARE_FILLING, &name)?;
        Ok(name)
    })();
    if made.is_err() {
        let _ = storage.remove(SPARE_FILLING);
    }
    made
}

fn list_numbered(storage: &dyn Storage, suffix: &str) -> io::Result<Vec<(u64, String)>> {
    let mut segs: Vec<(u64, String)> = storage
        .list()?
        .into_iter()
        .filter_map(|name| {
            let digits = name.strip_suffix(suffix)?;
            let ok = digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit());
            Some((digits.parse().ok().filter(|_| ok)?, name))
        })
        .collect();
    segs.sort();
    Ok(segs)
}

pub(super) fn read_whole(file: &dyn StorageFile) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; file.len()? as usize];
    let n = file.read_at(0, &mut bytes)?;
    bytes.truncate(n);
    Ok(bytes)
}

/// The committed position; every spool has one from its first open.
pub const COMMITTED_FILE: &str = "committed";
pub(super) const SLOT_BYTES: usize = 12;
/// Sequence numbers an operator dropped (`im-relay spool drop`), one per line.
pub(super) const DROPPED_FILE: &str = "dropped";
/// Records no topic would take, and records an operator dropped, each kept as a file.
pub const DEAD_LETTER_DIR: &str = "dead-letter";

/// The committed position: two slots of `seq u64 | crc32c u32`, written alternately in place,
/// so a torn write damages one slot and the other still holds the previous position. A damaged
/// or missing file means "from the start": duplicates, never loss.
pub(super) fn read_committed(storage: &dyn Storage) -> u64 {
    read_position(storage, COMMITTED_FILE)
}

fn read_position(storage: &dyn Storage, name: &str) -> u64 {
    let Ok(file) = storage.open(name, false) else {
        return 0;
    };
    let bytes = read_whole(file.as_ref()).unwrap_or_default();
    bytes
        .chunks_exact(SLOT_BYTES)
        .filter_map(|slot| {
            let (pos, crc) = slot.split_at(8);
            (crc32c::crc32c(pos).to_le_bytes() == crc)
                .then(|| u64::from_le_bytes(pos.try_into().unwrap_or_default()))
        })
        .max()
        .unwrap_or(0)
}

pub(super) fn committed_slot(seq: u64) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..8]);
    slot[8..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The dropped list: one `<seq> <reason>` a line, exactly as `drop_record` writes it. Any
/// other line drops nothing (and is logged): a record is skipped only when an operator's drop
/// said so, and that drop kept its dead-letter copy first.
pub(super) fn read_dropped(storage: &dyn Storage) -> BTreeSet<u64> {
    let Ok(file) = storage.open(DROPPED_FILE, false) else {
        return BTreeSet::new();
    };
    let bytes = read_whole(file.as_ref()).unwrap_or_default();
    let mut dropped = BTreeSet::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match parse_dropped(line) {
            Some(seq) => {
                dropped.insert(seq);
            }
            None => tracing::warn!(
                line = %String::from_utf8_lossy(line),
                "spool: a line of the dropped list is not `<seq> <reason>`; it drops nothing"
            ),
        }
    }
    dropped
}

pub(super) fn parse_dropped(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let (seq, reason) = text.split_once(' ')?;
    let digits = !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit());
    (digits && !reason.chars().any(char::is_control))
        .then(|| seq.parse().ok())
        .flatten()
}

/// Scans the spool read-only: what `spool status` shows and what `open` starts from.
/// What recovery needs to know of one segment: kept per segment, not per frame, so a large
/// backlog costs no memory beyond one segment's bytes at a time.
pub(super) struct SegmentScan {
    pub(super) name: String,
    pub(super) first: u64,
    /// Highest sequence number of an intact frame in it.
    pub(super) last_seq: Option<u64>,
    pub(super) valid_end: u64,
    pub(super) len: u64,
}

pub(super) fn scan_all(storage: &dyn Storage) -> io::Result<(Recovery, Vec<SegmentScan>)> {
    let committed = read_committed(storage);
    let dropped = read_dropped(storage);
    let mut r = Recovery {
        committed,
        dropped: dropped.len(),
        dropped_ahead: dropped.range(committed.saturating_add(1)..).count(),
        ..Recovery::default()
    };
    let mut scans = Vec::new();
    for (first, name) in list_segments(storage)? {
        let bytes = read_whole(storage.open(&name, false)?.as_ref())?;
        let mut last_seq = None;
        let (damaged, valid_end) = frame::visit(&bytes, first, |seq, _, _| {
            last_seq = last_seq.max(Some(seq));
            if seq > committed && !dropped.contains(&seq) {
                r.pending += 1;
            }
        });
        // `visit` counts whatever follows the last intact frame as damage; a write cut short
        // is not, nor are the bytes a recycled file held before.
        let tail = frame::tail(&bytes[valid_end..], first);
        r.segments += 1;
        r.bytes += bytes.len() as u64;
        r.damaged += damaged - usize::from(valid_end < bytes.len() && tail != frame::Tail::Damaged);
        if let frame::Tail::Torn(torn) = tail {
            r.torn_bytes += torn as u64;
        }
        scans.push(SegmentScan {
            name,
            first,
            last_seq,
            valid_end: valid_end as u64,
            len: bytes.len() as u64,
        });
    }
    r.overlapping = overlapping(&scans).len();
    r.set_aside_held = set_aside_held(storage)?;
    Ok((r, scans))
}

/// Where segments recovery cannot read in place are set aside: a spool directory of their own,
/// new for each start that sets any aside (`foreign`, else `foreign.2`, …: one drained before
/// holds a committed position its new segments must not be measured against), published by
/// `im-relay spool drain`. Its committed position is 0: whether a set-aside record was
/// delivered is not known, so all of it is owed (duplicates, never loss).
pub const FOREIGN_DIR: &str = "foreign";

fn is_foreign(dir: &str) -> bool {
    dir == FOREIGN_DIR
        || dir
            .strip_prefix(FOREIGN_DIR)
            .and_then(|r| r.strip_prefix('.'))
            .is_some_and(|n| n.parse::<u64>().is_ok())
}

/// No sequence number goes above this: at a million records a second it is 146,000 years
/// away, so a segment or spare beyond it was not written by this spool (and counting on from
/// it would wrap).
pub(super) const SEQ_LIMIT: u64 = 1 << 62;

/// Segments recovery must not read in place: one whose name an earlier segment's frames run
/// past (copied in from another pod, restored from a backup: read in order, the earlier
/// segment would move the read position over this one's records, skipping them silently), or
/// one beyond `SEQ_LIMIT`. The later-numbered file of a conflict is the one set aside, so live
/// records are never read over. `scans` are in name order.
pub(super) fn overlapping(scans: &[SegmentScan]) -> Vec<usize> {
    let mut read_to: Option<u64> = None;
    let mut out = Vec::new();
    for (i, scan) in scans.iter().enumerate() {
        let last = scan.last_seq.unwrap_or(scan.first);
        if read_to.is_some_and(|r| scan.first <= r) || scan.first.max(last) > SEQ_LIMIT {
            out.push(i);
            continue;
        }
        read_to = read_to.max(scan.last_seq);
    }
    out
}

/// Moves the segments `overlapping` names into a `FOREIGN_DIR`, durably, and says so; returns
/// how many. A spare beyond `SEQ_LIMIT` holds nothing owed and is removed.
pub(super) fn set_aside(storage: &dyn Storage, scans: &[SegmentScan]) -> io::Result<usize> {
    for (bound, name) in list_spares(storage)? {
        if bound > SEQ_LIMIT {
            storage.remove(&name)?;
        }
    }
    let aside = overlapping(scans);
    if aside.is_empty() {
        return Ok(0);
    }
    // A new directory, or one a start that failed part way left with nothing in it.
    let taken = storage.list_dirs()?;
    let mut dir = String::new();
    for n in 1.. {
        dir = match n {
            1 => FOREIGN_DIR.to_owned(),
            n => format!("{FOREIGN_DIR}.{n}"),
        };
        if !taken.contains(&dir) {
            break;
        }
        let unused = storage.list_in(&dir)?.iter().all(|f| !f.ends_with(".seg"))
            && read_position(storage, &format!("{dir}/{COMMITTED_FILE}")) == 0;
        if unused {
            let _ = storage.remove(&format!("{dir}/{DROPPED_FILE}"));
            break;
        }
    }
    storage.create_dir(&dir)?;
    let position = storage.open(&format!("{dir}/{COMMITTED_FILE}"), true)?;
    position.write_at(0, &[committed_slot(0), committed_slot(0)].concat())?;
    position.sync()?;
    let mut moved = 0;
    for i in aside {
        let scan = &scans[i];
        storage.rename(&scan.name, &format!("{dir}/{}", scan.name))?;
        // The new name durable before the old one goes: a power cut between finds it in both
        // places (set aside again at the next start), never in neither.
        storage.sync_dir(&dir)?;
        storage.sync_dir("")?;
        SpoolSegmentSetAside {
            segment: &scan.name,
            first: scan.first,
            last: scan.last_seq,
            dir: &dir,
        }
        .emit();
        moved += 1;
    }
    Ok(moved)
}

/// Segments holding records in the `FOREIGN_DIR`s (empty ones are what a drain's writer left).
pub(super) fn set_aside_held(storage: &dyn Storage) -> io::Result<usize> {
    let mut held = 0;
    for dir in storage.list_dirs()?.iter().filter(|d| is_foreign(d)) {
        let names = storage.list_in(dir)?;
        for name in names.iter().filter(|n| n.ends_with(".seg")) {
            let file = storage.open(&format!("{dir}/{name}"), false)?;
            held += usize::from(file.len()? > 0);
        }
    }
    Ok(held)
}

/// Scans the spool in `dir` read-only (what `spool status` shows).
pub fn inspect(dir: &Path) -> io::Result<Recovery> {
    scan_all(&Disk {
        dir: dir.to_path_buf(),
    })
    .map(|(r, _)| r)
}

/// Every record not yet committed, as `(seq, payload)`, oldest first, read-only; stops early
/// once `f` returns false.
pub fn each_pending(dir: &Path, mut f: impl FnMut(u64, &[u8]) -> bool) -> io::Result<()> {
    let storage = Disk {
        dir: dir.to_path_buf(),
    };
    let committed = read_committed(&storage);
    let dropped = read_dropped(&storage);
    for (first, name) in list_segments(&storage)? {
        let bytes = read_whole(storage.open(&name, false)?.as_ref())?;
        let mut more = true;
        frame::visit(&bytes, first, |seq, at, _| {
            if more
                && seq > committed
                && !dropped.contains(&seq)
                && let frame::Decoded::Frame { payload, .. } = frame::decode(&bytes[at..], first)
            {
                more = f(seq, payload);
            }
        });
        if !more {
            return Ok(());
        }
    }
    Ok(())
}

/// Keeps `payload` (record `seq`) in the dead-letter directory with `reason`: the entry as it
/// was spooled, and a text file saying why. Durable before it returns. A sequence number can
/// come again (after a power cut in `never` or `interval` mode, or segments an operator wiped):
/// another record's copy gets a name of its own (`<seq>-<n>.entry`), never the first one's.
/// The same record again (dead-lettered before a crash, not yet committed) is written over its
/// own copy: on a full disk a second copy may find no room.
pub fn write_dead_letter(
    storage: &dyn Storage,
    seq: u64,
    payload: &[u8],
    reason: &str,
) -> io::Result<()> {
    storage.create_dir(DEAD_LETTER_DIR)?;
    let taken = |stem: &str| match storage.open(&format!("{stem}.entry"), false) {
        Ok(file) => Ok(read_whole(file.as_ref())? != payload),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    let mut stem = format!("{DEAD_LETTER_DIR}/{seq:020}");
    let mut copy = 0u64;
    while taken(&stem)? {
        copy += 1;
        stem = format!("{DEAD_LETTER_DIR}/{seq:020}-{copy}");
    }
    // The reason first: an `.entry` is what marks a name taken, so it goes in last.
    let names = [format!("{stem}.reason"), format!("{stem}.entry")];
    let written = (|| {
        for (name, bytes) in names.iter().zip([reason.as_bytes(), payload]) {
            let file = storage.open(name, true)?;
            file.set_len(0)?;
            file.write_at(0, bytes)?;
            file.sync()?;
        }
        storage.sync_dir(DEAD_LETTER_DIR)?;
        storage.sync_dir("")
    })();
    if written.is_err() {
        // A half-written copy would only hold space a full disk needs back.
        for name in &names {
            let _ = storage.remove(name);
        }
    }
    written
}

/// Space set aside (written, so it is really allocated) for one dead-letter copy on a full
/// disk; a record larger than this waits there until space returns.
pub(super) const RESERVE_FILE: &str = "dead-letter/reserve";
pub(super) const RESERVE_MAX_BYTES: u64 = (4 << 20) + (64 << 10);

/// True once the reserve is in place, whole and durable.
pub(super) fn make_reserve(storage: &dyn Storage, bytes: u64) -> bool {
    if storage
        .open(RESERVE_FILE, false)
        .and_then(|f| f.len())
        .is_ok_and(|len| len == bytes)
    {
        return true;
    }
    let made = (|| {
        storage.create_dir(DEAD_LETTER_DIR)?;
        let file = storage.open(RESERVE_FILE, true)?;
        file.set_len(0)?;
        file.write_at(0, &vec![0; bytes as usize])?;
        file.sync()?;
        storage.sync_dir(DEAD_LETTER_DIR)
    })();
    if made.is_err() {
        let _ = storage.remove(RESERVE_FILE);
    }
    made.is_ok()
}

/// `im-relay spool drop`: gives up record `seq` for good. Only with the relay stopped (the
/// directory lock says so); the record is kept in the dead-letter directory with `reason`
/// first, then listed in the `dropped` file, which the reader skips.
pub fn drop_record(dir: &Path, seq: u64, reason: &str) -> io::Result<()> {
    let dropped = drop_records(dir, |s, _| s == seq, reason)?;
    if dropped.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no record {seq} waits in the spool (committed or never written)"),
        ));
    }
    Ok(())
}

/// `drop_record` for every waiting record `select(seq, payload)` picks (a range, or every
/// entry this version cannot read); returns their numbers. Each is in the dead-letter
/// directory before any is listed as dropped.
pub fn drop_records(
    dir: &Path,
    mut select: impl FnMut(u64, &[u8]) -> bool,
    reason: &str,
) -> io::Result<Vec<u64>> {
    // The list is one record a line: a line break in the reason would drop another record
    // without its dead-letter copy.
    if reason.is_empty() || reason.chars().any(char::is_control) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the reason must be one line of text, without control characters",
        ));
    }
    let storage = Disk {
        dir: dir.to_path_buf(),
    };
    let _lock = lock(dir)?;
    let why = format!("dropped by an operator: {reason}");
    let mut seqs = Vec::new();
    let mut failed = None;
    each_pending(dir, |seq, payload| {
        if select(seq, payload) {
            match write_dead_letter(&storage, seq, payload, &why) {
                Ok(()) => seqs.push(seq),
                Err(error) => failed = Some(error),
            }
        }
        failed.is_none()
    })?;
    // What was copied is listed even when a later copy failed: the copies are kept either way.
    if !seqs.is_empty() {
        let lines: String = seqs.iter().map(|seq| format!("{seq} {reason}\n")).collect();
        let file = storage.open(DROPPED_FILE, true)?;
        let len = file.len()?;
        // A line a power cut tore must not run into the next one's number.
        let mut last = [b'\n'];
        if len > 0 {
            file.read_at(len - 1, &mut last)?;
        }
        let lines = if last[0] == b'\n' {
            lines
        } else {
            format!("\n{lines}")
        };
        file.write_at(len, lines.as_bytes())?;
        file.sync()?;
        storage.sync_dir("")?;
    }
    failed.map_or(Ok(seqs), Err)
}

pub(super) fn lock(dir: &Path) -> io::Result<File> {
    let lock = File::create(dir.join("lock"))?;
    lock.try_lock().map_err(|_| {
        io::Error::other(format!("{} is in use by another im-relay", dir.display()))
    })?;
    Ok(lock)
}
