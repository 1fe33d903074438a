//! Networking: PCI discovery ([`pci`]), the e1000 driver ([`e1000`], ring logic in
//! [`ring`]), and a smoltcp TCP/IP stack on top of it ([`NetStack`]), plus the console
//! commands that use them ([`commands`]) and the `netbench` protocol ([`bench`](mod@bench)).
//!
//! Everything is polled: the main loop calls [`NetStack::poll`] often, and blocking
//! console commands (`ping`, `netbench`) poll in their own bounded loops. The stack is a
//! single smoltcp [`Interface`] with one IPv4 address on the e1000 and a [`SocketSet`]
//! that other subsystems share: the live-migration engine adds its own TCP sockets with
//! [`NetStack::add_tcp_socket`], drives them with [`NetStack::connect`] /
//! [`NetStack::listen`] and [`NetStack::tcp`], and relies on the main loop's `poll`.
//! A `netbench` sink always listens on TCP port [`bench::SINK_PORT`].
//!
//! Addressing: `ip=a.b.c.d/nn` on the kernel command line, else derived from the MAC
//! when it is one the project's emulator pairs use (52:54:00:12:34:xx gives
//! 10.0.0.(xx - 0x55)/24), else none until the `ip` command sets one.

pub mod bench;
pub mod commands;
pub mod e1000;
pub mod pci;
pub mod ring;
pub mod switch;

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpCidr, IpEndpoint, Ipv4Address,
};

use crate::arch::mmio::{Mmio, MmioError};
use crate::mm::frames::OutOfMemory;
use crate::mm::phys::PhysPages;
use crate::time;
use bench::{SinkVerifier, Verdict};
use e1000::{E1000Error, Stats, E1000};
use pci::{PciAddr, PortConfig};

/// The driver as it runs on the machine.
pub type Nic = E1000<Mmio, PhysPages>;

/// Receive descriptors: Bochs drops a frame when none is free, so be generous.
const RX_DESCS: usize = 256;
/// Transmit descriptors.
const TX_DESCS: usize = 128;
/// Size of the e1000 register window (BAR0 of the 82540EM).
const E1000_BAR_LEN: u64 = 128 * 1024;
/// PCI ids of the supported controllers: 82540EM (QEMU, Bochs), 82545EM copper.
const E1000_IDS: [(u16, u16); 2] = [(0x8086, 0x100e), (0x8086, 0x100f)];

/// Default TCP buffer size (each direction) for bulk sockets.
pub const TCP_BUF: usize = 128 * 1024;
/// Netbench sinks: connections `netbench` can run in parallel.
pub const SINKS: usize = 2;
/// Receive buffer of the netbench sink (its advertised window).
const SINK_RX_BUF: usize = 128 * 1024;
/// How long the sink waits for the sender to close after the trailer.
const SINK_LINGER_MS: i64 = 10_000;

/// Errors of the network layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetError {
    /// No supported Ethernet controller on the PCI bus.
    NoNic,
    /// The controller's BAR0 is not a usable memory BAR.
    BadBar(Option<u64>),
    /// The register window was refused.
    Mmio(MmioError),
    /// No memory for rings and buffers.
    OutOfMemory(OutOfMemory),
    /// The heap cannot hold a socket buffer of this many bytes.
    NoHeap(usize),
    /// The device did not come up.
    Device(E1000Error),
    /// This interface has no IPv4 address.
    NoAddress,
    /// The address cannot be used (not unicast).
    BadAddress(Ipv4Address),
    /// The link is down.
    LinkDown,
    /// The socket could not connect (invalid state or address).
    Connect(tcp::ConnectError),
    /// The socket could not listen (already open, port 0).
    Listen(tcp::ListenError),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoNic => write!(f, "no supported network card (e1000 8086:100e) found"),
            Self::BadBar(Some(a)) => write!(f, "e1000 BAR0 {a:#x} is not usable"),
            Self::BadBar(None) => write!(f, "e1000 has no memory BAR0"),
            Self::Mmio(e) => write!(f, "{e}"),
            Self::OutOfMemory(e) => write!(f, "network rings: {e}"),
            Self::NoHeap(n) => write!(f, "no heap for a {n}-byte socket buffer"),
            Self::Device(e) => write!(f, "{e}"),
            Self::NoAddress => write!(f, "no IPv4 address (set one with 'ip a.b.c.d/nn')"),
            Self::BadAddress(a) => write!(f, "{a} is not a unicast address"),
            Self::LinkDown => write!(f, "link is down"),
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Listen(e) => write!(f, "listen: {e}"),
        }
    }
}

