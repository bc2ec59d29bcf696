//! What the fuzz targets check, shared by `fuzz/` (cargo-fuzz, nightly) and
//! `tests/fuzz_corpora.rs` (their corpora and a deterministic mutation pass,
//! on stable, in the suite). Each check takes arbitrary bytes, as an attacker
//! or a damaged disk would give them, and panics only on a bug:
//!
//! * [`journal_record`]: the journal codec decodes anything without panicking,
//!   and what it decodes encodes back to a record that decodes the same.
//! * [`wal_segment`]: a segment file of any content opens as a clear error or a
//!   log whose records all read back; never a panic.
//! * [`amount`]: the decimal parser accepts exactly the plain decimals within
//!   the limits, never rounds, and formats back to the same value.
//! * [`grpc_request`] and [`kafka_message`]: any bytes as any request or
//!   inbound message convert to a command or a field error naming the field;
//!   every command they give journals and reads back unchanged.

use crate::domain::{amount, Command, Source, Topic};
use crate::engine::codec::{self, Record};
use crate::proto::{account::v1 as pb, events};
use crate::wire::{messages, validate};
use prost::Message;

/// A record of the journal codec.
pub fn journal_record(data: &[u8]) {
    let Ok((record, timestamp_ms)) = codec::decode_record(data) else {
        return;
    };
    let mut out = Vec::new();
    match &record {
        Record::Command(command) => codec::encode(command, timestamp_ms, &mut out),
        Record::Basket(items) => codec::encode_basket(items, timestamp_ms, &mut out),
    }
    let again = codec::decode_record(&out).expect("a re-encoded record decodes");
    assert_eq!(again, (record, timestamp_ms), "decode . encode . decode");
}

/// The name of the first segment of a log (`wal`'s own naming).
pub const SEGMENT_NAME: &str = "00000000000000000001.wal";

/// A WAL directory holding one segment file with `data` in it.
pub fn wal_segment(data: &[u8]) {
    let dir = scratch_dir();
    std::fs::write(dir.join(SEGMENT_NAME), data).expect("scratch segment written");
    let mut options = wal::WalOptions::new(&dir);
    options.segment_size_bytes = 64 * 1024;
    options.record_size_max = 16 * 1024;
    if let Ok(log) = wal::Wal::open(options) {
        let mut next = log.first_sequence().unwrap_or(1);
        let read = log.replay(next, |sequence, payload| {
            assert_eq!(sequence, next, "records in order, without gaps");
            assert!(payload.len() <= 16 * 1024);
            next += 1;
            Ok::<(), wal::WalError>(())
        });
        if read.is_ok() && log.first_sequence().is_some() {
            assert_eq!(next - 1, log.last_sequence(), "every record reads back");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A wire amount.
pub fn amount(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = amount::parse_amount(text);
    let plain = plain_decimal(text);
    assert_eq!(parsed.is_ok(), plain.is_some(), "{text:?}: {parsed:?}");
    if let (Ok(value), Some(canonical)) = (parsed, plain) {
        // Exact: the digits given, nothing rounded.
        assert_eq!(amount::format(value), canonical, "{text:?}");
        assert_eq!(amount::parse_amount(&amount::format(value)), Ok(value));
        assert!(amount::in_range(value));
        // As the state keeps it: the same value, the same text.
        let kept = crate::domain::Amount::of(value).expect("8 places at most");
        assert!(kept.in_range());
        assert_eq!(kept.to_string(), canonical, "{text:?}");
        assert_eq!(kept.to_decimal(), value);
    }
    if let Ok(value) = amount::parse_positive(text) {
        assert!(value > rust_decimal::Decimal::ZERO);
    }
}

/// The reference for [`amount`]: digits with an optional fraction, at most 18
/// integer and 8 fractional digits; its canonical form (no leading zeros, no
/// trailing fractional zeros).
fn plain_decimal(text: &str) -> Option<String> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    if int.is_empty() || (text.contains('.') && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    let int = int.trim_start_matches('0');
    if int.len() > 18 || frac.len() > 8 {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    Some(if frac.is_empty() {
        int.to_owned()
    } else {
        format!("{int}.{frac}")
    })
}

/// Any request message of the gRPC services, chosen by the first byte.
pub fn grpc_request(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    const NOW_MS: i64 = 1_700_000_000_000;
    const WINDOW_MS: i64 = 86_400_000;
    let command = match kind % 8 {
        0 => decoded::<pb::ReserveRequest>(bytes)
            .map(|r| validate::reserve(&r, NOW_MS, WINDOW_MS).map(Command::Reserve)),
        1 => decoded::<pb::UnreserveRequest>(bytes)
            .map(|r| validate::unreserve(&r).map(Command::Unreserve)),
        2 => decoded::<pb::OpenAccountRequest>(bytes)
            .map(|r| validate::open_account(&r).map(Command::OpenAccount)),
        3 => decoded::<pb::SetAccountStatusRequest>(bytes)
            .map(|r| validate::set_account_status(&r).map(Command::SetAccountStatus)),
        4 => decoded::<events::DepositEvent>(bytes)
            .map(|r| validate::deposit(&r, None).map(Command::Deposit)),
        5 => decoded::<events::WithdrawEvent>(bytes)
            .map(|r| validate::withdrawal(&r, None).map(Command::Withdraw)),
        6 => {
            decoded::<events::FillEvent>(bytes).map(|r| validate::fill(&r, None).map(Command::Fill))
        }
        _ => {
            if let Some(batch) = decoded::<pb::ReserveBatchRequest>(bytes) {
                for r in &batch.requests {
                    field_named(validate::reserve(r, NOW_MS, WINDOW_MS).map(Command::Reserve));
                }
            }
            return;
        }
    };
    if let Some(command) = command {
        field_named(command);
    }
}

/// Any payload on any inbound topic, chosen by the first byte.
pub fn kafka_message(data: &[u8]) {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let topic = Topic::ALL[kind as usize % Topic::ALL.len()];
    let source = Source {
        topic,
        partition: 0,
        offset: 42,
    };
    let command = messages::to_command(topic, payload, source);
    assert_eq!(
        command.source(),
        Some(source),
        "the offset is always consumed"
    );
    journals(&command);
}

fn decoded<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    M::decode(bytes).ok()
}

/// A command journals and reads back unchanged; a refusal names its field.
fn field_named(result: Result<Command, validate::FieldError>) {
    match result {
        Ok(command) => journals(&command),
        Err(e) => assert!(
            !e.field.is_empty()
                && e.field
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.[]".contains(&c))
                && !e.reason.is_empty(),
            "a field error names its field and why: {e}"
        ),
    }
}

fn journals(command: &Command) {
    let mut out = Vec::new();
    codec::encode(command, 1_700_000_000_000, &mut out);
    assert!(out.len() <= codec::RECORD_LEN_MAX);
    let (again, _) = codec::decode(&out).expect("a validated command journals");
    assert_eq!(&again, command);
}

fn scratch_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "account-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}
