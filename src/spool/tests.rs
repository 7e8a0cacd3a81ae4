//! The spool against real files in a temporary directory.

use std::collections::VecDeque;

use std::fs::{self, OpenOptions};
use std::sync::atomic::AtomicBool;

use super::*;

fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let disk = Disk {
        dir: dir.to_path_buf(),
    };
    list_segments(&disk)
        .unwrap()
        .into_iter()
        .map(|(first, name)| (first, dir.join(name)))
        .collect()
}

fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        segment_bytes: 1 << 20,
        fsync: Fsync::Always,
    }
}

fn open_quiet(cfg: &SpoolConfig) -> Opened {
    open(cfg, || {}).expect("spool opens")
}

/// Drops every handle and waits for the writer, releasing the directory lock.
fn close(s: Opened) {
    drop(s.appender);
    s.writer.join().unwrap();
}

fn read_all(reader: &mut Reader) -> Vec<(u64, Vec<u8>)> {
    let mut out = VecDeque::new();
    while reader.read(1000, &mut out).unwrap() > 0 {}
    out.into_iter().collect()
}

fn payload(i: usize) -> Vec<u8> {
    format!("record-{i}-{}", "x".repeat(i % 50)).into_bytes()
}

async fn append_n(a: &Appender, range: std::ops::Range<usize>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in range {
        seqs.push(a.append(payload(i)).await.expect("appended"));
    }
    seqs
}

#[tokio::test]
async fn appends_are_read_back_in_order_across_segments_in_every_fsync_mode() {
    // `Interval` hands full segments and due syncs to its syncer thread: exercised here with
    // a sync due at almost every batch and a rotation every few records.
    for fsync in [
        Fsync::Always,
        Fsync::Interval(Duration::from_millis(1)),
        Fsync::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            segment_bytes: 500,
            fsync,
            ..config(dir.path())
        };
        let mut s = open_quiet(&cfg);
        // Concurrent appends: each gets its own sequence number.
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let a = s.appender.clone();
                tokio::spawn(async move { (i, a.append(payload(i)).await.unwrap()) })
            })
            .collect();
        let mut by_seq = std::collections::BTreeMap::new();
        for t in tasks {
            let (i, seq) = t.await.unwrap();
            assert!(by_seq.insert(seq, payload(i)).is_none());
        }
        let read = read_all(&mut s.reader);
        let expected: Vec<(u64, Vec<u8>)> = by_seq.into_iter().collect();
        assert_eq!(read, expected, "{fsync:?}");
        assert_eq!(s.shared.backlog(), 100);
        close(s);
        // Closed (the syncer joined): a reopen finds every record, nothing torn or damaged.
        let mut s = open_quiet(&cfg);
        assert_eq!(read_all(&mut s.reader), expected, "{fsync:?} after reopen");
        assert_eq!((s.recovery.torn_bytes, s.recovery.damaged), (0, 0));
        close(s);
    }
}

#[tokio::test]
async fn a_restart_resumes_after_the_committed_position_and_deletes_delivered_segments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        segment_bytes: 300,
        ..config(dir.path())
    };
    let mut s = open_quiet(&cfg);
    let seqs = append_n(&s.appender, 0..40).await;
    let read = read_all(&mut s.reader);
    assert_eq!(read.len(), 40);
    let before = segments(dir.path()).len();
    assert!(before > 3, "segments rotate: {before}");
    s.reader
        .commit(seqs[24], true, Instant::now(), |_, _| true)
        .unwrap();
    assert!(segments(dir.path()).len() < before);
    close(s);

    let mut s = open_quiet(&cfg);
    assert_eq!(s.recovery.committed, seqs[24]);
    assert_eq!(s.recovery.pending, 15);
    let again: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(again, seqs[25..]);
    // New appends continue the numbering.
    let next = s.appender.append(b"after".to_vec()).await.unwrap();
    assert!(next > seqs[39]);
    assert_eq!(read_all(&mut s.reader), vec![(next, b"after".to_vec())]);
    close(s);
}

/// Ten records written and the spool closed: their sequence numbers and their segment.
async fn ten_records(cfg: &SpoolConfig) -> (Vec<u64>, PathBuf) {
    let s = open_quiet(cfg);
    let seqs = append_n(&s.appender, 0..10).await;
    close(s);
    let (_, path) = segments(&cfg.dir).pop().unwrap();
    (seqs, path)
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_every_whole_record_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (seqs, path) = ten_records(&cfg).await;
    let len = fs::metadata(&path).unwrap().len();
    // A crash in the middle of writing the last frame.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let mut s = open_quiet(&cfg);
    assert_eq!(s.recovery.damaged, 0, "{:?}", s.recovery);
    assert!(s.recovery.torn_bytes > 0);
    assert_eq!(s.recovery.pending, 9);
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(read, seqs[..9]);
    let next = s.appender.append(b"next".to_vec()).await.unwrap();
    assert_eq!(read_all(&mut s.reader), vec![(next, b"next".to_vec())]);
    close(s);
    // Nothing is damaged on the next start either.
    let s = open_quiet(&cfg);
    assert_eq!((s.recovery.damaged, s.recovery.torn_bytes), (0, 0));
    close(s);
}

