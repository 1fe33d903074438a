//! Networking for PV guests: the PV NIC as a smoltcp [`Device`], and the usual setup and
//! poll loop.
//!
//! [`PvNic`] owns the NIC's memory (a page-aligned static, [`ring::NicMemory`]: the ring
//! page plus 32 transmit and 32 receive buffers), posts every receive buffer and attaches
//! the ring ([`Hypercall::NetAttach`]). As a smoltcp device:
//!
//! * an [`RxToken`] is the oldest completed receive descriptor; once smoltcp has consumed
//!   the frame the buffer is re-posted. Descriptors completed with `NET_DESC_ERROR` (or a
//!   nonsensical length) are counted and re-posted without being handed to smoltcp;
//! * a [`TxToken`] is the next free transmit slot: the frame is written in place and
//!   published (`tx_avail`), but **not** announced at once: transmits are batched, and the
//!   hypervisor sends them at the next [`PvNic::flush`], [`PvNic::kick`] or
//!   [`PvNic::wait`] (`NetWait` sends what the ring holds before sleeping). When the ring
//!   is full the NIC announces what it holds (`NetNotify`) to free slots before giving up.
//!
//! Frames arrive only during `NetNotify`/`NetWait`, so a guest's loop is
//!
//! ```text
//!     loop {
//!         net::poll(&mut iface, &mut nic, &mut sockets);   // receive, process, queue
//!         ... serve the sockets, periodic work ...
//!         net::wait(&mut iface, &mut nic, &sockets, MAX_WAIT_NS); // send + sleep
//!     }
//! ```
//!
//! The guest's address comes from its arguments, `ip=a.b.c.d/nn` (required) and
//! `gw=a.b.c.d` (optional): [`IpConfig::from_args`]. Everything here lives in guest
//! memory (statics and the stack), so the stack's state, open connections included,
//! moves with the guest on a migration; the hypervisor keeps the NIC attached and its MAC.
//!
//! [`Hypercall::NetAttach`]: guest_abi::Hypercall::NetAttach

use core::fmt;

use guest_abi::ErrorCode;
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::once::TakeOnce;
use crate::ring::{self, Mem, NicMemory, RxRing, TxRing, BUF_SIZE};
use crate::Args;

pub use crate::ring::RingError;

/// The NIC memory of this guest (one NIC per guest).
static NIC_MEMORY: TakeOnce<NicMemory> = TakeOnce::new(NicMemory::new());

/// Longest sleep of [`wait`] callers should use so their periodic work still runs.
pub const DEFAULT_MAX_WAIT_NS: u64 = 100_000_000;

/// The hypercalls the NIC makes (the hypervisor in a guest; a fake in host tests).
pub trait Backend {
    /// `NetNotify`: send what the transmit ring holds, fill posted receive buffers.
    fn notify(&mut self) -> Result<u64, ErrorCode>;
    /// `NetWait`: as `notify`, then sleep until a frame arrives or `deadline_ns`.
    fn wait(&mut self, deadline_ns: u64) -> Result<(), ErrorCode>;
}

/// The real thing: the PV NIC hypercalls.
#[derive(Debug, Default)]
pub struct Hypervisor;

impl Backend for Hypervisor {
    fn notify(&mut self) -> Result<u64, ErrorCode> {
        crate::net_notify()
    }

    fn wait(&mut self, deadline_ns: u64) -> Result<(), ErrorCode> {
        let r = crate::net_wait(deadline_ns);
        if r.is_err() {
            // No ring attached (or a broken one): still keep the caller's pace.
            crate::sleep_until(deadline_ns);
        }
        r
    }
}

/// The NIC's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames received and handed to the stack.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Receive descriptors completed with an error or a bad length (skipped).
    pub rx_errors: u64,
    /// Frames published for transmission.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmit descriptors the hypervisor completed with an error (not sent).
    pub tx_errors: u64,
    /// Frames dropped because no transmit slot was free (TCP retransmits).
    pub tx_dropped: u64,
    /// Hypercalls (`NetNotify`, `NetWait`) that failed, and ring indices from the
    /// hypervisor that broke the protocol.
    pub ring_errors: u64,
}

