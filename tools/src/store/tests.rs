//! Host tests of the store: a real [`Source`] checkpoints a fake running guest into the
//! store over an in-memory link, and a real [`Receiver`] restores it, so both ends are
//! the hypervisor's own protocol code; the restored memory must equal the source's
//! memory at its freeze, page for page. Damaged files, unknown names, plain migration
//! streams and streams cut before COMMIT must leave nothing behind and send nothing but
//! a REJECT.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use hypervisor::migration::link::{Link, LinkState};
use hypervisor::migration::receiver::{reject, Installer, Outcome, Receiver};
use hypervisor::migration::secure::{MigrationKey, NonceError, NonceSource, SecureChannel};
use hypervisor::migration::source::{Params, Phase, Source, SourceGuest, Status};
use hypervisor::migration::stats::MigrationStats;
use hypervisor::migration::wire::{self, hello_flags, Decoder, Hello, Msg, PAGE};

use super::dir::{Store, INDEX};
use super::format::{self, Checkpoint, FormatError};
use super::session::{Event, Session};

// ---------------------------------------------------------------- test fixtures

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "hvstore-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Wire {
    a_to_b: VecDeque<u8>,
    b_to_a: VecDeque<u8>,
    closed: bool,
    /// Bytes the a→b direction may still carry (None: unlimited): a source that dies.
    budget: Option<usize>,
}

