//! The pure state machine: `State::apply(command, sequence, timestamp)`.
//!
//! No I/O, no clock, no randomness: live processing, WAL replay and the property
//! tests run this same function, so replaying the journal rebuilds the state bit
//! for bit. Time enters only as the `timestamp_ms` stamped on a command when the
//! engine journaled it. Business rejections are values ([`ResultCode`]), never
//! errors or panics; `apply` trusts its input (validated at the edge) and asserts
//! its own invariants (see [`invariants`]).

mod digest;
mod index;
pub mod invariants;
mod keys;
mod reservations;
mod room;
mod snapshot;

pub use room::{Pages, Populating};
pub use snapshot::{Delta, Rows};
pub mod position;
mod types;

pub use types::*;

/// Defined with the commands: [`Command::Configure`] journals it.
pub use crate::domain::StateConfig;

use crate::domain::{
    AccountId, AccountStatus, Amount, CashMovement, Command, Currency, Decimal, Fill, Id,
    IdempotencyKey, OpenAccount, ReservationKind, Reserve, SetAccountStatus, Side, Topic,
    Unreserve,
};
use reservations::{Filed, Reservations};
use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, VecDeque};

/// A closed reservation waiting for its window to pass: when it closed, and
/// where it is filed.
#[derive(Clone, Copy, Debug)]
struct Closed {
    at_ms: i64,
    filed: Filed,
}

/// How far ahead of the key or closed reservation it removes pruning
/// prefetches its index slot (a key's record head twice as far): enough
/// misses in flight to overlap, few enough that the lines are still cached
/// when used.
const PRUNE_PREFETCH_AHEAD: usize = 32;

/// How many commands ahead of the one it applies a batch loop calls
/// [`State::prefetch`]: enough to overlap a few misses, near enough that the
/// lines are still cached when the command is applied, and few enough that
/// its prefetches (four lines a command, with the slots after the homes)
/// leave the core's fill buffers to the prunes' (3 measured ahead of 2, 4
/// and 6).
pub const PREFETCH_AHEAD: usize = 3;

/// What applying a command needs that depends on the command alone: the
/// hashes of its idempotency key and of its order's reservation, and its
/// fingerprint. Computed once per command, off the thread that applies it
/// where there is one — by the ingress thread that submits it (the
/// engine's `Preparation`), on the replay's reading thread — or else by the
/// writer as it queues the command for prefetching, and handed to
/// [`State::apply_prepared`], so no command is hashed twice.
/// The default prepares nothing (what a command without a key gets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    key: Option<keys::KeyHash>,
    /// Reserve, Unreserve and Fill: the hash of (account, order).
    reservation: Option<u64>,
    /// Keyed commands only (0 otherwise).
    fingerprint: u64,
}

impl Prepared {
    pub fn of(command: &Command) -> Prepared {
        let Some((space, id)) = command.key_parts() else {
            return Prepared::default();
        };
        let order = match command {
            Command::Reserve(c) => Some((c.account_id, &c.order_id)),
            Command::Unreserve(c) => Some((c.account_id, &c.order_id)),
            Command::Fill(c) => Some((c.account_id, &c.order_id)),
            _ => None,
        };
        Prepared {
            key: Some(keys::KeyHash::of(space, id)),
            reservation: order.map(|(account, order)| reservations::hash_parts(account, order)),
            fingerprint: command.fingerprint(),
        }
    }

    /// Whether the command has an idempotency key.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// The hash of the command's (account, order): Reserve, Unreserve, Fill.
    fn order(&self) -> u64 {
        self.reservation.expect("the command names an order")
    }
}

/// Prefetches for a run of items some of which are not commands (the
/// writer's queue entries: reads, batches) [`PREFETCH_AHEAD`] items ahead of
/// the one being applied: one [`Lookahead::push`] per item, in order, and a
/// [`Lookahead::pop`] when its turn comes. A run of commands alone, all
/// prepared, uses [`State::prefetch_ahead`].
#[derive(Default)]
pub struct Lookahead {
    /// One entry per item pushed and not yet popped; `None` for an item
    /// that is not a command.
    ring: VecDeque<Option<Prepared>>,
}

impl Lookahead {
    /// Queues the next item of the run: its command's [`Prepared`],
    /// prefetched for, or `None` for an item that is not a command.
    pub fn push(&mut self, state: &State, prepared: Option<Prepared>) {
        if let Some(prepared) = &prepared {
            state.prefetch(prepared);
        }
        self.ring.push_back(prepared);
    }

    /// The oldest queued item's [`Prepared`]: `None` when it is not a
    /// command, or when nothing is queued.
    pub fn pop(&mut self) -> Option<Prepared> {
        self.ring.pop_front().flatten()
    }
}

/// The room [`State::make_room_for_replay`] made, not yet faulted in: for
/// the keys' records and for the new reservation rows, each from the next
/// one on, in the order they are written.
#[derive(Debug)]
pub struct ReplayRoom {
    pub keys: Populating,
    pub rows: Populating,
}

/// What the idempotency table remembers of a key.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct IdempotencyEntry {
    pub fingerprint: u64,
    pub outcome: Outcome,
    pub recorded_at_ms: i64,
}

/// All accounts, positions, reservations, idempotency keys and consumed Kafka
/// offsets. Owned by the engine thread alone.
#[derive(Clone, Debug, Default)]
pub struct State {
    config: StateConfig,
    accounts: FxHashMap<AccountId, Account>,
    reservations: Reservations,
    /// Open reservations with an expiry, by expiry.
    expiries: BTreeSet<(i64, ReservationKey)>,
    /// Closed reservations in closing order, pruned after the window.
    closed: VecDeque<Closed>,
    idempotency: keys::KeyTable,
    /// Last applied offset per inbound (topic, partition).
    offsets: FxHashMap<(Topic, i32), i64>,
    last_sequence: u64,
    last_timestamp_ms: i64,
    overdrawn_accounts: u64,
    /// Rows changed since the last snapshot delta (when snapshots are on).
    dirty: snapshot::Dirty,
}

