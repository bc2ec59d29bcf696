//! Journal encoding of a command: the payload of one WAL record (the WAL frames
//! it with length, CRC and sequence).
//!
//! ```text
//! +---------+-----+--------------+---------------------------------------+
//! | version | tag | timestamp_ms | fields of the command, in order       |
//! |   u8=1  | u8  |    i64 LE    | (see `encode`)                        |
//! +---------+-----+--------------+---------------------------------------+
//! id / asset      = u8 length, then that many UTF-8 bytes
//! decimal         = 16 bytes, rust_decimal's `serialize()` (exact, incl. scale)
//! option<T>       = u8 0 | u8 1, T
//! source          = topic u8, partition i32 LE, offset i64 LE
//! enums           = u8 of the domain enum's discriminant
//! dead letter     = source (always present), reason u8
//! configure       = idempotency_window_ms i64 LE (> 0), tick_work_max u32 LE (> 0)
//! basket          = u16 LE count (1..=BASKET_ITEMS_MAX), then each Reserve's fields
//! ```
//!
//! A basket is an all-or-nothing batch of Reserves: one record, one sequence,
//! so no crash can leave part of it journaled.
//!
//! Fixed-width little-endian fields, no allocation either way; decoding checks
//! every bound and enum value, so a record that passed the CRC but is not a
//! command (a bug, or a future version) is a typed error, not a panic.

use crate::domain::{
    AccountId, AccountStatus, Asset, CashMovement, Command, DeadLetter, DeadLetterReason, Decimal,
    Fill, Id, OpenAccount, ReservationKind, Reserve, SetAccountStatus, Side, Source, StateConfig,
    Topic, Unreserve,
};

pub const FORMAT_VERSION: u8 = 1;

/// Largest encoded command, in bytes (a fill: 2 ids, 4 decimals, ...).
pub const ENCODED_LEN_MAX: usize = 512;

/// Most Reserves in one all-or-nothing basket (one journal record).
pub const BASKET_ITEMS_MAX: usize = 1024;

/// Largest Reserve's fields: two ids, an account, kind, asset, amount, expiry.
const RESERVE_FIELDS_LEN_MAX: usize = 65 + 8 + 65 + 1 + 13 + 16 + 9;

/// Largest journal record: a full basket.
pub const RECORD_LEN_MAX: usize = 10 + 2 + BASKET_ITEMS_MAX * RESERVE_FIELDS_LEN_MAX;

/// One journal record: a command, or an all-or-nothing basket of Reserves.
// Decoded once per record and moved once: boxing the common case would
// allocate per record.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Command(Command),
    Basket(Vec<Reserve>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("journal record truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown journal format version {0}")]
    Version(u8),
    #[error("invalid {field} at byte {at}")]
    Invalid { field: &'static str, at: usize },
}

const TAG_OPEN: u8 = 1;
const TAG_STATUS: u8 = 2;
const TAG_RESERVE: u8 = 3;
const TAG_UNRESERVE: u8 = 4;
const TAG_DEPOSIT: u8 = 5;
const TAG_WITHDRAW: u8 = 6;
const TAG_FILL: u8 = 7;
const TAG_TICK: u8 = 8;
const TAG_DEAD_LETTER: u8 = 9;
const TAG_CONFIGURE: u8 = 10;
const TAG_BASKET: u8 = 11;

/// Appends the encoding of an all-or-nothing basket (1..=[`BASKET_ITEMS_MAX`]
/// Reserves) to `out` (cleared first).
pub fn encode_basket(items: &[Reserve], timestamp_ms: i64, out: &mut Vec<u8>) {
    assert!((1..=BASKET_ITEMS_MAX).contains(&items.len()), "basket size");
    out.clear();
    out.extend_from_slice(&[FORMAT_VERSION, TAG_BASKET]);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(&(items.len() as u16).to_le_bytes());
    let mut w = Writer(out);
    for c in items {
        w.reserve(c);
    }
    debug_assert!(out.len() <= RECORD_LEN_MAX);
}