/// One end of an in-memory TCP-like link: a bounded send window, and a close that
/// lets the peer read what was queued before it sees the end.
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
        let w = self.w.borrow();
        let readable = if self.is_a {
            !w.b_to_a.is_empty()
        } else {
            !w.a_to_b.is_empty()
        };
        if w.closed && !readable {
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
        let queued = if self.is_a {
            w.a_to_b.len()
        } else {
            w.b_to_a.len()
        };
        let mut n = data.len().min(self.window.saturating_sub(queued));
        if self.is_a {
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
        self.w.borrow_mut().closed = true;
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A guest that keeps writing pages of its working set until it is frozen. A
/// checkpoint thaws it again after the snapshot (it runs on at its source).
struct FakeGuest {
    mem: Vec<u8>,
    tracking: bool,
    dirty: Vec<usize>,
    frozen: bool,
    rng: Rng,
    rate: usize,
    ws: usize,
}

impl FakeGuest {
    fn new(pages: usize, rate: usize, ws: usize, seed: u64) -> Self {
        let mut mem = vec![0u8; pages * PAGE];
        // A third of the pages hold data, the rest are zero.
        for p in (0..pages).step_by(3) {
            mem[p * PAGE..p * PAGE + 8].copy_from_slice(&(p as u64 * seed + 1).to_le_bytes());
            mem[p * PAGE + 4000] = p as u8;
        }
        Self {
            mem,
            tracking: false,
            dirty: Vec::new(),
            frozen: false,
            rng: Rng(seed | 1),
            rate,
            ws,
        }
    }

    fn run(&mut self) {
        if self.frozen {
            return;
        }
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
        self.frozen = false;
        self.tracking = false;
    }
    fn vcpu_state(&mut self) -> Vec<u8> {
        (0..300).map(|i| i as u8).collect()
    }
    fn device_state(&mut self) -> Vec<u8> {
        vec![9; 24]
    }
    fn hand_over(&mut self) {
        // A checkpoint's source keeps its guest; nothing to give up.
    }
}

/// What a restore installed: memory, Hello, vCPU and device state.
type Installed = (Vec<u8>, Hello, Vec<u8>, Vec<u8>);

/// The destination hypervisor of a restore.
#[derive(Default)]
struct FakeHost {
    installed: Option<Installed>,
    committed: Option<u32>,
    allocs: u32,
}

impl Installer for FakeHost {
    type Mem = Vec<u8>;
    fn alloc(&mut self, hello: &Hello) -> Result<Vec<u8>, String> {
        self.allocs += 1;
        Ok(vec![0xEE; hello.mem_bytes as usize])
    }
    fn install(
        &mut self,
        mem: Vec<u8>,
        hello: &Hello,
        vcpu: &[u8],
        device: &[u8],
        missing: Option<&[u64]>,
    ) -> Result<u32, String> {
        assert!(missing.is_none(), "a restore is never post-copy");
        self.installed = Some((mem, hello.clone(), vcpu.to_vec(), device.to_vec()));
        Ok(3)
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
    fn commit_lost(&mut self, _: u32) {}
}

fn hello(pages: usize, flags: u32) -> Hello {
    Hello {
        flags,
        mem_bytes: (pages * PAGE) as u64,
        migrations: 4,
        time_ns: 987_654_321,
        name: "fake".into(),
        args: "seed=3 rate=2".into(),
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir).unwrap().0
}

/// Checkpoints `g` into `store`: a real Source (Hello with CHECKPOINT) against a store
/// session. Returns the source, the session, and the guest's memory at its freeze.
fn checkpoint(
    store: &mut Store,
    g: &mut FakeGuest,
    params: Params,
    flags: u32,
    budget: Option<usize>,
) -> (Source, Session, Option<Vec<u8>>) {
    let (mut a, mut b) = pipe(32 * 1024);
    a.w.borrow_mut().budget = budget;
    let mut src = Source::new(
        params,
        hello(g.pages(), flags),
        MigrationStats::default(),
        0,
    );
    let mut ses = Session::new("10.0.0.1:49200", 0);
    let mut frozen: Option<Vec<u8>> = None;
    let (mut s_done, mut r_done) = (false, false);
    let mut now = 0u64;
    for _ in 0..200_000 {
        now += 100;
        g.run();
        if !s_done {
            s_done = src.poll(g, &mut a, now) == Status::Finished;
        }
        if g.frozen && frozen.is_none() {
            frozen = Some(g.mem.clone());
        }
        if !r_done {
            r_done = ses.poll(&mut b, store, now);
        }
        if s_done && r_done {
            break;
        }
        if s_done && budget.is_some() {
            // The source died; the store learns from the closed link.
            a.close();
            for _ in 0..10 {
                now += 100;
                if ses.poll(&mut b, store, now) {
                    break;
                }
            }
            break;
        }
    }
    // The checkpoint is taken: the guest runs on at its source.
    g.thaw();
    (src, ses, frozen)
}

/// Restores `name` from `store` into a real Receiver (the kernel sends Fetch first and
/// Resumed once the guest ran). Returns the host, the receiver, and the session.
fn restore(store: &mut Store, name: &str) -> (FakeHost, Receiver<Vec<u8>>, Session) {
    let (mut a, mut b) = pipe(32 * 1024);
    let mut fetch = Vec::new();
    wire::put_fetch(&mut fetch, name);
    assert_eq!(a.send(&fetch), fetch.len());
    let mut host = FakeHost::default();
    let mut rcv = Receiver::new(0, 5_000_000);
    let mut ses = Session::new("10.0.0.2:49300", 0);
    let (mut r_done, mut s_done, mut resumed) = (false, false, false);
    let mut now = 0u64;
    for _ in 0..200_000 {
        now += 100;
        if !s_done {
            s_done = ses.poll(&mut b, store, now);
        }
        if !r_done {
            r_done = rcv.poll(&mut a, &mut host, now);
        }
        if r_done && !resumed && matches!(rcv.outcome, Some(Outcome::Committed(_))) {
            let mut m = Vec::new();
            wire::put_resumed(&mut m, &wire::ResumedTimes::default());
            a.send(&m);
            resumed = true;
        }
        if s_done && r_done {
            break;
        }
    }
    (host, rcv, ses)
}

/// Sends Fetch(name) to a store session and returns every byte it answered before it
/// finished.
fn fetch_raw(store: &mut Store, name: &str) -> (Vec<u8>, Session) {
    let (mut a, mut b) = pipe(1 << 20);
    let mut fetch = Vec::new();
    wire::put_fetch(&mut fetch, name);
    a.send(&fetch);
    let mut ses = Session::new("10.0.0.2:49301", 0);
    for now in 1..1000u64 {
        if ses.poll(&mut b, store, now * 100) {
            break;
        }
    }
    let mut out = vec![0u8; 2 << 20];
    let n = a.recv(&mut out);
    out.truncate(n);
    (out, ses)
}

/// Decodes every message in `bytes` as (tag, reject code, reason).
fn messages(bytes: &[u8]) -> Vec<(String, u32, String)> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let (used, ready) = d.push(&bytes[off..]).expect("valid messages");
        off += used;
        if ready {
            out.push(match d.take().unwrap() {
                Msg::Reject { code, reason } => ("Reject".into(), code, reason.to_string()),
                Msg::Hello(_) => ("Hello".into(), 0, String::new()),
                m => (
                    format!("{m:?}").chars().take(12).collect(),
                    0,
                    String::new(),
                ),
            });
        }
    }
    out
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != INDEX)
        .collect();
    v.sort();
    v
}

fn precopy() -> Params {
    Params {
        downtime_us: 2_000,
        cache_bytes: 64 * PAGE,
        ..Params::default()
    }
}

