//! Dead-letter records. The journal keeps only the fact (source topic,
//! partition, offset and the reason class), so a dead letter is re-derived
//! after a restart exactly like an event. The record itself is the original
//! message, read back from its topic by offset ([`Refetcher`]): key, payload,
//! headers and timestamp unchanged, plus the headers `dlq.reason`, `dlq.topic`,
//! `dlq.partition`, `dlq.offset` (UTF-8 text, numbers in decimal). The reason
//! text is re-derived from the message with the same decoder the consumer
//! ran: validation is deterministic, so it says what it said the first time.

use super::outbox::DlqReason;
use crate::config::KafkaConfig;
use crate::domain::Source;
use crate::state_machine::{Outcome, ResultCode};
use crate::wire::{convert, messages};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// A refetch that is this far ahead of the reader's position reads forward
/// instead of seeking (a burst of bad messages on one partition).
const READ_FORWARD_MAX: i64 = 1_000;

pub enum Fetched {
    Message(OwnedMessage),
    /// The offset is no longer in the topic (retention, compaction).
    Gone,
    /// Not readable now (broker unreachable); try again later.
    NotYet,
}

/// Reads single messages back by (topic, partition, offset). Assign-only
/// consumer: no group membership, no commits.
pub struct Refetcher {
    config: KafkaConfig,
    consumer: Option<BaseConsumer>,
    /// (source, next offset the consumer returns) of the current assignment.
    position: Option<(Source, i64)>,
}

impl Refetcher {
    pub fn new(config: KafkaConfig) -> Refetcher {
        Refetcher {
            config,
            consumer: None,
            position: None,
        }
    }

    pub fn fetch(&mut self, source: Source, wait: Duration) -> Fetched {
        let topic = self.config.topic_name(source.topic).to_owned();
        if self.consumer.is_none() {
            let created = self
                .config
                .client_config()
                .set("group.id", format!("{}.dlq-refetch", self.config.group))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "10")
                .create::<BaseConsumer>();
            match created {
                Ok(c) => self.consumer = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter refetch consumer");
                    return Fetched::NotYet;
                }
            }
        }
        let Some(consumer) = self.consumer.as_ref() else {
            return Fetched::NotYet;
        };
        let reads_forward = self.position.is_some_and(|(at, next)| {
            at.topic == source.topic
                && at.partition == source.partition
                && source.offset >= next
                && source.offset - next <= READ_FORWARD_MAX
        });
        if !reads_forward {
            let mut tpl = TopicPartitionList::new();
            if let Err(e) =
                tpl.add_partition_offset(&topic, source.partition, Offset::Offset(source.offset))
            {
                tracing::warn!(error = %e, "dead-letter refetch assignment");
                return Fetched::NotYet;
            }
            if let Err(e) = consumer.assign(&tpl) {
                tracing::warn!(error = %e, "dead-letter refetch assignment");
                return Fetched::NotYet;
            }
            self.position = Some((source, source.offset));
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Fetched::NotYet;
            }
            let Some(polled) = consumer.poll(left) else {
                continue;
            };
            let message = match polled {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "dead-letter refetch");
                    continue;
                }
            };
            if message.topic() != topic || message.partition() != source.partition {
                continue;
            }
            let offset = message.offset();
            self.position = Some((source, offset + 1));
            if offset == source.offset {
                return Fetched::Message(message.detach());
            }
            if offset > source.offset {
                return Fetched::Gone;
            }
        }
    }
}

/// The `dlq.reason` text: `"<field>: <reason>"` for a message that failed
/// validation, `"<RESULT>: <message>"` for one the engine could not apply,
/// `"amount overflow: ..."` for one whose result would leave the exact range.
pub fn reason_text(reason: DlqReason, source: Source, payload: &[u8]) -> String {
    match reason {
        DlqReason::Edge(class) => match messages::decode(source.topic, payload, source) {
            Err(rejection) => rejection.text,
            // Only if the validation rules changed since it was journaled.
            Ok(_) => class.name().to_owned(),
        },
        // Design 3: "dead-lettered with reason `amount overflow`"; the
        // message starts with those words.
        DlqReason::Rejected(code @ ResultCode::AmountOverflow) => {
            convert::message(&Outcome::new(code, 0))
        }
        DlqReason::Rejected(code) => {
            format!(
                "{}: {}",
                code.name(),
                convert::message(&Outcome::new(code, 0))
            )
        }
    }
}

/// The original message's headers followed by the `dlq.*` headers.
pub fn headers(
    original: Option<&OwnedHeaders>,
    reason: &str,
    topic: &str,
    source: Source,
) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(original.map_or(0, |h| h.count()) + 4);
    if let Some(original) = original {
        for h in original.iter() {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    for (key, value) in [
        ("dlq.reason", reason),
        ("dlq.topic", topic),
        ("dlq.partition", partition.as_str()),
        ("dlq.offset", offset.as_str()),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Topic;

    #[test]
    fn an_amount_overflow_is_dead_lettered_as_amount_overflow() {
        let source = Source {
            topic: Topic::Deposits,
            partition: 0,
            offset: 1,
        };
        let text = reason_text(DlqReason::Rejected(ResultCode::AmountOverflow), source, &[]);
        assert!(text.starts_with("amount overflow"), "{text}");
        let text = reason_text(
            DlqReason::Rejected(ResultCode::CurrencyMismatch),
            source,
            &[],
        );
        assert!(text.starts_with("CURRENCY_MISMATCH: "), "{text}");
    }
}
