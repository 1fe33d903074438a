//! The kernel proper: boot sequence ([`kmain`]) and the main loop that polls the
//! console and, as they arrive, the network and the guests. The hypervisor runs on the
//! boot CPU with interrupts off: everything is a poll-driven state machine, which keeps
//! the control flow visible and lets migration make progress between guest time slices.

use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::{cpu, gdt, idt, pit, serial};
use crate::console::args::{self, CmdError};
use crate::console::line::{Event, LineEditor};
use crate::console::{self, PROMPT};
use crate::mm::{heap, phys};
use crate::multiboot::{self, BootInfo};
use crate::platform::{self, CpuTopology, Machine};
use crate::vm::{HwCaps, Tracking};
use crate::vmm::{Image, Vmm};
use crate::{cmd_err, print, println, time};

/// Version string printed in the banner and by `info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the console commands act on.
pub struct Kernel {
    machine: Machine,
    cmdline: String,
    topology: Option<CpuTopology>,
    vmm: Vmm,
    editor: LineEditor,
    boot_us: u64,
    /// The network stack, when an e1000 came up.
    net: Option<crate::net::NetStack>,
    /// Outgoing and incoming migrations.
    migrations: crate::migration::kernel::Migrations,
}

/// Entry from `main.rs`: `magic`/`info` as GRUB left them in EAX/EBX.
pub fn kmain(magic: u32, info_addr: u64) -> ! {
    cpu::disable_interrupts();
    // The hypervisor polls; mask the legacy PICs so no stale IRQ is ever delivered.
    crate::arch::port::outb(0x21, 0xFF);
    crate::arch::port::outb(0xA1, 0xFF);
    serial::init();
    let caches_were_off = cpu::enable_caches();
    crate::logger::init(log::LevelFilter::Info);
    println!();
    println!("hvmig {VERSION}: x86-64 VMX/SVM microhypervisor with live migration");
    if caches_were_off {
        println!("cpu: caches were disabled at boot (CR0.CD/NW); enabled");
    }

    let header = phys::boot_bytes(info_addr, 8);
    let size = multiboot::total_size(header).unwrap_or(0);
    let info = match BootInfo::parse(magic, phys::boot_bytes(info_addr, size)) {
        Ok(i) => i,
        Err(e) => {
            println!("fatal: {e}");
            cpu::halt_forever();
        }
    };
    init_memory(&info, info_addr);
    if let Err(e) = heap::init() {
        println!("fatal: no heap: {e}");
        cpu::halt_forever();
    }
    let segs = gdt::init();
    idt::init(segs.code);

    let tsc_hz = pit::calibrate_tsc(50).unwrap_or_else(|| {
        log::warn!("PIT calibration failed; assuming 1 GHz TSC");
        1_000_000_000
    });
    time::set_tsc_hz(tsc_hz);

    let rsdp = info.rsdp_offset().map(|o| info_addr + o as u64);
    let topology = match platform::read_madt(rsdp) {
        Ok(t) => Some(t),
        Err(e) => {
            log::warn!("ACPI: no MADT ({e:?})");
            None
        }
    };
    let images = info
        .modules()
        .map(|m| Image {
            name: String::from(m.name),
            start: m.start,
            len: (m.end - m.start) as usize,
        })
        .collect();

    let machine = Machine::detect();
    let mut k = Kernel {
        machine,
        cmdline: String::from(info.command_line()),
        topology,
        vmm: Vmm::new(segs, images),
        editor: LineEditor::new(),
        boot_us: time::now_us(),
        net: None,
        migrations: crate::migration::kernel::Migrations::new(),
    };
    k.migrations.key_from_cmdline(&k.cmdline);
    // Network (after ACPI): PCI, e1000, smoltcp.
    match crate::net::NetStack::init(&k.cmdline) {
        Ok(n) => {
            println!("net: {}", n.summary());
            k.vmm.hv_mac = n.mac();
            k.net = Some(n);
        }
        Err(e) => println!("net: not available: {e}"),
    }
    let (free, total) = phys::with_frames(|f| (f.free_frames(), f.total_frames()));
    println!(
        "machine: {}, {} CPU(s), {} MiB RAM ({} MiB free), TSC {} MHz",
        machine.name(),
        k.topology.as_ref().map_or(1, |t| t.apic_ids.len()),
        total / 256,
        free / 256,
        tsc_hz / 1_000_000
    );
    match (&k.vmm.vmx, &k.vmm.vmx_error) {
        (Some(v), _) => println!("{}: enabled (type 'info' for capabilities)", v.name()),
        (None, Some(e)) => {
            println!("VMX: NOT AVAILABLE: {e}");
            println!("  guests cannot run here; the console and network still work.");
            println!("  To get VMX: run under Bochs (cargo xtask run --emulator bochs), or QEMU");
            println!("  with KVM on an Intel host with nested VMX (cargo xtask run --emulator qemu-kvm);");
            println!("  for SVM: QEMU TCG (cargo xtask run --emulator qemu-tcg).");
        }
        (None, None) => {}
    }
    println!("type 'help' for commands");
    print!("{PROMPT}");
    k.run()
}

