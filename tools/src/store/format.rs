//! The checkpoint file: one guest frozen at a checkpoint, self-describing, versioned,
//! sealed with SHA-256.
//!
//! Every integer is little-endian. Zero pages are not stored: a bitmap says which pages
//! are, and only those follow, in page order.
//!
//! ```text
//!  offset  size  field
//!  0       8     magic "HVCKPT01"
//!  8       2     format version (1)
//!  10      2     reserved, 0
//!  12      4     flags, 0 (reserved)
//!  16      8     guest memory bytes (a multiple of 4096)
//!  24      8     migrations before this checkpoint (Hello.migrations)
//!  32      8     guest time in ns at the snapshot (Hello.time_ns)
//!  40      8     created, Unix seconds (UTC)
//!  48      4     vCPU state length (at most 4096)
//!  52      4     device state length (at most 4096)
//!  56      8     stored (non-zero) pages
//!  64      32    SHA-256 of the whole guest memory (every page, zero pages included)
//!  96      1     checkpoint name length (1..=64, [A-Za-z0-9._-])
//!  97      1     image name length (1..=32, [A-Za-z0-9._-])
//!  98      2     arguments length (0..=256, printable ASCII)
//!  100     ..    checkpoint name, image name, arguments, vCPU state, device state
//!  ..      ..    page bitmap: ceil(pages / 64) u64 words; bit p % 64 of word p / 64 set:
//!                page p is stored (bits past the last page are 0)
//!  ..      ..    the stored pages, ascending page number, 4096 bytes each
//!  end-32  32    SHA-256 of every byte before it
//! ```
//!
//! [`decode`] verifies everything before it returns a byte of guest memory: magic and
//! version, that the length is exactly what the header describes (so a truncated or
//! extended file is named as such), the trailing SHA-256, every field's range, that
//! the bitmap counts the stored pages, and finally the memory's own SHA-256. SHA-256
//! (not the stream's fast page checksum) because a checkpoint lives on disk for a long
//! time and is restored on another machine: a collision-resistant hash also catches a
//! file edited on purpose, and the memory hash in the index names a snapshot uniquely.

use std::fmt;
use std::io::{self, Write};

use hypervisor::migration::wire::{self, PAGE};
use sha2::{Digest, Sha256};

/// File magic.
pub const MAGIC: [u8; 8] = *b"HVCKPT01";
/// Format version; any other is refused.
pub const VERSION: u16 = 1;
/// Bytes before the variable part.
pub const FIXED: usize = 100;
/// Bytes of the SHA-256 trailer.
pub const TRAILER: usize = 32;

/// A checkpointed guest, as held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Checkpoint name (`<image>-<n>`).
    pub name: String,
    /// Guest image name.
    pub image: String,
    /// Guest start arguments.
    pub args: String,
    /// Migrations before the snapshot.
    pub migrations: u64,
    /// Guest time (ns) at the snapshot.
    pub time_ns: u64,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
    /// vCPU state blob.
    pub vcpu: Vec<u8>,
    /// Device state blob.
    pub device: Vec<u8>,
    /// The whole guest memory (a multiple of [`PAGE`] bytes).
    pub mem: Vec<u8>,
}

/// Why a file is not a valid checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than the smallest checkpoint.
    TooShort(usize),
    /// Not a checkpoint file.
    BadMagic,
    /// Another format version.
    BadVersion(u16),
    /// The header describes a file of `want` bytes; this one has `have`.
    Length {
        /// Bytes present.
        have: u64,
        /// Bytes the header describes (None: it describes an impossible size).
        want: Option<u64>,
    },
    /// The SHA-256 trailer does not match the contents.
    HashMismatch,
    /// A field out of range.
    BadField(&'static str),
    /// The memory rebuilt from the pages does not match its recorded SHA-256.
    MemoryHashMismatch,
    /// The guest memory is larger than this store accepts.
    TooLarge {
        /// Memory bytes recorded.
        mem_bytes: u64,
        /// The store's limit.
        max: u64,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "truncated: {n} bytes, shorter than any checkpoint"),
            Self::BadMagic => f.write_str("not a checkpoint file (bad magic)"),
            Self::BadVersion(v) => {
                write!(
                    f,
                    "checkpoint format version {v} not supported (this is {VERSION})"
                )
            }
            Self::Length {
                have,
                want: Some(w),
            } if have < w => write!(f, "truncated: {have} of {w} bytes"),
            Self::Length {
                have,
                want: Some(w),
            } => {
                write!(f, "{have} bytes where the header describes {w}")
            }
            Self::Length { want: None, .. } => f.write_str("header describes an impossible size"),
            Self::HashMismatch => f.write_str("hash mismatch (the file was altered or damaged)"),
            Self::BadField(what) => write!(f, "bad field: {what}"),
            Self::MemoryHashMismatch => f.write_str("memory hash mismatch"),
            Self::TooLarge { mem_bytes, max } => {
                write!(
                    f,
                    "guest memory {mem_bytes} bytes exceeds this store's {max}"
                )
            }
        }
    }
}

