//! Delta compression of re-sent pages (XBZRLE-like, as QEMU's).
//!
//! The source keeps, within a byte budget, the last version it sent of each page
//! ([`DeltaCache`]). When a page is dirty again, it encodes the new contents against
//! that version as runs: a varint count of unchanged bytes, a varint count of changed
//! bytes, then those new bytes; repeated until the page is covered (a trailing
//! unchanged run is implied). The destination holds exactly that previous version (it
//! is what it received), so [`apply`] turns it into the new page in place. A delta is
//! only sent when it is smaller than the page; the stream checksum covers the result.
//!
//! ```text
//!  delta := { unchanged: varint, changed: varint (>= 1), bytes[changed] }*
//!  varint: 7 bits per byte, low first, high bit = more (at most 2 bytes for 4096)
//! ```

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use super::wire::PAGE;

/// Largest encoded delta worth sending: above this a full page is as cheap.
pub const MAX_DELTA: usize = PAGE - 64;

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_varint(data: &[u8], off: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    for shift in [0, 7, 14] {
        let b = *data.get(*off)?;
        *off += 1;
        v |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None // longer than any offset in a page
}

/// Encodes `new` against `old` (both [`PAGE`] bytes) into `out`; returns false (and
/// leaves `out` as it was) when the delta would exceed `limit` bytes.
pub fn encode(old: &[u8], new: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let mut i = 0;
    // Words first: the emulated CPU is slow per byte, and most of a re-dirtied page
    // is usually unchanged.
    while i < PAGE {
        let run_start = i;
        while i < PAGE && old[i] == new[i] {
            i += if i % 8 == 0 && i + 8 <= PAGE && old[i..i + 8] == new[i..i + 8] {
                8
            } else {
                1
            };
        }
        if i >= PAGE {
            break; // trailing unchanged run: implied
        }
        let lit_start = i;
        while i < PAGE && old[i] != new[i] {
            i += 1;
        }
        put_varint(out, lit_start - run_start);
        put_varint(out, i - lit_start);
        out.extend_from_slice(&new[lit_start..i]);
        if out.len() - start > limit {
            out.truncate(start);
            return false;
        }
    }
    true
}

/// Why a delta does not apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaError {
    /// A run reaches past the end of the page, or a count is malformed.
    Overrun,
    /// A run of zero changed bytes (never produced by [`encode`]).
    EmptyRun,
}

impl core::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Overrun => "delta runs past the end of the page",
            Self::EmptyRun => "delta with an empty run",
        })
    }
}

/// Applies `delta` to `page` in place. On error the page may be partly updated (the
/// caller discards the whole migration).
pub fn apply(page: &mut [u8], delta: &[u8]) -> Result<(), DeltaError> {
    let (mut off, mut pos) = (0, 0usize);
    while off < delta.len() {
        let skip = get_varint(delta, &mut off).ok_or(DeltaError::Overrun)?;
        let n = get_varint(delta, &mut off).ok_or(DeltaError::Overrun)?;
        if n == 0 {
            return Err(DeltaError::EmptyRun);
        }
        pos = pos.checked_add(skip).ok_or(DeltaError::Overrun)?;
        let end = pos.checked_add(n).ok_or(DeltaError::Overrun)?;
        if end > page.len() || off + n > delta.len() {
            return Err(DeltaError::Overrun);
        }
        page[pos..end].copy_from_slice(&delta[off..off + n]);
        off += n;
        pos = end;
    }
    Ok(())
}

/// The last version sent of up to `budget / PAGE` pages, oldest evicted first.
#[derive(Debug, Default)]
pub struct DeltaCache {
    pages: BTreeMap<usize, Box<[u8]>>,
    order: VecDeque<usize>,
    capacity: usize,
    /// Re-sent pages found in the cache.
    pub hits: u64,
    /// Re-sent pages not in the cache (evicted, or first sent as a zero page).
    pub misses: u64,
}

impl DeltaCache {
    /// A cache for `budget` bytes of pages (0: disabled).
    pub fn new(budget: usize) -> Self {
        Self {
            capacity: budget / PAGE,
            ..Default::default()
        }
    }

