//! Mutation fuzzer for the migration receive path, runnable on stable without
//! cargo-fuzz:
//!
//! ```text
//! cargo run -p hypervisor --release --example fuzz_migration -- --iterations 200000 --seed 1
//! ```
//!
//! From a printed seed it builds valid recordings (secure handshakes with records, a
//! sealed migration stream, plaintext wire streams) and feeds mutated copies (bit flips,
//! truncation, insertion, deletion, splicing from another session, random records, and
//! record- or message-level reordering) in random chunk sizes to:
//!
//! * `responder` / `initiator`: a secure channel in each role. Oracle: no panic; buffers
//!   stay at `SecureChannel::MEMORY`; every released plaintext byte is a prefix of the
//!   recording's plaintext (nothing unauthentic is ever released).
//! * `receiver`: the migration `Receiver` over a secure responder. Oracle: a guest is
//!   installed only from an untampered stream sealed with the right key, and then it
//!   is exactly the recorded guest; a stream sealed with another key never installs.
//! * `decoder` / `plain-receiver`: the plaintext wire `Decoder` and a `Receiver` with no
//!   channel. Oracle: no panic; allocation bounded by the installer's limit.
//!
//! It then prints inputs per second per target and an AEAD throughput figure.
//! A failing oracle panics with the seed and iteration, so the case can be replayed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use hypervisor::migration::link::{Link, LinkState};
use hypervisor::migration::receiver::{Installer, Outcome, Receiver};
use hypervisor::migration::secure::{
    MigrationKey, NonceError, NonceSource, SecureChannel, MAX_PLAIN,
};
use hypervisor::migration::wire::{self, Decoder, Hello, PAGE};

