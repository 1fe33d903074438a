//! The destination side: validates an incoming stream record by record, fills the new
//! guest's memory, and takes part in the hand-over (READY, then resume only on COMMIT).
//! Like the source it works against small traits, so the protocol runs on the host in
//! tests; the kernel implements [`Installer`] with real guest memory and VMCS.
//!
//! Whatever arrives, the receiver never panics and never writes outside the guest's
//! memory: every page number is checked against the size announced in Hello, every
//! length by the decoder, and the checksum and vCPU state before READY.

use alloc::string::String;
use alloc::vec::Vec;

use super::link::{Link, LinkState};
use super::wire::{self, Hello, Msg};
use super::HoldPoint;

/// What the receiver needs from the hypervisor.
pub trait Installer {
    /// Guest memory under construction.
    type Mem: AsRef<[u8]> + AsMut<[u8]>;
    /// Allocates zeroed memory for the announced guest (refuses what does not fit).
    fn alloc(&mut self, hello: &Hello) -> Result<Self::Mem, String>;
    /// Checks the state and installs the guest, frozen (not running). Returns its id.
    /// `missing` (post-copy): bitmap of the pages that have not arrived; the guest
    /// must not see them until [`Installer::post_arrived`].
    fn install(
        &mut self,
        mem: Self::Mem,
        hello: &Hello,
        vcpu: &[u8],
        device: &[u8],
        missing: Option<&[u64]>,
    ) -> Result<u32, String>;
    /// Post-copy: the memory of page `pfn` of installed guest `id`, to be filled.
    fn post_page(&mut self, id: u32, pfn: u64) -> Option<&mut [u8]>;
    /// Post-copy: page `pfn` is filled; map it. Returns how long the guest waited for
    /// it (µs) if it was waiting.
    fn post_arrived(&mut self, id: u32, pfn: u64, now_us: u64) -> Option<u64>;
    /// Post-copy: the page guest `id` waits for, if any.
    fn post_wanted(&mut self, id: u32) -> Option<u64>;
    /// COMMIT arrived: the guest may run. `pause_us` is how long it has been paused so
    /// far (freeze on the source to now), for its clock.
    fn commit(&mut self, id: u32, pause_us: u64);
    /// The link ended after READY without COMMIT: keep the guest paused, say so.
    fn commit_lost(&mut self, id: u32);
}

/// Reject reason codes.
pub mod reject {
    /// Malformed or out-of-order stream.
    pub const MALFORMED: u32 = 1;
    /// Not enough memory or another resource.
    pub const RESOURCES: u32 = 2;
    /// Checksum or state check failed.
    pub const VERIFY: u32 = 3;
    /// Another migration is being received.
    pub const BUSY: u32 = 4;
    /// The source took too long.
    pub const TIMEOUT: u32 = 5;
    /// The destination's operator cancelled it.
    pub const CANCELLED: u32 = 6;
    /// `verify=full`: the memory received differs from the source's.
    pub const MISMATCH: u32 = 7;
}

/// Fault-service times kept for the median (a fixed bound: the heap a guest can make
/// the destination use by faulting is this, however long post-copy runs).
const MAX_FAULT_SAMPLES: usize = 4096;

/// What `verify=full` found (the Digest messages against the memory held here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullCheck {
    /// Pages compared so far (the next expected Digest page).
    pub pages: u64,
    /// Pages whose contents differ from the source's at its freeze.
    pub mismatched: u64,
    /// The first of them.
    pub first_mismatch: Option<u64>,
}

/// How long the source may take for the whole stream: a fixed allowance plus a floor
/// rate for the memory announced (256 KiB/s, a fifth of what Bochs' slow link carries).
pub fn stream_deadline_us(mem_bytes: u64) -> u64 {
    120_000_000 + mem_bytes / 256 * 1000 / 1024
}

/// How long after READY the source may take to COMMIT.
pub const COMMIT_TIMEOUT_US: u64 = 10_000_000;

/// The hand-over as the destination saw it, for the downtime (µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// The source's part, from COMMIT.
    pub source: wire::CommitTimes,
    /// READY at the source to COMMIT here: the source's delay plus half the round trip.
    pub commit_wire_us: u64,
    /// The pause from the freeze to COMMIT's arrival here.
    pub pause_to_commit_us: u64,
    /// When COMMIT arrived (this clock).
    pub commit_at_us: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Hello,
    Stream,
    AwaitCommit(u32),
    /// Post-copy: guest `id` runs here; its missing pages are arriving.
    Postcopy(u32),
    /// Post-copy link lost: guest `id` runs here (and waits at a missing page); the
    /// kernel reconnects to the source and calls [`Receiver::reattach`].
    Recovering(u32),
    /// Reconnected: Recover and the Missing bitmap sent, waiting for the source's
    /// READY before asking for anything.
    Reattaching(u32),
    /// (At a source) a destination reconnected with Recover: collecting its bitmap.
    RecoverMissing,
    Done,
}