/// Where the initial address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSource {
    /// `ip=` on the kernel command line.
    CommandLine,
    /// Derived from the MAC.
    Mac,
    /// The `ip` command.
    Console,
}

/// Finds `ip=a.b.c.d/nn` in a kernel command line.
pub fn cmdline_ip(cmdline: &str) -> Option<([u8; 4], u8)> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .and_then(|v| crate::console::args::parse_cidr(v).ok())
}

/// The address of an instance of the project's emulator pairs: MAC 52:54:00:12:34:xx
/// gives 10.0.0.(xx - 0x55)/24 (0x56 is .1, 0x57 is .2).
pub fn mac_derived_ip(mac: [u8; 6]) -> Option<([u8; 4], u8)> {
    if mac[..5] != [0x52, 0x54, 0x00, 0x12, 0x34] {
        return None;
    }
    let host = mac[5].checked_sub(0x55).filter(|h| (1..=254).contains(h))?;
    Some(([10, 0, 0, host], 24))
}

/// Formats a MAC address.
pub struct MacFmt(pub [u8; 6]);

impl fmt::Display for MacFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

enum SinkState {
    Receiving(SinkVerifier),
    Replying {
        trailer: [u8; bench::TRAILER_LEN],
        sent: usize,
    },
    Lingering {
        since: i64,
    },
    Closing,
}

/// The network stack: the e1000, a smoltcp interface and the shared socket set.
pub struct NetStack {
    pci: PciAddr,
    dev: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    addr_source: Option<AddrSource>,
    /// The netbench sinks: one listening socket per parallel connection.
    sinks: [(SocketHandle, SinkState); SINKS],
    sink_runs: u64,
    next_port: u16,
    /// Handles of dropped [`TcpSocket`]s, removed at the start of the next poll.
    released: Rc<RefCell<Vec<SocketHandle>>>,
    /// The guests' switch (the stack's frames go through it while guests have NICs).
    pub switch: switch::Switch,
}

/// A TCP socket with one owner: dropping it gives the socket back (its buffers are
/// freed at the start of the stack's next poll, before anything else runs), so no
/// path of its user can leak it. Not `Clone`.
pub struct TcpSocket {
    h: SocketHandle,
    released: Rc<RefCell<Vec<SocketHandle>>>,
}

impl TcpSocket {
    /// The handle, for [`NetStack::tcp`].
    pub fn h(&self) -> SocketHandle {
        self.h
    }
}

impl Drop for TcpSocket {
    fn drop(&mut self) {
        self.released.borrow_mut().push(self.h);
    }
}

/// smoltcp's clock: milliseconds of the TSC clock.
pub fn now() -> Instant {
    Instant::from_micros(time::now_us() as i64)
}

impl NetStack {
    /// Finds the e1000 on the PCI bus, brings it up and builds the stack. `cmdline` is
    /// the kernel command line (for `ip=`).
    pub fn init(cmdline: &str) -> Result<Self, NetError> {
        let cs = PortConfig;
        let dev = pci::enumerate(&cs)
            .into_iter()
            .find(|d| E1000_IDS.contains(&(d.vendor, d.device)))
            .ok_or(NetError::NoNic)?;
        let bar = dev.mem_bar(0).ok_or(NetError::BadBar(None))?;
        if bar >= 1 << 32 {
            return Err(NetError::BadBar(Some(bar)));
        }
        let mmio = Mmio::new(bar, E1000_BAR_LEN).map_err(NetError::Mmio)?;
        pci::enable_mem_and_dma(&cs, dev.addr);
        let alloc = |bytes: usize| {
            PhysPages::alloc(bytes.div_ceil(crate::mm::PAGE_SIZE as usize))
                .map_err(NetError::OutOfMemory)
        };
        let nic = E1000::init(
            mmio,
            alloc(RX_DESCS * ring::DESC_SIZE)?,
            alloc(RX_DESCS * e1000::BUF_SIZE)?,
            alloc(TX_DESCS * ring::DESC_SIZE)?,
            alloc(TX_DESCS * e1000::BUF_SIZE)?,
        )
        .map_err(NetError::Device)?;
        Ok(Self::with_device(dev.addr, nic, cmdline))
    }

