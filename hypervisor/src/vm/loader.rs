//! Loading a PV guest: ELF64 parsing and validation, and the guest page tables the
//! hypervisor builds so that the guest starts in long mode (see `guest-abi` for the
//! environment contract). Pure logic over byte and word slices, tested on the host.

use alloc::vec::Vec;

use guest_abi::GUEST_IMAGE_BASE;

/// Guest-physical addresses of the guest page tables (in the reserved first megabyte).
pub const GUEST_PML4: u64 = 0x2000;
/// Guest PDPT.
pub const GUEST_PDPT: u64 = 0x3000;
/// Guest page directory (2 MiB pages covering up to 1 GiB).
pub const GUEST_PD: u64 = 0x4000;
/// Bytes kept for the guest's stack below the top of memory (images must not reach it).
pub const STACK_RESERVE: u64 = 64 * 1024;

/// A segment to copy into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical destination.
    pub paddr: u64,
    /// Offset in the ELF file.
    pub offset: usize,
    /// Bytes to copy from the file.
    pub filesz: usize,
    /// Bytes in memory (the rest is zero).
    pub memsz: usize,
}

/// A validated image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// Entry point.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    /// First page-aligned address past every segment.
    pub end: u64,
}

/// Why an image cannot be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Not an ELF64 little-endian x86-64 executable.
    NotElf64,
    /// A header or segment lies outside the file.
    Truncated,
    /// A segment is below the image base or does not fit in guest memory.
    OutOfRange {
        /// The segment's guest-physical start.
        paddr: u64,
        /// Its size in memory.
        memsz: u64,
    },
    /// The entry point is not inside a loaded segment.
    BadEntry(u64),
    /// No loadable segment.
    Empty,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotElf64 => f.write_str("not an ELF64 x86-64 executable"),
            Self::Truncated => f.write_str("ELF image truncated"),
            Self::OutOfRange { paddr, memsz } => write!(
                f,
                "segment at {paddr:#x} ({memsz} bytes) outside guest memory (images load at {GUEST_IMAGE_BASE:#x}..top-64K)"
            ),
            Self::BadEntry(e) => write!(f, "entry point {e:#x} not in a loaded segment"),
            Self::Empty => f.write_str("no loadable segments"),
        }
    }
}

