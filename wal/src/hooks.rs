//! Every I/O step that changes what is on disk goes through [`Disk`], which
//! calls the optional [`IoHooks`] around it: fault injection for tests (fail or
//! "crash" at step N, record what a power loss could undo) without touching
//! the code paths themselves. Reads, opens, mmaps and the lock are not steps:
//! they change nothing a crash could tear.

use crate::error::{IoOp, WalError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Bytes a zero-filling preallocation writes, then writes back, at a time.
const PREALLOCATE_CHUNK_BYTES: usize = 1 << 20;

/// Writes `len` bytes of `file` from `offset` to the disk and waits for
/// them; commits no metadata (the caller's final `fsync` does).
#[cfg(target_os = "linux")]
fn write_back(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain syscall on a file descriptor `file` owns and keeps
    // open for the call; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn write_back(file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    file.sync_data()
}

/// What a [`IoStep::Write`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePurpose {
    /// Framed records of the active segment.
    Records,
    /// The header of a new segment (still the spare's temporary file).
    SegmentHeader,
    /// Zeros over a torn tail, at open.
    ZeroTornTail,
    /// The temporary file that becomes `LOG_ID`.
    LogId,
}

/// One named I/O step of the log.
#[derive(Clone, Copy, Debug)]
pub enum IoStep<'a> {
    /// One `pwrite` of `len` bytes at `offset`.
    Write {
        path: &'a Path,
        offset: u64,
        len: usize,
        purpose: WritePurpose,
    },
    /// `fdatasync` of a file (`fsync` for the `LOG_ID` file).
    DataSync {
        path: &'a Path,
    },
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
    /// `fsync` of the directory: makes renames and removals in it durable.
    DirSync {
        dir: &'a Path,
    },
    Remove {
        path: &'a Path,
    },
    /// Creating the spare segment file: `len` bytes allocated that read as
    /// zeros (`fallocate`, or zeros written), then `fsync`. Runs
    /// on the background preallocation thread (or at a roll-over if that
    /// thread could not be started).
    Preallocate {
        path: &'a Path,
        len: u64,
    },
}

/// Called around every [`IoStep`]. An `Err` from `before` means the step was
/// not done, from `after` that it was; either way the log treats it as the
/// step's own error (as a real `EIO` would be): it poisons an appending log.
pub trait IoHooks: Send + Sync {
    fn before(&self, _step: &IoStep<'_>) -> io::Result<()> {
        Ok(())
    }
    fn after(&self, _step: &IoStep<'_>) -> io::Result<()> {
        Ok(())
    }
}

/// The log's writing side: each method is one [`IoStep`], its error a
/// [`WalError::Io`] naming file, operation and offset.
#[derive(Clone, Default)]
pub struct Disk {
    hooks: Option<Arc<dyn IoHooks>>,
}

impl Disk {
    pub fn new(hooks: Option<Arc<dyn IoHooks>>) -> Disk {
        Disk { hooks }
    }

    fn step<T>(
        &self,
        step: IoStep<'_>,
        (op, path, offset): (IoOp, &Path, Option<u64>),
        run: impl FnOnce() -> io::Result<T>,
    ) -> Result<T, WalError> {
        let before = |step: &IoStep<'_>| self.hooks.as_ref().map_or(Ok(()), |h| h.before(step));
        let after = |step: &IoStep<'_>| self.hooks.as_ref().map_or(Ok(()), |h| h.after(step));
        before(&step)
            .and_then(|()| run())
            .and_then(|out| after(&step).map(|()| out))
            .map_err(|source| WalError::Io {
                op,
                path: path.to_path_buf(),
                offset,
                source,
            })
    }

    pub fn write_at(
        &self,
        file: &File,
        path: &Path,
        offset: u64,
        bytes: &[u8],
        purpose: WritePurpose,
    ) -> Result<(), WalError> {
        let step = IoStep::Write {
            path,
            offset,
            len: bytes.len(),
            purpose,
        };
        self.step(step, (IoOp::Write, path, Some(offset)), || {
            file.write_all_at(bytes, offset)
        })
    }

    pub fn data_sync(&self, file: &File, path: &Path) -> Result<(), WalError> {
        self.step(
            IoStep::DataSync { path },
            (IoOp::DataSync, path, None),
            || file.sync_data(),
        )
    }

