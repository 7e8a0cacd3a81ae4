//! The spool against real files in a temporary directory.

use std::collections::VecDeque;

use super::*;

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
    let before = list_segments(dir.path()).unwrap().len();
    assert!(before > 3, "segments rotate: {before}");
    s.reader.commit(seqs[24], true).unwrap();
    assert!(list_segments(dir.path()).unwrap().len() < before);
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
    let (_, path) = list_segments(&cfg.dir).unwrap().pop().unwrap();
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
    let fourth = frame::scan(&bytes).frames[3];
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
    s.reader.commit(*seqs.last().unwrap(), true).unwrap();
    assert!(s.shared.can_take(100), "bytes {}", s.shared.bytes());
    let more = s.appender.append(b"more".to_vec()).await.unwrap();
    assert_eq!(read_all(&mut s.reader), vec![(more, b"more".to_vec())]);
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