/// One committed checkpoint of a fresh guest; returns its name and frozen memory.
fn one_checkpoint(store: &mut Store, seed: u64) -> (String, Vec<u8>) {
    let mut g = FakeGuest::new(96, 2, 32, seed);
    let (src, ses, frozen) = checkpoint(store, &mut g, precopy(), hello_flags::CHECKPOINT, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    match ses.event {
        Some(Event::Checkpoint(e)) => (e.name, frozen.unwrap()),
        e => panic!("{e:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn checkpoint_then_restore_gives_the_frozen_memory_page_for_page() {
    let t = TempDir::new("roundtrip");
    let mut store = open(&t.0);
    // A guest that keeps writing while pre-copy rounds (with deltas) run.
    let mut g = FakeGuest::new(256, 3, 48, 7);
    let (src, ses, frozen) =
        checkpoint(&mut store, &mut g, precopy(), hello_flags::CHECKPOINT, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert!(
        src.stats.downtime_joined,
        "the store answers COMMIT with Resumed"
    );
    // The guest wrote while round 0 ran: the stop-and-copy phase re-sent pages.
    assert!(src.stats.last.pages > 0, "{:?}", src.stats.last);
    let frozen = frozen.expect("the source froze its guest");
    let entry = match &ses.event {
        Some(Event::Checkpoint(e)) => e.clone(),
        e => panic!("{e:?}"),
    };
    assert_eq!(entry.name, "fake-1");
    assert_eq!(entry.image, "fake");
    assert_eq!(entry.args, "seed=3 rate=2");
    assert_eq!(entry.mem_bytes, 256 * PAGE as u64);
    assert_eq!(entry.migrations, 4);
    assert_eq!(entry.guest_time_ns, 987_654_321);
    assert_eq!(entry.source_peer, "10.0.0.1:49200");
    assert_eq!(
        entry.memory_sha256,
        format::hex(&format::memory_sha256(&frozen))
    );
    assert_eq!(files(&t.0), vec!["fake-1.ckpt".to_string()]);
    assert_eq!(
        fs::metadata(t.0.join("fake-1.ckpt")).unwrap().len(),
        entry.file_bytes
    );
    // Sparse: zero pages take no room.
    assert!(entry.file_bytes < 256 * PAGE as u64);
    // The index survives a restart of the store.
    let mut store = open(&t.0);
    assert_eq!(store.list(), std::slice::from_ref(&entry));

    let (host, rcv, ses) = restore(&mut store, "fake-1");
    assert_eq!(rcv.outcome, Some(Outcome::Committed(3)), "{:?}", ses.event);
    assert_eq!(host.committed, Some(3));
    let (mem, h, vcpu, device) = host.installed.unwrap();
    for p in 0..256 {
        assert_eq!(
            &mem[p * PAGE..(p + 1) * PAGE],
            &frozen[p * PAGE..(p + 1) * PAGE],
            "page {p} differs from the source's memory at the freeze"
        );
    }
    assert_eq!(h.flags & hello_flags::RESTORED, hello_flags::RESTORED);
    assert_eq!(h.flags & hello_flags::CHECKPOINT, 0);
    assert_eq!((h.migrations, h.time_ns), (4, 987_654_321));
    assert_eq!(
        (h.name.as_str(), h.args.as_str()),
        ("fake", "seed=3 rate=2")
    );
    assert_eq!(vcpu, (0..300).map(|i| i as u8).collect::<Vec<_>>());
    assert_eq!(device, vec![9; 24]);
    match ses.event {
        Some(Event::Restore {
            name,
            outcome: Ok(()),
            resumed: true,
            bytes,
        }) => {
            assert_eq!(name, "fake-1");
            assert!(bytes > 0);
        }
        e => panic!("{e:?}"),
    }
    // Restoring twice gives the same memory again (the file is not consumed).
    let (host2, rcv2, _) = restore(&mut store, "fake-1");
    assert_eq!(rcv2.outcome, Some(Outcome::Committed(3)));
    assert_eq!(host2.installed.unwrap().0, frozen);
}

#[test]
fn stop_and_copy_with_full_verification_is_stored_too() {
    let t = TempDir::new("verify-full");
    let mut store = open(&t.0);
    let mut g = FakeGuest::new(300, 1, 300, 11);
    let params = Params {
        stop_and_copy: true,
        verify_full: true,
        ..Params::default()
    };
    let (src, ses, frozen) = checkpoint(&mut store, &mut g, params, hello_flags::CHECKPOINT, None);
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert!(
        matches!(ses.event, Some(Event::Checkpoint(_))),
        "{:?}",
        ses.event
    );
    let (c, _) = store.load("fake-1").unwrap();
    assert_eq!(c.mem, frozen.unwrap());
}

#[test]
fn damaged_files_are_refused_before_any_page_is_sent() {
    let t = TempDir::new("damaged");
    let mut store = open(&t.0);
    let (name, _) = one_checkpoint(&mut store, 5);
    let (other, _) = one_checkpoint(&mut store, 6);
    let path = t.0.join(format!("{name}.ckpt"));
    let good = fs::read(&path).unwrap();
    let other_file = fs::read(t.0.join(format!("{other}.ckpt"))).unwrap();
    let mid = good.len() / 2;
    let mut flipped = good.clone();
    flipped[mid] ^= 0x01;
    let mut header_flip = good.clone();
    header_flip[30] ^= 0x80; // guest time
    let mut trailer_flip = good.clone();
    *trailer_flip.last_mut().unwrap() ^= 0xFF;
    let mut magic = good.clone();
    magic[0] = b'X';
    let mut version = good.clone();
    version[8] = 2;
    let mut longer = good.clone();
    longer.push(0);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("one byte flipped in the pages", flipped, "hash mismatch"),
        (
            "one byte flipped in the header",
            header_flip,
            "hash mismatch",
        ),
        ("trailer flipped", trailer_flip, "hash mismatch"),
        ("truncated", good[..good.len() - 4096].to_vec(), "truncated"),
        ("truncated to the header", good[..40].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        ("wrong magic", magic, "not a checkpoint file"),
        ("other version", version, "version 2 not supported"),
        ("extended", longer, "where the header describes"),
        ("another checkpoint's file", other_file, "holds checkpoint"),
    ];
    for (what, bytes, expect) in cases {
        fs::write(&path, &bytes).unwrap();
        let (reply, ses) = fetch_raw(&mut store, &name);
        let msgs = messages(&reply);
        assert_eq!(msgs.len(), 1, "{what}: {msgs:?}");
        let (tag, code, reason) = &msgs[0];
        assert_eq!(tag, "Reject", "{what}");
        assert_eq!(*code, reject::VERIFY, "{what}");
        assert!(
            reason.starts_with(&format!("checkpoint {name} is damaged")) && reason.contains(expect),
            "{what}: {reason}"
        );
        match ses.event {
            Some(Event::Restore {
                outcome: Err(e), ..
            }) => assert!(e.contains(expect), "{what}: {e}"),
            e => panic!("{what}: {e:?}"),
        }
    }
    // The good file restores again.
    fs::write(&path, &good).unwrap();
    let (_, rcv, _) = restore(&mut store, &name);
    assert_eq!(rcv.outcome, Some(Outcome::Committed(3)));
    // A missing file is refused too.
    fs::remove_file(&path).unwrap();
    let (reply, _) = fetch_raw(&mut store, &name);
    let msgs = messages(&reply);
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].2.contains("cannot be read"), "{msgs:?}");
}

#[test]
fn a_damaged_file_never_reaches_the_receiver() {
    let t = TempDir::new("damaged-rcv");
    let mut store = open(&t.0);
    let (name, _) = one_checkpoint(&mut store, 9);
    let path = t.0.join(format!("{name}.ckpt"));
    let mut b = fs::read(&path).unwrap();
    let at = b.len() - 100;
    b[at] ^= 4;
    fs::write(&path, &b).unwrap();
    let (host, rcv, _) = restore(&mut store, &name);
    // The receiver saw a REJECT where it expected Hello: it never allocated memory.
    assert_eq!(host.allocs, 0);
    assert!(host.installed.is_none());
    assert!(
        matches!(rcv.outcome, Some(Outcome::Discarded(_))),
        "{:?}",
        rcv.outcome
    );
}

#[test]
fn an_unknown_name_is_refused() {
    let t = TempDir::new("unknown");
    let mut store = open(&t.0);
    let (reply, ses) = fetch_raw(&mut store, "verify-42");
    assert_eq!(
        messages(&reply),
        vec![(
            "Reject".to_string(),
            reject::VERIFY,
            "no checkpoint named verify-42".to_string()
        )]
    );
    assert!(matches!(
        ses.event,
        Some(Event::Restore {
            outcome: Err(_),
            ..
        })
    ));
    // A file that sits in the directory without being in the index is not served.
    let (name, _) = one_checkpoint(&mut store, 2);
    fs::copy(t.0.join(format!("{name}.ckpt")), t.0.join("stray-9.ckpt")).unwrap();
    let (reply, _) = fetch_raw(&mut store, "stray-9");
    assert_eq!(messages(&reply)[0].2, "no checkpoint named stray-9");
}

#[test]
fn a_migration_stream_without_the_checkpoint_flag_is_refused() {
    let t = TempDir::new("plain");
    let mut store = open(&t.0);
    let mut g = FakeGuest::new(64, 1, 16, 3);
    let (src, ses, _) = checkpoint(&mut store, &mut g, precopy(), 0, None);
    assert_eq!(src.phase(), Phase::Failed);
    assert!(
        src.stats.outcome.contains("code 1") && src.stats.outcome.contains("CHECKPOINT flag"),
        "{}",
        src.stats.outcome
    );
    assert!(
        matches!(ses.event, Some(Event::CheckpointFailed { .. })),
        "{:?}",
        ses.event
    );
    assert!(files(&t.0).is_empty(), "{:?}", files(&t.0));
    assert!(store.list().is_empty());
}

#[test]
fn other_first_messages_are_malformed() {
    let t = TempDir::new("first");
    let mut store = open(&t.0);
    for first in [wire::tag::READY, wire::tag::COMMIT] {
        let (mut a, mut b) = pipe(1 << 16);
        let mut m = Vec::new();
        if first == wire::tag::READY {
            wire::put_control(&mut m, first);
        } else {
            wire::put_commit(&mut m, &wire::CommitTimes::default());
        }
        a.send(&m);
        let mut ses = Session::new("p", 0);
        assert!(ses.poll(&mut b, &mut store, 1));
        let mut out = vec![0; 1024];
        let n = a.recv(&mut out);
        let msgs = messages(&out[..n]);
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0].0.as_str(), msgs[0].1),
            ("Reject", reject::MALFORMED)
        );
        assert!(msgs[0]
            .2
            .contains("starts with Hello (CHECKPOINT) or Fetch"));
    }
    // A post-copy checkpoint is refused as well.
    let mut g = FakeGuest::new(64, 1, 16, 3);
    let (_, ses, _) = checkpoint(
        &mut store,
        &mut g,
        precopy(),
        hello_flags::CHECKPOINT | hello_flags::POSTCOPY,
        None,
    );
    assert!(
        matches!(&ses.event, Some(Event::CheckpointFailed { reason, .. }) if reason.contains("post-copy")),
        "{:?}",
        ses.event
    );
    assert!(files(&t.0).is_empty());
}

