//! The reservations: rows in a slab, found through an [`Index`] from a hash
//! of (account, order) to the row.
//!
//! A reservation is ~190 bytes and stays for the idempotency window after it
//! closes, so a busy day holds millions. A hash map of whole rows would make
//! every Reserve's probe a miss in a table of hundreds of megabytes (and
//! its TLB); here the probe reads a 16-byte index slot, then the one row.
//! A row freed by pruning is the next one a Reserve takes (a stack of free
//! rows), so rows are reused while their pages are still mapped, and the
//! prune that frees a row prefetches it for that write.
//!
//! Row numbers are internal: nothing observable (digest, snapshot, events)
//! depends on them, so a state rebuilt from a snapshot may number its rows
//! differently and still be the same state.

use super::index::{prefetch_lines, Index, Vacant};
use super::room::{Pages, Populating};
use super::{Reservation, ReservationKey};
use crate::domain::{AccountId, Id};

/// The slab's bytes per row.
const ROW_BYTES: usize = std::mem::size_of::<Option<Reservation>>();

/// A row of the slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RowId(u32);

/// Where a reservation is filed: its hash and its row, so that pruning it
/// later needs neither its key nor a hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filed {
    hash: u64,
    row: RowId,
}

impl Filed {
    /// Filler for room made ahead; never filed.
    pub const PLACEHOLDER: Filed = Filed {
        hash: 0,
        row: RowId(u32::MAX),
    };
}

/// Where a Reserve that found no reservation for its order puts its own.
#[derive(Clone, Copy, Debug)]
pub struct VacantRow {
    slot: Vacant,
    hash: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Reservations {
    /// Hash of (account, order) -> row.
    index: Index,
    rows: Vec<Option<Reservation>>,
    /// Rows not in use, the most recently freed last.
    free: Vec<RowId>,
}

/// The hash the index files a reservation under.
pub fn hash(key: &ReservationKey) -> u64 {
    hash_parts(key.account_id, &key.order_id)
}

pub fn hash_parts(account_id: AccountId, order_id: &Id) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(order_id.as_bytes(), account_id.0 as u64)
}

