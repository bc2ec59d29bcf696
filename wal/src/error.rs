//! Typed errors. Corruption names the segment file and the byte offset.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt write-ahead log: {segment} at byte {offset}: {reason}")]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{0}: locked by another process")]
    Locked(PathBuf),
    #[error("append of sequence {got}, expected {expected}")]
    SequenceGap { expected: u64, got: u64 },
    #[error("record of {len} bytes is over the limit of {max}")]
    RecordTooLarge { len: usize, max: u32 },
    #[error("empty records are not allowed")]
    EmptyRecord,
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WalError {
    let path = path.into();
    move |source| WalError::Io { path, source }
}
