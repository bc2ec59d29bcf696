//! # wal: the account service's write-ahead log
//!
//! An append-only log of opaque records, each with a contiguous sequence
//! number, in mmap'd, preallocated segment files (format and ordering rules:
//! [`format`]).
//!
//! * **Group commit.** [`Wal::append`] frames a record into a reused buffer (no
//!   system call, no allocation); [`Wal::sync`] writes the batch with one
//!   `pwrite` and makes it durable with one `fdatasync`. The caller appends a
//!   whole batch, then syncs once. Segments are read through read-only `mmap`s
//!   (replay hands out slices of the mapping); they are not written through a
//!   mapping because `msync` of a writable shared mapping write-protects the
//!   synced pages again, with a TLB-shootdown interrupt on every core of the
//!   process per sync (see `segment::Active`).
//! * **Recovery.** [`Wal::open`] validates every segment. What was appended but
//!   never synced is cut off at open, never reported as corruption: a torn
//!   tail (bad length or CRC with nothing valid after it), and after a power
//!   loss also a hole followed by valid records of the same, unsynced, sync
//!   batch (each record names its batch's first sequence). A bad record
//!   followed by a record of a later batch, or in any segment but the last, is
//!   damage to durable data: a hard [`WalError::Corrupt`] naming the segment
//!   and offset. To see a hole, open reads the last segment to its end (pages
//!   of zeros are skipped, not decoded).
//! * **Roll-over.** A record that does not fit starts a new segment, after the
//!   old one's tail is written and synced. The next segment file is
//!   preallocated (its blocks allocated with `fallocate`, reading as zeros,
//!   nothing written; synced) by a background thread ahead of time, so a
//!   roll-over costs a rename, not 64 MiB of writes.
//! * **Identity.** Each log has a random 128-bit id ([`Wal::log_id`]) in every
//!   segment header and in `LOG_ID`; a segment of another log is refused.
//! * **Failures are fatal.** Once a write, sync, rename or directory sync of
//!   `append`/`sync` failed, the log is poisoned: every later `append`/`sync`
//!   returns [`WalError::Poisoned`]. Retrying an `fdatasync` after an error
//!   can report success for pages the kernel already dropped; the only safe
//!   recovery is to reopen and read what is on disk.
//! * **Retention.** [`Wal::delete_segments_before`] removes segments wholly
//!   covered by a snapshot, oldest first, the directory synced after each;
//!   never the active one. Its errors do not poison.
//! * **Fault injection.** [`WalOptions::io_hooks`] sees every I/O step that
//!   changes the disk ([`IoStep`]) and may fail it: the crash-point tests.
//! * **One process.** The directory is locked (`LOCK`, an advisory file lock)
//!   for the life of the [`Wal`].
//!
//! Limits: records are 1 byte .. `record_size_max` (default 1 MiB); a segment
//! must hold at least one record of the maximum size. Records appended but not
//! yet synced live in memory, so a crash loses them (they were never
//! acknowledged in `--durability sync`; in `async` this is the documented loss
//! window). Segments of format version 1 are refused, not converted.

mod error;
pub mod format;
mod hooks;
mod reader;
mod recovery;
mod segment;

pub use error::{IoOp, WalError};
pub use hooks::{IoHooks, IoStep, WritePurpose};
pub use reader::Reader;

use error::io;
use format::SegmentHeader;
use hooks::Disk;
use segment::{Active, SegmentMeta};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

#[derive(Clone)]
pub struct WalOptions {
    pub dir: PathBuf,
    /// Size of each segment file, preallocated. Default 64 MiB.
    pub segment_size_bytes: u64,
    /// Largest payload accepted, in bytes. Default 1 MiB.
    pub record_size_max: u32,
    /// Called around every I/O step (fault injection in tests). Default `None`.
    pub io_hooks: Option<Arc<dyn IoHooks>>,
}

