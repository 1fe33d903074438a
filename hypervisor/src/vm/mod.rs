//! Paravirtualized guests: one [`Vm`] per guest, with its memory, nested page tables
//! (EPT or NPT, [`nested`]), control structure (VMCS or VMCB) and one vCPU. The vCPU
//! runs on Intel VMX (`vcpu.rs`: VMCS setup per SDM Vol. 3C ch. 25-26, slices bounded
//! by the VMX-preemption timer) or AMD SVM (`vcpu_svm.rs`: VMCB per APM Vol. 2 ch. 15,
//! slices bounded by a timer interrupt); both decode every exit once into the
//! vendor-neutral [`exits::Exit`], which one dispatcher hands to one handler each, and
//! the hypercalls of `guest-abi` are implemented once for both.
//!
//! A guest that does something illegal (an exception, an access outside its memory, an
//! I/O port, an MSR) is stopped with a one-line report; the hypervisor and the other
//! guests go on.

pub mod clock;
mod dirty;
pub mod exits;
pub mod loader;
pub mod nested;
pub mod nic;
mod vcpu;
mod vcpu_svm;
pub mod virt;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_abi::{
    BootInfo, ErrorCode, GuestInfo, Hypercall, ReportKind, ABI_VERSION, BOOT_INFO_ADDR,
    BOOT_INFO_MAGIC, MAX_ARGS, MAX_CONSOLE_WRITE,
};

use crate::arch::cpu;
use crate::arch::gdt::HostSegments;
use crate::arch::vmx::{self as hw, GuestRegs};
use crate::mm::bitmap::PageBitmap;
use crate::mm::phys::PhysPages;
use crate::time;
use crate::vmx::caps::{self, VmxCaps};
use crate::vmx::ept;
use crate::vmx::vmcs::{self, ro, w16, w32, w64, wn};
use clock::GuestClock;
use exits::{Exit, Vendor};
use nested::Format;
pub use virt::{HwCaps, Virt};

/// Smallest and largest guest memory in MiB.
pub const MIN_MEM_MIB: u64 = 2;
/// Largest guest memory in MiB (one EPT page directory).
pub const MAX_MEM_MIB: u64 = 512;

/// Where a guest is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Runnable.
    Running,
    /// Waiting for its monotonic clock to reach a deadline (guest nanoseconds, so the
    /// deadline keeps its meaning across a migration).
    Halted(u64),
    /// Paused by the operator.
    Paused,
    /// Paused for the stop-and-copy phase of a migration, or arrived and waiting for
    /// the source's COMMIT.
    Frozen,
    /// Asked to be moved (`Move` hypercall) and waits until the move has ended.
    Moving,
    /// Arrived by post-copy and touched page `pfn`, which has not arrived yet: waits
    /// until the migration maps it.
    Fetching(usize),
    /// Ended by the guest with an exit code.
    Exited(i64),
    /// Stopped by the hypervisor.
    Stopped(String),
}

impl VmState {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Halted(_) => "sleeping",
            Self::Paused => "paused",
            Self::Frozen => "frozen",
            Self::Moving => "moving",
            Self::Fetching(_) => "fetching",
            Self::Exited(_) => "exited",
            Self::Stopped(_) => "stopped",
        }
    }

    /// Whether the guest can still run (not ended).
    pub fn alive(&self) -> bool {
        !matches!(self, Self::Exited(_) | Self::Stopped(_))
    }
}

/// How a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// The slice was used up (or the guest yielded): it stays runnable.
    Preempted,
    /// The guest blocked, ended or was stopped.
    Blocked,
}

/// Per-reason exit counters and the latest guest reports.
#[derive(Clone, Debug)]
pub struct VmStats {
    /// Exits by [`Exit::stat_slot`] (numbered like VMX basic exit reasons; on VMX the
    /// raw basic reason).
    pub exits: [u64; 70],
    /// Hypercalls by number (index = call number, 0 = unknown).
    pub hypercalls: [u64; 14],
    /// Hypercalls that failed validation.
    pub hypercall_errors: u64,
    /// Latest report per [`ReportKind`] (value, detail).
    pub reports: [Option<(u64, u64)>; 4],
}

