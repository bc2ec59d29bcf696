//! Segment files: creation (preallocated, zero-filled, then renamed into place),
//! validation on open, and the writable mapping of the active segment.

use crate::error::{io, WalError};
use crate::format::{self, Frame, ALIGN, SEGMENT_HEADER_LEN};
use memmap2::{Mmap, MmapMut};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn segment_name(first_sequence: u64) -> String {
    format!("{first_sequence:020}.wal")
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    (digits.len() == 20 && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// Writes a zero-filled file of `size` bytes and syncs it, so later appends
/// write into allocated blocks and a data sync does not commit metadata.
pub fn preallocate(path: &Path, size: u64) -> Result<(), WalError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(io(path))?;
        left -= n as u64;
    }
    file.sync_all().map_err(io(path))
}

pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Turns a preallocated file into segment `first_sequence`: header, sync, rename, dir sync.
pub fn install(dir: &Path, spare: &Path, first_sequence: u64) -> Result<PathBuf, WalError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(spare)
        .map_err(io(spare))?;
    file.write_all(&format::segment_header(first_sequence))
        .map_err(io(spare))?;
    file.sync_data().map_err(io(spare))?;
    let path = dir.join(segment_name(first_sequence));
    fs::rename(spare, &path).map_err(io(&path))?;
    sync_dir(dir)?;
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
    /// Offset and reason of the first bad frame, if the data did not end cleanly.
    pub bad: Option<(usize, &'static str)>,
}

pub fn map_read(path: &Path) -> Result<Mmap, WalError> {
    let file = File::open(path).map_err(io(path))?;
    // SAFETY: the directory is locked by this process (see `Wal::open`); no other
    // process writes the file while it is mapped, and this mapping is read-only.
    unsafe { Mmap::map(&file) }.map_err(io(path))
}

/// Validates a segment's header and records, `expected_first` being the sequence
/// its first record must carry (`None` for the first segment).
pub fn scan(path: &Path, payload_max: u32) -> Result<Scan, WalError> {
    let map = map_read(path)?;
    let Some(first_sequence) = format::parse_segment_header(&map) else {
        return Err(WalError::Corrupt {
            segment: path.to_path_buf(),
            offset: 0,
            reason: "invalid segment header".into(),
        });
    };
    let mut at = SEGMENT_HEADER_LEN;
    let mut next = first_sequence;
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
    Ok(Scan {
        meta: SegmentMeta {
            path: path.to_path_buf(),
            first_sequence,
            last_sequence: next - 1,
            data_end: at,
            file_len: map.len() as u64,
        },
        bad,
    })
}

/// Whether a valid record with a sequence in `[from, from + window)` exists at
/// any aligned offset of `path` after `offset`: the test between a torn tail
/// (nothing valid follows) and corruption in the middle of the log.
pub fn valid_record_after(
    path: &Path,
    offset: usize,
    from: u64,
    payload_max: u32,
) -> Result<bool, WalError> {
    const WINDOW: u64 = 1 << 24;
    let map = map_read(path)?;
    let mut at = offset + ALIGN;
    while at + format::RECORD_HEADER_LEN <= map.len() {
        if let Frame::Record { sequence, .. } = format::read_frame(&map[at..], payload_max) {
            if sequence >= from && sequence < from + WINDOW {
                return Ok(true);
            }
        }
        at += ALIGN;
    }
    Ok(false)
}

/// Zeroes `path` from `offset` to its end (only the pages that are not zero
/// already) and syncs: cuts a torn tail so the next append starts there.
pub fn zero_from(path: &Path, offset: usize) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    // SAFETY: as in `map_read`; this process holds the directory lock.
    let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io(path))?;
    let mut at = offset;
    while at < map.len() {
        let end = (at + 4096 - at % 4096).min(map.len());
        if map[at..end].iter().any(|b| *b != 0) {
            map[at..end].fill(0);
        }
        at = end;
    }
    map.flush().map_err(io(path))
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
    file: File,
    map: Mmap,
    /// Framed records not yet written to the file, starting at `pending_from`.
    pending: Vec<u8>,
    pending_from: usize,
    /// Bytes written to the file since the last fdatasync.
    unsynced: bool,
}

impl Active {
    pub fn open(meta: SegmentMeta) -> Result<Active, WalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&meta.path)
            .map_err(io(&meta.path))?;
        // SAFETY: as in `map_read`; the file is preallocated, never truncated
        // while mapped, and only this process writes it.
        let map = unsafe { Mmap::map(&file) }.map_err(io(&meta.path))?;
        debug_assert_eq!(map.len() as u64, meta.file_len);
        let pending_from = meta.data_end;
        Ok(Active {
            meta,
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

    pub fn append(&mut self, sequence: u64, payload: &[u8]) {
        debug_assert_eq!(sequence, self.meta.last_sequence + 1);
        debug_assert!(self.room() >= format::record_len(payload.len()));
        if self.pending.is_empty() {
            self.pending_from = self.meta.data_end;
        }
        let start = self.pending.len();
        self.pending
            .resize(start + format::record_len(payload.len()), 0);
        let len = format::write_record(&mut self.pending[start..], sequence, payload);
        self.meta.data_end += len;
        self.meta.last_sequence = sequence;
        debug_assert_eq!(self.pending_from + self.pending.len(), self.meta.data_end);
    }

    pub fn is_dirty(&self) -> bool {
        !self.pending.is_empty() || self.unsynced
    }

    /// Writes the pending records (one pwrite) without syncing.
    pub fn write(&mut self) -> Result<(), WalError> {
        use std::os::unix::fs::FileExt;
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.pending, self.pending_from as u64)
            .map_err(io(&self.meta.path))?;
        self.pending.clear();
        self.pending_from = self.meta.data_end;
        self.unsynced = true;
        Ok(())
    }

    /// Writes what is pending, then one fdatasync.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.write()?;
        if self.unsynced {
            self.file.sync_data().map_err(io(&self.meta.path))?;
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