const KEY_A: &str = "4f1c2a9d7e6b5c3a0918f7e6d5c4b3a29f8e7d6c5b4a39281706f5e4d3c2b1a0";
const KEY_B: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// SplitMix64: the fuzzer's PRNG and the test nonce source (not cryptography).
#[derive(Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}
impl NonceSource for Rng {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError> {
        for b in buf {
            *b = self.next() as u8;
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------
// Links.

#[derive(Default)]
struct Wire {
    dir: [VecDeque<u8>; 2],
    closed: [bool; 2],
}

/// In-memory pipe end (for recording live sessions).
struct End {
    w: Rc<RefCell<Wire>>,
    me: usize,
}

fn pipe() -> (End, End) {
    let w = Rc::new(RefCell::new(Wire::default()));
    (
        End {
            w: w.clone(),
            me: 0,
        },
        End { w, me: 1 },
    )
}

impl End {
    fn take_sent(&self) -> Vec<u8> {
        self.w.borrow_mut().dir[self.me].drain(..).collect()
    }
    fn inject(&self, b: &[u8]) {
        self.w.borrow_mut().dir[1 - self.me].extend(b);
    }
}

impl Link for End {
    fn state(&mut self) -> LinkState {
        let w = self.w.borrow();
        if w.closed[self.me] || (w.closed[1 - self.me] && w.dir[1 - self.me].is_empty()) {
            LinkState::Closed
        } else {
            LinkState::Open
        }
    }
    fn send(&mut self, d: &[u8]) -> usize {
        self.w.borrow_mut().dir[self.me].extend(d);
        d.len()
    }
    fn queued(&mut self) -> usize {
        self.w.borrow().dir[self.me].len()
    }
    fn recv(&mut self, buf: &mut [u8]) -> usize {
        let mut w = self.w.borrow_mut();
        let q = &mut w.dir[1 - self.me];
        let n = buf.len().min(q.len());
        for (i, b) in q.drain(..n).enumerate() {
            buf[i] = b;
        }
        n
    }
    fn close(&mut self) {
        self.w.borrow_mut().closed[self.me] = true;
    }
}

/// A link that delivers a fixed input in random-sized chunks, then ends; what is sent
/// to it is counted and dropped.
struct Feed<'a> {
    input: &'a [u8],
    pos: usize,
    rng: Rng,
    max_chunk: usize,
    sent: usize,
}

impl Link for Feed<'_> {
    fn state(&mut self) -> LinkState {
        if self.pos < self.input.len() {
            LinkState::Open
        } else {
            LinkState::Closed
        }
    }
    fn send(&mut self, d: &[u8]) -> usize {
        self.sent += d.len();
        d.len()
    }
    fn queued(&mut self) -> usize {
        0
    }
    fn recv(&mut self, buf: &mut [u8]) -> usize {
        let n = buf
            .len()
            .min(self.input.len() - self.pos)
            .min(1 + self.rng.below(self.max_chunk));
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        n
    }
    fn close(&mut self) {}
}

// ----------------------------------------------------------------------------------
// Recordings.

/// A recorded secure session in one direction: the bytes, where each record starts
/// (the last entry is where the close_notify starts), and the plaintext carried.
#[derive(Clone)]
struct Rec {
    /// Seed of the nonces: a channel rebuilt from it accepts the recording.
    seed: u64,
    bytes: Vec<u8>,
    starts: Vec<usize>,
    plain: Vec<u8>,
}

fn key(s: &str) -> MigrationKey {
    MigrationKey::from_hex(s).expect("valid test key")
}

/// Builds a pair of channels from `seed` the same way the replay does.
fn pair(seed: u64, k: &str) -> (SecureChannel, SecureChannel) {
    let mut rng = Rng(seed);
    let i = SecureChannel::initiator(&key(k), &mut rng, 0).expect("nonce");
    let r = SecureChannel::responder(&key(k), &mut rng, 0).expect("nonce");
    (i, r)
}

/// Records both directions of a session whose initiator sends `from_i` and responder
/// `from_r` as records of the given sizes. Returns (initiator's bytes, responder's).
fn record_session(seed: u64, k: &str, from_i: &[Vec<u8>], from_r: &[Vec<u8>]) -> (Rec, Rec) {
    let (mut ci, mut cr) = pair(seed, k);
    let (mut a, mut b) = pipe();
    let (mut bi, mut br) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        ci.link(&mut a, 0);
        let x = a.take_sent();
        bi.extend_from_slice(&x);
        b.inject(&x);
        cr.link(&mut b, 0);
        let y = b.take_sent();
        br.extend_from_slice(&y);
        a.inject(&y);
    }
    assert!(ci.is_established() && cr.is_established());
    let send = |ch: &mut SecureChannel, e: &mut End, msgs: &[Vec<u8>], out: &mut Vec<u8>| {
        let mut starts = Vec::new();
        let mut plain = Vec::new();
        for m in msgs {
            let mut off = 0;
            while off < m.len() {
                starts.push(out.len());
                let n = ch.link(e, 0).send(&m[off..]);
                assert!(n > 0);
                out.extend(e.take_sent());
                off += n;
            }
            plain.extend_from_slice(m);
        }
        starts.push(out.len());
        (starts, plain)
    };
    let (si, pi) = send(&mut ci, &mut a, from_i, &mut bi);
    let (sr, pr) = send(&mut cr, &mut b, from_r, &mut br);
    ci.link(&mut a, 0).close();
    bi.extend(a.take_sent());
    // The responder seals its own close_notify as if it had not seen the FIN yet.
    a.w.borrow_mut().closed = [false; 2];
    cr.link(&mut b, 0).close();
    br.extend(b.take_sent());
    (
        Rec {
            seed,
            bytes: bi,
            starts: si,
            plain: pi,
        },
        Rec {
            seed,
            bytes: br,
            starts: sr,
            plain: pr,
        },
    )
}

fn random_msgs(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..1 + rng.below(5))
        .map(|_| {
            let big = rng.below(4) == 0;
            let n = 1 + rng.below(if big { 3 * MAX_PLAIN } else { 300 });
            (0..n).map(|_| rng.next() as u8).collect()
        })
        .collect()
}

