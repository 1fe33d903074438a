//! The migration stream: one module owns the wire format.
//!
//! Every message is a fixed 8-byte header and a payload of the length it announces:
//!
//! ```text
//!  byte 0     1       2..4      4..8
//!  [ tag ][ flags=0 ][ rsvd=0 ][ payload length, u32 LE ][ payload ... ]
//! ```
//!
//! | tag | message   | payload                                                    | dir |
//! |-----|-----------|------------------------------------------------------------|-----|
//! | 0   | (invalid) | never sent: a zeroed header is an error                    |     |
//! | 1   | Hello     | magic "HVMIGR01", version u16, rsvd u16, flags u32 (1 = may send DeltaPage), memory bytes u64, migrations u64, guest time ns u64, name len u16, args len u16, name, args | S→D |
//! | 2   | Page      | pfn u64, 4096 bytes                                        | S→D |
//! | 3   | ZeroPage  | pfn u64 (a page of zeros: header only)                     | S→D |
//! | 4   | RoundEnd  | round u32, pages u32                                       | S→D |
//! | 5   | Vcpu      | the vCPU state (at most 4096 bytes)                        | S→D |
//! | 6   | Device    | the PV-device state (at most 4096 bytes)                   | S→D |
//! | 7   | End       | pages u64, checksum u64                                    | S→D |
//! | 9   | DeltaPage | pfn u64, then a delta against the page's previous version ([`super::delta`]), at most 4032 bytes; only when Hello announced it | S→D |
//! | 8   | Digest    | first pfn u64, then 1..=128 hashes u64 of consecutive pages of the guest's memory at the freeze (`verify=full`; between Device and End, covering every page in order) | S→D |
//! | 10  | Missing   | post-copy: first word u64, then 1..=64 bitmap words u64 (bit p of word w: page 64w+p is not held by the destination and will come later); in order, covering every page, before Vcpu | S→D |
//! | 13  | Recover   | post-copy recovery, first message on a new connection from the destination: the guest's Hello time ns u64, memory bytes u64, page messages received u64; then its Missing bitmap (D→S); the source answers Ready and resumes sending | D→S |
//! | 12  | Fetch     | restore: checkpoint name (1..=64 of `[A-Za-z0-9._-]`); the first message on a connection a hypervisor opens to a store, which answers with that checkpoint's stream (or Reject) | D→S |
//! | 11  | PostEnd   | post-copy hand-over point in place of End: page messages so far u64, pages still missing u64 | S→D |
//! | 16  | Ready     | empty: the destination holds and has checked everything    | D→S |
//! | 17  | Reject    | reason code u32, message (at most 200 bytes)               | D→S |
//! | 18  | Commit    | the source has given the guest up; its part of the pause: freeze→state sent u64, state sent→READY u64, READY→COMMIT u64 (µs, source clock) | S→D |
//! | 19  | Abort     | reason code u32, message (at most 200 bytes)               | S→D |
//! | 20  | Resumed   | the guest runs here: READY→COMMIT on the wire u64, COMMIT→resume u64, total downtime u64 (µs) | D→S |
//! | 21  | Request   | post-copy: the guest waits for page pfn u64; send it (and its neighbours) first | D→S |
//! | 22  | PostDone  | post-copy: every page arrived and the checksum matched; remote faults u64, fault service median u64 and max u64 (µs), COMMIT→last page u64 (µs) | D→S |
//!
//! The sequence (see DESIGN.md, migration semantics):
//!
//! ```text
//!  source                                   destination
//!    Hello ───────────────────────────────►  validate, allocate memory
//!    Page/ZeroPage x all, RoundEnd(0) ────►  write pages
//!    Page/ZeroPage x dirty, RoundEnd(n) ──►  ...
//!    [guest frozen] last pages, Vcpu,
//!    Device, [Digest x pages/128,]
//!    End(checksum) ───────────────────────►  check digests, checksum and state
//!                       ◄───────────────── Ready   (guest built, NOT running)
//!    [guest gone] Commit(times) ──────────►  resume guest (clock += the pause)
//!                       ◄───────────────── Resumed(times)  (first instruction ran)
//!  any failure before Commit: Reject/Abort or a closed link; destination discards,
//!  the guest runs on at the source.
//! ```
//!
//! Post-copy (Hello flag POSTCOPY; `mode=postcopy`, or `mode=hybrid` when pre-copy
//! rounds stop converging) hands the guest over before its memory:
//!
//! ```text
//!    [guest frozen] Missing x n, Vcpu,
//!    Device, PostEnd ─────────────────────►  install guest, pages in Missing unmapped
//!                       ◄───────────────── Ready
//!    [guest gone] Commit ─────────────────►  resume guest; a touch of a missing page
//!                       ◄───────────────── Resumed          blocks it, and
//!                       ◄───────────────── Request(pfn)     asks for it
//!    Page(pfn), neighbours, ... ──────────►  map the page, wake the guest
//!    remaining pages once each, End ──────►  checksum over all memory
//!                       ◄───────────────── PostDone(figures): the source frees its copy
//! ```
//!
//! Downtime is the pause the guest sees: from its freeze on the source to its first
//! instruction on the destination. Each side measures its part on its own clock; the
//! time COMMIT spends on the wire is estimated as half the round trip READY→COMMIT that
//! the destination measures, minus the source's own READY→COMMIT delay. The destination
//! adds the parts and reports them in Resumed, so both sides print the same figure.
//!
//! Text a peer sends is constrained on decode: the image name is `[A-Za-z0-9._-]`, the
//! arguments printable ASCII, so a peer cannot inject terminal escapes or forge the
//! console's machine-readable lines; reasons are printed through a sanitizer.
//!
//! The [`Decoder`] is incremental (TCP delivers arbitrary pieces), bounds every length
//! before buffering, and never panics; ordering and page numbers are checked by the
//! receiver, which knows the guest's size.

