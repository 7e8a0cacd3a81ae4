//! Deterministic simulation of the spool and the publisher's commit logic, after
//! FoundationDB's and TigerBeetle's: one thread, one seeded generator, a simulated disk that
//! follows Linux (data and directory entries durable only after a successful `fsync` of the
//! file / its directory; a failed `fsync` drops the dirty pages and is reported once; a power
//! cut loses everything not durable and may tear the last write at any byte) with `EIO`,
//! `ENOSPC`, `EMFILE` and short writes injected at random operations, and a simulated broker
//! that confirms, refuses, fails or stalls deliveries. Crashes (kill -9) and power cuts come at
//! random; after each fault-free drain the invariant is checked:
//!
//! - every record acknowledged (in `Always` mode; after a power cut, in the other modes, what
//!   was acknowledged before it is not owed) is on the messages topic, on the quarantine topic
//!   or in the dead-letter directory, at least once;
//! - nothing there was never appended;
//! - per key, records reach the messages topic in the order they were appended;
//! - once drained and the faults gone, the spool takes appends again (no deadlock).
//!
//! `Interval` runs its syncer's queue as steps of their own, and there a failed fsync drops the
//! pages it could not write from the cache half of the time (a read then returns what the disk
//! held): what the relay counts as synced must survive a power cut, and a kill -9 while a failed
//! sync is not yet made good again loses only what was written since the last good one.
//!
//! A failing seed prints itself; `IM_RELAY_SIM_SEED=<seed>` replays it exactly. The bugs
//! planted in `plant` must each be caught by the sweep.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::plant::{self, Plant};
use super::storage::{Storage, StorageFile};
use super::{Fsync, Shared, SpoolConfig, Writer, recover};
use crate::publish::{Disposition, Event, Failure, Publisher, PublisherConfig, SendError, Sink};
use crate::record::{Record, Target, View};
use crate::telemetry::Blocked;

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Faults injected, by kind.
#[derive(Debug, Default, Clone)]
pub struct Counts(pub BTreeMap<&'static str, u64>);

impl Counts {
    fn add(&mut self, kind: &'static str) {
        *self.0.entry(kind).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------------
// The disk.

enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Default)]
struct Inode {
    /// What readers see (the page cache).
    data: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    dirty: Vec<Op>,
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(at, bytes) => {
            let end = *at as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*at as usize..end].copy_from_slice(bytes);
        }
        Op::SetLen(len) => data.resize(*len as usize, 0),
    }
}

struct DiskState {
    inodes: Vec<Inode>,
    dir: BTreeMap<String, usize>,
    durable_dir: BTreeMap<String, usize>,
    subdirs: BTreeSet<String>,
    rng: Rng,
    /// Chance of a fault per operation, per mille; 0 while draining.
    fault_rate: u64,
    /// Bytes the file system holds at most (real `ENOSPC`, not the spool's quota).
    space: u64,
    faults: Counts,
    /// A failed fsync may drop the pages it could not write (`Interval` runs).
    evict: bool,
    /// Pages were dropped since the last crash.
    evicted: bool,
    /// A file's fsync failed since the last start (its pages are clean, written or not).
    file_sync_failed: bool,
}

impl DiskState {
    fn used(&self) -> u64 {
        let live: BTreeSet<usize> = self.dir.values().copied().collect();
        live.iter().map(|&i| self.inodes[i].data.len() as u64).sum()
    }

    fn fault(&mut self, kind: &'static str) -> bool {
        if self.fault_rate > 0 && self.rng.chance(self.fault_rate) {
            if trace() {
                eprintln!("  fault: {kind}");
            }
            self.faults.add(kind);
            return true;
        }
        false
    }
}

fn trace() -> bool {
    std::env::var_os("IM_RELAY_SIM_TRACE").is_some()
}

fn err(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, format!("simulated {what}"))
}

fn eio(what: &str) -> io::Error {
    err(io::ErrorKind::Other, what)
}

#[derive(Clone)]
pub struct SimDisk(Arc<Mutex<DiskState>>);

