//! One connection to the store: the first message decides whether it is a checkpoint
//! (a Hello with the CHECKPOINT flag: the store receives, validates and keeps the
//! stream) or a restore (Fetch: the store verifies the file and becomes the source).
//! Pure: it runs over a [`Link`] and a clock given by the caller, like the hypervisor's
//! [`Receiver`](hypervisor::migration::receiver::Receiver) and [`Source`], so the host
//! tests drive it with an in-memory link.
//!
//! ```text
//!  checkpoint                               restore
//!  hypervisor            store              hypervisor              store
//!  Hello{CHECKPOINT} ──► validate, allocate Fetch(name) ─────────► load, verify the
//!  pages, rounds,                                                  whole file; REJECT
//!  Vcpu, Device,                                                   if anything is off
//!  [Digest], End ──────► check like a               ◄───────────── Hello{RESTORED},
//!                        Receiver; write                           pages, Vcpu, Device,
//!                        <name>.tmp, fsync                         End (a Source over
//!           ◄─────────── READY                                     the stored memory,
//!  COMMIT ─────────────► rename to                                 stop-and-copy)
//!                        <name>.ckpt, index Ready ──────────────►
//!           ◄─────────── Resumed{0,0,0}, close      ◄───────────── COMMIT
//!  no COMMIT (link lost,                    Resumed ─────────────► (bounded wait)
//!  ABORT, 10 s): <name>.tmp removed
//! ```
//!
//! The checkpoint side checks exactly what the Receiver checks (page numbers against
//! the Hello's size, DeltaPage only when announced, round order, state blobs present
//! once, Digest coverage, End's page count and checksum) and refuses what a checkpoint
//! cannot be (no CHECKPOINT flag, post-copy). Any failure is a REJECT with a
//! [`reject`] code and a reason, and nothing is stored.

use hypervisor::migration::delta;
use hypervisor::migration::link::{say_last, Link, LinkState};
use hypervisor::migration::receiver::{reject, stream_deadline_us, COMMIT_TIMEOUT_US};
use hypervisor::migration::source::{Params, Phase as SrcPhase, Source, SourceGuest, Status};
use hypervisor::migration::stats::MigrationStats;
use hypervisor::migration::wire::{self, hello_flags, Hello, Msg, PAGE};

use super::dir::{Entry, LoadError, Pending, Store};
use super::format::Checkpoint;

/// What a finished session did, for the store's event lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A checkpoint was committed and stored.
    Checkpoint(Entry),
    /// A checkpoint stream was refused or lost; nothing was stored.
    CheckpointFailed {
        /// Image named in the Hello ("-" before it).
        image: String,
        /// Why.
        reason: String,
    },
    /// A restore ended.
    Restore {
        /// Checkpoint asked for.
        name: String,
        /// `Ok` when the destination took the guest (READY, COMMIT sent).
        outcome: Result<(), String>,
        /// Whether the destination reported the guest running (Resumed).
        resumed: bool,
        /// Stream bytes sent.
        bytes: u64,
    },
    /// The connection ended before it said what it wanted.
    Refused(String),
}

/// How long the peer may stay silent before the store gives up (receiving).
pub const IDLE_TIMEOUT_US: u64 = 30_000_000;

/// A frozen stored guest, the [`SourceGuest`] of a restore.
struct StoredGuest {
    c: Checkpoint,
}