    fn with_device(pci: PciAddr, mut dev: Nic, cmdline: &str) -> Self {
        let mac = dev.mac();
        let mut config = Config::new(EthernetAddress(mac).into());
        config.random_seed = time::now()
            ^ u64::from_le_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
        let iface = Interface::new(config, &mut dev, now());
        let mut sockets = SocketSet::new(vec![]);
        let sinks = [(); SINKS].map(|()| {
            let mut sink = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; SINK_RX_BUF]),
                tcp::SocketBuffer::new(vec![0; 256]),
            );
            configure(&mut sink);
            (sockets.add(sink), SinkState::Receiving(SinkVerifier::new()))
        });
        let mut s = Self {
            pci,
            dev,
            iface,
            sockets,
            addr_source: None,
            sinks,
            sink_runs: 0,
            next_port: 49152 + (time::now() % 8192) as u16,
            released: Rc::new(RefCell::new(Vec::new())),
            switch: switch::Switch::default(),
        };
        let initial = cmdline_ip(cmdline)
            .map(|a| (a, AddrSource::CommandLine))
            .or_else(|| mac_derived_ip(mac).map(|a| (a, AddrSource::Mac)));
        if let Some(((ip, prefix), src)) = initial {
            match s.set_ipv4(Ipv4Address::from(ip), prefix) {
                Ok(()) => s.addr_source = Some(src),
                Err(e) => log::warn!("net: initial address: {e}"),
            }
        } else {
            s.announce();
        }
        s
    }

    /// Runs the stack once: receives what the card has, runs the sockets' timers, sends
    /// what they queued, and services the netbench sink. Returns whether anything
    /// happened that a waiting loop may care about.
    pub fn poll(&mut self) -> bool {
        // The blocking console commands (ping, netbench) loop on this: drain the
        // console's output queue here too.
        crate::arch::serial::pump();
        self.release_dropped();
        let mut active = false;
        // A few rounds so that replies to frames received in this call go out now.
        for _ in 0..4 {
            let r = if self.switch.active() {
                let mut dev = SwitchDev {
                    mac: self.dev.mac(),
                    nic: &mut self.dev,
                    sw: &mut self.switch,
                };
                self.iface.poll(now(), &mut dev, &mut self.sockets)
            } else {
                self.iface.poll(now(), &mut self.dev, &mut self.sockets)
            };
            let sink = self.service_sink();
            let changed = r == smoltcp::iface::PollResult::SocketStateChanged;
            active |= changed || sink;
            if !changed && !sink && !self.dev.rx_pending() {
                break;
            }
        }
        active
    }

    /// Makes the switch's ports those of the guests with an attached NIC (id, MAC);
    /// the first one turns on unicast promiscuity on the e1000.
    pub fn sync_guests(&mut self, guests: &[(u32, [u8; 6])]) {
        if self.switch.sync(guests) {
            self.dev.set_unicast_promiscuous(true);
        }
    }

    /// A frame guest `id` sent: to other guests, the stack, or out of the e1000.
    pub fn guest_tx(&mut self, id: u32, frame: Vec<u8>) {
        if let Some(f) = self.switch.from_guest(self.dev.mac(), id, frame) {
            // A full transmit ring drops it (counted by the driver); TCP retransmits.
            let _ = self.dev.send_with(f.len(), |b| b.copy_from_slice(&f));
        }
    }

    /// Sends the announcements that are due (guests that arrived here).
    pub fn announce_guests(&mut self) {
        let dev = &mut self.dev;
        self.switch.due_announces(time::now_us(), |f| {
            let _ = dev.send_with(f.len(), |b| b.copy_from_slice(f));
        });
    }

    /// How long until the stack needs polling again (for callers that want to idle).
    pub fn poll_delay_us(&mut self) -> Option<u64> {
        self.iface
            .poll_delay(now(), &self.sockets)
            .map(|d| d.total_micros())
    }

    /// One line for the boot log: MAC, PCI address, link, address.
    pub fn summary(&self) -> alloc::string::String {
        let ip = match self.ipv4() {
            Some((a, p)) => alloc::format!("{a}/{p}"),
            None => alloc::string::String::from("none"),
        };
        alloc::format!(
            "e1000 {} at {}, link {}, ip {ip}, netbench sink on tcp/{}",
            MacFmt(self.mac()),
            self.pci,
            if self.link_up() { "up" } else { "down" },
            bench::SINK_PORT
        )
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac()
    }

    /// Where the card sits on the PCI bus.
    pub fn pci_addr(&self) -> PciAddr {
        self.pci
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.dev.link_up()
    }

    /// The driver's counters.
    pub fn stats(&mut self) -> Stats {
        self.dev.stats()
    }

    /// Ring sizes (receive, transmit).
    pub fn ring_sizes(&self) -> (u32, u32) {
        self.dev.ring_sizes()
    }

    /// The IPv4 address and prefix length, if set.
    pub fn ipv4(&self) -> Option<(Ipv4Address, u8)> {
        self.iface
            .ip_addrs()
            .iter()
            .map(|c| match c {
                IpCidr::Ipv4(c) => (c.address(), c.prefix_len()),
            })
            .next()
    }

    /// Where the current address came from.
    pub fn addr_source(&self) -> Option<AddrSource> {
        self.addr_source
    }

    /// Sets the (only) IPv4 address. Open connections keep their old local address and
    /// will fail; the neighbour cache is flushed.
    pub fn set_ipv4(&mut self, addr: Ipv4Address, prefix: u8) -> Result<(), NetError> {
        if !IpAddress::Ipv4(addr).is_unicast() || prefix > 32 {
            return Err(NetError::BadAddress(addr));
        }
        self.iface.update_ip_addrs(|a| {
            a.clear();
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), prefix));
        });
        self.addr_source = Some(AddrSource::Console);
        self.announce();
        Ok(())
    }

    /// Broadcasts a gratuitous ARP for the current address (an ARP probe from 0.0.0.0
    /// without one). Peers update their caches, and switches learn where this MAC is:
    /// Bochs' `bxhub` forwards unicast frames only to MACs it has seen in a broadcast,
    /// so without this a peer's replies would reach us but its requests would not.
    pub fn announce(&mut self) {
        let mac = EthernetAddress(self.mac());
        let ip = self.ipv4().map_or(Ipv4Address::UNSPECIFIED, |(a, _)| a);
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: mac,
            source_protocol_addr: ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: ip,
        };
        let eth = EthernetRepr {
            src_addr: mac,
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let len = eth.buffer_len() + arp.buffer_len();
        let sent = self.dev.send_with(len, |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
        if sent.is_none() {
            log::warn!("net: could not send the ARP announcement (transmit ring full)");
        }
    }

    /// Checks that the stack can reach a peer: address set, link up.
    pub fn ready(&self) -> Result<(), NetError> {
        if self.ipv4().is_none() {
            return Err(NetError::NoAddress);
        }
        if !self.link_up() {
            return Err(NetError::LinkDown);
        }
        Ok(())
    }

    /// The smoltcp interface (for anything the methods here do not cover).
    pub fn interface(&mut self) -> &mut Interface {
        &mut self.iface
    }

    /// The shared socket set. Do not remove sockets you did not add.
    pub fn sockets(&mut self) -> &mut SocketSet<'static> {
        &mut self.sockets
    }

    /// Adds a TCP socket with `rx`/`tx` bytes of buffer (see [`TCP_BUF`]; above 64 KiB
    /// smoltcp uses window scaling). Nagle is off: bulk senders fill whole segments
    /// anyway and request/response exchanges should not wait.
    pub fn add_tcp_socket(&mut self, rx: usize, tx: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        configure(&mut s);
        self.sockets.add(s)
    }

    /// The TCP socket behind `h` (a handle from [`NetStack::add_tcp_socket`]; smoltcp
    /// panics on a handle of another set or kind, which is a caller bug).
    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Starts connecting `h` to `addr:port` from an ephemeral local port. Progress
    /// happens in [`NetStack::poll`]; watch `tcp(h).state()` / `may_send()`.
    pub fn connect(
        &mut self,
        h: SocketHandle,
        addr: Ipv4Address,
        port: u16,
    ) -> Result<(), NetError> {
        self.ready()?;
        let local = self.ephemeral_port();
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, IpEndpoint::new(IpAddress::Ipv4(addr), port), local)
            .map_err(NetError::Connect)
    }

    /// Puts `h` into LISTEN on `port` (one connection per socket; re-listen after it
    /// closes to accept the next).
    pub fn listen(&mut self, h: SocketHandle, port: u16) -> Result<(), NetError> {
        self.tcp(h).listen(port).map_err(NetError::Listen)
    }

    /// Removes a socket added with [`NetStack::add_tcp_socket`] (abort or close it
    /// first; a removed socket sends nothing more).
    pub fn remove_socket(&mut self, h: SocketHandle) {
        if !self.is_sink(h) {
            self.sockets.remove(h);
        }
    }

    /// Opens a TCP socket owned by the caller (see [`TcpSocket`]), with `rx`/`tx` bytes
    /// of buffer allocated fallibly: a full heap fails the request, not the hypervisor.
    pub fn open_tcp(&mut self, rx: usize, tx: usize) -> Result<TcpSocket, NetError> {
        self.release_dropped();
        let buf = |n: usize| -> Result<Vec<u8>, NetError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| NetError::NoHeap(n))?;
            v.resize(n, 0);
            Ok(v)
        };
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(buf(rx)?),
            tcp::SocketBuffer::new(buf(tx)?),
        );
        configure(&mut s);
        Ok(TcpSocket {
            h: self.sockets.add(s),
            released: self.released.clone(),
        })
    }

    /// Removes the sockets whose owners dropped them.
    fn release_dropped(&mut self) {
        let dropped = core::mem::take(&mut *self.released.borrow_mut());
        for h in dropped {
            if !self.is_sink(h) {
                self.sockets.remove(h);
            }
        }
    }

    /// Sockets in the set (the netbench sink included), for `mem`.
    pub fn socket_count(&self) -> usize {
        self.sockets.iter().count()
    }

    /// A local port for an outgoing connection (49152..65535, cycling).
    pub fn ephemeral_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p == u16::MAX { 49152 } else { p + 1 };
        p
    }

    /// Completed sink connections since boot.
    pub fn sink_runs(&self) -> u64 {
        self.sink_runs
    }

    fn is_sink(&self, h: SocketHandle) -> bool {
        self.sinks.iter().any(|(s, _)| *s == h)
    }

    /// Advances the netbench sinks; returns whether any did anything.
    fn service_sink(&mut self) -> bool {
        let mut did = false;
        for i in 0..SINKS {
            did |= self.service_one_sink(i);
        }
        did
    }

    fn service_one_sink(&mut self, i: usize) -> bool {
        let now_ms = time::now_ms();
        let (h, sink_state) = &mut self.sinks[i];
        let sock = self.sockets.get_mut::<tcp::Socket>(*h);
        match sock.state() {
            tcp::State::Closed => {
                let _ = sock.listen(bench::SINK_PORT);
                *sink_state = SinkState::Receiving(SinkVerifier::new());
                return false;
            }
            tcp::State::Listen | tcp::State::SynReceived => return false,
            _ => {}
        }
        let mut did = false;
        match sink_state {
            SinkState::Receiving(v) => {
                while sock.can_recv() && !v.complete() {
                    match sock.recv(|buf| {
                        let n = v.feed(buf);
                        (n, n)
                    }) {
                        Ok(n) if n > 0 => did = true,
                        _ => break,
                    }
                }
                if v.complete() || !sock.may_recv() {
                    let verdict = v.verdict();
                    if verdict != Verdict::Ok {
                        log::warn!(
                            "netbench sink: {verdict} after {} bytes (first bad byte {:?})",
                            v.received,
                            v.first_bad
                        );
                    }
                    *sink_state = SinkState::Replying {
                        trailer: bench::trailer(v.received, verdict),
                        sent: 0,
                    };
                    did = true;
                }
            }
            SinkState::Replying { trailer, sent } => {
                if sock.may_send() {
                    *sent += sock.send_slice(&trailer[*sent..]).unwrap_or(0);
                    if *sent == trailer.len() {
                        *sink_state = SinkState::Lingering { since: now_ms };
                        self.sink_runs += 1;
                        did = true;
                    }
                } else {
                    sock.abort();
                    *sink_state = SinkState::Closing;
                }
            }
            SinkState::Lingering { since } => {
                // Drain anything further; close once the sender has closed.
                while sock.can_recv() {
                    if sock.recv(|b| (b.len(), ())).is_err() {
                        break;
                    }
                }
                if !sock.may_recv() {
                    sock.close();
                    *sink_state = SinkState::Closing;
                    did = true;
                } else if now_ms - *since > SINK_LINGER_MS {
                    sock.abort();
                    *sink_state = SinkState::Closing;
                }
            }
            SinkState::Closing => {
                if sock.state() == tcp::State::TimeWait {
                    // Re-listen now rather than after the 2*MSL wait.
                    sock.abort();
                }
            }
        }
        did
    }
}

