//! The guest manager: the table of guests, the round-robin scheduler that time-slices
//! them with the VMX-preemption timer, and the console commands that act on guests
//! (`images`, `start`, `vms`, `pause`, `resume`, `kill`, `stats`, `check`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::gdt::HostSegments;
use crate::console::args::{self, CmdError};
use crate::mm::phys;
use crate::vm::{exits, HostContext, SliceEnd, Virt, Vm, VmState};
use crate::{cmd_err, println, time};

/// A guest image handed over by GRUB.
#[derive(Clone, Debug)]
pub struct Image {
    /// Name (the module string).
    pub name: String,
    /// Physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Frames the hypervisor keeps for itself when admitting a guest (8 MiB): its heap is
/// fixed, but network rings, PML buffers and VMCSs come from frames.
pub const RESERVE_FRAMES: usize = 2048;

/// Admission: a guest of `mem_bytes` may be created (started or received) only if its
/// memory and tables fit in the free frames with [`RESERVE_FRAMES`] left over.
pub fn admit(mem_bytes: u64) -> Result<(), String> {
    let pages = (mem_bytes / 4096) as usize;
    let need = pages + crate::vm::nested::table_pages(pages) + 2;
    let free = phys::with_frames(|f| f.free_frames());
    if free < need + RESERVE_FRAMES {
        return Err(format!(
            "{} MiB guest does not fit: {} MiB free, {} MiB kept in reserve",
            mem_bytes >> 20,
            free / 256,
            RESERVE_FRAMES / 256
        ));
    }
    Ok(())
}

/// Default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 16;
/// Length of a time slice.
pub const SLICE_US: u64 = 10_000;

/// Guests and the CPU's virtualization extension.
pub struct Vmm {
    /// VMX root operation or SVM, when available (named `vmx` from before SVM).
    pub vmx: Option<Virt>,
    /// Why neither is available.
    pub vmx_error: Option<String>,
    host: HostSegments,
    /// The guests (alive or ended, until killed).
    pub vms: Vec<Vm>,
    next_id: u32,
    /// Loadable images.
    pub images: Vec<Image>,
    cursor: usize,
    /// The e1000's MAC (the guests' default MACs are derived from it).
    pub hv_mac: [u8; 6],
}

impl Vmm {
    /// Brings up VMX or SVM (or records why not).
    pub fn new(host: HostSegments, images: Vec<Image>) -> Self {
        let (vmx, vmx_error) = match Virt::enable() {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            vmx,
            vmx_error,
            host,
            vms: Vec::new(),
            next_id: 1,
            images,
            cursor: 0,
            hv_mac: [0x52, 0x54, 0, 0, 0, 0],
        }
    }

    /// Allocates a guest id.
    pub fn alloc_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The host context for vCPU setup (needs VMX or SVM).
    pub fn host_context(&self) -> Option<HostContext<'_>> {
        self.vmx.as_ref().map(|v| HostContext {
            virt: v,
            host: self.host,
        })
    }

    /// Moves frames between the guests' PV NICs and the switch: what they sent goes
    /// out, what waits for them goes into their receive rings (not while frozen: a
    /// migration's last copy must not change), and arrived guests are announced.
    pub fn service_nics(&mut self, net: &mut crate::net::NetStack) {
        let attached = |v: &Vm| v.state.alive() && v.nic.ring.is_some();
        if net.switch.ports.is_empty() && !self.vms.iter().any(attached) {
            return;
        }
        let mut guests = [(0u32, [0u8; 6]); 64];
        let mut n = 0;
        for v in self.vms.iter().filter(|v| attached(v)).take(guests.len()) {
            guests[n] = (v.id, v.nic.mac);
            n += 1;
        }
        net.sync_guests(&guests[..n]);
        let now = time::now_us();
        for vm in self.vms.iter_mut().filter(|v| attached(v)) {
            if core::mem::take(&mut vm.nic.announce) {
                net.switch.announce(vm.nic.mac, now);
            }
            while let Some(f) = vm.nic.tx_out.pop_front() {
                net.guest_tx(vm.id, f);
            }
            if !matches!(
                vm.state,
                VmState::Running | VmState::Halted(_) | VmState::Paused | VmState::Fetching(_)
            ) {
                continue;
            }
            while let Some(f) = net.switch.front_for(vm.id) {
                if !vm.net_receive(f) {
                    break;
                }
                net.switch.pop_for(vm.id);
            }
        }
        net.announce_guests();
    }