impl Default for VmStats {
    fn default() -> Self {
        Self {
            exits: [0; 70],
            hypercalls: [0; 14],
            hypercall_errors: 0,
            reports: [None; 4],
        }
    }
}

impl VmStats {
    /// Total exits.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

/// The architectural vCPU state that lives in the VMCS, as the migration stream carries
/// it (together with [`GuestRegs`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: GuestRegs,
    #[allow(missing_docs)]
    pub rip: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub cr0: u64,
    #[allow(missing_docs)]
    pub cr3: u64,
    #[allow(missing_docs)]
    pub cr4: u64,
    #[allow(missing_docs)]
    pub efer: u64,
    /// FS and GS bases (the only segment state a PV guest can change).
    pub fs_base: u64,
    #[allow(missing_docs)]
    pub gs_base: u64,
    /// Guest interruptibility state.
    pub interruptibility: u64,
}

/// A guest.
pub struct Vm {
    /// Id on this hypervisor.
    pub id: u32,
    /// Image name.
    pub image: String,
    /// Arguments given at start.
    pub args: String,
    /// Memory size in bytes.
    pub mem_bytes: u64,
    mem: PhysPages,
    /// Nested page tables (EPT or NPT, in [`Vm::fmt`]'s bits).
    ept: PhysPages,
    /// The VMCS (VMX) or VMCB (SVM).
    vmcs: PhysPages,
    pml: Option<PhysPages>,
    /// Whose vCPU this is.
    vendor: Vendor,
    /// The nested-paging bits of that vendor.
    fmt: Format,
    /// SVM: flush this guest's translations at the next VMRUN (TLB_CONTROL).
    flush_tlb: bool,
    /// SVM: the raw EXITINFO1 and EXITINFO2 of the latest nested page fault (shown by
    /// `track` and `stats`, to see what the CPU reports).
    pub last_npf: Option<(u64, u64)>,
    /// General-purpose registers while not running.
    pub regs: GuestRegs,
    launched: bool,
    ad_enabled: bool,
    /// Life-cycle state.
    pub state: VmState,
    /// Counters.
    pub stats: VmStats,
    /// TSC ticks spent in the guest (entry to exit, including exit handling).
    pub runtime_ticks: u64,
    /// The guest's monotonic clock.
    pub clock: GuestClock,
    /// The guest's time when it was frozen (what the migration stream carries).
    frozen_at_ns: Option<u64>,
    /// Times the guest arrived by migration.
    pub migrations: u64,
    /// Times the guest was restored from a checkpoint.
    pub restores: u64,
    /// The operator allows this guest to move itself (`allow-move`).
    pub allow_move: bool,
    /// Auto-converge: percent of each time slice the guest is kept off the CPU while
    /// a migration cannot keep up with it (0: not throttled).
    pub throttle_pct: u8,
    /// Throttled: not runnable before this TSC time.
    pub throttled_until: u64,
    /// A move the guest asked for, not started yet.
    pub move_request: Option<MoveRequest>,
    /// Operator request waiting for `TakeRequest`.
    pub request: u64,
    out: Vec<u8>,
    /// State to return to when a migration that froze the guest fails.
    pre_freeze: Option<VmState>,
    /// Dirty tracking in force, if any (set by the migration engine).
    pub tracking: Option<Tracking>,
    /// While tracking: pages found dirty by write protection, drained from the PML log,
    /// or written by the hypervisor itself (hypercall results, which EPT never sees),
    /// waiting for the migration engine. One bit per page, so its size is fixed by the
    /// guest's memory however often pages are reported; `None` when not tracking.
    pub dirty: Option<PageBitmap>,
    /// Set on the destination at COMMIT: record the time of the next VM entry.
    pub watch_first_run: bool,
    /// When the guest's vCPU first ran after the last arrival (µs, this clock).
    pub first_run_us: Option<u64>,
    /// Post-copy: pages still on the source (unmapped in EPT, so a touch exits); `None`
    /// once every page is here.
    remote: Option<PageBitmap>,
    /// Free-page hints: pages the guest said hold nothing it needs, whose EPT dirty
    /// flag was cleared at the hint (allocated at the first hint; one bit per page).
    free: Option<PageBitmap>,
    /// Post-copy: when the guest blocked on a remote page (µs), and how many times.
    pub fault_at_us: u64,
    /// Post-copy: touches of pages that had not arrived.
    pub remote_faults: u64,
    /// The PV NIC (guest-abi v3).
    pub nic: nic::Nic,
    /// The VMCS has been VMCLEARed and loaded at least once: it must be VMCLEARed
    /// again before its frame is freed.
    vmcs_active: bool,
}

