//! Host tests of the secure channel: handshake outcomes, record-layer tampering, and
//! the whole migration protocol (Source + Receiver with a dirtying fake guest) running
//! over two channels on an in-memory link.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::record::MAX_RECORD;
use super::*;
use crate::migration::link::{Link, LinkState};
use crate::migration::receiver::{Installer, Outcome, Receiver};
use crate::migration::source::{Params, Phase, Source, SourceGuest, Status};
use crate::migration::stats::MigrationStats;
use crate::migration::wire::{self, Decoder, Hello, Msg, PAGE};

const KEY_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

fn key(s: &str) -> MigrationKey {
    MigrationKey::from_hex(s).unwrap()
}

/// SplitMix64: deterministic nonces and test randomness.
struct Seeded(u64);
impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
impl NonceSource for Seeded {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError> {
        for b in buf.iter_mut() {
            *b = self.next() as u8;
        }
        Ok(())
    }
}

struct Broken;
impl NonceSource for Broken {
    fn fill(&mut self, _: &mut [u8]) -> Result<(), NonceError> {
        Err(NonceError)
    }
}

#[derive(Default)]
struct Wire {
    dir: [VecDeque<u8>; 2],
    closed: [bool; 2],
    connecting: bool,
}

/// One end of an in-memory TCP-like link (end 0 sends on dir[0], receives dir[1]).
struct End {
    w: Rc<RefCell<Wire>>,
    me: usize,
    window: usize,
}

fn pipe(window: usize) -> (End, End) {
    let w = Rc::new(RefCell::new(Wire::default()));
    (
        End {
            w: w.clone(),
            me: 0,
            window,
        },
        End { w, me: 1, window },
    )
}

impl End {
    /// Bytes sent by this end not yet read by the peer.
    fn take_sent(&self) -> Vec<u8> {
        self.w.borrow_mut().dir[self.me].drain(..).collect()
    }
    /// Makes `bytes` readable at this end, as if the peer had sent them.
    fn inject(&self, bytes: &[u8]) {
        self.w.borrow_mut().dir[1 - self.me].extend(bytes);
    }
    fn peer_close(&self) {
        self.w.borrow_mut().closed[1 - self.me] = true;
    }
}

