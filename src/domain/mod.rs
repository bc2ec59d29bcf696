//! Value types shared by every layer: ids, assets, amounts, commands.

pub mod amount;
mod asset;
mod command;
mod ids;

pub use amount::Amount;
pub use asset::{Asset, Currency, Symbol, SYMBOL_LEN_MAX};
pub use command::{
    AccountStatus, CashMovement, Command, DeadLetter, DeadLetterReason, Fill, IdempotencyKey,
    KeySpace, OpenAccount, ReservationKind, Reserve, SetAccountStatus, Side, Source, StateConfig,
    Topic, Unreserve,
};
pub use ids::{AccountId, Id, IdError, ID_LEN_MAX};
pub use rust_decimal::Decimal;

/// Reads serialized bytes (for [`Id`] and [`Asset`], which check them).
struct BytesVisitor;

impl serde::de::Visitor<'_> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
}
