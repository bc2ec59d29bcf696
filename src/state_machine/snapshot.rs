//! What a snapshot needs from the state: the rows changed since the last one
//! (dirty tracking, switched on only when snapshots are), and the inverse —
//! rebuilding an exact `State` from the rows of a snapshot.
//!
//! Tracking costs one hash-set insert per command (two for reservation
//! commands); taking a delta copies only the changed rows.

use super::*;
use rustc_hash::FxHashSet;

#[derive(Clone, Debug, Default)]
pub(super) struct Dirty {
    pub enabled: bool,
    /// The next delta must replace the snapshot's contents: tracking began
    /// without a loaded snapshot, so what the tables hold is unknown.
    pub full: bool,
    /// The snapshot's tables hold the state as of this sequence (the last
    /// delta handed out): rows created after it were never written.
    pub since: u64,
    pub accounts: FxHashSet<AccountId>,
    pub reservations: FxHashSet<ReservationKey>,
    /// Pruned since the last delta (those created again since are skipped
    /// when the delta is taken).
    pub removed: FxHashSet<ReservationKey>,
    /// Ring position of the first key not yet handed out.
    pub keys_from: u64,
}

/// The rows changed since the previous delta, consistent at `sequence`.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub sequence: u64,
    /// The settings in force (written with every delta: `snapshot_meta`).
    pub config: StateConfig,
    /// Every row of the state: the writer replaces the tables' contents.
    pub full: bool,
    pub timestamp_ms: i64,
    pub accounts: Vec<Account>,
    pub reservations: Vec<Reservation>,
    pub removed_reservations: Vec<ReservationKey>,
    /// New keys with their ring positions.
    pub keys: Vec<(u64, IdempotencyKey, IdempotencyEntry)>,
    /// Keys at ring positions below this have left the window.
    pub keys_base: u64,
    pub offsets: Vec<(Topic, i32, i64)>,
}

/// The rows of a snapshot, as loaded.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Rows {
    pub sequence: u64,
    pub config: StateConfig,
    pub timestamp_ms: i64,
    pub accounts: Vec<Account>,
    pub reservations: Vec<Reservation>,
    pub keys: Vec<(u64, IdempotencyKey, IdempotencyEntry)>,
    pub keys_base: u64,
    pub offsets: Vec<(Topic, i32, i64)>,
    /// The write-ahead log the snapshot was taken from (not part of the
    /// state: start-up checks it against the data directory's log).
    pub log_id: Option<String>,
}

impl State {
    /// Starts tracking changed rows for [`State::take_delta`]. `full`: the
    /// state was not loaded from the snapshot the deltas will update (none
    /// yet, or unreadable), so the first delta carries every row. Call it on
    /// the state the tables hold (`full`: on the empty state).
    pub fn track_changes(&mut self, full: bool) {
        self.dirty.enabled = true;
        self.dirty.full = full;
        self.dirty.since = self.last_sequence;
        self.dirty.keys_from = self.idempotency.end();
    }

    /// Stops tracking (a replica that stopped leading: nobody takes its
    /// deltas) and forgets what was marked.
    pub fn untrack_changes(&mut self) {
        self.dirty = Dirty::default();
        debug_assert!(!self.dirty.enabled);
    }

    pub(super) fn mark(&mut self, account: Option<AccountId>, reservation: Option<ReservationKey>) {
        if !self.dirty.enabled {
            return;
        }
        if let Some(id) = account {
            self.dirty.accounts.insert(id);
        }
        if let Some(key) = reservation {
            // It may not exist (a rejected Reserve, a fill for a pruned one):
            // take_delta copies only what does.
            self.dirty.reservations.insert(key);
        }
    }

    /// The closed reservation filed at `filed` is about to leave the state
    /// (call it before removing it). Its row is read only while tracking:
    /// pruning otherwise never reads it. One created (its Reserve's
    /// sequence) since the last delta never reached the tables, and a full
    /// delta replaces them anyway, so neither needs a delete.
    pub(super) fn mark_removed(&mut self, filed: Filed) {
        if self.dirty.enabled {
            let removed = self.reservations.filed(filed);
            let (key, created) = (removed.key(), removed.sequence);
            self.dirty.reservations.remove(&key);
            if !self.dirty.full && created <= self.dirty.since {
                self.dirty.removed.insert(key);
            }
        }
    }

