//! e1000 descriptor rings as pure logic: the legacy receive and transmit descriptor
//! layouts, status decoding, and the index arithmetic of a ring shared with the device
//! (head owned by hardware, tail by software, next-to-clean/next-to-use by the driver).
//! No hardware access: tested on the host.
//!
//! Follows the Intel 8254x Software Developer's Manual (317453), section 3.2.3 (receive
//! descriptor), 3.3.3 (legacy transmit descriptor) and 3.2.6/3.4 (ring head and tail).
//!
//! ```text
//! legacy RX descriptor (16 bytes)          legacy TX descriptor (16 bytes)
//!  0      8      10       12     13     14     0      8      10    11    12     13    14
//! +------+------+--------+------+------+---+  +------+------+-----+-----+------+-----+---+
//! | addr | len  | csum   |status|errors|spc|  | addr | len  | cso | cmd |status| css |spc|
//! +------+------+--------+------+------+---+  +------+------+-----+-----+------+-----+---+
//! ```
//!
//! Both descriptors are handled as two little-endian u64 words: word 0 is the buffer
//! address, word 1 packs the rest (bits 0..16 length, then the fields above in order).

/// Receive descriptor status: descriptor done (the device wrote it back).
pub const RX_STATUS_DD: u8 = 1 << 0;
/// Receive descriptor status: end of packet (last descriptor of a frame).
pub const RX_STATUS_EOP: u8 = 1 << 1;
/// Receive errors that make a frame unusable: CRC/alignment (CE), symbol (SE),
/// sequence (SEQ), carrier extension (CXE), RX data (RXE). TCP/IP checksum errors
/// (bits 5, 6) are left to the stack, which checks sums itself.
pub const RX_ERRORS_FATAL: u8 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 4) | (1 << 7);

/// Transmit command: end of packet.
pub const TX_CMD_EOP: u8 = 1 << 0;
/// Transmit command: insert FCS (the CRC).
pub const TX_CMD_IFCS: u8 = 1 << 1;
/// Transmit command: report status (write back DD).
pub const TX_CMD_RS: u8 = 1 << 3;
/// Transmit status: descriptor done.
pub const TX_STATUS_DD: u8 = 1 << 0;

/// Bytes per descriptor (both kinds).
pub const DESC_SIZE: usize = 16;

/// Largest frame accepted or sent: MTU 1500 plus the 14-byte Ethernet header (CRC
/// stripped on receive, inserted by the device on transmit).
pub const MAX_FRAME: usize = 1514;
/// Smallest well-formed frame without CRC (an Ethernet header).
pub const MIN_FRAME: usize = 14;

/// The write-back half (word 1) of a legacy receive descriptor, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxDesc {
    /// Bytes written into the buffer.
    pub len: u16,
    /// Status bits (DD, EOP, ...).
    pub status: u8,
    /// Error bits.
    pub errors: u8,
}

impl RxDesc {
    /// Decodes word 1 of a receive descriptor.
    pub fn from_word(w: u64) -> Self {
        Self {
            len: w as u16,
            status: (w >> 32) as u8,
            errors: (w >> 40) as u8,
        }
    }

    /// Whether the device has written this descriptor back.
    pub fn done(&self) -> bool {
        self.status & RX_STATUS_DD != 0
    }
}

/// What to do with a completed receive descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVerdict {
    /// A whole, good frame of this many bytes.
    Frame(usize),
    /// The device flagged an error (CRC, symbol, ...).
    Error,
    /// Part of a frame spanning several descriptors (larger than one buffer), or longer
    /// than [`MAX_FRAME`]: dropped.
    Oversized,
    /// Shorter than an Ethernet header, or longer than the buffer: garbage.
    Garbage,
}

/// Decides about a completed descriptor. `in_multi` says whether earlier descriptors
/// of the same frame (without EOP) were seen; returns the verdict and the new `in_multi`.
pub fn rx_verdict(d: RxDesc, buf_len: usize, in_multi: bool) -> (RxVerdict, bool) {
    let eop = d.status & RX_STATUS_EOP != 0;
    if !eop {
        // A frame larger than one buffer: drop every piece up to and including EOP.
        return (RxVerdict::Oversized, true);
    }
    if in_multi {
        return (RxVerdict::Oversized, false);
    }
    let len = usize::from(d.len);
    let v = if d.errors & RX_ERRORS_FATAL != 0 {
        RxVerdict::Error
    } else if len < MIN_FRAME || len > buf_len {
        RxVerdict::Garbage
    } else if len > MAX_FRAME {
        RxVerdict::Oversized
    } else {
        RxVerdict::Frame(len)
    };
    (v, false)
}

