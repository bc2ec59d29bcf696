//! The wire contract, guarded.
//!
//! 1. The Matching engine and the Payment service already produce FillEvent,
//!    DepositEvent and WithdrawEvent with the seed's schema (design 4.2). The
//!    bytes below are encoded by hand from that schema — field numbers written
//!    out here, not taken from our generated code — and must decode, through the
//!    same path the Kafka consumer uses, into exactly the fields they carry.
//! 2. Every existing field, enum value and RPC of `proto/*.proto` keeps its
//!    number, type and name: the compiled descriptor set (protox, `build.rs`)
//!    is rendered to one line per element and compared with the committed
//!    `proto/contract.golden`. Adding is free; changing or removing fails.
//!    Regenerating the golden file is a deliberate step:
//!    `UPDATE_PROTO_GOLDEN=1 cargo test --test wire_contract`, then review the
//!    diff (only added lines are compatible).

use account_service::domain::{Command, Side, Source, Topic};
use account_service::proto::events;
use account_service::wire::messages;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::FileDescriptorSet;
use std::collections::BTreeSet;

/// A protobuf encoder that knows nothing of our `.proto` files.
#[derive(Default)]
struct Wire(Vec<u8>);

impl Wire {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    /// Wire type 2 (length-delimited).
    fn string(mut self, field: u32, s: &str) -> Wire {
        self.varint(u64::from(field) << 3 | 2);
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    /// Wire type 0 (varint), int64 as two's complement.
    fn int64(mut self, field: u32, v: i64) -> Wire {
        self.varint(u64::from(field) << 3);
        self.varint(v as u64);
        self
    }
}

fn source(topic: Topic) -> Source {
    Source {
        topic,
        partition: 3,
        offset: 77,
    }
}

/// The seed's `FillEvent`: event_id=1, account_id=2, order_id=3, symbol=4,
/// side=5, fill_price=6, quantity=7, filled_amount=8, timestamp=9.
fn seed_fill() -> Vec<u8> {
    Wire::default()
        .string(1, "fill-9001")
        .int64(2, 42)
        .string(3, "ord-17")
        .string(4, "ACME")
        .string(5, "BUY")
        .string(6, "101.25")
        .string(7, "4")
        .string(8, "405.00")
        .int64(9, 1_764_633_600_123)
        .0
}

#[test]
fn a_seed_fill_event_decodes_field_for_field() {
    let bytes = seed_fill();
    let m = events::FillEvent::decode(bytes.as_slice()).expect("a FillEvent");
    assert_eq!(m.event_id, "fill-9001");
    assert_eq!(m.account_id, 42);
    assert_eq!(m.order_id, "ord-17");
    assert_eq!(m.symbol, "ACME");
    assert_eq!(m.side, "BUY");
    assert_eq!(m.fill_price, "101.25");
    assert_eq!(m.quantity, "4");
    assert_eq!(m.filled_amount, "405.00");
    assert_eq!(m.timestamp, 1_764_633_600_123);
    assert_eq!(m.currency, "", "the seed has no field 10");

    // The consumer's own path: decoded, validated, a Fill command.
    let Ok(Command::Fill(fill)) = messages::decode(Topic::Fills, &bytes, source(Topic::Fills))
    else {
        panic!("a seed FillEvent is a fill, not a dead letter");
    };
    assert_eq!(fill.event_id.as_str(), "fill-9001");
    assert_eq!(fill.account_id.0, 42);
    assert_eq!(fill.order_id.as_str(), "ord-17");
    assert_eq!(fill.symbol.as_str(), "ACME");
    assert_eq!(fill.side, Side::Buy);
    assert_eq!(fill.price.to_string(), "101.25");
    assert_eq!(fill.quantity.to_string(), "4");
    assert_eq!(fill.filled_amount.to_string(), "405.00");
    assert_eq!(fill.currency, None);
    assert_eq!(fill.source, Some(source(Topic::Fills)));

    // Our field 10 on top of the seed's: the settlement currency.
    let mut ours = bytes;
    ours.extend(Wire::default().string(10, "EUR").0);
    let Ok(Command::Fill(fill)) = messages::decode(Topic::Fills, &ours, source(Topic::Fills))
    else {
        panic!("a fill");
    };
    assert_eq!(
        fill.currency.map(|c| c.as_str().to_owned()),
        Some("EUR".into())
    );
}

#[test]
fn a_seed_deposit_event_decodes_field_for_field() {
    // event_id=1, account_id=2, amount=3, currency=4, source=5, timestamp=6.
    let bytes = Wire::default()
        .string(1, "dep-5")
        .int64(2, 7)
        .string(3, "2500.50")
        .string(4, "USD")
        .string(5, "wire:DE89370400440532013000")
        .int64(6, 1_764_633_600_456)
        .0;
    let m = events::DepositEvent::decode(bytes.as_slice()).expect("a DepositEvent");
    assert_eq!(m.event_id, "dep-5");
    assert_eq!(m.account_id, 7);
    assert_eq!(m.amount, "2500.50");
    assert_eq!(m.currency, "USD");
    assert_eq!(m.source, "wire:DE89370400440532013000");
    assert_eq!(m.timestamp, 1_764_633_600_456);

    let Ok(Command::Deposit(c)) =
        messages::decode(Topic::Deposits, &bytes, source(Topic::Deposits))
    else {
        panic!("a seed DepositEvent is a deposit");
    };
    assert_eq!(c.event_id.as_str(), "dep-5");
    assert_eq!(c.account_id.0, 7);
    assert_eq!(c.amount.to_string(), "2500.50");
    assert_eq!(c.currency.as_str(), "USD");
    assert_eq!(c.source, Some(source(Topic::Deposits)));
}

#[test]
fn a_seed_withdraw_event_decodes_field_for_field() {
    // event_id=1, account_id=2, amount=3, currency=4, destination=5, timestamp=6.
    let bytes = Wire::default()
        .string(1, "wd-8")
        .int64(2, 9)
        .string(3, "0.00000001")
        .string(4, "EUR")
        .string(5, "iban:FR7630006000011234567890189")
        .int64(6, 1_764_633_600_789)
        .0;
    let m = events::WithdrawEvent::decode(bytes.as_slice()).expect("a WithdrawEvent");
    assert_eq!(m.event_id, "wd-8");
    assert_eq!(m.account_id, 9);
    assert_eq!(m.amount, "0.00000001");
    assert_eq!(m.currency, "EUR");
    assert_eq!(m.destination, "iban:FR7630006000011234567890189");
    assert_eq!(m.timestamp, 1_764_633_600_789);

    let Ok(Command::Withdraw(c)) =
        messages::decode(Topic::Withdrawals, &bytes, source(Topic::Withdrawals))
    else {
        panic!("a seed WithdrawEvent is a withdrawal");
    };
    assert_eq!(c.event_id.as_str(), "wd-8");
    assert_eq!(c.account_id.0, 9);
    assert_eq!(c.amount.to_string(), "0.00000001");
    assert_eq!(c.currency.as_str(), "EUR");
}

/// One line per message field, enum value and RPC of the compiled protos:
/// what a generated client depends on.
fn contract_lines(set: &FileDescriptorSet) -> BTreeSet<String> {
    let mut lines = BTreeSet::new();
    for file in &set.file {
        let package = file.package();
        for message in &file.message_type {
            let name = format!("{package}.{}", message.name());
            for field in &message.field {
                let label = Label::try_from(field.label.unwrap_or_default())
                    .map_or("?".into(), |l| l.as_str_name().to_owned());
                let kind = Type::try_from(field.r#type.unwrap_or_default())
                    .map_or("?".into(), |t| t.as_str_name().to_owned());
                let type_name = match field.type_name() {
                    "" => String::new(),
                    t => format!(" {t}"),
                };
                lines.insert(format!(
                    "message {name} field {} = {} {label} {kind}{type_name}",
                    field.name(),
                    field.number(),
                ));
            }
            assert!(
                message.nested_type.is_empty() && message.enum_type.is_empty(),
                "{name}: nested types are not rendered; add them to contract_lines"
            );
        }
        for e in &file.enum_type {
            for value in &e.value {
                lines.insert(format!(
                    "enum {package}.{} value {} = {}",
                    e.name(),
                    value.name(),
                    value.number()
                ));
            }
        }
        for service in &file.service {
            for method in &service.method {
                lines.insert(format!(
                    "rpc {package}.{}.{}({}{}) returns ({}{})",
                    service.name(),
                    method.name(),
                    if method.client_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    method.input_type(),
                    if method.server_streaming() {
                        "stream "
                    } else {
                        ""
                    },
                    method.output_type(),
                ));
            }
        }
    }
    lines
}

#[test]
fn no_existing_field_changes_number_type_or_name() {
    let set = FileDescriptorSet::decode(account_service::proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set");
    let current = contract_lines(&set);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/contract.golden");
    if std::env::var_os("UPDATE_PROTO_GOLDEN").is_some() {
        let mut text = String::from(
            "# Every field, enum value and RPC of proto/*.proto as compiled (tests/wire_contract.rs).\n\
             # Regenerate: UPDATE_PROTO_GOLDEN=1 cargo test --test wire_contract; only added lines are compatible.\n",
        );
        for line in &current {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(path, text).expect("write the golden file");
    }
    let golden = std::fs::read_to_string(path).expect("proto/contract.golden");
    let missing: Vec<&str> = golden
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !current.contains(*l))
        .collect();
    assert!(
        missing.is_empty(),
        "incompatible change to proto/: these elements changed or went away \
         (a field keeps its number, type and name forever; add new ones with new numbers):\n{}",
        missing.join("\n")
    );
    // The seed's numbering, spelled out, in case the golden file itself is
    // regenerated from a wrong proto.
    for line in [
        "message events.FillEvent field account_id = 2 LABEL_OPTIONAL TYPE_INT64",
        "message events.FillEvent field order_id = 3 LABEL_OPTIONAL TYPE_STRING",
        "message events.FillEvent field fill_price = 6 LABEL_OPTIONAL TYPE_STRING",
        "message events.FillEvent field quantity = 7 LABEL_OPTIONAL TYPE_STRING",
        "message events.DepositEvent field amount = 3 LABEL_OPTIONAL TYPE_STRING",
        "message events.DepositEvent field currency = 4 LABEL_OPTIONAL TYPE_STRING",
        "message events.DepositEvent field source = 5 LABEL_OPTIONAL TYPE_STRING",
        "message events.WithdrawEvent field destination = 5 LABEL_OPTIONAL TYPE_STRING",
        "message events.WithdrawEvent field timestamp = 6 LABEL_OPTIONAL TYPE_INT64",
    ] {
        assert!(current.contains(line), "seed schema: {line}");
    }
}

#[test]
fn the_golden_check_catches_a_renumbered_field() {
    // The check itself: a descriptor set with one field renumbered must miss
    // a golden line.
    let mut set = FileDescriptorSet::decode(account_service::proto::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set");
    let before = contract_lines(&set);
    let fill = set
        .file
        .iter_mut()
        .flat_map(|f| f.message_type.iter_mut())
        .find(|m| m.name() == "FillEvent")
        .expect("FillEvent");
    let quantity = fill
        .field
        .iter_mut()
        .find(|f| f.name() == "quantity")
        .expect("quantity");
    quantity.number = Some(6);
    let after = contract_lines(&set);
    assert!(before
        .difference(&after)
        .any(|l| l.contains("quantity = 7")));
}
