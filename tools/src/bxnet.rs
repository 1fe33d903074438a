//! A host endpoint on the Bochs virtual Ethernet, for test tools that must talk TCP to a
//! hypervisor (for example to send it a malformed migration stream).
//!
//! Bochs' `socket` network module exchanges raw Ethernet frames as UDP datagrams on
//! loopback: an instance receives on port P and sends to P+1, and the lab's
//! [`hub`](crate::hub) forwards between the members' ports. This endpoint takes a hub port
//! like an instance would and runs smoltcp over it, so everything stays on 127.0.0.1 and
//! no TAP device or host routing is involved.

use std::net::UdpSocket;
use std::time::{Duration, Instant as StdInstant};

use hypervisor::migration::link::{Link, LinkState};
use hypervisor::migration::secure::{MigrationKey, NonceError, NonceSource, SecureChannel};
use serde::Serialize;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

struct UdpEth {
    sock: UdpSocket,
    tx_port: u16,
    buf: Vec<u8>,
    /// What the frames in both directions say about the TCP connection (smoltcp keeps
    /// no such counters, and a migration's cost shows up as retransmissions).
    wire: TcpWire,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a UdpSocket, u16, &'a mut TcpWire);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.2.frame(&frame, true);
        let _ = self.0.send_to(&frame, ("127.0.0.1", self.1));
        r
    }
}

impl Device for UdpEth {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        match self.sock.recv(&mut self.buf) {
            Ok(n) => {
                self.wire.frame(&self.buf[..n], false);
                let tx = Tx(&self.sock, self.tx_port, &mut self.wire);
                Some((Rx(self.buf[..n].to_vec()), tx))
            }
            Err(_) => None,
        }
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.sock, self.tx_port, &mut self.wire))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// TCP segments of the endpoint's connection as seen on its wire, counted at the device
/// layer because smoltcp 0.12 exposes no retransmission counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WireStats {
    /// TCP segments sent (all of this endpoint's connections).
    pub segments_sent: u64,
    /// TCP segments received for this endpoint's IP.
    pub segments_received: u64,
    /// Segments we sent that started below the highest sequence number already sent:
    /// our retransmissions (timeouts and fast retransmits alike).
    pub retransmitted: u64,
    /// Segments received whose sequence space had all arrived before: the peer's
    /// retransmissions of segments that got through (or duplicates made on the way).
    /// A peer's retransmission of a segment that was lost arrives only once and cannot
    /// be told apart here.
    pub duplicates_received: u64,
    /// Segments received with RST set.
    pub resets_received: u64,
    /// Segments sent with RST set.
    pub resets_sent: u64,
}

impl WireStats {
    /// What was counted since `earlier` (a snapshot of the same endpoint).
    pub fn since(&self, earlier: &WireStats) -> WireStats {
        WireStats {
            segments_sent: self.segments_sent.saturating_sub(earlier.segments_sent),
            segments_received: self
                .segments_received
                .saturating_sub(earlier.segments_received),
            retransmitted: self.retransmitted.saturating_sub(earlier.retransmitted),
            duplicates_received: self
                .duplicates_received
                .saturating_sub(earlier.duplicates_received),
            resets_received: self.resets_received.saturating_sub(earlier.resets_received),
            resets_sent: self.resets_sent.saturating_sub(earlier.resets_sent),
        }
    }
}

/// The sequence space of the connection last seen on the wire.
#[derive(Default)]
struct TcpWire {
    stats: WireStats,
    /// (local port, remote address, remote port) of the connection tracked.
    flow: Option<([u8; 2], [u8; 4], [u8; 2])>,
    /// One past the highest sequence number sent / received on it.
    snd_max: Option<i32>,
    rcv_max: Option<i32>,
}