impl WalOptions {
    pub fn new(dir: impl Into<PathBuf>) -> WalOptions {
        WalOptions {
            dir: dir.into(),
            segment_size_bytes: 64 * 1024 * 1024,
            record_size_max: 1024 * 1024,
            io_hooks: None,
        }
    }
}

impl fmt::Debug for WalOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalOptions")
            .field("dir", &self.dir)
            .field("segment_size_bytes", &self.segment_size_bytes)
            .field("record_size_max", &self.record_size_max)
            .field("io_hooks", &self.io_hooks.as_ref().map(|_| "IoHooks"))
            .finish()
    }
}

/// A log id as 32 lowercase hex digits, as in `LOG_ID` and in messages.
pub fn format_log_id(id: u128) -> String {
    format!("{id:032x}")
}

const SPARE_NAME: &str = "next-segment.tmp";

pub struct Wal {
    options: WalOptions,
    disk: Disk,
    log_id: u128,
    /// Closed segments, oldest first; all synced.
    closed: Vec<SegmentMeta>,
    active: Option<Active>,
    last_sequence: u64,
    /// First sequence of the current sync batch (appended since the last
    /// sync); `None` when nothing was appended since.
    batch_first: Option<u64>,
    /// The failure that made the log unusable (see [`WalError::Poisoned`]).
    poisoned: Option<Arc<WalError>>,
    spare: Option<JoinHandle<Result<PathBuf, WalError>>>,
    _lock: File,
}

impl Wal {
    /// Opens (creating the directory if needed), locks and validates the log.
    pub fn open(options: WalOptions) -> Result<Wal, WalError> {
        let min_segment = (format::SEGMENT_HEADER_LEN
            + format::record_len(options.record_size_max as usize))
            as u64;
        assert!(options.record_size_max > 0, "record_size_max > 0");
        assert!(
            options.segment_size_bytes >= min_segment,
            "a segment holds a record of the maximum size"
        );
        assert!(
            format::record_len(options.record_size_max as usize) <= format::SYNC_BATCH_BYTES_MAX,
            "a sync batch holds a record of the maximum size"
        );
        let dir = options.dir.clone();
        fs::create_dir_all(&dir).map_err(io(IoOp::CreateDir, &dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(IoOp::Open, &lock_path))?;
        lock.try_lock().map_err(|_| WalError::Locked(dir.clone()))?;

        let disk = Disk::new(options.io_hooks.clone());
        let recovered = recovery::recover(&dir, options.record_size_max, &disk)?;
        let mut metas = recovered.segments;
        let last_sequence = metas.last().map_or(0, |m| m.last_sequence);
        let active = match metas.pop() {
            Some(meta) => Some(Active::open(meta, disk.clone())?),
            None => None,
        };
        let mut wal = Wal {
            options,
            disk,
            log_id: recovered.log_id,
            closed: metas,
            active,
            last_sequence,
            batch_first: None,
            poisoned: None,
            spare: None,
            _lock: lock,
        };
        wal.prepare_spare();
        debug_assert!(wal
            .closed
            .iter()
            .all(|m| m.last_sequence <= wal.last_sequence));
        Ok(wal)
    }

    /// The log's random identity, in every segment header and in `LOG_ID`.
    pub fn log_id(&self) -> u128 {
        self.log_id
    }

    /// Sequence of the last record; 0 if the log is empty.
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// Sequence of the first record on disk; `None` if there is none.
    pub fn first_sequence(&self) -> Option<u64> {
        self.closed
            .iter()
            .chain(self.active.as_ref().map(|a| &a.meta))
            .find(|m| m.last_sequence >= m.first_sequence)
            .map(|m| m.first_sequence)
    }

    /// Copies one record into the log (durable only after [`Wal::sync`]).
    /// `sequence` must be `last_sequence() + 1`; an empty log accepts any
    /// sequence >= 1 (a log that starts after a snapshot).
    pub fn append(&mut self, sequence: u64, payload: &[u8]) -> Result<(), WalError> {
        self.check_usable()?;
        let expected = self.last_sequence + 1;
        if sequence != expected && !(self.is_empty() && sequence >= 1) {
            return Err(WalError::SequenceGap {
                expected,
                got: sequence,
            });
        }
        if payload.is_empty() {
            return Err(WalError::EmptyRecord);
        }
        if payload.len() > self.options.record_size_max as usize {
            return Err(WalError::RecordTooLarge {
                len: payload.len(),
                max: self.options.record_size_max,
            });
        }
        let needed = format::record_len(payload.len());
        // A sync batch writes at most SYNC_BATCH_BYTES_MAX into a segment
        // (what lets open look only that far for a torn tail): sync first.
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.unsynced_bytes() + needed > format::SYNC_BATCH_BYTES_MAX)
        {
            self.sync()?;
        }
        let batch_first = *self.batch_first.get_or_insert(sequence);
        let continues = self
            .active
            .as_ref()
            .is_some_and(|a| a.room() >= needed && a.meta.last_sequence + 1 == sequence);
        let active = match self.active.as_mut() {
            Some(active) if continues => active,
            _ => match self.roll(sequence) {
                Ok(active) => active,
                Err(e) => return Err(self.poison(e)),
            },
        };
        active.append(sequence, batch_first, payload);
        debug_assert_eq!(active.meta.last_sequence, sequence);
        self.last_sequence = sequence;
        Ok(())
    }

