//! Host tests of the migration protocol: both ends run against an in-memory link and a
//! fake guest that keeps writing pages between polls, as a real one does between time
//! slices. The destination's memory must equal the source's at freeze, page for page.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::link::{Link, LinkState};
use super::receiver::{Installer, Outcome, Receiver};
use super::source::{Params, Phase, PostMode, Source, SourceGuest, Status};
use super::stats::{MigrationStats, StopReason};
use super::wire::{self, Decoder, Hello, Msg, PAGE};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Wire {
    a_to_b: VecDeque<u8>,
    b_to_a: VecDeque<u8>,
    closed: bool,
    /// Bytes the a→b direction may still carry (None: unlimited). Models a peer that
    /// dies mid-stream.
    budget: Option<usize>,
}

/// One end of an in-memory link with a bounded send window.
struct End {
    w: Rc<RefCell<Wire>>,
    is_a: bool,
    window: usize,
}

fn pipe(window: usize) -> (End, End) {
    let w = Rc::new(RefCell::new(Wire::default()));
    (
        End {
            w: w.clone(),
            is_a: true,
            window,
        },
        End {
            w,
            is_a: false,
            window,
        },
    )
}

impl Link for End {
    fn state(&mut self) -> LinkState {
        if self.w.borrow().closed {
            LinkState::Closed
        } else {
            LinkState::Open
        }
    }
    fn send(&mut self, data: &[u8]) -> usize {
        let mut w = self.w.borrow_mut();
        if w.closed {
            return 0;
        }
        let is_a = self.is_a;
        let queued = if is_a { w.a_to_b.len() } else { w.b_to_a.len() };
        let mut n = data.len().min(self.window.saturating_sub(queued));
        if is_a {
            if let Some(b) = w.budget {
                n = n.min(b);
                w.budget = Some(b - n);
                if b - n == 0 {
                    w.closed = true;
                }
            }
            w.a_to_b.extend(&data[..n]);
        } else {
            w.b_to_a.extend(&data[..n]);
        }
        n
    }
    fn queued(&mut self) -> usize {
        let w = self.w.borrow();
        if self.is_a {
            w.a_to_b.len()
        } else {
            w.b_to_a.len()
        }
    }
    fn recv(&mut self, buf: &mut [u8]) -> usize {
        let mut w = self.w.borrow_mut();
        let q = if self.is_a {
            &mut w.b_to_a
        } else {
            &mut w.a_to_b
        };
        let n = buf.len().min(q.len());
        for (i, b) in q.drain(..n).enumerate() {
            buf[i] = b;
        }
        n
    }
    fn close(&mut self) {
        // Graceful close: the peer may still read what is queued.
    }
}

struct FakeGuest {
    mem: Vec<u8>,
    tracking: bool,
    dirty: Vec<usize>,
    frozen: bool,
    gone: bool,
    rng: Rng,
    /// Pages written per "time slice".
    rate: usize,
    /// Working set.
    ws: usize,
    /// Dirty tracking "forgets" this page (a tracking bug, for `verify=full`).
    untracked: Option<usize>,
    /// Pages hinted free (free-page hints) and whether each was written since.
    hinted: Vec<bool>,
    written: Vec<bool>,
    /// Auto-converge throttle in force (percent of its writes held back).
    throttle: u8,
}

