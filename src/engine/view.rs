//! What a reply shows of the state: plain values copied out on the engine
//! thread when the reply is made. Ingress and the wire conversions see the
//! state only through these (and the outcome values re-exported here), never
//! the state machine's rows, so the state can change its layout freely.

use crate::domain::{
    AccountId, AccountStatus, Amount, Asset, Currency, Decimal, Id, ReservationKind,
};
use crate::state_machine::{Account, Reservation};

pub use crate::state_machine::{Outcome, ReservationState, ResultCode};

/// A reservation as the caller sees it (without the state's bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservationView {
    pub account_id: AccountId,
    pub order_id: Id,
    pub kind: ReservationKind,
    pub asset: Asset,
    pub amount: Amount,
    pub remaining: Amount,
    pub consumed: Amount,
    pub released: Amount,
    pub state: ReservationState,
    /// Unix ms; `None` = no expiry.
    pub expires_at_ms: Option<i64>,
    /// Sequence of the Reserve that created it.
    pub sequence: u64,
}

impl From<&Reservation> for ReservationView {
    fn from(r: &Reservation) -> ReservationView {
        ReservationView {
            account_id: r.account_id,
            order_id: r.order_id,
            kind: r.kind,
            asset: r.asset,
            amount: r.amount,
            remaining: r.remaining,
            consumed: r.consumed,
            released: r.released,
            state: r.state,
            expires_at_ms: r.expires_at_ms,
            sequence: r.sequence,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CashView {
    pub currency: Currency,
    pub available: Amount,
    pub reserved: Amount,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionView {
    pub symbol: Asset,
    pub quantity: Amount,
    pub reserved_quantity: Amount,
    pub cost_basis: Amount,
    /// Derived from the cost basis and quantity when the view is made.
    pub average_price: Decimal,
    pub realized_pnl: Amount,
    pub currency: Currency,
}

/// An account's balances and positions at `sequence`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub account_id: AccountId,
    pub status: AccountStatus,
    pub base_currency: Currency,
    pub overdrawn: bool,
    pub cash: Vec<CashView>,
    pub positions: Vec<PositionView>,
    /// Sequence of the state the view was read at.
    pub sequence: u64,
}

impl AccountView {
    pub fn of(a: &Account, sequence: u64) -> AccountView {
        AccountView {
            account_id: a.account_id,
            status: a.status,
            base_currency: a.base_currency,
            overdrawn: a.overdrawn,
            cash: a
                .cash
                .iter()
                .map(|b| CashView {
                    currency: b.currency,
                    available: b.available,
                    reserved: b.reserved,
                })
                .collect(),
            positions: a
                .positions
                .iter()
                .map(|p| PositionView {
                    symbol: p.symbol,
                    quantity: p.quantity,
                    reserved_quantity: p.reserved_quantity,
                    cost_basis: p.cost_basis,
                    average_price: p.average_price(),
                    realized_pnl: p.realized_pnl,
                    currency: p.currency,
                })
                .collect(),
            sequence,
        }
    }
}