#[tokio::test]
async fn a_flipped_byte_loses_only_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (seqs, path) = ten_records(&cfg).await;
    let mut bytes = fs::read(&path).unwrap();
    let fourth = frame::scan(&bytes, 1).frames[3];
    bytes[fourth.1 + frame::HEADER_BYTES + 2] ^= 0xff;
    fs::write(&path, &bytes).unwrap();

    let mut s = open_quiet(&cfg);
    assert_eq!(s.recovery.damaged, 1);
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    let mut expected = seqs.clone();
    expected.remove(3);
    assert_eq!(read, expected);
    close(s);
}

#[tokio::test]
async fn a_full_spool_refuses_without_damage_and_takes_again_after_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        max_bytes: 2000,
        segment_bytes: 400,
        ..config(dir.path())
    };
    let mut s = open_quiet(&cfg);
    let mut seqs = Vec::new();
    let mut i = 0;
    loop {
        match s.appender.append(payload(i)).await {
            Ok(seq) => seqs.push(seq),
            Err(AppendError::Full) => break,
            Err(e) => panic!("{e:?}"),
        }
        i += 1;
    }
    assert!(!s.shared.can_take(100));
    assert!(s.shared.bytes() <= 2000);
    let read = read_all(&mut s.reader);
    assert_eq!(read.len(), seqs.len());
    s.reader
        .commit(*seqs.last().unwrap(), true, Instant::now(), |_, _| true)
        .unwrap();
    assert!(s.shared.can_take(100), "bytes {}", s.shared.bytes());
    let more = s.appender.append(b"more".to_vec()).await.unwrap();
    assert_eq!(read_all(&mut s.reader), vec![(more, b"more".to_vec())]);
    close(s);
}

#[tokio::test]
async fn a_group_is_taken_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        max_bytes: 2000,
        segment_bytes: 1000,
        ..config(dir.path())
    };
    let mut s = open_quiet(&cfg);
    // Three numbered together, read back in order.
    let first = s
        .appender
        .append_all(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
        .await
        .unwrap();
    assert_eq!(
        read_all(&mut s.reader),
        vec![
            (first, b"a".to_vec()),
            (first + 1, b"b".to_vec()),
            (first + 2, b"c".to_vec())
        ]
    );
    // Fill until only a few hundred bytes are left, then ask for more than that in one
    // group whose first members would fit alone: none of it is written.
    while s.shared.bytes() < 1500 {
        s.appender.append(vec![b'x'; 100]).await.unwrap();
    }
    let before = s.shared.bytes();
    let group = vec![vec![b'g'; 150]; 4];
    assert!(matches!(
        s.appender.append_all(group).await,
        Err(AppendError::Full)
    ));
    assert_eq!(s.shared.bytes(), before);
    let next = s.appender.append(b"fits".to_vec()).await.unwrap();
    let read = read_all(&mut s.reader);
    assert!(read.iter().all(|(_, p)| p.first() != Some(&b'g')));
    assert_eq!(read.last(), Some(&(next, b"fits".to_vec())));
    close(s);
}

#[test]
fn one_relay_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let err = open(&cfg, || {}).err().expect("second open refused");
    assert!(err.to_string().contains("in use"), "{err}");
    close(s);
}

#[test]
fn fsync_modes_parse() {
    assert_eq!("always".parse(), Ok(Fsync::Always));
    assert_eq!("never".parse(), Ok(Fsync::Never));
    assert_eq!(
        "interval:50".parse(),
        Ok(Fsync::Interval(Duration::from_millis(50)))
    );
    for bad in ["interval:", "interval:0", "interval:x", "sometimes", ""] {
        assert_eq!(bad.parse::<Fsync>(), Err(()), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_while_writing_never_sees_damage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        fsync: Fsync::Never,
        ..config(dir.path())
    };
    let s = open_quiet(&cfg);
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let a = s.appender.clone();
            tokio::spawn(async move {
                for i in 0..5000 {
                    let mut p = payload(w * 10_000 + i);
                    p.resize(900 + i % 200, b'.');
                    a.append(p).await.unwrap();
                }
            })
        })
        .collect();
    let mut reader = s.reader;
    let read = std::thread::spawn(move || {
        let mut out = VecDeque::new();
        let mut last = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < 40_000 && Instant::now() < deadline {
            reader.read(1 + out.len() % 7, &mut out).unwrap();
        }
        for (seq, _) in &out {
            assert!(*seq > last, "in order");
            last = *seq;
        }
        out.len()
    });
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(read.join().unwrap(), 40_000);
    drop(s.appender);
    s.writer.join().unwrap();
}

#[tokio::test]
async fn a_segment_larger_than_one_read_is_read_whole_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        fsync: Fsync::Never,
        segment_bytes: 64 << 20,
        ..config(dir.path())
    };
    let s = open_quiet(&cfg);
    let big = vec![b'x'; 4000];
    let n = READ_CHUNK / 4000 * 2;
    for _ in 0..n {
        s.appender.append(big.clone()).await.unwrap();
    }
    close(s);
    // Reopened, the big segment is no longer the active one: a frame cut by the end of a
    // read is not damage.
    let mut s = open_quiet(&cfg);
    let read = read_all(&mut s.reader);
    assert_eq!(read.len(), n);
    assert!(read.iter().all(|(_, p)| *p == big));
    close(s);
}

