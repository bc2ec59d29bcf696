//! Validation at the edge: wire messages in, typed commands out. Everything the
//! state machine trusts is checked here; a failure names the field and nothing
//! reaches the engine. Shared by gRPC (INVALID_ARGUMENT) and Kafka (DLQ reason).

use crate::domain::amount::{self, parse_amount, parse_positive};
use crate::domain::{
    AccountId, AccountStatus, Asset, CashMovement, Decimal, Fill, Id, OpenAccount, ReservationKind,
    Reserve, SetAccountStatus, Side, Source, Unreserve,
};
use crate::proto::account::v1 as pb;
use crate::proto::events;
use std::fmt;

/// A malformed field: `"<field>: <reason>"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn err(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        reason: reason.into(),
    }
}

pub fn id(field: &'static str, value: &str) -> Result<Id, FieldError> {
    Id::new(value).map_err(|e| err(field, e.to_string()))
}

pub fn account_id(field: &'static str, value: i64) -> Result<AccountId, FieldError> {
    AccountId::new(value).ok_or_else(|| err(field, "must be greater than zero"))
}

pub fn currency(field: &'static str, value: &str) -> Result<Asset, FieldError> {
    Asset::currency(value).ok_or_else(|| err(field, "must be 3 upper-case letters (ISO 4217)"))
}

pub fn symbol(field: &'static str, value: &str) -> Result<Asset, FieldError> {
    Asset::symbol(value).ok_or_else(|| err(field, "must be 1-12 of A-Z 0-9 . -"))
}

pub fn positive(field: &'static str, value: &str) -> Result<Decimal, FieldError> {
    parse_positive(value).map_err(|e| err(field, e.to_string()))
}

/// A Reserve request. `now_ms` is the edge's clock and `idempotency_window_ms`
/// the engine's window: an expiry that is merely past is the state machine's
/// call (a retry of an acknowledged Reserve must replay its reply, a new one
/// gets `RESULT_EXPIRY_PASSED`), but one older than the window cannot belong
/// to a retry, whose key would have left the window, so it is malformed.
pub fn reserve(
    r: &pb::ReserveRequest,
    now_ms: i64,
    idempotency_window_ms: i64,
) -> Result<Reserve, FieldError> {
    debug_assert!(idempotency_window_ms > 0);
    let kind = match pb::ReservationKind::try_from(r.kind) {
        Ok(pb::ReservationKind::Cash) => ReservationKind::Cash,
        Ok(pb::ReservationKind::Security) => ReservationKind::Security,
        _ => {
            return Err(err(
                "kind",
                "must be RESERVATION_KIND_CASH or RESERVATION_KIND_SECURITY",
            ))
        }
    };
    let expires_at_ms = match r.expires_at_ms {
        0 => None,
        at if at < 0 => {
            return Err(err(
                "expires_at_ms",
                "must be 0 (none) or unix milliseconds",
            ))
        }
        at if at <= now_ms.saturating_sub(idempotency_window_ms) => return Err(err(
            "expires_at_ms",
            "is older than the idempotency window: no retry of an earlier request can be that old",
        )),
        at => Some(at),
    };
    Ok(Reserve {
        request_id: id("request_id", &r.request_id)?,
        account_id: account_id("account_id", r.account_id)?,
        order_id: id("order_id", &r.order_id)?,
        kind,
        asset: match kind {
            ReservationKind::Cash => currency("asset", &r.asset)?,
            ReservationKind::Security => symbol("asset", &r.asset)?,
        },
        amount: positive("amount", &r.amount)?,
        expires_at_ms,
    })
}

pub fn unreserve(r: &pb::UnreserveRequest) -> Result<Unreserve, FieldError> {
    Ok(Unreserve {
        request_id: id("request_id", &r.request_id)?,
        account_id: account_id("account_id", r.account_id)?,
        order_id: id("order_id", &r.order_id)?,
        amount: if r.amount.is_empty() {
            None
        } else {
            Some(positive("amount", &r.amount)?)
        },
    })
}

pub fn open_account(r: &pb::OpenAccountRequest) -> Result<OpenAccount, FieldError> {
    Ok(OpenAccount {
        request_id: id("request_id", &r.request_id)?,
        account_id: account_id("account_id", r.account_id)?,
        base_currency: currency("base_currency", &r.base_currency)?,
    })
}

pub fn set_account_status(r: &pb::SetAccountStatusRequest) -> Result<SetAccountStatus, FieldError> {
    let status = match pb::AccountStatus::try_from(r.status) {
        Ok(pb::AccountStatus::Active) => AccountStatus::Active,
        Ok(pb::AccountStatus::Suspended) => AccountStatus::Suspended,
        Ok(pb::AccountStatus::Closed) => AccountStatus::Closed,
        _ => return Err(err("status", "must be ACTIVE, SUSPENDED or CLOSED")),
    };
    Ok(SetAccountStatus {
        request_id: id("request_id", &r.request_id)?,
        account_id: account_id("account_id", r.account_id)?,
        status,
        reason: Id::new_allow_empty(&r.reason).map_err(|e| err("reason", e.to_string()))?,
    })
}

