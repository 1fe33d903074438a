//! Memory invariants the test guests keep and check, as pure functions over word slices
//! (so they are unit-tested on the host).
//!
//! The point of both is to catch live migration losing a page: the destination ends up
//! with an older version of a page than the source last wrote.
//!
//! # `verify`: a ledger of generations
//!
//! The region (a whole number of pages) is laid out as
//!
//! ```text
//!   page 0                      header: MAGIC, total, data_pages
//!   pages 1 ..= ledger_pages    ledger: one u64 generation per data page
//!   the rest                    data pages
//! ```
//!
//! Every word of data page `p` is [`word`]`(p, g, i)` for its ledger generation `g`, and
//! the header's `total` is the sum of all generations (= the number of updates). An
//! update rewrites a data page for its next generation, then bumps its ledger entry and
//! the total. [`check`] then catches each kind of stale page:
//!
//! * a stale data page holds an older generation than its ledger entry;
//! * a stale ledger page has smaller generations than the data pages it covers (and its
//!   sum falls short of the header's total);
//! * a stale header disagrees with the update count the guest keeps in a local variable
//!   (registers/stack travel with the vCPU state), which the caller passes in.
//!
//! `word` is a bijection of the generation for a fixed page and word (multiplying by an
//! odd constant is invertible mod 2^64), so any other generation, another page's content
//! or zeros never match; and [`decode`] recovers which generation a stale word holds.
//!
//! # `dirtier`: last writer wins
//!
//! Write `k` (counting from 0) goes to page `k % w` of a `w`-page working set and stores
//! `k + 1` in its word 0, so after `total` writes every page's word 0 is determined
//! ([`dirtier_expected`]); a page that missed its latest write holds a smaller number.

/// `u64` words in a page.
pub const WORDS: usize = 512;
/// Header word 0 of a verify region ("VERIFY01").
pub const MAGIC: u64 = u64::from_le_bytes(*b"VERIFY01");

const K_PAGE: u64 = 0x9E37_79B9_7F4A_7C15;
const K_WORD: u64 = 0xD6E8_FEB8_6659_FD93;
/// The inverse of `K_PAGE` mod 2^64 (Newton's iteration, 3 -> 96 correct bits).
const K_PAGE_INV: u64 = {
    let mut x = K_PAGE;
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(K_PAGE.wrapping_mul(x)));
        i += 1;
    }
    x
};
const _: () = assert!(K_PAGE.wrapping_mul(K_PAGE_INV) == 1);

/// The value of word `i` of data page `p` at generation `g`.
#[inline(always)]
pub fn word(p: usize, g: u64, i: usize) -> u64 {
    page_base(p, g) ^ (i as u64).wrapping_mul(K_WORD)
}

#[inline(always)]
fn page_base(p: usize, g: u64) -> u64 {
    ((p as u64) << 32 ^ g).wrapping_mul(K_PAGE)
}

/// The (page, generation) whose word `i` would be `value` (exact for generations below
/// 2^32, which is all of them in practice; for foreign values the page is nonsense).
pub fn decode(value: u64, i: usize) -> (usize, u64) {
    let x = (value ^ (i as u64).wrapping_mul(K_WORD)).wrapping_mul(K_PAGE_INV);
    ((x >> 32) as usize, x & 0xFFFF_FFFF)
}

/// Where the header, ledger and data pages of a region are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Ledger pages (after the header page).
    pub ledger_pages: usize,
    /// Data pages (after the ledger).
    pub data_pages: usize,
}

impl Layout {
    /// Lays out a region of `words` words: the most data pages whose ledger fits.
    pub fn new(words: usize) -> Self {
        let rest = (words / WORDS).saturating_sub(1); // after the header
                                                      // d + ceil(d / WORDS) <= rest for d = rest - ceil(rest / (WORDS + 1)).
        let data_pages = rest - rest.div_ceil(WORDS + 1);
        Self {
            ledger_pages: data_pages.div_ceil(WORDS),
            data_pages,
        }
    }

    /// Pages the layout uses.
    pub fn pages(&self) -> usize {
        if self.data_pages == 0 {
            0
        } else {
            1 + self.ledger_pages + self.data_pages
        }
    }

    /// Index of data page `p`'s ledger entry.
    fn ledger(&self, p: usize) -> usize {
        WORDS + p
    }

    /// Word range of data page `p`.
    fn data(&self, p: usize) -> core::ops::Range<usize> {
        let start = (1 + self.ledger_pages + p) * WORDS;
        start..start + WORDS
    }
}

const H_MAGIC: usize = 0;
const H_TOTAL: usize = 1;
const H_PAGES: usize = 2;

fn fill(page: &mut [u64], p: usize, g: u64) {
    let base = page_base(p, g);
    for (i, w) in page.iter_mut().enumerate() {
        *w = base ^ (i as u64).wrapping_mul(K_WORD);
    }
}

