//! Driver for the Intel 82540EM Gigabit Ethernet controller ("e1000"), as QEMU and Bochs
//! emulate it: polled operation (no interrupts), one legacy receive and one legacy
//! transmit descriptor ring, 2048-byte buffers, MTU 1500.
//!
//! Follows the PCI/PCI-X Family of Gigabit Ethernet Controllers Software Developer's
//! Manual (Intel 317453): section 14 (general initialisation and reset), 13 (register
//! descriptions), 3.2 (receive) and 3.3 (transmit). Descriptor layouts and ring index
//! logic are in [`super::ring`].
//!
//! The driver is generic over [`Regs`] (register access) and [`DmaMemory`] (memory the
//! device reads and writes by DMA), so the whole driver, not just its arithmetic, runs on
//! the host against a fake device in the tests below. On the machine these are
//! [`crate::arch::mmio::Mmio`] and [`crate::mm::phys::PhysPages`].
//!
//! Nothing here panics on a misbehaving device: impossible register values end in an
//! [`E1000Error`] at setup, and bad descriptors are counted and recycled.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::ring::{
    self, rx_verdict, tx_done, tx_word, Ring, RxCursor, RxDesc, RxVerdict, TxCursor, DESC_SIZE,
    MAX_FRAME,
};
use crate::arch::mmio::{self, Mmio};
use crate::mm::phys::PhysPages;

/// Register offsets (SDM table 13-2).
pub mod reg {
    /// Device control.
    pub const CTRL: u32 = 0x0000;
    /// Device status.
    pub const STATUS: u32 = 0x0008;
    /// EEPROM read.
    pub const EERD: u32 = 0x0014;
    /// Interrupt cause read (clear on read).
    pub const ICR: u32 = 0x00c0;
    /// Interrupt mask clear.
    pub const IMC: u32 = 0x00d8;
    /// Receive control.
    pub const RCTL: u32 = 0x0100;
    /// Transmit control.
    pub const TCTL: u32 = 0x0400;
    /// Transmit inter-packet gap.
    pub const TIPG: u32 = 0x0410;
    /// Receive descriptor base low/high, length, head, tail, delay timer.
    pub const RDBAL: u32 = 0x2800;
    /// See [`RDBAL`].
    pub const RDBAH: u32 = 0x2804;
    /// See [`RDBAL`].
    pub const RDLEN: u32 = 0x2808;
    /// See [`RDBAL`].
    pub const RDH: u32 = 0x2810;
    /// See [`RDBAL`].
    pub const RDT: u32 = 0x2818;
    /// See [`RDBAL`].
    pub const RDTR: u32 = 0x2820;
    /// Transmit descriptor base low/high, length, head, tail.
    pub const TDBAL: u32 = 0x3800;
    /// See [`TDBAL`].
    pub const TDBAH: u32 = 0x3804;
    /// See [`TDBAL`].
    pub const TDLEN: u32 = 0x3808;
    /// See [`TDBAL`].
    pub const TDH: u32 = 0x3810;
    /// See [`TDBAL`].
    pub const TDT: u32 = 0x3818;
    /// CRC error count (statistics registers clear on read).
    pub const CRCERRS: u32 = 0x4000;
    /// Missed packets count.
    pub const MPC: u32 = 0x4010;
    /// Receive no buffers count.
    pub const RNBC: u32 = 0x40a0;
    /// Multicast table array (128 entries).
    pub const MTA: u32 = 0x5200;
    /// Receive address 0 low/high.
    pub const RAL0: u32 = 0x5400;
    /// See [`RAL0`].
    pub const RAH0: u32 = 0x5404;
}

const CTRL_FD: u32 = 1 << 0;
const CTRL_LRST: u32 = 1 << 3;
const CTRL_ASDE: u32 = 1 << 5;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_ILOS: u32 = 1 << 7;
const CTRL_RST: u32 = 1 << 26;
const CTRL_VME: u32 = 1 << 30;
const CTRL_PHY_RST: u32 = 1 << 31;
const STATUS_LU: u32 = 1 << 1;
const EERD_START: u32 = 1 << 0;
const EERD_DONE: u32 = 1 << 4;
const RCTL_EN: u32 = 1 << 1;
const RCTL_BAM: u32 = 1 << 15;
/// Unicast promiscuous: frames for the guests' MACs (behind the switch) are taken too.
const RCTL_UPE: u32 = 1 << 3;
/// Long packets: a full frame wrapped by the lab hub's tunnel is 1528 bytes.
const RCTL_LPE: u32 = 1 << 5;
const RCTL_SECRC: u32 = 1 << 26;
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x0f << 4;
const TCTL_COLD_FD: u32 = 0x40 << 12;
const TCTL_RTLC: u32 = 1 << 24;
/// IPGT 10, IPGR1 8, IPGR2 6: the values the SDM gives for the 82540EM (IEEE 802.3).
const TIPG_VALUE: u32 = 10 | 8 << 10 | 6 << 20;
const RAH_AV: u32 = 1 << 31;

