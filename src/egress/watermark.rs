//! The outbox watermark file: `<data-dir>/outbox.watermark`.
//!
//! ```text
//! +----------------+-----------------+------------------------------+
//! | magic 8 bytes  | watermark u64LE | xxh3-64 of the first 16 bytes|
//! | "ACCTOBOX"     |                 | u64 LE                       |
//! +----------------+-----------------+------------------------------+
//! ```
//!
//! Meaning: every outbox record (account event or dead letter) derived from a
//! command with `sequence <= watermark` has been acknowledged by the broker.
//! Written to a temporary file, fsync'd, renamed over the old one and the
//! directory fsync'd, so a crash leaves the old value or the new one, never a
//! torn mix. A file that is there but does not check out is an error, not a
//! guess: publishing from a wrong watermark would lose or flood events.
//! A missing file is watermark 0: everything in the WAL is (re)published.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"ACCTOBOX";
const FILE_NAME: &str = "outbox.watermark";
const LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a valid outbox watermark file (bad length, magic or checksum)")]
    Corrupt(PathBuf),
}

pub struct WatermarkFile {
    path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
}

impl WatermarkFile {
    pub fn new(data_dir: &Path) -> WatermarkFile {
        WatermarkFile {
            path: data_dir.join(FILE_NAME),
            tmp: data_dir.join(format!("{FILE_NAME}.tmp")),
            dir: data_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored watermark; 0 if there is no file yet.
    pub fn load(&self) -> Result<u64, WatermarkError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(self.io(&self.path, source)),
        };
        decode(&bytes).ok_or_else(|| WatermarkError::Corrupt(self.path.clone()))
    }

    /// Durably replaces the stored watermark.
    pub fn store(&self, watermark: u64) -> Result<(), WatermarkError> {
        fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let mut f = File::create(&self.tmp).map_err(|e| self.io(&self.tmp, e))?;
        f.write_all(&encode(watermark))
            .and_then(|()| f.sync_all())
            .map_err(|e| self.io(&self.tmp, e))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(|e| self.io(&self.path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(&self.dir, e))
    }

    fn io(&self, path: &Path, source: std::io::Error) -> WatermarkError {
        WatermarkError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn encode(watermark: u64) -> [u8; LEN] {
    let mut out = [0; LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&watermark.to_le_bytes());
    let check = xxhash_rust::xxh3::xxh3_64(&out[..16]);
    out[16..].copy_from_slice(&check.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != LEN || &bytes[..8] != MAGIC {
        return None;
    }
    let check = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    if check != xxhash_rust::xxh3::xxh3_64(&bytes[..16]) {
        return None;
    }
    Some(u64::from_le_bytes(bytes[8..16].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = WatermarkFile::new(dir.path());
        assert_eq!(file.load().unwrap(), 0, "no file yet");
        file.store(42).unwrap();
        assert_eq!(file.load().unwrap(), 42);
        file.store(u64::MAX - 1).unwrap();
        assert_eq!(file.load().unwrap(), u64::MAX - 1);
        let mut bytes = fs::read(file.path()).unwrap();
        bytes[9] ^= 1;
        fs::write(file.path(), &bytes).unwrap();
        assert!(matches!(file.load(), Err(WatermarkError::Corrupt(_))));
        fs::write(file.path(), &bytes[..10]).unwrap();
        assert!(matches!(file.load(), Err(WatermarkError::Corrupt(_))));
    }
}
