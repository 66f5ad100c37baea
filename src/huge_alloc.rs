//! The engine's global allocator: the system allocator, except that large
//! allocations get their own mapping, aligned to 2 MiB, and those made
//! while a journal replay runs are advised for transparent huge pages
//! (`MADV_HUGEPAGE`).
//!
//! Why: recovery rebuilds tables of millions of entries (the message table
//! alone is ~112 bytes per slot, 1 GiB of journal holds 4 M pending
//! messages), writing them in hash order. With 4 KiB pages every first write
//! of a page is a fault, and the misses of the TLB come on top of the cache
//! misses; with 2 MiB pages there are 512 times fewer of both. The kernel's
//! default here (`/sys/kernel/mm/transparent_hugepage/enabled` =
//! `madvise`, Debian's and most distributions') gives huge pages only to
//! memory that asks for them, and glibc asks only when started with
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which an operator would have to
//! know about. docs/PERFORMANCE.md ("Issue #9, fifth round") has the
//! figures.
//!
//! Only while a journal replay runs
//! (`esh3ar_shards::recovery::replay_running`): the blocks recovery fills
//! keep their huge pages for their life, but a block the live path
//! allocates later (a table part that doubles as messages arrive) stays on
//! base pages. Live, a part is written a little at a time, and zeroing a
//! whole 2 MiB page at its first touch cost ingest ~5% (86,488 against
//! 81,559 and 82,706 msg/s, one shard, 256 connections, advice off and on:
//! docs/PERFORMANCE.md, "Issue #9, sixth round").
//!
//! Only allocations of [`HUGE_FROM`] bytes or more are mapped here (the
//! tables of recovery and of the live index, read-ahead buffers); the
//! small and frequent ones (per-request buffers, per-connection state,
//! queue nodes) stay with glibc, whose per-thread caches they need. A large
//! allocation costs an `mmap` and a `madvise` (and a `munmap` when freed),
//! nothing against the megabytes it then serves. The price is memory: a
//! huge page is resident as a whole once any byte of it is written, so the
//! parts of a large block never written (the empty buckets of a hash table
//! that recovery filled to half its capacity) are resident too, where base
//! pages would have stayed unmapped until used. After a restart with 4.1 M
//! pending messages that was 1,032 → 1,221 MB (+18%), until recovery sized
//! the message table's parts to the journal (`plan_message_table` in
//! `esh3ar_shards::index`): 827 MB. The two are coupled: a part just under
//! [`HUGE_FROM`] falls back to base pages. A large block allocated and
//! freed on a hot path would pay a mapping (and its first-touch faults)
//! each time; keep such buffers under [`HUGE_FROM`] or reuse them.
//!
//! Where transparent huge pages are off (`never`) the advice is ignored and
//! the mappings behave as the system allocator's own large ones would.
//! `ESH3AR_HUGE_PAGES=0` in the environment turns the advice off (for
//! comparison runs, or a host where huge pages cost more than they give).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};

/// Size of a transparent huge page on x86-64 and the usual arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Allocations of this size or more get their own huge-page mapping: 1.5
/// MiB, so that a block of 1.5 to 2 MiB (a message table part sized by
/// recovery, 16,384 buckets of 112 bytes) takes one huge page with at
/// most 0.5 MiB unused, and the spill's journal reads (1 MiB at most)
/// stay with glibc.
pub const HUGE_FROM: usize = HUGE_PAGE / 4 * 3;

/// 0: not read yet; 1: advise huge pages; 2: do not.
static ADVISE: AtomicU8 = AtomicU8::new(0);