/// The receive half of the device, with its counters.
struct RxSide {
    ring: RxRing,
    frames: u64,
    bytes: u64,
    errors: u64,
    ring_errors: u64,
}

impl RxSide {
    /// Skips bad completions (re-posting them); the next good one, if any.
    fn next_good(&mut self) -> Option<ring::RxCompletion> {
        loop {
            match self.ring.peek() {
                Ok(Some(c)) if c.is_good() => return Some(c),
                Ok(Some(_)) => {
                    self.errors += 1;
                    self.ring.release();
                }
                Ok(None) => return None,
                Err(_) => {
                    self.ring_errors += 1;
                    return None;
                }
            }
        }
    }
}

/// The transmit half of the device, with its counters and the hypercalls.
struct TxSide<B> {
    ring: TxRing,
    backend: B,
    /// Frames published since the hypervisor last looked at the ring.
    pending: bool,
    frames: u64,
    bytes: u64,
    errors: u64,
    dropped: u64,
    ring_errors: u64,
}

impl<B: Backend> TxSide<B> {
    fn reclaim(&mut self) {
        match self.ring.reclaim() {
            Ok(r) => self.errors += u64::from(r.errors),
            Err(_) => self.ring_errors += 1,
        }
    }

    /// A free slot: reclaims completed ones, and if the ring is still full asks the
    /// hypervisor to send what it holds.
    fn free_slot(&mut self) -> Option<usize> {
        self.reclaim();
        if self.ring.slot().is_none() && self.pending {
            self.notify();
            self.reclaim();
        }
        self.ring.slot()
    }

    fn notify(&mut self) {
        self.pending = false;
        if self.backend.notify().is_err() {
            self.ring_errors += 1;
        }
    }
}

/// The paravirtual NIC as a smoltcp device (see the module documentation).
pub struct PvNic<B: Backend = Hypervisor> {
    rx: RxSide,
    tx: TxSide<B>,
    mac: [u8; 6],
    ring_addr: u64,
}

impl PvNic<Hypervisor> {
    /// Sets up the guest's NIC memory, posts the receive buffers and attaches the ring.
    /// Fails if called twice (`Refused`, the memory is taken) or if the hypervisor
    /// refuses the ring (its error, e.g. `UnknownCall` on a hypervisor without the PV
    /// NIC).
    pub fn attach() -> Result<Self, ErrorCode> {
        let mem = NIC_MEMORY.take().ok_or(ErrorCode::Refused)?;
        let mut nic = Self::with_backend(mem, Hypervisor, [0; 6]);
        nic.mac = crate::net_attach(nic.ring_addr)?;
        Ok(nic)
    }

    /// Detaches the ring (the hypervisor stops using it).
    pub fn detach(self) -> Result<(), ErrorCode> {
        crate::net_detach()
    }
}

impl<B: Backend> PvNic<B> {
    /// A NIC over `mem` with the given backend and MAC, ring initialized and every
    /// receive buffer posted, not attached (host tests; guests use [`PvNic::attach`]).
    pub fn with_backend(mem: &'static mut NicMemory, backend: B, mac: [u8; 6]) -> Self {
        let mem = Mem::new(mem);
        let (tx, rx) = ring::init(mem, 0);
        Self {
            rx: RxSide {
                ring: rx,
                frames: 0,
                bytes: 0,
                errors: 0,
                ring_errors: 0,
            },
            tx: TxSide {
                ring: tx,
                backend,
                pending: false,
                frames: 0,
                bytes: 0,
                errors: 0,
                dropped: 0,
                ring_errors: 0,
            },
            mac,
            ring_addr: mem.ring_addr(),
        }
    }