/// How long a post-copy link may stay silent before the destination reconnects.
const POST_IDLE_US: u64 = 10_000_000;
/// Largest guest a Recover may describe (the most EPT maps: 1 GiB).
const MAX_RECOVER_BYTES: u64 = 1 << 30;

/// What a destination that reconnected for an interrupted post-copy said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoverRequest {
    /// The guest's clock in the interrupted stream's Hello.
    pub time_ns: u64,
    /// Its memory size.
    pub mem_bytes: u64,
    /// Page messages the destination received.
    pub pages: u64,
    /// Pages it still lacks (bit p of word w: page 64w+p).
    pub missing: Vec<u64>,
}

/// The outcome, when finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Guest `id` runs here now.
    Committed(u32),
    /// The stream was discarded.
    Discarded(String),
    /// Guest `id` is complete but paused: COMMIT never came.
    CommitLost(u32),
    /// (At a source) the connection was a destination reconnecting for an
    /// interrupted post-copy.
    Recover(RecoverRequest),
}

/// Post-copy progress on the destination.
#[derive(Clone, Debug, Default)]
pub struct PostProgress {
    /// Missing-page bitmap (bit set: not here yet).
    missing: Vec<u64>,
    /// Bitmap words received so far in Missing messages.
    words: u64,
    /// Pages still missing.
    pub left: u64,
    /// Pages missing at the hand-over.
    pub at_handover: u64,
    /// Page requested and not arrived yet.
    requested: Option<u64>,
    /// Fault service times (µs), at most [`MAX_FAULT_SAMPLES`].
    samples: Vec<u32>,
    /// Guest waits on remote pages.
    pub faults: u64,
    /// Longest wait (µs).
    pub fault_max_us: u64,
    /// When the last page arrived (µs since COMMIT).
    pub last_page_us: u64,
}

impl PostProgress {
    /// The figures PostDone carries.
    pub fn figures(&self) -> wire::PostFigures {
        let mut s = self.samples.clone();
        s.sort_unstable();
        wire::PostFigures {
            faults: self.faults,
            fault_median_us: s.get(s.len() / 2).map_or(0, |v| u64::from(*v)),
            fault_max_us: self.fault_max_us,
            last_page_us: self.last_page_us,
        }
    }
}