/// A move a guest asked for ([`Hypercall::Move`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveRequest {
    /// Peer IPv4 address.
    pub ip: [u8; 4],
    /// Peer TCP port.
    pub port: u16,
    /// Checkpoint to a store instead of migrating.
    pub checkpoint: bool,
}

/// Dirty-tracking method in force on a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// Page-modification logging.
    Pml,
    /// EPT accessed/dirty flags, scanned per round.
    AccessedDirty,
    /// EPT write protection with violation exits.
    WriteProtect,
}

/// Why a guest could not be created.
#[derive(Debug)]
pub enum CreateError {
    /// Not enough memory.
    Memory(crate::mm::frames::OutOfMemory),
    /// The image is invalid.
    Image(loader::LoadError),
    /// The VMCS could not be set up.
    Vmcs(String),
    /// Bad size or arguments.
    Config(String),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Memory(e) => write!(f, "{e}"),
            Self::Image(e) => write!(f, "bad guest image: {e}"),
            Self::Vmcs(e) => write!(f, "VMCS setup failed: {e}"),
            Self::Config(e) => f.write_str(e),
        }
    }
}

/// Guest memory and tables without a loaded image (used by [`Vm::create`] and by the
/// migration receiver, which fills memory from the stream).
pub struct VmParts {
    mem: PhysPages,
    ept: PhysPages,
}

impl VmParts {
    /// Allocates zeroed memory and the EPT for `mem_bytes`.
    pub fn alloc(mem_bytes: u64) -> Result<Self, CreateError> {
        let mib = mem_bytes >> 20;
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) || !mem_bytes.is_multiple_of(1 << 20) {
            return Err(CreateError::Config(format!(
                "guest memory must be {MIN_MEM_MIB}..{MAX_MEM_MIB} MiB (got {} bytes)",
                mem_bytes
            )));
        }
        let pages = (mem_bytes / 4096) as usize;
        let mem = PhysPages::alloc(pages).map_err(CreateError::Memory)?;
        let mut ept = PhysPages::alloc(nested::table_pages(pages)).map_err(CreateError::Memory)?;
        let base = ept.base();
        let mem_base = nested::Hpa(mem.base());
        virt::nested_format().build(ept.as_u64_mut(), nested::Hpa(base), mem_base, pages);
        Ok(Self { mem, ept })
    }

    /// Guest memory as bytes.
    pub fn mem_mut(&mut self) -> &mut [u8] {
        self.mem.as_bytes_mut()
    }

    /// Guest memory as bytes.
    pub fn mem(&self) -> &[u8] {
        self.mem.as_bytes()
    }
}

/// What a new guest needs from the hypervisor.
pub struct HostContext<'a> {
    /// The CPU's virtualization extension.
    pub virt: &'a Virt,
    /// Host segments for the VMCS host-state area.
    pub host: HostSegments,
}