/// Bytes per packet buffer (RCTL.BSIZE = 00: 2048).
pub const BUF_SIZE: usize = 2048;

/// Bounded polls for self-clearing bits (reset, EEPROM): the device answers in
/// microseconds; a device that never does is reported, not waited on forever.
const SPIN_LIMIT: u32 = 200_000;

/// 32-bit register access.
pub trait Regs {
    /// Reads the register at `offset`.
    fn read(&self, offset: u32) -> u32;
    /// Writes the register at `offset`.
    fn write(&self, offset: u32, value: u32);
}

impl Regs for Mmio {
    fn read(&self, offset: u32) -> u32 {
        self.read32(offset)
    }
    fn write(&self, offset: u32, value: u32) {
        self.write32(offset, value)
    }
}

/// Physically contiguous memory shared with the device.
pub trait DmaMemory {
    /// Physical (bus) address of the first byte.
    fn phys(&self) -> u64;
    /// The memory as words (for descriptors, accessed with volatile operations).
    fn words(&self) -> &[u64];
    /// The memory as mutable words.
    fn words_mut(&mut self) -> &mut [u64];
    /// The memory as bytes (packet buffers).
    fn bytes(&self) -> &[u8];
    /// The memory as mutable bytes.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl DmaMemory for PhysPages {
    fn phys(&self) -> u64 {
        self.base()
    }
    fn words(&self) -> &[u64] {
        self.as_u64()
    }
    fn words_mut(&mut self) -> &mut [u64] {
        self.as_u64_mut()
    }
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

/// What can go wrong when bringing the device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E1000Error {
    /// Registers read as all ones: no device behind the BAR.
    NoDevice,
    /// CTRL.RST did not clear.
    ResetTimeout,
    /// Neither the EEPROM nor RAL/RAH gave a usable unicast MAC.
    NoMac,
    /// The ring or buffer memory is too small or misaligned for the requested rings.
    BadMemory,
}

impl fmt::Display for E1000Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoDevice => "e1000: registers read as all ones (no device)",
            Self::ResetTimeout => "e1000: device reset did not complete",
            Self::NoMac => "e1000: no valid MAC address in the EEPROM or RAL/RAH",
            Self::BadMemory => "e1000: ring memory too small or misaligned",
        })
    }
}

/// Packet and error counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Good frames received.
    pub rx_packets: u64,
    /// Bytes in good frames received (without CRC).
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent (without CRC).
    pub tx_bytes: u64,
    /// Frames the device flagged with errors.
    pub rx_errors: u64,
    /// Frames larger than one buffer or than MTU + header, dropped.
    pub rx_oversized: u64,
    /// Descriptors with impossible lengths, dropped.
    pub rx_garbage: u64,
    /// Times every receive descriptor was found full (the device drops frames then).
    pub rx_ring_full: u64,
    /// Times the stack wanted to send with no transmit descriptor free.
    pub tx_ring_full: u64,
    /// Frames the stack produced that were not sent (too large, or ring full).
    pub tx_dropped: u64,
    /// Device counters, accumulated: missed packets (MPC), no-buffer events (RNBC), CRC
    /// errors (CRCERRS).
    pub hw_missed: u64,
    /// See [`Stats::hw_missed`].
    pub hw_no_buffer: u64,
    /// See [`Stats::hw_missed`].
    pub hw_crc_errors: u64,
}

struct RxQueue<M> {
    ring: M,
    bufs: M,
    cur: RxCursor,
    stats: RxStats,
}

#[derive(Default)]
struct RxStats {
    packets: u64,
    bytes: u64,
    errors: u64,
    oversized: u64,
    garbage: u64,
    ring_full: u64,
}