/// An incoming migration.
pub struct Receiver<M> {
    phase: Phase,
    dec: wire::Decoder,
    mem: Option<M>,
    hello: Option<Hello>,
    pages: u64,
    checksum: wire::Checksum,
    vcpu: Option<Vec<u8>>,
    device: Option<Vec<u8>>,
    page_msgs: u64,
    next_round: u32,
    last_activity_us: u64,
    idle_timeout_us: u64,
    /// Trace: when the last RoundEnd and the End arrived (this clock; 0: not yet).
    last_round_end_us: u64,
    end_at_us: u64,
    /// The stream must be complete by then (set on Hello), or COMMIT must have come
    /// (set on READY).
    deadline_us: u64,
    ready_sent_us: u64,
    /// Set on COMMIT.
    pub handover: Option<Handover>,
    /// Bytes received.
    pub bytes: u64,
    /// Set when finished.
    pub outcome: Option<Outcome>,
    /// The part of a final REJECT the link could not take yet.
    farewell: Vec<u8>,
    /// `verify=full` progress.
    full: FullCheck,
    /// Post-copy (after the first Missing message).
    post: Option<PostProgress>,
    /// Messages for the source queued behind what the link has not taken yet
    /// (post-copy: Resumed, Request, PostDone share the link).
    out: Vec<u8>,
    /// Why post-copy was last interrupted (for the console), and how many times.
    pub interrupted: Option<String>,
    /// Post-copy interruptions recovered from.
    pub recoveries: u64,
    /// Post-copy ended in a way no reconnection can mend (the guest is paused).
    pub failed: Option<String>,
    /// (At a source) the Recover being received.
    recover: Option<RecoverRequest>,
    /// The test hook's progress ([`super::Hold`]).
    holder: super::Holder,
    /// Held at `ready`: the guest installed, READY not sent yet.
    held_ready: Option<u32>,
    /// Held at `resume`: COMMIT arrived (guest, its times, when) but not acted on.
    held_commit: Option<(u32, wire::CommitTimes, u64)>,
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> Receiver<M> {
    /// A receiver for a freshly accepted connection.
    pub fn new(now_us: u64, idle_timeout_us: u64) -> Self {
        Self {
            phase: Phase::Hello,
            dec: wire::Decoder::new(),
            mem: None,
            hello: None,
            pages: 0,
            checksum: wire::Checksum::default(),
            vcpu: None,
            device: None,
            page_msgs: 0,
            next_round: 0,
            last_activity_us: now_us,
            last_round_end_us: 0,
            end_at_us: 0,
            idle_timeout_us,
            deadline_us: u64::MAX,
            ready_sent_us: 0,
            handover: None,
            bytes: 0,
            outcome: None,
            farewell: Vec::new(),
            full: FullCheck::default(),
            post: None,
            out: Vec::new(),
            interrupted: None,
            recoveries: 0,
            failed: None,
            recover: None,
            holder: super::Holder::default(),
            held_ready: None,
            held_commit: None,
        }
    }

    /// Arms a test hook for this migration (`ready` and `resume` are the destination's;
    /// a failure while held counts as after READY: the guest is kept paused).
    pub fn set_hold(&mut self, hold: Option<super::Hold>) {
        self.holder = super::Holder::new(hold);
    }

    /// Post-copy interrupted: the id of the guest that runs here while the kernel
    /// reconnects to its source.
    pub fn recovering(&self) -> Option<u32> {
        match self.phase {
            Phase::Recovering(id) => Some(id),
            _ => None,
        }
    }

    /// A new connection to the source is open (post-copy recovery): tell it who we
    /// are and which pages are still missing, then wait for its READY.
    pub fn reattach(&mut self, now_us: u64) {
        let Phase::Recovering(id) = self.phase else {
            return;
        };
        self.dec = wire::Decoder::new();
        self.out.clear();
        self.farewell.clear();
        let time_ns = self.hello.as_ref().map_or(0, |h| h.time_ns);
        wire::put_recover(&mut self.out, time_ns, self.pages * 4096, self.page_msgs);
        if let Some(p) = self.post.as_mut() {
            p.requested = None;
            for (i, chunk) in p.missing.chunks(wire::MISSING_WORDS).enumerate() {
                wire::put_missing(&mut self.out, (i * wire::MISSING_WORDS) as u64, chunk);
            }
        }
        self.last_activity_us = now_us;
        self.deadline_us = now_us.saturating_add(stream_deadline_us(self.pages * 4096));
        self.phase = Phase::Reattaching(id);
    }

    /// Post-copy progress, if this stream uses it.
    pub fn postcopy(&self) -> Option<&PostProgress> {
        self.post.as_ref()
    }

    /// Whether post-copy is under way (guest running here, pages still to come),
    /// including while the link is being recovered.
    pub fn in_postcopy(&self) -> bool {
        matches!(
            self.phase,
            Phase::Postcopy(_) | Phase::Recovering(_) | Phase::Reattaching(_)
        )
    }

    /// Queues a message for the source (sent in order with the receiver's own).
    pub fn queue(&mut self, msg: &[u8]) {
        self.out.extend_from_slice(msg);
    }

    /// Hands queued messages to the link; returns whether all are out.
    fn flush(&mut self, link: &mut dyn Link) -> bool {
        if !self.out.is_empty() {
            let n = link.send(&self.out);
            self.out.drain(..n);
        }
        self.out.is_empty()
    }

    /// What `verify=full` compared (all zero when the source did not ask for it).
    pub fn full_check(&self) -> FullCheck {
        self.full
    }

    /// The id of the guest installed here, frozen, waiting for COMMIT.
    pub fn installed(&self) -> Option<u32> {
        match self.phase {
            Phase::AwaitCommit(id) => Some(id),
            _ => None,
        }
    }

    /// The part of the final REJECT the link could not take yet (empty once it did);
    /// the caller delivers it, then closes the link.
    pub fn take_farewell(&mut self) -> Vec<u8> {
        // Whatever was queued for the source and not taken yet goes first.
        let mut t = core::mem::take(&mut self.out);
        t.append(&mut self.farewell);
        t
    }

    /// Trace: from the last pre-copy round's end to End, as this side saw the stream
    /// (the stop-and-copy's data arriving); 0 when there was no pre-copy round.
    pub fn final_arrival_us(&self) -> u64 {
        if self.last_round_end_us == 0 {
            0
        } else {
            self.end_at_us.saturating_sub(self.last_round_end_us)
        }
    }

    /// The guest being received (after Hello).
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Advances; returns true once finished (see `outcome`).
    pub fn poll<I: Installer<Mem = M>>(
        &mut self,
        link: &mut dyn Link,
        inst: &mut I,
        now_us: u64,
    ) -> bool {
        if self.phase == Phase::Done {
            return true;
        }
        if matches!(self.phase, Phase::Recovering(_)) {
            // No link until the kernel reattaches one.
            return false;
        }
        if let Err((code, why)) = self.step(link, inst, now_us) {
            self.finish(link, inst, code, why);
            return true;
        }
        self.phase == Phase::Done
    }

    /// Cancels the migration (the operator's `migrate cancel`): before READY it is
    /// rejected and discarded; after READY the guest stays paused, as for a lost
    /// COMMIT, since the source may already have committed.
    pub fn cancel<I: Installer<Mem = M>>(&mut self, link: &mut dyn Link, inst: &mut I) {
        if self.phase != Phase::Done {
            self.finish(
                link,
                inst,
                reject::CANCELLED,
                String::from("cancelled by the destination's operator"),
            );
        }
    }

    fn finish<I: Installer<Mem = M>>(
        &mut self,
        link: &mut dyn Link,
        inst: &mut I,
        code: u32,
        why: String,
    ) {
        match self.phase {
            Phase::AwaitCommit(id) => {
                inst.commit_lost(id);
                self.outcome = Some(Outcome::CommitLost(id));
            }
            Phase::Postcopy(id) | Phase::Reattaching(id) => {
                // The guest is ours and runs; what it lacks is on the source. Keep
                // everything (it waits at the first missing page it touches) and
                // let the kernel reconnect.
                self.interrupted = Some(why);
                link.close();
                self.phase = Phase::Recovering(id);
                return;
            }
            _ => {
                self.mem = None; // discard everything received
                if code != 0 {
                    let mut m = Vec::new();
                    wire::put_reason(&mut m, wire::tag::REJECT, code, &why);
                    self.farewell = super::link::say_last(link, &m);
                } else {
                    link.close();
                }
                self.outcome = Some(Outcome::Discarded(why));
                self.phase = Phase::Done;
                return;
            }
        }
        link.close();
        self.phase = Phase::Done;
    }

    fn step<I: Installer<Mem = M>>(
        &mut self,
        link: &mut dyn Link,
        inst: &mut I,
        now_us: u64,
    ) -> Result<(), (u32, String)> {
        if let Some(id) = self.held_ready {
            if self.holder.holding(HoldPoint::Ready, now_us) {
                self.last_activity_us = now_us;
                return Ok(());
            }
            self.held_ready = None;
            self.send_ready(link, inst, id, now_us);
        }
        if let Some((id, t, at)) = self.held_commit {
            if self.holder.holding(HoldPoint::Resume, now_us) {
                self.last_activity_us = now_us;
                return Ok(());
            }
            self.held_commit = None;
            self.on_commit(inst, id, t, at);
            if self.phase == Phase::Done {
                return Ok(());
            }
        }
        if let Phase::Postcopy(id) = self.phase {
            // Ask for the page the guest waits for (once per page).
            if let (Some(p), Some(pfn)) = (self.post.as_mut(), inst.post_wanted(id)) {
                if p.requested != Some(pfn) {
                    p.requested = Some(pfn);
                    wire::put_request(&mut self.out, pfn);
                }
            }
        }
        self.flush(link);
        let mut buf = [0u8; 2048];
        loop {
            let n = link.recv(&mut buf);
            if n == 0 {
                break;
            }
            self.bytes += n as u64;
            self.last_activity_us = now_us;
            let mut off = 0;
            while off < n {
                let (used, ready) = self
                    .dec
                    .push(&buf[off..n])
                    .map_err(|e| (reject::MALFORMED, alloc::format!("malformed stream: {e}")))?;
                off += used;
                if ready {
                    self.handle(link, inst, now_us)?;
                    if self.phase == Phase::Done {
                        return Ok(());
                    }
                }
            }
        }
        self.flush(link);
        if link.state() == LinkState::Closed {
            return Err((
                0,
                String::from(match self.phase {
                    Phase::AwaitCommit(_) => "connection closed before COMMIT",
                    Phase::Postcopy(_) => "connection closed during post-copy",
                    _ => "source closed the connection before the end of the stream",
                }),
            ));
        }
        if now_us > self.deadline_us {
            return Err((
                reject::TIMEOUT,
                String::from(match self.phase {
                    Phase::AwaitCommit(_) => "no COMMIT within 10 s of READY",
                    Phase::Postcopy(_) => "post-copy took longer than its deadline",
                    _ => "the stream took longer than its deadline for this memory size",
                }),
            ));
        }
        let idle = if self.in_postcopy() {
            self.idle_timeout_us.min(POST_IDLE_US)
        } else {
            self.idle_timeout_us
        };
        if now_us - self.last_activity_us > idle {
            return Err((
                reject::MALFORMED,
                alloc::format!("no data from the source for {} s", idle / 1_000_000),
            ));
        }
        Ok(())
    }

    fn handle<I: Installer<Mem = M>>(
        &mut self,
        link: &mut dyn Link,
        inst: &mut I,
        now_us: u64,
    ) -> Result<(), (u32, String)> {
        let bad = |what: String| (reject::MALFORMED, what);
        let msg = self
            .dec
            .take()
            .map_err(|e| bad(alloc::format!("malformed stream: {e}")))?;
        match (self.phase, msg) {
            (Phase::Hello | Phase::Stream, Msg::Abort { reason, .. }) => {
                return Err((0, alloc::format!("source aborted: {reason}")));
            }
            (Phase::Hello, Msg::Reject { code, reason }) => {
                // A store refusing a restore (no such checkpoint, damaged file).
                return Err((0, alloc::format!("refused (code {code}): {reason}")));
            }
            (Phase::Hello, Msg::Hello(h)) => {
                if h.flags & wire::hello_flags::CHECKPOINT != 0 {
                    // A checkpoint leaves the guest running at its source: a
                    // hypervisor that ran this copy too would run it twice.
                    return Err((
                        reject::MALFORMED,
                        String::from("a checkpoint stream goes to a store, not to a hypervisor"),
                    ));
                }
                let mem = inst.alloc(&h).map_err(|e| (reject::RESOURCES, e))?;
                self.pages = h.mem_bytes / wire::PAGE as u64;
                self.checksum = wire::Checksum::new(self.pages as usize);
                self.deadline_us = now_us.saturating_add(stream_deadline_us(h.mem_bytes));
                self.mem = Some(mem);
                self.hello = Some(h);
                self.phase = Phase::Stream;
            }
            (
                Phase::Hello,
                Msg::Recover {
                    time_ns,
                    mem_bytes,
                    pages,
                },
            ) => {
                if mem_bytes > MAX_RECOVER_BYTES {
                    return Err(bad(alloc::format!("Recover for {mem_bytes} bytes")));
                }
                self.pages = mem_bytes / wire::PAGE as u64;
                self.recover = Some(RecoverRequest {
                    time_ns,
                    mem_bytes,
                    pages,
                    missing: Vec::new(),
                });
                self.phase = Phase::RecoverMissing;
            }
            (Phase::RecoverMissing, Msg::Missing { first, words }) => {
                let total = self.pages.div_ceil(64);
                let r = self
                    .recover
                    .as_mut()
                    .ok_or_else(|| bad("no Recover".into()))?;
                let n = (words.len() / 8) as u64;
                if first != r.missing.len() as u64 || first + n > total {
                    return Err(bad(alloc::format!(
                        "Missing words {first}..{} out of order (expected {} of {total})",
                        first + n,
                        r.missing.len()
                    )));
                }
                for c in words.chunks_exact(8) {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    r.missing.push(u64::from_le_bytes(w));
                }
                if r.missing.len() as u64 == total {
                    self.outcome = self.recover.take().map(Outcome::Recover);
                    self.phase = Phase::Done;
                }
            }
            (Phase::Reattaching(id), Msg::Ready) => {
                // The source has our bitmap: pages and requests flow again.
                self.recoveries += 1;
                self.phase = Phase::Postcopy(id);
            }
            (Phase::Hello, m) => {
                return Err(bad(alloc::format!(
                    "stream must start with Hello, got {}",
                    name(&m)
                )))
            }
            (Phase::Stream, Msg::Page { pfn, data }) => {
                page_of(&mut self.mem, pfn, self.pages)?.copy_from_slice(data);
                self.checksum.set(pfn as usize, wire::page_hash(pfn, data));
                self.page_msgs += 1;
            }
            (Phase::Stream, Msg::DeltaPage { pfn, delta }) => {
                if self
                    .hello
                    .as_ref()
                    .is_none_or(|h| h.flags & wire::hello_flags::DELTA == 0)
                {
                    return Err(bad(
                        "DeltaPage in a stream whose Hello did not announce deltas".into(),
                    ));
                }
                let page = page_of(&mut self.mem, pfn, self.pages)?;
                super::delta::apply(page, delta)
                    .map_err(|e| bad(alloc::format!("page {pfn}: {e}")))?;
                self.checksum.set(pfn as usize, wire::page_hash(pfn, page));
                self.page_msgs += 1;
            }
            (Phase::Stream, Msg::ZeroPage { pfn }) => {
                page_of(&mut self.mem, pfn, self.pages)?.fill(0);
                self.checksum.set(pfn as usize, wire::zero_hash(pfn));
                self.page_msgs += 1;
            }
            (Phase::Stream, Msg::RoundEnd { round, .. }) => {
                if round != self.next_round {
                    return Err(bad(alloc::format!(
                        "round {round} out of order (expected {})",
                        self.next_round
                    )));
                }
                self.next_round += 1;
                self.last_round_end_us = now_us;
            }
            (Phase::Stream, Msg::Missing { first, words }) => {
                let h = self.hello.as_ref().ok_or_else(|| bad("no Hello".into()))?;
                if h.flags & wire::hello_flags::POSTCOPY == 0 {
                    return Err(bad(
                        "Missing in a stream whose Hello did not announce post-copy".into(),
                    ));
                }
                let total = self.pages.div_ceil(64);
                let p = self.post.get_or_insert_with(PostProgress::default);
                let n = (words.len() / 8) as u64;
                if self.vcpu.is_some() || first != p.words || first + n > total {
                    return Err(bad(alloc::format!(
                        "Missing words {first}..{} out of order (expected {} of {total}, before the state)",
                        first + n,
                        p.words
                    )));
                }
                if p.missing.is_empty() {
                    p.missing
                        .try_reserve_exact(total as usize)
                        .map_err(|_| (reject::RESOURCES, String::from("out of heap")))?;
                }
                for c in words.chunks_exact(8) {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    p.missing.push(u64::from_le_bytes(w));
                }
                p.words = first + n;
            }
            (Phase::Stream, Msg::PostEnd { pages, missing }) => {
                let (Some(vcpu), Some(device)) = (self.vcpu.take(), self.device.take()) else {
                    return Err(bad("PostEnd before the vCPU and device state".into()));
                };
                let total = self.pages.div_ceil(64);
                let Some(p) = self.post.as_mut().filter(|p| p.words == total) else {
                    return Err(bad("PostEnd before the whole Missing bitmap".into()));
                };
                // Bits past the last page mean nothing; clear them so counts agree.
                if let Some(last) = p.missing.last_mut() {
                    if !self.pages.is_multiple_of(64) {
                        *last &= (1u64 << (self.pages % 64)) - 1;
                    }
                }
                let left: u64 = p.missing.iter().map(|w| u64::from(w.count_ones())).sum();
                if left != missing || pages != self.page_msgs {
                    return Err((
                        reject::VERIFY,
                        alloc::format!(
                            "PostEnd says {pages} pages sent and {missing} missing; {} arrived and the bitmap has {left}",
                            self.page_msgs
                        ),
                    ));
                }
                p.left = left;
                p.at_handover = left;
                let hello = self.hello.take().ok_or_else(|| bad("no Hello".into()))?;
                let mem = self.mem.take().ok_or_else(|| bad("no memory".into()))?;
                let id = inst
                    .install(mem, &hello, &vcpu, &device, Some(&p.missing))
                    .map_err(|e| (reject::VERIFY, e))?;
                self.hello = Some(hello);
                self.send_ready(link, inst, id, now_us);
            }
            (
                Phase::Postcopy(id),
                m @ (Msg::Page { .. } | Msg::ZeroPage { .. } | Msg::DeltaPage { .. }),
            ) => {
                let pfn = match m {
                    Msg::Page { pfn, .. } | Msg::ZeroPage { pfn } | Msg::DeltaPage { pfn, .. } => {
                        pfn
                    }
                    _ => return Err(bad(String::from("not a page"))),
                };
                if matches!(m, Msg::DeltaPage { .. })
                    && self
                        .hello
                        .as_ref()
                        .is_none_or(|h| h.flags & wire::hello_flags::DELTA == 0)
                {
                    return Err(bad(
                        "DeltaPage in a stream whose Hello did not announce deltas".into(),
                    ));
                }
                PostFill {
                    post: &mut self.post,
                    checksum: &mut self.checksum,
                    page_msgs: &mut self.page_msgs,
                    pages: self.pages,
                    commit_at_us: self.handover.map(|h| h.commit_at_us),
                }
                .page(inst, id, pfn, now_us, |page| match m {
                    Msg::Page { data, .. } => {
                        page.copy_from_slice(data);
                        Ok(())
                    }
                    Msg::DeltaPage { delta, .. } => {
                        super::delta::apply(page, delta).map_err(|e| alloc::format!("{e}"))
                    }
                    _ => {
                        page.fill(0);
                        Ok(())
                    }
                })?;
            }
            (Phase::Postcopy(id), Msg::End { pages, checksum }) => {
                let left = self.post.as_ref().map_or(0, |p| p.left);
                if left != 0 {
                    return Err(bad(alloc::format!("End with {left} pages still missing")));
                }
                if pages != self.page_msgs || checksum != self.checksum.value() {
                    // Only a faulty source gets here (the channel is authenticated):
                    // the guest already runs on this memory. Pause it rather than let
                    // it compute on wrong data; the source keeps its copy. Final: no
                    // reconnection would make this memory right.
                    inst.commit_lost(id);
                    self.failed = Some(alloc::format!(
                        "post-copy memory checksum mismatch ({pages} pages sent, {} arrived): guest paused",
                        self.page_msgs
                    ));
                    link.close();
                    self.phase = Phase::Done;
                    return Ok(());
                }
                let f = self
                    .post
                    .as_ref()
                    .map(PostProgress::figures)
                    .unwrap_or_default();
                wire::put_post_done(&mut self.out, &f);
                self.flush(link);
                self.phase = Phase::Done;
            }
            (Phase::Stream, Msg::Vcpu(b)) if self.vcpu.is_none() => self.vcpu = Some(b.to_vec()),
            (Phase::Stream, Msg::Device(b)) if self.device.is_none() => {
                self.device = Some(b.to_vec())
            }
            (Phase::Stream, Msg::Digest { first, hashes }) => {
                if self.device.is_none() || first != self.full.pages {
                    return Err(bad(alloc::format!(
                        "Digest of page {first} out of order (expected {} after the state)",
                        self.full.pages
                    )));
                }
                for (i, h) in hashes.chunks_exact(8).enumerate() {
                    let pfn = first + i as u64;
                    // Hash what this memory holds, not what arrived: an independent check.
                    let held = wire::full_hash(pfn, page_of(&mut self.mem, pfn, self.pages)?);
                    if held.to_le_bytes() != h {
                        self.full.mismatched += 1;
                        self.full.first_mismatch.get_or_insert(pfn);
                    }
                }
                self.full.pages = first + (hashes.len() / 8) as u64;
            }
            (Phase::Stream, Msg::End { pages, checksum }) => {
                self.end_at_us = now_us;
                let (Some(vcpu), Some(device)) = (self.vcpu.take(), self.device.take()) else {
                    return Err(bad("End before the vCPU and device state".into()));
                };
                if self.full.pages != 0 && self.full.pages != self.pages {
                    return Err(bad(alloc::format!(
                        "verify=full digest covers {} of {} pages",
                        self.full.pages,
                        self.pages
                    )));
                }
                if let Some(first) = self.full.first_mismatch {
                    return Err((
                        reject::MISMATCH,
                        alloc::format!(
                            "verify=full: {} of {} pages differ from the source's memory at the freeze (first: page {first})",
                            self.full.mismatched, self.pages
                        ),
                    ));
                }
                if pages != self.page_msgs {
                    return Err((
                        reject::VERIFY,
                        alloc::format!("End says {pages} pages, {} arrived", self.page_msgs),
                    ));
                }
                if checksum != self.checksum.value() {
                    return Err((reject::VERIFY, String::from("memory checksum mismatch")));
                }
                if self.post.is_some() {
                    return Err(bad(
                        "End in a stream that sent Missing (expected PostEnd)".into()
                    ));
                }
                let hello = self.hello.take().ok_or_else(|| bad("no Hello".into()))?;
                let mem = self.mem.take().ok_or_else(|| bad("no memory".into()))?;
                let id = inst
                    .install(mem, &hello, &vcpu, &device, None)
                    .map_err(|e| (reject::VERIFY, e))?;
                self.hello = Some(hello);
                self.send_ready(link, inst, id, now_us);
            }
            (Phase::AwaitCommit(id), Msg::Commit(t)) => {
                if self.holder.holding(HoldPoint::Resume, now_us) {
                    self.held_commit = Some((id, t, now_us));
                    return Ok(());
                }
                self.on_commit(inst, id, t, now_us);
            }
            (Phase::AwaitCommit(_), m) => {
                return Err(bad(alloc::format!("expected COMMIT, got {}", name(&m))))
            }
            (_, m) => return Err(bad(alloc::format!("unexpected {} in the stream", name(&m)))),
        }
        Ok(())
    }
}

impl<M: AsRef<[u8]> + AsMut<[u8]>> Receiver<M> {
    /// COMMIT arrived (at `now_us`) for guest `id`: it is ours; let it run.
    fn on_commit<I: Installer<Mem = M>>(
        &mut self,
        inst: &mut I,
        id: u32,
        t: wire::CommitTimes,
        now_us: u64,
    ) {
        let h = handover(&t, self.ready_sent_us, now_us);
        inst.commit(id, h.pause_to_commit_us);
        self.handover = Some(h);
        self.outcome = Some(Outcome::Committed(id));
        if self.post.is_some() {
            // The guest runs here now; its missing pages follow. A stream
            // that stalls from here is bounded again by the memory size.
            self.phase = Phase::Postcopy(id);
            self.deadline_us = now_us.saturating_add(stream_deadline_us(self.pages * 4096));
        } else {
            self.phase = Phase::Done;
        }
        // The link stays open: the kernel sends Resumed once the guest ran.
    }

