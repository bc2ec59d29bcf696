//! Idempotency keys travel to PostgreSQL as one `bytea` per batch of keys
//! consecutive in recording order, not as one row per key: the keys are only
//! read back by a restart, never by reports, and a row per request made the
//! database do as much work as the rest of the snapshot together.
//!
//! Batch layout (little endian): a header, then the entries.
//!
//! ```text
//! header = "IK" | format u8 = 2
//! entry  = position u64 | space u8 (1 requests, 2 events) | key_len u8 | key |
//!          fingerprint u64 | result u8 | sequence u64 |
//!          asset_len u8 (0: none) | asset | available [16] | reserved [16] |
//!          released [16] | recorded_at_ms i64
//! ```
//!
//! Decimals in `rust_decimal`'s 16-byte serialization. Format 1 (no header, no
//! key space) was never deployed and is not read: a batch without this header
//! is refused, as is an unknown space or result.

use crate::domain::{Amount, Asset, Id, IdempotencyKey, KeySpace};
use crate::state_machine::{IdempotencyEntry, Outcome, ResultCode};
use rust_decimal::Decimal;

pub type Key = (u64, IdempotencyKey, IdempotencyEntry);

/// The first bytes of every batch: magic and format version.
const HEADER: [u8; 3] = [b'I', b'K', 2];

pub fn encode(keys: &[Key], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&HEADER);
    for (position, key, e) in keys {
        let o = &e.outcome;
        out.extend_from_slice(&position.to_le_bytes());
        out.push(key.space as u8);
        out.push(key.id.as_bytes().len() as u8);
        out.extend_from_slice(key.id.as_bytes());
        out.extend_from_slice(&e.fingerprint.to_le_bytes());
        out.push(o.result as u8);
        out.extend_from_slice(&o.sequence.to_le_bytes());
        let asset = o.asset.as_ref().map_or("", |a| a.as_str());
        out.push(asset.len() as u8);
        out.extend_from_slice(asset.as_bytes());
        for amount in [o.available, o.reserved, o.released] {
            out.extend_from_slice(&Decimal::from(amount).serialize());
        }
        out.extend_from_slice(&e.recorded_at_ms.to_le_bytes());
    }
}

/// Appends the keys of one batch to `out`; `None` if the bytes are not a
/// batch this module wrote.
pub fn decode(mut data: &[u8], out: &mut Vec<Key>) -> Option<()> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = data.split_at_checked(n)?;
        *data = rest;
        Some(head)
    }
    fn u64_le(data: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(data, 8)?.try_into().ok()?))
    }
    fn amount(data: &mut &[u8]) -> Option<Amount> {
        Amount::of(Decimal::deserialize(take(data, 16)?.try_into().ok()?))
    }
    if take(&mut data, HEADER.len())? != HEADER {
        return None;
    }
    while !data.is_empty() {
        let position = u64_le(&mut data)?;
        let space = KeySpace::from_u8(take(&mut data, 1)?[0])?;
        let len = take(&mut data, 1)?[0] as usize;
        let id = Id::new(std::str::from_utf8(take(&mut data, len)?).ok()?).ok()?;
        let key = IdempotencyKey { space, id };
        let fingerprint = u64_le(&mut data)?;
        let result = ResultCode::from_u8(take(&mut data, 1)?[0])?;
        let sequence = u64_le(&mut data)?;
        let len = take(&mut data, 1)?[0] as usize;
        let asset = match len {
            0 => None,
            _ => Some(Asset::from_bytes(take(&mut data, len)?)?),
        };
        let outcome = Outcome {
            result,
            replayed: false,
            sequence,
            asset,
            available: amount(&mut data)?,
            reserved: amount(&mut data)?,
            released: amount(&mut data)?,
        };
        let recorded_at_ms = u64_le(&mut data)? as i64;
        let entry = IdempotencyEntry {
            fingerprint,
            outcome,
            recorded_at_ms,
        };
        out.push((position, key, entry));
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(position: u64, name: &str, asset: Option<&str>) -> Key {
        key_in(KeySpace::Requests, position, name, asset)
    }

    fn key_in(space: KeySpace, position: u64, name: &str, asset: Option<&str>) -> Key {
        let entry = IdempotencyEntry {
            fingerprint: 0xdead_beef_0000_0001 ^ position,
            outcome: Outcome {
                result: ResultCode::InsufficientFunds,
                replayed: false,
                sequence: 1_000 + position,
                asset: asset.map(|a| Asset::currency(a).unwrap()),
                available: Amount::from_units(-1_234_567_890_000),
                reserved: Amount::from_units(500_000_000),
                released: Amount::ZERO,
            },
            recorded_at_ms: 1_700_000_000_000 + position as i64,
        };
        let id = Id::new(name).unwrap();
        (position, IdempotencyKey { space, id }, entry)
    }

    #[test]
    fn round_trips_exactly() {
        let keys = vec![
            key(7, "req-1", Some("USD")),
            key(8, &"x".repeat(64), None),
            key_in(KeySpace::Events, 9, "req-1", None),
        ];
        let mut bytes = Vec::new();
        encode(&keys, &mut bytes);
        let mut back = Vec::new();
        decode(&bytes, &mut back).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in keys.iter().zip(&back) {
            assert_eq!((a.0, a.1), (b.0, b.1));
            assert_eq!(a.2.fingerprint, b.2.fingerprint);
            assert_eq!(a.2.recorded_at_ms, b.2.recorded_at_ms);
            assert_eq!(a.2.outcome, b.2.outcome);
        }
    }

    #[test]
    fn a_truncated_batch_is_refused() {
        let mut bytes = Vec::new();
        encode(&[key(1, "k", Some("EUR"))], &mut bytes);
        for cut in 0..bytes.len() {
            let mut back = Vec::new();
            assert!(decode(&bytes[..cut], &mut back).is_none() || cut == HEADER.len());
        }
    }

    #[test]
    fn what_this_module_did_not_write_is_refused() {
        let mut bytes = Vec::new();
        encode(&[key(1, "k", None)], &mut bytes);
        let mut back = Vec::new();
        // Format 1 had no header: the entry bytes alone.
        assert!(decode(&bytes[HEADER.len()..], &mut back).is_none());
        let mut other_version = bytes.clone();
        other_version[2] = 3;
        assert!(decode(&other_version, &mut back).is_none());
        let mut unknown_space = bytes.clone();
        unknown_space[HEADER.len() + 8] = 3;
        assert!(decode(&unknown_space, &mut back).is_none());
        assert!(back.is_empty());
    }
}