/// SHA-256 as lowercase hex.
pub fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a guest memory image.
pub fn memory_sha256(mem: &[u8]) -> [u8; 32] {
    Sha256::digest(mem).into()
}

/// Whether `s` is a checkpoint name this store can hold.
pub fn valid_name(s: &str) -> bool {
    wire::valid_checkpoint_name(s)
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`encode`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// File bytes, trailer included.
    pub bytes: u64,
    /// SHA-256 of the guest memory.
    pub memory_sha256: [u8; 32],
    /// Non-zero pages stored.
    pub stored_pages: u64,
}

/// Writes `c` in the checkpoint format. Fails (writing nothing useful) on fields the
/// format cannot hold.
pub fn encode<W: Write>(c: &Checkpoint, out: W) -> io::Result<Written> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    if !valid_name(&c.name) {
        return Err(bad("checkpoint name"));
    }
    if !wire::valid_name(&c.image) || !wire::valid_args(&c.args) {
        return Err(bad("image name or arguments"));
    }
    if c.vcpu.len() > wire::MAX_STATE || c.device.len() > wire::MAX_STATE {
        return Err(bad("state blob too long"));
    }
    if c.mem.is_empty() || !c.mem.len().is_multiple_of(PAGE) {
        return Err(bad("memory size"));
    }
    let pages = c.mem.len() / PAGE;
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let mut stored = 0u64;
    for (p, page) in c.mem.chunks_exact(PAGE).enumerate() {
        if !wire::is_zero(page) {
            bitmap[p / 64] |= 1 << (p % 64);
            stored += 1;
        }
    }
    let mem_sha = memory_sha256(&c.mem);
    let mut w = Hashing {
        inner: out,
        sha: Sha256::new(),
        n: 0,
    };
    let mut h = Vec::with_capacity(FIXED + 512);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 2]);
    h.extend_from_slice(&0u32.to_le_bytes());
    for v in [c.mem.len() as u64, c.migrations, c.time_ns, c.created_unix] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&(c.vcpu.len() as u32).to_le_bytes());
    h.extend_from_slice(&(c.device.len() as u32).to_le_bytes());
    h.extend_from_slice(&stored.to_le_bytes());
    h.extend_from_slice(&mem_sha);
    h.push(c.name.len() as u8);
    h.push(c.image.len() as u8);
    h.extend_from_slice(&(c.args.len() as u16).to_le_bytes());
    debug_assert_eq!(h.len(), FIXED);
    for part in [
        c.name.as_bytes(),
        c.image.as_bytes(),
        c.args.as_bytes(),
        &c.vcpu,
        &c.device,
    ] {
        h.extend_from_slice(part);
    }
    for word in &bitmap {
        h.extend_from_slice(&word.to_le_bytes());
    }
    w.write_all(&h)?;
    for page in c.mem.chunks_exact(PAGE) {
        if !wire::is_zero(page) {
            w.write_all(page)?;
        }
    }
    let sum: [u8; 32] = w.sha.finalize_reset().into();
    w.inner.write_all(&sum)?;
    w.inner.flush()?;
    Ok(Written {
        bytes: w.n + TRAILER as u64,
        memory_sha256: mem_sha,
        stored_pages: stored,
    })
}

