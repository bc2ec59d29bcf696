//! An open-addressed hash index: a 64-bit hash to a 64-bit value (a
//! position in a ring or a slot of a slab), for the state's two large
//! tables (idempotency keys, reservations).
//!
//! Why not a `HashMap<Key, Row>`: with a million orders in the window, every
//! command's probe is a cache miss, and a map whose buckets hold whole rows
//! (a reservation is ~190 bytes, a key ~70) spans hundreds of megabytes, so
//! the probe also misses the TLB. Here a slot is 16 bytes, four to a cache
//! line, in one array (no separate control bytes: one miss per probe, not
//! two), and the rows live elsewhere in the order they are written.
//!
//! Linear probing at a load of at most one half; removal shifts the
//! following slots back (no tombstones, so probes never lengthen with
//! churn). The index stores hashes, not keys: two keys with the same 64-bit
//! hash are two slots with the same tag, and [`Index::find`] asks the caller
//! which one is the key it looks for. [`Index::prefetch`] starts loading a
//! hash's slot ahead of its use, so the misses of a run of lookups overlap.

use super::room::Pages;

/// One slot: `tag` 0 is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    tag: u64,
    value: u64,
}

/// Slots of a new, empty index.
const SLOTS_MIN: usize = 16;

#[derive(Clone, Debug)]
pub struct Index {
    /// Length a power of two, at most half full.
    slots: Vec<Slot>,
    len: usize,
}

impl Default for Index {
    fn default() -> Index {
        Index {
            slots: vec![Slot::default(); SLOTS_MIN],
            len: 0,
        }
    }
}

/// Slots that hold `entries` at most half full.
fn slots_for(entries: usize) -> usize {
    entries.saturating_mul(2).next_power_of_two().max(SLOTS_MIN)
}

/// A hash as stored: never 0 (the empty slot's tag).
fn tag(hash: u64) -> u64 {
    hash.max(1)
}

impl Index {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Entries it holds before it grows.
    pub fn capacity(&self) -> usize {
        self.slots.len() / 2
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, tag: u64) -> usize {
        tag as usize & self.mask()
    }

