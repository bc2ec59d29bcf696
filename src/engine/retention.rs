//! WAL retention, off the writer thread. Once a snapshot is durable the writer
//! retires the segments it covers (bookkeeping only, no I/O) and hands them
//! here; this thread deletes them, oldest first, the directory synced after
//! each (`wal::Retired::remove`), so unlinks and directory syncs never stall a
//! batch. A failed delete is a warning: nothing is lost by keeping a segment.
//! It is retried after [`DELETE_RETRY`], and whatever was retired later waits
//! behind it, so a newer segment is never deleted before an older one.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wal::Retired;

/// Wait before another try after a failed delete.
pub const DELETE_RETRY: Duration = Duration::from_secs(10);

/// The writer's side of the retention thread.
pub struct Janitor {
    retired: Option<Sender<Retired>>,
    thread: Option<JoinHandle<()>>,
}

impl Janitor {
    pub fn start() -> Janitor {
        // Unbounded, and bounded in practice: one entry per durable snapshot,
        // a few paths each, and every entry is merged into one as it arrives.
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("wal-retention".into())
            .spawn(move || run(rx))
            .ok();
        Janitor {
            retired: Some(tx),
            thread,
        }
    }

    /// Hands retired segments over for deletion; never blocks.
    pub fn delete(&self, retired: Retired) {
        if retired.is_empty() {
            return;
        }
        if let Some(tx) = &self.retired {
            let _ = tx.send(retired);
        }
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        // Closing the channel: one last attempt at what waits, then the end.
        self.retired = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: Receiver<Retired>) {
    let mut waiting: Option<Retired> = None;
    let mut retry_at = Instant::now();
    loop {
        let timeout = match &waiting {
            Some(_) => retry_at.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        let closed = match rx.recv_timeout(timeout) {
            Ok(retired) => {
                merge(&mut waiting, retired);
                while let Ok(more) = rx.try_recv() {
                    merge(&mut waiting, more);
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if let Some(retired) = waiting
            .as_mut()
            .filter(|_| Instant::now() >= retry_at || closed)
        {
            match retired.remove() {
                Ok(deleted) => {
                    tracing::info!(deleted, "WAL segments covered by a snapshot deleted");
                    waiting = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, left = retired.len(),
                        retry_ms = DELETE_RETRY.as_millis() as u64,
                        "deleting WAL segments covered by a snapshot failed; kept for now");
                    retry_at = Instant::now() + DELETE_RETRY;
                }
            }
        }
        if closed {
            return;
        }
    }
}

fn merge(waiting: &mut Option<Retired>, later: Retired) {
    match waiting {
        Some(w) => w.extend(later),
        None => *waiting = Some(later),
    }
}