impl Vm {
    /// Creates a guest from an ELF image: allocates memory and EPT, loads the image,
    /// writes the boot info and the guest page tables, and prepares the VMCS.
    pub fn create(
        id: u32,
        image: &str,
        elf: &[u8],
        mem_mib: u64,
        args: &str,
        ctx: &HostContext<'_>,
    ) -> Result<Self, CreateError> {
        if args.len() > MAX_ARGS {
            return Err(CreateError::Config(format!(
                "arguments longer than {MAX_ARGS} bytes"
            )));
        }
        let mem_bytes = mem_mib << 20;
        let mut parts = VmParts::alloc(mem_bytes)?;
        let img = loader::parse_elf(elf, mem_bytes).map_err(CreateError::Image)?;
        loader::load(&img, elf, parts.mem_mut());
        loader::build_guest_page_tables(parts.mem.as_u64_mut(), mem_bytes);
        let mut bi = BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION,
            guest_id: id,
            mem_bytes,
            image_end: img.end,
            args_len: args.len() as u32,
            _reserved: 0,
            args: [0; MAX_ARGS],
        };
        bi.args[..args.len()].copy_from_slice(args.as_bytes());
        write_boot_info(parts.mem_mut(), &bi);

        let mut vm = Self::from_parts(id, image, args, mem_bytes, parts)?;
        let mut state = VcpuState {
            rip: img.entry,
            rsp: mem_bytes - 16,
            rflags: 0x2,
            cr0: 0x8000_0031, // PG | NE | ET | PE
            cr3: loader::GUEST_PML4,
            cr4: 0x20,   // PAE
            efer: 0x500, // LMA | LME
            ..Default::default()
        };
        state.regs.rdi = BOOT_INFO_ADDR;
        vm.setup_vmcs(ctx, &state).map_err(CreateError::Vmcs)?;
        Ok(vm)
    }

    /// Wraps allocated parts into a guest whose VMCS is not set up yet.
    pub fn from_parts(
        id: u32,
        image: &str,
        args: &str,
        mem_bytes: u64,
        parts: VmParts,
    ) -> Result<Self, CreateError> {
        let vmcs = PhysPages::alloc(1).map_err(CreateError::Memory)?;
        Ok(Self {
            id,
            image: String::from(image),
            args: String::from(args),
            mem_bytes,
            mem: parts.mem,
            ept: parts.ept,
            vmcs,
            pml: None,
            vendor: virt::vendor(),
            fmt: virt::nested_format(),
            flush_tlb: true,
            last_npf: None,
            regs: GuestRegs::default(),
            launched: false,
            ad_enabled: false,
            state: VmState::Running,
            stats: VmStats::default(),
            runtime_ticks: 0,
            clock: GuestClock::starting_at(time::now_ns()),
            frozen_at_ns: None,
            migrations: 0,
            restores: 0,
            allow_move: false,
            throttle_pct: 0,
            throttled_until: 0,
            move_request: None,
            request: 0,
            out: Vec::new(),
            pre_freeze: None,
            tracking: None,
            dirty: None,
            watch_first_run: false,
            first_run_us: None,
            remote: None,
            free: None,
            fault_at_us: 0,
            remote_faults: 0,
            nic: nic::Nic::default(),
            vmcs_active: false,
        })
    }

    /// Whose vCPU this is (Intel VMX or AMD SVM).
    pub fn vendor(&self) -> Vendor {
        self.vendor
    }

    /// Guest memory.
    pub fn mem(&self) -> &[u8] {
        self.mem.as_bytes()
    }

    /// Guest memory, mutable (migration receiver).
    pub fn mem_mut(&mut self) -> &mut [u8] {
        self.mem.as_bytes_mut()
    }

    /// Number of guest pages.
    pub fn pages(&self) -> usize {
        (self.mem_bytes / 4096) as usize
    }

    /// The guest's monotonic clock in nanoseconds, as the guest would read it now.
    pub fn guest_time_ns(&self) -> u64 {
        self.clock.peek(time::now_ns())
    }

    /// Sets the guest clock to continue from `ns` now (on the destination of a
    /// migration); it never goes below what the guest has seen.
    pub fn set_guest_time_ns(&mut self, ns: u64) {
        self.clock.continue_from(ns, time::now_ns());
    }

    /// Bytes the hypervisor holds on this guest's behalf: memory, EPT, VMCS, PML buffer
    /// (frames), and heap for the dirty bitmap and the output line.
    pub fn held(&self) -> (usize, usize) {
        let frames = self.mem.count()
            + self.ept.count()
            + self.vmcs.count()
            + self.pml.as_ref().map_or(0, |p| p.count());
        let heap = self.dirty.as_ref().map_or(0, |d| d.bytes())
            + self.remote.as_ref().map_or(0, |d| d.bytes())
            + self.free.as_ref().map_or(0, |d| d.bytes())
            + self.out.capacity()
            + self.nic.tx_out.iter().map(|f| f.capacity()).sum::<usize>();
        (frames, heap)
    }

    /// Drops cached translations through this guest's nested tables after a change
    /// that removed rights or cleared A/D flags: INVEPT now (VMX), or a TLB flush at the
    /// next VMRUN (SVM, TLB_CONTROL).
    pub(crate) fn flush_nested(&mut self) {
        match self.vendor {
            Vendor::Vmx => {
                let _ = hw::invept(Some(self.eptp())).or_else(|_| hw::invept(None));
            }
            Vendor::Svm => self.flush_tlb = true,
        }
    }

    pub(crate) fn eptp(&self) -> u64 {
        // A/D flags are always enabled when the CPU has them: PML needs them, and A/D
        // tracking reads them; without tracking they cost nothing.
        ept::eptp(self.ept.base(), self.ad_enabled)
    }
}