    /// Makes every appended record durable: one pwrite and one fdatasync (a
    /// segment closed since the last sync was synced by the roll-over). A
    /// failure poisons the log.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        if let Some(active) = self.active.as_mut() {
            if let Err(e) = active.sync() {
                return Err(self.poison(e));
            }
        }
        self.batch_first = None;
        debug_assert!(self.active.as_ref().is_none_or(|a| !a.is_dirty()));
        Ok(())
    }

    /// Calls `f(sequence, payload)` for every record with `sequence >= from_sequence`,
    /// in order; stops at the first error of `f`. Returns the number of records visited.
    pub fn replay<E, F>(&self, from_sequence: u64, mut f: F) -> Result<u64, E>
    where
        F: FnMut(u64, &[u8]) -> Result<(), E>,
        E: From<WalError>,
    {
        self.check_usable()?;
        let mut visited = 0;
        for meta in &self.closed {
            if meta.last_sequence < from_sequence {
                continue;
            }
            let map = segment::map_read(&meta.path)?;
            visited += replay_data(
                &map[..meta.data_end],
                &meta.path,
                from_sequence,
                self.options.record_size_max,
                &mut f,
            )?;
        }
        if let Some(active) = &self.active {
            visited += replay_data(
                active.data(),
                &active.meta.path,
                from_sequence,
                self.options.record_size_max,
                &mut f,
            )?;
        }
        Ok(visited)
    }

    /// A read-only view of this log for another thread: records already
    /// synced, read while this handle goes on appending.
    pub fn reader(&self) -> Reader {
        Reader::new(self.options.dir.clone(), self.options.record_size_max)
    }

    /// Deletes closed segments whose records all have a sequence below
    /// `sequence` (never the active segment). Returns how many were deleted.
    ///
    /// Oldest first, the directory synced after each removal, so a crash can
    /// only ever leave a contiguous suffix of the log. An error leaves the log
    /// usable (the caller may warn and retry later).
    pub fn delete_segments_before(&mut self, sequence: u64) -> Result<usize, WalError> {
        let mut retired = self.retire_segments_before(sequence);
        let result = retired.remove();
        // What could not be deleted stays part of the log, for a later call.
        for meta in retired.segments.into_iter().rev() {
            self.closed.insert(0, meta);
        }
        result
    }

    /// The closed segments wholly below `sequence`, taken out of the log
    /// without touching the disk; [`Retired::remove`] deletes them, on any
    /// thread. Until then they stay on disk, and an open finds them again
    /// (a contiguous prefix of the log, which is harmless).
    pub fn retire_segments_before(&mut self, sequence: u64) -> Retired {
        let keep_from = self
            .closed
            .iter()
            .position(|m| m.last_sequence >= sequence)
            .unwrap_or(self.closed.len());
        let segments = self.closed.drain(..keep_from).collect();
        debug_assert!(self.closed.iter().all(|m| m.last_sequence >= sequence));
        Retired {
            dir: self.options.dir.clone(),
            segments,
            disk: self.disk.clone(),
        }
    }

    /// Bytes of segment files on disk.
    pub fn disk_usage_bytes(&self) -> u64 {
        self.closed
            .iter()
            .chain(self.active.as_ref().map(|a| &a.meta))
            .map(|m| m.file_len)
            .sum()
    }

    pub fn segment_count(&self) -> usize {
        self.closed.len() + usize::from(self.active.is_some())
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    fn is_empty(&self) -> bool {
        self.first_sequence().is_none()
    }

    fn check_usable(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(cause) => Err(WalError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Records `error` as the cause that makes the log unusable; returns it.
    fn poison(&mut self, error: WalError) -> WalError {
        if self.poisoned.is_none() {
            self.poisoned = Some(Arc::new(error.duplicate()));
        }
        error
    }

    /// Closes the active segment and starts one whose first record is `sequence`.
    ///
    /// Order (see [`format`]): the old segment's pending tail is written and
    /// synced *before* the next segment exists, so no crash can leave a segment
    /// that is followed by another one but misses its own last records.
    fn roll(&mut self, sequence: u64) -> Result<&mut Active, WalError> {
        if let Some(old) = self.active.as_mut() {
            old.sync()?;
        }
        if let Some(old) = self.active.take() {
            if old.meta.last_sequence >= old.meta.first_sequence {
                self.closed.push(old.meta.clone());
            } else {
                // Holds no record (cut back to its header, or the log restarts
                // after a snapshot): replaced, not kept. The removal is made
                // durable before the next segment appears, so the two can
                // never be found together (a sequence gap).
                let path = old.meta.path.clone();
                drop(old);
                self.disk.remove(&path)?;
                self.disk.sync_dir(&self.options.dir)?;
            }
        }
        let spare = self.take_spare()?;
        let header = SegmentHeader {
            first_sequence: sequence,
            log_id: self.log_id,
        };
        let path = segment::install(&self.disk, &self.options.dir, &spare, header)?;
        let meta = segment::scan(&path, self.options.record_size_max)?.meta;
        debug_assert_eq!(meta.last_sequence + 1, sequence);
        let active = Active::open(meta, self.disk.clone())?;
        self.prepare_spare();
        Ok(self.active.insert(active))
    }

    /// Starts preallocating the next segment file in the background.
    fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let path = self.options.dir.join(SPARE_NAME);
        let size = self.options.segment_size_bytes;
        let disk = self.disk.clone();
        self.spare = std::thread::Builder::new()
            .name("wal-prealloc".into())
            .spawn(move || {
                yield_to_the_writer();
                disk.preallocate(&path, size).map(|()| path)
            })
            .ok();
    }

    /// The preallocated file, waiting for it if needed (or making it here if
    /// the thread could not start or panicked). Its failure is this roll's.
    fn take_spare(&mut self) -> Result<PathBuf, WalError> {
        match self.spare.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            _ => {
                let path = self.options.dir.join(SPARE_NAME);
                self.disk
                    .preallocate(&path, self.options.segment_size_bytes)?;
                Ok(path)
            }
        }
    }
}