#[tokio::test]
async fn leftovers_of_a_crash_never_lower_the_next_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (seqs, _) = ten_records(&cfg).await;
    // A segment created just before a crash (empty), one holding bytes nothing in which
    // claims to be one of its records (as a spare renamed just before a crash), one holding a
    // frame of its own that does not check, and files that are not segments at all.
    fs::write(dir.path().join(segment_name(500)), b"").unwrap();
    fs::write(dir.path().join(segment_name(300)), vec![0x5a; 100]).unwrap();
    let mut broken = Vec::new();
    frame::encode(400, 400, b"a record of segment 400", &mut broken);
    broken[frame::HEADER_BYTES + 3] ^= 0x20;
    fs::write(dir.path().join(segment_name(400)), broken).unwrap();
    for stray in ["junk.seg", "12.seg", "00000000000000000007.seg.tmp"] {
        fs::write(dir.path().join(stray), b"stray").unwrap();
    }
    let mut s = open_quiet(&cfg);
    assert_eq!(s.recovery.damaged, 1, "{:?}", s.recovery);
    let next = s.appender.append(b"after".to_vec()).await.unwrap();
    assert!(
        next >= 500,
        "next sequence number {next} fell below a segment's name"
    );
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(read, [seqs.clone(), vec![next]].concat());
    close(s);
    let mut s = open_quiet(&cfg);
    assert_eq!(read_all(&mut s.reader).len(), 11);
    assert!(s.appender.append(b"again".to_vec()).await.unwrap() > next);
    close(s);
    for stray in ["junk.seg", "12.seg", "00000000000000000007.seg.tmp"] {
        assert_eq!(fs::read(dir.path().join(stray)).unwrap(), b"stray");
    }
}

#[tokio::test]
async fn a_damaged_empty_or_missing_position_file_means_duplicates_not_loss() {
    for damage in ["newest slot flipped", "empty", "missing", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let mut s = open_quiet(&cfg);
        let seqs = append_n(&s.appender, 0..10).await;
        read_all(&mut s.reader);
        s.reader
            .commit(seqs[2], true, Instant::now(), |_, _| true)
            .unwrap();
        s.reader
            .commit(seqs[4], true, Instant::now(), |_, _| true)
            .unwrap();
        close(s);
        let path = dir.path().join(COMMITTED_FILE);
        match damage {
            "newest slot flipped" => {
                let mut b = fs::read(&path).unwrap();
                // The second commit went to the slot after the first's.
                let newest = (0..2)
                    .find(|i| b[i * SLOT_BYTES..][..8] == seqs[4].to_le_bytes())
                    .unwrap();
                b[newest * SLOT_BYTES + 3] ^= 0x10;
                fs::write(&path, b).unwrap();
            }
            "empty" => fs::write(&path, b"").unwrap(),
            "missing" => fs::remove_file(&path).unwrap(),
            _ => fs::write(&path, b"not a position at all").unwrap(),
        }
        let mut s = open_quiet(&cfg);
        let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
        assert!(
            read.ends_with(&seqs[5..]) && read.len() >= 5,
            "{damage}: {read:?}"
        );
        assert!(s.recovery.committed <= seqs[4], "{damage}");
        close(s);
    }
}

#[tokio::test]
async fn a_flipped_byte_in_the_active_segment_costs_one_record_and_never_stalls_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut s = open_quiet(&cfg);
    let seqs = append_n(&s.appender, 0..10).await;
    // The length field of the fourth frame grows: it now looks like a frame still being
    // written, though whole frames follow it.
    let (_, path) = segments(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let fourth = frame::scan(&bytes, 1).frames[3];
    bytes[fourth.1 + 5] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    let mut expected = seqs.clone();
    expected.remove(3);
    assert_eq!(read, expected);
    close(s);
}

#[tokio::test]
async fn damage_just_before_a_read_chunk_boundary_costs_only_its_own_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        fsync: Fsync::Never,
        segment_bytes: 64 << 20,
        ..config(dir.path())
    };
    let s = open_quiet(&cfg);
    let n = READ_CHUNK / 4000 + 10;
    let mut seqs = Vec::new();
    for i in 0..n {
        let mut p = payload(i);
        p.resize(4000, b'x');
        seqs.push(s.appender.append(p).await.unwrap());
    }
    close(s);
    let (_, path) = segments(dir.path()).into_iter().next().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let frames = frame::scan(&bytes, 1).frames;
    // The frame that straddles the end of the first read, and the one before it.
    let straddling = frames
        .iter()
        .position(|f| f.1 < READ_CHUNK && f.1 + f.2 > READ_CHUNK)
        .unwrap();
    let damaged = frames[straddling - 1];
    bytes[damaged.1 + frame::HEADER_BYTES + 10] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let mut s = open_quiet(&cfg);
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    let mut expected = seqs.clone();
    expected.remove(straddling - 1);
    assert_eq!(read.len(), expected.len());
    assert_eq!(read, expected);
    close(s);
}