#[test]
fn the_store_never_overwrites_and_never_reuses_a_name() {
    let t = TempDir::new("names");
    let mut store = open(&t.0);
    let (n1, m1) = one_checkpoint(&mut store, 21);
    // Someone left a file where the next name would go: it is skipped, not replaced.
    fs::write(t.0.join("fake-2.ckpt"), b"not mine").unwrap();
    let (n2, m2) = one_checkpoint(&mut store, 22);
    assert_eq!((n1.as_str(), n2.as_str()), ("fake-1", "fake-3"));
    assert_eq!(fs::read(t.0.join("fake-2.ckpt")).unwrap(), b"not mine");
    assert_ne!(m1, m2);
    assert_eq!(store.load(&n1).unwrap().0.mem, m1);
    assert_eq!(store.load(&n2).unwrap().0.mem, m2);
    // A refused stream draws no number (numbers are drawn once a stream is complete
    // and checked; one written but never committed keeps its number used up).
    let mut g = FakeGuest::new(64, 1, 16, 3);
    let (_, ses, _) = checkpoint(&mut store, &mut g, precopy(), 0, None);
    assert!(matches!(ses.event, Some(Event::CheckpointFailed { .. })));
    let (n4, _) = one_checkpoint(&mut store, 23);
    assert_eq!(n4, "fake-4");
    // After a restart, numbering goes on.
    let mut store = open(&t.0);
    let (n5, _) = one_checkpoint(&mut store, 24);
    assert_eq!(n5, "fake-5");
    let names: Vec<&str> = store.list().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["fake-1", "fake-3", "fake-4", "fake-5"]);
}

