//! The guest's half of the PV NIC's rings (guest-abi [`NetRing`]), without smoltcp.
//!
//! [`NicMemory`] is everything the NIC shares with the hypervisor: the ring page and
//! [`NET_SLOTS`] transmit and [`NET_SLOTS`] receive buffers. [`TxRing`] and [`RxRing`]
//! keep the guest's own indices (plain integers in guest memory, so they migrate with
//! it) and do all the index arithmetic; [`Mem`] is the only code that touches the shared
//! memory, always with volatile accesses at the byte offsets of `guest_abi::net_ring`,
//! because the hypervisor reads and writes the page while the guest is stopped in a
//! hypercall.
//!
//! The protocol (guest-abi v3):
//!
//! * indices are free-running `u32`s, slot = index % [`NET_SLOTS`], wrapping arithmetic;
//! * transmit: fill `tx[tx_avail % N]` (addr, len, flags = 0), compiler fence, then
//!   `tx_avail += 1`; the buffer is the guest's again once `tx_used` has passed it, and its
//!   descriptor then carries [`NET_DESC_DONE`] (and [`NET_DESC_ERROR`] if it was bad);
//! * receive: post `rx[rx_avail % N]` (addr, len = capacity, flags = 0), fence,
//!   `rx_avail += 1`; the hypervisor fills the buffer at `rx_used`, sets its `len` and
//!   `flags`, and increments `rx_used`.
//!
//! Receive buffer `i` always sits in slot `i`: buffers are consumed in order and each is
//! re-posted at once, so `rx_avail == rx_next + N` between calls and the slot of the
//! next post is the slot just consumed. Transmit buffer `i` likewise belongs to slot `i`.

use core::ptr::NonNull;
use core::sync::atomic::{compiler_fence, Ordering};

use guest_abi::{
    net_ring, NetDesc, NetRing, NET_DESC_DONE, NET_DESC_ERROR, NET_FRAME_MAX, NET_SLOTS,
};

/// Descriptors (and buffers) per direction.
pub const SLOTS: usize = NET_SLOTS as usize;
/// Bytes of one frame buffer: [`NET_FRAME_MAX`] rounded up to a cache line.
pub const BUF_SIZE: usize = (NET_FRAME_MAX as usize).next_multiple_of(64);
/// Shortest frame: an Ethernet header.
pub const FRAME_MIN: u32 = 14;

const EMPTY_DESC: NetDesc = NetDesc {
    addr: 0,
    len: 0,
    flags: 0,
};

/// The ring on a page of its own (the hypervisor reads the whole page).
#[repr(C, align(4096))]
pub struct RingPage {
    ring: NetRing,
}

/// Everything the PV NIC shares with the hypervisor: the ring page, then the transmit
/// and receive buffers. Page aligned, so the ring is too ([`NetAttach`] requires it).
///
/// [`NetAttach`]: guest_abi::Hypercall::NetAttach
#[repr(C, align(4096))]
pub struct NicMemory {
    ring: RingPage,
    tx: [[u8; BUF_SIZE]; SLOTS],
    rx: [[u8; BUF_SIZE]; SLOTS],
}

impl NicMemory {
    /// Zeroed memory (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            ring: RingPage {
                ring: NetRing {
                    tx_avail: 0,
                    tx_used: 0,
                    rx_avail: 0,
                    rx_used: 0,
                    _reserved: [0; 12],
                    tx: [EMPTY_DESC; SLOTS],
                    rx: [EMPTY_DESC; SLOTS],
                },
            },
            tx: [[0; BUF_SIZE]; SLOTS],
            rx: [[0; BUF_SIZE]; SLOTS],
        }
    }
}

impl Default for NicMemory {
    fn default() -> Self {
        Self::new()
    }
}

const _: () = assert!(core::mem::size_of::<RingPage>() == 4096);
const _: () = assert!(core::mem::offset_of!(NicMemory, ring) == 0);
const _: () = assert!(core::mem::offset_of!(NicMemory, tx) == 4096);
const _: () = assert!(BUF_SIZE >= NET_FRAME_MAX as usize && BUF_SIZE.is_multiple_of(64));