/// Decodes any journal record: a command or a basket.
pub fn decode_record(bytes: &[u8]) -> Result<(Record, i64), CodecError> {
    if bytes.get(1) != Some(&TAG_BASKET) {
        return decode(bytes).map(|(c, ts)| (Record::Command(c), ts));
    }
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version(version));
    }
    r.u8()?;
    let timestamp_ms = r.i64()?;
    let at = r.at;
    let count = u16::from_le_bytes(r.array()?) as usize;
    if !(1..=BASKET_ITEMS_MAX).contains(&count) {
        return Err(CodecError::Invalid {
            field: "basket size",
            at,
        });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(r.reserve()?);
    }
    r.end()?;
    Ok((Record::Basket(items), timestamp_ms))
}

/// Appends the encoding of `(command, timestamp_ms)` to `out` (cleared first).
pub fn encode(command: &Command, timestamp_ms: i64, out: &mut Vec<u8>) {
    out.clear();
    let tag = match command {
        Command::OpenAccount(_) => TAG_OPEN,
        Command::SetAccountStatus(_) => TAG_STATUS,
        Command::Reserve(_) => TAG_RESERVE,
        Command::Unreserve(_) => TAG_UNRESERVE,
        Command::Deposit(_) => TAG_DEPOSIT,
        Command::Withdraw(_) => TAG_WITHDRAW,
        Command::Fill(_) => TAG_FILL,
        Command::Tick => TAG_TICK,
        Command::DeadLetter(_) => TAG_DEAD_LETTER,
        Command::Configure(_) => TAG_CONFIGURE,
    };
    out.extend_from_slice(&[FORMAT_VERSION, tag]);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    let mut w = Writer(out);
    match command {
        Command::OpenAccount(c) => {
            w.id(&c.request_id);
            w.account(c.account_id);
            w.asset(&c.base_currency);
        }
        Command::SetAccountStatus(c) => {
            w.id(&c.request_id);
            w.account(c.account_id);
            w.u8(c.status as u8);
            w.id(&c.reason);
        }
        Command::Reserve(c) => w.reserve(c),
        Command::Unreserve(c) => {
            w.id(&c.request_id);
            w.account(c.account_id);
            w.id(&c.order_id);
            match c.amount {
                Some(a) => {
                    w.u8(1);
                    w.dec(a);
                }
                None => w.u8(0),
            }
        }
        Command::Deposit(c) | Command::Withdraw(c) => {
            w.id(&c.event_id);
            w.account(c.account_id);
            w.asset(&c.currency);
            w.dec(c.amount);
            w.source(c.source);
        }
        Command::Fill(c) => {
            w.id(&c.event_id);
            w.account(c.account_id);
            w.id(&c.order_id);
            w.asset(&c.symbol);
            w.u8(c.side as u8);
            w.dec(c.quantity);
            w.dec(c.price);
            w.dec(c.filled_amount);
            match c.currency {
                Some(cur) => {
                    w.u8(1);
                    w.asset(&cur);
                }
                None => w.u8(0),
            }
            w.source(c.source);
        }
        Command::Tick => {}
        Command::DeadLetter(c) => {
            w.source(Some(c.source));
            w.u8(c.reason as u8);
        }
        Command::Configure(c) => {
            debug_assert!(c.is_valid());
            w.i64(c.idempotency_window_ms);
            w.0.extend_from_slice(&c.tick_work_max.to_le_bytes());
        }
    }
    debug_assert!(out.len() <= ENCODED_LEN_MAX);
}