impl Vm {
    /// Post-copy, before the guest first runs here: the pages in `missing` (bit p of
    /// word w is page 64w+p) have not arrived; unmap them so that a touch exits.
    pub fn set_remote(&mut self, missing: &[u64]) -> Result<(), String> {
        let pages = self.pages();
        let mut bits = PageBitmap::new(pages).map_err(|_| String::from("out of heap"))?;
        let fmt = self.fmt;
        let leaves = nested::leaves_mut(self.ept.as_u64_mut(), pages);
        for (w, word) in missing.iter().enumerate() {
            let mut b = *word;
            while b != 0 {
                let pfn = w * 64 + b.trailing_zeros() as usize;
                b &= b - 1;
                if pfn < pages {
                    bits.set(pfn);
                    fmt.unmap(leaves, pfn);
                }
            }
        }
        self.remote = (bits.count() > 0).then_some(bits);
        Ok(())
    }

    /// Free-page hint for `pages` pages from page `first`: mark them free (clearing
    /// their EPT dirty flags, so a later write shows) or in use. Returns the pages
    /// hinted; 0 without EPT dirty flags (a write could not be seen: hints ignored).
    pub fn hint_free(&mut self, first: usize, pages: usize, free: bool) -> Result<u64, String> {
        if !self.ad_enabled {
            return Ok(0);
        }
        let total = self.pages();
        if self.free.is_none() {
            if !free {
                return Ok(pages as u64);
            }
            self.free = Some(PageBitmap::new(total).map_err(|_| String::from("out of heap"))?);
        }
        let fmt = self.fmt;
        let leaves = nested::leaves_mut(self.ept.as_u64_mut(), total);
        if let Some(bits) = self.free.as_mut() {
            for pfn in first..first + pages {
                if free {
                    bits.set(pfn);
                    fmt.clear_dirty(leaves, pfn);
                } else {
                    bits.unset(pfn);
                }
            }
        }
        if free {
            // A cached translation with the dirty flag set would not set it again.
            self.flush_nested();
        }
        Ok(pages as u64)
    }

    /// Reports the pages hinted free and not written since (their EPT dirty flag is
    /// still clear) to `sink`, and forgets the hints of pages written since. Call
    /// before dirty tracking starts (it owns the dirty flags from then on).
    pub fn free_pages(&mut self, mut sink: impl FnMut(usize)) {
        let pages = self.pages();
        let Some(bits) = self.free.as_mut() else {
            return;
        };
        let fmt = self.fmt;
        let leaves = nested::leaves_mut(self.ept.as_u64_mut(), pages);
        let mut written = alloc::vec::Vec::new();
        bits.for_each(|pfn| {
            if pfn < leaves.len() && !fmt.is_dirty(leaves, pfn) {
                sink(pfn);
            } else {
                written.push(pfn);
            }
        });
        for pfn in written {
            bits.unset(pfn);
        }
    }