/// Which descriptor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

/// A handle on the (exclusively owned) [`NicMemory`]: the only code that touches it.
///
/// Every access is volatile and goes through a raw pointer, never through a Rust
/// reference that lives across a hypercall, because the hypervisor reads and writes the
/// ring and the receive buffers behind the compiler's back (while the guest is stopped in
/// `NetNotify`/`NetWait`). The transmit side only touches transmit buffers and
/// `tx_avail`, the receive side only receive buffers and `rx_avail`, so the two copies of
/// the handle ([`TxRing`], [`RxRing`]) never touch the same memory.
#[derive(Clone, Copy, Debug)]
pub struct Mem(NonNull<NicMemory>);

impl Mem {
    /// Takes the memory for good: the ring and buffers are reached only through the
    /// returned handle from now on (the `&'static mut` is consumed).
    pub fn new(mem: &'static mut NicMemory) -> Self {
        Self(NonNull::from(mem))
    }

    /// Guest-physical (= guest-virtual) address of the ring page.
    pub fn ring_addr(&self) -> u64 {
        self.0.as_ptr() as u64
    }

    /// Guest-physical address of buffer `slot` of `dir`.
    fn buf_addr(&self, dir: Dir, slot: usize) -> u64 {
        let table = match dir {
            Dir::Tx => core::mem::offset_of!(NicMemory, tx),
            Dir::Rx => core::mem::offset_of!(NicMemory, rx),
        };
        self.ring_addr() + (table + (slot % SLOTS) * BUF_SIZE) as u64
    }

    /// Pointer to the `u32` index at byte offset `off` of the ring page.
    fn index_ptr(&self, off: usize) -> *mut u32 {
        debug_assert!(matches!(
            off,
            net_ring::TX_AVAIL | net_ring::TX_USED | net_ring::RX_AVAIL | net_ring::RX_USED
        ));
        self.0.as_ptr().cast::<u8>().wrapping_add(off).cast()
    }

    /// Pointer to descriptor `slot` of `dir`.
    fn desc_ptr(&self, dir: Dir, slot: usize) -> *mut NetDesc {
        let table = match dir {
            Dir::Tx => net_ring::TX,
            Dir::Rx => net_ring::RX,
        };
        let off = table + (slot % SLOTS) * net_ring::DESC;
        self.0.as_ptr().cast::<u8>().wrapping_add(off).cast()
    }

    /// Reads a ring index (the hypervisor may have changed it in the last hypercall).
    fn load(&self, off: usize) -> u32 {
        // SAFETY: `off` is one of the four index offsets of guest-abi's `net_ring`, inside
        // the ring page at the start of the `NicMemory` this handle owns (`Mem::new` took
        // its `&'static mut`); it is 4-aligned (the page is 4096-aligned) and any bit
        // pattern is a valid u32. Volatile: the hypervisor writes it outside Rust's view.
        unsafe { self.index_ptr(off).read_volatile() }
    }

