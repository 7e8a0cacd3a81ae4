//! `im-relay spool drain`: publishes what a relay left in its spool directory and exits. After a
//! scale-in while Kafka was away, no relay starts on that volume again until the StatefulSet
//! grows back; this runs the same publisher (error table, quarantine road, dead letters) over
//! the directory, from a Job that mounts the retained claim or by hand on a VM.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Event, Publisher, PublisherConfig};
use crate::spool::{self, Fsync, SpoolConfig};

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Records waiting when it began.
    pub found: u64,
    /// Records still waiting when it ended (0: nothing owed but what was set aside).
    pub left: u64,
    /// Segments its own recovery set aside (in a `foreign` directory inside it).
    pub set_aside: usize,
}

/// Publishes every record waiting in the spool in `dir`, until none is left or `timeout`
/// passes; a progress line every `every`. Fails when the directory cannot be opened (a relay
/// still runs on it, say) or the producer cannot be made.
pub fn drain(
    dir: &Path,
    publisher: PublisherConfig,
    timeout: Option<Duration>,
    every: Duration,
) -> Result<Drained, String> {
    // `open` would make a missing directory: a mistyped path must not read as "nothing left".
    if !dir.join(spool::COMMITTED_FILE).is_file() {
        return Err(format!("{} holds no spool", dir.display()));
    }
    let (events, events_rx) = mpsc::channel();
    let wake = events.clone();
    // No appends: no bound to keep (`max_bytes` 0 also writes no spare ahead). `Always`, so
    // each committed position is synced before the next segment is deleted.
    let cfg = SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 0,
        segment_bytes: 64 << 20,
        fsync: Fsync::Always,
    };
    let opened = spool::open(&cfg, move || {
        let _ = wake.send(Event::Appended);
    })
    .map_err(|e| format!("cannot open the spool in {}: {e}", dir.display()))?;
    let (found, set_aside) = (opened.recovery.pending, opened.recovery.set_aside);
    let shared = opened.shared;
    let flush = publisher.kafka.flush_timeout;
    let thread = Publisher::new(
        publisher,
        opened.reader,
        shared.clone(),
        (events.clone(), events_rx),
    )
    .map_err(|e| format!("cannot create the Kafka producer: {e}"))?
    .spawn(flush)
    .map_err(|e| format!("cannot start the publisher: {e}"))?;
    tracing::info!(dir = %dir.display(), records = found, "draining a spool left behind");
    let start = Instant::now();
    let mut said = start;
    while shared.backlog() > 0 && timeout.is_none_or(|t| start.elapsed() < t) {
        std::thread::sleep(Duration::from_millis(100));
        if said.elapsed() >= every {
            said = Instant::now();
            tracing::info!(left = shared.backlog(), "draining");
        }
    }
    let _ = events.send(Event::Stop);
    let _ = thread.join();
    drop(opened.appender);
    let _ = opened.writer.join();
    Ok(Drained {
        found,
        left: shared.backlog(),
        set_aside,
    })
}
