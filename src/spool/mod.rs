//! Stage 4 of the road: **spool**. Every accepted record is appended here — checksummed frames
//! in a directory of append-only segment files — *before* Tencent gets its `OK`, and the
//! publisher reads it back from the last committed position. Knows frames, bytes and
//! positions; not Tencent, not Kafka.
//!
//! - One writer thread owns the active segment. Concurrent appends queue on a channel and are
//!   written together, with at most one sync per batch (group commit).
//! - `Fsync::Always` syncs before answering (survives power loss); `Interval` and `Never` rely
//!   on the page cache, which survives a process crash (kill -9) but not a power cut.
//!   `Interval` syncs on a second thread, so appends never wait for the disk; a full
//!   segment's last sync happens there too (a 64 MiB `fdatasync` took 50 ms here).
//! - Positions are frame sequence numbers. The committed position (everything at or below it
//!   is in Kafka) lives in the `committed` file; segments wholly below it are deleted.
//! - On open, every segment is scanned: damaged frames are skipped and counted, a torn tail is
//!   cut, and the writer starts a fresh segment.

mod frame;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::telemetry::{SpoolAppended, SpoolDamage, SpoolSynced};

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendError {
    /// `max_bytes` reached: nothing was written.
    Full,
    /// The disk refused the write (or the writer is gone); nothing was kept.
    Io(String),
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
}

/// State shared by the writer, the reader and whoever asks about the spool.
pub struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    fsync: Fsync,
    total_bytes: AtomicU64,
    /// Highest sequence number written (and readable).
    appended: AtomicU64,
    committed: AtomicU64,
    /// First sequence number of the segment the writer appends to; never deleted.
    active_first: AtomicU64,
    disk_error: AtomicBool,
    /// Held for the spool's lifetime: one relay per spool directory.
    _lock: File,
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
            .map_err(|_| AppendError::Io("spool writer stopped".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(AppendError::Io("spool writer stopped".into())))
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

/// `(first_seq, path)` of every segment, oldest first.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            segs.push((first, path));
        }
    }
    segs.sort();
    Ok(segs)
}

const COMMITTED_FILE: &str = "committed";

fn read_committed(dir: &Path) -> u64 {
    let Ok(bytes) = fs::read(dir.join(COMMITTED_FILE)) else {
        return 0;
    };
    // 8 bytes of position and their checksum; a damaged file means "from the start":
    // duplicates, never loss.
    match bytes.as_slice() {
        [pos @ .., a, b, c, d] if pos.len() == 8 => {
            let crc = u32::from_le_bytes([*a, *b, *c, *d]);
            if crc32c::crc32c(pos) == crc {
                u64::from_le_bytes(pos.try_into().unwrap_or_default())
            } else {
                0
            }
        }
        _ => 0,
    }
}

