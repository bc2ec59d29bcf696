//! The real service, under concurrent load, stopped by the kernel at a chosen
//! I/O step of its write-ahead log, then restarted: it must open, and every
//! acknowledged write must be there.
//!
//! The faults are injected by `strace` (`-e inject=`): a SIGKILL at the
//! directory fsync that follows a new segment's rename (the roll-over), or an
//! `EIO` / `ENOSPC` answer to `fdatasync` / `pwrite64`. The wal crate's own
//! tests (`wal/tests/crash_points.rs`) stop the log at every step and also
//! model a power loss; these runs check the whole service around it.
//! `scripts/test` installs strace when it is missing; without it these tests
//! fail rather than skip.

mod common;

use common::server::{assert_reservations_survived, strace, ReserveLoad, Server};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

/// Concurrent writers: enough that batches straddle each roll-over.
const WORKERS: usize = 64;

/// Opens account 1 with plenty of cash in a fresh data directory whose
/// segments are `segment_mib` large.
async fn funded(dir: &std::path::Path, segment_mib: &str) {
    let mut server = Server::start(dir, &["--wal-segment-mib", segment_mib]).await;
    common::server::open_and_fund_account_1(&server, "1000000000").await;
    assert!(server.terminate().success());
}

/// Restarts on `dir` (must open and serve), checks every acknowledged
/// reservation, and that the log takes new writes and reopens again.
async fn restart_and_check(dir: &std::path::Path, acknowledged: &[(usize, u64)]) {
    assert!(
        !acknowledged.is_empty(),
        "writes were acknowledged before the fault"
    );
    let mut server = Server::start(dir, &[]).await;
    let mut accounts = server.accounts().await;
    assert_reservations_survived(&mut accounts, acknowledged).await;
    let reply = accounts
        .reserve(common::server::reserve_one_usd(999_999_999))
        .await
        .expect("a new reserve after the restart")
        .into_inner();
    assert_eq!(reply.result, 1, "RESULT_OK");
    assert!(server.terminate().success());
    Server::start(dir, &[]).await;
}

/// The first roll-overs of a run with 1 MiB segments, each killed (SIGKILL,
/// from the kernel, at the syscall) at the directory fsync that follows the
/// new segment's rename.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_the_directory_sync_of_a_roll_over_the_log_opens_with_every_acknowledged_write() {
    let strace = strace();
    for roll in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        funded(dir.path(), "1").await;
        let wal_dir = dir.path().join("wal");
        let wal_dir = wal_dir.to_str().unwrap();
        let inject = format!("inject=fsync:signal=KILL:when={roll}");
        let wrapper = [
            strace,
            "-f",
            // No --seccomp-bpf here: with it, -P never matches the directory's
            // fsync and nothing is injected. Every syscall stops the tracee,
            // so a roll takes about a minute of load in a debug build.
            "-qq",
            "-o",
            "/dev/null",
            "-P",
            wal_dir,
            "-e",
            "trace=fsync",
            "-e",
            &inject,
            "--",
        ];
        let mut server = Server::spawn_under(
            &wrapper,
            dir.path(),
            &["--wal-segment-mib", "1"],
            Stdio::inherit(),
        );
        server.wait_serving().await;
        let load = ReserveLoad::start(&server, WORKERS, common::server::reserve_one_usd).await;
        let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(400)))
            .expect("the service was killed at a roll-over within 400 s");
        let (acknowledged, _) = load.finish().await;
        // strace reports the tracee's death by SIGKILL as its own.
        assert!(
            status.signal() == Some(9) || status.code() == Some(137),
            "killed by the injected SIGKILL, not {status}"
        );
        assert!(
            common::server::wal_segments(dir.path()) >= 2,
            "roll {roll}: a new segment was installed"
        );
        restart_and_check(dir.path(), &acknowledged).await;
        eprintln!(
            "roll-over kill {roll}: {} acknowledged before the kill, restart ok, 0 lost",
            acknowledged.len()
        );
    }
}

/// An `fdatasync` or `pwrite64` of the WAL that fails (EIO, ENOSPC): nothing
/// more is acknowledged, the calls in flight get UNAVAILABLE, the process
/// logs the file and the OS error and exits non-zero, and the next start
/// recovers every acknowledged write from the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_or_write_is_fatal_and_the_next_start_recovers() {
    for (syscall, error, errno) in [("fdatasync", "EIO", 5), ("pwrite64", "ENOSPC", 28)] {
        let dir = tempfile::tempdir().unwrap();
        funded(dir.path(), "64").await;
        let trace = format!("trace={syscall}");
        let inject = format!("inject={syscall}:error={error}:when=200");
        let wrapper = common::server::strace_injecting(&trace, &inject);
        let log_path = dir.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut server = Server::spawn_under(&wrapper, dir.path(), &[], Stdio::from(log));
        server.wait_serving().await;
        let load = ReserveLoad::start(&server, 16, common::server::reserve_one_usd).await;
        let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(120)))
            .expect("the service exits by itself after the failed I/O");
        let (acknowledged, errors) = load.finish().await;
        assert!(
            !status.success() && status.signal().is_none(),
            "{syscall} {error}: exits non-zero, not {status}"
        );
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            log.contains(&format!("(os error {errno})")) && log.contains(".wal"),
            "{syscall} {error}: the log names the file and the OS error:\n{log}"
        );
        // A call that reached the service gets UNAVAILABLE; one racing the
        // closing connection never reached it (a transport error).
        let errors: Vec<tonic::Status> = errors
            .into_iter()
            .map(|e| e.expect("every worker stopped on an error"))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.code() == tonic::Code::Unavailable && e.message().contains("stopped")),
            "{syscall} {error}: in-flight calls get UNAVAILABLE: {errors:?}"
        );
        restart_and_check(dir.path(), &acknowledged).await;
        eprintln!(
            "{syscall} {error}: {} acknowledged before the failure, {status}, restart ok",
            acknowledged.len()
        );
    }
}