/// A complete checkpoint stream whose source vanishes (or aborts) after READY: the
/// store had written `<name>.tmp` and removes it; no checkpoint exists.
#[test]
fn a_stream_cut_before_commit_leaves_no_checkpoint() {
    for how in ["close", "abort", "silence", "mid-stream"] {
        let t = TempDir::new("cut");
        let mut store = open(&t.0);
        if how == "mid-stream" {
            let mut g = FakeGuest::new(128, 2, 32, 4);
            let (src, ses, _) = checkpoint(
                &mut store,
                &mut g,
                precopy(),
                hello_flags::CHECKPOINT,
                Some(60 * 1024),
            );
            assert_eq!(src.phase(), Phase::Failed);
            assert!(
                matches!(&ses.event, Some(Event::CheckpointFailed { reason, .. }) if reason.contains("connection lost")),
                "{:?}",
                ses.event
            );
        } else {
            let (mut a, mut b) = pipe(1 << 22);
            let pages = 40usize;
            let mut mem = vec![0u8; pages * PAGE];
            let mut s = Vec::new();
            wire::put_hello(&mut s, &hello(pages, hello_flags::CHECKPOINT));
            let mut sum = wire::Checksum::new(pages);
            for p in 0..pages {
                if p % 2 == 0 {
                    mem[p * PAGE] = p as u8 + 1;
                    wire::put_page(&mut s, p as u64, &mem[p * PAGE..(p + 1) * PAGE]);
                    sum.set(p, wire::page_hash(p as u64, &mem[p * PAGE..(p + 1) * PAGE]));
                } else {
                    wire::put_zero(&mut s, p as u64);
                    sum.set(p, wire::zero_hash(p as u64));
                }
            }
            wire::put_round_end(&mut s, 0, pages as u32);
            wire::put_state(&mut s, wire::tag::VCPU, &[1; 64]);
            wire::put_state(&mut s, wire::tag::DEVICE, &[2; 8]);
            wire::put_end(&mut s, pages as u64, sum.value());
            a.send(&s);
            let mut ses = Session::new("p", 0);
            let mut now = 0;
            let mut ready = false;
            for _ in 0..100 {
                now += 1000;
                ses.poll(&mut b, &mut store, now);
                let mut buf = [0u8; 64];
                if a.recv(&mut buf) == 8 && buf[0] == wire::tag::READY {
                    ready = true;
                    break;
                }
            }
            assert!(ready, "{how}: READY after a valid stream ({:?})", ses.event);
            // Written and synced before READY, but not a checkpoint yet.
            assert_eq!(files(&t.0), vec!["fake-1.tmp".to_string()], "{how}");
            assert!(store.list().is_empty());
            match how {
                "close" => a.close(),
                "abort" => {
                    let mut m = Vec::new();
                    wire::put_reason(&mut m, wire::tag::ABORT, 1, "operator");
                    a.send(&m);
                }
                _ => {}
            }
            for _ in 0..200 {
                now += 100_000; // 20 s in all: past the COMMIT timeout
                if ses.poll(&mut b, &mut store, now) {
                    break;
                }
            }
            assert!(ses.done(), "{how}");
            assert!(
                matches!(&ses.event, Some(Event::CheckpointFailed { reason, .. }) if reason.contains("discarded")),
                "{how}: {:?}",
                ses.event
            );
        }
        assert!(files(&t.0).is_empty(), "{how}: {:?}", files(&t.0));
        assert!(store.list().is_empty(), "{how}");
        assert!(open(&t.0).list().is_empty(), "{how}");
    }
}