    /// The rows changed since the previous call, consistent at `last_sequence()`.
    pub fn take_delta(&mut self) -> Delta {
        assert!(self.dirty.enabled, "track_changes first");
        let dirty = std::mem::take(&mut self.dirty);
        let keys_from = dirty.keys_from.max(self.idempotency.base());
        let delta = Delta {
            sequence: self.last_sequence,
            config: self.config,
            full: dirty.full,
            timestamp_ms: self.last_timestamp_ms,
            accounts: dirty
                .accounts
                .iter()
                .filter_map(|id| self.accounts.get(id).cloned())
                .collect(),
            reservations: dirty
                .reservations
                .iter()
                .filter_map(|k| self.reservations.get(k).copied())
                .collect(),
            // A key pruned then created again is an upsert, not a delete.
            removed_reservations: dirty
                .removed
                .into_iter()
                .filter(|k| !self.reservations.contains_key(k))
                .collect(),
            keys: self
                .idempotency
                .since(keys_from)
                .map(|(p, k, e)| (p, *k, e))
                .collect(),
            keys_base: self.idempotency.base(),
            offsets: self.offsets().collect(),
        };
        self.track_changes(false);
        delta
    }

    /// Every row of the state, consistent at `last_sequence()`: what
    /// [`State::restore`] rebuilds this exact state from (a replica's raft
    /// snapshot, design 7).
    pub fn rows(&self) -> Rows {
        Rows {
            sequence: self.last_sequence,
            config: self.config,
            timestamp_ms: self.last_timestamp_ms,
            accounts: self.accounts.values().cloned().collect(),
            reservations: self.reservations.values().copied().collect(),
            keys: self
                .idempotency
                .since(self.idempotency.base())
                .map(|(p, k, e)| (p, *k, e))
                .collect(),
            keys_base: self.idempotency.base(),
            offsets: self.offsets().collect(),
            log_id: None,
        }
    }

    /// Rebuilds the exact state a snapshot was taken of: the rows, plus the
    /// indexes derived from them (expiries, the closed-reservation queue in
    /// closing order, the key ring in recording order, counters), with the
    /// settings that were in force.
    pub fn restore(rows: Rows) -> State {
        let mut state = State::new(rows.config);
        state.last_sequence = rows.sequence;
        state.last_timestamp_ms = rows.timestamp_ms;
        for mut account in rows.accounts {
            account.open_reservations = 0;
            account.sort_positions();
            state.overdrawn_accounts += u64::from(account.overdrawn);
            state.accounts.insert(account.account_id, account);
        }
        let mut closed = Vec::new();
        for r in rows.reservations {
            let key = r.key();
            if r.state == ReservationState::Open {
                if let Some(at) = r.expires_at_ms {
                    state.expiries.insert((at, key));
                }
                if let Some(a) = state.accounts.get_mut(&r.account_id) {
                    a.open_reservations += 1;
                }
            } else {
                // Closing order: by command, then (within one tick) the
                // expiry order (keys are distinct: never a tie).
                let order = (r.closed_sequence, r.expires_at_ms.unwrap_or(i64::MIN), key);
                let at_ms = r.closed_at_ms;
                let filed = state.reservations.insert(r);
                closed.push((order, super::Closed { at_ms, filed }));
                continue;
            }
            state.reservations.insert(r);
        }
        closed.sort_unstable_by_key(|(order, _)| *order);
        state.closed = closed.into_iter().map(|(_, closed)| closed).collect();
        let mut keys = rows.keys;
        keys.sort_by_key(|(position, _, _)| *position);
        state.idempotency = keys::KeyTable::restore(rows.keys_base, keys);
        state.offsets = rows
            .offsets
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect();
        state
    }
}
