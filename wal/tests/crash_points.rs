//! Crash at every I/O step (design section 2: "a crash at any instant leaves a
//! log that opens with every acknowledged record").
//!
//! [`CrashHooks`] counts the log's I/O steps and fails step N, and every step
//! after it: the process "dies" there. The test then drops the `Wal` (its
//! memory, the unsynced batch, is lost) and reopens the directory, in two
//! models:
//!
//! * **process crash** (kill -9): what was written to the page cache survives;
//! * **power loss**: of each write not yet covered by an fdatasync, a random
//!   subset of its 4 KiB pages reverts to the old contents, and each rename or
//!   removal not yet followed by a directory fsync is undone with probability
//!   1/2 (seeded, several seeds).
//!
//! The preallocation thread's steps are not counted (they race with the
//! appender) but also stop at the crash.

mod common;

use common::{scratch, segments};
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use wal::{format, IoHooks, IoOp, IoStep, Wal, WalError, WalOptions};

const SEGMENT_SIZE: u64 = 8192;
const RECORD_MAX: u32 = 1000;
const PAGE: u64 = 4096;
/// Batches of the workload: rolls several times, one batch straddles two
/// roll-overs, every eighth batch deletes old segments.
const BATCHES: [u64; 16] = [1, 4, 2, 7, 3, 1, 22, 2, 5, 1, 6, 3, 9, 2, 4, 1];

fn options(dir: &Path, hooks: Option<Arc<CrashHooks>>) -> WalOptions {
    WalOptions {
        segment_size_bytes: SEGMENT_SIZE,
        record_size_max: RECORD_MAX,
        io_hooks: hooks.map(|h| h as Arc<dyn IoHooks>),
        ..WalOptions::new(dir)
    }
}

fn payload(seq: u64) -> Vec<u8> {
    let len = 1 + (seq * 97 % RECORD_MAX as u64) as usize;
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Write,
    DataSync,
    Rename,
    DirSync,
    Remove,
    Preallocate,
}

fn kind(step: &IoStep<'_>) -> Kind {
    match step {
        IoStep::Write { .. } => Kind::Write,
        IoStep::DataSync { .. } => Kind::DataSync,
        IoStep::Rename { .. } => Kind::Rename,
        IoStep::DirSync { .. } => Kind::DirSync,
        IoStep::Remove { .. } => Kind::Remove,
        IoStep::Preallocate { .. } => Kind::Preallocate,
    }
}

/// A write not yet covered by an fdatasync: where, and what was there before.
struct UnsyncedWrite {
    offset: u64,
    old: Vec<u8>,
}

/// A rename or removal not yet covered by a directory fsync.
enum DirOp {
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    /// `stash` is a hard link to the removed file.
    Remove {
        path: PathBuf,
        stash: PathBuf,
    },
}

#[derive(Default)]
struct State {
    /// Counted steps so far (all but `Preallocate`).
    steps: usize,
    crash_at: Option<usize>,
    /// Fail (with EIO) only step `fail_at` of this kind, and go on.
    fail_once: Option<(Kind, usize, bool)>,
    kind_counts: HashMap<Kind, usize>,
    crashed: bool,
    kinds: BTreeSet<Kind>,
    unsynced: HashMap<PathBuf, Vec<UnsyncedWrite>>,
    dir_ops: Vec<DirOp>,
    /// Saved by `before(Write)` / `before(Remove)`, committed by `after`.
    saving: Option<UnsyncedWrite>,
    stashing: Option<PathBuf>,
    stash_dir: PathBuf,
}

/// The test's [`IoHooks`]: counts, crashes, fails, and records what a power
/// loss could undo.
struct CrashHooks(Mutex<State>);

impl CrashHooks {
    fn new(crash_at: Option<usize>, stash_dir: PathBuf) -> Arc<CrashHooks> {
        fs::create_dir_all(&stash_dir).unwrap();
        Arc::new(CrashHooks(Mutex::new(State {
            crash_at,
            stash_dir,
            ..State::default()
        })))
    }

