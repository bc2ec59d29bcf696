//! Commands: the typed, already-validated inputs of the state machine. Ingress
//! (gRPC, Kafka) builds them; the engine journals them; `apply` executes them.
//! Every field is `Copy`: no allocation between the edge and the journal.

use super::{AccountId, Asset, Currency, Id, Symbol};
use rust_decimal::Decimal;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum AccountStatus {
    Active = 1,
    Suspended = 2,
    Closed = 3,
}

impl AccountStatus {
    pub fn from_u8(v: u8) -> Option<AccountStatus> {
        match v {
            1 => Some(AccountStatus::Active),
            2 => Some(AccountStatus::Suspended),
            3 => Some(AccountStatus::Closed),
            _ => None,
        }
    }

    /// The proto enum value's name without its prefix (the read model's spelling).
    pub fn name(self) -> &'static str {
        match self {
            AccountStatus::Active => "ACTIVE",
            AccountStatus::Suspended => "SUSPENDED",
            AccountStatus::Closed => "CLOSED",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum ReservationKind {
    /// Cash of a currency, for a buy.
    Cash = 1,
    /// Shares of a symbol, for a sell.
    Security = 2,
}

impl ReservationKind {
    pub fn from_u8(v: u8) -> Option<ReservationKind> {
        match v {
            1 => Some(ReservationKind::Cash),
            2 => Some(ReservationKind::Security),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReservationKind::Cash => "CASH",
            ReservationKind::Security => "SECURITY",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Side {
    Buy = 1,
    Sell = 2,
}

impl Side {
    pub fn from_u8(v: u8) -> Option<Side> {
        match v {
            1 => Some(Side::Buy),
            2 => Some(Side::Sell),
            _ => None,
        }
    }
}

/// The inbound Kafka topics, by role (their names are configuration).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub enum Topic {
    Fills = 1,
    Deposits = 2,
    Withdrawals = 3,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Fills, Topic::Deposits, Topic::Withdrawals];

    pub fn from_u8(v: u8) -> Option<Topic> {
        match v {
            1 => Some(Topic::Fills),
            2 => Some(Topic::Deposits),
            3 => Some(Topic::Withdrawals),
            _ => None,
        }
    }
}

/// Where a Kafka-borne command came from. Journaled with the command, so the
/// consumer offsets are part of the state and recovered exactly with it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
}

/// Why the consumer could not turn a Kafka message into a command. Journaled
/// (see [`Command::DeadLetter`]); the DLQ header's text is re-derived from the
/// message itself, so only the class is kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub enum DeadLetterReason {
    /// The payload is not a protobuf message of the topic's type.
    NotProtobuf = 1,
    /// It decodes, but a field fails validation (bad decimal, unknown side,
    /// `filled_amount` != price x quantity, ...).
    InvalidField = 2,
}

impl DeadLetterReason {
    pub fn from_u8(v: u8) -> Option<DeadLetterReason> {
        match v {
            1 => Some(DeadLetterReason::NotProtobuf),
            2 => Some(DeadLetterReason::InvalidField),
            _ => None,
        }
    }

    /// Metric label and DLQ reason class.
    pub fn name(self) -> &'static str {
        match self {
            DeadLetterReason::NotProtobuf => "NOT_PROTOBUF",
            DeadLetterReason::InvalidField => "INVALID_FIELD",
        }
    }
}

/// A Kafka message that goes to its topic's dead-letter queue. Journaled like
/// any Kafka command so that its offset is consumed exactly once and the DLQ
/// record is re-derived from the journal after a restart, never re-decided.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeadLetter {
    pub source: Source,
    pub reason: DeadLetterReason,
}

/// The two idempotency key spaces (design 3). They never collide: a
/// `request_id` of the Order service or an operator can never block an
/// `event_id` of the Matching engine or the Payment service, nor the reverse.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub enum KeySpace {
    /// `request_id` of Reserve, Unreserve, OpenAccount, SetAccountStatus.
    Requests = 1,
    /// `event_id` of fills, deposits and withdrawals (Kafka or AdminService).
    Events = 2,
}