fn advise() -> bool {
    match ADVISE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // `std::env::var` allocates, which an allocator must not do
            // (it could recurse); read the environment through libc.
            // SAFETY: the name is a NUL-terminated literal; getenv returns
            // NULL or a pointer to a NUL-terminated string that stays valid
            // while the environment is not modified (the engine never
            // modifies it).
            let off = unsafe {
                let value = libc::getenv(c"ESH3AR_HUGE_PAGES".as_ptr());
                !value.is_null() && *value == b'0' as libc::c_char
            };
            ADVISE.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// The engine's allocator (see the module docs).
pub struct HugePageAlloc;

fn is_huge(layout: &Layout) -> bool {
    layout.size() >= HUGE_FROM && layout.align() <= HUGE_PAGE
}

/// Base page size on every platform this allocator runs on (x86-64 and
/// arm64 Linux with 4 KiB pages; a larger base page only makes this a
/// multiple of it, which `mmap` rounds up anyway).
const PAGE: usize = 4096;

/// Bytes mapped for a block of `size`, and how many of them (from the
/// start) are advised for huge pages. The tail past the last whole huge
/// page gets a huge page of its own when it fills at least half of one;
/// otherwise it stays on base pages: hashbrown puts a table's control
/// bytes at the end of its block, so a huge page there would be resident
/// (2 MiB) for a few KiB of use. At most 1 MiB of a huge page is unused.
fn mapped_and_advised(size: usize) -> (usize, usize) {
    let whole = size / HUGE_PAGE * HUGE_PAGE;
    if size - whole >= HUGE_PAGE / 2 {
        (whole + HUGE_PAGE, whole + HUGE_PAGE)
    } else {
        (size.div_ceil(PAGE) * PAGE, whole)
    }
}

fn mapped_len(size: usize) -> usize {
    mapped_and_advised(size).0
}

/// Whether a large block mapped now gets the huge-page advice: not turned
/// off, and a journal replay is running (see the module docs).
fn advise_now() -> bool {
    advise() && esh3ar_shards::recovery::replay_running()
}

/// Maps a block of `size` bytes at a 2 MiB boundary and, if `huge`, advises
/// huge pages for it as [`mapped_and_advised`] says; null when the kernel
/// refuses.
fn map(size: usize, huge: bool) -> *mut u8 {
    let (len, whole) = mapped_and_advised(size);
    // Over-map by one huge page, then cut the unaligned head and the tail,
    // so the mapping starts on a huge-page boundary.
    let Some(span) = len.checked_add(HUGE_PAGE) else {
        return ptr::null_mut();
    };
    // SAFETY: an anonymous private mapping at an address the kernel
    // chooses; it aliases no existing memory.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = span - head - len;
    // SAFETY: both ranges lie inside the mapping just made, which nothing
    // else knows about yet; `head` and `tail` are multiples of the page
    // size because `start`, `span` and `len` are.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    if whole > 0 && huge {
        // SAFETY: the range lies inside the mapping kept above. The advice
        // only changes how the kernel backs it; a failure (huge pages off)
        // leaves ordinary pages, which is correct, so the result is ignored.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
        }
    }
    aligned as *mut u8
}

/// Unmaps what [`map`] returned for `size` bytes.
///
/// # Safety
/// `ptr` must come from [`map`] with the same `size`, and not be used after.
unsafe fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: by the caller's contract, the range is one whole mapping of
    // ours; a failure could only leak it.
    unsafe {
        libc::munmap(ptr.cast(), mapped_len(size));
    }
}

