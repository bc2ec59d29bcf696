//! The disk's fdatasync latency: what one group commit costs at least.

use crate::Recorder;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes 4 KiB and fdatasyncs, `count` times, into a file in `dir`.
pub fn run(dir: &Path, count: u64) -> std::io::Result<serde_json::Value> {
    let path = dir.join("sync-probe.dat");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let recorder = Recorder::default();
    let started = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        recorder
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        recorder.record(crate::Class::Ok, t.elapsed());
    }
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok(recorder.summary("sync-probe", 0.0, elapsed.max(Duration::from_nanos(1))))
}
