//! The guest's free memory: from the end of its image to below its stack.
//!
//! Guest-virtual equals guest-physical and the hypervisor maps all guest memory, but
//! nothing in Rust owns the pages between the image and the stack. [`free_region`] hands
//! them out once, as a `&'static mut [u64]` (word access: the hypervisor often runs in an
//! emulator, where word stores are much cheaper than byte loops). It is the only place a
//! guest turns a raw address into memory it can touch.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes of a page.
pub const PAGE_SIZE: usize = 4096;
/// `u64` words in a page.
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// Bytes kept free for the stack at the top of guest memory (the hypervisor's loader
/// keeps the image below the same limit).
pub const STACK_RESERVE: u64 = 64 * 1024;

static START: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Records the boot info's bounds (called once, by [`crate::run`], before `main`).
pub(crate) fn init(image_end: u64, mem_bytes: u64) {
    let start = image_end
        .max(image_end_symbol())
        .max(guest_abi::GUEST_IMAGE_BASE);
    let start = start.next_multiple_of(PAGE_SIZE as u64);
    let end = mem_bytes.saturating_sub(STACK_RESERVE) & !(PAGE_SIZE as u64 - 1);
    START.store(start, Ordering::SeqCst);
    END.store(end.max(start), Ordering::SeqCst);
}

/// The first byte past this image, from the linker script (0 on the host).
fn image_end_symbol() -> u64 {
    #[cfg(target_os = "none")]
    {
        extern "C" {
            static __image_end: u8;
        }
        core::ptr::addr_of!(__image_end) as u64
    }
    #[cfg(not(target_os = "none"))]
    0
}

/// The free memory region `[image_end, mem_bytes - STACK_RESERVE)`, page aligned, as
/// words: word `i` is at guest-physical address `base + 8 * i`. Returns it once; `None`
/// on later calls (and before the runtime started). It may be empty.
pub fn free_region() -> Option<&'static mut [u64]> {
    let (start, end) = (START.load(Ordering::SeqCst), END.load(Ordering::SeqCst));
    if start == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    // Stay clear of the live stack even if it has grown beyond its reserve.
    let probe = 0u8;
    let sp = core::ptr::addr_of!(probe) as u64;
    let end = end.min(sp.saturating_sub(STACK_RESERVE / 2) & !(PAGE_SIZE as u64 - 1));
    let words = (end.saturating_sub(start) / 8) as usize;
    if words == 0 {
        return Some(&mut []);
    }
    // SAFETY: `[start, end)` is guest memory that nothing else uses: it lies at or above
    // the end of the loaded image (both the hypervisor's `image_end` and our own linker
    // symbol), and below the stack reserve at the top of guest memory and the current
    // stack pointer. The hypervisor maps all guest memory identity (guest-virtual =
    // guest-physical), present and writable, so the range is valid for reads and writes;
    // `start` is page aligned (so suitably aligned for u64) and non-null, and any bit
    // pattern is a valid u64. `TAKEN` hands the region out at most once, so this is the
    // only reference to it for the rest of the guest's life.
    Some(unsafe { core::slice::from_raw_parts_mut(start as *mut u64, words) })
}

/// Guest-physical address of the start of [`free_region`] (0 before the runtime started).
pub fn free_base() -> u64 {
    START.load(Ordering::SeqCst)
}
