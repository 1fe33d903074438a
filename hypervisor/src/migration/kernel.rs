//! Binds the migration protocol to the running hypervisor: a smoltcp TCP socket as the
//! [`Link`], a [`Vm`] as the [`SourceGuest`], the guest manager as the [`Installer`],
//! and the console commands `migrate` and `migrations`.
//!
//! One outgoing and one incoming migration at a time. The destination always listens
//! on [`PORT`]: a second source that connects while a stream is being received is
//! answered with a REJECT ("busy"), not left hanging.
//!
//! Resources: every socket is a [`TcpSocket`] owned by the migration (or the listener)
//! that uses it, so it is released whatever way that ends. A migration that ends with
//! something still to say (a REJECT, an ABORT) hands its socket to a short, bounded
//! linger list so the message goes out before the socket is dropped. What a finished
//! migration keeps is its figures, in a fixed-length history.
//!
//! Every wait is bounded: the listener's handshake (a SYN never completed, a port scan
//! that leaves it half-closed) is reset after [`HANDSHAKE_TIMEOUT_US`]; an incoming
//! stream has an idle timeout and an overall deadline sized by the guest's memory; after
//! READY the source has [`receiver::COMMIT_TIMEOUT_US`] to COMMIT.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::wire::Ipv4Address;

use super::link::{Link, LinkState};
use super::receiver::{self, Installer, Outcome, Receiver};
use super::secure::{self, MigrationKey, SecureChannel};
use super::source::{Params, Phase, PostMode, Source, SourceGuest, Status};
use super::stats::{HistoryEntry, MigrationStats};
use super::wire::{self, Hello};
use super::PORT;
use crate::console::args::{self, CmdError};
use crate::net::{NetStack, TcpSocket, TCP_BUF};
use crate::rng::HwRng;
use crate::vm::HwCaps;
use crate::vm::{Tracking, VcpuState, Vm, VmParts, VmState};
use crate::vmm::Vmm;
use crate::{cmd_err, println, time};

/// Receive window of the destination. Through bxhub, Bochs' socket network dropped what
/// piled up beyond its UDP buffer, which held the window to 48 KiB. Through the
/// project's hub (back-pressure) 128 KiB loses nothing and was 6-11 % faster on a clean
/// link, but a migration over a 5 %-loss link then stalled (smoltcp has no SACK; see
/// the README's known gaps), so it stays at 48 KiB until that is understood.
const RX_WINDOW: usize = 48 * 1024;

/// A TCP socket as a migration link.
struct TcpLink<'a> {
    net: &'a mut NetStack,
    h: SocketHandle,
}

impl Link for TcpLink<'_> {
    fn state(&mut self) -> LinkState {
        let s = self.net.tcp(self.h);
        match s.state() {
            State::SynSent | State::SynReceived => LinkState::Connecting,
            State::Established => LinkState::Open,
            // The peer closed its side: what it sent may still be read.
            State::CloseWait if s.can_recv() => LinkState::Open,
            State::FinWait1 | State::FinWait2 | State::Closing if s.may_recv() => LinkState::Open,
            _ => LinkState::Closed,
        }
    }

    fn send(&mut self, data: &[u8]) -> usize {
        // A socket that never connected (or was reset) takes nothing.
        let s = self.net.tcp(self.h);
        if !s.can_send() {
            return 0;
        }
        s.send_slice(data).unwrap_or(0)
    }

    fn queued(&mut self) -> usize {
        self.net.tcp(self.h).send_queue()
    }

    fn recv(&mut self, buf: &mut [u8]) -> usize {
        let s = self.net.tcp(self.h);
        if !s.can_recv() {
            return 0;
        }
        s.recv_slice(buf).unwrap_or(0)
    }

    fn close(&mut self) {
        self.net.tcp(self.h).close();
    }

    fn push(&mut self) {
        self.net.poll();
    }
}

/// A migration connection: the socket, and the secure channel over it (absent only for
/// a connection refused before any handshake, which gets a bare Alert).
struct Conn {
    sock: TcpSocket,
    chan: Option<SecureChannel>,
}

impl Conn {
    /// Runs `f` over this poll's link: the channel's view of the socket.
    fn with_link<R>(
        &mut self,
        net: &mut NetStack,
        now_us: u64,
        f: impl FnOnce(&mut dyn Link) -> R,
    ) -> R {
        let mut tcp = TcpLink {
            net,
            h: self.sock.h(),
        };
        match &mut self.chan {
            Some(c) => f(&mut c.link(&mut tcp, now_us)),
            None => f(&mut tcp),
        }
    }

    /// Why the secure channel failed, as console text.
    fn channel_error(&self) -> Option<String> {
        let e = self.chan.as_ref()?.error()?;
        Some(format!("secure channel: {e}"))
    }
}

/// A running guest as the source of a migration.
struct VmGuest<'a> {
    vm: &'a mut Vm,
    caps: &'a HwCaps,
    method: Tracking,
}

impl SourceGuest for VmGuest<'_> {
    fn pages(&self) -> usize {
        self.vm.pages()
    }

    fn page(&self, pfn: usize) -> &[u8] {
        &self.vm.mem()[pfn * 4096..(pfn + 1) * 4096]
    }

    fn start_tracking(&mut self) -> Result<(), String> {
        self.vm.load_vmcs()?;
        self.vm.start_tracking(self.method, self.caps)
    }

    fn collect_dirty(&mut self, sink: &mut dyn FnMut(usize)) {
        if self.vm.load_vmcs().is_ok() {
            self.vm.collect_dirty(sink);
        }
    }

    fn freeze(&mut self) -> Result<(), String> {
        self.vm.flush_output();
        if !self.vm.state.alive() {
            return Err(format!(
                "guest {} ended during the migration ({})",
                self.vm.id,
                self.vm.state.name()
            ));
        }
        self.vm.freeze();
        Ok(())
    }

    fn thaw(&mut self) {
        if self.vm.load_vmcs().is_ok() {
            self.vm.stop_tracking();
        }
        self.vm.thaw();
    }

    fn vcpu_state(&mut self) -> Vec<u8> {
        let _ = self.vm.load_vmcs();
        self.vm.read_vcpu_state().to_bytes().to_vec()
    }

    fn device_state(&mut self) -> Vec<u8> {
        self.vm.device_state()
    }

    fn free_pages(&mut self, sink: &mut dyn FnMut(usize)) {
        self.vm.free_pages(sink);
    }

    fn run_us(&self) -> u64 {
        time::ticks_to_us(self.vm.runtime_ticks)
    }

    fn throttle(&mut self, pct: u8) {
        self.vm.throttle_pct = pct;
        if pct == 0 {
            self.vm.throttled_until = 0;
        }
    }

    fn hand_over(&mut self) {
        // Never runs here again. Post-copy still serves its memory from here until
        // the destination holds all of it; then (or on `kill`) it is freed.
        self.vm.state = VmState::Stopped(String::from("migrated away"));
    }
}

impl AsRef<[u8]> for VmParts {
    fn as_ref(&self) -> &[u8] {
        self.mem()
    }
}

impl AsMut<[u8]> for VmParts {
    fn as_mut(&mut self) -> &mut [u8] {
        self.mem_mut()
    }
}

/// The guest manager receiving a guest.
struct VmmInstaller<'a> {
    vmm: &'a mut Vmm,
    /// Trace: how long the last install took (VMCS/VMCB and nested tables).
    install_us: &'a mut u64,
}

