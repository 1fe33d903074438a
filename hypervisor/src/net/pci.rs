//! PCI enumeration through configuration mechanism #1 (ports 0xCF8/0xCFC).
//!
//! Scans bus 0 and, recursively, the secondary bus of every PCI-to-PCI bridge (PCI Local
//! Bus Specification 3.0, section 6.1 for the header, PCI-to-PCI Bridge Architecture 1.2
//! for bus numbers), which is fast under emulators where each port access is an exit.
//! BARs are decoded from their current values, never sized: the hypervisor does not move
//! or probe BARs, it only sets the command register bits a driver needs (memory space,
//! bus mastering). Config-space access sits behind [`ConfigSpace`], so the scan is tested
//! on the host against a fake.

use alloc::vec::Vec;
use core::fmt;

use crate::arch::port;

/// Access to PCI configuration space (32-bit registers, `offset` 4-byte aligned).
pub trait ConfigSpace {
    /// Reads the register at `offset` of `addr`.
    fn read32(&self, addr: PciAddr, offset: u8) -> u32;
    /// Writes the register at `offset` of `addr`.
    fn write32(&self, addr: PciAddr, offset: u8, value: u32);
}

/// Configuration mechanism #1 through I/O ports 0xCF8 (address) and 0xCFC (data).
#[derive(Clone, Copy, Debug, Default)]
pub struct PortConfig;

impl ConfigSpace for PortConfig {
    fn read32(&self, addr: PciAddr, offset: u8) -> u32 {
        port::outl(0xCF8, addr.config_address(offset));
        port::inl(0xCFC)
    }

    fn write32(&self, addr: PciAddr, offset: u8, value: u32) {
        port::outl(0xCF8, addr.config_address(offset));
        port::outl(0xCFC, value);
    }
}

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    /// Bus number.
    pub bus: u8,
    /// Device number (0-31).
    pub dev: u8,
    /// Function number (0-7).
    pub func: u8,
}

impl PciAddr {
    /// The CONFIG_ADDRESS value: enable bit, bus, device, function, register.
    pub fn config_address(&self, offset: u8) -> u32 {
        (1 << 31)
            | u32::from(self.bus) << 16
            | u32::from(self.dev & 0x1f) << 11
            | u32::from(self.func & 7) << 8
            | u32::from(offset & 0xfc)
    }
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// A base address register, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Memory space (32- or 64-bit).
    Mem {
        /// Base address.
        addr: u64,
        /// 64-bit BAR (uses the next slot too).
        wide: bool,
        /// Prefetchable.
        prefetch: bool,
    },
    /// I/O space.
    Io {
        /// Base port.
        port: u32,
    },
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mem {
                addr,
                wide,
                prefetch,
            } => write!(
                f,
                "mem{}{}@{addr:#x}",
                if *wide { "64" } else { "32" },
                if *prefetch { "p" } else { "" }
            ),
            Self::Io { port } => write!(f, "io@{port:#x}"),
        }
    }
}

/// One PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Where it is.
    pub addr: PciAddr,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Header type (without the multi-function bit).
    pub header_type: u8,
    /// Interrupt line (as firmware set it).
    pub irq: u8,
    /// Implemented BARs with their slot index.
    pub bars: Vec<(usize, Bar)>,
}

impl PciDevice {
    /// The first memory BAR, if any.
    pub fn mem_bar(&self, slot: usize) -> Option<u64> {
        self.bars.iter().find_map(|(i, b)| match b {
            Bar::Mem { addr, .. } if *i == slot => Some(*addr),
            _ => None,
        })
    }

    /// A short name for the class.
    pub fn class_name(&self) -> &'static str {
        match (self.class, self.subclass) {
            (0x01, 0x01) => "IDE controller",
            (0x01, _) => "storage",
            (0x02, 0x00) => "Ethernet",
            (0x02, _) => "network",
            (0x03, _) => "display",
            (0x04, _) => "multimedia",
            (0x06, 0x00) => "host bridge",
            (0x06, 0x01) => "ISA bridge",
            (0x06, 0x04) => "PCI bridge",
            (0x06, 0x80) => "bridge",
            (0x06, _) => "bridge",
            (0x0c, 0x03) => "USB",
            (0x0c, _) => "serial bus",
            _ => "other",
        }
    }
}

/// PCI command register bits (offset 0x04).
const CMD_IO: u32 = 1 << 0;
const CMD_MEM: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;

