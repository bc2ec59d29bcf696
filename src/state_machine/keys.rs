//! The idempotency table: every key recorded in its window, in recording order.
//!
//! Keys live in a ring (`VecDeque`) in the order they were recorded — which is
//! also the order the window prunes them — and a hash map from a 128-bit hash
//! of the key to the key's position in the ring. A map entry is 32 bytes
//! instead of the 64-byte id plus the whole entry, so more of the map stays in
//! cache (each command probes it once for the lookup and once for the insert),
//! and recording a key writes the ring sequentially.
//!
//! A key is an [`IdempotencyKey`]: its space (requests or events) and its id.
//! The space is the hash's seed, so the same id in the two spaces is two
//! unrelated keys at no extra hashing cost.
//!
//! The full key is kept in the ring and compared on lookup. A 128-bit hash
//! collision (odds ~2^-64 with billions of keys) makes the newer key shadow the
//! older in the map; pruning then leaves the newer key's slot alone.

use super::IdempotencyEntry;
use crate::domain::IdempotencyKey;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

#[derive(Clone, Copy, Debug)]
struct Record {
    hash: u128,
    key: IdempotencyKey,
    entry: IdempotencyEntry,
}

/// The map's keys are already 128-bit xxh3 hashes: hashing them again would
/// only cost time, so the map takes their low 64 bits as they are.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used; anything else still hashes soundly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Positions = HashMap<u128, u64, BuildHasherDefault<Prehashed>>;

/// A key's hash, computed once per command for both the lookup and the insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHash(u128);

#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    /// Key hash -> absolute position in `ring`.
    positions: Positions,
    ring: VecDeque<Record>,
    /// Absolute position of `ring`'s front.
    base: u64,
}

fn hash(key: &IdempotencyKey) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(key.id.as_bytes(), key.space as u64)
}

impl KeyTable {
    pub fn hash(key: &IdempotencyKey) -> KeyHash {
        KeyHash(hash(key))
    }

    pub fn get(&self, key: &IdempotencyKey) -> Option<&IdempotencyEntry> {
        self.get_hashed(KeyTable::hash(key), key)
    }

    /// [`KeyTable::get`] with the key's hash already computed.
    pub fn get_hashed(&self, hash: KeyHash, key: &IdempotencyKey) -> Option<&IdempotencyEntry> {
        debug_assert_eq!(hash, KeyTable::hash(key));
        let position = *self.positions.get(&hash.0)?;
        let record = &self.ring[(position - self.base) as usize];
        (record.key == *key).then_some(&record.entry)
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
            .is_none_or(|r| r.entry.recorded_at_ms <= entry.recorded_at_ms));
        let hash = hash.0;
        self.positions
            .insert(hash, self.base + self.ring.len() as u64);
        self.ring.push_back(Record { hash, key, entry });
    }

    /// Recording time of the oldest key.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.ring.front().map(|r| r.entry.recorded_at_ms)
    }

    /// Forgets the oldest key.
    pub fn pop_oldest(&mut self) {
        let Some(record) = self.ring.pop_front() else {
            return;
        };
        // Leave the slot alone if a colliding newer key took it over.
        if self.positions.get(&record.hash) == Some(&self.base) {
            self.positions.remove(&record.hash);
        }
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
    ) -> impl Iterator<Item = (u64, &IdempotencyKey, &IdempotencyEntry)> {
        let skip = from.saturating_sub(self.base) as usize;
        self.ring
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(i, r)| (self.base + i as u64, &r.key, &r.entry))
    }

    /// A table holding `keys` (sorted by position, contiguous from `base`).
    pub fn restore(base: u64, keys: Vec<(u64, IdempotencyKey, IdempotencyEntry)>) -> KeyTable {
        let mut table = KeyTable {
            base,
            ..KeyTable::default()
        };
        for (position, key, entry) in keys {
            assert_eq!(position, table.end(), "snapshot keys are contiguous");
            table.insert(key, entry);
        }
        table
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IdempotencyKey, &IdempotencyEntry)> {
        self.ring.iter().map(|r| (&r.key, &r.entry))
    }

    /// Map and ring agree (the invariant checker's view).
    pub fn is_consistent(&self) -> bool {
        self.positions.len() == self.ring.len()
    }

    /// Room for `keys` keys in all, without a resize, every page written once
    /// (see `State::reserve_orders`).
    pub fn reserve(&mut self, keys: usize) {
        let positions = std::mem::take(&mut self.positions);
        self.positions = super::touched_map(positions, keys, |i| (i as u128, u64::MAX));
        let placeholder = Record {
            hash: 0,
            key: IdempotencyKey {
                space: crate::domain::KeySpace::Requests,
                id: crate::domain::Id::default(),
            },
            entry: IdempotencyEntry {
                fingerprint: 0,
                outcome: super::Outcome::new(super::ResultCode::Ok, 0),
                recorded_at_ms: 0,
            },
        };
        super::touch_room(&mut self.ring, keys, placeholder);
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
        t.reserve(10_000);
        let (map, ring) = (t.positions.capacity(), t.ring.capacity());
        assert!(map >= 10_000 && ring >= 10_000);
        for i in 0..10_000 {
            t.insert(request(&format!("k{i}")), entry(i, i as u64));
        }
        assert_eq!((t.positions.capacity(), t.ring.capacity()), (map, ring));
        assert!(t.is_consistent());
    }
}