    /// Publishes a ring index. A compiler fence first, so the descriptor writes before
    /// it are not moved after it (the hypervisor reads the ring during the next
    /// hypercall; a single vCPU, so no CPU fence is needed).
    fn publish(&self, off: usize, value: u32) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as in `load`: an aligned u32 inside the owned ring page.
        unsafe { self.index_ptr(off).write_volatile(value) }
        compiler_fence(Ordering::SeqCst);
    }

    /// Reads descriptor `slot` of `dir`.
    fn read_desc(&self, dir: Dir, slot: usize) -> NetDesc {
        // SAFETY: `desc_ptr` points at descriptor `slot % SLOTS` of a table inside the
        // owned ring page (offsets from guest-abi's `net_ring`, checked against `NetRing`'s
        // layout there), 8-aligned (page + 64 + 16 * i), and any bits form a valid NetDesc.
        unsafe { self.desc_ptr(dir, slot).read_volatile() }
    }

    /// Writes descriptor `slot` of `dir`.
    fn write_desc(&self, dir: Dir, slot: usize, desc: NetDesc) {
        // SAFETY: as in `read_desc`.
        unsafe { self.desc_ptr(dir, slot).write_volatile(desc) }
    }

    /// Zeroes the ring page's header and descriptors (indices included).
    fn clear_ring(&self, start: u32) {
        for off in [
            net_ring::TX_AVAIL,
            net_ring::TX_USED,
            net_ring::RX_AVAIL,
            net_ring::RX_USED,
        ] {
            self.publish(off, start);
        }
        for slot in 0..SLOTS {
            self.write_desc(Dir::Tx, slot, EMPTY_DESC);
            self.write_desc(Dir::Rx, slot, EMPTY_DESC);
        }
    }

    /// The first `len` bytes of receive buffer `slot`. Only for a buffer the hypervisor
    /// has completed and the guest has not re-posted (the hypervisor writes only posted
    /// buffers), and the slice must be dropped before the buffer is re-posted.
    fn rx_frame(&self, slot: usize, len: usize) -> &[u8] {
        let len = len.min(BUF_SIZE);
        let ptr = self.buf_addr(Dir::Rx, slot) as *const u8;
        // SAFETY: receive buffer `slot % SLOTS` lies inside the owned `NicMemory`, and
        // `len <= BUF_SIZE`. The hypervisor does not write it while the slice lives: it
        // writes only buffers between `rx_used` and `rx_avail`, and this one (before
        // `rx_used`) is re-posted only after the caller has dropped the slice (`RxRing`
        // re-posts in `release`, which takes `&mut self`). The transmit side never
        // touches receive buffers.
        unsafe { core::slice::from_raw_parts(ptr, len) }
    }

    /// The first `len` bytes of transmit buffer `slot`, to fill. Only for a slot the
    /// hypervisor is done with (`tx_used` has passed it); dropped before publishing.
    fn tx_frame(&mut self, slot: usize, len: usize) -> &mut [u8] {
        let len = len.min(BUF_SIZE);
        let ptr = self.buf_addr(Dir::Tx, slot) as *mut u8;
        // SAFETY: transmit buffer `slot % SLOTS` lies inside the owned `NicMemory`, and
        // `len <= BUF_SIZE`. The hypervisor reads transmit buffers only between `tx_used`
        // and `tx_avail`, and this slot is not there (`TxRing::slot` checks) until the
        // caller, having dropped the slice, publishes it. Only `TxRing` (one per NIC)
        // touches transmit buffers, through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(ptr, len) }
    }
}

/// The hypervisor's indices broke the protocol (more completed than posted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingError {
    /// The index the hypervisor wrote.
    pub used: u32,
    /// The guest's own idea of the limits: the oldest outstanding index and the next to
    /// publish.
    pub done: u32,
    /// The next index the guest will publish.
    pub avail: u32,
}

/// How many of `avail - done` outstanding descriptors the hypervisor completed when it
/// says `used`; an error when `used` is not between `done` and `avail` (mod 2^32).
pub fn completed(done: u32, used: u32, avail: u32) -> Result<u32, RingError> {
    let n = used.wrapping_sub(done);
    if n > avail.wrapping_sub(done) {
        Err(RingError { used, done, avail })
    } else {
        Ok(n)
    }
}

/// What [`TxRing::reclaim`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Descriptors completed since the last reclaim.
    pub frames: u32,
    /// Of those, completed with [`NET_DESC_ERROR`] (nothing was sent).
    pub errors: u32,
}

/// The transmit half: the guest's indices and the slot logic.
#[derive(Debug)]
pub struct TxRing {
    mem: Mem,
    /// Next index to publish (the guest's `tx_avail`).
    avail: u32,
    /// Oldest index the hypervisor had not completed at the last reclaim.
    done: u32,
}

impl TxRing {
    fn new(mem: Mem, start: u32) -> Self {
        Self {
            mem,
            avail: start,
            done: start,
        }
    }

    /// Frames published and not yet known to be completed.
    pub fn in_flight(&self) -> u32 {
        self.avail.wrapping_sub(self.done)
    }

