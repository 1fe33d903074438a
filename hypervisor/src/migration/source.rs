//! The source side of a pre-copy migration: a poll-driven state machine that streams
//! the guest's memory in rounds while it runs, then stops it, sends the rest and hands
//! it over. It works against two small traits ([`Link`], [`SourceGuest`]) so that the
//! whole protocol runs on the host in tests with an in-memory link and a fake guest;
//! the kernel binds them to a smoltcp TCP socket and a real [`Vm`](crate::vm::Vm).
//!
//! ```text
//!  poll ──► Connecting ──► Precopy(round 0: every page) ──► Precopy(round n: pages
//!           dirtied in round n-1) ... ──policy says stop──► StopCopy: freeze guest,
//!           send last dirty pages, vCPU + device state, [Digest of all memory,]
//!           End{checksum}
//!           ──► AwaitReady ──READY──► guest marked gone, COMMIT sent ──► AwaitResumed
//!           ──Resumed (the destination's account of the pause)──► Done
//!  any error before COMMIT (link closed, timeout, REJECT): tracking off, guest thawed,
//!  Failed(reason). The guest keeps running here.
//!
//!  post-copy (`mode=postcopy` from the start, `mode=hybrid` when the rounds stop
//!  converging): freeze ──► PostFreeze: Missing bitmap of the pages the destination
//!  lacks, vCPU + device state, PostEnd ──► AwaitReady ──READY──► COMMIT ──►
//!  Postcopy: every missing page once, a requested page and its neighbours first,
//!  then End{checksum} ──PostDone──► Done (the guest's memory here is freed)
//!  a link failure after COMMIT: Stranded. The guest runs on the destination; the
//!  pages it lacks stay here, held (never freed) until the operator kills the copy.
//! ```

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use super::link::{Link, LinkState};
use super::stats::{self, MigrationStats, RoundStats, StopReason};
use super::wire::{self, Hello, Msg};
use super::HoldPoint;

/// What the source needs from the guest being migrated.
pub trait SourceGuest {
    /// Number of guest pages.
    fn pages(&self) -> usize;
    /// The current contents of page `pfn`.
    fn page(&self, pfn: usize) -> &[u8];
    /// Starts dirty tracking.
    fn start_tracking(&mut self) -> Result<(), String>;
    /// Reports pages written since the previous call (or since tracking started).
    fn collect_dirty(&mut self, sink: &mut dyn FnMut(usize));
    /// Stops the guest for stop-and-copy (it must not run until thawed or gone). Fails
    /// if the guest is no longer alive (it exited or was stopped meanwhile).
    fn freeze(&mut self) -> Result<(), String>;
    /// Stops tracking and lets the guest run again (migration failed).
    fn thaw(&mut self);
    /// The encoded vCPU state (guest frozen).
    fn vcpu_state(&mut self) -> Vec<u8>;
    /// The encoded PV-device state (guest frozen).
    fn device_state(&mut self) -> Vec<u8>;
    /// Marks the guest as gone: it will never run here again.
    fn hand_over(&mut self);
    /// Pages the guest hinted free and has not written since (called once, before
    /// tracking starts or the guest is frozen). By default none.
    fn free_pages(&mut self, _sink: &mut dyn FnMut(usize)) {}
    /// Auto-converge: keep the guest off the CPU for `pct` percent of its time (0:
    /// not at all). By default ignored.
    fn throttle(&mut self, _pct: u8) {}
    /// The guest's run time so far in us (for the trace; 0 where unknown).
    fn run_us(&self) -> u64 {
        0
    }
}

/// Tunables of one migration (console options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Target downtime.
    pub downtime_us: u64,
    /// Most pre-copy rounds before stop-and-copy is forced.
    pub max_rounds: u32,
    /// Pause first and copy everything (the baseline), instead of pre-copy.
    pub stop_and_copy: bool,
    /// Give up waiting for the peer after this long.
    pub timeout_us: u64,
    /// Link bandwidth to assume for the downtime estimate (bytes/s) instead of the
    /// measured stream rate.
    pub bandwidth_bps: Option<u64>,
    /// Delta compression of re-sent pages: bytes of previously sent pages kept to
    /// encode the next version against (0: off).
    pub cache_bytes: usize,
    /// `verify=full`: at the freeze, hash every page of the guest's real memory (not
    /// just what was sent) for the destination to compare before READY, so a page
    /// missed by dirty tracking fails the migration instead of the guest.
    pub verify_full: bool,
    /// Whether and when to hand the guest over before all of its memory.
    pub postcopy: PostMode,
    /// Post-copy prepaging: pages around a requested page sent with it (0: off).
    pub prepage: u32,
    /// A checkpoint to a store: at READY the guest is thawed here (it goes on
    /// running) instead of handed over; COMMIT tells the store the copy is final.
    pub checkpoint: bool,
    /// Auto-converge (as QEMU's): when rounds stop shrinking the dirty set, throttle
    /// the guest (20 %, then 10 % more per round, at most 99 %) instead of stopping,
    /// until the rest fits the downtime or `max_rounds` is reached.
    pub auto_converge: bool,
    /// Test hook: stop at a point of the migration for a while ([`super::Hold`]).
    pub hold: Option<super::Hold>,
    /// Print where each phase's time went (console only; the figures are in the
    /// stats either way).
    pub trace: bool,
}

/// When the source switches to post-copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostMode {
    /// Never: pre-copy (or stop-and-copy) only.
    Off,
    /// At once: freeze, send the state, and every page after the hand-over.
    Always,
    /// Pre-copy rounds first; when they stop converging (or reach the round limit),
    /// post-copy for the pages still dirty instead of a long stop-and-copy.
    Hybrid,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            downtime_us: 10_000,
            max_rounds: 30,
            stop_and_copy: false,
            timeout_us: 30_000_000,
            bandwidth_bps: None,
            cache_bytes: 0,
            verify_full: false,
            postcopy: PostMode::Off,
            prepage: 16,
            checkpoint: false,
            auto_converge: false,
            hold: None,
            trace: false,
        }
    }
}

