//! What [`crate::Wal::open`] does before the log is usable: list the
//! directory, validate every segment (contiguous sequences, one log id), cut a
//! torn tail of the last segment or refuse corruption, and settle the log's
//! identity (`LOG_ID`). The rules are those of [`crate::format`].

use crate::error::{io, IoOp, WalError};
use crate::format;
use crate::hooks::{Disk, WritePurpose};
use crate::segment::{self, Scan, SegmentMeta};
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub const LOG_ID_NAME: &str = "LOG_ID";
const LOG_ID_TMP_NAME: &str = "LOG_ID.tmp";

/// The validated log, segments oldest first.
pub struct Recovered {
    pub segments: Vec<SegmentMeta>,
    pub log_id: u128,
}

pub fn recover(dir: &Path, payload_max: u32, disk: &Disk) -> Result<Recovered, WalError> {
    let paths = list_segments(dir, disk)?;
    let stored_id = read_log_id(dir)?;
    let mut log_id = stored_id;
    let mut segments: Vec<SegmentMeta> = Vec::with_capacity(paths.len());
    for (i, (named_first, path)) in paths.iter().enumerate() {
        let scan = segment::scan(path, payload_max)?;
        let expected_id = *log_id.get_or_insert(scan.log_id);
        check_place(&scan, *named_first, expected_id, segments.last())?;
        let is_last = i + 1 == paths.len();
        cut_torn_tail(disk, &scan, is_last, payload_max)?;
        segments.push(scan.meta);
    }
    let log_id = match log_id {
        Some(id) => id,
        None => random_log_id()?,
    };
    if stored_id.is_none() {
        write_log_id(disk, dir, log_id)?;
    }
    debug_assert!(segments
        .windows(2)
        .all(|w| w[0].last_sequence + 1 == w[1].first_sequence));
    Ok(Recovered { segments, log_id })
}

/// Segment files sorted by first sequence; removes temporary files left by a
/// crash (a spare or a `LOG_ID` never renamed into place: never used).
fn list_segments(dir: &Path, disk: &Disk) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(IoOp::ReadDir, dir))? {
        let entry = entry.map_err(io(IoOp::ReadDir, dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = segment::parse_segment_name(&name) {
            paths.push((first, entry.path()));
        } else if name.ends_with(".tmp") {
            disk.remove(&entry.path())?;
        }
    }
    paths.sort();
    Ok(paths)
}

/// A segment fits where it is: its name, its log and its predecessor agree.
fn check_place(
    scan: &Scan,
    named_first: u64,
    log_id: u128,
    prev: Option<&SegmentMeta>,
) -> Result<(), WalError> {
    let corrupt = |offset: usize, reason: String| WalError::Corrupt {
        segment: scan.meta.path.clone(),
        offset: offset as u64,
        reason,
    };
    if scan.log_id != log_id {
        return Err(corrupt(
            format::LOG_ID_OFFSET,
            format!(
                "segment belongs to another log {} (this log is {})",
                crate::format_log_id(scan.log_id),
                crate::format_log_id(log_id)
            ),
        ));
    }
    if scan.meta.first_sequence != named_first {
        return Err(corrupt(
            0,
            "header sequence differs from the file name".into(),
        ));
    }
    match prev {
        Some(prev) if scan.meta.first_sequence != prev.last_sequence + 1 => Err(corrupt(
            0,
            format!(
                "sequence gap between segments: the previous one ends at {}, this one starts at {}",
                prev.last_sequence, scan.meta.first_sequence
            ),
        )),
        _ => Ok(()),
    }
}

/// Where a segment's contiguous records end (a bad frame, or zeros that may
/// be a hole), decides between a torn tail, cut here, and corruption (see
/// [`crate::format`]). Only the last segment can be torn, and only by its last
/// sync batch: a valid record of a later batch after the end proves the end
/// was durable data.
fn cut_torn_tail(disk: &Disk, scan: &Scan, is_last: bool, max: u32) -> Result<(), WalError> {
    let path = &scan.meta.path;
    let end = scan.meta.data_end;
    let last_good = scan.meta.last_sequence;
    let what = scan.bad.map_or("a hole (zeros)", |(_, reason)| reason);
    let corrupt = |why: String| WalError::Corrupt {
        segment: path.clone(),
        offset: end as u64,
        reason: format!("{what}, {why}"),
    };
    debug_assert!(scan.bad.is_none_or(|(offset, _)| offset == end));
    if !is_last {
        // Synced before the next segment was installed: durable data.
        let later =
            segment::find_record_after(path, end, usize::MAX, max, |r| r.sequence > last_good)?;
        return match (scan.bad, later) {
            (None, None) => Ok(()),
            (Some(_), _) => Err(corrupt("in a segment followed by another".into())),
            (None, Some(r)) => Err(corrupt(format!(
                "followed at byte {} by record {} in a segment followed by another",
                r.offset, r.sequence
            ))),
        };
    }
    let later_batch =
        |r: &segment::LaterRecord| r.sequence > last_good && r.batch_first > last_good + 1;
    // A later batch starts within one batch's bytes of `end`, and nothing
    // past that was ever written (format: "Sync batch size").
    let window = format::SYNC_BATCH_BYTES_MAX;
    if let Some(r) = segment::find_record_after(path, end, window, max, later_batch)? {
        return Err(corrupt(format!(
            "followed at byte {} by record {} of a later sync batch (from {}): the damaged batch was synced",
            r.offset, r.sequence, r.batch_first
        )));
    }
    let written = window + format::record_len(max as usize);
    segment::zero_from(disk, path, end, written)
}

fn read_log_id(dir: &Path) -> Result<Option<u128>, WalError> {
    let path = dir.join(LOG_ID_NAME);
    match fs::read(&path) {
        Ok(bytes) => match format::parse_log_id_file(&bytes) {
            Some(id) => Ok(Some(id)),
            None => Err(WalError::InvalidLogIdFile {
                path,
                reason: "expected 32 hex digits and a newline".into(),
            }),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(IoOp::Read, path)(e)),
    }
}

/// Writes `LOG_ID` atomically: temporary file, fsync, rename, directory fsync.
fn write_log_id(disk: &Disk, dir: &Path, log_id: u128) -> Result<(), WalError> {
    let tmp = dir.join(LOG_ID_TMP_NAME);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(io(IoOp::Open, &tmp))?;
    let bytes = format::log_id_file(log_id);
    disk.write_at(&file, &tmp, 0, &bytes, WritePurpose::LogId)?;
    disk.sync_all(&file, &tmp)?;
    disk.rename(&tmp, &dir.join(LOG_ID_NAME))?;
    disk.sync_dir(dir)
}

fn random_log_id() -> Result<u128, WalError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(WalError::Random)?;
    Ok(u128::from_le_bytes(bytes))
}