fn rd<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], LoadError> {
    b.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(LoadError::Truncated)
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, LoadError> {
    rd::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, LoadError> {
    rd::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, LoadError> {
    rd::<8>(b, off).map(u64::from_le_bytes)
}

/// Parses and validates `file` for a guest with `mem_bytes` of memory.
pub fn parse_elf(file: &[u8], mem_bytes: u64) -> Result<ElfImage, LoadError> {
    if file.get(0..4) != Some(b"\x7fELF") || file.get(4) != Some(&2) || file.get(5) != Some(&1) {
        return Err(LoadError::NotElf64);
    }
    if u16_at(file, 16)? != 2 || u16_at(file, 18)? != 62 {
        return Err(LoadError::NotElf64);
    }
    let entry = u64_at(file, 24)?;
    let phoff = u64_at(file, 32)? as usize;
    let phentsize = u16_at(file, 54)? as usize;
    let phnum = u16_at(file, 56)? as usize;
    if phentsize < 56 {
        return Err(LoadError::NotElf64);
    }
    let limit = mem_bytes.saturating_sub(STACK_RESERVE);
    let mut segments = Vec::new();
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(LoadError::Truncated)?;
        if u32_at(file, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(file, ph + 8)?;
        let paddr = u64_at(file, ph + 24)?;
        let filesz = u64_at(file, ph + 32)?;
        let memsz = u64_at(file, ph + 40)?;
        if filesz > memsz
            || offset
                .checked_add(filesz)
                .is_none_or(|e| e > file.len() as u64)
        {
            return Err(LoadError::Truncated);
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or(LoadError::OutOfRange { paddr, memsz })?;
        if paddr < GUEST_IMAGE_BASE || seg_end > limit {
            return Err(LoadError::OutOfRange { paddr, memsz });
        }
        end = end.max(seg_end);
        segments.push(Segment {
            paddr,
            offset: offset as usize,
            filesz: filesz as usize,
            memsz: memsz as usize,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::Empty);
    }
    if !segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz as u64)
    {
        return Err(LoadError::BadEntry(entry));
    }
    Ok(ElfImage {
        entry,
        segments,
        end: end.div_ceil(4096) * 4096,
    })
}

/// Copies the segments of `image` from `file` into guest memory `mem` (zeroed before).
pub fn load(image: &ElfImage, file: &[u8], mem: &mut [u8]) {
    for s in &image.segments {
        let dst = s.paddr as usize;
        mem[dst..dst + s.filesz].copy_from_slice(&file[s.offset..s.offset + s.filesz]);
        mem[dst + s.filesz..dst + s.memsz].fill(0);
    }
}

/// Builds identity-mapping guest page tables for `mem_bytes` (at most 1 GiB) with 2 MiB
/// pages, in guest memory viewed as words.
pub fn build_guest_page_tables(mem: &mut [u64], mem_bytes: u64) {
    const P: u64 = 1;
    const RW: u64 = 2;
    const PS: u64 = 1 << 7;
    let w = |gpa: u64| (gpa / 8) as usize;
    mem[w(GUEST_PML4)] = GUEST_PDPT | P | RW;
    mem[w(GUEST_PDPT)] = GUEST_PD | P | RW;
    let large_pages = mem_bytes.div_ceil(2 << 20).min(512);
    for i in 0..large_pages {
        mem[w(GUEST_PD) + i as usize] = (i << 21) | P | RW | PS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD at `paddr`.
    fn elf(paddr: u64, entry: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 + filesz as usize];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        for (i, b) in f[0x1000..].iter_mut().enumerate() {
            *b = i as u8 | 1;
        }
        f
    }

    #[test]
    fn loads_a_valid_image() {
        let f = elf(0x10_0000, 0x10_0010, 100, 8192);
        let img = parse_elf(&f, 4 << 20).unwrap();
        assert_eq!(img.entry, 0x10_0010);
        assert_eq!(img.end, 0x10_2000);
        let mut mem = vec![0xAAu8; 4 << 20];
        load(&img, &f, &mut mem);
        assert_eq!(mem[0x10_0000], 1);
        assert_eq!(mem[0x10_0000 + 99], 99 | 1);
        assert_eq!(mem[0x10_0000 + 100], 0, "bss zeroed");
        assert_eq!(mem[0x10_0000 + 8191], 0);
    }

    #[test]
    fn rejects_bad_images() {
        assert_eq!(parse_elf(b"MZ", 1 << 20), Err(LoadError::NotElf64));
        let f = elf(0x1000, 0x1000, 10, 10);
        assert!(matches!(
            parse_elf(&f, 4 << 20),
            Err(LoadError::OutOfRange { .. })
        ));
        let f = elf(0x10_0000, 0x10_0000, 10, 4 << 20);
        assert!(matches!(
            parse_elf(&f, 4 << 20),
            Err(LoadError::OutOfRange { .. })
        ));
        let f = elf(0x10_0000, 0x50_0000, 10, 10);
        assert_eq!(parse_elf(&f, 4 << 20), Err(LoadError::BadEntry(0x50_0000)));
        let f = elf(0x10_0000, 0x10_0000, 10, 10);
        for cut in 0..f.len().min(0x1000 + 10) {
            assert!(parse_elf(&f[..cut], 4 << 20).is_err(), "truncated at {cut}");
        }
        let mut f = elf(0x10_0000, 0x10_0000, 10, 5);
        assert_eq!(parse_elf(&f, 4 << 20), Err(LoadError::Truncated));
        f[18] = 3;
        assert_eq!(parse_elf(&f, 4 << 20), Err(LoadError::NotElf64));
    }

    #[test]
    fn guest_page_tables_identity_map() {
        let mut mem = vec![0u64; (8 << 20) / 8];
        build_guest_page_tables(&mut mem, 5 << 20);
        assert_eq!(mem[(GUEST_PML4 / 8) as usize], GUEST_PDPT | 3);
        assert_eq!(mem[(GUEST_PDPT / 8) as usize], GUEST_PD | 3);
        let pd = (GUEST_PD / 8) as usize;
        assert_eq!(mem[pd], 0x83);
        assert_eq!(mem[pd + 2], (2 << 21) | 0x83);
        assert_eq!(mem[pd + 3], 0, "only 3 large pages for 5 MiB");
    }
}