struct TxQueue<M> {
    ring: M,
    bufs: M,
    cur: TxCursor,
    stats: TxStats,
    scratch: Vec<u8>,
}

#[derive(Default)]
struct TxStats {
    packets: u64,
    bytes: u64,
    ring_full: u64,
    dropped: u64,
}

/// The driver: the device's registers and the two rings.
pub struct E1000<R, M> {
    regs: R,
    mac: [u8; 6],
    rx: RxQueue<M>,
    tx: TxQueue<M>,
    hw: (u64, u64, u64),
}

fn spin_until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..SPIN_LIMIT {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn valid_mac(m: &[u8; 6]) -> bool {
    m.iter().any(|&b| b != 0) && m[0] & 1 == 0
}

/// Reads word `addr` of the EEPROM through EERD (82540EM layout: address in bits 8..16,
/// DONE at bit 4, data in bits 16..32).
fn eeprom_read(regs: &impl Regs, addr: u8) -> Option<u16> {
    regs.write(reg::EERD, u32::from(addr) << 8 | EERD_START);
    let mut v = 0;
    spin_until(|| {
        v = regs.read(reg::EERD);
        v & EERD_DONE != 0
    })
    .then_some((v >> 16) as u16)
}

fn read_mac(regs: &impl Regs) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let from_eeprom = (0..3u8).all(|i| match eeprom_read(regs, i) {
        Some(w) => {
            m[usize::from(i) * 2..usize::from(i) * 2 + 2].copy_from_slice(&w.to_le_bytes());
            true
        }
        None => false,
    });
    if from_eeprom && valid_mac(&m) {
        return Some(m);
    }
    let lo = regs.read(reg::RAL0).to_le_bytes();
    let hi = regs.read(reg::RAH0).to_le_bytes();
    let m = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];
    valid_mac(&m).then_some(m)
}