impl State {
    pub fn new(config: StateConfig) -> State {
        assert!(config.is_valid(), "{config:?}");
        State {
            config,
            ..State::default()
        }
    }

    /// The settings in force: [`StateConfig::default`] for a fresh state,
    /// then those of the last journaled [`Command::Configure`].
    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    /// Sequence of the last applied command (0 before the first).
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    pub fn last_timestamp_ms(&self) -> i64 {
        self.last_timestamp_ms
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    pub fn reservation(&self, account_id: AccountId, order_id: &Id) -> Option<&Reservation> {
        self.reservations.get(&ReservationKey {
            account_id,
            order_id: *order_id,
        })
    }

    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// Idempotency keys the state holds before its tables grow.
    pub fn keys_capacity(&self) -> usize {
        self.idempotency.capacity()
    }

    /// Reservations the state holds before its index grows.
    pub fn reservations_capacity(&self) -> usize {
        self.reservations.capacity()
    }

    /// Keys in their window, oldest first.
    pub fn idempotency_entries(&self) -> impl Iterator<Item = (&IdempotencyKey, IdempotencyEntry)> {
        self.idempotency.iter()
    }

    pub fn offsets(&self) -> impl Iterator<Item = (Topic, i32, i64)> + '_ {
        self.offsets.iter().map(|(&(t, p), &o)| (t, p, o))
    }

    /// Last applied offset of an inbound partition; `None` if never seen.
    pub fn offset(&self, topic: Topic, partition: i32) -> Option<i64> {
        self.offsets.get(&(topic, partition)).copied()
    }

    pub fn overdrawn_accounts(&self) -> u64 {
        self.overdrawn_accounts
    }

    /// Makes room for `orders` reservations and the keys of their Reserve and
    /// Unreserve, so the tables do not resize (a stall that copies a whole
    /// table) until they hold more. Changes nothing observable.
    ///
    /// Every page of the room is written once here: memory allocated but never
    /// touched would fault its pages in on the hot path instead.
    pub fn reserve_orders(&mut self, orders: usize, pages: Pages) {
        self.reservations.reserve(orders, pages);
        let placeholder = Closed {
            at_ms: 0,
            filed: Filed::PLACEHOLDER,
        };
        room::touch_ring(&mut self.closed, orders, placeholder, pages);
        self.idempotency.reserve(orders.saturating_mul(2), pages);
    }

    /// Makes room for the commands of a replay of `records` journal
    /// records that will all stay in the idempotency window: a key for each
    /// record, a reservation row for each (rows are added in order at the
    /// end of the slab), the reservations' index for half of them (it grows
    /// if more come). The indexes are faulted in here, at once; the keys'
    /// records and the rows are not written, and their room is returned for
    /// the thread that reads the journal to fault pages in ahead of the one
    /// that applies it ([`room::Populating`]); `None` when there is room already (made by
    /// [`State::reserve_orders`]) or the memory cannot be had — the tables
    /// then grow as they fill. Changes nothing observable.
    pub fn make_room_for_replay(&mut self, records: usize) -> Option<ReplayRoom> {
        let free_keys = self.idempotency.capacity() - self.idempotency.len();
        if records <= free_keys {
            return None;
        }
        let keys = self.idempotency.make_room(records)?;
        let rows = self.reservations.make_room(records / 2, records)?;
        Some(ReplayRoom { keys, rows })
    }

    /// Starts loading into the cache the index slots applying the command
    /// `prepared` was made from will probe (its key's, its reservation's);
    /// changes nothing. A loop over a batch calls it for the command
    /// [`PREFETCH_AHEAD`] places ahead of the one it applies, so that the
    /// cache misses of several commands overlap instead of following one
    /// another ([`State::prefetch_ahead`], [`Lookahead`]).
    pub fn prefetch(&self, prepared: &Prepared) {
        if let Some(key) = prepared.key {
            self.idempotency.prefetch(key);
        }
        if let Some(reservation) = prepared.reservation {
            self.reservations.prefetch(reservation);
        }
    }

    /// For a loop that applies `prepared[i]` for `i` = 0, 1, 2, ... in
    /// turn: [`State::prefetch`] for the command [`PREFETCH_AHEAD`] places
    /// further (at `i` = 0, for the first ones too).
    ///
    /// ```text
    /// for (i, command) in commands.iter().enumerate() {
    ///     state.prefetch_ahead(&prepared, i);
    ///     state.apply_prepared(command, &prepared[i], ...);
    /// }
    /// ```
    pub fn prefetch_ahead(&self, prepared: &[Prepared], i: usize) {
        if i == 0 {
            for first in prepared.iter().take(PREFETCH_AHEAD) {
                self.prefetch(first);
            }
        }
        if let Some(ahead) = prepared.get(i + PREFETCH_AHEAD) {
            self.prefetch(ahead);
        }
    }

    /// Returns the memory of pruned keys and reservations to the allocator.
    /// Changes nothing observable (not part of `apply`); for quiet times.
    pub fn shrink_to_fit(&mut self) {
        self.reservations.shrink_to_fit();
        self.closed.shrink_to_fit();
        self.idempotency.shrink_to_fit();
    }