/// Settings of every TCP socket. Nagle is off: bulk senders fill whole segments anyway
/// and request/response exchanges should not wait. Keep-alive: smoltcp 0.12 sends no
/// zero-window probes, so when a receiver's window is full and the ACK that reopens it
/// is lost, the sender would wait for ever (seen as a migration stalling under 5 %
/// loss); a keep-alive segment every second while idle makes the peer repeat its window.
/// The stack's view of the e1000 while guests are on the switch: frames for the
/// guests are taken off to their queues, the guests' frames for the hypervisor come
/// in, and the stack's own frames reach local guests too. One copy per frame, paid
/// only while a guest has a NIC.
struct SwitchDev<'a> {
    mac: [u8; 6],
    nic: &'a mut Nic,
    sw: &'a mut switch::Switch,
}

/// A received frame (a copy).
struct OwnedRx(Vec<u8>);

impl smoltcp::phy::RxToken for OwnedRx {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        f(&self.0)
    }
}

/// A frame the stack sends through the switch.
struct SwitchTx<'a> {
    nic: &'a mut Nic,
    sw: &'a mut switch::Switch,
}

impl smoltcp::phy::TxToken for SwitchTx<'_> {
    fn consume<T, F: FnOnce(&mut [u8]) -> T>(self, len: usize, f: F) -> T {
        let mut buf = [0u8; e1000::BUF_SIZE];
        if len > buf.len() {
            // Longer than any frame (smoltcp stays within the MTU): built, not sent.
            return f(&mut vec![0; len]);
        }
        let out = f(&mut buf[..len]);
        if self.sw.from_host(&buf[..len]) {
            let _ = self.nic.send_with(len, |b| b.copy_from_slice(&buf[..len]));
        }
        out
    }
}

