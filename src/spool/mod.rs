//! Stage 4 of the road: **spool**. Every accepted record is appended here — checksummed frames
//! in a directory of append-only segment files — *before* Tencent gets its `OK`, and the
//! publisher reads it back from the last committed position. Knows frames, bytes and
//! positions; not Tencent, not Kafka.
//!
//! - One writer thread owns the active segment. Concurrent appends queue on a channel and are
//!   written together, with at most one sync per batch (group commit).
//! - `Fsync::Always` syncs the data (and, once, the directory entry of a new segment) before
//!   answering: survives power loss. `Interval` and `Never` rely on the page cache, which
//!   survives a process crash (kill -9) but not a power cut. `Interval` syncs on a second
//!   thread through a bounded queue, so appends rarely wait for the disk.
//! - Positions are frame sequence numbers. The committed position (everything at or below it
//!   is in Kafka) lives in the `committed` file, overwritten in place in one of two slots so
//!   that advancing it never needs new disk space; segments wholly below it are deleted.
//! - A failed write is cut off again before anything else is written; a write or sync that
//!   takes longer than the append deadline turns readiness red.
//! - On open, every segment is scanned: damaged frames are skipped and counted, torn tails are
//!   cut, and the next sequence number never falls below an existing segment's name.
//! - The file system sits behind the `Storage` trait: `std::fs` in production, a simulated
//!   disk with faults and power cuts in the simulation tests.

mod frame;
pub mod storage;

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::telemetry::{
    SpoolAppended, SpoolDamage, SpoolSyncFailed, SpoolSynced, SpoolWriteFailed,
};
pub use storage::{Disk, Storage, StorageFile};

