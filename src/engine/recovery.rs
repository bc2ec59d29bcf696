//! Start-up: rebuild the state by replaying the journal through the same pure
//! `apply` the live path uses.
//!
//! Two threads: one reads the log, decodes its records and prepares their
//! commands (hashes and fingerprint, [`Prepared`]), in chunks, while the
//! calling thread applies the chunk before (a bounded hand-off of a few
//! chunks, recycled). Records are applied in journal order, by one thread,
//! exactly as before; only the reading, decoding and hashing run beside it.

use super::codec::{self, Record};
use super::EngineError;
use crate::domain::Command;
use crate::egress::Collector;
use crate::state_machine::{NoEvents, Populating, Prepared, ReplayRoom, State, PREFETCH_AHEAD};
use std::collections::VecDeque;
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
    // Asked once: at the first chunk whose records all stay in the window.
    let mut room_asked = false;
    let records = decoded_in_chunks(wal, from, |chunk| {
        let first = chunk
            .first()
            .filter(|first| !room_asked && in_window(state, first));
        let room = first.and_then(|first| {
            room_asked = true;
            room_for_replay(wal, state, first).map(|room| (first.sequence, room))
        });
        // By reference: a decoded record is a few hundred bytes, not moved.
        for (i, decoded) in chunk.iter().enumerate() {
            if let Some(ahead) = chunk.get(i + PREFETCH_AHEAD) {
                state.prefetch(&ahead.prepared);
            }
            let Decoded {
                sequence,
                ref record,
                timestamp_ms,
                ref prepared,
            } = *decoded;
            let outbox = outbox.as_deref_mut().filter(|_| sequence > watermark);
            match (record, outbox) {
                (Record::Command(command), Some(outbox)) => {
                    outbox.apply(state, command, prepared, sequence, timestamp_ms, None);
                    outbox.hand_off_if_full(sequence, wal);
                }
                (Record::Command(command), None) => {
                    state.apply_prepared(command, prepared, sequence, timestamp_ms, &mut NoEvents);
                }
                (Record::Basket(items), Some(outbox)) => {
                    outbox.apply_basket(state, items, sequence, timestamp_ms, None, &mut outcomes);
                    outbox.hand_off_if_full(sequence, wal);
                }
                (Record::Basket(items), None) => {
                    state.apply_basket(items, sequence, timestamp_ms, &mut NoEvents, &mut outcomes);
                }
            }
        }
        chunk.clear();
        room
    })?;
    if let Some(outbox) = outbox {
        outbox.hand_off(state.last_sequence(), wal);
    }
    debug_assert_eq!(state.last_sequence(), wal.last_sequence().max(from - 1));
    Ok(records)
}

/// Whether `record` and every one after it stay in the idempotency window
/// until the replay ends: journaled within the window of now.
fn in_window(state: &State, record: &Decoded) -> bool {
    let window = state.config().idempotency_window_ms;
    super::now_ms().saturating_sub(record.timestamp_ms) <= window
}

/// Room for the rest of the replay, from `first` on (a record [`in_window`]),
/// made before `first` is applied: every record's key and reservation from
/// there on stay in the state to its end, so room for as many as there are
/// records over-reserves only what records without a key or a reservation
/// would have taken, and only in address space (the pages are faulted in as
/// the keys and rows come: [`Populating`]; the indexes, probed at random,
/// at once, here, before the reading thread could reach them). The records
/// before `first` (a journal that spans more than the window: a long run
/// without snapshots) are applied into tables that grow, as without.
fn room_for_replay(wal: &Wal, state: &mut State, first: &Decoded) -> Option<ReplayRoom> {
    let records = wal.last_sequence().checked_sub(first.sequence)? + 1;
    state.make_room_for_replay(usize::try_from(records).ok()?)
}

/// Keys and new reservation rows the records read so far will add at most.
#[derive(Clone, Copy, Default)]
struct Counted {
    keys: usize,
    rows: usize,
}

impl Counted {
    fn add(&mut self, record: &Record, prepared: &Prepared) {
        match record {
            Record::Command(command) => {
                self.keys += usize::from(prepared.has_key());
                self.rows += usize::from(matches!(command, Command::Reserve(_)));
            }
            Record::Basket(items) => {
                self.keys += items.len();
                self.rows += items.len();
            }
        }
    }
}

/// Records decoded per chunk handed from the reading thread to the applying one.
const CHUNK_RECORDS: usize = 1_024;
/// Chunks in flight between the two threads (each recycled once applied).
const CHUNKS_IN_FLIGHT: usize = 4;

/// A record as the reading thread hands it over.
struct Decoded {
    sequence: u64,
    record: Record,
    timestamp_ms: i64,
    /// The command's (a basket's items are prepared as they apply).
    prepared: Prepared,
}

