//! A deterministic digest of the whole state, independent of hash-map order and
//! of decimal scale (1.50 == 1.5). Replay tests compare it between a live state
//! and one rebuilt from the journal.

use super::State;
use crate::domain::{Amount, Decimal};
use xxhash_rust::xxh3::Xxh3;

/// The bytes of the amount's normalized `Decimal`: the digest of a state
/// is the same whether its amounts were kept as decimals or fixed-point.
fn dec(h: &mut Xxh3, a: Amount) {
    h.update(&Decimal::from(a).serialize());
}

impl State {
    pub fn digest(&self) -> u64 {
        let mut h = Xxh3::new();
        h.update(&self.last_sequence().to_le_bytes());
        h.update(&self.last_timestamp_ms().to_le_bytes());
        h.update(&self.config().idempotency_window_ms.to_le_bytes());
        h.update(&self.config().tick_work_max.to_le_bytes());
        let mut accounts: Vec<_> = self.accounts().collect();
        accounts.sort_by_key(|a| a.account_id);
        for a in accounts {
            h.update(&a.account_id.0.to_le_bytes());
            h.update(&[a.status as u8, u8::from(a.overdrawn)]);
            h.update(a.base_currency.as_bytes());
            h.update(&a.open_reservations.to_le_bytes());
            let mut cash = a.cash.clone();
            cash.sort_by_key(|b| b.currency);
            for b in cash {
                h.update(b.currency.as_bytes());
                dec(&mut h, b.available);
                dec(&mut h, b.reserved);
            }
            let mut positions = a.positions.clone();
            positions.sort_by_key(|p| p.symbol);
            for p in positions {
                h.update(p.symbol.as_bytes());
                h.update(p.currency.as_bytes());
                for v in [
                    p.quantity,
                    p.reserved_quantity,
                    p.cost_basis,
                    p.realized_pnl,
                ] {
                    dec(&mut h, v);
                }
            }
        }
        let mut reservations: Vec<_> = self.reservations().collect();
        reservations.sort_by_key(|r| r.key());
        for r in reservations {
            h.update(&r.account_id.0.to_le_bytes());
            h.update(r.order_id.as_bytes());
            h.update(&[r.kind as u8, r.state as u8]);
            h.update(r.asset.as_bytes());
            for v in [r.amount, r.remaining, r.consumed, r.released] {
                dec(&mut h, v);
            }
            h.update(&r.expires_at_ms.unwrap_or(-1).to_le_bytes());
            h.update(&r.sequence.to_le_bytes());
            h.update(&r.closed_at_ms.to_le_bytes());
            h.update(&r.closed_sequence.to_le_bytes());
        }
        let mut keys: Vec<_> = self.idempotency_entries().collect();
        keys.sort_by_key(|(k, _)| **k);
        for (k, e) in keys {
            h.update(&[k.space as u8]);
            h.update(k.id.as_bytes());
            h.update(&e.fingerprint.to_le_bytes());
            h.update(&e.recorded_at_ms.to_le_bytes());
            h.update(&[e.outcome.result as u8]);
            h.update(&e.outcome.sequence.to_le_bytes());
            dec(&mut h, e.outcome.available);
            dec(&mut h, e.outcome.reserved);
            dec(&mut h, e.outcome.released);
        }
        let mut offsets: Vec<_> = self.offsets().collect();
        offsets.sort();
        for (t, p, o) in offsets {
            h.update(&[t as u8]);
            h.update(&p.to_le_bytes());
            h.update(&o.to_le_bytes());
        }
        h.digest()
    }
}