/// Decodes a journal payload into `(command, timestamp_ms)`.
pub fn decode(bytes: &[u8]) -> Result<(Command, i64), CodecError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version(version));
    }
    let tag = r.u8()?;
    let timestamp_ms = r.i64()?;
    let command = match tag {
        TAG_OPEN => Command::OpenAccount(OpenAccount {
            request_id: r.id()?,
            account_id: r.account()?,
            base_currency: r.asset()?,
        }),
        TAG_STATUS => Command::SetAccountStatus(SetAccountStatus {
            request_id: r.id()?,
            account_id: r.account()?,
            status: r.enumerated("status", AccountStatus::from_u8)?,
            reason: r.id()?,
        }),
        TAG_RESERVE => Command::Reserve(r.reserve()?),
        TAG_UNRESERVE => Command::Unreserve(Unreserve {
            request_id: r.id()?,
            account_id: r.account()?,
            order_id: r.id()?,
            amount: if r.flag()? { Some(r.dec()?) } else { None },
        }),
        TAG_DEPOSIT | TAG_WITHDRAW => {
            let movement = CashMovement {
                event_id: r.id()?,
                account_id: r.account()?,
                currency: r.asset()?,
                amount: r.dec()?,
                source: r.source()?,
            };
            if tag == TAG_DEPOSIT {
                Command::Deposit(movement)
            } else {
                Command::Withdraw(movement)
            }
        }
        TAG_FILL => Command::Fill(Fill {
            event_id: r.id()?,
            account_id: r.account()?,
            order_id: r.id()?,
            symbol: r.asset()?,
            side: r.enumerated("side", Side::from_u8)?,
            quantity: r.dec()?,
            price: r.dec()?,
            filled_amount: r.dec()?,
            currency: if r.flag()? { Some(r.asset()?) } else { None },
            source: r.source()?,
        }),
        TAG_TICK => Command::Tick,
        TAG_DEAD_LETTER => {
            let at = r.at;
            let source = r.source()?.ok_or(CodecError::Invalid {
                field: "dead letter source",
                at,
            })?;
            Command::DeadLetter(DeadLetter {
                source,
                reason: r.enumerated("dead letter reason", DeadLetterReason::from_u8)?,
            })
        }
        TAG_CONFIGURE => {
            let at = r.at;
            let config = StateConfig {
                idempotency_window_ms: r.i64()?,
                tick_work_max: u32::from_le_bytes(r.array()?),
            };
            if !config.is_valid() {
                return Err(CodecError::Invalid {
                    field: "configuration",
                    at,
                });
            }
            Command::Configure(config)
        }
        _ => {
            return Err(CodecError::Invalid {
                field: "tag",
                at: 1,
            })
        }
    };
    r.end()?;
    Ok((command, timestamp_ms))
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn reserve(&mut self, c: &Reserve) {
        self.id(&c.request_id);
        self.account(c.account_id);
        self.id(&c.order_id);
        self.u8(c.kind as u8);
        self.asset(&c.asset);
        self.dec(c.amount);
        match c.expires_at_ms {
            Some(at) => {
                self.u8(1);
                self.i64(at);
            }
            None => self.u8(0),
        }
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn account(&mut self, v: AccountId) {
        self.i64(v.0);
    }
    fn bytes(&mut self, b: &[u8]) {
        debug_assert!(b.len() <= u8::MAX as usize);
        self.0.push(b.len() as u8);
        self.0.extend_from_slice(b);
    }
    fn id(&mut self, v: &Id) {
        self.bytes(v.as_bytes());
    }
    fn asset(&mut self, v: &Asset) {
        self.bytes(v.as_bytes());
    }
    fn dec(&mut self, v: Decimal) {
        self.0.extend_from_slice(&v.serialize());
    }
    fn source(&mut self, v: Option<Source>) {
        match v {
            Some(s) => {
                self.u8(1);
                self.u8(s.topic as u8);
                self.0.extend_from_slice(&s.partition.to_le_bytes());
                self.i64(s.offset);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn reserve(&mut self) -> Result<Reserve, CodecError> {
        Ok(Reserve {
            request_id: self.id()?,
            account_id: self.account()?,
            order_id: self.id()?,
            kind: self.enumerated("kind", ReservationKind::from_u8)?,
            asset: self.asset()?,
            amount: self.dec()?,
            expires_at_ms: if self.flag()? {
                Some(self.i64()?)
            } else {
                None
            },
        })
    }

    fn end(&self) -> Result<(), CodecError> {
        if self.at != self.bytes.len() {
            return Err(CodecError::Invalid {
                field: "trailing bytes",
                at: self.at,
            });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(CodecError::Truncated(self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, CodecError> {
        let at = self.at;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CodecError::Invalid {
                field: "option flag",
                at,
            }),
        }
    }
    fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn account(&mut self) -> Result<AccountId, CodecError> {
        let at = self.at;
        AccountId::new(self.i64()?).ok_or(CodecError::Invalid {
            field: "account_id",
            at,
        })
    }
    fn text(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn id(&mut self) -> Result<Id, CodecError> {
        let at = self.at;
        Id::from_utf8(self.text()?).ok_or(CodecError::Invalid { field: "id", at })
    }
    fn asset(&mut self) -> Result<Asset, CodecError> {
        let at = self.at;
        Asset::from_bytes(self.text()?).ok_or(CodecError::Invalid { field: "asset", at })
    }
    fn dec(&mut self) -> Result<Decimal, CodecError> {
        Ok(Decimal::deserialize(self.array()?))
    }
    fn enumerated<T>(
        &mut self,
        field: &'static str,
        f: fn(u8) -> Option<T>,
    ) -> Result<T, CodecError> {
        let at = self.at;
        f(self.u8()?).ok_or(CodecError::Invalid { field, at })
    }
    fn source(&mut self) -> Result<Option<Source>, CodecError> {
        if !self.flag()? {
            return Ok(None);
        }
        let topic = self.enumerated("topic", Topic::from_u8)?;
        let partition = i32::from_le_bytes(self.array()?);
        let offset = self.i64()?;
        Ok(Some(Source {
            topic,
            partition,
            offset,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn samples() -> Vec<Command> {
        let id = |s| Id::new(s).unwrap();
        let usd = Asset::currency("USD").unwrap();
        let acme = Asset::symbol("ACME").unwrap();
        let d = |s| Decimal::from_str(s).unwrap();
        vec![
            Command::OpenAccount(OpenAccount {
                request_id: id("r1"),
                account_id: AccountId(7),
                base_currency: usd,
            }),
            Command::SetAccountStatus(SetAccountStatus {
                request_id: id("r2"),
                account_id: AccountId(7),
                status: AccountStatus::Suspended,
                reason: Id::default(),
            }),
            Command::Reserve(Reserve {
                request_id: id("r3"),
                account_id: AccountId(7),
                order_id: id("o1"),
                kind: ReservationKind::Cash,
                asset: usd,
                amount: d("10.50"),
                expires_at_ms: Some(1_700_000_000_000),
            }),
            Command::Unreserve(Unreserve {
                request_id: id("r4"),
                account_id: AccountId(7),
                order_id: id("o1"),
                amount: None,
            }),
            Command::Deposit(CashMovement {
                event_id: id("e1"),
                account_id: AccountId(7),
                currency: usd,
                amount: d("0.00000001"),
                source: Some(Source {
                    topic: Topic::Deposits,
                    partition: 3,
                    offset: 99,
                }),
            }),
            Command::Withdraw(CashMovement {
                event_id: id("e2"),
                account_id: AccountId(7),
                currency: usd,
                amount: d("5"),
                source: None,
            }),
            Command::Fill(Fill {
                event_id: id("e3"),
                account_id: AccountId(7),
                order_id: id("o1"),
                symbol: acme,
                side: Side::Sell,
                quantity: d("3"),
                price: d("1.5"),
                filled_amount: d("4.5"),
                currency: Some(usd),
                source: None,
            }),
            Command::Tick,
            Command::DeadLetter(DeadLetter {
                source: Source {
                    topic: Topic::Fills,
                    partition: 2,
                    offset: 12_345,
                },
                reason: DeadLetterReason::InvalidField,
            }),
            Command::Configure(StateConfig {
                idempotency_window_ms: 60_000,
                tick_work_max: 7,
            }),
        ]
    }

    #[test]
    fn an_invalid_configuration_is_refused() {
        let mut buf = Vec::new();
        let config = StateConfig {
            idempotency_window_ms: 1,
            tick_work_max: 1,
        };
        encode(&Command::Configure(config), 5, &mut buf);
        assert!(decode(&buf).is_ok());
        let window_at = 10;
        let mut zero_window = buf.clone();
        zero_window[window_at] = 0;
        assert_eq!(
            decode(&zero_window),
            Err(CodecError::Invalid {
                field: "configuration",
                at: window_at
            })
        );
        let mut zero_work = buf.clone();
        zero_work[window_at + 8] = 0;
        assert!(decode(&zero_work).is_err());
    }

    #[test]
    fn round_trips_every_command() {
        let mut buf = Vec::new();
        for (i, c) in samples().into_iter().enumerate() {
            encode(&c, 1000 + i as i64, &mut buf);
            let (back, ts) = decode(&buf).unwrap();
            assert_eq!(back, c);
            assert_eq!(ts, 1000 + i as i64);
            // Scale survives: 10.50 stays 10.50, not 10.5.
            if let Command::Reserve(r) = back {
                assert_eq!(r.amount.scale(), 2);
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        for c in samples() {
            encode(&c, 1, &mut buf);
            for cut in 0..buf.len() {
                assert!(decode(&buf[..cut]).is_err());
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
        }
    }

    fn basket(n: usize, id_len: usize) -> Vec<Reserve> {
        (0..n)
            .map(|i| {
                let long = |prefix: &str| {
                    let s = format!("{prefix}{i}");
                    Id::new(&format!("{s}{}", "x".repeat(id_len - s.len()))).unwrap()
                };
                Reserve {
                    request_id: long("r"),
                    account_id: AccountId(i as i64 + 1),
                    order_id: long("o"),
                    kind: ReservationKind::Security,
                    asset: Asset::symbol("ABCDEFGH.JKL").unwrap(),
                    amount: Decimal::from_str("123456789012345678.12345678").unwrap(),
                    expires_at_ms: (i % 2 == 0).then_some(i64::MAX),
                }
            })
            .collect()
    }

    #[test]
    fn a_basket_round_trips_and_its_largest_fits_the_bound() {
        let mut buf = Vec::new();
        let items = basket(BASKET_ITEMS_MAX, 64);
        encode_basket(&items, 77, &mut buf);
        assert!(
            buf.len() <= RECORD_LEN_MAX,
            "{} > {RECORD_LEN_MAX}",
            buf.len()
        );
        assert!(
            buf.len() > RECORD_LEN_MAX - BASKET_ITEMS_MAX * 10,
            "the bound is tight"
        );
        assert_eq!(decode_record(&buf).unwrap(), (Record::Basket(items), 77));
        // A basket is not a command: `decode` refuses it by its tag.
        assert_eq!(
            decode(&buf),
            Err(CodecError::Invalid {
                field: "tag",
                at: 1
            })
        );
        // Every command decodes as a record too.
        for c in samples() {
            encode(&c, 5, &mut buf);
            assert_eq!(decode_record(&buf).unwrap(), (Record::Command(c), 5));
        }
    }

    #[test]
    fn a_damaged_basket_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_basket(&basket(3, 8), 1, &mut buf);
        for cut in 0..buf.len() {
            assert!(decode_record(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(decode_record(&longer).is_err());
        let mut empty = buf.clone();
        empty[10] = 0;
        empty[11] = 0;
        assert_eq!(
            decode_record(&empty),
            Err(CodecError::Invalid {
                field: "basket size",
                at: 10
            })
        );
    }
}