impl FakeGuest {
    fn new(pages: usize, rate: usize, ws: usize) -> Self {
        let mut mem = vec![0u8; pages * PAGE];
        // Half the pages start with data, the rest are zero.
        for p in (0..pages).step_by(2) {
            mem[p * PAGE..p * PAGE + 8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
        }
        Self {
            mem,
            tracking: false,
            dirty: vec![],
            frozen: false,
            gone: false,
            rng: Rng(0x1234_5678),
            rate,
            ws,
            untracked: None,
            hinted: vec![false; pages],
            written: vec![false; pages],
            throttle: 0,
        }
    }

    /// One guest time slice: write `rate` pages of the working set.
    fn run(&mut self) {
        if self.frozen {
            return;
        }
        assert!(
            !self.gone,
            "split brain: the source ran a guest it handed over"
        );
        for _ in 0..self.rate * (100 - usize::from(self.throttle)) / 100 {
            let p = (self.rng.next() as usize) % self.ws;
            let off = p * PAGE + (self.rng.next() as usize % 512) * 8;
            let v = self.rng.next() | 1;
            self.mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
            self.written[p] = true;
            if self.tracking && self.untracked != Some(p) {
                self.dirty.push(p);
            }
        }
    }
}

impl SourceGuest for FakeGuest {
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
        assert!(!self.gone, "thawed a guest after handing it over");
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
    fn throttle(&mut self, pct: u8) {
        self.throttle = pct;
    }
    fn free_pages(&mut self, sink: &mut dyn FnMut(usize)) {
        for p in 0..self.hinted.len() {
            if self.hinted[p] && !self.written[p] {
                sink(p);
            }
        }
    }
}

#[derive(Default)]
struct FakeHost {
    installed: Option<(Vec<u8>, Hello, Vec<u8>)>,
    committed: Option<u32>,
    lost: Option<u32>,
    max_mem: u64,
    /// Post-copy: pages not arrived yet (empty: none).
    remote: Vec<bool>,
    /// Post-copy: the page the destination's guest waits for, since when.
    wanted: Option<(u64, u64)>,
    /// Post-copy: the guest's touches of remote pages.
    faults: u64,
    rng: Option<Rng>,
}

impl FakeHost {
    /// One time slice of the guest on the destination (post-copy only: it runs as
    /// soon as COMMIT arrived): writes pages of the working set into the installed
    /// memory and into `shadow`, and blocks at the first remote page it touches.
    fn run_dest(&mut self, shadow: &mut [u8], rate: usize, ws: usize, now: u64) {
        if self.committed.is_none() || self.wanted.is_some() || self.remote.is_empty() {
            return;
        }
        let rng = self.rng.get_or_insert(Rng(0xDE57));
        let Some((mem, _, _)) = self.installed.as_mut() else {
            return;
        };
        for _ in 0..rate {
            let p = (rng.next() as usize) % ws;
            if self.remote[p] {
                self.wanted = Some((p as u64, now));
                self.faults += 1;
                return;
            }
            let off = p * PAGE + (rng.next() as usize % 512) * 8;
            let v = rng.next() | 1;
            mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
            shadow[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl Installer for FakeHost {
    type Mem = Vec<u8>;
    fn alloc(&mut self, hello: &Hello) -> Result<Vec<u8>, String> {
        if hello.mem_bytes > self.max_mem {
            return Err(String::from("not enough memory"));
        }
        Ok(vec![0xEE; hello.mem_bytes as usize])
    }
    fn install(
        &mut self,
        mem: Vec<u8>,
        hello: &Hello,
        vcpu: &[u8],
        _device: &[u8],
        missing: Option<&[u64]>,
    ) -> Result<u32, String> {
        let pages = mem.len() / PAGE;
        if let Some(m) = missing {
            self.remote = (0..pages)
                .map(|p| m[p / 64] & (1 << (p % 64)) != 0)
                .collect();
        }
        self.installed = Some((mem, hello.clone(), vcpu.to_vec()));
        Ok(5)
    }
    fn post_page(&mut self, _: u32, pfn: u64) -> Option<&mut [u8]> {
        let (mem, _, _) = self.installed.as_mut()?;
        let start = pfn as usize * PAGE;
        mem.get_mut(start..start + PAGE)
    }
    fn post_arrived(&mut self, _: u32, pfn: u64, now_us: u64) -> Option<u64> {
        assert!(self.remote[pfn as usize], "page {pfn} arrived twice");
        self.remote[pfn as usize] = false;
        match self.wanted {
            Some((p, at)) if p == pfn => {
                self.wanted = None;
                Some(now_us - at)
            }
            _ => None,
        }
    }
    fn post_wanted(&mut self, _: u32) -> Option<u64> {
        self.wanted.map(|(p, _)| p)
    }
    fn commit(&mut self, id: u32, _pause_us: u64) {
        self.committed = Some(id);
    }
    fn commit_lost(&mut self, id: u32) {
        self.lost = Some(id);
    }
}

fn hello(pages: usize) -> Hello {
    Hello {
        flags: 0,
        mem_bytes: (pages * PAGE) as u64,
        migrations: 2,
        time_ns: 42,
        name: "fake".into(),
        args: "a=1".into(),
    }
}

/// Runs both ends until both finish (or a step bound). Returns the source.
fn migrate(
    g: &mut FakeGuest,
    host: &mut FakeHost,
    params: Params,
    window: usize,
    budget: Option<usize>,
) -> (Source, Receiver<Vec<u8>>) {
    migrate_held(g, host, params, window, budget, None)
}

/// [`migrate`] with a test hook armed at the destination.
fn migrate_held(
    g: &mut FakeGuest,
    host: &mut FakeHost,
    params: Params,
    window: usize,
    budget: Option<usize>,
    dest_hold: Option<super::Hold>,
) -> (Source, Receiver<Vec<u8>>) {
    let (mut a, mut b) = pipe(window);
    a.w.borrow_mut().budget = budget;
    let pages = g.pages();
    let mut src = Source::new(params, hello(pages), MigrationStats::default(), 0);
    let mut rcv = Receiver::new(0, 5_000_000);
    rcv.set_hold(dest_hold);
    let mut now = 0u64;
    let (mut s_done, mut r_done) = (false, false);
    let mut frozen_copy: Option<Vec<u8>> = None;
    for _ in 0..200_000 {
        now += 100; // 100 µs per step
        g.run();
        if !s_done {
            s_done = src.poll(g, &mut a, now) == Status::Finished;
        }
        if g.frozen && frozen_copy.is_none() {
            // What the destination must hold: the memory at the freeze, with zeros in
            // pages hinted free and never written.
            let mut copy = g.mem.clone();
            for p in (0..pages).filter(|p| g.hinted[*p] && !g.written[*p]) {
                copy[p * PAGE..(p + 1) * PAGE].fill(0);
            }
            frozen_copy = Some(copy);
        }
        if let Some(copy) = frozen_copy.as_mut() {
            host.run_dest(copy, g.rate, g.ws, now);
        }
        if !r_done {
            r_done = rcv.poll(&mut b, host, now);
        }
        if s_done && r_done {
            break;
        }
        if s_done && budget.is_some() {
            // The source failed; the peer learns from the closed link.
            rcv.poll(&mut b, host, now);
            break;
        }
    }
    if let (Some(copy), Some((mem, _, _))) = (&frozen_copy, &host.installed) {
        // Pages still remote (an interrupted post-copy) are the source's to give.
        for p in (0..pages).filter(|p| !host.remote.get(*p).copied().unwrap_or(false)) {
            assert_eq!(
                &copy[p * PAGE..(p + 1) * PAGE],
                &mem[p * PAGE..(p + 1) * PAGE],
                "page {p} differs"
            );
        }
    }
    (src, rcv)
}

fn host() -> FakeHost {
    FakeHost {
        max_mem: 1 << 30,
        ..Default::default()
    }
}

#[test]
fn precopy_converges_and_copies_every_page() {
    let mut g = FakeGuest::new(512, 2, 64);
    let mut h = host();
    let params = Params {
        downtime_us: 2_000,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, params, 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
    assert_eq!(h.committed, Some(5));
    assert!(g.gone);
    let st = &src.stats;
    assert!(!st.rounds.is_empty());
    assert_eq!(st.rounds[0].pages, 512);
    // Half the pages start zero; the guest may write some of its 64-page working set
    // before round 0 reaches them.
    assert!(
        (256 - 32..=256).contains(&st.rounds[0].zero_pages),
        "{}",
        st.rounds[0].zero_pages
    );
    assert!(st.downtime_us < st.total_us);
    let (_, hello, vcpu) = h.installed.unwrap();
    assert_eq!(hello.name, "fake");
    assert_eq!(hello.migrations, 2);
    assert_eq!(vcpu, vec![7; 200]);
}

#[test]
fn a_hold_at_each_phase_delays_it_and_the_migration_still_completes() {
    use super::{Hold, HoldPoint};
    for point in [
        HoldPoint::Drain,
        HoldPoint::Freeze,
        HoldPoint::Ready,
        HoldPoint::Commit,
        HoldPoint::Resume,
    ] {
        let hold = Hold { point, ms: 300 };
        let mut g = FakeGuest::new(256, 2, 32);
        let mut h = host();
        let params = Params {
            downtime_us: 2_000,
            hold: point.at_source().then_some(hold),
            ..Default::default()
        };
        let dest = (!point.at_source()).then_some(hold);
        let (src, rcv) = migrate_held(&mut g, &mut h, params, 64 * 1024, None, dest);
        assert_eq!(src.phase(), Phase::Done, "{point:?}: {}", src.stats.outcome);
        assert_eq!(rcv.outcome, Some(Outcome::Committed(5)), "{point:?}");
        assert_eq!(h.committed, Some(5), "{point:?}");
        if point != HoldPoint::Resume {
            // (A hold at `resume` is the destination's own: the source's figures end at
            // COMMIT without its Resumed here.)
            assert!(
                src.stats.total_us >= 300_000,
                "{point:?}: {}",
                src.stats.total_us
            );
        }
        if matches!(
            point,
            HoldPoint::Freeze | HoldPoint::Ready | HoldPoint::Commit
        ) {
            // The guest is frozen through these holds: its pause shows them.
            assert!(
                src.stats.downtime_us >= 300_000,
                "{point:?}: downtime {}",
                src.stats.downtime_us
            );
        }
    }
}

#[test]
fn heavy_dirtier_stops_by_policy_and_still_copies_exactly() {
    let mut g = FakeGuest::new(256, 50, 256);
    let mut h = host();
    let params = Params {
        downtime_us: 100,
        max_rounds: 5,
        ..Default::default()
    };
    let (src, _) = migrate(&mut g, &mut h, params, 16 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert!(matches!(
        src.stats.stop_reason,
        Some(StopReason::MaxRounds | StopReason::NotConverging)
    ));
    assert!(src.stats.last.pages > 0);
    assert_eq!(h.committed, Some(5));
}

#[test]
fn stop_and_copy_baseline() {
    let mut g = FakeGuest::new(128, 5, 128);
    let mut h = host();
    let params = Params {
        stop_and_copy: true,
        ..Default::default()
    };
    let (src, _) = migrate(&mut g, &mut h, params, 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Done);
    assert!(src.stats.rounds.is_empty());
    assert_eq!(src.stats.last.pages, 128);
    assert_eq!(src.stats.stop_reason, Some(StopReason::Baseline));
}

#[test]
fn peer_gone_mid_stream_keeps_guest_on_source() {
    let mut g = FakeGuest::new(256, 2, 64);
    let mut h = host();
    let (src, rcv) = migrate(&mut g, &mut h, Params::default(), 64 * 1024, Some(200_000));
    assert_eq!(src.phase(), Phase::Failed);
    assert!(
        src.stats.outcome.contains("connection lost"),
        "{}",
        src.stats.outcome
    );
    assert!(
        !g.gone && !g.frozen && !g.tracking,
        "guest runs on at the source"
    );
    assert!(h.installed.is_none() && h.committed.is_none());
    assert!(matches!(rcv.outcome, Some(Outcome::Discarded(_))));
}

#[test]
fn destination_without_memory_rejects_and_source_keeps_guest() {
    let mut g = FakeGuest::new(64, 1, 8);
    let mut h = FakeHost {
        max_mem: 4096,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, Params::default(), 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Failed);
    assert!(
        src.stats.outcome.contains("not enough memory"),
        "{}",
        src.stats.outcome
    );
    assert!(!g.gone && !g.frozen);
    assert!(matches!(rcv.outcome, Some(Outcome::Discarded(_))));
}

/// A source that dies right after READY never sends COMMIT: the destination keeps
/// the complete guest paused, never running.
#[test]
fn lost_commit_leaves_guest_paused_at_destination() {
    let pages = 8;
    let mut stream = Vec::new();
    wire::put_hello(&mut stream, &hello(pages));
    let mut sum = wire::Checksum::new(pages);
    for p in 0..pages as u64 {
        wire::put_zero(&mut stream, p);
        sum.set(p as usize, wire::zero_hash(p));
    }
    wire::put_state(&mut stream, wire::tag::VCPU, &[1; 200]);
    wire::put_state(&mut stream, wire::tag::DEVICE, &[]);
    wire::put_end(&mut stream, pages as u64, sum.value());
    let (mut a, mut b) = pipe(1 << 20);
    a.send(&stream);
    let mut h = host();
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 1_000_000);
    assert!(!rcv.poll(&mut b, &mut h, 10));
    assert!(h.installed.is_some());
    // READY went out.
    let mut buf = [0u8; 64];
    let n = a.recv(&mut buf);
    assert_eq!(&buf[..n], &[wire::tag::READY, 0, 0, 0, 0, 0, 0, 0]);
    a.w.borrow_mut().closed = true;
    assert!(rcv.poll(&mut b, &mut h, 20));
    assert_eq!(rcv.outcome, Some(Outcome::CommitLost(5)));
    assert_eq!(h.lost, Some(5));
    assert_eq!(h.committed, None);
}

/// Feeds `bytes` to a fresh receiver and returns its outcome.
fn receive(bytes: &[u8]) -> (Option<Outcome>, FakeHost) {
    let (mut a, mut b) = pipe(1 << 20);
    a.send(bytes);
    a.w.borrow_mut().closed = true;
    let mut h = FakeHost {
        max_mem: 1 << 20,
        ..Default::default()
    };
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 1_000_000);
    for t in 0..10 {
        if rcv.poll(&mut b, &mut h, t) {
            break;
        }
    }
    (rcv.outcome, h)
}

fn discarded(bytes: &[u8], why: &str) {
    let (out, h) = receive(bytes);
    match out {
        Some(Outcome::Discarded(r)) => assert!(r.contains(why), "expected '{why}', got '{r}'"),
        other => panic!("expected discard ({why}), got {other:?}"),
    }
    assert!(h.installed.is_none());
}

#[test]
fn receiver_rejects_malformed_streams() {
    let mut ok = Vec::new();
    wire::put_hello(&mut ok, &hello(4));
    // Garbage.
    discarded(b"GET / HTTP/1.0\r\n\r\n", "malformed");
    // Tag 0.
    discarded(&[0u8; 16], "tag 0");
    // Page before Hello.
    let mut s = Vec::new();
    wire::put_zero(&mut s, 0);
    discarded(&s, "must start with Hello");
    // Page out of range.
    let mut s = ok.clone();
    wire::put_page(&mut s, 4, &[1; PAGE]);
    discarded(&s, "outside the guest");
    let mut s = ok.clone();
    wire::put_zero(&mut s, u64::MAX);
    discarded(&s, "outside the guest");
    // Huge length.
    let mut s = ok.clone();
    s.extend_from_slice(&[wire::tag::VCPU, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0x7F]);
    discarded(&s, "bad length");
    // Bad checksum.
    let mut s = ok.clone();
    for p in 0..4 {
        wire::put_zero(&mut s, p);
    }
    wire::put_state(&mut s, wire::tag::VCPU, &[0; 8]);
    wire::put_state(&mut s, wire::tag::DEVICE, &[]);
    wire::put_end(&mut s, 4, 12345);
    discarded(&s, "checksum");
    // End before state.
    let mut s = ok.clone();
    wire::put_end(&mut s, 0, 0);
    discarded(&s, "before the vCPU");
    // Truncated: source vanished.
    discarded(&ok[..ok.len() - 3], "closed the connection");
    // Memory bigger than this host has.
    let mut s = Vec::new();
    wire::put_hello(
        &mut s,
        &Hello {
            flags: 0,
            mem_bytes: 1 << 40,
            ..hello(1)
        },
    );
    discarded(&s, "not enough memory");
    // Round out of order.
    let mut s = ok.clone();
    wire::put_round_end(&mut s, 3, 0);
    discarded(&s, "out of order");
}

#[test]
fn every_message_round_trips_in_any_chunking() {
    let mut s = Vec::new();
    let h = hello(16);
    wire::put_hello(&mut s, &h);
    let page: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
    wire::put_page(&mut s, 3, &page);
    wire::put_zero(&mut s, 4);
    wire::put_round_end(&mut s, 0, 2);
    wire::put_state(&mut s, wire::tag::VCPU, &[5; 100]);
    wire::put_state(&mut s, wire::tag::DEVICE, &[]);
    wire::put_end(&mut s, 2, 99);
    wire::put_control(&mut s, wire::tag::READY);
    wire::put_reason(&mut s, wire::tag::REJECT, 3, "nope");
    wire::put_commit(&mut s, &wire::CommitTimes::default());
    wire::put_reason(&mut s, wire::tag::ABORT, 1, "gone");
    let mut rng = Rng(99);
    for chunking in 0..20 {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut off = 0;
        while off < s.len() {
            let len = if chunking == 0 {
                1
            } else {
                1 + rng.next() as usize % 5000
            };
            let chunk = &s[off..(off + len).min(s.len())];
            let mut used = 0;
            while used < chunk.len() {
                let (n, ready) = d.push(&chunk[used..]).unwrap();
                used += n;
                if ready {
                    got.push(format!("{:?}", d.take().unwrap()).len());
                }
            }
            off += chunk.len();
        }
        assert_eq!(got.len(), 11);
    }
    let mut d = Decoder::new();
    let (n, ready) = d.push(&s).unwrap();
    assert!(ready);
    match d.take().unwrap() {
        Msg::Hello(x) => assert_eq!(x, h),
        m => panic!("{m:?}"),
    }
    let (_, ready) = d.push(&s[n..]).unwrap();
    assert!(ready);
    match d.take().unwrap() {
        Msg::Page { pfn, data } => {
            assert_eq!(pfn, 3);
            assert_eq!(data, &page[..]);
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn corrupted_streams_never_panic() {
    let mut base = Vec::new();
    wire::put_hello(&mut base, &hello(8));
    for p in 0..8 {
        if p % 2 == 0 {
            wire::put_page(&mut base, p, &[p as u8; PAGE]);
        } else {
            wire::put_zero(&mut base, p);
        }
    }
    wire::put_state(&mut base, wire::tag::VCPU, &[1; 200]);
    wire::put_state(&mut base, wire::tag::DEVICE, &[2; 4]);
    wire::put_end(&mut base, 8, 0);
    let mut rng = Rng(7);
    for _ in 0..3000 {
        let mut s = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = rng.next() as usize % s.len();
            s[i] ^= 1 << (rng.next() % 8);
        }
        if rng.next().is_multiple_of(4) {
            s.truncate(rng.next() as usize % s.len());
        }
        let (out, h) = receive(&s);
        // The base stream has a wrong checksum, so no corruption may ever install it.
        assert!(matches!(out, Some(Outcome::Discarded(_))), "{out:?}");
        assert!(h.installed.is_none());
    }
    // Random bytes.
    for _ in 0..500 {
        let s: Vec<u8> = (0..rng.next() % 300).map(|_| rng.next() as u8).collect();
        let (out, _) = receive(&s);
        assert!(matches!(out, Some(Outcome::Discarded(_))));
    }
}

#[test]
fn zero_detection_and_checksum() {
    assert!(wire::is_zero(&[0; PAGE]));
    let mut p = [0u8; PAGE];
    p[PAGE - 1] = 1;
    assert!(!wire::is_zero(&p));
    let mut c = wire::Checksum::new(4);
    c.set(1, 10);
    c.set(1, 20);
    c.set(2, 5);
    c.set(9, 100);
    assert_eq!(c.value(), 25);
    assert_ne!(wire::page_hash(1, &p), wire::page_hash(2, &p));
}

/// A peer that accepts the connection and then never reads (a hung hypervisor): the
/// source must give up after its timeout and keep the guest.
#[test]
fn silent_peer_times_out_and_guest_stays() {
    for stop_and_copy in [false, true] {
        let mut g = FakeGuest::new(256, 2, 64);
        let (mut a, _b) = pipe(32 * 1024);
        let params = Params {
            timeout_us: 1_000_000,
            stop_and_copy,
            ..Default::default()
        };
        let mut src = Source::new(params, hello(256), MigrationStats::default(), 0);
        let mut now = 0;
        while src.poll(&mut g, &mut a, now) == Status::Running {
            now += 1000;
            g.run();
            assert!(now < 60_000_000, "source never gave up");
        }
        assert_eq!(src.phase(), Phase::Failed);
        assert!(
            src.stats.outcome.contains("stopped reading"),
            "{}",
            src.stats.outcome
        );
        assert!(!g.frozen && !g.gone && !g.tracking);
    }
}

/// A link that takes a few bytes at a time: the source's own buffer must stay bounded.
#[test]
fn partial_sends_keep_the_buffer_bounded() {
    let mut g = FakeGuest::new(512, 1, 32);
    let (mut a, mut b) = pipe(3000);
    let mut h = host();
    let mut src = Source::new(Params::default(), hello(512), MigrationStats::default(), 0);
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
    let mut now = 0;
    for _ in 0..2_000_000 {
        now += 10;
        g.run();
        if src.poll(&mut g, &mut a, now) == Status::Finished {
            break;
        }
        assert!(
            src.buffered() < 200 * 1024,
            "source buffer grew to {}",
            src.buffered()
        );
        rcv.poll(&mut b, &mut h, now);
    }
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
}

/// A cancel while the link is full of pages: the ABORT does not fit, so it is kept as
/// the farewell; once delivered the receiver discards with the operator's reason
/// (instead of a bare end of stream), and a second poll does not overwrite it.
#[test]
fn cancel_with_a_full_link_still_delivers_the_abort() {
    let mut g = FakeGuest::new(256, 0, 1);
    let (mut a, mut b) = pipe(8 * 1024);
    let mut h = host();
    let params = Params {
        stop_and_copy: true,
        ..Default::default()
    };
    let mut src = Source::new(params, hello(256), MigrationStats::default(), 0);
    let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
    let mut now = 0;
    // Fill the window without the receiver reading.
    while a.queued() < 8 * 1024 {
        now += 100;
        src.poll(&mut g, &mut a, now);
    }
    assert!(src.cancel(&mut g, &mut a, now, "cancelled by the operator"));
    assert_eq!(src.poll(&mut g, &mut a, now), Status::Finished);
    assert_eq!(src.stats.outcome, "cancelled by the operator");
    assert!(!g.frozen);
    let mut tail = src.take_farewell();
    assert!(!tail.is_empty(), "a full link cannot have taken the ABORT");
    // The kernel's linger: deliver the rest as the receiver drains the link.
    for _ in 0..10_000 {
        now += 100;
        if !tail.is_empty() {
            let n = a.send(&tail);
            tail.drain(..n);
        }
        if rcv.poll(&mut b, &mut h, now) {
            break;
        }
    }
    match &rcv.outcome {
        Some(Outcome::Discarded(why)) => {
            assert!(why.contains("cancelled by the operator"), "{why}")
        }
        o => panic!("receiver did not see the ABORT: {o:?}"),
    }
    assert!(h.installed.is_none());
}

/// `verify=full` over a correct migration: every page compared, none differs.
#[test]
fn verify_full_compares_every_page() {
    let mut g = FakeGuest::new(512, 4, 64);
    let mut h = host();
    let params = Params {
        verify_full: true,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, params, 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    let full = rcv.full_check();
    assert_eq!(full.pages, 512);
    assert_eq!(full.mismatched, 0);
}

/// A page dirty tracking misses: the stream checksum (of what was sent) cannot see it,
/// `verify=full` (of the guest's real memory) rejects the migration, and the guest
/// keeps running on the source.
#[test]
fn verify_full_catches_a_page_missed_by_dirty_tracking() {
    for verify_full in [false, true] {
        let mut g = FakeGuest::new(64, 8, 4);
        g.untracked = Some(2);
        let mut h = host();
        let params = Params {
            verify_full,
            max_rounds: 3,
            ..Default::default()
        };
        let (mut a, mut b) = pipe(64 * 1024);
        let mut src = Source::new(params, hello(64), MigrationStats::default(), 0);
        let mut rcv: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
        let mut now = 0;
        let mut done = false;
        for _ in 0..100_000 {
            now += 100;
            g.run();
            done = src.poll(&mut g, &mut a, now) == Status::Finished;
            rcv.poll(&mut b, &mut h, now);
            if done {
                break;
            }
        }
        assert!(done);
        if verify_full {
            assert_eq!(src.phase(), Phase::Failed);
            assert!(
                src.stats.outcome.contains("differ from the source"),
                "{}",
                src.stats.outcome
            );
            assert!(h.installed.is_none() && !g.gone && !g.frozen);
            assert_eq!(rcv.full_check().first_mismatch, Some(2));
        } else {
            // Without it the copy is silently wrong (what verify=full exists for).
            assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
            let (mem, _, _) = h.installed.as_ref().unwrap();
            assert_ne!(&mem[2 * PAGE..3 * PAGE], &g.mem[2 * PAGE..3 * PAGE]);
        }
    }
}

/// Delta compression: a guest re-dirtying a few words of a small working set sends
/// its re-sent pages as deltas, far fewer bytes, and the copy is still exact (the
/// `migrate` helper compares every page with the frozen source).
#[test]
fn delta_compression_sends_fewer_bytes_and_copies_exactly() {
    let mut bytes = [0u64; 2];
    for (i, cache) in [0usize, 1 << 20].into_iter().enumerate() {
        let mut g = FakeGuest::new(512, 6, 64);
        let mut h = host();
        let params = Params {
            cache_bytes: cache,
            max_rounds: 8,
            downtime_us: 1,
            ..Default::default()
        };
        let (src, rcv) = migrate(&mut g, &mut h, params, 64 * 1024, None);
        assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
        assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
        let deltas: u64 = src
            .stats
            .rounds
            .iter()
            .chain([&src.stats.last])
            .map(|r| r.delta_pages)
            .sum();
        if cache == 0 {
            assert_eq!(deltas, 0);
        } else {
            assert!(deltas > 0, "no page went as a delta");
        }
        // What was re-sent after round 0 (which sends every page once, in full).
        bytes[i] = src.stats.total_bytes() - src.stats.rounds[0].bytes;
    }
    assert!(
        bytes[1] * 10 < bytes[0] * 7,
        "re-sent with deltas {} bytes, without {}",
        bytes[1],
        bytes[0]
    );
}

/// A DeltaPage the Hello did not announce is refused.
#[test]
fn an_unannounced_delta_is_refused() {
    let mut s = Vec::new();
    wire::put_hello(&mut s, &hello(4));
    wire::put_delta(&mut s, 1, &[0, 1, 0xAA]);
    discarded(&s, "did not announce deltas");
}

fn postcopy(prepage: u32) -> Params {
    Params {
        postcopy: PostMode::Always,
        prepage,
        ..Default::default()
    }
}

#[test]
fn postcopy_hands_over_first_and_delivers_every_page_once() {
    let mut g = FakeGuest::new(512, 4, 128);
    let mut h = host();
    // `migrate` checks the destination's memory against the source's at the freeze
    // plus what the guest wrote on the destination since.
    let (src, rcv) = migrate(&mut g, &mut h, postcopy(16), 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
    assert!(g.gone);
    let st = &src.stats;
    assert!(st.rounds.is_empty(), "no pre-copy round");
    assert_eq!(st.stop_reason, Some(StopReason::Postcopy));
    assert!(st.postcopy.used);
    assert_eq!(st.postcopy.missing_at_handover, 512);
    assert_eq!(st.post.pages, 512, "every page exactly once");
    assert_eq!(st.total_pages(), 512);
    assert!(h.remote.iter().all(|r| !r), "a page never arrived");
    // The guest ran on the destination, touched remote pages and waited for them.
    assert!(h.faults > 0);
    assert_eq!(st.postcopy.remote.faults, h.faults);
    assert!(st.postcopy.requests >= h.faults.min(1));
    assert!(st.postcopy.remote.fault_max_us >= st.postcopy.remote.fault_median_us);
    assert!(st.postcopy.remote.last_page_us > 0);
    assert!(st
        .line()
        .contains("postcopy=1 post_missing=512 post_pages=512"));
}

#[test]
fn prepaging_cuts_remote_faults() {
    let faults = |prepage| {
        let mut g = FakeGuest::new(512, 4, 128);
        let mut h = host();
        let (src, _) = migrate(&mut g, &mut h, postcopy(prepage), 64 * 1024, None);
        assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
        assert_eq!(src.stats.post.pages, 512);
        if prepage == 0 {
            assert_eq!(src.stats.postcopy.prepaged, 0);
        } else {
            assert!(src.stats.postcopy.prepaged > 0);
        }
        h.faults
    };
    let (without, with) = (faults(0), faults(16));
    eprintln!("remote faults: prepage=0 {without}, prepage=16 {with}");
    assert!(
        with < without,
        "prepaging: {with} faults, without: {without}"
    );
}

#[test]
fn hybrid_switches_to_postcopy_when_rounds_stop_converging() {
    let mut g = FakeGuest::new(256, 50, 256);
    let mut h = host();
    let params = Params {
        downtime_us: 100,
        max_rounds: 5,
        postcopy: PostMode::Hybrid,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, params, 16 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
    let st = &src.stats;
    assert!(!st.rounds.is_empty());
    assert!(matches!(
        st.stop_reason,
        Some(StopReason::MaxRounds | StopReason::NotConverging | StopReason::WireBudget)
    ));
    assert!(st.postcopy.used);
    // Pre-copy rounds stop before they would pass 1.15x the memory; the rest goes once.
    let pre: u64 = st.rounds.iter().map(|r| r.bytes).sum();
    assert!(pre <= (256 * PAGE) as u64 / 20 * 23, "{pre}");
    assert_eq!(st.last.pages, 0, "no stop-and-copy pages");
    assert_eq!(st.post.pages, st.postcopy.missing_at_handover);
    assert!(st.postcopy.missing_at_handover > 0);
}

#[test]
fn hybrid_with_a_converging_guest_stays_precopy() {
    let mut g = FakeGuest::new(512, 2, 64);
    let mut h = host();
    let params = Params {
        downtime_us: 2_000,
        postcopy: PostMode::Hybrid,
        ..Default::default()
    };
    let (src, _) = migrate(&mut g, &mut h, params, 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(src.stats.stop_reason, Some(StopReason::FitsDowntime));
    assert!(!src.stats.postcopy.used);
    assert!(h.remote.is_empty());
}

#[test]
fn postcopy_link_lost_after_commit_keeps_both_halves() {
    let mut g = FakeGuest::new(512, 4, 128);
    let mut h = host();
    // The link dies partway through the pages that follow the hand-over.
    let (src, rcv) = migrate(&mut g, &mut h, postcopy(16), 64 * 1024, Some(300 * 1024));
    assert_eq!(src.phase(), Phase::Stranded, "{}", src.stats.outcome);
    assert!(src.stats.outcome.starts_with("post-copy interrupted"));
    assert!(g.gone, "the guest is the destination's: never thawed here");
    let left = src.pages_left();
    assert!(left > 0 && left < 512, "{left}");
    // The destination keeps the guest (committed) and reconnects; it lacks at least
    // what the source never sent.
    assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
    assert_eq!(rcv.recovering(), Some(5));
    let missing = rcv.postcopy().map_or(0, |p| p.left);
    assert!(
        missing >= left,
        "destination lacks {missing}, source kept {left}"
    );
    let remote = h.remote.iter().filter(|r| **r).count() as u64;
    assert_eq!(remote, missing);
    // `migrate` checked every page that did arrive against the source's.
}

#[test]
fn postcopy_recovers_over_a_new_link_and_completes() {
    let pages = 512;
    let mut g = FakeGuest::new(pages, 4, 128);
    let mut h = host();
    // First link: dies partway through the pages after the hand-over.
    let (src, mut rcv) = migrate(&mut g, &mut h, postcopy(16), 64 * 1024, Some(300 * 1024));
    let mut src = src;
    assert_eq!(src.phase(), Phase::Stranded, "{}", src.stats.outcome);
    assert_eq!(rcv.recovering(), Some(5));
    assert!(rcv.in_postcopy());
    let frozen = g.mem.clone();
    // What the destination's guest wrote meanwhile is in its memory; rebuild the
    // expected memory from the source's frozen copy plus those pages as they are.
    let mut shadow = frozen.clone();
    {
        let (mem, _, _) = h.installed.as_ref().unwrap();
        for p in (0..pages).filter(|p| !h.remote[*p]) {
            shadow[p * PAGE..(p + 1) * PAGE].copy_from_slice(&mem[p * PAGE..(p + 1) * PAGE]);
        }
    }
    // Second link: the destination says who it is and what it lacks; a receiver at
    // the source (its listener) decodes that.
    let (mut a, mut b) = pipe(64 * 1024);
    rcv.reattach(1_000_000);
    let mut at_source: Receiver<Vec<u8>> = Receiver::new(1_000_000, 5_000_000);
    let mut scratch = host();
    let mut now = 1_000_000u64;
    while at_source.outcome.is_none() {
        now += 100;
        rcv.poll(&mut b, &mut h, now);
        at_source.poll(&mut a, &mut scratch, now);
        assert!(now < 2_000_000, "no Recover arrived");
    }
    let Some(Outcome::Recover(req)) = at_source.outcome.take() else {
        panic!("{:?}", at_source.outcome)
    };
    assert_eq!(req.mem_bytes, (pages * PAGE) as u64);
    assert_eq!(req.time_ns, 42);
    let lacking: u64 = req.missing.iter().map(|w| u64::from(w.count_ones())).sum();
    assert!(lacking > 0);
    assert!(scratch.installed.is_none(), "a Recover allocates no guest");
    src.resume(&req.missing, req.pages, now).unwrap();
    let (mut s_done, mut r_done) = (false, false);
    for _ in 0..200_000 {
        now += 100;
        if !s_done {
            s_done = src.poll(&mut g, &mut a, now) == Status::Finished;
        }
        h.run_dest(&mut shadow, g.rate, g.ws, now);
        if !r_done {
            r_done = rcv.poll(&mut b, &mut h, now);
        }
        if s_done && r_done {
            break;
        }
    }
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(src.stats.postcopy.recoveries, 1);
    assert_eq!(rcv.recoveries, 1);
    assert!(rcv.failed.is_none());
    assert!(h.remote.iter().all(|r| !r), "a page never arrived");
    let (mem, _, _) = h.installed.as_ref().unwrap();
    for p in 0..pages {
        assert_eq!(
            &shadow[p * PAGE..(p + 1) * PAGE],
            &mem[p * PAGE..(p + 1) * PAGE],
            "page {p} differs after recovery"
        );
    }
}

#[test]
fn a_recover_for_an_unknown_or_huge_guest_is_refused() {
    let mut m = Vec::new();
    wire::put_recover(&mut m, 1, 1 << 40, 0);
    let (mut a, mut b) = pipe(64 * 1024);
    b.send(&m);
    let mut r: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
    let mut h = host();
    assert!(r.poll(&mut a, &mut h, 10));
    assert!(
        matches!(r.outcome, Some(Outcome::Discarded(_))),
        "{:?}",
        r.outcome
    );
}

/// A guest whose memory is mostly free but not zero (junk in every page), with and
/// without telling the hypervisor which pages are free.
fn junk_guest(hint: bool) -> FakeGuest {
    let mut g = FakeGuest::new(512, 2, 64);
    for p in 0..512 {
        g.mem[p * PAGE + 8] = 0xAB;
    }
    if hint {
        // Everything but the working set, and a few pages inside it that the guest
        // will write again (a stale hint must cost nothing but bytes).
        for p in (8..512).filter(|p| *p >= 64 || p % 8 == 0) {
            g.hinted[p] = true;
        }
    }
    g
}

#[test]
fn free_page_hints_skip_free_memory_and_never_lose_a_written_page() {
    let bytes = |hint: bool, params: Params| {
        let mut g = junk_guest(hint);
        let mut h = host();
        // `migrate` checks every page: zeros for a hinted page never written, the
        // source's contents for everything else.
        let (src, _) = migrate(&mut g, &mut h, params, 64 * 1024, None);
        assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
        if hint {
            assert!(src.stats.free_pages >= 448, "{}", src.stats.free_pages);
        } else {
            assert_eq!(src.stats.free_pages, 0);
        }
        src.stats.total_bytes()
    };
    for params in [Params::default(), postcopy(16)] {
        let (without, with) = (bytes(false, params), bytes(true, params));
        eprintln!(
            "free-page hints ({:?}): {without} bytes without, {with} with",
            params.postcopy
        );
        // 512 pages of junk against a 64-page working set: at least 4x fewer bytes.
        assert!(with * 4 < without, "{with} vs {without}");
    }
}

#[test]
fn checkpoint_lets_the_guest_go_once_encoded_and_never_hands_it_over() {
    let mut g = FakeGuest::new(256, 4, 64);
    let (mut a, mut b) = pipe(1 << 20);
    let params = Params {
        checkpoint: true,
        downtime_us: 2_000,
        ..Default::default()
    };
    let mut src = Source::new(params, hello(256), MigrationStats::default(), 0);
    let mut dec = Decoder::new();
    let mut now = 0;
    let mut saw_end = false;
    let mut froze = false;
    // Play the store up to End: the guest is frozen for the last pages, then thawed
    // before the store has said anything.
    while !saw_end {
        now += 100;
        g.run();
        assert_eq!(src.poll(&mut g, &mut a, now), Status::Running);
        froze |= g.frozen;
        let mut buf = [0u8; 8192];
        let n = b.recv(&mut buf);
        let mut off = 0;
        while off < n {
            let (used, ready) = dec.push(&buf[off..n]).unwrap();
            off += used;
            if ready {
                match dec.take().unwrap() {
                    Msg::Hello(h) => assert_ne!(h.flags & wire::hello_flags::CHECKPOINT, 0),
                    Msg::End { .. } => saw_end = true,
                    _ => {}
                }
            }
        }
        assert!(now < 10_000_000, "no End");
    }
    src.poll(&mut g, &mut a, now + 100);
    assert!(froze, "the final pages were sent from a frozen guest");
    assert!(
        !g.frozen,
        "thawed once the snapshot was encoded, before READY"
    );
    assert!(!g.gone);
    // READY: COMMIT follows, the guest is not handed over.
    let mut m = Vec::new();
    wire::put_control(&mut m, wire::tag::READY);
    b.send(&m);
    for _ in 0..10 {
        now += 100;
        g.run();
        src.poll(&mut g, &mut a, now);
    }
    assert!(!g.gone, "a checkpoint never hands the guest over");
    let mut m = Vec::new();
    wire::put_resumed(&mut m, &wire::ResumedTimes::default());
    b.send(&m);
    now += 100;
    assert_eq!(src.poll(&mut g, &mut a, now), Status::Finished);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert!(src.stats.downtime_us > 0 && src.stats.downtime_us < src.stats.total_us);
    g.run(); // still runs here
}

#[test]
fn a_hypervisor_refuses_a_checkpoint_stream() {
    let mut g = FakeGuest::new(64, 1, 8);
    let mut h = host();
    let params = Params {
        checkpoint: true,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, params, 64 * 1024, None);
    assert_eq!(src.phase(), Phase::Failed);
    assert!(
        src.stats.outcome.contains("goes to a store"),
        "{}",
        src.stats.outcome
    );
    assert!(matches!(rcv.outcome, Some(Outcome::Discarded(_))));
    assert!(h.installed.is_none());
    assert!(!g.gone && !g.frozen);
}

#[test]
fn the_trace_books_every_interval_and_explains_the_final_set() {
    let mut g = FakeGuest::new(512, 2, 64);
    let mut h = host();
    let params = Params {
        downtime_us: 2_000,
        ..Default::default()
    };
    let (src, rcv) = migrate(&mut g, &mut h, params, 16 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    // The destination saw the final set arrive after the last round's end.
    assert!(rcv.final_arrival_us() > 0);
    let st = &src.stats;
    for r in &st.rounds {
        assert!(r.trace.polls > 0, "round {} has no polls", r.round);
        // Every 100 us step between the round's first and last poll is booked once.
        assert!(
            r.trace.span_us().abs_diff(r.us) <= 200,
            "round {}: trace {} us, round {} us",
            r.round,
            r.trace.span_us(),
            r.us
        );
    }
    // Round 0 sends 512 pages through a 16 KiB window: mostly waiting for the link.
    assert!(st.rounds[0].trace.link_full_us > st.rounds[0].us / 2);
    assert!(st.drain.polls > 0, "{:?}", st.drain);
    assert_eq!(st.last.pages, st.round_end_dirty + st.drain_dirty);
    assert_eq!(st.throttle_us, 0);
}

#[test]
fn auto_converge_throttles_a_guest_pre_copy_cannot_keep_up_with() {
    let run = |auto_converge| {
        let mut g = FakeGuest::new(256, 50, 256);
        let mut h = host();
        let params = Params {
            downtime_us: 2_000,
            max_rounds: 30,
            auto_converge,
            ..Default::default()
        };
        let (src, _) = migrate(&mut g, &mut h, params, 16 * 1024, None);
        assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
        assert_eq!(g.throttle, 0, "the throttle is released at the freeze");
        assert_eq!(src.stats.throttle_us > 0, src.stats.throttle_pct > 0);
        (
            src.stats.last.pages,
            src.stats.throttle_pct,
            src.stats.stop_reason,
        )
    };
    let (plain_final, plain_t, plain_stop) = run(false);
    let (auto_final, auto_t, auto_stop) = run(true);
    eprintln!(
        "final set: {plain_final} pages ({plain_stop:?}) without, {auto_final} ({auto_stop:?}, throttle {auto_t}%) with auto-converge"
    );
    assert_eq!(plain_t, 0);
    assert!(auto_t >= 20, "{auto_t}");
    assert!(auto_final < plain_final, "{auto_final} vs {plain_final}");
}

#[test]
fn hybrid_hands_over_mid_round_before_the_wire_budget_is_spent() {
    // A guest that rewrites its whole memory: during round 0 it dirties a good part of
    // what was already sent.
    let pages = 512;
    let run = |postcopy| {
        let mut g = FakeGuest::new(pages, 3, pages);
        for p in 0..pages {
            g.mem[p * PAGE + 16] = 1; // no zero pages
        }
        let mut h = host();
        let params = Params {
            downtime_us: 100,
            max_rounds: 30,
            postcopy,
            ..Default::default()
        };
        let (src, _) = migrate(&mut g, &mut h, params, 16 * 1024, None);
        assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
        (src.stats.total_bytes(), src.stats.stop_reason)
    };
    let mem = (pages * PAGE) as u64;
    let (pre, pre_stop) = run(PostMode::Off);
    let (hyb, hyb_stop) = run(PostMode::Hybrid);
    eprintln!(
        "wire/memory: pre-copy {:.2} ({pre_stop:?}), hybrid {:.2} ({hyb_stop:?})",
        pre as f64 / mem as f64,
        hyb as f64 / mem as f64
    );
    assert_eq!(hyb_stop, Some(StopReason::WireBudget));
    assert!(
        hyb * 100 <= mem * 130,
        "hybrid put {hyb} bytes on the wire for {mem}"
    );
    assert!(hyb < pre);
}

#[test]
fn hybrid_with_delta_compression_stays_exact() {
    let mut g = FakeGuest::new(256, 50, 256);
    let mut h = host();
    let params = Params {
        downtime_us: 100,
        max_rounds: 5,
        postcopy: PostMode::Hybrid,
        cache_bytes: 1 << 20,
        ..Default::default()
    };
    // `migrate` checks every page of the destination against the source's.
    let (src, rcv) = migrate(&mut g, &mut h, params, 16 * 1024, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert_eq!(rcv.outcome, Some(Outcome::Committed(5)));
    assert!(src.stats.postcopy.used);
}

/// A hand-written post-copy stream for 2 pages: page 0 before the hand-over, page 1
/// missing; the receiver is taken to COMMIT and returned.
fn postcopy_handed_over(h: &mut FakeHost) -> (Receiver<Vec<u8>>, End, End) {
    let (mut a, mut b) = pipe(1 << 20);
    let mut s = Vec::new();
    let mut hl = hello(2);
    hl.flags = wire::hello_flags::POSTCOPY;
    wire::put_hello(&mut s, &hl);
    wire::put_page(&mut s, 0, &[1; PAGE]);
    wire::put_missing(&mut s, 0, &[0b10]);
    wire::put_state(&mut s, wire::tag::VCPU, &[7; 200]);
    wire::put_state(&mut s, wire::tag::DEVICE, &[9; 16]);
    wire::put_post_end(&mut s, 1, 1);
    a.send(&s);
    let mut r: Receiver<Vec<u8>> = Receiver::new(0, 5_000_000);
    r.poll(&mut b, h, 10);
    assert_eq!(h.remote, vec![false, true]);
    let mut c = Vec::new();
    wire::put_commit(&mut c, &wire::CommitTimes::default());
    a.send(&c);
    r.poll(&mut b, h, 20);
    assert!(r.in_postcopy());
    (r, a, b)
}

#[test]
fn a_post_copy_page_the_destination_already_holds_is_refused_not_written() {
    let mut h = host();
    let (mut r, mut a, mut b) = postcopy_handed_over(&mut h);
    let mut s = Vec::new();
    wire::put_page(&mut s, 0, &[0xAA; PAGE]); // page 0 is here already
    a.send(&s);
    r.poll(&mut b, &mut h, 30);
    // Treated as a broken link: the guest stays, its memory untouched, and the
    // destination reconnects for the pages it still lacks.
    assert_eq!(r.recovering(), Some(5));
    let (mem, _, _) = h.installed.as_ref().unwrap();
    assert!(
        mem[..PAGE].iter().all(|b| *b == 1),
        "a held page was overwritten"
    );
    assert!(r
        .interrupted
        .as_deref()
        .unwrap_or("")
        .contains("not one the destination lacks"));
}

#[test]
fn a_post_copy_checksum_mismatch_pauses_the_guest_for_good() {
    let mut h = host();
    let (mut r, mut a, mut b) = postcopy_handed_over(&mut h);
    let mut s = Vec::new();
    wire::put_page(&mut s, 1, &[2; PAGE]);
    wire::put_end(&mut s, 2, 0xBAD);
    a.send(&s);
    assert!(r.poll(&mut b, &mut h, 30));
    assert_eq!(h.lost, Some(5), "the guest must be paused");
    assert!(r
        .failed
        .as_deref()
        .unwrap_or("")
        .contains("checksum mismatch"));
    assert_eq!(
        r.recovering(),
        None,
        "no reconnection can mend wrong memory"
    );
}