impl<R: Regs, M: DmaMemory> E1000<R, M> {
    /// Resets the device and sets it up: interrupts masked, MAC from the EEPROM (else
    /// RAL/RAH) programmed as receive address 0, link up forced, both rings enabled.
    /// Ring sizes follow the memory given: `rx_ring`/`tx_ring` hold the descriptors
    /// (16 bytes each, 128-byte aligned), `rx_bufs`/`tx_bufs` one [`BUF_SIZE`] buffer per
    /// descriptor.
    pub fn init(
        regs: R,
        rx_ring: M,
        rx_bufs: M,
        tx_ring: M,
        tx_bufs: M,
    ) -> Result<Self, E1000Error> {
        let rx_n = ring_size(&rx_ring, &rx_bufs)?;
        let tx_n = ring_size(&tx_ring, &tx_bufs)?;
        if regs.read(reg::STATUS) == u32::MAX {
            return Err(E1000Error::NoDevice);
        }
        regs.write(reg::IMC, u32::MAX);
        regs.write(reg::RCTL, 0);
        regs.write(reg::TCTL, 0);
        let ctrl = regs.read(reg::CTRL);
        regs.write(reg::CTRL, ctrl | CTRL_RST);
        if !spin_until(|| regs.read(reg::CTRL) & CTRL_RST == 0) {
            return Err(E1000Error::ResetTimeout);
        }
        regs.write(reg::IMC, u32::MAX);
        let _ = regs.read(reg::ICR);
        let ctrl = regs.read(reg::CTRL);
        regs.write(
            reg::CTRL,
            (ctrl | CTRL_SLU | CTRL_ASDE | CTRL_FD)
                & !(CTRL_LRST | CTRL_PHY_RST | CTRL_ILOS | CTRL_VME),
        );

        let mac = read_mac(&regs).ok_or(E1000Error::NoMac)?;
        regs.write(
            reg::RAL0,
            u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]),
        );
        regs.write(
            reg::RAH0,
            u32::from(u16::from_le_bytes([mac[4], mac[5]])) | RAH_AV,
        );
        for i in 0..128 {
            regs.write(reg::MTA + 4 * i, 0);
        }

        let mut rx = RxQueue {
            ring: rx_ring,
            bufs: rx_bufs,
            cur: RxCursor::new(Ring::new(rx_n)),
            stats: RxStats::default(),
        };
        let base = rx.bufs.phys();
        for i in 0..rx_n as usize {
            let w = rx.ring.words_mut();
            mmio::write_shared_u64(&mut w[2 * i], base + (i * BUF_SIZE) as u64);
            mmio::write_shared_u64(&mut w[2 * i + 1], 0);
        }
        let mut tx = TxQueue {
            ring: tx_ring,
            bufs: tx_bufs,
            cur: TxCursor::new(Ring::new(tx_n)),
            stats: TxStats::default(),
            scratch: vec![0; BUF_SIZE],
        };
        let base = tx.bufs.phys();
        for i in 0..tx_n as usize {
            let w = tx.ring.words_mut();
            mmio::write_shared_u64(&mut w[2 * i], base + (i * BUF_SIZE) as u64);
            mmio::write_shared_u64(&mut w[2 * i + 1], 0);
        }
        mmio::dma_fence();

        let rb = rx.ring.phys();
        regs.write(reg::RDBAL, rb as u32);
        regs.write(reg::RDBAH, (rb >> 32) as u32);
        regs.write(reg::RDLEN, rx_n * DESC_SIZE as u32);
        regs.write(reg::RDH, 0);
        regs.write(reg::RDT, rx.cur.initial_tail());
        regs.write(reg::RDTR, 0);
        regs.write(reg::RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);

        let tb = tx.ring.phys();
        regs.write(reg::TDBAL, tb as u32);
        regs.write(reg::TDBAH, (tb >> 32) as u32);
        regs.write(reg::TDLEN, tx_n * DESC_SIZE as u32);
        regs.write(reg::TDH, 0);
        regs.write(reg::TDT, 0);
        regs.write(reg::TIPG, TIPG_VALUE);
        regs.write(
            reg::TCTL,
            TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD_FD | TCTL_RTLC,
        );

        Ok(Self {
            regs,
            mac,
            rx,
            tx,
            hw: (0, 0, 0),
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the link is up (STATUS.LU).
    pub fn link_up(&self) -> bool {
        let s = self.regs.read(reg::STATUS);
        s != u32::MAX && s & STATUS_LU != 0
    }

    /// Ring sizes (receive, transmit).
    pub fn ring_sizes(&self) -> (u32, u32) {
        (self.rx.cur.ring.size(), self.tx.cur.ring.size())
    }

    /// The counters. Reads (and accumulates) the device's clear-on-read statistics.
    pub fn stats(&mut self) -> Stats {
        let r = |o| u64::from(self.regs.read(o)).min(u64::from(u32::MAX - 1));
        self.hw.0 += r(reg::MPC);
        self.hw.1 += r(reg::RNBC);
        self.hw.2 += r(reg::CRCERRS);
        Stats {
            rx_packets: self.rx.stats.packets,
            rx_bytes: self.rx.stats.bytes,
            tx_packets: self.tx.stats.packets,
            tx_bytes: self.tx.stats.bytes,
            rx_errors: self.rx.stats.errors,
            rx_oversized: self.rx.stats.oversized,
            rx_garbage: self.rx.stats.garbage,
            rx_ring_full: self.rx.stats.ring_full,
            tx_ring_full: self.tx.stats.ring_full,
            tx_dropped: self.tx.stats.dropped,
            hw_missed: self.hw.0,
            hw_no_buffer: self.hw.1,
            hw_crc_errors: self.hw.2,
        }
    }

    /// Takes unicast frames for any MAC (the guests' NICs sit behind this one), or
    /// only its own.
    pub fn set_unicast_promiscuous(&mut self, on: bool) {
        let rctl = self.regs.read(reg::RCTL);
        let bits = RCTL_UPE | RCTL_LPE;
        let rctl = if on { rctl | bits } else { rctl & !bits };
        self.regs.write(reg::RCTL, rctl);
    }

    /// Whether a transmit descriptor is free (after reclaiming the sent ones).
    pub fn tx_room(&mut self) -> bool {
        self.tx.reclaim();
        !self.tx.cur.full()
    }

    /// Whether a received frame is waiting (cheap: one descriptor read).
    pub fn rx_pending(&self) -> bool {
        self.rx.desc(self.rx.cur.next).done()
    }

    /// Receives one frame into `f` (a copy-free view of the buffer); returns `None` when
    /// no good frame is waiting. Bad descriptors on the way are counted and recycled.
    pub fn receive_with<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        let len = self.rx.next_frame(&self.regs)?;
        let out = f(self.rx.frame(len));
        self.rx.release(&self.regs);
        Some(out)
    }

    /// Sends one frame of `len` bytes built by `f`; returns `None` (and counts a drop)
    /// when the ring is full or `len` is not a valid frame length.
    pub fn send_with<T>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> Option<T> {
        self.tx.reclaim();
        if self.tx.cur.full() {
            self.tx.stats.ring_full += 1;
            self.tx.stats.dropped += 1;
            return None;
        }
        Some(self.tx.send(&self.regs, len, f))
    }
}