/// Enumerates every function reachable from bus 0.
pub fn enumerate(cs: &impl ConfigSpace) -> Vec<PciDevice> {
    let mut found = Vec::new();
    let mut visited = [false; 256];
    scan_bus(cs, 0, &mut visited, &mut found);
    found.sort_by_key(|d| d.addr);
    found
}

fn scan_bus(cs: &impl ConfigSpace, bus: u8, visited: &mut [bool; 256], out: &mut Vec<PciDevice>) {
    if visited[usize::from(bus)] {
        return;
    }
    visited[usize::from(bus)] = true;
    for dev in 0..32 {
        let f0 = PciAddr { bus, dev, func: 0 };
        if cs.read32(f0, 0) & 0xffff == 0xffff {
            continue;
        }
        let multi = (cs.read32(f0, 0x0c) >> 16) & 0x80 != 0;
        let funcs = if multi { 8 } else { 1 };
        for func in 0..funcs {
            let a = PciAddr { bus, dev, func };
            let Some(d) = read_function(cs, a) else {
                continue;
            };
            let bridge_to = (d.class == 0x06 && d.subclass == 0x04 && d.header_type == 1)
                .then(|| (cs.read32(a, 0x18) >> 8) as u8);
            out.push(d);
            if let Some(secondary) = bridge_to.filter(|&s| s != 0) {
                scan_bus(cs, secondary, visited, out);
            }
        }
    }
}

fn read_function(cs: &impl ConfigSpace, a: PciAddr) -> Option<PciDevice> {
    let id = cs.read32(a, 0);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    let class = cs.read32(a, 0x08);
    let header_type = ((cs.read32(a, 0x0c) >> 16) & 0x7f) as u8;
    let nbars = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    let mut bars = Vec::new();
    let mut i = 0;
    while i < nbars {
        let raw = cs.read32(a, 0x10 + 4 * i as u8);
        if raw & 1 == 1 {
            let port = raw & !3;
            if port != 0 {
                bars.push((i, Bar::Io { port }));
            }
            i += 1;
            continue;
        }
        let wide = (raw >> 1) & 3 == 2 && i + 1 < nbars;
        let mut addr = u64::from(raw & !0xf);
        if wide {
            addr |= u64::from(cs.read32(a, 0x10 + 4 * (i as u8 + 1))) << 32;
        }
        if addr != 0 {
            bars.push((
                i,
                Bar::Mem {
                    addr,
                    wide,
                    prefetch: raw & 8 != 0,
                },
            ));
        }
        i += if wide { 2 } else { 1 };
    }
    Some(PciDevice {
        addr: a,
        vendor,
        device: (id >> 16) as u16,
        class: (class >> 24) as u8,
        subclass: (class >> 16) as u8,
        prog_if: (class >> 8) as u8,
        header_type,
        irq: cs.read32(a, 0x3c) as u8,
        bars,
    })
}

/// Turns on memory decoding and bus mastering (DMA) for `a`, keeping the other command
/// bits. Status bits (upper half) are write-1-to-clear: writing zeros leaves them alone.
pub fn enable_mem_and_dma(cs: &impl ConfigSpace, a: PciAddr) {
    let cmd = cs.read32(a, 0x04) & 0xffff;
    cs.write32(a, 0x04, cmd | CMD_MEM | CMD_BUS_MASTER);
}

/// Whether I/O decoding is on (for the listing).
pub fn command(cs: &impl ConfigSpace, a: PciAddr) -> u16 {
    (cs.read32(a, 0x04) & 0xffff) as u16
}

