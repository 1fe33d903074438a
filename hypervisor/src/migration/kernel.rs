//! Binds the migration protocol to the running hypervisor: a smoltcp TCP socket as the
//! [`Link`], a [`Vm`] as the [`SourceGuest`], the guest manager as the [`Installer`],
//! and the console commands `migrate` and `migrations`.
//!
//! One outgoing and one incoming migration at a time. The destination always listens
//! on [`PORT`]; a second source that connects while a stream is being received finds no
//! listener and is refused.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use smoltcp::wire::Ipv4Address;

use super::link::{Link, LinkState};
use super::receiver::{Installer, Outcome, Receiver};
use super::source::{Params, Phase, Source, SourceGuest, Status};
use super::stats::MigrationStats;
use super::wire::Hello;
use super::PORT;
use crate::console::args::{self, CmdError};
use crate::net::{NetStack, TCP_BUF};
use crate::vm::{Tracking, VcpuState, Vm, VmParts, VmState};
use crate::vmm::Vmm;
use crate::vmx::caps::VmxCaps;
use crate::{cmd_err, println, time};

/// Receive window of the destination. Bochs' socket network hands the receiving card
/// one frame per emulated millisecond and drops what piles up beyond its UDP buffer;
/// a window that fits there avoids losses, whose retransmission timeouts (a second or
/// more) would otherwise land in the downtime. Measured: 32-48 KiB loses nothing at
/// about 1.1 MB/s; 128 KiB reaches 1.3-1.5 MB/s but with losses.
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
}

/// A running guest as the source of a migration.
struct VmGuest<'a> {
    vm: &'a mut Vm,
    caps: &'a VmxCaps,
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

    fn hand_over(&mut self) {
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
}