    /// Fails the `nth` step of `kind` once, in `before` (not done) or `after` (done).
    fn failing(kind: Kind, nth: usize, after: bool, stash_dir: PathBuf) -> Arc<CrashHooks> {
        let hooks = CrashHooks::new(None, stash_dir);
        hooks.state().fail_once = Some((kind, nth, after));
        hooks
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// Undoes what a power loss may undo: unsynced pages, un-dir-synced renames
    /// and removals (newest first).
    fn lose_power(&self, seed: u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut s = self.state();
        for (path, writes) in s.unsynced.drain() {
            for w in writes.iter().rev() {
                revert_pages(&path, w, &mut rng);
            }
        }
        for op in s.dir_ops.drain(..).rev() {
            if !rng.coin() {
                continue;
            }
            match op {
                DirOp::Rename { from, to } => {
                    if to.exists() {
                        fs::rename(&to, &from).unwrap();
                    }
                }
                DirOp::Remove { path, stash } => {
                    if !path.exists() {
                        fs::hard_link(&stash, &path).unwrap();
                    }
                }
            }
        }
    }
}

fn injected(what: &str, step: &IoStep<'_>) -> io::Error {
    io::Error::other(format!("injected {what} at {step:?}"))
}

impl IoHooks for CrashHooks {
    fn before(&self, step: &IoStep<'_>) -> io::Result<()> {
        let mut s = self.state();
        if s.crashed {
            return Err(injected("crash (already down)", step));
        }
        let k = kind(step);
        s.kinds.insert(k);
        let nth = *s.kind_counts.entry(k).and_modify(|n| *n += 1).or_insert(0);
        if s.fail_once == Some((k, nth, false)) {
            return Err(io::Error::from_raw_os_error(5));
        }
        if k == Kind::Preallocate {
            return Ok(());
        }
        let n = s.steps;
        s.steps += 1;
        if s.crash_at == Some(n) {
            s.crashed = true;
            return Err(injected(&format!("crash before step {n}"), step));
        }
        match step {
            IoStep::Write {
                path, offset, len, ..
            } => {
                s.saving = Some(UnsyncedWrite {
                    offset: *offset,
                    old: read_range(path, *offset, *len),
                });
            }
            IoStep::Remove { path } => {
                let stash = s.stash_dir.join(format!("removed-{n}"));
                fs::hard_link(path, &stash).unwrap();
                s.stashing = Some(stash);
            }
            _ => {}
        }
        Ok(())
    }

    fn after(&self, step: &IoStep<'_>) -> io::Result<()> {
        let mut s = self.state();
        let s = &mut *s;
        match step {
            IoStep::Write { path, .. } => {
                let saved = s.saving.take().expect("before(Write) saved the old bytes");
                s.unsynced
                    .entry(path.to_path_buf())
                    .or_default()
                    .push(saved);
            }
            IoStep::DataSync { path } => {
                s.unsynced.remove(*path);
            }
            IoStep::Rename { from, to } => {
                if let Some(writes) = s.unsynced.remove(*from) {
                    s.unsynced.insert(to.to_path_buf(), writes);
                }
                s.dir_ops.push(DirOp::Rename {
                    from: from.to_path_buf(),
                    to: to.to_path_buf(),
                });
            }
            IoStep::DirSync { dir } => s.dir_ops.retain(|op| {
                let path = match op {
                    DirOp::Rename { to, .. } => to,
                    DirOp::Remove { path, .. } => path,
                };
                path.parent() != Some(dir)
            }),
            IoStep::Remove { path } => {
                let stash = s.stashing.take().expect("before(Remove) stashed the file");
                if let Some(writes) = s.unsynced.remove(*path) {
                    s.unsynced.insert(stash.clone(), writes);
                }
                s.dir_ops.push(DirOp::Remove {
                    path: path.to_path_buf(),
                    stash,
                });
            }
            IoStep::Preallocate { .. } => {}
        }
        let k = kind(step);
        let nth = s.kind_counts.get(&k).copied().unwrap_or(0);
        if s.fail_once == Some((k, nth, true)) {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

/// `len` bytes of `path` at `offset`, zeros past its end.
fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut old = vec![0u8; len];
    if let Ok(file) = fs::File::open(path) {
        let size = file.metadata().unwrap().len();
        let have = size.saturating_sub(offset).min(len as u64) as usize;
        file.read_exact_at(&mut old[..have], offset).unwrap();
    }
    old
}

/// Restores the old bytes of a random subset of the write's 4 KiB pages.
fn revert_pages(path: &Path, w: &UnsyncedWrite, rng: &mut Rng) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    let end = w.offset + w.old.len() as u64;
    let mut page = w.offset / PAGE * PAGE;
    while page < end {
        let (from, to) = (page.max(w.offset), (page + PAGE).min(end));
        if rng.coin() {
            let old = &w.old[(from - w.offset) as usize..(to - w.offset) as usize];
            file.write_all_at(old, from).unwrap();
        }
        page += PAGE;
    }
}

/// xorshift64: reproducible page and rename choices per seed.
struct Rng(u64);

impl Rng {
    fn coin(&mut self) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 & 1 == 1
    }
}

/// What the workload achieved before it stopped.
#[derive(Debug, Default)]
struct Outcome {
    /// Highest sequence appended, and highest covered by a `sync` that returned Ok.
    appended_to: u64,
    synced_to: u64,
    /// Highest bound passed to `delete_segments_before`: records below it may be gone.
    delete_bound: u64,
    error: Option<String>,
}

/// Batches of records, `sync` after each, old segments deleted now and then;
/// stops at the first error (the crash).
fn workload(options: WalOptions) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = workload_steps(options, &mut out) {
        out.error = Some(e.to_string());
    }
    out
}