/// Where the source stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the TCP connection.
    Connecting,
    /// Streaming rounds while the guest runs.
    Precopy,
    /// Pre-copy is over: waiting, guest still running, until the peer has acknowledged
    /// everything sent, so the downtime does not include draining the socket buffers.
    Draining,
    /// Guest frozen: sending the last dirty pages.
    StopCopy,
    /// Guest frozen for post-copy: sending the Missing bitmap and the state.
    PostFreeze,
    /// Guest frozen, state sent: hashing all of its memory for `verify=full`.
    Digest,
    /// Everything queued; waiting for READY.
    AwaitReady,
    /// READY received, guest handed over: flushing COMMIT.
    Committing,
    /// COMMIT sent: waiting (bounded) for the destination's Resumed and its figures.
    /// The guest is the destination's already; nothing here can change that.
    AwaitResumed,
    /// Post-copy, COMMIT sent: the guest runs on the destination; sending it the
    /// pages it lacks (requested ones first) until it confirms them all.
    Postcopy,
    /// Post-copy interrupted after COMMIT (link lost or peer silent): the guest runs
    /// on the destination, and the pages it still lacks are only here. They are kept.
    Stranded,
    /// Committed: the guest now belongs to the destination.
    Done,
    /// Failed before COMMIT: the guest runs on here.
    Failed,
}

/// The result of a poll.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// Still under way.
    Running,
    /// Finished (stats say how).
    Finished,
}

/// Pages encoded per poll, so the guest and the console get the CPU between polls.
const PAGES_PER_POLL: usize = 64;
/// Encoded bytes kept ahead of the link.
const OUT_HIGH: usize = 64 * 1024;
/// Draining ends (the guest is frozen) once at most this much is unacknowledged: the
/// last segment's delayed ACK and round trip would otherwise be spent with the guest
/// dirtying the final set, while carrying a page's worth more in the pause costs
/// about 3.5 ms at Bochs' link speed.
/// (With nothing left to send, the drain runs to the end: an idle guest loses nothing
/// by waiting.)
const DRAIN_LEFT: usize = 4096 + 64;
/// Bytes handed to the link at a time while the guest is paused (see `flush`).
const FROZEN_PIECE: usize = 4096;
/// Pre-copy: most bytes encoded but not yet acknowledged (ours and the socket's), so
/// pages are read late and a round's end is near the wire's: what the link carries in
/// AHEAD_US at the stream's measured rate (two guest slices, so the link never runs dry
/// while a guest runs), at least AHEAD_MIN (about 21 ms at Bochs' 1.16 MB/s), at most
/// what the buffers hold (at QEMU TCG's 18 MB/s, 20 ms is 360 KB).
const AHEAD_US: u64 = 20_000;
const AHEAD_MIN: usize = 24 * 1024;
const AHEAD_MAX: usize = OUT_HIGH + 128 * 1024;
/// How long to wait for Resumed after COMMIT before reporting the source's part only.
const RESUMED_TIMEOUT_US: u64 = 5_000_000;
/// Post-copy: bulk pages are queued only while less than this is waiting in front of
/// the link, so a requested page waits behind at most this much (head-of-line
/// blocking on the one connection; about 12 ms at Bochs' 1.3 MB/s).
const POST_BULK_LOW: usize = 16 * 1024;
/// Post-copy: most pages waiting in the priority queue (requested pages and their
/// neighbours); beyond it, neighbours are dropped (they still come with the bulk).
const URGENT_MAX: usize = 1024;

/// What the source waited for between two polls (the trace's split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// Encoded bytes the link did not take.
    LinkFull,
    /// Draining: everything handed to the link, not all acknowledged.
    Acks,
    /// Nothing: the loop ran guests and the network.
    Nothing,
}

/// A migration in progress on the source.
pub struct Source {
    params: Params,
    phase: Phase,
    started_us: u64,
    round: u32,
    round_started_us: u64,
    cur: RoundStats,
    sending: Vec<u64>,
    next: Vec<u64>,
    cursor: usize,
    pages: usize,
    out: Vec<u8>,
    out_off: usize,
    checksum: wire::Checksum,
    page_msgs: u64,
    frozen_at_us: u64,
    state_sent_us: u64,
    ready_at_us: u64,
    last_progress_us: u64,
    last_queued: usize,
    reply: wire::Decoder,
    farewell: Vec<u8>,
    cache: super::delta::DeltaCache,
    delta_buf: Vec<u8>,
    hello: Hello,
    /// Post-copy will be (or is) used for the pages left at the freeze.
    post: bool,
    /// Post-copy: pages to send before the bulk (front: the latest request).
    urgent: VecDeque<usize>,
    /// Post-copy: End (the checksum over all memory) has been queued.
    end_sent: bool,
    /// Pages hinted free by the guest and not written since: sent as zero pages.
    free: Vec<u64>,
    /// Checkpoint: when the guest was let go again (its snapshot was all encoded).
    thawed_at_us: Option<u64>,
    /// Auto-converge: the throttle in force (percent), and since when.
    throttle: u8,
    throttled_since_us: u64,
    /// Trace: when the last poll ended, what the source was waiting for then, and
    /// the guest's run time seen then.
    last_poll_end_us: Option<u64>,
    waiting: Waiting,
    last_run_us: u64,
    /// Hybrid: where in the round the wire budget was last projected.
    checked_at: usize,
    /// Ends the current round with this reason (hybrid's mid-round switch).
    force_stop: Option<StopReason>,
    /// The test hook's progress.
    holder: super::Holder,
    /// READY arrived: the COMMIT to send (when a hold at `commit` lets it).
    pending_commit: Option<wire::CommitTimes>,
    /// The figures, complete when the migration finishes.
    pub stats: MigrationStats,
}