    /// Starts loading the slot `hash` is probed from into the cache, and
    /// the slot after it: a removal always reads it (to know whether to
    /// shift it back), as does a probe past an occupied home, and for one
    /// home in four it lies on the next line — a miss that, not prefetched,
    /// was most of the time a prune spent.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        let home = self.home(tag(hash));
        prefetch(&self.slots[home] as *const Slot);
        prefetch(&self.slots[(home + 1) & self.mask()] as *const Slot);
    }

    /// The value of the entry with `hash` for which `is_key(value)` holds;
    /// else the empty slot an insert of it would take.
    #[inline]
    pub fn find(&self, hash: u64, is_key: impl FnMut(u64) -> bool) -> Result<u64, Vacant> {
        self.probe(hash, is_key).map(|i| self.slots[i].value)
    }

    /// The slot of the entry with `hash` for which `is_key(value)` holds;
    /// else the empty slot that ends its probe path.
    #[inline]
    fn probe(&self, hash: u64, mut is_key: impl FnMut(u64) -> bool) -> Result<usize, Vacant> {
        let tag = tag(hash);
        let mask = self.mask();
        let mut i = self.home(tag);
        loop {
            let slot = self.slots[i];
            if slot.tag == 0 {
                return Err(Vacant { slot: i, tag });
            }
            if slot.tag == tag && is_key(slot.value) {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Fills the slot [`Index::find`] returned (nothing changed since).
    #[inline]
    pub fn insert_vacant(&mut self, vacant: Vacant, value: u64) {
        debug_assert_eq!(self.slots[vacant.slot].tag, 0, "a vacant slot");
        self.slots[vacant.slot] = Slot {
            tag: vacant.tag,
            value,
        };
        self.len += 1;
        if self.len > self.capacity() {
            self.grow();
        }
    }

    /// Adds an entry (the caller knows its key is not in the index).
    pub fn insert(&mut self, hash: u64, value: u64) {
        let vacant = match self.find(hash, |_| false) {
            Ok(_) => unreachable!("no entry is the key"),
            Err(vacant) => vacant,
        };
        self.insert_vacant(vacant, value);
    }

    /// Removes the entry (`hash`, `value`); false if there is none.
    pub fn remove(&mut self, hash: u64, value: u64) -> bool {
        let Ok(i) = self.probe(hash, |v| v == value) else {
            return false;
        };
        let mask = self.mask();
        // Shift back every following entry the hole lies on the probe path of.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        loop {
            let slot = self.slots[j];
            if slot.tag == 0 {
                break;
            }
            let home = self.home(slot.tag);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots[hole] = slot;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        true
    }

    /// Doubles the room, on ordinary pages: huge pages asked for on the
    /// hot path may stall it while the kernel compacts memory.
    fn grow(&mut self) {
        self.rebuild(self.slots.len() * 2, Pages::Ordinary);
    }

    /// Moves every entry into `slots` slots, each written once (so its
    /// pages are faulted in here, not on the hot path).
    fn rebuild(&mut self, slots: usize, pages: Pages) {
        debug_assert!(slots.is_power_of_two() && slots / 2 >= self.len);
        let fresh = super::room::filled([], slots, Slot::default(), pages);
        debug_assert_eq!(fresh.len(), slots);
        self.rebuild_into(fresh);
    }

    /// Moves every entry into `fresh`: empty slots, a power of two of them
    /// that holds the entries at most half full.
    fn rebuild_into(&mut self, fresh: Vec<Slot>) {
        debug_assert!(fresh.len().is_power_of_two() && fresh.len() / 2 >= self.len);
        let old = std::mem::replace(&mut self.slots, fresh);
        let mask = self.mask();
        for slot in old.into_iter().filter(|s| s.tag != 0) {
            let mut i = self.home(slot.tag);
            while self.slots[i].tag != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// Room for `entries` in all without growing.
    pub fn reserve(&mut self, entries: usize, pages: Pages) {
        let slots = slots_for(entries);
        if slots > self.slots.len() {
            self.rebuild(slots, pages);
        }
    }

    /// Room for `entries` in all without growing, like [`Index::reserve`],
    /// but not written slot by slot: the slots come zeroed from the
    /// allocator (a fresh allocation of this size, from the kernel, is not
    /// even touched), then their pages are faulted in at once
    /// (`room::populate`). Left to fault in as probed at random, a page
    /// first read maps the zero page and the write that follows faults
    /// again to replace it, with a TLB shootdown. False, and nothing
    /// changed, when the memory cannot be had.
    pub fn reserve_faulted_in(&mut self, entries: usize) -> bool {
        let slots = slots_for(entries);
        if slots <= self.slots.len() {
            return true;
        }
        let Some(fresh) = zeroed_slots(slots) else {
            return false;
        };
        super::room::populate(
            fresh.as_ptr() as usize,
            std::mem::size_of_val(fresh.as_slice()),
        );
        self.rebuild_into(fresh);
        true
    }

    /// The smallest size that holds what is there.
    pub fn shrink_to_fit(&mut self) {
        let slots = slots_for(self.len);
        if slots < self.slots.len() {
            self.rebuild(slots, Pages::Ordinary);
        }
    }
}

/// `slots` empty slots, zeroed by the allocator; `None` if it has no room.
fn zeroed_slots(slots: usize) -> Option<Vec<Slot>> {
    let layout = std::alloc::Layout::array::<Slot>(slots).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout is that of `slots` `Slot`s and not empty; all-zero
    // bytes are a valid `Slot` (two `u64`s: the empty slot); the vector
    // takes the allocation with that same layout, as `Vec::from_raw_parts`
    // requires, and frees it with it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut Slot;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, slots, slots))
    }
}

/// Where [`Index::find`] would insert a hash it did not find.
#[derive(Clone, Copy, Debug)]
pub struct Vacant {
    slot: usize,
    tag: u64,
}

/// Asks the CPU to load every cache line of the `bytes` from `start` (hints:
/// an address outside any allocation is harmless, a prefetch never faults).
#[inline(always)]
pub fn prefetch_lines(start: *const u8, bytes: usize) {
    for offset in (0..bytes).step_by(64) {
        prefetch(start.wrapping_add(offset));
    }
    prefetch(start.wrapping_add(bytes.saturating_sub(1)));
}

/// Asks the CPU to load the cache line at `p` (a hint: never faults, changes
/// nothing observable).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never dereferences in the
    // language's sense and never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Hashes that all share a home slot, to exercise probing and shifting.
    fn colliding(n: u64) -> u64 {
        (n << 20) | 5
    }

    #[test]
    fn finds_inserts_and_removes_like_a_map() {
        let mut index = Index::default();
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // A small key space, some of it colliding, so removes hit often.
            let key = if x.is_multiple_of(3) {
                colliding(x % 40)
            } else {
                x % 500
            };
            let found = index.find(key, |v| v == key * 10);
            match (found, model.contains_key(&key)) {
                (Ok(v), true) => {
                    assert_eq!(v, key * 10);
                    if step % 2 == 0 {
                        assert!(index.remove(key, key * 10));
                        model.remove(&key);
                    }
                }
                (Err(vacant), false) => {
                    index.insert_vacant(vacant, key * 10);
                    model.insert(key, key * 10);
                }
                (found, present) => panic!("{key}: {found:?} but present={present}"),
            }
            assert_eq!(index.len(), model.len());
        }
        for (&key, &value) in &model {
            assert_eq!(index.find(key, |v| v == value).ok(), Some(value));
        }
        assert!(index.len() <= index.capacity());
    }

    #[test]
    fn equal_hashes_are_told_apart_by_the_caller() {
        let mut index = Index::default();
        index.insert(7, 1);
        index.insert(7, 2);
        assert_eq!(index.find(7, |v| v == 2).ok(), Some(2));
        assert_eq!(index.find(7, |v| v == 1).ok(), Some(1));
        assert!(index.find(7, |v| v == 3).is_err());
        assert!(index.remove(7, 1));
        assert_eq!(index.find(7, |v| v == 2).ok(), Some(2));
        assert!(!index.remove(7, 1));
        // Hash 0 is stored as 1 and still found.
        index.insert(0, 4);
        assert_eq!(index.find(0, |v| v == 4).ok(), Some(4));
    }

    #[test]
    fn room_faulted_in_is_empty_and_keeps_the_entries() {
        let mut index = Index::default();
        for k in 1..=100u64 {
            index.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
        }
        assert!(index.reserve_faulted_in(100_000));
        let slots = index.slots.len();
        assert!(slots >= 200_000);
        assert_eq!(index.slots.iter().filter(|s| s.tag != 0).count(), 100);
        for k in 1..=100_000u64 {
            let hash = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            if k > 100 {
                index.insert(hash, k);
            }
            assert_eq!(index.find(hash, |v| v == k).ok(), Some(k));
        }
        assert_eq!((index.len(), index.slots.len()), (100_000, slots));
        // Room it has already: nothing changes.
        assert!(index.reserve_faulted_in(10));
        assert_eq!(index.slots.len(), slots);
    }

    #[test]
    fn a_reserved_index_does_not_grow_below_its_room() {
        let mut index = Index::default();
        index.reserve(1_000, Pages::Ordinary);
        let slots = index.slots.len();
        for k in 1..=1_000u64 {
            index.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
        }
        assert_eq!(index.slots.len(), slots);
        index.shrink_to_fit();
        assert_eq!(index.len(), 1_000);
        for k in 1..=1_000u64 {
            let hash = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(index.find(hash, |v| v == k).ok(), Some(k));
        }
    }
}