    /// Everything is checked and the guest installed (frozen): READY.
    fn send_ready<I: Installer<Mem = M>>(
        &mut self,
        link: &mut dyn Link,
        inst: &mut I,
        id: u32,
        now_us: u64,
    ) {
        if self.holder.holding(HoldPoint::Ready, now_us) {
            // Nothing is read or sent until the hold ends; a failure meanwhile keeps
            // the guest paused, as after READY.
            self.held_ready = Some(id);
            self.deadline_us = u64::MAX;
            self.phase = Phase::AwaitCommit(id);
            return;
        }
        let mut m = Vec::new();
        wire::put_control(&mut m, wire::tag::READY);
        if link.send(&m) != m.len() {
            inst.commit_lost(id);
            self.outcome = Some(Outcome::CommitLost(id));
            self.phase = Phase::Done;
            return;
        }
        self.ready_sent_us = now_us;
        self.deadline_us = now_us + COMMIT_TIMEOUT_US;
        self.phase = Phase::AwaitCommit(id);
    }
}

/// The receiver's state that post-copy pages update (split from [`Receiver`] so a
/// page can be filled while the decoder still lends out its bytes).
struct PostFill<'r> {
    post: &'r mut Option<PostProgress>,
    checksum: &'r mut wire::Checksum,
    page_msgs: &'r mut u64,
    pages: u64,
    commit_at_us: Option<u64>,
}