fn ring_size(ring: &impl DmaMemory, bufs: &impl DmaMemory) -> Result<u32, E1000Error> {
    let n = (ring.bytes().len() / DESC_SIZE).min(bufs.bytes().len() / BUF_SIZE);
    // RDLEN/TDLEN: multiples of 128 bytes (8 descriptors); 65536 descriptors at most.
    let n = (n.min(4096) / 8 * 8) as u32;
    if n < 8 || !ring.phys().is_multiple_of(128) || !bufs.phys().is_multiple_of(16) {
        return Err(E1000Error::BadMemory);
    }
    Ok(n)
}

impl<M: DmaMemory> RxQueue<M> {
    fn desc(&self, i: u32) -> RxDesc {
        RxDesc::from_word(mmio::read_shared_u64(
            &self.ring.words()[2 * i as usize + 1],
        ))
    }

    /// Skips (recycling) bad descriptors up to the next good frame; returns its length.
    fn next_frame(&mut self, regs: &impl Regs) -> Option<usize> {
        let ring = self.cur.ring;
        // If the last descriptor the device may fill is done, the device ran out.
        if self.desc(ring.prev(ring.prev(self.cur.next))).done() {
            self.stats.ring_full += 1;
        }
        for _ in 0..ring.size() {
            let d = self.desc(self.cur.next);
            if !d.done() {
                return None;
            }
            mmio::dma_fence();
            let (verdict, multi) = rx_verdict(d, BUF_SIZE, self.cur.in_multi);
            self.cur.in_multi = multi;
            match verdict {
                RxVerdict::Frame(len) => return Some(len),
                RxVerdict::Error => self.stats.errors += 1,
                RxVerdict::Oversized => self.stats.oversized += 1,
                RxVerdict::Garbage => self.stats.garbage += 1,
            }
            self.release(regs);
        }
        None
    }

    /// The frame in the buffer of descriptor `next`.
    fn frame(&mut self, len: usize) -> &[u8] {
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        let off = self.cur.next as usize * BUF_SIZE;
        &self.bufs.bytes()[off..off + len]
    }

    /// Gives descriptor `next` back to the device.
    fn release(&mut self, regs: &impl Regs) {
        let i = self.cur.next as usize;
        mmio::write_shared_u64(&mut self.ring.words_mut()[2 * i + 1], 0);
        mmio::dma_fence();
        let tail = self.cur.advance();
        regs.write(reg::RDT, tail);
    }
}

impl<M: DmaMemory> TxQueue<M> {
    fn reclaim(&mut self) {
        let ring = &self.ring;
        while self
            .cur
            .reclaim_one(|i| tx_done(mmio::read_shared_u64(&ring.words()[2 * i as usize + 1])))
        {
        }
    }

    /// Fills and hands over the next descriptor (the caller checked it is free). A bad
    /// length still runs `f` (on scratch memory) but sends nothing.
    fn send<T>(&mut self, regs: &impl Regs, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        if !(ring::MIN_FRAME..=MAX_FRAME).contains(&len) {
            self.stats.dropped += 1;
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            return f(&mut self.scratch[..len]);
        }
        let Some(i) = self.cur.claim() else {
            self.stats.dropped += 1;
            return f(&mut self.scratch[..len]);
        };
        let off = i as usize * BUF_SIZE;
        let out = f(&mut self.bufs.bytes_mut()[off..off + len]);
        let base = self.bufs.phys() + off as u64;
        let w = self.ring.words_mut();
        mmio::write_shared_u64(&mut w[2 * i as usize], base);
        mmio::write_shared_u64(&mut w[2 * i as usize + 1], tx_word(len as u16));
        mmio::dma_fence();
        regs.write(reg::TDT, self.cur.next);
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        out
    }
}

