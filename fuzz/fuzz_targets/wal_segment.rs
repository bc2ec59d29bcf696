#![no_main]
//! `cargo +nightly fuzz run wal_segment`: see `account_service::fuzzing::wal_segment`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| account_service::fuzzing::wal_segment(data));