impl PostFill<'_> {
    /// Fills page `pfn` of guest `id` with `fill`, maps it, and records the wait if
    /// the guest was waiting for it. Only a page still missing may come.
    fn page<I: Installer>(
        self,
        inst: &mut I,
        id: u32,
        pfn: u64,
        now_us: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<(), (u32, String)> {
        let bad = |what: String| (reject::MALFORMED, what);
        let p = self
            .post
            .as_mut()
            .ok_or_else(|| bad("no post-copy".into()))?;
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        if pfn >= self.pages || p.missing.get(w).is_none_or(|x| x & (1 << b) == 0) {
            return Err(bad(alloc::format!(
                "post-copy page {pfn} is not one the destination lacks"
            )));
        }
        let page = inst
            .post_page(id, pfn)
            .ok_or_else(|| bad(alloc::format!("guest {id} has no page {pfn}")))?;
        fill(page).map_err(|e| bad(alloc::format!("page {pfn}: {e}")))?;
        self.checksum.set(pfn as usize, wire::full_hash(pfn, page));
        *self.page_msgs += 1;
        p.missing[w] &= !(1 << b);
        p.left -= 1;
        p.last_page_us = now_us.saturating_sub(self.commit_at_us.unwrap_or(now_us));
        if let Some(waited) = inst.post_arrived(id, pfn, now_us) {
            p.faults += 1;
            p.fault_max_us = p.fault_max_us.max(waited);
            if p.samples.len() < MAX_FAULT_SAMPLES {
                p.samples.push(u32::try_from(waited).unwrap_or(u32::MAX));
            }
        }
        if p.requested == Some(pfn) {
            p.requested = None;
        }
        Ok(())
    }
}

