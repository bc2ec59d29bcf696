//! Write-ahead log behaviour: round trips across roll-overs, torn tails cut at
//! every byte, corruption in the middle refused with segment and offset.

mod common;

use std::fs;
use std::path::Path;
use wal::format::SEGMENT_HEADER_LEN;
use wal::{Wal, WalError, WalOptions};

fn options(dir: &Path) -> WalOptions {
    WalOptions {
        segment_size_bytes: 4096,
        record_size_max: 512,
        ..WalOptions::new(dir)
    }
}

fn payload(seq: u64) -> Vec<u8> {
    let len = 1 + (seq * 37 % 200) as usize;
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

fn write(dir: &Path, from: u64, to: u64) {
    let mut wal = Wal::open(options(dir)).unwrap();
    for seq in from..=to {
        wal.append(seq, &payload(seq)).unwrap();
        if seq % 7 == 0 {
            wal.sync().unwrap();
        }
    }
    wal.sync().unwrap();
}

fn read_all(wal: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    wal.replay(from, |seq, p| {
        out.push((seq, p.to_vec()));
        Ok::<(), WalError>(())
    })
    .unwrap();
    out
}

use common::segments;

/// Copies the template's `LOG_ID` (segments are copied one by one).
fn copy_log_id(from: &Path, to: &Path) {
    fs::copy(from.join("LOG_ID"), to.join("LOG_ID")).unwrap();
}

fn check_prefix(records: &[(u64, Vec<u8>)]) {
    for (i, (seq, p)) in records.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(p, &payload(*seq), "record {seq} content");
    }
}

#[test]
fn round_trip_across_roll_overs() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 300);
    assert!(segments(dir.path()).len() > 5, "rolled over");
    let wal = Wal::open(options(dir.path())).unwrap();
    assert_eq!(wal.last_sequence(), 300);
    assert_eq!(wal.first_sequence(), Some(1));
    let all = read_all(&wal, 1);
    assert_eq!(all.len(), 300);
    check_prefix(&all);
    let tail = read_all(&wal, 250);
    assert_eq!(tail.first().map(|r| r.0), Some(250));
    assert_eq!(tail.len(), 51);
    drop(wal);
    write(dir.path(), 301, 320);
    let wal = Wal::open(options(dir.path())).unwrap();
    assert_eq!(read_all(&wal, 1).len(), 320);
}

#[test]
fn appends_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::open(options(dir.path())).unwrap();
    wal.append(1, b"a").unwrap();
    assert!(matches!(
        wal.append(3, b"b"),
        Err(WalError::SequenceGap {
            expected: 2,
            got: 3
        })
    ));
    assert!(matches!(
        wal.append(2, &[0; 513]),
        Err(WalError::RecordTooLarge { .. })
    ));
    assert!(matches!(wal.append(2, b""), Err(WalError::EmptyRecord)));
    wal.append(2, b"b").unwrap();
}

#[test]
fn an_empty_log_starts_at_any_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::open(options(dir.path())).unwrap();
    wal.append(1_000, b"after a snapshot").unwrap();
    wal.sync().unwrap();
    drop(wal);
    let wal = Wal::open(options(dir.path())).unwrap();
    assert_eq!(
        (wal.first_sequence(), wal.last_sequence()),
        (Some(1_000), 1_000)
    );
}

#[test]
fn second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = Wal::open(options(dir.path())).unwrap();
    assert!(matches!(
        Wal::open(options(dir.path())),
        Err(WalError::Locked(_))
    ));
}

/// Cuts the log at every byte of its last segment, both by zeroing from the cut
/// (preallocated space) and by truncating the file: open keeps exactly the
/// records wholly before the cut, and appends continue after it.
#[test]
fn torn_tail_is_cut_at_every_offset() {
    let template = tempfile::tempdir().unwrap();
    write(template.path(), 1, 40);
    let segs = segments(template.path());
    assert_eq!(
        segs.len(),
        2,
        "two segments: the tail test spans a roll-over"
    );
    let last = segs.last().unwrap();
    let original = fs::read(last).unwrap();
    let data_end = {
        let wal = Wal::open(options(template.path())).unwrap();
        let n = read_all(&wal, 1).len();
        assert_eq!(n, 40);
        // End of the written data in the last segment.
        original.iter().rposition(|b| *b != 0).unwrap() + 1
    };
    for cut in 0..=data_end {
        for truncate in [false, true] {
            // About 1,000 opens, each with its syncs: tmpfs keeps it I/O-free.
            let dir = common::scratch();
            for s in &segs {
                fs::copy(s, dir.path().join(s.file_name().unwrap())).unwrap();
            }
            copy_log_id(template.path(), dir.path());
            let target = dir.path().join(last.file_name().unwrap());
            let mut bytes = original.clone();
            if truncate {
                bytes.truncate(cut);
            } else {
                bytes[cut..].fill(0);
            }
            fs::write(&target, &bytes).unwrap();
            match Wal::open(options(dir.path())) {
                Ok(mut wal) => {
                    let records = read_all(&wal, 1);
                    check_prefix(&records);
                    let next = wal.last_sequence() + 1;
                    wal.append(next, &payload(next)).unwrap();
                    wal.sync().unwrap();
                    drop(wal);
                    let wal = Wal::open(options(dir.path())).unwrap();
                    let again = read_all(&wal, 1);
                    assert_eq!(again.len() as u64, next, "cut {cut} truncate {truncate}");
                    check_prefix(&again);
                }
                // A cut inside the segment header of the last segment.
                Err(WalError::Corrupt { offset: 0, .. }) => {
                    assert!(cut < SEGMENT_HEADER_LEN, "cut {cut}")
                }
                Err(e) => panic!("cut {cut} truncate {truncate}: {e}"),
            }
        }
    }
}