/// Word 1 of a legacy transmit descriptor for one whole frame of `len` bytes.
pub fn tx_word(len: u16) -> u64 {
    u64::from(len) | (u64::from(TX_CMD_EOP | TX_CMD_IFCS | TX_CMD_RS) << 24)
}

/// Whether the device is done with a transmit descriptor whose word 1 is `w`.
pub fn tx_done(w: u64) -> bool {
    (w >> 32) as u8 & TX_STATUS_DD != 0
}

/// Index arithmetic of a ring of `size` descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    size: u32,
}

impl Ring {
    /// A ring of `size` descriptors (at least 8, a multiple of 8: RDLEN/TDLEN are in
    /// units of 128 bytes).
    pub const fn new(size: u32) -> Self {
        assert!(size >= 8 && size.is_multiple_of(8));
        Self { size }
    }

    /// Number of descriptors.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The index after `i`.
    pub fn next(&self, i: u32) -> u32 {
        (i + 1) % self.size
    }

    /// The index before `i`.
    pub fn prev(&self, i: u32) -> u32 {
        (i + self.size - 1) % self.size
    }

    /// Descriptors from `from` up to (not including) `to`, going forward.
    pub fn distance(&self, from: u32, to: u32) -> u32 {
        (to + self.size - from) % self.size
    }

    /// Whether an index read from a device register is inside the ring (a device in a
    /// bad state may report anything).
    pub fn valid(&self, i: u32) -> bool {
        i < self.size
    }
}

/// Software state of the transmit ring: descriptors from `clean` to `next` (exclusive)
/// belong to the device; one slot stays empty so that full and empty differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxCursor {
    /// Ring geometry.
    pub ring: Ring,
    /// Oldest descriptor handed to the device and not yet reclaimed.
    pub clean: u32,
    /// Next descriptor to fill (the value written to TDT after filling).
    pub next: u32,
}

impl TxCursor {
    /// An empty ring.
    pub fn new(ring: Ring) -> Self {
        Self {
            ring,
            clean: 0,
            next: 0,
        }
    }

    /// Descriptors owned by the device.
    pub fn in_flight(&self) -> u32 {
        self.ring.distance(self.clean, self.next)
    }

    /// Whether no descriptor can be filled.
    pub fn full(&self) -> bool {
        self.ring.next(self.next) == self.clean
    }

    /// Takes the next descriptor to fill, or `None` when full.
    pub fn claim(&mut self) -> Option<u32> {
        if self.full() {
            return None;
        }
        let i = self.next;
        self.next = self.ring.next(i);
        Some(i)
    }

    /// Reclaims the oldest in-flight descriptor if `done(index)` says the device wrote
    /// it back; returns whether it did.
    pub fn reclaim_one(&mut self, done: impl FnOnce(u32) -> bool) -> bool {
        if self.clean == self.next || !done(self.clean) {
            return false;
        }
        self.clean = self.ring.next(self.clean);
        true
    }
}

/// Software state of the receive ring: `next` is the next descriptor the device will
/// complete; after processing it the driver gives it back by writing its index to RDT,
/// so the device always has `size - 1` descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxCursor {
    /// Ring geometry.
    pub ring: Ring,
    /// Next descriptor to look at.
    pub next: u32,
    /// Inside a frame that spans several descriptors (being dropped).
    pub in_multi: bool,
}

impl RxCursor {
    /// The state right after setup (RDH = 0, RDT = size - 1).
    pub fn new(ring: Ring) -> Self {
        Self {
            ring,
            next: 0,
            in_multi: false,
        }
    }

    /// The initial tail: every descriptor but one is the device's.
    pub fn initial_tail(&self) -> u32 {
        self.ring.prev(0)
    }

