//! The idempotency table: every key recorded in its window, in recording order.
//!
//! Keys live in a ring (`VecDeque`) in the order they were recorded — which is
//! also the order the window prunes them — and an [`Index`] from a 64-bit hash
//! of the key to the key's position in the ring: 16 bytes a slot, so a probe
//! is one cache miss (each command probes once for the lookup, then writes the
//! same slot), and recording a key writes the ring sequentially. Pruning walks
//! the ring from the front and prefetches the index slots of the keys a few
//! places behind the one it removes, so a tick's removals overlap their misses.
//!
//! A key is an [`IdempotencyKey`]: its space (requests or events) and its id.
//! The space is the hash's seed, so the same id in the two spaces is two
//! unrelated keys at no extra hashing cost. The full key is kept in the ring
//! and compared on lookup, so two keys with the same hash are still two keys.

use super::index::{prefetch_lines, Index};
use super::room::{Pages, Populating};
use super::{IdempotencyEntry, Outcome, PRUNE_PREFETCH_AHEAD};
use crate::domain::{Id, IdempotencyKey, KeySpace};
use std::collections::VecDeque;

/// The ring's bytes per key.
const RECORD_BYTES: usize = std::mem::size_of::<Record>();

/// A key as the ring holds it: what pruning reads of it — the hash, to find
/// its index slot, and when it was recorded — first, in 16 bytes, so a prune
/// reads one line of the record (written a window ago, no longer cached),
/// not two.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Record {
    hash: u64,
    recorded_at_ms: i64,
    fingerprint: u64,
    outcome: Outcome,
    key: IdempotencyKey,
}

impl Record {
    fn entry(&self) -> IdempotencyEntry {
        IdempotencyEntry {
            fingerprint: self.fingerprint,
            outcome: self.outcome,
            recorded_at_ms: self.recorded_at_ms,
        }
    }
}

/// A key's hash, computed once per command for both the lookup and the insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHash(u64);

/// How many records past the one it writes a key's insert prefetches the
/// ring's lines, for the record written then: the ring is written in order
/// through hundreds of megabytes (a window ago those lines held the keys
/// pruned since), so each record's write first reads its lines — about
/// three misses a key that, left to the store buffer, stalled the writer
/// (alternated: 4.26-4.69 M/s without, 4.88-5.26 at 8 ahead; 4 and 16 ahead
/// the same within the noise).
const WRITE_PREFETCH_AHEAD: usize = 8;

/// Fills room made ahead in the ring; never read.
const PLACEHOLDER: Record = Record {
    hash: 0,
    recorded_at_ms: 0,
    fingerprint: 0,
    outcome: Outcome::new(super::ResultCode::Ok, 0),
    key: IdempotencyKey {
        space: KeySpace::Requests,
        id: Id::EMPTY,
    },
};

#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    /// Key hash -> absolute position in `ring`.
    positions: Index,
    ring: VecDeque<Record>,
    /// Absolute position of `ring`'s front.
    base: u64,
}

fn hash(key: &IdempotencyKey) -> u64 {
    hash_parts(key.space, &key.id)
}

fn hash_parts(space: KeySpace, id: &Id) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), space as u64)
}

/// Starts loading every line of the record `records` places after `record`
/// in the ring's memory. Past the end of the allocation (the ring wraps
/// there) it is a hint about memory that is not the ring's: harmless, a
/// prefetch never faults nor changes anything.
fn prefetch_record(record: &Record, records: usize) {
    let start = (record as *const Record as *const u8).wrapping_add(records * RECORD_BYTES);
    prefetch_lines(start, RECORD_BYTES);
}

impl KeyHash {
    /// The hash of the key (`space`, `id`).
    pub fn of(space: KeySpace, id: &Id) -> KeyHash {
        KeyHash(hash_parts(space, id))
    }
}

impl KeyTable {
    pub fn hash(key: &IdempotencyKey) -> KeyHash {
        KeyHash(hash(key))
    }

    /// Starts loading the index slot of the key hashed `hash`, about to be
    /// looked up.
    pub fn prefetch(&self, hash: KeyHash) {
        self.positions.prefetch(hash.0);
    }

    pub fn get(&self, key: &IdempotencyKey) -> Option<IdempotencyEntry> {
        self.get_hashed(KeyTable::hash(key), key)
    }

    /// [`KeyTable::get`] with the key's hash already computed.
    pub fn get_hashed(&self, hash: KeyHash, key: &IdempotencyKey) -> Option<IdempotencyEntry> {
        debug_assert_eq!(hash, KeyTable::hash(key));
        let position = self
            .positions
            .find(hash.0, |position| self.record(position).key == *key)
            .ok()?;
        Some(self.record(position).entry())
    }

