//! Extended page tables (SDM Vol. 3C §29.3) for one guest, with 4 KiB leaves so that
//! dirty tracking works per page: the EPT bits ([`EPT`]) of the vendor-neutral tables
//! in [`crate::vm::nested`] (layout and logic live there), and the EPT pointer.
//!
//! Leaf entry (4 KiB page, Table 29-6):
//! ```text
//!  63      52 51            12 11 10  9   8   7  6  5..3  2 1 0
//!  [ignored ][ host phys addr][   ][D ][A ][ ][IPAT][MT][X W R]
//! ```

/// Read access.
pub const R: u64 = 1 << 0;
/// Write access.
pub const W: u64 = 1 << 1;
/// Execute access (supervisor).
pub const X: u64 = 1 << 2;
/// Memory type write-back in a leaf.
pub const MT_WB: u64 = 6 << 3;
use crate::vm::nested::{self, Format, Gpa, Hpa};

/// Accessed flag (needs A/D enabled in the EPTP).
pub const ACCESSED: u64 = 1 << 8;
/// Dirty flag (needs A/D enabled in the EPTP).
pub const DIRTY: u64 = 1 << 9;
/// Address bits of an entry.
pub const ADDR_MASK: u64 = nested::ADDR_MASK;

/// Largest guest memory one PD covers (1 GiB); guests are kept below it.
pub const MAX_GUEST_PAGES: usize = nested::MAX_GUEST_PAGES;

/// The EPT flavour of the vendor-neutral nested tables: non-leaf entries R|W|X, leaves
/// R|W|X write-back; "present" is any of R, W, X.
pub const EPT: Format = Format {
    table: R | W | X,
    leaf: R | W | X | MT_WB,
    present: R | W | X,
    read: R,
    write: W,
    accessed: ACCESSED,
    dirty: DIRTY,
};

pub use nested::{leaf_index, leaves_mut, table_pages};

/// Builds EPT tables (see [`Format::build`]).
pub fn build(words: &mut [u64], table_base: u64, mem_base: u64, guest_pages: usize) {
    EPT.build(words, Hpa(table_base), Hpa(mem_base), guest_pages)
}

/// The EPT pointer for tables at `table_base`: write-back, 4-level walk, and the
/// accessed/dirty enable bit 6 when `ad`.
pub fn eptp(table_base: u64, ad: bool) -> u64 {
    table_base | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
}

/// Translates a guest-physical address through the tables (for tests and sanity checks).
pub fn translate(words: &[u64], table_base: u64, gpa: u64) -> Option<u64> {
    EPT.translate(words, Hpa(table_base), Gpa(gpa)).map(|h| h.0)
}

/// See [`Format::take_dirty_flags`].
pub fn take_dirty_flags(leaves: &mut [u64], f: impl FnMut(usize)) {
    EPT.take_dirty_flags(leaves, f)
}

/// See [`Format::write_protect_all`].
pub fn write_protect_all(leaves: &mut [u64]) {
    EPT.write_protect_all(leaves)
}

/// See [`Format::write_enable_all`].
pub fn write_enable_all(leaves: &mut [u64]) {
    EPT.write_enable_all(leaves)
}

/// See [`Format::unprotect`].
pub fn unprotect(leaves: &mut [u64], pfn: usize) -> bool {
    EPT.unprotect(leaves, pfn)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TB: u64 = 0x80_0000;
    const MB: u64 = 0x100_0000;

    fn tables(pages: usize) -> Vec<u64> {
        let mut w = vec![0u64; table_pages(pages) * 512];
        build(&mut w, TB, MB, pages);
        w
    }

    #[test]
    fn maps_every_page_and_nothing_else() {
        let pages = 1000;
        let w = tables(pages);
        for p in [0usize, 1, 511, 512, 999] {
            let gpa = (p as u64) * 4096 + 0x123;
            assert_eq!(translate(&w, TB, gpa), Some(MB + p as u64 * 4096 + 0x123));
        }
        assert_eq!(translate(&w, TB, 1000 * 4096), None);
        assert_eq!(translate(&w, TB, 1 << 30), None);
        assert_eq!(translate(&w, TB, 1 << 39), None);
        assert_eq!(table_pages(pages), 5);
    }

    #[test]
    fn leaves_are_write_back_rwx() {
        let mut w = tables(4);
        let l = leaves_mut(&mut w, 4);
        assert_eq!(l.len(), 4);
        for e in l.iter() {
            assert_eq!(e & 0x3F, R | W | X | MT_WB);
        }
        assert_eq!(eptp(TB, true), TB | 0x5E);
        assert_eq!(eptp(TB, false), TB | 0x1E);
    }

    #[test]
    fn dirty_flags_are_taken_once() {
        let mut w = tables(64);
        let l = leaves_mut(&mut w, 64);
        l[3] |= DIRTY | ACCESSED;
        l[40] |= DIRTY;
        l[41] |= ACCESSED;
        let mut got = vec![];
        take_dirty_flags(l, |p| got.push(p));
        assert_eq!(got, vec![3, 40]);
        got.clear();
        take_dirty_flags(l, |p| got.push(p));
        assert!(got.is_empty());
        assert_eq!(
            l[41] & ACCESSED,
            ACCESSED,
            "non-dirty leaves keep their A flag"
        );
    }

    #[test]
    fn write_protection_round_trip() {
        let mut w = tables(16);
        let l = leaves_mut(&mut w, 16);
        write_protect_all(l);
        assert!(l.iter().all(|e| e & W == 0 && e & R != 0));
        assert!(unprotect(l, 5));
        assert!(!unprotect(l, 5), "second write is not a tracking fault");
        assert!(!unprotect(l, 16), "outside the guest");
        write_enable_all(l);
        assert!(l.iter().all(|e| e & W != 0));
    }
}
