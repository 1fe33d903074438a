//! Nested page tables of one guest, vendor-neutral: Intel EPT (SDM Vol. 3C §29.3) and
//! AMD NPT (APM Vol. 2 §15.25, ordinary long-mode page tables walked with the guest-
//! physical address) differ only in their bits, which a [`Format`] names. Pure logic
//! over the table words: the kernel passes the words of a
//! [`PhysPages`](crate::mm::phys::PhysPages) block, the host tests a `Vec`.
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

/// A guest-physical address: what the guest's own page tables produce and the nested
/// tables translate. Never mixed with an [`Hpa`]: converting one into the other is the
/// nested tables' job ([`Format::translate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The guest page frame number.
    pub fn pfn(self) -> usize {
        (self.0 / 4096) as usize
    }
}

/// A host-physical address: where the nested tables and the guest's frames really are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hpa(pub u64);

/// The bits of one nested-paging flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// Bits of a non-leaf entry (besides the address).
    pub table: u64,
    /// Bits of a mapped leaf (besides the address).
    pub leaf: u64,
    /// Bits whose absence makes an entry not present (all cleared by [`unmap`]).
    pub present: u64,
    /// Bit a read needs (EPT R, NPT P).
    pub read: u64,
    /// Write permission.
    pub write: u64,
    /// Accessed flag.
    pub accessed: u64,
    /// Dirty flag.
    pub dirty: u64,
}

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

impl Format {
    /// Builds the tables in `words` (at `table_base`) mapping guest frames
    /// `0..guest_pages` to host frames at `mem_base` (contiguous).
    pub fn build(&self, words: &mut [u64], table_base: Hpa, mem_base: Hpa, guest_pages: usize) {
        assert!(guest_pages <= MAX_GUEST_PAGES && words.len() >= table_pages(guest_pages) * 512);
        let (table_base, mem_base) = (table_base.0, mem_base.0);
        words.fill(0);
        let page = |i: usize| table_base + (i as u64) * 4096;
        words[0] = page(1) | self.table;
        words[512] = page(2) | self.table;
        for pt in 0..guest_pages.div_ceil(512) {
            words[2 * 512 + pt] = page(3 + pt) | self.table;
        }
        for p in 0..guest_pages {
            words[leaf_index(p)] = (mem_base + (p as u64) * 4096) | self.leaf;
        }
    }

    /// Translates a guest-physical address through the tables (at `table_base`).
    pub fn translate(&self, words: &[u64], table_base: Hpa, gpa: Gpa) -> Option<Hpa> {
        let (table_base, gpa) = (table_base.0, gpa.0);
        let idx = |level: u32| ((gpa >> (12 + 9 * level)) & 511) as usize;
        let mut table = 0usize;
        for level in (1..4).rev() {
            let e = *words.get(table * 512 + idx(level))?;
            if e & self.present == 0 {
                return None;
            }
            table = (((e & ADDR_MASK).checked_sub(table_base)?) / 4096) as usize;
        }
        let e = *words.get(table * 512 + idx(0))?;
        (e & self.read != 0).then_some(Hpa((e & ADDR_MASK) | (gpa & 0xFFF)))
    }

    /// A/D tracking: calls `f(pfn)` for every leaf whose dirty flag is set and clears
    /// the flag (and the accessed flag). The caller must flush translations afterwards.
    pub fn take_dirty_flags(&self, leaves: &mut [u64], mut f: impl FnMut(usize)) {
        for (pfn, e) in leaves.iter_mut().enumerate() {
            if *e & self.dirty != 0 {
                *e &= !(self.dirty | self.accessed);
                f(pfn);
            }
        }
    }

    /// Whether the leaf of `pfn` has its dirty flag set.
    pub fn is_dirty(&self, leaves: &[u64], pfn: usize) -> bool {
        leaves.get(pfn).is_some_and(|e| e & self.dirty != 0)
    }

    /// Clears the dirty (and accessed) flag of one leaf.
    pub fn clear_dirty(&self, leaves: &mut [u64], pfn: usize) {
        if let Some(e) = leaves.get_mut(pfn) {
            *e &= !(self.dirty | self.accessed);
        }
    }

    /// Write-protection tracking: removes write permission from every leaf.
    pub fn write_protect_all(&self, leaves: &mut [u64]) {
        for e in leaves.iter_mut() {
            *e &= !self.write;
        }
    }

