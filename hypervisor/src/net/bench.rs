//! The `netbench` wire protocol and its data pattern, as pure logic (tested on the host).
//!
//! Every instance runs a sink on TCP port [`SINK_PORT`]. A sender connects and sends a
//! 12-byte header (`b"NBv1"` and the payload length as a little-endian u64), then the
//! payload: a deterministic pattern in which the 8-byte word at offset `8k` is
//! `pattern_word(k)` in little-endian order. The sink checks every byte as it arrives and,
//! once it has the whole payload (or the sender closed early), answers with a 9-byte
//! trailer: the byte count it received (u64 LE) and a status byte ([`Verdict`]), then
//! closes.
//!
//! ```text
//! sender                               sink (port 5001)
//!   | -- SYN / connect --------------->  |
//!   | -- "NBv1" len:u64 ------------->   |  parse header
//!   | -- pattern bytes (len) -------->   |  verify each byte
//!   |  <-------- count:u64 status:u8 --  |  all received (or FIN early)
//!   | -- FIN ------------------------->  |
//! ```

/// The sink's TCP port.
pub const SINK_PORT: u16 = 5001;
/// Header magic.
pub const MAGIC: [u8; 4] = *b"NBv1";
/// Header length.
pub const HEADER_LEN: usize = 12;
/// Trailer length.
pub const TRAILER_LEN: usize = 9;

/// The pattern word for word index `k`.
pub fn pattern_word(k: u64) -> u64 {
    (k ^ 0x6e62_656e_6368_2121).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The pattern byte at payload offset `i`.
pub fn pattern_byte(i: u64) -> u8 {
    pattern_word(i / 8).to_le_bytes()[(i % 8) as usize]
}

/// Fills `buf` with the pattern starting at payload offset `off`.
pub fn fill(off: u64, buf: &mut [u8]) {
    let mut i = 0;
    // Leading bytes up to a word boundary.
    while i < buf.len() && !(off + i as u64).is_multiple_of(8) {
        buf[i] = pattern_byte(off + i as u64);
        i += 1;
    }
    while i + 8 <= buf.len() {
        let k = (off + i as u64) / 8;
        buf[i..i + 8].copy_from_slice(&pattern_word(k).to_le_bytes());
        i += 8;
    }
    while i < buf.len() {
        buf[i] = pattern_byte(off + i as u64);
        i += 1;
    }
}

/// Checks `buf` against the pattern at offset `off`; returns the offset of the first
/// wrong byte.
pub fn check(off: u64, buf: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i < buf.len() && !(off + i as u64).is_multiple_of(8) {
        if buf[i] != pattern_byte(off + i as u64) {
            return Some(off + i as u64);
        }
        i += 1;
    }
    while i + 8 <= buf.len() {
        let k = (off + i as u64) / 8;
        let got = u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
        if got != pattern_word(k) {
            let diff = (got ^ pattern_word(k)).trailing_zeros() / 8;
            return Some(off + i as u64 + u64::from(diff));
        }
        i += 8;
    }
    while i < buf.len() {
        if buf[i] != pattern_byte(off + i as u64) {
            return Some(off + i as u64);
        }
        i += 1;
    }
    None
}

/// The header for a payload of `len` bytes.
pub fn header(len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The sink's result, sent as the trailer's status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every byte arrived and matched.
    Ok = 1,
    /// A byte did not match the pattern.
    Mismatch = 2,
    /// The sender closed before the announced length.
    Short = 3,
    /// The header was not a netbench header.
    BadHeader = 4,
}

impl Verdict {
    /// Decodes a status byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Ok,
            2 => Self::Mismatch,
            3 => Self::Short,
            4 => Self::BadHeader,
            _ => return None,
        })
    }
}

impl core::fmt::Display for Verdict {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Ok => "verified",
            Self::Mismatch => "data mismatch",
            Self::Short => "stream ended early",
            Self::BadHeader => "bad header",
        })
    }
}

/// Encodes a trailer.
pub fn trailer(count: u64, v: Verdict) -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[..8].copy_from_slice(&count.to_le_bytes());
    t[8] = v as u8;
    t
}

/// Decodes a trailer into (count, verdict).
pub fn parse_trailer(t: &[u8; TRAILER_LEN]) -> (u64, Option<Verdict>) {
    let mut c = [0u8; 8];
    c.copy_from_slice(&t[..8]);
    (u64::from_le_bytes(c), Verdict::from_u8(t[8]))
}

/// The sink's receive side for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkVerifier {
    header: [u8; HEADER_LEN],
    header_got: usize,
    expected: Option<u64>,
    /// Payload bytes received.
    pub received: u64,
    /// First mismatching offset.
    pub first_bad: Option<u64>,
    bad_header: bool,
}

