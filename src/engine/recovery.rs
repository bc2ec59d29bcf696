//! Start-up: rebuild the state by replaying the journal through the same pure
//! `apply` the live path uses.

use super::{codec, EngineError};
use crate::state_machine::{NoEvents, State};
use wal::Wal;

/// Replays every record after `state.last_sequence()`. Returns how many.
pub fn replay(wal: &Wal, state: &mut State) -> Result<u64, EngineError> {
    let from = state.last_sequence() + 1;
    if let Some(first) = wal.first_sequence() {
        if first > from {
            return Err(EngineError::MissingRecords {
                first,
                state: state.last_sequence(),
            });
        }
    }
    let records = wal.replay(from, |sequence, payload| {
        let (command, timestamp_ms) =
            codec::decode(payload).map_err(|source| EngineError::Decode { sequence, source })?;
        state.apply(&command, sequence, timestamp_ms, &mut NoEvents);
        Ok::<(), EngineError>(())
    })?;
    debug_assert_eq!(state.last_sequence(), wal.last_sequence().max(from - 1));
    Ok(records)
}
