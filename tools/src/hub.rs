//! The lab's network hub: links emulated instances and host endpoints on one virtual
//! Ethernet, as Bochs' `bxhub` did, but as a switch with real links and a fault injector.
//!
//! **Protocol.** Bochs' `socket` network module (`ethmod=socket, ethdev=P`) and QEMU's
//! `-netdev dgram` both carry one raw Ethernet frame per UDP datagram on loopback. A
//! member receives on its port P and sends to P+1; the hub binds every member's P+1,
//! receives there, and sends to the member's P from that same socket (so a member that
//! filters by source address, as a connected QEMU dgram socket would, accepts it).
//! [`Member::socket_pair`] describes such a member; [`crate::bxnet`] host endpoints join
//! the same way.
//!
//! **Why pacing.** Bochs' socket module reads one datagram per emulated millisecond and
//! the kernel drops what does not fit in its socket buffer, while a sending Bochs emits a
//! whole TCP window at once; `bxhub` forwarded those bursts as they came, so the receiver
//! lost frames whenever a window exceeded its socket buffer. Here every port has an egress
//! queue drained at a line rate: a burst waits in the hub (a switch's buffer) and reaches
//! the member paced, and what overflows the queue is dropped at the tail and counted.
//!
//! **Structure.** [`switch`] holds all switching, queueing, fault and partition logic as pure
//! code driven by a caller's clock (unit-tested with a fake one). This module is the thin
//! I/O layer: one thread per member blocks on its socket and passes frames to one
//! scheduler thread, which owns the [`Core`], sleeps until the core's next deadline or the
//! next event, and sends what the core releases. The [`HubHandle`] talks to the scheduler
//! through the same event channel, so tests change faults and cut links mid-run without
//! locks. Counters are printed (and written to [`HubConfig::report`]) when the hub stops.
//!
//! ```no_run
//! use std::time::Duration;
//! use hv_tools::hub::{Faults, Hub, HubConfig, Member};
//!
//! let members = vec![Member::socket_pair("a", 40000), Member::socket_pair("b", 40002)];
//! let hub = Hub::start(members, HubConfig { seed: Some(7), ..HubConfig::default() })?;
//! hub.set_faults_all(Faults { loss: 0.05, reorder: 0.05, reorder_by: 3, ..Faults::default() })?;
//! hub.partition(1)?; // B's cable pulled ...
//! std::thread::sleep(Duration::from_secs(2));
//! hub.heal(1)?; // ... and plugged back in
//! println!("{}", hub.report()?);
//! # Ok::<(), hv_tools::hub::HubError>(())
//! ```

pub mod switch;

use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use self::switch::{
    parse_duration, Core, Cut, Faults, HubError, LinkConfig, Nanos, Partition, PortCounters,
    Trigger, DEFAULT_QUEUE, DEFAULT_RATE,
};

/// How long a receiver thread blocks before it checks whether the hub is stopping.
const RECV_POLL: Duration = Duration::from_millis(50);
/// How long the scheduler sleeps when the core has no deadline.
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How long a handle call waits for the scheduler's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer asked for on the hub's sockets (about 1800 full frames).
const HUB_RCVBUF: usize = 4 << 20;
/// Largest datagram (the UDP maximum), so no frame is truncated.
const MAX_DATAGRAM: usize = 65_536;

/// One member of the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Name in the counters ("a", "b", "endpoint-2").
    pub name: String,
    /// Where the hub receives the member's frames (it binds this).
    pub hub_addr: SocketAddr,
    /// Where the member receives (the hub sends there).
    pub member_addr: SocketAddr,
}