use alloc::string::String;
use alloc::vec::Vec;

/// Page size on the wire.
pub const PAGE: usize = 4096;
/// Stream magic.
pub const MAGIC: [u8; 8] = *b"HVMIGR01";
/// Stream version; a receiver rejects any other.
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER: usize = 8;
/// Longest guest image name.
pub const MAX_NAME: usize = 32;
/// Longest guest argument string.
pub const MAX_ARGS: usize = 256;
/// Longest opaque state blob.
pub const MAX_STATE: usize = 4096;
/// Longest reason text.
pub const MAX_REASON: usize = 200;
const HELLO_FIXED: usize = 8 + 2 + 2 + 4 + 8 + 8 + 8 + 2 + 2;
const MAX_PAYLOAD: usize = 8 + PAGE;

/// Message tags.
#[allow(missing_docs)]
pub mod tag {
    pub const HELLO: u8 = 1;
    pub const PAGE: u8 = 2;
    pub const ZERO: u8 = 3;
    pub const ROUND_END: u8 = 4;
    pub const VCPU: u8 = 5;
    pub const DEVICE: u8 = 6;
    pub const END: u8 = 7;
    pub const DIGEST: u8 = 8;
    pub const DELTA: u8 = 9;
    pub const MISSING: u8 = 10;
    pub const POST_END: u8 = 11;
    pub const FETCH: u8 = 12;
    pub const RECOVER: u8 = 13;
    pub const READY: u8 = 16;
    pub const REJECT: u8 = 17;
    pub const COMMIT: u8 = 18;
    pub const ABORT: u8 = 19;
    pub const RESUMED: u8 = 20;
    pub const REQUEST: u8 = 21;
    pub const POST_DONE: u8 = 22;
}

/// Bitmap words per Missing message (4096 pages).
pub const MISSING_WORDS: usize = 64;

/// The destination's post-copy figures, carried by PostDone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostFigures {
    /// Times the guest touched a page that had not arrived.
    pub faults: u64,
    /// Median time from such a touch to the page being mapped (µs, destination clock).
    pub fault_median_us: u64,
    /// Longest such time (µs).
    pub fault_max_us: u64,
    /// COMMIT to the last page mapped (µs).
    pub last_page_us: u64,
}

/// The source's part of the pause, carried by Commit (µs, source clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitTimes {
    /// Guest frozen to the last byte of the state handed to the link.
    pub freeze_to_sent_us: u64,
    /// State handed to the link to READY received.
    pub sent_to_ready_us: u64,
    /// READY received to COMMIT handed to the link.
    pub ready_to_commit_us: u64,
}

/// The destination's account of the pause, carried by Resumed (µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumedTimes {
    /// READY received at the source to COMMIT received here (the source's own delay
    /// plus the estimated one-way latency).
    pub commit_wire_us: u64,
    /// COMMIT received to the guest's first instruction here.
    pub commit_to_resume_us: u64,
    /// The whole pause: freeze on the source to resume here.
    pub downtime_us: u64,
}

/// Hello flags: what the source may send beyond the base stream.
pub mod hello_flags {
    /// DeltaPage messages (re-sent pages as deltas, `cache=` on the source).
    pub const DELTA: u32 = 1;
    /// The stream may hand the guest over before all of its memory (post-copy).
    pub const POSTCOPY: u32 = 2;
    /// A checkpoint: the source keeps running the guest. READY then COMMIT mark the
    /// snapshot as complete, not a hand-over (sent to a store).
    pub const CHECKPOINT: u32 = 4;
    /// A restore: the stream comes from a stored checkpoint, not a running guest
    /// (the guest learns it was restored).
    pub const RESTORED: u32 = 8;
    /// Every flag this version knows; a Hello with others is refused.
    pub const KNOWN: u32 = DELTA | POSTCOPY | CHECKPOINT | RESTORED;
}

/// Longest checkpoint name in a Fetch.
pub const MAX_CHECKPOINT_NAME: usize = 64;

/// Whether `s` is a valid checkpoint name (1..=64 of `[A-Za-z0-9._-]`).
pub fn valid_checkpoint_name(s: &str) -> bool {
    (1..=MAX_CHECKPOINT_NAME).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The guest's configuration, sent first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`hello_flags`] the source uses in this stream.
    pub flags: u32,
    /// Guest memory in bytes (a multiple of the page size).
    pub mem_bytes: u64,
    /// How many times the guest has migrated before this one.
    pub migrations: u64,
    /// The guest's monotonic clock at the start of the migration.
    pub time_ns: u64,
    /// Image name.
    pub name: String,
    /// Start arguments.
    pub args: String,
}

