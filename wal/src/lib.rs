//! # wal: the account service's write-ahead log
//!
//! An append-only log of opaque records, each with a contiguous sequence
//! number, in mmap'd, preallocated segment files (format: [`format`]).
//!
//! * **Group commit.** [`Wal::append`] frames a record into a reused buffer (no
//!   system call, no allocation); [`Wal::sync`] writes the batch with one
//!   `pwrite` and makes it durable with one `fdatasync`. The caller appends a
//!   whole batch, then syncs once. Segments are read through read-only `mmap`s
//!   (replay hands out slices of the mapping); they are not written through a
//!   mapping because `msync` of a writable shared mapping write-protects the
//!   synced pages again, with a TLB-shootdown interrupt on every core of the
//!   process per sync (see `segment::Active`).
//! * **Recovery.** [`Wal::open`] validates every segment. A torn or corrupt tail
//!   (bad length or CRC, then nothing valid after it) is cut off at the last good
//!   record. A bad record followed by a valid one is never skipped: it is a hard
//!   [`WalError::Corrupt`] naming the segment and offset.
//! * **Roll-over.** A record that does not fit starts a new segment. The next
//!   segment file is preallocated (zero-filled, synced) by a background thread
//!   ahead of time, so a roll-over costs a rename, not 64 MiB of writes.
//! * **Retention.** [`Wal::delete_segments_before`] removes segments wholly
//!   covered by a snapshot; never the active one.
//! * **One process.** The directory is locked (`LOCK`, an advisory file lock)
//!   for the life of the [`Wal`].
//!
//! Limits: records are 1 byte .. `record_size_max` (default 1 MiB); a segment
//! must hold at least one record of the maximum size.
//!
//! Known limits: records appended but not yet synced live in memory, so a
//! crash loses them (they were never acknowledged in `--durability sync`; in
//! `async` this is the documented loss window). After a power loss, pages of
//! the last unsynced write may reach the disk in any order, leaving a hole
//! followed by valid records of that (never acknowledged) batch; `open`
//! reports that as corruption rather than guess.

mod error;
pub mod format;
mod segment;

pub use error::WalError;

use error::io;
use segment::{Active, SegmentMeta};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[derive(Clone, Debug)]
pub struct WalOptions {
    pub dir: PathBuf,
    /// Size of each segment file, preallocated. Default 64 MiB.
    pub segment_size_bytes: u64,
    /// Largest payload accepted, in bytes. Default 1 MiB.
    pub record_size_max: u32,
}

impl WalOptions {
    pub fn new(dir: impl Into<PathBuf>) -> WalOptions {
        WalOptions {
            dir: dir.into(),
            segment_size_bytes: 64 * 1024 * 1024,
            record_size_max: 1024 * 1024,
        }
    }
}

const SPARE_NAME: &str = "next-segment.spare";

pub struct Wal {
    options: WalOptions,
    /// Closed segments, oldest first.
    closed: Vec<SegmentMeta>,
    active: Option<Active>,
    last_sequence: u64,
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
        let dir = options.dir.clone();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.try_lock().map_err(|_| WalError::Locked(dir.clone()))?;