impl TcpWire {
    /// Accounts one Ethernet frame (`outgoing`: sent by us). Anything but TCP over IPv4
    /// is ignored; so are frames too short to parse.
    fn frame(&mut self, frame: &[u8], outgoing: bool) {
        use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return;
        }
        let Ok(seg) = TcpPacket::new_checked(ip.payload()) else {
            return;
        };
        let (local, remote, remote_ip) = if outgoing {
            (seg.src_port(), seg.dst_port(), ip.dst_addr())
        } else {
            (seg.dst_port(), seg.src_port(), ip.src_addr())
        };
        let flow = (
            local.to_be_bytes(),
            remote_ip.octets(),
            remote.to_be_bytes(),
        );
        if self.flow != Some(flow) {
            if !outgoing {
                // Not (yet) our connection: a stray, or the SYN before our SYN-ACK.
                self.stats.segments_received += 1;
                self.stats.resets_received += u64::from(seg.rst());
                return;
            }
            // We sent on a new connection (one socket per endpoint): start over.
            *self = Self {
                stats: self.stats,
                flow: Some(flow),
                ..Self::default()
            };
        }
        let len = seg.payload().len() as i32 + i32::from(seg.syn()) + i32::from(seg.fin());
        let start = seg.seq_number().0;
        let end = start.wrapping_add(len);
        // Sequence numbers compare modulo 2^32 (RFC 793 3.3).
        let before = |a: i32, b: i32| a.wrapping_sub(b) < 0;
        let st = &mut self.stats;
        if outgoing {
            st.segments_sent += 1;
            st.resets_sent += u64::from(seg.rst());
            if len > 0 {
                if self.snd_max.is_some_and(|m| before(start, m)) {
                    st.retransmitted += 1;
                }
                if self.snd_max.is_none_or(|m| before(m, end)) {
                    self.snd_max = Some(end);
                }
            }
        } else {
            st.segments_received += 1;
            st.resets_received += u64::from(seg.rst());
            if len > 0 {
                match self.rcv_max {
                    Some(m) if !before(m, end) => st.duplicates_received += 1,
                    _ => self.rcv_max = Some(end),
                }
            }
        }
    }
}

/// Handshake nonces from the host's RNG.
pub struct HostRng;

impl NonceSource for HostRng {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError> {
        getrandom::fill(buf).map_err(|_| NonceError)
    }
}

/// A smoltcp endpoint on a hub port.
///
/// Speaks the hypervisors' secure migration channel once [`BxEndpoint::secure`] has
/// run on a connection (then `send_all`/`recv_until_close` carry plaintext through it),
/// and can misbehave below it: corrupt a byte on the wire, or replay raw bytes it sent.
pub struct BxEndpoint {
    dev: UdpEth,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
    epoch: StdInstant,
    next_port: u16,
    chan: Option<SecureChannel>,
    /// Raw bytes sent on the current connection (handshake and records).
    raw_sent: Vec<u8>,
    /// Flip the low bit of the byte at this raw offset when it is sent.
    flip_at: Option<usize>,
}

/// The endpoint's TCP socket as the channel's inner link.
impl Link for BxEndpoint {
    fn state(&mut self) -> LinkState {
        self.poll();
        let s = self.socket();
        match s.state() {
            tcp::State::SynSent | tcp::State::SynReceived => LinkState::Connecting,
            tcp::State::Established => LinkState::Open,
            _ if s.can_recv() || s.may_recv() => LinkState::Open,
            _ => LinkState::Closed,
        }
    }

    fn send(&mut self, data: &[u8]) -> usize {
        let off = self.raw_sent.len();
        let mut buf = data.to_vec();
        let flip = self
            .flip_at
            .filter(|at| (off..off + buf.len()).contains(at))
            .map(|at| at - off);
        if let Some(i) = flip {
            buf[i] ^= 1;
        }
        let s = self.socket();
        if !s.can_send() {
            return 0;
        }
        let n = s.send_slice(&buf).unwrap_or(0);
        if flip.is_some_and(|i| i < n) {
            self.flip_at = None;
        }
        self.raw_sent.extend_from_slice(&data[..n]);
        n
    }

    fn queued(&mut self) -> usize {
        self.socket().send_queue()
    }

    fn recv(&mut self, buf: &mut [u8]) -> usize {
        let s = self.socket();
        if !s.can_recv() {
            return 0;
        }
        s.recv_slice(buf).unwrap_or(0)
    }

    fn close(&mut self) {
        self.socket().close();
    }
}

