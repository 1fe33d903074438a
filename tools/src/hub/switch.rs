//! The hub's switching, queueing and fault logic, with no I/O and no clock of its own:
//! every call takes `now` (nanoseconds since the hub started), so the unit tests drive it
//! with a fake clock and the I/O layer ([`super`]) with the real one.
//!
//! A frame's path through the hub:
//!
//! ```text
//!  member p ──► ingress ──► learn src MAC ──► forward (unicast / flood) ──► per egress port q:
//!               (p cut? drop)                  (link p–q cut? drop)          faults of q: loss,
//!                                                                            duplicate, reorder
//!                                                                            (hold back k frames),
//!                                                                            delay + jitter
//!     ──► egress queue of q (bounded, tail drop) ──► serializer at q's line rate
//!     ──► in flight for delay + jitter (order kept) ──► (q or link cut? drop) ──► member q
//! ```
//!
//! Faults apply where a frame leaves the hub towards a port (as `netem` does on an
//! interface's egress), so "5% loss on port 1" is loss on everything port 1 receives; set
//! the same faults on every port for a lossy network. Every random decision draws from the
//! egress port's own generator, seeded from the hub's seed and the port number, and every
//! frame draws the same number of values whatever faults are enabled: the i-th frame
//! offered to a port meets the same fate in every run with that seed.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Nanoseconds since the hub started: the core's only notion of time.
pub type Nanos = u64;

/// Default line rate of a port, in bytes per second: far above what Bochs' socket module
/// carries (a few MB/s), so by default the hub queues only what arrives in one burst.
pub const DEFAULT_RATE: u64 = 1_000_000_000;
/// Default egress queue length of a port, in frames (a switch port's buffer is typically
/// a few hundred to a few thousand frames).
pub const DEFAULT_QUEUE: usize = 1024;
/// How far a late wake-up of the I/O thread may backdate a transmission: the serializer
/// catches up at most this much instead of losing the time (the thread sleeps with
/// ~0.1 ms precision) or sending an arbitrarily long burst after a long stall.
pub const CATCH_UP: Nanos = 200_000;
/// A frame held back for reordering is released after this long even if fewer than `k`
/// frames followed it (the traffic may have stopped).
pub const REORDER_HOLD_MAX: Nanos = 20_000_000;
/// Frames held back for reordering per port at once; beyond it frames pass in order.
pub const HELD_MAX: usize = 64;
/// Frames in flight (serialized, waiting out their delay) per port; beyond it frames are
/// dropped and counted with the queue drops. Bounds memory when delay × rate is large.
pub const FLIGHT_MAX: usize = 8192;
/// MAC table entries; when full, the least recently seen entry makes room.
pub const MAC_TABLE_MAX: usize = 256;
/// A learned MAC is forgotten after this long without a frame from it (as switches do,
/// typically 300 s), so a stale entry cannot blackhole a MAC forever.
pub const MAC_AGE: Nanos = 300_000_000_000;
/// Partitions (scripted or commanded) that can be pending or active at once.
pub const CUTS_MAX: usize = 64;
/// Frames shorter than an Ethernet header are counted as bad and dropped.
pub const ETH_HEADER: usize = 14;

/// Why a configuration or a command was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum HubError {
    /// A probability outside 0..=1 (or not a number).
    BadProbability {
        /// Which fault.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// Reordering enabled with `reorder_by` 0.
    ReorderByZero,
    /// A line rate of 0 bytes/s.
    ZeroRate,
    /// A queue of 0 frames.
    ZeroQueue,
    /// A port number at or beyond the member count.
    NoSuchPort {
        /// The port given.
        port: usize,
        /// How many ports the hub has.
        ports: usize,
    },
    /// A link cut between a port and itself.
    SelfLink(usize),
    /// More than [`CUTS_MAX`] partitions pending or active.
    TooManyPartitions,
    /// A hub needs at least one member.
    NoMembers,
    /// A member's UDP address could not be bound.
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        error: String,
    },
    /// Another I/O failure while starting (socket options, thread spawn).
    Io(String),
    /// The hub's thread is gone (stopped, or it failed).
    Stopped,
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadProbability { what, value } => {
                write!(f, "hub: {what} probability {value} is not within 0..=1")
            }
            Self::ReorderByZero => {
                f.write_str("hub: reordering needs reorder_by >= 1 (frames to hold back by)")
            }
            Self::ZeroRate => f.write_str("hub: a line rate must be at least 1 byte/s"),
            Self::ZeroQueue => f.write_str("hub: a queue must hold at least 1 frame"),
            Self::NoSuchPort { port, ports } => {
                write!(f, "hub: no port {port} (ports are 0..{ports})")
            }
            Self::SelfLink(p) => write!(f, "hub: a link cut needs two different ports ({p}, {p})"),
            Self::TooManyPartitions => {
                write!(
                    f,
                    "hub: at most {CUTS_MAX} partitions may be pending or active"
                )
            }
            Self::NoMembers => f.write_str("hub: no members"),
            Self::Bind { addr, error } => write!(f, "hub: cannot bind UDP {addr}: {error}"),
            Self::Io(e) => write!(f, "hub: {e}"),
            Self::Stopped => f.write_str("hub: the hub is not running"),
        }
    }
}

impl std::error::Error for HubError {}

/// A port's link: how fast its egress drains and how much it buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Line rate towards the member, in bytes of frame per second.
    pub rate: u64,
    /// Egress queue length in frames; a frame arriving at a full queue is dropped.
    pub queue: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            queue: DEFAULT_QUEUE,
        }
    }
}

impl LinkConfig {
    /// Refuses a zero rate or queue.
    pub fn validate(&self) -> Result<(), HubError> {
        if self.rate == 0 {
            return Err(HubError::ZeroRate);
        }
        if self.queue == 0 {
            return Err(HubError::ZeroQueue);
        }
        Ok(())
    }

    /// Time to serialize `len` bytes at this rate, rounded up to whole nanoseconds.
    pub fn tx_time(&self, len: usize) -> Nanos {
        let ns = (len as u128 * 1_000_000_000).div_ceil(self.rate as u128);
        ns.min(u64::MAX as u128) as u64
    }
}

/// Faults applied to the frames a port receives from the hub. All zero by default.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a frame is dropped.
    pub loss: f64,
    /// Probability that a frame is delivered twice (the copy right behind it).
    pub duplicate: f64,
    /// Probability that a frame is held back until `reorder_by` later frames have passed.
    pub reorder: f64,
    /// How many frames a reordered frame is held back by.
    pub reorder_by: u32,
    /// Added to every frame's delivery (propagation delay).
    pub delay: Duration,
    /// Up to this much more, uniformly drawn per frame. Order is kept (a frame never
    /// overtakes the one before it): reordering is its own fault.
    pub jitter: Duration,
}

impl Faults {
    /// Refuses probabilities outside 0..=1 and reordering by 0 frames.
    pub fn validate(&self) -> Result<(), HubError> {
        for (what, value) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(HubError::BadProbability { what, value });
            }
        }
        if self.reorder > 0.0 && self.reorder_by == 0 {
            return Err(HubError::ReorderByZero);
        }
        Ok(())
    }

    /// Whether any fault is enabled.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