fn workload_steps(options: WalOptions, out: &mut Outcome) -> Result<(), WalError> {
    let mut wal = Wal::open(options)?;
    let mut seq = 0;
    for (i, size) in BATCHES.iter().enumerate() {
        for _ in 0..*size {
            seq += 1;
            wal.append(seq, &payload(seq))?;
            out.appended_to = seq;
        }
        wal.sync()?;
        out.synced_to = seq;
        if i % 8 == 7 {
            // Covers two or more closed segments: removed in one call.
            out.delete_bound = out.synced_to.saturating_sub(2);
            wal.delete_segments_before(out.delete_bound)?;
        }
    }
    Ok(())
}

fn read_all(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    wal.replay(0, |seq, p| {
        out.push((seq, p.to_vec()));
        Ok::<(), WalError>(())
    })
    .unwrap();
    out
}

/// The log opens; it holds every synced record (from the delete bound on)
/// with its payload, contiguous, nothing after its last record; it takes a
/// new record and reopens with it.
fn check_recovered(dir: &Path, out: &Outcome, label: &str) {
    let mut wal = Wal::open(options(dir, None)).unwrap_or_else(|e| panic!("{label}: open: {e}"));
    let records = read_all(&wal);
    for pair in records.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{label}: contiguous");
    }
    for (seq, p) in &records {
        assert!(
            *seq <= out.appended_to,
            "{label}: record {seq} never appended"
        );
        assert_eq!(p, &payload(*seq), "{label}: record {seq} payload");
    }
    let first = records.first().map_or(u64::MAX, |r| r.0);
    let last = records.last().map_or(0, |r| r.0);
    let must_from = out.delete_bound.max(1);
    if out.synced_to >= must_from {
        assert!(
            first <= must_from && last >= out.synced_to,
            "{label}: synced {must_from}..={} lost, found {first}..={last}",
            out.synced_to
        );
    }
    if !records.is_empty() {
        assert_eq!(
            wal.last_sequence(),
            last,
            "{label}: nothing after the last record"
        );
    }
    let next = wal.last_sequence() + 1;
    let log_id = wal.log_id();
    wal.append(next, &payload(next)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let wal = Wal::open(options(dir, None)).unwrap_or_else(|e| panic!("{label}: reopen: {e}"));
    assert_eq!(wal.last_sequence(), next, "{label}: new record kept");
    assert_eq!(wal.log_id(), log_id, "{label}: same log");
    let again = read_all(&wal);
    assert_eq!(again.last().map(|r| r.0), Some(next), "{label}");
}

#[derive(Clone, Copy, Debug)]
enum Model {
    ProcessCrash,
    PowerLoss { seed: u64 },
}

/// Crashes the workload at step 0, 1, ... until it runs to completion;
/// returns how many crash points there were.
fn crash_at_every_step(model: Model) -> usize {
    for n in 0.. {
        let root = scratch();
        let dir = root.path().join("wal");
        let hooks = CrashHooks::new(Some(n), root.path().join("stash"));
        let out = workload(options(&dir, Some(hooks.clone())));
        let crashed = hooks.crashed();
        if let Model::PowerLoss { seed } = model {
            hooks.lose_power(seed ^ n as u64);
        }
        let label = format!("{model:?}, crash before step {n}: {out:?}");
        assert_eq!(crashed, out.error.is_some(), "{label}");
        if let Model::PowerLoss { seed } = model {
            power_loss_while_recovering(&dir, seed, &out, &label);
        }
        check_recovered(&dir, &out, &label);
        if !crashed {
            return n;
        }
    }
    unreachable!()
}