    /// Earliest journaled time at which a tick has work: an expiry, or a key or
    /// closed reservation leaving its window. The engine journals a tick then.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        let window = self.config.idempotency_window_ms;
        let expiry = self.expiries.first().map(|(t, _)| *t);
        let key = self.idempotency.oldest_ms().map(|t| t + window);
        let closed = self.closed.front().map(|c| c.at_ms + window);
        [expiry, key, closed].into_iter().flatten().min()
    }

    /// Applies one journaled command. `sequence` is the next one, `timestamp_ms`
    /// the journaled time (never decreasing). Events are pushed to `events`.
    pub fn apply<S: EventSink>(
        &mut self,
        command: &Command,
        sequence: u64,
        timestamp_ms: i64,
        events: &mut S,
    ) -> Outcome {
        self.apply_prepared(
            command,
            &Prepared::of(command),
            sequence,
            timestamp_ms,
            events,
        )
    }

    /// [`State::apply`] with the command's hashes and fingerprint computed
    /// ahead: `prepared` is [`Prepared::of`]`(command)`.
    pub fn apply_prepared<S: EventSink>(
        &mut self,
        command: &Command,
        prepared: &Prepared,
        sequence: u64,
        timestamp_ms: i64,
        events: &mut S,
    ) -> Outcome {
        debug_assert_eq!(
            *prepared,
            Prepared::of(command),
            "prepared from this command"
        );
        let now = self.advance(sequence, timestamp_ms);

        if let Some(source) = command.source() {
            let last = self
                .offsets
                .entry((source.topic, source.partition))
                .or_insert(-1);
            if source.offset <= *last {
                // A redelivery of a message already applied: nothing happens.
                let mut outcome = Outcome::new(ResultCode::Ok, sequence);
                outcome.replayed = true;
                return outcome;
            }
            *last = source.offset;
        }
        match command {
            // Only the offset moves: the DLQ record is derived from the journal.
            Command::DeadLetter(_) => return Outcome::new(ResultCode::Ok, sequence),
            Command::Configure(config) => {
                assert!(config.is_valid(), "validated before journaling");
                self.config = *config;
                return Outcome::new(ResultCode::Ok, sequence);
            }
            _ => {}
        }

        let Some(key) = command.key() else {
            self.tick(now, sequence, events);
            return Outcome::new(ResultCode::Ok, sequence);
        };
        self.apply_keyed(command, key, prepared, sequence, now, events)
    }

    /// Moves to `sequence` at journaled time `timestamp_ms`; returns the time
    /// the command is judged at.
    fn advance(&mut self, sequence: u64, timestamp_ms: i64) -> i64 {
        assert_eq!(sequence, self.last_sequence + 1, "sequences are contiguous");
        debug_assert!(
            timestamp_ms >= self.last_timestamp_ms,
            "journaled time never decreases"
        );
        self.last_sequence = sequence;
        self.last_timestamp_ms = timestamp_ms.max(self.last_timestamp_ms);
        self.last_timestamp_ms
    }

    /// Applies one journaled all-or-nothing basket of Reserves (one sequence,
    /// one record): either every item is applied or none is. `out` receives
    /// one outcome per item, in order:
    ///
    /// - every item would succeed: each is applied exactly as a Reserve sent
    ///   alone (an item whose key was already applied replays its outcome);
    /// - otherwise nothing moves: a failing item carries its own result, the
    ///   others `LinkedRequestFailed`, and every new key keeps that outcome,
    ///   so a retry of the basket replays the same replies.
    ///
    /// Items are judged in order against the state plus the earlier items'
    /// effects, with the same rules as [`Command::Reserve`]; a key that
    /// appears twice in one basket is an `IdempotencyConflict` (the edge
    /// refuses such a basket before it is journaled).
    pub fn apply_basket<S: EventSink>(
        &mut self,
        items: &[Reserve],
        sequence: u64,
        timestamp_ms: i64,
        events: &mut S,
        out: &mut Vec<Outcome>,
    ) {
        let now = self.advance(sequence, timestamp_ms);
        out.clear();
        let mut trial = Trial::default();
        let mut failed = false;
        for c in items {
            let outcome = self.judge_reserve(c, sequence, now, &mut trial);
            failed |= !outcome.result.is_ok();
            out.push(outcome);
        }
        for (c, outcome) in items.iter().zip(out.iter_mut()) {
            events.cause(c.request_id);
            let command = Command::Reserve(*c);
            let key = command.key().expect("a Reserve has a key");
            if outcome.replayed || outcome.result == ResultCode::IdempotencyConflict {
                // The key keeps the entry it has.
                continue;
            }
            if !failed {
                let prepared = Prepared::of(&command);
                let applied = self.apply_keyed(&command, key, &prepared, sequence, now, events);
                debug_assert_eq!(applied, *outcome, "judged as applied");
                *outcome = applied;
                continue;
            }
            if outcome.result.is_ok() {
                outcome.result = ResultCode::LinkedRequestFailed;
            }
            // Nothing moved: the balances after are the state's.
            if let (Some(asset), Some(account)) = (outcome.asset, self.accounts.get(&c.account_id))
            {
                let (available, reserved) = balance_of(account, c.kind, asset);
                *outcome = outcome.with_balance(asset, available, reserved);
            }
            self.idempotency.insert(
                key,
                IdempotencyEntry {
                    fingerprint: command.fingerprint(),
                    outcome: *outcome,
                    recorded_at_ms: now,
                },
            );
            self.mark(
                Some(c.account_id),
                Some(ReservationKey {
                    account_id: c.account_id,
                    order_id: c.order_id,
                }),
            );
        }
    }

    /// What a Reserve of a basket would do, given the earlier items' effects
    /// in `trial` (updated when it would succeed). Reads the state only.
    fn judge_reserve(&self, c: &Reserve, seq: u64, now: i64, trial: &mut Trial) -> Outcome {
        let command = Command::Reserve(*c);
        let key = command.key().expect("a Reserve has a key");
        if !trial.keys.insert(key.id) {
            return Outcome::new(ResultCode::IdempotencyConflict, seq);
        }
        if let Some(entry) = self.idempotency.get(&key) {
            if entry.fingerprint == command.fingerprint() {
                return Outcome {
                    replayed: true,
                    ..entry.outcome
                };
            }
            return Outcome::new(ResultCode::IdempotencyConflict, seq);
        }
        let account = self.accounts.get(&c.account_id);
        let asset = (c.account_id, c.kind, c.asset);
        let balance = match (trial.balances.get(&asset), account) {
            (Some(&balance), _) => balance,
            (None, Some(account)) => balance_of(account, c.kind, c.asset),
            (None, None) => (Amount::ZERO, Amount::ZERO),
        };
        let order = ReservationKey {
            account_id: c.account_id,
            order_id: c.order_id,
        };
        let taken = self.reservations.contains_key(&order) || trial.orders.contains(&order);
        match reserve_rules(c, now, account, balance, taken) {
            Err(code) => reserve_refused(c, code, seq, account.is_some(), balance),
            Ok((_, after)) => {
                trial.balances.insert(asset, after);
                trial.orders.insert(order);
                Outcome::new(ResultCode::Ok, seq).with_balance(c.asset, after.0, after.1)
            }
        }
    }

    /// A keyed command after its sequence and offset checks: the idempotency
    /// table, then the command's own rules.
    fn apply_keyed<S: EventSink>(
        &mut self,
        command: &Command,
        key: IdempotencyKey,
        prepared: &Prepared,
        sequence: u64,
        now: i64,
        events: &mut S,
    ) -> Outcome {
        let fingerprint = prepared.fingerprint;
        let hash = prepared.key.expect("a keyed command's key is hashed");
        if let Some(entry) = self.idempotency.get_hashed(hash, &key) {
            if entry.fingerprint == fingerprint {
                return Outcome {
                    replayed: true,
                    ..entry.outcome
                };
            }
            return Outcome::new(ResultCode::IdempotencyConflict, sequence);
        }

        let outcome = match command {
            Command::OpenAccount(c) => self.open_account(c, sequence, events),
            Command::SetAccountStatus(c) => self.set_status(c, sequence, events),
            Command::Reserve(c) => self.reserve(c, prepared.order(), sequence, now, events),
            Command::Unreserve(c) => self.unreserve(c, prepared.order(), sequence, now, events),
            Command::Deposit(c) => self.deposit(c, sequence, events),
            Command::Withdraw(c) => self.withdraw(c, sequence, events),
            Command::Fill(c) => self.fill(c, prepared.order(), sequence, now, events),
            Command::Tick | Command::DeadLetter(_) | Command::Configure(_) => {
                unreachable!("no key")
            }
        };
        debug_assert!(!outcome.replayed && outcome.sequence == sequence);
        self.idempotency.insert_hashed(
            hash,
            key,
            IdempotencyEntry {
                fingerprint,
                outcome,
                recorded_at_ms: now,
            },
        );
        let reservation = match command {
            Command::Reserve(c) => Some((c.account_id, c.order_id)),
            Command::Unreserve(c) => Some((c.account_id, c.order_id)),
            Command::Fill(c) => Some((c.account_id, c.order_id)),
            _ => None,
        };
        self.mark(
            command.account_id(),
            reservation.map(|(account_id, order_id)| ReservationKey {
                account_id,
                order_id,
            }),
        );
        #[cfg(debug_assertions)]
        if let Some(id) = command.account_id() {
            invariants::check_account_local(self, id);
        }
        outcome
    }

    fn open_account<S: EventSink>(&mut self, c: &OpenAccount, seq: u64, events: &mut S) -> Outcome {
        if let Some(existing) = self.accounts.get(&c.account_id) {
            let result = if existing.base_currency == c.base_currency {
                ResultCode::Ok
            } else {
                ResultCode::AccountAlreadyExists
            };
            return Outcome::new(result, seq);
        }
        self.accounts
            .insert(c.account_id, Account::new(c.account_id, c.base_currency));
        events.push(event(EventKind::AccountOpened, c.account_id).asset(c.base_currency));
        Outcome::new(ResultCode::Ok, seq)
    }

    fn set_status<S: EventSink>(
        &mut self,
        c: &SetAccountStatus,
        seq: u64,
        events: &mut S,
    ) -> Outcome {
        let Some(account) = self.accounts.get_mut(&c.account_id) else {
            return Outcome::new(ResultCode::AccountNotFound, seq);
        };
        if account.status == c.status {
            return Outcome::new(ResultCode::Ok, seq);
        }
        let empty = account.open_reservations == 0 && account.is_empty();
        if c.status == AccountStatus::Closed && !empty {
            return Outcome::new(ResultCode::AccountNotEmpty, seq);
        }
        account.status = c.status;
        let mut e = event(EventKind::StatusChanged, c.account_id);
        e.reason = if c.reason.is_empty() {
            Id::literal(c.status.name())
        } else {
            c.reason
        };
        events.push(e);
        Outcome::new(ResultCode::Ok, seq)
    }

    /// A new Reserve (a retry was answered by the key check before this).
    fn reserve<S: EventSink>(
        &mut self,
        c: &Reserve,
        order_hash: u64,
        seq: u64,
        now: i64,
        events: &mut S,
    ) -> Outcome {
        debug_assert!(c.amount > Decimal::ZERO);
        let key = ReservationKey {
            account_id: c.account_id,
            order_id: c.order_id,
        };
        let account = self.accounts.get_mut(&c.account_id);
        let balance = account
            .as_deref()
            .map_or((Amount::ZERO, Amount::ZERO), |a| {
                balance_of(a, c.kind, c.asset)
            });
        // One probe: the vacant slot is filled below.
        let slot = self.reservations.find_hashed(order_hash, &key);
        let taken = slot.is_ok();
        let after = reserve_rules(c, now, account.as_deref(), balance, taken);
        let ((amount, (available_after, reserved_after)), account, slot) =
            match (after, account, slot) {
                (Ok(after), Some(account), Err(slot)) => (after, account, slot),
                (Err(code), account, _) => {
                    return reserve_refused(c, code, seq, account.is_some(), balance)
                }
                (Ok(_), _, _) => unreachable!("the rules need the account and a free order"),
            };
        set_balance(account, c.kind, c.asset, available_after, reserved_after);
        let (available, reserved) = balance_of(account, c.kind, c.asset);
        debug_assert!(available >= Amount::ZERO || account.overdrawn);
        self.reservations.insert_vacant(
            slot,
            Reservation {
                account_id: c.account_id,
                order_id: c.order_id,
                kind: c.kind,
                asset: c.asset,
                amount,
                remaining: amount,
                consumed: Amount::ZERO,
                released: Amount::ZERO,
                state: ReservationState::Open,
                expires_at_ms: c.expires_at_ms,
                sequence: seq,
                closed_at_ms: 0,
                closed_sequence: 0,
            },
        );
        account.open_reservations += 1;
        if let Some(at) = c.expires_at_ms {
            self.expiries.insert((at, key));
        }
        events.push(
            event(EventKind::Reserved, c.account_id)
                .order(c.order_id)
                .asset(c.asset)
                .moved(amount, available, reserved),
        );
        Outcome::new(ResultCode::Ok, seq).with_balance(c.asset, available, reserved)
    }

    fn unreserve<S: EventSink>(
        &mut self,
        c: &Unreserve,
        order_hash: u64,
        seq: u64,
        now: i64,
        events: &mut S,
    ) -> Outcome {
        let Some(account) = self.accounts.get_mut(&c.account_id) else {
            return Outcome::new(ResultCode::AccountNotFound, seq);
        };
        let key = ReservationKey {
            account_id: c.account_id,
            order_id: c.order_id,
        };
        let Some((filed, reservation)) = self.reservations.get_mut_hashed(order_hash, &key) else {
            return Outcome::new(ResultCode::ReservationNotFound, seq);
        };
        if reservation.state != ReservationState::Open {
            let (available, reserved) = balance_of(account, reservation.kind, reservation.asset);
            return Outcome::new(ResultCode::Ok, seq).with_balance(
                reservation.asset,
                available,
                reserved,
            );
        }
        // An amount the edge accepted always converts (at most 8 places).
        let amount = match c.amount.map(Amount::of) {
            None => Some(reservation.remaining),
            Some(converted) => converted,
        };
        let Some(amount) = amount.filter(|&a| a <= reservation.remaining) else {
            let (available, reserved) = balance_of(account, reservation.kind, reservation.asset);
            return Outcome::new(ResultCode::AmountExceedsReservation, seq).with_balance(
                reservation.asset,
                available,
                reserved,
            );
        };
        let Some((available, reserved)) = release(account, reservation, amount) else {
            let (available, reserved) = balance_of(account, reservation.kind, reservation.asset);
            return Outcome::new(ResultCode::AmountOverflow, seq).with_balance(
                reservation.asset,
                available,
                reserved,
            );
        };
        if reservation.remaining.is_zero() {
            close(
                (filed, reservation),
                ReservationState::Released,
                (now, seq),
                &mut self.expiries,
                &mut self.closed,
            );
            account.open_reservations -= 1;
        }
        events.push(
            event(EventKind::Unreserved, c.account_id)
                .order(c.order_id)
                .asset(reservation.asset)
                .moved(amount, available, reserved),
        );
        // Released cash can cover a negative balance.
        refresh_overdrawn(
            account,
            &[reservation.asset],
            &mut self.overdrawn_accounts,
            events,
        );
        let mut outcome =
            Outcome::new(ResultCode::Ok, seq).with_balance(reservation.asset, available, reserved);
        outcome.released = amount;
        outcome
    }

    fn deposit<S: EventSink>(&mut self, c: &CashMovement, seq: u64, events: &mut S) -> Outcome {
        debug_assert!(c.amount > Decimal::ZERO);
        let Some(account) = self.accounts.get_mut(&c.account_id) else {
            return Outcome::new(ResultCode::AccountNotFound, seq);
        };
        let Some(amount) = Amount::of(c.amount) else {
            return Outcome::new(ResultCode::AmountOverflow, seq);
        };
        if account.status == AccountStatus::Closed {
            return Outcome::new(ResultCode::AccountNotActive, seq);
        }
        let (available, reserved) = balance_of(account, ReservationKind::Cash, c.currency);
        let Some(available) = available
            .checked_add(amount)
            .filter(|&after| cash_in_range(after, reserved))
        else {
            return Outcome::new(ResultCode::AmountOverflow, seq)
                .with_balance(c.currency, available, reserved);
        };
        account.cash_entry(c.currency).available = available;
        events.push(
            event(EventKind::Deposited, c.account_id)
                .asset(c.currency)
                .moved(amount, available, reserved),
        );
        refresh_overdrawn(account, &[c.currency], &mut self.overdrawn_accounts, events);
        Outcome::new(ResultCode::Ok, seq).with_balance(c.currency, available, reserved)
    }

    fn withdraw<S: EventSink>(&mut self, c: &CashMovement, seq: u64, events: &mut S) -> Outcome {
        debug_assert!(c.amount > Decimal::ZERO);
        let Some(account) = self.accounts.get_mut(&c.account_id) else {
            return Outcome::new(ResultCode::AccountNotFound, seq);
        };
        let Some(amount) = Amount::of(c.amount) else {
            return Outcome::new(ResultCode::AmountOverflow, seq);
        };
        let (available, reserved) = balance_of(account, ReservationKind::Cash, c.currency);
        let result = if account.status != AccountStatus::Active {
            ResultCode::AccountNotActive
        } else if available < amount {
            ResultCode::InsufficientFunds
        } else {
            ResultCode::Ok
        };
        if result != ResultCode::Ok {
            let mut e = event(EventKind::WithdrawalRejected, c.account_id)
                .asset(c.currency)
                .moved(Amount::ZERO, available, reserved);
            e.reason = Id::literal(result.name());
            events.push(e);
            return Outcome::new(result, seq).with_balance(c.currency, available, reserved);
        }
        // `amount <= available`: the difference is in range.
        let Some(available) = available.checked_sub(amount) else {
            unreachable!("0 <= available - amount < available");
        };
        account.cash_entry(c.currency).available = available;
        debug_assert!(available >= Amount::ZERO);
        events.push(
            event(EventKind::Withdrawn, c.account_id)
                .asset(c.currency)
                .moved(amount, available, reserved),
        );
        Outcome::new(ResultCode::Ok, seq).with_balance(c.currency, available, reserved)
    }

    /// A fill already happened on the exchange: it is applied even without (or
    /// beyond) a reservation, taking the shortfall from what is free, and flags the
    /// account overdrawn if that goes negative.
    fn fill<S: EventSink>(
        &mut self,
        c: &Fill,
        order_hash: u64,
        seq: u64,
        now: i64,
        events: &mut S,
    ) -> Outcome {
        debug_assert!(c.quantity > Decimal::ZERO && c.filled_amount >= Decimal::ZERO);
        let Some(account) = self.accounts.get_mut(&c.account_id) else {
            return Outcome::new(ResultCode::AccountNotFound, seq);
        };
        let (Some(quantity), Some(filled_amount)) =
            (Amount::of(c.quantity), Amount::of(c.filled_amount))
        else {
            return Outcome::new(ResultCode::AmountOverflow, seq);
        };
        let traded = Traded {
            side: c.side,
            symbol: c.symbol,
            quantity,
            filled_amount,
        };
        let currency = c.currency.unwrap_or(account.base_currency);
        if account
            .position(c.symbol)
            .is_some_and(|p| p.currency != currency)
        {
            return Outcome::new(ResultCode::CurrencyMismatch, seq);
        }
        let key = ReservationKey {
            account_id: c.account_id,
            order_id: c.order_id,
        };
        let (kind, asset, wanted) = match c.side {
            Side::Buy => (ReservationKind::Cash, currency, filled_amount),
            Side::Sell => (ReservationKind::Security, c.symbol, quantity),
        };
        let reservation = self
            .reservations
            .get_mut_hashed(order_hash, &key)
            .filter(|(_, r)| {
                r.state == ReservationState::Open && r.kind == kind && r.asset == asset
            });
        let consumed = reservation
            .as_ref()
            .map_or(Amount::ZERO, |(_, r)| r.remaining.min(wanted));
        // Everything is computed first: a fill refused for overflow changes nothing.
        let Some(settled) = settle(account, &traded, currency, consumed) else {
            let (available, reserved) = balance_of(account, ReservationKind::Cash, currency);
            return Outcome::new(ResultCode::AmountOverflow, seq)
                .with_balance(currency, available, reserved);
        };
        if let Some((filed, r)) = reservation {
            r.remaining -= consumed;
            r.consumed += consumed;
            if r.remaining.is_zero() {
                close(
                    (filed, r),
                    ReservationState::Consumed,
                    (now, seq),
                    &mut self.expiries,
                    &mut self.closed,
                );
                account.open_reservations -= 1;
            }
        }
        let (cash_available, cash_reserved) = (settled.available, settled.reserved);
        let cash = account.cash_entry(currency);
        (cash.available, cash.reserved) = (cash_available, cash_reserved);
        let position = account.position_entry(c.symbol, currency);
        *position = settled.position;
        let (free, locked) = (position.free_quantity(), position.reserved_quantity);

        let fill = event(EventKind::FillApplied, c.account_id).order(c.order_id);
        events.push(
            fill.asset(currency)
                .moved(filled_amount, cash_available, cash_reserved),
        );
        events.push(fill.asset(c.symbol).moved(quantity, free, locked));
        refresh_overdrawn(
            account,
            &[currency, c.symbol],
            &mut self.overdrawn_accounts,
            events,
        );
        Outcome::new(ResultCode::Ok, seq).with_balance(currency, cash_available, cash_reserved)
    }

    /// Expires due reservations, then prunes keys and closed reservations whose
    /// window has passed; at most `tick_work_max` items in all.
    fn tick<S: EventSink>(&mut self, now: i64, sequence: u64, events: &mut S) {
        let mut budget = self.config.tick_work_max;
        while budget > 0 {
            let Some(&(at, key)) = self.expiries.first() else {
                break;
            };
            if at > now {
                break;
            }
            budget -= 1;
            let reservation = self.reservations.get_mut(&key);
            let account = self.accounts.get_mut(&key.account_id);
            let (Some((filed, reservation)), Some(account)) = (reservation, account) else {
                unreachable!("an indexed expiry has its reservation and account");
            };
            debug_assert_eq!(reservation.state, ReservationState::Open);
            let amount = reservation.remaining;
            let Some((available, reserved)) = release(account, reservation, amount) else {
                unreachable!("a release stays in range: cash keeps its total, shares unlock");
            };
            close(
                (filed, reservation),
                ReservationState::Expired,
                (now, sequence),
                &mut self.expiries,
                &mut self.closed,
            );
            account.open_reservations -= 1;
            events.push(
                event(EventKind::ReservationExpired, key.account_id)
                    .order(key.order_id)
                    .asset(reservation.asset)
                    .moved(amount, available, reserved),
            );
            refresh_overdrawn(
                account,
                &[reservation.asset],
                &mut self.overdrawn_accounts,
                events,
            );
            self.mark(Some(key.account_id), Some(key));
        }
        let window = self.config.idempotency_window_ms;
        while budget > 0 {
            let Some(at) = self.idempotency.oldest_ms() else {
                break;
            };
            if at + window > now {
                break;
            }
            budget -= 1;
            self.idempotency.pop_oldest();
        }
        while budget > 0 {
            let Some(&Closed { at_ms, filed }) = self.closed.front() else {
                break;
            };
            if at_ms + window > now {
                break;
            }
            budget -= 1;
            if let Some(ahead) = self.closed.get(PRUNE_PREFETCH_AHEAD) {
                self.reservations.prefetch_filed(ahead.filed);
            }
            self.closed.pop_front();
            debug_assert!(self.reservations.filed(filed).state != ReservationState::Open);
            self.mark_removed(filed);
            self.reservations.remove(filed);
        }
    }
}