impl fmt::Display for Faults {
    /// Only the faults that are on: `loss 0.05, reorder 0.1 by 3, delay 5ms`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.loss > 0.0 {
            parts.push(format!("loss {}", self.loss));
        }
        if self.duplicate > 0.0 {
            parts.push(format!("duplicate {}", self.duplicate));
        }
        if self.reorder > 0.0 {
            parts.push(format!("reorder {} by {}", self.reorder, self.reorder_by));
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay {:?}", self.delay));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter {:?}", self.jitter));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Everything to and from this port (its cable is pulled).
    Port(usize),
    /// Only frames between these two ports (both directions).
    Link(usize, usize),
}

impl Cut {
    fn involves(&self, p: usize) -> bool {
        match *self {
            Cut::Port(a) => a == p,
            Cut::Link(a, b) => a == p || b == p,
        }
    }

    fn blocks(&self, src: usize, dst: usize) -> bool {
        match *self {
            Cut::Port(a) => a == src || a == dst,
            Cut::Link(a, b) => (a == src && b == dst) || (a == dst && b == src),
        }
    }
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cut::Port(p) => write!(f, "port {p}"),
            Cut::Link(a, b) => write!(f, "link {a}-{b}"),
        }
    }
}

/// When a partition takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// At once.
    Now,
    /// This long after the partition was added (hub start for configured ones).
    After(Duration),
    /// Once the hub has received `bytes` bytes of frames from port `from` since the
    /// partition was added. Frames still inside the hub then (the one that reached the
    /// count included) are caught by the cut, as frames on a cable being cut are.
    AfterBytes {
        /// The port whose incoming bytes are counted.
        from: usize,
        /// How many.
        bytes: u64,
    },
}

/// A scripted partition: cut `cut` when `trigger` fires, heal after `heal_after` (or
/// only on command when `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// What is cut.
    pub cut: Cut,
    /// When.
    pub trigger: Trigger,
    /// How long the cut lasts; `None` = until healed by command.
    pub heal_after: Option<Duration>,
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cut {}", self.cut)?;
        match self.trigger {
            Trigger::Now => f.write_str(" now")?,
            Trigger::After(d) => write!(f, " after {d:?}")?,
            Trigger::AfterBytes { from, bytes } => {
                write!(f, " once port {from} sent {bytes} bytes")?
            }
        }
        match self.heal_after {
            Some(d) => write!(f, ", heal after {d:?}"),
            None => f.write_str(", heal on command"),
        }
    }
}

/// Parses a duration with a unit: `250ms`, `2.5s`, `100us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("duration '{s}' needs a unit (us, ms, s)"));
    };
    match num.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("bad duration '{s}'")),
    }
}

impl std::str::FromStr for Partition {
    type Err = String;

    /// `CUT[@TRIGGER][+HEAL]`: CUT is a port (`1`) or a link (`0-1`); TRIGGER a time
    /// (`2.5s`, `300ms`) or bytes from a port (`b0:1000000`), at once when absent; HEAL a
    /// duration, never (until commanded) when absent. `1@b0:1000000+2s` cuts port 1 once
    /// port 0 has sent 1,000,000 bytes and heals it 2 s later.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "partition '{s}': {why} (CUT[@TRIGGER][+HEAL], e.g. 1@2s+500ms, 0-1@b0:1000000)"
            )
        };
        let (rest, heal_after) = match s.split_once('+') {
            Some((r, h)) => (r, Some(parse_duration(h).map_err(|e| bad(&e))?)),
            None => (s, None),
        };
        let (cut, trigger) = match rest.split_once('@') {
            Some((c, t)) => (c, Some(t)),
            None => (rest, None),
        };
        let port = |p: &str| {
            p.parse::<usize>()
                .map_err(|_| bad(&format!("bad port '{p}'")))
        };
        let cut = match cut.split_once('-') {
            Some((a, b)) => Cut::Link(port(a)?, port(b)?),
            None => Cut::Port(port(cut)?),
        };
        let trigger = match trigger {
            None => Trigger::Now,
            Some(t) => match t.strip_prefix('b') {
                Some(b) => {
                    let (from, bytes) = b
                        .split_once(':')
                        .ok_or_else(|| bad("bytes trigger is bPORT:BYTES"))?;
                    Trigger::AfterBytes {
                        from: port(from)?,
                        bytes: bytes
                            .parse()
                            .map_err(|_| bad(&format!("bad byte count '{bytes}'")))?,
                    }
                }
                None => Trigger::After(parse_duration(t).map_err(|e| bad(&e))?),
            },
        };
        Ok(Self {
            cut,
            trigger,
            heal_after,
        })
    }
}

/// Per-port counters. "In" is what the member sent to the hub, "out" what the hub
/// delivered to the member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received from the member.
    pub frames_in: u64,
    /// Bytes received from the member.
    pub bytes_in: u64,
    /// Frames delivered to the member.
    pub frames_out: u64,
    /// Bytes delivered to the member.
    pub bytes_out: u64,
    /// Frames for this port dropped because its egress queue (or in-flight line) was full.
    pub dropped_queue: u64,
    /// Frames for this port dropped by the loss fault.
    pub dropped_fault: u64,
    /// Frames dropped because of a partition: counted on the sending port when that port
    /// is cut, on the receiving port otherwise.
    pub dropped_partition: u64,
    /// Extra copies made by the duplication fault.
    pub duplicated: u64,
    /// Frames held back by the reordering fault.
    pub reordered: u64,
    /// Frames from the member too short to be Ethernet.
    pub bad_in: u64,
    /// Sends to the member that the OS refused.
    pub send_errors: u64,
    /// Times a partition involving this port took effect.
    pub cuts: u64,
    /// Most frames ever waiting in the egress queue at once.
    pub queue_peak: u64,
    /// Times the port paused with frames waiting because its member's buffer was full
    /// (back-pressure).
    pub paused: u64,
}

/// A frame waiting in an egress queue.
#[derive(Clone, Debug)]
struct Queued {
    src: usize,
    frame: Arc<[u8]>,
    /// Delay plus this frame's jitter, decided when it was offered.
    extra: Nanos,
}

/// A frame held back for reordering.
#[derive(Debug)]
struct Held {
    q: Queued,
    /// Frames still to pass before it.
    left: u32,
    deadline: Nanos,
}

/// A frame serialized and on its way (waiting out delay and jitter).
#[derive(Debug)]
struct Flight {
    at: Nanos,
    src: usize,
    frame: Arc<[u8]>,
}

/// SplitMix64: tiny, fast, and good enough for fault decisions; reproducible by design.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One port's egress and counters.
#[derive(Debug)]
struct Port {
    link: LinkConfig,
    faults: Faults,
    rng: Rng,
    queue: VecDeque<Queued>,
    held: Vec<Held>,
    flight: VecDeque<Flight>,
    /// When the serializer is free for the next frame.
    next_free: Nanos,
    /// Frames the member can still take (back-pressure from the I/O layer); `None` when
    /// the member's buffer is not watched. At 0 the port is paused: frames wait queued.
    credit: Option<u32>,
    /// The member takes only frames for this MAC (and broadcasts): Bochs' socket
    /// network module drops the rest before its NIC sees them. Unicast frames for other
    /// MACs behind it (guests behind a hypervisor) go wrapped ([`TUNNEL_ETHERTYPE`]).
    tunnel: Option<[u8; 6]>,
    c: PortCounters,
}

