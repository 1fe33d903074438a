//! The kernel heap: `linked_list_allocator` over a contiguous block of frames.

use super::phys::PhysPages;

/// Heap size. Big enough for the network buffers and migration bookkeeping; guest
/// memory comes from the frame allocator, not from here.
pub const HEAP_SIZE: usize = 24 * 1024 * 1024;

#[cfg(target_os = "none")]
#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    heap: linked_list_allocator::LockedHeap::empty(),
    high_water: core::sync::atomic::AtomicUsize::new(0),
    failures: core::sync::atomic::AtomicUsize::new(0),
};

/// The heap with its high-water mark and failed allocations counted (`mem`).
#[cfg(target_os = "none")]
struct CountingHeap {
    heap: linked_list_allocator::LockedHeap,
    high_water: core::sync::atomic::AtomicUsize,
    failures: core::sync::atomic::AtomicUsize,
}

// SAFETY: every call is forwarded unchanged to `LockedHeap`, a correct allocator; the
// counters only observe.
#[cfg(target_os = "none")]
unsafe impl core::alloc::GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        use core::sync::atomic::Ordering;
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, passed on as is.
        let p = unsafe { self.heap.alloc(layout) };
        if p.is_null() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        } else if let Some(h) = self.heap.try_lock() {
            self.high_water.fetch_max(h.used(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // SAFETY: as for `alloc`.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

/// Takes frames for the heap and hands them to the allocator (once, at boot).
pub fn init() -> Result<(), super::frames::OutOfMemory> {
    let pages = PhysPages::alloc(HEAP_SIZE / 4096)?;
    let base = pages.base();
    // The heap lives for the whole run: its frames are never returned.
    core::mem::forget(pages);
    #[cfg(target_os = "none")]
    // SAFETY: the range was just allocated, is identity-mapped, owned by nobody else
    // (forgotten above) and `init` runs once before any allocation.
    unsafe {
        HEAP.heap.lock().init(base as *mut u8, HEAP_SIZE)
    };
    let _ = base;
    Ok(())
}

/// (used, free) bytes of the heap.
pub fn usage() -> (usize, usize) {
    #[cfg(target_os = "none")]
    {
        let h = HEAP.heap.lock();
        (h.used(), h.free())
    }
    #[cfg(not(target_os = "none"))]
    (0, 0)
}

/// (highest bytes in use so far, allocations that failed).
pub fn high_water() -> (usize, usize) {
    #[cfg(target_os = "none")]
    {
        use core::sync::atomic::Ordering;
        (
            HEAP.high_water.load(Ordering::Relaxed),
            HEAP.failures.load(Ordering::Relaxed),
        )
    }
    #[cfg(not(target_os = "none"))]
    (0, 0)
}

/// The allocator's out-of-memory path: a heap exhaustion is a bug (sizes are bounded).
#[cfg(target_os = "none")]
pub fn alloc_error(layout: core::alloc::Layout) -> ! {
    panic!("heap exhausted allocating {} bytes", layout.size())
}
