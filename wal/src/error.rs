//! Typed errors. Corruption names the segment file and the byte offset; an I/O
//! failure names the file, the operation, the offset where there is one and
//! the OS error.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{op} of {path}{}: {source}", at(*.offset))]
    Io {
        op: IoOp,
        path: PathBuf,
        /// Byte offset of a write; `None` for operations on a whole file.
        offset: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    /// An earlier write, sync, rename or directory sync of `append`/`sync`
    /// failed: what reached the disk is unknown, so nothing more is accepted.
    /// Reopen the log to recover what is durable.
    #[error("write-ahead log unusable after an earlier failure ({cause}); reopen it to recover")]
    Poisoned {
        #[source]
        cause: Arc<WalError>,
    },
    #[error("corrupt write-ahead log: {segment} at byte {offset}: {reason}")]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "{segment}: unsupported WAL format version {version} (this build reads version {})",
        crate::format::VERSION
    )]
    UnsupportedVersion { segment: PathBuf, version: u32 },
    #[error("{path}: invalid log id file: {reason}")]
    InvalidLogIdFile { path: PathBuf, reason: String },
    #[error("could not draw a random log id: {0}")]
    Random(#[source] getrandom::Error),
    #[error("{0}: locked by another process")]
    Locked(PathBuf),
    #[error("append of sequence {got}, expected {expected}")]
    SequenceGap { expected: u64, got: u64 },
    #[error("record of {len} bytes is over the limit of {max}")]
    RecordTooLarge { len: usize, max: u32 },
    #[error("empty records are not allowed")]
    EmptyRecord,
}

/// The operation of a [`WalError::Io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Open,
    Read,
    Map,
    ReadDir,
    CreateDir,
    Write,
    DataSync,
    Rename,
    DirSync,
    Remove,
    Preallocate,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Map => "mmap",
            IoOp::ReadDir => "listing",
            IoOp::CreateDir => "creating directory",
            IoOp::Write => "write",
            IoOp::DataSync => "fdatasync",
            IoOp::Rename => "rename",
            IoOp::DirSync => "fsync of directory",
            IoOp::Remove => "removal",
            IoOp::Preallocate => "preallocation",
        })
    }
}

fn at(offset: Option<u64>) -> String {
    offset.map_or_else(String::new, |o| format!(" at byte {o}"))
}

impl WalError {
    /// A copy to keep as the cause of poisoning (`std::io::Error` is not
    /// `Clone`; the OS error code and message survive).
    pub(crate) fn duplicate(&self) -> WalError {
        match self {
            WalError::Io {
                op,
                path,
                offset,
                source,
            } => WalError::Io {
                op: *op,
                path: path.clone(),
                offset: *offset,
                source: match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            WalError::Poisoned { cause } => WalError::Poisoned {
                cause: cause.clone(),
            },
            WalError::Corrupt {
                segment,
                offset,
                reason,
            } => WalError::Corrupt {
                segment: segment.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            WalError::UnsupportedVersion { segment, version } => WalError::UnsupportedVersion {
                segment: segment.clone(),
                version: *version,
            },
            WalError::InvalidLogIdFile { path, reason } => WalError::InvalidLogIdFile {
                path: path.clone(),
                reason: reason.clone(),
            },
            WalError::Random(e) => WalError::Random(*e),
            WalError::Locked(path) => WalError::Locked(path.clone()),
            WalError::SequenceGap { expected, got } => WalError::SequenceGap {
                expected: *expected,
                got: *got,
            },
            WalError::RecordTooLarge { len, max } => WalError::RecordTooLarge {
                len: *len,
                max: *max,
            },
            WalError::EmptyRecord => WalError::EmptyRecord,
        }
    }
}

/// Maps an `std::io::Error` of operation `op` on `path` (no offset).
pub(crate) fn io(op: IoOp, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WalError {
    let path = path.into();
    move |source| WalError::Io {
        op,
        path,
        offset: None,
        source,
    }
}