    /// `fsync` (data and metadata, for a new file's size), as a `DataSync` step.
    pub fn sync_all(&self, file: &File, path: &Path) -> Result<(), WalError> {
        self.step(
            IoStep::DataSync { path },
            (IoOp::DataSync, path, None),
            || file.sync_all(),
        )
    }

    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), WalError> {
        self.step(
            IoStep::Rename { from, to },
            (IoOp::Rename, to, None),
            || fs::rename(from, to),
        )
    }

    pub fn sync_dir(&self, dir: &Path) -> Result<(), WalError> {
        self.step(IoStep::DirSync { dir }, (IoOp::DirSync, dir, None), || {
            File::open(dir).and_then(|d| d.sync_all())
        })
    }

    pub fn remove(&self, path: &Path) -> Result<(), WalError> {
        self.step(IoStep::Remove { path }, (IoOp::Remove, path, None), || {
            fs::remove_file(path)
        })
    }

    /// Makes a file of `len` bytes that reads as zeros, its blocks allocated,
    /// and syncs it, so later appends never extend the file or allocate.
    ///
    /// `fallocate`: the blocks are reserved and marked unwritten (they read
    /// as zeros); no data is written. The first write into a block converts
    /// its extent, and the `fdatasync` that makes the write durable commits
    /// that conversion with it (it is metadata needed to read the data back).
    /// The file was zero-filled before (a chunk at a time, each written back
    /// before the next): 64 MiB of zeros entered the disk's write cache after
    /// every roll-over, and the active segment's syncs, each a cache flush,
    /// carried them — after a heavy writer on this shared disk, syncs of
    /// 40-90 ms, the first try of every ReserveStream step from 30,000
    /// items/s on failing its p99, where with `fallocate` every step passed
    /// to 181,899 items/s (BENCHMARKS.md, "Preallocation without zeros").
    /// Where `fallocate` is not supported, the file is zero-filled as then.
    pub fn preallocate(&self, path: &Path, len: u64) -> Result<(), WalError> {
        let step = IoStep::Preallocate { path, len };
        self.step(step, (IoOp::Preallocate, path, None), || {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?;
            match allocate(&file, len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Unsupported => zero_fill(&mut file, len)?,
                Err(e) => return Err(e),
            }
            file.sync_all()
        })
    }
}

/// Allocates `len` bytes of `file` from its start, reading as zeros, without
/// writing them. `Unsupported` where the file system (or system) cannot.
#[cfg(target_os = "linux")]
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain syscall on a file descriptor `file` owns and keeps
    // open for the call; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Err(io::ErrorKind::Unsupported.into()),
        _ => Err(error),
    }
}

#[cfg(not(target_os = "linux"))]
fn allocate(_file: &File, _len: u64) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Writes `len` zero bytes a chunk at a time, each written back before the
/// next (`sync_file_range`: data only): written whole and synced once, the
/// file queued tens of megabytes at the disk in one burst.
fn zero_fill(file: &mut File, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; PREALLOCATE_CHUNK_BYTES];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        write_back(file, done, n as u64)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// `len` bytes, every block allocated (appends never allocate), all zeros.
    fn assert_preallocated(path: &Path, len: u64) {
        let meta = fs::metadata(path).unwrap();
        assert_eq!(meta.len(), len);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.blocks() * 512 >= len,
                "{} blocks for {len} bytes",
                meta.blocks()
            );
        }
        let mut bytes = Vec::new();
        File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "reads as zeros");
    }

    #[test]
    fn a_preallocated_file_is_allocated_and_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spare");
        // Over a file that held data: truncated first.
        fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let len = (2 << 20) + 4096;
        Disk::default().preallocate(&path, len).unwrap();
        assert_preallocated(&path, len);
    }

    /// The fallback where `fallocate` is not supported.
    #[test]
    fn zero_filling_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spare");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        let len = PREALLOCATE_CHUNK_BYTES as u64 + 12_345;
        zero_fill(&mut file, len).unwrap();
        file.sync_all().unwrap();
        assert_preallocated(&path, len);
    }

    /// Preallocating writes no data where `fallocate` works (here): the
    /// disk's cache gets no zeros that the active segment's syncs would flush.
    #[cfg(target_os = "linux")]
    #[test]
    fn preallocating_writes_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spare");
        let probe = File::create(dir.path().join("probe")).unwrap();
        if matches!(allocate(&probe, 4096), Err(e) if e.kind() == io::ErrorKind::Unsupported) {
            // A file system without it: zero-filled, tested above.
            eprintln!("skipped: fallocate is not supported here");
            return;
        }
        // Bytes this thread passed to write calls.
        let written = || -> u64 {
            let io = fs::read_to_string("/proc/thread-self/io").unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: "))
                .unwrap()
                .parse()
                .unwrap()
        };
        let len = 8 << 20;
        let before = written();
        Disk::default().preallocate(&path, len).unwrap();
        let during = written() - before;
        assert!(
            during < 1 << 20,
            "{during} bytes written for an 8 MiB spare"
        );
        assert_preallocated(&path, len);
    }
}