impl SimDisk {
    fn new(seed: u64, space: u64) -> SimDisk {
        SimDisk(Arc::new(Mutex::new(DiskState {
            inodes: Vec::new(),
            dir: BTreeMap::new(),
            durable_dir: BTreeMap::new(),
            subdirs: BTreeSet::new(),
            rng: Rng(seed ^ 0xd15c),
            fault_rate: 0,
            space,
            faults: Counts::default(),
            evict: false,
            evicted: false,
            file_sync_failed: false,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap()
    }

    /// Everything not durable is lost; of each file's unsynced changes a prefix may have
    /// reached the disk, the last of them torn at any byte.
    fn power_cut(&self) {
        let mut s = self.state();
        let s = &mut *s;
        for ino in &mut s.inodes {
            let mut data = std::mem::take(&mut ino.durable);
            let keep = s.rng.below(ino.dirty.len() as u64 + 1) as usize;
            for (i, op) in ino.dirty.iter().take(keep).enumerate() {
                match op {
                    Op::Write(at, bytes) if i + 1 == keep => {
                        let torn = s.rng.below(bytes.len() as u64 + 1) as usize;
                        apply(&mut data, &Op::Write(*at, bytes[..torn].to_vec()));
                    }
                    op => apply(&mut data, op),
                }
            }
            ino.dirty.clear();
            ino.durable = data.clone();
            ino.data = data;
        }
        s.dir = s.durable_dir.clone();
    }

    /// The spool as the disk holds it, for a violation's message.
    fn describe(&self, shared: &Shared, writer: &Writer) -> String {
        let s = self.state();
        let files: Vec<String> = s
            .dir
            .iter()
            .map(|(n, &i)| {
                let generation = n.strip_suffix(".seg").and_then(|d| d.parse().ok());
                let scan = super::frame::scan(&s.inodes[i].data, generation.unwrap_or(0));
                let seqs = scan.frames.iter().map(|f| f.0);
                let (lo, hi) = (seqs.clone().min(), seqs.max());
                format!(
                    "{n}: {} bytes, frames {lo:?}..{hi:?}, damaged {}",
                    s.inodes[i].data.len(),
                    scan.damaged
                )
            })
            .collect();
        format!(
            "tail {:?}, committed {}, bytes {}/{} (disk {} of {}), disk_error {}, writer next {} offset {} cut_pending {}; files {files:?}",
            shared.tail(),
            shared.committed.load(std::sync::atomic::Ordering::Relaxed),
            shared.bytes(),
            shared.max_bytes,
            s.used(),
            s.space,
            shared.disk_error.load(std::sync::atomic::Ordering::Relaxed),
            writer.next_seq,
            writer.offset,
            writer.cut_pending,
        )
    }

    fn set_faults(&self, per_mille: u64) {
        self.state().fault_rate = per_mille;
    }

    fn clear_dead_letters(&self) {
        self.state()
            .dir
            .retain(|n, _| !(n.starts_with("dead-letter/") && n != "dead-letter/reserve"));
    }

    /// The dead-letter files' entries (as written, whole).
    fn dead_letters(&self) -> Vec<Record> {
        let s = self.state();
        s.dir
            .iter()
            .filter(|(n, _)| n.starts_with("dead-letter/") && n.ends_with(".entry"))
            .filter_map(|(_, &i)| Record::decode(&s.inodes[i].data))
            .collect()
    }
}

struct SimFile {
    disk: SimDisk,
    ino: usize,
}

impl Storage for SimDisk {
    fn list_in(&self, sub: &str) -> io::Result<Vec<String>> {
        let mut s = self.state();
        if s.fault("list EIO") {
            return Err(eio("readdir EIO"));
        }
        if sub.is_empty() {
            return Ok(s.dir.keys().filter(|n| !n.contains('/')).cloned().collect());
        }
        if !s.subdirs.contains(sub) {
            return Err(err(io::ErrorKind::NotFound, "ENOENT (directory)"));
        }
        let inside = |n: &String| n.strip_prefix(sub)?.strip_prefix('/').map(str::to_owned);
        Ok(s.dir
            .keys()
            .filter_map(inside)
            .filter(|n| !n.contains('/'))
            .collect())
    }

    fn list_dirs(&self) -> io::Result<Vec<String>> {
        let mut s = self.state();
        if s.fault("list EIO") {
            return Err(eio("readdir EIO"));
        }
        Ok(s.subdirs
            .iter()
            .filter(|d| !d.contains('/'))
            .cloned()
            .collect())
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let mut s = self.state();
        if s.fault("open EMFILE") {
            return Err(err(io::ErrorKind::Other, "EMFILE"));
        }
        let ino = match s.dir.get(name) {
            Some(&i) => i,
            None if !create => return Err(err(io::ErrorKind::NotFound, "ENOENT")),
            None => {
                if let Some((sub, _)) = name.split_once('/')
                    && !s.subdirs.contains(sub)
                {
                    return Err(err(io::ErrorKind::NotFound, "ENOENT (directory)"));
                }
                if s.fault("create ENOSPC") {
                    return Err(err(io::ErrorKind::StorageFull, "ENOSPC"));
                }
                s.inodes.push(Inode::default());
                let i = s.inodes.len() - 1;
                s.dir.insert(name.to_owned(), i);
                i
            }
        };
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        if trace() {
            eprintln!("  remove {name}");
        }
        let mut s = self.state();
        if s.fault("unlink EIO") {
            return Err(eio("unlink EIO"));
        }
        s.dir
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| err(io::ErrorKind::NotFound, "ENOENT"))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        if trace() {
            eprintln!("  rename {from} {to}");
        }
        let mut s = self.state();
        if s.fault("rename EIO") {
            return Err(eio("rename EIO"));
        }
        let ino = s
            .dir
            .remove(from)
            .ok_or_else(|| err(io::ErrorKind::NotFound, "ENOENT"))?;
        s.dir.insert(to.to_owned(), ino);
        Ok(())
    }

    fn sync_dir(&self, sub: &str) -> io::Result<()> {
        let mut s = self.state();
        if s.fault("dir fsync EIO") {
            return Err(eio("directory fsync EIO"));
        }
        let inside = |n: &String| match sub {
            "" => !n.contains('/'),
            sub => n.strip_prefix(sub).is_some_and(|r| r.starts_with('/')),
        };
        let s = &mut *s;
        s.durable_dir.retain(|n, _| !inside(n));
        for (n, i) in &s.dir {
            if inside(n) {
                s.durable_dir.insert(n.clone(), *i);
            }
        }
        Ok(())
    }

    fn create_dir(&self, sub: &str) -> io::Result<()> {
        // Directories are made durable with their parent's next sync; simplified: at once.
        self.state().subdirs.insert(sub.to_owned());
        Ok(())
    }
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk.state().inodes[self.ino].data.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.disk.state();
        if s.fault("read EIO") {
            return Err(eio("read EIO"));
        }
        let data = &s.inodes[self.ino].data;
        let from = (offset as usize).min(data.len());
        let n = (data.len() - from).min(buf.len());
        buf[..n].copy_from_slice(&data[from..from + n]);
        Ok(n)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.disk.state();
        let s = &mut *s;
        let len = s.inodes[self.ino].data.len() as u64;
        let grows = (offset + buf.len() as u64).saturating_sub(len);
        let room = s.space.saturating_sub(s.used());
        let (n, error) = if grows > room {
            s.faults.add("write ENOSPC (disk full)");
            let n = (room + len).saturating_sub(offset) as usize;
            (
                n.min(buf.len()),
                Some(err(io::ErrorKind::StorageFull, "ENOSPC")),
            )
        } else if s.fault("write EIO") {
            let n = s.rng.below(buf.len() as u64) as usize;
            (n, Some(eio("write EIO (short write)")))
        } else {
            (buf.len(), None)
        };
        if n > 0 {
            let op = Op::Write(offset, buf[..n].to_vec());
            let ino = &mut s.inodes[self.ino];
            apply(&mut ino.data, &op);
            ino.dirty.push(op);
        }
        error.map_or(Ok(()), Err)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.disk.state();
        if s.fault("truncate EIO") {
            return Err(eio("truncate EIO"));
        }
        let op = Op::SetLen(len);
        let ino = &mut s.inodes[self.ino];
        apply(&mut ino.data, &op);
        ino.dirty.push(op);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.disk.state();
        let failed = s.fault("fsync EIO");
        if failed {
            // Linux marks the pages clean after a writeback error: a retried fsync succeeds
            // without writing them, and once they leave the cache a read returns the disk's
            // old bytes.
            let dropped = s.evict && s.rng.chance(500);
            let s = &mut *s;
            s.file_sync_failed = true;
            let ino = &mut s.inodes[self.ino];
            ino.dirty.clear();
            if dropped {
                if trace() {
                    eprintln!("  fsync EIO: pages of inode {} dropped", self.ino);
                }
                // Content only: the file's size is the inode's, kept in memory.
                let len = ino.data.len();
                ino.data = ino.durable.clone();
                ino.data.resize(len, 0);
                s.evicted = true;
                s.faults.add("fsync EIO, pages dropped");
            }
            return Err(eio("fsync EIO"));
        }
        let ino = &mut s.inodes[self.ino];
        for op in std::mem::take(&mut ino.dirty) {
            apply(&mut ino.durable, &op);
        }
        Ok(())
    }

    fn try_clone(&self) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(SimFile {
            disk: self.disk.clone(),
            ino: self.ino,
        }))
    }
}