#[test]
fn stream_errors_are_rejected_like_a_receiver_would() {
    let t = TempDir::new("stream-errors");
    let mut store = open(&t.0);
    let pages = 8usize;
    let base = |extra: &dyn Fn(&mut Vec<u8>)| {
        let mut s = Vec::new();
        wire::put_hello(&mut s, &hello(pages, hello_flags::CHECKPOINT));
        extra(&mut s);
        s
    };
    let cases: Vec<(&str, Vec<u8>, u32, &str)> = vec![
        (
            "page out of range",
            base(&|s| wire::put_page(s, 8, &[1; PAGE])),
            reject::MALFORMED,
            "outside the guest",
        ),
        (
            "delta not announced",
            base(&|s| wire::put_delta(s, 1, &[0; 4])),
            reject::MALFORMED,
            "did not announce deltas",
        ),
        (
            "round out of order",
            base(&|s| wire::put_round_end(s, 1, 0)),
            reject::MALFORMED,
            "out of order",
        ),
        (
            "End without state",
            base(&|s| wire::put_end(s, 0, 0)),
            reject::MALFORMED,
            "before the vCPU",
        ),
        (
            "page count",
            base(&|s| {
                wire::put_state(s, wire::tag::VCPU, &[1]);
                wire::put_state(s, wire::tag::DEVICE, &[1]);
                wire::put_end(s, 3, 0);
            }),
            reject::VERIFY,
            "End says 3 pages",
        ),
        (
            "checksum",
            base(&|s| {
                wire::put_zero(s, 0);
                wire::put_state(s, wire::tag::VCPU, &[1]);
                wire::put_state(s, wire::tag::DEVICE, &[1]);
                wire::put_end(s, 1, 12345);
            }),
            reject::VERIFY,
            "checksum mismatch",
        ),
        (
            "post-copy bitmap",
            base(&|s| wire::put_missing(s, 0, &[1])),
            reject::MALFORMED,
            "post-copy",
        ),
    ];
    for (what, s, code, expect) in cases {
        let (mut a, mut b) = pipe(1 << 20);
        a.send(&s);
        let mut ses = Session::new("p", 0);
        assert!(ses.poll(&mut b, &mut store, 1), "{what}");
        let mut out = vec![0; 4096];
        let n = a.recv(&mut out);
        let msgs = messages(&out[..n]);
        assert_eq!(msgs.len(), 1, "{what}: {msgs:?}");
        assert_eq!((msgs[0].0.as_str(), msgs[0].1), ("Reject", code), "{what}");
        assert!(msgs[0].2.contains(expect), "{what}: {}", msgs[0].2);
        assert!(files(&t.0).is_empty(), "{what}");
    }
}

/// Nonces for the channel tests (distinct per call; the tests need no secrecy).
struct Counter(u8);

impl NonceSource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError> {
        self.0 = self.0.wrapping_add(1);
        buf.fill(self.0);
        Ok(())
    }
}