/// Formats the command bits that matter here.
pub fn command_flags(cmd: u16) -> &'static str {
    let c = u32::from(cmd);
    match (c & CMD_IO != 0, c & CMD_MEM != 0, c & CMD_BUS_MASTER != 0) {
        (_, true, true) => "mem+dma",
        (true, false, _) => "io",
        (_, true, false) => "mem",
        (false, false, true) => "dma",
        (false, false, false) => "off",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake(RefCell<HashMap<(PciAddr, u8), u32>>);

    impl Fake {
        fn set(&self, a: PciAddr, off: u8, v: u32) {
            self.0.borrow_mut().insert((a, off), v);
        }
    }

    impl ConfigSpace for Fake {
        fn read32(&self, a: PciAddr, off: u8) -> u32 {
            let exists = self.0.borrow().contains_key(&(a, 0));
            let default = if off == 0 && !exists { u32::MAX } else { 0 };
            *self.0.borrow().get(&(a, off)).unwrap_or(&default)
        }
        fn write32(&self, a: PciAddr, off: u8, v: u32) {
            self.set(a, off, v);
        }
    }

    fn at(bus: u8, dev: u8, func: u8) -> PciAddr {
        PciAddr { bus, dev, func }
    }

    #[test]
    fn config_address_layout() {
        assert_eq!(at(0, 3, 0).config_address(0x10), 0x8000_1810);
        assert_eq!(at(1, 31, 7).config_address(0x3d), 0x8001_ff3c);
    }

    #[test]
    fn scans_functions_bars_and_bridges() {
        let f = Fake::default();
        // Host bridge 00:00.0.
        f.set(at(0, 0, 0), 0, 0x1237_8086);
        f.set(at(0, 0, 0), 0x08, 0x0600_0002);
        // Multi-function ISA bridge 00:01.0 + IDE 00:01.1 with an I/O BAR.
        f.set(at(0, 1, 0), 0, 0x7000_8086);
        f.set(at(0, 1, 0), 0x08, 0x0601_0000);
        f.set(at(0, 1, 0), 0x0c, 0x0080_0000);
        f.set(at(0, 1, 1), 0, 0x7010_8086);
        f.set(at(0, 1, 1), 0x08, 0x0101_8000);
        f.set(at(0, 1, 1), 0x20, 0xc001);
        // e1000 00:03.0: BAR0 memory, BAR1 I/O, a 64-bit prefetchable BAR2.
        f.set(at(0, 3, 0), 0, 0x100e_8086);
        f.set(at(0, 3, 0), 0x08, 0x0200_0003);
        f.set(at(0, 3, 0), 0x10, 0xc000_0000);
        f.set(at(0, 3, 0), 0x14, 0xc041);
        f.set(at(0, 3, 0), 0x18, 0xe000_000c);
        f.set(at(0, 3, 0), 0x1c, 0x1);
        f.set(at(0, 3, 0), 0x3c, 0x0109);
        // Bridge 00:04.0 to bus 2 with one device.
        f.set(at(0, 4, 0), 0, 0x0001_1b36);
        f.set(at(0, 4, 0), 0x08, 0x0604_0000);
        f.set(at(0, 4, 0), 0x0c, 0x0001_0000);
        f.set(at(0, 4, 0), 0x18, 0x0002_0200);
        f.set(at(2, 0, 0), 0, 0x1234_abcd);
        f.set(at(2, 0, 0), 0x08, 0x0c03_0000);

        let devs = enumerate(&f);
        let addrs: Vec<String> = devs.iter().map(|d| d.addr.to_string()).collect();
        assert_eq!(
            addrs,
            ["00:00.0", "00:01.0", "00:01.1", "00:03.0", "00:04.0", "02:00.0"]
        );
        let e = &devs[3];
        assert_eq!((e.vendor, e.device, e.class, e.irq), (0x8086, 0x100e, 2, 9));
        assert_eq!(e.mem_bar(0), Some(0xc000_0000));
        assert_eq!(e.bars[1], (1, Bar::Io { port: 0xc040 }));
        assert_eq!(
            e.bars[2],
            (
                2,
                Bar::Mem {
                    addr: 0x1_e000_0000,
                    wide: true,
                    prefetch: true
                }
            )
        );
        assert_eq!(e.bars.len(), 3);
        assert_eq!(e.class_name(), "Ethernet");
        assert_eq!(devs[2].bars, vec![(4, Bar::Io { port: 0xc000 })]);
        assert_eq!(devs[5].class_name(), "USB");

        f.set(at(0, 3, 0), 0x04, 0x0290_0001);
        enable_mem_and_dma(&f, at(0, 3, 0));
        assert_eq!(f.read32(at(0, 3, 0), 0x04), 0x7);
        assert_eq!(command_flags(command(&f, at(0, 3, 0))), "mem+dma");
    }

    #[test]
    fn bridge_loops_terminate() {
        let f = Fake::default();
        f.set(at(0, 1, 0), 0, 0x0001_1b36);
        f.set(at(0, 1, 0), 0x08, 0x0604_0000);
        f.set(at(0, 1, 0), 0x0c, 0x0001_0000);
        f.set(at(0, 1, 0), 0x18, 0x0000_0100);
        f.set(at(1, 0, 0), 0, 0x0001_1b36);
        f.set(at(1, 0, 0), 0x08, 0x0604_0000);
        f.set(at(1, 0, 0), 0x0c, 0x0001_0000);
        // Misconfigured: points back at bus 1.
        f.set(at(1, 0, 0), 0x18, 0x0000_0101);
        assert_eq!(enumerate(&f).len(), 2);
    }
}