/// A decoded message; page data and blobs borrow the decoder's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Stream start.
    Hello(Hello),
    /// One page.
    Page {
        /// Guest frame number.
        pfn: u64,
        /// Its 4096 bytes.
        data: &'a [u8],
    },
    /// A page as a delta against the version the destination holds.
    DeltaPage {
        /// Guest frame number.
        pfn: u64,
        /// The encoded delta ([`super::delta::apply`]).
        delta: &'a [u8],
    },
    /// A page of zeros.
    ZeroPage {
        /// Guest frame number.
        pfn: u64,
    },
    /// End of a pre-copy round.
    RoundEnd {
        /// Round number.
        round: u32,
        /// Pages (including zero pages) sent in it.
        pages: u32,
    },
    /// vCPU state.
    Vcpu(&'a [u8]),
    /// PV-device state.
    Device(&'a [u8]),
    /// Hashes of the guest's real memory at the freeze (`verify=full`).
    Digest {
        /// Page of the first hash.
        first: u64,
        /// 8-byte little-endian hashes ([`full_hash`]) of pages `first..`.
        hashes: &'a [u8],
    },
    /// Stream end.
    End {
        /// Page messages in the whole stream.
        pages: u64,
        /// [`Checksum`] over the final memory.
        checksum: u64,
    },
    /// Destination is ready.
    Ready,
    /// Destination refuses.
    Reject {
        /// Reason code.
        code: u32,
        /// Reason text.
        reason: &'a str,
    },
    /// Source commits the hand-over.
    Commit(CommitTimes),
    /// The guest runs on the destination.
    Resumed(ResumedTimes),
    /// Source aborts.
    Abort {
        /// Reason code.
        code: u32,
        /// Reason text.
        reason: &'a str,
    },
    /// Pages the destination must fetch later (post-copy).
    Missing {
        /// Index of the first bitmap word.
        first: u64,
        /// Little-endian bitmap words.
        words: &'a [u8],
    },
    /// Post-copy hand-over point.
    PostEnd {
        /// Page messages so far.
        pages: u64,
        /// Pages the destination does not hold yet.
        missing: u64,
    },
    /// The destination's guest waits for this page.
    Request {
        /// Guest frame number.
        pfn: u64,
    },
    /// Post-copy finished on the destination.
    PostDone(PostFigures),
    /// Restore: send the stream of this stored checkpoint.
    Fetch(&'a str),
    /// Post-copy recovery: the destination reconnects for an interrupted post-copy.
    Recover {
        /// The guest's clock in the interrupted stream's Hello (identifies it).
        time_ns: u64,
        /// Its memory size.
        mem_bytes: u64,
        /// Page messages the destination received.
        pages: u64,
    },
}

/// A malformed stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Tag 0 or an unknown tag.
    BadTag(u8),
    /// Non-zero flags or reserved bits.
    BadHeader,
    /// A payload length that does not fit its message.
    BadLength {
        /// The tag.
        tag: u8,
        /// The length announced.
        len: u32,
    },
    /// Not our magic.
    BadMagic,
    /// Another stream version.
    BadVersion(u16),
    /// A field out of range (text not UTF-8, memory size not page aligned, ...).
    BadField(&'static str),
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadTag(t) => write!(f, "unknown message tag {t}"),
            Self::BadHeader => f.write_str("non-zero reserved header bits"),
            Self::BadLength { tag, len } => write!(f, "bad length {len} for message tag {tag}"),
            Self::BadMagic => f.write_str("bad stream magic"),
            Self::BadVersion(v) => {
                write!(f, "stream version {v} not supported (this is {VERSION})")
            }
            Self::BadField(what) => write!(f, "bad field: {what}"),
        }
    }
}

fn header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