/// smoltcp receive token: a frame waiting in the receive ring.
pub struct RxToken<'a, R: Regs, M: DmaMemory> {
    regs: &'a R,
    rx: &'a mut RxQueue<M>,
    len: usize,
}

impl<R: Regs, M: DmaMemory> phy::RxToken for RxToken<'_, R, M> {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        let out = f(self.rx.frame(self.len));
        self.rx.release(self.regs);
        out
    }
}

/// smoltcp transmit token: the right to fill one transmit descriptor.
pub struct TxToken<'a, R: Regs, M: DmaMemory> {
    regs: &'a R,
    tx: &'a mut TxQueue<M>,
}

impl<R: Regs, M: DmaMemory> phy::TxToken for TxToken<'_, R, M> {
    fn consume<T, F: FnOnce(&mut [u8]) -> T>(self, len: usize, f: F) -> T {
        self.tx.reclaim();
        if self.tx.cur.full() {
            self.tx.stats.ring_full += 1;
        }
        self.tx.send(self.regs, len, f)
    }
}

impl<R: Regs, M: DmaMemory> Device for E1000<R, M> {
    type RxToken<'a>
        = RxToken<'a, R, M>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, R, M>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let len = self.rx.next_frame(&self.regs)?;
        Some((
            RxToken {
                regs: &self.regs,
                rx: &mut self.rx,
                len,
            },
            TxToken {
                regs: &self.regs,
                tx: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.cur.full() {
            self.tx.stats.ring_full += 1;
            return None;
        }
        Some(TxToken {
            regs: &self.regs,
            tx: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(self.tx.cur.ring.size() as usize - 1);
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Register file of a fake 82540EM: remembers writes, clears RST and completes
    /// EEPROM reads at once.
    #[derive(Default)]
    struct FakeRegs {
        r: RefCell<HashMap<u32, u32>>,
        eeprom: [u16; 3],
        eeprom_dead: bool,
        writes: RefCell<Vec<(u32, u32)>>,
    }

    impl Regs for FakeRegs {
        fn read(&self, o: u32) -> u32 {
            let v = *self.r.borrow().get(&o).unwrap_or(&0);
            match o {
                reg::STATUS => v | STATUS_LU,
                _ => v,
            }
        }
        fn write(&self, o: u32, v: u32) {
            self.writes.borrow_mut().push((o, v));
            let v = match o {
                reg::CTRL => v & !CTRL_RST,
                reg::EERD if !self.eeprom_dead => {
                    let a = (v >> 8) as usize & 0xff;
                    u32::from(*self.eeprom.get(a).unwrap_or(&0)) << 16 | EERD_DONE
                }
                reg::EERD => 0,
                _ => v,
            };
            self.r.borrow_mut().insert(o, v);
        }
    }

    impl FakeRegs {
        fn get(&self, o: u32) -> u32 {
            *self.r.borrow().get(&o).unwrap_or(&0)
        }
    }

    struct FakeMem {
        phys: u64,
        w: Vec<u64>,
    }

    impl DmaMemory for FakeMem {
        fn phys(&self) -> u64 {
            self.phys
        }
        fn words(&self) -> &[u64] {
            &self.w
        }
        fn words_mut(&mut self) -> &mut [u64] {
            &mut self.w
        }
        fn bytes(&self) -> &[u8] {
            // SAFETY: test-only reinterpretation of an initialised Vec<u64> as bytes.
            unsafe { std::slice::from_raw_parts(self.w.as_ptr().cast(), self.w.len() * 8) }
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `bytes`, exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.w.as_mut_ptr().cast(), self.w.len() * 8) }
        }
    }

    fn mem(phys: u64, bytes: usize) -> FakeMem {
        FakeMem {
            phys,
            w: vec![0; bytes / 8],
        }
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn regs() -> FakeRegs {
        FakeRegs {
            eeprom: [0x5452, 0x1200, 0x5634],
            ..Default::default()
        }
    }

    fn nic(n: usize) -> E1000<FakeRegs, FakeMem> {
        E1000::init(
            regs(),
            mem(0x10_0000, n * 16),
            mem(0x20_0000, n * BUF_SIZE),
            mem(0x30_0000, n * 16),
            mem(0x40_0000, n * BUF_SIZE),
        )
        .unwrap()
    }

    /// The device side: writes a frame into RX descriptor `i`.
    fn deliver(d: &mut E1000<FakeRegs, FakeMem>, i: usize, data: &[u8], status: u8, err: u8) {
        let off = i * BUF_SIZE;
        d.rx.bufs.bytes_mut()[off..off + data.len()].copy_from_slice(data);
        d.rx.ring.w[2 * i + 1] = data.len() as u64 | u64::from(status) << 32 | u64::from(err) << 40;
    }

    const DONE: u8 = ring::RX_STATUS_DD | ring::RX_STATUS_EOP;

    #[test]
    fn init_programs_mac_and_rings() {
        let d = nic(16);
        assert_eq!(d.mac(), MAC);
        assert!(d.link_up());
        assert_eq!(d.ring_sizes(), (16, 16));
        let r = &d.regs;
        assert_eq!(r.get(reg::RAL0), 0x1200_5452);
        assert_eq!(r.get(reg::RAH0), 0x5634 | RAH_AV);
        assert_eq!(r.get(reg::RDBAL), 0x10_0000);
        assert_eq!(r.get(reg::RDLEN), 256);
        assert_eq!(r.get(reg::RDT), 15);
        assert_eq!(r.get(reg::TDT), 0);
        let rctl = r.get(reg::RCTL);
        assert!(rctl & RCTL_EN != 0 && rctl & RCTL_BAM != 0 && rctl & RCTL_SECRC != 0);
        assert_eq!(rctl & (3 << 16), 0, "BSIZE 2048");
        assert!(r.get(reg::CTRL) & CTRL_SLU != 0);
        // Every RX descriptor points at its own buffer.
        assert_eq!(d.rx.ring.w[2 * 3], 0x20_0000 + 3 * 2048);
        // RST was requested before the rings were set up.
        let w = r.writes.borrow();
        let rst = w
            .iter()
            .position(|&(o, v)| o == reg::CTRL && v & CTRL_RST != 0)
            .unwrap();
        let rdbal = w.iter().position(|&(o, _)| o == reg::RDBAL).unwrap();
        assert!(rst < rdbal);
    }

    #[test]
    fn mac_falls_back_to_ral_rah_and_bad_state_is_an_error() {
        let r = FakeRegs {
            eeprom_dead: true,
            ..Default::default()
        };
        r.write(reg::RAL0, 0x1200_5452);
        r.write(reg::RAH0, 0x5734);
        let d = E1000::init(
            r,
            mem(0x1000, 128),
            mem(0x2000, 8 * BUF_SIZE),
            mem(0x3000, 128),
            mem(0x4000, 8 * BUF_SIZE),
        )
        .unwrap();
        assert_eq!(d.mac(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x57]);

        let no_mac = FakeRegs::default();
        let e = E1000::init(
            no_mac,
            mem(0x1000, 128),
            mem(0x2000, 8 * BUF_SIZE),
            mem(0x3000, 128),
            mem(0x4000, 8 * BUF_SIZE),
        );
        assert_eq!(e.err(), Some(E1000Error::NoMac));

        let dead = regs();
        dead.r.borrow_mut().insert(reg::STATUS, u32::MAX);
        let e = E1000::init(
            dead,
            mem(0x1000, 128),
            mem(0x2000, 8 * BUF_SIZE),
            mem(0x3000, 128),
            mem(0x4000, 8 * BUF_SIZE),
        );
        assert_eq!(e.err(), Some(E1000Error::NoDevice));

        let small = E1000::init(
            regs(),
            mem(0x1000, 64),
            mem(0x2000, 8 * BUF_SIZE),
            mem(0x3000, 128),
            mem(0x4000, 8 * BUF_SIZE),
        );
        assert_eq!(small.err(), Some(E1000Error::BadMemory));
    }

    #[test]
    fn receive_recycles_descriptors_and_counts_bad_frames() {
        let mut d = nic(8);
        assert!(d.receive_with(|_| ()).is_none());
        let frame: Vec<u8> = (0..60u8).collect();
        deliver(&mut d, 0, &frame, DONE, 0);
        deliver(&mut d, 1, &frame, DONE, 1); // CRC error
        deliver(&mut d, 2, &[1, 2, 3], DONE, 0); // runt
        deliver(&mut d, 3, &frame[..50], DONE, 0);
        assert!(d.rx_pending());
        assert_eq!(d.receive_with(|f| f.to_vec()), Some(frame.clone()));
        assert_eq!(d.regs.get(reg::RDT), 0);
        assert_eq!(d.receive_with(|f| f.len()), Some(50));
        assert_eq!(d.regs.get(reg::RDT), 3);
        assert!(d.receive_with(|_| ()).is_none());
        let s = d.stats();
        assert_eq!((s.rx_packets, s.rx_bytes), (2, 110));
        assert_eq!((s.rx_errors, s.rx_garbage), (1, 1));
        // Descriptors were given back with cleared status, addresses kept.
        assert_eq!(d.rx.ring.w[1], 0);
        assert_eq!(d.rx.ring.w[2], 0x20_0000 + 2048);
    }

    #[test]
    fn receive_wraps_and_detects_a_full_ring() {
        let mut d = nic(8);
        let frame = [0xaau8; 64];
        for round in 0..3 {
            // The device fills all 7 descriptors it owns.
            for k in 0..7 {
                let i = (round * 7 + k) % 8;
                deliver(&mut d, i, &frame, DONE, 0);
            }
            for _ in 0..7 {
                assert_eq!(d.receive_with(|f| f.len()), Some(64));
            }
            assert!(d.receive_with(|_| ()).is_none());
        }
        let s = d.stats();
        assert_eq!(s.rx_packets, 21);
        assert_eq!(s.rx_ring_full, 3);
    }

    #[test]
    fn oversized_multi_descriptor_frame_is_dropped() {
        let mut d = nic(8);
        deliver(&mut d, 0, &[0u8; 2048], ring::RX_STATUS_DD, 0);
        deliver(&mut d, 1, &[0u8; 100], DONE, 0);
        deliver(&mut d, 2, &[7u8; 80], DONE, 0);
        assert_eq!(d.receive_with(|f| f[0]), Some(7));
        assert_eq!(d.stats().rx_oversized, 2);
    }

    #[test]
    fn transmit_fills_ring_then_reports_full_until_device_completes() {
        let mut d = nic(8);
        for k in 0..7u8 {
            assert!(d.send_with(60, |b| b.fill(k)).is_some());
            assert_eq!(d.regs.get(reg::TDT), u32::from(k) + 1);
        }
        assert!(d.send_with(60, |_| ()).is_none());
        assert!(phy::Device::transmit(&mut d, Instant::ZERO).is_none());
        let s = d.stats();
        assert_eq!((s.tx_packets, s.tx_bytes, s.tx_ring_full), (7, 420, 2));
        // Descriptor 3 carries its frame, with EOP|IFCS|RS.
        assert_eq!(d.tx.ring.w[7] & 0xffff, 60);
        assert_eq!(d.tx.bufs.bytes()[3 * BUF_SIZE], 3);
        // The device completes the first two.
        d.tx.ring.w[1] |= 1 << 32;
        d.tx.ring.w[3] |= 1 << 32;
        assert!(d.send_with(60, |_| ()).is_some());
        assert!(d.send_with(60, |_| ()).is_some());
        assert!(d.send_with(60, |_| ()).is_none());
        assert_eq!(d.regs.get(reg::TDT), 1);
    }

    #[test]
    fn bad_lengths_are_not_sent() {
        let mut d = nic(8);
        let tok = phy::Device::transmit(&mut d, Instant::ZERO).unwrap();
        let n = phy::TxToken::consume(tok, 4000, |b| b.len());
        assert_eq!(n, 4000);
        assert_eq!(d.regs.get(reg::TDT), 0);
        let s = d.stats();
        assert_eq!((s.tx_packets, s.tx_dropped), (0, 1));
    }

    #[test]
    fn smoltcp_tokens_round_trip() {
        let mut d = nic(8);
        deliver(&mut d, 0, &[9u8; 100], DONE, 0);
        let (rx, tx) = phy::Device::receive(&mut d, Instant::ZERO).unwrap();
        let sum: u32 = phy::RxToken::consume(rx, |f| f.iter().map(|&b| u32::from(b)).sum());
        assert_eq!(sum, 900);
        phy::TxToken::consume(tx, 64, |b| b.fill(1));
        assert_eq!(d.regs.get(reg::RDT), 0);
        assert_eq!(d.regs.get(reg::TDT), 1);
        assert_eq!(phy::Device::capabilities(&d).max_transmission_unit, 1514);
    }
}
