#![no_main]
//! `cargo +nightly fuzz run amount`: see `account_service::fuzzing::amount`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| account_service::fuzzing::amount(data));