impl SourceGuest for StoredGuest {
    fn pages(&self) -> usize {
        self.c.mem.len() / PAGE
    }
    fn page(&self, pfn: usize) -> &[u8] {
        &self.c.mem[pfn * PAGE..(pfn + 1) * PAGE]
    }
    fn start_tracking(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn collect_dirty(&mut self, _sink: &mut dyn FnMut(usize)) {}
    fn freeze(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn thaw(&mut self) {}
    fn vcpu_state(&mut self) -> Vec<u8> {
        self.c.vcpu.clone()
    }
    fn device_state(&mut self) -> Vec<u8> {
        self.c.device.clone()
    }
    fn hand_over(&mut self) {}
}

/// An incoming checkpoint stream, between Hello and End.
struct Incoming {
    hello: Hello,
    mem: Vec<u8>,
    pages: u64,
    checksum: wire::Checksum,
    page_msgs: u64,
    next_round: u32,
    vcpu: Option<Vec<u8>>,
    device: Option<Vec<u8>>,
    /// `verify=full`: pages compared, and the first that differs.
    digest_pages: u64,
    mismatched: u64,
    first_mismatch: Option<u64>,
    deadline_us: u64,
}

enum Phase {
    /// Waiting for the first message.
    First,
    Receiving(Box<Incoming>),
    /// Written to `<name>.tmp`, READY sent.
    AwaitCommit {
        pending: Box<Pending>,
        deadline_us: u64,
    },
    /// Restoring: the store is the source.
    Restoring {
        name: String,
        src: Box<Source>,
        guest: Box<StoredGuest>,
    },
    /// Delivering a last message, then closing.
    Closing,
    Done,
}

/// One accepted connection.
pub struct Session {
    phase: Phase,
    dec: wire::Decoder,
    peer: String,
    last_activity_us: u64,
    /// The rest of a final message the link could not take yet.
    farewell: Vec<u8>,
    /// Set when finished (or when the farewell is all that is left).
    pub event: Option<Event>,
    /// Bytes received.
    pub bytes_in: u64,
}

type Fail = (u32, String);

fn bad(what: String) -> Fail {
    (reject::MALFORMED, what)
}

impl Session {
    /// A session for a connection from `peer` (`ip:port`, for the index).
    pub fn new(peer: &str, now_us: u64) -> Self {
        Self {
            phase: Phase::First,
            dec: wire::Decoder::new(),
            peer: peer.to_string(),
            last_activity_us: now_us,
            farewell: Vec::new(),
            event: None,
            bytes_in: 0,
        }
    }

    /// Whether the session has finished (see `event`).
    pub fn done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The restore's source, while one runs (for its figures).
    pub fn restore_stats(&self) -> Option<&MigrationStats> {
        match &self.phase {
            Phase::Restoring { src, .. } => Some(&src.stats),
            _ => None,
        }
    }

    /// Advances; returns true once finished.
    pub fn poll(&mut self, link: &mut dyn Link, store: &mut Store, now_us: u64) -> bool {
        if let Phase::Restoring { .. } = self.phase {
            self.poll_restore(link, now_us);
            return self.done();
        }
        if let Phase::Closing = self.phase {
            self.flush_farewell(link);
            return self.done();
        }
        if let Phase::Done = self.phase {
            return true;
        }
        if let Err((code, why)) = self.step(link, store, now_us) {
            self.fail(link, code, why);
        }
        self.done()
    }

    fn image(&self) -> String {
        match &self.phase {
            Phase::Receiving(inc) => inc.hello.name.clone(),
            Phase::AwaitCommit { pending, .. } => pending.entry.image.clone(),
            _ => "-".into(),
        }
    }

    /// Ends the session: REJECT (code != 0) or a bare close; nothing is stored (a
    /// pending file is removed when the phase drops it).
    fn fail(&mut self, link: &mut dyn Link, code: u32, why: String) {
        let image = self.image();
        let event = match &self.phase {
            Phase::First => Event::Refused(why.clone()),
            Phase::Restoring { name, .. } => Event::Restore {
                name: name.clone(),
                outcome: Err(why.clone()),
                resumed: false,
                bytes: 0,
            },
            _ => Event::CheckpointFailed {
                image,
                reason: why.clone(),
            },
        };
        // A more precise event set before the failure stays.
        self.event.get_or_insert(event);
        if code != 0 && !matches!(self.phase, Phase::AwaitCommit { .. }) {
            let mut m = Vec::new();
            wire::put_reason(&mut m, wire::tag::REJECT, code, &why);
            self.farewell = say_last(link, &m);
        } else {
            link.close();
        }
        self.phase = if self.farewell.is_empty() {
            Phase::Done
        } else {
            Phase::Closing
        };
    }

    fn flush_farewell(&mut self, link: &mut dyn Link) {
        if link.state() != LinkState::Open {
            self.farewell.clear();
        }
        if !self.farewell.is_empty() {
            let n = link.send(&self.farewell);
            self.farewell.drain(..n);
        }
        if self.farewell.is_empty() {
            link.close();
            self.phase = Phase::Done;
        }
    }

    fn step(&mut self, link: &mut dyn Link, store: &mut Store, now_us: u64) -> Result<(), Fail> {
        let state = link.state();
        if state == LinkState::Connecting {
            // The secure handshake is still running (it has its own time limit).
            self.last_activity_us = now_us;
            return Ok(());
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = link.recv(&mut buf);
            if n == 0 {
                break;
            }
            self.bytes_in += n as u64;
            self.last_activity_us = now_us;
            let mut off = 0;
            while off < n {
                let (used, ready) = self
                    .dec
                    .push(&buf[off..n])
                    .map_err(|e| bad(format!("malformed stream: {e}")))?;
                off += used;
                if ready {
                    self.message(link, store, now_us)?;
                    if let Phase::Restoring { .. } | Phase::Done | Phase::Closing = self.phase {
                        if off < n {
                            return Err(bad("bytes after the request, before any reply".into()));
                        }
                        return Ok(());
                    }
                }
            }
        }
        if state == LinkState::Closed {
            let what = match self.phase {
                Phase::First => "connection closed before a request",
                Phase::AwaitCommit { .. } => {
                    "connection lost after READY without COMMIT: checkpoint discarded"
                }
                _ => "connection lost during the checkpoint stream",
            };
            return Err((0, what.into()));
        }
        match &self.phase {
            Phase::AwaitCommit { deadline_us, .. } if now_us > *deadline_us => Err((
                0,
                format!(
                    "no COMMIT within {} s of READY: checkpoint discarded",
                    COMMIT_TIMEOUT_US / 1_000_000
                ),
            )),
            Phase::Receiving(inc) if now_us > inc.deadline_us => Err((
                reject::TIMEOUT,
                "the checkpoint stream took too long".into(),
            )),
            Phase::First | Phase::Receiving(_)
                if now_us.saturating_sub(self.last_activity_us) > IDLE_TIMEOUT_US =>
            {
                Err((
                    reject::TIMEOUT,
                    format!("peer silent for {} s", IDLE_TIMEOUT_US / 1_000_000),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Handles the decoded message.
    fn message(&mut self, link: &mut dyn Link, store: &mut Store, now_us: u64) -> Result<(), Fail> {
        let msg = self
            .dec
            .take()
            .map_err(|e| bad(format!("malformed stream: {e}")))?;
        match (&mut self.phase, msg) {
            (Phase::First, Msg::Hello(h)) => {
                // From here a failure is a refused checkpoint of this image.
                self.event = None;
                let image = h.name.clone();
                let r = self.begin_checkpoint(h, store, now_us);
                if let Err((_, why)) = &r {
                    self.event = Some(Event::CheckpointFailed {
                        image,
                        reason: why.clone(),
                    });
                }
                r?;
            }
            (Phase::First, Msg::Fetch(name)) => {
                let name = name.to_string();
                if let Err(e) = self.start_restore(store, name.clone(), now_us) {
                    self.event = Some(Event::Restore {
                        name,
                        outcome: Err(e.1.clone()),
                        resumed: false,
                        bytes: 0,
                    });
                    return Err(e);
                }
            }
            (Phase::First, m) => {
                return Err(bad(format!(
                    "a connection to the store starts with Hello (CHECKPOINT) or Fetch, got {}",
                    msg_name(&m)
                )))
            }
            (Phase::Receiving(_), Msg::Abort { reason, .. }) => {
                return Err((
                    0,
                    format!("source aborted: {}", wire::printable(reason, 200)),
                ));
            }
            (Phase::Receiving(inc), Msg::End { pages, checksum }) => {
                inc.end(pages, checksum)?;
                let inc = match std::mem::replace(&mut self.phase, Phase::Done) {
                    Phase::Receiving(inc) => inc,
                    _ => unreachable!("matched Receiving above"),
                };
                let image = inc.hello.name.clone();
                let Incoming {
                    hello,
                    mem,
                    vcpu,
                    device,
                    ..
                } = *inc;
                let mut c = Checkpoint {
                    name: String::new(),
                    image: hello.name,
                    args: hello.args,
                    migrations: hello.migrations,
                    time_ns: hello.time_ns,
                    created_unix: 0,
                    vcpu: vcpu.unwrap_or_default(),
                    device: device.unwrap_or_default(),
                    mem,
                };
                let pending = match store.write_pending(&mut c, &self.peer) {
                    Ok(p) => p,
                    Err(e) => {
                        self.phase = Phase::Receiving(Box::new(Incoming::placeholder(image)));
                        return Err((
                            reject::RESOURCES,
                            format!("cannot store the checkpoint: {e}"),
                        ));
                    }
                };
                let mut m = Vec::new();
                wire::put_control(&mut m, wire::tag::READY);
                if link.send(&m) != m.len() {
                    // Nothing else is queued on this link: it can always take 8 bytes
                    // unless it is gone.
                    self.phase = Phase::AwaitCommit {
                        pending: Box::new(pending),
                        deadline_us: now_us,
                    };
                    return Err((
                        0,
                        "connection lost before READY: checkpoint discarded".into(),
                    ));
                }
                self.phase = Phase::AwaitCommit {
                    pending: Box::new(pending),
                    deadline_us: now_us.saturating_add(COMMIT_TIMEOUT_US),
                };
            }
            (Phase::Receiving(inc), m) => inc.record(m)?,
            (Phase::AwaitCommit { .. }, Msg::Commit(_)) => {
                let Phase::AwaitCommit { pending, .. } =
                    std::mem::replace(&mut self.phase, Phase::Done)
                else {
                    unreachable!("matched AwaitCommit above")
                };
                let image = pending.entry.image.clone();
                match store.commit(*pending) {
                    Ok(entry) => {
                        self.event = Some(Event::Checkpoint(entry));
                        let mut m = Vec::new();
                        wire::put_resumed(&mut m, &wire::ResumedTimes::default());
                        self.farewell = say_last(link, &m);
                        self.phase = if self.farewell.is_empty() {
                            Phase::Done
                        } else {
                            Phase::Closing
                        };
                    }
                    Err(e) => {
                        // The source believes the checkpoint is kept; say loudly that
                        // it is not (the link closes without Resumed).
                        self.event = Some(Event::CheckpointFailed {
                            image,
                            reason: format!("committed by the source but not stored: {e}"),
                        });
                        link.close();
                    }
                }
            }
            (Phase::AwaitCommit { .. }, Msg::Abort { reason, .. }) => {
                return Err((
                    0,
                    format!(
                        "source aborted after READY: {}; checkpoint discarded",
                        wire::printable(reason, 200)
                    ),
                ));
            }
            (Phase::AwaitCommit { .. }, m) => {
                return Err((
                    0,
                    format!(
                        "expected COMMIT, got {}: checkpoint discarded",
                        msg_name(&m)
                    ),
                ))
            }
            (_, m) => return Err(bad(format!("unexpected {}", msg_name(&m)))),
        }
        Ok(())
    }

    /// A Hello as the first message: a checkpoint stream begins.
    fn begin_checkpoint(&mut self, h: Hello, store: &Store, now_us: u64) -> Result<(), Fail> {
        if h.flags & hello_flags::CHECKPOINT == 0 {
            return Err(bad(
                "this is a checkpoint store: a migration stream needs the CHECKPOINT flag".into(),
            ));
        }
        if h.flags & hello_flags::POSTCOPY != 0 {
            return Err(bad("a checkpoint cannot be post-copy".into()));
        }
        if h.mem_bytes > store.max_mem {
            return Err((
                reject::RESOURCES,
                format!(
                    "guest memory {} bytes exceeds this store's {}",
                    h.mem_bytes, store.max_mem
                ),
            ));
        }
        let mut mem = Vec::new();
        mem.try_reserve_exact(h.mem_bytes as usize)
            .map_err(|_| (reject::RESOURCES, "out of memory".to_string()))?;
        mem.resize(h.mem_bytes as usize, 0);
        let pages = h.mem_bytes / PAGE as u64;
        self.phase = Phase::Receiving(Box::new(Incoming {
            deadline_us: now_us.saturating_add(stream_deadline_us(h.mem_bytes)),
            hello: h,
            mem,
            pages,
            checksum: wire::Checksum::new(pages as usize),
            page_msgs: 0,
            next_round: 0,
            vcpu: None,
            device: None,
            digest_pages: 0,
            mismatched: 0,
            first_mismatch: None,
        }));
        Ok(())
    }

    /// Fetch: verify the stored checkpoint entirely, then stream it as a source.
    fn start_restore(&mut self, store: &Store, name: String, now_us: u64) -> Result<(), Fail> {
        // Nothing is sent before the whole file has been verified.
        let (c, entry) = store.load(&name).map_err(|e| {
            let code = match e {
                LoadError::Io(..) => reject::RESOURCES,
                _ => reject::VERIFY,
            };
            (code, e.to_string())
        })?;
        let hello = Hello {
            flags: hello_flags::RESTORED,
            mem_bytes: c.mem.len() as u64,
            migrations: c.migrations,
            time_ns: c.time_ns,
            name: c.image.clone(),
            args: c.args.clone(),
        };
        let stats = MigrationStats {
            role: "source",
            image: entry.image,
            mem_bytes: entry.mem_bytes,
            peer: self.peer.clone(),
            method: "store",
            mode: "stop",
            ..MigrationStats::default()
        };
        let params = Params {
            stop_and_copy: true,
            ..Params::default()
        };
        self.phase = Phase::Restoring {
            name,
            src: Box::new(Source::new(params, hello, stats, now_us)),
            guest: Box::new(StoredGuest { c }),
        };
        Ok(())
    }

    fn poll_restore(&mut self, link: &mut dyn Link, now_us: u64) {
        let Phase::Restoring { src, guest, name } = &mut self.phase else {
            return;
        };
        if src.poll(guest.as_mut(), link, now_us) != Status::Finished {
            return;
        }
        let outcome = if src.phase() == SrcPhase::Done {
            Ok(())
        } else {
            Err(src.stats.outcome.clone())
        };
        self.event = Some(Event::Restore {
            name: name.clone(),
            outcome,
            resumed: src.stats.downtime_joined,
            bytes: src.stats.last.bytes + src.stats.rounds.iter().map(|r| r.bytes).sum::<u64>(),
        });
        self.farewell = src.take_farewell();
        if self.farewell.is_empty() {
            link.close();
            self.phase = Phase::Done;
        } else {
            self.phase = Phase::Closing;
        }
    }
}

impl Incoming {
    /// A stand-in after the memory was handed to the writer (only its image matters).
    fn placeholder(image: String) -> Self {
        Self {
            hello: Hello {
                flags: 0,
                mem_bytes: 0,
                migrations: 0,
                time_ns: 0,
                name: image,
                args: String::new(),
            },
            mem: Vec::new(),
            pages: 0,
            checksum: wire::Checksum::default(),
            page_msgs: 0,
            next_round: 0,
            vcpu: None,
            device: None,
            digest_pages: 0,
            mismatched: 0,
            first_mismatch: None,
            deadline_us: 0,
        }
    }

    fn page(&mut self, pfn: u64) -> Result<&mut [u8], Fail> {
        if pfn >= self.pages {
            return Err(bad(format!(
                "page {pfn} outside the guest's {} pages",
                self.pages
            )));
        }
        let s = pfn as usize * PAGE;
        Ok(&mut self.mem[s..s + PAGE])
    }

    /// One message of the stream before End.
    fn record(&mut self, m: Msg<'_>) -> Result<(), Fail> {
        match m {
            Msg::Page { pfn, data } => {
                self.page(pfn)?.copy_from_slice(data);
                self.checksum.set(pfn as usize, wire::page_hash(pfn, data));
                self.page_msgs += 1;
            }
            Msg::DeltaPage { pfn, delta: d } => {
                if self.hello.flags & hello_flags::DELTA == 0 {
                    return Err(bad(
                        "DeltaPage in a stream whose Hello did not announce deltas".into(),
                    ));
                }
                let page = self.page(pfn)?;
                delta::apply(page, d).map_err(|e| bad(format!("page {pfn}: {e}")))?;
                let h = wire::page_hash(pfn, page);
                self.checksum.set(pfn as usize, h);
                self.page_msgs += 1;
            }
            Msg::ZeroPage { pfn } => {
                self.page(pfn)?.fill(0);
                self.checksum.set(pfn as usize, wire::zero_hash(pfn));
                self.page_msgs += 1;
            }
            Msg::RoundEnd { round, .. } => {
                if round != self.next_round {
                    return Err(bad(format!(
                        "round {round} out of order (expected {})",
                        self.next_round
                    )));
                }
                self.next_round += 1;
            }
            Msg::Vcpu(b) if self.vcpu.is_none() => self.vcpu = Some(b.to_vec()),
            Msg::Device(b) if self.device.is_none() => self.device = Some(b.to_vec()),
            Msg::Digest { first, hashes } => {
                if self.device.is_none() || first != self.digest_pages {
                    return Err(bad(format!(
                        "Digest of page {first} out of order (expected {} after the state)",
                        self.digest_pages
                    )));
                }
                for (i, h) in hashes.chunks_exact(8).enumerate() {
                    let pfn = first + i as u64;
                    let held = wire::full_hash(pfn, self.page(pfn)?);
                    if held.to_le_bytes() != h {
                        self.mismatched += 1;
                        self.first_mismatch.get_or_insert(pfn);
                    }
                }
                self.digest_pages = first + (hashes.len() / 8) as u64;
            }
            Msg::Missing { .. } | Msg::PostEnd { .. } => {
                return Err(bad("post-copy messages in a checkpoint stream".into()))
            }
            m => return Err(bad(format!("unexpected {} in the stream", msg_name(&m)))),
        }
        Ok(())
    }

    /// End: everything the Receiver checks before READY.
    fn end(&mut self, pages: u64, checksum: u64) -> Result<(), Fail> {
        if self.vcpu.is_none() || self.device.is_none() {
            return Err(bad("End before the vCPU and device state".into()));
        }
        if self.digest_pages != 0 && self.digest_pages != self.pages {
            return Err(bad(format!(
                "verify=full digest covers {} of {} pages",
                self.digest_pages, self.pages
            )));
        }
        if let Some(first) = self.first_mismatch {
            return Err((
                reject::MISMATCH,
                format!(
                    "verify=full: {} of {} pages differ from the source's memory at the freeze (first: page {first})",
                    self.mismatched, self.pages
                ),
            ));
        }
        if pages != self.page_msgs {
            return Err((
                reject::VERIFY,
                format!("End says {pages} pages, {} arrived", self.page_msgs),
            ));
        }
        if checksum != self.checksum.value() {
            return Err((reject::VERIFY, "memory checksum mismatch".into()));
        }
        Ok(())
    }
}

fn msg_name(m: &Msg<'_>) -> &'static str {
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