impl Default for SinkVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl SinkVerifier {
    /// A fresh connection.
    pub fn new() -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_got: 0,
            expected: None,
            received: 0,
            first_bad: None,
            bad_header: false,
        }
    }

    /// Takes received bytes; returns how many were consumed (all, unless the payload is
    /// complete: bytes beyond it are left).
    pub fn feed(&mut self, mut data: &[u8]) -> usize {
        let total = data.len();
        if self.bad_header {
            return total;
        }
        if self.expected.is_none() {
            let n = (HEADER_LEN - self.header_got).min(data.len());
            self.header[self.header_got..self.header_got + n].copy_from_slice(&data[..n]);
            self.header_got += n;
            data = &data[n..];
            if self.header_got < HEADER_LEN {
                return total;
            }
            if self.header[..4] != MAGIC {
                self.bad_header = true;
                return total;
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&self.header[4..]);
            self.expected = Some(u64::from_le_bytes(l));
        }
        let want = self.expected.unwrap_or(0) - self.received;
        let n = (data.len() as u64).min(want) as usize;
        if self.first_bad.is_none() {
            self.first_bad = check(self.received, &data[..n]);
        }
        self.received += n as u64;
        total - (data.len() - n)
    }

    /// Whether the sink should answer now (whole payload, or a bad header).
    pub fn complete(&self) -> bool {
        self.bad_header || self.expected == Some(self.received)
    }

    /// Whether a header arrived.
    pub fn started(&self) -> bool {
        self.header_got > 0
    }

    /// The verdict, when the payload is complete or the sender closed.
    pub fn verdict(&self) -> Verdict {
        if self.bad_header {
            Verdict::BadHeader
        } else if self.first_bad.is_some() {
            Verdict::Mismatch
        } else if self.expected == Some(self.received) {
            Verdict::Ok
        } else {
            Verdict::Short
        }
    }
}

/// MB/s (10^6 bytes per second) in thousandths, from bytes and microseconds: one byte
/// per microsecond is exactly 1 MB/s.
pub fn mbps_milli(bytes: u64, us: u64) -> u64 {
    (u128::from(bytes) * 1000 / u128::from(us.max(1))) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check_agree_at_any_alignment() {
        let mut all = vec![0u8; 4096];
        fill(0, &mut all);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(*b, pattern_byte(i as u64));
        }
        for off in [0u64, 1, 7, 8, 13, 1000] {
            for len in [0usize, 1, 5, 8, 9, 100, 1460] {
                let mut b = vec![0u8; len];
                fill(off, &mut b);
                assert_eq!(b[..], all[off as usize..off as usize + len]);
                assert_eq!(check(off, &b), None);
                if len > 0 {
                    let j = len / 2;
                    b[j] ^= 0x10;
                    assert_eq!(check(off, &b), Some(off + j as u64));
                }
            }
        }
        // The pattern is not trivially periodic.
        assert_ne!(all[..8], all[8..16]);
        assert_ne!(all[..2048], all[2048..]);
    }

    fn stream(len: u64) -> Vec<u8> {
        let mut s = header(len).to_vec();
        let mut p = vec![0u8; len as usize];
        fill(0, &mut p);
        s.extend_from_slice(&p);
        s
    }

    #[test]
    fn sink_verifies_stream_in_any_chunking() {
        let s = stream(10_000);
        for chunk in [1usize, 5, 12, 13, 1460, 20_000] {
            let mut v = SinkVerifier::new();
            for c in s.chunks(chunk) {
                assert_eq!(v.feed(c), c.len());
            }
            assert!(v.complete());
            assert_eq!(v.received, 10_000);
            assert_eq!(v.verdict(), Verdict::Ok);
        }
    }

    #[test]
    fn sink_reports_mismatch_short_and_bad_header() {
        let mut s = stream(5000);
        s[HEADER_LEN + 4321] ^= 1;
        let mut v = SinkVerifier::new();
        v.feed(&s);
        assert_eq!(v.first_bad, Some(4321));
        assert_eq!(v.verdict(), Verdict::Mismatch);

        let s = stream(5000);
        let mut v = SinkVerifier::new();
        v.feed(&s[..3000]);
        assert!(!v.complete());
        assert_eq!(v.verdict(), Verdict::Short);

        let mut v = SinkVerifier::new();
        v.feed(b"GET / HTTP/1.0\r\n");
        assert!(v.complete());
        assert_eq!(v.verdict(), Verdict::BadHeader);

        // Bytes past the announced length are left unconsumed.
        let mut s = stream(100);
        s.extend_from_slice(b"junk");
        let mut v = SinkVerifier::new();
        assert_eq!(v.feed(&s), s.len() - 4);
        assert_eq!(v.verdict(), Verdict::Ok);
    }

    #[test]
    fn trailer_and_rate() {
        let t = trailer(2 << 20, Verdict::Ok);
        assert_eq!(parse_trailer(&t), (2 << 20, Some(Verdict::Ok)));
        let mut bad = t;
        bad[8] = 9;
        assert_eq!(parse_trailer(&bad).1, None);
        assert_eq!(mbps_milli(2_097_152, 1_000_000), 2097);
        assert_eq!(mbps_milli(1, 0), 1000);
    }
}
