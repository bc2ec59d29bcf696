//! Room made ahead for the state's large tables (the key ring, the key and
//! reservation indexes, the reservation rows): allocated once, written once
//! so that no page faults in on the hot path, and on huge pages where the
//! operator asks for them (`--huge-pages`) and the kernel offers them.
//! Only room made ahead (`State::reserve_orders`, at start-up) may ask for
//! huge pages: asked for while serving, the kernel may stall the writer to
//! compact memory for them (seen in replay: runs at a quarter of the usual
//! rate), so a table that grows stays on ordinary pages. Even at start-up
//! the compaction can cost seconds on a machine whose memory is fragmented,
//! hence a choice, not the default.
//!
//! With a million orders in the window these tables span hundreds of
//! megabytes, touched at random: on 4 KiB pages nearly every probe also
//! misses the TLB (a page walk before the cache miss). Transparent huge
//! pages (2 MiB) cover the same tables with 512 times fewer entries. The
//! advice changes nothing observable; where huge pages are off (or on
//! another OS) it is a no-op.

/// Tables smaller than this stay on ordinary pages (a huge page is 2 MiB).
const HUGE_PAGES_FROM_BYTES: usize = 4 << 20;

/// Which pages room is made on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    Ordinary,
    /// Transparent huge pages where the kernel has them (`madvise`).
    Huge,
}

impl Pages {
    /// `Huge` when `huge`, else `Ordinary`.
    pub fn huge_if(huge: bool) -> Pages {
        if huge {
            Pages::Huge
        } else {
            Pages::Ordinary
        }
    }
}

/// A vector with room for `capacity`, holding `kept` then `fill` up to its
/// whole capacity (every page written once).
pub fn filled<T: Clone>(
    kept: impl IntoIterator<Item = T>,
    capacity: usize,
    fill: T,
    pages: Pages,
) -> Vec<T> {
    let mut v = Vec::with_capacity(capacity);
    if pages == Pages::Huge {
        advise_huge_pages(&v);
    }
    v.extend(kept);
    let capacity = v.capacity();
    v.resize(capacity, fill);
    v
}

