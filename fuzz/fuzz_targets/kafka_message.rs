#![no_main]
//! `cargo +nightly fuzz run kafka_message`: see `account_service::fuzzing::kafka_message`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| account_service::fuzzing::kafka_message(data));
