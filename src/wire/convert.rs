//! Domain values to wire messages. Amounts leave as canonical decimal strings.

use crate::domain::{amount::format, AccountStatus, ReservationKind};
use crate::engine::view::{AccountView, Outcome, ReservationState, ReservationView, ResultCode};
use crate::proto::account::v1 as pb;

pub fn result(code: ResultCode) -> pb::Result {
    use pb::Result as R;
    match code {
        ResultCode::Ok => R::Ok,
        ResultCode::InsufficientFunds => R::InsufficientFunds,
        ResultCode::InsufficientPosition => R::InsufficientPosition,
        ResultCode::AccountNotFound => R::AccountNotFound,
        ResultCode::AccountNotActive => R::AccountNotActive,
        ResultCode::OrderAlreadyReserved => R::OrderAlreadyReserved,
        ResultCode::ReservationNotFound => R::ReservationNotFound,
        ResultCode::IdempotencyConflict => R::IdempotencyConflict,
        ResultCode::AccountAlreadyExists => R::AccountAlreadyExists,
        ResultCode::AmountExceedsReservation => R::AmountExceedsReservation,
        ResultCode::AccountNotEmpty => R::AccountNotEmpty,
        ResultCode::CurrencyMismatch => R::CurrencyMismatch,
        ResultCode::AmountOverflow => R::AmountOverflow,
        ResultCode::ExpiryPassed => R::ExpiryPassed,
        ResultCode::InvalidArgument => R::InvalidArgument,
        ResultCode::LinkedRequestFailed => R::LinkedRequestFailed,
    }
}

/// Human text for `message`: empty on a fresh success.
pub fn message(outcome: &Outcome) -> String {
    match (outcome.result, outcome.replayed) {
        (ResultCode::Ok, false) => String::new(),
        (ResultCode::Ok, true) => "replayed: same key and payload as an earlier request".into(),
        (code, replayed) => {
            let text = match code {
                ResultCode::InsufficientFunds => "available cash is less than the amount",
                ResultCode::InsufficientPosition => "free shares are fewer than the amount",
                ResultCode::AccountNotFound => "no such account",
                ResultCode::AccountNotActive => "the account is not ACTIVE",
                ResultCode::OrderAlreadyReserved => "this order already has a reservation",
                ResultCode::ReservationNotFound => "no reservation for this order",
                ResultCode::IdempotencyConflict => "this key was used with a different payload",
                ResultCode::AccountAlreadyExists => "the account exists with another base currency",
                ResultCode::AmountExceedsReservation => "the amount exceeds what remains reserved",
                ResultCode::AccountNotEmpty => "balances, positions or reservations are not zero",
                ResultCode::CurrencyMismatch => "the position settles in another currency",
                ResultCode::AmountOverflow => {
                    "amount overflow: a result would leave 18 integer and 8 fractional digits"
                }
                ResultCode::ExpiryPassed => "expires_at_ms is at or before the time of the request",
                ResultCode::InvalidArgument => "a field of this item is malformed",
                ResultCode::LinkedRequestFailed => {
                    "not applied: another item of the all-or-nothing batch failed"
                }
                ResultCode::Ok => "",
            };
            if replayed {
                format!("{text} (replayed)")
            } else {
                text.into()
            }
        }
    }
}

pub fn status(s: AccountStatus) -> pb::AccountStatus {
    match s {
        AccountStatus::Active => pb::AccountStatus::Active,
        AccountStatus::Suspended => pb::AccountStatus::Suspended,
        AccountStatus::Closed => pb::AccountStatus::Closed,
    }
}

pub fn kind(k: ReservationKind) -> pb::ReservationKind {
    match k {
        ReservationKind::Cash => pb::ReservationKind::Cash,
        ReservationKind::Security => pb::ReservationKind::Security,
    }
}

pub fn reservation_state(s: ReservationState) -> pb::ReservationState {
    match s {
        ReservationState::Open => pb::ReservationState::Open,
        ReservationState::Consumed => pb::ReservationState::Consumed,
        ReservationState::Released => pb::ReservationState::Released,
        ReservationState::Expired => pb::ReservationState::Expired,
    }
}

pub fn reservation(r: &ReservationView) -> pb::Reservation {
    pb::Reservation {
        account_id: r.account_id.0,
        order_id: r.order_id.as_str().to_owned(),
        kind: kind(r.kind) as i32,
        asset: r.asset.as_str().to_owned(),
        amount: r.amount.to_string(),
        remaining: r.remaining.to_string(),
        consumed: r.consumed.to_string(),
        released: r.released.to_string(),
        state: reservation_state(r.state) as i32,
        expires_at_ms: r.expires_at_ms.unwrap_or(0),
        sequence: r.sequence,
    }
}

pub fn account(a: &AccountView) -> pb::Account {
    pb::Account {
        account_id: a.account_id.0,
        status: status(a.status) as i32,
        base_currency: a.base_currency.as_str().to_owned(),
        cash: a
            .cash
            .iter()
            .map(|b| pb::CashBalance {
                currency: b.currency.as_str().to_owned(),
                available: b.available.to_string(),
                reserved: b.reserved.to_string(),
            })
            .collect(),
        positions: a
            .positions
            .iter()
            .map(|p| pb::Position {
                symbol: p.symbol.as_str().to_owned(),
                quantity: p.quantity.to_string(),
                reserved_quantity: p.reserved_quantity.to_string(),
                cost_basis: p.cost_basis.to_string(),
                average_price: format(p.average_price),
                realized_pnl: p.realized_pnl.to_string(),
                currency: p.currency.as_str().to_owned(),
            })
            .collect(),
        overdrawn: a.overdrawn,
        sequence: a.sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_code_maps_to_its_proto_value() {
        for v in 1..=16u8 {
            let code = ResultCode::from_u8(v).expect("a result code");
            assert_eq!(result(code) as i32, i32::from(v), "{}", code.name());
            assert_eq!(
                result(code).as_str_name(),
                format!("RESULT_{}", code.name())
            );
        }
        assert!(ResultCode::from_u8(17).is_none());
    }
}