fn bitmap_all(pages: usize) -> Vec<u64> {
    let mut v = alloc::vec![u64::MAX; pages.div_ceil(64)];
    if !pages.is_multiple_of(64) {
        if let Some(last) = v.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    v
}

/// Adds the pages the guest dirtied since the last collection to `bits`.
fn collect_into(g: &mut dyn SourceGuest, bits: &mut [u64]) {
    g.collect_dirty(&mut |pfn| {
        if let Some(w) = bits.get_mut(pfn / 64) {
            *w |= 1 << (pfn % 64);
        }
    });
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Hybrid: the bytes pre-copy may put on the wire before the rest goes by post-copy
/// (1.15x the memory, leaving room for what the guest dirties while the link drains
/// before the freeze, so that the whole migration stays under 1.3x).
fn hybrid_budget(mem_bytes: u64) -> u64 {
    mem_bytes / 20 * 23
}

/// Pages written (`dirty`) are no longer free, whatever the hint said.
fn forget_written(free: &mut [u64], dirty: &[u64]) {
    for (f, d) in free.iter_mut().zip(dirty) {
        *f &= !d;
    }
}

fn bit(bits: &[u64], pfn: usize) -> bool {
    bits.get(pfn / 64)
        .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
}

/// Clears bit `pfn`; returns whether it was set.
fn take_bit(bits: &mut [u64], pfn: usize) -> bool {
    match bits.get_mut(pfn / 64) {
        Some(w) if *w & (1 << (pfn % 64)) != 0 => {
            *w &= !(1 << (pfn % 64));
            true
        }
        _ => false,
    }
}

/// The first set bit at or after `from`.
fn next_bit(bits: &[u64], from: usize) -> Option<usize> {
    let mut w = from / 64;
    let mut word = bits.get(w)? & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            return Some(w * 64 + word.trailing_zeros() as usize);
        }
        w += 1;
        word = *bits.get(w)?;
    }
}

impl Source {
    /// Prepares a migration of a guest described by `hello` (memory size, name, ...).
    pub fn new(params: Params, mut hello: Hello, stats: MigrationStats, now_us: u64) -> Self {
        if params.cache_bytes > 0 {
            hello.flags |= wire::hello_flags::DELTA;
        }
        if params.postcopy != PostMode::Off {
            hello.flags |= wire::hello_flags::POSTCOPY;
        }
        if params.checkpoint {
            hello.flags |= wire::hello_flags::CHECKPOINT;
        }
        let pages = (hello.mem_bytes / wire::PAGE as u64) as usize;
        Self {
            params,
            phase: Phase::Connecting,
            started_us: now_us,
            round: 0,
            round_started_us: now_us,
            cur: RoundStats::default(),
            sending: bitmap_all(pages),
            next: alloc::vec![0; pages.div_ceil(64)],
            cursor: 0,
            pages,
            out: Vec::with_capacity(OUT_HIGH + 8192),
            out_off: 0,
            checksum: wire::Checksum::new(pages),
            page_msgs: 0,
            frozen_at_us: 0,
            state_sent_us: 0,
            ready_at_us: 0,
            last_progress_us: now_us,
            last_queued: 0,
            reply: wire::Decoder::new(),
            farewell: Vec::new(),
            cache: super::delta::DeltaCache::new(params.cache_bytes),
            delta_buf: Vec::new(),
            hello,
            post: params.postcopy == PostMode::Always,
            urgent: VecDeque::new(),
            end_sent: false,
            free: Vec::new(),
            thawed_at_us: None,
            throttle: 0,
            throttled_since_us: 0,
            last_poll_end_us: None,
            waiting: Waiting::Nothing,
            last_run_us: 0,
            checked_at: 0,
            force_stop: None,
            holder: super::Holder::new(params.hold),
            pending_commit: None,
            stats,
        }
    }

    /// The migration's options.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes encoded but not yet taken by the link.
    pub fn buffered(&self) -> usize {
        self.out.capacity()
    }

    /// Current pre-copy round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Advances the migration. Call often, between guest time slices.
    pub fn poll(&mut self, g: &mut dyn SourceGuest, link: &mut dyn Link, now_us: u64) -> Status {
        if matches!(self.phase, Phase::Failed | Phase::Stranded) {
            // Already failed (e.g. cancelled): keep the first reason.
            return Status::Finished;
        }
        self.trace_gap(g, now_us);
        let status = self.poll_inner(g, link, now_us);
        self.waiting = if self.out.len() > self.out_off {
            Waiting::LinkFull
        } else if self.phase == Phase::Draining && link.queued() > 0 {
            Waiting::Acks
        } else {
            Waiting::Nothing
        };
        self.last_poll_end_us = Some(now_us);
        status
    }

    /// The caller's clock after a poll: the time inside it goes to the trace.
    pub fn poll_done(&mut self, end_us: u64) {
        if let Some(start) = self.last_poll_end_us {
            let spent = end_us.saturating_sub(start);
            self.trace_mut().in_poll_us += spent;
            self.last_poll_end_us = Some(end_us);
        }
    }

    /// Pre-copy: how much may wait ahead of the link now (see [`AHEAD_US`]).
    fn ahead_limit(&self, now_us: u64) -> usize {
        let elapsed = now_us.saturating_sub(self.started_us);
        let sent: u64 = self.stats.rounds.iter().map(|r| r.bytes).sum::<u64>() + self.cur.bytes;
        if elapsed < 100_000 || sent == 0 {
            // No measure yet: round 0 starts at full depth.
            return AHEAD_MAX;
        }
        let bytes = sent.saturating_mul(AHEAD_US) / elapsed;
        (bytes as usize).clamp(AHEAD_MIN, AHEAD_MAX)
    }

    /// The guest is frozen here and waits for what is being sent (the pause).
    fn paused_here(&self) -> bool {
        matches!(
            self.phase,
            Phase::StopCopy
                | Phase::PostFreeze
                | Phase::Digest
                | Phase::AwaitReady
                | Phase::Committing
        ) && self.thawed_at_us.is_none()
    }

    /// The trace of the phase under way.
    fn trace_mut(&mut self) -> &mut stats::PhaseTrace {
        match self.phase {
            Phase::Draining => &mut self.stats.drain,
            Phase::Postcopy => &mut self.stats.post.trace,
            _ => &mut self.cur.trace,
        }
    }