/// Lays out `mem` and writes every data page at generation 0 (update count 0).
pub fn init(mem: &mut [u64]) -> Layout {
    let l = Layout::new(mem.len());
    if l.data_pages == 0 {
        return l;
    }
    mem[..WORDS].fill(0);
    mem[H_MAGIC] = MAGIC;
    mem[H_TOTAL] = 0;
    mem[H_PAGES] = l.data_pages as u64;
    mem[WORDS..(1 + l.ledger_pages) * WORDS].fill(0);
    for p in 0..l.data_pages {
        fill(&mut mem[l.data(p)], p, 0);
    }
    l
}

/// Moves data page `p` to its next generation: rewrites the page, then its ledger entry,
/// then the header's total. The caller counts the update.
pub fn update(mem: &mut [u64], l: &Layout, p: usize) {
    let g = mem[l.ledger(p)].wrapping_add(1);
    fill(&mut mem[l.data(p)], p, g);
    mem[l.ledger(p)] = g;
    mem[H_TOTAL] = mem[H_TOTAL].wrapping_add(1);
}

/// How the verify invariant broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The header's magic or page count is wrong (header page lost or overwritten).
    Header {
        /// Word 0 of the header.
        magic: u64,
        /// The data page count the header holds.
        data_pages: u64,
    },
    /// A word of a data page does not belong to the page's ledger generation.
    Page {
        /// Data page.
        page: usize,
        /// Word index in the page.
        word: usize,
        /// The ledger's generation for the page.
        ledger: u64,
        /// The (page, generation) the word belongs to, when it is one of ours: the same
        /// page at an older generation means the newest version was lost.
        found: Option<(usize, u64)>,
    },
    /// The ledger's sum is not the header's total (a stale ledger page).
    LedgerSum {
        /// Sum of the ledger.
        ledger: u64,
        /// The header's total.
        header: u64,
    },
    /// The header's total is not the number of updates the guest made (a stale header).
    Total {
        /// The header's total.
        header: u64,
        /// The guest's own count of updates.
        updates: u64,
    },
}

/// Checks the whole region against the invariant, given the number of updates the guest
/// made since [`init`]. Returns the number of data pages checked; on failure also the
/// number examined so far (including the bad one).
pub fn check(mem: &[u64], l: &Layout, updates: u64) -> Result<usize, (Failure, usize)> {
    if mem[H_MAGIC] != MAGIC || mem[H_PAGES] != l.data_pages as u64 {
        let f = Failure::Header {
            magic: mem[H_MAGIC],
            data_pages: mem[H_PAGES],
        };
        return Err((f, 0));
    }
    let mut sum = 0u64;
    for p in 0..l.data_pages {
        let g = mem[l.ledger(p)];
        sum = sum.wrapping_add(g);
        let base = page_base(p, g);
        for (i, &w) in mem[l.data(p)].iter().enumerate() {
            if w != base ^ (i as u64).wrapping_mul(K_WORD) {
                let f = Failure::Page {
                    page: p,
                    word: i,
                    ledger: g,
                    found: Some(decode(w, i)).filter(|&(fp, _)| fp < l.data_pages),
                };
                return Err((f, p + 1));
            }
        }
    }
    let header = mem[H_TOTAL];
    if sum != header {
        let f = Failure::LedgerSum {
            ledger: sum,
            header,
        };
        return Err((f, l.data_pages));
    }
    if header != updates {
        return Err((Failure::Total { header, updates }, l.data_pages));
    }
    Ok(l.data_pages)
}

/// What the dirtier leaves in word 0 of page `p` of a `w`-page working set after `total`
/// writes (0 = never written).
pub fn dirtier_expected(p: u64, total: u64, w: u64) -> u64 {
    if total <= p {
        0
    } else {
        // The last k < total with k % w == p, plus one.
        p + (total - 1 - p) / w * w + 1
    }
}