fn hello(pages: usize) -> Hello {
    Hello {
        flags: 0,
        mem_bytes: (pages * PAGE) as u64,
        migrations: 1,
        time_ns: 5,
        name: "fuzz".into(),
        args: "x=1".into(),
    }
}

/// A complete, valid plaintext migration stream of a small guest, its memory, and the
/// offset of each message.
fn migration_stream(rng: &mut Rng, pages: usize) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let mut mem = vec![0u8; pages * PAGE];
    let mut s = Vec::new();
    let mut offs = vec![0];
    wire::put_hello(&mut s, &hello(pages));
    offs.push(s.len());
    let mut sum = wire::Checksum::new(pages);
    for round in 0..2u32 {
        for p in 0..pages {
            if round == 1 && rng.below(2) == 0 {
                continue;
            }
            let page = &mut mem[p * PAGE..(p + 1) * PAGE];
            if rng.below(3) == 0 {
                page.fill(0);
                wire::put_zero(&mut s, p as u64);
                sum.set(p, wire::zero_hash(p as u64));
            } else {
                for b in page.iter_mut().step_by(97) {
                    *b = rng.next() as u8;
                }
                wire::put_page(&mut s, p as u64, page);
                sum.set(p, wire::page_hash(p as u64, page));
            }
            offs.push(s.len());
        }
        wire::put_round_end(&mut s, round, 0);
        offs.push(s.len());
    }
    wire::put_state(&mut s, wire::tag::VCPU, &[3; 100]);
    offs.push(s.len());
    wire::put_state(&mut s, wire::tag::DEVICE, &[4; 8]);
    offs.push(s.len());
    let page_msgs = count_page_msgs(&s);
    wire::put_end(&mut s, page_msgs, sum.value());
    offs.push(s.len());
    wire::put_commit(&mut s, &wire::CommitTimes::default());
    offs.push(s.len());
    (s, mem, offs)
}

fn count_page_msgs(s: &[u8]) -> u64 {
    let mut d = Decoder::new();
    let mut n = 0;
    let mut off = 0;
    while off < s.len() {
        let (used, ready) = d.push(&s[off..]).expect("valid stream");
        off += used;
        if ready
            && matches!(
                d.take().expect("valid"),
                wire::Msg::Page { .. } | wire::Msg::ZeroPage { .. }
            )
        {
            n += 1;
        }
    }
    n
}

// ----------------------------------------------------------------------------------
// Mutation.