    /// The MAC address the hypervisor gave the NIC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Guest-physical address of the ring page.
    pub fn ring_addr(&self) -> u64 {
        self.ring_addr
    }

    /// The counters.
    pub fn stats(&self) -> NicStats {
        NicStats {
            rx_frames: self.rx.frames,
            rx_bytes: self.rx.bytes,
            rx_errors: self.rx.errors,
            tx_frames: self.tx.frames,
            tx_bytes: self.tx.bytes,
            tx_errors: self.tx.errors,
            tx_dropped: self.tx.dropped,
            ring_errors: self.rx.ring_errors + self.tx.ring_errors,
        }
    }

    /// Whether a received frame waits in the ring.
    pub fn rx_pending(&self) -> bool {
        matches!(self.rx.ring.ready(), Ok(n) if n > 0)
    }

    /// Has the hypervisor send the frames published since it last looked (`NetNotify`),
    /// if any.
    pub fn flush(&mut self) {
        if self.tx.pending {
            self.tx.notify();
        }
        self.tx.reclaim();
    }

    /// `NetNotify` whether or not frames are pending: sends them and picks up frames that
    /// arrived, without sleeping.
    pub fn kick(&mut self) {
        self.tx.notify();
        self.tx.reclaim();
    }

    /// Sends what is pending and sleeps until a frame arrives or the monotonic clock
    /// reads `deadline_ns` (`NetWait`); returns at once if a received frame already
    /// waits in the ring.
    pub fn wait(&mut self, deadline_ns: u64) {
        if self.rx_pending() {
            self.flush();
            return;
        }
        self.tx.pending = false;
        if self.tx.backend.wait(deadline_ns).is_err() {
            self.tx.ring_errors += 1;
        }
        self.tx.reclaim();
    }
}

/// A received frame (see [`PvNic`]).
pub struct RxToken<'a> {
    rx: &'a mut RxSide,
    c: ring::RxCompletion,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        self.rx.frames += 1;
        self.rx.bytes += u64::from(self.c.len);
        let r = f(self.rx.ring.frame(&self.c));
        self.rx.ring.release();
        r
    }
}

/// A transmit slot (see [`PvNic`]).
pub struct TxToken<'a, B: Backend> {
    tx: &'a mut TxSide<B>,
}

impl<B: Backend> phy::TxToken for TxToken<'_, B> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // The token that comes with a received frame was handed out without a slot
        // check: look for one now, and if there is none (or the frame is too long),
        // let smoltcp build the frame in a scratch buffer and drop it.
        let slot = if (ring::FRAME_MIN as usize..=guest_abi::NET_FRAME_MAX as usize).contains(&len)
        {
            self.tx.free_slot()
        } else {
            None
        };
        match slot {
            Some(slot) => {
                let r = f(self.tx.ring.buffer(slot, len));
                self.tx.ring.publish(slot, len as u32);
                self.tx.pending = true;
                self.tx.frames += 1;
                self.tx.bytes += len as u64;
                r
            }
            None => {
                self.tx.dropped += 1;
                let mut scratch = [0u8; BUF_SIZE];
                let n = len.min(BUF_SIZE);
                f(&mut scratch[..n])
            }
        }
    }
}

