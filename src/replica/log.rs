//! The raft log of a replica, on the project's own `wal` crate (one log, not
//! two): openraft's `RaftLogStorage` over an append-only [`Wal`].
//!
//! Raft needs more than appends: a follower drops the uncommitted tail an old
//! leader left (`truncate`), everybody forgets what a snapshot covers
//! (`purge`), and the vote must be durable before it is cast. The WAL only
//! appends, which is what makes it crash-safe at every I/O step, so each of
//! those is one more record, and the log openraft sees is what the records
//! say when read in order:
//!
//! | record | payload | effect when read |
//! |---|---|---|
//! | `ENTRY` | an openraft entry (postcard) | appended at its index |
//! | `VOTE` | the vote | the vote |
//! | `COMMITTED` | the committed log id | where re-applying stops at start-up |
//! | `TRUNCATE` | an index | entries from that index on are gone |
//! | `PURGE` | a log id | entries up to it are gone (a snapshot holds them) |
//!
//! A record lost in a crash takes every later record with it (the WAL keeps a
//! prefix), so order alone makes a truncation safe: the entries that replace
//! the truncated ones come after it and are synced with it. Appends and votes
//! are synced before openraft hears they are done; a truncation, a purge and
//! the committed index ride with the next sync.
//!
//! The entries not purged are also kept in memory, so a leader feeds its
//! followers without reading the disk. The snapshot policy bounds them.

// openraft's own error type, which its traits return: not ours to shrink.
#![allow(clippy::result_large_err)]

use super::TypeConfig;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote,
};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use wal::{Wal, WalOptions};

type NodeId = u64;

const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const TRUNCATE: u8 = 4;
const PURGE: u8 = 5;

/// The replica's raft log; cheap to clone (openraft's log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    wal: Wal,
    /// Entries not purged, in index order.
    entries: VecDeque<Entry<TypeConfig>>,
    /// WAL sequence of each entry of `entries` (same order).
    wal_sequences: VecDeque<u64>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    /// Reused encoding buffer.
    buf: Vec<u8>,
}

/// What went wrong reading or writing the log, for openraft (which stops
/// the replica on any storage error: a log it cannot trust is not used).
fn io_error(what: &str, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(format!("{what}: {e}"))).into()
}

impl LogStore {
    /// Opens (or creates) the log in `options.dir` and reads it whole.
    pub fn open(options: WalOptions) -> Result<LogStore, StorageError<NodeId>> {
        let wal = Wal::open(options).map_err(|e| io_error("opening the raft log", e))?;
        let mut inner = Inner {
            wal,
            entries: VecDeque::new(),
            wal_sequences: VecDeque::new(),
            vote: None,
            committed: None,
            purged: None,
            buf: Vec::new(),
        };
        inner.recover()?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug openraft cannot recover
        // from either; the poisoned state is still the last one written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when nothing was ever written: no vote, no entry (a fresh group
    /// initializes itself only then).
    pub fn is_pristine(&self) -> bool {
        let inner = self.lock();
        inner.vote.is_none() && inner.entries.is_empty() && inner.purged.is_none()
    }

    /// The last log id, for status.
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        let inner = self.lock();
        inner.last_log_id()
    }
}