#[tokio::test]
async fn a_torn_tail_in_an_older_segment_is_cut_not_counted_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        segment_bytes: 300,
        ..config(dir.path())
    };
    let s = open_quiet(&cfg);
    let seqs = append_n(&s.appender, 0..20).await;
    close(s);
    let (first, path) = segments(dir.path()).into_iter().next().unwrap();
    let bytes = fs::read(&path).unwrap();
    let frames = frame::scan(&bytes, 1).frames;
    let torn = frames.last().unwrap().0;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 - 3)
        .unwrap();
    assert!(first < torn);
    for round in 0..2 {
        let mut s = open_quiet(&cfg);
        assert_eq!(s.recovery.damaged, 0, "round {round}: {:?}", s.recovery);
        let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
        let expected: Vec<u64> = seqs.iter().copied().filter(|&q| q != torn).collect();
        assert_eq!(read, expected, "round {round}");
        close(s);
    }
}

/// The real directory, with a disk that can be made to hang on writes, fail its syncs or its
/// renames, answer reads with nothing, or park a spare's rename until the test lets it go.
#[derive(Clone)]
struct Faulty {
    disk: Arc<Disk>,
    hang: Arc<AtomicBool>,
    fail_syncs: Arc<AtomicBool>,
    fail_renames: Arc<AtomicBool>,
    /// Reads still to answer with zero bytes.
    empty_reads: Arc<AtomicU64>,
    /// Writes still to fail (`EIO`).
    failed_writes: Arc<AtomicU64>,
    /// No free block: a write past a file's end fails (`ENOSPC`); over its bytes, it succeeds.
    full: Arc<AtomicBool>,
    spare_rename: Arc<Gate>,
}

/// Parks the next thread that passes it (once armed) until the test opens it.
#[derive(Default)]
struct Gate {
    armed: AtomicBool,
    parked: AtomicBool,
    open: AtomicBool,
}

impl Gate {
    fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.parked.store(true, Ordering::SeqCst);
            while !self.open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

struct FaultyFile {
    inner: Box<dyn StorageFile>,
    faults: Faulty,
}

impl Faulty {
    fn new(dir: &Path) -> Faulty {
        Faulty {
            disk: Arc::new(Disk {
                dir: dir.to_path_buf(),
            }),
            hang: Arc::default(),
            fail_syncs: Arc::default(),
            fail_renames: Arc::default(),
            empty_reads: Arc::default(),
            failed_writes: Arc::default(),
            full: Arc::default(),
            spare_rename: Arc::default(),
        }
    }
}

impl Storage for Faulty {
    fn list_in(&self, sub: &str) -> io::Result<Vec<String>> {
        self.disk.list_in(sub)
    }
    fn list_dirs(&self) -> io::Result<Vec<String>> {
        self.disk.list_dirs()
    }
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(FaultyFile {
            inner: self.disk.open(name, create)?,
            faults: self.clone(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        if from.ends_with(".spare") {
            self.spare_rename.pass();
        }
        if self.fail_renames.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected rename EIO"));
        }
        self.disk.rename(from, to)
    }
    fn sync_dir(&self, sub: &str) -> io::Result<()> {
        self.disk.sync_dir(sub)
    }
    fn create_dir(&self, sub: &str) -> io::Result<()> {
        self.disk.create_dir(sub)
    }
}

impl StorageFile for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let empty = &self.faults.empty_reads;
        if empty
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Ok(0);
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        while self.faults.hang.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let failing = &self.faults.failed_writes;
        if failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::other("injected write EIO"));
        }
        if self.faults.full.load(Ordering::SeqCst) && offset + buf.len() as u64 > self.len()? {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.inner.write_at(offset, buf)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        if self.faults.fail_syncs.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fsync EIO"));
        }
        self.inner.sync()
    }
    fn try_clone(&self) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(FaultyFile {
            inner: self.inner.try_clone()?,
            faults: self.faults.clone(),
        }))
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_hanging_disk_turns_readiness_red_and_green_again_once_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let s = open_on(Arc::new(faulty.clone()), &config(dir.path()), None, || {}).unwrap();
    let deadline = Duration::from_millis(100);
    assert_eq!(s.shared.trouble(0, deadline), None);
    faulty.hang.store(true, Ordering::SeqCst);
    let a = s.appender.clone();
    let pending = tokio::spawn(async move { a.append(b"slow".to_vec()).await });
    let shared = s.shared.clone();
    wait_for("readiness red", || {
        shared.trouble(0, deadline) == Some("spool disk not answering")
    })
    .await;
    faulty.hang.store(false, Ordering::SeqCst);
    assert!(pending.await.unwrap().is_ok());
    assert_eq!(s.shared.trouble(0, deadline), None);
    close(s);
}

