//! A guest's PV NIC (guest-abi v3): its MAC, where its [`guest_abi::NetRing`] is, and
//! the ring logic on guest memory.
//!
//! The ring is guest memory, so everything read from it is hostile: indices are
//! checked against [`NET_SLOTS`], every descriptor against the guest's memory and
//! the frame limits, and each descriptor is read once (a guest that rewrites the ring
//! meanwhile spoils only its own frames). Work per call is bounded by the ring size.
//! The functions take the guest's memory as bytes so the host tests run them as is;
//! the caller marks the pages they report written dirty (the hypervisor's writes are
//! invisible to EPT dirty tracking) and keeps them off pages still on a post-copy
//! source (`remote`).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use guest_abi::{net_ring as off, NET_DESC_DONE, NET_DESC_ERROR, NET_FRAME_MAX, NET_SLOTS};

/// Frames a guest may have copied out and waiting for the switch.
pub const TX_QUEUE: usize = 64;
/// Shortest frame accepted from a guest (an Ethernet header).
const MIN_FRAME: u32 = 14;
const PAGE: u64 = 4096;

/// Counters of one NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames taken from the transmit ring.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames written into the receive ring.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames dropped because no receive buffer was posted (or the guest was frozen).
    pub rx_dropped: u64,
    /// Descriptors completed with an error (outside memory, bad length, too small).
    pub bad_desc: u64,
    /// Calls refused because the ring's indices were inconsistent.
    pub bad_ring: u64,
}

/// A guest's PV NIC.
#[derive(Debug, Default)]
pub struct Nic {
    /// Its MAC address (chosen at `start`, travels with the guest).
    pub mac: [u8; 6],
    /// Guest-physical address of the ring page, once attached.
    pub ring: Option<u64>,
    /// A frame was written since the guest's last `NetWait` returned.
    pub rx_event: bool,
    /// The guest sleeps in `NetWait`: a frame wakes it.
    pub waiting: bool,
    /// Arrived by migration: announce the MAC from here.
    pub announce: bool,
    /// Frames copied out of the transmit ring, for the switch (at most [`TX_QUEUE`]).
    pub tx_out: VecDeque<Vec<u8>>,
    /// Counters.
    pub stats: NicStats,
}

/// Why a ring operation did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// More than [`NET_SLOTS`] descriptors outstanding: the indices are corrupt.
    BadIndices,
    /// The page `pfn` it needs is still on a post-copy source.
    Remote(usize),
}

/// What became of one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written into the next posted buffer.
    Delivered,
    /// No buffer posted: the caller keeps the frame for later (or drops it).
    NoBuffer,
    /// The posted buffer was bad (completed with an error); the frame is dropped.
    BadBuffer,
}