    /// Removes write permission from one leaf.
    pub fn write_protect(&self, leaves: &mut [u64], pfn: usize) {
        if let Some(e) = leaves.get_mut(pfn) {
            *e &= !self.write;
        }
    }

    /// Restores write permission of every leaf (tracking off).
    pub fn write_enable_all(&self, leaves: &mut [u64]) {
        for e in leaves.iter_mut() {
            *e |= self.write;
        }
    }

    /// Post-copy: makes page `pfn` not present, keeping the address for [`Self::map`].
    pub fn unmap(&self, leaves: &mut [u64], pfn: usize) {
        if let Some(e) = leaves.get_mut(pfn) {
            *e &= !(self.present | self.write | self.accessed | self.dirty);
        }
    }

    /// Post-copy: makes page `pfn` present again with full access.
    pub fn map(&self, leaves: &mut [u64], pfn: usize) {
        if let Some(e) = leaves.get_mut(pfn) {
            *e |= self.leaf & (self.present | self.write | self.read);
        }
    }

    /// Handles a write to a write-protected page: restores write permission and
    /// reports whether `pfn` was a present, write-protected page of this guest.
    pub fn unprotect(&self, leaves: &mut [u64], pfn: usize) -> bool {
        match leaves.get_mut(pfn) {
            Some(e) if *e & self.read != 0 && *e & self.write == 0 => {
                *e |= self.write;
                true
            }
            _ => false,
        }
    }
}

/// The leaves of all guest pages, in guest frame order.
pub fn leaves_mut(words: &mut [u64], guest_pages: usize) -> &mut [u64] {
    &mut words[leaf_index(0)..leaf_index(guest_pages)]
}

/// The leaves of all guest pages, in guest frame order.
pub fn leaves(words: &[u64], guest_pages: usize) -> &[u64] {
    &words[leaf_index(0)..leaf_index(guest_pages)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svm::npt::NPT;
    use crate::vmx::ept::EPT;

    const TB: u64 = 0x80_0000;
    const MB: u64 = 0x100_0000;

    fn tables(f: &Format, pages: usize) -> Vec<u64> {
        let mut w = vec![0u64; table_pages(pages) * 512];
        f.build(&mut w, Hpa(TB), Hpa(MB), pages);
        w
    }

    #[test]
    fn both_formats_map_every_page_and_nothing_else() {
        for f in [EPT, NPT] {
            let pages = 1000;
            let w = tables(&f, pages);
            for p in [0usize, 1, 511, 512, 999] {
                let gpa = (p as u64) * 4096 + 0x123;
                assert_eq!(
                    f.translate(&w, Hpa(TB), Gpa(gpa)),
                    Some(Hpa(MB + p as u64 * 4096 + 0x123))
                );
            }
            for gpa in [1000 * 4096, 1 << 30, 1 << 39] {
                assert_eq!(f.translate(&w, Hpa(TB), Gpa(gpa)), None);
            }
        }
    }

    #[test]
    fn npt_entries_are_user_writable_present() {
        let w = tables(&NPT, 4);
        assert_eq!(w[0] & 0xFFF, 0x7, "PML4E: P | RW | US");
        assert_eq!(
            w[leaf_index(3)] & 0xFFF,
            0x7,
            "leaf: P | RW | US, PAT 0 (WB)"
        );
        assert_eq!(w[leaf_index(3)] & ADDR_MASK, MB + 3 * 4096);
    }

    #[test]
    fn npt_dirty_flags_and_write_protection() {
        let mut w = tables(&NPT, 64);
        let l = leaves_mut(&mut w, 64);
        l[3] |= 0x60; // A | D
        l[40] |= 0x40;
        l[41] |= 0x20;
        let mut got = vec![];
        NPT.take_dirty_flags(l, |p| got.push(p));
        assert_eq!(got, vec![3, 40]);
        assert_eq!(l[41] & 0x20, 0x20);
        NPT.write_protect_all(l);
        assert!(l.iter().all(|e| e & 2 == 0 && e & 1 != 0));
        assert!(NPT.unprotect(l, 5));
        assert!(!NPT.unprotect(l, 5));
        NPT.unmap(l, 7);
        assert_eq!(l[7] & 1, 0);
        assert!(
            !NPT.unprotect(l, 7),
            "a page not here is not a tracking fault"
        );
        NPT.map(l, 7);
        assert_eq!(l[7] & 0x7, 0x7);
    }
}