#[tokio::test]
async fn a_failed_background_sync_is_surfaced_until_a_sync_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let cfg = SpoolConfig {
        fsync: Fsync::Interval(Duration::from_millis(1)),
        ..config(dir.path())
    };
    let s = open_on(Arc::new(faulty.clone()), &cfg, None, || {}).unwrap();
    faulty.fail_syncs.store(true, Ordering::SeqCst);
    s.appender.append(b"one".to_vec()).await.unwrap();
    // Appends keep coming, so a sync keeps falling due.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.shared.trouble(0, Duration::from_secs(1)) != Some("spool sync failing") {
        assert!(Instant::now() < deadline, "sync failure never surfaced");
        s.appender.append(b"more".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    faulty.fail_syncs.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.shared.trouble(0, Duration::from_secs(1)).is_some() {
        assert!(Instant::now() < deadline, "a good sync never cleared it");
        s.appender.append(b"more".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    close(s);
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_first_segment_is_written_over_a_spare_made_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let (_, path) = segments(dir.path()).pop().unwrap();
    // Zeros written ahead: appends do not grow the file.
    assert_eq!(fs::metadata(&path).unwrap().len(), cfg.segment_bytes);
    let seqs = append_n(&s.appender, 0..10).await;
    assert_eq!(fs::metadata(&path).unwrap().len(), cfg.segment_bytes);
    close(s);
    // A clean stop leaves the segment ending on its last frame.
    let bytes = fs::read(&path).unwrap();
    let scan = frame::scan(&bytes, seqs[0]);
    assert_eq!(scan.frames.len(), 10);
    assert_eq!(scan.valid_end, bytes.len());
    let mut s = open_quiet(&cfg);
    assert_eq!((s.recovery.damaged, s.recovery.torn_bytes), (0, 0));
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(read, seqs);
    close(s);
}

/// Delivered segments become spares and are written over; after a crash (no clean stop:
/// the active segment still holds what its file held before), recovery finds exactly the
/// records not yet delivered, no damage and no torn write, and the reader reads only them.
/// Writer and reader driven directly (as the simulation does): no spare maker thread.
#[test]
fn what_a_recycled_segment_held_before_is_never_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        segment_bytes: 4096,
        ..config(dir.path())
    };
    let disk = || -> Arc<dyn Storage> {
        Arc::new(Disk {
            dir: dir.path().to_path_buf(),
        })
    };
    let (mut writer, mut reader, _, _) = recover(disk(), &cfg, None).unwrap();
    let append = |writer: &mut Writer, payload: Vec<u8>| {
        writer.write_batch(&[&[payload]], &mut Vec::new())[0]
            .clone()
            .unwrap()
    };
    let spares = || -> Vec<String> {
        let names = file_names(dir.path());
        names
            .into_iter()
            .filter(|n| n.ends_with(".spare"))
            .collect()
    };
    // The spare made at open is the first segment: none left.
    assert_eq!(spares(), Vec::<String>::new());
    let mut last = 0;
    for i in 0..60 {
        last = append(
            &mut writer,
            format!("old-{i}-{}", "o".repeat(300)).into_bytes(),
        );
    }
    assert_eq!(read_all(&mut reader).len(), 60);
    reader
        .commit(last, true, Instant::now(), |_, _| false)
        .unwrap();
    // One delivered segment kept, named by the highest number it can hold; the rest deleted.
    let kept = spares();
    assert_eq!(kept.len(), 1, "{:?}", file_names(dir.path()));
    assert_ne!(kept[0], spare_name(0));
    assert_eq!(segments(dir.path()).len(), 1, "only the active one");
    // Fill the active segment and start the next one over the spare, with shorter records.
    let mut new = Vec::new();
    while !spares().is_empty() {
        let i = new.len();
        new.push((append(&mut writer, payload(i)), payload(i)));
    }
    for i in new.len()..new.len() + 3 {
        new.push((append(&mut writer, payload(i)), payload(i)));
    }
    let (first, path) = segments(dir.path()).pop().unwrap();
    let held = fs::read(&path).unwrap();
    let written = frame::scan(&held, first).valid_end;
    let old = &held[written..];
    assert!(
        old.windows(4).filter(|w| w == b"old-").count() > 2,
        "old records follow"
    );
    // Crash: the writer never stops cleanly.
    drop((writer, reader));
    let (mut writer, mut reader, _, recovery) = recover(disk(), &cfg, None).unwrap();
    assert_eq!(recovery.committed, last);
    assert_eq!(recovery.pending, new.len() as u64, "{recovery:?}");
    assert_eq!((recovery.damaged, recovery.torn_bytes), (0, 0));
    assert_eq!(read_all(&mut reader), new);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        written as u64,
        "cut to its frames"
    );
    let after = append(&mut writer, b"after".to_vec());
    assert!(after > new.last().unwrap().0);
    assert_eq!(read_all(&mut reader), vec![(after, b"after".to_vec())]);
}

#[tokio::test]
async fn records_larger_than_a_read_are_read_whole_live_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let sizes = [
        10,
        READ_CHUNK + 1,
        20,
        frame::MAX_PAYLOAD_BYTES,
        5,
        3 * READ_CHUNK,
    ];
    let mut s = open_quiet(&cfg);
    let mut written = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let payload = vec![b'a' + i as u8; size];
        written.push((s.appender.append(payload.clone()).await.unwrap(), payload));
    }
    assert_eq!(read_all(&mut s.reader), written);
    assert!(
        s.reader.buf.capacity() <= READ_CHUNK,
        "the large buffer is let go"
    );
    close(s);
    let mut s = open_quiet(&cfg);
    assert_eq!(read_all(&mut s.reader), written);
    close(s);
}

