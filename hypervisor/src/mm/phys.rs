//! Physical memory as Rust references, through the boot identity map.
//!
//! Two kinds of access exist, and this module is the only place that makes them:
//! * [`PhysPages`]: frames owned exclusively by one object (guest memory, EPT tables,
//!   VMCS and VMXON regions, NIC rings), freed on drop. Exclusive ownership is what makes
//!   handing out `&mut [u8]` sound.
//! * [`boot_bytes`]: read-only views of memory the allocator never hands out (the
//!   Multiboot2 information, GRUB modules, firmware tables), reserved at boot.

use spin::Mutex;

use super::frames::{FrameBitmap, OutOfMemory};
use super::PAGE_SIZE;

static FRAMES: Mutex<FrameBitmap> = Mutex::new(FrameBitmap::new());

/// Runs `f` with the global frame bitmap (boot-time setup and statistics).
pub fn with_frames<R>(f: impl FnOnce(&mut FrameBitmap) -> R) -> R {
    f(&mut FRAMES.lock())
}

/// A run of physically contiguous, zeroed, exclusively owned pages.
#[derive(Debug)]
pub struct PhysPages {
    base: u64,
    count: usize,
}

impl PhysPages {
    /// Allocates and zeroes `count` contiguous pages.
    pub fn alloc(count: usize) -> Result<Self, OutOfMemory> {
        let first = FRAMES.lock().alloc(count)?;
        let mut pages = Self {
            base: first as u64 * PAGE_SIZE,
            count,
        };
        pages.as_u64_mut().fill(0);
        Ok(pages)
    }

    /// Physical address of the first page.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of pages.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.count * PAGE_SIZE as usize
    }

    /// Whether the run is empty (never, for an allocated run).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pages as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the frames are identity-mapped, owned by self alone (the allocator will
        // not hand them out again until drop) and `len()` bytes long.
        unsafe { core::slice::from_raw_parts(self.base as *const u8, self.len()) }
    }

    /// The pages as mutable bytes.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; `&mut self` guarantees no other reference exists.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u8, self.len()) }
    }

    /// The pages as 64-bit words (page tables, fast copies).
    pub fn as_u64(&self) -> &[u64] {
        // SAFETY: as in `as_bytes`; the base is page aligned, so u64 alignment holds.
        unsafe { core::slice::from_raw_parts(self.base as *const u64, self.len() / 8) }
    }

    /// The pages as mutable 64-bit words.
    pub fn as_u64_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `as_bytes_mut`; the base is page aligned.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u64, self.len() / 8) }
    }
}

impl Drop for PhysPages {
    fn drop(&mut self) {
        FRAMES
            .lock()
            .free((self.base / PAGE_SIZE) as usize, self.count);
    }
}

/// A read-only view of boot-reserved physical memory (see the module documentation).
/// Callers pass ranges that came from the boot loader or firmware and were reserved in
/// the frame allocator before any allocation happened.
pub fn boot_bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: per the contract above the range is identity-mapped, reserved (never
    // allocated or written by the hypervisor) and lives for the whole run.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}
