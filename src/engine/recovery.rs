//! Start-up: rebuild the state by replaying the journal through the same pure
//! `apply` the live path uses.

use super::codec::{self, Record};
use super::EngineError;
use crate::egress::Collector;
use crate::state_machine::{NoEvents, State};
use wal::Wal;

/// Replays every record after `state.last_sequence()`. Returns how many.
pub fn replay(wal: &Wal, state: &mut State) -> Result<u64, EngineError> {
    replay_with_outbox(wal, state, None)
}

/// [`replay`], re-deriving the account events and dead letters of every record
/// above the outbox's durable watermark and handing them to the publisher:
/// what the broker had not acknowledged before the restart is published again
/// (with the same event ids). Needs the state at or below the watermark: a
/// snapshot beyond it cannot re-derive what lies between (logged as an error).
pub fn replay_with_outbox(
    wal: &Wal,
    state: &mut State,
    mut outbox: Option<&mut Collector>,
) -> Result<u64, EngineError> {
    let watermark = outbox.as_ref().map_or(u64::MAX, |o| o.watermark());
    if state.last_sequence() > watermark {
        tracing::error!(
            state = state.last_sequence(),
            watermark,
            "recovered state is past the outbox watermark: events in between cannot be re-derived"
        );
    }
    let from = state.last_sequence() + 1;
    // A log that ends before the snapshot lost records the snapshot holds
    // (an old copy of the data directory?): appending would fork history.
    if wal.last_sequence() != 0 && wal.last_sequence() < state.last_sequence() {
        return Err(EngineError::WalBehindState {
            last: wal.last_sequence(),
            state: state.last_sequence(),
        });
    }
    if let Some(first) = wal.first_sequence() {
        if first > from {
            return Err(EngineError::MissingRecords {
                first,
                state: state.last_sequence(),
            });
        }
    }
    let mut outcomes = Vec::new();
    let records = wal.replay(from, |sequence, payload| {
        let (record, timestamp_ms) = codec::decode_record(payload)
            .map_err(|source| EngineError::Decode { sequence, source })?;
        let outbox = outbox.as_deref_mut().filter(|_| sequence > watermark);
        match (record, outbox) {
            (Record::Command(command), Some(outbox)) => {
                outbox.apply(state, &command, sequence, timestamp_ms);
                outbox.hand_off_if_full(sequence);
            }
            (Record::Command(command), None) => {
                state.apply(&command, sequence, timestamp_ms, &mut NoEvents);
            }
            (Record::Basket(items), Some(outbox)) => {
                outbox.apply_basket(state, &items, sequence, timestamp_ms, &mut outcomes);
                outbox.hand_off_if_full(sequence);
            }
            (Record::Basket(items), None) => {
                state.apply_basket(&items, sequence, timestamp_ms, &mut NoEvents, &mut outcomes);
            }
        }
        Ok::<(), EngineError>(())
    })?;
    if let Some(outbox) = outbox {
        outbox.hand_off(state.last_sequence());
    }
    debug_assert_eq!(state.last_sequence(), wal.last_sequence().max(from - 1));
    Ok(records)
}