/// What the network runner does: the hypervisor is a secure-channel initiator, the
/// store a responder; a checkpoint goes in and a restore comes out through it.
#[test]
fn checkpoint_and_restore_through_the_secure_channel() {
    let t = TempDir::new("secure");
    let mut store = open(&t.0);
    let key = MigrationKey::from_bytes([7; 32]);
    let mut rng = Counter(0);
    // Checkpoint.
    let mut g = FakeGuest::new(128, 2, 32, 13);
    let (mut a, mut b) = pipe(32 * 1024);
    let mut ca = SecureChannel::initiator(&key, &mut rng, 0).unwrap();
    let mut cb = SecureChannel::responder(&key, &mut rng, 0).unwrap();
    let mut src = Source::new(
        precopy(),
        hello(128, hello_flags::CHECKPOINT),
        MigrationStats::default(),
        0,
    );
    let mut ses = Session::new("10.0.0.1:5", 0);
    let mut frozen = None;
    let (mut s_done, mut r_done) = (false, false);
    let mut now = 0;
    for _ in 0..100_000 {
        now += 100;
        g.run();
        if !s_done {
            s_done = src.poll(&mut g, &mut ca.link(&mut a, now), now) == Status::Finished;
        } else {
            ca.drive(&mut a, now);
        }
        if g.frozen && frozen.is_none() {
            frozen = Some(g.mem.clone());
        }
        if !r_done {
            r_done = ses.poll(&mut cb.link(&mut b, now), &mut store, now);
        } else {
            cb.drive(&mut b, now);
        }
        if s_done && r_done && ca.pending() == 0 && cb.pending() == 0 {
            break;
        }
    }
    assert_eq!(src.phase(), Phase::Done, "{}", src.stats.outcome);
    assert!(ca.error().is_none() && cb.error().is_none());
    let Some(Event::Checkpoint(e)) = ses.event else {
        panic!("{:?}", ses.event)
    };
    // Restore through a fresh channel.
    let (mut a, mut b) = pipe(32 * 1024);
    let mut ca = SecureChannel::initiator(&key, &mut rng, now).unwrap();
    let mut cb = SecureChannel::responder(&key, &mut rng, now).unwrap();
    let mut fetch = Vec::new();
    wire::put_fetch(&mut fetch, &e.name);
    let mut host = FakeHost::default();
    let mut rcv = Receiver::new(now, 5_000_000);
    let mut ses = Session::new("10.0.0.2:6", now);
    let mut sent_fetch = false;
    for _ in 0..100_000 {
        now += 100;
        {
            let mut l = ca.link(&mut a, now);
            if !sent_fetch && l.state() == LinkState::Open {
                assert_eq!(l.send(&fetch), fetch.len());
                sent_fetch = true;
            }
            if sent_fetch && rcv.poll(&mut l, &mut host, now) && host.committed.is_some() {
                let mut m = Vec::new();
                wire::put_resumed(&mut m, &wire::ResumedTimes::default());
                l.send(&m);
            }
        }
        if ses.poll(&mut cb.link(&mut b, now), &mut store, now) {
            break;
        }
    }
    assert_eq!(rcv.outcome, Some(Outcome::Committed(3)), "{:?}", ses.event);
    assert_eq!(host.installed.unwrap().0, frozen.unwrap());
    assert!(matches!(
        ses.event,
        Some(Event::Restore {
            outcome: Ok(()),
            resumed: true,
            ..
        })
    ));
}

#[test]
fn format_round_trips_and_refuses_bad_fields() {
    let mut mem = vec![0u8; 130 * PAGE];
    mem[5 * PAGE + 7] = 1;
    mem[129 * PAGE] = 2;
    let c = Checkpoint {
        name: "verify-12".into(),
        image: "verify".into(),
        args: "mem=8 rate=100".into(),
        migrations: 2,
        time_ns: 1_000_000_007,
        created_unix: 1_700_000_000,
        vcpu: vec![3; 4096],
        device: vec![],
        mem,
    };
    let mut f = Vec::new();
    let w = format::encode(&c, &mut f).unwrap();
    assert_eq!(w.bytes, f.len() as u64);
    assert_eq!(w.stored_pages, 2);
    // Header, texts, state, a 3-word bitmap, two pages and the trailer.
    assert_eq!(
        f.len(),
        format::FIXED + 9 + 6 + 14 + 4096 + 3 * 8 + 2 * PAGE + format::TRAILER
    );
    assert_eq!(format::decode(&f, u64::MAX).unwrap(), c);
    assert_eq!(
        format::decode(&f, 64 * PAGE as u64),
        Err(FormatError::TooLarge {
            mem_bytes: 130 * PAGE as u64,
            max: 64 * PAGE as u64
        })
    );
    // Every truncation is refused (never a panic), as is every single-bit flip.
    for cut in 0..f.len() {
        assert!(format::decode(&f[..cut], u64::MAX).is_err(), "cut at {cut}");
    }
    for at in (0..f.len()).step_by(97) {
        let mut g = f.clone();
        g[at] ^= 0x10;
        assert!(format::decode(&g, u64::MAX).is_err(), "flip at {at}");
    }
    // Fields the format cannot hold are refused on write.
    let mut bad = c.clone();
    bad.image = "a b".into();
    assert!(format::encode(&bad, Vec::new()).is_err());
    let mut bad = c;
    bad.mem.truncate(100);
    assert!(format::encode(&bad, Vec::new()).is_err());
}