impl<B: Backend> Device for PvNic<B> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, B>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let c = self.rx.next_good()?;
        Some((
            RxToken {
                rx: &mut self.rx,
                c,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.tx.free_slot()?;
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // 14 bytes under the largest frame: the lab's hub delivers frames for guests
        // behind a Bochs instance wrapped in one more Ethernet header, and Bochs' NIC
        // takes no frame over 1514 bytes; TCP peers learn the smaller MSS.
        caps.max_transmission_unit = FRAME_LIMIT;
        caps.max_burst_size = Some(ring::SLOTS);
        caps
    }
}

/// Largest frame the guests send or invite (see `capabilities`).
pub const FRAME_LIMIT: usize = guest_abi::NET_FRAME_MAX as usize - 14;

/// The monotonic clock as a smoltcp instant (microseconds; it keeps counting across
/// migrations).
pub fn now() -> Instant {
    Instant::from_micros((crate::time_ns() / 1000) as i64)
}

/// Receives, processes and queues: `iface.poll` at [`now`]. Returns whether a socket's
/// state may have changed.
pub fn poll<B: Backend>(
    iface: &mut Interface,
    nic: &mut PvNic<B>,
    sockets: &mut SocketSet<'_>,
) -> bool {
    iface.poll(now(), nic, sockets) == PollResult::SocketStateChanged
}

/// Sends what is queued and sleeps until a frame arrives or smoltcp's next timer is due,
/// but at most `max_wait_ns` (so the caller's periodic work runs). Does not sleep if
/// smoltcp wants to be polled now (then it only lets the hypervisor send and deliver).
pub fn wait<B: Backend>(
    iface: &mut Interface,
    nic: &mut PvNic<B>,
    sockets: &SocketSet<'_>,
    max_wait_ns: u64,
) {
    let t = crate::time_ns();
    let at = Instant::from_micros((t / 1000) as i64);
    let ns = match iface.poll_delay(at, sockets) {
        Some(d) => d.total_micros().saturating_mul(1000).min(max_wait_ns),
        None => max_wait_ns,
    };
    if ns == 0 {
        nic.kick();
    } else {
        nic.wait(t.saturating_add(ns));
    }
}

/// A smoltcp interface on `nic` with the address (and default route) of `cfg`.
pub fn interface<B: Backend>(nic: &mut PvNic<B>, cfg: &IpConfig) -> Interface {
    let mac = nic.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    // Different per guest (MAC) and per start (clock), as smoltcp asks.
    let mut seed = [0u8; 8];
    seed[..6].copy_from_slice(&mac);
    config.random_seed = u64::from_le_bytes(seed) ^ crate::time_ns().rotate_left(17);
    let mut iface = Interface::new(config, nic, now());
    iface.update_ip_addrs(|addrs| {
        // A fresh interface has room for an address.
        let _ = addrs.push(IpCidr::new(cfg.addr().into(), cfg.prefix));
    });
    if let Some(gw) = cfg.gateway {
        // The route table of a fresh interface is empty, so there is room.
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(gw));
    }
    iface
}

/// What [`start`] sets up.
pub struct Net {
    /// The NIC.
    pub nic: PvNic,
    /// The interface on it.
    pub iface: Interface,
    /// Its address.
    pub cfg: IpConfig,
}

/// Why [`start`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The arguments do not give a usable address.
    Config(ConfigError),
    /// The hypervisor refused the NIC.
    Attach(ErrorCode),
    /// The hypervisor gave the NIC a multicast or broadcast MAC (smoltcp needs unicast).
    BadMac([u8; 6]),
}

impl StartError {
    /// The exit code a guest should end with: 2 for bad arguments, 3 for no NIC.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            Self::Attach(_) | Self::BadMac(_) => 3,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Attach(e) => write!(f, "cannot attach the PV NIC: {e}"),
            Self::BadMac(m) => write!(f, "the PV NIC's MAC {} is not unicast", MacDisplay(*m)),
        }
    }
}

/// The usual start of a network guest: the address from `args` (checked first, so a bad
/// argument does not attach the NIC), the NIC attached, an interface on it.
pub fn start(args: &Args) -> Result<Net, StartError> {
    let cfg = IpConfig::from_args(args).map_err(StartError::Config)?;
    let mut nic = PvNic::attach().map_err(StartError::Attach)?;
    if !EthernetAddress(nic.mac()).is_unicast() {
        let _ = crate::net_detach();
        return Err(StartError::BadMac(nic.mac()));
    }
    let iface = interface(&mut nic, &cfg);
    Ok(Net { nic, iface, cfg })
}

