//! The writer thread: group commit of appended records into the active segment, rotation,
//! the fsync policy (and `Interval`'s syncer thread), and cutting a failed write.
//!
//! `Interval` after a failed sync: Linux marks the pages it could not write clean, so a later
//! sync succeeds without writing them, and once the kernel drops them from the cache a read
//! returns what the disk held before. Nothing read back from the file can be trusted then. The
//! writer keeps a copy of every record since the last good sync (`Unsynced`, bounded); after a
//! failure it appends them all again, to a new segment, and syncs that itself. Readiness stays
//! red (`sync_failed`) until that sync succeeds, and only the writer clears it: a later sync of
//! the syncer's proves nothing about the failed pages.

use super::*;

/// `Interval` only: syncs handed-over segments (and the directory) on its own thread. The
/// queue is bounded: when the disk is slower than the rotations, the writer waits.
pub(super) struct Syncer {
    pub(super) queue: mpsc::SyncSender<SyncJob>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

pub(super) struct SyncJob {
    pub(super) file: Box<dyn StorageFile>,
    /// A new segment was created since the last job: its directory entry too.
    pub(super) dir: bool,
    /// Every record up to this one was written before the job was queued.
    pub(super) upto: u64,
}

impl SyncJob {
    /// Syncs; on success, and while no earlier sync failed, every record up to `upto` is
    /// durable (jobs run in order).
    pub(super) fn run(self, shared: &Shared) {
        let synced = sync_file(self.file.as_ref()).and_then(|()| {
            if self.dir {
                shared.storage.sync_dir("")?;
            }
            Ok(())
        });
        match synced {
            Ok(()) => synced_upto(shared, self.upto),
            Err(error) => sync_failed(shared, &error),
        }
    }
}

impl Syncer {
    pub(super) fn spawn(shared: Arc<Shared>) -> io::Result<Syncer> {
        let (queue, jobs) = mpsc::sync_channel::<SyncJob>(4);
        let thread = std::thread::Builder::new()
            .name("spool-syncer".into())
            .spawn(move || {
                for job in jobs {
                    job.run(&shared);
                }
            })?;
        Ok(Syncer { queue, thread })
    }
}

/// A sync failed: readiness red, counted, until the writer has made what it held durable again.
pub(super) fn sync_failed(shared: &Shared, error: &io::Error) {
    shared.sync_failed.store(true, Ordering::SeqCst);
    SpoolSyncFailed { error }.emit();
}

/// A sync succeeded: records up to `upto` are durable, unless an earlier one failed (then only
/// the writer's `reestablish` says what is durable).
pub(super) fn synced_upto(shared: &Shared, upto: u64) {
    if plant::active(plant::Plant::SyncSuccessClearsFailure) {
        shared.sync_failed.store(false, Ordering::SeqCst);
    }
    if !shared.sync_failed.load(Ordering::SeqCst) {
        shared.synced.fetch_max(upto, Ordering::SeqCst);
    }
}

/// `Interval`: copies of the records written since the last good sync, oldest first.
#[derive(Default)]
pub(super) struct Unsynced {
    records: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

/// Bytes of copies kept at most: past it, the writer waits for a sync (at 30,000 records a
/// second of 1 KiB, half a second's worth).
pub(super) const MAX_UNSYNCED_BYTES: usize = 16 << 20;

impl Unsynced {
    fn push(&mut self, seq: u64, payload: &[u8]) {
        self.bytes += payload.len();
        self.records.push_back((seq, payload.to_vec()));
    }