/// When appended bytes are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before the append is acknowledged: no acknowledged record is lost even on power loss.
    Always,
    /// At most this long after the append; a power cut may lose that window.
    Interval(Duration),
    /// Left to the operating system.
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            _ => {
                let ms: u64 = s
                    .strip_prefix("interval:")
                    .ok_or(())?
                    .parse()
                    .map_err(|_| ())?;
                if ms == 0 {
                    return Err(());
                }
                Ok(Fsync::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bound on the bytes of all segments; appends beyond it are refused.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    pub fsync: Fsync,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// `max_bytes` reached: nothing was written.
    #[error("the spool is full")]
    Full,
    /// The disk refused the write (or the writer is gone); nothing was kept. (The kind and
    /// the text, not the `io::Error`: one failed write answers every record of its batch.)
    #[error("the spool could not take the record: {message}")]
    Io {
        kind: io::ErrorKind,
        message: String,
    },
}

impl AppendError {
    fn io(error: &io::Error) -> AppendError {
        AppendError::Io {
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    fn writer_stopped() -> AppendError {
        AppendError::Io {
            kind: io::ErrorKind::BrokenPipe,
            message: "spool writer stopped".into(),
        }
    }
}

/// What open found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub committed: u64,
    /// Intact records above the committed position: still to publish.
    pub pending: u64,
    pub segments: usize,
    pub bytes: u64,
    /// Damaged stretches skipped (each lost at least one record).
    pub damaged: usize,
    /// Bytes of a write cut short by a crash (never acknowledged), at segment ends.
    pub torn_bytes: u64,
    /// Records an operator dropped with `im-relay spool drop`.
    pub dropped: usize,
}

/// Where the writer is: what the reader may read of the active segment.
#[derive(Debug, Clone, Copy)]
struct Tail {
    /// First sequence number of the segment the writer appends to; never deleted.
    active_first: u64,
    /// Bytes of the active segment that hold whole, acknowledged frames.
    active_end: u64,
    /// Highest sequence number written (and readable).
    appended: u64,
}

/// State shared by the writer, the reader and whoever asks about the spool.
pub struct Shared {
    storage: Arc<dyn Storage>,
    max_bytes: u64,
    fsync: Fsync,
    total_bytes: AtomicU64,
    appended: AtomicU64,
    committed: AtomicU64,
    tail: Mutex<Tail>,
    /// The last write failed: callbacks are refused until one succeeds.
    disk_error: AtomicBool,
    /// The last background sync failed (`Interval`): acknowledged records may not survive a
    /// power cut until a later sync succeeds.
    sync_failed: AtomicBool,
    /// When the write or sync in progress began (ms since `epoch`, plus one); 0 when idle.
    busy_since: AtomicU64,
    epoch: Instant,
    /// Size of the dead-letter reserve.
    reserve_bytes: u64,
    /// Held for the spool's lifetime: one relay per spool directory.
    _lock: Option<File>,
}

impl Shared {
    pub fn bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Records appended and not yet committed as delivered (may count a few skipped
    /// sequence numbers after a failed write).
    pub fn backlog(&self) -> u64 {
        let appended = self.appended.load(Ordering::Relaxed);
        appended.saturating_sub(self.committed.load(Ordering::Relaxed))
    }

    /// Room for a record of `bytes`, and the disk took the last write.
    pub fn can_take(&self, bytes: u64) -> bool {
        !self.disk_error.load(Ordering::Relaxed)
            && self.bytes() + bytes + frame::HEADER_BYTES as u64 <= self.max_bytes
    }

    /// Why the spool cannot promise to keep a new callback now, if it cannot: full, the disk
    /// refusing writes or syncs, or a write hanging for longer than `deadline`.
    pub fn trouble(&self, room: u64, deadline: Duration) -> Option<&'static str> {
        let busy = self.busy_since.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        if busy != 0 && now.saturating_sub(busy) > deadline.as_millis() as u64 {
            Some("spool disk not answering")
        } else if !self.can_take(room) {
            Some("spool full or disk failing")
        } else if self.sync_failed.load(Ordering::Relaxed) {
            Some("spool sync failing")
        } else {
            None
        }
    }

    fn tail(&self) -> Tail {
        *self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_tail(&self, f: impl FnOnce(&mut Tail)) {
        f(&mut self.tail.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn busy(&self, yes: bool) {
        let v = if yes {
            self.epoch.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        self.busy_since.store(v, Ordering::Relaxed);
    }
}

struct AppendRequest {
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<u64, AppendError>>,
}

/// Cloneable handle for appending; the writer thread stops when every handle is dropped.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<AppendRequest>,
}

impl Appender {
    /// Appends one record; returns its sequence number once it is written (and synced, with
    /// `Fsync::Always`).
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(AppendRequest { payload, reply })
            .map_err(|_| AppendError::writer_stopped())?;
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::writer_stopped()))
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// `(first_seq, name)` of every segment, oldest first. Only names the writer gives
/// (`<20 digits>.seg`) count; anything else in the directory is left alone.
fn list_segments(storage: &dyn Storage) -> io::Result<Vec<(u64, String)>> {
    let mut segs: Vec<(u64, String)> = storage
        .list()?
        .into_iter()
        .filter_map(|name| {
            let digits = name.strip_suffix(".seg")?;
            let ok = digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit());
            Some((digits.parse().ok().filter(|_| ok)?, name))
        })
        .collect();
    segs.sort();
    Ok(segs)
}

fn read_whole(file: &dyn StorageFile) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; file.len()? as usize];
    let n = file.read_at(0, &mut bytes)?;
    bytes.truncate(n);
    Ok(bytes)
}

const COMMITTED_FILE: &str = "committed";
const SLOT_BYTES: usize = 12;
/// Sequence numbers an operator dropped (`im-relay spool drop`), one per line.
const DROPPED_FILE: &str = "dropped";
/// Records no topic would take, and records an operator dropped, each kept as a file.
pub const DEAD_LETTER_DIR: &str = "dead-letter";

/// The committed position: two slots of `seq u64 | crc32c u32`, written alternately in place,
/// so a torn write damages one slot and the other still holds the previous position. A damaged
/// or missing file means "from the start": duplicates, never loss.
fn read_committed(storage: &dyn Storage) -> u64 {
    let Ok(file) = storage.open(COMMITTED_FILE, false) else {
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

fn committed_slot(seq: u64) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..8]);
    slot[8..].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn read_dropped(storage: &dyn Storage) -> BTreeSet<u64> {
    let Ok(file) = storage.open(DROPPED_FILE, false) else {
        return BTreeSet::new();
    };
    let bytes = read_whole(file.as_ref()).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Scans the spool read-only: what `spool status` shows and what `open` starts from.
/// What recovery needs to know of one segment: kept per segment, not per frame, so a large
/// backlog costs no memory beyond one segment's bytes at a time.
struct SegmentScan {
    name: String,
    first: u64,
    /// Highest sequence number of an intact frame in it.
    last_seq: Option<u64>,
    valid_end: u64,
    len: u64,
}

fn scan_all(storage: &dyn Storage) -> io::Result<(Recovery, Vec<SegmentScan>)> {
    let committed = read_committed(storage);
    let dropped = read_dropped(storage);
    let mut r = Recovery {
        committed,
        dropped: dropped.len(),
        ..Recovery::default()
    };
    let mut scans = Vec::new();
    for (first, name) in list_segments(storage)? {
        let bytes = read_whole(storage.open(&name, false)?.as_ref())?;
        let mut last_seq = None;
        let (damaged, valid_end) = frame::visit(&bytes, |seq, _, _| {
            last_seq = last_seq.max(Some(seq));
            if seq > committed && !dropped.contains(&seq) {
                r.pending += 1;
            }
        });
        // A tail too short for the frame it starts is a write cut short, not damage.
        let tail = &bytes[valid_end..];
        let torn = !tail.is_empty() && frame::decode(tail) == frame::Decoded::Incomplete;
        r.segments += 1;
        r.bytes += bytes.len() as u64;
        r.damaged += damaged - usize::from(torn);
        if torn {
            r.torn_bytes += tail.len() as u64;
        }
        scans.push(SegmentScan {
            name,
            first,
            last_seq,
            valid_end: valid_end as u64,
            len: bytes.len() as u64,
        });
    }
    Ok((r, scans))
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
    for (_, name) in list_segments(&storage)? {
        let bytes = read_whole(storage.open(&name, false)?.as_ref())?;
        let mut more = true;
        frame::visit(&bytes, |seq, at, _| {
            if more
                && seq > committed
                && !dropped.contains(&seq)
                && let frame::Decoded::Frame { payload, .. } = frame::decode(&bytes[at..])
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
/// was spooled, and a text file saying why. Durable before it returns.
pub fn write_dead_letter(
    storage: &dyn Storage,
    seq: u64,
    payload: &[u8],
    reason: &str,
) -> io::Result<()> {
    let names = [
        format!("{DEAD_LETTER_DIR}/{seq:020}.entry"),
        format!("{DEAD_LETTER_DIR}/{seq:020}.reason"),
    ];
    let written = (|| {
        storage.create_dir(DEAD_LETTER_DIR)?;
        for (name, bytes) in names.iter().zip([payload, reason.as_bytes()]) {
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
const RESERVE_FILE: &str = "dead-letter/reserve";
const RESERVE_MAX_BYTES: u64 = (4 << 20) + (64 << 10);

/// True once the reserve is in place, whole and durable.
fn make_reserve(storage: &dyn Storage, bytes: u64) -> bool {
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
    let storage = Disk {
        dir: dir.to_path_buf(),
    };
    let _lock = lock(dir)?;
    let mut found = None;
    each_pending(dir, |s, payload| {
        if s == seq {
            found = Some(payload.to_vec());
        }
        found.is_none()
    })?;
    let Some(payload) = found else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no record {seq} waits in the spool (committed or never written)"),
        ));
    };
    write_dead_letter(
        &storage,
        seq,
        &payload,
        &format!("dropped by an operator: {reason}"),
    )?;
    let file = storage.open(DROPPED_FILE, true)?;
    let len = file.len()?;
    file.write_at(len, format!("{seq} {reason}\n").as_bytes())?;
    file.sync()?;
    storage.sync_dir("")
}

fn lock(dir: &Path) -> io::Result<File> {
    let lock = File::create(dir.join("lock"))?;
    lock.try_lock().map_err(|_| {
        io::Error::other(format!("{} is in use by another im-relay", dir.display()))
    })?;
    Ok(lock)
}

/// An open spool: its handles, what recovery found, and the writer thread (which ends, after
/// a last sync, once every `Appender` is dropped).
pub struct Opened {
    pub appender: Appender,
    pub reader: Reader,
    pub shared: Arc<Shared>,
    pub recovery: Recovery,
    pub writer: std::thread::JoinHandle<()>,
}

/// Opens (creating if needed) the spool in `cfg.dir`: recovers what is there and starts the
/// writer thread. `wake` is called after every written batch.
pub fn open(cfg: &SpoolConfig, wake: impl Fn() + Send + 'static) -> io::Result<Opened> {
    std::fs::create_dir_all(&cfg.dir)?;
    let lock = lock(&cfg.dir)?;
    let storage = Arc::new(Disk {
        dir: cfg.dir.clone(),
    });
    open_on(storage, cfg, Some(lock), wake)
}

/// `open` on any storage: the real directory, or (tests) a disk that hangs or fails.
pub(crate) fn open_on(
    storage: Arc<dyn Storage>,
    cfg: &SpoolConfig,
    lock: Option<File>,
    wake: impl Fn() + Send + 'static,
) -> io::Result<Opened> {
    let (mut writer, reader, shared, recovery) = recover(storage, cfg, lock)?;
    if let Fsync::Interval(_) = cfg.fsync {
        writer.syncer = Some(Syncer::spawn(shared.clone())?);
    }
    let (tx, rx) = mpsc::channel();
    let writer = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || writer.run(rx, wake))?;
    Ok(Opened {
        appender: Appender { tx },
        reader,
        shared,
        recovery,
        writer,
    })
}

/// Recovers the spool on `storage` and returns its writer (not yet running), its reader and
/// their shared state. The simulation tests drive these directly.
fn recover(
    storage: Arc<dyn Storage>,
    cfg: &SpoolConfig,
    lock: Option<File>,
) -> io::Result<(Writer, Reader, Arc<Shared>, Recovery)> {
    let (mut recovery, scans) = scan_all(storage.as_ref())?;
    let mut last_seq = recovery.committed;
    let mut highest_name = 0;
    for scan in &scans {
        last_seq = last_seq.max(scan.last_seq.unwrap_or(0));
        highest_name = highest_name.max(scan.first);
        let file = storage.open(&scan.name, false)?;
        if scan.valid_end < scan.len {
            // Nothing intact follows the last whole frame: cut it, so the file ends on a
            // frame (the writer never appends to an older segment, so a cut tail could
            // never be completed).
            file.set_len(scan.valid_end)?;
            recovery.bytes -= scan.len - scan.valid_end;
        }
        // What this scan saw must be what the disk holds before sequence numbers are handed
        // out from it: a cut made before a crash (of a write that failed) may still sit in
        // the page cache, and a power cut would bring that write's frames back under numbers
        // given to new records. The simulation found this loss; syncing a clean file is cheap.
        file.sync()?;
    }
    if recovery.torn_bytes > 0 {
        tracing::warn!(
            bytes = recovery.torn_bytes,
            "spool: cut a write the last run did not finish (it was never acknowledged)"
        );
    }
    if recovery.damaged > 0 {
        // Counted (and logged one by one) as the reader skips them.
        tracing::error!(
            damaged = recovery.damaged,
            "spool holds damaged frames; the records in them are lost"
        );
    }
    // Never below an existing segment's name: a segment created just before a crash may be
    // empty, and reusing a lower number would put records out of order across files.
    let next_seq = (last_seq + 1).max(highest_name);
    let active_name = segment_name(next_seq);
    let file = storage.open(&active_name, true)?;
    let active_end = file.len()?;
    // The position file is written in place from now on: give it its two slots now, while
    // there is room, so that advancing it never needs a new block.
    let position = storage.open(COMMITTED_FILE, true)?;
    if position.len()? < 2 * SLOT_BYTES as u64 {
        let slot = committed_slot(recovery.committed);
        position.write_at(0, &[slot, slot].concat())?;
        position.sync()?;
    }
    storage.sync_dir("")?;
    let dropped = read_dropped(storage.as_ref());
    let reserve_bytes = cfg.segment_bytes.min(RESERVE_MAX_BYTES);
    let reserve_held = make_reserve(storage.as_ref(), reserve_bytes);
    let shared = Arc::new(Shared {
        storage,
        max_bytes: cfg.max_bytes,
        fsync: cfg.fsync,
        total_bytes: AtomicU64::new(recovery.bytes),
        appended: AtomicU64::new(last_seq),
        committed: AtomicU64::new(recovery.committed),
        tail: Mutex::new(Tail {
            active_first: next_seq,
            active_end,
            appended: last_seq,
        }),
        disk_error: AtomicBool::new(false),
        sync_failed: AtomicBool::new(false),
        busy_since: AtomicU64::new(0),
        epoch: Instant::now(),
        reserve_bytes,
        _lock: lock,
    });
    let writer = Writer {
        shared: shared.clone(),
        segment_bytes: cfg.segment_bytes,
        file,
        offset: active_end,
        next_seq,
        dirty: false,
        dir_synced: true,
        cut_pending: false,
        rotate_next: false,
        last_sync: Instant::now(),
        syncer: None,
    };
    let reader = Reader {
        shared: shared.clone(),
        position,
        slot: 0,
        dropped,
        reserve_held,
        current: None,
        finished: None,
        buf: Vec::new(),
        last_read: recovery.committed,
        committed: recovery.committed,
        persisted: recovery.committed,
        last_persist: None,
    };
    Ok((writer, reader, shared, recovery))
}

/// `Interval` only: syncs handed-over segments (and the directory) on its own thread. The
/// queue is bounded: when the disk is slower than the rotations, the writer waits.
struct Syncer {
    queue: mpsc::SyncSender<SyncJob>,
    thread: std::thread::JoinHandle<()>,
}

struct SyncJob {
    file: Box<dyn StorageFile>,
    /// A new segment was created since the last job: its directory entry too.
    dir: bool,
}

impl Syncer {
    fn spawn(shared: Arc<Shared>) -> io::Result<Syncer> {
        let (queue, jobs) = mpsc::sync_channel::<SyncJob>(4);
        let thread = std::thread::Builder::new()
            .name("spool-syncer".into())
            .spawn(move || {
                for job in jobs {
                    let synced = sync_file(job.file.as_ref()).and_then(|()| {
                        if job.dir {
                            shared.storage.sync_dir("")?;
                        }
                        Ok(())
                    });
                    note_sync(&shared, synced);
                }
            })?;
        Ok(Syncer { queue, thread })
    }
}

/// Surfaces a sync's outcome: a failure turns readiness red and is counted until a later sync
/// succeeds.
fn note_sync(shared: &Shared, result: io::Result<()>) {
    match result {
        Ok(()) => shared.sync_failed.store(false, Ordering::Relaxed),
        Err(error) => {
            shared.sync_failed.store(true, Ordering::Relaxed);
            SpoolSyncFailed { error: &error }.emit();
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    file: Box<dyn StorageFile>,
    /// End of the last whole frame written to the active segment.
    offset: u64,
    next_seq: u64,
    /// Written since the last sync (`Interval`, `Never`).
    dirty: bool,
    /// The active segment's directory entry is durable (`Always`: checked before an ack).
    dir_synced: bool,
    /// A failed write left bytes past `offset` that could not be cut yet: nothing is written
    /// until they are (their frames were never acknowledged and must never be read).
    cut_pending: bool,
    /// Start a new segment before the next write: after a failed write, so the full one can
    /// be deleted once delivered and give its space back.
    rotate_next: bool,
    last_sync: Instant,
    syncer: Option<Syncer>,
}

/// Appends gathered into one write.
const MAX_BATCH: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<AppendRequest>, wake: impl Fn()) {
        let idle = match self.shared.fsync {
            Fsync::Interval(d) => d,
            _ => Duration::from_secs(3600),
        };
        let mut buf = Vec::new();
        loop {
            let first = match rx.recv_timeout(idle) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sync_if_due();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let payloads: Vec<&[u8]> = batch.iter().map(|r| r.payload.as_slice()).collect();
            let results = self.write_batch(&payloads, &mut buf);
            let wrote = results.iter().any(Result::is_ok);
            for (req, result) in batch.into_iter().zip(results) {
                let _ = req.reply.send(result);
            }
            if wrote {
                wake();
            }
            self.sync_if_due();
        }
        // Every handle is gone: make what was written durable before leaving.
        if let Some(syncer) = self.syncer.take() {
            drop(syncer.queue);
            let _ = syncer.thread.join();
        }
        if self.dirty {
            let synced = self.sync_now();
            note_sync(&self.shared, synced);
        }
    }

    /// Writes `payloads` as one batch; each gets its sequence number, or why it was refused.
    fn write_batch(
        &mut self,
        payloads: &[&[u8]],
        buf: &mut Vec<u8>,
    ) -> Vec<Result<u64, AppendError>> {
        buf.clear();
        let total = self.shared.bytes();
        let mut seq = self.next_seq;
        let mut results: Vec<Result<u64, AppendError>> = payloads
            .iter()
            .map(|payload| {
                let size = (frame::HEADER_BYTES + payload.len()) as u64;
                if payload.len() > frame::MAX_PAYLOAD_BYTES {
                    return Err(AppendError::Io {
                        kind: io::ErrorKind::InvalidInput,
                        message: "record too large".into(),
                    });
                }
                if total + buf.len() as u64 + size > self.shared.max_bytes {
                    return Err(AppendError::Full);
                }
                frame::encode(seq, payload, buf);
                seq += 1;
                Ok(seq - 1)
            })
            .collect();
        if buf.is_empty() {
            return results;
        }
        self.shared.busy(true);
        let written = self.write_durably(buf);
        self.shared.busy(false);
        match written {
            Ok(()) => {
                SpoolAppended {
                    records: (seq - self.next_seq) as usize,
                    bytes: buf.len(),
                }
                .emit();
                self.offset += buf.len() as u64;
                self.next_seq = seq;
                self.shared
                    .total_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                self.shared.appended.store(seq - 1, Ordering::Release);
                let end = self.offset;
                self.shared.set_tail(|t| {
                    t.active_end = end;
                    t.appended = seq - 1;
                });
                self.shared.disk_error.store(false, Ordering::Relaxed);
            }
            Err(error) => {
                // Cut what may have reached the file, so the never-acknowledged frames are
                // not read; until the cut succeeds, nothing else is written. Their sequence
                // numbers are not reused: the cut is not durable until the next sync of this
                // file, which may never come after a rotation, and a power cut could bring a
                // frame back beside an acknowledged one of the same number (the simulation
                // found that loss).
                self.next_seq = seq;
                self.cut_pending = self.file.set_len(self.offset).is_err();
                self.rotate_next = self.offset > 0;
                self.shared.disk_error.store(true, Ordering::Relaxed);
                SpoolWriteFailed { error: &error }.emit();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(AppendError::io(&error));
                }
            }
        }
        results
    }

    /// Puts `buf` in the active segment (a new one if due) and, with `Always`, makes it and
    /// the segment's directory entry durable.
    fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.cut_pending {
            self.file.set_len(self.offset)?;
            self.cut_pending = false;
        }
        let full = self.offset > 0 && self.offset + buf.len() as u64 > self.segment_bytes;
        if full || (self.rotate_next && self.offset > 0) {
            self.start_segment()?;
        }
        self.rotate_next = false;
        let always = self.shared.fsync == Fsync::Always;
        if always && !self.dir_synced && !plant::active(plant::Plant::SkipDirSync) {
            self.shared.storage.sync_dir("")?;
            self.dir_synced = true;
        }
        self.file.write_at(self.offset, buf)?;
        if always {
            if !plant::active(plant::Plant::AckBeforeSync) {
                sync_file(self.file.as_ref())?;
            }
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    fn start_segment(&mut self) -> io::Result<()> {
        // `Always`: already synced. `Never`: not promised. `Interval`: in the background,
        // with the directory entry of the segment that follows.
        if self.dirty && self.syncer.is_some() {
            self.sync_in_background()?;
        }
        let file = self
            .shared
            .storage
            .open(&segment_name(self.next_seq), true)?;
        // Empty unless a failed rotation created it already (whatever is in it was cut or
        // is whole frames of this run).
        let end = file.len()?;
        self.file = file;
        self.offset = end;
        // `Never` promises nothing across a power cut, so it never syncs the directory.
        self.dir_synced = self.shared.fsync == Fsync::Never;
        let first = self.next_seq;
        self.shared.set_tail(|t| {
            t.active_first = first;
            t.active_end = end;
        });
        Ok(())
    }

    fn sync_if_due(&mut self) {
        if let Fsync::Interval(every) = self.shared.fsync
            && self.dirty
            && self.last_sync.elapsed() >= every
        {
            let queued = self.sync_in_background();
            if queued.is_err() {
                note_sync(&self.shared, queued);
            }
        }
    }

    /// Hands the active segment to the syncer thread; syncs here if that cannot be done.
    fn sync_in_background(&mut self) -> io::Result<()> {
        let dir = !self.dir_synced;
        let queued = match (&self.syncer, self.file.try_clone()) {
            (Some(syncer), Ok(file)) => syncer.queue.send(SyncJob { file, dir }).is_ok(),
            _ => false,
        };
        if !queued {
            return self.sync_now();
        }
        self.dir_synced = true;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn sync_now(&mut self) -> io::Result<()> {
        sync_file(self.file.as_ref())?;
        if !self.dir_synced {
            self.shared.storage.sync_dir("")?;
            self.dir_synced = true;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

fn sync_file(file: &dyn StorageFile) -> io::Result<()> {
    let started = Instant::now();
    file.sync()?;
    SpoolSynced {
        elapsed: started.elapsed(),
    }
    .emit();
    Ok(())
}

/// The segment being read.
struct Current {
    first: u64,
    file: Box<dyn StorageFile>,
    /// Offset of the next unread byte.
    offset: u64,
}

/// Reads records back in order from the committed position, and commits.
pub struct Reader {
    shared: Arc<Shared>,
    position: Box<dyn StorageFile>,
    /// The position slot written last.
    slot: usize,
    dropped: BTreeSet<u64>,
    /// The dead-letter reserve is in place.
    reserve_held: bool,
    current: Option<Current>,
    /// First sequence number of the last segment read to its end.
    finished: Option<u64>,
    buf: Vec<u8>,
    /// Highest sequence number handed out so far.
    last_read: u64,
    committed: u64,
    persisted: u64,
    /// When segments were last deleted and the position written; `None`: not yet.
    last_persist: Option<Instant>,
}

/// Bytes read from a segment at a time; at least one whole frame.
const READ_CHUNK: usize = 2 * frame::MAX_FRAME_BYTES;

impl Reader {
    /// Appends up to `max` records after the last one read to `out`, as `(seq, payload)`.
    /// On an error, what was read before it is in `out` and the next call goes on from there:
    /// nothing is skipped.
    pub fn read(&mut self, max: usize, out: &mut VecDeque<(u64, Vec<u8>)>) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let tail = self.shared.tail();
            if self.last_read >= tail.appended {
                break;
            }
            if self.current.is_none() && !self.open_next()? {
                break;
            }
            let Some(cur) = self.current.as_mut() else {
                break;
            };
            // Of the active segment, only what the writer finished (and acknowledged).
            let active = tail.active_first == cur.first;
            let end = if active {
                tail.active_end
            } else {
                cur.file.len()?
            };
            if cur.offset >= end {
                if active {
                    break;
                }
                // Read to its end, and the writer has moved on: next segment.
                self.finished = Some(cur.first);
                self.current = None;
                continue;
            }
            let want = (end - cur.offset).min(READ_CHUNK as u64) as usize;
            self.buf.resize(want, 0);
            let got = cur.file.read_at(cur.offset, &mut self.buf)?;
            self.buf.truncate(got);
            if got == 0 {
                // Shorter than it said a moment ago (cut by recovery, say): nothing more here.
                self.finished = Some(cur.first);
                self.current = None;
                continue;
            }
            // More of the segment follows this chunk: a frame cut there is read again next
            // pass, and damage is skipped only up to where that pass begins.
            let cut = cur.offset + (got as u64) < end;
            let mut at = 0;
            while n < max && at < self.buf.len() {
                match frame::decode(&self.buf[at..]) {
                    frame::Decoded::Frame { seq, .. } if seq > tail.appended => break,
                    frame::Decoded::Frame { seq, payload, size } => {
                        if seq > self.last_read {
                            if !self.dropped.contains(&seq) {
                                out.push_back((seq, payload.to_vec()));
                                n += 1;
                            }
                            self.last_read = seq;
                        }
                        at += size;
                    }
                    frame::Decoded::Incomplete if cut => break,
                    frame::Decoded::Incomplete | frame::Decoded::Damaged => {
                        at += skip_damage(&self.buf[at..], cut, cur.first);
                    }
                }
            }
            if at == 0 {
                break;
            }
            cur.offset += at as u64;
        }
        Ok(n)
    }

    /// Opens the oldest segment after the last finished one that may hold unread records.
    fn open_next(&mut self) -> io::Result<bool> {
        let segs = list_segments(self.shared.storage.as_ref())?;
        for (i, (first, name)) in segs.iter().enumerate() {
            if self.finished.is_some_and(|f| *first <= f) {
                continue;
            }
            // Wholly at or below what was read (at startup: what was committed).
            if segs
                .get(i + 1)
                .is_some_and(|(next, _)| *next <= self.last_read + 1)
            {
                continue;
            }
            let file = self.shared.storage.open(name, false)?;
            self.current = Some(Current {
                first: *first,
                file,
                offset: 0,
            });
            return Ok(true);
        }
        Ok(false)
    }

    /// Records everything up to `seq` as delivered. At most every 100 ms (or at once with
    /// `force`): delivered segments are deleted, then the position is written. Deleting
    /// first frees space without needing any (a full disk must not deadlock); a crash in
    /// between only means duplicates. A segment above `seq` is delivered too when it was read
    /// whole and `unconfirmed(lo, hi)` says none of its records `lo..=hi` awaits Kafka: one
    /// record that waits (for the dead-letter directory, say) must not keep the disk full.
    pub fn commit(
        &mut self,
        seq: u64,
        force: bool,
        now: Instant,
        unconfirmed: impl Fn(u64, u64) -> bool,
    ) -> io::Result<()> {
        self.committed = self.committed.max(seq);
        self.shared
            .committed
            .store(self.committed, Ordering::Relaxed);
        let recent = self
            .last_persist
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_millis(100));
        if !force && recent {
            return Ok(());
        }
        self.last_persist = Some(now);
        let deleted = self.delete_delivered(unconfirmed);
        self.hold_reserve();
        if self.committed != self.persisted {
            self.slot ^= 1;
            let at = (self.slot * SLOT_BYTES) as u64;
            self.position
                .write_at(at, &committed_slot(self.committed))?;
            if self.shared.fsync == Fsync::Always {
                self.position.sync()?;
            }
            self.persisted = self.committed;
        }
        deleted
    }

    fn delete_delivered(&mut self, unconfirmed: impl Fn(u64, u64) -> bool) -> io::Result<()> {
        let segs = list_segments(self.shared.storage.as_ref())?;
        let active = self.shared.tail().active_first;
        for pair in segs.windows(2) {
            let ((first, name), (next_first, _)) = (&pair[0], &pair[1]);
            if *first >= active {
                break;
            }
            let last = next_first - 1;
            let delivered = last <= self.committed
                || (last <= self.last_read && !unconfirmed((*first).max(self.committed + 1), last));
            if !delivered {
                continue;
            }
            let len = self.shared.storage.open(name, false)?.len()?;
            self.shared.storage.remove(name)?;
            self.shared.total_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.current.as_ref().is_some_and(|c| c.first == *first) {
                self.current = None;
                self.finished = Some(*first);
            }
        }
        Ok(())
    }

    pub fn last_read(&self) -> u64 {
        self.last_read
    }

    /// Keeps record `seq` in the dead-letter directory (no topic would take it).
    /// Keeps record `seq` in the dead-letter directory (no topic would take it). On a full
    /// disk the reserve gives its space: the record would otherwise hold the commit, and with
    /// it every delivered segment behind it, and the disk would never empty again.
    pub fn dead_letter(&mut self, seq: u64, payload: &[u8], reason: &str) -> io::Result<()> {
        let storage = self.shared.storage.as_ref();
        let first = write_dead_letter(storage, seq, payload, reason);
        if first.is_err() && self.reserve_held && storage.remove(RESERVE_FILE).is_ok() {
            self.reserve_held = false;
            return write_dead_letter(storage, seq, payload, reason);
        }
        first
    }

    /// Makes (or remakes, once space allows) the dead-letter reserve.
    fn hold_reserve(&mut self) {
        if !self.reserve_held {
            self.reserve_held =
                make_reserve(self.shared.storage.as_ref(), self.shared.reserve_bytes);
        }
    }
}

/// Length of the damaged stretch at the start of `rest`: up to the next intact frame, or,
/// when more of the segment follows (`cut`), up to the first place a frame may begin that
/// this chunk cannot show whole — so damage near a chunk's end never costs the next record.
fn skip_damage(rest: &[u8], cut: bool, segment: u64) -> usize {
    let skip = (1..rest.len())
        .find(|&i| match frame::decode(&rest[i..]) {
            frame::Decoded::Frame { .. } => true,
            frame::Decoded::Incomplete => cut,
            frame::Decoded::Damaged => false,
        })
        .unwrap_or(rest.len());
    SpoolDamage {
        segment,
        bytes: skip,
    }
    .emit();
    skip
}

/// Bugs planted on purpose, compiled only into the tests: the simulation must catch each.
pub(crate) mod plant {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Plant {
        /// `Always` acknowledges without syncing the data.
        AckBeforeSync,
        /// A new segment's directory entry is never synced.
        SkipDirSync,
        /// The publisher commits past a record Kafka has not confirmed.
        CommitPastUnconfirmed,
    }

    #[cfg(test)]
    thread_local! {
        static ACTIVE: std::cell::Cell<Option<Plant>> = const { std::cell::Cell::new(None) };
    }

    #[cfg(test)]
    pub fn set(p: Option<Plant>) {
        ACTIVE.with(|a| a.set(p));
    }

    #[cfg(test)]
    pub fn active(p: Plant) -> bool {
        ACTIVE.with(|a| a.get() == Some(p))
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub fn active(_: Plant) -> bool {
        false
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