pub fn deposit(
    r: &events::DepositEvent,
    source: Option<Source>,
) -> Result<CashMovement, FieldError> {
    cash_movement(&r.event_id, r.account_id, &r.currency, &r.amount, source)
}

pub fn withdrawal(
    r: &events::WithdrawEvent,
    source: Option<Source>,
) -> Result<CashMovement, FieldError> {
    cash_movement(&r.event_id, r.account_id, &r.currency, &r.amount, source)
}

fn cash_movement(
    event_id: &str,
    account: i64,
    cur: &str,
    amount: &str,
    source: Option<Source>,
) -> Result<CashMovement, FieldError> {
    Ok(CashMovement {
        event_id: id("event_id", event_id)?,
        account_id: account_id("account_id", account)?,
        currency: currency("currency", cur)?,
        amount: positive("amount", amount)?,
        source,
    })
}

pub fn fill(r: &events::FillEvent, source: Option<Source>) -> Result<Fill, FieldError> {
    let side = match r.side.as_str() {
        "BUY" => Side::Buy,
        "SELL" => Side::Sell,
        _ => return Err(err("side", "must be BUY or SELL")),
    };
    let quantity = positive("quantity", &r.quantity)?;
    let price = positive("fill_price", &r.fill_price)?;
    let filled_amount =
        parse_amount(&r.filled_amount).map_err(|e| err("filled_amount", e.to_string()))?;
    let notional = amount::notional(price, quantity).ok_or_else(|| {
        err(
            "filled_amount",
            "fill_price x quantity leaves 18 integer digits (amount overflow)",
        )
    })?;
    if notional != filled_amount {
        return Err(err(
            "filled_amount",
            format!(
                "must equal fill_price x quantity = {} (half-even to 8 places)",
                amount::format(notional)
            ),
        ));
    }
    Ok(Fill {
        event_id: id("event_id", &r.event_id)?,
        account_id: account_id("account_id", r.account_id)?,
        order_id: id("order_id", &r.order_id)?,
        symbol: symbol("symbol", &r.symbol)?,
        side,
        quantity,
        price,
        filled_amount,
        currency: if r.currency.is_empty() {
            None
        } else {
            Some(currency("currency", &r.currency)?)
        },
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_fill() -> events::FillEvent {
        events::FillEvent {
            event_id: "f1".into(),
            order_id: "o1".into(),
            account_id: 1,
            symbol: "ACME".into(),
            side: "BUY".into(),
            quantity: "3".into(),
            fill_price: "0.33333333".into(),
            filled_amount: "0.99999999".into(),
            timestamp: 0,
            currency: String::new(),
        }
    }

    #[test]
    fn fill_amount_must_match_price_times_quantity() {
        assert!(fill(&good_fill(), None).is_ok());
        let mut f = good_fill();
        f.filled_amount = "1".into();
        assert_eq!(fill(&f, None).unwrap_err().field, "filled_amount");
        // 0.125 x 0.5 = 0.0625 exactly; 1.00000005 x 0.5 = 0.500000025 -> 0.50000002 (half-even)
        let mut f = good_fill();
        f.fill_price = "1.00000005".into();
        f.quantity = "0.5".into();
        f.filled_amount = "0.50000002".into();
        assert!(fill(&f, None).is_ok());
        // A product past the range is malformed, never rounded into it.
        let mut f = good_fill();
        f.fill_price = "999999999999999999.99999999".into();
        f.quantity = "2".into();
        f.filled_amount = "999999999999999999.99999999".into();
        let e = fill(&f, None).unwrap_err();
        assert_eq!(e.field, "filled_amount");
        assert!(e.reason.contains("amount overflow"), "{e}");
    }

    #[test]
    fn each_fill_field_is_named() {
        type Breaker = fn(&mut events::FillEvent);
        let cases: [(&str, Breaker); 9] = [
            ("event_id", |f| f.event_id.clear()),
            ("order_id", |f| f.order_id = "x".repeat(65)),
            ("account_id", |f| f.account_id = 0),
            ("symbol", |f| f.symbol = "acme".into()),
            ("side", |f| f.side = "HOLD".into()),
            ("quantity", |f| f.quantity = "0".into()),
            ("fill_price", |f| f.fill_price = "1e3".into()),
            ("filled_amount", |f| f.filled_amount = "-1".into()),
            ("currency", |f| f.currency = "usd".into()),
        ];
        for (field, break_it) in cases {
            let mut f = good_fill();
            break_it(&mut f);
            assert_eq!(fill(&f, None).unwrap_err().field, field);
        }
    }

    #[test]
    fn reserve_checks_expiry_and_kind() {
        let r = pb::ReserveRequest {
            request_id: "r".into(),
            account_id: 1,
            order_id: "o".into(),
            kind: pb::ReservationKind::Cash as i32,
            asset: "USD".into(),
            amount: "1".into(),
            expires_at_ms: 1_000,
        };
        let window = 500;
        // Past, but within the window: the state machine decides (a retry replays).
        assert_eq!(
            reserve(&r, 1_499, window).unwrap().expires_at_ms,
            Some(1_000)
        );
        assert_eq!(reserve(&r, 999, window).unwrap().expires_at_ms, Some(1_000));
        // Older than the window: no retry can be that old.
        let e = reserve(&r, 1_500, window).unwrap_err();
        assert_eq!(e.field, "expires_at_ms");
        assert!(e.reason.contains("idempotency window"), "{e}");
        let mut negative = r.clone();
        negative.expires_at_ms = -1;
        assert_eq!(
            reserve(&negative, 0, window).unwrap_err().field,
            "expires_at_ms"
        );
        let mut r2 = r.clone();
        r2.kind = 0;
        assert_eq!(reserve(&r2, 0, window).unwrap_err().field, "kind");
        let mut r3 = r;
        r3.kind = pb::ReservationKind::Security as i32;
        r3.asset = "usd".into();
        assert_eq!(reserve(&r3, 0, window).unwrap_err().field, "asset");
    }

    fn reserve_request() -> pb::ReserveRequest {
        pb::ReserveRequest {
            request_id: "r".into(),
            account_id: 1,
            order_id: "o".into(),
            kind: pb::ReservationKind::Cash as i32,
            asset: "USD".into(),
            amount: "1".into(),
            expires_at_ms: 0,
        }
    }

    /// The texts every id field must refuse, with the reason they get.
    const BAD_IDS: [&str; 4] = ["a\nb", "\u{0}", "tab\t", "\u{7f}"];

    fn assert_refused(result: Result<impl std::fmt::Debug, FieldError>, field: &str) {
        let e = result.expect_err("a control character is refused");
        assert_eq!(e.field, field);
        assert!(e.reason.contains("control characters"), "{e}");
    }

    #[test]
    fn ids_of_account_service_requests_refuse_control_characters() {
        for bad in BAD_IDS {
            let mut r = reserve_request();
            r.request_id = bad.into();
            assert_refused(reserve(&r, 0, 1), "request_id");
            let mut r = reserve_request();
            r.order_id = bad.into();
            assert_refused(reserve(&r, 0, 1), "order_id");
            let u = |request_id: &str, order_id: &str| pb::UnreserveRequest {
                request_id: request_id.into(),
                account_id: 1,
                order_id: order_id.into(),
                amount: String::new(),
            };
            assert!(unreserve(&u("u", "o")).is_ok());
            assert_refused(unreserve(&u(bad, "o")), "request_id");
            assert_refused(unreserve(&u("u", bad)), "order_id");
        }
    }

    #[test]
    fn ids_of_admin_requests_refuse_control_characters() {
        for bad in BAD_IDS {
            let open = pb::OpenAccountRequest {
                request_id: bad.into(),
                account_id: 1,
                base_currency: "USD".into(),
            };
            assert_refused(open_account(&open), "request_id");
            let status = |request_id: &str, reason: &str| pb::SetAccountStatusRequest {
                request_id: request_id.into(),
                account_id: 1,
                status: pb::AccountStatus::Suspended as i32,
                reason: reason.into(),
            };
            assert!(set_account_status(&status("s", "")).is_ok());
            assert_refused(set_account_status(&status(bad, "")), "request_id");
            assert_refused(set_account_status(&status("s", bad)), "reason");
        }
    }

    #[test]
    fn ids_of_events_refuse_control_characters() {
        for bad in BAD_IDS {
            let dep = events::DepositEvent {
                event_id: bad.into(),
                account_id: 1,
                amount: "1".into(),
                currency: "USD".into(),
                ..Default::default()
            };
            assert_refused(deposit(&dep, None), "event_id");
            let wd = events::WithdrawEvent {
                event_id: bad.into(),
                account_id: 1,
                amount: "1".into(),
                currency: "USD".into(),
                ..Default::default()
            };
            assert_refused(withdrawal(&wd, None), "event_id");
            let mut f = good_fill();
            f.event_id = bad.into();
            assert_refused(fill(&f, None), "event_id");
            let mut f = good_fill();
            f.order_id = bad.into();
            assert_refused(fill(&f, None), "order_id");
        }
    }
}