impl Member {
    /// A member that receives on 127.0.0.1:`port` and sends to `port + 1`: Bochs with
    /// `ethdev=port`, QEMU with `-netdev dgram,local.port=port,remote.port=port+1`, or a
    /// [`crate::bxnet::BxEndpoint`] on `port`.
    pub fn socket_pair(name: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            hub_addr: SocketAddr::from(([127, 0, 0, 1], port.wrapping_add(1))),
            member_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

/// How the hub's network behaves. The default is a fast, faultless switch with
/// back-pressure towards its members.
#[derive(Clone, Debug, PartialEq)]
pub struct HubConfig {
    /// Every port's link, unless overridden in `port_links`.
    pub link: LinkConfig,
    /// Every port's faults, unless overridden in `port_faults`.
    pub faults: Faults,
    /// Per-port links: (port, link).
    pub port_links: Vec<(usize, LinkConfig)>,
    /// Per-port faults: (port, faults).
    pub port_faults: Vec<(usize, Faults)>,
    /// Scripted partitions, their times counted from the hub's start.
    pub partitions: Vec<Partition>,
    /// Seed of every fault decision; `None` draws one (printed at start and in the
    /// report, so a run can be replayed).
    pub seed: Option<u64>,
    /// File the counters are written to when the hub stops (they go to stderr as well).
    pub report: Option<PathBuf>,
    /// Back-pressure: pause a port while its member's socket holds this many frames or
    /// more (`None`: off). See [`DEFAULT_BACKPRESSURE`].
    pub backpressure: Option<u32>,
    /// Ports whose member takes only frames for its own NIC's MAC (port, MAC): Bochs'
    /// socket network module. Unicast frames there for other MACs (guests behind a
    /// hypervisor) are wrapped ([`switch::TUNNEL_ETHERTYPE`]).
    pub tunnel: Vec<(usize, [u8; 6])>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            link: LinkConfig::default(),
            faults: Faults::default(),
            port_links: Vec::new(),
            port_faults: Vec::new(),
            partitions: Vec::new(),
            seed: None,
            report: None,
            backpressure: Some(DEFAULT_BACKPRESSURE),
            tunnel: Vec::new(),
        }
    }
}

/// Frames a member's socket may hold before the hub pauses the port towards it.
///
/// A Bochs member reads one datagram per emulated millisecond, and how fast emulated time
/// runs against wall time depends on the host's load (measured here: 430 to 2000 frames
/// per wall second), so no fixed line rate is both safe and fast. Like an Ethernet PAUSE
/// frame, back-pressure stops the port while the member's buffer is full: the hub reads
/// the member socket's occupancy from Linux's `/proc/net/udp` (its `rx_queue`, in buffer
/// bytes of [`SOCKET_FRAME_COST`] per full frame) and lets only that many more frames go,
/// so the member's socket never overflows and frames wait in the hub's queue instead,
/// where a full queue drops at the tail and counts it. 32 full frames take 72 KiB of the
/// default 208 KiB socket buffer: a full frame's worth of margin for smaller frames (which
/// cost less) and well inside the limit.
pub const DEFAULT_BACKPRESSURE: u32 = 32;
/// Socket buffer bytes a full 1514-byte frame uses on Linux loopback (its skb truesize,
/// measured: 2304).
pub const SOCKET_FRAME_COST: u64 = 2304;
/// How often the members' socket occupancy is re-read while a port waits for credit:
/// a Bochs member drains about one frame per emulated millisecond, so in 2 ms it takes
/// only a few of the [`DEFAULT_BACKPRESSURE`] frames it holds and never runs dry, and
/// one read of `/proc/net/udp` costs ~0.1 ms of CPU.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(2);

/// Namespace of [`Hub::start`].
pub enum Hub {}

impl Hub {
    /// Binds every member's hub address and starts the hub's threads. Fails with a clear
    /// error if a configuration value is invalid or an address cannot be bound.
    pub fn start(members: Vec<Member>, config: HubConfig) -> Result<HubHandle, HubError> {
        let seed = match config.seed {
            Some(s) => s,
            None => {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).map_err(|e| HubError::Io(format!("no seed: {e}")))?;
                u64::from_le_bytes(b)
            }
        };
        let mut core = Core::new(members.len(), config.link, config.faults, seed)?;
        for &(p, link) in &config.port_links {
            core.set_link(Some(p), link)?;
        }
        for &(p, faults) in &config.port_faults {
            core.set_faults(Some(p), faults)?;
        }
        for &spec in &config.partitions {
            core.add_partition(0, spec)?;
        }
        for &(p, mac) in &config.tunnel {
            core.set_tunnel(p, mac)?;
        }
        let mut sockets = Vec::new();
        for m in &members {
            sockets.push(bind(m.hub_addr)?);
        }
        let summary = summary(&members, &config, seed);
        eprintln!("{summary}");

        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let mut receivers = Vec::new();
        let mut send_socks = Vec::new();
        for (i, s) in sockets.into_iter().enumerate() {
            send_socks.push(
                s.try_clone()
                    .map_err(|e| HubError::Io(format!("socket clone: {e}")))?,
            );
            let (tx, stop) = (tx.clone(), stop.clone());
            let r = std::thread::Builder::new()
                .name(format!("hub-rx-{i}"))
                .spawn(move || receive(i, s, tx, stop))
                .map_err(|e| HubError::Io(format!("thread: {e}")))?;
            receivers.push(r);
        }
        let dests: Vec<SocketAddr> = members.iter().map(|m| m.member_addr).collect();
        core.set_backpressure(config.backpressure);
        let scheduler = std::thread::Builder::new()
            .name("hub".into())
            .spawn(move || schedule(core, rx, send_socks, dests, epoch))
            .map_err(|e| HubError::Io(format!("thread: {e}")))?;
        Ok(HubHandle {
            events: tx,
            stop,
            scheduler: Some(scheduler),
            receivers,
            members,
            seed,
            summary,
            report: config.report,
        })
    }
}