impl Link for End {
    fn state(&mut self) -> LinkState {
        let w = self.w.borrow();
        if w.connecting {
            LinkState::Connecting
        } else if w.closed[self.me] || (w.closed[1 - self.me] && w.dir[1 - self.me].is_empty()) {
            LinkState::Closed
        } else {
            LinkState::Open
        }
    }
    fn send(&mut self, data: &[u8]) -> usize {
        let mut w = self.w.borrow_mut();
        if w.closed[self.me] || w.closed[1 - self.me] || w.connecting {
            return 0;
        }
        let q = &mut w.dir[self.me];
        let n = data.len().min(self.window.saturating_sub(q.len()));
        q.extend(&data[..n]);
        n
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

fn channels(ki: &str, kr: &str, seed: u64) -> (SecureChannel, SecureChannel) {
    let mut rng = Seeded(seed);
    let i = SecureChannel::initiator(&key(ki), &mut rng, 0).unwrap();
    let r = SecureChannel::responder(&key(kr), &mut rng, 0).unwrap();
    (i, r)
}

/// Polls both views until neither makes progress; returns their states.
fn settle(
    ci: &mut SecureChannel,
    a: &mut End,
    cr: &mut SecureChannel,
    b: &mut End,
    now: u64,
) -> (LinkState, LinkState) {
    for _ in 0..50 {
        ci.link(a, now);
        cr.link(b, now);
    }
    (ci.link(a, now).state(), cr.link(b, now).state())
}

fn read_all(ch: &mut SecureChannel, e: &mut End, now: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 777];
    loop {
        let n = ch.link(e, now).recv(&mut buf);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn key_parsing_fingerprint_and_redaction() {
    let k = key(KEY_A);
    assert_eq!(
        MigrationKey::from_hex(&KEY_A.to_uppercase())
            .unwrap()
            .fingerprint(),
        k.fingerprint()
    );
    assert_eq!(
        MigrationKey::from_hex(&format!("  {KEY_A}\n"))
            .unwrap()
            .fingerprint(),
        k.fingerprint()
    );
    assert_ne!(key(KEY_B).fingerprint(), k.fingerprint());
    let fp = k.fingerprint().to_string();
    assert_eq!(fp.len(), 16);
    let dbg = format!("{k:?} {k}");
    assert!(dbg.contains(&fp), "{dbg}");
    assert!(
        !dbg.contains("00112233") && !dbg.contains("aabbcc"),
        "{dbg}"
    );
    assert_eq!(
        MigrationKey::from_hex("abc").unwrap_err(),
        KeyError::Length(3)
    );
    assert_eq!(
        MigrationKey::from_hex(&KEY_A[..62]).unwrap_err(),
        KeyError::Length(62)
    );
    let mut bad = String::from(KEY_A);
    bad.replace_range(10..11, "Z");
    let e = MigrationKey::from_hex(&bad).unwrap_err();
    assert_eq!(e, KeyError::Digit(10));
    assert!(
        !e.to_string().contains('Z'),
        "the error must not echo key text"
    );
    assert_eq!(
        MigrationKey::from_hex(&"0".repeat(64)).unwrap_err(),
        KeyError::AllZero
    );
    assert!(KeyError::Length(3).to_string().contains("64 hex digits"));
    let parsed: MigrationKey = KEY_B.parse().unwrap();
    assert_eq!(parsed.fingerprint(), key(KEY_B).fingerprint());
    assert_eq!(
        MigrationKey::from_bytes([7; 32]).fingerprint(),
        MigrationKey::from_hex(&"07".repeat(32))
            .unwrap()
            .fingerprint()
    );
}

#[test]
fn no_randomness_is_an_error() {
    let e = SecureChannel::initiator(&key(KEY_A), &mut Broken, 0).unwrap_err();
    assert_eq!(e, SecureError::NoRandomness);
    assert!(e.to_string().contains("RNG"));
}

#[test]
fn handshake_succeeds_and_bytes_flow_both_ways() {
    let (mut ci, mut cr) = channels(KEY_A, KEY_A, 1);
    let (mut a, mut b) = pipe(5000);
    a.w.borrow_mut().connecting = true;
    assert_eq!(ci.link(&mut a, 0).state(), LinkState::Connecting);
    assert_eq!(cr.link(&mut b, 0).state(), LinkState::Connecting);
    a.w.borrow_mut().connecting = false;
    assert_eq!(
        settle(&mut ci, &mut a, &mut cr, &mut b, 10),
        (LinkState::Open, LinkState::Open)
    );
    assert!(ci.is_established() && cr.is_established());
    let mut rng = Seeded(5);
    let data_i: Vec<u8> = (0..200_000).map(|_| rng.next() as u8).collect();
    let data_r: Vec<u8> = (0..150_000).map(|_| rng.next() as u8).collect();
    let (mut si, mut sr) = (0, 0);
    let (mut got_r, mut got_i) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 3000];
    for step in 0..100_000 {
        let len = 1 + rng.next() as usize % 40_000;
        let end = (si + len).min(data_i.len());
        si += ci.link(&mut a, step).send(&data_i[si..end]);
        let end = (sr + len).min(data_r.len());
        sr += cr.link(&mut b, step).send(&data_r[sr..end]);
        let k = 1 + rng.next() as usize % buf.len();
        let n = cr.link(&mut b, step).recv(&mut buf[..k]);
        got_r.extend_from_slice(&buf[..n]);
        let n = ci.link(&mut a, step).recv(&mut buf[..k]);
        got_i.extend_from_slice(&buf[..n]);
        assert!(ci.pending() <= SecureChannel::MEMORY && ci.memory() == SecureChannel::MEMORY);
        if got_r.len() == data_i.len() && got_i.len() == data_r.len() {
            break;
        }
    }
    assert!(got_r == data_i && got_i == data_r);
    assert_eq!(ci.link(&mut a, 0).queued(), 0);
    // A clean close: the peer reads everything, then sees Closed without an error.
    ci.link(&mut a, 0).send(b"bye");
    ci.link(&mut a, 0).close();
    assert_eq!(read_all(&mut cr, &mut b, 0), b"bye");
    assert_eq!(cr.link(&mut b, 0).state(), LinkState::Closed);
    assert_eq!(cr.error(), None);
    assert_eq!(ci.error(), None);
    assert!(ci.stats().records_sent > 12 && cr.stats().plain_received == 200_003);
}

#[test]
fn wrong_key_is_reported_distinctly_on_both_sides() {
    let (mut ci, mut cr) = channels(KEY_A, KEY_B, 2);
    let (mut a, mut b) = pipe(1 << 16);
    assert_eq!(
        settle(&mut ci, &mut a, &mut cr, &mut b, 10),
        (LinkState::Closed, LinkState::Closed)
    );
    assert_eq!(ci.error(), Some(&SecureError::PeerLacksKey));
    assert_eq!(cr.error(), Some(&SecureError::KeyRejectedByPeer));
    assert!(ci
        .error()
        .unwrap()
        .to_string()
        .contains("peer does not hold the migration key"));
    assert!(cr.error().unwrap().to_string().contains("different keys"));
    assert!(!ci.is_established() && !cr.is_established());
    assert_eq!(ci.link(&mut a, 10).send(b"secret"), 0);
}

/// Recorded initiator messages of an earlier session, replayed to a responder (which
/// draws a fresh nonce_r), never establish; the responder tells the peer.
#[test]
fn replayed_handshake_fails() {
    // A live session (responder nonce from seed 300), recording the initiator's bytes.
    let (mut a, mut b) = pipe(1 << 16);
    let mut ci = SecureChannel::initiator(&key(KEY_A), &mut Seeded(3), 0).unwrap();
    let mut cr2 = SecureChannel::responder(&key(KEY_A), &mut Seeded(300), 0).unwrap();
    let mut from_i = Vec::new();
    for _ in 0..10 {
        ci.link(&mut a, 0);
        let x = a.take_sent();
        from_i.extend_from_slice(&x);
        b.inject(&x);
        cr2.link(&mut b, 0);
        a.inject(&b.take_sent());
    }
    assert!(ci.is_established() && cr2.is_established());
    ci.link(&mut a, 0).send(b"guest memory");
    let x = a.take_sent();
    from_i.extend_from_slice(&x);
    b.inject(&x);
    assert_eq!(read_all(&mut cr2, &mut b, 0), b"guest memory");
    // Replay everything to a fresh responder holding the key.
    let (_a3, mut b3) = pipe(1 << 16);
    let mut cr3 = SecureChannel::responder(&key(KEY_A), &mut Seeded(301), 0).unwrap();
    b3.inject(&from_i);
    assert!(read_all(&mut cr3, &mut b3, 0).is_empty());
    assert_eq!(cr3.link(&mut b3, 0).state(), LinkState::Closed);
    assert_eq!(cr3.error(), Some(&SecureError::PeerLacksKey));
    // It answered ServerHello, then the alert.
    let reply = b3.take_sent();
    assert_eq!(&reply[reply.len() - 2..], &[msg::ALERT, alert::AUTH]);
    // The same replay against a responder that happens to draw the same nonce_r would
    // succeed: the nonce is what makes replay fail.
    let mut cr4 = SecureChannel::responder(&key(KEY_A), &mut Seeded(300), 0).unwrap();
    let (_a4, mut b4) = pipe(1 << 16);
    b4.inject(&from_i);
    assert_eq!(read_all(&mut cr4, &mut b4, 0), b"guest memory");
}

/// A ServerHello recorded from one session is no good to an initiator with a fresh
/// nonce_i; and an initiator whose ClientFinished is rejected learns it from the alert.
#[test]
fn replayed_server_hello_and_rejected_finished() {
    let (mut ci, mut cr) = channels(KEY_A, KEY_A, 4);
    let (mut a, mut b) = pipe(1 << 16);
    settle(&mut ci, &mut a, &mut cr, &mut b, 0);
    assert!(ci.is_established());
    // A new initiator, and the old ServerHello.
    let (mut a2, _b2) = pipe(1 << 16);
    let mut ci2 = SecureChannel::initiator(&key(KEY_A), &mut Seeded(44), 0).unwrap();
    ci2.link(&mut a2, 0);
    let mut rng = Seeded(4);
    let _ = SecureChannel::initiator(&key(KEY_A), &mut rng, 0).unwrap();
    let mut cr_again = SecureChannel::responder(&key(KEY_A), &mut rng, 0).unwrap();
    let (mut a3, mut b3) = pipe(1 << 16);
    let mut ci_orig = SecureChannel::initiator(&key(KEY_A), &mut Seeded(4), 0).unwrap();
    ci_orig.link(&mut a3, 0);
    b3.inject(&a3.take_sent());
    cr_again.link(&mut b3, 0);
    let server_hello = b3.take_sent();
    assert_eq!(server_hello.len(), 65);
    a2.inject(&server_hello);
    assert_eq!(ci2.link(&mut a2, 0).state(), LinkState::Closed);
    assert_eq!(ci2.error(), Some(&SecureError::PeerLacksKey));

    // Tamper with ClientFinished in flight: the responder refuses, the initiator
    // (already established and sending) learns it from the alert.
    let (mut ci, mut cr) = channels(KEY_A, KEY_A, 5);
    let (mut a, mut b) = pipe(1 << 16);
    ci.link(&mut a, 0);
    b.inject(&a.take_sent());
    cr.link(&mut b, 0);
    a.inject(&b.take_sent());
    assert_eq!(ci.link(&mut a, 0).state(), LinkState::Open);
    assert_eq!(ci.link(&mut a, 0).send(b"hello"), 5);
    let mut fin = a.take_sent();
    fin[7] ^= 0x40;
    b.inject(&fin);
    assert_eq!(cr.link(&mut b, 0).state(), LinkState::Closed);
    assert_eq!(cr.error(), Some(&SecureError::PeerLacksKey));
    a.inject(&b.take_sent());
    let mut buf = [0u8; 10];
    assert_eq!(ci.link(&mut a, 0).recv(&mut buf), 0);
    assert_eq!(ci.error(), Some(&SecureError::KeyRejectedByPeer));
}

#[test]
fn stalled_handshake_times_out_on_both_roles() {
    let (mut ci, cr) = channels(KEY_A, KEY_A, 6);
    let ci_t = &mut ci;
    let (mut a, _b) = pipe(1 << 16);
    let (_a2, mut b2) = pipe(1 << 16);
    let mut now = 0;
    while ci_t.link(&mut a, now).state() == LinkState::Connecting {
        now += 100_000;
        assert!(now < 60_000_000);
    }
    assert_eq!(
        ci.error(),
        Some(&SecureError::HandshakeTimeout { ms: 10_000 })
    );
    // A responder that got half a ClientHello and then nothing.
    let mut cr = cr.with_handshake_timeout(2_000_000);
    b2.inject(&MAGIC);
    now = 0;
    while cr.link(&mut b2, now).state() == LinkState::Connecting {
        now += 100_000;
        assert!(now < 60_000_000);
    }
    assert!(now > 2_000_000 && now <= 2_200_000, "{now}");
    assert_eq!(
        cr.error(),
        Some(&SecureError::HandshakeTimeout { ms: 2_000 })
    );
    assert!(cr.error().unwrap().to_string().contains("2000 ms"));
    // Closed by the peer mid-handshake.
    let (_a, mut b) = pipe(1 << 16);
    let mut cr = SecureChannel::responder(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    b.inject(&MAGIC[..3]);
    b.peer_close();
    assert_eq!(cr.link(&mut b, 0).state(), LinkState::Closed);
    assert_eq!(cr.error(), Some(&SecureError::ClosedDuringHandshake));
}

#[test]
fn plaintext_and_garbage_peers_are_refused_clearly() {
    // An old source's Hello at a secure destination: refused at the first byte, with a
    // REJECT in the old protocol so that the old source prints why.
    let mut old = Vec::new();
    wire::put_hello(&mut old, &hello(4));
    let (_a, mut b) = pipe(1 << 16);
    let mut cr = SecureChannel::responder(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    b.inject(&old);
    assert_eq!(cr.link(&mut b, 0).state(), LinkState::Closed);
    assert_eq!(cr.error(), Some(&SecureError::PlaintextPeer));
    assert!(cr.error().unwrap().to_string().contains("HVMIGR01"));
    let reply = b.take_sent();
    let mut d = Decoder::new();
    assert!(d.push(&reply).unwrap().1);
    match d.take().unwrap() {
        Msg::Reject { reason, .. } => assert!(reason.contains("secure migration channel")),
        m => panic!("{m:?}"),
    }
    // Garbage: bad magic at once.
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"HVMIGSEX", &[0u8; 44]] {
        let (_a, mut b) = pipe(1 << 16);
        let mut cr = SecureChannel::responder(&key(KEY_A), &mut Seeded(1), 0).unwrap();
        b.inject(junk);
        assert_eq!(cr.link(&mut b, 0).state(), LinkState::Closed);
        assert_eq!(cr.error(), Some(&SecureError::BadMagic), "{junk:?}");
        assert_eq!(b.take_sent(), [msg::ALERT, alert::MALFORMED]);
    }
    // Wrong version.
    let mut ch = super::handshake::client_hello(&[1; 32]);
    ch[9] = 3;
    let (_a, mut b) = pipe(1 << 16);
    let mut cr = SecureChannel::responder(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    b.inject(&ch);
    cr.link(&mut b, 0);
    assert_eq!(cr.error(), Some(&SecureError::BadVersion(3)));
    // The initiator side: an old receiver answers our ClientHello with a REJECT.
    let (mut a, mut b) = pipe(1 << 16);
    let mut ci = SecureChannel::initiator(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    ci.link(&mut a, 0);
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 1_000_000);
    let mut h = host();
    rcv.poll(&mut b, &mut h, 1);
    assert!(matches!(rcv.outcome, Some(Outcome::Discarded(_))));
    assert_eq!(ci.link(&mut a, 2).state(), LinkState::Closed);
    assert_eq!(ci.error(), Some(&SecureError::PlaintextPeer));
    // Random garbage at the initiator.
    let (mut a, _b) = pipe(1 << 16);
    let mut ci = SecureChannel::initiator(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    ci.link(&mut a, 0);
    a.inject(b"HTTP/1.1 400 Bad Request\r\n");
    assert_eq!(ci.link(&mut a, 0).state(), LinkState::Closed);
    assert!(matches!(ci.error(), Some(SecureError::BadHandshake(_))));
    // A version alert.
    let (mut a, _b) = pipe(1 << 16);
    let mut ci = SecureChannel::initiator(&key(KEY_A), &mut Seeded(1), 0).unwrap();
    ci.link(&mut a, 0);
    a.inject(&[msg::ALERT, alert::VERSION]);
    ci.link(&mut a, 0);
    assert_eq!(ci.error(), Some(&SecureError::PeerAlert(alert::VERSION)));
}

/// A recorded session: the initiator's bytes (handshake, then `records` data records
/// of known plaintext, then close_notify), replayable against a responder built from
/// the same seed. Returns (bytes, offsets where each record starts, plaintexts).
fn recorded_session(seed: u64, records: usize) -> (Vec<u8>, Vec<usize>, Vec<Vec<u8>>) {
    let (mut ci, mut cr) = channels(KEY_A, KEY_A, seed);
    let (mut a, mut b) = pipe(1 << 20);
    let mut stream = Vec::new();
    for _ in 0..4 {
        ci.link(&mut a, 0);
        let x = a.take_sent();
        stream.extend_from_slice(&x);
        b.inject(&x);
        cr.link(&mut b, 0);
        a.inject(&b.take_sent());
    }
    assert!(ci.is_established());
    let mut starts = Vec::new();
    let mut plains = Vec::new();
    for r in 0..records {
        let p: Vec<u8> = (0..40 + r * 7).map(|i| (i * 31 + r) as u8).collect();
        starts.push(stream.len());
        assert_eq!(ci.link(&mut a, 0).send(&p), p.len());
        stream.extend(a.take_sent());
        plains.push(p);
    }
    starts.push(stream.len());
    ci.link(&mut a, 0).close();
    stream.extend(a.take_sent());
    (stream, starts, plains)
}

/// Feeds `bytes` (then EOF) to a responder from `seed` (same nonce_r as the recording);
/// returns the plaintext released and the error.
fn replay(seed: u64, bytes: &[u8]) -> (Vec<u8>, Option<SecureError>) {
    let mut rng = Seeded(seed);
    let _ = SecureChannel::initiator(&key(KEY_A), &mut rng, 0).unwrap();
    let mut cr = SecureChannel::responder(&key(KEY_A), &mut rng, 0).unwrap();
    let (_a, mut b) = pipe(1 << 20);
    b.inject(bytes);
    b.peer_close();
    let out = read_all(&mut cr, &mut b, 0);
    let st = cr.link(&mut b, 0).state();
    assert_eq!(st, LinkState::Closed);
    assert_eq!(cr.memory(), SecureChannel::MEMORY);
    (out, cr.error().cloned())
}

#[test]
fn every_single_bit_flip_is_detected_before_release() {
    let (stream, starts, plains) = recorded_session(7, 3);
    let all: Vec<u8> = plains.concat();
    let (out, err) = replay(7, &stream);
    assert_eq!(out, all);
    assert_eq!(err, None, "the untouched recording replays cleanly");
    let mut flips = 0;
    for i in 0..stream.len() {
        for bit in 0..8 {
            let mut s = stream.clone();
            s[i] ^= 1 << bit;
            let (out, err) = replay(7, &s);
            assert!(err.is_some(), "flip at byte {i} bit {bit} undetected");
            // Only records wholly before the flipped byte may have been released.
            let before = starts.iter().take_while(|&&st| st <= i).count();
            let complete = plains[..before.saturating_sub(1).min(plains.len())].concat();
            assert!(
                out.len() <= complete.len() && all.starts_with(&out),
                "flip at {i}: released {} bytes",
                out.len()
            );
            flips += 1;
        }
    }
    assert_eq!(flips, stream.len() * 8);
}

#[test]
fn dropped_duplicated_reordered_truncated_records_are_detected() {
    let (stream, starts, plains) = recorded_session(8, 4);
    let rec = |k: usize| &stream[starts[k]..starts[k + 1]];
    let hs = &stream[..starts[0]];
    let close = &stream[starts[4]..];
    let build = |order: &[usize], tail: &[u8]| {
        let mut s = hs.to_vec();
        for &k in order {
            s.extend_from_slice(rec(k));
        }
        s.extend_from_slice(tail);
        s
    };
    // Intact.
    assert_eq!(replay(8, &build(&[0, 1, 2, 3], close)).1, None);
    for (order, what) in [
        (&[0, 2, 3][..], "dropped"),
        (&[0, 0, 1, 2, 3][..], "duplicated"),
        (&[0, 2, 1, 3][..], "reordered"),
        (&[1, 0, 2, 3][..], "reordered first"),
    ] {
        let (out, err) = replay(8, &build(order, close));
        assert_eq!(err, Some(SecureError::BadRecord), "{what}");
        // Only the records before the first wrong one.
        let good = order
            .iter()
            .enumerate()
            .take_while(|&(i, &k)| i == k)
            .count();
        assert_eq!(out, plains[..good].concat(), "{what}");
    }
    // Cut at a record boundary, no close_notify: everything authentic is delivered,
    // then the truncation is reported.
    let (out, err) = replay(8, &build(&[0, 1], &[]));
    assert_eq!(out, plains[..2].concat());
    assert_eq!(err, Some(SecureError::ClosedWithoutNotify));
    // Cut in the middle of a record.
    let mut s = build(&[0, 1], &[]);
    s.extend_from_slice(&rec(2)[..10]);
    let (out, err) = replay(8, &s);
    assert_eq!(out, plains[..2].concat());
    assert_eq!(err, Some(SecureError::Truncated));
    // A forged close_notify (unauthenticated) is not accepted.
    let mut s = build(&[0], &[]);
    s.extend_from_slice(&[msg::CLOSE, 0, 16]);
    s.extend_from_slice(&[0; 16]);
    assert_eq!(replay(8, &s).1, Some(SecureError::BadRecord));
    // Header errors: oversized and unknown type.
    let mut s = build(&[], &[]);
    s.extend_from_slice(&[msg::DATA, 0xFF, 0xFF]);
    assert_eq!(replay(8, &s).1, Some(SecureError::BadRecordLength(0xFFFF)));
    let mut s = build(&[], &[]);
    s.extend_from_slice(&[0x99, 0, 20]);
    assert_eq!(replay(8, &s).1, Some(SecureError::BadRecordType(0x99)));
}

#[test]
fn records_spliced_from_another_session_are_detected() {
    let (s1, st1, p1) = recorded_session(9, 3);
    let (s2, st2, _) = recorded_session(10, 3);
    // Same key, different nonces: record 1 of session 2 in place of record 1 of session 1.
    let mut s = s1[..st1[1]].to_vec();
    s.extend_from_slice(&s2[st2[1]..st2[2]]);
    s.extend_from_slice(&s1[st1[2]..]);
    let (out, err) = replay(9, &s);
    assert_eq!(err, Some(SecureError::BadRecord));
    assert_eq!(out, p1[0]);
    // The whole of session 2's records after session 1's handshake.
    let mut s = s1[..st1[0]].to_vec();
    s.extend_from_slice(&s2[st2[0]..]);
    let (out, err) = replay(9, &s);
    assert_eq!(err, Some(SecureError::BadRecord));
    assert!(out.is_empty());
}

#[test]
fn counter_refuses_to_wrap() {
    let (mut ci, mut cr) = channels(KEY_A, KEY_A, 11);
    let (mut a, mut b) = pipe(1 << 20);
    settle(&mut ci, &mut a, &mut cr, &mut b, 0);
    ci.set_send_seq(u64::MAX - 1);
    assert_eq!(ci.link(&mut a, 0).send(b"last"), 4);
    assert_eq!(ci.link(&mut a, 0).send(b"one more"), 0);
    assert_eq!(ci.error(), Some(&SecureError::CounterExhausted));
    assert_eq!(ci.link(&mut a, 0).state(), LinkState::Closed);
}

#[test]
fn memory_is_bounded_for_any_input() {
    let mut rng = Seeded(12);
    for round in 0..300 {
        let (mut ci, mut cr) = channels(KEY_A, KEY_A, 100 + round);
        let (mut a, mut b) = pipe(64 + rng.next() as usize % 100_000);
        settle(&mut ci, &mut a, &mut cr, &mut b, 0);
        // Huge sends are taken only up to the buffer bound.
        let big = vec![0x5A; 1 << 20];
        let n = ci.link(&mut a, 0).send(&big);
        assert!(n <= 3 * MAX_PLAIN, "{n}");
        assert!(ci.pending() < 2 * MAX_RECORD + 300);
        // Random bytes at the receiver, then its buffers.
        let junk: Vec<u8> = (0..rng.next() % 70_000).map(|_| rng.next() as u8).collect();
        b.inject(&junk);
        let _ = read_all(&mut cr, &mut b, 0);
        assert_eq!(cr.memory(), SecureChannel::MEMORY);
        assert_eq!(ci.memory(), SecureChannel::MEMORY);
        // The responder never reads more than one record ahead.
        assert!(b.w.borrow().dir[0].len() + MAX_RECORD >= n.min(junk.len()));
    }
    const { assert!(SecureChannel::MEMORY < 72 * 1024) };
}

// ---------------------------------------------------------------------------------
// The whole migration protocol over two secure channels.

struct Guest {
    mem: Vec<u8>,
    tracking: bool,
    dirty: Vec<usize>,
    frozen: bool,
    gone: bool,
    rng: Seeded,
    rate: usize,
    ws: usize,
}

impl Guest {
    fn new(pages: usize, rate: usize, ws: usize) -> Self {
        let mut mem = vec![0u8; pages * PAGE];
        for p in (0..pages).step_by(2) {
            mem[p * PAGE..p * PAGE + 8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
        }
        Self {
            mem,
            tracking: false,
            dirty: vec![],
            frozen: false,
            gone: false,
            rng: Seeded(0x1234),
            rate,
            ws,
        }
    }
    fn run(&mut self) {
        if self.frozen {
            return;
        }
        assert!(!self.gone, "split brain");
        for _ in 0..self.rate {
            let p = (self.rng.next() as usize) % self.ws;
            let off = p * PAGE + (self.rng.next() as usize % 512) * 8;
            let v = self.rng.next() | 1;
            self.mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
            if self.tracking {
                self.dirty.push(p);
            }
        }
    }
}

impl SourceGuest for Guest {
    fn pages(&self) -> usize {
        self.mem.len() / PAGE
    }
    fn page(&self, pfn: usize) -> &[u8] {
        &self.mem[pfn * PAGE..(pfn + 1) * PAGE]
    }
    fn start_tracking(&mut self) -> Result<(), String> {
        self.tracking = true;
        Ok(())
    }
    fn collect_dirty(&mut self, sink: &mut dyn FnMut(usize)) {
        for p in self.dirty.drain(..) {
            sink(p);
        }
    }
    fn freeze(&mut self) -> Result<(), String> {
        self.frozen = true;
        Ok(())
    }
    fn thaw(&mut self) {
        assert!(!self.gone);
        self.frozen = false;
        self.tracking = false;
    }
    fn vcpu_state(&mut self) -> Vec<u8> {
        vec![7; 200]
    }
    fn device_state(&mut self) -> Vec<u8> {
        vec![9; 16]
    }
    fn hand_over(&mut self) {
        self.gone = true;
    }
}

#[derive(Default)]
struct Host {
    installed: Option<(Vec<u8>, Hello)>,
    committed: Option<u32>,
    lost: Option<u32>,
}

impl Installer for Host {
    type Mem = Vec<u8>;
    fn alloc(&mut self, hello: &Hello) -> Result<Vec<u8>, String> {
        if hello.mem_bytes > 1 << 26 {
            return Err("not enough memory".into());
        }
        Ok(vec![0xEE; hello.mem_bytes as usize])
    }
    fn install(
        &mut self,
        mem: Vec<u8>,
        h: &Hello,
        _: &[u8],
        _: &[u8],
        _: Option<&[u64]>,
    ) -> Result<u32, String> {
        self.installed = Some((mem, h.clone()));
        Ok(5)
    }
    fn post_page(&mut self, _: u32, _: u64) -> Option<&mut [u8]> {
        None
    }
    fn post_arrived(&mut self, _: u32, _: u64, _: u64) -> Option<u64> {
        None
    }
    fn post_wanted(&mut self, _: u32) -> Option<u64> {
        None
    }
    fn commit(&mut self, id: u32, _pause_us: u64) {
        self.committed = Some(id);
    }
    fn commit_lost(&mut self, id: u32) {
        self.lost = Some(id);
    }
}

fn host() -> Host {
    Host::default()
}

fn hello(pages: usize) -> Hello {
    Hello {
        flags: 0,
        mem_bytes: (pages * PAGE) as u64,
        migrations: 0,
        time_ns: 1,
        name: "fake".into(),
        args: String::new(),
    }
}

struct Run {
    src: Source,
    rcv: Receiver<Vec<u8>>,
    ci: SecureChannel,
    cr: SecureChannel,
    frozen_copy: Option<Vec<u8>>,
}

fn migrate_secure(g: &mut Guest, h: &mut Host, ki: &str, kr: &str, window: usize) -> Run {
    let (mut ci, mut cr) = channels(ki, kr, 77);
    let (mut a, mut b) = pipe(window);
    let pages = g.pages();
    let params = Params {
        downtime_us: 2_000,
        ..Default::default()
    };
    let mut src = Source::new(params, hello(pages), MigrationStats::default(), 0);
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
    let (mut s_done, mut r_done) = (false, false);
    let mut frozen_copy = None;
    let mut now = 0;
    for _ in 0..400_000 {
        now += 100;
        g.run();
        if !s_done {
            s_done = src.poll(g, &mut ci.link(&mut a, now), now) == Status::Finished;
        } else {
            ci.drive(&mut a, now); // flush the last records (COMMIT, close_notify)
        }
        if g.frozen && frozen_copy.is_none() {
            frozen_copy = Some(g.mem.clone());
        }
        if !r_done {
            r_done = rcv.poll(&mut cr.link(&mut b, now), h, now);
        }
        if s_done && r_done && ci.pending() == 0 {
            break;
        }
        assert_eq!(ci.memory(), SecureChannel::MEMORY);
        assert_eq!(cr.memory(), SecureChannel::MEMORY);
    }
    Run {
        src,
        rcv,
        ci,
        cr,
        frozen_copy,
    }
}

#[test]
fn whole_migration_runs_over_secure_channels() {
    for window in [64 * 1024, 3000] {
        let mut g = Guest::new(512, 2, 64);
        let mut h = host();
        let run = migrate_secure(&mut g, &mut h, KEY_A, KEY_A, window);
        assert_eq!(run.src.phase(), Phase::Done, "{}", run.src.stats.outcome);
        assert_eq!(run.rcv.outcome, Some(Outcome::Committed(5)));
        assert_eq!(h.committed, Some(5));
        assert!(g.gone);
        let (mem, hello) = h.installed.take().unwrap();
        assert_eq!(hello.name, "fake");
        assert_eq!(mem, run.frozen_copy.unwrap(), "memory differs");
        assert_eq!(run.ci.error(), None);
        assert_eq!(run.cr.error(), None);
        assert!(run.ci.stats().records_sent > 20);
        assert!(!run.src.stats.rounds.is_empty(), "pre-copy ran");
    }
}

#[test]
fn migration_with_different_keys_fails_cleanly() {
    let mut g = Guest::new(128, 2, 32);
    let mut h = host();
    let run = migrate_secure(&mut g, &mut h, KEY_A, KEY_B, 64 * 1024);
    assert_eq!(run.src.phase(), Phase::Failed);
    assert!(
        !g.gone && !g.frozen && !g.tracking,
        "guest runs on at the source"
    );
    assert!(h.installed.is_none() && h.committed.is_none() && h.lost.is_none());
    assert!(matches!(run.rcv.outcome, Some(Outcome::Discarded(_))));
    assert_eq!(run.ci.error(), Some(&SecureError::PeerLacksKey));
    assert_eq!(run.cr.error(), Some(&SecureError::KeyRejectedByPeer));
}

/// A network attacker flipping one bit somewhere in the source's sealed stream: the
/// migration fails, nothing is installed, and the guest keeps running at the source.
#[test]
fn tampered_migration_installs_nothing() {
    for target in [300usize, 5_000, 60_000, 100_000] {
        let mut g = Guest::new(64, 1, 16);
        let mut h = host();
        let (mut ci, mut cr) = channels(KEY_A, KEY_A, 78);
        let (mut a, mut b) = pipe(1 << 16);
        let mut src = Source::new(Params::default(), hello(64), MigrationStats::default(), 0);
        let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
        let mut passed = 0usize;
        let mut now = 0;
        let mut s_done = false;
        for _ in 0..100_000 {
            now += 100;
            g.run();
            if !s_done {
                s_done = src.poll(&mut g, &mut ci.link(&mut a, now), now) == Status::Finished;
            }
            // The attacker relays source → destination, flipping one bit.
            let mut x = a.take_sent();
            if passed <= target && target < passed + x.len() {
                x[target - passed] ^= 0x08;
            }
            passed += x.len();
            b.inject(&x);
            if rcv.poll(&mut cr.link(&mut b, now), &mut h, now) && s_done {
                break;
            }
        }
        assert!(passed > target, "stream shorter than {target}");
        assert!(h.installed.is_none() && h.committed.is_none(), "{target}");
        assert_eq!(src.phase(), Phase::Failed, "{target}");
        assert!(!g.gone && !g.frozen);
        assert!(cr.error().is_some());
    }
}

#[test]
fn record_throughput_seals_and_opens_everything() {
    let mut t = 0u64;
    let mut clock = || {
        t += 7;
        t
    };
    let c = super::record_throughput(100_000, &mut clock).unwrap();
    assert_eq!(c.bytes, 100_000);
    // 7 records (6 full + 1 partial), 7 ticks per clock read.
    assert_eq!(c.seal_ticks, 7 * 7);
    assert_eq!(c.open_ticks, 7 * 7);
}
