//! A global allocator that starts every block of 4 KB or more on a 64-byte cache line, so the
//! kernels' vector loads and stores of activations, weights and scratch panels never straddle two
//! lines (ONNX Runtime's arena aligns its buffers to 64 bytes for the same reason).
//!
//! glibc's `malloc` aligns to 16 bytes: a 32-byte AVX2 vector at a 16-mod-64 address splits across
//! lines every other load. Measured with `mobileone bench --fused --threads 2`, five alternating
//! rounds, AMD EPYC (Zen 4, AVX-512), forced AVX2: S0 3.30 -> 3.20 ms, S3 19.2 -> 18.7 ms; AVX-512
//! S2 16.1 -> 15.6 ms, S0 and S1 within 1 %.
//!
//! The block is over-allocated by [`ALIGN`] bytes from the system allocator and the pointer it
//! returns sits after the first line boundary past a one-word header holding the system's pointer.
//! glibc's own `posix_memalign` was measured first and dropped: it asks its arena for the size plus
//! the alignment, so a freed activation never fits the next request of the same size and the heap
//! grew (S4 batch 1 peak RSS 83 -> 106 MB); with the header, requests of one size reuse each
//! other's blocks and peak RSS is the system allocator's (S0 23.1 MB, S4 83.5 MB).
//!
//! Applications opt in with one line (the command-line tools do); the kernels are correct on any
//! alignment:
//! ```
//! #[global_allocator]
//! static GLOBAL: mobileone::alloc::CacheLineAligned = mobileone::alloc::CacheLineAligned;
//!
//! fn main() {
//!     let activations = vec![0f32; 56 * 56 * 48];
//!     assert_eq!(activations.as_ptr() as usize % mobileone::alloc::ALIGN, 0);
//! }
//! ```
use std::alloc::{GlobalAlloc, Layout, System};

/// Alignment of large blocks in bytes: one cache line, and one AVX-512 vector.
pub const ALIGN: usize = 64;
/// Smallest block that is aligned; smaller ones (bookkeeping, shapes, names) keep the system's.
pub const MIN_SIZE: usize = 4096;

/// The [`System`] allocator with blocks of [`MIN_SIZE`] bytes or more aligned to [`ALIGN`] bytes.
pub struct CacheLineAligned;

/// Whether `layout` is served by the over-allocated path.
fn wrapped(layout: Layout) -> bool {
    layout.size() >= MIN_SIZE && layout.align() < ALIGN
}

/// The system allocator's layout for a wrapped block of `size` bytes; `None` past the largest
/// layout (the allocation then fails with a null pointer, as it would have).
fn outer(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(ALIGN)?, 16).ok()
}

/// Places a wrapped block in the system's block `raw` (null passes through).
///
/// # Safety
/// `raw` is null or the start of a block of at least size + ALIGN bytes, aligned to 8.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    // At least one word after raw: room for the header.
    let aligned = (raw as usize + ALIGN) & !(ALIGN - 1);
    let ptr = raw.add(aligned - raw as usize);
    (ptr as *mut *mut u8).sub(1).write(raw);
    ptr
}

// SAFETY: every wrapped block is a sub-range of a system block that stays allocated until the
// wrapped block is freed; the header word before it is never handed out.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if wrapped(layout) {
            outer(layout.size()).map_or(std::ptr::null_mut(), |outer| place(System.alloc(outer)))
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // calloc: fresh pages are not written, only mapped.
        if wrapped(layout) {
            outer(layout.size()).map_or(std::ptr::null_mut(), |outer| {
                place(System.alloc_zeroed(outer))
            })
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if wrapped(layout) {
            // A wrapped block was allocated, so its outer layout exists.
            let outer = outer(layout.size()).expect("the layout of an allocated block");
            System.dealloc((ptr as *mut *mut u8).sub(1).read(), outer);
        } else {
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size with layout's alignment is a valid layout.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        if !wrapped(layout) && !wrapped(new_layout) {
            return System.realloc(ptr, layout, new_size);
        }
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_contents() {
        let a = CacheLineAligned;
        for size in [MIN_SIZE - 1, MIN_SIZE, 100_000, 1 << 20] {
            let layout = Layout::from_size_align(size, 4).unwrap();
            // SAFETY: layouts of non-zero size; every block is freed with its own layout.
            unsafe {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                assert!(
                    size < MIN_SIZE || (p as usize).is_multiple_of(ALIGN),
                    "size {size}"
                );
                p.write_bytes(7, size);
                let z = a.alloc_zeroed(layout);
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, layout);
                // Across the threshold both ways, contents kept.
                for new_size in [MIN_SIZE / 2, 2 * size] {
                    let q = a.alloc(layout);
                    q.write_bytes(9, size);
                    let r = a.realloc(q, layout, new_size);
                    assert!(new_size < MIN_SIZE || (r as usize).is_multiple_of(ALIGN));
                    assert!(std::slice::from_raw_parts(r, size.min(new_size))
                        .iter()
                        .all(|&b| b == 9));
                    a.dealloc(r, Layout::from_size_align(new_size, 4).unwrap());
                }
                a.dealloc(p, layout);
            }
        }
        // A block whose outer layout would pass the largest one fails (null), as the system's.
        let huge = Layout::from_size_align(isize::MAX as usize - 8, 4).unwrap();
        // SAFETY: a layout of non-zero size; nothing is allocated.
        assert!(unsafe { a.alloc(huge) }.is_null());
    }
}