/// Binds a member's hub address with a large receive buffer: a sending Bochs emits a
/// whole TCP window at once, and what the kernel drops before the hub reads it would be
/// loss the hub cannot count (it shows as `hub-drop` in the report if it happens anyway).
fn bind(addr: SocketAddr) -> Result<UdpSocket, HubError> {
    let io = |e: std::io::Error| HubError::Io(format!("socket {addr}: {e}"));
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(io)?;
    // The kernel caps it at net.core.rmem_max; what it grants is enough here.
    let _ = s.set_recv_buffer_size(HUB_RCVBUF);
    s.bind(&addr.into()).map_err(|e| HubError::Bind {
        addr: addr.to_string(),
        error: e.to_string(),
    })?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(RECV_POLL)).map_err(io)?;
    Ok(s)
}

fn summary(members: &[Member], config: &HubConfig, seed: u64) -> String {
    let mut s = format!(
        "hub: {} ports, seed {seed} (replay with the same seed), link {} B/s queue {} frames, \
         back-pressure {}, faults: {}",
        members.len(),
        config.link.rate,
        config.link.queue,
        config
            .backpressure
            .map_or("off".to_string(), |n| format!("at {n} frames")),
        config.faults
    );
    for (p, l) in &config.port_links {
        let _ = write!(s, "; port {p} link {} B/s queue {}", l.rate, l.queue);
    }
    for (p, f) in &config.port_faults {
        let _ = write!(s, "; port {p} faults: {f}");
    }
    for c in &config.partitions {
        let _ = write!(s, "; {c}");
    }
    s
}

/// A handle's request, run on the scheduler thread with the core and the time.
type Call = Box<dyn FnOnce(&mut Core, Nanos) + Send>;

enum Event {
    Frame(usize, Vec<u8>),
    Call(Call),
    Stop,
}