    /// Whether it caches anything.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Encodes `new` for page `pfn` as a delta against the cached version into `out`
    /// if that is smaller than [`MAX_DELTA`]; in every case remembers `new` as the
    /// version sent (the caller sends the page in full when this returns false).
    /// A failed allocation just leaves the page uncached.
    pub fn encode_and_update(&mut self, pfn: usize, new: &[u8], out: &mut Vec<u8>) -> bool {
        if !self.enabled() {
            return false;
        }
        if let Some(old) = self.pages.get_mut(&pfn) {
            self.hits += 1;
            let ok = encode(old, new, MAX_DELTA, out);
            old.copy_from_slice(new);
            return ok;
        }
        self.misses += 1;
        if self.pages.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.pages.remove(&oldest);
            }
        }
        let mut v = Vec::new();
        if v.try_reserve_exact(PAGE).is_ok() {
            v.extend_from_slice(new);
            self.pages.insert(pfn, v.into_boxed_slice());
            self.order.push_back(pfn);
        }
        false
    }

    /// Page `pfn` was sent as a zero page: a later delta would be against zeros,
    /// which the destination holds too, so keep it cached as zeros.
    pub fn sent_zero(&mut self, pfn: usize) {
        if let Some(old) = self.pages.get_mut(&pfn) {
            old.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn round_trips_sparse_and_dense_changes() {
        let old = page(1);
        for changes in [0usize, 1, 2, 17, 300, 1000] {
            let mut new = old.clone();
            for k in 0..changes {
                let at = (k * 7919) % PAGE;
                new[at] ^= 0xA5;
            }
            let mut d = Vec::new();
            let ok = encode(&old, &new, PAGE * 2, &mut d);
            assert!(ok);
            let mut got = old.clone();
            apply(&mut got, &d).unwrap();
            assert_eq!(got, new, "{changes} changes");
            if changes == 0 {
                assert!(d.is_empty());
            }
            if changes == 1 {
                assert!(d.len() <= 5, "{}", d.len());
            }
        }
    }

    #[test]
    fn a_rewritten_page_is_not_worth_a_delta() {
        let (old, new) = (page(1), page(2));
        let mut d = vec![9];
        assert!(!encode(&old, &new, MAX_DELTA, &mut d));
        assert_eq!(d, vec![9], "out is left as it was");
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let mut p = page(3);
        assert_eq!(apply(&mut p, &[0xFF, 0xFF, 0xFF]), Err(DeltaError::Overrun));
        assert_eq!(apply(&mut p, &[0, 0]), Err(DeltaError::EmptyRun));
        // 4095 unchanged, then 2 bytes: past the end.
        assert_eq!(
            apply(&mut p, &[0xFF, 0x1F, 2, 1, 2]),
            Err(DeltaError::Overrun)
        );
        // Announces 3 bytes, carries 1.
        assert_eq!(apply(&mut p, &[0, 3, 1]), Err(DeltaError::Overrun));
        // Random input never panics.
        let mut x = 0x1234_5678u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let d: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = apply(&mut p, &d);
        }
    }

    #[test]
    fn cache_remembers_what_was_sent_and_evicts_the_oldest() {
        let mut c = DeltaCache::new(2 * PAGE);
        let mut out = Vec::new();
        let a = page(1);
        assert!(!c.encode_and_update(5, &a, &mut out)); // first send: full page
        let mut a2 = a.clone();
        a2[100] ^= 1;
        assert!(c.encode_and_update(5, &a2, &mut out));
        let mut held = a.clone();
        apply(&mut held, &out).unwrap();
        assert_eq!(held, a2);
        c.encode_and_update(6, &a, &mut Vec::new());
        c.encode_and_update(7, &a, &mut Vec::new()); // evicts 5
        assert_eq!(c.len(), 2);
        assert!(!c.encode_and_update(5, &a2, &mut Vec::new()));
        assert_eq!((c.hits, c.misses), (1, 4));
        assert!(!DeltaCache::new(0).encode_and_update(1, &a, &mut Vec::new()));
    }
}