/// Checks a dirtier working set (`ws.len() / WORDS` pages) after `total` writes: `Ok`
/// with the pages checked, or `Err((page, found, expected))` for the first page that
/// does not hold its last write.
pub fn dirtier_check(ws: &[u64], total: u64) -> Result<usize, (usize, u64, u64)> {
    let w = ws.len() / WORDS;
    for p in 0..w {
        let want = dirtier_expected(p as u64, total, w as u64);
        let got = ws[p * WORDS];
        if got != want {
            return Err((p, got, want));
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(pages: usize) -> (Vec<u64>, Layout) {
        // Start from garbage, as guest memory may be.
        let mut m: Vec<u64> = (0..pages * WORDS)
            .map(|i| (i as u64).wrapping_mul(0x1234_5678_9abc_def1))
            .collect();
        let l = init(&mut m);
        (m, l)
    }

    fn page(m: &[u64], l: &Layout, p: usize) -> Vec<u64> {
        m[l.data(p)].to_vec()
    }

    #[test]
    fn layout_fits_and_covers() {
        assert_eq!(Layout::new(0).data_pages, 0);
        assert_eq!(Layout::new(2 * WORDS).data_pages, 0);
        assert_eq!(
            Layout::new(3 * WORDS),
            Layout {
                ledger_pages: 1,
                data_pages: 1
            }
        );
        for pages in 3..3000 {
            let l = Layout::new(pages * WORDS + 7);
            assert!(l.data_pages > 0);
            assert!(l.pages() <= pages, "{pages}: {l:?}");
            assert!(l.ledger_pages * WORDS >= l.data_pages);
            // No room left for another data page.
            let more = l.data_pages + 1;
            assert!(2 + more.div_ceil(WORDS) + l.data_pages > pages, "{pages}");
        }
    }

    #[test]
    fn words_decode_and_differ() {
        assert_eq!(decode(word(17, 5, 300), 300), (17, 5));
        assert_ne!(word(1, 0, 0), word(1, 1, 0));
        assert_ne!(word(1, 0, 0), word(2, 0, 0));
        assert_ne!(word(1, 0, 0), word(1, 0, 1));
    }

    #[test]
    fn updates_keep_the_invariant() {
        let (mut m, l) = region(70);
        assert_eq!(check(&m, &l, 0), Ok(l.data_pages));
        let mut n = 0;
        for k in 0..1000 {
            update(&mut m, &l, (k * 7) % l.data_pages);
            n += 1;
        }
        assert_eq!(check(&m, &l, n), Ok(l.data_pages));
    }

    #[test]
    fn a_stale_data_page_is_detected() {
        let (mut m, l) = region(64);
        update(&mut m, &l, 5);
        let old = page(&m, &l, 5); // generation 1
        update(&mut m, &l, 5);
        update(&mut m, &l, 6);
        // Migration lost page 5's newest version: the destination holds generation 1.
        m[l.data(5)].copy_from_slice(&old);
        let (f, examined) = check(&m, &l, 3).unwrap_err();
        assert_eq!(
            f,
            Failure::Page {
                page: 5,
                word: 0,
                ledger: 2,
                found: Some((5, 1))
            }
        );
        assert_eq!(examined, 6);
    }

    #[test]
    fn a_never_copied_page_is_detected() {
        let (mut m, l) = region(64);
        m[l.data(40)].fill(0);
        assert!(matches!(
            check(&m, &l, 0),
            Err((
                Failure::Page {
                    page: 40,
                    word: 0,
                    ..
                },
                _
            ))
        ));
        // One torn word in the middle of a page.
        let (mut m, l) = region(64);
        m[l.data(3).start + 100] ^= 1;
        assert!(matches!(
            check(&m, &l, 0),
            Err((
                Failure::Page {
                    page: 3,
                    word: 100,
                    ..
                },
                _
            ))
        ));
    }

    #[test]
    fn a_stale_ledger_entry_is_detected() {
        let (mut m, l) = region(64);
        let ledger_before = m[WORDS..2 * WORDS].to_vec();
        update(&mut m, &l, 9);
        // The ledger page went back to before the update; data page 9 and header are new.
        m[WORDS..2 * WORDS].copy_from_slice(&ledger_before);
        assert_eq!(
            check(&m, &l, 1).unwrap_err().0,
            Failure::Page {
                page: 9,
                word: 0,
                ledger: 0,
                found: Some((9, 1))
            }
        );
        // Ledger and data page both stale: the header's total gives it away.
        let (mut m, l) = region(64);
        let ledger_before = m[WORDS..2 * WORDS].to_vec();
        let page_before = page(&m, &l, 9);
        update(&mut m, &l, 9);
        m[WORDS..2 * WORDS].copy_from_slice(&ledger_before);
        m[l.data(9)].copy_from_slice(&page_before);
        assert_eq!(
            check(&m, &l, 1).unwrap_err().0,
            Failure::LedgerSum {
                ledger: 0,
                header: 1
            }
        );
    }

    #[test]
    fn a_stale_header_is_detected() {
        // Header, ledger and data page all stale together: only the guest's own count
        // (kept in registers/stack) still knows.
        let (mut m, l) = region(64);
        let before = m.clone();
        update(&mut m, &l, 3);
        let (f, _) = check(&before, &l, 1).unwrap_err();
        assert_eq!(
            f,
            Failure::Total {
                header: 0,
                updates: 1
            }
        );
        // A header that is not ours at all.
        m[0] = 0;
        assert!(matches!(check(&m, &l, 1), Err((Failure::Header { .. }, 0))));
    }

    #[test]
    fn dirtier_last_writer_wins() {
        let w = 5usize;
        for total in 0..40u64 {
            // Replay the writes.
            let mut ws = vec![0u64; w * WORDS];
            for k in 0..total {
                ws[(k as usize % w) * WORDS] = k + 1;
            }
            assert_eq!(dirtier_check(&ws, total), Ok(w), "total {total}");
            // Losing the newest write to any page is caught.
            if total > 0 {
                let p = ((total - 1) % w as u64) as usize;
                let last = ws[p * WORDS];
                ws[p * WORDS] = last.saturating_sub(w as u64);
                assert_eq!(dirtier_check(&ws, total), Err((p, ws[p * WORDS], last)));
            }
        }
    }
}