    /// Takes note of the descriptors the hypervisor completed (`tx_used`), counting
    /// those it completed with an error. Their buffers are free again.
    pub fn reclaim(&mut self) -> Result<Reclaimed, RingError> {
        let used = self.mem.load(net_ring::TX_USED);
        let frames = completed(self.done, used, self.avail)?;
        let mut errors = 0;
        for i in 0..frames {
            let d = self
                .mem
                .read_desc(Dir::Tx, self.done.wrapping_add(i) as usize);
            if d.flags & NET_DESC_ERROR != 0 {
                errors += 1;
            }
        }
        self.done = used;
        Ok(Reclaimed { frames, errors })
    }

    /// The slot of the next frame, if one is free (as of the last [`reclaim`]).
    ///
    /// [`reclaim`]: Self::reclaim
    pub fn slot(&self) -> Option<usize> {
        (self.in_flight() < NET_SLOTS).then_some(self.avail as usize % SLOTS)
    }

    /// The buffer of free slot `slot` (from [`slot`](Self::slot)), `len` bytes.
    pub fn buffer(&mut self, slot: usize, len: usize) -> &mut [u8] {
        debug_assert_eq!(Some(slot), self.slot());
        self.mem.tx_frame(slot, len)
    }

    /// Publishes the frame of `len` bytes written in slot `slot` (from
    /// [`slot`](Self::slot)): descriptor first, then `tx_avail`.
    pub fn publish(&mut self, slot: usize, len: u32) {
        debug_assert_eq!(Some(slot), self.slot());
        let addr = self.mem.buf_addr(Dir::Tx, slot);
        self.mem.write_desc(
            Dir::Tx,
            slot,
            NetDesc {
                addr,
                len,
                flags: 0,
            },
        );
        self.avail = self.avail.wrapping_add(1);
        self.mem.publish(net_ring::TX_AVAIL, self.avail);
    }
}

/// A completed receive descriptor, as the hypervisor left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxCompletion {
    /// Its slot (= its buffer).
    pub slot: usize,
    /// The frame's length.
    pub len: u32,
    /// Its flags.
    pub flags: u32,
}

impl RxCompletion {
    /// Whether it holds a frame: [`NET_DESC_DONE`] without [`NET_DESC_ERROR`], and a
    /// length from an Ethernet header to [`NET_FRAME_MAX`].
    pub fn is_good(&self) -> bool {
        self.flags & (NET_DESC_DONE | NET_DESC_ERROR) == NET_DESC_DONE
            && (FRAME_MIN..=NET_FRAME_MAX).contains(&self.len)
    }
}

/// The receive half: the guest's indices and the slot logic.
#[derive(Debug)]
pub struct RxRing {
    mem: Mem,
    /// Next index to post (the guest's `rx_avail`).
    avail: u32,
    /// Next index to consume.
    next: u32,
}

impl RxRing {
    fn new(mem: Mem, start: u32) -> Self {
        Self {
            mem,
            avail: start,
            next: start,
        }
    }

    /// Posts receive buffer `slot` in the next descriptor: capacity [`NET_FRAME_MAX`]
    /// (what the ABI says a receive buffer should hold), flags 0, then `rx_avail`.
    fn post(&mut self, slot: usize) {
        debug_assert_eq!(slot, self.avail as usize % SLOTS);
        let addr = self.mem.buf_addr(Dir::Rx, slot);
        self.mem.write_desc(
            Dir::Rx,
            slot,
            NetDesc {
                addr,
                len: NET_FRAME_MAX,
                flags: 0,
            },
        );
        self.avail = self.avail.wrapping_add(1);
        self.mem.publish(net_ring::RX_AVAIL, self.avail);
    }

    /// Posts every buffer (at attach).
    fn post_all(&mut self) {
        for _ in 0..SLOTS {
            self.post(self.avail as usize % SLOTS);
        }
    }