/// The command line with the value of `migkey=` hidden (`info` never shows the key).
fn redact_key(cmdline: &str) -> String {
    cmdline
        .split(' ')
        .map(|w| {
            if w.starts_with("migkey=") {
                "migkey=<hidden>"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn init_memory(info: &BootInfo<'_>, info_addr: u64) {
    extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
    }
    let kstart = core::ptr::addr_of!(__kernel_start) as u64;
    let kend = core::ptr::addr_of!(__kernel_end) as u64;
    phys::with_frames(|f| {
        for r in info.memory_map().filter(|r| r.kind == 1) {
            f.add_free(r.base, r.base.saturating_add(r.len));
        }
        // Low memory holds BIOS data, the EBDA and real-mode structures: keep out.
        f.reserve(0, 0x10_0000);
        f.reserve(kstart, kend);
        f.reserve(info_addr, info_addr + info.len() as u64);
        for m in info.modules() {
            f.reserve(m.start, m.end);
        }
    });
}

impl Kernel {
    /// The main loop: never returns.
    fn run(&mut self) -> ! {
        loop {
            serial::pump();
            self.poll_console();
            if let Some(n) = &mut self.net {
                n.poll();
                if self.migrations.poll(n, &mut self.vmm) {
                    // Send what the migration just queued (COMMIT above all) now,
                    // not after the next guest slice.
                    n.poll();
                }
                self.vmm.service_nics(n);
            }
            if !self.vmm.schedule() {
                cpu::pause();
            }
        }
    }

    fn poll_console(&mut self) {
        while let Some(b) = serial::try_read() {
            match self.editor.feed(b) {
                Event::None => {}
                Event::Echo(bytes) => serial::write_bytes(bytes),
                Event::EchoByte(b) => serial::write_bytes(&[b]),
                Event::Line(line) => {
                    println!();
                    if let Err(e) = self.execute(&line) {
                        println!("error: {e}");
                    }
                    print!("{PROMPT}");
                }
                Event::TooLong => {
                    println!();
                    println!(
                        "error: line too long (max {} characters)",
                        console::line::MAX_LINE
                    );
                    print!("{PROMPT}");
                }
                Event::Cancelled => {
                    println!("^C");
                    print!("{PROMPT}");
                }
            }
        }
    }

    fn execute(&mut self, line: &str) -> Result<(), CmdError> {
        let words = args::words(line);
        let Some((&name, rest)) = words.split_first() else {
            return Ok(());
        };
        let Some(cmd) = console::find(name) else {
            return Err(cmd_err!("unknown command '{name}' (type 'help')"));
        };
        let usage = || cmd_err!("usage: {} {}", cmd.name, cmd.usage);
        match name {
            "help" => {
                for c in console::COMMANDS {
                    println!(
                        "  {:<10} {:<28} {}",
                        c.name,
                        c.usage.split(' ').take(2).collect::<Vec<_>>().join(" "),
                        c.help
                    );
                }
                Ok(())
            }
            "info" => {
                self.cmd_info();
                Ok(())
            }
            "mem" => {
                self.cmd_mem();
                Ok(())
            }
            "log" => {
                let [level] = rest else { return Err(usage()) };
                let l = crate::logger::parse_level(level).ok_or_else(|| {
                    cmd_err!("unknown log level '{level}' (error|warn|info|debug|trace|off)")
                })?;
                log::set_max_level(l);
                println!("log level: {l}");
                Ok(())
            }
            "pause" | "resume" | "kill" => {
                // A guest in a migration changes state only through the migration.
                if let [id] = rest {
                    let id = args::parse_u32("guest id", id)?;
                    if let Some(why) = self.migrations.guest_busy(id) {
                        return Err(cmd_err!(
                            "guest {id} is {why}; 'migrate cancel' first, or wait for it to end"
                        ));
                    }
                }
                self.vmm.command(name, rest, cmd.usage)
            }
            "images" | "start" | "vms" | "stats" | "check" | "track" => {
                self.vmm.command(name, rest, cmd.usage)
            }
            "pci" | "net" | "ip" | "ping" | "netbench" => {
                crate::net::commands::execute(self.net.as_mut(), name, rest)
            }
            "migrate" | "checkpoint" => self.migrations.cmd_migrate(
                self.net.as_mut(),
                &mut self.vmm,
                rest,
                cmd.usage,
                name == "checkpoint",
            ),
            "restore" => {
                self.migrations
                    .cmd_restore(self.net.as_mut(), &mut self.vmm, rest, cmd.usage)
            }
            "allow-move" => {
                let [id, on] = rest else { return Err(usage()) };
                let id = args::parse_u32("guest id", id)?;
                let on = match *on {
                    "on" => true,
                    "off" => false,
                    _ => return Err(usage()),
                };
                let vm = self
                    .vmm
                    .get_mut(id)
                    .ok_or_else(|| cmd_err!("no guest with id {id} (see 'vms')"))?;
                vm.allow_move = on;
                println!(
                    "guest {id} may {}move itself (Move hypercall)",
                    if on { "" } else { "not " }
                );
                Ok(())
            }
            "migrations" => {
                self.migrations.cmd_migrations();
                Ok(())
            }
            "key" => self.migrations.cmd_key(rest, cmd.usage),
            "hold" => self.migrations.cmd_hold(rest, cmd.usage),
            "shutdown" => {
                println!("shutting down");
                platform::shutdown()
            }
            _ => Err(cmd_err!("'{name}' is not available in this build")),
        }
    }

    fn cmd_info(&self) {
        let vendor = platform::cpu_vendor();
        println!("hvmig {VERSION}");
        println!(
            "  machine     {} ({})",
            self.machine.name(),
            core::str::from_utf8(&vendor).unwrap_or("?")
        );
        println!("  cmdline     {}", redact_key(&self.cmdline));
        println!("  {}", self.migrations.key_summary());
        let (free, total) = phys::with_frames(|f| (f.free_frames(), f.total_frames()));
        println!(
            "  memory      {} MiB usable, {} MiB free",
            total / 256,
            free / 256
        );
        match &self.topology {
            Some(t) => println!(
                "  cpus        {} (APIC ids {:?}), local APIC at {:#x}, {} I/O APIC(s); hypervisor runs on the boot CPU",
                t.apic_ids.len(),
                t.apic_ids,
                t.lapic_addr,
                t.io_apics
            ),
            None => println!("  cpus        unknown (no MADT)"),
        }
        println!("  tsc         {} kHz", time::tsc_hz() / 1000);
        println!(
            "  caches      {} (CR0={:#x}); guests cannot change CD/NW",
            if cpu::caches_enabled() { "on" } else { "OFF" },
            cpu::read_cr0()
        );
        println!(
            "  uptime      {} ms",
            (time::now_us() - self.boot_us) / 1000
        );
        match (self.vmm.vmx.as_ref().map(|v| v.caps), &self.vmm.vmx_error) {
            (Some(HwCaps::Svm(c)), _) => {
                println!("  vmx         no (AMD CPU)");
                println!(
                    "  svm         yes: revision {}, {} ASIDs, nested paging, dirty tracking {}",
                    c.revision,
                    c.asids,
                    Tracking::best(&HwCaps::Svm(c)).name()
                );
                let mut s = String::new();
                for (name, on) in c.features() {
                    s.push_str(name);
                    s.push_str(if on { "=yes " } else { "=no " });
                }
                println!("  svm-features {}", s.trim_end());
                println!(
                    "  svm-cpuid   8000000A: eax={:#x} ebx={:#x} edx={:#x}",
                    c.revision, c.asids, c.features
                );
            }
            (Some(HwCaps::Vmx(c)), _) => {
                let c = &c;
                println!(
                    "  vmx         yes: VMCS revision {:#x}, region {} bytes",
                    c.revision(),
                    c.region_size()
                );
                let mut s = String::new();
                for (name, on) in c.features() {
                    s.push_str(name);
                    s.push_str(if on { "=yes " } else { "=no " });
                }
                println!("  vmx-features {}", s.trim_end());
                println!(
                    "  vmx-msrs    basic={:#x} ept_vpid={:#x} proc2={:#x} misc={:#x}",
                    c.basic, c.ept_vpid, c.procbased2, c.misc
                );
            }
            (None, Some(e)) => println!("  vmx         NOT AVAILABLE: {e}"),
            (None, None) => println!("  vmx         not initialised"),
        }
    }

    /// `mem`: what the hypervisor holds, and on whose behalf. The figures the tests
    /// sample for leaks come first, as one machine-readable line.
    fn cmd_mem(&self) {
        let (free, total) = phys::with_frames(|f| (f.free_frames(), f.total_frames()));
        let (used, hfree) = heap::usage();
        let (high, failed) = heap::high_water();
        let sockets = self.net.as_ref().map_or(0, |n| n.socket_count());
        let (inflight, lingering, history) = self.migrations.held();
        let out = serial::out_stats();
        println!(
            "MEM heap_used={used} heap_free={hfree} heap_high={high} heap_failed={failed} frames_free={free} frames_total={total} sockets={sockets} migrations={inflight} lingering={lingering} guests={}",
            self.vmm.vms.len()
        );
        println!(
            "  frames      {total} total, {free} free ({} KiB free)",
            free * 4
        );
        println!(
            "  heap        {} KiB used, {} KiB free, high-water {} KiB, {failed} failed allocations",
            used / 1024,
            hfree / 1024,
            high / 1024
        );
        println!(
            "  network     {sockets} sockets open (netbench sink and migration listener included)"
        );
        println!(
            "  migrations  {inflight} in flight, {lingering} sockets lingering, {history}/{} history entries",
            crate::migration::kernel::HISTORY
        );
        println!(
            "  console     {} bytes queued (high-water {}), dropped: {} hypervisor, {} guest bytes",
            out.queued, out.high_water, out.dropped_hv, out.dropped_guest
        );
        for vm in &self.vmm.vms {
            let (frames, heap) = vm.held();
            println!(
                "  guest {:<4} {} frames ({} KiB: memory, EPT, VMCS, PML), {} bytes of heap",
                vm.id,
                frames,
                frames * 4,
                heap
            );
        }
    }
}