/// The guest's IPv4 configuration, from `ip=a.b.c.d/nn` and optional `gw=a.b.c.d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// The address's octets.
    pub addr: [u8; 4],
    /// The prefix length (1..=32).
    pub prefix: u8,
    /// The default gateway's octets, if any (inside the subnet).
    pub gateway: Option<[u8; 4]>,
}

/// What is wrong with the network arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// No `ip=`.
    MissingIp,
    /// `ip=` is not `a.b.c.d/nn` with a prefix of 1 to 32.
    BadIp,
    /// `gw=` is not `a.b.c.d`.
    BadGateway,
    /// `gw=` is outside the subnet of `ip=`.
    GatewayOutsideSubnet,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingIp => "missing argument ip=a.b.c.d/nn (the guest's address)",
            Self::BadIp => "bad ip=: expected a.b.c.d/nn with nn from 1 to 32",
            Self::BadGateway => "bad gw=: expected a.b.c.d",
            Self::GatewayOutsideSubnet => "gw= is not inside the subnet of ip=",
        })
    }
}

impl IpConfig {
    /// Parses the `ip=` and `gw=` arguments.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        Self::parse(args.get("ip"), args.get("gw"))
    }

    /// Parses `ip` (`a.b.c.d/nn`) and `gw` (`a.b.c.d`) values.
    pub fn parse(ip: Option<&str>, gw: Option<&str>) -> Result<Self, ConfigError> {
        let ip = ip.ok_or(ConfigError::MissingIp)?;
        let (a, p) = ip.split_once('/').ok_or(ConfigError::BadIp)?;
        let addr = parse_ipv4(a).ok_or(ConfigError::BadIp)?;
        let prefix = parse_decimal(p)
            .filter(|p| (1..=32).contains(p))
            .ok_or(ConfigError::BadIp)? as u8;
        let gateway = match gw {
            None => None,
            Some(g) => Some(parse_ipv4(g).ok_or(ConfigError::BadGateway)?),
        };
        let cfg = Self {
            addr,
            prefix,
            gateway,
        };
        if let Some(g) = gateway {
            if !cfg.in_subnet(g) {
                return Err(ConfigError::GatewayOutsideSubnet);
            }
        }
        Ok(cfg)
    }

    /// The address as smoltcp's type.
    pub fn addr(&self) -> Ipv4Address {
        Ipv4Address::from(self.addr)
    }

    /// Whether `other` is in this address's subnet.
    pub fn in_subnet(&self, other: [u8; 4]) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from_be_bytes(self.addr) & mask == u32::from_be_bytes(other) & mask
    }
}

impl fmt::Display for IpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{a}.{b}.{c}.{d}/{}", self.prefix)
    }
}