// ---------------------------------------------------------------------------------------
// The broker.

const PARTITIONS: u64 = 3;

/// A record as it reached a topic.
#[derive(Debug, Clone)]
struct Landed {
    quarantine: bool,
    id: u64,
    /// Power cuts survived so far without `Always`: order is promised only within one.
    epoch: u64,
}

struct InFlight {
    generation: u64,
    seq: u64,
    id: u64,
    quarantine: bool,
    /// The simulated broker refuses it for good on this topic.
    refuse: bool,
}

#[derive(Default)]
struct BrokerState {
    /// Per topic-partition: handed to the producer, not yet answered, in send order.
    queues: BTreeMap<(bool, u64), VecDeque<InFlight>>,
    log: Vec<Landed>,
    events: VecDeque<Event>,
    fatal: bool,
    generation: u64,
    /// Chance per send of a synchronous refusal (unknown topic, queue full), per mille.
    send_faults: u64,
    /// Records refused only with another record's batch: sent again alone, they may follow
    /// newer records of their key that were in flight behind them (docs/zero-loss.md).
    batch_refused: BTreeSet<u64>,
    epoch: u64,
}

fn id_of(entry: &Record) -> u64 {
    entry
        .headers
        .iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .expect("simulated entries carry an id")
}

fn has_header(entry: &Record, name: &str) -> bool {
    entry.headers.iter().any(|(k, _)| k == name)
}

#[derive(Clone)]
struct SimSink {
    broker: Rc<RefCell<BrokerState>>,
    rng: Rc<RefCell<Rng>>,
}

impl Sink for SimSink {
    fn send(&mut self, _topic: &str, seq: u64, entry: &View<'_>) -> Result<(), SendError> {
        let entry = &entry.to_record();
        let mut b = self.broker.borrow_mut();
        let mut rng = self.rng.borrow_mut();
        if b.send_faults > 0 && rng.chance(b.send_faults) {
            return Err(if rng.chance(500) {
                SendError::QueueFull
            } else {
                SendError::Failed(Failure {
                    disposition: Disposition::Wait(Blocked::TopicMissing),
                    error: "simulated unknown topic".into(),
                })
            });
        }
        let quarantine = entry.target == Target::Quarantine;
        let refuse = if quarantine {
            has_header(entry, "refuse_everywhere")
        } else {
            has_header(entry, "refuse")
        };
        let partition = match &entry.key {
            Some(k) => k.iter().map(|&b| u64::from(b)).sum::<u64>() % PARTITIONS,
            None => 0,
        };
        let generation = b.generation;
        b.queues
            .entry((quarantine, partition))
            .or_default()
            .push_back(InFlight {
                generation,
                seq,
                id: id_of(entry),
                quarantine,
                refuse,
            });
        Ok(())
    }

    fn rebuild(&mut self, generation: u64) -> Result<(), String> {
        let mut b = self.broker.borrow_mut();
        let mut rng = self.rng.borrow_mut();
        if b.send_faults > 0 && rng.chance(200) {
            return Err("simulated: cannot create the producer".into());
        }
        // Purged: of each partition's in-flight records a prefix may have been written (the
        // idempotent producer never lets a later one land without the earlier).
        land_prefixes(&mut b, &mut rng);
        b.generation = generation;
        b.fatal = false;
        Ok(())
    }

    fn fatal(&self) -> Option<String> {
        self.broker.borrow().fatal.then(|| "simulated fatal".into())
    }
}

