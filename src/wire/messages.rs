//! Kafka payloads into commands: each inbound message decoded (protobuf) and
//! validated into its command, or into the reason it is a dead letter. The
//! consumer (`ingress::kafka`) journals the result; the dead-letter publisher
//! (`egress::dlq`) derives the `dlq.reason` text from the same decode.

use super::validate;
use crate::domain::{Command, DeadLetter, DeadLetterReason, Source, Topic};
use crate::proto::events;
use prost::Message as _;

/// Why a message is not a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: DeadLetterReason,
    /// `"<field>: <reason>"` (the `dlq.reason` header).
    pub text: String,
}

/// Decodes and validates one message of `topic` into its command.
pub fn decode(topic: Topic, payload: &[u8], source: Source) -> Result<Command, Rejection> {
    let source = Some(source);
    match topic {
        Topic::Fills => {
            let m = events::FillEvent::decode(payload).map_err(not_protobuf("FillEvent"))?;
            validate::fill(&m, source).map(Command::Fill)
        }
        Topic::Deposits => {
            let m = events::DepositEvent::decode(payload).map_err(not_protobuf("DepositEvent"))?;
            validate::deposit(&m, source).map(Command::Deposit)
        }
        Topic::Withdrawals => {
            let m =
                events::WithdrawEvent::decode(payload).map_err(not_protobuf("WithdrawEvent"))?;
            validate::withdrawal(&m, source).map(Command::Withdraw)
        }
    }
    .map_err(|e| Rejection {
        reason: DeadLetterReason::InvalidField,
        text: e.to_string(),
    })
}

fn not_protobuf(what: &'static str) -> impl Fn(prost::DecodeError) -> Rejection {
    move |e| Rejection {
        reason: DeadLetterReason::NotProtobuf,
        text: format!("payload: not a {what} protobuf message ({e})"),
    }
}

/// The command a message is journaled as: its own, or a dead letter.
pub fn to_command(topic: Topic, payload: &[u8], source: Source) -> Command {
    decode(topic, payload, source).unwrap_or_else(|r| {
        Command::DeadLetter(DeadLetter {
            source,
            reason: r.reason,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        Source {
            topic: Topic::Fills,
            partition: 0,
            offset: 7,
        }
    }

    fn fill() -> events::FillEvent {
        events::FillEvent {
            event_id: "f1".into(),
            order_id: "o1".into(),
            account_id: 1,
            symbol: "ACME".into(),
            side: "BUY".into(),
            quantity: "3".into(),
            fill_price: "1.5".into(),
            filled_amount: "4.5".into(),
            timestamp: 0,
            currency: String::new(),
        }
    }

    #[test]
    fn good_messages_become_their_command() {
        let c = to_command(Topic::Fills, &fill().encode_to_vec(), source());
        assert!(matches!(c, Command::Fill(f) if f.source == Some(source())));
    }

    #[test]
    fn bad_messages_become_dead_letters_with_a_reason() {
        let garbage = [0xff, 0xff, 0xff, 0xff];
        let r = decode(Topic::Fills, &garbage, source()).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::NotProtobuf);
        assert!(r.text.starts_with("payload: not a FillEvent"), "{}", r.text);
        let mut f = fill();
        f.filled_amount = "4.6".into();
        let r = decode(Topic::Fills, &f.encode_to_vec(), source()).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::InvalidField);
        assert!(r.text.starts_with("filled_amount: "), "{}", r.text);
        assert_eq!(
            to_command(Topic::Fills, &f.encode_to_vec(), source()),
            Command::DeadLetter(DeadLetter {
                source: source(),
                reason: DeadLetterReason::InvalidField
            })
        );
    }

    #[test]
    fn ids_with_control_characters_are_dead_letters_naming_the_field() {
        let mut f = fill();
        f.order_id = "o\n1".into();
        let r = decode(Topic::Fills, &f.encode_to_vec(), source()).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::InvalidField);
        assert!(
            r.text.starts_with("order_id: must not contain control"),
            "{}",
            r.text
        );
        let deposit = events::DepositEvent {
            event_id: "dep\u{7f}".into(),
            account_id: 1,
            amount: "1".into(),
            currency: "USD".into(),
            ..Default::default()
        };
        let at = Source {
            topic: Topic::Deposits,
            ..source()
        };
        let r = decode(Topic::Deposits, &deposit.encode_to_vec(), at).unwrap_err();
        assert!(
            r.text.starts_with("event_id: must not contain control"),
            "{}",
            r.text
        );
    }
}
