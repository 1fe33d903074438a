//! Multiboot2 boot information parser (Multiboot2 specification §3.6).
//!
//! Works over a byte slice so it is tested on the host; the kernel passes the
//! boot-reserved view of the information block. Only the tags the hypervisor uses are
//! decoded: command line, modules (guest images), memory map and the ACPI RSDP copy.

use core::str;

/// Magic value GRUB leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

/// A region from the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical start.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Multiboot2 type: 1 = available RAM, 3 = ACPI reclaimable, others reserved.
    pub kind: u32,
}

/// A module loaded by GRUB (`module2 <file> <string>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    /// Physical start.
    pub start: u64,
    /// Physical end (exclusive).
    pub end: u64,
    /// The string after the file name (the guest image name).
    pub name: &'a str,
}

/// Errors in the information block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not booted by a Multiboot2 loader.
    BadMagic(u32),
    /// The block or a tag is truncated or misaligned.
    Malformed,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "not booted by Multiboot2 (magic {m:#x})"),
            Self::Malformed => f.write_str("malformed Multiboot2 information"),
        }
    }
}

/// A parsed view of the information block.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo<'a> {
    bytes: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
fn cstr(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    str::from_utf8(&b[..end]).unwrap_or("")
}

/// Reads the total size field of the block at the start of `header` (8 bytes).
pub fn total_size(header: &[u8]) -> Option<usize> {
    u32_at(header, 0).map(|s| s as usize)
}

impl<'a> BootInfo<'a> {
    /// Checks the magic and the block's framing.
    pub fn parse(magic: u32, bytes: &'a [u8]) -> Result<Self, Error> {
        if magic != BOOTLOADER_MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let total = total_size(bytes).ok_or(Error::Malformed)?;
        if total < 8 || total > bytes.len() {
            return Err(Error::Malformed);
        }
        let info = Self {
            bytes: &bytes[..total],
        };
        // Walk once to validate every tag's framing.
        let mut ok = false;
        for tag in info.tags() {
            match tag {
                Some((0, _)) => ok = true,
                Some(_) => {}
                None => return Err(Error::Malformed),
            }
        }
        if ok {
            Ok(info)
        } else {
            Err(Error::Malformed)
        }
    }

    /// Size of the block in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the block is empty (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Iterates over (type, payload-with-header) tags; `None` marks a framing error.
    fn tags(&self) -> impl Iterator<Item = Option<(u32, &'a [u8])>> + 'a {
        let bytes = self.bytes;
        let mut off = 8usize;
        let mut done = false;
        core::iter::from_fn(move || {
            if done {
                return None;
            }
            let (Some(kind), Some(size)) = (u32_at(bytes, off), u32_at(bytes, off + 4)) else {
                done = true;
                return Some(None);
            };
            let size = size as usize;
            if size < 8 || off + size > bytes.len() {
                done = true;
                return Some(None);
            }
            let tag = &bytes[off..off + size];
            if kind == 0 {
                done = true;
            }
            off += size.div_ceil(8) * 8;
            Some(Some((kind, tag)))
        })
    }

    fn find(&self, kind: u32) -> Option<&'a [u8]> {
        self.tags()
            .flatten()
            .find(|(k, _)| *k == kind)
            .map(|(_, t)| t)
    }