    /// Leaves of the nested tables with the accessed flag set, and with the dirty flag.
    pub fn nested_flag_counts(&self) -> (usize, usize) {
        let l = nested::leaves(self.ept.as_u64(), self.pages());
        let a = l.iter().filter(|e| *e & self.fmt.accessed != 0).count();
        let d = l.iter().filter(|e| *e & self.fmt.dirty != 0).count();
        (a, d)
    }

    /// Whether page `pfn` is still on the source (post-copy).
    pub fn is_remote(&self, pfn: usize) -> bool {
        self.remote.as_ref().is_some_and(|r| r.get(pfn))
    }

    /// Pages still on the source.
    pub fn remote_pages(&self) -> usize {
        self.remote.as_ref().map_or(0, |r| r.count())
    }

    /// Page `pfn` has arrived (its contents are in memory): map it and wake the guest
    /// if it waits for it. Returns the wait in µs when the guest was waiting for it.
    pub fn page_arrived(&mut self, pfn: usize, now_us: u64) -> Option<u64> {
        let pages = self.pages();
        let r = self.remote.as_mut()?;
        if !r.get(pfn) {
            return None;
        }
        r.unset(pfn);
        if r.count_is_zero() {
            self.remote = None;
        }
        let fmt = self.fmt;
        fmt.map(nested::leaves_mut(self.ept.as_u64_mut(), pages), pfn);
        // A not-present entry is never cached (SDM 29.4.1, APM 15.25.9), so mapping
        // needs no flush; the guest simply retries the access.
        if self.state == VmState::Fetching(pfn) {
            self.state = VmState::Running;
            return Some(now_us.saturating_sub(self.fault_at_us));
        }
        None
    }

    /// The first page of `[gpa, gpa+len)` still on the source, if any.
    fn remote_in(&self, gpa: u64, len: u64) -> Option<usize> {
        let r = self.remote.as_ref()?;
        if len == 0 {
            return None;
        }
        let first = (gpa / 4096) as usize;
        let last = (gpa.saturating_add(len - 1) / 4096) as usize;
        (first..=last.min(self.pages().saturating_sub(1))).find(|p| r.get(*p))
    }

    /// Blocks the guest on remote page `pfn` (post-copy).
    fn block_on_remote(&mut self, pfn: usize) -> Option<SliceEnd> {
        self.state = VmState::Fetching(pfn);
        self.fault_at_us = time::now_us();
        self.remote_faults += 1;
        Some(SliceEnd::Blocked)
    }

    /// Freezes the guest for stop-and-copy (or on arrival, until COMMIT).
    pub fn freeze(&mut self) {
        if self.state.alive() && self.state != VmState::Frozen {
            // The guest cannot read its clock while frozen: this is the highest value
            // it can have seen, and what the destination continues from.
            self.frozen_at_ns = Some(self.clock.read(time::now_ns()));
            self.pre_freeze = Some(core::mem::replace(&mut self.state, VmState::Frozen));
        }
    }

    /// Returns a frozen guest to the state it had before it was frozen. On the source
    /// after a failed migration the clock simply runs on (it did during the freeze).
    pub fn thaw(&mut self) {
        if self.state == VmState::Frozen {
            self.state = self.pre_freeze.take().unwrap_or(VmState::Running);
            self.frozen_at_ns = None;
        }
    }

    /// The guest's clock at its freeze, if frozen.
    pub fn frozen_at_ns(&self) -> Option<u64> {
        self.frozen_at_ns
    }

