//! The verify guest's memory invariant, as pure functions over a word slice (tested on
//! the host).
//!
//! The region is a header page, a ledger (one generation number per data page) and the
//! data pages. Every word of data page `p` is a function of (`p`, its generation, the
//! word index), and the header holds the sum of all generations. An update bumps one
//! page's generation and rewrites the page. A page whose newest version was lost (a
//! migration that missed a dirty page) disagrees with the ledger; a lost ledger page
//! disagrees with its data pages or the header sum; a lost header disagrees with the
//! ledger sum.

/// Words per page.
pub const WORDS: usize = 512;
const MAGIC: u64 = 0x5645_5249_4659_3031; // "VERIFY01"

/// The layout of a region of `words` words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Ledger pages.
    pub ledger_pages: usize,
    /// Data pages.
    pub data_pages: usize,
}

impl Layout {
    /// Lays out a region.
    pub fn new(words: usize) -> Self {
        let pages = words / WORDS;
        let data_pages = pages.saturating_sub(1) * WORDS / (WORDS + 1);
        Self {
            ledger_pages: data_pages.div_ceil(WORDS),
            data_pages,
        }
    }

    fn ledger(&self, p: usize) -> usize {
        WORDS + p
    }

    fn data(&self, p: usize) -> usize {
        (1 + self.ledger_pages + p) * WORDS
    }
}

/// The value of word `i` of data page `p` at generation `g`.
#[inline]
pub fn word(p: usize, g: u64, i: usize) -> u64 {
    ((p as u64) << 32 ^ g).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

fn fill(data: &mut [u64], p: usize, g: u64) {
    for (i, w) in data.iter_mut().enumerate() {
        *w = word(p, g, i);
    }
}

/// Initialises every page at generation 0.
pub fn init(mem: &mut [u64]) -> Layout {
    let l = Layout::new(mem.len());
    mem[..WORDS].fill(0);
    mem[0] = MAGIC;
    for p in 0..l.data_pages {
        mem[l.ledger(p)] = 0;
        let d = l.data(p);
        fill(&mut mem[d..d + WORDS], p, 0);
    }
    l
}

/// Moves page `p` to its next generation.
pub fn update(mem: &mut [u64], l: &Layout, p: usize) {
    let g = mem[l.ledger(p)] + 1;
    let d = l.data(p);
    fill(&mut mem[d..d + WORDS], p, g);
    mem[l.ledger(p)] = g;
    mem[1] = mem[1].wrapping_add(1);
}

/// Where the invariant broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The header is not ours.
    Header,
    /// A word of a data page does not match its ledger generation.
    Page {
        /// Data page.
        page: usize,
        /// Word index.
        word: usize,
    },
    /// The ledger's sum is not the header's total.
    Total {
        /// Sum of the ledger.
        ledger: u64,
        /// The header's total.
        header: u64,
    },
}

/// Checks every page; returns the number of data pages checked.
pub fn check(mem: &[u64], l: &Layout) -> Result<usize, Failure> {
    if mem[0] != MAGIC {
        return Err(Failure::Header);
    }
    let mut sum = 0u64;
    for p in 0..l.data_pages {
        let g = mem[l.ledger(p)];
        sum = sum.wrapping_add(g);
        let d = l.data(p);
        for (i, &w) in mem[d..d + WORDS].iter().enumerate() {
            if w != word(p, g, i) {
                return Err(Failure::Page { page: p, word: i });
            }
        }
    }
    if sum != mem[1] {
        return Err(Failure::Total {
            ledger: sum,
            header: mem[1],
        });
    }
    Ok(l.data_pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> (Vec<u64>, Layout) {
        let mut m = vec![0u64; 64 * WORDS];
        let l = init(&mut m);
        (m, l)
    }

    #[test]
    fn layout_fits() {
        let l = Layout::new(64 * WORDS);
        assert_eq!(l.ledger_pages, 1);
        assert_eq!(l.data_pages, 62);
        let l = Layout::new(1000 * WORDS);
        assert!(1 + l.ledger_pages + l.data_pages <= 1000);
        assert!(l.ledger_pages * WORDS >= l.data_pages);
    }

    #[test]
    fn updates_keep_the_invariant() {
        let (mut m, l) = region();
        for k in 0..500 {
            update(&mut m, &l, (k * 7) % l.data_pages);
        }
        assert_eq!(check(&m, &l), Ok(62));
    }

    #[test]
    fn a_stale_page_is_detected() {
        let (mut m, l) = region();
        update(&mut m, &l, 5);
        let old: Vec<u64> = m[l.data(5)..l.data(5) + WORDS].to_vec();
        update(&mut m, &l, 5);
        m[l.data(5)..l.data(5) + WORDS].copy_from_slice(&old);
        assert_eq!(check(&m, &l), Err(Failure::Page { page: 5, word: 0 }));
    }

    #[test]
    fn a_stale_ledger_or_header_is_detected() {
        let (mut m, l) = region();
        let ledger_before: Vec<u64> = m[WORDS..2 * WORDS].to_vec();
        update(&mut m, &l, 9);
        let header_after: Vec<u64> = m[..WORDS].to_vec();
        m[WORDS..2 * WORDS].copy_from_slice(&ledger_before);
        assert!(matches!(check(&m, &l), Err(Failure::Page { page: 9, .. })));
        // Ledger and data current, header stale.
        let (mut m, l) = region();
        let header_before: Vec<u64> = m[..WORDS].to_vec();
        update(&mut m, &l, 3);
        m[..WORDS].copy_from_slice(&header_before);
        assert!(matches!(check(&m, &l), Err(Failure::Total { .. })));
        m[..WORDS].copy_from_slice(&header_after);
        m[0] = 0;
        assert_eq!(check(&m, &l), Err(Failure::Header));
    }
}