impl VmmInstaller<'_> {
    fn install_inner(
        &mut self,
        mem: VmParts,
        hello: &Hello,
        vcpu: &[u8],
        device: &[u8],
        missing: Option<&[u64]>,
    ) -> Result<u32, String> {
        let state = VcpuState::from_bytes(vcpu, hello.mem_bytes).map_err(|e| e.to_string())?;
        let id = self.vmm.alloc_id();
        let mut vm = Vm::from_parts(id, &hello.name, &hello.args, hello.mem_bytes, mem)
            .map_err(|e| e.to_string())?;
        if let Some(missing) = missing {
            vm.set_remote(missing)?;
        }
        let ctx = self.vmm.host_context().ok_or("destination has no VMX")?;
        vm.setup_vmcs(&ctx, &state)?;
        vm.restore_device_state(device)?;
        if hello.flags & wire::hello_flags::RESTORED != 0 {
            // A copy started from a checkpoint: not a migration, a new restore. Its
            // original may still run: the copy's NIC gets a MAC of its own.
            vm.migrations = hello.migrations;
            vm.restores += 1;
            vm.nic.mac = crate::vm::nic::default_mac(self.vmm.hv_mac, id);
        } else {
            vm.migrations = hello.migrations + 1;
        }
        if vm.nic.ring.is_some() {
            if let Some(other) = self.vmm.vms.iter().find(|v| v.nic.mac == vm.nic.mac) {
                return Err(format!(
                    "the guest's MAC {} is in use here by guest {}",
                    crate::net::MacFmt(vm.nic.mac),
                    other.id
                ));
            }
        }
        vm.freeze();
        self.vmm.vms.push(vm);
        Ok(id)
    }
}

impl Installer for VmmInstaller<'_> {
    type Mem = VmParts;

    fn alloc(&mut self, hello: &Hello) -> Result<VmParts, String> {
        if self.vmm.vmx.is_none() {
            return Err("destination has no VMX".into());
        }
        crate::vmm::admit(hello.mem_bytes)
            .map_err(|e| format!("destination cannot host the guest: {e}"))?;
        VmParts::alloc(hello.mem_bytes)
            .map_err(|e| format!("destination cannot host the guest: {e}"))
    }

    fn install(
        &mut self,
        mem: VmParts,
        hello: &Hello,
        vcpu: &[u8],
        device: &[u8],
        missing: Option<&[u64]>,
    ) -> Result<u32, String> {
        let t0 = time::now_us();
        let r = self.install_inner(mem, hello, vcpu, device, missing);
        *self.install_us = time::now_us() - t0;
        r
    }

    fn commit(&mut self, id: u32, pause_us: u64) {
        if let Some(vm) = self.vmm.get_mut(id) {
            // The guest's clock ran on through the pause, as a real clock would.
            if let Some(frozen) = vm.frozen_at_ns() {
                vm.set_guest_time_ns(frozen.saturating_add(pause_us.saturating_mul(1000)));
            }
            vm.thaw();
            vm.first_run_us = None;
            vm.watch_first_run = true;
            // Its clients' switches must learn where it is now.
            vm.nic.announce = vm.nic.ring.is_some();
        }
    }

    fn post_page(&mut self, id: u32, pfn: u64) -> Option<&mut [u8]> {
        let vm = self.vmm.get_mut(id)?;
        let start = usize::try_from(pfn).ok()?.checked_mul(4096)?;
        vm.mem_mut().get_mut(start..start + 4096)
    }

    fn post_arrived(&mut self, id: u32, pfn: u64, now_us: u64) -> Option<u64> {
        self.vmm.get_mut(id)?.page_arrived(pfn as usize, now_us)
    }

    fn post_wanted(&mut self, id: u32) -> Option<u64> {
        match self.vmm.get_mut(id)?.state {
            VmState::Fetching(pfn) => Some(pfn as u64),
            _ => None,
        }
    }

    fn commit_lost(&mut self, id: u32) {
        if let Some(vm) = self.vmm.get_mut(id) {
            vm.state = VmState::Paused;
        }
        println!(
            "migrate: WARNING: guest {id} arrived complete but its source never sent COMMIT; it stays paused here. \
             Resume it ('resume {id}') only if the source no longer runs it."
        );
    }
}

/// A guest that asked to move (and waits for it) learns that the move failed.
/// `migrate ... trace`: where the time after the last round went, and what the
/// final set is made of.
fn print_trace(stats: &MigrationStats) {
    if stats.drain.polls > 0 {
        println!(
            "migrate: trace: drain {} ms: {}",
            stats.drain.span_us() / 1000,
            stats.drain.line()
        );
        println!(
            "migrate: trace: final set {} pages = {} dirty when the last round ended + {} dirtied during the drain",
            stats.last.pages,
            stats.round_end_dirty,
            stats.drain_dirty
        );
    }
    println!("migrate: trace: final: {}", stats.last.trace.line());
    if stats.throttle_pct > 0 {
        println!(
            "migrate: trace: throttled for {} ms, up to {} %",
            stats.throttle_us / 1000,
            stats.throttle_pct
        );
    }
}

/// A migration socket: every segment is acknowledged at once (a delayed ACK would hold
/// the drain and the hand-over). Nagle is off for every socket already (`configure`).
fn tune(net: &mut NetStack, sock: &TcpSocket) {
    net.tcp(sock.h()).set_ack_delay(None);
}

fn fail_move(vm: &mut Vm) {
    if vm.state == VmState::Moving {
        vm.regs.rax = guest_abi::ErrorCode::MoveFailed.to_raw();
        vm.state = VmState::Running;
    }
}

/// How long the listener may sit in a half-open handshake before it is reset.
pub const HANDSHAKE_TIMEOUT_US: u64 = 5_000_000;
/// How long a finished migration's socket may linger to deliver its last message.
const LINGER_US: u64 = 2_000_000;
/// Sockets lingering at once (the oldest is dropped beyond this).
const MAX_LINGER: usize = 4;
/// Past migrations kept for `migrations`.
pub const HISTORY: usize = 32;
/// How long the destination waits for the arrived guest's first instruction.
const RESUME_WAIT_US: u64 = 2_000_000;

struct Outgoing {
    /// A checkpoint to a store (the guest stays here).
    checkpoint: bool,
    vm_id: u32,
    conn: Conn,
    source: Source,
    method: Tracking,
    printed_round: usize,
}

enum IncomingPhase {
    /// Receiving the stream (or waiting for COMMIT).
    Receiving,
    /// COMMIT came and the guest was thawed: waiting for its first instruction to
    /// report the pause (bounded by `until_us`).
    Resuming {
        id: u32,
        handover: receiver::Handover,
        until_us: u64,
    },
    /// Post-copy: the guest runs here (Resumed sent); its missing pages arrive.
    Postcopy {
        id: u32,
        stats: alloc::boxed::Box<MigrationStats>,
    },
}

struct Incoming {
    conn: Conn,
    receiver: Receiver<VmParts>,
    started_us: u64,
    peer: String,
    /// The source's address, to reconnect to if post-copy is interrupted.
    peer_ip: Option<Ipv4Address>,
    phase: IncomingPhase,
    /// Post-copy recovery in progress.
    reconnect: Option<Reconnect>,
    /// A restore: the checkpoint asked for (this side opened the connection).
    restore: Option<String>,
    /// Trace: how long installing the guest took (End to READY's processing).
    install_us: u64,
}

/// The destination reconnecting to the source of an interrupted post-copy.
struct Reconnect {
    attempts: u64,
    /// When the next attempt may start.
    next_at_us: u64,
    /// When the attempt in flight started (its socket is `Incoming::conn`).
    pending_since: Option<u64>,
}

/// Between reconnection attempts.
const RECONNECT_EVERY_US: u64 = 3_000_000;
/// Longest wait for one attempt's connection and handshake.
const RECONNECT_WAIT_US: u64 = 10_000_000;
/// Interrupted post-copy migrations a source keeps for recovery.
const MAX_STRANDED: usize = 4;

/// A post-copy whose link was lost after the hand-over, kept (with its guest's
/// memory) until the destination reconnects or the operator kills the guest.
struct Stranded {
    vm_id: u32,
    source: Source,
    method: Tracking,
}

