//! The kernel heap: `linked_list_allocator` over a contiguous block of frames.

use super::phys::PhysPages;

/// Heap size. Big enough for the network buffers and migration bookkeeping; guest
/// memory comes from the frame allocator, not from here.
pub const HEAP_SIZE: usize = 24 * 1024 * 1024;

#[cfg(target_os = "none")]
#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

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
        HEAP.lock().init(base as *mut u8, HEAP_SIZE)
    };
    let _ = base;
    Ok(())
}

/// (used, free) bytes of the heap.
pub fn usage() -> (usize, usize) {
    #[cfg(target_os = "none")]
    {
        let h = HEAP.lock();
        (h.used(), h.free())
    }
    #[cfg(not(target_os = "none"))]
    (0, 0)
}

/// The allocator's out-of-memory path: a heap exhaustion is a bug (sizes are bounded).
#[cfg(target_os = "none")]
pub fn alloc_error(layout: core::alloc::Layout) -> ! {
    panic!("heap exhausted allocating {} bytes", layout.size())
}