/// Mutates `s` in place. `units` are structure boundaries (record or message starts,
/// ascending, the last one the end of the structured part); `other` is another
/// session's recording for splicing.
fn mutate(rng: &mut Rng, s: &mut Vec<u8>, units: &[usize], other: &[u8], other_units: &[usize]) {
    let ops = 1 + rng.below(3);
    for _ in 0..ops {
        let len = s.len();
        match rng.below(13) {
            0 | 1 if len > 0 => {
                let i = rng.below(len);
                s[i] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                s[i] = rng.next() as u8;
            }
            3 => s.truncate(rng.below(len + 1)),
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(64);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                s.splice(at..at, ins);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                s.drain(a..b);
            }
            6 if !other.is_empty() => {
                // Splice a random range of another session.
                let a = rng.below(other.len());
                let b = (a + 1 + rng.below(4096)).min(other.len());
                let at = rng.below(len + 1);
                let cut = (at + rng.below(b - a + 1)).min(len);
                s.splice(at..cut, other[a..b].iter().copied());
            }
            // Structure-aware: whole units (records or messages).
            7..=10 if units.len() >= 3 => {
                let k = units.len() - 1;
                let u = |s: &Vec<u8>, i: usize| -> Option<(usize, usize)> {
                    let (a, b) = (units[i], units[i + 1]);
                    (b <= s.len()).then_some((a, b))
                };
                let i = rng.below(k);
                let j = rng.below(k);
                let (Some((a, b)), Some((c, d))) = (u(s, i), u(s, j)) else {
                    continue;
                };
                match rng.below(5) {
                    0 => {
                        s.drain(a..b); // drop
                    }
                    1 => {
                        let x = s[a..b].to_vec();
                        s.splice(c..c, x); // duplicate elsewhere
                    }
                    2 if b <= c => {
                        // swap
                        let (x, y) = (s[a..b].to_vec(), s[c..d].to_vec());
                        s.splice(c..d, x);
                        s.splice(a..b, y);
                    }
                    3 if other_units.len() >= 2 => {
                        // replace with the other session's unit
                        let m = rng.below(other_units.len() - 1);
                        let (e, f) = (other_units[m], other_units[m + 1]);
                        if f <= other.len() {
                            s.splice(a..b, other[e..f].iter().copied());
                        }
                    }
                    _ => s.truncate(a), // cut at a boundary
                }
            }
            11 if units.len() >= 2 => {
                // Edit a header field of a unit (type or length bytes).
                let i = units[rng.below(units.len() - 1)];
                let f = i + rng.below(8);
                if f < s.len() {
                    s[f] = match rng.below(3) {
                        0 => 0xFF,
                        1 => 0,
                        _ => rng.next() as u8,
                    };
                }
            }
            _ => {
                // A random "record" with a plausible header.
                let at = units
                    .get(rng.below(units.len().max(1)))
                    .copied()
                    .unwrap_or(0);
                let at = at.min(s.len());
                let n = 17 + rng.below(200);
                let mut r = vec![0x17, (n >> 8) as u8, n as u8];
                r.extend((0..n).map(|_| rng.next() as u8));
                s.splice(at..at, r);
            }
        }
    }
}

// ----------------------------------------------------------------------------------
// Targets.

struct Stats {
    name: &'static str,
    runs: u64,
    secs: f64,
    accepted: u64,
}

/// Feeds `input` to a channel rebuilt from the recording's seed in `role`; checks
/// that every released byte is a prefix of `plain`. Returns whether everything was
/// delivered with a clean close.
fn run_channel(
    rec_seed: u64,
    k: &str,
    initiator: bool,
    input: &[u8],
    plain: &[u8],
    rng: &mut Rng,
) -> bool {
    let (mut ci, mut cr) = pair(rec_seed, k);
    let ch = if initiator { &mut ci } else { &mut cr };
    let mut feed = Feed {
        input,
        pos: 0,
        rng: rng.clone(),
        max_chunk: 1 + rng.below(20_000),
        sent: 0,
    };
    rng.next();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 + rng.below(5000)];
    for _ in 0..input.len() + 10 {
        let mut l = ch.link(&mut feed, 0);
        let n = l.recv(&mut buf);
        got.extend_from_slice(&buf[..n]);
        let st = l.state();
        assert_eq!(ch.memory(), SecureChannel::MEMORY, "buffer bound");
        assert!(ch.pending() <= SecureChannel::MEMORY);
        if n == 0 && st == LinkState::Closed {
            break;
        }
        if n == 0 && feed.pos == input.len() {
            break;
        }
    }
    assert!(
        plain.starts_with(&got),
        "unauthentic plaintext released ({} bytes)",
        got.len()
    );
    assert!(feed.sent < 4096, "handshake replies are small");
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!(
            "got {} of {}, error {:?}",
            got.len(),
            plain.len(),
            ch.error()
        );
    }
    got.len() == plain.len() && ch.error().is_none()
}

#[derive(Default)]
struct FakeHost {
    installed: Option<(Vec<u8>, Hello)>,
    max_mem: u64,
    allocated: u64,
}