/// The rules of a new Reserve, judged on what it would apply to: its account,
/// `balance` = (available, reserved) of its asset, `taken` = its order already
/// has a reservation. The balances after, or why not. Reads only.
fn reserve_rules(
    c: &Reserve,
    now: i64,
    account: Option<&Account>,
    (available, reserved): (Amount, Amount),
    taken: bool,
) -> Result<(Amount, (Amount, Amount)), ResultCode> {
    // Judged at the journaled time, not at the edge: a retry of an
    // acknowledged Reserve replays even once its expiry has passed.
    if c.expires_at_ms.is_some_and(|at| at <= now) {
        return Err(ResultCode::ExpiryPassed);
    }
    let Some(account) = account else {
        return Err(ResultCode::AccountNotFound);
    };
    if account.status != AccountStatus::Active {
        return Err(ResultCode::AccountNotActive);
    }
    if taken {
        return Err(ResultCode::OrderAlreadyReserved);
    }
    // An amount the edge accepted always converts (at most 8 places).
    let amount = Amount::of(c.amount).ok_or(ResultCode::AmountOverflow)?;
    if available < amount {
        return Err(match c.kind {
            ReservationKind::Cash => ResultCode::InsufficientFunds,
            ReservationKind::Security => ResultCode::InsufficientPosition,
        });
    }
    // Cash moves within one balance (its total stays in range), shares
    // lock at most the quantity: checked all the same.
    let after = available
        .checked_sub(amount)
        .zip(reserved.checked_add(amount));
    Ok((amount, after.ok_or(ResultCode::AmountOverflow)?))
}