    fn record(&self, position: u64) -> &Record {
        &self.ring[(position - self.base) as usize]
    }

    /// Records a key not present; `entry.recorded_at_ms` never decreases.
    pub fn insert(&mut self, key: IdempotencyKey, entry: IdempotencyEntry) {
        self.insert_hashed(KeyTable::hash(&key), key, entry)
    }

    /// [`KeyTable::insert`] with the key's hash already computed.
    pub fn insert_hashed(&mut self, hash: KeyHash, key: IdempotencyKey, entry: IdempotencyEntry) {
        debug_assert!(self.get_hashed(hash, &key).is_none());
        debug_assert!(self
            .ring
            .back()
            .is_none_or(|r| r.recorded_at_ms <= entry.recorded_at_ms));
        let hash = hash.0;
        self.positions.insert(hash, self.end());
        self.ring.push_back(Record {
            hash,
            recorded_at_ms: entry.recorded_at_ms,
            fingerprint: entry.fingerprint,
            outcome: entry.outcome,
            key,
        });
        if let Some(back) = self.ring.back() {
            prefetch_record(back, WRITE_PREFETCH_AHEAD);
        }
    }

    /// Keys in the window.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Keys it holds before the ring or the index grows.
    pub fn capacity(&self) -> usize {
        self.ring.capacity().min(self.positions.capacity())
    }