fn land_prefixes(b: &mut BrokerState, rng: &mut Rng) {
    for q in b.queues.values_mut() {
        let keep = rng.below(q.len() as u64 + 1) as usize;
        for r in q.drain(..).take(keep) {
            if !r.refuse {
                let epoch = b.epoch;
                b.log.push(Landed {
                    quarantine: r.quarantine,
                    id: r.id,
                    epoch,
                });
            }
        }
    }
}

impl BrokerState {
    /// One thing the broker does: confirm, refuse or fail the head of a partition, or stall.
    fn act(&mut self, rng: &mut Rng, reliable: bool) {
        let busy: Vec<(bool, u64)> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if busy.is_empty() {
            return;
        }
        let key = busy[rng.below(busy.len() as u64) as usize];
        let roll = rng.below(100);
        let q = self.queues.get_mut(&key).expect("busy");
        if !reliable && roll < 10 {
            // Timed out: this record and every later one of the partition fail.
            for r in q.drain(..) {
                self.events.push_back(Event::Delivered {
                    generation: r.generation,
                    seq: r.seq,
                    result: Err(Failure {
                        disposition: Disposition::Wait(Blocked::BrokerUnavailable),
                        error: "simulated timeout".into(),
                    }),
                });
            }
            return;
        }
        if !reliable && roll < 25 {
            return; // stalled
        }
        let r = q.pop_front().expect("busy");
        let result = if r.refuse {
            // Kafka refuses the whole batch the record went in: sometimes the records behind
            // it on the partition were in that batch.
            let more = (rng.below(3) as usize).min(q.len());
            let batch: Vec<InFlight> = q.drain(..more).collect();
            for other in batch {
                self.batch_refused.insert(other.id);
                if trace() {
                    eprintln!(
                        "  refused with a batch: id {} (seq {})",
                        other.id, other.seq
                    );
                }
                self.events.push_back(Event::Delivered {
                    generation: other.generation,
                    seq: other.seq,
                    result: Err(Failure {
                        disposition: Disposition::Refused,
                        error: "simulated: batch too large".into(),
                    }),
                });
            }
            Err(Failure {
                disposition: Disposition::Refused,
                error: "simulated: message too large".into(),
            })
        } else {
            if trace() {
                eprintln!("  landed id {} (seq {})", r.id, r.seq);
            }
            self.log.push(Landed {
                quarantine: r.quarantine,
                id: r.id,
                epoch: self.epoch,
            });
            Ok(())
        };
        self.events.push_back(Event::Delivered {
            generation: r.generation,
            seq: r.seq,
            result,
        });
    }
}

// ---------------------------------------------------------------------------------------
// The run.

/// What one simulation run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: u64,
    /// Turns of the publisher's loop (events handled, sends, reads, commits).
    pub publish_steps: u64,
    /// Broker actions: confirm, refuse, time out or stall one partition's head.
    pub broker_steps: u64,
    pub appended: u64,
    pub acked: u64,
    pub published: u64,
    pub crashes: u64,
    pub power_cuts: u64,
    pub drains: u64,
    pub faults: Counts,
    pub violations: Vec<String>,
}

impl Report {
    /// Sums another run's figures into this one (violations are the caller's to keep).
    fn add(&mut self, r: Report) {
        self.steps += r.steps;
        self.publish_steps += r.publish_steps;
        self.broker_steps += r.broker_steps;
        self.appended += r.appended;
        self.acked += r.acked;
        self.published += r.published;
        self.crashes += r.crashes;
        self.power_cuts += r.power_cuts;
        self.drains += r.drains;
        for (k, n) in r.faults.0 {
            *self.faults.0.entry(k).or_default() += n;
        }
    }
}

struct Running {
    writer: Writer,
    publisher: Publisher<SimSink>,
    shared: Arc<Shared>,
}

fn kafka_config() -> crate::config::KafkaConfig {
    let env: HashMap<&str, &str> = [("IM_RELAY_KAFKA_MESSAGE_TIMEOUT_MS", "5000")].into();
    crate::config::KafkaConfig::load(None, &|k| env.get(k).map(|v| v.to_string()))
        .expect("simulation config")
}

pub struct Sim {
    rng: Rng,
    disk: SimDisk,
    cfg: SpoolConfig,
    broker: Rc<RefCell<BrokerState>>,
    sink_rng: Rc<RefCell<Rng>>,
    running: Option<Running>,
    kafka: crate::config::KafkaConfig,
    base: Instant,
    clock_ms: u64,
    next_id: u64,
    /// id → (key, refused on the messages topic, refused on the quarantine topic too)
    submitted: BTreeMap<u64, (u8, bool)>,
    /// Acknowledged and owed to Kafka (or the dead-letter directory).
    owed: BTreeSet<u64>,
    /// Every record ever acknowledged: the order per key is promised for these. (A write
    /// refused with an error may still come back after a power cut — its cut was not yet
    /// durable — and be published later: a real message, but out of order.)
    acked_ids: BTreeSet<u64>,
    /// Bytes the reader reads at a time: small, so that frames and damage straddle chunks.
    read_chunk: usize,
    /// A bit flipped since the last check: the backlog counts the records lost to it (their
    /// numbers are never read) until the writer appends past them, so it need not reach 0.
    flipped: bool,
    /// `Interval`: the spool sequence number each owed record was first written under, and
    /// the relay's synced mark when it last stopped.
    seq_of: BTreeMap<u64, u64>,
    synced_at_stop: u64,
    /// The relay's sync-failure flag after the last step.
    sync_failed: bool,
    report: Report,
}