/// The outcome of a Reserve the rules refused: with the asset's balances
/// when the account exists and the refusal is about it (not an expiry).
fn reserve_refused(
    c: &Reserve,
    code: ResultCode,
    seq: u64,
    account_found: bool,
    (available, reserved): (Amount, Amount),
) -> Outcome {
    if account_found && code != ResultCode::ExpiryPassed {
        Outcome::new(code, seq).with_balance(c.asset, available, reserved)
    } else {
        Outcome::new(code, seq)
    }
}

/// The effects of a basket's earlier items, while judging the next.
#[derive(Default)]
struct Trial {
    /// (available, reserved) after the earlier items, per (account, kind, asset).
    balances: FxHashMap<(AccountId, ReservationKind, crate::domain::Asset), (Amount, Amount)>,
    orders: rustc_hash::FxHashSet<ReservationKey>,
    keys: rustc_hash::FxHashSet<Id>,
}

/// (available, reserved) of a cash currency or (free, reserved) shares of a symbol.
fn balance_of(
    account: &Account,
    kind: ReservationKind,
    asset: crate::domain::Asset,
) -> (Amount, Amount) {
    match kind {
        ReservationKind::Cash => account
            .cash(asset)
            .map_or((Amount::ZERO, Amount::ZERO), |b| (b.available, b.reserved)),
        ReservationKind::Security => account
            .position(asset)
            .map_or((Amount::ZERO, Amount::ZERO), |p| {
                (p.free_quantity(), p.reserved_quantity)
            }),
    }
}