/// A decimal number of at most 3 digits (no sign, no leading `+`).
fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a dotted-quad IPv4 address.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut out {
        *o = u8::try_from(parse_decimal(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Decodes the MAC `NetAttach` returns: byte `i` in bits `8i..8i+8`.
pub fn mac_from_u64(v: u64) -> [u8; 6] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Displays a MAC as `02:00:00:aa:bb:cc`.
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// `d` in nanoseconds.
pub fn duration_ns(d: Duration) -> u64 {
    d.total_micros().saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::fake;
    use smoltcp::iface::SocketStorage;
    use smoltcp::socket::{tcp, udp};
    use smoltcp::wire::{IpAddress, IpEndpoint};

    /// Leaked socket storage (smoltcp is built without `alloc`).
    fn bytes(n: usize) -> &'static mut [u8] {
        Box::leak(vec![0u8; n].into_boxed_slice())
    }

    fn udp_socket() -> udp::Socket<'static> {
        let meta = || Box::leak(vec![udp::PacketMetadata::EMPTY; 4].into_boxed_slice());
        udp::Socket::new(
            udp::PacketBuffer::new(&mut meta()[..], bytes(2048)),
            udp::PacketBuffer::new(&mut meta()[..], bytes(2048)),
        )
    }

    #[test]
    fn ip_arguments() {
        let ok = IpConfig::parse(Some("10.0.0.10/24"), Some("10.0.0.1")).unwrap();
        assert_eq!(ok.addr, [10, 0, 0, 10]);
        assert_eq!(ok.prefix, 24);
        assert_eq!(ok.gateway, Some([10, 0, 0, 1]));
        assert_eq!(format!("{ok}"), "10.0.0.10/24");
        let a = Args::new(b"ip=192.168.1.2/16 x=1");
        assert_eq!(
            IpConfig::from_args(&a).unwrap(),
            IpConfig {
                addr: [192, 168, 1, 2],
                prefix: 16,
                gateway: None
            }
        );
        use ConfigError::*;
        for (ip, gw, e) in [
            (None, None, MissingIp),
            (Some("10.0.0.10"), None, BadIp),
            (Some("10.0.0.10/33"), None, BadIp),
            (Some("10.0.0.10/0"), None, BadIp),
            (Some("10.0.0.256/24"), None, BadIp),
            (Some("10.0.0/24"), None, BadIp),
            (Some("10.0.0.1.2/24"), None, BadIp),
            (Some("10.0.0.+1/24"), None, BadIp),
            (Some("10.0.0.1/"), None, BadIp),
            (Some("10.0.0.1/24"), Some("10.0.0"), BadGateway),
            (Some("10.0.0.1/24"), Some("10.0.1.1"), GatewayOutsideSubnet),
        ] {
            assert_eq!(IpConfig::parse(ip, gw), Err(e), "{ip:?} {gw:?}");
        }
        assert!(IpConfig::parse(Some("10.0.0.1/32"), None).is_ok());
    }

    #[test]
    fn mac_decoding() {
        let m = mac_from_u64(0x0000_5634_1200_0002);
        assert_eq!(m, [0x02, 0x00, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(format!("{}", MacDisplay(m)), "02:00:00:12:34:56");
    }

    /// A backend whose hypercalls do nothing: the test moves the frames itself.
    struct Nop;

    impl Backend for Nop {
        fn notify(&mut self) -> Result<u64, ErrorCode> {
            Ok(0)
        }
        fn wait(&mut self, _deadline_ns: u64) -> Result<(), ErrorCode> {
            Ok(())
        }
    }

    /// Carries every frame from `from`'s transmit ring into `to`'s receive ring.
    fn switch(from: u64, to: u64) -> usize {
        fake::take_tx(from, usize::MAX, |f| {
            fake::deliver(to, f);
            true
        })
    }

    /// Two smoltcp stacks on two NICs wired back to back: a TCP transfer of 100 KB
    /// (far more than the rings and socket buffers hold, so slots and buffers recycle)
    /// and a UDP datagram, with the clock driven by the test.
    #[test]
    fn two_stacks_talk_over_the_rings() {
        let mut a = PvNic::with_backend(fake::memory(), Nop, [2, 0, 0, 0, 0, 1]);
        let mut b = PvNic::with_backend(fake::memory(), Nop, [2, 0, 0, 0, 0, 2]);
        let (ra, rb) = (a.ring_addr(), b.ring_addr());
        let ca = IpConfig::parse(Some("10.0.0.1/24"), None).unwrap();
        let cb = IpConfig::parse(Some("10.0.0.2/24"), None).unwrap();
        let mut ia = interface(&mut a, &ca);
        let mut ib = interface(&mut b, &cb);

        let mut sa_store = [SocketStorage::EMPTY; 2];
        let mut sb_store = [SocketStorage::EMPTY; 2];
        let mut sa = SocketSet::new(&mut sa_store[..]);
        let mut sb = SocketSet::new(&mut sb_store[..]);
        let tcp_a = sa.add(tcp::Socket::new(
            tcp::SocketBuffer::new(bytes(4096)),
            tcp::SocketBuffer::new(bytes(4096)),
        ));
        let tcp_b = sb.add(tcp::Socket::new(
            tcp::SocketBuffer::new(bytes(8192)),
            tcp::SocketBuffer::new(bytes(8192)),
        ));
        let udp_b = sb.add(udp_socket());
        let udp_a = sa.add(udp_socket());
        sb.get_mut::<tcp::Socket>(tcp_b).listen(7).unwrap();
        sb.get_mut::<udp::Socket>(udp_b).bind(7).unwrap();
        sa.get_mut::<udp::Socket>(udp_a).bind(5000).unwrap();
        let b_addr = IpAddress::from(cb.addr());
        sa.get_mut::<tcp::Socket>(tcp_a)
            .connect(ia.context(), (b_addr, 7), 40000)
            .unwrap();
        sa.get_mut::<udp::Socket>(udp_a)
            .send_slice(b"ping", IpEndpoint::new(b_addr, 7))
            .unwrap();

        const TOTAL: usize = 100_000;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        let mut udp_got = None;
        let mut t = Instant::from_millis(0);
        for _ in 0..20_000 {
            t += Duration::from_millis(1);
            ia.poll(t, &mut a, &mut sa);
            ib.poll(t, &mut b, &mut sb);
            let s = sa.get_mut::<tcp::Socket>(tcp_a);
            if s.can_send() && sent < TOTAL {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            let s = sb.get_mut::<tcp::Socket>(tcp_b);
            if s.can_recv() {
                s.recv(|buf| {
                    got.extend_from_slice(buf);
                    (buf.len(), ())
                })
                .unwrap();
            }
            let u = sb.get_mut::<udp::Socket>(udp_b);
            if let Ok((d, meta)) = u.recv() {
                udp_got = Some((d.to_vec(), meta.endpoint.port));
            }
            a.flush();
            b.flush();
            switch(ra, rb);
            switch(rb, ra);
            if got.len() == TOTAL && udp_got.is_some() {
                break;
            }
        }
        assert_eq!(udp_got, Some((b"ping".to_vec(), 5000)));
        assert_eq!(got.len(), TOTAL);
        assert!(got == data, "bytes arrive in order, none lost");
        let (sa_, sb_) = (a.stats(), b.stats());
        assert!(sa_.tx_frames > (TOTAL / 1460) as u64);
        assert_eq!(sa_.rx_frames, sb_.tx_frames);
        assert_eq!(sb_.rx_frames, sa_.tx_frames);
        assert_eq!((sa_.rx_errors, sa_.tx_errors, sa_.ring_errors), (0, 0, 0));
    }

    /// A receive descriptor completed with an error is skipped and its buffer re-posted;
    /// a full transmit ring refuses tokens until the hypervisor completes frames.
    #[test]
    fn errors_and_a_full_ring() {
        let mut nic = PvNic::with_backend(fake::memory(), Nop, [2, 0, 0, 0, 0, 1]);
        let ring = nic.ring_addr();
        assert!(fake::deliver(ring, &[0u8; 2000])); // too big: error completion
        assert!(fake::deliver(ring, &[1u8; 60]));
        let t = Instant::from_millis(0);
        let (rx, _tx) = nic.receive(t).expect("the good frame");
        let first = phy::RxToken::consume(rx, |f| f.to_vec());
        assert_eq!(first, vec![1u8; 60]);
        assert!(nic.receive(t).is_none());
        assert_eq!(nic.stats().rx_errors, 1);
        assert_eq!(nic.stats().rx_frames, 1);
        for _ in 0..ring::SLOTS {
            let tok = nic.transmit(t).expect("a free slot");
            phy::TxToken::consume(tok, 60, |buf| buf.fill(0xab));
        }
        assert!(nic.transmit(t).is_none(), "all slots in flight");
        assert_eq!(fake::take_tx(ring, 1, |_| false), 1);
        let tok = nic.transmit(t).expect("a completed slot is free again");
        phy::TxToken::consume(tok, 60, |_| ());
        assert_eq!(nic.stats().tx_errors, 1);
        assert_eq!(nic.stats().tx_frames, ring::SLOTS as u64 + 1);
    }
}
