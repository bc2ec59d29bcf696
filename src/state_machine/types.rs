//! The state's rows and the values `apply` returns.

use crate::domain::{
    AccountId, AccountStatus, Amount, Asset, Currency, Decimal, Id, ReservationKind, Symbol,
};

/// Business outcome of a command. Mirrors `account.v1.Result` value for value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum ResultCode {
    Ok = 1,
    InsufficientFunds = 2,
    InsufficientPosition = 3,
    AccountNotFound = 4,
    AccountNotActive = 5,
    OrderAlreadyReserved = 6,
    ReservationNotFound = 7,
    IdempotencyConflict = 8,
    AccountAlreadyExists = 9,
    AmountExceedsReservation = 10,
    AccountNotEmpty = 11,
    /// A fill settles in a currency other than the one its position was opened in.
    CurrencyMismatch = 12,
    /// A balance, position, cost basis or P&L would leave 18 integer and 8
    /// fractional digits: refused, nothing changes.
    AmountOverflow = 13,
    /// A new Reserve whose expiry is at or before its journaled timestamp.
    ExpiryPassed = 14,
    /// One malformed item of a batch or stream (never produced by `apply`).
    InvalidArgument = 15,
    /// An all-or-nothing batch item not applied because another item failed
    /// (never produced by `apply` alone).
    LinkedRequestFailed = 16,
}

impl ResultCode {
    pub fn is_ok(self) -> bool {
        self == ResultCode::Ok
    }

    pub fn from_u8(v: u8) -> Option<ResultCode> {
        use ResultCode::*;
        Some(match v {
            1 => Ok,
            2 => InsufficientFunds,
            3 => InsufficientPosition,
            4 => AccountNotFound,
            5 => AccountNotActive,
            6 => OrderAlreadyReserved,
            7 => ReservationNotFound,
            8 => IdempotencyConflict,
            9 => AccountAlreadyExists,
            10 => AmountExceedsReservation,
            11 => AccountNotEmpty,
            12 => CurrencyMismatch,
            13 => AmountOverflow,
            14 => ExpiryPassed,
            15 => InvalidArgument,
            16 => LinkedRequestFailed,
            _ => return None,
        })
    }

    /// Upper-snake name without the `RESULT_` prefix, for messages, DLQ reasons and metrics.
    pub fn name(self) -> &'static str {
        use ResultCode::*;
        match self {
            Ok => "OK",
            InsufficientFunds => "INSUFFICIENT_FUNDS",
            InsufficientPosition => "INSUFFICIENT_POSITION",
            AccountNotFound => "ACCOUNT_NOT_FOUND",
            AccountNotActive => "ACCOUNT_NOT_ACTIVE",
            OrderAlreadyReserved => "ORDER_ALREADY_RESERVED",
            ReservationNotFound => "RESERVATION_NOT_FOUND",
            IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            AccountAlreadyExists => "ACCOUNT_ALREADY_EXISTS",
            AmountExceedsReservation => "AMOUNT_EXCEEDS_RESERVATION",
            AccountNotEmpty => "ACCOUNT_NOT_EMPTY",
            CurrencyMismatch => "CURRENCY_MISMATCH",
            AmountOverflow => "AMOUNT_OVERFLOW",
            ExpiryPassed => "EXPIRY_PASSED",
            InvalidArgument => "INVALID_ARGUMENT",
            LinkedRequestFailed => "LINKED_REQUEST_FAILED",
        }
    }
}

/// What a command did, as the caller sees it. `Copy` and small: it is also what
/// the idempotency table keeps, so a replay answers exactly the original outcome.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub result: ResultCode,
    /// True when this is the stored outcome of an earlier command with the same key.
    pub replayed: bool,
    /// Sequence of the command that produced the outcome (the original one for a replay).
    pub sequence: u64,
    /// The asset whose balances follow (cash currency or symbol), if any.
    pub asset: Option<Asset>,
    pub available: Amount,
    pub reserved: Amount,
    /// What an Unreserve released.
    pub released: Amount,
}

impl Outcome {
    pub const fn new(result: ResultCode, sequence: u64) -> Outcome {
        Outcome {
            result,
            replayed: false,
            sequence,
            asset: None,
            available: Amount::ZERO,
            reserved: Amount::ZERO,
            released: Amount::ZERO,
        }
    }

