//! Snapshot deltas without PostgreSQL: a model of the snapshot tables takes the
//! deltas exactly as the snapshotter writes them (full replace, upserts,
//! deletes, the key window), some held back as while the database is down
//! (the engine takes no new delta meanwhile). After every delivery the tables
//! rebuild the state at the delta's sequence; a restart from the tables plus
//! the journal after them gives the state a full replay gives.

mod common;

use account_service::domain::*;
use account_service::state_machine::{
    Account, Delta, IdempotencyEntry, NoEvents, Reservation, ReservationKey, Rows, State,
    StateConfig,
};
use common::strategies::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// What the PostgreSQL tables hold.
#[derive(Default)]
struct Tables {
    sequence: u64,
    config: StateConfig,
    timestamp_ms: i64,
    accounts: HashMap<AccountId, Account>,
    reservations: HashMap<ReservationKey, Reservation>,
    keys: BTreeMap<u64, (IdempotencyKey, IdempotencyEntry)>,
    keys_base: u64,
    offsets: HashMap<(Topic, i32), i64>,
}

impl Tables {
    /// The snapshotter's transaction (store.rs), on maps.
    fn write(&mut self, delta: &Delta) {
        if delta.full {
            *self = Tables::default();
        }
        for a in &delta.accounts {
            self.accounts.insert(a.account_id, a.clone());
        }
        for r in &delta.reservations {
            self.reservations.insert(r.key(), *r);
        }
        for k in &delta.removed_reservations {
            self.reservations.remove(k);
        }
        self.keys = self.keys.split_off(&delta.keys_base);
        for (position, key, entry) in &delta.keys {
            self.keys.entry(*position).or_insert((*key, *entry));
        }
        for (topic, partition, offset) in &delta.offsets {
            self.offsets.insert((*topic, *partition), *offset);
        }
        self.keys_base = delta.keys_base;
        self.sequence = delta.sequence;
        self.config = delta.config;
        self.timestamp_ms = delta.timestamp_ms;
    }

    fn rows(&self) -> Rows {
        Rows {
            sequence: self.sequence,
            config: self.config,
            timestamp_ms: self.timestamp_ms,
            accounts: self.accounts.values().cloned().collect(),
            reservations: self.reservations.values().copied().collect(),
            keys: self.keys.iter().map(|(p, (k, e))| (*p, *k, *e)).collect(),
            keys_base: self.keys_base,
            offsets: self.offsets.iter().map(|(&(t, p), &o)| (t, p, o)).collect(),
            log_id: None,
        }
    }
}

#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // test input, built once
enum Op {
    Step(Step),
    /// Hand a delta to the snapshotter unless one waits; `deliver`: the one
    /// waiting reaches the tables, else it keeps waiting (database down).
    Snapshot {
        deliver: bool,
    },
    /// Restart: load the tables, replay the journal after them.
    Restart,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            12 => command().prop_map(|c| Op::Step(Step::Run(c))),
            3 => (0i64..800).prop_map(|ms| Op::Step(Step::Advance(ms))),
            3 => Just(Op::Step(Step::Run(Command::Tick))),
            // The settings change mid-history: the tables and a restart keep them.
            1 => (1i64..3_000, 1u32..6).prop_map(|(idempotency_window_ms, tick_work_max)| {
                Op::Step(Step::Run(Command::Configure(StateConfig { idempotency_window_ms, tick_work_max })))
            }),
            3 => any::<bool>().prop_map(|deliver| Op::Snapshot { deliver }),
            1 => Just(Op::Restart),
        ],
        1..300,
    )
}

fn config() -> StateConfig {
    // A short window and little work per tick: keys and closed reservations
    // leave the state often, some of them across several ticks.
    StateConfig {
        idempotency_window_ms: 1_000,
        tick_work_max: 4,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tables_fed_by_deltas_rebuild_the_state(ops in ops()) {
        let mut state = State::new(config());
        // Tracking starts on the empty state with tables of unknown content.
        state.track_changes(true);
        let mut tables = Tables {
            accounts: [(AccountId(99), Account::new(AccountId(99), common::usd()))].into(),
            ..Tables::default()
        };
        let mut waiting: Option<(Delta, u64)> = None;
        let mut journal: Vec<(Command, u64, i64)> = Vec::new();
        let mut now = 1_700_000_000_000i64;
        for op in ops {
            match op {
                Op::Step(Step::Run(command)) => {
                    let seq = state.last_sequence() + 1;
                    let ts = now.max(state.last_timestamp_ms());
                    state.apply(&command, seq, ts, &mut NoEvents);
                    journal.push((command, seq, ts));
                }
                Op::Step(Step::Advance(ms)) => now += ms,
                Op::Snapshot { deliver } => {
                    if waiting.is_none() {
                        waiting = Some((state.take_delta(), state.digest()));
                    }
                    if deliver {
                        let (delta, digest_then) = waiting.take().unwrap();
                        tables.write(&delta);
                        let rebuilt = State::restore(tables.rows());
                        prop_assert_eq!(rebuilt.last_sequence(), delta.sequence);
                        prop_assert_eq!(rebuilt.digest(), digest_then, "tables at {}", delta.sequence);
                    }
                }
                Op::Restart => {
                    // What was not delivered is lost with the process.
                    waiting = None;
                    let expected = state.digest();
                    let loaded = tables.sequence > 0;
                    state = if loaded { State::restore(tables.rows()) } else { State::new(config()) };
                    state.track_changes(!loaded);
                    for (command, seq, ts) in journal.iter().filter(|(_, seq, _)| *seq > tables.sequence) {
                        state.apply(command, *seq, *ts, &mut NoEvents);
                    }
                    prop_assert_eq!(state.digest(), expected, "restart from the tables at {}", tables.sequence);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A replica's raft snapshot (design 7) is `State::rows` encoded with
    /// postcard: decoded and restored at any point of a history, it is the
    /// same state, and stays the same under every later command (the
    /// derived indexes — expiries, closing order, key ring — came back too).
    #[test]
    fn a_raft_snapshot_image_restores_the_same_state_for_the_rest_of_the_history(
        steps in steps(),
        cut in 0.0f64..1.0,
    ) {
        let cut = (steps.len() as f64 * cut) as usize;
        let mut state = State::new(config());
        let mut restored: Option<State> = None;
        let mut now = 1_700_000_000_000i64;
        for (i, step) in steps.into_iter().enumerate() {
            if i == cut {
                let image = postcard::to_allocvec(&state.rows()).unwrap();
                let back = State::restore(postcard::from_bytes(&image).unwrap());
                prop_assert_eq!(back.digest(), state.digest(), "restored at step {}", i);
                restored = Some(back);
            }
            match step {
                Step::Run(command) => {
                    let seq = state.last_sequence() + 1;
                    let ts = now.max(state.last_timestamp_ms());
                    let outcome = state.apply(&command, seq, ts, &mut NoEvents);
                    if let Some(r) = restored.as_mut() {
                        prop_assert_eq!(r.apply(&command, seq, ts, &mut NoEvents), outcome);
                    }
                }
                Step::Advance(ms) => now += ms,
            }
        }
        let restored = restored.expect("the cut falls inside the history");
        prop_assert_eq!(restored.digest(), state.digest());
    }
}