impl BxEndpoint {
    /// Joins the hub at UDP `rx_port` (the hub sends to it; we send to `rx_port + 1`)
    /// with `mac` and `ip`/24.
    pub fn new(rx_port: u16, mac: [u8; 6], ip: [u8; 4]) -> Result<Self, String> {
        let sock = UdpSocket::bind(("127.0.0.1", rx_port))
            .map_err(|e| format!("bind UDP {rx_port}: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut dev = UdpEth {
            sock,
            tx_port: rx_port + 1,
            buf: vec![0; 65536],
            wire: TcpWire::default(),
        };
        let epoch = StdInstant::now();
        let cfg = Config::new(EthernetAddress(mac).into());
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), 24));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        let tcp = sockets.add(s);
        Ok(Self {
            dev,
            iface,
            sockets,
            tcp,
            epoch,
            next_port: 49152 + (std::process::id() % 10000) as u16,
            chan: None,
            raw_sent: Vec::new(),
            flip_at: None,
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Runs `f` over the channel's view of this connection (plaintext in and out).
    fn with_chan<R>(&mut self, f: impl FnOnce(&mut dyn Link) -> R) -> Option<R> {
        let mut chan = self.chan.take()?;
        let now = self.now_us();
        let r = f(&mut chan.link(self, now));
        self.chan = Some(chan);
        Some(r)
    }

    /// Runs the secure handshake as the initiator (a migration source) with `key_hex`
    /// on the open connection; from then on `send_all` and `recv_until_close` carry
    /// plaintext through the channel. Fails with the channel's error (wrong key, ...).
    pub fn secure(&mut self, key_hex: &str, timeout: Duration) -> Result<(), String> {
        let key = MigrationKey::from_hex(key_hex).map_err(|e| e.to_string())?;
        let chan = SecureChannel::initiator(&key, &mut HostRng, self.now_us())
            .map_err(|e| e.to_string())?;
        self.chan = Some(chan);
        let deadline = StdInstant::now() + timeout;
        loop {
            self.with_chan(|l| l.state());
            if let Some(c) = &self.chan {
                if c.is_established() {
                    return Ok(());
                }
                if let Some(e) = c.error() {
                    return Err(format!("secure channel: {e}"));
                }
            }
            if StdInstant::now() > deadline {
                return Err(format!("secure handshake: timed out after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Why the secure channel failed, if it did.
    pub fn channel_error(&self) -> Option<String> {
        self.chan.as_ref()?.error().map(|e| e.to_string())
    }

    /// The raw bytes sent on the current connection so far (for a replay).
    pub fn raw_sent(&self) -> &[u8] {
        &self.raw_sent
    }

    /// Corrupts (flips the low bit of) the byte at raw offset `at` of the current
    /// connection when it goes out: a tampered record.
    pub fn flip_wire_byte(&mut self, at: usize) {
        self.flip_at = Some(at);
    }

    /// Sends raw bytes below the channel (a replay, or a plaintext peer).
    pub fn send_raw_all(&mut self, data: &[u8], timeout: Duration) -> Result<(), String> {
        let chan = self.chan.take();
        let r = self.send_all(data, timeout);
        self.chan = chan;
        r
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    /// Polls the stack once.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    /// The TCP counters seen on the wire since this endpoint was made.
    pub fn wire_stats(&self) -> WireStats {
        self.dev.wire.stats
    }

    /// Turns Nagle's algorithm on or off (on by default, as smoltcp has it). A latency
    /// probe sending small chunks turns it off, or each chunk waits for the previous
    /// one's ACK (and the peer's delayed ACK).
    pub fn set_nagle(&mut self, on: bool) {
        self.socket().set_nagle_enabled(on);
    }

    /// The TCP socket itself, for a client that drives it directly (see
    /// [`crate::echo`]).
    pub(crate) fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp)
    }

    /// Opens a TCP connection to `ip:port`.
    pub fn connect(&mut self, ip: [u8; 4], port: u16, timeout: Duration) -> Result<(), String> {
        self.start_connect(ip, port)?;
        self.wait(timeout, |s| s.may_send(), "TCP connection")
    }

    /// Drops any previous connection and starts one to `ip:port` from a fresh port.
    fn start_connect(&mut self, ip: [u8; 4], port: u16) -> Result<(), String> {
        self.chan = None;
        self.raw_sent.clear();
        self.flip_at = None;
        let remote = (Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]), port);
        if self.socket().state() != tcp::State::Closed {
            self.socket().abort();
            self.poll();
        }
        self.next_port = self.next_port.wrapping_add(1).max(49152);
        let ctx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(self.tcp)
            .connect(ctx, remote, self.next_port)
            .map_err(|e| format!("connect: {e}"))
    }

    /// Listens on TCP `port` for the next connection, dropping any current one (and its
    /// secure channel). One connection at a time: call again once it is over to accept
    /// the next; see [`Self::accepted`].
    pub fn listen(&mut self, port: u16) -> Result<(), String> {
        self.chan = None;
        self.raw_sent.clear();
        self.flip_at = None;
        if self.socket().is_open() {
            self.socket().abort();
            self.poll();
        }
        self.socket()
            .listen(port)
            .map_err(|e| format!("listen on port {port}: {e}"))
    }

    /// Polls the stack; once a peer has connected to the listening socket (its SYN
    /// arrived), the peer's address as `ip:port`.
    pub fn accepted(&mut self) -> Option<String> {
        self.poll();
        let s = self.socket();
        match s.state() {
            tcp::State::Listen | tcp::State::Closed => None,
            _ => Some(
                s.remote_endpoint()
                    .map_or_else(|| "?".to_string(), |e| e.to_string()),
            ),
        }
    }

    /// Waits (at most `timeout`) until what was sent has been acknowledged and the
    /// connection has closed, then drops it: the end of an accepted connection whose
    /// channel already queued its close.
    pub fn linger(&mut self, timeout: Duration) {
        let deadline = StdInstant::now() + timeout;
        while StdInstant::now() < deadline {
            self.poll();
            let s = self.socket();
            if s.send_queue() == 0 {
                s.close(); // FIN after everything queued (idempotent)
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.abort();
    }

    /// Sends a SYN to `ip:port` and then goes silent (the caller does not poll until
    /// it is done): the peer is left with a half-open handshake, as after a SYN scan.
    pub fn syn_only(&mut self, ip: [u8; 4], port: u16) -> Result<(), String> {
        self.start_connect(ip, port)?;
        // A few polls: ARP first, then the SYN.
        for _ in 0..50 {
            self.poll();
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn wait(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&tcp::Socket) -> bool,
        what: &str,
    ) -> Result<(), String> {
        let deadline = StdInstant::now() + timeout;
        loop {
            self.poll();
            let s = self.socket();
            if done(s) {
                return Ok(());
            }
            if !s.is_open() {
                return Err(format!("{what}: connection closed"));
            }
            if StdInstant::now() > deadline {
                return Err(format!("{what}: timed out after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends all of `data` (through the channel once [`Self::secure`] ran).
    pub fn send_all(&mut self, data: &[u8], timeout: Duration) -> Result<(), String> {
        let deadline = StdInstant::now() + timeout;
        let mut off = 0;
        while self.chan.is_some() {
            let r = self.with_chan(|l| {
                let n = l.send(&data[off..]);
                (n, l.state(), l.queued())
            });
            let Some((n, state, queued)) = r else { break };
            off += n;
            if off == data.len() && queued == 0 {
                return Ok(());
            }
            if state == LinkState::Closed {
                let why = self.channel_error().unwrap_or("connection closed".into());
                return Err(format!("send: {why} after {off} bytes"));
            }
            if StdInstant::now() > deadline {
                return Err(format!(
                    "send: timed out after {off} of {} bytes",
                    data.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        while off < data.len() {
            self.poll();
            let s = self.socket();
            if !s.may_send() {
                return Err(format!("send: connection closed after {off} bytes"));
            }
            if s.can_send() {
                off += s
                    .send_slice(&data[off..])
                    .map_err(|e| format!("send: {e}"))?;
            }
            if StdInstant::now() > deadline {
                return Err(format!(
                    "send: timed out after {off} of {} bytes",
                    data.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Receives one line (plain TCP, no channel) up to `\n`, which is not returned.
    pub fn recv_line(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = StdInstant::now() + timeout;
        let mut out = Vec::new();
        loop {
            self.poll();
            let s = self.socket();
            if s.can_recv() {
                let done = s
                    .recv(|b| {
                        let n = b
                            .iter()
                            .position(|c| *c == b'\n')
                            .map_or(b.len(), |i| i + 1);
                        out.extend_from_slice(&b[..n]);
                        (n, out.last() == Some(&b'\n'))
                    })
                    .map_err(|e| format!("recv: {e}"))?;
                if done {
                    out.pop();
                    return String::from_utf8(out).map_err(|_| "reply is not UTF-8".to_string());
                }
            } else if !s.may_recv() {
                return Err(format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&out)
                ));
            }
            if StdInstant::now() > deadline {
                return Err(format!(
                    "no full line within {timeout:?}: {:?}",
                    String::from_utf8_lossy(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Receives until the peer closes or `timeout`; returns what arrived (plaintext
    /// through the channel once [`Self::secure`] ran).
    pub fn recv_until_close(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = StdInstant::now() + timeout;
        let mut out = Vec::new();
        while self.chan.is_some() && StdInstant::now() < deadline {
            let mut buf = [0u8; 4096];
            let Some((n, state)) = self.with_chan(|l| (l.recv(&mut buf), l.state())) else {
                break;
            };
            out.extend_from_slice(&buf[..n]);
            if n == 0 && state == LinkState::Closed {
                return out;
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        while StdInstant::now() < deadline {
            self.poll();
            let s = self.socket();
            if s.can_recv() {
                let _ = s.recv(|b| {
                    out.extend_from_slice(b);
                    (b.len(), ())
                });
            } else if !s.may_recv() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    /// Closes the connection (the channel's close_notify, then FIN) and lets it drain
    /// briefly.
    pub fn close(&mut self) {
        self.with_chan(|l| l.close());
        self.socket().close();
        let deadline = StdInstant::now() + Duration::from_secs(2);
        while StdInstant::now() < deadline && self.socket().is_open() {
            self.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Drops the connection without FIN (a vanished peer).
    pub fn abort(&mut self) {
        self.socket().abort();
        self.poll();
    }
}