    /// The PV-device state for migration: the guest clock, a pending sleep, the
    /// operator's pending request, whether it was paused (guest frozen), how many
    /// times it was restored from a checkpoint, and the PV NIC (ring address, MAC; its
    /// indices are in the ring, in guest memory).
    pub fn device_state(&self) -> Vec<u8> {
        let now = self.frozen_at_ns.unwrap_or_else(|| self.guest_time_ns());
        let (sleep_until, paused) = match self.pre_freeze.as_ref().unwrap_or(&self.state) {
            VmState::Halted(until) => ((*until).max(1), 0u64),
            VmState::Paused => (0, 1),
            _ => (0, 0),
        };
        let mut out = Vec::with_capacity(56);
        let ring = self.nic.ring.unwrap_or(0);
        let mac = nic::mac_word(self.nic.mac);
        for w in [
            now,
            sleep_until,
            self.request,
            paused,
            self.restores,
            ring,
            mac,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Restores [`Vm::device_state`] on the destination (before COMMIT).
    pub fn restore_device_state(&mut self, b: &[u8]) -> Result<(), String> {
        // 32 bytes from a hypervisor before restore counts (read as 0 restores), 40
        // from one before the PV NIC (no NIC).
        if ![32, 40, 56].contains(&b.len()) {
            return Err(format!("device state has {} bytes, expected 56", b.len()));
        }
        let w = |i: usize| {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        self.restores = w(4);
        let ring = w(5);
        if ring != 0 && !nic::valid_ring(ring, self.mem_bytes) {
            return Err(format!(
                "device state: NIC ring at {ring:#x} is not a page of the guest"
            ));
        }
        self.nic.ring = (ring != 0).then_some(ring);
        if b.len() >= 56 {
            self.nic.mac = nic::mac_from_word(w(6));
        }
        self.set_guest_time_ns(w(0));
        self.frozen_at_ns = Some(w(0));
        self.request = w(2);
        self.state = if w(3) == 1 {
            VmState::Paused
        } else if w(1) != 0 {
            VmState::Halted(w(1))
        } else {
            VmState::Running
        };
        Ok(())
    }
}

impl Drop for Vm {
    /// Gives the CPU-side state back before the frames are freed (fields drop after
    /// this): VMCLEAR, so the CPU writes no cached VMCS data into a frame that may
    /// become another guest's memory (SDM 24.11.1), and INVEPT, so no translation
    /// through this EPT survives into the frames' next use (SDM 28.4.3). Every path
    /// that drops a `Vm` (kill, migrated away, a failed install) goes through here.
    fn drop(&mut self) {
        // SVM: nothing is cached outside the VMCB page; the next guest with this ASID
        // starts with a TLB flush (`flush_tlb` is set for every new vCPU).
        if self.vmcs_active && self.vendor == Vendor::Vmx {
            let _ = hw::vmclear(self.vmcs.base());
            let _ = hw::invept(Some(self.eptp())).or_else(|_| hw::invept(None));
            self.vmcs_active = false;
        }
    }
}

/// Writes the boot info structure at [`BOOT_INFO_ADDR`].
fn write_boot_info(mem: &mut [u8], bi: &BootInfo) {
    let at = BOOT_INFO_ADDR as usize;
    let mut put =
        |off: usize, bytes: &[u8]| mem[at + off..at + off + bytes.len()].copy_from_slice(bytes);
    put(0, &bi.magic.to_le_bytes());
    put(8, &bi.abi_version.to_le_bytes());
    put(12, &bi.guest_id.to_le_bytes());
    put(16, &bi.mem_bytes.to_le_bytes());
    put(24, &bi.image_end.to_le_bytes());
    put(32, &bi.args_len.to_le_bytes());
    put(36, &bi._reserved.to_le_bytes());
    put(40, &bi.args);
}

/// Size of an encoded [`VcpuState`].
pub const VCPU_STATE_BYTES: usize = 25 * 8;

/// Why an encoded vCPU state was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStateError {
    /// Wrong length.
    Length(usize),
    /// Not a 64-bit paged guest (CR0.PG/PE, EFER.LMA or CR4.PAE clear).
    NotLongMode,
    /// RIP or RSP outside guest memory, or CR3 not page aligned inside it.
    OutOfRange,
}

impl core::fmt::Display for VcpuStateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Length(n) => write!(f, "vCPU state has {n} bytes, expected {VCPU_STATE_BYTES}"),
            Self::NotLongMode => f.write_str("vCPU state is not a 64-bit paged guest"),
            Self::OutOfRange => f.write_str("vCPU state points outside guest memory"),
        }
    }
}