/// EtherType of a frame the hub wraps for a member that filters MACs (IEEE's local
/// experimental EtherType 1): an outer header to the member's own MAC, then the
/// original frame whole. The hypervisor's switch unwraps it (one constant for both).
pub use hypervisor::net::switch::TUNNEL_ETHERTYPE;

/// `frame` wrapped for a member whose NIC has MAC `to`.
pub fn tunnel_wrap(to: [u8; 6], frame: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(frame.len() + ETH_HEADER);
    w.extend_from_slice(&to);
    w.extend_from_slice(&frame[6..12]);
    w.extend_from_slice(&TUNNEL_ETHERTYPE.to_be_bytes());
    w.extend_from_slice(frame);
    w
}

#[derive(Clone, Copy, Debug)]
enum CutState {
    /// Waiting for its trigger, armed at `since` with the trigger port's byte count then.
    Armed { since: Nanos, bytes_base: u64 },
    /// In effect, until `heal_at` (or a command).
    Active { heal_at: Option<Nanos> },
}

#[derive(Clone, Copy, Debug)]
struct CutEntry {
    spec: Partition,
    state: CutState,
}

#[derive(Clone, Copy, Debug)]
struct MacEntry {
    mac: [u8; 6],
    port: usize,
    seen: Nanos,
}

/// The switch: MAC table, ports, partitions.
#[derive(Debug)]
pub struct Core {
    /// Frames a member's socket may hold before its port pauses (`None`: no
    /// back-pressure); the I/O layer turns it into credits.
    backpressure: Option<u32>,
    ports: Vec<Port>,
    macs: Vec<MacEntry>,
    cuts: Vec<CutEntry>,
    seed: u64,
}

/// Whether a MAC is a group (broadcast or multicast) address: the I/G bit.
fn is_group(mac: &[u8]) -> bool {
    mac[0] & 1 == 1
}

impl Core {
    /// A switch with `ports` ports, all with `link` and `faults`, fault decisions from
    /// `seed`.
    pub fn new(
        ports: usize,
        link: LinkConfig,
        faults: Faults,
        seed: u64,
    ) -> Result<Self, HubError> {
        if ports == 0 {
            return Err(HubError::NoMembers);
        }
        link.validate()?;
        faults.validate()?;
        let mut seeds = Rng::new(seed);
        let ports = (0..ports)
            .map(|_| Port {
                link,
                faults,
                rng: Rng::new(seeds.next_u64()),
                queue: VecDeque::new(),
                held: Vec::new(),
                flight: VecDeque::new(),
                next_free: 0,
                credit: None,
                tunnel: None,
                c: PortCounters::default(),
            })
            .collect();
        Ok(Self {
            backpressure: None,
            ports,
            macs: Vec::with_capacity(MAC_TABLE_MAX),
            cuts: Vec::new(),
            seed,
        })
    }

    /// Port `port`'s member takes only frames for `nic` (see [`TUNNEL_ETHERTYPE`]).
    pub fn set_tunnel(&mut self, port: usize, nic: [u8; 6]) -> Result<(), HubError> {
        let ports = self.ports.len();
        let p = self
            .ports
            .get_mut(port)
            .ok_or(HubError::NoSuchPort { port, ports })?;
        p.tunnel = Some(nic);
        Ok(())
    }

    /// The seed fault decisions come from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of ports.
    pub fn ports(&self) -> usize {
        self.ports.len()
    }

    fn check_port(&self, port: usize) -> Result<(), HubError> {
        if port < self.ports.len() {
            Ok(())
        } else {
            Err(HubError::NoSuchPort {
                port,
                ports: self.ports.len(),
            })
        }
    }

    /// Replaces the faults of `port` (all ports when `None`), from the next frame on.
    pub fn set_faults(&mut self, port: Option<usize>, faults: Faults) -> Result<(), HubError> {
        faults.validate()?;
        match port {
            Some(p) => {
                self.check_port(p)?;
                self.ports[p].faults = faults;
            }
            None => self.ports.iter_mut().for_each(|p| p.faults = faults),
        }
        Ok(())
    }

    /// The faults of `port`.
    pub fn faults(&self, port: usize) -> Result<Faults, HubError> {
        self.check_port(port)?;
        Ok(self.ports[port].faults)
    }

    /// Replaces the link of `port` (all ports when `None`). A shorter queue keeps the
    /// frames it already holds and drops new ones until it is below the new length.
    pub fn set_link(&mut self, port: Option<usize>, link: LinkConfig) -> Result<(), HubError> {
        link.validate()?;
        match port {
            Some(p) => {
                self.check_port(p)?;
                self.ports[p].link = link;
            }
            None => self.ports.iter_mut().for_each(|p| p.link = link),
        }
        Ok(())
    }

    /// The link of `port`.
    pub fn link(&self, port: usize) -> Result<LinkConfig, HubError> {
        self.check_port(port)?;
        Ok(self.ports[port].link)
    }

    /// Counters of every port.
    pub fn counters(&self) -> Vec<PortCounters> {
        self.ports.iter().map(|p| p.c).collect()
    }

    /// Frames waiting in `port`'s egress queue now.
    pub fn queued(&self, port: usize) -> usize {
        self.ports.get(port).map_or(0, |p| p.queue.len())
    }

    /// Sets the back-pressure limit (frames a member's socket may hold). `None` turns
    /// it off and lets every port run free.
    pub fn set_backpressure(&mut self, limit: Option<u32>) {
        self.backpressure = limit;
        if limit.is_none() {
            self.ports.iter_mut().for_each(|p| p.credit = None);
        }
    }

    /// The back-pressure limit.
    pub fn backpressure(&self) -> Option<u32> {
        self.backpressure
    }

    /// Sets how many more frames `port`'s member can take before the port pauses
    /// (`None`: no back-pressure); each frame serialized uses one.
    pub fn set_credit(&mut self, port: usize, credit: Option<u32>) {
        if let Some(p) = self.ports.get_mut(port) {
            p.credit = credit;
        }
    }

    /// The member on `port` holds `frames` unread frames (as the I/O layer read them
    /// from its socket): it may take the back-pressure limit less those and less the
    /// frames still on their way to it (serialized, waiting out a delay).
    pub fn member_holds(&mut self, port: usize, frames: u64) {
        let Some(limit) = self.backpressure else {
            return;
        };
        if let Some(p) = self.ports.get_mut(port) {
            let busy = frames.saturating_add(p.flight.len() as u64);
            p.credit = Some(u64::from(limit).saturating_sub(busy) as u32);
        }
    }

    /// Whether some port has frames queued but no credit: the caller must refresh the
    /// credits to make progress.
    pub fn paused(&self) -> bool {
        self.ports
            .iter()
            .any(|p| p.credit == Some(0) && !p.queue.is_empty())
    }

    /// Counts a send the OS refused.
    pub fn note_send_error(&mut self, port: usize) {
        if let Some(p) = self.ports.get_mut(port) {
            p.c.send_errors += 1;
        }
    }