fn rd32(mem: &[u8], at: u64) -> u32 {
    let at = at as usize;
    mem.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn wr32(mem: &mut [u8], at: u64, v: u32) {
    let at = at as usize;
    if let Some(b) = mem.get_mut(at..at + 4) {
        b.copy_from_slice(&v.to_le_bytes());
    }
}

fn rd64(mem: &[u8], at: u64) -> u64 {
    let at = at as usize;
    mem.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Whether `[addr, addr+len)` lies in `mem`; the range as usize.
fn span(mem: &[u8], addr: u64, len: u32) -> Option<core::ops::Range<usize>> {
    let end = addr.checked_add(u64::from(len))?;
    (end <= mem.len() as u64).then_some(addr as usize..end as usize)
}

/// Pages of `[addr, addr+len)` (len > 0).
fn pages(addr: u64, len: u32) -> core::ops::RangeInclusive<usize> {
    let last = addr + u64::from(len.max(1)) - 1;
    (addr / PAGE) as usize..=(last / PAGE) as usize
}

/// Checks that a ring page can be attached at `gpa` in a guest of `mem_bytes`.
pub fn valid_ring(gpa: u64, mem_bytes: u64) -> bool {
    gpa != 0 && gpa.is_multiple_of(PAGE) && gpa.checked_add(PAGE).is_some_and(|e| e <= mem_bytes)
}

/// Takes up to `room` frames from the transmit ring at `ring` into `out`, completing
/// each descriptor. `remote(pfn)` says whether a page is still on a post-copy source:
/// the drain stops before such a page (the caller makes the guest wait for it).
/// `written(pfn)` is told every page written. Returns the frames taken.
pub fn tx_drain(
    mem: &mut [u8],
    ring: u64,
    room: usize,
    stats: &mut NicStats,
    remote: impl Fn(usize) -> bool,
    mut written: impl FnMut(usize),
    mut out: impl FnMut(Vec<u8>),
) -> Result<u32, RingError> {
    let ring_pfn = (ring / PAGE) as usize;
    if remote(ring_pfn) {
        return Err(RingError::Remote(ring_pfn));
    }
    let avail = rd32(mem, ring + off::TX_AVAIL as u64);
    let mut used = rd32(mem, ring + off::TX_USED as u64);
    if avail.wrapping_sub(used) > NET_SLOTS {
        stats.bad_ring += 1;
        return Err(RingError::BadIndices);
    }
    let mut taken = 0;
    let mut result = Ok(0);
    while used != avail && (taken as usize) < room {
        let d = ring + (off::TX + off::DESC * (used % NET_SLOTS) as usize) as u64;
        let addr = rd64(mem, d);
        let len = rd32(mem, d + 8);
        let ok = (MIN_FRAME..=NET_FRAME_MAX).contains(&len);
        let range = if ok { span(mem, addr, len) } else { None };
        if let Some(r) = &range {
            if let Some(p) = pages(addr, len).find(|p| remote(*p)) {
                result = Err(RingError::Remote(p));
                break;
            }
            out(mem[r.clone()].to_vec());
            stats.tx_frames += 1;
            stats.tx_bytes += u64::from(len);
            taken += 1;
            wr32(mem, d + 12, NET_DESC_DONE);
        } else {
            stats.bad_desc += 1;
            wr32(mem, d + 12, NET_DESC_DONE | NET_DESC_ERROR);
        }
        used = used.wrapping_add(1);
    }
    wr32(mem, ring + off::TX_USED as u64, used);
    written(ring_pfn);
    result.map(|_: u32| taken)
}

/// Writes `frame` into the next posted receive buffer of the ring at `ring`.
/// `remote` and `written` as for [`tx_drain`]; a frame whose buffer is on a remote
/// page is not written (`Err(Remote)`: the caller drops it, TCP retransmits).
pub fn rx_deliver(
    mem: &mut [u8],
    ring: u64,
    frame: &[u8],
    stats: &mut NicStats,
    remote: impl Fn(usize) -> bool,
    mut written: impl FnMut(usize),
) -> Result<Delivery, RingError> {
    let ring_pfn = (ring / PAGE) as usize;
    if remote(ring_pfn) {
        return Err(RingError::Remote(ring_pfn));
    }
    let avail = rd32(mem, ring + off::RX_AVAIL as u64);
    let used = rd32(mem, ring + off::RX_USED as u64);
    let posted = avail.wrapping_sub(used);
    if posted > NET_SLOTS {
        stats.bad_ring += 1;
        return Err(RingError::BadIndices);
    }
    if posted == 0 {
        return Ok(Delivery::NoBuffer);
    }
    let d = ring + (off::RX + off::DESC * (used % NET_SLOTS) as usize) as u64;
    let addr = rd64(mem, d);
    let cap = rd32(mem, d + 8);
    let len = frame.len() as u32;
    let fits = frame.len() <= NET_FRAME_MAX as usize && len <= cap;
    let verdict = match (fits, span(mem, addr, len)) {
        (true, Some(r)) if len > 0 => {
            if let Some(p) = pages(addr, len).find(|p| remote(*p)) {
                return Err(RingError::Remote(p));
            }
            mem[r].copy_from_slice(frame);
            for p in pages(addr, len) {
                written(p);
            }
            wr32(mem, d + 8, len);
            wr32(mem, d + 12, NET_DESC_DONE);
            stats.rx_frames += 1;
            stats.rx_bytes += u64::from(len);
            Delivery::Delivered
        }
        _ => {
            stats.bad_desc += 1;
            wr32(mem, d + 8, 0);
            wr32(mem, d + 12, NET_DESC_DONE | NET_DESC_ERROR);
            Delivery::BadBuffer
        }
    };
    wr32(mem, ring + off::RX_USED as u64, used.wrapping_add(1));
    written(ring_pfn);
    Ok(verdict)
}

/// The MAC a new guest gets: locally administered (02:...), the hypervisor's NIC's
/// last three bytes (so two hypervisors never hand out the same one) and the guest id.
pub fn default_mac(hv_mac: [u8; 6], id: u32) -> [u8; 6] {
    [
        0x02,
        hv_mac[3],
        hv_mac[4],
        hv_mac[5],
        (id >> 8) as u8,
        id as u8,
    ]
}

/// Parses `aa:bb:cc:dd:ee:ff`: a unicast address (`mac=` at `start`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// The MAC as the `NetAttach` result (byte `i` in bits `8i..8i+8`).
pub fn mac_word(mac: [u8; 6]) -> u64 {
    let mut w = [0u8; 8];
    w[..6].copy_from_slice(&mac);
    u64::from_le_bytes(w)
}

/// The inverse of [`mac_word`].
pub fn mac_from_word(w: u64) -> [u8; 6] {
    let b = w.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u64 = 0x2000;

    fn put_desc(mem: &mut [u8], base: usize, slot: u32, addr: u64, len: u32) {
        let d = RING as usize + base + off::DESC * slot as usize;
        mem[d..d + 8].copy_from_slice(&addr.to_le_bytes());
        mem[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
        mem[d + 12..d + 16].copy_from_slice(&0u32.to_le_bytes());
    }

    fn flags(mem: &[u8], base: usize, slot: u32) -> u32 {
        rd32(mem, RING + (base + off::DESC * slot as usize) as u64 + 12)
    }

    #[test]
    fn transmit_takes_good_frames_and_flags_bad_ones() {
        let mut mem = vec![0u8; 64 * 1024];
        mem[0x5000..0x5000 + 60].fill(0xab);
        put_desc(&mut mem, off::TX, 0, 0x5000, 60);
        put_desc(&mut mem, off::TX, 1, 0xFFF0, 60); // crosses the end of memory
        put_desc(&mut mem, off::TX, 2, 0x5000, 2000); // too long
        put_desc(&mut mem, off::TX, 3, 0x5000, 14);
        wr32(&mut mem, RING + off::TX_AVAIL as u64, 4);
        let mut st = NicStats::default();
        let mut frames = Vec::new();
        let mut pages = Vec::new();
        let n = tx_drain(
            &mut mem,
            RING,
            64,
            &mut st,
            |_| false,
            |p| pages.push(p),
            |f| frames.push(f),
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(frames[0], vec![0xab; 60]);
        assert_eq!(frames[1].len(), 14);
        assert_eq!(st.bad_desc, 2);
        assert_eq!(rd32(&mem, RING + off::TX_USED as u64), 4);
        assert_eq!(flags(&mem, off::TX, 0), NET_DESC_DONE);
        assert_eq!(flags(&mem, off::TX, 1), NET_DESC_DONE | NET_DESC_ERROR);
        assert_eq!(pages, vec![2]);
    }

    #[test]
    fn corrupt_indices_and_room_bound_the_work() {
        let mut mem = vec![0u8; 64 * 1024];
        wr32(&mut mem, RING + off::TX_AVAIL as u64, 1000);
        let mut st = NicStats::default();
        let r = tx_drain(&mut mem, RING, 64, &mut st, |_| false, |_| {}, |_| {});
        assert_eq!(r, Err(RingError::BadIndices));
        assert_eq!(st.bad_ring, 1);
        // Wrapping indices: 3 outstanding across u32::MAX, room for 2.
        for s in 0..NET_SLOTS {
            put_desc(&mut mem, off::TX, s, 0x5000, 60);
        }
        wr32(&mut mem, RING + off::TX_USED as u64, u32::MAX - 1);
        wr32(&mut mem, RING + off::TX_AVAIL as u64, 1);
        let n = tx_drain(&mut mem, RING, 2, &mut st, |_| false, |_| {}, |_| {}).unwrap();
        assert_eq!(n, 2);
        assert_eq!(rd32(&mem, RING + off::TX_USED as u64), 0);
    }

    #[test]
    fn receive_fills_posted_buffers_in_order() {
        let mut mem = vec![0u8; 64 * 1024];
        let mut st = NicStats::default();
        let frame = [7u8; 100];
        assert_eq!(
            rx_deliver(&mut mem, RING, &frame, &mut st, |_| false, |_| {}),
            Ok(Delivery::NoBuffer)
        );
        put_desc(&mut mem, off::RX, 0, 0x6000, 1514);
        put_desc(&mut mem, off::RX, 1, 0x7000, 50); // too small for the frame
        put_desc(&mut mem, off::RX, 2, 0x8ffe, 1514); // crosses a page: fine
        wr32(&mut mem, RING + off::RX_AVAIL as u64, 3);
        let mut pages = Vec::new();
        let go = |mem: &mut Vec<u8>, st: &mut NicStats, pages: &mut Vec<usize>| {
            rx_deliver(mem, RING, &frame, st, |_| false, |p| pages.push(p))
        };
        assert_eq!(go(&mut mem, &mut st, &mut pages), Ok(Delivery::Delivered));
        assert_eq!(&mem[0x6000..0x6064], &frame);
        assert_eq!(rd32(&mem, RING + off::RX as u64 + 8), 100);
        assert_eq!(go(&mut mem, &mut st, &mut pages), Ok(Delivery::BadBuffer));
        assert_eq!(flags(&mem, off::RX, 1), NET_DESC_DONE | NET_DESC_ERROR);
        assert_eq!(go(&mut mem, &mut st, &mut pages), Ok(Delivery::Delivered));
        assert!(pages.contains(&8) && pages.contains(&9));
        assert_eq!(go(&mut mem, &mut st, &mut pages), Ok(Delivery::NoBuffer));
        assert_eq!((st.rx_frames, st.bad_desc), (2, 1));
    }

    #[test]
    fn remote_pages_are_never_touched() {
        let mut mem = vec![0u8; 64 * 1024];
        put_desc(&mut mem, off::RX, 0, 0x6000, 1514);
        wr32(&mut mem, RING + off::RX_AVAIL as u64, 1);
        let mut st = NicStats::default();
        let r = rx_deliver(&mut mem, RING, &[1; 60], &mut st, |p| p == 6, |_| {});
        assert_eq!(r, Err(RingError::Remote(6)));
        assert_eq!(rd32(&mem, RING + off::RX_USED as u64), 0);
        assert!(mem[0x6000..0x6040].iter().all(|b| *b == 0));
        put_desc(&mut mem, off::TX, 0, 0x6000, 60);
        wr32(&mut mem, RING + off::TX_AVAIL as u64, 1);
        let r = tx_drain(&mut mem, RING, 8, &mut st, |p| p == 6, |_| {}, |_| {});
        assert_eq!(r, Err(RingError::Remote(6)));
        assert_eq!(rd32(&mem, RING + off::TX_USED as u64), 0);
    }

    #[test]
    fn macs() {
        let m = default_mac([0x52, 0x54, 0, 0x12, 0x34, 0x56], 0x0102);
        assert_eq!(m, [2, 0x12, 0x34, 0x56, 1, 2]);
        assert_eq!(mac_from_word(mac_word(m)), m);
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("01:00:00:00:00:0a"), None); // multicast
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert!(valid_ring(0x3000, 0x10000));
        assert!(!valid_ring(0x3001, 0x10000) && !valid_ring(0x10000, 0x10000));
        assert!(!valid_ring(0, 0x10000));
    }
}