impl Reservations {
    /// Starts loading the index slot of the reservation hashed `hash`
    /// (see [`hash_parts`]) into the cache.
    pub fn prefetch(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Starts loading the index slot of a reservation about to be pruned and
    /// its row, every line of it: the next Reserve reuses the row.
    pub fn prefetch_filed(&self, filed: Filed) {
        self.index.prefetch(filed.hash);
        let row = &self.rows[filed.row.0 as usize] as *const Option<Reservation>;
        prefetch_lines(row as *const u8, ROW_BYTES);
    }

    /// The reservation filed at `filed`.
    pub fn filed(&self, filed: Filed) -> &Reservation {
        self.row(u64::from(filed.row.0))
    }

    fn row(&self, row: u64) -> &Reservation {
        self.rows[row as usize]
            .as_ref()
            .expect("the index points at rows in use")
    }

    /// Where `key`'s reservation is filed, or where a new one would go.
    pub fn find(&self, key: &ReservationKey) -> Result<Filed, VacantRow> {
        self.find_hashed(hash(key), key)
    }

    /// [`Reservations::find`] with the key's hash already computed.
    pub fn find_hashed(&self, hash: u64, key: &ReservationKey) -> Result<Filed, VacantRow> {
        debug_assert_eq!(hash, self::hash(key));
        self.index
            .find(hash, |row| self.row(row).key() == *key)
            .map(|row| Filed {
                hash,
                row: RowId(row as u32),
            })
            .map_err(|slot| VacantRow { slot, hash })
    }

    pub fn get(&self, key: &ReservationKey) -> Option<&Reservation> {
        let filed = self.find(key).ok()?;
        self.rows[filed.row.0 as usize].as_ref()
    }

    /// `key`'s reservation, and where it is filed.
    pub fn get_mut(&mut self, key: &ReservationKey) -> Option<(Filed, &mut Reservation)> {
        self.get_mut_hashed(hash(key), key)
    }

    /// [`Reservations::get_mut`] with the key's hash already computed.
    pub fn get_mut_hashed(
        &mut self,
        hash: u64,
        key: &ReservationKey,
    ) -> Option<(Filed, &mut Reservation)> {
        let filed = self.find_hashed(hash, key).ok()?;
        let row = self.rows[filed.row.0 as usize].as_mut();
        Some((filed, row.expect("an indexed row is in use")))
    }

    pub fn contains_key(&self, key: &ReservationKey) -> bool {
        self.find(key).is_ok()
    }

    /// Files a new reservation where [`Reservations::find`] said (nothing
    /// changed since).
    pub fn insert_vacant(&mut self, vacant: VacantRow, reservation: Reservation) -> Filed {
        debug_assert_eq!(hash(&reservation.key()), vacant.hash);
        let row = match self.free.pop() {
            Some(row) => {
                debug_assert!(self.rows[row.0 as usize].is_none());
                self.rows[row.0 as usize] = Some(reservation);
                row
            }
            None => {
                let row = RowId(u32::try_from(self.rows.len()).expect("fewer than 2^32 rows"));
                self.rows.push(Some(reservation));
                row
            }
        };
        self.index.insert_vacant(vacant.slot, u64::from(row.0));
        Filed {
            hash: vacant.hash,
            row,
        }
    }

    /// Files a reservation whose order has none.
    pub fn insert(&mut self, reservation: Reservation) -> Filed {
        match self.find(&reservation.key()) {
            Ok(_) => panic!("{:?} has a reservation already", reservation.key()),
            Err(vacant) => self.insert_vacant(vacant, reservation),
        }
    }

    /// Reservations it holds before its index grows.
    pub fn capacity(&self) -> usize {
        self.index.capacity()
    }

    /// Removes the reservation filed at `filed`. Its row is not read, only
    /// marked free ([`Reservations::filed`] reads it first if need be).
    pub fn remove(&mut self, filed: Filed) {
        let Filed { hash, row } = filed;
        let removed = self.index.remove(hash, u64::from(row.0));
        assert!(removed, "a filed reservation is in the index");
        let slot = &mut self.rows[row.0 as usize];
        debug_assert!(slot.is_some(), "an indexed row is in use");
        *slot = None;
        self.free.push(row);
    }

    pub fn values(&self) -> impl Iterator<Item = &Reservation> {
        self.rows.iter().flatten()
    }

    /// Room for `reservations` in all, every page written once (see
    /// `State::reserve_orders`).
    pub fn reserve(&mut self, reservations: usize, pages: Pages) {
        self.index.reserve(reservations, pages);
        if reservations <= self.rows.len() {
            return;
        }
        let used = self.rows.len();
        // Written now (as free rows), taken last: the stack pops the lowest first.
        let kept = std::mem::take(&mut self.rows);
        self.rows = super::room::filled(kept, reservations, None, pages);
        self.free.reserve(self.rows.len() - used);
        let fresh = (used..self.rows.len()).rev();
        let fresh: Vec<RowId> = fresh.map(|r| RowId(r as u32)).collect();
        self.free.splice(0..0, fresh);
    }

    /// Room for `reservations` more, the index's faulted in at once
    /// ([`Index::reserve_faulted_in`]), and for `rows` more rows at the end
    /// of the slab, not written. Returns the rows' room from the next new
    /// row on, for a thread that faults their pages in ahead; `None`, with
    /// no rows added, when the memory cannot be had.
    pub fn make_room(&mut self, reservations: usize, rows: usize) -> Option<Populating> {
        let total = self.index.len().checked_add(reservations)?;
        if !self.index.reserve_faulted_in(total) {
            return None;
        }
        self.rows.try_reserve_exact(rows).ok()?;
        let next = self.rows.as_ptr_range().end as usize;
        Some(Populating::new(next, ROW_BYTES))
    }

    /// Returns the memory of free rows at the end and of index room no
    /// longer needed.
    pub fn shrink_to_fit(&mut self) {
        while self.rows.last().is_some_and(Option::is_none) {
            self.rows.pop();
        }
        let len = self.rows.len();
        self.free.retain(|row| (row.0 as usize) < len);
        self.rows.shrink_to_fit();
        self.free.shrink_to_fit();
        self.index.shrink_to_fit();
    }

    /// Index and rows agree (the invariant checker's view).
    pub fn is_consistent(&self) -> bool {
        self.rows.iter().flatten().count() == self.index.len()
            && self.rows.len() == self.index.len() + self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Amount, Asset, ReservationKind};
    use crate::state_machine::ReservationState;

    fn reservation(account: i64, order: &str) -> Reservation {
        Reservation {
            account_id: AccountId(account),
            order_id: Id::new(order).unwrap(),
            kind: ReservationKind::Cash,
            asset: Asset::currency("USD").unwrap(),
            amount: Amount::from_units(i128::from(account) * 100_000_000),
            remaining: Amount::from_units(i128::from(account) * 100_000_000),
            consumed: Amount::ZERO,
            released: Amount::ZERO,
            state: ReservationState::Open,
            expires_at_ms: None,
            sequence: account as u64,
            closed_at_ms: 0,
            closed_sequence: 0,
        }
    }

    #[test]
    fn room_made_for_rows_is_where_the_next_new_ones_are_written() {
        let mut table = Reservations::default();
        let a = table.insert(reservation(1, "o1"));
        table.insert(reservation(2, "o1"));
        let at = table.make_room(500, 1_000).unwrap().start();
        assert!(table.index.capacity() >= 502);
        // A freed row is still taken first; then new rows, in order, from `at`.
        table.remove(a);
        assert_eq!(table.insert(reservation(3, "o3")).row, a.row);
        let rows: Vec<Filed> = (10..1_010)
            .map(|account| table.insert(reservation(account, "o")))
            .collect();
        let address = |filed: Filed| &table.rows[filed.row.0 as usize] as *const _ as usize;
        assert_eq!(address(rows[0]), at);
        assert_eq!(address(rows[999]), at + 999 * ROW_BYTES);
        assert!((10..1_010).all(|account| {
            table
                .get(&reservation(account, "o").key())
                .unwrap()
                .sequence
                == account as u64
        }));
        assert!(table.is_consistent());
    }

    #[test]
    fn rows_are_found_freed_and_reused() {
        let mut table = Reservations::default();
        let a = table.insert(reservation(1, "o1"));
        let b = table.insert(reservation(2, "o1"));
        table.insert(reservation(1, "o2"));
        assert_ne!(
            a, b,
            "the same order id on two accounts is two reservations"
        );
        assert_eq!(table.get(&reservation(2, "o1").key()).unwrap().sequence, 2);
        let (filed, r) = table.get_mut(&reservation(1, "o1").key()).unwrap();
        assert_eq!(filed, a);
        r.remaining = Amount::ZERO;
        let filed = table.filed(a);
        assert_eq!(
            (filed.key(), filed.remaining),
            (reservation(1, "o1").key(), Amount::ZERO)
        );
        table.remove(a);
        assert!(table.get(&reservation(1, "o1").key()).is_none());
        // The freed row is the next one taken.
        let c = table.insert(reservation(3, "o3"));
        assert_eq!(c.row, a.row);
        assert_eq!(table.values().count(), 3);
        assert!(table.is_consistent());
    }

    #[test]
    fn room_made_ahead_keeps_what_is_there() {
        let mut table = Reservations::default();
        let kept = table.insert(reservation(1, "o1"));
        table.reserve(1_000, Pages::Ordinary);
        assert!(table.rows.len() >= 1_000 && table.is_consistent());
        assert_eq!(table.find(&reservation(1, "o1").key()).ok(), Some(kept));
        // Fresh rows are taken lowest first, after the one in use.
        let next = table.insert(reservation(2, "o2"));
        assert_eq!(next.row.0, 1);
        for n in 3..=1_000 {
            table.insert(reservation(n, "o"));
        }
        let rows = table.rows.len();
        assert_eq!(rows, table.rows.capacity(), "no growth below the room");
        table.remove(kept);
        table.shrink_to_fit();
        assert!(table.is_consistent());
        assert_eq!(table.values().count(), 999);
        assert_eq!(
            table.get(&reservation(500, "o").key()).unwrap().sequence,
            500
        );
    }
}