/// Asks the kernel to back `v`'s allocation with huge pages.
fn advise_huge_pages<T>(v: &Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_PAGES_FROM_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = v.as_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let len = (start + bytes - aligned) / PAGE * PAGE;
        // SAFETY: the range lies inside `v`'s own allocation (rounded inwards
        // to whole pages); MADV_HUGEPAGE only changes how it is backed, never
        // its contents. A failure (huge pages off) is harmless: ignored.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// Grows `ring` to room for `len` and writes every slot of it once, keeping
/// its contents.
pub fn touch_ring<T: Copy>(
    ring: &mut std::collections::VecDeque<T>,
    len: usize,
    placeholder: T,
    pages: Pages,
) {
    let kept = ring.len();
    if ring.capacity() >= len {
        while ring.len() < ring.capacity() {
            ring.push_back(placeholder);
        }
        ring.truncate(kept);
        return;
    }
    let mut v = filled(ring.drain(..), len, placeholder, pages);
    v.truncate(kept);
    *ring = std::collections::VecDeque::from(v);
}

/// How far past what is known to be written next [`Populating`] faults
/// pages in, and how much at a time (one system call per this much).
const POPULATE_STRIDE_BYTES: usize = 2 << 20;

/// Faults in, for a thread that writes a table's room from a known address
/// in order, the pages it will reach next: the room made for a replay
/// ([`super::State::make_room_for_replay`]), populated by the thread that
/// reads the journal, which knows how many keys and rows the records it
/// decoded will add before the applying thread writes them. The applying
/// thread then takes no page faults there (the kernel's zeroing of fresh
/// pages cost a replay into growing tables about a third of its time).
/// Changes no memory's contents (`room::populate`): a wrong count costs only
/// time.
#[derive(Debug)]
pub struct Populating {
    start: usize,
    element_bytes: usize,
    /// Bytes from `start` faulted in so far.
    done: usize,
}

impl Populating {
    /// Elements of `element_bytes` each, written from `start` on.
    pub fn new(start: usize, element_bytes: usize) -> Populating {
        Populating {
            start,
            element_bytes,
            done: 0,
        }
    }

    /// Where the first element is written.
    pub fn start(&self) -> usize {
        self.start
    }

    /// `elements` will have been written, in all: faults in their pages,
    /// and a stride beyond, unless that was done already.
    pub fn advance(&mut self, elements: usize) {
        let needed = elements.saturating_mul(self.element_bytes);
        if needed + POPULATE_STRIDE_BYTES / 2 <= self.done {
            return;
        }
        let until = needed + POPULATE_STRIDE_BYTES;
        populate(self.start + self.done, until - self.done);
        self.done = until;
    }
}

/// Faults in, writable, the whole pages among the `bytes` from `start`
/// without changing what they hold (`MADV_POPULATE_WRITE`, Linux 5.14 and
/// later; elsewhere, or where it fails, nothing happens).
pub fn populate(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let aligned = start.next_multiple_of(PAGE);
        let end = start.saturating_add(bytes) / PAGE * PAGE;
        if end > aligned {
            // SAFETY: MADV_POPULATE_WRITE faults pages in as a write would,
            // without writing: every byte keeps its value, whoever owns the
            // memory when the call runs (memory since unmapped fails the
            // call, harmlessly). No Rust reference to it is made.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_keeps_what_was_there() {
        let mut ring: std::collections::VecDeque<u32> = (0..10).collect();
        ring.pop_front();
        touch_ring(&mut ring, 2_000_000, 0, Pages::Huge);
        assert!(ring.capacity() >= 2_000_000);
        assert_eq!(
            ring.iter().copied().collect::<Vec<_>>(),
            (1..10).collect::<Vec<_>>()
        );
        let v = filled([7u64, 8], 1 << 20, 1, Pages::Huge);
        assert_eq!((v[0], v[1], v[2], v.len()), (7, 8, 1, v.capacity()));
    }

    /// Pages of `bytes` from `start` the process has in memory (`mincore`).
    #[cfg(target_os = "linux")]
    fn resident_pages(start: usize, bytes: usize) -> usize {
        let mut flags = vec![0u8; bytes.div_ceil(4096)];
        // SAFETY: `start` is page-aligned and the range mapped (the caller's
        // own allocation); `flags` has one byte per page of it.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, bytes, flags.as_mut_ptr()) };
        assert_eq!(rc, 0);
        flags.iter().filter(|&&f| f & 1 == 1).count()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn populating_faults_in_what_comes_next_and_changes_nothing() {
        const BYTES: usize = 64 << 20;
        // A private anonymous mapping of our own: untouched, nothing resident.
        // SAFETY: a fresh mapping, unmapped below; no other use of it.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(start, libc::MAP_FAILED);
        let start = start as usize;
        assert_eq!(resident_pages(start, BYTES), 0);
        // SAFETY: inside the mapping, which is readable and writable.
        unsafe { *(start as *mut u64) = 42 };
        let mut populating = Populating::new(start, 100);
        populating.advance(10_000); // 1,000,000 bytes, then a stride
        let resident = resident_pages(start, BYTES);
        let expected = (1_000_000 + POPULATE_STRIDE_BYTES) / 4096;
        assert!(
            (expected..=expected + 1).contains(&resident),
            "{resident} pages resident, {expected} expected"
        );
        // Within the stride: no more.
        populating.advance(11_000);
        assert_eq!(resident_pages(start, BYTES), resident);
        populating.advance(100_000);
        assert!(resident_pages(start, BYTES) > resident);
        // SAFETY: as above; then the mapping is released.
        unsafe {
            assert_eq!(*(start as *const u64), 42, "contents kept");
            assert_eq!(*((start + 8_000_000) as *const u64), 0);
            libc::munmap(start as *mut libc::c_void, BYTES);
        }
    }
}