// SAFETY: every block handed out is either the system allocator's (for
// small layouts, and given back to it) or a fresh private mapping of at
// least `layout.size()` bytes aligned to 2 MiB, which satisfies any
// alignment up to 2 MiB (larger alignments go to the system allocator).
// Which of the two a block is follows from its layout alone, and
// `dealloc`/`realloc` receive the layout it was allocated with.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_huge(&layout) {
            map(layout.size(), advise_now())
        } else {
            // SAFETY: forwarded with the caller's (valid, non-zero) layout.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_huge(&layout) {
            // Fresh anonymous mappings read as zeros.
            map(layout.size(), advise_now())
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_huge(&layout) {
            // SAFETY: a huge layout's block came from `map` with this size.
            unsafe { unmap(ptr, layout.size()) }
        } else {
            // SAFETY: a small layout's block came from the system allocator.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `realloc`'s contract gives a valid layout for the new size
        // with the same alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_huge(&layout), is_huge(&new_layout)) {
            // SAFETY: both sides are the system allocator's.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) if mapped_len(layout.size()) == mapped_len(new_size) => ptr,
            _ => {
                // SAFETY: a fresh block for the new layout; on success the
                // old block's first `min` bytes move over and the old block
                // is freed as the layout it was allocated with.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_aligned_zeroed_and_survive_growth_and_shrinking() {
        let a = HugePageAlloc;
        let layout = Layout::from_size_align(HUGE_FROM + 123, 8).unwrap();
        // SAFETY: valid layouts; every block is freed with its own layout.
        unsafe {
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0, "a large block starts on a huge page");
            assert!(std::slice::from_raw_parts(p, layout.size()).iter().all(|&b| b == 0));
            p.write_bytes(7, layout.size());
            // Grow within the same huge pages, then beyond, then shrink to small.
            let same = a.realloc(p, layout, HUGE_FROM + 4096);
            assert_eq!(same, p);
            let grown_layout = Layout::from_size_align(HUGE_FROM + 4096, 8).unwrap();
            let grown = a.realloc(same, grown_layout, 3 * HUGE_FROM);
            assert!(std::slice::from_raw_parts(grown, HUGE_FROM + 123).iter().all(|&b| b == 7));
            let big = Layout::from_size_align(3 * HUGE_FROM, 8).unwrap();
            let small = a.realloc(grown, big, 1000);
            assert!(std::slice::from_raw_parts(small, 1000).iter().all(|&b| b == 7));
            // And from small back to large.
            let again = a.realloc(small, Layout::from_size_align(1000, 8).unwrap(), HUGE_FROM);
            assert!(std::slice::from_raw_parts(again, 1000).iter().all(|&b| b == 7));
            a.dealloc(again, Layout::from_size_align(HUGE_FROM, 8).unwrap());
        }
    }

    #[test]
    fn a_tail_of_half_a_huge_page_or_more_gets_one_and_a_smaller_one_stays_on_base_pages() {
        const MIB: usize = 1 << 20;
        // A table part of 3.53 MiB: two huge pages, 0.47 MiB unused.
        assert_eq!(mapped_and_advised(3 * MIB + MIB / 2 + 4096), (4 * MIB, 4 * MIB));
        // 16 MiB of buckets and 128 KiB of control bytes: the control bytes
        // on base pages.
        assert_eq!(mapped_and_advised(16 * MIB + 128 * 1024 + 17), (16 * MIB + 132 * 1024, 16 * MIB));
        assert_eq!(mapped_and_advised(2 * MIB), (2 * MIB, 2 * MIB));
        // From HUGE_FROM to one huge page: the huge page.
        assert_eq!(mapped_and_advised(HUGE_FROM), (2 * MIB, 2 * MIB));
        assert_eq!(mapped_and_advised(16_384 * 112 + 16_400), (2 * MIB, 2 * MIB));
        assert_eq!(mapped_and_advised(3 * MIB), (4 * MIB, 4 * MIB));
        assert_eq!(mapped_and_advised(3 * MIB - 1), (3 * MIB, 2 * MIB));
    }

    #[test]
    fn a_large_block_is_advised_and_backed_by_huge_pages_where_the_kernel_allows_them() {
        let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let a = HugePageAlloc;
        let layout = Layout::from_size_align(8 * HUGE_PAGE, 8).unwrap();
        let replay = esh3ar_shards::recovery::ReplayRunning::enter();
        // SAFETY: a valid layout, freed below with the same layout.
        unsafe {
            let p = a.alloc(layout);
            p.write_bytes(1, layout.size());
            let (flags, anon_huge) = mapping_holding(p as usize);
            a.dealloc(p, layout);
            drop(replay);
            // Outside a replay (`advise_now` false) a large block is mapped
            // the same way but not advised.
            let live = map(layout.size(), false);
            assert_eq!(live as usize % HUGE_PAGE, 0);
            let (live_flags, _) = mapping_holding(live as usize);
            unmap(live, layout.size());
            assert!(!live_flags.split_whitespace().any(|f| f == "hg"), "advised outside a replay: {live_flags}");
            // The advice is recorded whatever the kernel's setting ("hg").
            assert!(flags.split_whitespace().any(|f| f == "hg"), "not advised: {flags}");
            if enabled.contains("[madvise]") || enabled.contains("[always]") {
                // The kernel may lack free huge pages at this instant; most
                // of the 16 MiB should still be huge.
                assert!(anon_huge >= 8 * 1024, "only {anon_huge} kB of 16 MiB in huge pages");
            }
        }
    }

    /// `VmFlags` and `AnonHugePages` (kB) of the mapping (as
    /// `/proc/self/smaps` lists it) that holds `addr`.
    fn mapping_holding(addr: usize) -> (String, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut inside, mut huge) = (false, None);
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((Ok(start), Ok(end))) =
                range.map(|(a, b)| (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)))
            {
                inside = start <= addr && addr < end;
            } else if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    huge = v.trim().trim_end_matches("kB").trim().parse().ok();
                } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return (flags.to_owned(), huge.expect("AnonHugePages comes before VmFlags"));
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }
}
