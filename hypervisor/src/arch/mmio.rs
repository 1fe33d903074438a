//! Memory-mapped device registers and DMA-shared memory.
//!
//! Two small wrappers, both used by the e1000 driver ([`crate::net::e1000`]):
//! * [`Mmio`]: a window of device registers (a PCI memory BAR), read and written with
//!   volatile 32-bit accesses. It can only be made from a range that lies in the boot
//!   identity map (below 4 GiB) and holds no RAM the frame allocator manages, so no
//!   access through it can alias memory that Rust code owns.
//! * [`read_shared_u64`]/[`write_shared_u64`]: volatile accesses to words of memory that
//!   a device reads and writes by DMA (descriptor rings), so the compiler neither caches
//!   nor elides them; and [`dma_fence`] to order descriptor writes before the doorbell.
//!
//! Where the device is told to DMA is the driver's responsibility: it only hands the
//! device physical addresses of [`crate::mm::phys::PhysPages`] it owns for as long as the
//! device is enabled.

use core::sync::atomic::{fence, Ordering};

use crate::mm::{phys, PAGE_SIZE};

/// A register window of a device (a PCI memory BAR).
#[derive(Debug)]
pub struct Mmio {
    base: usize,
    len: usize,
}

/// Why a range cannot be used as a register window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// Zero, unaligned, empty or beyond the 4 GiB identity map.
    BadRange {
        /// Physical base.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The range overlaps RAM that the frame allocator hands out.
    OverlapsRam {
        /// Physical base.
        base: u64,
    },
}

impl core::fmt::Display for MmioError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadRange { base, len } => write!(
                f,
                "register window {base:#x}+{len:#x} is not a page-aligned range below 4 GiB"
            ),
            Self::OverlapsRam { base } => {
                write!(f, "register window at {base:#x} overlaps usable RAM")
            }
        }
    }
}

impl Mmio {
    /// Makes a register window of `len` bytes at physical `base` (a device BAR).
    pub fn new(base: u64, len: u64) -> Result<Self, MmioError> {
        let end = base.checked_add(len);
        if base == 0
            || len == 0
            || !base.is_multiple_of(PAGE_SIZE)
            || end.is_none_or(|e| e > 1 << 32)
        {
            return Err(MmioError::BadRange { base, len });
        }
        let first = (base / PAGE_SIZE) as usize;
        let count = len.div_ceil(PAGE_SIZE) as usize;
        if phys::with_frames(|f| (first..first + count).any(|fr| f.is_free(fr))) {
            return Err(MmioError::OverlapsRam { base });
        }
        Ok(Self {
            base: base as usize,
            len: len as usize,
        })
    }

    /// Physical base address.
    pub fn base(&self) -> u64 {
        self.base as u64
    }

    fn in_range(&self, offset: u32) -> bool {
        offset.is_multiple_of(4) && (offset as usize) + 4 <= self.len
    }

    /// Reads the 32-bit register at `offset`; an offset outside the window or unaligned
    /// reads as all ones (what a missing device returns), never faults.
    pub fn read32(&self, offset: u32) -> u32 {
        if !self.in_range(offset) {
            return u32::MAX;
        }
        let p = (self.base + offset as usize) as *const u32;
        // SAFETY: `new` checked that the window is identity-mapped device memory, not RAM
        // owned by Rust code; the offset is in the window and 4-byte aligned.
        unsafe { p.read_volatile() }
    }

    /// Writes the 32-bit register at `offset`; offsets outside the window are ignored.
    pub fn write32(&self, offset: u32, value: u32) {
        if !self.in_range(offset) {
            return;
        }
        let p = (self.base + offset as usize) as *mut u32;
        // SAFETY: as in `read32`. The window is not memory Rust references point into, so
        // writing through a pointer derived from `&self` aliases nothing.
        unsafe { p.write_volatile(value) }
    }
}

/// Reads a word of memory that a device may write by DMA.
pub fn read_shared_u64(word: &u64) -> u64 {
    // SAFETY: `word` is a valid, aligned reference; a volatile read of it is always sound.
    unsafe { core::ptr::read_volatile(word) }
}

/// Writes a word of memory that a device reads by DMA.
pub fn write_shared_u64(word: &mut u64, value: u64) {
    // SAFETY: `word` is a valid, aligned, exclusive reference.
    unsafe { core::ptr::write_volatile(word, value) }
}

/// Orders all earlier memory accesses (descriptor and buffer writes) before later ones
/// (the doorbell register write), for the compiler and the CPU.
pub fn dma_fence() {
    fence(Ordering::SeqCst);
}