/// A member's receiver: blocks on its socket and hands frames to the scheduler.
fn receive(port: usize, sock: UdpSocket, tx: Sender<Event>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if tx.send(Event::Frame(port, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // An ICMP error from an earlier send (the member is not up yet): not ours to
            // handle here, and it must not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn since(epoch: Instant) -> Nanos {
    epoch.elapsed().as_nanos() as Nanos
}

/// Gives every port the credit its member's socket has room for, from one read of
/// `/proc/net/udp`. A member whose socket is not found (not up yet, or not Linux) counts
/// as empty.
fn refresh_credit(core: &mut Core, dests: &[SocketAddr]) {
    let table = fs::read_to_string("/proc/net/udp").unwrap_or_default();
    for (p, d) in dests.iter().enumerate() {
        let held = udp_column(&table, d.port(), |f| {
            let rx = f[4].split_once(':')?.1;
            u64::from_str_radix(rx, 16).ok()
        })
        .unwrap_or(0);
        core.member_holds(p, held.div_ceil(SOCKET_FRAME_COST));
    }
}

/// The scheduler: owns the core, sends what it releases, sleeps until its next deadline.
fn schedule(
    mut core: Core,
    rx: Receiver<Event>,
    socks: Vec<UdpSocket>,
    dests: Vec<SocketAddr>,
    epoch: Instant,
) -> Core {
    let mut out = Vec::new();
    refresh_credit(&mut core, &dests);
    let mut credit_read = Instant::now();
    loop {
        if core.paused() && credit_read.elapsed() >= BACKPRESSURE_POLL {
            refresh_credit(&mut core, &dests);
            credit_read = Instant::now();
        }
        core.poll(since(epoch), &mut out);
        for (p, frame) in out.drain(..) {
            if socks[p].send_to(&frame, dests[p]).is_err() {
                core.note_send_error(p);
            }
        }
        let mut wait = match core.next_wake() {
            Some(t) => Duration::from_nanos(t.saturating_sub(since(epoch))),
            None => IDLE_WAIT,
        };
        if core.paused() {
            wait = wait.min(BACKPRESSURE_POLL.saturating_sub(credit_read.elapsed()));
        }
        let event = if wait.is_zero() {
            rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            rx.recv_timeout(wait)
        };
        match event {
            Ok(Event::Frame(p, data)) => core.ingress(since(epoch), p, &data),
            Ok(Event::Call(f)) => f(&mut core, since(epoch)),
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => return core,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// A running hub. Stops (and reports its counters) when dropped.
pub struct HubHandle {
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    scheduler: Option<JoinHandle<Core>>,
    receivers: Vec<JoinHandle<()>>,
    members: Vec<Member>,
    seed: u64,
    summary: String,
    report: Option<PathBuf>,
}

impl HubHandle {
    /// Runs `f` on the scheduler's core and returns its result.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core, Nanos) -> R + Send + 'static,
    ) -> Result<R, HubError> {
        let (tx, rx) = mpsc::channel();
        self.events
            .send(Event::Call(Box::new(move |core, now| {
                let _ = tx.send(f(core, now));
            })))
            .map_err(|_| HubError::Stopped)?;
        rx.recv_timeout(CALL_TIMEOUT).map_err(|_| HubError::Stopped)
    }

    /// The seed of this hub's fault decisions.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The members, in port order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every port's counters now.
    pub fn counters(&self) -> Result<Vec<PortCounters>, HubError> {
        self.call(|c, _| c.counters())
    }

    /// Replaces the faults of frames to `port` from the next frame on.
    pub fn set_faults(&self, port: usize, faults: Faults) -> Result<(), HubError> {
        self.call(move |c, _| c.set_faults(Some(port), faults))?
    }

    /// Replaces the faults of every port.
    pub fn set_faults_all(&self, faults: Faults) -> Result<(), HubError> {
        self.call(move |c, _| c.set_faults(None, faults))?
    }

    /// The faults of `port`.
    pub fn faults(&self, port: usize) -> Result<Faults, HubError> {
        self.call(move |c, _| c.faults(port))?
    }

    /// Replaces the link (rate, queue) of `port`.
    pub fn set_link(&self, port: usize, link: LinkConfig) -> Result<(), HubError> {
        self.call(move |c, _| c.set_link(Some(port), link))?
    }

    /// Replaces the link of every port.
    pub fn set_link_all(&self, link: LinkConfig) -> Result<(), HubError> {
        self.call(move |c, _| c.set_link(None, link))?
    }

    /// Changes the back-pressure limit (see [`HubConfig::backpressure`]); `None` turns it
    /// off. A new limit applies from the next read of the members' sockets.
    pub fn set_backpressure(&self, limit: Option<u32>) -> Result<(), HubError> {
        self.call(move |c, _| {
            c.set_backpressure(limit);
            // Start from a conservative credit; the next read refills it.
            for p in 0..c.ports() {
                c.set_credit(p, limit.map(|_| 0));
            }
        })
    }

    /// Cuts `port` off now, until [`HubHandle::heal`].
    pub fn partition(&self, port: usize) -> Result<(), HubError> {
        self.schedule(Partition {
            cut: Cut::Port(port),
            trigger: Trigger::Now,
            heal_after: None,
        })
    }

    /// Cuts the link between ports `a` and `b` now, until [`HubHandle::heal_link`].
    pub fn partition_link(&self, a: usize, b: usize) -> Result<(), HubError> {
        self.schedule(Partition {
            cut: Cut::Link(a, b),
            trigger: Trigger::Now,
            heal_after: None,
        })
    }

    /// Adds a scripted partition; its time and byte triggers count from now.
    pub fn schedule(&self, spec: Partition) -> Result<(), HubError> {
        self.call(move |c, now| c.add_partition(now, spec))?
    }

    /// Heals every active cut involving `port` (scripted ones still pending stay armed).
    pub fn heal(&self, port: usize) -> Result<(), HubError> {
        self.call(move |c, _| c.heal_port(port))?
    }

    /// Heals the cut link between `a` and `b`.
    pub fn heal_link(&self, a: usize, b: usize) -> Result<(), HubError> {
        self.call(move |c, _| c.heal_link(a, b))?
    }

    /// Heals every cut and forgets every pending partition.
    pub fn heal_all(&self) -> Result<(), HubError> {
        self.call(|c, _| c.clear_partitions())
    }

    /// Whether `port` is cut off now.
    pub fn is_cut(&self, port: usize) -> Result<bool, HubError> {
        self.call(move |c, _| c.port_cut(port))
    }

    /// Datagrams each member's own socket dropped because it was full (Linux
    /// `/proc/net/udp`): the frames the hub delivered that the member never read. `None`
    /// where the member's socket is not open (or not on Linux).
    pub fn member_drops(&self) -> Vec<Option<u64>> {
        let table = fs::read_to_string("/proc/net/udp").unwrap_or_default();
        self.members
            .iter()
            .map(|m| udp_drops(&table, m.member_addr.port()))
            .collect()
    }

    /// Datagrams the hub's own socket for each member dropped before the hub read them
    /// (should stay 0: the sockets have a large buffer and a thread each).
    pub fn hub_drops(&self) -> Vec<Option<u64>> {
        let table = fs::read_to_string("/proc/net/udp").unwrap_or_default();
        self.members
            .iter()
            .map(|m| udp_drops(&table, m.hub_addr.port()))
            .collect()
    }

    /// Frames waiting in each port's egress queue now.
    pub fn queued(&self) -> Result<Vec<usize>, HubError> {
        self.call(|c, _| (0..c.ports()).map(|p| c.queued(p)).collect())
    }

    /// CPU time the scheduler thread has used so far (Linux; `None` elsewhere): the hub
    /// shares the machine's cores with the emulators, so its cost is reported.
    pub fn cpu_time(&self) -> Result<Option<Duration>, HubError> {
        self.call(|_, _| thread_cpu_time())
    }

    /// The counters as a table, with the seed and the members' own drops.
    pub fn report(&self) -> Result<String, HubError> {
        Ok(format_report(
            &self.summary,
            &self.members,
            &self.counters()?,
            &self.member_drops(),
            &self.hub_drops(),
        ) + &cpu_line(self.cpu_time()?))
    }

    /// Stops the hub and returns its final counters (also written to the report file
    /// and to stderr).
    pub fn stop(mut self) -> Vec<PortCounters> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Vec<PortCounters> {
        let Some(scheduler) = self.scheduler.take() else {
            return Vec::new();
        };
        // Sample the members' sockets while they may still be open.
        let drops = self.member_drops();
        let hub_drops = self.hub_drops();
        let cpu = self.cpu_time().ok().flatten();
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.events.send(Event::Stop);
        let counters = scheduler.join().map(|c| c.counters()).unwrap_or_default();
        for r in self.receivers.drain(..) {
            let _ = r.join();
        }
        let text = format_report(&self.summary, &self.members, &counters, &drops, &hub_drops)
            + &cpu_line(cpu);
        eprint!("{text}");
        if let Some(path) = &self.report {
            if let Err(e) = fs::write(path, &text) {
                eprintln!("hub: cannot write {}: {e}", path.display());
            }
        }
        counters
    }
}

impl Drop for HubHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// CPU time (user + system) of the calling thread, from `/proc/thread-self/stat`.
fn thread_cpu_time() -> Option<Duration> {
    let stat = fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn cpu_line(cpu: Option<Duration>) -> String {
    cpu.map_or(String::new(), |c| {
        format!(
            "hub: the scheduler thread used {:.2} s of CPU\n",
            c.as_secs_f64()
        )
    })
}

/// Datagrams dropped so far by the (IPv4) UDP socket bound to local `port` on this
/// machine because its buffer was full (Linux `/proc/net/udp`); `None` if no such socket.
/// Works for any hub, `bxhub` included, which is how the two are compared.
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    udp_drops(&fs::read_to_string("/proc/net/udp").ok()?, port)
}

/// A column of the socket bound to local `port` in a `/proc/net/udp` table, via `get`
/// on its whitespace-separated fields.
fn udp_column(table: &str, port: u16, get: impl Fn(&[&str]) -> Option<u64>) -> Option<u64> {
    let local = format!(":{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 12 && f[1].ends_with(&local) {
            get(&f)
        } else {
            None
        }
    })
}

/// The `drops` column of the socket bound to local `port` in a `/proc/net/udp` table.
fn udp_drops(table: &str, port: u16) -> Option<u64> {
    udp_column(table, port, |f| f[12].parse().ok())
}

/// The counters table.
pub fn format_report(
    summary: &str,
    members: &[Member],
    counters: &[PortCounters],
    member_drops: &[Option<u64>],
    hub_drops: &[Option<u64>],
) -> String {
    let mut s = format!("{summary}\n");
    let _ = writeln!(
        s,
        "{:>4} {:<12} {:>9} {:>11} {:>9} {:>11} {:>7} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>4} {:>6} {:>7} {:>8} {:>8}",
        "port",
        "member",
        "frm-in",
        "bytes-in",
        "frm-out",
        "bytes-out",
        "q-drop",
        "f-drop",
        "p-drop",
        "dup",
        "reord",
        "bad",
        "err",
        "cuts",
        "q-peak",
        "paused",
        "hub-drop",
        "rcv-drop"
    );
    for (i, c) in counters.iter().enumerate() {
        let name = members.get(i).map_or("?", |m| m.name.as_str());
        let show = |v: &[Option<u64>]| {
            v.get(i)
                .copied()
                .flatten()
                .map_or("-".to_string(), |d| d.to_string())
        };
        let (drops, hub_drop) = (show(member_drops), show(hub_drops));
        let _ = writeln!(
            s,
            "{i:>4} {name:<12} {:>9} {:>11} {:>9} {:>11} {:>7} {:>7} {:>7} {:>6} {:>6} {:>5} {:>5} {:>4} {:>6} {:>7} {hub_drop:>8} {drops:>8}",
            c.frames_in,
            c.bytes_in,
            c.frames_out,
            c.bytes_out,
            c.dropped_queue,
            c.dropped_fault,
            c.dropped_partition,
            c.duplicated,
            c.reordered,
            c.bad_in,
            c.send_errors,
            c.cuts,
            c.queue_peak,
            c.paused,
        );
    }
    s.push_str(
        "(in = from the member, out = to it; q-drop: egress queue full, f-drop: loss fault, \
         p-drop: partition; paused: waits for the member (back-pressure); hub-drop: \
         dropped by the hub's own socket; rcv-drop: dropped by the member's own full socket)\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two host sockets joined through a real hub on loopback.
    struct Pair {
        hub: HubHandle,
        socks: Vec<UdpSocket>,
    }

    fn pair(config: HubConfig) -> Pair {
        // Bind the members first on free ports, then start the hub on port + 1.
        for _ in 0..50 {
            let socks: Vec<UdpSocket> = (0..2)
                .filter_map(|_| UdpSocket::bind("127.0.0.1:0").ok())
                .collect();
            let members: Vec<Member> = socks
                .iter()
                .enumerate()
                .map(|(i, s)| Member::socket_pair(&format!("m{i}"), s.local_addr().unwrap().port()))
                .collect();
            if let Ok(hub) = Hub::start(members, config.clone()) {
                for s in &socks {
                    s.set_read_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                }
                return Pair { hub, socks };
            }
        }
        panic!("no free ports");
    }

    fn frame(src: u8, tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src]);
        f[14] = tag;
        f
    }

    impl Pair {
        fn send(&self, from: usize, f: &[u8]) {
            let to = self.hub.members()[from].hub_addr;
            self.socks[from].send_to(f, to).unwrap();
        }

        fn recv(&self, at: usize) -> Option<Vec<u8>> {
            let mut buf = [0u8; 2048];
            let (n, from) = self.socks[at].recv_from(&mut buf).ok()?;
            // Sent from the port the member sends to (a filtering member accepts it).
            assert_eq!(from, self.hub.members()[at].hub_addr);
            Some(buf[..n].to_vec())
        }
    }

    #[test]
    fn frames_cross_the_real_hub_and_are_counted() {
        let p = pair(HubConfig {
            seed: Some(1),
            ..HubConfig::default()
        });
        p.send(0, &frame(1, 7, 100));
        assert_eq!(p.recv(1).map(|f| f[14]), Some(7));
        p.send(1, &frame(2, 8, 60));
        assert_eq!(p.recv(0).map(|f| f[14]), Some(8));
        let k = p.hub.counters().unwrap();
        assert_eq!(
            (k[0].frames_in, k[0].frames_out, k[1].bytes_out),
            (1, 1, 100)
        );
        let report = p.hub.report().unwrap();
        assert!(
            report.contains("seed 1") && report.contains("m1"),
            "{report}"
        );
        let fin = p.hub.stop();
        assert_eq!(fin[1].frames_in, 1);
    }

    #[test]
    fn the_real_hub_paces_a_burst() {
        // 100 KB/s: ten 1000-byte frames take 100 ms on the wire.
        let p = pair(HubConfig {
            link: LinkConfig {
                rate: 100_000,
                queue: 64,
            },
            ..HubConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..10 {
            p.send(0, &frame(1, i, 1000));
        }
        for i in 0..10 {
            assert_eq!(p.recv(1).map(|f| f[14]), Some(i));
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(95) && took < Duration::from_millis(400),
            "{took:?}"
        );
    }

    #[test]
    fn back_pressure_keeps_a_slow_members_socket_from_overflowing() {
        let p = pair(HubConfig {
            backpressure: Some(8),
            ..HubConfig::default()
        });
        // Far more than member 1's socket buffer holds (about 92 full frames).
        for i in 0..200u8 {
            p.send(0, &frame(1, i, 1514));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(p.hub.queued().unwrap()[1], 192, "the rest waits in the hub");
        assert_eq!(p.hub.member_drops()[1], Some(0));
        for i in 0..200u8 {
            assert_eq!(p.recv(1).map(|f| f[14]), Some(i));
        }
        let k = p.hub.counters().unwrap()[1];
        assert_eq!((k.frames_out, k.dropped_queue), (200, 0));
        assert!(k.paused > 0);
        assert_eq!(p.hub.member_drops()[1], Some(0));
    }

    #[test]
    fn without_back_pressure_a_burst_overflows_the_member() {
        let p = pair(HubConfig {
            backpressure: None,
            ..HubConfig::default()
        });
        for i in 0..200u8 {
            p.send(0, &frame(1, i, 1514));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.hub.member_drops()[1].is_some_and(|d| d > 50));
    }

    #[test]
    fn faults_and_partitions_through_the_handle() {
        let p = pair(HubConfig::default());
        p.hub.partition(1).unwrap();
        assert!(p.hub.is_cut(1).unwrap());
        p.send(0, &frame(1, 1, 60));
        assert_eq!(p.recv(1), None);
        p.hub.heal(1).unwrap();
        p.send(0, &frame(1, 2, 60));
        assert_eq!(p.recv(1).map(|f| f[14]), Some(2));
        p.hub
            .set_faults(
                1,
                Faults {
                    loss: 1.0,
                    ..Faults::default()
                },
            )
            .unwrap();
        p.send(0, &frame(1, 3, 60));
        assert_eq!(p.recv(1), None);
        let k = p.hub.counters().unwrap();
        assert_eq!((k[1].dropped_partition, k[1].dropped_fault), (1, 1));
        assert_eq!(
            p.hub.set_faults(9, Faults::default()),
            Err(HubError::NoSuchPort { port: 9, ports: 2 })
        );
    }

    #[test]
    fn start_refuses_bad_settings_and_busy_ports() {
        let busy = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port() - 1;
        let err = Hub::start(vec![Member::socket_pair("x", port)], HubConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, HubError::Bind { .. }), "{err}");
        assert!(err.to_string().contains("cannot bind UDP 127.0.0.1:"));
        let err = Hub::start(
            vec![Member::socket_pair("x", 0)],
            HubConfig {
                faults: Faults {
                    duplicate: -1.0,
                    ..Faults::default()
                },
                ..HubConfig::default()
            },
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "hub: duplicate probability -1 is not within 0..=1"
        );
        assert_eq!(
            Hub::start(Vec::new(), HubConfig::default()).err(),
            Some(HubError::NoMembers)
        );
    }

    #[test]
    fn proc_net_udp_drops_column() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
          118: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1234 2 0000000000000000 17\n\
          119: 0100007F:9C43 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1235 2 0000000000000000 0\n";
        assert_eq!(udp_drops(table, 40000), Some(17));
        assert_eq!(udp_drops(table, 40003), Some(0));
        assert_eq!(udp_drops(table, 40001), None);
    }
}