/// Appends a Hello. Name and args are truncated to their limits (at a character
/// boundary, so that the receiver's UTF-8 check accepts them).
pub fn put_hello(out: &mut Vec<u8>, h: &Hello) {
    let (name, args) = (clip(&h.name, MAX_NAME), clip(&h.args, MAX_ARGS));
    header(out, tag::HELLO, HELLO_FIXED + name.len() + args.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&h.mem_bytes.to_le_bytes());
    out.extend_from_slice(&h.migrations.to_le_bytes());
    out.extend_from_slice(&h.time_ns.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(args.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(args);
}

/// Appends a Page.
pub fn put_page(out: &mut Vec<u8>, pfn: u64, data: &[u8]) {
    debug_assert_eq!(data.len(), PAGE);
    header(out, tag::PAGE, 8 + PAGE);
    out.extend_from_slice(&pfn.to_le_bytes());
    out.extend_from_slice(data);
}

/// Appends a DeltaPage.
pub fn put_delta(out: &mut Vec<u8>, pfn: u64, delta: &[u8]) {
    header(out, tag::DELTA, 8 + delta.len());
    out.extend_from_slice(&pfn.to_le_bytes());
    out.extend_from_slice(delta);
}

/// Appends a ZeroPage.
pub fn put_zero(out: &mut Vec<u8>, pfn: u64) {
    header(out, tag::ZERO, 8);
    out.extend_from_slice(&pfn.to_le_bytes());
}

/// Appends a RoundEnd.
pub fn put_round_end(out: &mut Vec<u8>, round: u32, pages: u32) {
    header(out, tag::ROUND_END, 8);
    out.extend_from_slice(&round.to_le_bytes());
    out.extend_from_slice(&pages.to_le_bytes());
}

/// Appends a state blob (Vcpu or Device); `blob` must be at most [`MAX_STATE`].
pub fn put_state(out: &mut Vec<u8>, t: u8, blob: &[u8]) {
    header(out, t, blob.len());
    out.extend_from_slice(blob);
}

/// Appends an End.
pub fn put_end(out: &mut Vec<u8>, pages: u64, checksum: u64) {
    header(out, tag::END, 16);
    out.extend_from_slice(&pages.to_le_bytes());
    out.extend_from_slice(&checksum.to_le_bytes());
}

/// Appends an empty control message (Ready).
pub fn put_control(out: &mut Vec<u8>, t: u8) {
    header(out, t, 0);
}

/// Appends a Commit with the source's part of the pause.
pub fn put_commit(out: &mut Vec<u8>, t: &CommitTimes) {
    header(out, tag::COMMIT, 24);
    for v in [
        t.freeze_to_sent_us,
        t.sent_to_ready_us,
        t.ready_to_commit_us,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends a Missing message: bitmap words `first..first + words.len()` (at most
/// [`MISSING_WORDS`]).
pub fn put_missing(out: &mut Vec<u8>, first: u64, words: &[u64]) {
    debug_assert!(!words.is_empty() && words.len() <= MISSING_WORDS);
    header(out, tag::MISSING, 8 + 8 * words.len());
    out.extend_from_slice(&first.to_le_bytes());
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Appends a Fetch for checkpoint `name` (must satisfy [`valid_checkpoint_name`]).
pub fn put_fetch(out: &mut Vec<u8>, name: &str) {
    let name = clip(name, MAX_CHECKPOINT_NAME);
    header(out, tag::FETCH, name.len());
    out.extend_from_slice(name);
}

/// Appends a Recover.
pub fn put_recover(out: &mut Vec<u8>, time_ns: u64, mem_bytes: u64, pages: u64) {
    header(out, tag::RECOVER, 24);
    for v in [time_ns, mem_bytes, pages] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends a PostEnd.
pub fn put_post_end(out: &mut Vec<u8>, pages: u64, missing: u64) {
    header(out, tag::POST_END, 16);
    out.extend_from_slice(&pages.to_le_bytes());
    out.extend_from_slice(&missing.to_le_bytes());
}

/// Appends a Request for page `pfn`.
pub fn put_request(out: &mut Vec<u8>, pfn: u64) {
    header(out, tag::REQUEST, 8);
    out.extend_from_slice(&pfn.to_le_bytes());
}

/// Appends a PostDone with the destination's figures.
pub fn put_post_done(out: &mut Vec<u8>, f: &PostFigures) {
    header(out, tag::POST_DONE, 32);
    for v in [f.faults, f.fault_median_us, f.fault_max_us, f.last_page_us] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends a Resumed with the destination's account of the pause.
pub fn put_resumed(out: &mut Vec<u8>, t: &ResumedTimes) {
    header(out, tag::RESUMED, 24);
    for v in [t.commit_wire_us, t.commit_to_resume_us, t.downtime_us] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Whether `s` is a valid guest image name: 1-32 of `[A-Za-z0-9._-]`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `s` is valid guest argument text: printable ASCII (spaces allowed).
pub fn valid_args(s: &str) -> bool {
    s.len() <= MAX_ARGS && s.bytes().all(|b| (0x20..0x7F).contains(&b))
}

/// `s` made safe to print on the console: printable ASCII kept, anything else (control
/// characters, escapes, newlines, non-ASCII) shown as `?`, at most `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// Appends a Reject or Abort with a reason.
pub fn put_reason(out: &mut Vec<u8>, t: u8, code: u32, reason: &str) {
    let r = clip(reason, MAX_REASON);
    header(out, t, 4 + r.len());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(r);
}

/// The first at most `max` bytes of `s`, cut at a character boundary so the text stays
/// valid UTF-8.
fn clip(s: &str, max: usize) -> &[u8] {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// Allowed payload lengths per tag.
fn length_ok(t: u8, len: usize) -> Result<bool, WireError> {
    Ok(match t {
        tag::HELLO => (HELLO_FIXED..=HELLO_FIXED + MAX_NAME + MAX_ARGS).contains(&len),
        tag::PAGE => len == 8 + PAGE,
        tag::ZERO | tag::ROUND_END | tag::REQUEST => len == 8,
        tag::MISSING => len > 8 && len <= 8 + 8 * MISSING_WORDS && (len - 8).is_multiple_of(8),
        tag::POST_END => len == 16,
        tag::FETCH => (1..=MAX_CHECKPOINT_NAME).contains(&len),
        tag::POST_DONE => len == 32,
        tag::VCPU | tag::DEVICE => len <= MAX_STATE,
        tag::END => len == 16,
        tag::DELTA => (8..=8 + super::delta::MAX_DELTA).contains(&len),
        tag::DIGEST => len > 8 && len <= 8 + 8 * DIGEST_PER_MSG && (len - 8).is_multiple_of(8),
        tag::READY => len == 0,
        tag::COMMIT | tag::RESUMED | tag::RECOVER => len == 24,
        tag::REJECT | tag::ABORT => (4..=4 + MAX_REASON).contains(&len),
        other => return Err(WireError::BadTag(other)),
    })
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

/// Incremental decoder: [`Decoder::push`] bytes until it says a message is complete,
/// then [`Decoder::take`] it.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Payload length of the current message, once its header is in.
    payload: Option<usize>,
    /// `take` handed out the buffered message; the next `push` starts afresh.
    consumed: bool,
    failed: Option<WireError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at a message boundary.
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(HEADER + MAX_PAYLOAD),
            payload: None,
            consumed: false,
            failed: None,
        }
    }

    fn complete(&self) -> bool {
        self.payload.is_some_and(|p| self.buf.len() == HEADER + p)
    }

    /// Consumes bytes from `input` until a message is complete or the input ends.
    /// Returns how many bytes were consumed and whether a message is ready. A bad
    /// header is an error at once, before any of its payload is buffered; after an
    /// error the decoder stays failed.
    pub fn push(&mut self, input: &[u8]) -> Result<(usize, bool), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.consumed {
            self.buf.clear();
            self.payload = None;
            self.consumed = false;
        }
        let mut used = 0;
        loop {
            if self.complete() {
                return Ok((used, true));
            }
            let need = HEADER + self.payload.unwrap_or(0);
            let n = (need - self.buf.len()).min(input.len() - used);
            self.buf.extend_from_slice(&input[used..used + n]);
            used += n;
            if self.buf.len() < need {
                return Ok((used, false));
            }
            if self.payload.is_none() {
                let (t, len) = (self.buf[0], u32_at(&self.buf, 4));
                if self.buf[1..4] != [0, 0, 0] {
                    return Err(self.fail(WireError::BadHeader));
                }
                match length_ok(t, len as usize) {
                    Err(e) => return Err(self.fail(e)),
                    Ok(false) => return Err(self.fail(WireError::BadLength { tag: t, len })),
                    Ok(true) => self.payload = Some(len as usize),
                }
            }
        }
    }

    fn fail(&mut self, e: WireError) -> WireError {
        self.failed = Some(e.clone());
        e
    }

    /// Decodes the complete message (call only after `push` reported one). The next
    /// `push` reuses the buffer, so the message must be dropped before it.
    pub fn take(&mut self) -> Result<Msg<'_>, WireError> {
        if !self.complete() || self.consumed {
            return Err(WireError::BadField("no complete message"));
        }
        self.consumed = true;
        let r = parse(self.buf[0], &self.buf[HEADER..]);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }
}

fn text<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str, WireError> {
    core::str::from_utf8(b).map_err(|_| WireError::BadField(what))
}

fn parse(t: u8, p: &[u8]) -> Result<Msg<'_>, WireError> {
    Ok(match t {
        tag::HELLO => {
            if p[0..8] != MAGIC {
                return Err(WireError::BadMagic);
            }
            let version = u16_at(p, 8);
            if version != VERSION {
                return Err(WireError::BadVersion(version));
            }
            if p[10..12] != [0; 2] {
                return Err(WireError::BadField("reserved Hello bytes"));
            }
            let flags = u32_at(p, 12);
            if flags & !hello_flags::KNOWN != 0 {
                return Err(WireError::BadField("unknown Hello flags"));
            }
            let mem_bytes = u64_at(p, 16);
            if mem_bytes == 0 || !mem_bytes.is_multiple_of(PAGE as u64) {
                return Err(WireError::BadField("memory size"));
            }
            let (nl, al) = (u16_at(p, 40) as usize, u16_at(p, 42) as usize);
            if nl > MAX_NAME || al > MAX_ARGS || HELLO_FIXED + nl + al != p.len() {
                return Err(WireError::BadField("name/args lengths"));
            }
            let name = text(&p[HELLO_FIXED..HELLO_FIXED + nl], "name")?;
            let args = text(&p[HELLO_FIXED + nl..], "args")?;
            if !valid_name(name) {
                return Err(WireError::BadField(
                    "image name (1-32 of A-Z a-z 0-9 . _ -)",
                ));
            }
            if !valid_args(args) {
                return Err(WireError::BadField("arguments (printable ASCII only)"));
            }
            Msg::Hello(Hello {
                flags,
                mem_bytes,
                migrations: u64_at(p, 24),
                time_ns: u64_at(p, 32),
                name: String::from(name),
                args: String::from(args),
            })
        }
        tag::PAGE => Msg::Page {
            pfn: u64_at(p, 0),
            data: &p[8..],
        },
        tag::ZERO => Msg::ZeroPage { pfn: u64_at(p, 0) },
        tag::ROUND_END => Msg::RoundEnd {
            round: u32_at(p, 0),
            pages: u32_at(p, 4),
        },
        tag::VCPU => Msg::Vcpu(p),
        tag::DEVICE => Msg::Device(p),
        tag::END => Msg::End {
            pages: u64_at(p, 0),
            checksum: u64_at(p, 8),
        },
        tag::DELTA => Msg::DeltaPage {
            pfn: u64_at(p, 0),
            delta: &p[8..],
        },
        tag::DIGEST => Msg::Digest {
            first: u64_at(p, 0),
            hashes: &p[8..],
        },
        tag::MISSING => Msg::Missing {
            first: u64_at(p, 0),
            words: &p[8..],
        },
        tag::POST_END => Msg::PostEnd {
            pages: u64_at(p, 0),
            missing: u64_at(p, 8),
        },
        tag::REQUEST => Msg::Request { pfn: u64_at(p, 0) },
        tag::RECOVER => {
            let mem_bytes = u64_at(p, 8);
            if mem_bytes == 0 || !mem_bytes.is_multiple_of(PAGE as u64) {
                return Err(WireError::BadField("memory size"));
            }
            Msg::Recover {
                time_ns: u64_at(p, 0),
                mem_bytes,
                pages: u64_at(p, 16),
            }
        }
        tag::FETCH => {
            let name = text(p, "checkpoint name")?;
            if !valid_checkpoint_name(name) {
                return Err(WireError::BadField(
                    "checkpoint name (1-64 of A-Z a-z 0-9 . _ -)",
                ));
            }
            Msg::Fetch(name)
        }
        tag::POST_DONE => Msg::PostDone(PostFigures {
            faults: u64_at(p, 0),
            fault_median_us: u64_at(p, 8),
            fault_max_us: u64_at(p, 16),
            last_page_us: u64_at(p, 24),
        }),
        tag::READY => Msg::Ready,
        tag::COMMIT => Msg::Commit(CommitTimes {
            freeze_to_sent_us: u64_at(p, 0),
            sent_to_ready_us: u64_at(p, 8),
            ready_to_commit_us: u64_at(p, 16),
        }),
        tag::RESUMED => Msg::Resumed(ResumedTimes {
            commit_wire_us: u64_at(p, 0),
            commit_to_resume_us: u64_at(p, 8),
            downtime_us: u64_at(p, 16),
        }),
        tag::REJECT => Msg::Reject {
            code: u32_at(p, 0),
            reason: text(&p[4..], "reason")?,
        },
        tag::ABORT => Msg::Abort {
            code: u32_at(p, 0),
            reason: text(&p[4..], "reason")?,
        },
        other => return Err(WireError::BadTag(other)),
    })
}

/// The end-to-end checksum: a sum over pages of a hash of (pfn, contents), so both
/// sides can build it incrementally as pages are sent or received, whatever the order,
/// replacing a page's earlier contribution when it is sent again.
pub fn page_hash(pfn: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ pfn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for c in data.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(5);
    }
    h
}

/// Hashes per Digest message: small, so that checking one costs the destination a few
/// milliseconds of the emulated CPU, not the whole main loop.
pub const DIGEST_PER_MSG: usize = 128;

/// The `verify=full` hash of page `pfn` holding `data`: the same value the stream
/// checksum uses for a page sent with these contents.
pub fn full_hash(pfn: u64, data: &[u8]) -> u64 {
    if is_zero(data) {
        zero_hash(pfn)
    } else {
        page_hash(pfn, data)
    }
}

/// Appends a Digest of `hashes` for pages `first..first + hashes.len()` (at most
/// [`DIGEST_PER_MSG`]).
pub fn put_digest(out: &mut Vec<u8>, first: u64, hashes: &[u64]) {
    debug_assert!(!hashes.is_empty() && hashes.len() <= DIGEST_PER_MSG);
    header(out, tag::DIGEST, 8 + 8 * hashes.len());
    out.extend_from_slice(&first.to_le_bytes());
    for h in hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

/// Hash of a zero page (cheap: no data to read).
pub fn zero_hash(pfn: u64) -> u64 {
    page_hash(pfn, &[])
}

/// Per-page hashes whose sum is the stream checksum.
#[derive(Clone, Debug, Default)]
pub struct Checksum {
    hashes: Vec<u64>,
    sum: u64,
}

impl Checksum {
    /// For a guest of `pages` pages, none recorded yet.
    pub fn new(pages: usize) -> Self {
        Self {
            hashes: alloc::vec![0; pages],
            sum: 0,
        }
    }

    /// Records the latest hash of page `pfn` (ignored when out of range).
    pub fn set(&mut self, pfn: usize, hash: u64) {
        if let Some(h) = self.hashes.get_mut(pfn) {
            self.sum = self.sum.wrapping_sub(*h).wrapping_add(hash);
            *h = hash;
        }
    }

    /// The checksum.
    pub fn value(&self) -> u64 {
        self.sum
    }
}

/// Whether a page is all zeros (word at a time: the emulator is slow per byte).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks_exact(8).all(|c| c == [0u8; 8])
}

/// Decoder-level checks (the protocol-level ones, with a receiver and a source, are in
/// `migration::tests`): partial input is never an error, every malformed header or
/// field gives its own error, and no length field makes the decoder buffer more than
/// one maximal message.
#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: deterministic, no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn hello() -> Hello {
        Hello {
            flags: 0,
            mem_bytes: 16 * PAGE as u64,
            migrations: 2,
            time_ns: 123_456_789,
            name: "verify".into(),
            args: "seed=7 pages=16".into(),
        }
    }

    /// One of each message and where each one ends.
    fn sample() -> (Vec<u8>, Vec<usize>) {
        let mut s = Vec::new();
        let mut ends = Vec::new();
        put_hello(&mut s, &hello());
        ends.push(s.len());
        let page: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        put_page(&mut s, 15, &page);
        ends.push(s.len());
        put_zero(&mut s, 0);
        ends.push(s.len());
        put_round_end(&mut s, 0, 2);
        ends.push(s.len());
        put_state(&mut s, tag::VCPU, &[9; 300]);
        ends.push(s.len());
        put_state(&mut s, tag::DEVICE, &[]);
        ends.push(s.len());
        put_end(&mut s, 2, 0xDEAD_BEEF);
        ends.push(s.len());
        put_control(&mut s, tag::READY);
        ends.push(s.len());
        put_commit(&mut s, &commit_times());
        ends.push(s.len());
        put_resumed(&mut s, &resumed_times());
        ends.push(s.len());
        put_reason(&mut s, tag::REJECT, 3, "checksum");
        ends.push(s.len());
        put_reason(&mut s, tag::ABORT, 1, "operator");
        ends.push(s.len());
        put_missing(&mut s, 0, &[u64::MAX, 5]);
        ends.push(s.len());
        put_post_end(&mut s, 3, 66);
        ends.push(s.len());
        put_request(&mut s, 42);
        ends.push(s.len());
        put_post_done(
            &mut s,
            &PostFigures {
                faults: 1,
                fault_median_us: 2,
                fault_max_us: 3,
                last_page_us: 4,
            },
        );
        ends.push(s.len());
        put_fetch(&mut s, "verify-1.ckpt");
        ends.push(s.len());
        put_recover(&mut s, 7, 8192, 9);
        ends.push(s.len());
        (s, ends)
    }

    fn commit_times() -> CommitTimes {
        CommitTimes {
            freeze_to_sent_us: 1,
            sent_to_ready_us: 2,
            ready_to_commit_us: 3,
        }
    }

    fn resumed_times() -> ResumedTimes {
        ResumedTimes {
            commit_wire_us: 4,
            commit_to_resume_us: 5,
            downtime_us: u64::MAX,
        }
    }

    #[test]
    fn peer_text_is_constrained() {
        assert!(valid_name("counter"));
        assert!(valid_name("my-guest_2.elf"));
        for bad in [
            "",
            "a b",
            "x\x1b[2J",
            "MIGRATION-STATS\nx",
            "é",
            &"a".repeat(33),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_args("period=100 rate=5"));
        assert!(!valid_args("a\nMIGRATION-STATS guest=1"));
        assert!(!valid_args("\x1b]0;owned\x07"));
        assert_eq!(
            printable("ok\x1b[31m\nMIGRATION-STATS", 100),
            "ok?[31m?MIGRATION-STATS"
        );
        assert_eq!(printable("abcdef", 3), "abc");
        // A Hello whose name carries an escape sequence is refused on decode.
        let mut s = Vec::new();
        let mut h = hello();
        h.name = String::from("x\x1b[2Jy");
        put_hello(&mut s, &h);
        assert_eq!(
            first_error(&s),
            WireError::BadField("image name (1-32 of A-Z a-z 0-9 . _ -)")
        );
        let mut s = Vec::new();
        let mut h = hello();
        h.args = String::from("a=1\r\nMIGRATION-STATS guest=9 outcome=ok");
        put_hello(&mut s, &h);
        assert_eq!(
            first_error(&s),
            WireError::BadField("arguments (printable ASCII only)")
        );
    }

    /// Feeds all of `s`; returns how many messages decoded, or the first error.
    fn decode_all(s: &[u8]) -> Result<usize, WireError> {
        let mut d = Decoder::new();
        let (mut off, mut n) = (0, 0);
        while off < s.len() {
            let (used, ready) = d.push(&s[off..])?;
            off += used;
            if ready {
                d.take()?;
                n += 1;
            } else {
                assert_eq!(off, s.len(), "push stopped early without a message");
            }
        }
        Ok(n)
    }

    fn first_error(s: &[u8]) -> WireError {
        decode_all(s).expect_err("stream should be rejected")
    }

    #[test]
    fn every_field_round_trips() {
        let (s, _) = sample();
        let mut d = Decoder::new();
        let mut off = 0;
        let mut next = |d: &mut Decoder| {
            let (used, ready) = d.push(&s[off..]).unwrap();
            assert!(ready);
            off += used;
        };
        next(&mut d);
        assert_eq!(d.take().unwrap(), Msg::Hello(hello()));
        next(&mut d);
        match d.take().unwrap() {
            Msg::Page { pfn, data } => {
                assert_eq!(pfn, 15);
                assert!(data.iter().enumerate().all(|(i, b)| *b == (i * 7) as u8));
            }
            m => panic!("{m:?}"),
        }
        let expect = [
            Msg::ZeroPage { pfn: 0 },
            Msg::RoundEnd { round: 0, pages: 2 },
            Msg::Vcpu(&[9; 300]),
            Msg::Device(&[]),
            Msg::End {
                pages: 2,
                checksum: 0xDEAD_BEEF,
            },
            Msg::Ready,
            Msg::Commit(commit_times()),
            Msg::Resumed(resumed_times()),
            Msg::Reject {
                code: 3,
                reason: "checksum",
            },
            Msg::Abort {
                code: 1,
                reason: "operator",
            },
        ];
        for e in expect {
            next(&mut d);
            assert_eq!(d.take().unwrap(), e);
        }
        let mut words = Vec::new();
        words.extend_from_slice(&u64::MAX.to_le_bytes());
        words.extend_from_slice(&5u64.to_le_bytes());
        let expect = [
            Msg::Missing {
                first: 0,
                words: &words,
            },
            Msg::PostEnd {
                pages: 3,
                missing: 66,
            },
            Msg::Request { pfn: 42 },
            Msg::PostDone(PostFigures {
                faults: 1,
                fault_median_us: 2,
                fault_max_us: 3,
                last_page_us: 4,
            }),
            Msg::Fetch("verify-1.ckpt"),
            Msg::Recover {
                time_ns: 7,
                mem_bytes: 8192,
                pages: 9,
            },
        ];
        for e in expect {
            next(&mut d);
            assert_eq!(d.take().unwrap(), e);
        }
        assert_eq!(off, s.len());
        // A second take of the same message is refused, not a panic.
        assert!(d.take().is_err());
    }

    #[test]
    fn truncation_at_every_offset_is_incomplete_not_an_error() {
        let (s, ends) = sample();
        for cut in 0..=s.len() {
            let complete = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(decode_all(&s[..cut]), Ok(complete), "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_and_random_chunks() {
        let (s, ends) = sample();
        let mut rng = Rng(0x1234_5678);
        for round in 0..50 {
            let mut d = Decoder::new();
            let (mut off, mut got) = (0, 0);
            while off < s.len() {
                let len = if round == 0 {
                    1
                } else {
                    1 + rng.next() as usize % 700
                };
                let chunk = &s[off..(off + len).min(s.len())];
                let mut used = 0;
                while used < chunk.len() {
                    let (n, ready) = d.push(&chunk[used..]).unwrap();
                    used += n;
                    if ready {
                        d.take().unwrap();
                        got += 1;
                        // A message completes exactly where the encoder ended it.
                        assert_eq!(off + used, ends[got - 1]);
                    }
                }
                off += chunk.len();
            }
            assert_eq!(got, ends.len());
        }
    }

    #[test]
    fn malformed_headers_and_fields() {
        let mut h = Vec::new();
        put_hello(&mut h, &hello());
        // Tag 0 (a zeroed header) and unknown tags.
        assert_eq!(first_error(&[0; HEADER]), WireError::BadTag(0));
        assert_eq!(
            first_error(&[14, 0, 0, 0, 0, 0, 0, 0]),
            WireError::BadTag(14)
        );
        assert_eq!(
            first_error(&[0xFF, 0, 0, 0, 0, 0, 0, 0]),
            WireError::BadTag(0xFF)
        );
        // Reserved header bytes.
        let mut s = h.clone();
        s[2] = 1;
        assert_eq!(first_error(&s), WireError::BadHeader);
        // Bad magic, bad version, reserved Hello bytes, memory size, name length.
        let mut s = h.clone();
        s[HEADER] ^= 0x20;
        assert_eq!(first_error(&s), WireError::BadMagic);
        let mut s = h.clone();
        s[HEADER + 8] = 1;
        assert_eq!(first_error(&s), WireError::BadVersion(1));
        let mut s = h.clone();
        s[HEADER + 10] = 1; // reserved
        assert!(matches!(first_error(&s), WireError::BadField(_)));
        for mem in [0u64, 4095, 4097] {
            let mut s = h.clone();
            s[HEADER + 16..HEADER + 24].copy_from_slice(&mem.to_le_bytes());
            assert_eq!(first_error(&s), WireError::BadField("memory size"), "{mem}");
        }
        let mut s = h.clone();
        s[HEADER + 40] += 1;
        assert_eq!(first_error(&s), WireError::BadField("name/args lengths"));
        // Non-UTF-8 name.
        let mut s = h.clone();
        s[HEADER + HELLO_FIXED] = 0xFF;
        assert_eq!(first_error(&s), WireError::BadField("name"));
        // A Hello with a flag this version does not know.
        let mut s = h.clone();
        s[HEADER + 12] = 0x80;
        assert_eq!(first_error(&s), WireError::BadField("unknown Hello flags"));
        // Lengths that do not fit their message.
        for (t, len) in [
            (tag::PAGE, 8 + PAGE as u32 - 1),
            (tag::PAGE, 8),
            (tag::ZERO, 16),
            (tag::END, 8),
            (tag::DIGEST, 8),
            (tag::MISSING, 8),
            (tag::MISSING, 8 + 8 * MISSING_WORDS as u32 + 8),
            (tag::MISSING, 12),
            (tag::POST_END, 8),
            (tag::REQUEST, 16),
            (tag::POST_DONE, 24),
            (tag::DELTA, 7),
            (tag::DELTA, 8 + super::super::delta::MAX_DELTA as u32 + 1),
            (tag::DIGEST, 8 + 12),
            (tag::DIGEST, 8 + 8 * DIGEST_PER_MSG as u32 + 8),
            (tag::READY, 1),
            (tag::REJECT, 3),
            (tag::REJECT, 4 + MAX_REASON as u32 + 1),
            (tag::VCPU, MAX_STATE as u32 + 1),
            (tag::DEVICE, u32::MAX),
            (tag::HELLO, 10),
        ] {
            let mut s = alloc::vec![t, 0, 0, 0];
            s.extend_from_slice(&len.to_le_bytes());
            assert_eq!(first_error(&s), WireError::BadLength { tag: t, len });
        }
        // Non-UTF-8 reason.
        let mut s = Vec::new();
        put_reason(&mut s, tag::ABORT, 1, "x");
        let last = s.len() - 1;
        s[last] = 0xC0;
        assert_eq!(first_error(&s), WireError::BadField("reason"));
    }

    #[test]
    fn digest_round_trips() {
        let hashes: Vec<u64> = (0..DIGEST_PER_MSG as u64).map(|i| i * 0x0101).collect();
        let mut s = Vec::new();
        put_digest(&mut s, 256, &hashes);
        let mut d = Decoder::new();
        let (used, ready) = d.push(&s).unwrap();
        assert!(ready && used == s.len());
        match d.take().unwrap() {
            Msg::Digest { first, hashes: h } => {
                assert_eq!(first, 256);
                let got: Vec<u64> = h.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
                assert_eq!(got, hashes);
            }
            m => panic!("{m:?}"),
        }
        // The full hash of a zero page is the checksum's zero-page hash.
        assert_eq!(full_hash(9, &[0; PAGE]), zero_hash(9));
        assert_eq!(full_hash(9, &[1; PAGE]), page_hash(9, &[1; PAGE]));
    }

    #[test]
    fn a_huge_length_is_refused_before_buffering_and_the_error_sticks() {
        let mut d = Decoder::new();
        let cap = d.buf.capacity();
        let mut s = alloc::vec![tag::VCPU, 0, 0, 0];
        s.extend_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        s.extend_from_slice(&[0; 64]);
        let e = d.push(&s).unwrap_err();
        assert!(matches!(e, WireError::BadLength { .. }));
        assert_eq!(d.buf.len(), HEADER);
        assert_eq!(d.buf.capacity(), cap);
        // Failed for good: even a valid message afterwards is refused.
        let mut ok = Vec::new();
        put_control(&mut ok, tag::READY);
        assert_eq!(d.push(&ok), Err(e));
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let h = Hello {
            flags: 0,
            name: "n".repeat(40),
            args: "a".repeat(300),
            ..hello()
        };
        let mut s = Vec::new();
        put_hello(&mut s, &h);
        let mut d = Decoder::new();
        assert!(d.push(&s).unwrap().1);
        match d.take().unwrap() {
            Msg::Hello(got) => {
                assert_eq!(got.name, "n".repeat(MAX_NAME));
                assert_eq!(got.args, "a".repeat(MAX_ARGS));
            }
            m => panic!("{m:?}"),
        }
        let mut s = Vec::new();
        put_reason(&mut s, tag::REJECT, 2, &"€".repeat(100));
        let mut d = Decoder::new();
        assert!(d.push(&s).unwrap().1);
        match d.take().unwrap() {
            Msg::Reject { reason, .. } => assert_eq!(reason, "€".repeat(MAX_REASON / 3)),
            m => panic!("{m:?}"),
        }
    }

    /// Mutated and random streams, decoded in random chunks: an error or messages, never
    /// a panic, a stall or a buffer beyond one maximal message.
    #[test]
    fn fuzz_decoder_never_panics() {
        let (base, _) = sample();
        let mut rng = Rng(0xC0FF_EE00_D00D);
        for i in 0..3000 {
            let mut s = if i % 5 == 4 {
                (0..rng.next() % 600).map(|_| rng.next() as u8).collect()
            } else {
                base.clone()
            };
            if !s.is_empty() {
                for _ in 0..1 + rng.next() % 6 {
                    let at = rng.next() as usize % s.len();
                    match rng.next() % 3 {
                        0 => s[at] ^= 1 << (rng.next() % 8),
                        1 => s[at] = rng.next() as u8,
                        _ => s.truncate(at),
                    }
                    if s.is_empty() {
                        break;
                    }
                }
            }
            let mut d = Decoder::new();
            let mut off = 0;
            'feed: while off < s.len() {
                let end = (off + 1 + rng.next() as usize % 2000).min(s.len());
                let mut used = 0;
                while off + used < end {
                    match d.push(&s[off + used..end]) {
                        Err(_) => break 'feed,
                        Ok((n, ready)) => {
                            assert!(n > 0 || ready, "no progress");
                            used += n;
                            if ready && d.take().is_err() {
                                break 'feed;
                            }
                        }
                    }
                    assert!(d.buf.len() <= HEADER + MAX_PAYLOAD);
                }
                off = end;
            }
        }
    }
}
