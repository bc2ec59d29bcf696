//! Shared by the wal crate's tests.

use std::path::Path;

/// fsync-free scratch space when there is one (tmpfs): the tests model power
/// loss themselves, and real fsyncs would make the suite slow.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}