impl Sim {
    pub fn new(seed: u64, fsync: Fsync) -> Sim {
        let mut rng = Rng(seed);
        let segment_bytes = 1024 + rng.below(3072);
        // Sometimes the file system fills before the spool's own bound does.
        let space = segment_bytes * (4 + rng.below(12));
        let read_chunk = 16 + rng.below(600) as usize;
        Sim {
            disk: SimDisk::new(seed, space),
            cfg: SpoolConfig {
                dir: "/sim".into(),
                max_bytes: segment_bytes * (3 + rng.below(12)),
                segment_bytes,
                fsync,
            },
            broker: Rc::default(),
            sink_rng: Rc::new(RefCell::new(Rng(seed ^ 0xb0b))),
            rng,
            running: None,
            kafka: kafka_config(),
            base: Instant::now(),
            clock_ms: 0,
            next_id: 1,
            submitted: BTreeMap::new(),
            owed: BTreeSet::new(),
            acked_ids: BTreeSet::new(),
            read_chunk,
            flipped: false,
            seq_of: BTreeMap::new(),
            synced_at_stop: 0,
            sync_failed: false,
            report: Report::default(),
        }
        .with_disk_evicting(matches!(fsync, Fsync::Interval(_)))
    }

    fn with_disk_evicting(self, evict: bool) -> Sim {
        self.disk.state().evict = evict;
        self
    }

    /// What the relay counts as durable (`Interval`).
    fn synced_mark(&self) -> u64 {
        self.running.as_ref().map_or(self.synced_at_stop, |r| {
            r.shared.synced.load(Ordering::SeqCst)
        })
    }

