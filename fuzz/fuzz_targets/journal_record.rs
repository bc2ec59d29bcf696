#![no_main]
//! `cargo +nightly fuzz run journal_record`: see `account_service::fuzzing::journal_record`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| account_service::fuzzing::journal_record(data));