impl Inner {
    fn recover(&mut self) -> Result<(), StorageError<NodeId>> {
        let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
        self.wal
            .replay(0, |sequence, payload| {
                records.push((sequence, payload.to_vec()));
                Ok::<(), wal::WalError>(())
            })
            .map_err(|e| io_error("reading the raft log", e))?;
        for (sequence, payload) in records {
            let (&kind, body) = payload
                .split_first()
                .ok_or_else(|| io_error("raft log record", format!("{sequence} is empty")))?;
            let bad = |e: postcard::Error| io_error("raft log record", format!("{sequence}: {e}"));
            match kind {
                ENTRY => {
                    let entry: Entry<TypeConfig> = postcard::from_bytes(body).map_err(bad)?;
                    self.push(entry, sequence)?;
                }
                VOTE => self.vote = Some(postcard::from_bytes(body).map_err(bad)?),
                COMMITTED => self.committed = postcard::from_bytes(body).map_err(bad)?,
                TRUNCATE => {
                    let since: u64 = postcard::from_bytes(body).map_err(bad)?;
                    self.truncate_from(since);
                }
                PURGE => {
                    let upto: LogId<NodeId> = postcard::from_bytes(body).map_err(bad)?;
                    self.purge_upto(upto);
                }
                other => {
                    return Err(io_error(
                        "raft log record",
                        format!("{sequence} has unknown kind {other}"),
                    ))
                }
            }
        }
        Ok(())
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries.back().map(|e| *e.get_log_id()).or(self.purged)
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.get_log_id().index)
    }

    /// Appends in memory; the index must follow the last one.
    fn push(
        &mut self,
        entry: Entry<TypeConfig>,
        sequence: u64,
    ) -> Result<(), StorageError<NodeId>> {
        let index = entry.get_log_id().index;
        let expected = self.last_log_id().map_or(0, |l| l.index + 1);
        // After a purge past the end (a snapshot installed ahead of the log)
        // the next entry may start anywhere above it.
        if index != expected && !(self.entries.is_empty() && index >= expected) {
            return Err(io_error(
                "raft log",
                format!("entry {index} appended after {}", expected.wrapping_sub(1)),
            ));
        }
        self.entries.push_back(entry);
        self.wal_sequences.push_back(sequence);
        Ok(())
    }

    fn truncate_from(&mut self, since: u64) {
        while self
            .entries
            .back()
            .is_some_and(|e| e.get_log_id().index >= since)
        {
            self.entries.pop_back();
            self.wal_sequences.pop_back();
        }
    }

    fn purge_upto(&mut self, upto: LogId<NodeId>) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.get_log_id().index <= upto.index)
        {
            self.entries.pop_front();
            self.wal_sequences.pop_front();
        }
        if self.purged.is_none_or(|p| p.index < upto.index) {
            self.purged = Some(upto);
        }
    }

    /// Appends one record (durable at the next sync); returns its sequence.
    fn write(
        &mut self,
        kind: u8,
        body: &impl serde::Serialize,
    ) -> Result<u64, StorageError<NodeId>> {
        self.buf.clear();
        self.buf.push(kind);
        let buf = std::mem::take(&mut self.buf);
        let buf = postcard::to_extend(body, buf).map_err(|e| io_error("encoding", e))?;
        let sequence = self.wal.last_sequence() + 1;
        let result = self.wal.append(sequence, &buf);
        self.buf = buf;
        result.map_err(|e| io_error("appending to the raft log", e))?;
        Ok(sequence)
    }

    fn sync(&mut self) -> Result<(), StorageError<NodeId>> {
        self.wal
            .sync()
            .map_err(|e| io_error("syncing the raft log", e))
    }

    fn range(&self, range: impl RangeBounds<u64>) -> Vec<Entry<TypeConfig>> {
        let Some(first) = self.first_index() else {
            return Vec::new();
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => first,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let from = start.saturating_sub(first) as usize;
        let to = (end.saturating_sub(first) as usize).min(self.entries.len());
        if from >= to {
            return Vec::new();
        }
        self.entries.range(from..to).cloned().collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.lock().range(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.write(VOTE, vote)?;
        inner.sync()?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        if inner.committed != committed {
            inner.write(COMMITTED, &committed)?;
            inner.committed = committed;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        for entry in entries {
            let sequence = inner.write(ENTRY, &entry)?;
            inner.push(entry, sequence)?;
        }
        // One sync for everything openraft handed over at once.
        let synced = inner.wal.sync();
        drop(inner);
        match synced {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(message.clone())));
                Err(io_error("syncing the raft log", message))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.write(TRUNCATE, &log_id.index)?;
        inner.truncate_from(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        let purge_record = inner.write(PURGE, &log_id)?;
        inner.purge_upto(log_id);
        // The vote and the committed index live in records too: written
        // again, so retiring the segments below the first kept entry never
        // takes the newest of them.
        if let Some(vote) = inner.vote {
            inner.write(VOTE, &vote)?;
        }
        let committed = inner.committed;
        inner.write(COMMITTED, &committed)?;
        inner.sync()?;
        let floor = inner.wal_sequences.front().copied().unwrap_or(purge_record);
        let mut retired = inner.wal.retire_segments_before(floor);
        drop(inner);
        if let Err(e) = retired.remove() {
            tracing::warn!(error = %e, "raft log segments not deleted; kept until the next purge");
        }
        Ok(())
    }
}
