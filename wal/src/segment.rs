//! Segment files: creation (preallocated, reading as zeros, then renamed into place),
//! validation on open, and the writable mapping of the active segment.

use crate::error::{io, IoOp, WalError};
use crate::format::{self, Frame, HeaderError, SegmentHeader, ALIGN, SEGMENT_HEADER_LEN};
use crate::hooks::{Disk, WritePurpose};
use memmap2::Mmap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub fn segment_name(first_sequence: u64) -> String {
    format!("{first_sequence:020}.wal")
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    (digits.len() == 20 && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// Turns a preallocated file into a segment: header, sync, rename, dir sync.
/// The caller has synced every earlier segment (see `format`).
pub fn install(
    disk: &Disk,
    dir: &Path,
    spare: &Path,
    header: SegmentHeader,
) -> Result<PathBuf, WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(spare)
        .map_err(io(IoOp::Open, spare))?;
    let bytes = format::segment_header(header);
    disk.write_at(&file, spare, 0, &bytes, WritePurpose::SegmentHeader)?;
    disk.data_sync(&file, spare)?;
    let path = dir.join(segment_name(header.first_sequence));
    disk.rename(spare, &path)?;
    disk.sync_dir(dir)?;
    Ok(path)
}

/// A closed (or about to be opened) segment as found by the scan.
#[derive(Clone, Debug)]
pub struct SegmentMeta {
    pub path: PathBuf,
    pub first_sequence: u64,
    /// `first_sequence - 1` when empty.
    pub last_sequence: u64,
    /// End of the valid data (offset of the next record).
    pub data_end: usize,
    pub file_len: u64,
}

/// The result of validating one segment.
pub struct Scan {
    pub meta: SegmentMeta,
    pub log_id: u128,
    /// Offset and reason of the first bad frame, if the data did not end cleanly.
    pub bad: Option<(usize, &'static str)>,
}

pub fn map_read(path: &Path) -> Result<Mmap, WalError> {
    let file = File::open(path).map_err(io(IoOp::Open, path))?;
    // SAFETY: the directory is locked by this process (see `Wal::open`); no other
    // process writes the file while it is mapped, and this mapping is read-only.
    unsafe { Mmap::map(&file) }.map_err(io(IoOp::Map, path))
}

/// Validates a segment's header and follows its records while their sequences
/// are contiguous.
pub fn scan(path: &Path, payload_max: u32) -> Result<Scan, WalError> {
    let map = map_read(path)?;
    let header = match format::parse_segment_header(&map) {
        Ok(header) => header,
        Err(HeaderError::UnsupportedVersion(version)) => {
            return Err(WalError::UnsupportedVersion {
                segment: path.to_path_buf(),
                version,
            })
        }
        Err(HeaderError::Invalid(reason)) => {
            return Err(WalError::Corrupt {
                segment: path.to_path_buf(),
                offset: 0,
                reason: format!("invalid segment header: {reason}"),
            })
        }
    };
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = header.first_sequence;
    let bad = loop {
        match format::read_frame(&map[at..], payload_max) {
            Frame::Record { sequence, len, .. } if sequence == next => {
                at += len;
                next += 1;
            }
            Frame::Record { .. } => break Some((at, "sequence out of order")),
            Frame::End => break None,
            Frame::Bad(reason) => break Some((at, reason)),
        }
    };
    debug_assert!(at <= map.len());
    Ok(Scan {
        meta: SegmentMeta {
            path: path.to_path_buf(),
            first_sequence: header.first_sequence,
            last_sequence: next - 1,
            data_end: at,
            file_len: map.len() as u64,
        },
        log_id: header.log_id,
        bad,
    })
}

/// A valid record found after the end of a segment's contiguous records.
#[derive(Clone, Copy, Debug)]
pub struct LaterRecord {
    pub offset: usize,
    pub sequence: u64,
    pub batch_first: u64,
}

/// The first valid record at an aligned offset after `offset` for which
/// `wanted(&record)` holds. Pages of zeros are skipped (no record starts in
/// one), so this reads the rest of the file but decodes only what was written.
pub fn find_record_after(
    path: &Path,
    offset: usize,
    window: usize,
    payload_max: u32,
    wanted: impl Fn(&LaterRecord) -> bool,
) -> Result<Option<LaterRecord>, WalError> {
    let map = map_read(path)?;
    let mut at = offset + ALIGN;
    let last_start = offset.saturating_add(window).min(map.len());
    while at + format::RECORD_HEADER_LEN <= map.len() && at <= last_start {
        let page_end = (at + PAGE).min(map.len());
        if at.is_multiple_of(PAGE) && is_zero(&map[at..page_end]) {
            at = page_end;
            continue;
        }
        if let Frame::Record {
            sequence,
            batch_first,
            ..
        } = format::read_frame(&map[at..], payload_max)
        {
            let record = LaterRecord {
                offset: at,
                sequence,
                batch_first,
            };
            if wanted(&record) {
                return Ok(Some(record));
            }
        }
        at += ALIGN;
    }
    Ok(None)
}

const PAGE: usize = 4096;

/// Whether `bytes` (at most a page) are all zeros; one `memcmp`.
fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; PAGE] = [0; PAGE];
    bytes == &ZEROS[..bytes.len()]
}

