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
}