        let mut paths = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = segment::parse_segment_name(&name) {
                paths.push((first, entry.path()));
            } else if name.ends_with(".tmp") {
                // A segment whose creation did not finish: never renamed, never used.
                fs::remove_file(entry.path()).map_err(io(entry.path()))?;
            }
        }
        paths.sort();

        let mut metas: Vec<SegmentMeta> = Vec::with_capacity(paths.len());
        for (i, (named_first, path)) in paths.iter().enumerate() {
            let scan = segment::scan(path, options.record_size_max)?;
            let corrupt = |offset: usize, reason: &str| WalError::Corrupt {
                segment: path.clone(),
                offset: offset as u64,
                reason: reason.to_string(),
            };
            if scan.meta.first_sequence != *named_first {
                return Err(corrupt(0, "header sequence differs from the file name"));
            }
            if let Some(prev) = metas.last() {
                if scan.meta.first_sequence != prev.last_sequence + 1 {
                    return Err(corrupt(0, "sequence gap between segments"));
                }
            }
            if let Some((offset, reason)) = scan.bad {
                let is_last = i + 1 == paths.len();
                let next = scan.meta.last_sequence + 1;
                let valid_after =
                    segment::valid_record_after(path, offset, next, options.record_size_max)?;
                if !is_last || valid_after {
                    return Err(corrupt(offset, reason));
                }
                // A torn tail: cut it off.
                segment::zero_from(path, offset)?;
            }
            metas.push(scan.meta);
        }

        let last_sequence = metas.last().map_or(0, |m| m.last_sequence);
        let active = match metas.pop() {
            Some(meta) => Some(Active::open(meta)?),
            None => None,
        };
        let mut wal = Wal {
            options,
            closed: metas,
            active,
            last_sequence,
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
        let continues = self
            .active
            .as_ref()
            .is_some_and(|a| a.room() >= needed && a.meta.last_sequence + 1 == sequence);
        let active = match self.active.as_mut() {
            Some(active) if continues => active,
            _ => self.roll(sequence)?,
        };
        active.append(sequence, payload);
        debug_assert_eq!(active.meta.last_sequence, sequence);
        self.last_sequence = sequence;
        Ok(())
    }

    /// Makes every appended record durable: one pwrite and one fdatasync (a
    /// segment closed since the last sync was synced by the roll-over).
    pub fn sync(&mut self) -> Result<(), WalError> {
        if let Some(active) = self.active.as_mut() {
            active.sync()?;
        }
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

    /// Deletes closed segments whose records all have a sequence below
    /// `sequence` (never the active segment). Returns how many were deleted.
    pub fn delete_segments_before(&mut self, sequence: u64) -> Result<usize, WalError> {
        let keep_from = self
            .closed
            .iter()
            .position(|m| m.last_sequence >= sequence)
            .unwrap_or(self.closed.len());
        for meta in &self.closed[..keep_from] {
            fs::remove_file(&meta.path).map_err(io(&meta.path))?;
        }
        self.closed.drain(..keep_from);
        if keep_from > 0 {
            segment::sync_dir(&self.options.dir)?;
        }
        Ok(keep_from)
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

    /// Closes the active segment and starts one whose first record is `sequence`.
    ///
    /// Order (see [`format`]): the old segment's pending tail is written and
    /// synced *before* the next segment exists, so no crash can leave a segment
    /// that is followed by another one but misses its own last records.
    fn roll(&mut self, sequence: u64) -> Result<&mut Active, WalError> {
        if let Some(mut old) = self.active.take() {
            if old.meta.last_sequence >= old.meta.first_sequence {
                old.sync()?;
                self.closed.push(old.meta.clone());
            } else {
                // Holds no record (cut back to its header, or the log restarts
                // after a snapshot): replaced, not kept. The removal is made
                // durable before the next segment appears, so the two can
                // never be found together (a sequence gap).
                let path = old.meta.path.clone();
                drop(old);
                fs::remove_file(&path).map_err(io(&path))?;
                segment::sync_dir(&self.options.dir)?;
            }
        }
        let spare = self.take_spare()?;
        let path = segment::install(&self.options.dir, &spare, sequence)?;
        let meta = segment::scan(&path, self.options.record_size_max)?.meta;
        debug_assert_eq!(meta.last_sequence + 1, sequence);
        let active = Active::open(meta)?;
        self.prepare_spare();
        Ok(self.active.insert(active))
    }

    /// Starts preallocating the next segment file in the background.
    fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let path = self.options.dir.join(SPARE_NAME).with_extension("tmp");
        let size = self.options.segment_size_bytes;
        self.spare = std::thread::Builder::new()
            .name("wal-prealloc".into())
            .spawn(move || segment::preallocate(&path, size).map(|_| path))
            .ok();
    }

    /// The preallocated file, waiting for it if needed (or making it here).
    fn take_spare(&mut self) -> Result<PathBuf, WalError> {
        match self.spare.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            _ => {
                let path = self.options.dir.join(SPARE_NAME).with_extension("tmp");
                segment::preallocate(&path, self.options.segment_size_bytes)?;
                Ok(path)
            }
        }
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