    /// Only what the relay counted as synced is owed.
    fn owed_only_synced(&mut self, synced: u64) {
        let seq_of = &self.seq_of;
        self.owed
            .retain(|id| seq_of.get(id).is_some_and(|seq| *seq <= synced));
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.clock_ms)
    }

    fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let storage: Arc<dyn Storage> = Arc::new(self.disk.clone());
        let recovered = recover(storage, &self.cfg, None);
        if trace() {
            eprintln!("start: {:?}", recovered.as_ref().map(|r| &r.3));
        }
        let Ok((mut writer, reader, shared, _)) = recovered else {
            // An injected fault during recovery: try again later. A sync that failed there
            // left pages clean that no later sync writes (and may have dropped them), and no
            // copy exists any more: after a kill -9, what came after the last good sync
            // depends on the recovery's syncs (docs/zero-loss.md).
            let mut disk = self.disk.state();
            let failed = std::mem::take(&mut disk.file_sync_failed);
            if std::mem::take(&mut disk.evicted) || failed {
                drop(disk);
                self.owed_only_synced(self.synced_at_stop);
            }
            return;
        };
        self.disk.state().file_sync_failed = false;
        if matches!(self.cfg.fsync, Fsync::Interval(_)) {
            writer.deferred = Some(VecDeque::new());
            (writer.clock, writer.last_sync) = (self.now(), self.now());
        }
        let sink = SimSink {
            broker: self.broker.clone(),
            rng: self.sink_rng.clone(),
        };
        let generation = self.broker.borrow().generation;
        let mut publisher = Publisher::with_sink(
            PublisherConfig {
                kafka: self.kafka.clone(),
                max_in_flight: 1 + self.rng.below(40) as usize,
            },
            reader,
            shared.clone(),
            sink,
            None,
            self.now(),
        );
        publisher.set_generation(generation);
        publisher.parts().2.set_read_chunk(self.read_chunk);
        self.running = Some(Running {
            writer,
            publisher,
            shared,
        });
    }

    /// kill -9: memory gone; the broker may still write a prefix of what was in flight.
    fn crash(&mut self) {
        if trace() {
            eprintln!("crash");
        }
        let synced = self.synced_mark();
        self.synced_at_stop = synced;
        if trace() {
            eprintln!(
                "  synced mark {synced}, evicted {}",
                self.disk.state().evicted
            );
        }
        // Pages a failed sync dropped were only in the writer's copies, and pages it marked
        // clean will not be written by any later sync (a restarted relay cannot know): a
        // crash before the writer made the failure good leaves what came after the last good
        // sync to chance.
        let failed = self
            .running
            .as_ref()
            .is_some_and(|r| r.shared.sync_failed.load(Ordering::SeqCst));
        if std::mem::take(&mut self.disk.state().evicted) || failed {
            self.owed_only_synced(synced);
        }
        self.running = None;
        let mut b = self.broker.borrow_mut();
        land_prefixes(&mut b, &mut self.sink_rng.borrow_mut());
        b.events.clear();
        b.generation += 1;
        b.fatal = false;
        self.report.crashes += 1;
    }

    fn power_cut(&mut self) {
        if trace() {
            eprintln!("power cut");
        }
        let synced = self.synced_mark();
        self.crash();
        self.disk.power_cut();
        self.report.power_cuts += 1;
        match self.cfg.fsync {
            Fsync::Always => {}
            // What the relay counted as synced survives; the rest is the documented window.
            Fsync::Interval(_) => self.owed_only_synced(synced),
            // Not promised across a power cut: only what Kafka already has is certain.
            Fsync::Never => self.owed.clear(),
        }
        if self.cfg.fsync != Fsync::Always {
            // A write that failed before the cut may come back (its truncation was not synced
            // either), after records that followed it.
            self.broker.borrow_mut().epoch += 1;
        }
    }

    fn append(&mut self) {
        let Some(run) = &mut self.running else {
            return;
        };
        let n = 1 + self.rng.below(4) as usize;
        let mut entries = Vec::new();
        for _ in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            let key = self.rng.below(5) as u8;
            let refuse = self.rng.chance(20);
            let everywhere = refuse && self.rng.chance(300);
            let mut headers = vec![("id".to_owned(), id.to_string().into_bytes())];
            if refuse {
                headers.push(("refuse".into(), vec![]));
            }
            if everywhere {
                headers.push(("refuse_everywhere".into(), vec![]));
            }
            let entry = Record {
                target: Target::Messages,
                key: Some(vec![b'k', key]),
                headers,
                value: vec![b'v'; self.rng.below(300) as usize],
                received_at_ms: 0,
            };
            self.submitted.insert(id, (key, refuse));
            entries.push((id, entry.encode()));
        }
        // An even count is written as groups of two (a read receipt's records stand or fall
        // together), an odd one record by record; no extra draw, so seeds replay as before.
        let size = if n.is_multiple_of(2) { 2 } else { 1 };
        // Acknowledged while a failed sync is not made good: may be written again, after
        // newer records (docs/zero-loss.md), so not in the order check.
        let ordered = !run.shared.sync_failed.load(Ordering::SeqCst);
        let payloads: Vec<Vec<u8>> = entries.iter().map(|(_, p)| p.clone()).collect();
        let groups: Vec<&[Vec<u8>]> = payloads.chunks(size).collect();
        let results = run.writer.write_batch(&groups, &mut Vec::new());
        self.report.appended += n as u64;
        let per_entry = results
            .iter()
            .flat_map(|r| (0..size as u64).map(move |i| r.as_ref().ok().map(|first| first + i)));
        for ((id, _), seq) in entries.iter().zip(per_entry) {
            let ok = seq.is_some();
            if trace() {
                eprintln!("append id {id}: acknowledged {ok} (seq {seq:?})");
            }
            if let Some(seq) = seq {
                self.seq_of.insert(*id, seq);
                self.owed.insert(*id);
                if ordered {
                    self.acked_ids.insert(*id);
                }
                self.report.acked += 1;
            }
        }
    }

    /// Hands the broker's reports to the publisher and lets it take one turn.
    fn publish(&mut self) {
        let now = self.now();
        let Some(run) = &mut self.running else {
            return;
        };
        loop {
            let event = self.broker.borrow_mut().events.pop_front();
            let Some(event) = event else { break };
            run.publisher.handle(event, now);
        }
        run.publisher.step(now);
    }

    fn step(&mut self, faults: bool) {
        self.report.steps += 1;
        self.clock_ms += self.rng.below(50);
        let roll = self.rng.below(1000);
        match roll {
            0..=299 => self.append(),
            300..=549 => {
                self.report.publish_steps += 1;
                self.publish();
            }
            550..=899 => {
                self.report.broker_steps += 1;
                let mut rng = self.sink_rng.borrow_mut();
                self.broker.borrow_mut().act(&mut rng, !faults);
            }
            900..=909 if faults => {
                self.broker.borrow_mut().fatal = true;
                let generation = self.broker.borrow().generation;
                self.broker
                    .borrow_mut()
                    .events
                    .push_back(Event::Fatal { generation });
            }
            910..=917 if faults => self.crash(),
            918..=922 if faults => self.power_cut(),
            // `Interval`'s timer and its syncer thread (nothing in the other modes).
            923..=960 => self.tick(),
            961..=979 => {
                if let Some(run) = &mut self.running {
                    run.writer.run_sync_job();
                }
            }
            980..=981 if faults => self.flip_bit(),
            982..=983 if faults => self.stray_file(),
            _ => self.start(),
        }
        self.observe_sync();
    }

    fn observe_sync(&mut self) {
        // A sync failed, or was made good: the records written again may follow newer ones
        // read from where those first stood (pages dropped, or lost to a later power cut; a
        // try on a full disk writes some of them, which are published at once). docs/zero-loss.md: per
        // key, order is not promised across a failed sync in `interval` mode, so the records
        // so far leave the order check.
        let failed = self
            .running
            .as_ref()
            .is_some_and(|r| r.shared.sync_failed.load(Ordering::SeqCst));
        let was = std::mem::replace(&mut self.sync_failed, failed);
        if was != failed {
            self.acked_ids.clear();
        }
    }

    /// Bit rot: one bit of a segment flips, on the disk and in the cache. The record whose frame
    /// it hit is lost to the disk (counted as damage) — that one, and no neighbour.
    fn flip_bit(&mut self) {
        let mut s = self.disk.state();
        let segments: Vec<(String, usize)> = s
            .dir
            .iter()
            .filter(|(n, _)| n.ends_with(".seg") && !n.contains('/'))
            .map(|(n, &i)| (n.clone(), i))
            .collect();
        if segments.is_empty() {
            return;
        }
        let (name, ino) = segments[s.rng.below(segments.len() as u64) as usize].clone();
        let len = s.inodes[ino].data.len();
        if len == 0 {
            return;
        }
        let at = s.rng.below(len as u64) as usize;
        let bit = 1u8 << s.rng.below(8);
        let generation = name
            .strip_suffix(".seg")
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let data = &s.inodes[ino].data;
        let hit = super::frame::scan(data, generation)
            .frames
            .into_iter()
            .find(|(_, offset, size)| (*offset..offset + size).contains(&at));
        let lost = hit.and_then(|(_, offset, _)| {
            match super::frame::decode(&data[offset..], generation) {
                super::frame::Decoded::Frame { payload, .. } => Record::decode(payload),
                _ => None,
            }
        });
        let ino = &mut s.inodes[ino];
        if ino.durable.get(at) == ino.data.get(at) {
            ino.durable[at] ^= bit;
        }
        ino.data[at] ^= bit;
        s.faults.add("bit flipped");
        drop(s);
        self.flipped = true;
        if trace() {
            eprintln!(
                "  bit flipped in {name} at {at}: {:?} lost",
                lost.as_ref().map(id_of)
            );
        }
        if let Some(record) = lost {
            self.owed.remove(&id_of(&record));
        }
    }

    /// A file the spool did not write: an editor's backup, a copy, a leftover. It is left
    /// alone, and nothing in it is ever read as a record.
    fn stray_file(&mut self) {
        const NAMES: [&str; 5] = [
            "junk",
            "00000000000000000042.seg.tmp",
            "x.spare",
            "0000000000000000001.seg",
            "00000000000000000001.segment",
        ];
        let mut s = self.disk.state();
        let name = NAMES[s.rng.below(NAMES.len() as u64) as usize].to_owned();
        if s.dir.contains_key(&name) {
            return;
        }
        let bytes: Vec<u8> = (0..s.rng.below(200)).map(|_| s.rng.next() as u8).collect();
        s.inodes.push(Inode {
            data: bytes.clone(),
            durable: bytes,
            dirty: Vec::new(),
        });
        let i = s.inodes.len() - 1;
        s.dir.insert(name.clone(), i);
        s.durable_dir.insert(name, i);
        s.faults.add("stray file");
    }

    fn tick(&mut self) {
        let now = self.now();
        if let Some(run) = &mut self.running {
            run.writer.tick(now);
        }
    }

    /// Faults off, broker reliable: runs until every record is published, then checks.
    fn drain_and_check(&mut self) {
        self.disk.set_faults(0);
        self.broker.borrow_mut().send_faults = 0;
        self.report.drains += 1;
        for _ in 0..20_000 {
            self.start();
            self.clock_ms += 200;
            self.tick();
            if let Some(run) = &mut self.running {
                run.writer.run_sync_job();
            }
            self.observe_sync();
            self.publish();
            {
                let mut rng = self.sink_rng.borrow_mut();
                let mut b = self.broker.borrow_mut();
                for _ in 0..8 {
                    b.act(&mut rng, true);
                }
            }
            let Some(run) = &mut self.running else {
                continue;
            };
            let (ledger, _, _) = run.publisher.parts();
            let done = ledger.is_empty()
                && !run.shared.sync_failed.load(Ordering::SeqCst)
                && self.broker.borrow().queues.values().all(VecDeque::is_empty)
                && self.broker.borrow().events.is_empty()
                && (run.shared.backlog() == 0 || self.flipped);
            if done {
                break;
            }
        }
        self.check();
    }

    fn check(&mut self) {
        let v = &mut self.report.violations;
        let Some(run) = &mut self.running else {
            v.push("the spool did not open again once the faults stopped".into());
            return;
        };
        let pending = run.publisher.parts().0.len();
        if (run.shared.backlog() > 0 && !self.flipped) || pending > 0 {
            v.push(format!(
                "not drained: backlog {} records (stuck); {}; publisher {}",
                run.shared.backlog(),
                self.disk.describe(&run.shared, &run.writer),
                run.publisher.describe(),
            ));
        }
        let b = self.broker.borrow();
        let dead: BTreeSet<u64> = self.disk.dead_letters().iter().map(id_of).collect();
        let landed: BTreeSet<u64> = b.log.iter().map(|l| l.id).collect();
        for id in &self.owed {
            if !landed.contains(id) && !dead.contains(id) {
                v.push(format!("acknowledged record {id} lost"));
            }
        }
        for id in landed.iter().chain(&dead) {
            if !self.submitted.contains_key(id) {
                v.push(format!("record {id} published but never appended"));
            }
        }
        // Refused only with another record's batch: its topic takes it.
        for l in b.log.iter().filter(|l| l.quarantine) {
            if self
                .submitted
                .get(&l.id)
                .is_some_and(|(_, refused)| !refused)
            {
                v.push(format!(
                    "record {} quarantined though its topic takes it",
                    l.id
                ));
            }
        }
        // Per key, the first arrival of each record on the messages topic follows append
        // order.
        let mut seen = BTreeSet::new();
        let mut last: BTreeMap<(u64, u8), u64> = BTreeMap::new();
        for l in b.log.iter().filter(|l| !l.quarantine) {
            if !seen.insert(l.id) {
                continue;
            }
            let Some((key, refused)) = self.submitted.get(&l.id) else {
                continue;
            };
            if *refused || !self.acked_ids.contains(&l.id) || b.batch_refused.contains(&l.id) {
                continue;
            }
            let prev = last.insert((l.epoch, *key), l.id).unwrap_or(0);
            if prev > l.id {
                v.push(format!("key {key}: record {} arrived after {prev}", l.id));
            }
        }
        self.report.published = landed.len() as u64;
        drop(b);
        // What is in Kafka is settled; later checks look at what comes after.
        self.owed
            .retain(|id| !landed.contains(id) && !dead.contains(id));
        let owed = &self.owed;
        self.seq_of.retain(|id, _| owed.contains(id));
        self.disk.state().evicted = false;
        self.flipped = false;
        // The operator, alerted, takes the dead letters away (they would fill a small disk).
        self.disk.clear_dead_letters();
        // No deadlock: with the faults gone and the backlog delivered, appends succeed again.
        let before = self.report.acked;
        self.append();
        if self.report.acked == before {
            let state = match &self.running {
                Some(run) => self.disk.describe(&run.shared, &run.writer),
                None => "not running".into(),
            };
            self.report
                .violations
                .push(format!("appends still refused after the drain; {state}"));
        }
    }

    /// Runs `steps` steps in rounds: a stretch with faults, then a fault-free drain and the
    /// check.
    pub fn run(mut self, steps: u64) -> Report {
        let round = 400 + self.rng.below(600);
        let fault_rate = 5 + self.rng.below(40);
        let mut done = 0;
        while done < steps {
            self.disk.set_faults(fault_rate);
            self.broker.borrow_mut().send_faults = 20;
            for _ in 0..round {
                self.step(true);
            }
            done += round;
            self.drain_and_check();
            if !self.report.violations.is_empty() {
                break;
            }
        }
        self.report.faults = self.disk.state().faults.clone();
        self.report
    }
}