    /// Recording time of the oldest key.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.ring.front().map(|r| r.recorded_at_ms)
    }

    /// Forgets the oldest key.
    pub fn pop_oldest(&mut self) {
        // Two steps ahead: the heads of the records further on (the hash
        // and time pruning reads, 16 bytes that may straddle two lines),
        // then the index slots of the nearer ones, whose hashes they hold.
        if let Some(far) = self.ring.get(2 * PRUNE_PREFETCH_AHEAD) {
            prefetch_lines(far as *const Record as *const u8, 16);
        }
        if let Some(ahead) = self.ring.get(PRUNE_PREFETCH_AHEAD) {
            self.positions.prefetch(ahead.hash);
        }
        // Only the head is read: the record (~170 bytes) is not moved out.
        let Some(hash) = self.ring.front().map(|r| r.hash) else {
            return;
        };
        let removed = self.positions.remove(hash, self.base);
        assert!(removed, "every key in the ring is in the index");
        self.ring.pop_front();
        self.base += 1;
    }

    /// Ring position of the oldest key (positions never repeat).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Ring position the next key will take.
    pub fn end(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    /// Keys at positions `from..`, with their positions.
    pub fn since(
        &self,
        from: u64,
    ) -> impl Iterator<Item = (u64, &IdempotencyKey, IdempotencyEntry)> {
        let skip = from.saturating_sub(self.base) as usize;
        self.ring
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(i, r)| (self.base + i as u64, &r.key, r.entry()))
    }

    /// A table holding `keys` (sorted by position, contiguous from `base`).
    pub fn restore(base: u64, keys: Vec<(u64, IdempotencyKey, IdempotencyEntry)>) -> KeyTable {
        let mut table = KeyTable {
            base,
            ..KeyTable::default()
        };
        table.positions.reserve(keys.len(), Pages::Ordinary);
        for (position, key, entry) in keys {
            assert_eq!(position, table.end(), "snapshot keys are contiguous");
            table.insert(key, entry);
        }
        table
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IdempotencyKey, IdempotencyEntry)> {
        self.ring.iter().map(|r| (&r.key, r.entry()))
    }

    /// Index and ring agree (the invariant checker's view).
    pub fn is_consistent(&self) -> bool {
        self.positions.len() == self.ring.len()
    }

    /// Room for `keys` keys in all, without a resize, every page written once
    /// (see `State::reserve_orders`).
    pub fn reserve(&mut self, keys: usize, pages: Pages) {
        self.positions.reserve(keys, pages);
        super::room::touch_ring(&mut self.ring, keys, PLACEHOLDER, pages);
    }

    /// Room for `keys` more keys, the index's faulted in at once
    /// ([`Index::reserve_faulted_in`]), the ring's not written: it moves
    /// into an allocation that holds them after the keys it has, in order.
    /// Returns the ring's room from the next key's record on, for a thread
    /// that knows how many keys are coming to fault their pages in ahead.
    /// `None`, with the ring's room not made, when the memory cannot be had.
    pub fn make_room(&mut self, keys: usize) -> Option<Populating> {
        let total = self.ring.len().checked_add(keys)?;
        if !self.positions.reserve_faulted_in(total) {
            return None;
        }
        let mut next: Vec<Record> = Vec::new();
        next.try_reserve_exact(total).ok()?;
        let (front, back) = self.ring.as_slices();
        next.extend_from_slice(front);
        next.extend_from_slice(back);
        let at = next.as_ptr_range().end as usize;
        // A deque made from a vector keeps its elements where they are, at
        // the start of the allocation, and pushes after them until its
        // capacity wraps (more than `keys` pushes away).
        self.ring = VecDeque::from(next);
        Some(Populating::new(at, RECORD_BYTES))
    }

    pub fn shrink_to_fit(&mut self) {
        self.positions.shrink_to_fit();
        self.ring.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Id, KeySpace};
    use crate::state_machine::{Outcome, ResultCode};

    fn request(id: &str) -> IdempotencyKey {
        IdempotencyKey {
            space: KeySpace::Requests,
            id: Id::new(id).unwrap(),
        }
    }

    fn entry(at: i64, sequence: u64) -> IdempotencyEntry {
        IdempotencyEntry {
            fingerprint: sequence * 7,
            outcome: Outcome::new(ResultCode::Ok, sequence),
            recorded_at_ms: at,
        }
    }

    #[test]
    fn keys_leave_oldest_first() {
        let mut t = KeyTable::default();
        let (a, b, c) = (request("a"), request("b"), request("c"));
        t.insert(a, entry(10, 1));
        t.insert(b, entry(10, 2));
        t.insert(c, entry(20, 3));
        assert_eq!(t.get(&b).unwrap().outcome.sequence, 2);
        assert_eq!(t.oldest_ms(), Some(10));
        t.pop_oldest();
        assert!(t.get(&a).is_none());
        assert_eq!(t.get(&c).unwrap().fingerprint, 21);
        let order: Vec<_> = t.iter().map(|(k, _)| k.id.as_str().to_owned()).collect();
        assert_eq!(order, ["b", "c"]);
        t.pop_oldest();
        t.pop_oldest();
        t.pop_oldest(); // empty: no-op
        assert!(t.is_consistent() && t.oldest_ms().is_none());
        // Positions stay right after the base has moved.
        t.insert(a, entry(30, 4));
        assert_eq!(t.get(&a).unwrap().outcome.sequence, 4);
    }

    /// Where the ring holds its newest key.
    fn newest_record_address(t: &KeyTable) -> usize {
        t.ring.back().map(|r| r as *const Record as usize).unwrap()
    }

    #[test]
    fn room_made_for_keys_is_where_the_next_ones_are_written() {
        let mut t = KeyTable::default();
        let key = |i: u64| request(&format!("k{i}"));
        for i in 0..40 {
            t.insert(key(i), entry(10, i));
        }
        // The ring's front off the start of its allocation.
        for _ in 0..25 {
            t.pop_oldest();
        }
        let at = t.make_room(1_000).unwrap().start();
        assert!(t.positions.capacity() >= 1_015);
        let capacity = t.capacity();
        assert!(capacity >= 1_015);
        for i in 40..1_040 {
            t.insert(key(i), entry(20, i));
            if i == 40 {
                assert_eq!(newest_record_address(&t), at, "the first new key");
            }
        }
        assert_eq!(
            newest_record_address(&t),
            at + 999 * RECORD_BYTES,
            "the keys follow one another"
        );
        assert_eq!(t.capacity(), capacity, "no growth within the room");
        assert!(t.get(&key(24)).is_none());
        assert!((25..1_040).all(|i| t.get(&key(i)).unwrap().outcome.sequence == i));
        let order: Vec<u64> = t.iter().map(|(_, e)| e.outcome.sequence).collect();
        assert_eq!(order, (25..1_040).collect::<Vec<_>>());
        assert!(t.is_consistent() && t.len() == 1_015);
    }

    #[test]
    fn the_same_id_in_the_two_spaces_is_two_keys() {
        let mut t = KeyTable::default();
        let as_request = request("same");
        let as_event = IdempotencyKey {
            space: KeySpace::Events,
            ..as_request
        };
        t.insert(as_request, entry(10, 1));
        assert!(t.get(&as_event).is_none());
        t.insert(as_event, entry(10, 2));
        assert_eq!(t.get(&as_request).unwrap().outcome.sequence, 1);
        assert_eq!(t.get(&as_event).unwrap().outcome.sequence, 2);
        assert!(t.is_consistent());
    }

    #[test]
    fn a_reserved_table_does_not_resize_below_its_room() {
        let mut t = KeyTable::default();
        t.reserve(10_000, Pages::Ordinary);
        let (map, ring) = (t.positions.capacity(), t.ring.capacity());
        assert!(map >= 10_000 && ring >= 10_000);
        for i in 0..10_000 {
            t.insert(request(&format!("k{i}")), entry(i, i as u64));
        }
        assert_eq!((t.positions.capacity(), t.ring.capacity()), (map, ring));
        assert!(t.is_consistent());
    }
}