/// A fill's trade, its amounts as the state keeps them.
struct Traded {
    side: Side,
    symbol: crate::domain::Symbol,
    quantity: Amount,
    filled_amount: Amount,
}

/// What a fill leaves: the settlement currency's balance and the position.
struct Settlement {
    available: Amount,
    reserved: Amount,
    position: Position,
}

/// The balances after fill `c`, `consumed` of which comes from its order's
/// reservation (cash for a buy, shares for a sell); `None` if a kept value
/// would leave the range. Reads only.
fn settle(
    account: &Account,
    c: &Traded,
    currency: Currency,
    consumed: Amount,
) -> Option<Settlement> {
    let (available, reserved) = balance_of(account, ReservationKind::Cash, currency);
    let (available, reserved) = match c.side {
        Side::Buy => (
            available.checked_sub(c.filled_amount - consumed)?,
            reserved.checked_sub(consumed)?,
        ),
        Side::Sell => (available.checked_add(c.filled_amount)?, reserved),
    };
    if !cash_in_range(available, reserved) {
        return None;
    }
    let before = account
        .position(c.symbol)
        .copied()
        .unwrap_or(Position::flat(c.symbol, currency));
    let (dq, reserved_quantity) = match c.side {
        Side::Buy => (c.quantity, before.reserved_quantity),
        Side::Sell => (-c.quantity, before.reserved_quantity.checked_sub(consumed)?),
    };
    let mut position = position::traded(&before, dq, c.filled_amount)?;
    position.reserved_quantity = reserved_quantity;
    Some(Settlement {
        available,
        reserved,
        position,
    })
}

