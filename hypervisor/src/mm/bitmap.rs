//! A bitmap with one bit per guest page: the bounded-by-construction record of pages
//! dirtied during a migration. However often a page is reported (a PML log that fills
//! again and again, a guest calling a hypercall in a loop), it costs one bit.

use alloc::collections::TryReserveError;
use alloc::vec::Vec;

/// One bit per page of a guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl PageBitmap {
    /// An empty bitmap for `pages` pages; fails (instead of aborting) if the heap cannot
    /// hold it.
    pub fn new(pages: usize) -> Result<Self, TryReserveError> {
        let n = pages.div_ceil(64);
        let mut words = Vec::new();
        words.try_reserve_exact(n)?;
        words.resize(n, 0);
        Ok(Self { words, pages })
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Marks page `pfn` (ignored outside the bitmap).
    pub fn set(&mut self, pfn: usize) {
        if pfn < self.pages {
            self.words[pfn / 64] |= 1 << (pfn % 64);
        }
    }

    /// Unmarks page `pfn`.
    pub fn unset(&mut self, pfn: usize) {
        if pfn < self.pages {
            self.words[pfn / 64] &= !(1 << (pfn % 64));
        }
    }

    /// Calls `f` for every marked page, in ascending order (the bitmap is unchanged).
    pub fn for_each(&self, mut f: impl FnMut(usize)) {
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = *w;
            while bits != 0 {
                f(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    /// Whether no page is marked.
    pub fn count_is_zero(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Whether page `pfn` is marked.
    pub fn get(&self, pfn: usize) -> bool {
        pfn < self.pages && self.words[pfn / 64] & (1 << (pfn % 64)) != 0
    }

    /// Marked pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Reports every marked page to `sink` in ascending order and clears the bitmap.
    pub fn drain(&mut self, mut sink: impl FnMut(usize)) {
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = core::mem::take(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                sink(i * 64 + b);
                bits &= bits - 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_reports_cost_nothing_more() {
        let mut b = PageBitmap::new(100).unwrap();
        let bytes = b.bytes();
        for _ in 0..1_000_000 {
            b.set(7);
            b.set(99);
            b.set(100); // outside: ignored
        }
        assert_eq!(b.bytes(), bytes);
        assert_eq!(b.count(), 2);
        let mut got = Vec::new();
        b.drain(|p| got.push(p));
        assert_eq!(got, vec![7, 99]);
        assert_eq!(b.count(), 0);
        assert!(!b.get(7));
    }

    #[test]
    fn sized_by_the_guest() {
        let b = PageBitmap::new(131_072).unwrap(); // 512 MiB
        assert_eq!(b.bytes(), 16 * 1024);
        assert_eq!(PageBitmap::new(65).unwrap().bytes(), 16);
    }
}