    pub fn with_balance(mut self, asset: Asset, available: Amount, reserved: Amount) -> Outcome {
        self.asset = Some(asset);
        self.available = available;
        self.reserved = reserved;
        self
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum ReservationState {
    Open = 1,
    Consumed = 2,
    Released = 3,
    Expired = 4,
}

impl ReservationState {
    pub fn from_u8(v: u8) -> Option<ReservationState> {
        use ReservationState::*;
        Some(match v {
            1 => Open,
            2 => Consumed,
            3 => Released,
            4 => Expired,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use ReservationState::*;
        match self {
            Open => "OPEN",
            Consumed => "CONSUMED",
            Released => "RELEASED",
            Expired => "EXPIRED",
        }
    }
}

#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct ReservationKey {
    pub account_id: AccountId,
    pub order_id: Id,
}

/// One order's lock on cash or shares. `amount = remaining + consumed + released`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
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
    /// Journaled time it left `Open` (0 while open): the idempotency window starts there.
    pub closed_at_ms: i64,
    /// Sequence of the command that closed it (0 while open). With the
    /// expiry order within one tick it restores the exact closing order,
    /// which decides what a tick with a work limit prunes.
    pub closed_sequence: u64,
}

impl Reservation {
    pub fn key(&self) -> ReservationKey {
        ReservationKey {
            account_id: self.account_id,
            order_id: self.order_id,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct CashBalance {
    pub currency: Currency,
    pub available: Amount,
    pub reserved: Amount,
}

/// A holding. Cost basis is the exact total cost of what is held (negative for a
/// short opened by an oversell); the average price is derived, never stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub symbol: Symbol,
    pub quantity: Amount,
    pub reserved_quantity: Amount,
    pub cost_basis: Amount,
    pub realized_pnl: Amount,
    /// Settlement currency, fixed by the first fill.
    pub currency: Currency,
}

impl Position {
    /// No shares, no cost, settling in `currency`.
    pub fn flat(symbol: Symbol, currency: Currency) -> Position {
        Position {
            symbol,
            quantity: Amount::ZERO,
            reserved_quantity: Amount::ZERO,
            cost_basis: Amount::ZERO,
            realized_pnl: Amount::ZERO,
            currency,
        }
    }

    /// `cost_basis / quantity`, half-even to 8 fractional digits; 0 when flat.
    /// For readers (exact `Decimal` division, then one rounding), never kept.
    pub fn average_price(&self) -> Decimal {
        if self.quantity.is_zero() {
            return Decimal::ZERO;
        }
        let quotient = self.cost_basis.to_decimal() / self.quantity.to_decimal();
        crate::domain::amount::round(quotient)
    }

    /// Shares not locked by an open sell reservation.
    pub fn free_quantity(&self) -> Amount {
        self.quantity - self.reserved_quantity
    }
}

/// An account and everything it holds. Cash balances are a short vector scanned
/// linearly (a handful of currencies); positions are a vector sorted by symbol
/// and found by binary search, so an account holding thousands of symbols costs
/// a fill `O(log n)`, while a `Vec` costs a fraction of a map's memory (design 6:
/// 1 M accounts, 5 M positions). A new symbol is inserted in order (a memmove,
/// once per symbol).
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub account_id: AccountId,
    pub status: AccountStatus,
    pub base_currency: Currency,
    pub overdrawn: bool,
    pub cash: Vec<CashBalance>,
    pub positions: Vec<Position>,
    /// Reservations of this account still `Open` (closing needs none).
    pub open_reservations: u32,
}

impl Account {
    pub fn new(account_id: AccountId, base_currency: Currency) -> Account {
        Account {
            account_id,
            status: AccountStatus::Active,
            base_currency,
            overdrawn: false,
            cash: Vec::new(),
            positions: Vec::new(),
            open_reservations: 0,
        }
    }

    pub fn cash(&self, currency: Currency) -> Option<&CashBalance> {
        self.cash.iter().find(|b| b.currency == currency)
    }

    pub fn position(&self, symbol: Symbol) -> Option<&Position> {
        let i = self.position_index(symbol).ok()?;
        Some(&self.positions[i])
    }

    /// The position in `symbol`, if the account holds one.
    pub fn position_mut(&mut self, symbol: Symbol) -> Option<&mut Position> {
        let i = self.position_index(symbol).ok()?;
        Some(&mut self.positions[i])
    }

    /// Positions are in alphabetical order of their symbols (as a reader
    /// of `GetAccount` expects them).
    fn position_index(&self, symbol: Symbol) -> Result<usize, usize> {
        debug_assert!(self
            .positions
            .is_sorted_by(|a, b| a.symbol.as_bytes() <= b.symbol.as_bytes()));
        let wanted = symbol.order_key();
        self.positions
            .binary_search_by(|p| p.symbol.order_key().cmp(&wanted))
    }

    /// Puts the positions in the order lookups need (by symbol): for rows
    /// read back in another order.
    pub fn sort_positions(&mut self) {
        self.positions
            .sort_unstable_by(|a, b| a.symbol.as_bytes().cmp(b.symbol.as_bytes()));
    }

    /// Whether the balance or position in `asset` is negative (see
    /// [`Account::computes_overdrawn`]).
    pub fn is_negative_in(&self, asset: crate::domain::Asset) -> bool {
        self.cash(asset).is_some_and(|b| b.available.is_negative())
            || self
                .position(asset)
                .is_some_and(|p| p.free_quantity().is_negative())
    }

    /// The balance in `currency`, created at zero if absent.
    pub fn cash_entry(&mut self, currency: Currency) -> &mut CashBalance {
        let i = match self.cash.iter().position(|b| b.currency == currency) {
            Some(i) => i,
            None => {
                self.cash.push(CashBalance {
                    currency,
                    available: Amount::ZERO,
                    reserved: Amount::ZERO,
                });
                self.cash.len() - 1
            }
        };
        &mut self.cash[i]
    }

    /// The position in `symbol`, created flat (settling in `currency`) if absent.
    pub fn position_entry(&mut self, symbol: Symbol, currency: Currency) -> &mut Position {
        let i = match self.position_index(symbol) {
            Ok(i) => i,
            Err(i) => {
                self.positions.insert(i, Position::flat(symbol, currency));
                i
            }
        };
        &mut self.positions[i]
    }

    /// Negative available cash, or fewer shares than are locked (an oversell).
    pub fn computes_overdrawn(&self) -> bool {
        self.cash.iter().any(|b| b.available.is_negative())
            || self
                .positions
                .iter()
                .any(|p| p.free_quantity().is_negative())
    }

    /// Closing needs every balance, position and reservation at zero.
    pub fn is_empty(&self) -> bool {
        self.cash
            .iter()
            .all(|b| b.available.is_zero() && b.reserved.is_zero())
            && self
                .positions
                .iter()
                .all(|p| p.quantity.is_zero() && p.reserved_quantity.is_zero())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    Reserved = 1,
    Unreserved = 2,
    ReservationExpired = 3,
    FillApplied = 4,
    Deposited = 5,
    Withdrawn = 6,
    WithdrawalRejected = 7,
    Overdrawn = 8,
    AccountOpened = 9,
    StatusChanged = 10,
}

impl EventKind {
    /// The proto's enum name without its prefix, as the read model stores it.
    pub fn name(self) -> &'static str {
        use EventKind::*;
        match self {
            Reserved => "RESERVED",
            Unreserved => "UNRESERVED",
            ReservationExpired => "RESERVATION_EXPIRED",
            FillApplied => "FILL_APPLIED",
            Deposited => "DEPOSITED",
            Withdrawn => "WITHDRAWN",
            WithdrawalRejected => "WITHDRAWAL_REJECTED",
            Overdrawn => "OVERDRAWN",
            AccountOpened => "ACCOUNT_OPENED",
            StatusChanged => "STATUS_CHANGED",
        }
    }
}

/// An account event, as `apply` derives it. The sequence, timestamp and cause id
/// come from the journaled command it belongs to; `event_id` is
/// `"<sequence>-<index>"`, so re-deriving after a restart gives the same ids.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub account_id: AccountId,
    pub order_id: Option<Id>,
    pub asset: Option<Asset>,
    pub amount: Amount,
    pub available_after: Amount,
    pub reserved_after: Amount,
    pub reason: Id,
}

/// Where `apply` puts the events it derives. The engine passes a reusable `Vec`
/// when events are published, and [`NoEvents`] when nobody listens.
pub trait EventSink {
    fn push(&mut self, event: Event);

    /// The events that follow belong to the item keyed `request_id` (the
    /// items of an all-or-nothing basket share one journal record).
    fn cause(&mut self, _request_id: Id) {}
}

impl EventSink for Vec<Event> {
    fn push(&mut self, event: Event) {
        Vec::push(self, event)
    }
}

/// Discards events.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn push(&mut self, _event: Event) {}
}