    /// Books the interval since the last poll to what the source was waiting for.
    fn trace_gap(&mut self, g: &mut dyn SourceGuest, now_us: u64) {
        let run = g.run_us();
        let ran = run.saturating_sub(self.last_run_us);
        self.last_run_us = run;
        let (prev, waiting) = (self.last_poll_end_us, self.waiting);
        let t = self.trace_mut();
        t.polls += 1;
        t.guest_us += ran;
        if let Some(prev) = prev {
            let gap = now_us.saturating_sub(prev);
            t.max_gap_us = t.max_gap_us.max(gap);
            match waiting {
                Waiting::LinkFull => t.link_full_us += gap,
                Waiting::Acks => t.ack_wait_us += gap,
                Waiting::Nothing => t.idle_us += gap,
            }
        }
    }

    /// Lifts an auto-converge throttle (hand-over, failure, checkpoint taken).
    fn unthrottle(&mut self, g: &mut dyn SourceGuest, now_us: u64) {
        if self.throttle > 0 {
            g.throttle(0);
            self.throttle = 0;
            self.stats.throttle_us += now_us.saturating_sub(self.throttled_since_us);
        }
    }

    fn poll_inner(&mut self, g: &mut dyn SourceGuest, link: &mut dyn Link, now_us: u64) -> Status {
        if self.phase == Phase::Postcopy {
            if let Err(e) = self.step_postcopy(g, link, now_us) {
                // Too late to take the guest back: it runs on the destination. Keep
                // what it lacks; say so.
                self.phase = Phase::Stranded;
                // Deltas will not be used again (see `resume`): free the cache now.
                self.cache = super::delta::DeltaCache::new(0);
                self.stats.total_us = now_us - self.started_us;
                self.stats.outcome = alloc::format!(
                    "post-copy interrupted: {e}; {} pages not sent yet; all of the guest's memory is kept here",
                    count(&self.sending)
                );
                link.close();
            }
            return match self.phase {
                Phase::Postcopy => Status::Running,
                _ => Status::Finished,
            };
        }
        match self.step(g, link, now_us) {
            Ok(()) if self.phase == Phase::Done => Status::Finished,
            Ok(()) => Status::Running,
            Err(e) => {
                self.fail(g, link, now_us, e);
                Status::Finished
            }
        }
    }

