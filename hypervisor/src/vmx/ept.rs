//! Extended page tables (SDM Vol. 3C §29.3) for one guest, with 4 KiB leaves so that
//! dirty tracking works per page. Pure logic over the table words: the kernel passes the
//! words of a [`PhysPages`](crate::mm::phys::PhysPages) block, the host tests a `Vec`.
//!
//! All tables live in one physically contiguous block, which makes the layout
//! arithmetic instead of pointer chasing:
//!
//! ```text
//!  page 0      PML4   (entry 0 -> PDPT)
//!  page 1      PDPT   (entry 0 -> PD)
//!  page 2      PD     (entry i -> PT i)
//!  page 3+i    PT i   (entry j -> guest page 512*i + j)
//! ```
//!
//! So the leaf of guest frame `p` is word `3*512 + p` and the leaves of all guest pages
//! are one contiguous slice ([`leaves_mut`]): dirty scans walk it linearly.
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
/// Accessed flag (needs A/D enabled in the EPTP).
pub const ACCESSED: u64 = 1 << 8;
/// Dirty flag (needs A/D enabled in the EPTP).
pub const DIRTY: u64 = 1 << 9;
/// Address bits of an entry.
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Largest guest memory one PD covers (1 GiB); guests are kept below it.
pub const MAX_GUEST_PAGES: usize = 512 * 512;

/// Table pages needed for `guest_pages` pages of guest memory.
pub fn table_pages(guest_pages: usize) -> usize {
    3 + guest_pages.div_ceil(512)
}

/// Index of the leaf for guest frame `pfn` in the table words.
pub fn leaf_index(pfn: usize) -> usize {
    3 * 512 + pfn
}

/// Builds the tables in `words` (at physical `table_base`) mapping guest frames
/// `0..guest_pages` to host frames at `mem_base` (contiguous), read/write/execute,
/// write-back.
pub fn build(words: &mut [u64], table_base: u64, mem_base: u64, guest_pages: usize) {
    assert!(guest_pages <= MAX_GUEST_PAGES && words.len() >= table_pages(guest_pages) * 512);
    words.fill(0);
    let page = |i: usize| table_base + (i as u64) * 4096;
    words[0] = page(1) | R | W | X;
    words[512] = page(2) | R | W | X;
    for pt in 0..guest_pages.div_ceil(512) {
        words[2 * 512 + pt] = page(3 + pt) | R | W | X;
    }
    for p in 0..guest_pages {
        words[leaf_index(p)] = (mem_base + (p as u64) * 4096) | R | W | X | MT_WB;
    }
}

/// The leaves of all guest pages, in guest frame order.
pub fn leaves_mut(words: &mut [u64], guest_pages: usize) -> &mut [u64] {
    &mut words[leaf_index(0)..leaf_index(guest_pages)]
}

/// The EPT pointer for tables at `table_base`: write-back, 4-level walk, and the
/// accessed/dirty enable bit 6 when `ad`.
pub fn eptp(table_base: u64, ad: bool) -> u64 {
    table_base | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
}

/// Translates a guest-physical address through the tables (for tests and sanity checks).
pub fn translate(words: &[u64], table_base: u64, gpa: u64) -> Option<u64> {
    let idx = |level: u32| ((gpa >> (12 + 9 * level)) & 511) as usize;
    let mut table = 0usize;
    for level in (1..4).rev() {
        let e = *words.get(table * 512 + idx(level))?;
        if e & (R | W | X) == 0 {
            return None;
        }
        table = (((e & ADDR_MASK) - table_base) / 4096) as usize;
    }
    let e = *words.get(table * 512 + idx(0))?;
    (e & R != 0).then_some((e & ADDR_MASK) | (gpa & 0xFFF))
}

/// A-D tracking: calls `f(pfn)` for every leaf whose dirty flag is set and clears the
/// flag (and the accessed flag). The caller must INVEPT afterwards.
pub fn take_dirty_flags(leaves: &mut [u64], mut f: impl FnMut(usize)) {
    for (pfn, e) in leaves.iter_mut().enumerate() {
        if *e & DIRTY != 0 {
            *e &= !(DIRTY | ACCESSED);
            f(pfn);
        }
    }
}

/// Clears the dirty (and accessed) flag of one leaf, so PML logs its next write.
pub fn clear_dirty(leaves: &mut [u64], pfn: usize) {
    if let Some(e) = leaves.get_mut(pfn) {
        *e &= !(DIRTY | ACCESSED);
    }
}

/// Write-protection tracking: removes write permission from every leaf. The caller must
/// INVEPT afterwards.
pub fn write_protect_all(leaves: &mut [u64]) {
    for e in leaves.iter_mut() {
        *e &= !W;
    }
}

/// Restores write permission of every leaf (tracking off).
pub fn write_enable_all(leaves: &mut [u64]) {
    for e in leaves.iter_mut() {
        *e |= W;
    }
}

/// Post-copy: makes page `pfn` not present (its contents have not arrived), keeping
/// the address so [`map`] can restore it.
pub fn unmap(leaves: &mut [u64], pfn: usize) {
    if let Some(e) = leaves.get_mut(pfn) {
        *e &= !(R | W | X | ACCESSED | DIRTY);
    }
}

/// Post-copy: makes page `pfn` present again (read/write/execute).
pub fn map(leaves: &mut [u64], pfn: usize) {
    if let Some(e) = leaves.get_mut(pfn) {
        *e |= R | W | X;
    }
}

/// Handles a write to a write-protected page: restores write permission and reports
/// whether `pfn` was a write-protected page of this guest (else the violation is the
/// guest's fault).
pub fn unprotect(leaves: &mut [u64], pfn: usize) -> bool {
    match leaves.get_mut(pfn) {
        Some(e) if *e & R != 0 && *e & W == 0 => {
            *e |= W;
            true
        }
        _ => false,
    }
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