    /// Forgets what is durable now.
    fn trim(&mut self, durable: u64) {
        while let Some((seq, payload)) = self.records.front() {
            if *seq > durable {
                break;
            }
            self.bytes -= payload.len();
            self.records.pop_front();
        }
    }
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) segment_bytes: u64,
    pub(super) file: Box<dyn StorageFile>,
    /// End of the last whole frame written to the active segment.
    pub(super) offset: u64,
    /// The active segment is written over a spare: what follows `offset` is old bytes.
    pub(super) recycled: bool,
    pub(super) next_seq: u64,
    /// First sequence number of the active segment: its frames' generation.
    pub(super) first: u64,
    /// Written since the last sync (`Interval`, `Never`).
    pub(super) dirty: bool,
    /// The active segment's directory entry is durable (`Always`: checked before an ack).
    pub(super) dir_synced: bool,
    /// A failed write left bytes past `offset` that could not be cut yet: nothing is written
    /// until they are (their frames were never acknowledged and must never be read).
    pub(super) cut_pending: bool,
    /// Start a new segment before the next write: after a failed write, so the full one can
    /// be deleted once delivered and give its space back.
    pub(super) rotate_next: bool,
    pub(super) last_sync: Instant,
    /// The time the last `tick` was given (the simulation's clock there): what `last_sync`
    /// is measured in.
    pub(super) clock: Instant,
    pub(super) syncer: Option<Syncer>,
    /// The simulation's syncer: jobs it runs when it chooses (`run_sync_job`).
    pub(super) deferred: Option<VecDeque<SyncJob>>,
    /// `Interval`: what a failed sync may have lost, to append again.
    pub(super) unsynced: Unsynced,
    /// Failed tries to write it again, and when the next may come: each writes every record
    /// still owed once more (read and published too, if its sync fails after all), so they
    /// back off, 100 ms doubling to 30 s.
    pub(super) reestablish_failures: u32,
    pub(super) reestablish_at: Option<Instant>,
    /// Writing the copies again: a segment they fill is synced here before the next starts,
    /// not handed to the syncer (the simulation found copies lost when only the last one was).
    pub(super) reestablishing: bool,
}

/// Appends gathered into one write.
pub(super) const MAX_BATCH: usize = 4096;

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<AppendRequest>, wake: impl Fn()) {
        let idle = match self.shared.fsync {
            Fsync::Interval(d) => d,
            _ => Duration::from_secs(3600),
        };
        let mut buf = Vec::new();
        loop {
            let first = match rx.recv_timeout(idle) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick(Instant::now());
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
            let groups: Vec<&[Vec<u8>]> = batch.iter().map(|r| r.payloads.as_slice()).collect();
            let results = self.write_batch(&groups, &mut buf);
            let wrote = results.iter().any(Result::is_ok);
            for (req, result) in batch.into_iter().zip(results) {
                let _ = req.reply.send(result);
            }
            if wrote {
                wake();
            }
            self.tick(Instant::now());
        }
        // Every handle is gone: make what was written durable before leaving.
        if let Some(syncer) = self.syncer.take() {
            drop(syncer.queue);
            let _ = syncer.thread.join();
        }
        if self.recycled && self.file.set_len(self.offset).is_ok() {
            // The next start reads this segment to its end: no old bytes to scan past.
            self.dirty = true;
        }
        if self.shared.sync_failed.load(Ordering::SeqCst) {
            // Leaving with a failed sync not made good: the copies are the only sound source
            // of what it may have lost, and they go with the process.
            self.reestablish(self.clock);
            if self.shared.sync_failed.load(Ordering::SeqCst) {
                tracing::error!(
                    records = self.unsynced.records.len(),
                    "spool: stopping with a failed sync not made good: these records may not \
                     survive a power cut"
                );
            }
        } else if self.dirty
            && let Err(error) = self.sync_now()
        {
            sync_failed(&self.shared, &error);
        }
    }

    /// Between batches: a sync when one is due; after a failed one, what it may have lost
    /// written again; with too many copies held, a wait for the syncer.
    pub(super) fn tick(&mut self, now: Instant) {
        if !matches!(self.shared.fsync, Fsync::Interval(_)) {
            return;
        }
        self.clock = now;
        self.unsynced
            .trim(self.shared.synced.load(Ordering::SeqCst));
        if self.shared.sync_failed.load(Ordering::SeqCst) {
            if self.reestablish_at.is_none_or(|at| now >= at) {
                self.reestablish(now);
            }
        } else if self.unsynced.bytes > MAX_UNSYNCED_BYTES {
            self.wait_for_sync(now);
        } else {
            self.sync_if_due(now);
        }
    }

    /// After a failed sync: every record since the last good one is appended again from its
    /// copy, to a new segment, which is then synced here. Also those the publisher has
    /// committed past: where the failed pages were dropped, it read them as damage and went on
    /// (the simulation found that loss when committed records were left out). Their first
    /// copies may be published too: duplicates, never loss.
    fn reestablish(&mut self, now: Instant) {
        let owed = std::mem::take(&mut self.unsynced);
        self.reestablishing = true;
        let payloads: Vec<Vec<u8>> = owed.records.iter().map(|(_, p)| p.clone()).collect();
        let moved = (|| {
            if self.cut_pending {
                self.file.set_len(self.offset)?;
                self.cut_pending = false;
            }
            if self.offset > 0 {
                self.start_segment()?;
            }
            Ok(())
        })();
        // A segment's worth at a time, as appends come: one segment holding them all could
        // outgrow the spool's bound and, never deleted while active, hold it full (the
        // simulation found that).
        let written = moved.and_then(|()| {
            let mut rest = payloads.as_slice();
            while !rest.is_empty() {
                let mut bytes = 0;
                let n = rest
                    .iter()
                    .take_while(|p| {
                        bytes += (frame::HEADER_BYTES + p.len()) as u64;
                        bytes <= self.segment_bytes
                    })
                    .count()
                    .max(1);
                let groups: Vec<&[Vec<u8>]> = rest[..n].chunks(1).collect();
                let results = self.write_batch(&groups, &mut Vec::new());
                if let Some(error) = results.into_iter().find_map(Result::err) {
                    return Err(io::Error::other(error.to_string()));
                }
                rest = &rest[n..];
            }
            self.sync_now()
        });
        self.reestablishing = false;
        match written {
            Ok(()) => {
                // Everything up to here is durable, or confirmed by Kafka.
                self.unsynced = Unsynced::default();
                self.shared.sync_failed.store(false, Ordering::SeqCst);
                self.shared
                    .synced
                    .fetch_max(self.next_seq - 1, Ordering::SeqCst);
                self.last_sync = now;
                self.reestablish_failures = 0;
                self.reestablish_at = None;
                tracing::warn!(
                    records = payloads.len(),
                    "spool: records written since the last good sync appended again and synced"
                );
            }
            Err(error) => {
                // The first copies are kept for the next try, all of them: of a try that failed
                // part way, some were written again and some not (the simulation found copies
                // lost when a full spool took only some of them and the rest were forgotten).
                self.unsynced = owed;
                let wait = Duration::from_millis(100 << self.reestablish_failures.min(9));
                self.reestablish_failures += 1;
                self.reestablish_at = Some(now + wait.min(Duration::from_secs(30)));
                SpoolSyncFailed { error: &error }.emit();
            }
        }
    }

    /// Too many copies held: queues a sync of the active segment and waits for the syncer to
    /// get through it (or to fail, which `tick` then handles).
    fn wait_for_sync(&mut self, now: Instant) {
        let upto = self.next_seq - 1;
        if self.dirty {
            // A failure is on `sync_failed` already.
            let _ = self.sync_in_background(now);
        }
        while self.deferred.as_ref().is_some_and(|q| !q.is_empty()) {
            self.run_sync_job();
        }
        // Bounded: a sync made here instead (no file handle to queue) leaves the syncer's
        // mark behind; the next tick waits again.
        let until = Instant::now() + Duration::from_secs(1);
        while self.syncer.is_some()
            && self.shared.synced.load(Ordering::SeqCst) < upto
            && !self.shared.sync_failed.load(Ordering::SeqCst)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The simulation's syncer: runs the oldest queued job, if any.
    pub(super) fn run_sync_job(&mut self) {
        if let Some(job) = self.deferred.as_mut().and_then(VecDeque::pop_front) {
            job.run(&self.shared);
        }
    }

    /// Writes `groups` as one batch; each group gets its first sequence number, or why none of
    /// it was taken (a group is checked for room as a whole, so it is never cut in two).
    pub(super) fn write_batch(
        &mut self,
        groups: &[&[Vec<u8>]],
        buf: &mut Vec<u8>,
    ) -> Vec<Result<u64, AppendError>> {
        buf.clear();
        // A failed sync not yet made good, with as many copies held as the bound allows: no
        // more until it is (memory stays bounded; readiness is red meanwhile).
        if self.unsynced.bytes > MAX_UNSYNCED_BYTES
            && self.shared.sync_failed.load(Ordering::SeqCst)
        {
            let refused = AppendError::Io {
                kind: io::ErrorKind::Other,
                message: "spool sync failing".into(),
            };
            return vec![Err(refused); groups.len()];
        }
        // Room first: the segment is chosen before the frames are made, since each frame's
        // checksum holds its segment's first number.
        let mut room = self.shared.max_bytes.saturating_sub(self.shared.bytes());
        let mut results: Vec<Result<u64, AppendError>> = groups
            .iter()
            .map(|group| {
                if group.is_empty() || group.iter().any(|p| p.len() > frame::MAX_PAYLOAD_BYTES) {
                    return Err(AppendError::Io {
                        kind: io::ErrorKind::InvalidInput,
                        message: "record too large".into(),
                    });
                }
                let size: u64 = group
                    .iter()
                    .map(|p| (frame::HEADER_BYTES + p.len()) as u64)
                    .sum();
                if size > room {
                    return Err(AppendError::Full);
                }
                room -= size;
                Ok(size)
            })
            .collect();
        let bytes: u64 = results.iter().flatten().sum();
        if bytes == 0 {
            return results;
        }
        self.shared.busy(true);
        let mut seq = self.next_seq;
        let written = self.make_room(bytes).and_then(|()| {
            for (group, result) in groups.iter().zip(results.iter_mut()) {
                if let Ok(first) = result {
                    *first = seq;
                    for payload in group.iter() {
                        frame::encode(self.first, seq, payload, buf);
                        seq += 1;
                    }
                }
            }
            self.write_durably(buf)
        });
        self.shared.busy(false);
        match written {
            Ok(()) => {
                SpoolAppended {
                    records: (seq - self.next_seq) as usize,
                    bytes: buf.len(),
                }
                .emit();
                match self.shared.fsync {
                    Fsync::Interval(_) => {
                        let mut at = self.next_seq;
                        for (group, result) in groups.iter().zip(&results) {
                            if result.is_ok() {
                                for payload in group.iter() {
                                    self.unsynced.push(at, payload);
                                    at += 1;
                                }
                            }
                        }
                    }
                    Fsync::Always => self.shared.synced.store(seq - 1, Ordering::SeqCst),
                    Fsync::Never => {}
                }
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
                let records: usize = groups
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .map(|(g, _)| g.len())
                    .sum();
                self.next_seq += records as u64;
                self.cut_pending = self.cut_failed_write(buf.len()).is_err();
                self.rotate_next = true;
                self.shared.disk_error.store(true, Ordering::Relaxed);
                SpoolWriteFailed { error: &error }.emit();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(AppendError::io(&error));
                }
            }
        }
        results
    }

    /// Makes sure nothing of a failed write of `len` bytes at `offset` can be read. A file
    /// written over a spare gets zeros there instead of a cut: its blocks stay allocated, so
    /// the next write needs no new space (cut to nothing, a spare left the writer needing
    /// blocks a full disk did not have, and it answered 503 for good). Zeros after the last
    /// frame read as what a spare held before, neither record nor damage; the file is cut to
    /// its frames when the writer moves on (`start_segment`).
    fn cut_failed_write(&mut self, len: usize) -> io::Result<()> {
        if self.recycled
            && self
                .file
                .write_at(self.offset, &vec![0; len.max(frame::HEADER_BYTES)])
                .is_ok()
        {
            return Ok(());
        }
        self.file.set_len(self.offset)
    }

    /// Before a write of `bytes`: the cut of a failed write, and a new segment if this one is
    /// full or a failed write asked for one.
    fn make_room(&mut self, bytes: u64) -> io::Result<()> {
        if self.cut_pending {
            self.file.set_len(self.offset)?;
            self.cut_pending = false;
        }
        let full = self.offset > 0 && self.offset + bytes > self.segment_bytes;
        // After a failed write: a new segment, so the full one can be freed once delivered —
        // and, when the disk is full, a spare, which takes no new space (the simulation found
        // a full disk held by spares while the writer kept failing on an empty new file).
        let after_failure = self.rotate_next
            && (self.offset > 0 || (!self.recycled && !self.shared.spares().is_empty()));
        if full || after_failure {
            self.start_segment()?;
        }
        self.rotate_next = false;
        Ok(())
    }

    /// Puts `buf` in the active segment and, with `Always`, makes it and the segment's
    /// directory entry durable. A spare's new name is made durable before a frame goes in,
    /// whatever the fsync mode: a power cut must not bring back the spare's name (and with it
    /// a bound below these frames' numbers), or recovery could hand out this segment's name
    /// again and its old frames would pass as new ones (the simulation found that).
    pub(super) fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
        let always = self.shared.fsync == Fsync::Always;
        let skip = plant::active(if self.recycled {
            plant::Plant::SkipSpareDirSync
        } else {
            plant::Plant::SkipDirSync
        });
        if (always || self.recycled) && !self.dir_synced && !skip {
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

    pub(super) fn start_segment(&mut self) -> io::Result<()> {
        if self.recycled {
            // The reader reads a finished segment to its end: not into what the file held.
            self.file.set_len(self.offset)?;
        }
        // `Always`: already synced. `Never`: not promised. `Interval`: in the background,
        // with the directory entry of the segment that follows.
        if self.dirty && matches!(self.shared.fsync, Fsync::Interval(_)) {
            if self.reestablishing {
                self.sync_now()?;
            } else {
                self.sync_in_background(self.clock)?;
            }
        }
        let opened = open_segment(&self.shared, self.next_seq)?;
        let end = opened.end;
        self.file = opened.file;
        self.offset = end;
        self.recycled = opened.recycled;
        self.first = self.next_seq;
        // `Never` promises nothing across a power cut, so it never syncs a new file's
        // directory entry; a spare's new name is synced in every mode (`write_durably`).
        self.dir_synced = !opened.recycled && self.shared.fsync == Fsync::Never;
        let first = self.next_seq;
        self.shared.set_tail(|t| {
            t.active_first = first;
            t.active_end = end;
        });
        Ok(())
    }

    pub(super) fn sync_if_due(&mut self, now: Instant) {
        if let Fsync::Interval(every) = self.shared.fsync
            && self.dirty
            && now.saturating_duration_since(self.last_sync) >= every
        {
            // A failure is on `sync_failed` already.
            let _ = self.sync_in_background(now);
        }
    }

    /// Hands the active segment to the syncer; syncs here if that cannot be done (then,
    /// without a syncer, in order with every earlier sync: what it covers is durable).
    pub(super) fn sync_in_background(&mut self, now: Instant) -> io::Result<()> {
        let job = |file| SyncJob {
            file,
            dir: !self.dir_synced,
            upto: self.next_seq - 1,
        };
        let queued = match (&self.syncer, &mut self.deferred, self.file.try_clone()) {
            (Some(syncer), _, Ok(file)) => syncer.queue.send(job(file)).is_ok(),
            (None, Some(queue), Ok(file)) => {
                // The thread's queue holds 4 and then makes the writer wait.
                if queue.len() >= 4
                    && let Some(oldest) = queue.pop_front()
                {
                    oldest.run(&self.shared);
                }
                queue.push_back(job(file));
                true
            }
            _ => false,
        };
        if !queued {
            // Linux reports a writeback error once: whoever sees it must say so.
            if let Err(error) = self.sync_now() {
                sync_failed(&self.shared, &error);
                return Err(error);
            }
            if self.syncer.is_none() && self.deferred.is_none() {
                synced_upto(&self.shared, self.next_seq - 1);
            }
            return Ok(());
        }
        self.dir_synced = true;
        self.dirty = false;
        self.last_sync = now;
        Ok(())
    }

    pub(super) fn sync_now(&mut self) -> io::Result<()> {
        sync_file(self.file.as_ref())?;
        if !self.dir_synced {
            self.shared.storage.sync_dir("")?;
            self.dir_synced = true;
        }
        self.dirty = false;
        self.last_sync = self.clock;
        Ok(())
    }
}