/// Driven directly, as the simulation does: a writer and a reader on `storage`, with 4 KiB
/// segments.
fn small_segments(dir: &Path, storage: Arc<dyn Storage>) -> (SpoolConfig, Writer, Reader) {
    let cfg = SpoolConfig {
        segment_bytes: 4096,
        ..config(dir)
    };
    let (writer, reader, _, _) = recover(storage, &cfg, None).unwrap();
    (cfg, writer, reader)
}

fn append_one(writer: &mut Writer, payload: &[u8]) -> u64 {
    writer.write_batch(&[&[payload.to_vec()]], &mut Vec::new())[0]
        .clone()
        .unwrap()
}

fn spare_names(dir: &Path) -> Vec<String> {
    let names = file_names(dir);
    names
        .into_iter()
        .filter(|n| n.ends_with(".spare"))
        .collect()
}

/// Two segments deleted out of order get one spare name (each is bounded by the segment after
/// it, and the first's next is the second's once the second is gone). The writer takes the
/// first as its next segment and is parked between opening it and renaming it, while the
/// publisher names the second a spare: the frames written next must land in a file recovery
/// reads, not in one the publisher's rename unlinked.
#[test]
fn a_spare_the_writer_is_taking_is_never_replaced_by_a_delivered_segment() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let (cfg, mut writer, mut reader) = small_segments(dir.path(), Arc::new(faulty.clone()));
    while segments(dir.path()).len() < 4 {
        append_one(&mut writer, &[b'r'; 1500]);
    }
    read_all(&mut reader);
    let segs = segments(dir.path());
    let (b, c) = (segs[1].0, segs[2].0);
    // B confirmed before A: B becomes the spare bounded by C.
    reader.delete_delivered(|lo, _| lo < b || lo >= c).unwrap();
    assert_eq!(spare_names(dir.path()), vec![spare_name(c - 1)]);
    faulty.spare_rename.armed.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let taking = s.spawn(|| writer.start_segment().unwrap());
        while !faulty.spare_rename.parked.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A confirmed now: its bound is C's too. The publisher may wait for the writer; it
        // gets a moment to do its worst first.
        let deleting = s.spawn(|| reader.delete_delivered(|lo, _| lo >= c).unwrap());
        let until = Instant::now() + Duration::from_millis(300);
        while !deleting.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        faulty.spare_rename.open.store(true, Ordering::SeqCst);
        taking.join().unwrap();
        deleting.join().unwrap();
    });
    let after = append_one(&mut writer, b"after the race");
    drop((writer, reader));
    let disk = Arc::new(Disk {
        dir: dir.path().to_path_buf(),
    });
    let (_, mut reader, _, recovery) = recover(disk, &cfg, None).unwrap();
    assert_eq!(recovery.damaged, 0, "{recovery:?}");
    let read = read_all(&mut reader);
    assert!(
        read.contains(&(after, b"after the race".to_vec())),
        "the record written after the race is lost: read {:?}",
        read.iter().map(|r| r.0).collect::<Vec<_>>()
    );
}

/// A read of the active segment that returns nothing (the writer has not written yet, as far
/// as the page cache says) must not mark it finished: what the writer appends next is read.
#[test]
fn a_zero_byte_read_never_finishes_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let (_, mut writer, mut reader) = small_segments(dir.path(), Arc::new(faulty.clone()));
    let first = append_one(&mut writer, b"one");
    faulty.empty_reads.store(1, Ordering::SeqCst);
    assert_eq!(read_all(&mut reader), vec![]);
    let second = append_one(&mut writer, b"two");
    assert_eq!(
        read_all(&mut reader),
        vec![(first, b"one".to_vec()), (second, b"two".to_vec())]
    );
}

/// A delivered segment that cannot be renamed to a spare is removed instead, and the other
/// delivered segments are deleted all the same: one error never holds the disk.
#[test]
fn a_failed_rename_of_a_delivered_segment_falls_back_to_removing_it() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let (_, mut writer, mut reader) = small_segments(dir.path(), Arc::new(faulty.clone()));
    let mut last = 0;
    while segments(dir.path()).len() < 4 {
        last = append_one(&mut writer, &[b'r'; 1500]);
    }
    read_all(&mut reader);
    faulty.fail_renames.store(true, Ordering::SeqCst);
    let _ = reader.commit(last, true, Instant::now(), |_, _| false);
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "{:?}",
        file_names(dir.path())
    );
    assert_eq!(spare_names(dir.path()), Vec::<String>::new());
}

/// The dropped list holds one record a line: a reason with a line break in it would have added
/// a second record, dropped without its dead-letter copy.
#[tokio::test]
async fn a_drop_reason_with_a_line_break_is_refused_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let seqs = append_n(&s.appender, 0..2).await;
    close(s);
    for reason in [
        format!("typo\n{} sneaky", seqs[1]),
        "bell\u{7}".into(),
        String::new(),
    ] {
        let refused = drop_record(dir.path(), seqs[0], &reason).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput, "{reason:?}");
    }
    drop_record(dir.path(), seqs[0], "poison record").unwrap();
    let mut s = open_quiet(&cfg);
    assert_eq!(read_all(&mut s.reader), vec![(seqs[1], payload(1))]);
    close(s);
}