impl Installer for FakeHost {
    type Mem = Vec<u8>;
    fn alloc(&mut self, h: &Hello) -> Result<Vec<u8>, String> {
        if h.mem_bytes > self.max_mem {
            return Err("not enough memory".into());
        }
        self.allocated += h.mem_bytes;
        Ok(vec![0xEE; h.mem_bytes as usize])
    }
    fn install(
        &mut self,
        mem: Vec<u8>,
        h: &Hello,
        _: &[u8],
        _: &[u8],
        _: Option<&[u64]>,
    ) -> Result<u32, String> {
        assert!(self.installed.is_none(), "installed twice");
        self.installed = Some((mem, h.clone()));
        Ok(1)
    }
    fn post_page(&mut self, _: u32, pfn: u64) -> Option<&mut [u8]> {
        let (mem, _) = self.installed.as_mut()?;
        let start = usize::try_from(pfn).ok()?.checked_mul(4096)?;
        mem.get_mut(start..start + 4096)
    }
    fn post_arrived(&mut self, _: u32, _: u64, _: u64) -> Option<u64> {
        None
    }
    fn post_wanted(&mut self, _: u32) -> Option<u64> {
        None
    }
    fn commit(&mut self, _: u32, _: u64) {}
    fn commit_lost(&mut self, _: u32) {}
}

/// One poll of a receiver over some link.
type PollFn<'a> = dyn FnMut(&mut Receiver<Vec<u8>>, &mut FakeHost, u64) -> bool + 'a;