    /// Adds a partition; a [`Trigger::Now`] one takes effect at once.
    pub fn add_partition(&mut self, now: Nanos, spec: Partition) -> Result<(), HubError> {
        match spec.cut {
            Cut::Port(p) => self.check_port(p)?,
            Cut::Link(a, b) => {
                self.check_port(a)?;
                self.check_port(b)?;
                if a == b {
                    return Err(HubError::SelfLink(a));
                }
            }
        }
        if let Trigger::AfterBytes { from, .. } = spec.trigger {
            self.check_port(from)?;
        }
        if self.cuts.len() >= CUTS_MAX {
            return Err(HubError::TooManyPartitions);
        }
        let bytes_base = match spec.trigger {
            Trigger::AfterBytes { from, .. } => self.ports[from].c.bytes_in,
            _ => 0,
        };
        self.cuts.push(CutEntry {
            spec,
            state: CutState::Armed {
                since: now,
                bytes_base,
            },
        });
        self.advance(now);
        Ok(())
    }

    /// Heals every active cut that involves `port` (port cuts and link cuts). Pending
    /// scripted partitions stay armed.
    pub fn heal_port(&mut self, port: usize) -> Result<(), HubError> {
        self.check_port(port)?;
        self.cuts
            .retain(|c| !(matches!(c.state, CutState::Active { .. }) && c.spec.cut.involves(port)));
        Ok(())
    }

    /// Heals every active cut of exactly the link `a`–`b` (either order).
    pub fn heal_link(&mut self, a: usize, b: usize) -> Result<(), HubError> {
        self.check_port(a)?;
        self.check_port(b)?;
        self.cuts.retain(|c| {
            !(matches!(c.state, CutState::Active { .. })
                && matches!(c.spec.cut, Cut::Link(x, y) if (x, y) == (a, b) || (x, y) == (b, a)))
        });
        Ok(())
    }

    /// Heals every cut and forgets every pending partition.
    pub fn clear_partitions(&mut self) {
        self.cuts.clear();
    }

    /// Whether `port` is cut off entirely now.
    pub fn port_cut(&self, port: usize) -> bool {
        self.cuts
            .iter()
            .any(|c| matches!(c.state, CutState::Active { .. }) && c.spec.cut == Cut::Port(port))
    }

    /// Whether frames from `src` to `dst` are blocked now (either port cut, or their link).
    pub fn blocked(&self, src: usize, dst: usize) -> bool {
        self.cuts
            .iter()
            .any(|c| matches!(c.state, CutState::Active { .. }) && c.spec.cut.blocks(src, dst))
    }

    /// Partitions pending or active.
    pub fn partitions(&self) -> usize {
        self.cuts.len()
    }

    fn activate(ports: &mut [Port], e: &mut CutEntry, now: Nanos) {
        e.state = CutState::Active {
            heal_at: e
                .spec
                .heal_after
                .map(|d| now.saturating_add(d.as_nanos() as u64)),
        };
        for (i, p) in ports.iter_mut().enumerate() {
            if e.spec.cut.involves(i) {
                p.c.cuts += 1;
            }
        }
    }

    /// Fires time and byte triggers that are due and heals timed cuts that are over.
    fn advance(&mut self, now: Nanos) {
        let ports = &mut self.ports;
        for e in self.cuts.iter_mut() {
            if let CutState::Armed { since, bytes_base } = e.state {
                let due = match e.spec.trigger {
                    Trigger::Now => true,
                    Trigger::After(d) => now >= since.saturating_add(d.as_nanos() as u64),
                    Trigger::AfterBytes { from, bytes } => {
                        ports[from].c.bytes_in - bytes_base >= bytes
                    }
                };
                if due {
                    Self::activate(ports, e, now);
                }
            }
        }
        self.cuts
            .retain(|e| !matches!(e.state, CutState::Active { heal_at: Some(t) } if now >= t));
    }

    fn learn(&mut self, mac: [u8; 6], port: usize, now: Nanos) {
        if is_group(&mac) || mac == [0; 6] {
            return;
        }
        if let Some(e) = self.macs.iter_mut().find(|e| e.mac == mac) {
            // A MAC seen on a new port has moved (a migrated guest announcing itself).
            e.port = port;
            e.seen = now;
            return;
        }
        let entry = MacEntry {
            mac,
            port,
            seen: now,
        };
        if self.macs.len() < MAC_TABLE_MAX {
            self.macs.push(entry);
        } else if let Some(oldest) = self.macs.iter_mut().min_by_key(|e| e.seen) {
            *oldest = entry;
        }
    }

    /// The port `mac` was last seen on, unless that is older than [`MAC_AGE`].
    pub fn lookup(&self, mac: &[u8; 6], now: Nanos) -> Option<usize> {
        self.macs
            .iter()
            .find(|e| &e.mac == mac && now.saturating_sub(e.seen) < MAC_AGE)
            .map(|e| e.port)
    }

    /// A frame arrived from the member on `port`.
    pub fn ingress(&mut self, now: Nanos, port: usize, frame: &[u8]) {
        if port >= self.ports.len() {
            return;
        }
        self.advance(now);
        let c = &mut self.ports[port].c;
        c.frames_in += 1;
        c.bytes_in += frame.len() as u64;
        if frame.len() < ETH_HEADER {
            c.bad_in += 1;
        } else if self.port_cut(port) {
            self.ports[port].c.dropped_partition += 1;
        } else {
            self.forward(now, port, frame);
        }
        // Byte triggers count this frame: the cut applies from the next one.
        self.advance(now);
    }

    fn forward(&mut self, now: Nanos, src: usize, frame: &[u8]) {
        let mut dst = [0u8; 6];
        let mut smac = [0u8; 6];
        dst.copy_from_slice(&frame[0..6]);
        smac.copy_from_slice(&frame[6..12]);
        self.learn(smac, src, now);
        let frame: Arc<[u8]> = Arc::from(frame);
        let target = if is_group(&dst) {
            None
        } else {
            self.lookup(&dst, now)
        };
        match target {
            // Known unicast: to its port only, or nowhere if it is where it came from.
            Some(q) if q == src => {}
            Some(q) => self.offer(now, src, q, &frame),
            // Broadcast, multicast, unknown unicast: flood.
            None => {
                for q in 0..self.ports.len() {
                    if q != src {
                        self.offer(now, src, q, &frame);
                    }
                }
            }
        }
    }

    /// Applies port `q`'s faults to a frame from `src` and queues what survives.
    fn offer(&mut self, now: Nanos, src: usize, q: usize, frame: &Arc<[u8]>) {
        if self.blocked(src, q) {
            self.ports[q].c.dropped_partition += 1;
            return;
        }
        let wrapped;
        let frame = match self.ports[q].tunnel {
            Some(nic) if !is_group(&frame[..6]) && frame[..6] != nic => {
                wrapped = Arc::from(tunnel_wrap(nic, frame));
                &wrapped
            }
            _ => frame,
        };
        let p = &mut self.ports[q];
        // Always four draws per frame, so decisions stay aligned whatever is enabled.
        let r_loss = p.rng.next_f64();
        let r_dup = p.rng.next_f64();
        let r_reorder = p.rng.next_f64();
        let r_jitter = p.rng.next_f64();
        let f = p.faults;
        if r_loss < f.loss {
            p.c.dropped_fault += 1;
            return;
        }
        let extra = f.delay.as_nanos() as u64 + (f.jitter.as_nanos() as f64 * r_jitter) as u64;
        let item = Queued {
            src,
            frame: frame.clone(),
            extra,
        };
        let dup = r_dup < f.duplicate;
        if r_reorder < f.reorder && f.reorder_by > 0 && p.held.len() < HELD_MAX {
            p.c.reordered += 1;
            p.held.push(Held {
                q: item.clone(),
                left: f.reorder_by,
                deadline: now.saturating_add(REORDER_HOLD_MAX),
            });
        } else {
            Self::enqueue(p, item.clone());
        }
        if dup {
            p.c.duplicated += 1;
            Self::enqueue(p, item);
        }
    }