fn text<'a>(s: &'a [u8], what: &'static str) -> Result<&'a str, FormatError> {
    std::str::from_utf8(s).map_err(|_| FormatError::BadField(what))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// The file length the header of `b` (at least [`FIXED`] bytes) describes, or None if
/// it describes an impossible one.
fn described_len(b: &[u8]) -> Option<u64> {
    let mem_bytes = u64_at(b, 16);
    let pages = mem_bytes / PAGE as u64;
    let words = pages.div_ceil(64);
    let stored = u64_at(b, 56);
    let var = u64::from(b[96])
        + u64::from(b[97])
        + u64::from(u16_at(b, 98))
        + u64::from(u32_at(b, 48))
        + u64::from(u32_at(b, 52));
    (FIXED as u64 + TRAILER as u64)
        .checked_add(var)?
        .checked_add(words.checked_mul(8)?)?
        .checked_add(stored.checked_mul(PAGE as u64)?)
}

/// Verifies a whole checkpoint file and returns its contents. Nothing of the guest is
/// returned unless every check passed; `max_mem` bounds the memory it allocates.
pub fn decode(b: &[u8], max_mem: u64) -> Result<Checkpoint, FormatError> {
    if b.len() < 8 || b[..8] != MAGIC {
        return Err(if b.len() < 8 {
            FormatError::TooShort(b.len())
        } else {
            FormatError::BadMagic
        });
    }
    if b.len() < FIXED + TRAILER {
        return Err(FormatError::TooShort(b.len()));
    }
    let version = u16_at(b, 8);
    if version != VERSION {
        return Err(FormatError::BadVersion(version));
    }
    let want = described_len(b);
    if want != Some(b.len() as u64) {
        return Err(FormatError::Length {
            have: b.len() as u64,
            want,
        });
    }
    let (body, trailer) = b.split_at(b.len() - TRAILER);
    let sum: [u8; 32] = Sha256::digest(body).into();
    if sum[..] != trailer[..] {
        return Err(FormatError::HashMismatch);
    }
    // From here the bytes are what the store wrote (or someone who recomputed the
    // hash): still check every field, as for a peer's stream.
    if b[10..16] != [0; 6] {
        return Err(FormatError::BadField("reserved bytes or flags"));
    }
    let mem_bytes = u64_at(b, 16);
    if mem_bytes == 0 || !mem_bytes.is_multiple_of(PAGE as u64) {
        return Err(FormatError::BadField("memory size"));
    }
    if mem_bytes > max_mem {
        return Err(FormatError::TooLarge {
            mem_bytes,
            max: max_mem,
        });
    }
    let (vl, dl) = (u32_at(b, 48) as usize, u32_at(b, 52) as usize);
    if vl > wire::MAX_STATE || dl > wire::MAX_STATE {
        return Err(FormatError::BadField("state length"));
    }
    let stored = u64_at(b, 56);
    let (nl, il, al) = (b[96] as usize, b[97] as usize, u16_at(b, 98) as usize);
    let mut off = FIXED;
    let mut take = |n: usize| {
        let s = &body[off..off + n];
        off += n;
        s
    };
    let name = text(take(nl), "checkpoint name")?;
    let image = text(take(il), "image name")?;
    let args = text(take(al), "arguments")?;
    if !valid_name(name) {
        return Err(FormatError::BadField("checkpoint name"));
    }
    if !wire::valid_name(image) {
        return Err(FormatError::BadField("image name"));
    }
    if !wire::valid_args(args) {
        return Err(FormatError::BadField("arguments"));
    }
    let vcpu = take(vl).to_vec();
    let device = take(dl).to_vec();
    let pages = (mem_bytes / PAGE as u64) as usize;
    let words: Vec<u64> = take(pages.div_ceil(64) * 8)
        .chunks_exact(8)
        .map(|c| u64_at(c, 0))
        .collect();
    if !pages.is_multiple_of(64) && words.last().is_some_and(|w| w >> (pages % 64) != 0) {
        return Err(FormatError::BadField("bitmap bits past the last page"));
    }
    let counted: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    if counted != stored {
        return Err(FormatError::BadField("stored page count"));
    }
    let mut mem = Vec::new();
    mem.try_reserve_exact(mem_bytes as usize)
        .map_err(|_| FormatError::TooLarge {
            mem_bytes,
            max: max_mem,
        })?;
    mem.resize(mem_bytes as usize, 0);
    for p in 0..pages {
        if words[p / 64] & (1 << (p % 64)) != 0 {
            mem[p * PAGE..(p + 1) * PAGE].copy_from_slice(take(PAGE));
        }
    }
    if memory_sha256(&mem)[..] != b[64..96] {
        return Err(FormatError::MemoryHashMismatch);
    }
    Ok(Checkpoint {
        name: name.to_string(),
        image: image.to_string(),
        args: args.to_string(),
        migrations: u64_at(b, 24),
        time_ns: u64_at(b, 32),
        created_unix: u64_at(b, 40),
        vcpu,
        device,
        mem,
    })
}

/// The recorded memory SHA-256 of a file that passed [`decode`].
pub fn recorded_memory_sha256(b: &[u8]) -> Option<[u8; 32]> {
    b.get(64..96)?.try_into().ok()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (the proleptic Gregorian calendar, UTC;
/// Howard Hinnant's days-to-civil algorithm).
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}