impl Incoming {
    /// Post-copy was interrupted: reconnect to the source (every few seconds, for as
    /// long as it takes) and hand the new link to the receiver.
    fn reconnect(
        &mut self,
        net: &mut NetStack,
        key: Option<&MigrationKey>,
        rng: &mut HwRng,
        now: u64,
    ) {
        let Some(id) = self.receiver.recovering() else {
            return;
        };
        let peer = self.peer_ip;
        let r = self.reconnect.get_or_insert_with(|| {
            println!(
                "migrate: WARNING: post-copy of guest {id} interrupted ({}); it runs here and waits at any page still on its source; reconnecting to {} every {} s",
                self.receiver
                    .interrupted
                    .as_deref()
                    .map_or(String::from("?"), |w| wire::printable(w, 200)),
                peer.map_or(String::from("?"), |ip| ip.to_string()),
                RECONNECT_EVERY_US / 1_000_000
            );
            Reconnect {
                attempts: 0,
                next_at_us: now + 1_000_000,
                pending_since: None,
            }
        });
        if let Some(since) = r.pending_since {
            let state = self.conn.with_link(net, now, |l| l.state());
            match state {
                LinkState::Open => {
                    println!(
                        "migrate: guest {id}: reconnected to its source (attempt {}); post-copy resumes",
                        r.attempts
                    );
                    self.receiver.reattach(now);
                    self.reconnect = None;
                }
                LinkState::Connecting if now - since < RECONNECT_WAIT_US => {}
                _ => {
                    r.pending_since = None;
                    r.next_at_us = now + RECONNECT_EVERY_US;
                }
            }
            return;
        }
        let (Some(ip), Some(key)) = (peer, key) else {
            return;
        };
        if now < r.next_at_us {
            return;
        }
        r.attempts += 1;
        r.next_at_us = now + RECONNECT_EVERY_US;
        let Ok(chan) = SecureChannel::initiator(key, rng, now) else {
            return;
        };
        let Ok(sock) = net.open_tcp(RX_WINDOW, 16 * 1024) else {
            return;
        };
        tune(net, &sock);
        if net.connect(sock.h(), ip, PORT).is_err() {
            return;
        }
        // The old connection is dropped here: its socket is released.
        self.conn = Conn {
            sock,
            chan: Some(chan),
        };
        r.pending_since = Some(now);
    }
}

struct Listener {
    sock: TcpSocket,
    /// When it left LISTEN for a handshake that has not completed yet.
    half_open_since: Option<u64>,
}

/// A finished migration's connection, kept briefly to deliver its last words (the rest
/// of a REJECT or ABORT, RESUMED, the channel's close_notify) before it is dropped.
struct Lingering {
    conn: Conn,
    tail: Vec<u8>,
    closed: bool,
    until_us: u64,
}

impl Lingering {
    fn advance(&mut self, net: &mut NetStack, now: u64) {
        let (tail, closed) = (&mut self.tail, &mut self.closed);
        self.conn.with_link(net, now, |l| {
            if !tail.is_empty() {
                let n = l.send(tail);
                tail.drain(..n);
            }
            if tail.is_empty() && !*closed {
                l.close();
                *closed = true;
            }
        });
    }
}

/// Migration state of this hypervisor.
pub struct Migrations {
    listener: Option<Listener>,
    outgoing: Option<Outgoing>,
    incoming: Option<Incoming>,
    lingering: VecDeque<Lingering>,
    /// Figures of past migrations, both directions, newest last, at most [`HISTORY`]
    /// fixed-size entries in a buffer allocated once.
    pub history: VecDeque<HistoryEntry>,
    /// Incoming connections refused because one was already being received.
    pub refused_busy: u64,
    /// Half-open or dead listener states reset.
    pub listener_resets: u64,
    /// Incoming connections refused because no key is configured.
    pub refused_nokey: u64,
    /// The migration key (see [`secure`]); without it every migration is refused.
    key: Option<MigrationKey>,
    /// Where the key came from ("command line", "console").
    key_origin: &'static str,
    /// Nonces for the handshakes.
    rng: HwRng,
    /// Post-copy migrations interrupted after the hand-over, awaiting recovery.
    stranded: Vec<Stranded>,
    /// Test hook armed with `hold`, taken by the next migration it applies to.
    hold: Option<super::Hold>,
}

impl Default for Migrations {
    fn default() -> Self {
        Self::new()
    }
}

impl Migrations {
    /// No migrations yet.
    pub fn new() -> Self {
        Self {
            listener: None,
            outgoing: None,
            incoming: None,
            lingering: VecDeque::with_capacity(MAX_LINGER),
            history: VecDeque::with_capacity(HISTORY),
            refused_busy: 0,
            listener_resets: 0,
            refused_nokey: 0,
            key: None,
            key_origin: "",
            rng: HwRng::new(),
            stranded: Vec::new(),
            hold: None,
        }
    }