#[test]
fn the_dropped_list_counts_only_lines_drop_writes() {
    assert_eq!(parse_dropped(b"42 poison record"), Some(42));
    for line in [
        &b"42"[..],
        b" 42 x",
        b"42\tx",
        b"+42 x",
        b"42x y",
        b"42 a\rb",
    ] {
        assert_eq!(
            parse_dropped(line),
            None,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

/// A sequence number can come again (a power cut in `never` mode, segments wiped by hand): the
/// second dead letter of one number is a copy of its own, the first is kept.
#[test]
fn a_second_dead_letter_with_the_same_number_never_overwrites_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk {
        dir: dir.path().to_path_buf(),
    };
    // The same record twice (dead-lettered again after a crash) is one copy.
    for (payload, reason) in [
        (&b"first"[..], "one"),
        (b"second", "two"),
        (b"second", "two"),
        (b"third", "three"),
    ] {
        write_dead_letter(&disk, 7, payload, reason).unwrap();
    }
    let dead = dir.path().join(DEAD_LETTER_DIR);
    let mut kept: Vec<(Vec<u8>, String)> = file_names(&dead)
        .into_iter()
        .filter_map(|n| n.strip_suffix(".entry").map(str::to_owned))
        .map(|stem| {
            (
                fs::read(dead.join(format!("{stem}.entry"))).unwrap(),
                fs::read_to_string(dead.join(format!("{stem}.reason"))).unwrap(),
            )
        })
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec![
            (b"first".to_vec(), "one".into()),
            (b"second".to_vec(), "two".into()),
            (b"third".to_vec(), "three".into())
        ]
    );
}

#[tokio::test]
async fn records_are_dropped_by_range_each_with_its_dead_letter_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let seqs = append_n(&s.appender, 0..6).await;
    close(s);
    let range = seqs[1]..=seqs[3];
    let dropped = drop_records(dir.path(), |seq, _| range.contains(&seq), "bad batch").unwrap();
    assert_eq!(dropped, seqs[1..=3]);
    let dead = file_names(&dir.path().join(DEAD_LETTER_DIR));
    for seq in &dropped {
        assert!(dead.contains(&format!("{seq:020}.entry")), "{dead:?}");
    }
    let mut s = open_quiet(&cfg);
    let left: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(left, [seqs[0], seqs[4], seqs[5]]);
    close(s);
}

/// A failed write into a segment written over a spare, on a disk with no free block: the next
/// write goes into the spare's own blocks. Cut to nothing, the spare left the writer needing
/// new blocks, and every callback was refused for good.
#[test]
fn a_spare_a_failed_write_went_into_is_still_written_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let (cfg, mut writer, mut reader) = small_segments(dir.path(), Arc::new(faulty.clone()));
    assert!(
        writer.recycled,
        "the first segment is written over the spare made at open"
    );
    faulty.full.store(true, Ordering::SeqCst);
    faulty.failed_writes.store(1, Ordering::SeqCst);
    let failed = writer.write_batch(&[&[b"lost".to_vec()]], &mut Vec::new());
    assert!(failed[0].is_err());
    let kept = writer.write_batch(&[&[b"kept".to_vec()]], &mut Vec::new());
    let seq = kept[0].clone().expect("written into the spare's blocks");
    assert_eq!(read_all(&mut reader), vec![(seq, b"kept".to_vec())]);
    drop((writer, reader));
    let disk = Arc::new(Disk {
        dir: dir.path().to_path_buf(),
    });
    let (_, mut reader, _, recovery) = recover(disk, &cfg, None).unwrap();
    assert_eq!(
        (recovery.damaged, recovery.torn_bytes),
        (0, 0),
        "{recovery:?}"
    );
    assert_eq!(read_all(&mut reader), vec![(seq, b"kept".to_vec())]);
}

/// Writes a segment file of frames `seqs` in generation `first` (as another spool would).
fn write_segment(dir: &Path, first: u64, seqs: std::ops::RangeInclusive<u64>, tag: &str) {
    let mut bytes = Vec::new();
    for seq in seqs {
        frame::encode(first, seq, format!("{tag}-{seq}").as_bytes(), &mut bytes);
    }
    fs::write(dir.join(segment_name(first)), bytes).unwrap();
}