/// Runs a Receiver over `link` until it finishes.
fn run_receiver(link: &mut PollFn<'_>, host: &mut FakeHost) -> Option<Outcome> {
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 1_000_000);
    for t in 0..64 {
        if link(&mut rcv, host, t * 100_000) {
            break;
        }
    }
    assert!(host.allocated <= host.max_mem, "allocation bound");
    rcv.outcome
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = arg(&args, "--iterations").unwrap_or(20_000);
    let seed = arg(&args, "--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("fuzz_migration: seed {seed}, {iterations} iterations per target");
    let mut rng = Rng(seed);

    // Corpus: several recorded sessions (both directions) with random record sizes.
    let mut sessions = Vec::new();
    for i in 0..6 {
        let (mi, mr) = (random_msgs(&mut rng), random_msgs(&mut rng));
        sessions.push(record_session(seed ^ (i * 7919 + 1), KEY_A, &mi, &mr));
    }
    // The migration stream, sealed with the right key and with another key.
    let pages = 6;
    let (plain_stream, mem, msg_offs) = migration_stream(&mut rng, pages);
    let chunks: Vec<Vec<u8>> = plain_stream.chunks(5000).map(<[u8]>::to_vec).collect();
    let (sealed, _) = record_session(seed ^ 0xAB, KEY_A, &chunks, &[]);
    let (sealed_b, _) = record_session(seed ^ 0xAB, KEY_B, &chunks, &[]);
    {
        // Sanity: the intact sealed stream installs the guest.
        let mut host = FakeHost {
            max_mem: 1 << 20,
            ..Default::default()
        };
        let (_, mut cr) = pair(sealed.seed, KEY_A);
        let mut feed = Feed {
            input: &sealed.bytes,
            pos: 0,
            rng: Rng(1),
            max_chunk: 3000,
            sent: 0,
        };
        let out = run_receiver(
            &mut |r, h, t| r.poll(&mut cr.link(&mut feed, t), h, t),
            &mut host,
        );
        assert!(matches!(out, Some(Outcome::Committed(1))), "{out:?}");
        assert_eq!(host.installed.as_ref().map(|(m, _)| m), Some(&mem));
    }

    // Sanity: every intact recording is accepted in full in its role.
    for (i, r) in &sessions {
        assert!(run_channel(
            i.seed, KEY_A, false, &i.bytes, &i.plain, &mut rng
        ));
        assert!(run_channel(
            r.seed, KEY_A, true, &r.bytes, &r.plain, &mut rng
        ));
    }

    let mut all = Vec::new();

    // 1, 2: the channel in each role.
    for (name, initiator) in [("responder", false), ("initiator", true)] {
        let t0 = Instant::now();
        let mut accepted = 0;
        for it in 0..iterations {
            let si = rng.below(sessions.len());
            let oi = (si + 1 + rng.below(sessions.len() - 1)) % sessions.len();
            let pick = |s: &(Rec, Rec)| if initiator { s.1.clone() } else { s.0.clone() };
            let (rec, other) = (pick(&sessions[si]), pick(&sessions[oi]));
            let mut input = rec.bytes.clone();
            let mut units = vec![0];
            units.extend_from_slice(&rec.starts);
            mutate(&mut rng, &mut input, &units, &other.bytes, &other.starts);
            let clean = run_channel(rec.seed, KEY_A, initiator, &input, &rec.plain, &mut rng);
            if clean {
                accepted += 1;
            }
            if input == rec.bytes {
                assert!(
                    clean,
                    "{name}: intact recording refused (seed {seed}, iteration {it})"
                );
            }
        }
        all.push(Stats {
            name,
            runs: iterations,
            secs: t0.elapsed().as_secs_f64(),
            accepted,
        });
    }

    // 3: the Receiver over a secure responder.
    let t0 = Instant::now();
    let mut installs = 0;
    let mut units = vec![0];
    units.extend_from_slice(&sealed.starts);
    for it in 0..iterations {
        let wrong_key = rng.below(8) == 0;
        let base = if wrong_key { &sealed_b } else { &sealed };
        let mut input = base.bytes.clone();
        let o = &sessions[rng.below(sessions.len())].0;
        mutate(&mut rng, &mut input, &units, &o.bytes, &o.starts);
        let mut host = FakeHost {
            max_mem: 1 << 20,
            ..Default::default()
        };
        let (_, mut cr) = pair(sealed.seed, KEY_A);
        let mut feed = Feed {
            input: &input,
            pos: 0,
            rng: rng.clone(),
            max_chunk: 1 + rng.below(20_000),
            sent: 0,
        };
        rng.next();
        let _ = run_receiver(
            &mut |r, h, t| r.poll(&mut cr.link(&mut feed, t), h, t),
            &mut host,
        );
        assert_eq!(cr.memory(), SecureChannel::MEMORY);
        if let Some((m, h)) = &host.installed {
            assert!(
                !wrong_key,
                "installed a stream sealed with another key (seed {seed}, iteration {it})"
            );
            assert!(
                m == &mem && h == &hello(pages),
                "installed an unauthentic guest (seed {seed}, iteration {it})"
            );
            installs += 1;
        }
    }
    all.push(Stats {
        name: "receiver",
        runs: iterations,
        secs: t0.elapsed().as_secs_f64(),
        accepted: installs,
    });

    // 4: the plaintext wire Decoder.
    let t0 = Instant::now();
    let mut decoded = 0;
    for _ in 0..iterations {
        let mut input = plain_stream.clone();
        mutate(&mut rng, &mut input, &msg_offs, &sessions[0].0.bytes, &[]);
        let mut d = Decoder::new();
        let mut off = 0;
        let max = 1 + rng.below(10_000);
        while off < input.len() {
            let end = (off + 1 + rng.below(max)).min(input.len());
            match d.push(&input[off..end]) {
                Err(_) => break,
                Ok((used, ready)) => {
                    off += used;
                    if ready {
                        if d.take().is_err() {
                            break;
                        }
                        decoded += 1;
                    }
                }
            }
        }
    }
    all.push(Stats {
        name: "decoder",
        runs: iterations,
        secs: t0.elapsed().as_secs_f64(),
        accepted: decoded,
    });

    // 5: the Receiver on plaintext (no channel): no panic, bounded allocation.
    let t0 = Instant::now();
    let mut plain_installs = 0;
    for _ in 0..iterations {
        let mut input = plain_stream.clone();
        mutate(&mut rng, &mut input, &msg_offs, &plain_stream, &msg_offs);
        let mut host = FakeHost {
            max_mem: 1 << 20,
            ..Default::default()
        };
        let mut feed = Feed {
            input: &input,
            pos: 0,
            rng: rng.clone(),
            max_chunk: 1 + rng.below(20_000),
            sent: 0,
        };
        rng.next();
        let _ = run_receiver(&mut |r, h, t| r.poll(&mut feed, h, t), &mut host);
        if host.installed.is_some() {
            plain_installs += 1;
        }
    }
    all.push(Stats {
        name: "plain-receiver",
        runs: iterations,
        secs: t0.elapsed().as_secs_f64(),
        accepted: plain_installs,
    });

    let (mut runs, mut secs) = (0, 0.0);
    for s in &all {
        println!(
            "  {:<15} {:>9} inputs  {:>8.0} inputs/s  ({} accepted/installed/decoded)",
            s.name,
            s.runs,
            s.runs as f64 / s.secs,
            s.accepted
        );
        runs += s.runs;
        secs += s.secs;
    }
    println!(
        "fuzz_migration: {runs} inputs in {secs:.1} s ({:.0} inputs/s), no failures (seed {seed})",
        runs as f64 / secs
    );
    bench();
}

