#![no_main]
//! `cargo +nightly fuzz run grpc_request`: see `account_service::fuzzing::grpc_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| account_service::fuzzing::grpc_request(data));