/// Flips one byte at every offset of a one-segment log of one-record sync
/// batches: open either returns a prefix of the records or a Corrupt error
/// naming the segment and the offset of the damaged record; never a record
/// with wrong content. (Within one sync batch, damage followed by records of
/// the same batch is a torn tail: `crash_points.rs`.)
#[test]
fn flipped_byte_at_every_offset() {
    let template = tempfile::tempdir().unwrap();
    let mut opts = options(template.path());
    opts.segment_size_bytes = 16 * 1024;
    {
        let mut wal = Wal::open(opts.clone()).unwrap();
        for seq in 1..=20 {
            wal.append(seq, &payload(seq)).unwrap();
            wal.sync().unwrap();
        }
    }
    let seg = segments(template.path()).remove(0);
    let original = fs::read(&seg).unwrap();
    let data_end = original.iter().rposition(|b| *b != 0).unwrap() + 1;
    // Start offsets of the records.
    let mut starts = vec![];
    let mut at = SEGMENT_HEADER_LEN;
    for seq in 1..=20u64 {
        starts.push(at);
        at += wal::format::record_len(payload(seq).len());
    }
    for offset in 0..data_end {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = original.clone();
        bytes[offset] ^= 0x5a;
        let target = dir.path().join(seg.file_name().unwrap());
        fs::write(&target, &bytes).unwrap();
        copy_log_id(template.path(), dir.path());
        let mut o = opts.clone();
        o.dir = dir.path().to_path_buf();
        match Wal::open(o) {
            Ok(wal) => {
                let records = read_all(&wal, 1);
                check_prefix(&records);
                // Only damage to the last record can look like a torn tail.
                assert!(
                    records.len() == 20 || offset >= starts[19],
                    "offset {offset} silently dropped records"
                );
                assert!(
                    records.len() == 19,
                    "offset {offset}: damage went unnoticed"
                );
            }
            Err(WalError::Corrupt {
                segment,
                offset: at,
                ..
            }) => {
                assert_eq!(segment, target);
                let record = starts.iter().rposition(|s| *s <= offset);
                match record {
                    Some(i) => assert_eq!(at as usize, starts[i], "offset {offset}"),
                    None => assert_eq!(at, 0, "header damage at {offset}"),
                }
            }
            Err(e) => panic!("offset {offset}: {e}"),
        }
    }
}

#[test]
fn corruption_in_a_closed_segment_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 100);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let victim = &segs[1];
    let mut bytes = fs::read(victim).unwrap();
    bytes[SEGMENT_HEADER_LEN + 30] ^= 1; // inside the first record's payload
    fs::write(victim, &bytes).unwrap();
    match Wal::open(options(dir.path())) {
        Err(WalError::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(&segment, victim);
            assert_eq!(offset, SEGMENT_HEADER_LEN as u64);
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("corruption before good records must not open"),
    }
}

#[test]
fn delete_segments_before_keeps_what_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1, 200);
    let mut wal = Wal::open(options(dir.path())).unwrap();
    let before = wal.segment_count();
    let deleted = wal.delete_segments_before(100).unwrap();
    assert!(deleted > 0 && wal.segment_count() == before - deleted);
    let first = wal.first_sequence().unwrap();
    assert!(first <= 100, "segment holding 100 kept");
    let records = read_all(&wal, 1);
    assert_eq!(records.first().unwrap().0, first);
    assert_eq!(records.last().unwrap().0, 200);
    // Never the active segment, even past the end.
    wal.delete_segments_before(10_000).unwrap();
    assert_eq!(wal.segment_count(), 1);
    assert_eq!(wal.last_sequence(), 200);
    drop(wal);
    let wal = Wal::open(options(dir.path())).unwrap();
    assert_eq!(wal.last_sequence(), 200);
}

/// A reader on another thread gets every record of a synced range, across
/// roll-overs, while the writer goes on appending; a range that is not on
/// disk (retired, or beyond the log) is an error, never a silent gap.
#[test]
fn reader_reads_synced_ranges_while_the_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut wal = Wal::open(options(dir.path())).unwrap();
    let reader = wal.reader();
    let synced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let (synced, done) = (synced.clone(), done.clone());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            let mut next = 1;
            loop {
                let finished = done.load(Ordering::Acquire);
                let through = synced.load(Ordering::Acquire);
                reader
                    .read(next, through, |seq, p| {
                        assert_eq!(seq, next);
                        assert_eq!(p, &payload(seq)[..], "record {seq} content");
                        next += 1;
                        Ok::<(), WalError>(())
                    })
                    .unwrap();
                if finished && next > through {
                    return next - 1;
                }
            }
        })
    };
    for seq in 1..=600 {
        wal.append(seq, &payload(seq)).unwrap();
        if seq % 5 == 0 {
            wal.sync().unwrap();
            synced.store(seq, std::sync::atomic::Ordering::Release);
        }
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(follower.join().unwrap(), 600);
    assert!(segments(dir.path()).len() > 3, "the range spans roll-overs");

    let reader = wal.reader();
    let count = |from, through| reader.read(from, through, |_, _| Ok::<(), WalError>(()));
    assert_eq!(count(590, 600).unwrap(), 11);
    assert_eq!(count(10, 9).unwrap(), 0, "an empty range");
    let beyond = count(595, 601).unwrap_err();
    assert!(beyond.to_string().contains("601"), "{beyond}");
    let mut retired = wal.retire_segments_before(300);
    assert!(retired.remove().unwrap() > 0);
    assert!(
        count(1, 10).is_err(),
        "retired records are missing, not skipped"
    );
    assert_eq!(count(400, 410).unwrap(), 11);
}