    /// Completed descriptors not yet consumed.
    pub fn ready(&self) -> Result<u32, RingError> {
        completed(self.next, self.mem.load(net_ring::RX_USED), self.avail)
    }

    /// The oldest completed descriptor, if any.
    pub fn peek(&self) -> Result<Option<RxCompletion>, RingError> {
        if self.ready()? == 0 {
            return Ok(None);
        }
        let slot = self.next as usize % SLOTS;
        let d = self.mem.read_desc(Dir::Rx, slot);
        Ok(Some(RxCompletion {
            slot,
            len: d.len,
            flags: d.flags,
        }))
    }

    /// The frame of completion `c` (from [`peek`](Self::peek), [`is_good`]).
    ///
    /// [`is_good`]: RxCompletion::is_good
    pub fn frame(&self, c: &RxCompletion) -> &[u8] {
        debug_assert_eq!(c.slot, self.next as usize % SLOTS);
        self.mem.rx_frame(c.slot, c.len as usize)
    }

    /// Consumes the oldest completed descriptor and re-posts its buffer.
    pub fn release(&mut self) {
        let slot = self.next as usize % SLOTS;
        self.next = self.next.wrapping_add(1);
        self.post(slot);
    }
}

/// Clears the ring (all indices `start`) and posts every receive buffer; returns the two
/// halves. `start` is 0 in guests; tests start near `u32::MAX` to cross the wrap.
pub fn init(mem: Mem, start: u32) -> (TxRing, RxRing) {
    mem.clear_ring(start);
    let mut rx = RxRing::new(mem, start);
    rx.post_all();
    (TxRing::new(mem, start), rx)
}