    /// The kernel command line from GRUB.
    pub fn command_line(&self) -> &'a str {
        self.find(1).map(|t| cstr(&t[8..])).unwrap_or("")
    }

    /// The memory map.
    pub fn memory_map(&self) -> impl Iterator<Item = MemoryRegion> + 'a {
        let tag = self.find(6).unwrap_or(&[]);
        let entry_size = u32_at(tag, 8).unwrap_or(24).max(24) as usize;
        let entries = tag.get(16..).unwrap_or(&[]);
        entries.chunks_exact(entry_size).map(|e| MemoryRegion {
            base: u64_at(e, 0).unwrap_or(0),
            len: u64_at(e, 8).unwrap_or(0),
            kind: u32_at(e, 16).unwrap_or(0),
        })
    }

    /// Modules loaded by GRUB.
    pub fn modules(&self) -> impl Iterator<Item = Module<'a>> + 'a {
        self.tags()
            .flatten()
            .filter(|(k, _)| *k == 3)
            .filter_map(|(_, t)| {
                Some(Module {
                    start: u64::from(u32_at(t, 8)?),
                    end: u64::from(u32_at(t, 12)?),
                    name: cstr(t.get(16..)?),
                })
            })
    }

    /// Offset within the block of the RSDP copy (new RSDP preferred over old).
    pub fn rsdp_offset(&self) -> Option<usize> {
        let base = self.bytes.as_ptr() as usize;
        self.find(15)
            .or_else(|| self.find(14))
            .map(|t| t.as_ptr() as usize + 8 - base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&kind.to_le_bytes());
        t.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
        t.extend_from_slice(payload);
        while t.len() % 8 != 0 {
            t.push(0);
        }
        t
    }

    fn block(tags: &[Vec<u8>]) -> Vec<u8> {
        let mut body: Vec<u8> = tags.concat();
        body.extend(tag(0, &[]));
        let mut b = Vec::new();
        b.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend(body);
        b
    }

    #[test]
    fn parses_cmdline_modules_and_mmap() {
        let mut mmap = Vec::new();
        mmap.extend_from_slice(&24u32.to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
        for (base, len, kind) in [
            (0u64, 0x9f000u64, 1u32),
            (0x10_0000, 0x700_0000, 1),
            (0xfffc_0000, 0x4_0000, 2),
        ] {
            mmap.extend_from_slice(&base.to_le_bytes());
            mmap.extend_from_slice(&len.to_le_bytes());
            mmap.extend_from_slice(&kind.to_le_bytes());
            mmap.extend_from_slice(&0u32.to_le_bytes());
        }
        let mut module = Vec::new();
        module.extend_from_slice(&0x20_0000u32.to_le_bytes());
        module.extend_from_slice(&0x20_3000u32.to_le_bytes());
        module.extend_from_slice(b"counter\0");
        let b = block(&[tag(1, b"ip=10.0.0.1/24\0"), tag(6, &mmap), tag(3, &module)]);
        let info = BootInfo::parse(BOOTLOADER_MAGIC, &b).unwrap();
        assert_eq!(info.command_line(), "ip=10.0.0.1/24");
        let regions: Vec<_> = info.memory_map().collect();
        assert_eq!(regions.len(), 3);
        assert_eq!(
            regions[1],
            MemoryRegion {
                base: 0x10_0000,
                len: 0x700_0000,
                kind: 1
            }
        );
        let mods: Vec<_> = info.modules().collect();
        assert_eq!(
            mods,
            vec![Module {
                start: 0x20_0000,
                end: 0x20_3000,
                name: "counter"
            }]
        );
        assert_eq!(info.rsdp_offset(), None);
    }

    #[test]
    fn rejects_bad_magic_and_truncation() {
        let b = block(&[tag(1, b"x\0")]);
        assert_eq!(
            BootInfo::parse(0x1234, &b).unwrap_err(),
            Error::BadMagic(0x1234)
        );
        for cut in 0..b.len() {
            let mut t = b[..cut].to_vec();
            if t.len() >= 4 {
                t[..4].copy_from_slice(&(cut as u32).to_le_bytes());
            }
            assert!(
                BootInfo::parse(BOOTLOADER_MAGIC, &t).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = b.clone();
        bad[12..16].copy_from_slice(&4u32.to_le_bytes()); // tag size < 8
        assert_eq!(
            BootInfo::parse(BOOTLOADER_MAGIC, &bad).unwrap_err(),
            Error::Malformed
        );
    }
}