/// Commits an asset's new (available, reserved): both for cash, the
/// reserved quantity for shares (their free quantity is derived).
fn set_balance(
    account: &mut Account,
    kind: ReservationKind,
    asset: crate::domain::Asset,
    available: Amount,
    reserved: Amount,
) {
    match kind {
        ReservationKind::Cash => {
            let balance = account.cash_entry(asset);
            balance.available = available;
            balance.reserved = reserved;
        }
        ReservationKind::Security => {
            // Only called where free shares were found or are locked, and
            // positions are never removed.
            let position = account.position_mut(asset);
            let position = position.expect("a position with locked or free shares exists");
            position.reserved_quantity = reserved;
            debug_assert_eq!(position.free_quantity(), available);
        }
    }
}

/// A cash balance the state may keep: each part in range, and their total
/// too, so that releasing reserved cash (an Unreserve, or an expiry, which
/// cannot be refused) always stays in range.
fn cash_in_range(available: Amount, reserved: Amount) -> bool {
    available.checked_add(reserved).is_some()
}

/// Moves `amount` of an open reservation back to free; returns the asset's
/// (available, reserved) after, or `None`, changing nothing, if a kept
/// value would leave the range (never, while the invariants hold).
fn release(
    account: &mut Account,
    reservation: &mut Reservation,
    amount: Amount,
) -> Option<(Amount, Amount)> {
    assert!(
        amount <= reservation.remaining,
        "release at most what remains"
    );
    debug_assert_eq!(reservation.state, ReservationState::Open);
    let (available, reserved) = balance_of(account, reservation.kind, reservation.asset);
    let reserved_after = reserved.checked_sub(amount)?;
    let available_after = match reservation.kind {
        ReservationKind::Cash => available.checked_add(amount)?,
        // Derived (quantity - reserved), not kept: may be anything a short makes it.
        ReservationKind::Security => available + amount,
    };
    reservation.remaining -= amount;
    reservation.released += amount;
    set_balance(
        account,
        reservation.kind,
        reservation.asset,
        available_after,
        reserved_after,
    );
    Some((available_after, reserved_after))
}