/// A segment copied in from another pod (or restored from a backup) whose name falls inside a
/// live segment's numbers: read in order, the live segment moved the read position past the
/// copy's first records, which were skipped without a word. Now recovery sets the later-numbered
/// file aside in `foreign/`, a spool of its own whose records a drain publishes, all of them.
#[tokio::test]
async fn a_segment_overlapping_another_is_set_aside_and_its_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let live = append_n(&s.appender, 0..6).await;
    close(s);
    assert_eq!(live[0], 1);
    write_segment(dir.path(), 2, 2..=20, "copied");
    let mut s = open_quiet(&cfg);
    assert_eq!(
        (s.recovery.set_aside, s.recovery.set_aside_held),
        (1, 1),
        "{:?}",
        s.recovery
    );
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(read, live);
    let next = s.appender.append(b"new".to_vec()).await.unwrap();
    assert!(next > *live.last().unwrap());
    close(s);
    let foreign = dir.path().join(FOREIGN_DIR);
    let mut f = open_quiet(&config(&foreign));
    let copied: Vec<(u64, Vec<u8>)> = (2..=20)
        .map(|seq| (seq, format!("copied-{seq}").into_bytes()))
        .collect();
    assert_eq!(
        read_all(&mut f.reader),
        copied,
        "every copied record is owed"
    );
    close(f);
    // `spool status` sees it before the next start too.
    write_segment(dir.path(), 3, 3..=4, "again");
    let status = inspect(dir.path()).unwrap();
    assert_eq!((status.overlapping, status.set_aside_held), (1, 1));
}

/// A segment (or a spare) numbered beyond any number this spool gives: counting on from it
/// would wrap. It is set aside, and new records go on from the spool's own numbers.
#[tokio::test]
async fn a_segment_near_the_top_of_the_numbers_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    let live = append_n(&s.appender, 0..3).await;
    close(s);
    write_segment(dir.path(), u64::MAX - 5, u64::MAX - 5..=u64::MAX - 4, "top");
    fs::write(dir.path().join(spare_name(u64::MAX)), b"").unwrap();
    let mut s = open_quiet(&cfg);
    assert_eq!(s.recovery.set_aside, 1, "{:?}", s.recovery);
    assert!(!dir.path().join(spare_name(u64::MAX)).exists());
    let read: Vec<u64> = read_all(&mut s.reader).iter().map(|r| r.0).collect();
    assert_eq!(read, live);
    let next = s.appender.append(b"new".to_vec()).await.unwrap();
    assert_eq!(next, live.last().unwrap() + 1);
    close(s);
}

/// `Interval`: a failed background sync may have lost what it was to write (Linux marks the
/// pages clean and a later sync succeeds without them), so the records written since the last
/// good sync are appended again from the writer's copies, to a new segment, and synced there;
/// readiness stays red until that sync succeeded, not merely until the next one does.
#[tokio::test]
async fn after_a_failed_sync_the_records_since_the_last_good_one_are_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(dir.path());
    let cfg = SpoolConfig {
        fsync: Fsync::Interval(Duration::from_millis(1)),
        ..config(dir.path())
    };
    let mut s = open_on(Arc::new(faulty.clone()), &cfg, None, || {}).unwrap();
    let before = s.appender.append(b"synced".to_vec()).await.unwrap();
    let shared = s.shared.clone();
    wait_for("the first record synced", || {
        shared.synced.load(Ordering::SeqCst) >= before
    })
    .await;
    faulty.fail_syncs.store(true, Ordering::SeqCst);
    let at_risk = s.appender.append(b"at risk".to_vec()).await.unwrap();
    wait_for("the failed sync surfaced", || {
        shared.trouble(0, Duration::from_secs(1)) == Some("spool sync failing")
    })
    .await;
    // Syncs fail on: each try to write again fails too, and readiness stays red.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        s.shared.trouble(0, Duration::from_secs(1)),
        Some("spool sync failing")
    );
    faulty.fail_syncs.store(false, Ordering::SeqCst);
    wait_for("durability re-established", || {
        shared.trouble(0, Duration::from_secs(1)).is_none()
    })
    .await;
    assert!(s.shared.synced.load(Ordering::SeqCst) > at_risk);
    let read = read_all(&mut s.reader);
    let copies: Vec<u64> = read
        .iter()
        .filter(|(_, p)| p == b"at risk")
        .map(|r| r.0)
        .collect();
    // The first copy, and one per try to write it again (they back off: a few at most).
    assert!((2..=4).contains(&copies.len()), "{copies:?}");
    assert_eq!(copies[0], at_risk);
    assert!(read.iter().filter(|(_, p)| p == b"synced").count() == 1);
    close(s);
}

/// A second start that sets segments aside must not put them where a drain already ran: that
/// directory's committed position would count them as delivered.
#[tokio::test]
async fn each_start_sets_aside_into_a_directory_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let s = open_quiet(&cfg);
    append_n(&s.appender, 0..6).await;
    close(s);
    write_segment(dir.path(), 2, 2..=20, "first");
    close(open_quiet(&cfg));
    // Drained: its position is past every number there.
    let mut f = open_quiet(&config(&dir.path().join(FOREIGN_DIR)));
    let last = read_all(&mut f.reader).last().unwrap().0;
    f.reader
        .commit(last, true, Instant::now(), |_, _| false)
        .unwrap();
    close(f);
    write_segment(dir.path(), 3, 3..=9, "second");
    let s = open_quiet(&cfg);
    assert_eq!(s.recovery.set_aside, 1);
    close(s);
    let mut again = open_quiet(&config(&dir.path().join(format!("{FOREIGN_DIR}.2"))));
    let read: Vec<u64> = read_all(&mut again.reader).iter().map(|r| r.0).collect();
    assert_eq!(
        read,
        (3..=9).collect::<Vec<_>>(),
        "every record of the second is owed"
    );
    close(again);
}