impl VcpuState {
    fn words(&self) -> [u64; 25] {
        let r = &self.regs;
        [
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
            self.rip,
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr3,
            self.cr4,
            self.efer,
            self.fs_base,
            self.gs_base,
            self.interruptibility,
        ]
    }

    /// Encodes as 25 little-endian words.
    pub fn to_bytes(&self) -> [u8; VCPU_STATE_BYTES] {
        let mut out = [0u8; VCPU_STATE_BYTES];
        for (chunk, w) in out.chunks_exact_mut(8).zip(self.words()) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decodes and validates against a guest of `mem_bytes`.
    pub fn from_bytes(b: &[u8], mem_bytes: u64) -> Result<Self, VcpuStateError> {
        if b.len() != VCPU_STATE_BYTES {
            return Err(VcpuStateError::Length(b.len()));
        }
        let mut w = [0u64; 25];
        for (i, chunk) in b.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        }
        let regs = GuestRegs {
            rax: w[0],
            rbx: w[1],
            rcx: w[2],
            rdx: w[3],
            rsi: w[4],
            rdi: w[5],
            rbp: w[6],
            r8: w[7],
            r9: w[8],
            r10: w[9],
            r11: w[10],
            r12: w[11],
            r13: w[12],
            r14: w[13],
            r15: w[14],
        };
        let s = Self {
            regs,
            rip: w[15],
            rsp: w[16],
            rflags: w[17],
            cr0: w[18],
            cr3: w[19],
            cr4: w[20],
            efer: w[21],
            fs_base: w[22],
            gs_base: w[23],
            interruptibility: w[24],
        };
        if s.cr0 & 0x8000_0001 != 0x8000_0001 || s.efer & 0x500 != 0x500 || s.cr4 & 0x20 == 0 {
            return Err(VcpuStateError::NotLongMode);
        }
        if s.rip >= mem_bytes || s.rsp > mem_bytes || s.cr3 & 0xFFF != 0 || s.cr3 >= mem_bytes {
            return Err(VcpuStateError::OutOfRange);
        }
        // Only the interrupt-shadow bits are meaningful for a PV guest.
        Ok(Self {
            interruptibility: s.interruptibility & 0x3,
            rflags: s.rflags & 0x3F_7FD7 | 0x2,
            ..s
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState {
            rip: 0x10_0040,
            rsp: 0xFF_FFF0,
            rflags: 0x202,
            cr0: 0x8000_0031,
            cr3: 0x2000,
            cr4: 0x20,
            efer: 0x500,
            fs_base: 7,
            gs_base: 9,
            interruptibility: 0,
            ..Default::default()
        };
        s.regs.rax = 1;
        s.regs.r15 = u64::MAX;
        s
    }

    #[test]
    fn vcpu_state_round_trips() {
        let s = sample();
        assert_eq!(VcpuState::from_bytes(&s.to_bytes(), 16 << 20), Ok(s));
    }

    #[test]
    fn vcpu_state_is_validated() {
        let s = sample();
        assert_eq!(
            VcpuState::from_bytes(&s.to_bytes()[..100], 16 << 20),
            Err(VcpuStateError::Length(100))
        );
        assert_eq!(
            VcpuState::from_bytes(&s.to_bytes(), 1 << 20),
            Err(VcpuStateError::OutOfRange)
        );
        let bad = VcpuState { efer: 0, ..s };
        assert_eq!(
            VcpuState::from_bytes(&bad.to_bytes(), 16 << 20),
            Err(VcpuStateError::NotLongMode)
        );
        let bad = VcpuState { cr3: 0x2001, ..s };
        assert_eq!(
            VcpuState::from_bytes(&bad.to_bytes(), 16 << 20),
            Err(VcpuStateError::OutOfRange)
        );
    }
}