/// A stand-in for the hypervisor's side of the ring, for host tests: it reads and writes
/// the ring page and the buffers by the ABI's byte offsets and descriptor addresses only,
/// as the hypervisor does.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    fn field(ring: u64, off: usize) -> *mut u32 {
        (ring as usize + off) as *mut u32
    }

    /// Reads index `off` of the ring at `ring`.
    pub fn index(ring: u64, off: usize) -> u32 {
        // SAFETY: tests pass the address of a live, leaked `NicMemory`; `off` is an index
        // offset inside its ring page.
        unsafe { field(ring, off).read_volatile() }
    }

    /// Writes index `off`.
    pub fn set_index(ring: u64, off: usize, v: u32) {
        // SAFETY: as in `index`.
        unsafe { field(ring, off).write_volatile(v) }
    }

    /// Descriptor `slot` of the table at byte offset `table`.
    pub fn desc(ring: u64, table: usize, slot: usize) -> *mut NetDesc {
        (ring as usize + table + slot % SLOTS * net_ring::DESC) as *mut NetDesc
    }

    /// Sends up to `max` queued transmit frames: hands each to `sink` (which says whether
    /// it was good) and completes it.
    pub fn take_tx(ring: u64, max: usize, mut sink: impl FnMut(&[u8]) -> bool) -> usize {
        let mut used = index(ring, net_ring::TX_USED);
        let avail = index(ring, net_ring::TX_AVAIL);
        let mut n = 0;
        while used != avail && n < max {
            let p = desc(ring, net_ring::TX, used as usize);
            // SAFETY: a descriptor inside the live ring page.
            let d = unsafe { p.read_volatile() };
            let ok = (FRAME_MIN..=NET_FRAME_MAX).contains(&d.len) && {
                // SAFETY: the guest's descriptor addresses point at its live buffers
                // (host addresses in tests), `len` bytes long as just checked.
                let frame =
                    unsafe { core::slice::from_raw_parts(d.addr as *const u8, d.len as usize) };
                sink(frame)
            };
            let flags = if ok {
                NET_DESC_DONE
            } else {
                NET_DESC_DONE | NET_DESC_ERROR
            };
            // SAFETY: as above.
            unsafe { core::ptr::addr_of_mut!((*p).flags).write_volatile(flags) };
            used = used.wrapping_add(1);
            set_index(ring, net_ring::TX_USED, used);
            n += 1;
        }
        n
    }

    /// Delivers `frame` into the next posted receive buffer; `false` (dropped) if none is
    /// posted. A frame larger than the buffer completes the descriptor with an error.
    pub fn deliver(ring: u64, frame: &[u8]) -> bool {
        let used = index(ring, net_ring::RX_USED);
        if used == index(ring, net_ring::RX_AVAIL) {
            return false;
        }
        let p = desc(ring, net_ring::RX, used as usize);
        // SAFETY: a descriptor inside the live ring page.
        let d = unsafe { p.read_volatile() };
        let (len, flags) = if frame.len() <= d.len as usize {
            // SAFETY: the guest posted a buffer of `d.len` bytes at `d.addr` (a host
            // address in tests), and the frame fits.
            unsafe {
                core::ptr::copy_nonoverlapping(frame.as_ptr(), d.addr as *mut u8, frame.len())
            };
            (frame.len() as u32, NET_DESC_DONE)
        } else {
            (0, NET_DESC_DONE | NET_DESC_ERROR)
        };
        // SAFETY: as above.
        unsafe {
            core::ptr::addr_of_mut!((*p).len).write_volatile(len);
            core::ptr::addr_of_mut!((*p).flags).write_volatile(flags);
        }
        set_index(ring, net_ring::RX_USED, used.wrapping_add(1));
        true
    }

    /// Fresh leaked NIC memory.
    pub fn memory() -> &'static mut NicMemory {
        Box::leak(Box::new(NicMemory::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn layout_and_alignment() {
        let mem = Mem::new(memory());
        assert_eq!(mem.ring_addr() % 4096, 0);
        assert_eq!(mem.buf_addr(Dir::Tx, 0), mem.ring_addr() + 4096);
        assert_eq!(
            mem.buf_addr(Dir::Rx, 1),
            mem.ring_addr() + 4096 + (SLOTS + 1) as u64 * BUF_SIZE as u64
        );
        assert_eq!(mem.buf_addr(Dir::Tx, SLOTS), mem.buf_addr(Dir::Tx, 0));
    }

    #[test]
    fn init_posts_every_receive_buffer() {
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        // Leftovers from a previous life are cleared.
        set_index(ring, net_ring::TX_USED, 77);
        let (tx, rx) = init(mem, 0);
        assert_eq!(index(ring, net_ring::TX_AVAIL), 0);
        assert_eq!(index(ring, net_ring::TX_USED), 0);
        assert_eq!(index(ring, net_ring::RX_AVAIL), NET_SLOTS);
        assert_eq!(index(ring, net_ring::RX_USED), 0);
        for s in 0..SLOTS {
            // SAFETY: a descriptor of the live ring.
            let d = unsafe { desc(ring, net_ring::RX, s).read() };
            assert_eq!(d.addr, mem.buf_addr(Dir::Rx, s));
            assert_eq!((d.len, d.flags), (NET_FRAME_MAX, 0));
        }
        assert_eq!(tx.slot(), Some(0));
        assert_eq!(rx.peek(), Ok(None));
    }

    #[test]
    fn transmit_fills_the_ring_then_waits_for_completions() {
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        let (mut tx, _rx) = init(mem, 0);
        for i in 0..SLOTS {
            let slot = tx.slot().expect("free slot");
            assert_eq!(slot, i);
            let f = frame(i as u8, 60 + i);
            tx.buffer(slot, f.len()).copy_from_slice(&f);
            tx.publish(slot, f.len() as u32);
        }
        assert_eq!(tx.slot(), None);
        assert_eq!(index(ring, net_ring::TX_AVAIL), NET_SLOTS);
        // The hypervisor sends 5, the third one bad.
        let mut seen = Vec::new();
        assert_eq!(
            take_tx(ring, 5, |f| {
                seen.push(f.to_vec());
                seen.len() != 3
            }),
            5
        );
        assert_eq!(seen[4], frame(4, 64));
        assert_eq!(tx.slot(), None, "nothing is free before a reclaim");
        assert_eq!(
            tx.reclaim(),
            Ok(Reclaimed {
                frames: 5,
                errors: 1
            })
        );
        assert_eq!(tx.in_flight(), NET_SLOTS - 5);
        assert_eq!(tx.slot(), Some(0));
        assert_eq!(tx.reclaim(), Ok(Reclaimed::default()));
    }

    #[test]
    fn receive_in_order_and_repost() {
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        let (_tx, mut rx) = init(mem, 0);
        assert!(deliver(ring, &frame(1, 60)));
        assert!(deliver(ring, &frame(2, 1514)));
        assert!(
            deliver(ring, &frame(3, 1515)),
            "too big: completed with an error"
        );
        assert_eq!(rx.ready(), Ok(3));
        let c = rx.peek().unwrap().unwrap();
        assert!(c.is_good());
        assert_eq!(rx.frame(&c), &frame(1, 60)[..]);
        rx.release();
        let c = rx.peek().unwrap().unwrap();
        assert_eq!((c.slot, c.len), (1, 1514));
        assert_eq!(rx.frame(&c), &frame(2, 1514)[..]);
        rx.release();
        let c = rx.peek().unwrap().unwrap();
        assert!(!c.is_good());
        rx.release();
        assert_eq!(rx.peek(), Ok(None));
        // Always a full ring of posted buffers, each back in its own slot with flags 0.
        assert_eq!(index(ring, net_ring::RX_AVAIL), NET_SLOTS + 3);
        for s in 0..3 {
            // SAFETY: a descriptor of the live ring.
            let d = unsafe { desc(ring, net_ring::RX, s).read() };
            assert_eq!(
                (d.addr, d.len, d.flags),
                (mem.buf_addr(Dir::Rx, s), NET_FRAME_MAX, 0)
            );
        }
    }

    #[test]
    fn a_full_receive_ring_drops_until_consumed() {
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        let (_tx, mut rx) = init(mem, 0);
        for i in 0..SLOTS {
            assert!(deliver(ring, &frame(i as u8, 100)));
        }
        assert!(!deliver(ring, &frame(0, 100)));
        assert_eq!(rx.ready(), Ok(NET_SLOTS));
        rx.release();
        assert!(deliver(ring, &frame(9, 100)));
    }

    #[test]
    fn indices_wrap_around() {
        let start = u32::MAX - 7;
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        let (mut tx, mut rx) = init(mem, start);
        for round in 0..300u32 {
            // Two frames out, one frame in, per round.
            for k in 0..2 {
                let _ = tx.reclaim().unwrap();
                let slot = tx.slot().unwrap();
                let f = frame((round * 2 + k) as u8, 64);
                tx.buffer(slot, 64).copy_from_slice(&f);
                tx.publish(slot, 64);
            }
            let mut got = Vec::new();
            take_tx(ring, usize::MAX, |f| {
                got.push(f[0]);
                true
            });
            assert_eq!(got, [(round * 2) as u8, (round * 2 + 1) as u8]);
            assert!(deliver(ring, &frame(round as u8, 80)));
            let c = rx.peek().unwrap().unwrap();
            assert_eq!(c.slot, start.wrapping_add(round) as usize % SLOTS);
            assert_eq!(rx.frame(&c)[0], round as u8);
            rx.release();
        }
        assert_eq!(index(ring, net_ring::TX_AVAIL), start.wrapping_add(600));
        assert_eq!(
            index(ring, net_ring::RX_AVAIL),
            start.wrapping_add(300 + NET_SLOTS)
        );
    }

    #[test]
    fn inconsistent_hypervisor_indices_are_refused() {
        let mem = Mem::new(memory());
        let ring = mem.ring_addr();
        let (mut tx, rx) = init(mem, 0);
        set_index(ring, net_ring::TX_USED, 1);
        assert!(tx.reclaim().is_err(), "completed a frame never published");
        set_index(ring, net_ring::RX_USED, NET_SLOTS + 1);
        assert!(rx.peek().is_err(), "filled more buffers than posted");
        assert_eq!(completed(u32::MAX, 1, 3), Ok(2));
        assert!(completed(u32::MAX, 4, 3).is_err());
    }
}