/// Segments taken out of the log, to delete ([`Wal::retire_segments_before`]).
#[must_use = "retired segments stay on disk until removed"]
pub struct Retired {
    dir: PathBuf,
    /// Oldest first; what is left to delete.
    segments: std::collections::VecDeque<SegmentMeta>,
    disk: Disk,
}

impl Retired {
    /// Deletes what is left, oldest first, the directory synced after each
    /// removal, so a crash can only ever leave a contiguous suffix of the log.
    /// An error keeps the rest for another call (a warning, not a failure of
    /// the log). Returns how many were deleted by this call.
    pub fn remove(&mut self) -> Result<usize, WalError> {
        let mut deleted = 0;
        while let Some(oldest) = self.segments.front() {
            self.disk.remove(&oldest.path)?;
            self.segments.pop_front();
            deleted += 1;
            self.disk.sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Segments still to delete.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Appends `later` (retired after these, so newer).
    pub fn extend(&mut self, later: Retired) {
        self.segments.extend(later.segments);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Some(t) = self.spare.take() {
            let _ = t.join();
        }
    }
}

fn replay_data<E, F>(
    data: &[u8],
    path: &Path,
    from: u64,
    payload_max: u32,
    f: &mut F,
) -> Result<u64, E>
where
    F: FnMut(u64, &[u8]) -> Result<(), E>,
    E: From<WalError>,
{
    let mut at = format::SEGMENT_HEADER_LEN;
    let mut visited = 0;
    while at < data.len() {
        match format::read_frame(&data[at..], payload_max) {
            format::Frame::Record {
                sequence,
                payload,
                len,
                ..
            } => {
                if sequence >= from {
                    f(sequence, payload)?;
                    visited += 1;
                }
                at += len;
            }
            // Validated by `open`; a change since then is corruption.
            _ => {
                return Err(WalError::Corrupt {
                    segment: path.to_path_buf(),
                    offset: at as u64,
                    reason: "record changed since open".into(),
                }
                .into())
            }
        }
    }
    Ok(visited)
}

/// Puts the calling (background) thread behind the thread that appends: a
/// lower scheduling priority, and every core the process may use. A thread
/// inherits its spawner's affinity, and the appending thread may be pinned
/// to a core of its own: a preallocation spawned from it then filled 64 MiB
/// with zeros on that very core, and every append and reply waited behind
/// it (writer syscalls at 16 ms apiece, p99 at 30 ms for a second or two
/// after each roll-over). Best effort: a failure leaves the thread as it was.
fn yield_to_the_writer() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread and on the process's main
    // thread; `set` is plain data the kernel fills and reads.
    unsafe {
        // On Linux, PRIO_PROCESS with 0 applies to the calling thread only.
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(libc::getpid(), size, &mut set) == 0 {
            libc::sched_setaffinity(0, size, &set);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod background_tests {
    fn affinity(pid: libc::pid_t) -> Vec<usize> {
        // SAFETY: `set` is plain data the kernel fills.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(pid, size, &mut set), 0);
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
                .collect()
        }
    }

    /// A thread spawned from one pinned to a single core (as the engine's
    /// writer is) leaves that pin and the writer's priority behind.
    #[test]
    fn a_background_thread_leaves_its_spawners_pin() {
        let process = affinity(unsafe { libc::getpid() });
        let pinned_to = *process.last().expect("a core");
        let seen = std::thread::spawn(move || {
            // SAFETY: plain data and a syscall on the calling thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(pinned_to, &mut set);
                let size = std::mem::size_of::<libc::cpu_set_t>();
                assert_eq!(libc::sched_setaffinity(0, size, &set), 0);
            }
            assert_eq!(affinity(0), vec![pinned_to]);
            std::thread::spawn(|| {
                super::yield_to_the_writer();
                // SAFETY: plain syscall on the calling thread.
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                (affinity(0), nice)
            })
            .join()
            .expect("the background thread")
        })
        .join()
        .expect("the pinned thread");
        assert_eq!(seen, (process, 10));
    }
}