/// Reads and decodes every record from `from` on a second thread and hands
/// them to `apply` on this one, in order, a chunk at a time. Returns how
/// many records were read. A read or decode error stops both threads
/// (records before it are applied) and is returned. When `apply` returns
/// the room it made for the records from a sequence on, the reading thread
/// faults in the pages of the keys and rows of those it has read, ahead of
/// the applying thread.
fn decoded_in_chunks(
    wal: &Wal,
    from: u64,
    mut apply: impl FnMut(&mut Vec<Decoded>) -> Option<(u64, ReplayRoom)>,
) -> Result<u64, EngineError> {
    let (room_tx, room_rx) = crossbeam_channel::bounded::<(u64, ReplayRoom)>(1);
    let (full_tx, full_rx) = crossbeam_channel::bounded::<Vec<Decoded>>(CHUNKS_IN_FLIGHT);
    let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<Decoded>>(CHUNKS_IN_FLIGHT);
    for _ in 0..CHUNKS_IN_FLIGHT {
        empty_tx
            .send(Vec::with_capacity(CHUNK_RECORDS))
            .expect("room for every chunk");
    }
    std::thread::scope(|scope| {
        // Owned by this closure, so a panic while applying closes both
        // channels and the reader stops at its next hand-off.
        let (full_rx, empty_tx) = (full_rx, empty_tx);
        let reader = std::thread::Builder::new()
            .name("wal-replay-read".into())
            .spawn_scoped(scope, move || {
                let applier_gone =
                    || EngineError::Thread("replay: the applying thread stopped".into());
                let mut chunk = empty_rx.recv().map_err(|_| applier_gone())?;
                let mut counted = Counted::default();
                // What the records before each chunk in flight add: where
                // the room made at one of them starts counting.
                let mut chunk_start = Counted::default();
                let mut handed: VecDeque<(u64, Counted)> = VecDeque::new();
                let mut populating: Option<(Counted, Populating, Populating)> = None;
                let read = wal.replay(from, |sequence, payload| {
                    let (record, timestamp_ms) = codec::decode_record(payload)
                        .map_err(|source| EngineError::Decode { sequence, source })?;
                    let prepared = match &record {
                        Record::Command(command) => Prepared::of(command),
                        Record::Basket(_) => Prepared::default(),
                    };
                    counted.add(&record, &prepared);
                    chunk.push(Decoded {
                        sequence,
                        record,
                        timestamp_ms,
                        prepared,
                    });
                    if chunk.len() == CHUNK_RECORDS {
                        if handed.len() == CHUNKS_IN_FLIGHT * 2 {
                            handed.pop_front();
                        }
                        handed.push_back((chunk[0].sequence, chunk_start));
                        chunk_start = counted;
                        if populating.is_none() {
                            populating = room_rx.try_recv().ok().map(|(from, room)| {
                                let before = handed
                                    .iter()
                                    .find(|(first, _)| *first == from)
                                    .map_or(counted, |&(_, before)| before);
                                (before, room.keys, room.rows)
                            });
                        }
                        if let Some((before, keys, rows)) = &mut populating {
                            keys.advance(counted.keys - before.keys);
                            rows.advance(counted.rows - before.rows);
                        }
                        let next = empty_rx.recv().map_err(|_| applier_gone())?;
                        full_tx
                            .send(std::mem::replace(&mut chunk, next))
                            .map_err(|_| applier_gone())?;
                    }
                    Ok::<(), EngineError>(())
                });
                // What was read before an error is applied too.
                if !chunk.is_empty() {
                    let _ = full_tx.send(chunk);
                }
                read
            })
            .map_err(|e| EngineError::Thread(format!("replay: starting the reader: {e}")))?;
        for mut chunk in &full_rx {
            if let Some(room) = apply(&mut chunk) {
                let _ = room_tx.try_send(room);
            }
            // The reader may have finished: the chunk is then dropped.
            let _ = empty_tx.try_send(chunk);
        }
        reader
            .join()
            .unwrap_or_else(|_| Err(EngineError::Thread("replay: the reader panicked".into())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::StateConfig;
    use crate::workload;

    /// A log of `commands`, each journaled 1 ms after the one before, the
    /// first in 2023 (outside any idempotency window of now). Returns the log
    /// and the state the commands give applied directly.
    fn journal(dir: &std::path::Path, commands: &[crate::domain::Command]) -> (Wal, State) {
        journal_from(dir, commands, 1_700_000_000_000)
    }

    /// [`journal`], the first command at `start_ms`.
    fn journal_from(
        dir: &std::path::Path,
        commands: &[crate::domain::Command],
        start_ms: i64,
    ) -> (Wal, State) {
        journal_at(dir, commands, &|i| start_ms + i as i64)
    }

    /// [`journal`], command `i` at `at(i)` (never decreasing).
    fn journal_at(
        dir: &std::path::Path,
        commands: &[crate::domain::Command],
        at: &dyn Fn(usize) -> i64,
    ) -> (Wal, State) {
        let mut wal = Wal::open(wal::WalOptions::new(dir)).unwrap();
        let mut expected = State::new(StateConfig::default());
        let mut payload = Vec::new();
        for (i, c) in commands.iter().enumerate() {
            let sequence = i as u64 + 1;
            let at = at(i);
            payload.clear();
            codec::encode(c, at, &mut payload);
            wal.append(sequence, &payload).unwrap();
            expected.apply(c, sequence, at, &mut NoEvents);
        }
        wal.sync().unwrap();
        (wal, expected)
    }

    fn load(n: u64) -> Vec<crate::domain::Command> {
        let mut commands: Vec<_> = workload::funded_accounts(50).collect();
        commands.extend((0..n).flat_map(|i| workload::order_life(i, 50)));
        commands
    }

    #[test]
    fn replay_across_many_chunks_rebuilds_the_state_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks and a partial last one.
        let commands = load(3 * CHUNK_RECORDS as u64 + 7);
        let (wal, expected) = journal(dir.path(), &commands);
        let mut state = State::new(StateConfig::default());
        assert_eq!(replay(&wal, &mut state).unwrap(), commands.len() as u64);
        assert_eq!(state.last_sequence(), commands.len() as u64);
        assert_eq!(state.digest(), expected.digest());
    }

    #[test]
    fn a_replay_within_the_window_makes_its_room_first_and_ends_in_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let commands = load(3 * CHUNK_RECORDS as u64 + 7);
        // Journaled up to now: every record stays in the 24 h window.
        let start = crate::engine::now_ms() - commands.len() as i64;
        let (wal, expected) = journal_from(dir.path(), &commands, start);
        // From the state of the first 1,000 (a snapshot's), keys in it.
        let head_dir = tempfile::tempdir().unwrap();
        let (_, mut state) = journal_from(head_dir.path(), &commands[..1_000], start);
        let (keys, rows) = (state.keys_capacity(), state.reservations_capacity());
        let replayed = replay(&wal, &mut state).unwrap();
        assert_eq!(replayed, (commands.len() - 1_000) as u64);
        assert_eq!(state.digest(), expected.digest());
        // Room for a key and a row per record was made before the first, once.
        assert!(state.keys_capacity() >= commands.len() && state.keys_capacity() > keys);
        assert!(state.reservations_capacity() > rows);

        // A record journaled longer ago than the window gets no room (its
        // keys may leave the window during the replay).
        let first = |timestamp_ms| Decoded {
            sequence: 1,
            record: Record::Command(commands[0]),
            timestamp_ms,
            prepared: Prepared::of(&commands[0]),
        };
        let fresh = State::new(StateConfig::default());
        assert!(!in_window(&fresh, &first(start - DAY_MS - 1_000)));
        assert!(in_window(&fresh, &first(start)));
    }

    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn a_journal_longer_than_the_window_makes_room_where_the_window_starts() {
        let dir = tempfile::tempdir().unwrap();
        // 5,200 commands: the first two chunks journaled two days ago, the
        // rest within the window of now.
        let commands = load(1_700);
        let old = 2 * CHUNK_RECORDS;
        let now = crate::engine::now_ms();
        let at = |i: usize| {
            if i < old {
                now - 2 * DAY_MS + i as i64
            } else {
                now - 10_000 + i as i64
            }
        };
        let (wal, expected) = journal_at(dir.path(), &commands, &at);
        let mut state = State::new(StateConfig::default());
        assert_eq!(replay(&wal, &mut state).unwrap(), commands.len() as u64);
        assert_eq!(state.digest(), expected.digest());
        // Room made at the first recent chunk for the rest: exactly the keys
        // there were (every command here has one), where tables that grew
        // would hold a power of two (8,192).
        assert_eq!(state.keys_capacity(), commands.len());
    }

    #[test]
    fn an_undecodable_record_stops_replay_after_applying_those_before() {
        let dir = tempfile::tempdir().unwrap();
        let commands = load(CHUNK_RECORDS as u64 + 100);
        let (mut wal, expected) = journal(dir.path(), &commands);
        let bad = commands.len() as u64 + 1;
        // A sound frame whose payload is no record.
        wal.append(bad, &[0xff; 16]).unwrap();
        wal.append(bad + 1, &[0xff; 16]).unwrap();
        wal.sync().unwrap();
        let mut state = State::new(StateConfig::default());
        match replay(&wal, &mut state) {
            Err(EngineError::Decode { sequence, .. }) => assert_eq!(sequence, bad),
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert_eq!(state.last_sequence(), bad - 1);
        assert_eq!(state.digest(), expected.digest());
    }

    #[test]
    fn replay_from_the_middle_applies_only_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let commands = load(2 * CHUNK_RECORDS as u64);
        let (wal, expected) = journal(dir.path(), &commands);
        // The state of the first half, as a snapshot would restore it.
        let half = commands.len() / 2;
        let (head_dir, tail) = (tempfile::tempdir().unwrap(), &commands[..half]);
        let (_, mut state) = journal(head_dir.path(), tail);
        let replayed = replay(&wal, &mut state).unwrap();
        assert_eq!(replayed, (commands.len() - half) as u64);
        assert_eq!(state.digest(), expected.digest());
    }
}