/// AEAD throughput: seal and open full records through two channels.
fn bench() {
    let (mut ci, mut cr) = pair(99, KEY_A);
    let (mut a, mut b) = pipe();
    for _ in 0..4 {
        ci.link(&mut a, 0);
        cr.link(&mut b, 0);
    }
    let data = vec![0xA5u8; MAX_PLAIN];
    let mut buf = vec![0u8; MAX_PLAIN];
    let total: usize = 256 << 20;
    let mut sent = 0;
    let mut seal_s = 0.0;
    let mut open_s = 0.0;
    while sent < total {
        let t = Instant::now();
        sent += ci.link(&mut a, 0).send(&data);
        seal_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        while cr.link(&mut b, 0).recv(&mut buf) > 0 {}
        open_s += t.elapsed().as_secs_f64();
    }
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let mb = sent as f64 / 1e6;
    let (seal, open) = (mb / seal_s, mb / open_s);
    println!(
        "aead: ChaCha20-Poly1305, 16 KiB records, {:.0} MB: seal {seal:.0} MB/s, open {open:.0} MB/s \
         (~{:.1} / {:.1} cycles/byte at {mhz:.0} MHz)",
        mb,
        mhz / seal,
        mhz / open,
    );
    // The primitive alone, in place on one 16 KiB buffer.
    let aead = ChaCha20Poly1305::new(&[7u8; 32].into());
    let mut rec = vec![0x5Au8; MAX_PLAIN];
    let t = Instant::now();
    let mut bytes = 0usize;
    let mut seq = 0u64;
    while t.elapsed().as_secs_f64() < 1.0 {
        let mut nonce = Nonce::default();
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        let tag = aead
            .encrypt_inout_detached(&nonce, b"hdr", rec.as_mut_slice().into())
            .expect("seal");
        aead.decrypt_inout_detached(&nonce, b"hdr", rec.as_mut_slice().into(), &tag)
            .expect("open");
        bytes += 2 * MAX_PLAIN;
        seq += 1;
    }
    let raw = bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
    println!(
        "aead primitive: {raw:.0} MB/s per operation (~{:.1} cycles/byte)",
        mhz / raw
    );
    let t = Instant::now();
    let n = 2000;
    for i in 0..n {
        let (mut ci, mut cr) = pair(1000 + i, KEY_A);
        let (mut a, mut b) = pipe();
        for _ in 0..3 {
            ci.link(&mut a, 0);
            b.inject(&a.take_sent());
            cr.link(&mut b, 0);
            a.inject(&b.take_sent());
        }
        assert!(ci.is_established());
    }
    println!(
        "handshake: {:.1} us per complete handshake (both sides)",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