/// Zeroes `len` bytes of `path` from `offset` (only the pages that are not
/// zero already; never past its end) and syncs: cuts a torn tail so the next
/// append starts there.
pub fn zero_from(disk: &Disk, path: &Path, offset: usize, len: usize) -> Result<(), WalError> {
    let map = map_read(path)?;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(IoOp::Open, path))?;
    let zeros = [0u8; PAGE];
    let mut wrote = false;
    let mut at = offset;
    let stop = offset.saturating_add(len).min(map.len());
    while at < stop {
        let end = (at + PAGE - at % PAGE).min(map.len());
        if !is_zero(&map[at..end]) {
            let purpose = WritePurpose::ZeroTornTail;
            disk.write_at(&file, path, at as u64, &zeros[..end - at], purpose)?;
            wrote = true;
        }
        at = end;
    }
    if wrote {
        disk.data_sync(&file, path)?;
    }
    debug_assert!(map[offset.min(stop)..stop].iter().all(|b| *b == 0));
    Ok(())
}

/// The segment being appended to.
///
/// Appends are framed into `pending` (memory) and written with one `pwrite` at
/// sync, followed by `fdatasync`; the file is mapped read-only for replay. A
/// writable shared mapping would make every sync write-protect the synced pages
/// again (`page_mkclean`), costing a TLB-shootdown interrupt on every core
/// running the process and a page fault on the next append: measured as the
/// engine thread's largest cost before this change (BENCHMARKS.md).
pub struct Active {
    pub meta: SegmentMeta,
    disk: Disk,
    file: File,
    map: Mmap,
    /// Framed records not yet written to the file, starting at `pending_from`.
    pending: Vec<u8>,
    pending_from: usize,
    /// Bytes written to the file since the last fdatasync.
    unsynced: bool,
}

impl Active {
    pub fn open(meta: SegmentMeta, disk: Disk) -> Result<Active, WalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&meta.path)
            .map_err(io(IoOp::Open, &meta.path))?;
        // SAFETY: as in `map_read`; the file is preallocated, never truncated
        // while mapped, and only this process writes it.
        let map = unsafe { Mmap::map(&file) }.map_err(io(IoOp::Map, &meta.path))?;
        debug_assert_eq!(map.len() as u64, meta.file_len);
        let pending_from = meta.data_end;
        Ok(Active {
            meta,
            disk,
            file,
            map,
            pending: Vec::with_capacity(1 << 20),
            pending_from,
            unsynced: false,
        })
    }

    pub fn room(&self) -> usize {
        self.map.len() - self.meta.data_end
    }

    /// Frames one record of the sync batch that began at `batch_first`.
    pub fn append(&mut self, sequence: u64, batch_first: u64, payload: &[u8]) {
        debug_assert_eq!(sequence, self.meta.last_sequence + 1);
        debug_assert!(self.room() >= format::record_len(payload.len()));
        if self.pending.is_empty() {
            self.pending_from = self.meta.data_end;
        }
        let start = self.pending.len();
        self.pending
            .resize(start + format::record_len(payload.len()), 0);
        let out = &mut self.pending[start..];
        let len = format::write_record(out, sequence, batch_first, payload);
        self.meta.data_end += len;
        self.meta.last_sequence = sequence;
        debug_assert_eq!(self.pending_from + self.pending.len(), self.meta.data_end);
    }

    /// Bytes appended since the last sync (all still in `pending`: records
    /// are written only by a sync or a roll-over, which syncs too).
    pub fn unsynced_bytes(&self) -> usize {
        debug_assert!(!self.unsynced);
        self.pending.len()
    }

    pub fn is_dirty(&self) -> bool {
        !self.pending.is_empty() || self.unsynced
    }

    /// Writes the pending records (one pwrite) without syncing.
    pub fn write(&mut self) -> Result<(), WalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (path, offset) = (&self.meta.path, self.pending_from as u64);
        let purpose = WritePurpose::Records;
        self.disk
            .write_at(&self.file, path, offset, &self.pending, purpose)?;
        self.pending.clear();
        self.pending_from = self.meta.data_end;
        self.unsynced = true;
        Ok(())
    }

    /// Writes what is pending, then one fdatasync.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.write()?;
        if self.unsynced {
            self.disk.data_sync(&self.file, &self.meta.path)?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The written data (for replay at open, when nothing is pending).
    pub fn data(&self) -> &[u8] {
        debug_assert!(self.pending.is_empty());
        &self.map[..self.meta.data_end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(segment_name(42), "00000000000000000042.wal");
        assert_eq!(parse_segment_name("00000000000000000042.wal"), Some(42));
        assert_eq!(parse_segment_name("42.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000042.tmp"), None);
    }
}
