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
//!   that advancing it never needs new disk space; segments wholly below it are deleted, or
//!   one of them kept as a spare: the next segment is written over it (a fresh spool's first
//!   over zeros written at open), so a sync writes data only, not a growing file's
//!   allocation and size. A frame below its segment's first sequence number is never read,
//!   and a spare's name bounds the numbers in it: what a file held before is never read as a
//!   record of its new use (`frame` has the format, and why it still writes `IMR1`).
//! - A failed write is cut off again before anything else is written; a write or sync that
//!   takes longer than the append deadline turns readiness red.
//! - On open, every segment is scanned: damaged frames are skipped and counted, torn tails are
//!   cut, and the next sequence number never falls below an existing segment's name.
//! - The file system sits behind the `Storage` trait: `std::fs` in production, a simulated
//!   disk with faults and power cuts in the simulation tests.
//!
//! Here: the types both sides share, opening and recovery. `writer` appends, `reader` reads
//! back and commits, `segments` knows the files, `frame` the bytes.

mod frame;
mod reader;
mod segments;
pub mod storage;
mod writer;

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::telemetry::Event as _;
use crate::telemetry::{
    SpoolAppended, SpoolDamage, SpoolSegmentSetAside, SpoolSyncFailed, SpoolSynced,
    SpoolWriteFailed,
};
use reader::READ_CHUNK;
pub use reader::Reader;
use segments::*;
pub use segments::{
    COMMITTED_FILE, DEAD_LETTER_DIR, FOREIGN_DIR, drop_record, drop_records, each_pending, inspect,
    write_dead_letter,
};
pub use storage::{Disk, Storage, StorageFile};
use writer::*;

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
    /// Of those, the ones beyond the committed position: dropped since the last start, which
    /// this start skips (`im_relay_records_dropped_total` counts these, so a restart does not
    /// count an old drop again).
    pub dropped_ahead: usize,
    /// Segments that overlap an earlier one (or lie beyond any number this spool gives):
    /// `open` sets them aside in `FOREIGN_DIR` before it reads anything.
    pub overlapping: usize,
    /// Segments `open` set aside now.
    pub set_aside: usize,
    /// Segments with records in the `FOREIGN_DIR`s, waiting for `im-relay spool drain`.
    pub set_aside_held: usize,
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
    segment_bytes: u64,
    /// Spare files, ready to be written over (`segments::spare_name`).
    spares: Mutex<Vec<String>>,
    fsync: Fsync,
    total_bytes: AtomicU64,
    appended: AtomicU64,
    committed: AtomicU64,
    tail: Mutex<Tail>,
    /// The last write failed: callbacks are refused until one succeeds.
    disk_error: AtomicBool,
    /// A sync failed (`Interval`): acknowledged records may not survive a power cut until the
    /// writer has appended them again and synced that (`writer::Writer::reestablish`).
    sync_failed: AtomicBool,
    /// Every record up to this one is durable (`Always`, `Interval`; not kept with `Never`).
    synced: AtomicU64,
    /// When the write or sync in progress began (ms since `epoch`, plus one); 0 when idle.
    busy_since: AtomicU64,
    epoch: Instant,
    /// When the oldest record the publisher holds unconfirmed arrived (Unix ms); 0: none.
    oldest_unpublished_ms: AtomicU64,
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

    /// When the oldest record not yet confirmed by Kafka arrived (Unix ms), as the publisher
    /// last saw it; `None` when it holds none. What the topic lacks before then is still coming.
    pub fn oldest_unpublished_ms(&self) -> Option<u64> {
        Some(self.oldest_unpublished_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    pub(crate) fn set_oldest_unpublished_ms(&self, at: Option<u64>) {
        self.oldest_unpublished_ms
            .store(at.unwrap_or(0), Ordering::Relaxed);
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

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
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
    /// Written together, in one frame run: all or none acknowledged.
    payloads: Vec<Vec<u8>>,
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
        self.append_all(vec![payload]).await
    }

    /// Appends records that stand or fall together (the messages one read receipt covers):
    /// one write, one space check for all of them, one answer — the first one's sequence
    /// number, or why none was acknowledged.
    pub async fn append_all(&self, payloads: Vec<Vec<u8>>) -> Result<u64, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(AppendRequest { payloads, reply })
            .map_err(|_| AppendError::writer_stopped())?;
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::writer_stopped()))
    }
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
    let (mut recovery, mut scans) = scan_all(storage.as_ref())?;
    let set_aside = set_aside(storage.as_ref(), &scans)?;
    if set_aside > 0 {
        (recovery, scans) = scan_all(storage.as_ref())?;
        recovery.set_aside = set_aside;
    }
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
        if !plant::active(plant::Plant::RecoveryCutsUnsynced) {
            file.sync()?;
        }
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
    // empty, and reusing a lower number would put records out of order across files. Never
    // at or below a spare's bound: its old frames must stay below every new number.
    let _ = storage.remove(SPARE_FILLING);
    let spares = list_spares(storage.as_ref())?;
    let highest_spare = spares.iter().map(|(bound, _)| bound + 1).max().unwrap_or(0);
    let next_seq = if plant::active(plant::Plant::NextSeqFromFramesOnly) {
        last_seq + 1
    } else {
        (last_seq + 1).max(highest_name).max(highest_spare)
    };
    // The position file is written in place from now on: give it its two slots now, while
    // there is room, so that advancing it never needs a new block.
    let position = storage.open(COMMITTED_FILE, true)?;
    if position.len()? < 2 * SLOT_BYTES as u64 {
        let slot = committed_slot(recovery.committed);
        position.write_at(0, &[slot, slot].concat())?;
        position.sync()?;
    }
    let dropped = read_dropped(storage.as_ref());
    let reserve_bytes = cfg.segment_bytes.min(RESERVE_MAX_BYTES);
    let reserve_held = make_reserve(storage.as_ref(), reserve_bytes);
    let shared = Arc::new(Shared {
        storage,
        max_bytes: cfg.max_bytes,
        segment_bytes: cfg.segment_bytes,
        spares: Mutex::new(spares.into_iter().map(|(_, name)| name).collect()),
        fsync: cfg.fsync,
        total_bytes: AtomicU64::new(recovery.bytes),
        appended: AtomicU64::new(last_seq),
        committed: AtomicU64::new(recovery.committed),
        tail: Mutex::new(Tail {
            active_first: next_seq,
            active_end: 0,
            appended: last_seq,
        }),
        disk_error: AtomicBool::new(false),
        sync_failed: AtomicBool::new(false),
        synced: AtomicU64::new(last_seq),
        busy_since: AtomicU64::new(0),
        oldest_unpublished_ms: AtomicU64::new(0),
        epoch: Instant::now(),
        reserve_bytes,
        _lock: lock,
    });
    // The first segment is written over a spare too (made now if the last run left none).
    top_up_spares(&shared);
    let opened = open_segment(&shared, next_seq)?;
    let (file, active_end, recycled) = (opened.file, opened.end, opened.recycled);
    shared.set_tail(|t| t.active_end = active_end);
    shared.storage.sync_dir("")?;
    let writer = Writer {
        shared: shared.clone(),
        segment_bytes: cfg.segment_bytes,
        file,
        offset: active_end,
        recycled,
        first: next_seq,
        next_seq,
        dirty: false,
        dir_synced: true,
        cut_pending: false,
        rotate_next: false,
        last_sync: Instant::now(),
        clock: Instant::now(),
        syncer: None,
        deferred: None,
        unsynced: Unsynced::default(),
        reestablish_failures: 0,
        reestablish_at: None,
        reestablishing: false,
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
        chunk: READ_CHUNK,
        base_chunk: READ_CHUNK,
        last_read: recovery.committed,
        committed: recovery.committed,
        persisted: recovery.committed,
        last_persist: None,
    };
    Ok((writer, reader, shared, recovery))
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
        /// A spare's new segment name is not made durable before frames go in.
        SkipSpareDirSync,
        /// `Interval`: a sync that succeeds after a failed one clears the failure, as if the
        /// failed pages had been written.
        SyncSuccessClearsFailure,
        /// A record refused with another record's batch is quarantined without being sent
        /// again alone.
        RefusalInBatchIsFinal,
        /// Recovery numbers on from the highest frame, ignoring segment and spare names.
        NextSeqFromFramesOnly,
        /// Recovery does not sync the segments it scanned (and cut) before numbering.
        RecoveryCutsUnsynced,
        /// The records read before a read error are dropped instead of kept for the next turn.
        ReadBufferDroppedOnError,
        /// A record the producer refused synchronously is taken as handed over.
        SendFailureTakenAsSent,
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
