//! The publisher's side: reading records back from the committed position, skipping damage
//! without losing a neighbour, committing, deleting (or keeping as a spare) delivered
//! segments, and dead letters.

use super::*;

/// The segment being read.
pub(super) struct Current {
    pub(super) first: u64,
    pub(super) file: Box<dyn StorageFile>,
    /// Offset of the next unread byte.
    pub(super) offset: u64,
}

/// Reads records back in order from the committed position, and commits.
pub struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) position: Box<dyn StorageFile>,
    /// The position slot written last.
    pub(super) slot: usize,
    pub(super) dropped: BTreeSet<u64>,
    /// The dead-letter reserve is in place.
    pub(super) reserve_held: bool,
    pub(super) current: Option<Current>,
    /// First sequence number of the last segment read to its end.
    pub(super) finished: Option<u64>,
    pub(super) buf: Vec<u8>,
    /// Bytes to read next: `base_chunk`, or a large frame's size.
    pub(super) chunk: usize,
    /// `READ_CHUNK`; the simulation shrinks it, so that damage meets chunk boundaries.
    pub(super) base_chunk: usize,
    /// Highest sequence number handed out so far.
    pub(super) last_read: u64,
    pub(super) committed: u64,
    pub(super) persisted: u64,
    /// When segments were last deleted and the position written; `None`: not yet.
    pub(super) last_persist: Option<Instant>,
}

/// Bytes read from a segment at a time. A frame larger than this is read whole in a pass of
/// its own; a chunk of the largest frame's size, always, kept 8 MiB touched whenever the
/// publisher fell behind.
pub(super) const READ_CHUNK: usize = 256 << 10;

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
            let want = (end - cur.offset).min(self.chunk as u64) as usize;
            self.buf.resize(want, 0);
            let got = cur.file.read_at(cur.offset, &mut self.buf)?;
            self.buf.truncate(got);
            if got == 0 {
                // Of the active segment: not yet, as far as this read saw; the next pass reads
                // again (marked finished, what the writer appends to it would never be read).
                if active {
                    break;
                }
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
                match frame::decode(&self.buf[at..], cur.first) {
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
                // A frame longer than the chunk begins here: read it whole.
                if cut && self.chunk < frame::MAX_FRAME_BYTES {
                    self.chunk = frame::MAX_FRAME_BYTES;
                    continue;
                }
                break;
            }
            if self.chunk > self.base_chunk {
                self.chunk = self.base_chunk;
                self.buf = Vec::new();
            }
            cur.offset += at as u64;
        }
        Ok(n)
    }

    /// Opens the oldest segment after the last finished one that may hold unread records.
    pub(super) fn open_next(&mut self) -> io::Result<bool> {
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

    /// Deletes (or keeps as a spare) every delivered segment. One that cannot be renamed is
    /// removed; one that cannot be removed either is left for the next commit, and the others
    /// are deleted all the same: the first error is returned once all were tried.
    pub(super) fn delete_delivered(
        &mut self,
        unconfirmed: impl Fn(u64, u64) -> bool,
    ) -> io::Result<()> {
        let segs = list_segments(self.shared.storage.as_ref())?;
        let active = self.shared.tail().active_first;
        let mut first_error = None;
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
            let storage = self.shared.storage.as_ref();
            let deleted = storage
                .open(name, false)
                .and_then(|f| f.len())
                .and_then(|len| {
                    // One delivered segment of a useful size is kept for the writer to write
                    // over. Its name bounds the numbers in it (`spare_name`); a crash before the
                    // rename is durable finds it a segment again, whose records are sent twice,
                    // never lost.
                    let mut spares = self.shared.spares();
                    if spares.is_empty() && 2 * len >= self.shared.segment_bytes {
                        let spare = spare_name(last);
                        if storage.rename(name, &spare).is_ok() {
                            spares.push(spare);
                            return Ok(len);
                        }
                    }
                    drop(spares);
                    storage.remove(name).map(|()| len)
                });
            let len = match deleted {
                Ok(len) => len,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            self.shared.total_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.current.as_ref().is_some_and(|c| c.first == *first) {
                self.current = None;
                self.finished = Some(*first);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn last_read(&self) -> u64 {
        self.last_read
    }

    /// Reads `bytes` at a time (the simulation's small chunks).
    #[cfg(test)]
    pub(crate) fn set_read_chunk(&mut self, bytes: usize) {
        (self.chunk, self.base_chunk) = (bytes, bytes);
    }

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
        if first.is_err() {
            // The reserve is spent: a spare gives its space too (the next delivered segment
            // becomes one again). Kept, it held the disk full while the records waiting for
            // this write held the commit, and with it every segment behind them (the
            // simulation found that stall).
            let mut spares = self.shared.spares();
            if let Some(spare) = spares.pop() {
                if storage.remove(&spare).is_ok() {
                    drop(spares);
                    return write_dead_letter(storage, seq, payload, reason);
                }
                spares.push(spare);
            }
        }
        first
    }

    /// Makes (or remakes, once space allows) the dead-letter reserve.
    pub(super) fn hold_reserve(&mut self) {
        if !self.reserve_held {
            self.reserve_held =
                make_reserve(self.shared.storage.as_ref(), self.shared.reserve_bytes);
        }
    }
}

/// Length of the damaged stretch at the start of `rest`: up to the next intact frame, or,
/// when more of the segment follows (`cut`), up to the first place a frame may begin that
/// this chunk cannot show whole — so damage near a chunk's end never costs the next record.
pub(super) fn skip_damage(rest: &[u8], cut: bool, segment: u64) -> usize {
    let skip = (1..rest.len())
        .find(|&i| match frame::decode(&rest[i..], segment) {
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