/// One seeded run with `plant` active; the report.
pub fn run_seed(seed: u64, fsync: Fsync, steps: u64, planted: Option<Plant>) -> Report {
    plant::set(planted);
    let report = Sim::new(seed, fsync).run(steps);
    plant::set(None);
    report
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("IM_RELAY_SIM_SEED") {
        return vec![seed.parse().expect("IM_RELAY_SIM_SEED is a number")];
    }
    let random = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    let mut seeds: Vec<u64> = (1..=24).collect();
    seeds.push(random);
    seeds
}

/// The `Interval` the simulation runs (its clock moves up to 50 ms a step).
const INTERVAL: Fsync = Fsync::Interval(Duration::from_millis(200));

fn mode_of(seed: u64) -> Fsync {
    match seed % 3 {
        0 => Fsync::Always,
        1 => Fsync::Never,
        _ => INTERVAL,
    }
}

#[test]
fn the_invariant_holds_under_every_injected_fault() {
    let steps: u64 = std::env::var("IM_RELAY_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6_000);
    let mut total = Report::default();
    for seed in seeds() {
        let mode = mode_of(seed);
        let r = run_seed(seed, mode, steps, None);
        assert!(
            r.violations.is_empty(),
            "seed {seed} ({mode:?}) — replay with IM_RELAY_SIM_SEED={seed}: {:?}",
            &r.violations[..r.violations.len().min(5)]
        );
        assert!(r.acked > 0 && r.published > 0, "seed {seed}: {r:?}");
        total.add(r);
    }
    eprintln!("simulation: {total:?}");
    assert!(total.power_cuts > 0 && total.crashes > 0);
}

const PLANTS: [(Plant, Fsync, u64); 10] = [
    (Plant::AckBeforeSync, Fsync::Always, 3),
    (Plant::SkipDirSync, Fsync::Always, 3),
    (Plant::CommitPastUnconfirmed, Fsync::Always, 3),
    (Plant::SkipSpareDirSync, Fsync::Never, 1),
    (Plant::SyncSuccessClearsFailure, INTERVAL, 1),
    (Plant::RefusalInBatchIsFinal, Fsync::Always, 1),
    (Plant::NextSeqFromFramesOnly, Fsync::Always, 1),
    (Plant::RecoveryCutsUnsynced, Fsync::Always, 1),
    (Plant::ReadBufferDroppedOnError, Fsync::Always, 1),
    (Plant::SendFailureTakenAsSent, Fsync::Always, 1),
];

#[test]
fn every_planted_bug_is_caught() {
    // `(plant, mode, every how many seeds)`. A lost rename shows only when a power cut, a
    // reused name and old frames meet: 43 of seeds 1..100 catch it (`scripts/sim`).
    for (planted, mode, step) in PLANTS {
        let caught = (1..=100u64)
            .map(|i| (i * step, run_seed(i * step, mode, 6_000, Some(planted))))
            .find(|(_, r)| !r.violations.is_empty());
        let (seed, report) = caught.unwrap_or_else(|| panic!("{planted:?} was not caught"));
        eprintln!(
            "{planted:?} caught by seed {seed}: {}",
            report.violations[0]
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(11, Fsync::Always, 3_000, None);
    let b = run_seed(11, Fsync::Always, 3_000, None);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

/// The long run (`scripts/sim`): `IM_RELAY_SIM_SEEDS=first..last` seeds of
/// `IM_RELAY_SIM_STEPS` steps each, the three modes in turn, then every planted bug over the
/// same seeds.
#[test]
#[ignore = "minutes long: run by scripts/sim"]
fn long_sweep() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seeds = std::env::var("IM_RELAY_SIM_SEEDS").unwrap_or_else(|_| "1..1000".into());
    let (first, last) = seeds
        .split_once("..")
        .expect("IM_RELAY_SIM_SEEDS=first..last");
    let (first, last): (u64, u64) = (first.parse().unwrap(), last.parse().unwrap());
    let steps = var("IM_RELAY_SIM_STEPS", 10_000);
    let mut total = Report::default();
    let mut failed = Vec::new();
    for seed in first..last {
        let r = run_seed(seed, mode_of(seed), steps, None);
        if !r.violations.is_empty() {
            failed.push((seed, r.violations[0].clone()));
        }
        total.add(r);
    }
    println!("seeds {first}..{last}, {steps} steps each");
    println!("steps: {}", total.steps);
    println!("publisher turns: {}", total.publish_steps);
    println!("broker actions: {}", total.broker_steps);
    println!(
        "records appended: {} (acknowledged {})",
        total.appended, total.acked
    );
    println!(
        "process crashes: {} (of which power cuts: {})",
        total.crashes, total.power_cuts
    );
    println!("fault-free drains checked: {}", total.drains);
    for (k, n) in &total.faults.0 {
        println!("fault injected: {k}: {n}");
    }
    println!("violations: {}", failed.len());
    for (seed, v) in &failed {
        println!("  seed {seed}: {v}");
    }
    for (planted, mode, _) in PLANTS {
        let tried = (last - first).min(100);
        let caught = (first..first + tried)
            .filter(|s| {
                !run_seed(*s, mode, steps.min(6_000), Some(planted))
                    .violations
                    .is_empty()
            })
            .count();
        println!("planted {planted:?}: caught by {caught} of {tried} seeds");
    }
    assert!(failed.is_empty());
}