    /// Finds a guest by id.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Vm> {
        self.vms.iter_mut().find(|v| v.id == id)
    }

    /// Runs one time slice of the next runnable guest. Returns whether a guest ran.
    pub fn schedule(&mut self) -> bool {
        let Some(virt) = &self.vmx else { return false };
        for vm in self.vms.iter_mut() {
            if let VmState::Halted(until) = vm.state {
                if vm.guest_time_ns() >= until {
                    vm.state = VmState::Running;
                }
            }
        }
        let n = self.vms.len();
        for i in 0..n {
            let idx = (self.cursor + i) % n;
            let now = time::now();
            if self.vms[idx].state == VmState::Running && self.vms[idx].throttled_until <= now {
                self.cursor = idx + 1;
                let vm = &mut self.vms[idx];
                if let Err(e) = vm.load_vmcs() {
                    vm.stop(e);
                    return true;
                }
                // Auto-converge: a throttled guest runs (100 - t)% of a slice, then
                // waits t% of one, so it dirties memory that much slower.
                let t = u64::from(vm.throttle_pct.min(99));
                let slice = time::ns_to_ticks(SLICE_US * 1000);
                let deadline = now + slice * (100 - t) / 100;
                let _ = vm.run_slice(virt, deadline) == SliceEnd::Blocked;
                if t > 0 {
                    vm.throttled_until = time::now() + slice * t / 100;
                }
                return true;
            }
        }
        false
    }

    fn parse_id(&self, s: &str) -> Result<u32, CmdError> {
        let id = args::parse_u64("guest id", s)?;
        if self.vms.iter().any(|v| u64::from(v.id) == id) {
            Ok(id as u32)
        } else {
            Err(cmd_err!("no guest with id {id} (see 'vms')"))
        }
    }

    /// Runs a guest command.
    pub fn command(&mut self, name: &str, argv: &[&str], usage: &str) -> Result<(), CmdError> {
        let usage = || cmd_err!("usage: {name} {usage}");
        match name {
            "images" => {
                if self.images.is_empty() {
                    println!("no guest images (GRUB loaded no modules)");
                }
                println!("  {:<12} {:>9}  {}", "IMAGE", "BYTES", "ADDRESS");
                for i in &self.images {
                    println!("  {:<12} {:>9}  {:#x}", i.name, i.len, i.start);
                }
                Ok(())
            }
            "start" => self
                .cmd_start(argv)
                .map_err(|e| if e.0.is_empty() { usage() } else { e }),
            "vms" => {
                self.cmd_vms();
                Ok(())
            }
            "pause" | "resume" | "kill" | "stats" | "check" => {
                let [id] = argv else { return Err(usage()) };
                let id = self.parse_id(id)?;
                match name {
                    "pause" => self.cmd_pause(id),
                    "resume" => self.cmd_resume(id),
                    "kill" => self.cmd_kill(id),
                    "stats" => self.cmd_stats(id),
                    _ => self.cmd_check(id),
                }
            }
            "track" => {
                let (id, method) = match argv {
                    [id] => (id, None),
                    [id, m] => (id, Some(*m)),
                    _ => return Err(usage()),
                };
                let id = self.parse_id(id)?;
                self.cmd_track(id, method)
            }
            _ => Err(cmd_err!("'{name}' is not a guest command")),
        }
    }

    fn cmd_start(&mut self, argv: &[&str]) -> Result<(), CmdError> {
        let Some((&image, rest)) = argv.split_first() else {
            return Err(CmdError(String::new()));
        };
        let img = self
            .images
            .iter()
            .find(|i| i.name == image)
            .cloned()
            .ok_or_else(|| cmd_err!("no image '{image}' (see 'images')"))?;
        let mut mem = DEFAULT_MEM_MIB;
        let mut mac = None;
        let mut guest_args: Vec<&str> = Vec::new();
        for a in rest {
            if let Some(v) = a.strip_prefix("mac=") {
                let m = crate::vm::nic::parse_mac(v).ok_or_else(|| {
                    cmd_err!("mac: expected a unicast aa:bb:cc:dd:ee:ff, got '{v}'")
                })?;
                if m == self.hv_mac || self.vms.iter().any(|g| g.nic.mac == m) {
                    return Err(cmd_err!("mac {v} is in use here"));
                }
                mac = Some(m);
                continue;
            }
            match a.strip_prefix("mem=") {
                Some(v) => {
                    mem = args::parse_u64("memory size", v)?;
                    if !(crate::vm::MIN_MEM_MIB..=crate::vm::MAX_MEM_MIB).contains(&mem) {
                        return Err(cmd_err!(
                            "memory must be {}..{} MiB (got {mem})",
                            crate::vm::MIN_MEM_MIB,
                            crate::vm::MAX_MEM_MIB
                        ));
                    }
                }
                None => guest_args.push(a),
            }
        }
        let guest_args = guest_args.join(" ");
        if self.vmx.is_none() {
            return Err(cmd_err!(
                "cannot run guests: {}",
                self.vmx_error.as_deref().unwrap_or("VMX unavailable")
            ));
        }
        admit(mem << 20).map_err(|e| cmd_err!("cannot start '{image}': {e}"))?;
        let id = self.next_id;
        let elf = phys::boot_bytes(img.start, img.len);
        let ctx = self
            .host_context()
            .ok_or_else(|| cmd_err!("VMX unavailable"))?;
        let mut vm = Vm::create(id, &img.name, elf, mem, &guest_args, &ctx)
            .map_err(|e| cmd_err!("cannot start '{image}': {e}"))?;
        vm.nic.mac = mac.unwrap_or_else(|| crate::vm::nic::default_mac(self.hv_mac, id));
        self.next_id += 1;
        println!(
            "started guest {id} ({image}, {mem} MiB{}{})",
            if guest_args.is_empty() {
                ""
            } else {
                ", args: "
            },
            guest_args
        );
        self.vms.push(vm);
        Ok(())
    }

    fn cmd_vms(&self) {
        println!(
            "  {:>3}  {:<10} {:<9} {:>6} {:>10} {:>10} {:>4}  {}",
            "ID", "IMAGE", "STATE", "MEM", "EXITS", "RUN-MS", "MIGR", "NOTE"
        );
        for vm in &self.vms {
            let note = match &vm.state {
                VmState::Exited(c) => format!("exit code {c}"),
                VmState::Stopped(why) => why.clone(),
                _ => vm.args.clone(),
            };
            println!(
                "  {:>3}  {:<10} {:<9} {:>4}Mi {:>10} {:>10} {:>4}  {}",
                vm.id,
                vm.image,
                vm.state.name(),
                vm.mem_bytes >> 20,
                vm.stats.total_exits(),
                time::ticks_to_us(vm.runtime_ticks) / 1000,
                vm.migrations,
                note
            );
        }
        if self.vms.is_empty() {
            println!("  (no guests: start one with 'start <image>')");
        }
    }

    fn cmd_pause(&mut self, id: u32) -> Result<(), CmdError> {
        let vm = self.get_mut(id).ok_or_else(|| cmd_err!("no guest {id}"))?;
        match vm.state {
            VmState::Running | VmState::Halted(_) => {
                vm.state = VmState::Paused;
                println!("guest {id} paused");
                Ok(())
            }
            ref s => Err(cmd_err!("guest {id} is {}, not running", s.name())),
        }
    }

    fn cmd_resume(&mut self, id: u32) -> Result<(), CmdError> {
        let vm = self.get_mut(id).ok_or_else(|| cmd_err!("no guest {id}"))?;
        match vm.state {
            VmState::Paused => {
                vm.state = VmState::Running;
                println!("guest {id} resumed");
                Ok(())
            }
            VmState::Frozen => Err(cmd_err!(
                "guest {id} is frozen by a migration in progress; it runs again when the migration ends"
            )),
            ref s => Err(cmd_err!("guest {id} is {}, not paused", s.name())),
        }
    }

    fn cmd_kill(&mut self, id: u32) -> Result<(), CmdError> {
        let idx = self
            .vms
            .iter()
            .position(|v| v.id == id)
            .ok_or_else(|| cmd_err!("no guest {id}"))?;
        if self.vms[idx].state == VmState::Frozen {
            return Err(cmd_err!(
                "guest {id} is being migrated; wait for the migration to end"
            ));
        }
        let vm = self.vms.remove(idx);
        let mem = vm.mem_bytes >> 20;
        drop(vm);
        println!("guest {id} killed, {mem} MiB freed");
        Ok(())
    }

    fn cmd_stats(&mut self, id: u32) -> Result<(), CmdError> {
        let vm = self.get_mut(id).ok_or_else(|| cmd_err!("no guest {id}"))?;
        let total = vm.stats.total_exits();
        println!(
            "guest {id} ({}): {} exits, {} ms in guest, state {}, migrations {}",
            vm.image,
            total,
            time::ticks_to_us(vm.runtime_ticks) / 1000,
            vm.state.name(),
            vm.migrations
        );
        println!("  {:<22} {:>10}", "EXIT REASON", "COUNT");
        for (reason, &n) in vm.stats.exits.iter().enumerate() {
            if n > 0 {
                println!(
                    "  {:<22} {:>10}",
                    format!("{} ({reason})", exits::slot_name(vm.vendor(), reason)),
                    n
                );
            }
        }
        let names = [
            "?",
            "console-write",
            "time",
            "yield",
            "halt-until",
            "exit",
            "info",
            "report",
            "take-request",
            "free-pages",
            "move",
            "net-attach",
            "net-notify",
            "net-wait",
        ];
        let calls: Vec<String> = vm
            .stats
            .hypercalls
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| format!("{}={n}", names.get(i).unwrap_or(&"?")))
            .collect();
        println!(
            "  hypercalls: {} (failed: {})",
            calls.join(" "),
            vm.stats.hypercall_errors
        );
        if let Some(ring) = vm.nic.ring {
            let n = &vm.nic.stats;
            println!(
                "  nic: MAC {} ring {ring:#x}: tx {} frames {} bytes, rx {} frames {} bytes, rx dropped {}, bad descriptors {}, bad ring {}",
                crate::net::MacFmt(vm.nic.mac),
                n.tx_frames,
                n.tx_bytes,
                n.rx_frames,
                n.rx_bytes,
                n.rx_dropped,
                n.bad_desc,
                n.bad_ring
            );
        }
        if let Some((v, d)) = vm.stats.reports[1] {
            println!(
                "  verify: {} ({d} pages checked)",
                if v == 1 { "PASS" } else { "FAIL" }
            );
        }
        if let Some((v, d)) = vm.stats.reports[2] {
            println!("  dirtied: {v} page writes over a {d}-page working set");
        }
        if let Some((v, _)) = vm.stats.reports[3] {
            println!("  progress: {v}");
        }
        if let Some(t) = vm.tracking {
            println!("  dirty tracking: {t:?}");
        }
        if let Some((i1, i2)) = vm.last_npf {
            println!("  last nested page fault: EXITINFO1={i1:#x} EXITINFO2 (GPA)={i2:#x}");
        }
        let (a, d) = vm.nested_flag_counts();
        println!(
            "  nested tables ({}): {a} leaves accessed, {d} dirty",
            match vm.vendor() {
                exits::Vendor::Vmx => "EPT",
                exits::Vendor::Svm => "NPT",
            }
        );
        Ok(())
    }

    /// `track`: exercises dirty tracking on one guest without a migration (to measure
    /// what the CPU does: which pages the flags or write protection report). Not while
    /// the guest migrates (the migration owns its tracking then).
    fn cmd_track(&mut self, id: u32, method: Option<&str>) -> Result<(), CmdError> {
        let caps = self
            .vmx
            .as_ref()
            .map(|v| v.caps)
            .ok_or_else(|| cmd_err!("no VMX or SVM here"))?;
        let vm = self.get_mut(id).ok_or_else(|| cmd_err!("no guest {id}"))?;
        vm.load_vmcs().map_err(|e| cmd_err!("{e}"))?;
        match method {
            Some("stop") => {
                vm.stop_tracking();
                println!("guest {id}: dirty tracking stopped");
            }
            Some(m) => {
                let t = crate::vm::Tracking::parse(m)
                    .ok_or_else(|| cmd_err!("unknown dirty tracking '{m}' (pml, ad, wp)"))?;
                if vm.tracking.is_some() {
                    return Err(cmd_err!("guest {id} is already tracked"));
                }
                vm.start_tracking(t, &caps).map_err(|e| cmd_err!("{e}"))?;
                println!("guest {id}: dirty tracking '{}' started", t.name());
            }
            None => {
                let Some(t) = vm.tracking else {
                    return Err(cmd_err!("guest {id} is not tracked"));
                };
                let (mut n, mut first) = (0usize, Vec::new());
                vm.collect_dirty(|pfn| {
                    n += 1;
                    if first.len() < 8 {
                        first.push(pfn);
                    }
                });
                let (a, d) = vm.nested_flag_counts();
                let npf = vm
                    .last_npf
                    .map_or(String::from("-"), |(i1, i2)| format!("{i1:#x}@{i2:#x}"));
                println!(
                    "TRACK guest={id} method={} dirty={n} nested_faults={} leaves_accessed={a} leaves_dirty={d} last_npf={npf} first={first:?}",
                    t.name(),
                    vm.stats.exits[48]
                );
            }
        }
        Ok(())
    }

    fn cmd_check(&mut self, id: u32) -> Result<(), CmdError> {
        let vm = self.get_mut(id).ok_or_else(|| cmd_err!("no guest {id}"))?;
        if !vm.state.alive() {
            return Err(cmd_err!("guest {id} is {}", vm.state.name()));
        }
        vm.request = guest_abi::Request::Verify as u64;
        println!("verify request posted to guest {id}; its answer appears on the console and in 'stats {id}'");
        Ok(())
    }
}
