//! Reading a live log from another thread: the records of a range that is
//! already durable, while the writer goes on appending after it.
//!
//! A [`Reader`] holds only the directory and the record size limit: it lists
//! the segments on each read, so segments created or retired since are seen
//! as they are. Only records at or below a sequence the caller knows to be
//! synced may be asked for; the writer never touches those again, and
//! retention deletes only segments wholly below what the caller has made
//! durable elsewhere (a snapshot), never the range being read.

use crate::error::{io, IoOp, WalError};
use crate::format::{self, Frame};
use crate::segment;
use std::path::PathBuf;

/// A read-only view of a log directory, for another thread.
#[derive(Clone, Debug)]
pub struct Reader {
    dir: PathBuf,
    payload_max: u32,
}

impl Reader {
    pub(crate) fn new(dir: PathBuf, payload_max: u32) -> Reader {
        Reader { dir, payload_max }
    }

    /// Calls `f(sequence, payload)` for every record of `from..=through`, in
    /// order; stops at the first error of `f`. Every one of those records
    /// must be on disk: a missing one (retired, or never synced) is
    /// [`WalError::Corrupt`], never a silent gap.
    pub fn read<E, F>(&self, from: u64, through: u64, mut f: F) -> Result<u64, E>
    where
        F: FnMut(u64, &[u8]) -> Result<(), E>,
        E: From<WalError>,
    {
        if through < from {
            return Ok(0);
        }
        let mut firsts = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io(IoOp::ReadDir, &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io(IoOp::ReadDir, &self.dir))?;
            if let Some(first) = entry
                .file_name()
                .to_str()
                .and_then(segment::parse_segment_name)
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        // The segment holding `from`, and every later one up to `through`.
        let start = firsts
            .partition_point(|&first| first <= from)
            .saturating_sub(1);
        let mut next = from;
        for &first in firsts[start..]
            .iter()
            .take_while(|&&first| first <= through)
        {
            let path = self.dir.join(segment::segment_name(first));
            let map = segment::map_read(&path)?;
            let corrupt = |offset: usize, reason: &str| WalError::Corrupt {
                segment: path.clone(),
                offset: offset as u64,
                reason: reason.into(),
            };
            let mut at = format::SEGMENT_HEADER_LEN;
            while next <= through && at < map.len() {
                match format::read_frame(&map[at..], self.payload_max) {
                    Frame::Record {
                        sequence,
                        payload,
                        len,
                        ..
                    } => {
                        if sequence > next {
                            return Err(corrupt(at, "a record of the range is missing").into());
                        }
                        if sequence == next {
                            f(sequence, payload)?;
                            next += 1;
                        }
                        at += len;
                    }
                    // The end of this segment's records: the next one goes on.
                    Frame::End => break,
                    Frame::Bad(reason) => return Err(corrupt(at, reason).into()),
                }
            }
            if next > through {
                break;
            }
        }
        if next <= through {
            return Err(WalError::Corrupt {
                segment: self.dir.clone(),
                offset: 0,
                reason: format!("records {next}..={through} are not in the log"),
            }
            .into());
        }
        Ok(through - from + 1)
    }
}
