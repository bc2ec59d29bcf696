//! Value types shared by every layer: ids, assets, amounts, commands.

pub mod amount;
mod asset;
mod command;
mod ids;

pub use asset::{Asset, Currency, Symbol, SYMBOL_LEN_MAX};
pub use command::{
    AccountStatus, CashMovement, Command, DeadLetter, DeadLetterReason, Fill, IdempotencyKey,
    KeySpace, OpenAccount, ReservationKind, Reserve, SetAccountStatus, Side, Source, StateConfig,
    Topic, Unreserve,
};
pub use ids::{AccountId, Id, IdError, ID_LEN_MAX};
pub use rust_decimal::Decimal;