impl KeySpace {
    pub fn from_u8(v: u8) -> Option<KeySpace> {
        match v {
            1 => Some(KeySpace::Requests),
            2 => Some(KeySpace::Events),
            _ => None,
        }
    }
}

/// An idempotency key: the same id in the two spaces is two keys.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct IdempotencyKey {
    pub space: KeySpace,
    pub id: Id,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Reserve {
    pub request_id: Id,
    pub account_id: AccountId,
    pub order_id: Id,
    pub kind: ReservationKind,
    pub asset: Asset,
    pub amount: Decimal,
    /// Unix ms; `None` = no expiry.
    pub expires_at_ms: Option<i64>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Unreserve {
    pub request_id: Id,
    pub account_id: AccountId,
    pub order_id: Id,
    /// `None` = all that remains.
    pub amount: Option<Decimal>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub struct OpenAccount {
    pub request_id: Id,
    pub account_id: AccountId,
    pub base_currency: Currency,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub struct SetAccountStatus {
    pub request_id: Id,
    pub account_id: AccountId,
    pub status: AccountStatus,
    pub reason: Id,
}

/// A deposit or a withdrawal: same shape, see [`Command::Deposit`] / [`Command::Withdraw`].
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct CashMovement {
    pub event_id: Id,
    pub account_id: AccountId,
    pub currency: Currency,
    pub amount: Decimal,
    pub source: Option<Source>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Fill {
    pub event_id: Id,
    pub account_id: AccountId,
    pub order_id: Id,
    pub symbol: Symbol,
    pub side: Side,
    pub quantity: Decimal,
    pub price: Decimal,
    /// Checked at the edge: equals `round(price x quantity)`.
    pub filled_amount: Decimal,
    /// `None` = the account's base currency.
    pub currency: Option<Currency>,
    pub source: Option<Source>,
}

/// Limits and windows of the state machine: part of the deterministic input,
/// so they are journaled ([`Command::Configure`]) and replay applies what the
/// journal says, never the flags of the process that replays.
///
/// A fresh log starts with [`StateConfig::default`]; the engine journals a
/// `Configure` before it serves whenever its flags say otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateConfig {
    /// How long idempotency keys, and closed reservations (with their
    /// `(account_id, order_id)`), are kept, in journaled time. > 0.
    pub idempotency_window_ms: i64,
    /// Most expiries plus prunings one tick performs; the rest waits for the next
    /// tick, so one tick never stalls the writer. > 0.
    pub tick_work_max: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            idempotency_window_ms: 24 * 3600 * 1000,
            tick_work_max: 10_000,
        }
    }
}

impl StateConfig {
    pub fn is_valid(&self) -> bool {
        self.idempotency_window_ms > 0 && self.tick_work_max > 0
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Command {
    OpenAccount(OpenAccount),
    SetAccountStatus(SetAccountStatus),
    Reserve(Reserve),
    Unreserve(Unreserve),
    Deposit(CashMovement),
    Withdraw(CashMovement),
    Fill(Fill),
    /// Journaled passage of time: expires reservations and prunes idempotency keys
    /// and closed reservations whose window has passed.
    Tick,
    /// A malformed Kafka message: consumes its offset and changes nothing else.
    DeadLetter(DeadLetter),
    /// The state machine's settings from this sequence on (valid: see
    /// [`StateConfig::is_valid`]).
    Configure(StateConfig),
}

impl Command {
    /// The idempotency key (request_id or event_id, in its space); `None`
    /// for the commands that have none (ticks, dead letters, configuration).
    pub fn key(&self) -> Option<IdempotencyKey> {
        let (space, &id) = self.key_parts()?;
        Some(IdempotencyKey { space, id })
    }

    /// The key's space and id, without copying the id.
    pub fn key_parts(&self) -> Option<(KeySpace, &Id)> {
        Some(match self {
            Command::OpenAccount(c) => (KeySpace::Requests, &c.request_id),
            Command::SetAccountStatus(c) => (KeySpace::Requests, &c.request_id),
            Command::Reserve(c) => (KeySpace::Requests, &c.request_id),
            Command::Unreserve(c) => (KeySpace::Requests, &c.request_id),
            Command::Deposit(c) | Command::Withdraw(c) => (KeySpace::Events, &c.event_id),
            Command::Fill(c) => (KeySpace::Events, &c.event_id),
            Command::Tick | Command::DeadLetter(_) | Command::Configure(_) => return None,
        })
    }

    pub fn account_id(&self) -> Option<AccountId> {
        match self {
            Command::OpenAccount(c) => Some(c.account_id),
            Command::SetAccountStatus(c) => Some(c.account_id),
            Command::Reserve(c) => Some(c.account_id),
            Command::Unreserve(c) => Some(c.account_id),
            Command::Deposit(c) | Command::Withdraw(c) => Some(c.account_id),
            Command::Fill(c) => Some(c.account_id),
            Command::Tick | Command::DeadLetter(_) | Command::Configure(_) => None,
        }
    }

    pub fn source(&self) -> Option<Source> {
        match self {
            Command::Deposit(c) | Command::Withdraw(c) => c.source,
            Command::Fill(c) => c.source,
            Command::DeadLetter(c) => Some(c.source),
            _ => None,
        }
    }

    /// A stable 64-bit fingerprint of the payload, for idempotency: the same key
    /// with a different fingerprint is a conflict. The Kafka source is left out,
    /// so the same event by Kafka and by AdminService is the same payload.
    /// Amounts are compared at a fixed scale, so "10" and "10.00" are the same payload.
    /// One-shot xxh3 over a stack buffer: no allocation, no streaming state.
    pub fn fingerprint(&self) -> u64 {
        let mut buf = Fingerprint::default();
        match self {
            Command::OpenAccount(c) => {
                buf.put(&[1]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.put(c.base_currency.as_bytes());
            }
            Command::SetAccountStatus(c) => {
                buf.put(&[2, c.status as u8]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.put(c.reason.as_bytes());
            }
            Command::Reserve(c) => {
                buf.put(&[3, c.kind as u8]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.text(c.order_id.as_bytes());
                buf.text(c.asset.as_bytes());
                buf.dec(&c.amount);
                buf.put(&c.expires_at_ms.unwrap_or(0).to_le_bytes());
            }
            Command::Unreserve(c) => {
                buf.put(&[4]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.text(c.order_id.as_bytes());
                match &c.amount {
                    Some(a) => buf.dec(a),
                    None => buf.put(&[0]),
                }
            }
            Command::Deposit(c) | Command::Withdraw(c) => {
                buf.put(&[if matches!(self, Command::Deposit(_)) {
                    5
                } else {
                    6
                }]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.text(c.currency.as_bytes());
                buf.dec(&c.amount);
            }
            Command::Fill(c) => {
                buf.put(&[7, c.side as u8]);
                buf.put(&c.account_id.0.to_le_bytes());
                buf.text(c.order_id.as_bytes());
                buf.text(c.symbol.as_bytes());
                buf.dec(&c.quantity);
                buf.dec(&c.price);
                buf.dec(&c.filled_amount);
                if let Some(cur) = c.currency {
                    buf.text(cur.as_bytes());
                }
            }
            Command::Tick => buf.put(&[8]),
            Command::DeadLetter(c) => buf.put(&[9, c.reason as u8]),
            Command::Configure(c) => {
                buf.put(&[10]);
                buf.put(&c.idempotency_window_ms.to_le_bytes());
                buf.put(&c.tick_work_max.to_le_bytes());
            }
        }
        xxhash_rust::xxh3::xxh3_64(&buf.bytes[..buf.len])
    }
}

/// The fingerprint's input: every field of the largest command fits (a fill:
/// 2 + 8 + 65 + 13 + 3 x 16 + 4 bytes).
struct Fingerprint {
    bytes: [u8; 192],
    len: usize,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint {
            bytes: [0; 192],
            len: 0,
        }
    }
}

impl Fingerprint {
    fn put(&mut self, b: &[u8]) {
        self.bytes[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// Length-prefixed, so adjacent texts cannot run into each other.
    fn text(&mut self, b: &[u8]) {
        debug_assert!(b.len() <= u8::MAX as usize);
        self.put(&[b.len() as u8]);
        self.put(b);
    }

    /// At a fixed scale of 8 ("10" and "10.00" give the same bytes): the
    /// bytes of `Decimal::rescale(8)` then `serialize`, computed from the
    /// mantissa with one multiplication.
    fn dec(&mut self, d: &Decimal) {
        self.put(&fixed_scale_bytes(d));
    }
}

/// `d` rescaled to 8 fractional digits, serialized (`Decimal::serialize`:
/// flags, then the 96-bit magnitude as three little-endian words). The
/// fingerprints of journaled and snapshotted keys depend on these bytes:
/// they must never change. Amounts past that scale or that range (none
/// pass validation) take `rescale` itself.
fn fixed_scale_bytes(d: &Decimal) -> [u8; 16] {
    use crate::domain::amount::{POW10, SCALE_MAX as SCALE};
    let scale = d.scale();
    let magnitude = d.mantissa().unsigned_abs();
    let fixed = (scale <= SCALE)
        .then(|| magnitude.checked_mul(POW10[(SCALE - scale) as usize]))
        .flatten()
        .filter(|&m| m < 1u128 << 96);
    let Some(fixed) = fixed else {
        return rescaled_bytes(d);
    };
    let sign = if d.is_sign_negative() { 1u32 << 31 } else { 0 };
    let flags = sign | (SCALE << 16);
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&flags.to_le_bytes());
    out[4..].copy_from_slice(&fixed.to_le_bytes()[..12]);
    debug_assert_eq!(out, rescaled_bytes(d));
    out
}

/// The definition [`fixed_scale_bytes`] computes faster.
fn rescaled_bytes(d: &Decimal) -> [u8; 16] {
    let mut fixed = *d;
    fixed.rescale(crate::domain::amount::SCALE_MAX);
    fixed.serialize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_scale_bytes_are_rescale_then_serialize_at_the_edges() {
        let cases = [
            Decimal::ZERO,
            -Decimal::ZERO,
            Decimal::new(0, 8),
            Decimal::new(1, 8),
            Decimal::new(-1, 8),
            Decimal::new(10_050, 2),
            Decimal::from(10),
            Decimal::from_i128_with_scale(10i128.pow(26) - 1, 8),
            Decimal::from_i128_with_scale(10i128.pow(18) - 1, 0),
            Decimal::from_i128_with_scale(-(10i128.pow(18) - 1), 0),
            // Past the range and the scale: the slow path.
            Decimal::from_i128_with_scale(10i128.pow(27), 0),
            Decimal::new(123_456_789, 9),
            Decimal::MAX,
        ];
        for d in cases {
            assert_eq!(fixed_scale_bytes(&d), rescaled_bytes(&d), "{d:?}");
        }
        // "10" and "10.00" are the same payload.
        assert_eq!(
            fixed_scale_bytes(&Decimal::new(1000, 2)),
            fixed_scale_bytes(&Decimal::from(10))
        );
    }

    proptest! {
        #[test]
        fn fixed_scale_bytes_are_rescale_then_serialize(
            mantissa in -(10i128.pow(26))..10i128.pow(26),
            scale in 0u32..=10,
        ) {
            let d = Decimal::from_i128_with_scale(mantissa, scale);
            prop_assert_eq!(fixed_scale_bytes(&d), rescaled_bytes(&d));
        }
    }
}