impl Installer for VmmInstaller<'_> {
    type Mem = VmParts;

    fn alloc(&mut self, hello: &Hello) -> Result<VmParts, String> {
        if self.vmm.vmx.is_none() {
            return Err("destination has no VMX".into());
        }
        VmParts::alloc(hello.mem_bytes)
            .map_err(|e| format!("destination cannot host the guest: {e}"))
    }

    fn install(
        &mut self,
        mem: VmParts,
        hello: &Hello,
        vcpu: &[u8],
        device: &[u8],
    ) -> Result<u32, String> {
        let state = VcpuState::from_bytes(vcpu, hello.mem_bytes).map_err(|e| e.to_string())?;
        let id = self.vmm.alloc_id();
        let mut vm = Vm::from_parts(id, &hello.name, &hello.args, hello.mem_bytes, mem)
            .map_err(|e| e.to_string())?;
        let ctx = self.vmm.host_context().ok_or("destination has no VMX")?;
        vm.setup_vmcs(&ctx, &state)?;
        vm.restore_device_state(device)?;
        vm.migrations = hello.migrations + 1;
        vm.freeze();
        self.vmm.vms.push(vm);
        Ok(id)
    }

    fn commit(&mut self, id: u32) {
        if let Some(vm) = self.vmm.get_mut(id) {
            vm.thaw();
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

struct Outgoing {
    vm_id: u32,
    sock: SocketHandle,
    source: Source,
    method: Tracking,
    printed_round: usize,
}

struct Incoming {
    sock: SocketHandle,
    receiver: Receiver<VmParts>,
    started_us: u64,
}

/// Migration state of this hypervisor.
pub struct Migrations {
    listener: Option<SocketHandle>,
    outgoing: Option<Outgoing>,
    incoming: Option<Incoming>,
    /// Figures of past outgoing migrations.
    pub history: Vec<MigrationStats>,
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
            history: Vec::new(),
        }
    }

    fn listen(&mut self, net: &mut NetStack) {
        let h = net.add_tcp_socket(RX_WINDOW, 16 * 1024);
        // Acknowledge at once: the stop-and-copy hand-over is a few round trips, and a
        // delayed ACK would add its delay to the guest's downtime.
        net.tcp(h).set_ack_delay(None);
        match net.listen(h, PORT) {
            Ok(()) => self.listener = Some(h),
            Err(e) => {
                net.remove_socket(h);
                log::warn!("migrate: cannot listen on port {PORT}: {e}");
            }
        }
    }

    /// Advances every migration; call from the main loop after polling the network.
    pub fn poll(&mut self, net: &mut NetStack, vmm: &mut Vmm) {
        if self.listener.is_none() && self.incoming.is_none() && net.ready().is_ok() {
            self.listen(net);
        }
        // A connection on the listener becomes the incoming migration.
        if let Some(h) = self.listener {
            if net.tcp(h).state() == State::Established {
                self.listener = None;
                println!(
                    "migrate: incoming migration from {}",
                    net.tcp(h)
                        .remote_endpoint()
                        .map_or("?".to_string(), |e| e.to_string())
                );
                let now = time::now_us();
                self.incoming = Some(Incoming {
                    sock: h,
                    receiver: Receiver::new(now, 30_000_000),
                    started_us: now,
                });
            }
        }
        if let Some(inc) = &mut self.incoming {
            let now = time::now_us();
            let mut link = TcpLink { net, h: inc.sock };
            let mut inst = VmmInstaller { vmm };
            if inc.receiver.poll(&mut link, &mut inst, now) {
                let ms = (now - inc.started_us) / 1000;
                match &inc.receiver.outcome {
                    Some(Outcome::Committed(id)) => println!(
                        "migrate: guest {id} ({}) arrived and resumed ({} bytes in {ms} ms)",
                        inc.receiver.hello().map_or("?", |h| h.name.as_str()),
                        inc.receiver.bytes
                    ),
                    Some(Outcome::Discarded(why)) => {
                        println!("migrate: incoming migration discarded: {why}")
                    }
                    Some(Outcome::CommitLost(_)) | None => {}
                }
                let h = inc.sock;
                self.incoming = None;
                net.tcp(h).abort();
                net.remove_socket(h);
            }
        }
        self.poll_outgoing(net, vmm);
    }

    fn poll_outgoing(&mut self, net: &mut NetStack, vmm: &mut Vmm) {
        let Some(out) = &mut self.outgoing else {
            return;
        };
        let now = time::now_us();
        let Some(caps) = vmm.vmx.as_ref().map(|v| v.caps) else {
            return;
        };
        let status = {
            let Some(vm) = vmm.vms.iter_mut().find(|v| v.id == out.vm_id) else {
                println!("migrate: guest {} vanished during migration", out.vm_id);
                net.remove_socket(out.sock);
                self.outgoing = None;
                return;
            };
            let mut g = VmGuest {
                vm,
                caps: &caps,
                method: out.method,
            };
            let mut link = TcpLink { net, h: out.sock };
            out.source.poll(&mut g, &mut link, now)
        };
        let rounds = &out.source.stats.rounds;
        while out.printed_round < rounds.len() {
            let r = rounds[out.printed_round];
            println!(
                "migrate: round {}: {} pages ({} zero), {} KiB, dirty left {}, {} kB/s",
                r.round,
                r.pages,
                r.zero_pages,
                r.bytes / 1024,
                r.dirty_after,
                r.bytes * 1000 / r.us.max(1)
            );
            out.printed_round += 1;
        }
        if status == Status::Finished {
            let stats = out.source.stats.clone();
            let ok = out.source.phase() == Phase::Done;
            let (id, sock) = (out.vm_id, out.sock);
            self.outgoing = None;
            if ok {
                // Free the guest: it now belongs to the destination.
                if let Some(i) = vmm.vms.iter().position(|v| v.id == id) {
                    // Dropping it VMCLEARs its VMCS and frees its frames.
                    drop(vmm.vms.remove(i));
                }
                println!("migrate: guest {id} migrated to {}: done", stats.peer);
            } else {
                println!(
                    "migrate: FAILED: {}; guest {id} keeps running here",
                    stats.outcome
                );
                net.tcp(sock).abort();
            }
            println!("{stats}");
            println!("{}", stats.line());
            self.history.push(stats);
            // Leave a closing socket to finish its FIN; reap it on the next migration.
            if !ok {
                net.remove_socket(sock);
            }
        }
    }

    /// `migrate <id> <ip>[:port] [options]`.
    pub fn cmd_migrate(
        &mut self,
        net: Option<&mut NetStack>,
        vmm: &mut Vmm,
        argv: &[&str],
        usage: &str,
    ) -> Result<(), CmdError> {
        let (pos, opts) = args::split_options(argv);
        let [id, peer] = pos[..] else {
            return Err(cmd_err!("usage: migrate {usage}"));
        };
        let id = args::parse_u64("guest id", id)? as u32;
        let (ip, port) = args::parse_endpoint(peer, PORT)?;
        let net = net.ok_or_else(|| cmd_err!("no network: migration needs the e1000"))?;
        if self.outgoing.is_some() {
            return Err(cmd_err!(
                "a migration is already running; wait for it to finish"
            ));
        }
        let caps = vmm
            .vmx
            .as_ref()
            .map(|v| v.caps)
            .ok_or_else(|| cmd_err!("no VMX here"))?;
        let mut params = Params::default();
        let mut method = Tracking::best(&caps);
        for (k, v) in opts {
            match k {
                "downtime" => params.downtime_us = args::parse_u64("downtime (ms)", v)? * 1000,
                "max-rounds" => {
                    params.max_rounds = args::parse_u64("max-rounds", v)? as u32;
                    if params.max_rounds == 0 {
                        return Err(cmd_err!("max-rounds must be at least 1"));
                    }
                }
                "bandwidth" => {
                    let mbps = args::parse_u64("bandwidth (MB/s)", v)?;
                    if mbps == 0 {
                        return Err(cmd_err!("bandwidth must be at least 1 MB/s"));
                    }
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
                "mode" => {
                    params.stop_and_copy = match v {
                        "precopy" => false,
                        "stop" => true,
                        _ => return Err(cmd_err!("unknown mode '{v}' (precopy, stop)")),
                    }
                }
                _ => return Err(cmd_err!("unknown option '{k}' (usage: migrate {usage})")),
            }
        }
        let vm = vmm
            .get_mut(id)
            .ok_or_else(|| cmd_err!("no guest with id {id} (see 'vms')"))?;
        match vm.state {
            VmState::Running | VmState::Halted(_) | VmState::Paused => {}
            ref s => {
                return Err(cmd_err!(
                    "guest {id} is {}; only a live guest can migrate",
                    s.name()
                ))
            }
        }
        let hello = Hello {
            mem_bytes: vm.mem_bytes,
            migrations: vm.migrations,
            time_ns: vm.guest_time_ns(),
            name: vm.image.clone(),
            args: vm.args.clone(),
        };
        let stats = MigrationStats {
            guest: id,
            image: vm.image.clone(),
            mem_bytes: vm.mem_bytes,
            peer: format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]),
            method: if params.stop_and_copy {
                "none"
            } else {
                method.name()
            },
            mode: if params.stop_and_copy {
                "stop"
            } else {
                "precopy"
            },
            ..Default::default()
        };
        let sock = net.add_tcp_socket(16 * 1024, TCP_BUF);
        net.tcp(sock).set_ack_delay(None);
        if let Err(e) = net.connect(sock, Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]), port) {
            net.remove_socket(sock);
            return Err(cmd_err!("cannot connect to {}: {e}", stats.peer));
        }
        println!(
            "migrate: guest {id} ({}, {} MiB) to {}, dirty tracking {}, downtime target {} ms",
            stats.image,
            stats.mem_bytes >> 20,
            stats.peer,
            stats.method,
            params.downtime_us / 1000
        );
        let source = Source::new(params, hello, stats, time::now_us());
        self.outgoing = Some(Outgoing {
            vm_id: id,
            sock,
            source,
            method,
            printed_round: 0,
        });
        Ok(())
    }

    /// `migrations`.
    pub fn cmd_migrations(&self) {
        if self.history.is_empty() {
            println!("  (no migrations from this hypervisor yet)");
            return;
        }
        println!(
            "  {:>2} {:>5} {:<9} {:>5} {:<21} {:<6} {:>3} {:>6} {:>10} {:>8} {:>11} {:>7} {}",
            "#",
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
                "  {:>2} {:>5} {:<9} {:>5} {:<21} {:<6} {:>3} {:>4}ms {:>8}us {:>8} {:>11} {:>7} {}",
                i + 1,
                s.guest,
                s.image,
                s.mem_bytes >> 20,
                s.peer,
                s.method,
                s.rounds.len(),
                s.total_us / 1000,
                s.downtime_us,
                s.zero_pages(),
                s.total_bytes(),
                s.throughput_kbps(),
                s.outcome
            );
        }
    }
}