    /// Puts a frame at the tail of `p`'s queue (or drops it if full), then releases the
    /// held frames that it was the last one to wait for.
    fn enqueue(p: &mut Port, item: Queued) {
        Self::push(p, item);
        let mut i = 0;
        while i < p.held.len() {
            p.held[i].left -= 1;
            if p.held[i].left == 0 {
                let h = p.held.remove(i);
                Self::push(p, h.q);
            } else {
                i += 1;
            }
        }
    }

    fn push(p: &mut Port, item: Queued) {
        if p.queue.len() >= p.link.queue {
            p.c.dropped_queue += 1;
        } else {
            p.queue.push_back(item);
            p.c.queue_peak = p.c.queue_peak.max(p.queue.len() as u64);
        }
    }

    /// Moves time to `now`: serializes what each port's line rate allows, and hands
    /// every frame whose delivery time has come to `out` as `(port, frame)`.
    pub fn poll(&mut self, now: Nanos, out: &mut Vec<(usize, Arc<[u8]>)>) {
        self.advance(now);
        for qi in 0..self.ports.len() {
            let p = &mut self.ports[qi];
            // Held frames whose traffic stopped go out anyway.
            let mut i = 0;
            while i < p.held.len() {
                if p.held[i].deadline <= now {
                    let h = p.held.remove(i);
                    Self::push(p, h.q);
                } else {
                    i += 1;
                }
            }
            while p.next_free <= now && p.credit != Some(0) {
                let Some(item) = p.queue.pop_front() else {
                    break;
                };
                if let Some(c) = p.credit.as_mut() {
                    *c -= 1;
                }
                if p.credit == Some(0) && !p.queue.is_empty() {
                    p.c.paused += 1;
                }
                let start = p.next_free.max(now.saturating_sub(CATCH_UP));
                let done = start + p.link.tx_time(item.frame.len());
                p.next_free = done;
                let at = p
                    .flight
                    .back()
                    .map_or(0, |f| f.at)
                    .max(done.saturating_add(item.extra));
                if p.flight.len() >= FLIGHT_MAX {
                    p.c.dropped_queue += 1;
                } else {
                    p.flight.push_back(Flight {
                        at,
                        src: item.src,
                        frame: item.frame,
                    });
                }
            }
            while self.ports[qi].flight.front().is_some_and(|f| f.at <= now) {
                let Some(f) = self.ports[qi].flight.pop_front() else {
                    break;
                };
                let blocked = self.blocked(f.src, qi);
                let c = &mut self.ports[qi].c;
                if blocked {
                    c.dropped_partition += 1;
                } else {
                    c.frames_out += 1;
                    c.bytes_out += f.frame.len() as u64;
                    out.push((qi, f.frame));
                }
            }
        }
    }

    /// When [`Core::poll`] next has something to do (a frame to serialize or deliver, a
    /// held frame to release, a partition to start or heal); `None` when idle.
    pub fn next_wake(&self) -> Option<Nanos> {
        let ports = self.ports.iter().flat_map(|p| {
            // A paused port has no deadline of its own: its credit comes from outside.
            let serialize = (!p.queue.is_empty() && p.credit != Some(0)).then_some(p.next_free);
            let deliver = p.flight.front().map(|f| f.at);
            let held = p.held.iter().map(|h| h.deadline).min();
            [serialize, deliver, held]
        });
        let cuts = self.cuts.iter().map(|e| match (e.state, e.spec.trigger) {
            (CutState::Armed { since, .. }, Trigger::After(d)) => {
                Some(since.saturating_add(d.as_nanos() as u64))
            }
            (CutState::Active { heal_at }, _) => heal_at,
            _ => None,
        });
        ports.chain(cuts).flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn mac(i: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0, 0, i]
    }