impl smoltcp::phy::Device for SwitchDev<'_> {
    type RxToken<'b>
        = OwnedRx
    where
        Self: 'b;
    type TxToken<'b>
        = SwitchTx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = match self.sw.pop_host() {
            Some(f) => f,
            None => loop {
                let (mac, sw) = (self.mac, &mut *self.sw);
                // Frames for the guests only are consumed here; the loop ends when one
                // is for the stack or none is left.
                if let Some(f) = self
                    .nic
                    .receive_with(|f| sw.from_uplink(mac, f).map(|f| f.to_vec()))?
                {
                    break f;
                }
            },
        };
        Some((
            OwnedRx(frame),
            SwitchTx {
                nic: self.nic,
                sw: self.sw,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        if !self.nic.tx_room() {
            return None;
        }
        Some(SwitchTx {
            nic: self.nic,
            sw: self.sw,
        })
    }

    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.nic.capabilities()
    }
}

fn configure(s: &mut tcp::Socket<'_>) {
    s.set_nagle_enabled(false);
    s.set_keep_alive(Some(smoltcp::time::Duration::from_millis(1000)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_cmdline_and_mac() {
        assert_eq!(
            cmdline_ip("log=info ip=192.168.1.5/16"),
            Some(([192, 168, 1, 5], 16))
        );
        assert_eq!(cmdline_ip("ip=bad"), None);
        assert_eq!(cmdline_ip(""), None);
        assert_eq!(
            mac_derived_ip([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            Some(([10, 0, 0, 1], 24))
        );
        assert_eq!(
            mac_derived_ip([0x52, 0x54, 0, 0x12, 0x34, 0x57]),
            Some(([10, 0, 0, 2], 24))
        );
        assert_eq!(mac_derived_ip([0x52, 0x54, 0, 0x12, 0x34, 0x55]), None);
        assert_eq!(mac_derived_ip([0x52, 0x54, 0, 0x12, 0x34, 0x10]), None);
        assert_eq!(mac_derived_ip([0x52, 0x54, 0, 0, 0, 1]), None);
        assert_eq!(
            MacFmt([0x52, 0x54, 0, 0x12, 0x34, 0x56]).to_string(),
            "52:54:00:12:34:56"
        );
    }
}
