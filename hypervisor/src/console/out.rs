//! The console's output queue: a fixed ring between everything that prints and the UART.
//!
//! Printing never waits for the serial line. At 115200 baud a 2 KiB stats table takes
//! about 170 ms to leave; written synchronously, that stalled the main loop, and with it
//! the guests, the network and the COMMIT of a migration. Output goes into this ring
//! instead and the main loop (and the VM-exit loop) drains it whenever the UART has room.
//!
//! The ring is bounded by construction. When it is full, bytes are dropped and counted;
//! the next write that fits first inserts a `[console: N bytes dropped]` line. Guest
//! output may only fill the ring up to [`GUEST_SHARE`] of its capacity, so a guest
//! flooding its console cannot crowd out the hypervisor's own lines (the prompt, errors,
//! the machine-readable `MIGRATION-STATS` lines).

/// Ring capacity in bytes.
pub const CAPACITY: usize = 64 * 1024;
/// Fill level above which guest output is dropped (the rest is the hypervisor's).
pub const GUEST_SHARE: usize = CAPACITY / 2;

/// Who is writing: decides how much of the ring the write may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The hypervisor: the console, logs, migration figures.
    Hypervisor,
    /// A guest's console output.
    Guest,
}

/// Counters of the output queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutStats {
    /// Bytes waiting for the UART.
    pub queued: usize,
    /// Highest fill level seen.
    pub high_water: usize,
    /// Hypervisor bytes dropped because the ring was full.
    pub dropped_hv: u64,
    /// Guest bytes dropped because the guest share was full.
    pub dropped_guest: u64,
}

/// A byte ring of [`CAPACITY`] bytes.
pub struct OutRing {
    buf: [u8; CAPACITY],
    head: usize,
    len: usize,
    /// Bytes dropped since the last drop notice.
    pending_notice: u64,
    stats: OutStats,
}

impl Default for OutRing {
    fn default() -> Self {
        Self::new()
    }
}

impl OutRing {
    /// An empty ring.
    pub const fn new() -> Self {
        Self {
            buf: [0; CAPACITY],
            head: 0,
            len: 0,
            pending_notice: 0,
            stats: OutStats {
                queued: 0,
                high_water: 0,
                dropped_hv: 0,
                dropped_guest: 0,
            },
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Counters.
    pub fn stats(&self) -> OutStats {
        OutStats {
            queued: self.len,
            ..self.stats
        }
    }

    fn limit(src: Source) -> usize {
        match src {
            Source::Hypervisor => CAPACITY,
            Source::Guest => GUEST_SHARE,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let at = (self.head + self.len) % CAPACITY;
            self.buf[at] = b;
            self.len += 1;
        }
        self.stats.high_water = self.stats.high_water.max(self.len);
    }

    /// Queues `bytes` whole, or drops them whole (a line is never cut in the middle).
    /// Returns whether they were queued.
    pub fn push(&mut self, bytes: &[u8], src: Source) -> bool {
        if self.len + bytes.len() > Self::limit(src) {
            match src {
                Source::Hypervisor => self.stats.dropped_hv += bytes.len() as u64,
                Source::Guest => self.stats.dropped_guest += bytes.len() as u64,
            }
            self.pending_notice += bytes.len() as u64;
            return false;
        }
        if self.pending_notice > 0 {
            let mut notice = NoticeBuf::default();
            notice.write(self.pending_notice);
            let n = notice.as_bytes();
            // The notice may use the whole ring: it is the hypervisor speaking.
            if self.len + n.len() + bytes.len() <= CAPACITY {
                self.put(n);
                self.pending_notice = 0;
            }
        }
        self.put(bytes);
        true
    }

    /// Takes up to `out.len()` queued bytes into `out`; returns how many.
    pub fn pop(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        for o in out.iter_mut().take(n) {
            *o = self.buf[self.head];
            self.head = (self.head + 1) % CAPACITY;
        }
        self.len -= n;
        n
    }
}

/// Formats the drop notice without allocating (the heap may be what is short).
struct NoticeBuf {
    b: [u8; 64],
    n: usize,
}

impl Default for NoticeBuf {
    fn default() -> Self {
        Self { b: [0; 64], n: 0 }
    }
}

impl NoticeBuf {
    fn push(&mut self, s: &[u8]) {
        for &c in s {
            if self.n < self.b.len() {
                self.b[self.n] = c;
                self.n += 1;
            }
        }
    }

    fn write(&mut self, dropped: u64) {
        self.push(b"\r\n[console: ");
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = dropped;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
        self.push(b" bytes dropped]\r\n");
    }

    fn as_bytes(&self) -> &[u8] {
        &self.b[..self.n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &mut OutRing) -> Vec<u8> {
        let mut all = Vec::new();
        let mut chunk = [0u8; 16];
        loop {
            let n = r.pop(&mut chunk);
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn fifo_order_across_wraparound() {
        let mut r = Box::new(OutRing::new());
        let mut expect = Vec::new();
        let mut got = Vec::new();
        for i in 0..10_000u32 {
            let line = format!("line {i}\n");
            assert!(r.push(line.as_bytes(), Source::Hypervisor));
            expect.extend_from_slice(line.as_bytes());
            if i % 3 == 0 {
                got.extend(drain(&mut r));
            }
        }
        got.extend(drain(&mut r));
        assert_eq!(got, expect);
    }

    #[test]
    fn guest_flood_leaves_room_for_the_hypervisor() {
        let mut r = Box::new(OutRing::new());
        let line = [b'x'; 100];
        let mut accepted = 0;
        for _ in 0..10_000 {
            if r.push(&line, Source::Guest) {
                accepted += 1;
            }
        }
        assert!(r.len() <= GUEST_SHARE);
        assert_eq!(accepted, GUEST_SHARE / 100);
        assert!(r.stats().dropped_guest > 0);
        // The hypervisor's line still fits, preceded by the drop notice.
        assert!(r.push(b"MIGRATION-STATS guest=1\n", Source::Hypervisor));
        let out = String::from_utf8(drain(&mut r)).unwrap();
        assert!(out.contains("bytes dropped]"), "{}", &out[out.len() - 80..]);
        assert!(out.ends_with("MIGRATION-STATS guest=1\n"));
    }

    #[test]
    fn full_ring_drops_whole_writes_and_counts_them() {
        let mut r = Box::new(OutRing::new());
        let big = vec![b'a'; CAPACITY - 10];
        assert!(r.push(&big, Source::Hypervisor));
        assert!(!r.push(b"0123456789abc", Source::Hypervisor));
        assert_eq!(r.stats().dropped_hv, 13);
        assert_eq!(r.stats().high_water, CAPACITY - 10);
        let mut sink = vec![0u8; CAPACITY];
        assert_eq!(r.pop(&mut sink), CAPACITY - 10);
        assert!(r.push(b"next\n", Source::Hypervisor));
        let out = String::from_utf8(drain(&mut r)).unwrap();
        assert_eq!(out, "\r\n[console: 13 bytes dropped]\r\nnext\n");
    }
}