/// Power loss again at every step of the open that recovers `dir` (zeroing a
/// torn tail, removing temporary files, writing `LOG_ID`), each on a copy:
/// the next open still finds every synced record.
fn power_loss_while_recovering(dir: &Path, seed: u64, out: &Outcome, label: &str) {
    for m in 0.. {
        let root = scratch();
        let copy = root.path().join("wal");
        copy_dir(dir, &copy);
        let hooks = CrashHooks::new(Some(m), root.path().join("stash"));
        let opened = Wal::open(options(&copy, Some(hooks.clone())));
        let crashed = hooks.crashed();
        drop(opened);
        hooks.lose_power(seed ^ (m as u64) << 32);
        check_recovered(&copy, out, &format!("{label}, then again at open step {m}"));
        if !crashed {
            return;
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn the_workload_hits_every_kind_of_step() {
    let root = scratch();
    let hooks = CrashHooks::new(None, root.path().join("stash"));
    let dir = root.path().join("wal");
    let out = workload(options(&dir, Some(hooks.clone())));
    assert!(out.error.is_none(), "{out:?}");
    let kinds = hooks.state().kinds.clone();
    let all = [
        Kind::Write,
        Kind::DataSync,
        Kind::Rename,
        Kind::DirSync,
        Kind::Remove,
        Kind::Preallocate,
    ];
    assert_eq!(kinds, all.into_iter().collect(), "kinds of step seen");
    let wal = Wal::open(options(&dir, None)).unwrap();
    assert!(wal.first_sequence() > Some(1), "old segments were deleted");
    let total: u64 = BATCHES.iter().sum();
    assert_eq!(wal.last_sequence(), total);
}

#[test]
fn process_crash_at_every_step() {
    let points = crash_at_every_step(Model::ProcessCrash);
    assert!(points > 60, "only {points} crash points");
}

#[test]
fn power_loss_at_every_step() {
    for seed in 1..=4 {
        crash_at_every_step(Model::PowerLoss { seed });
    }
}

/// Appends `n` records from `from` as one batch and syncs.
fn batch(wal: &mut Wal, from: u64, n: u64) -> Result<(), WalError> {
    for seq in from..from + n {
        wal.append(seq, &payload(seq))?;
    }
    wal.sync()
}

fn assert_poisoned(wal: &mut Wal, cause: &str) {
    let next = wal.last_sequence() + 1;
    for result in [wal.append(next, b"x"), wal.sync()] {
        match result {
            Err(e @ WalError::Poisoned { .. }) => {
                assert!(e.to_string().contains(cause), "{e} names {cause}")
            }
            other => panic!("expected Poisoned, got {other:?}"),
        }
    }
}

/// A failed write or fdatasync (reported before or after the step was done)
/// poisons the log; a reopen recovers every record synced before it.
#[test]
fn a_failed_write_or_sync_poisons_the_log() {
    for (kind, after) in [
        (Kind::Write, false),
        (Kind::Write, true),
        (Kind::DataSync, false),
        (Kind::DataSync, true),
    ] {
        let root = scratch();
        let dir = root.path().join("wal");
        // Step 8 of its kind: past open and the first roll-over.
        let hooks = CrashHooks::failing(kind, 8, after, root.path().join("stash"));
        let mut wal = Wal::open(options(&dir, Some(hooks))).unwrap();
        let mut synced = 0;
        let error = loop {
            match batch(&mut wal, synced + 1, 3) {
                Ok(()) => synced += 3,
                Err(e) => break e,
            }
        };
        let label = format!("{kind:?} after={after}: {error}");
        match &error {
            WalError::Io {
                op, path, source, ..
            } => {
                assert!(matches!(op, IoOp::Write | IoOp::DataSync), "{label}");
                assert!(path.starts_with(&dir), "{label}");
                assert_eq!(source.raw_os_error(), Some(5), "{label}");
                let message = error.to_string();
                assert!(message.contains("os error 5"), "{label}");
                if *op == IoOp::Write {
                    assert!(message.contains(" at byte "), "{label}");
                }
            }
            other => panic!("{label}: expected Io, got {other:?}"),
        }
        assert!(synced > 0, "{label}");
        let path = match &error {
            WalError::Io { path, .. } => path.display().to_string(),
            _ => unreachable!(),
        };
        assert_poisoned(&mut wal, &path);
        drop(wal);
        let out = Outcome {
            appended_to: synced + 3,
            synced_to: synced,
            ..Outcome::default()
        };
        check_recovered(&dir, &out, &label);
    }
}

/// A preallocation that failed on the background thread is the error of the
/// roll-over that needs the file, and poisons the log.
#[test]
fn a_failed_preallocation_surfaces_at_the_roll_over() {
    let root = scratch();
    let dir = root.path().join("wal");
    // Preallocation 0 is the first segment's, 1 the second's.
    let hooks = CrashHooks::failing(Kind::Preallocate, 1, false, root.path().join("stash"));
    let mut wal = Wal::open(options(&dir, Some(hooks))).unwrap();
    let mut seq = 0;
    let error = loop {
        seq += 1;
        if let Err(e) = wal.append(seq, &payload(seq)).and_then(|()| wal.sync()) {
            break e;
        }
    };
    assert!(
        matches!(
            error,
            WalError::Io {
                op: IoOp::Preallocate,
                ..
            }
        ),
        "{error}"
    );
    assert!(wal.segment_count() >= 1);
    assert_poisoned(&mut wal, "preallocation");
    drop(wal);
    let out = Outcome {
        appended_to: seq,
        synced_to: seq - 1,
        ..Outcome::default()
    };
    check_recovered(&dir, &out, "preallocation");
}

/// `delete_segments_before` errors are warnings: the log goes on, and a later
/// call deletes what is left.
#[test]
fn a_failed_deletion_does_not_poison() {
    let root = scratch();
    let dir = root.path().join("wal");
    let hooks = CrashHooks::failing(Kind::Remove, 1, false, root.path().join("stash"));
    let mut wal = Wal::open(options(&dir, Some(hooks))).unwrap();
    batch(&mut wal, 1, 60).unwrap();
    let segments = wal.segment_count();
    assert!(segments >= 4, "{segments} segments");
    assert!(wal.delete_segments_before(50).is_err());
    assert_eq!(
        wal.segment_count(),
        segments - 1,
        "the first removal happened"
    );
    batch(&mut wal, 61, 2).unwrap();
    assert!(wal.delete_segments_before(50).unwrap() > 0);
    assert!(wal.first_sequence() > Some(1));
    drop(wal);
    let out = Outcome {
        appended_to: 62,
        synced_to: 62,
        delete_bound: 50,
        ..Outcome::default()
    };
    check_recovered(&dir, &out, "deletion");
}

/// Offsets of the records of a one-segment log, by sequence from 1.
fn record_offsets(count: u64) -> Vec<usize> {
    let mut at = format::SEGMENT_HEADER_LEN;
    (1..=count)
        .map(|seq| {
            let start = at;
            at += format::record_len(payload(seq).len());
            start
        })
        .collect()
}

/// Batches 1..=3 and 4..=8 synced (and 9..=10 when `later_batch`); then a
/// hole (zeros, or garbage) inside record 6.
fn log_with_a_hole(dir: &Path, later_batch: bool, zeros: bool) -> PathBuf {
    let mut opts = options(dir, None);
    opts.segment_size_bytes = 16 * 1024;
    let mut wal = Wal::open(opts).unwrap();
    batch(&mut wal, 1, 3).unwrap();
    batch(&mut wal, 4, 5).unwrap();
    if later_batch {
        batch(&mut wal, 9, 2).unwrap();
    }
    assert_eq!(wal.segment_count(), 1);
    drop(wal);
    let segment = dir.join(format!("{:020}.wal", 1));
    let mut bytes = fs::read(&segment).unwrap();
    let at = record_offsets(6)[5];
    let fill = if zeros { 0 } else { 0xa5 };
    bytes[at..at + 40].fill(fill);
    fs::write(&segment, &bytes).unwrap();
    segment
}

#[test]
fn a_hole_followed_by_its_own_batch_is_a_torn_tail() {
    for zeros in [true, false] {
        let root = scratch();
        let dir = root.path().join("wal");
        log_with_a_hole(&dir, false, zeros);
        let wal = Wal::open(options(&dir, None)).unwrap();
        let records = read_all(&wal);
        assert_eq!(records.len(), 5, "cut before record 6 (zeros {zeros})");
        assert_eq!(wal.last_sequence(), 5);
        drop(wal);
        let out = Outcome {
            appended_to: 5,
            synced_to: 5,
            ..Outcome::default()
        };
        check_recovered(&dir, &out, "hole in the last batch");
    }
}

#[test]
fn a_hole_followed_by_a_later_batch_is_corruption() {
    for zeros in [true, false] {
        let root = scratch();
        let dir = root.path().join("wal");
        let segment = log_with_a_hole(&dir, true, zeros);
        match Wal::open(options(&dir, None)) {
            Err(WalError::Corrupt {
                segment: named,
                offset,
                reason,
            }) => {
                assert_eq!(named, segment);
                assert_eq!(offset as usize, record_offsets(6)[5], "{reason}");
                assert!(reason.contains("later sync batch"), "{reason}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a hole before a later batch must not open (zeros {zeros})"),
        }
    }
}

#[test]
fn a_segment_of_another_log_is_refused() {
    let (a, b) = (scratch(), scratch());
    for dir in [a.path(), b.path()] {
        let mut wal = Wal::open(options(dir, None)).unwrap();
        batch(&mut wal, 1, 30).unwrap();
    }
    let foreign = segments(b.path()).pop().unwrap();
    let target = a.path().join(foreign.file_name().unwrap());
    fs::copy(&foreign, &target).unwrap();
    let foreign_id = Wal::open(options(b.path(), None)).unwrap().log_id();
    let expected = format!(
        "segment belongs to another log {}",
        wal::format_log_id(foreign_id)
    );
    for without_log_id_file in [false, true] {
        if without_log_id_file {
            fs::remove_file(a.path().join("LOG_ID")).unwrap();
        }
        match Wal::open(options(a.path(), None)) {
            Err(e @ WalError::Corrupt { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&expected), "{message}");
                assert!(message.contains(&target.display().to_string()), "{message}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a foreign segment must be refused"),
        }
    }
}

#[test]
fn the_log_id_is_stable_and_kept_in_log_id() {
    let root = scratch();
    let dir = root.path().join("wal");
    let id = Wal::open(options(&dir, None)).unwrap().log_id();
    let text = fs::read_to_string(dir.join("LOG_ID")).unwrap();
    assert_eq!(text, format!("{}\n", wal::format_log_id(id)));
    assert_eq!(wal::format_log_id(id).len(), 32);
    let mut wal = Wal::open(options(&dir, None)).unwrap();
    assert_eq!(wal.log_id(), id, "no segment yet, same id");
    batch(&mut wal, 1, 3).unwrap();
    drop(wal);
    fs::remove_file(dir.join("LOG_ID")).unwrap();
    assert_eq!(
        Wal::open(options(&dir, None)).unwrap().log_id(),
        id,
        "from the segments"
    );
    assert!(dir.join("LOG_ID").exists(), "written again");
    let other = scratch();
    assert_ne!(Wal::open(options(other.path(), None)).unwrap().log_id(), id);
}

#[test]
fn a_version_1_segment_is_refused() {
    let root = scratch();
    let mut v1 = vec![0u8; 4096];
    v1[0..8].copy_from_slice(b"ACCTWAL1");
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    fs::write(root.path().join(format!("{:020}.wal", 1)), &v1).unwrap();
    match Wal::open(options(root.path(), None)) {
        Err(e @ WalError::UnsupportedVersion { version: 1, .. }) => {
            assert!(
                e.to_string().contains("unsupported WAL format version 1"),
                "{e}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("version 1 must be refused"),
    }
}

/// One sync batch never writes more than `SYNC_BATCH_BYTES_MAX` into a
/// segment, however much is appended between two syncs: open relies on it to
/// look for a torn tail only that far.
#[test]
fn a_sync_batch_is_bounded_in_bytes() {
    let root = scratch();
    let dir = root.path().join("wal");
    let mut opts = options(&dir, None);
    opts.segment_size_bytes = 32 << 20;
    opts.record_size_max = 64 << 10;
    let mut wal = Wal::open(opts.clone()).unwrap();
    let big = vec![7u8; 60 << 10];
    let count = (10 << 20) / big.len() as u64;
    for seq in 1..=count {
        wal.append(seq, &big).unwrap();
    }
    wal.sync().unwrap();
    assert_eq!(wal.segment_count(), 1);
    drop(wal);
    let bytes = fs::read(dir.join(format!("{:020}.wal", 1))).unwrap();
    let mut at = format::SEGMENT_HEADER_LEN;
    let mut batches: HashMap<u64, usize> = HashMap::new();
    while let format::Frame::Record {
        batch_first, len, ..
    } = format::read_frame(&bytes[at..], opts.record_size_max)
    {
        *batches.entry(batch_first).or_default() += len;
        at += len;
    }
    assert!(
        batches.len() >= 3,
        "10 MiB in batches of at most 4 MiB: {batches:?}"
    );
    assert!(
        batches.values().all(|b| *b <= format::SYNC_BATCH_BYTES_MAX),
        "{batches:?}"
    );
    let wal = Wal::open(opts).unwrap();
    assert_eq!(wal.last_sequence(), count);
}