pub(super) fn sync_file(file: &dyn StorageFile) -> io::Result<()> {
    let started = Instant::now();
    file.sync()?;
    SpoolSynced {
        elapsed: started.elapsed(),
    }
    .emit();
    Ok(())
}

/// A segment opened for the writer.
pub(super) struct ActiveFile {
    pub(super) file: Box<dyn StorageFile>,
    /// Where the next frame goes.
    pub(super) end: u64,
    /// Written over a spare: old bytes follow `end`.
    pub(super) recycled: bool,
}

/// Opens segment `first` for writing: over a spare if there is one, else a new file; a segment
/// of that name with bytes in it (a failed rotation's whole frames) is kept and appended to.
pub(super) fn open_segment(shared: &Shared, first: u64) -> io::Result<ActiveFile> {
    let storage = shared.storage.as_ref();
    let name = segment_name(first);
    let existing = match storage.open(&name, false) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Some(file) = existing {
        let end = file.len()?;
        if end > 0 {
            return Ok(ActiveFile {
                file,
                end,
                recycled: false,
            });
        }
    }
    // Opened before the rename, so nothing can fail between it and the first write but the
    // directory sync (retried before every write until it succeeds). The pool stays locked
    // until the spare has its new name: the publisher names delivered segments spares under
    // the same lock, and two segments deleted out of order can get one bound, so its rename in
    // between would replace the file opened here and the frames would go into a file no name
    // points to. A spare that cannot be taken now stays in the pool: left out, it would hold
    // disk space no one gives back.
    let taken = {
        let mut spares = shared.spares();
        spares.pop().and_then(|spare| {
            let file = storage
                .open(&spare, false)
                .and_then(|file| storage.rename(&spare, &name).map(|()| file));
            if file.is_err() {
                spares.push(spare);
            }
            file.ok()
        })
    };
    if let Some(file) = taken {
        return Ok(ActiveFile {
            file,
            end: 0,
            recycled: true,
        });
    }
    let file = storage.open(&name, true)?;
    let end = file.len()?;
    Ok(ActiveFile {
        file,
        end,
        recycled: false,
    })
}

/// Writes a spare of zeros if none is left and the spool has room for one within its bound
/// (so segments and spares together stay within it when the spare is made). Only at open: a
/// fresh spool's first segment. Later spares are delivered segments: writing zeros while the
/// relay runs put 64 MiB in the device queue ahead of the writer's syncs (p99 at 23k/s 87 ms
/// against 47 without; BENCHMARKS.md).
pub(super) fn top_up_spares(shared: &Shared) {
    let room = shared.bytes() + shared.segment_bytes <= shared.max_bytes;
    if !room || !shared.spares().is_empty() {
        return;
    }
    match make_spare(shared.storage.as_ref(), shared.segment_bytes) {
        Ok(name) => shared.spares().push(name),
        Err(error) => tracing::warn!(%error, "spool: could not write a spare segment"),
    }
}