    /// Done with descriptor `next`: returns the new RDT value (that descriptor) and
    /// advances.
    pub fn advance(&mut self) -> u32 {
        let tail = self.next;
        self.next = self.ring.next(self.next);
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(len: u16, status: u8, errors: u8) -> RxDesc {
        RxDesc::from_word(u64::from(len) | u64::from(status) << 32 | u64::from(errors) << 40)
    }

    #[test]
    fn rx_decode_and_verdicts() {
        let d = rx(60, RX_STATUS_DD | RX_STATUS_EOP, 0);
        assert!(d.done());
        assert_eq!(d.len, 60);
        assert_eq!(rx_verdict(d, 2048, false), (RxVerdict::Frame(60), false));
        assert!(!rx(60, 0, 0).done());
        let crc = rx(60, RX_STATUS_DD | RX_STATUS_EOP, 1);
        assert_eq!(rx_verdict(crc, 2048, false).0, RxVerdict::Error);
        // Checksum errors are not fatal.
        let csum = rx(60, RX_STATUS_DD | RX_STATUS_EOP, 1 << 5);
        assert_eq!(rx_verdict(csum, 2048, false).0, RxVerdict::Frame(60));
        assert_eq!(
            rx_verdict(rx(10, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, false).0,
            RxVerdict::Garbage
        );
        assert_eq!(
            rx_verdict(rx(3000, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, false).0,
            RxVerdict::Garbage
        );
        assert_eq!(
            rx_verdict(rx(1600, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, false).0,
            RxVerdict::Oversized
        );
        assert_eq!(
            rx_verdict(rx(1514, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, false).0,
            RxVerdict::Frame(1514)
        );
    }

    #[test]
    fn multi_descriptor_frames_are_dropped_whole() {
        let first = rx(2048, RX_STATUS_DD, 0);
        let (v, m) = rx_verdict(first, 2048, false);
        assert_eq!((v, m), (RxVerdict::Oversized, true));
        let (v, m) = rx_verdict(rx(2048, RX_STATUS_DD, 0), 2048, m);
        assert_eq!((v, m), (RxVerdict::Oversized, true));
        let (v, m) = rx_verdict(rx(100, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, m);
        assert_eq!((v, m), (RxVerdict::Oversized, false));
        let (v, _) = rx_verdict(rx(100, RX_STATUS_DD | RX_STATUS_EOP, 0), 2048, m);
        assert_eq!(v, RxVerdict::Frame(100));
    }

    #[test]
    fn tx_words() {
        let w = tx_word(1514);
        assert_eq!(w & 0xffff, 1514);
        assert_eq!((w >> 24) as u8, TX_CMD_EOP | TX_CMD_IFCS | TX_CMD_RS);
        assert!(!tx_done(w));
        assert!(tx_done(w | 1 << 32));
    }

    #[test]
    fn ring_arithmetic() {
        let r = Ring::new(8);
        assert_eq!(r.next(7), 0);
        assert_eq!(r.prev(0), 7);
        assert_eq!(r.distance(6, 2), 4);
        assert_eq!(r.distance(2, 2), 0);
        assert!(r.valid(7) && !r.valid(8));
    }

    #[test]
    fn tx_cursor_fills_to_size_minus_one_and_reclaims_in_order() {
        let mut t = TxCursor::new(Ring::new(8));
        let claimed: Vec<u32> = core::iter::from_fn(|| t.claim()).collect();
        assert_eq!(claimed, (0..7).collect::<Vec<_>>());
        assert!(t.full());
        assert_eq!(t.in_flight(), 7);
        // Device not done with 0: nothing reclaimed.
        assert!(!t.reclaim_one(|_| false));
        assert!(t.reclaim_one(|i| i == 0));
        assert!(t.reclaim_one(|i| i == 1));
        assert_eq!(t.in_flight(), 5);
        assert_eq!(t.claim(), Some(7));
        assert_eq!(t.claim(), Some(0));
        assert!(t.full());
        while t.reclaim_one(|_| true) {}
        assert_eq!(t.in_flight(), 0);
        assert!(!t.reclaim_one(|_| true));
    }

    #[test]
    fn rx_cursor_wraps() {
        let mut r = RxCursor::new(Ring::new(8));
        assert_eq!(r.initial_tail(), 7);
        for i in 0..8 {
            assert_eq!(r.advance(), i);
        }
        assert_eq!(r.next, 0);
        assert_eq!(r.advance(), 0);
    }
}