    /// An Ethernet frame of `len` bytes from MAC `src` to `dst`; byte 14 carries `tag`.
    fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; len.max(15)];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12] = 0x08;
        f[14] = tag;
        f
    }

    const BCAST: [u8; 6] = [0xff; 6];

    fn core(ports: usize) -> Core {
        Core::new(ports, LinkConfig::default(), Faults::default(), 1).unwrap()
    }

    /// Polls at `now` and returns (port, tag) of what came out.
    fn drain(c: &mut Core, now: Nanos) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        c.poll(now, &mut out);
        out.iter().map(|(p, f)| (*p, f[14])).collect()
    }

    /// Runs the fake clock from `from` to `to` in `step`s, collecting (time, port, tag).
    fn run(c: &mut Core, from: Nanos, to: Nanos, step: Nanos) -> Vec<(Nanos, usize, u8)> {
        let mut got = Vec::new();
        let mut t = from;
        while t <= to {
            got.extend(drain(c, t).into_iter().map(|(p, g)| (t, p, g)));
            t += step;
        }
        got
    }

    #[test]
    fn floods_broadcast_and_unknown_then_learns() {
        let mut c = core(3);
        // Broadcast from port 0 reaches 1 and 2, not 0.
        c.ingress(0, 0, &frame(BCAST, mac(1), 60, 1));
        assert_eq!(drain(&mut c, MS), vec![(1, 1), (2, 1)]);
        // Unknown unicast floods as well.
        c.ingress(MS, 1, &frame(mac(9), mac(2), 60, 2));
        assert_eq!(drain(&mut c, 2 * MS), vec![(0, 2), (2, 2)]);
        // Both sources are learned: unicast goes to exactly one port.
        c.ingress(2 * MS, 1, &frame(mac(1), mac(2), 60, 3));
        c.ingress(2 * MS, 0, &frame(mac(2), mac(1), 60, 4));
        assert_eq!(drain(&mut c, 3 * MS), vec![(0, 3), (1, 4)]);
        assert_eq!(c.lookup(&mac(1), 3 * MS), Some(0));
        assert_eq!(c.lookup(&mac(2), 3 * MS), Some(1));
        // Multicast (I/G bit) floods even if its address was somehow seen.
        let mcast = [0x01, 0, 0x5e, 0, 0, 1];
        c.ingress(3 * MS, 2, &frame(mcast, mac(3), 60, 5));
        assert_eq!(drain(&mut c, 4 * MS), vec![(0, 5), (1, 5)]);
        let k = c.counters();
        assert_eq!((k[0].frames_in, k[0].frames_out), (2, 3));
        assert_eq!(k[1].bytes_in, 120);
    }

    #[test]
    fn frames_for_macs_behind_a_filtering_member_are_wrapped() {
        let mut c = core(2);
        c.set_tunnel(0, mac(1)).unwrap();
        // For the member's own MAC, and broadcasts: as they are.
        c.ingress(0, 1, &frame(mac(1), mac(2), 60, 1));
        c.ingress(0, 1, &frame(BCAST, mac(2), 60, 2));
        // For a guest behind it: wrapped to the member's MAC.
        let inner = frame(mac(7), mac(2), 60, 3);
        c.ingress(0, 1, &inner);
        let mut out = Vec::new();
        c.poll(MS, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].1[..], frame(mac(1), mac(2), 60, 1)[..]);
        assert_eq!(out[1].1[..6], BCAST);
        let w = &out[2].1;
        assert_eq!(w[..6], mac(1));
        assert_eq!(w[12..14], TUNNEL_ETHERTYPE.to_be_bytes());
        assert_eq!(w[14..], inner[..]);
    }

    #[test]
    fn a_moved_mac_follows_its_new_port_and_old_entries_age_out() {
        let mut c = core(3);
        c.ingress(0, 0, &frame(BCAST, mac(7), 60, 0));
        assert_eq!(c.lookup(&mac(7), 0), Some(0));
        // The guest with mac(7) migrated behind port 2 and announced itself.
        c.ingress(MS, 2, &frame(BCAST, mac(7), 60, 0));
        assert_eq!(c.lookup(&mac(7), MS), Some(2));
        assert_eq!(c.lookup(&mac(7), MS + MAC_AGE), None);
        // A frame to a MAC on its own port is filtered, not echoed back.
        drain(&mut c, 2 * MS);
        c.ingress(2 * MS, 2, &frame(mac(7), mac(8), 60, 9));
        assert_eq!(drain(&mut c, 3 * MS), vec![]);
    }

    #[test]
    fn mac_table_is_bounded_and_evicts_the_least_recent() {
        let mut c = core(2);
        for i in 0..=MAC_TABLE_MAX as u64 {
            let m = [0x02, 0, 0, 0, (i >> 8) as u8, i as u8];
            c.ingress(i, 0, &frame(BCAST, m, 60, 0));
        }
        assert_eq!(c.macs.len(), MAC_TABLE_MAX);
        assert_eq!(c.lookup(&[0x02, 0, 0, 0, 0, 0], 1000), None);
        assert_eq!(c.lookup(&[0x02, 0, 0, 0, 1, 0], 1000), Some(0));
    }

    #[test]
    fn runts_are_counted_and_dropped() {
        let mut c = core(2);
        c.ingress(0, 0, &[0u8; 13]);
        assert_eq!(drain(&mut c, MS), vec![]);
        assert_eq!(c.counters()[0].bad_in, 1);
    }

    #[test]
    fn pacing_spreads_a_burst_at_the_line_rate() {
        // 1 MB/s: a 1000-byte frame takes exactly 1 ms on the wire.
        let link = LinkConfig {
            rate: 1_000_000,
            queue: 100,
        };
        assert_eq!(link.tx_time(1000), MS);
        assert_eq!(link.tx_time(1), 1000);
        let mut c = Core::new(2, link, Faults::default(), 1).unwrap();
        for i in 0..5 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 1000, i));
        }
        assert_eq!(c.next_wake(), Some(0));
        let got = run(&mut c, 0, 10 * MS, 100_000);
        // Each frame is delivered when its last byte is on the wire: 1, 2, 3, 4, 5 ms.
        let times: Vec<Nanos> = got.iter().map(|g| g.0).collect();
        assert_eq!(times, vec![MS, 2 * MS, 3 * MS, 4 * MS, 5 * MS]);
        let tags: Vec<u8> = got.iter().map(|g| g.2).collect();
        assert_eq!(tags, vec![0, 1, 2, 3, 4]);
        assert_eq!(c.counters()[1].queue_peak, 5);
        assert_eq!(c.next_wake(), None);
    }

    #[test]
    fn pacing_catches_up_a_late_wakeup_only_within_its_slack() {
        let link = LinkConfig {
            rate: 10_000_000, // 100 us per 1000-byte frame
            queue: 100,
        };
        let mut c = Core::new(2, link, Faults::default(), 1).unwrap();
        for i in 0..20 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 1000, i));
        }
        // The I/O thread oversleeps by 10 ms: it may catch up CATCH_UP (200 us = 2
        // frames) and send the frame that starts now, not the whole backlog.
        assert_eq!(drain(&mut c, 10 * MS).len(), 2);
        // From then on the rate holds.
        assert_eq!(run(&mut c, 10 * MS + 1, 11 * MS + 1, 1000).len(), 10);
    }

    #[test]
    fn a_full_queue_drops_at_the_tail_and_counts() {
        let link = LinkConfig {
            rate: 1_000_000,
            queue: 3,
        };
        let mut c = Core::new(2, link, Faults::default(), 1).unwrap();
        for i in 0..6 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 1000, i));
        }
        let got: Vec<u8> = run(&mut c, 0, 10 * MS, MS).iter().map(|g| g.2).collect();
        assert_eq!(got, vec![0, 1, 2]);
        let k = c.counters()[1];
        assert_eq!((k.dropped_queue, k.queue_peak, k.frames_out), (3, 3, 3));
    }

    #[test]
    fn the_link_can_change_at_run_time() {
        let mut c = Core::new(2, LinkConfig::default(), Faults::default(), 1).unwrap();
        let slow = LinkConfig {
            rate: 1_000_000,
            queue: 2,
        };
        c.set_link(Some(1), slow).unwrap();
        assert_eq!(c.link(1).unwrap(), slow);
        for i in 0..3 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 1000, i));
        }
        assert_eq!(c.counters()[1].dropped_queue, 1);
        assert_eq!(
            c.set_link(Some(5), slow),
            Err(HubError::NoSuchPort { port: 5, ports: 2 })
        );
        assert_eq!(
            c.set_link(None, LinkConfig { rate: 0, queue: 1 }),
            Err(HubError::ZeroRate)
        );
    }

    /// Sends `n` broadcast frames from port 0 at 1 ms intervals (a fast link) and returns
    /// the tags port 1 received, in order.
    fn through(c: &mut Core, n: u8) -> Vec<u8> {
        let mut got = Vec::new();
        for i in 0..n {
            let t = i as Nanos * MS;
            c.ingress(t, 0, &frame(BCAST, mac(1), 100, i));
            got.extend(drain(c, t).into_iter().filter(|g| g.0 == 1).map(|g| g.1));
        }
        got.extend(
            run(c, n as Nanos * MS, n as Nanos * MS + 100 * MS, MS)
                .into_iter()
                .filter(|g| g.1 == 1)
                .map(|g| g.2),
        );
        got
    }

    fn with_faults(seed: u64, faults: Faults) -> Core {
        let mut c = Core::new(2, LinkConfig::default(), Faults::default(), seed).unwrap();
        c.set_faults(Some(1), faults).unwrap();
        c
    }

    #[test]
    fn loss_is_deterministic_for_a_seed_and_near_its_probability() {
        let f = Faults {
            loss: 0.2,
            ..Faults::default()
        };
        let a = through(&mut with_faults(42, f), 200);
        let b = through(&mut with_faults(42, f), 200);
        let other = through(&mut with_faults(43, f), 200);
        assert_eq!(a, b, "same seed, same fate");
        assert_ne!(a, other, "another seed, other frames");
        assert!((140..=180).contains(&a.len()), "{} of 200 passed", a.len());
        let mut c = with_faults(42, f);
        through(&mut c, 200);
        let k = c.counters()[1];
        assert_eq!(k.dropped_fault + k.frames_out, 200);
        // Port 0 has no faults.
        assert_eq!(c.counters()[0].dropped_fault, 0);
    }

    #[test]
    fn duplicates_arrive_right_behind_the_original() {
        let f = Faults {
            duplicate: 0.3,
            ..Faults::default()
        };
        let mut c = with_faults(7, f);
        let got = through(&mut c, 100);
        let dups = c.counters()[1].duplicated;
        assert!((15..=45).contains(&dups), "{dups} duplicates");
        assert_eq!(got.len() as u64, 100 + dups);
        // Order kept, each tag once or twice in a row.
        let mut dedup = got.clone();
        dedup.dedup();
        assert_eq!(dedup, (0..100).collect::<Vec<u8>>());
    }

    #[test]
    fn reordering_holds_a_frame_back_by_k_frames() {
        let f = Faults {
            reorder: 1.0,
            reorder_by: 2,
            ..Faults::default()
        };
        // Every frame is held; held frames do not count as passing, so all of them wait
        // for the hold timeout and come out in their own order.
        let mut c = with_faults(1, f);
        let got = through(&mut c, 6);
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..6).collect::<Vec<u8>>(), "nothing lost");
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(c.counters()[1].reordered, 6);

        // Some frames held: a held frame comes out exactly k frames late.
        let f = Faults {
            reorder: 0.25,
            reorder_by: 3,
            ..Faults::default()
        };
        let mut c = with_faults(5, f);
        let got = through(&mut c, 60);
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..60).collect::<Vec<u8>>());
        assert_ne!(got, sorted, "some frames out of order");
        assert!(c.counters()[1].reordered > 5);
        for (pos, tag) in got.iter().enumerate() {
            // No frame is ever more than a few positions away from its place.
            assert!((pos as i32 - *tag as i32).abs() <= 3 * 3, "{got:?}");
        }
        assert_eq!(got, through(&mut with_faults(5, f), 60), "reproducible");
    }

    #[test]
    fn one_held_frame_lands_exactly_k_behind() {
        // Find a seed whose first decision holds frame 0 and then no other for a while.
        let f = Faults {
            reorder: 0.1,
            reorder_by: 3,
            ..Faults::default()
        };
        let seed = (0..1000u64)
            .find(|&s| {
                let mut c = with_faults(s, f);
                let got = through(&mut c, 8);
                c.counters()[1].reordered == 1 && got[0] != 0
            })
            .expect("some seed holds only frame 0");
        let got = through(&mut with_faults(seed, f), 8);
        assert_eq!(got, vec![1, 2, 3, 0, 4, 5, 6, 7]);
    }

    #[test]
    fn delay_and_jitter_postpone_delivery_but_keep_order() {
        let f = Faults {
            delay: Duration::from_millis(5),
            ..Faults::default()
        };
        let mut c = with_faults(1, f);
        c.ingress(0, 0, &frame(BCAST, mac(1), 100, 0));
        let got = run(&mut c, 0, 20 * MS, 100_000);
        // Port 0 gets nothing (it sent it); port 1 after 5 ms plus 100 bytes at 1 GB/s.
        assert_eq!(got, vec![(5 * MS + 100_000, 1, 0)]);

        let f = Faults {
            delay: Duration::from_millis(2),
            jitter: Duration::from_millis(10),
            ..Faults::default()
        };
        let mut c = with_faults(3, f);
        let mut got = Vec::new();
        for t in (0..100 * MS).step_by(10_000) {
            if t % 100_000 == 0 && t < 5 * MS {
                c.ingress(t, 0, &frame(BCAST, mac(1), 100, (t / 100_000) as u8));
            }
            got.extend(drain(&mut c, t).into_iter().map(|(p, g)| (t, p, g)));
        }
        let tags: Vec<u8> = got.iter().map(|g| g.2).collect();
        assert_eq!(tags, (0..50).collect::<Vec<u8>>(), "order kept");
        for (t, _, tag) in &got {
            let sent = *tag as Nanos * 100_000;
            assert!(*t >= sent + 2 * MS, "frame {tag} early");
        }
        let spread: Vec<Nanos> = got.iter().map(|g| g.0 - g.2 as Nanos * 100_000).collect();
        assert!(spread.iter().max().unwrap() - spread.iter().min().unwrap() > 3 * MS);
    }

    #[test]
    fn faults_change_at_run_time() {
        let mut c = with_faults(9, Faults::default());
        assert_eq!(through(&mut c, 10).len(), 10);
        c.set_faults(
            Some(1),
            Faults {
                loss: 1.0,
                ..Faults::default()
            },
        )
        .unwrap();
        assert_eq!(through(&mut c, 10).len(), 0);
        c.set_faults(None, Faults::default()).unwrap();
        assert_eq!(through(&mut c, 10).len(), 10);
        assert!(matches!(
            c.set_faults(
                None,
                Faults {
                    loss: 1.5,
                    ..Faults::default()
                }
            ),
            Err(HubError::BadProbability { what: "loss", .. })
        ));
        assert_eq!(
            Faults {
                reorder: 0.5,
                ..Faults::default()
            }
            .validate(),
            Err(HubError::ReorderByZero)
        );
    }

    /// Port 0 and port 1 exchange one broadcast each per ms, in ms `from..from + ms`;
    /// returns whether port 1 and port 0 received the other's frame in each.
    fn exchange(c: &mut Core, from: u64, ms: u64) -> Vec<(bool, bool)> {
        (from..from + ms)
            .map(|i| {
                let t = i * MS;
                c.ingress(t, 0, &frame(BCAST, mac(1), 100, 0));
                c.ingress(t, 1, &frame(BCAST, mac(2), 100, 1));
                let got = drain(c, t + MS / 2);
                (got.contains(&(1, 0)), got.contains(&(0, 1)))
            })
            .collect()
    }

    #[test]
    fn partition_by_time_with_timed_heal() {
        let mut c = core(2);
        c.add_partition(
            0,
            Partition {
                cut: Cut::Port(1),
                trigger: Trigger::After(Duration::from_millis(10)),
                heal_after: Some(Duration::from_millis(5)),
            },
        )
        .unwrap();
        assert_eq!(c.next_wake(), Some(10 * MS));
        let got = exchange(&mut c, 0, 20);
        for (i, g) in got.iter().enumerate() {
            let cut = (10..15).contains(&i);
            assert_eq!(*g, (!cut, !cut), "ms {i}");
        }
        let k = c.counters();
        assert_eq!(k[1].cuts, 1);
        assert_eq!(k[0].cuts, 0);
        // During the cut: port 1's frames dropped at its ingress (5), frames to it at
        // its egress (5).
        assert_eq!(k[1].dropped_partition, 10);
        assert_eq!(c.partitions(), 0, "healed cuts are forgotten");
    }

    #[test]
    fn partition_after_bytes_from_a_port() {
        let mut c = core(2);
        c.add_partition(
            0,
            Partition {
                cut: Cut::Link(0, 1),
                trigger: Trigger::AfterBytes {
                    from: 1,
                    bytes: 1000,
                },
                heal_after: None,
            },
        )
        .unwrap();
        // 100-byte frames from port 1 (which sends second in each ms): its tenth, in ms 9,
        // reaches 1000 bytes; the cut then also catches the frames of ms 9 still in the
        // hub (delivered half a ms later), as a cable cut catches frames on it.
        let got = exchange(&mut c, 0, 15);
        assert!(got[..9].iter().all(|g| *g == (true, true)), "{got:?}");
        assert!(got[9..].iter().all(|g| *g == (false, false)), "{got:?}");
        assert!(c.blocked(0, 1) && c.blocked(1, 0) && !c.port_cut(0));
        // Healed on command; the cut stays gone.
        c.heal_link(1, 0).unwrap();
        assert!(exchange(&mut c, 15, 3).iter().all(|g| *g == (true, true)));
        assert_eq!(c.counters()[0].cuts, 1);
    }

    #[test]
    fn partition_on_command_and_heal_on_command() {
        let mut c = core(3);
        c.add_partition(
            0,
            Partition {
                cut: Cut::Port(0),
                trigger: Trigger::Now,
                heal_after: None,
            },
        )
        .unwrap();
        assert!(c.port_cut(0));
        assert_eq!(exchange(&mut c, 0, 2), vec![(false, false); 2]);
        // Ports 1 and 2 still talk.
        c.ingress(3 * MS, 1, &frame(BCAST, mac(2), 60, 7));
        assert_eq!(drain(&mut c, 4 * MS), vec![(2, 7)]);
        c.heal_port(0).unwrap();
        assert!(!c.port_cut(0));
        let got = exchange(&mut c, 5, 2);
        assert_eq!(got, vec![(true, true); 2]);
        assert_eq!(
            c.add_partition(
                0,
                Partition {
                    cut: Cut::Link(1, 1),
                    trigger: Trigger::Now,
                    heal_after: None
                }
            ),
            Err(HubError::SelfLink(1))
        );
    }

    #[test]
    fn a_cut_drops_what_was_already_queued_for_the_port() {
        let link = LinkConfig {
            rate: 100_000, // 1 ms per 100-byte frame
            queue: 100,
        };
        let mut c = Core::new(2, link, Faults::default(), 1).unwrap();
        for i in 0..10 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 100, i));
        }
        assert_eq!(run(&mut c, 0, 3 * MS, MS).len(), 3);
        c.add_partition(
            3 * MS,
            Partition {
                cut: Cut::Port(1),
                trigger: Trigger::Now,
                heal_after: Some(Duration::from_micros(2500)),
            },
        )
        .unwrap();
        // Frames 3 and 4 finish (at 4 and 5 ms) on the cut cable; 5.. after the heal.
        let got: Vec<u8> = run(&mut c, 3 * MS + 1, 20 * MS, MS)
            .iter()
            .map(|g| g.2)
            .collect();
        assert_eq!(got, vec![5, 6, 7, 8, 9]);
        assert_eq!(c.counters()[1].dropped_partition, 2);
    }

    #[test]
    fn partitions_are_bounded() {
        let mut c = core(2);
        let p = Partition {
            cut: Cut::Port(1),
            trigger: Trigger::After(Duration::from_secs(1)),
            heal_after: None,
        };
        for _ in 0..CUTS_MAX {
            c.add_partition(0, p).unwrap();
        }
        assert_eq!(c.add_partition(0, p), Err(HubError::TooManyPartitions));
        c.clear_partitions();
        assert_eq!(c.partitions(), 0);
    }

    #[test]
    fn back_pressure_pauses_a_port_until_credit_returns() {
        let mut c = core(2);
        c.set_credit(1, Some(2));
        for i in 0..5 {
            c.ingress(0, 0, &frame(BCAST, mac(1), 100, i));
        }
        let got = run(&mut c, 0, 5 * MS, MS);
        assert_eq!(got.len(), 2, "two frames of credit");
        assert!(c.paused());
        assert_eq!(
            c.next_wake(),
            None,
            "a paused port waits for credit, not time"
        );
        assert_eq!(c.queued(1), 3);
        c.set_credit(1, Some(10));
        let tags: Vec<u8> = run(&mut c, 6 * MS, 8 * MS, MS)
            .iter()
            .map(|g| g.2)
            .collect();
        assert_eq!(tags, vec![2, 3, 4]);
        assert!(!c.paused());
        let k = c.counters()[1];
        assert_eq!((k.paused, k.dropped_queue), (1, 0));
        // The credit is the limit less what the member holds and what is on its way.
        c.set_backpressure(Some(4));
        c.set_faults(
            Some(1),
            Faults {
                delay: Duration::from_millis(5),
                ..Faults::default()
            },
        )
        .unwrap();
        c.member_holds(1, 1);
        for i in 0..5 {
            c.ingress(8 * MS, 0, &frame(BCAST, mac(1), 100, i));
        }
        drain(&mut c, 8 * MS);
        assert_eq!(
            c.queued(1),
            2,
            "3 frames on their way, 1 held by the member"
        );
        // The member read its frame; the 3 in flight still count: room for one more.
        c.member_holds(1, 0);
        drain(&mut c, 8 * MS);
        assert_eq!(c.queued(1), 1);
        assert!(c.paused());
        assert_eq!(drain(&mut c, 20 * MS).len(), 4, "delivered after the delay");
        c.member_holds(1, 0);
        assert!(!c.paused());
        drain(&mut c, 20 * MS);
        assert_eq!(c.queued(1), 0);
        drain(&mut c, 40 * MS);
        c.set_faults(Some(1), Faults::default()).unwrap();
        // Without back-pressure the port runs free again.
        c.set_backpressure(None);
        c.ingress(50 * MS, 0, &frame(BCAST, mac(1), 100, 9));
        assert_eq!(drain(&mut c, 51 * MS), vec![(1, 9)]);
    }

    #[test]
    fn partition_specs_parse() {
        let p: Partition = "1@b0:1000000+2s".parse().unwrap();
        assert_eq!(
            p,
            Partition {
                cut: Cut::Port(1),
                trigger: Trigger::AfterBytes {
                    from: 0,
                    bytes: 1_000_000
                },
                heal_after: Some(Duration::from_secs(2)),
            }
        );
        let p: Partition = "0-1@2.5s".parse().unwrap();
        assert_eq!(p.cut, Cut::Link(0, 1));
        assert_eq!(p.trigger, Trigger::After(Duration::from_millis(2500)));
        assert_eq!(p.heal_after, None);
        let p: Partition = "2+300ms".parse().unwrap();
        assert_eq!(p.trigger, Trigger::Now);
        assert_eq!(p.heal_after, Some(Duration::from_millis(300)));
        for bad in ["", "x", "1@", "1@5", "1@b0", "1@b0:x", "1+", "a-1"] {
            let e = bad.parse::<Partition>().unwrap_err();
            assert!(e.starts_with("partition '"), "{e}");
        }
        assert_eq!(
            "1@b0:1000000+2s".parse::<Partition>().unwrap().to_string(),
            "cut port 1 once port 0 sent 1000000 bytes, heal after 2s"
        );
        assert_eq!(
            Faults {
                loss: 0.05,
                reorder: 0.1,
                reorder_by: 3,
                ..Faults::default()
            }
            .to_string(),
            "loss 0.05, reorder 0.1 by 3"
        );
        assert_eq!(Faults::default().to_string(), "none");
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn rng_is_reproducible_and_roughly_uniform() {
        let mut a = Rng::new(123);
        let mut b = Rng::new(123);
        let xs: Vec<f64> = (0..10_000).map(|_| a.next_f64()).collect();
        assert!(xs
            .iter()
            .zip((0..).map(|_| b.next_f64()))
            .all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.48..0.52).contains(&mean), "{mean}");
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