    /// The part of the final ABORT the link could not take yet (empty once it did, or
    /// when there was nobody to tell); the caller delivers it, then closes the link.
    pub fn take_farewell(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.farewell)
    }

    /// Whether the guest has been handed over (READY came): from then on the
    /// migration can no longer be cancelled.
    pub fn handed_over(&self) -> bool {
        matches!(
            self.phase,
            Phase::Committing
                | Phase::AwaitResumed
                | Phase::Postcopy
                | Phase::Stranded
                | Phase::Done
        )
    }

    /// The Hello this migration began with (identifies a stranded post-copy).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Post-copy recovery: the destination of this stranded migration reconnected
    /// over a new link, holding `pages` page messages and lacking the pages in
    /// `missing`. Sends those (requested ones first) as before, then End. Pages sent
    /// as deltas are not trusted across the break: from here every page goes whole.
    pub fn resume(&mut self, missing: &[u64], pages: u64, now_us: u64) -> Result<(), String> {
        if self.phase != Phase::Stranded || !self.post {
            return Err(String::from("no interrupted post-copy"));
        }
        if missing.len() != self.sending.len() {
            return Err(alloc::format!(
                "bitmap of {} words for a guest of {} pages",
                missing.len(),
                self.pages
            ));
        }
        self.sending.copy_from_slice(missing);
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = self.sending.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
        self.page_msgs = pages;
        self.cache = super::delta::DeltaCache::new(0);
        self.urgent.clear();
        self.end_sent = false;
        self.cursor = 0;
        self.out.clear();
        self.out_off = 0;
        self.reply = wire::Decoder::new();
        self.farewell.clear();
        self.last_queued = 0;
        self.last_progress_us = now_us;
        wire::put_control(&mut self.out, wire::tag::READY);
        self.stats.postcopy.recoveries += 1;
        self.stats.outcome = String::from("ok");
        self.phase = Phase::Postcopy;
        Ok(())
    }

    /// Post-copy pages not yet sent (and not confirmed): what a stranded migration
    /// keeps here.
    pub fn pages_left(&self) -> u64 {
        if self.post {
            count(&self.sending)
        } else {
            0
        }
    }

    /// Aborts the migration (operator's `migrate cancel`, or the guest vanished): the
    /// peer gets ABORT, the guest is thawed and keeps running here. Refused (false)
    /// once the guest has been handed over.
    pub fn cancel(
        &mut self,
        g: &mut dyn SourceGuest,
        link: &mut dyn Link,
        now_us: u64,
        why: &str,
    ) -> bool {
        if self.handed_over() || self.phase == Phase::Failed {
            return false;
        }
        self.fail(g, link, now_us, String::from(why));
        true
    }

    fn fail(&mut self, g: &mut dyn SourceGuest, link: &mut dyn Link, now_us: u64, why: String) {
        // The link may hold part of a message: finish what was encoded, so the ABORT
        // behind it is framed where the peer's decoder expects a message.
        let mut m = self.out.split_off(self.out_off);
        self.out.clear();
        self.out_off = 0;
        wire::put_reason(&mut m, wire::tag::ABORT, 1, &why);
        self.farewell = super::link::say_last(link, &m);
        self.unthrottle(g, now_us);
        g.thaw();
        self.phase = Phase::Failed;
        self.stats.total_us = now_us - self.started_us;
        self.stats.outcome = why;
    }

    fn step(
        &mut self,
        g: &mut dyn SourceGuest,
        link: &mut dyn Link,
        now_us: u64,
    ) -> Result<(), String> {
        let state = link.state();
        if self.phase == Phase::Connecting {
            match state {
                LinkState::Connecting if now_us - self.started_us > 10_000_000 => {
                    return Err("peer did not accept the connection within 10 s".into())
                }
                LinkState::Connecting => return Ok(()),
                LinkState::Closed => {
                    return Err(
                        "peer refused the connection (is it a hypervisor with a free port 7000?)"
                            .into(),
                    )
                }
                LinkState::Open => {
                    wire::put_hello(&mut self.out, &self.hello);
                    // Free-page hints, read before tracking takes the dirty flags.
                    let mut free = alloc::vec![0u64; self.pages.div_ceil(64)];
                    g.free_pages(&mut |pfn| {
                        if let Some(w) = free.get_mut(pfn / 64) {
                            *w |= 1 << (pfn % 64);
                        }
                    });
                    if free.iter().any(|w| *w != 0) {
                        self.free = free;
                    }
                    self.round_started_us = now_us;
                    self.last_progress_us = now_us;
                    if self.params.postcopy == PostMode::Always {
                        g.freeze()?;
                        self.frozen_at_us = now_us;
                        self.stats.stop_reason = Some(StopReason::Postcopy);
                        self.phase = Phase::PostFreeze;
                    } else if self.params.stop_and_copy {
                        g.freeze()?;
                        self.frozen_at_us = now_us;
                        self.stats.stop_reason = Some(StopReason::Baseline);
                        self.phase = Phase::StopCopy;
                    } else {
                        g.start_tracking()?;
                        self.phase = Phase::Precopy;
                    }
                }
            }
        }
        if matches!(self.phase, Phase::Committing | Phase::AwaitResumed) {
            // The guest is gone from here whatever happens now: a lost COMMIT leaves it
            // paused at the destination, never running twice. What is left is to push
            // COMMIT out and hear how long the guest's pause was.
            if let Some(mut times) = self.pending_commit {
                if self.holder.holding(HoldPoint::Commit, now_us) {
                    return Ok(());
                }
                times.ready_to_commit_us = now_us - self.ready_at_us;
                wire::put_commit(&mut self.out, &times);
                self.stats.total_us = now_us - self.started_us;
                if self.thawed_at_us.is_none() {
                    // Until the destination reports, the pause known here.
                    self.stats.downtime_us = now_us - self.frozen_at_us;
                }
                self.pending_commit = None;
            }
            self.flush(link, now_us);
            if self.phase == Phase::Committing && self.out.is_empty() {
                if self.post {
                    // The guest runs there from now on; its pages follow.
                    self.phase = Phase::Postcopy;
                    self.cursor = 0;
                    self.last_progress_us = now_us;
                    return Ok(());
                }
                self.phase = Phase::AwaitResumed;
            }
            if self.phase == Phase::AwaitResumed {
                // A bad or missing reply only costs the destination's figures.
                let _ = self.read_replies(g, link, now_us);
            }
            let waited = now_us - self.ready_at_us - self.holder.held_us(HoldPoint::Commit);
            if self.phase != Phase::Done
                && (state == LinkState::Closed || waited > RESUMED_TIMEOUT_US)
            {
                link.close();
                if self.params.checkpoint {
                    // Only Resumed says the store kept it (it discards a copy whose
                    // COMMIT it never got). The guest runs here either way.
                    return Err(String::from(
                        "the store did not confirm the checkpoint (no Resumed after COMMIT)",
                    ));
                }
                self.phase = Phase::Done;
            }
            return Ok(());
        }
        if state == LinkState::Closed {
            return Err(alloc::format!("connection lost during {:?}", self.phase));
        }
        self.read_replies(g, link, now_us)?;
        if self.phase == Phase::Committing {
            return Ok(());
        }
        self.flush(link, now_us);
        if self.holder.active() {
            self.last_progress_us = now_us;
        }
        if now_us - self.last_progress_us > self.params.timeout_us {
            return Err(alloc::format!(
                "peer stopped reading for {} s",
                self.params.timeout_us / 1_000_000
            ));
        }
        if self.out.len() - self.out_off >= OUT_HIGH {
            return Ok(());
        }
        let ahead = self.out.len() - self.out_off + link.queued();
        let ahead_max = self.ahead_limit(now_us);
        if self.phase == Phase::Precopy && ahead >= ahead_max {
            // Encode a page only shortly before the link can carry it: what sits in
            // buffers goes stale as the guest writes on, and a deep backlog at the end
            // of a round becomes a long drain that the guest spends dirtying the final
            // set (the trace showed 111 ms of drain and 8 of 14 final pages from it).
            return Ok(());
        }
        // Drop what the link already took, so the buffer stays bounded by OUT_HIGH plus
        // one page however the link accepts data.
        if self.out_off > 0 {
            self.out.drain(..self.out_off);
            self.out_off = 0;
        }
        if self.phase == Phase::Draining
            && self.out.is_empty()
            && link.queued()
                <= if count(&self.sending) == 0 {
                    0
                } else {
                    DRAIN_LEFT
                }
            && !self.holder.holding(HoldPoint::Drain, now_us)
        {
            // All but the last page or so has arrived: freeze, and add what the guest dirtied while
            // the link drained to the pages of the stop-and-copy phase.
            g.freeze()?;
            self.unthrottle(g, now_us);
            self.frozen_at_us = now_us;
            self.round_started_us = now_us;
            let before = count(&self.sending);
            collect_into(g, &mut self.sending);
            self.stats.round_end_dirty = before;
            self.stats.drain_dirty = count(&self.sending) - before;
            forget_written(&mut self.free, &self.sending);
            self.cursor = 0;
            self.phase = if self.post {
                Phase::PostFreeze
            } else {
                Phase::StopCopy
            };
        }
        match self.phase {
            Phase::PostFreeze => {
                self.send_missing(g);
                self.flush(link, now_us);
            }
            Phase::StopCopy if self.holder.holding(HoldPoint::Freeze, now_us) => {}
            Phase::Precopy | Phase::StopCopy => {
                // Pre-copy fills only up to the limit with what the link holds.
                let limit = if self.phase == Phase::Precopy {
                    (self.out.len() + ahead_max)
                        .saturating_sub(ahead)
                        .min(OUT_HIGH)
                } else {
                    OUT_HIGH
                };
                self.send_pages(g, limit);
                if self.phase == Phase::Precopy && self.params.postcopy == PostMode::Hybrid {
                    self.project_wire_budget(g);
                }
                if self.cursor >= self.pages {
                    self.end_round(g, now_us);
                }
                self.flush(link, now_us);
            }
            Phase::Digest => {
                self.send_digest(g);
                self.flush(link, now_us);
            }
            _ => {}
        }
        if self.params.checkpoint && self.phase == Phase::AwaitReady && self.thawed_at_us.is_none()
        {
            // A checkpoint's snapshot is fixed once its last page is encoded (the
            // stream holds copies): the guest runs on while the store writes it.
            g.thaw();
            self.unthrottle(g, now_us);
            self.thawed_at_us = Some(now_us);
        }
        Ok(())
    }

    /// Hashes up to one Digest message of the frozen guest's memory per poll; after the
    /// last, End.
    fn send_digest(&mut self, g: &mut dyn SourceGuest) {
        let mut hashes = [0u64; wire::DIGEST_PER_MSG];
        let first = self.cursor;
        let n = wire::DIGEST_PER_MSG.min(self.pages - first);
        for (i, h) in hashes[..n].iter_mut().enumerate() {
            *h = wire::full_hash((first + i) as u64, g.page(first + i));
        }
        let before = self.out.len();
        if n > 0 {
            wire::put_digest(&mut self.out, first as u64, &hashes[..n]);
        }
        self.cursor += n;
        if self.cursor >= self.pages {
            wire::put_end(&mut self.out, self.page_msgs, self.checksum.value());
            self.stats.last = self.cur;
            self.phase = Phase::AwaitReady;
        }
        self.cur.bytes += (self.out.len() - before) as u64;
    }

    fn flush(&mut self, link: &mut dyn Link, now_us: u64) {
        // The guest is paused: hand the link small pieces and push each onto the wire
        // before sealing the next, so encryption overlaps transmission (and the peer
        // can open each small record as it lands) instead of adding to the pause.
        let piece = if self.paused_here() {
            FROZEN_PIECE
        } else {
            usize::MAX
        };
        let mut budget = OUT_HIGH; // per poll, so the loop still gets round
        while self.out_off < self.out.len() && budget > 0 {
            let end = self.out.len().min(self.out_off + piece.min(budget));
            let n = link.send(&self.out[self.out_off..end]);
            if n == 0 {
                break;
            }
            self.out_off += n;
            self.last_progress_us = now_us;
            if piece == usize::MAX {
                break;
            }
            budget -= n;
            link.push();
        }
        if self.out_off == self.out.len() {
            self.out.clear();
            self.out_off = 0;
        }
        if self.phase == Phase::AwaitReady && self.out.is_empty() && self.state_sent_us == 0 {
            self.state_sent_us = now_us;
        }
        // Acknowledged bytes are progress too (the peer is alive and reading).
        let queued = link.queued();
        if queued < self.last_queued {
            self.last_progress_us = now_us;
        }
        self.last_queued = queued;
    }

    /// Encodes up to PAGES_PER_POLL pages of the current set.
    fn send_pages(&mut self, g: &mut dyn SourceGuest, limit: usize) {
        let mut budget = PAGES_PER_POLL;
        while budget > 0 && self.cursor < self.pages && self.out.len() < limit {
            let (w, b) = (self.cursor / 64, self.cursor % 64);
            let word = self.sending[w] >> b;
            if word == 0 {
                self.cursor = (w + 1) * 64;
                continue;
            }
            let pfn = self.cursor + word.trailing_zeros() as usize;
            self.cursor = pfn + 1;
            if pfn >= self.pages {
                break;
            }
            self.send_page(g, pfn);
            budget -= 1;
        }
    }

    /// Encodes page `pfn` (as a zero page, a delta or whole) into the current round.
    fn send_page(&mut self, g: &mut dyn SourceGuest, pfn: usize) {
        let data = g.page(pfn);
        let before = self.out.len();
        let cur = if self.phase == Phase::Postcopy {
            &mut self.stats.post
        } else {
            &mut self.cur
        };
        let hinted = bit(&self.free, pfn);
        if hinted || wire::is_zero(data) {
            // A page hinted free (and not written since) goes as zeros, whatever it
            // holds: the guest said it needs none of it.
            wire::put_zero(&mut self.out, pfn as u64);
            self.checksum.set(pfn, wire::zero_hash(pfn as u64));
            cur.zero_pages += 1;
            if hinted {
                self.stats.free_pages += 1;
            }
            self.cache.sent_zero(pfn);
        } else {
            // Pages re-sent after round 0 have proved hot: cache them, and send later
            // versions as deltas when that is smaller (as QEMU's XBZRLE). The
            // destination holds the previous version of a page re-sent in post-copy
            // too (unmapped, so its guest cannot have changed it).
            self.delta_buf.clear();
            let resent = !self.params.stop_and_copy
                && (self.round > 0 || matches!(self.phase, Phase::StopCopy | Phase::Postcopy));
            if resent && self.cache.encode_and_update(pfn, data, &mut self.delta_buf) {
                wire::put_delta(&mut self.out, pfn as u64, &self.delta_buf);
                cur.delta_pages += 1;
                cur.delta_saved += (wire::PAGE - self.delta_buf.len()) as u64;
            } else {
                wire::put_page(&mut self.out, pfn as u64, data);
            }
            self.checksum.set(pfn, wire::page_hash(pfn as u64, data));
        }
        cur.bytes += (self.out.len() - before) as u64;
        cur.pages += 1;
        self.page_msgs += 1;
    }

    /// Post-copy hand-over: the Missing bitmap (a few messages per poll), then the
    /// vCPU and device state and PostEnd.
    fn send_missing(&mut self, g: &mut dyn SourceGuest) {
        let before = self.out.len();
        let words = self.sending.len();
        let mut msgs = 0;
        while self.cursor < words && msgs < 4 {
            let n = wire::MISSING_WORDS.min(words - self.cursor);
            wire::put_missing(
                &mut self.out,
                self.cursor as u64,
                &self.sending[self.cursor..self.cursor + n],
            );
            self.cursor += n;
            msgs += 1;
        }
        if self.cursor >= words {
            let vcpu = g.vcpu_state();
            let dev = g.device_state();
            wire::put_state(&mut self.out, wire::tag::VCPU, &vcpu);
            wire::put_state(&mut self.out, wire::tag::DEVICE, &dev);
            let missing = count(&self.sending);
            wire::put_post_end(&mut self.out, self.page_msgs, missing);
            self.stats.postcopy.used = true;
            self.stats.postcopy.missing_at_handover = missing;
            self.cur.round = self.round + 1;
            self.stats.last = self.cur;
            self.cursor = 0;
            self.phase = Phase::AwaitReady;
        }
        let added = (self.out.len() - before) as u64;
        self.cur.bytes += added;
        self.stats.last.bytes = self.cur.bytes;
    }

    /// One poll of post-copy: replies (Resumed, Request, PostDone), then requested
    /// pages and their neighbours, then bulk pages while the link is nearly idle,
    /// then End once every page is out.
    fn step_postcopy(
        &mut self,
        g: &mut dyn SourceGuest,
        link: &mut dyn Link,
        now_us: u64,
    ) -> Result<(), String> {
        if link.state() == LinkState::Closed {
            return Err(String::from("connection lost"));
        }
        self.read_replies(g, link, now_us)?;
        if self.phase != Phase::Postcopy {
            return Ok(());
        }
        self.flush(link, now_us);
        if now_us - self.last_progress_us > self.params.timeout_us {
            return Err(alloc::format!(
                "peer stopped reading for {} s",
                self.params.timeout_us / 1_000_000
            ));
        }
        if self.out_off > 0 {
            self.out.drain(..self.out_off);
            self.out_off = 0;
        }
        let mut budget = PAGES_PER_POLL;
        while budget > 0 && self.out.len() < OUT_HIGH {
            let Some(pfn) = self.urgent.pop_front() else {
                break;
            };
            if take_bit(&mut self.sending, pfn) {
                self.send_page(g, pfn);
                budget -= 1;
            }
        }
        while budget > 0 && self.out.len() + link.queued() < POST_BULK_LOW {
            let Some(pfn) = next_bit(&self.sending, self.cursor) else {
                break;
            };
            self.cursor = pfn + 1;
            if take_bit(&mut self.sending, pfn) {
                self.send_page(g, pfn);
                budget -= 1;
            }
        }
        if !self.end_sent && self.urgent.is_empty() && next_bit(&self.sending, 0).is_none() {
            let before = self.out.len();
            wire::put_end(&mut self.out, self.page_msgs, self.checksum.value());
            self.stats.post.bytes += (self.out.len() - before) as u64;
            self.end_sent = true;
        }
        self.flush(link, now_us);
        Ok(())
    }

    /// Post-copy: the destination's guest waits for `pfn`. Queue it first, and its
    /// neighbours (a bubble alternating forward and back, as Hines et al.'s
    /// prepaging) behind it, ahead of the bulk.
    fn on_request(&mut self, pfn: u64) -> Result<(), String> {
        let pfn = usize::try_from(pfn).unwrap_or(usize::MAX);
        if pfn >= self.pages {
            return Err(alloc::format!("request for page {pfn} outside the guest"));
        }
        self.stats.postcopy.requests += 1;
        self.urgent.push_front(pfn);
        let mut queued = 0;
        for k in 1..=self.params.prepage as usize {
            for p in [pfn.checked_add(k), pfn.checked_sub(k)]
                .into_iter()
                .flatten()
            {
                if queued < self.params.prepage as usize
                    && p < self.pages
                    && bit(&self.sending, p)
                    && self.urgent.len() < URGENT_MAX
                {
                    self.urgent.push_back(p);
                    queued += 1;
                }
            }
        }
        self.stats.postcopy.prepaged += queued as u64;
        Ok(())
    }

    /// Hybrid, every 64 pages of a round: what would be on the wire if the guest were
    /// handed over now (sent so far, plus every page still to send or dirtied again,
    /// once each). Past [`hybrid_budget`], the round ends here and post-copy sends the
    /// rest: a guest that rewrites its memory faster than a round takes stops costing
    /// a round's worth of bytes per round.
    fn project_wire_budget(&mut self, g: &mut dyn SourceGuest) {
        if self.cursor >= self.pages || self.cursor < self.checked_at + 64 {
            return;
        }
        self.checked_at = self.cursor;
        collect_into(g, &mut self.next);
        forget_written(&mut self.free, &self.next);
        let rest = |w: usize, word: u64| {
            let first = w * 64;
            if first + 64 <= self.cursor {
                0
            } else if first >= self.cursor {
                word
            } else {
                word & (u64::MAX << (self.cursor - first))
            }
        };
        let left: u64 = self
            .next
            .iter()
            .zip(&self.sending)
            .enumerate()
            .map(|(w, (n, s))| u64::from((n | rest(w, *s)).count_ones()))
            .sum();
        let sent: u64 = self.stats.rounds.iter().map(|r| r.bytes).sum::<u64>() + self.cur.bytes;
        if sent + left * wire::PAGE as u64 > hybrid_budget(self.hello.mem_bytes) {
            // Hand over now: what this round has not reached yet goes by post-copy.
            for w in 0..self.next.len() {
                let r = rest(w, self.sending[w]);
                self.next[w] |= r;
            }
            self.force_stop = Some(StopReason::WireBudget);
            self.cursor = self.pages;
        }
    }

    fn end_round(&mut self, g: &mut dyn SourceGuest, now_us: u64) {
        match self.phase {
            Phase::Precopy => {
                let before = self.out.len();
                wire::put_round_end(&mut self.out, self.round, self.cur.pages as u32);
                self.cur.bytes += (self.out.len() - before) as u64;
                collect_into(g, &mut self.next);
                forget_written(&mut self.free, &self.next);
                let dirty = count(&self.next);
                self.cur.round = self.round;
                self.cur.us = now_us - self.round_started_us;
                self.cur.dirty_after = dirty;
                self.stats.rounds.push(self.cur);
                let elapsed = (now_us - self.started_us).max(1);
                let sent: u64 = self.stats.rounds.iter().map(|r| r.bytes).sum();
                let bandwidth = self
                    .params
                    .bandwidth_bps
                    .unwrap_or(sent * 1_000_000 / elapsed);
                let mut decision = self.force_stop.take().or_else(|| {
                    stats::decide(
                        &self.stats.rounds,
                        dirty,
                        bandwidth,
                        self.params.downtime_us,
                        self.params.max_rounds,
                    )
                });
                if self.params.postcopy == PostMode::Hybrid && decision.is_none() {
                    // Each further round re-sends what the guest keeps rewriting; past
                    // this budget, hand over and send the rest exactly once.
                    if sent + dirty * wire::PAGE as u64 > hybrid_budget(self.hello.mem_bytes) {
                        decision = Some(StopReason::WireBudget);
                    }
                }
                // Once throttled, a round that saw the guest dirty more than half of
                // what the link carried steps the throttle up again (QEMU's rule);
                // otherwise a throttle too small to converge stays until max-rounds.
                let hot = self.throttle > 0 && decision.is_none() && dirty * 2 > self.cur.pages;
                if self.params.auto_converge && (decision == Some(StopReason::NotConverging) || hot)
                {
                    // Slow the guest down rather than stop with a large dirty set.
                    if self.throttle == 0 {
                        self.throttled_since_us = now_us;
                    }
                    self.throttle = if self.throttle == 0 {
                        20
                    } else {
                        (self.throttle + 10).min(99)
                    };
                    g.throttle(self.throttle);
                    self.stats.throttle_pct = self.throttle;
                    decision = None;
                }
                self.cur = RoundStats::default();
                self.cursor = 0;
                self.checked_at = 0;
                self.round_started_us = now_us;
                if let Some(reason) = decision {
                    self.stats.stop_reason = Some(reason);
                    // Hybrid: rounds that stopped converging would leave a long
                    // stop-and-copy; hand over now and send the rest after.
                    self.post = self.params.postcopy == PostMode::Hybrid
                        && reason != StopReason::FitsDowntime;
                    self.phase = Phase::Draining;
                } else {
                    self.round += 1;
                }
                core::mem::swap(&mut self.sending, &mut self.next);
                self.next.fill(0);
            }
            Phase::StopCopy => {
                let vcpu = g.vcpu_state();
                let dev = g.device_state();
                let before = self.out.len();
                wire::put_state(&mut self.out, wire::tag::VCPU, &vcpu);
                wire::put_state(&mut self.out, wire::tag::DEVICE, &dev);
                self.cur.us = now_us - self.round_started_us;
                self.cur.round = self.round + 1;
                if self.params.verify_full {
                    self.cur.bytes += (self.out.len() - before) as u64;
                    self.cursor = 0;
                    self.phase = Phase::Digest;
                    return;
                }
                wire::put_end(&mut self.out, self.page_msgs, self.checksum.value());
                self.cur.bytes += (self.out.len() - before) as u64;
                self.stats.last = self.cur;
                self.phase = Phase::AwaitReady;
            }
            _ => {}
        }
    }

    fn read_replies(
        &mut self,
        g: &mut dyn SourceGuest,
        link: &mut dyn Link,
        now_us: u64,
    ) -> Result<(), String> {
        let mut buf = [0u8; 256];
        loop {
            let n = link.recv(&mut buf);
            if n == 0 {
                return Ok(());
            }
            let mut off = 0;
            while off < n {
                let (used, ready) = self
                    .reply
                    .push(&buf[off..n])
                    .map_err(|e| alloc::format!("bad reply from peer: {e}"))?;
                off += used;
                if !ready {
                    continue;
                }
                match self
                    .reply
                    .take()
                    .map_err(|e| alloc::format!("bad reply from peer: {e}"))?
                {
                    Msg::Ready if self.phase == Phase::AwaitReady && self.out.is_empty() => {
                        if self.params.checkpoint {
                            // The store holds a complete copy (the guest was let go
                            // as soon as its snapshot was encoded).
                            if self.thawed_at_us.is_none() {
                                g.thaw();
                            }
                        } else {
                            // Point of no return: the guest is the destination's now.
                            g.hand_over();
                        }
                        self.ready_at_us = now_us;
                        let sent = if self.state_sent_us == 0 {
                            now_us
                        } else {
                            self.state_sent_us
                        };
                        let times = wire::CommitTimes {
                            freeze_to_sent_us: sent - self.frozen_at_us,
                            sent_to_ready_us: now_us - sent,
                            ready_to_commit_us: 0,
                        };
                        // Encoded on the next poll (after a hold at `commit`, if any).
                        self.pending_commit = Some(times);
                        self.stats.dt_freeze_sent_us = times.freeze_to_sent_us;
                        self.stats.dt_sent_ready_us = times.sent_to_ready_us;
                        // Until the destination reports, the pause known here.
                        self.stats.downtime_us =
                            self.thawed_at_us.unwrap_or(now_us) - self.frozen_at_us;
                        self.stats.total_us = now_us - self.started_us;
                        self.stats.outcome = String::from("ok");
                        self.phase = Phase::Committing;
                        return Ok(());
                    }
                    Msg::Resumed(t)
                        if matches!(self.phase, Phase::AwaitResumed | Phase::Postcopy) =>
                    {
                        if self.params.checkpoint {
                            // The pause ended here, at READY.
                            self.stats.downtime_joined = true;
                        } else {
                            self.stats.dt_commit_wire_us = t.commit_wire_us;
                            self.stats.dt_resume_us = t.commit_to_resume_us;
                            self.stats.downtime_us = t.downtime_us;
                            self.stats.downtime_joined = true;
                        }
                        self.stats.total_us = now_us - self.started_us;
                        if self.phase == Phase::AwaitResumed {
                            self.phase = Phase::Done;
                            return Ok(());
                        }
                    }
                    Msg::Request { pfn } if self.phase == Phase::Postcopy => {
                        self.on_request(pfn)?;
                    }
                    Msg::PostDone(f) if self.phase == Phase::Postcopy && self.end_sent => {
                        self.stats.postcopy.remote = f;
                        self.stats.total_us = now_us - self.started_us;
                        self.phase = Phase::Done;
                        return Ok(());
                    }
                    Msg::Reject { code, reason } => {
                        return Err(alloc::format!(
                            "peer rejected the migration (code {code}): {reason}"
                        ))
                    }
                    other => return Err(alloc::format!("unexpected reply from peer: {other:?}")),
                }
            }
        }
    }
}
