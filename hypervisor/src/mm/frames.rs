//! A bitmap frame allocator over the first 4 GiB of physical memory.
//!
//! One bit per 4 KiB frame, 1 = free. The memory map from the boot loader marks usable
//! RAM free; the kernel image, the boot information and GRUB modules are then reserved.
//! Allocation is first-fit for a contiguous run (guest memory is one contiguous block,
//! which keeps EPT construction and page copies simple). Pure logic: tested on the host.

/// Frames covered by the bitmap: 4 GiB / 4 KiB.
pub const MAX_FRAMES: usize = 1 << 20;
const WORDS: usize = MAX_FRAMES / 64;

/// Error returned when no run of free frames is large enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    /// Frames requested.
    pub requested: usize,
    /// Frames free in total (possibly fragmented).
    pub free: usize,
}

impl core::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "out of memory: {} KiB requested, {} KiB free",
            self.requested * 4,
            self.free * 4
        )
    }
}

/// The bitmap itself. `const`-constructible so it can live in `.bss`.
pub struct FrameBitmap {
    free: [u64; WORDS],
    free_count: usize,
    total: usize,
}

impl FrameBitmap {
    /// An allocator with no free memory.
    pub const fn new() -> Self {
        Self {
            free: [0; WORDS],
            free_count: 0,
            total: 0,
        }
    }

    fn set(&mut self, frame: usize, free: bool) {
        let (w, b) = (frame / 64, frame % 64);
        let was = self.free[w] >> b & 1 == 1;
        if free && !was {
            self.free[w] |= 1 << b;
            self.free_count += 1;
        } else if !free && was {
            self.free[w] &= !(1 << b);
            self.free_count -= 1;
        }
    }

    /// Marks `[start, end)` (byte addresses, rounded inward to whole frames) as usable RAM.
    pub fn add_free(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(4096) as usize;
        let last = ((end / 4096) as usize).min(MAX_FRAMES);
        for f in first..last {
            if !self.is_free(f) {
                self.total += 1;
            }
            self.set(f, true);
        }
    }

    /// Marks `[start, end)` (rounded outward) as in use.
    pub fn reserve(&mut self, start: u64, end: u64) {
        let first = (start / 4096) as usize;
        let last = (end.div_ceil(4096) as usize).min(MAX_FRAMES);
        for f in first.min(MAX_FRAMES)..last {
            if self.is_free(f) {
                self.total -= 1;
            }
            self.set(f, false);
        }
    }

    /// Whether `frame` is free.
    pub fn is_free(&self, frame: usize) -> bool {
        frame < MAX_FRAMES && self.free[frame / 64] >> (frame % 64) & 1 == 1
    }

    /// Allocates `count` contiguous frames; returns the first frame number.
    pub fn alloc(&mut self, count: usize) -> Result<usize, OutOfMemory> {
        let oom = OutOfMemory {
            requested: count,
            free: self.free_count,
        };
        if count == 0 || count > self.free_count {
            return Err(oom);
        }
        let mut run_start = 0;
        let mut run_len = 0;
        let mut f = 0;
        while f < MAX_FRAMES {
            // Skip fully used words quickly.
            if f % 64 == 0 && self.free[f / 64] == 0 {
                run_len = 0;
                f += 64;
                continue;
            }
            if self.is_free(f) {
                if run_len == 0 {
                    run_start = f;
                }
                run_len += 1;
                if run_len == count {
                    for g in run_start..run_start + count {
                        self.set(g, false);
                    }
                    return Ok(run_start);
                }
            } else {
                run_len = 0;
            }
            f += 1;
        }
        Err(oom)
    }

    /// Returns `count` frames starting at `first` to the free pool.
    pub fn free(&mut self, first: usize, count: usize) {
        for f in first..(first + count).min(MAX_FRAMES) {
            debug_assert!(!self.is_free(f), "double free of frame {f:#x}");
            self.set(f, true);
        }
    }

    /// Free frames.
    pub fn free_frames(&self) -> usize {
        self.free_count
    }

    /// Usable frames (free or allocated, not reserved).
    pub fn total_frames(&self) -> usize {
        self.total
    }
}

impl Default for FrameBitmap {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_with(ranges: &[(u64, u64)]) -> Box<FrameBitmap> {
        let mut b = Box::new(FrameBitmap::new());
        for &(s, e) in ranges {
            b.add_free(s, e);
        }
        b
    }

    #[test]
    fn contiguous_first_fit_and_free() {
        let mut b = alloc_with(&[(0x10_0000, 0x20_0000)]);
        assert_eq!(b.free_frames(), 256);
        let a = b.alloc(16).unwrap();
        assert_eq!(a, 0x100);
        let c = b.alloc(16).unwrap();
        assert_eq!(c, 0x110);
        b.free(a, 16);
        assert_eq!(b.alloc(8).unwrap(), 0x100);
        assert_eq!(b.free_frames(), 256 - 24);
    }

    #[test]
    fn reserve_splits_runs_and_oom_reports() {
        let mut b = alloc_with(&[(0, 64 * 4096)]);
        b.reserve(10 * 4096, 10 * 4096 + 1);
        assert!(!b.is_free(10));
        assert_eq!(b.total_frames(), 63);
        assert_eq!(b.alloc(11).unwrap(), 11);
        let err = b.alloc(100).unwrap_err();
        assert_eq!(err.requested, 100);
        assert!(err.to_string().contains("out of memory"));
        assert!(b.alloc(0).is_err());
    }

    #[test]
    fn partial_frames_are_not_usable() {
        let b = alloc_with(&[(100, 4096 * 3 - 1)]);
        assert_eq!(b.free_frames(), 1);
        assert!(b.is_free(1));
    }

    #[test]
    fn ranges_beyond_4g_are_ignored() {
        let b = alloc_with(&[(0xFFFF_F000, 0x2_0000_0000)]);
        assert_eq!(b.free_frames(), 1);
    }
}