fn close(
    (filed, reservation): (Filed, &mut Reservation),
    state: ReservationState,
    (now, sequence): (i64, u64),
    expiries: &mut BTreeSet<(i64, ReservationKey)>,
    closed: &mut VecDeque<Closed>,
) {
    debug_assert_eq!(reservation.state, ReservationState::Open);
    debug_assert!(state != ReservationState::Open);
    reservation.state = state;
    reservation.closed_at_ms = now;
    reservation.closed_sequence = sequence;
    if let Some(at) = reservation.expires_at_ms {
        expiries.remove(&(at, reservation.key()));
    }
    closed.push_back(Closed { at_ms: now, filed });
}

/// After a command changed only the balances and positions in `touched`: an
/// account is overdrawn when one of those went negative, or when it was and
/// still is somewhere else (a full scan only then: not per fill on an account
/// holding thousands of positions).
fn refresh_overdrawn<S: EventSink>(
    account: &mut Account,
    touched: &[crate::domain::Asset],
    overdrawn_accounts: &mut u64,
    events: &mut S,
) {
    let overdrawn = if touched.iter().any(|&asset| account.is_negative_in(asset)) {
        true
    } else {
        account.overdrawn && account.computes_overdrawn()
    };
    debug_assert_eq!(overdrawn, account.computes_overdrawn());
    if overdrawn == account.overdrawn {
        return;
    }
    account.overdrawn = overdrawn;
    if overdrawn {
        *overdrawn_accounts += 1;
        let mut e = event(EventKind::Overdrawn, account.account_id);
        e.reason = Id::literal("fill beyond available");
        events.push(e);
    } else {
        debug_assert!(*overdrawn_accounts > 0);
        *overdrawn_accounts -= 1;
    }
}

fn event(kind: EventKind, account_id: AccountId) -> Event {
    Event {
        kind,
        account_id,
        order_id: None,
        asset: None,
        amount: Amount::ZERO,
        available_after: Amount::ZERO,
        reserved_after: Amount::ZERO,
        reason: Id::default(),
    }
}

impl Event {
    fn order(mut self, order_id: Id) -> Event {
        self.order_id = Some(order_id);
        self
    }

    fn asset(mut self, asset: crate::domain::Asset) -> Event {
        self.asset = Some(asset);
        self
    }

    fn moved(mut self, amount: Amount, available_after: Amount, reserved_after: Amount) -> Event {
        self.amount = amount;
        self.available_after = available_after;
        self.reserved_after = reserved_after;
        self
    }
}

/// Internal access for the invariant checker and snapshots.
impl State {
    pub(crate) fn expiries(&self) -> &BTreeSet<(i64, ReservationKey)> {
        &self.expiries
    }

    pub(crate) fn idempotency_consistent(&self) -> bool {
        self.idempotency.is_consistent()
    }

    pub(crate) fn reservations_consistent(&self) -> bool {
        self.reservations.is_consistent()
            && self
                .reservations()
                .all(|r| self.reservations.get(&r.key()) == Some(r))
    }

    pub(crate) fn closed_len(&self) -> usize {
        self.closed.len()
    }
}