/// The pause up to COMMIT's arrival, from the source's parts and this side's READY to
/// COMMIT round trip (the one-way latency is half of it, less the source's own delay).
pub fn handover(t: &wire::CommitTimes, ready_sent_us: u64, commit_at_us: u64) -> Handover {
    let round_trip = commit_at_us.saturating_sub(ready_sent_us);
    let one_way = round_trip.saturating_sub(t.ready_to_commit_us) / 2;
    let commit_wire_us = t.ready_to_commit_us + one_way;
    Handover {
        source: *t,
        commit_wire_us,
        pause_to_commit_us: t
            .freeze_to_sent_us
            .saturating_add(t.sent_to_ready_us)
            .saturating_add(commit_wire_us),
        commit_at_us,
    }
}

/// The bytes of page `pfn` in the memory under construction, or why there are none.
fn page_of<M: AsMut<[u8]>>(
    mem: &mut Option<M>,
    pfn: u64,
    pages: u64,
) -> Result<&mut [u8], (u32, String)> {
    let mem = mem
        .as_mut()
        .ok_or((reject::MALFORMED, String::from("no memory")))?;
    if pfn >= pages {
        return Err((
            reject::MALFORMED,
            alloc::format!("page {pfn} outside the guest's {pages} pages"),
        ));
    }
    let start = pfn as usize * wire::PAGE;
    Ok(&mut mem.as_mut()[start..start + wire::PAGE])
}

fn name(m: &Msg<'_>) -> &'static str {
    match m {
        Msg::Hello(_) => "Hello",
        Msg::Page { .. } => "Page",
        Msg::ZeroPage { .. } => "ZeroPage",
        Msg::RoundEnd { .. } => "RoundEnd",
        Msg::Vcpu(_) => "Vcpu",
        Msg::Device(_) => "Device",
        Msg::End { .. } => "End",
        Msg::Digest { .. } => "Digest",
        Msg::DeltaPage { .. } => "DeltaPage",
        Msg::Ready => "Ready",
        Msg::Reject { .. } => "Reject",
        Msg::Commit(_) => "Commit",
        Msg::Resumed(_) => "Resumed",
        Msg::Abort { .. } => "Abort",
        Msg::Missing { .. } => "Missing",
        Msg::PostEnd { .. } => "PostEnd",
        Msg::Request { .. } => "Request",
        Msg::PostDone(_) => "PostDone",
        Msg::Fetch(_) => "Fetch",
        Msg::Recover { .. } => "Recover",
    }
}