fn write_committed(dir: &Path, seq: u64, sync: bool) -> io::Result<()> {
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
    let tmp = dir.join("committed.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    if sync {
        f.sync_data()?;
    }
    fs::rename(tmp, dir.join(COMMITTED_FILE))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One segment as scanned: its first sequence number, path and frames.
type ScannedSegment = (u64, PathBuf, frame::Scan);

/// Scans the spool read-only: what `spool status` shows and what `open` starts from.
pub fn inspect(dir: &Path) -> io::Result<(Recovery, Vec<ScannedSegment>)> {
    let committed = read_committed(dir);
    let mut r = Recovery {
        committed,
        ..Recovery::default()
    };
    let mut scans = Vec::new();
    for (first, path) in list_segments(dir)? {
        let bytes = fs::read(&path)?;
        let scan = frame::scan(&bytes);
        // A tail too short for the frame it starts is a write cut short, not damage.
        let tail = &bytes[scan.valid_end..];
        let torn = !tail.is_empty() && frame::decode(tail) == frame::Decoded::Incomplete;
        r.segments += 1;
        r.bytes += bytes.len() as u64;
        r.damaged += scan.damaged - usize::from(torn);
        if torn {
            r.torn_bytes += tail.len() as u64;
        }
        r.pending += scan.frames.iter().filter(|f| f.0 > committed).count() as u64;
        scans.push((first, path, scan));
    }
    Ok((r, scans))
}

/// The payload of the oldest record not yet committed, if any (read-only, like `inspect`).
pub fn oldest_pending(dir: &Path) -> io::Result<Option<Vec<u8>>> {
    let committed = read_committed(dir);
    for (_, path) in list_segments(dir)? {
        let bytes = fs::read(&path)?;
        for (seq, at, _) in frame::scan(&bytes).frames {
            if seq > committed
                && let frame::Decoded::Frame { payload, .. } = frame::decode(&bytes[at..])
            {
                return Ok(Some(payload.to_vec()));
            }
        }
    }
    Ok(None)
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
    fs::create_dir_all(&cfg.dir)?;
    let lock = File::create(cfg.dir.join("lock"))?;
    lock.try_lock().map_err(|_| {
        io::Error::other(format!(
            "{} is in use by another im-relay",
            cfg.dir.display()
        ))
    })?;
    let (mut recovery, scans) = inspect(&cfg.dir)?;
    let mut last_seq = recovery.committed;
    for (i, (_, path, scan)) in scans.iter().enumerate() {
        last_seq = scan.frames.iter().map(|f| f.0).fold(last_seq, u64::max);
        let len = fs::metadata(path)?.len();
        let is_last = i + 1 == scans.len();
        if is_last && (scan.valid_end as u64) < len {
            // Cut what follows the last intact frame, so the file ends on a whole frame.
            OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(scan.valid_end as u64)?;
            recovery.bytes -= len - scan.valid_end as u64;
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
    let next_seq = last_seq + 1;
    let active = segment_path(&cfg.dir, next_seq);
    let file = OpenOptions::new().create(true).append(true).open(&active)?;
    sync_dir(&cfg.dir)?;
    let shared = Arc::new(Shared {
        dir: cfg.dir.clone(),
        max_bytes: cfg.max_bytes,
        fsync: cfg.fsync,
        total_bytes: AtomicU64::new(recovery.bytes),
        appended: AtomicU64::new(last_seq),
        committed: AtomicU64::new(recovery.committed),
        active_first: AtomicU64::new(next_seq),
        disk_error: AtomicBool::new(false),
        _lock: lock,
    });
    let (tx, rx) = mpsc::channel();
    let syncer = match cfg.fsync {
        Fsync::Interval(_) => {
            let (tx, rx) = mpsc::channel::<File>();
            let thread = std::thread::Builder::new()
                .name("spool-syncer".into())
                .spawn(move || {
                    for file in rx {
                        if let Err(error) = sync_file(&file) {
                            tracing::error!(%error, "spool sync failed");
                        }
                    }
                })?;
            Some((tx, thread))
        }
        _ => None,
    };
    let writer = Writer {
        shared: shared.clone(),
        segment_bytes: cfg.segment_bytes,
        file,
        offset: 0,
        next_seq,
        dirty: false,
        last_sync: Instant::now(),
        wake: Box::new(wake),
        syncer,
    };
    let writer = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok(Opened {
        appender: Appender { tx },
        reader: Reader::new(shared.clone(), recovery.committed),
        shared,
        recovery,
        writer,
    })
}

struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    file: File,
    offset: u64,
    next_seq: u64,
    dirty: bool,
    last_sync: Instant,
    wake: Box<dyn Fn() + Send>,
    /// `Interval` only: the thread that syncs, and its queue of files to sync.
    syncer: Option<(mpsc::Sender<File>, std::thread::JoinHandle<()>)>,
}

/// Appends gathered into one write.
const MAX_BATCH: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<AppendRequest>) {
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
            self.write_batch(batch, &mut buf);
            self.sync_if_due();
        }
        // Every handle is gone: make what was written durable before leaving.
        if let Some((queue, thread)) = self.syncer.take() {
            drop(queue);
            let _ = thread.join();
        }
        if self.dirty {
            self.sync();
        }
    }

    fn write_batch(&mut self, batch: Vec<AppendRequest>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut accepted = Vec::with_capacity(batch.len());
        let total = self.shared.bytes();
        let mut seq = self.next_seq;
        for req in batch {
            let size = (frame::HEADER_BYTES + req.payload.len()) as u64;
            if req.payload.len() > frame::MAX_PAYLOAD_BYTES {
                let _ = req
                    .reply
                    .send(Err(AppendError::Io("record too large".into())));
                continue;
            }
            if total + buf.len() as u64 + size > self.shared.max_bytes {
                let _ = req.reply.send(Err(AppendError::Full));
                continue;
            }
            frame::encode(seq, &req.payload, buf);
            accepted.push((seq, req.reply));
            seq += 1;
        }
        if accepted.is_empty() {
            return;
        }
        let result = self.rotate_if_full(buf.len() as u64).and_then(|()| {
            self.file.write_all(buf)?;
            if self.shared.fsync == Fsync::Always {
                self.sync_checked()?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                SpoolAppended {
                    records: accepted.len(),
                    bytes: buf.len(),
                }
                .emit();
                self.offset += buf.len() as u64;
                self.dirty |= self.shared.fsync != Fsync::Always;
                self.next_seq = seq;
                self.shared
                    .total_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                self.shared.appended.store(seq - 1, Ordering::Release);
                self.shared.disk_error.store(false, Ordering::Relaxed);
                for (seq, reply) in accepted {
                    let _ = reply.send(Ok(seq));
                }
                (self.wake)();
            }
            Err(e) => {
                self.undo_partial_write();
                self.shared.disk_error.store(true, Ordering::Relaxed);
                let msg = e.to_string();
                tracing::error!(error = %msg, "spool write failed; callbacks refused until it succeeds");
                for (_, reply) in accepted {
                    let _ = reply.send(Err(AppendError::Io(msg.clone())));
                }
            }
        }
    }

    /// Cuts a half-written batch so the segment ends on a whole frame; if even that fails,
    /// moves to a new segment (the reader skips damage, and recovery cuts the tail).
    fn undo_partial_write(&mut self) {
        if self.file.set_len(self.offset).is_err() {
            self.next_seq += MAX_BATCH as u64;
            let _ = self.start_segment();
        }
    }

    fn rotate_if_full(&mut self, incoming: u64) -> io::Result<()> {
        if self.offset > 0 && self.offset + incoming > self.segment_bytes {
            // `Always`: already synced. `Never`: not promised. `Interval`: in the background.
            if self.dirty && self.syncer.is_some() {
                self.sync_in_background()?;
            }
            self.start_segment()?;
        }
        Ok(())
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let path = segment_path(&self.shared.dir, self.next_seq);
        self.file = OpenOptions::new().create(true).append(true).open(path)?;
        self.offset = 0;
        self.shared
            .active_first
            .store(self.next_seq, Ordering::Release);
        sync_dir(&self.shared.dir)
    }

    fn sync_if_due(&mut self) {
        if let Fsync::Interval(every) = self.shared.fsync
            && self.dirty
            && self.last_sync.elapsed() >= every
            && let Err(error) = self.sync_in_background()
        {
            tracing::error!(%error, "spool sync failed");
        }
    }

    /// Hands the active segment to the syncer thread; syncs here if that cannot be done.
    fn sync_in_background(&mut self) -> io::Result<()> {
        let queued = match (&self.syncer, self.file.try_clone()) {
            (Some((queue, _)), Ok(file)) => queue.send(file).is_ok(),
            _ => false,
        };
        if !queued {
            return self.sync_checked();
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn sync(&mut self) {
        if let Err(error) = self.sync_checked() {
            tracing::error!(%error, "spool sync failed");
        }
    }

    fn sync_checked(&mut self) -> io::Result<()> {
        sync_file(&self.file)?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

fn sync_file(file: &File) -> io::Result<()> {
    let started = Instant::now();
    file.sync_data()?;
    SpoolSynced {
        elapsed: started.elapsed(),
    }
    .emit();
    Ok(())
}

/// Reads records back in order from the committed position, and commits.
pub struct Reader {
    shared: Arc<Shared>,
    /// Segment being read: (first_seq, file, offset of the next unread byte).
    current: Option<(u64, File, u64)>,
    /// First sequence number of the last segment read to its end.
    finished: Option<u64>,
    buf: Vec<u8>,
    /// Highest sequence number handed out so far.
    last_read: u64,
    committed: u64,
    persisted: u64,
    last_persist: Instant,
}

/// Bytes read from a segment at a time; at least one whole frame.
const READ_CHUNK: usize = 2 * frame::MAX_FRAME_BYTES;

impl Reader {
    fn new(shared: Arc<Shared>, committed: u64) -> Self {
        Reader {
            shared,
            current: None,
            finished: None,
            buf: Vec::new(),
            last_read: committed,
            committed,
            persisted: committed,
            last_persist: Instant::now(),
        }
    }

    /// Appends up to `max` records after the last one read to `out`, as `(seq, payload)`.
    pub fn read(&mut self, max: usize, out: &mut VecDeque<(u64, Vec<u8>)>) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let appended = self.shared.appended.load(Ordering::Acquire);
            if self.last_read >= appended {
                break;
            }
            if self.current.is_none() && !self.open_next()? {
                break;
            }
            let Some((first, mut file, mut offset)) = self.current.take() else {
                break;
            };
            // Still written to: a partial frame at its end is a write in progress.
            let active = self.shared.active_first.load(Ordering::Acquire) == first;
            self.buf.clear();
            file.seek(SeekFrom::Start(offset))?;
            Read::by_ref(&mut file)
                .take(READ_CHUNK as u64)
                .read_to_end(&mut self.buf)?;
            // The chunk ended before the file did: a frame cut there is read again next pass.
            let chunk_cut = self.buf.len() == READ_CHUNK;
            let mut at = 0;
            let mut waiting = false;
            let mut more = false;
            while n < max && at < self.buf.len() {
                match frame::decode(&self.buf[at..]) {
                    frame::Decoded::Frame { seq, .. } if seq > appended => {
                        waiting = true;
                        break;
                    }
                    frame::Decoded::Frame { seq, payload, size } => {
                        if seq > self.last_read {
                            out.push_back((seq, payload.to_vec()));
                            self.last_read = seq;
                            n += 1;
                        }
                        at += size;
                    }
                    frame::Decoded::Incomplete if chunk_cut => {
                        more = true;
                        break;
                    }
                    frame::Decoded::Incomplete if active => {
                        waiting = true;
                        break;
                    }
                    frame::Decoded::Incomplete | frame::Decoded::Damaged => {
                        at += self.skip_damage(at, first);
                    }
                }
            }
            offset += at as u64;
            let at_end = at == 0 && !waiting && n < max;
            if at_end && !active {
                // Read to its end, and the writer has moved on: next segment.
                self.finished = Some(first);
                continue;
            }
            self.current = Some((first, file, offset));
            if (at_end || waiting) && !more {
                break;
            }
        }
        Ok(n)
    }

    /// Length of the damaged stretch at `at` in the buffer (up to the next intact frame).
    fn skip_damage(&self, at: usize, segment: u64) -> usize {
        let rest = &self.buf[at..];
        let skip = (1..rest.len())
            .find(|&i| matches!(frame::decode(&rest[i..]), frame::Decoded::Frame { .. }))
            .unwrap_or(rest.len());
        SpoolDamage {
            segment,
            bytes: skip,
        }
        .emit();
        skip
    }

    /// Opens the oldest segment after the last finished one that may hold unread records.
    fn open_next(&mut self) -> io::Result<bool> {
        let segs = list_segments(&self.shared.dir)?;
        for (i, (first, path)) in segs.iter().enumerate() {
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
            self.current = Some((*first, File::open(path)?, 0));
            return Ok(true);
        }
        Ok(false)
    }

    /// Records everything up to `seq` as delivered: persisted at most every 100 ms (or at
    /// once with `force`), and segments wholly at or below it are deleted.
    pub fn commit(&mut self, seq: u64, force: bool) -> io::Result<()> {
        self.committed = self.committed.max(seq);
        self.shared
            .committed
            .store(self.committed, Ordering::Relaxed);
        let due = force || self.last_persist.elapsed() >= Duration::from_millis(100);
        if self.committed == self.persisted || !due {
            return Ok(());
        }
        write_committed(
            &self.shared.dir,
            self.committed,
            self.shared.fsync == Fsync::Always,
        )?;
        self.persisted = self.committed;
        self.last_persist = Instant::now();
        self.delete_delivered()
    }

    fn delete_delivered(&mut self) -> io::Result<()> {
        let segs = list_segments(&self.shared.dir)?;
        let active = self.shared.active_first.load(Ordering::Acquire);
        for pair in segs.windows(2) {
            let ((first, path), (next_first, _)) = (&pair[0], &pair[1]);
            if *first >= active || next_first - 1 > self.persisted {
                break;
            }
            let len = fs::metadata(path)?.len();
            fs::remove_file(path)?;
            self.shared.total_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.current.as_ref().is_some_and(|c| c.0 == *first) {
                self.current = None;
                self.finished = Some(*first);
            }
        }
        Ok(())
    }

    pub fn last_read(&self) -> u64 {
        self.last_read
    }
}

#[cfg(test)]
mod tests;
