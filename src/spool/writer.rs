//! The writer thread: group commit of appended records into the active segment, rotation,
//! the fsync policy (and `Interval`'s syncer thread), and cutting a failed write.

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
}

impl Syncer {
    pub(super) fn spawn(shared: Arc<Shared>) -> io::Result<Syncer> {
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
pub(super) fn note_sync(shared: &Shared, result: io::Result<()>) {
    match result {
        Ok(()) => shared.sync_failed.store(false, Ordering::Relaxed),
        Err(error) => {
            shared.sync_failed.store(true, Ordering::Relaxed);
            SpoolSyncFailed { error: &error }.emit();
        }
    }
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) segment_bytes: u64,
    pub(super) file: Box<dyn StorageFile>,
    /// End of the last whole frame written to the active segment.
    pub(super) offset: u64,
    pub(super) next_seq: u64,
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
    pub(super) syncer: Option<Syncer>,
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
            let groups: Vec<&[Vec<u8>]> = batch.iter().map(|r| r.payloads.as_slice()).collect();
            let results = self.write_batch(&groups, &mut buf);
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

    /// Writes `groups` as one batch; each group gets its first sequence number, or why none of
    /// it was taken (a group is checked for room as a whole, so it is never cut in two).
    pub(super) fn write_batch(
        &mut self,
        groups: &[&[Vec<u8>]],
        buf: &mut Vec<u8>,
    ) -> Vec<Result<u64, AppendError>> {
        buf.clear();
        let total = self.shared.bytes();
        let mut seq = self.next_seq;
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
                if total + buf.len() as u64 + size > self.shared.max_bytes {
                    return Err(AppendError::Full);
                }
                let first = seq;
                for payload in group.iter() {
                    frame::encode(seq, payload, buf);
                    seq += 1;
                }
                Ok(first)
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
    pub(super) fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
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

    pub(super) fn start_segment(&mut self) -> io::Result<()> {
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

    pub(super) fn sync_if_due(&mut self) {
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
    pub(super) fn sync_in_background(&mut self) -> io::Result<()> {
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

    pub(super) fn sync_now(&mut self) -> io::Result<()> {
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

pub(super) fn sync_file(file: &dyn StorageFile) -> io::Result<()> {
    let started = Instant::now();
    file.sync()?;
    SpoolSynced {
        elapsed: started.elapsed(),
    }
    .emit();
    Ok(())
}