#[test]
fn utc_dates() {
    assert_eq!(format::utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(format::utc(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(format::utc(1_700_000_000), "2023-11-14T22:13:20Z");
}

#[test]
fn leftover_tmp_files_are_removed_at_start() {
    let t = TempDir::new("leftover");
    fs::write(t.0.join("fake-7.tmp"), b"half").unwrap();
    let (store, cleaned) = Store::open(&t.0).unwrap();
    assert_eq!(cleaned, vec!["fake-7.tmp".to_string()]);
    assert!(files(&t.0).is_empty());
    assert!(store.list().is_empty());
}

/// The network runner on a real hub (loopback UDP, no emulator): a host endpoint
/// plays the hypervisor, connecting three times in a row: a Fetch of an unknown name,
/// a checkpoint, and a restore of that checkpoint.
#[test]
fn the_network_runner_serves_one_connection_after_another() {
    use crate::bxnet::BxEndpoint;
    use crate::hub::{Hub, HubConfig, Member};
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    let t = TempDir::new("net");
    let base = crate::emu::free_udp_range(4);
    let hub = Hub::start(
        vec![
            Member::socket_pair("store", base),
            Member::socket_pair("hv", base + 2),
        ],
        HubConfig {
            seed: Some(1),
            ..HubConfig::default()
        },
    )
    .unwrap();
    let key = "11".repeat(32);
    let cfg = super::net::Config {
        dir: t.0.clone(),
        key_hex: key.clone(),
        hub_port: base,
        ip: super::net::DEFAULT_IP,
        mac: super::net::DEFAULT_MAC,
        max_mem: 1 << 30,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, lines) = mpsc::channel::<String>();
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            super::net::serve(&cfg, &stop, &mut |l| {
                let _ = tx.send(l);
            })
        })
    };
    let wait_line = |prefix: &str| -> String {
        loop {
            let l = lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no {prefix} line"));
            if l.starts_with(prefix) {
                return l;
            }
        }
    };
    let listen = wait_line("STORE-LISTEN");
    assert!(listen.contains("ip=10.0.0.9 port=7000"), "{listen}");
    let mut ep =
        BxEndpoint::new(base + 2, [0x52, 0x54, 0, 0x12, 0x34, 0x77], [10, 0, 0, 7]).unwrap();
    let secs = Duration::from_secs;
    // 1. Unknown name.
    ep.connect([10, 0, 0, 9], 7000, secs(20)).unwrap();
    ep.secure(&key, secs(20)).unwrap();
    let mut m = Vec::new();
    wire::put_fetch(&mut m, "nothing-1");
    ep.send_all(&m, secs(10)).unwrap();
    let reply = ep.recv_until_close(secs(10));
    assert_eq!(messages(&reply)[0].2, "no checkpoint named nothing-1");
    ep.close();
    let l = wait_line("STORE-RESTORE");
    assert!(l.ends_with("outcome=no checkpoint named nothing-1"), "{l}");
    // 2. A checkpoint.
    let pages = 16usize;
    let mut mem = vec![0u8; pages * PAGE];
    let mut s = Vec::new();
    wire::put_hello(&mut s, &hello(pages, hello_flags::CHECKPOINT));
    let mut sum = wire::Checksum::new(pages);
    for p in 0..pages {
        mem[p * PAGE + 1] = p as u8 + 1;
        let page = &mem[p * PAGE..(p + 1) * PAGE];
        wire::put_page(&mut s, p as u64, page);
        sum.set(p, wire::page_hash(p as u64, page));
    }
    wire::put_state(&mut s, wire::tag::VCPU, &[1; 64]);
    wire::put_state(&mut s, wire::tag::DEVICE, &[2; 8]);
    wire::put_end(&mut s, pages as u64, sum.value());
    ep.connect([10, 0, 0, 9], 7000, secs(20)).unwrap();
    ep.secure(&key, secs(20)).unwrap();
    ep.send_all(&s, secs(20)).unwrap();
    let reply = ep.recv_until_close(secs(2));
    assert_eq!(messages(&reply).len(), 1, "READY: {reply:?}");
    assert_eq!(reply[0], wire::tag::READY);
    let mut m = Vec::new();
    wire::put_commit(&mut m, &wire::CommitTimes::default());
    ep.send_all(&m, secs(10)).unwrap();
    let reply = ep.recv_until_close(secs(10));
    assert_eq!(reply.first(), Some(&wire::tag::RESUMED), "{reply:?}");
    ep.close();
    let l = wait_line("STORE-CHECKPOINT");
    assert!(
        l.starts_with("STORE-CHECKPOINT name=fake-1 image=fake mem_bytes=65536 bytes="),
        "{l}"
    );
    assert!(l.contains(&format!(
        "sha256={}",
        format::hex(&format::memory_sha256(&mem))
    )));
    // 3. Restore it.
    ep.connect([10, 0, 0, 9], 7000, secs(20)).unwrap();
    ep.secure(&key, secs(20)).unwrap();
    let mut m = Vec::new();
    wire::put_fetch(&mut m, "fake-1");
    ep.send_all(&m, secs(10)).unwrap();
    let stream = ep.recv_until_close(secs(3));
    let msgs = messages(&stream);
    assert_eq!(msgs[0].0, "Hello");
    assert!(msgs.iter().any(|m| m.0.starts_with("End")), "{msgs:?}");
    let mut m = Vec::new();
    wire::put_control(&mut m, wire::tag::READY);
    ep.send_all(&m, secs(10)).unwrap();
    let commit = ep.recv_until_close(secs(3));
    assert_eq!(commit.first(), Some(&wire::tag::COMMIT), "{commit:?}");
    let mut m = Vec::new();
    wire::put_resumed(&mut m, &wire::ResumedTimes::default());
    ep.send_all(&m, secs(10)).unwrap();
    ep.close();
    let l = wait_line("STORE-RESTORE");
    assert!(
        l.contains("name=fake-1") && l.ends_with("resumed=yes outcome=ok"),
        "{l}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap().unwrap();
    drop(hub);
}