    /// Takes `migkey=<64 hex digits>` from the kernel command line, if there; prints
    /// what the hypervisor will do either way.
    pub fn key_from_cmdline(&mut self, cmdline: &str) {
        println!(
            "migrate: handshake nonces from {}",
            self.rng.source().describe()
        );
        if let Some(hex) = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("migkey="))
        {
            match MigrationKey::from_hex(hex) {
                Ok(k) => {
                    println!(
                        "migrate: migration key {} (from the command line)",
                        k.fingerprint()
                    );
                    self.key = Some(k);
                    self.key_origin = "command line";
                    return;
                }
                Err(e) => println!("migrate: ignoring migkey= on the command line: {e}"),
            }
        }
        println!(
            "migrate: no migration key: migrations are refused until 'key set <64 hex digits>'"
        );
    }

    /// One line for `info`: key fingerprint (never the key) and nonce source.
    pub fn key_summary(&self) -> String {
        let key = match &self.key {
            Some(k) => format!("{} (from the {})", k.fingerprint(), self.key_origin),
            None => String::from("none (migrations refused)"),
        };
        format!(
            "migkey      {key}; nonces from {}",
            self.rng.source().describe()
        )
    }

    /// `key`, `key set <hex>`, `key clear`.
    /// `hold [<point> <ms> | off]`: arms (or shows, or clears) the test hook for the
    /// next migration it applies to.
    pub fn cmd_hold(&mut self, argv: &[&str], usage: &str) -> Result<(), CmdError> {
        match argv {
            [] => {}
            ["off"] => self.hold = None,
            [point, ms] => {
                let point = super::HoldPoint::parse(point).ok_or_else(|| {
                    cmd_err!("unknown hold point '{point}' (drain, freeze, ready, commit, resume)")
                })?;
                let ms = args::parse_in_range("hold (ms)", ms, 1, 60_000)? as u32;
                self.hold = Some(super::Hold { point, ms });
            }
            _ => return Err(cmd_err!("usage: hold {usage}")),
        }
        match self.hold {
            Some(h) => println!(
                "hold: the next {} migration stops at {} for {} ms (test hook)",
                if h.point.at_source() {
                    "outgoing"
                } else {
                    "incoming"
                },
                h.point.name(),
                h.ms
            ),
            None => println!("hold: none armed"),
        }
        Ok(())
    }

    pub fn cmd_key(&mut self, argv: &[&str], usage: &str) -> Result<(), CmdError> {
        match argv {
            [] => {
                match &self.key {
                    Some(k) => println!(
                        "key: fingerprint {} (set from the {})",
                        k.fingerprint(),
                        self.key_origin
                    ),
                    None => println!("key: none: every migration, in or out, is refused"),
                }
                println!(
                    "key: handshake nonces from {}",
                    self.rng.source().describe()
                );
                Ok(())
            }
            ["set", hex] => {
                let k = MigrationKey::from_hex(hex).map_err(|e| cmd_err!("key set: {e}"))?;
                println!(
                    "key: set, fingerprint {} (compare it with the peer's; migrations already running keep their session keys)",
                    k.fingerprint()
                );
                self.key = Some(k);
                self.key_origin = "console";
                Ok(())
            }
            ["bench"] | ["bench", _] => {
                let mib = match argv.get(1) {
                    Some(v) => args::parse_in_range("MiB", v, 1, 64)?,
                    None => 4,
                };
                let c =
                    secure::record_throughput((mib as usize) << 20, &mut crate::arch::cpu::rdtsc)
                        .map_err(|e| cmd_err!("key bench: {e}"))?;
                let hz = time::tsc_hz().max(1);
                let rate = |ticks: u64| c.bytes * hz / ticks.max(1) / 1000; // kB/s
                let cpb = |ticks: u64| ticks as f64 / c.bytes as f64;
                println!(
                    "key bench: ChaCha20-Poly1305 records of {} KiB, {} MiB: seal {} kB/s ({:.1} cycles/byte), open {} kB/s ({:.1} cycles/byte)",
                    secure::MAX_PLAIN / 1024,
                    mib,
                    rate(c.seal_ticks),
                    cpb(c.seal_ticks),
                    rate(c.open_ticks),
                    cpb(c.open_ticks)
                );
                println!(
                    "CRYPTO bytes={} seal_kBps={} open_kBps={} seal_cpb={:.2} open_cpb={:.2} tsc_hz={hz}",
                    c.bytes,
                    rate(c.seal_ticks),
                    rate(c.open_ticks),
                    cpb(c.seal_ticks),
                    cpb(c.open_ticks)
                );
                Ok(())
            }
            ["clear"] => {
                self.key = None;
                println!("key: cleared: every migration, in or out, is refused");
                Ok(())
            }
            _ => Err(cmd_err!("usage: key {usage}")),
        }
    }

    /// Whether guest `id` takes part in a migration now (then pause, resume and kill
    /// must go through `migrate cancel` first). Returns a description if so.
    pub fn guest_busy(&self, id: u32) -> Option<&'static str> {
        if self.outgoing.as_ref().is_some_and(|o| o.vm_id == id) {
            return Some("being migrated away");
        }
        if let Some(inc) = &self.incoming {
            let arriving = match inc.phase {
                IncomingPhase::Resuming { id: i, .. } => i == id,
                IncomingPhase::Postcopy { id: i, .. } => {
                    // While its source is unreachable the operator may give it up
                    // (the source may be gone for good).
                    if i == id && inc.receiver.recovering().is_none() {
                        return Some("receiving its memory by post-copy");
                    }
                    false
                }
                IncomingPhase::Receiving => inc.receiver.installed() == Some(id),
            };
            if arriving {
                return Some("arriving by migration");
            }
        }
        None
    }

    /// Sockets and records held now (for `mem`): (migrations in flight, lingering
    /// sockets, history entries).
    pub fn held(&self) -> (usize, usize, usize) {
        (
            usize::from(self.outgoing.is_some()) + usize::from(self.incoming.is_some()),
            self.lingering.len(),
            self.history.len(),
        )
    }

    fn record(&mut self, stats: &MigrationStats) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(HistoryEntry::from(stats));
    }

    /// Keeps `conn` for at most [`LINGER_US`] to deliver `tail` and close gracefully.
    fn linger(&mut self, net: &mut NetStack, conn: Conn, tail: Vec<u8>) {
        if self.lingering.len() == MAX_LINGER {
            self.lingering.pop_front();
        }
        let mut l = Lingering {
            conn,
            tail,
            closed: false,
            until_us: time::now_us() + LINGER_US,
        };
        l.advance(net, time::now_us());
        self.lingering.push_back(l);
    }

    fn poll_lingering(&mut self, net: &mut NetStack, now: u64) {
        for l in self.lingering.iter_mut() {
            l.advance(net, now);
        }
        self.lingering.retain(|l| {
            now <= l.until_us
                && !matches!(
                    net.tcp(l.conn.sock.h()).state(),
                    State::Closed | State::TimeWait
                )
        });
    }

    fn new_listener(&mut self, net: &mut NetStack) {
        let sock = match net.open_tcp(RX_WINDOW, 16 * 1024) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("migrate: cannot open the listener: {e}");
                return;
            }
        };
        // Acknowledge at once: the stop-and-copy hand-over is a few round trips, and a
        // delayed ACK would add its delay to the guest's downtime.
        tune(net, &sock);
        match net.listen(sock.h(), PORT) {
            Ok(()) => {
                self.listener = Some(Listener {
                    sock,
                    half_open_since: None,
                })
            }
            Err(e) => log::warn!("migrate: cannot listen on port {PORT}: {e}"),
        }
    }

    /// Keeps exactly one socket listening on [`PORT`], resets it when a handshake
    /// stalls or a scan leaves it half-closed, and turns an established connection
    /// into the incoming migration (or refuses it if one is under way).
    fn service_listener(&mut self, net: &mut NetStack) {
        if net.ready().is_err() {
            return;
        }
        let Some(l) = &mut self.listener else {
            self.new_listener(net);
            return;
        };
        let now = time::now_us();
        match net.tcp(l.sock.h()).state() {
            State::Listen => l.half_open_since = None,
            State::SynReceived => {
                let since = *l.half_open_since.get_or_insert(now);
                if now - since > HANDSHAKE_TIMEOUT_US {
                    self.listener = None; // dropped: released
                    self.listener_resets += 1;
                    self.new_listener(net);
                }
            }
            State::Established => {
                let Some(l) = self.listener.take() else {
                    return;
                };
                self.new_listener(net);
                let remote = net.tcp(l.sock.h()).remote_endpoint();
                let peer = remote.map_or("?".to_string(), |e| e.to_string());
                let peer_ip = remote.map(|e| match e.addr {
                    smoltcp::wire::IpAddress::Ipv4(a) => a,
                });
                let refusal = if self.incoming.is_some() {
                    self.refused_busy += 1;
                    println!("migrate: refused a second incoming migration from {peer}: busy");
                    Some(secure::alert::BUSY)
                } else if self.key.is_none() {
                    self.refused_nokey += 1;
                    println!(
                        "migrate: refused an incoming migration from {peer}: no migration key is configured ('key set <64 hex digits>')"
                    );
                    Some(secure::alert::NO_KEY)
                } else {
                    None
                };
                let chan = match (refusal, &self.key) {
                    (None, Some(key)) => match SecureChannel::responder(key, &mut self.rng, now) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            println!("migrate: refused an incoming migration from {peer}: {e}");
                            None
                        }
                    },
                    _ => None,
                };
                let Some(chan) = chan else {
                    // A bare Alert in place of the handshake: the source prints why.
                    let tail = secure::refusal(refusal.unwrap_or(secure::alert::NO_KEY)).to_vec();
                    let conn = Conn {
                        sock: l.sock,
                        chan: None,
                    };
                    self.linger(net, conn, tail);
                    return;
                };
                println!("migrate: incoming migration from {peer}");
                let mut receiver = Receiver::new(now, 30_000_000);
                if self.hold.is_some_and(|h| !h.point.at_source()) {
                    receiver.set_hold(self.hold.take());
                }
                self.incoming = Some(Incoming {
                    conn: Conn {
                        sock: l.sock,
                        chan: Some(chan),
                    },
                    receiver,
                    started_us: now,
                    peer,
                    peer_ip,
                    phase: IncomingPhase::Receiving,
                    reconnect: None,
                    restore: None,
                    install_us: 0,
                });
            }
            _ => {
                // Closed, reset, or half-closed by a scan: listen afresh.
                self.listener = None;
                self.listener_resets += 1;
                self.new_listener(net);
            }
        }
    }

    /// Advances every migration; call from the main loop after polling the network.
    /// Returns whether a migration is in flight (the caller polls the network again at
    /// once, so that what was just queued, COMMIT above all, leaves now).
    pub fn poll(&mut self, net: &mut NetStack, vmm: &mut Vmm) -> bool {
        let now = time::now_us();
        self.poll_lingering(net, now);
        self.service_listener(net);
        self.poll_incoming(net, vmm);
        self.poll_outgoing(net, vmm);
        self.start_moves(net, vmm);
        self.outgoing.is_some() || self.incoming.is_some()
    }

    fn poll_incoming(&mut self, net: &mut NetStack, vmm: &mut Vmm) {
        let Some(inc) = &mut self.incoming else {
            return;
        };
        let now = time::now_us();
        // Post-copy: pages keep arriving (and requests leave) while the guest resumes;
        // a lost link is reconnected.
        if !matches!(inc.phase, IncomingPhase::Receiving) && inc.receiver.in_postcopy() {
            inc.reconnect(net, self.key.as_ref(), &mut self.rng, now);
            let mut inst = VmmInstaller {
                vmm: &mut *vmm,
                install_us: &mut inc.install_us,
            };
            let receiver = &mut inc.receiver;
            inc.conn
                .with_link(net, now, |l| receiver.poll(l, &mut inst, now));
        }
        match inc.phase {
            IncomingPhase::Receiving => {
                let mut inst = VmmInstaller {
                    vmm,
                    install_us: &mut inc.install_us,
                };
                let receiver = &mut inc.receiver;
                let finished = inc
                    .conn
                    .with_link(net, now, |l| receiver.poll(l, &mut inst, now));
                if let (Some(Outcome::Committed(id)), Some(handover)) =
                    (&inc.receiver.outcome, inc.receiver.handover)
                {
                    inc.phase = IncomingPhase::Resuming {
                        id: *id,
                        handover,
                        until_us: now + RESUME_WAIT_US,
                    };
                    return;
                }
                if !finished {
                    return;
                }
                if matches!(inc.receiver.outcome, Some(Outcome::Recover(_))) {
                    if let Some(mut inc) = self.incoming.take() {
                        if let Some(Outcome::Recover(req)) = inc.receiver.outcome.take() {
                            self.recover(net, vmm, inc, req);
                        }
                    }
                    return;
                }
                if let Some(Outcome::Discarded(why)) = &inc.receiver.outcome {
                    // A failed channel explains more than the end of stream it causes.
                    let why = inc
                        .conn
                        .channel_error()
                        .unwrap_or_else(|| wire::printable(why, 200));
                    match &inc.restore {
                        Some(name) => println!(
                            "restore: checkpoint {name} from {} not restored: {why}",
                            inc.peer
                        ),
                        None => println!(
                            "migrate: incoming migration discarded: {why} (from {})",
                            inc.peer
                        ),
                    }
                }
                let Some(mut inc) = self.incoming.take() else {
                    return;
                };
                let tail = inc.receiver.take_farewell();
                self.linger(net, inc.conn, tail);
            }
            IncomingPhase::Postcopy { id, .. } => {
                let killed = vmm.get_mut(id).is_none();
                if inc.receiver.in_postcopy() && !killed {
                    return;
                }
                if killed {
                    println!(
                        "migrate: post-copy of guest {id} abandoned: the guest was killed here"
                    );
                }
                let Some(mut inc) = self.incoming.take() else {
                    return;
                };
                let IncomingPhase::Postcopy { mut stats, .. } = inc.phase else {
                    return;
                };
                stats.total_us = now - inc.started_us;
                stats.received_bytes = inc.receiver.bytes;
                if let Some(p) = inc.receiver.postcopy() {
                    stats.postcopy.remote = p.figures();
                }
                stats.postcopy.recoveries = inc.receiver.recoveries;
                match &inc.receiver.failed {
                    _ if killed => {
                        stats.outcome = String::from("post-copy abandoned: guest killed");
                    }
                    Some(why) => {
                        stats.outcome = format!("post-copy failed: {}", wire::printable(why, 200));
                        println!("migrate: guest {id}: {}", stats.outcome);
                    }
                    _ => {
                        let f = stats.postcopy.remote;
                        println!(
                            "migrate: guest {id}: post-copy complete, all {} missing pages arrived ({} remote faults, service median {} us, max {} us; last page {} ms after COMMIT; link recovered {} times)",
                            stats.postcopy.missing_at_handover,
                            f.faults,
                            f.fault_median_us,
                            f.fault_max_us,
                            f.last_page_us / 1000,
                            stats.postcopy.recoveries
                        );
                    }
                }
                println!("{}", stats.line());
                let tail = inc.receiver.take_farewell();
                self.linger(net, inc.conn, tail);
                self.record(&stats);
            }
            IncomingPhase::Resuming {
                id,
                handover,
                until_us,
            } => {
                let vm = vmm.get_mut(id);
                // A guest that sleeps or was paused on the source "resumes" in that
                // state at COMMIT; a running one when its vCPU first runs.
                let resumed_at = match vm {
                    Some(vm) if vm.state == VmState::Running && now < until_us => {
                        match vm.first_run_us {
                            Some(t) => t,
                            None => return,
                        }
                    }
                    Some(vm) => {
                        vm.watch_first_run = false;
                        vm.first_run_us.unwrap_or(handover.commit_at_us)
                    }
                    None => handover.commit_at_us,
                };
                let commit_to_resume_us = resumed_at.saturating_sub(handover.commit_at_us);
                let times = wire::ResumedTimes {
                    commit_wire_us: handover.commit_wire_us,
                    commit_to_resume_us,
                    downtime_us: handover.pause_to_commit_us + commit_to_resume_us,
                };
                let mut m = Vec::new();
                wire::put_resumed(&mut m, &times);
                let postcopy = inc.receiver.postcopy().is_some();
                let tail = if postcopy {
                    // In order with the receiver's Requests on the same link.
                    inc.receiver.queue(&m);
                    Vec::new()
                } else {
                    let sent = inc.conn.with_link(net, now, |l| l.send(&m));
                    m[sent..].to_vec()
                };
                let hello = inc.receiver.hello().cloned();
                let stats = MigrationStats {
                    role: "dest",
                    guest: id,
                    image: hello.as_ref().map_or(String::from("?"), |h| h.name.clone()),
                    mem_bytes: hello.as_ref().map_or(0, |h| h.mem_bytes),
                    peer: inc.peer.clone(),
                    method: "-",
                    mode: "in",
                    total_us: now - inc.started_us,
                    downtime_us: times.downtime_us,
                    dt_freeze_sent_us: handover.source.freeze_to_sent_us,
                    dt_sent_ready_us: handover.source.sent_to_ready_us,
                    dt_commit_wire_us: times.commit_wire_us,
                    dt_resume_us: commit_to_resume_us,
                    downtime_joined: true,
                    verify_full: inc.receiver.full_check().pages > 0,
                    received_bytes: inc.receiver.bytes,
                    outcome: String::from("ok"),
                    dst_final_us: inc.receiver.final_arrival_us(),
                    dst_install_us: inc.install_us,
                    ..Default::default()
                };
                let full = inc.receiver.full_check();
                let post = inc.receiver.postcopy().map(|p| p.at_handover);
                if let Some(name) = &inc.restore {
                    println!(
                        "restore: guest {id} ({}) restored from checkpoint {name} and running ({} bytes in {} ms)",
                        stats.image,
                        inc.receiver.bytes,
                        stats.total_us / 1000
                    );
                }
                println!(
                    "migrate: guest {id} ({}) arrived and resumed ({} bytes in {} ms, downtime {} us{}{})",
                    stats.image,
                    inc.receiver.bytes,
                    stats.total_us / 1000,
                    stats.downtime_us,
                    if full.pages > 0 {
                        format!(", verify=full: all {} pages match the source's", full.pages)
                    } else {
                        String::new()
                    },
                    match post {
                        Some(n) => format!(", post-copy: {n} pages to come"),
                        None => String::new(),
                    }
                );
                if postcopy {
                    let mut stats = stats;
                    stats.mode = "postcopy";
                    stats.postcopy.used = true;
                    stats.postcopy.missing_at_handover = post.unwrap_or(0);
                    inc.phase = IncomingPhase::Postcopy {
                        id,
                        stats: alloc::boxed::Box::new(stats),
                    };
                    return;
                }
                println!("{}", stats.line());
                if let Some(inc) = self.incoming.take() {
                    self.linger(net, inc.conn, tail);
                }
                self.record(&stats);
            }
        }
    }

    /// Runs `f` with the outgoing migration's source, its guest and this poll's link.
    /// `None` when there is no outgoing migration, or its guest is gone (kill is
    /// refused while a guest migrates, so that would be a bug: the caller then ends
    /// the migration cleanly rather than panicking).
    fn with_source<R>(
        &mut self,
        net: &mut NetStack,
        vmm: &mut Vmm,
        now: u64,
        f: impl FnOnce(&mut Source, &mut dyn SourceGuest, &mut dyn Link) -> R,
    ) -> Option<R> {
        let out = self.outgoing.as_mut()?;
        let caps = vmm.vmx.as_ref().map(|v| v.caps)?;
        let vm = vmm.vms.iter_mut().find(|v| v.id == out.vm_id)?;
        let mut g = VmGuest {
            vm,
            caps: &caps,
            method: out.method,
        };
        let source = &mut out.source;
        Some(out.conn.with_link(net, now, |l| f(source, &mut g, l)))
    }

    fn poll_outgoing(&mut self, net: &mut NetStack, vmm: &mut Vmm) {
        let Some(out) = &self.outgoing else {
            return;
        };
        let id = out.vm_id;
        let now = time::now_us();
        let Some(status) = self.with_source(net, vmm, now, |s, g, l| {
            let status = s.poll(g, l, now);
            s.poll_done(time::now_us());
            status
        }) else {
            println!("migrate: guest {id} vanished during migration");
            if let Some(o) = self.outgoing.take() {
                self.linger(net, o.conn, Vec::new());
            }
            return;
        };
        let Some(out) = &mut self.outgoing else {
            return;
        };
        let rounds = &out.source.stats.rounds;
        while out.printed_round < rounds.len() {
            let r = rounds[out.printed_round];
            let delta = if r.delta_pages > 0 {
                format!(
                    ", {} as deltas saving {} KiB",
                    r.delta_pages,
                    r.delta_saved / 1024
                )
            } else {
                String::new()
            };
            println!(
                "migrate: round {}: {} pages ({} zero{delta}), {} KiB, dirty left {}, {} kB/s",
                r.round,
                r.pages,
                r.zero_pages,
                r.bytes / 1024,
                r.dirty_after,
                r.bytes * 1000 / r.us.max(1)
            );
            if out.source.params().trace {
                println!("migrate:   trace: {}", r.trace.line());
            }
            out.printed_round += 1;
        }
        if status != Status::Finished {
            return;
        }
        let Some(mut out) = self.outgoing.take() else {
            return;
        };
        let mut stats = out.source.stats.clone();
        if out.source.phase() == Phase::Stranded {
            if let Some(vm) = vmm.get_mut(id) {
                vm.state = VmState::Stopped(String::from(
                    "migrated away; post-copy interrupted: memory kept for its destination",
                ));
            }
            println!(
                "migrate: WARNING: {}. Guest {id} runs on {}; its memory here is kept, never run again, until the destination reconnects and post-copy completes ('kill {id}' gives up and frees it).",
                wire::printable(&stats.outcome, 300),
                stats.peer
            );
            let tail = out.source.take_farewell();
            self.linger(net, out.conn, tail);
            println!("{}", stats.line());
            if self.stranded.len() == MAX_STRANDED {
                self.stranded.remove(0);
            }
            self.stranded.push(Stranded {
                vm_id: id,
                source: out.source,
                method: out.method,
            });
            return;
        } else if out.source.phase() == Phase::Done && out.checkpoint {
            if let Some(vm) = vmm.get_mut(id) {
                if vm.state == VmState::Moving {
                    // It asked for this checkpoint: it runs on, RAX = 0.
                    vm.state = VmState::Running;
                }
            }
            println!(
                "migrate: guest {id} checkpointed to {}: done; it keeps running here",
                stats.peer
            );
        } else if out.source.phase() == Phase::Done {
            // Free the guest: it now belongs to the destination. Dropping it VMCLEARs
            // its VMCS, invalidates its EPT and frees its frames.
            if let Some(i) = vmm.vms.iter().position(|v| v.id == id) {
                drop(vmm.vms.remove(i));
            }
            println!("migrate: guest {id} migrated to {}: done", stats.peer);
        } else {
            if let Some(vm) = vmm.get_mut(id) {
                fail_move(vm);
            }
            if let Some(e) = out.conn.channel_error() {
                stats.outcome = e;
            }
            println!(
                "migrate: FAILED: {}; guest {id} keeps running here",
                wire::printable(&stats.outcome, 300)
            );
        }
        // Deliver what is left (an ABORT, the channel's close_notify) before the
        // socket goes.
        let tail = out.source.take_farewell();
        self.linger(net, out.conn, tail);
        println!("{stats}");
        if out.source.params().trace {
            print_trace(&stats);
        }
        println!("{}", stats.line());
        self.record(&stats);
    }

    /// Starts the moves guests asked for (`Move` hypercall), one at a time; a move
    /// that cannot start fails at once and the guest runs on.
    fn start_moves(&mut self, net: &mut NetStack, vmm: &mut Vmm) {
        if self.outgoing.is_some() {
            return;
        }
        let Some(vm) = vmm.vms.iter_mut().find(|v| v.move_request.is_some()) else {
            return;
        };
        let id = vm.id;
        let Some(req) = vm.move_request.take() else {
            return;
        };
        if vm.state != VmState::Moving {
            return;
        }
        let method = match vmm.vmx.as_ref() {
            Some(v) => Tracking::best(&v.caps),
            None => return,
        };
        let params = Params {
            checkpoint: req.checkpoint,
            ..Params::default()
        };
        let [a, b, c, d] = req.ip;
        println!(
            "migrate: guest {id} asks to {} {a}.{b}.{c}.{d}:{}",
            if req.checkpoint {
                "checkpoint itself to"
            } else {
                "move to"
            },
            req.port
        );
        if let Err(e) = self.start_outgoing(net, vmm, id, req.ip, req.port, params, method) {
            println!("migrate: guest {id}'s move failed to start: {e}");
            if let Some(vm) = vmm.get_mut(id) {
                fail_move(vm);
            }
        }
    }

    /// `restore <store-ip>[:port] <checkpoint>`: asks a store for a checkpoint and
    /// receives it as an incoming migration (it arrives as a new guest).
    pub fn cmd_restore(
        &mut self,
        net: Option<&mut NetStack>,
        vmm: &mut Vmm,
        argv: &[&str],
        usage: &str,
    ) -> Result<(), CmdError> {
        let [peer, name] = argv else {
            return Err(cmd_err!("usage: restore {usage}"));
        };
        if !wire::valid_checkpoint_name(name) {
            return Err(cmd_err!(
                "bad checkpoint name '{}' (1-64 of A-Z a-z 0-9 . _ -)",
                wire::printable(name, 64)
            ));
        }
        let (ip, port) = args::parse_endpoint(peer, PORT)?;
        let net = net.ok_or_else(|| cmd_err!("no network: restore needs the e1000"))?;
        if vmm.vmx.is_none() {
            return Err(cmd_err!("no VMX here"));
        }
        if self.incoming.is_some() {
            return Err(cmd_err!(
                "busy receiving a migration; try again when it has ended"
            ));
        }
        let Some(key) = &self.key else {
            return Err(cmd_err!(
                "no migration key: set the store's key first ('key set <64 hex digits>')"
            ));
        };
        let now = time::now_us();
        let chan = SecureChannel::initiator(key, &mut self.rng, now)
            .map_err(|e| cmd_err!("cannot start the secure channel: {e}"))?;
        let sock = net
            .open_tcp(RX_WINDOW, 16 * 1024)
            .map_err(|e| cmd_err!("cannot open a socket: {e}"))?;
        tune(net, &sock);
        let addr = Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]);
        net.connect(sock.h(), addr, port)
            .map_err(|e| cmd_err!("cannot connect to {addr}:{port}: {e}"))?;
        let mut receiver = Receiver::new(now, 30_000_000);
        let mut m = Vec::new();
        wire::put_fetch(&mut m, name);
        receiver.queue(&m);
        println!("restore: asking {addr}:{port} for checkpoint {name}");
        self.incoming = Some(Incoming {
            conn: Conn {
                sock,
                chan: Some(chan),
            },
            receiver,
            started_us: now,
            peer: format!("{addr}:{port}"),
            peer_ip: Some(addr),
            phase: IncomingPhase::Receiving,
            reconnect: None,
            restore: Some(String::from(*name)),
            install_us: 0,
        });
        Ok(())
    }

    /// A destination reconnected for an interrupted post-copy: resume the stranded
    /// source on the new connection, or refuse with a reason.
    fn recover(
        &mut self,
        net: &mut NetStack,
        vmm: &mut Vmm,
        mut inc: Incoming,
        req: receiver::RecoverRequest,
    ) {
        // Forget interrupted migrations whose guest the operator killed.
        self.stranded
            .retain(|s| vmm.vms.iter().any(|v| v.id == s.vm_id));
        // Only the destination the guest was handed to may take up its post-copy:
        // another keyed peer claiming it would get the guest's pages.
        let from = inc.peer_ip.map(|ip| ip.to_string());
        let found = self.stranded.iter().position(|s| {
            s.source.hello().time_ns == req.time_ns
                && s.source.hello().mem_bytes == req.mem_bytes
                && from.as_deref() == s.source.stats.peer.split(':').next()
        });
        let refusal = match found {
            None => Some((
                receiver::reject::MALFORMED,
                "no interrupted post-copy of that guest here",
            )),
            Some(_) if self.outgoing.is_some() => {
                Some((receiver::reject::BUSY, "busy with another migration; retry"))
            }
            Some(_) => None,
        };
        if let Some((code, why)) = refusal {
            println!(
                "migrate: refused a post-copy recovery from {}: {why}",
                inc.peer
            );
            let mut m = Vec::new();
            wire::put_reason(&mut m, wire::tag::REJECT, code, why);
            let _ = inc.receiver.take_farewell();
            self.linger(net, inc.conn, m);
            return;
        }
        let Some(i) = found else { return };
        let mut st = self.stranded.remove(i);
        if let Err(e) = st.source.resume(&req.missing, req.pages, time::now_us()) {
            println!(
                "migrate: refused a post-copy recovery from {}: {e}",
                inc.peer
            );
            self.stranded.push(st);
            self.linger(net, inc.conn, Vec::new());
            return;
        }
        let left: u64 = req.missing.iter().map(|w| u64::from(w.count_ones())).sum();
        println!(
            "migrate: guest {}: its destination {} reconnected; post-copy resumes ({left} pages to send)",
            st.vm_id, inc.peer
        );
        let printed_round = st.source.stats.rounds.len();
        self.outgoing = Some(Outgoing {
            checkpoint: false,
            vm_id: st.vm_id,
            conn: inc.conn,
            source: st.source,
            method: st.method,
            printed_round,
        });
    }

    /// `migrate cancel`: aborts the outgoing migration (unless the guest has already
    /// been handed over) and the incoming one (before READY it is discarded; after
    /// READY the guest stays paused, as for a lost COMMIT).
    fn cancel(&mut self, net: &mut NetStack, vmm: &mut Vmm) -> Result<(), CmdError> {
        let mut done = false;
        if let Some(out) = &self.outgoing {
            let (id, peer) = (out.vm_id, out.source.stats.peer.clone());
            let now = time::now_us();
            let cancelled = self
                .with_source(net, vmm, now, |s, g, l| {
                    s.cancel(g, l, now, "cancelled by the operator")
                })
                .ok_or_else(|| cmd_err!("guest {id} is gone"))?;
            if !cancelled {
                return Err(cmd_err!(
                    "too late to cancel: guest {id} has been handed over to {peer}"
                ));
            }
            println!("migrate: outgoing migration of guest {id} cancelled");
            done = true;
            self.poll_outgoing(net, vmm);
        }
        if let Some(inc) = &mut self.incoming {
            if let IncomingPhase::Resuming { id, .. } | IncomingPhase::Postcopy { id, .. } =
                inc.phase
            {
                return Err(cmd_err!("too late to cancel: guest {id} already runs here"));
            }
            let mut inst = VmmInstaller {
                vmm,
                install_us: &mut inc.install_us,
            };
            let receiver = &mut inc.receiver;
            inc.conn
                .with_link(net, time::now_us(), |l| receiver.cancel(l, &mut inst));
            println!("migrate: incoming migration from {} cancelled", inc.peer);
            if let Some(mut inc) = self.incoming.take() {
                let tail = inc.receiver.take_farewell();
                self.linger(net, inc.conn, tail);
            }
            done = true;
        }
        if done {
            Ok(())
        } else {
            Err(cmd_err!("no migration in progress"))
        }
    }

    /// `migrate <id> <ip>[:port] [options]` or `migrate cancel`; `checkpoint <id>
    /// <ip>[:port] [options]` (`checkpoint` true) copies the guest to a store instead.
    pub fn cmd_migrate(
        &mut self,
        net: Option<&mut NetStack>,
        vmm: &mut Vmm,
        argv: &[&str],
        usage: &str,
        checkpoint: bool,
    ) -> Result<(), CmdError> {
        let cmd = if checkpoint { "checkpoint" } else { "migrate" };
        if argv == ["cancel"] && !checkpoint {
            let net = net.ok_or_else(|| cmd_err!("no network: no migration to cancel"))?;
            return self.cancel(net, vmm);
        }
        let (pos, opts) = args::split_options(argv);
        let [id, peer] = pos[..] else {
            return Err(cmd_err!("usage: {cmd} {usage}"));
        };
        let id = args::parse_u32("guest id", id)?;
        let (ip, port) = args::parse_endpoint(peer, PORT)?;
        let net = net.ok_or_else(|| cmd_err!("no network: migration needs the e1000"))?;
        let caps = vmm
            .vmx
            .as_ref()
            .map(|v| v.caps)
            .ok_or_else(|| cmd_err!("no VMX here"))?;
        let mut params = Params::default();
        let mut method = Tracking::best(&caps);
        for (k, v) in opts {
            match k {
                "downtime" => {
                    params.downtime_us = args::parse_in_range("downtime (ms)", v, 1, 60_000)? * 1000
                }
                "max-rounds" => {
                    params.max_rounds = args::parse_in_range("max-rounds", v, 1, 100)? as u32
                }
                "bandwidth" => {
                    let mbps = args::parse_in_range("bandwidth (MB/s)", v, 1, 100_000)?;
                    params.bandwidth_bps = Some(mbps * 1_000_000);
                }
                "dirty" => {
                    method = Tracking::parse(v)
                        .ok_or_else(|| cmd_err!("unknown dirty tracking '{v}' (pml, ad, wp)"))?;
                    if !method.supported(&caps) {
                        return Err(cmd_err!(
                            "dirty tracking '{v}' is not supported by this CPU"
                        ));
                    }
                }
                "timeout" => {
                    params.timeout_us = args::parse_in_range("timeout (s)", v, 2, 600)? * 1_000_000
                }
                "cache" => {
                    params.cache_bytes =
                        (args::parse_in_range("cache (MiB)", v, 0, 256)? as usize) << 20;
                }
                "verify" => {
                    params.verify_full = match v {
                        "full" => true,
                        "sent" => false,
                        _ => return Err(cmd_err!("unknown verify '{v}' (full, sent)")),
                    }
                }
                "mode" => {
                    (params.stop_and_copy, params.postcopy) = match v {
                        "precopy" => (false, PostMode::Off),
                        "stop" => (true, PostMode::Off),
                        "postcopy" => (false, PostMode::Always),
                        "hybrid" => (false, PostMode::Hybrid),
                        _ => {
                            return Err(cmd_err!(
                                "unknown mode '{v}' (precopy, stop, postcopy, hybrid)"
                            ))
                        }
                    }
                }
                "converge" => {
                    params.auto_converge = match v {
                        "auto" => true,
                        "off" => false,
                        _ => return Err(cmd_err!("unknown converge '{v}' (auto, off)")),
                    }
                }
                "prepage" => {
                    params.prepage = args::parse_in_range("prepage (pages)", v, 0, 256)? as u32
                }
                "trace" => {
                    params.trace = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(cmd_err!("unknown trace '{v}' (on, off)")),
                    }
                }
                _ => return Err(cmd_err!("unknown option '{k}' (usage: {cmd} {usage})")),
            }
        }
        params.checkpoint = checkpoint;
        if params.verify_full && params.postcopy != PostMode::Off {
            // The digest is compared before READY; post-copy hands over before the
            // memory is there (its End checksum covers every page instead).
            return Err(cmd_err!(
                "verify=full is for pre-copy; post-copy checks every page with its End checksum"
            ));
        }
        if checkpoint && params.postcopy != PostMode::Off {
            return Err(cmd_err!(
                "a checkpoint is pre-copy (or mode=stop): the guest stays here"
            ));
        }
        match vmm.get_mut(id).map(|v| &v.state) {
            Some(VmState::Moving) => {
                return Err(cmd_err!("guest {id} is moving itself (Move hypercall)"))
            }
            None => return Err(cmd_err!("no guest with id {id} (see 'vms')")),
            _ => {}
        }
        self.start_outgoing(net, vmm, id, ip, port, params, method)
    }

    /// Starts migrating (or checkpointing) guest `id` to `ip:port`.
    #[allow(clippy::too_many_arguments)]
    fn start_outgoing(
        &mut self,
        net: &mut NetStack,
        vmm: &mut Vmm,
        id: u32,
        ip: [u8; 4],
        port: u16,
        mut params: Params,
        method: Tracking,
    ) -> Result<(), CmdError> {
        if self.outgoing.is_some() {
            return Err(cmd_err!(
                "a migration is already running; wait for it to finish (or 'migrate cancel')"
            ));
        }
        if self.hold.is_some_and(|h| h.point.at_source()) {
            params.hold = self.hold.take();
        }
        if self.guest_busy(id).is_some() {
            return Err(cmd_err!("guest {id} is arriving here by migration"));
        }
        let Some(key) = &self.key else {
            return Err(cmd_err!(
                "no migration key: set the same key on both hypervisors first ('key set <64 hex digits>'); migrations never travel unencrypted"
            ));
        };
        let vm = vmm
            .get_mut(id)
            .ok_or_else(|| cmd_err!("no guest with id {id} (see 'vms')"))?;
        if vm.remote_pages() > 0 {
            return Err(cmd_err!(
                "guest {id} still has {} pages on its previous host (post-copy)",
                vm.remote_pages()
            ));
        }
        match vm.state {
            VmState::Running | VmState::Halted(_) | VmState::Paused | VmState::Moving => {}
            ref s => {
                return Err(cmd_err!(
                    "guest {id} is {}; only a live guest can migrate",
                    s.name()
                ))
            }
        }
        let hello = Hello {
            flags: 0,
            mem_bytes: vm.mem_bytes,
            migrations: vm.migrations,
            time_ns: vm.guest_time_ns(),
            name: vm.image.clone(),
            args: vm.args.clone(),
        };
        let stats = MigrationStats {
            role: "source",
            guest: id,
            image: vm.image.clone(),
            mem_bytes: vm.mem_bytes,
            peer: format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]),
            method: if params.stop_and_copy {
                "none"
            } else {
                method.name()
            },
            mode: match (params.stop_and_copy, params.postcopy) {
                _ if params.checkpoint => "checkpoint",
                (true, _) => "stop",
                (_, PostMode::Always) => "postcopy",
                (_, PostMode::Hybrid) => "hybrid",
                _ => "precopy",
            },
            verify_full: params.verify_full,
            ..Default::default()
        };
        let chan = SecureChannel::initiator(key, &mut self.rng, time::now_us())
            .map_err(|e| cmd_err!("cannot start the secure channel: {e}"))?;
        let sock = net
            .open_tcp(16 * 1024, TCP_BUF)
            .map_err(|e| cmd_err!("cannot open a socket: {e}"))?;
        tune(net, &sock);
        if let Err(e) = net.connect(sock.h(), Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]), port) {
            return Err(cmd_err!("cannot connect to {}: {e}", stats.peer));
        }
        println!(
            "migrate: guest {id} ({}, {} MiB) to {}, dirty tracking {}, downtime target {} ms{}",
            stats.image,
            stats.mem_bytes >> 20,
            stats.peer,
            stats.method,
            params.downtime_us / 1000,
            if params.verify_full {
                ", verify=full"
            } else {
                ""
            }
        );
        let source = Source::new(params, hello, stats, time::now_us());
        self.outgoing = Some(Outgoing {
            checkpoint: params.checkpoint,
            vm_id: id,
            conn: Conn {
                sock,
                chan: Some(chan),
            },
            source,
            method,
            printed_round: 0,
        });
        Ok(())
    }

    /// `migrations`.
    pub fn cmd_migrations(&self) {
        if let Some(o) = &self.outgoing {
            println!(
                "  in progress: guest {} to {} ({:?})",
                o.vm_id,
                o.source.stats.peer,
                o.source.phase()
            );
        }
        for st in &self.stranded {
            println!(
                "  interrupted: post-copy of guest {} to {}: {} pages not sent; memory kept until it reconnects",
                st.vm_id,
                st.source.stats.peer,
                st.source.pages_left()
            );
        }
        if let Some(i) = &self.incoming {
            if let Some(r) = &i.reconnect {
                println!(
                    "  recovering: post-copy link to {} lost; {} reconnection attempts so far",
                    i.peer, r.attempts
                );
            }
            match (&i.phase, i.receiver.postcopy()) {
                (IncomingPhase::Postcopy { id, .. }, Some(p)) => println!(
                    "  in progress: guest {id} runs here, post-copy from {}: {} of {} pages still to come ({} remote faults so far)",
                    i.peer, p.left, p.at_handover, p.faults
                ),
                _ => println!(
                    "  in progress: incoming from {} ({} bytes so far)",
                    i.peer, i.receiver.bytes
                ),
            }
        }
        if self.history.is_empty() {
            println!("  (no migrations yet)");
            return;
        }
        println!(
            "  {:>2} {:<6} {:>5} {:<9} {:>5} {:<21} {:<6} {:>3} {:>6} {:>10} {:>8} {:>11} {:>7} {}",
            "#",
            "ROLE",
            "GUEST",
            "IMAGE",
            "MiB",
            "PEER",
            "METHOD",
            "RND",
            "TOTAL",
            "DOWNTIME",
            "ZERO",
            "BYTES",
            "kB/s",
            "OUTCOME"
        );
        for (i, s) in self.history.iter().enumerate() {
            println!(
                "  {:>2} {:<6} {:>5} {:<9} {:>5} {:<21} {:<6} {:>3} {:>4}ms {:>8}us {:>8} {:>11} {:>7} {}",
                i + 1,
                s.role,
                s.guest,
                s.image,
                s.mem_bytes >> 20,
                s.peer,
                s.method,
                s.rounds,
                s.total_us / 1000,
                s.downtime_us,
                s.zero_pages,
                s.bytes,
                s.throughput_kbps,
                s.outcome
            );
        }
    }
}
