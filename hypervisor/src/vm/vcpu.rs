//! The vCPU of a [`Vm`]: VMCS setup from the capability MSRs and the VMX run loop; the
//! vendor-neutral dispatcher with one handler per [`Exit`], and the hypercalls (shared
//! with the SVM run loop in `vcpu_svm.rs`).

use alloc::format;
use alloc::string::String;

use super::exits::{Access, CrAccess, Gpa};
use super::*;
use crate::println;

/// Length of VMCALL (0F 01 C1): RIP advances by it after a hypercall.
const VMCALL_LEN: u64 = 3;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// CR0 bits owned by the host (see `setup_vmcs`).
pub(super) const CR0_HOST_OWNED: u64 =
    CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_NW | CR0_CD | CR0_PG;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4 bits that would enable SSE/AVX state.
pub(super) const CR4_FP_BITS: u64 = CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
/// CR4 bits owned by the host.
pub(super) const CR4_HOST_OWNED: u64 = CR4_VMXE | CR4_FP_BITS;

/// The CR0 a PV guest sees: protected, paged long mode with caches on and no FPU.
pub(super) fn guest_cr0_shadow(cr0: u64) -> u64 {
    (cr0 | CR0_PE | CR0_PG | CR0_NE | CR0_ET) & !(CR0_CD | CR0_NW | CR0_EM | CR0_TS | CR0_MP)
}

/// The CR0 the CPU runs the guest with: caches on whatever the host had (VM exits do
/// not reload CD/NW, SDM 27.5.1), and EM set so that x87 instructions fault (#NM) and
/// stop the guest rather than touch FPU state another guest may own.
fn guest_cr0(cr0: u64, c: &VmxCaps) -> u64 {
    ((guest_cr0_shadow(cr0) | CR0_EM) | c.cr0_fixed0) & c.cr0_fixed1 & !(CR0_CD | CR0_NW)
}

impl Vm {
    /// Makes this guest's VMCS current (needed before any VMREAD/VMWRITE on it); on SVM
    /// nothing is current (the VMCB is memory): a no-op.
    pub fn load_vmcs(&self) -> Result<(), String> {
        if self.vendor == Vendor::Svm {
            return Ok(());
        }
        hw::vmptrld(self.vmcs.base()).map_err(|e| format!("VMPTRLD: {e}"))
    }

    /// Initialises the vCPU's control structure (VMCS or VMCB) with host state and the
    /// guest state `s`.
    pub fn setup_vmcs(&mut self, ctx: &HostContext<'_>, s: &VcpuState) -> Result<(), String> {
        match (&ctx.virt.caps, ctx.virt.svm()) {
            (HwCaps::Vmx(c), _) => self.setup_vmx(c, ctx, s),
            (HwCaps::Svm(_), Some(svm)) => {
                self.setup_vmcb(svm, s);
                Ok(())
            }
            (HwCaps::Svm(_), None) => Err("SVM is not enabled".into()),
        }
    }

    /// Initialises the VMCS: controls from the capability MSRs, host state, and the guest
    /// state `s`.
    fn setup_vmx(
        &mut self,
        c: &VmxCaps,
        ctx: &HostContext<'_>,
        s: &VcpuState,
    ) -> Result<(), String> {
        let rev = c.revision();
        self.vmcs.as_bytes_mut()[0..4].copy_from_slice(&rev.to_le_bytes());
        hw::vmclear(self.vmcs.base()).map_err(|e| format!("VMCLEAR: {e}"))?;
        self.launched = false;
        // From here on the CPU may cache this VMCS: `Drop` must VMCLEAR it, whatever
        // fails below.
        self.vmcs_active = true;
        self.load_vmcs()?;
        self.ad_enabled = c.ept_ad();
        let e = |e: vmcs::VmcsError| format!("{e}");

        let pin = caps::adjust("pin-based", c.pinbased, caps::pin::PREEMPTION_TIMER, 0)
            .map_err(|e| format!("{e}"))?;
        let proc = caps::adjust(
            "processor-based",
            c.procbased,
            caps::proc::HLT_EXITING | caps::proc::UNCOND_IO_EXITING | caps::proc::SECONDARY,
            // A guest must not stall the CPU (MWAIT with a deep C-state hint can stop the
            // preemption timer, SDM 26.5.1) or read the host's performance counters.
            // Wanted, not required: a CPU without them cannot run those instructions
            // in VMX non-root without exiting anyway (they #UD or exit unconditionally).
            caps::proc::MWAIT_EXITING | caps::proc::MONITOR_EXITING | caps::proc::RDPMC_EXITING,
        )
        .map_err(|e| format!("{e}"))?;
        let proc2 = caps::adjust(
            "secondary",
            c.procbased2,
            caps::proc2::EPT,
            caps::proc2::VPID | caps::proc2::WBINVD_EXITING | caps::proc2::DESC_TABLE_EXITING,
        )
        .map_err(|e| format!("{e}"))?;
        let exit = caps::adjust(
            "VM-exit",
            c.exit,
            caps::exit::HOST_ADDR_SPACE_64 | caps::exit::LOAD_EFER | caps::exit::SAVE_EFER,
            0,
        )
        .map_err(|e| format!("{e}"))?;
        let entry = caps::adjust(
            "VM-entry",
            c.entry,
            caps::entry::IA32E_GUEST | caps::entry::LOAD_EFER,
            0,
        )
        .map_err(|e| format!("{e}"))?;
        vmcs::write(w32::PIN_BASED_CONTROLS, pin.into()).map_err(e)?;
        vmcs::write(w32::PROC_BASED_CONTROLS, proc.into()).map_err(e)?;
        vmcs::write(w32::SECONDARY_CONTROLS, proc2.into()).map_err(e)?;
        vmcs::write(w32::EXIT_CONTROLS, exit.into()).map_err(e)?;
        vmcs::write(w32::ENTRY_CONTROLS, entry.into()).map_err(e)?;
        // Every guest exception exits: PV guests have no IDT, and a fault is a bug.
        vmcs::write(w32::EXCEPTION_BITMAP, 0xFFFF_FFFF).map_err(e)?;
        vmcs::write(w32::PAGE_FAULT_ERROR_MASK, 0).map_err(e)?;
        vmcs::write(w32::PAGE_FAULT_ERROR_MATCH, 0).map_err(e)?;
        vmcs::write(w32::CR3_TARGET_COUNT, 0).map_err(e)?;
        vmcs::write(w32::EXIT_MSR_STORE_COUNT, 0).map_err(e)?;
        vmcs::write(w32::EXIT_MSR_LOAD_COUNT, 0).map_err(e)?;
        vmcs::write(w32::ENTRY_MSR_LOAD_COUNT, 0).map_err(e)?;
        vmcs::write(w32::ENTRY_INTERRUPTION_INFO, 0).map_err(e)?;
        if proc2 & caps::proc2::VPID != 0 {
            vmcs::write(w16::VPID, u64::from(self.id % 0xFFFF) + 1).map_err(e)?;
        }
        vmcs::write(w64::EPT_POINTER, self.eptp()).map_err(e)?;
        vmcs::write(w64::VMCS_LINK_POINTER, u64::MAX).map_err(e)?;
        // Control-register bits the host owns (guest/host masks, SDM 25.6.6): a guest
        // write that would change one exits and stops the guest (see `on_cr_access`).
        // CR0: caching (CD, NW: a guest must not turn caches off for the machine),
        // the FPU bits (EM, MP, TS: PV guests have no FP/SIMD, so no such state is
        // ever shared between guests or migrated), and the mode bits (PE, PG, NE, ET).
        // CR4: VMXE (must stay set), and OSFXSR, OSXMMEXCPT, OSXSAVE (SSE/AVX stay off).
        vmcs::write(wn::CR0_GUEST_HOST_MASK, CR0_HOST_OWNED).map_err(e)?;
        vmcs::write(wn::CR4_GUEST_HOST_MASK, CR4_HOST_OWNED).map_err(e)?;
        vmcs::write(wn::CR4_READ_SHADOW, s.cr4 & !CR4_VMXE).map_err(e)?;
        vmcs::write(wn::CR0_READ_SHADOW, guest_cr0_shadow(s.cr0)).map_err(e)?;

        // Host state (SDM §27.5): what the CPU loads on every VM exit.
        let h = &ctx.host;
        vmcs::write(wn::HOST_CR0, cpu::read_cr0()).map_err(e)?;
        vmcs::write(wn::HOST_CR3, cpu::read_cr3()).map_err(e)?;
        vmcs::write(wn::HOST_CR4, cpu::read_cr4()).map_err(e)?;
        vmcs::write(w16::HOST_CS_SELECTOR, h.code.into()).map_err(e)?;
        for f in [
            w16::HOST_SS_SELECTOR,
            w16::HOST_DS_SELECTOR,
            w16::HOST_ES_SELECTOR,
        ] {
            vmcs::write(f, h.data.into()).map_err(e)?;
        }
        vmcs::write(w16::HOST_FS_SELECTOR, 0).map_err(e)?;
        vmcs::write(w16::HOST_GS_SELECTOR, 0).map_err(e)?;
        vmcs::write(w16::HOST_TR_SELECTOR, h.tss.into()).map_err(e)?;
        vmcs::write(wn::HOST_FS_BASE, 0).map_err(e)?;
        vmcs::write(wn::HOST_GS_BASE, 0).map_err(e)?;
        vmcs::write(wn::HOST_TR_BASE, h.tss_base).map_err(e)?;
        vmcs::write(wn::HOST_GDTR_BASE, h.gdt_base).map_err(e)?;
        vmcs::write(wn::HOST_IDTR_BASE, hw::idtr_base()).map_err(e)?;
        vmcs::write(w32::HOST_SYSENTER_CS, 0).map_err(e)?;
        vmcs::write(wn::HOST_SYSENTER_ESP, 0).map_err(e)?;
        vmcs::write(wn::HOST_SYSENTER_EIP, 0).map_err(e)?;
        vmcs::write(w64::HOST_IA32_EFER, cpu::rdmsr(0xC000_0080)).map_err(e)?;
        vmcs::write(wn::HOST_RIP, hw::exit_point()).map_err(e)?;

        // Guest segment state: flat 64-bit code and data, a busy TSS, no LDT.
        let seg = |sel: u32,
                   base: u32,
                   limit: u32,
                   ar: u32,
                   s: u16,
                   l: u32,
                   a: u32|
         -> Result<(), vmcs::VmcsError> {
            vmcs::write(sel, s.into())?;
            vmcs::write(base, 0)?;
            vmcs::write(limit, l.into())?;
            vmcs::write(ar, a.into())
        };
        seg(
            w16::GUEST_CS_SELECTOR,
            wn::GUEST_CS_BASE,
            w32::GUEST_CS_LIMIT,
            w32::GUEST_CS_AR,
            0x08,
            0xFFFF_FFFF,
            0xA09B,
        )
        .map_err(e)?;
        for (sel, base, limit, ar) in [
            (
                w16::GUEST_SS_SELECTOR,
                wn::GUEST_SS_BASE,
                w32::GUEST_SS_LIMIT,
                w32::GUEST_SS_AR,
            ),
            (
                w16::GUEST_DS_SELECTOR,
                wn::GUEST_DS_BASE,
                w32::GUEST_DS_LIMIT,
                w32::GUEST_DS_AR,
            ),
            (
                w16::GUEST_ES_SELECTOR,
                wn::GUEST_ES_BASE,
                w32::GUEST_ES_LIMIT,
                w32::GUEST_ES_AR,
            ),
            (
                w16::GUEST_FS_SELECTOR,
                wn::GUEST_FS_BASE,
                w32::GUEST_FS_LIMIT,
                w32::GUEST_FS_AR,
            ),
            (
                w16::GUEST_GS_SELECTOR,
                wn::GUEST_GS_BASE,
                w32::GUEST_GS_LIMIT,
                w32::GUEST_GS_AR,
            ),
        ] {
            seg(sel, base, limit, ar, 0x10, 0xFFFF_FFFF, 0xC093).map_err(e)?;
        }
        seg(
            w16::GUEST_TR_SELECTOR,
            wn::GUEST_TR_BASE,
            w32::GUEST_TR_LIMIT,
            w32::GUEST_TR_AR,
            0x18,
            0x67,
            0x8B,
        )
        .map_err(e)?;
        seg(
            w16::GUEST_LDTR_SELECTOR,
            wn::GUEST_LDTR_BASE,
            w32::GUEST_LDTR_LIMIT,
            w32::GUEST_LDTR_AR,
            0,
            0,
            0x1_0000,
        )
        .map_err(e)?;
        vmcs::write(wn::GUEST_GDTR_BASE, 0).map_err(e)?;
        vmcs::write(w32::GUEST_GDTR_LIMIT, 0).map_err(e)?;
        vmcs::write(wn::GUEST_IDTR_BASE, 0).map_err(e)?;
        vmcs::write(w32::GUEST_IDTR_LIMIT, 0).map_err(e)?;
        vmcs::write(wn::GUEST_DR7, 0x400).map_err(e)?;
        vmcs::write(w64::GUEST_IA32_DEBUGCTL, 0).map_err(e)?;
        vmcs::write(w32::GUEST_SYSENTER_CS, 0).map_err(e)?;
        vmcs::write(wn::GUEST_SYSENTER_ESP, 0).map_err(e)?;
        vmcs::write(wn::GUEST_SYSENTER_EIP, 0).map_err(e)?;
        vmcs::write(w32::GUEST_ACTIVITY_STATE, 0).map_err(e)?;
        vmcs::write(wn::GUEST_PENDING_DBG, 0).map_err(e)?;
        self.write_vcpu_state(c, s).map_err(e)?;
        Ok(())
    }

    /// Writes the migratable vCPU state into the current VMCS and the register file.
    fn write_vcpu_state(&mut self, c: &VmxCaps, s: &VcpuState) -> Result<(), vmcs::VmcsError> {
        self.regs = s.regs;
        vmcs::write(wn::GUEST_RIP, s.rip)?;
        vmcs::write(wn::GUEST_RSP, s.rsp)?;
        vmcs::write(wn::GUEST_RFLAGS, s.rflags | 0x2)?;
        vmcs::write(wn::GUEST_CR0, guest_cr0(s.cr0, c))?;
        vmcs::write(wn::GUEST_CR3, s.cr3)?;
        vmcs::write(
            wn::GUEST_CR4,
            ((s.cr4 & !CR4_FP_BITS) | c.cr4_fixed0 | CR4_VMXE) & c.cr4_fixed1,
        )?;
        vmcs::write(w64::GUEST_IA32_EFER, s.efer)?;
        vmcs::write(wn::GUEST_FS_BASE, s.fs_base)?;
        vmcs::write(wn::GUEST_GS_BASE, s.gs_base)?;
        vmcs::write(w32::GUEST_INTERRUPTIBILITY, s.interruptibility)
    }

    /// Reads the migratable vCPU state (on VMX the VMCS must be current).
    pub fn read_vcpu_state(&self) -> VcpuState {
        if self.vendor == Vendor::Svm {
            return self.read_vcpu_state_svm();
        }
        VcpuState {
            regs: self.regs,
            rip: vmcs::read(wn::GUEST_RIP),
            rsp: vmcs::read(wn::GUEST_RSP),
            rflags: vmcs::read(wn::GUEST_RFLAGS),
            // What the guest believes (the shadow for host-owned bits).
            cr0: guest_cr0_shadow(vmcs::read(wn::CR0_READ_SHADOW)),
            cr3: vmcs::read(wn::GUEST_CR3),
            cr4: vmcs::read(wn::GUEST_CR4) & !CR4_VMXE,
            efer: vmcs::read(w64::GUEST_IA32_EFER),
            fs_base: vmcs::read(wn::GUEST_FS_BASE),
            gs_base: vmcs::read(wn::GUEST_GS_BASE),
            interruptibility: vmcs::read(w32::GUEST_INTERRUPTIBILITY),
        }
    }

    /// Stops the guest with a report.
    pub fn stop(&mut self, why: String) {
        println!("[g{}] STOPPED: {}", self.id, why);
        self.flush_output();
        self.state = VmState::Stopped(why);
    }

    /// Runs the guest until `deadline` (TSC) or until it blocks (on VMX its VMCS must be
    /// current). Exits are handled inline; the loop returns to the scheduler at the
    /// deadline so the console and network stay responsive.
    pub fn run_slice(&mut self, virt: &Virt, deadline: u64) -> SliceEnd {
        match (&virt.caps, virt.svm()) {
            (HwCaps::Vmx(c), _) => self.run_slice_vmx(c, deadline),
            (HwCaps::Svm(_), Some(svm)) => self.run_slice_svm(svm, deadline),
            (HwCaps::Svm(_), None) => {
                self.stop("SVM is not enabled".into());
                SliceEnd::Blocked
            }
        }
    }

    fn run_slice_vmx(&mut self, caps: &VmxCaps, deadline: u64) -> SliceEnd {
        let shift = caps.preemption_timer_rate();
        loop {
            // Console output drains between exits too, so a busy guest does not hold
            // the UART back for a whole slice.
            crate::arch::serial::pump();
            let now = time::now();
            let left = deadline.saturating_sub(now) >> shift;
            if vmcs::write(
                w32::PREEMPTION_TIMER_VALUE,
                left.clamp(1, u64::from(u32::MAX)),
            )
            .is_err()
            {
                self.stop("cannot program the preemption timer".into());
                return SliceEnd::Blocked;
            }
            if self.watch_first_run {
                self.watch_first_run = false;
                self.first_run_us = Some(time::now_us());
            }
            let entered = time::now();
            let r = hw::enter(&mut self.regs, self.launched);
            let exited = time::now();
            if let Err(e) = r {
                let reason = vmcs::read(ro::EXIT_REASON);
                let qual = vmcs::read(ro::EXIT_QUALIFICATION);
                self.stop(format!(
                    "VM entry failed: {e} (exit reason {reason:#x}, qualification {qual:#x})"
                ));
                return SliceEnd::Blocked;
            }
            self.launched = true;
            self.runtime_ticks += exited - entered;
            let raw = vmcs::read(ro::EXIT_REASON);
            self.stats.exits[(raw as u16 as usize).min(69)] += 1;
            if raw & (1 << 31) != 0 {
                let qual = vmcs::read(ro::EXIT_QUALIFICATION);
                self.stop(format!(
                    "VM entry failed: exit reason {} ({}) qualification {qual:#x}",
                    raw as u16,
                    exits::name(raw as u16 as usize)
                ));
                return SliceEnd::Blocked;
            }
            let basic = raw as u16;
            let info = exits::VmxExitInfo {
                reason: raw,
                qualification: vmcs::read(ro::EXIT_QUALIFICATION),
                interruption: if basic == 0 {
                    vmcs::read(ro::EXIT_INTERRUPTION_INFO)
                } else {
                    0
                },
                error: if basic == 0 {
                    vmcs::read(ro::EXIT_INTERRUPTION_ERROR)
                } else {
                    0
                },
                gpa: if basic == 48 {
                    vmcs::read(ro::GUEST_PHYSICAL_ADDRESS)
                } else {
                    0
                },
                rcx: self.regs.rcx,
            };
            if let Some(end) = self.handle(Exit::from_vmx(&info)) {
                return end;
            }
            if time::now() >= deadline {
                return SliceEnd::Preempted;
            }
        }
    }

    /// The one dispatcher: a handler per exit, whichever vendor's exit it was.
    pub(super) fn handle(&mut self, exit: Exit) -> Option<SliceEnd> {
        match exit {
            Exit::Hypercall => self.on_vmcall(),
            Exit::Cpuid => self.on_cpuid(),
            Exit::Halt => {
                self.advance_rip(1);
                Some(SliceEnd::Preempted)
            }
            Exit::Timer => None,
            Exit::NestedFault { gpa, access } => self.on_nested_fault(gpa, access),
            Exit::LogFull => {
                self.drain_pml();
                None
            }
            Exit::Exception {
                vector,
                error,
                address,
            } => self.on_exception(vector, error, address),
            Exit::Shutdown => self.fail("triple fault"),
            Exit::Io { .. } => self.fail("I/O port access (PV guests have no devices)"),
            Exit::Msr { msr, .. } => self.fail(&format!("MSR access to {msr:#x} is not allowed")),
            Exit::ControlRegister(a) => self.on_cr_access(a),
            Exit::Monitor => {
                // Harmless as a no-op: the address monitor is only a hint.
                self.advance_rip(3);
                None
            }
            Exit::Mwait => {
                // Never let the guest wait in a C-state: treat it as a yield.
                self.advance_rip(3);
                Some(SliceEnd::Preempted)
            }
            Exit::Wbinvd => {
                // A PV guest has no device and no DMA: there is nothing for it to
                // write back. A no-op, so it cannot stall the machine either.
                self.advance_rip(2);
                None
            }
            Exit::Denied(why) => self.fail(why),
            Exit::InvalidState => self.fail("invalid guest state"),
            Exit::Misconfig => self.fail("EPT misconfiguration (hypervisor bug)"),
            Exit::Unknown {
                vendor: Vendor::Vmx,
                code,
            } => self.fail(&format!(
                "unexpected VM exit {code} ({})",
                exits::name(code as usize)
            )),
            Exit::Unknown {
                vendor: Vendor::Svm,
                code,
            } => self.fail(&format!("unexpected #VMEXIT {code:#x}")),
        }
    }

    /// A guest tried to change a host-owned CR0/CR4 bit (or any other CR access that
    /// exits): stop the guest with what it tried (SDM Table 28-3).
    fn on_cr_access(&mut self, a: CrAccess) -> Option<SliceEnd> {
        let what = match a {
            CrAccess::Write {
                cr: cr @ (0 | 4),
                gpr: Some(reg),
            } => {
                let v = self.reg_value(reg.into());
                let (mask, name) = if cr == 0 {
                    (CR0_HOST_OWNED, "CR0")
                } else {
                    (CR4_HOST_OWNED, "CR4")
                };
                let shadow = self.cr_shadow(cr);
                let changed = (v ^ shadow) & mask;
                let why = if cr == 0 && changed & (CR0_CD | CR0_NW) != 0 {
                    " (caching is the host's: CD/NW)"
                } else if (cr == 0 && changed & (CR0_EM | CR0_TS | CR0_MP) != 0)
                    || (cr == 4 && changed & CR4_FP_BITS != 0)
                {
                    " (PV guests have no FP/SIMD state)"
                } else {
                    ""
                };
                format!("write of {v:#x} to {name} changes host-owned bits {changed:#x}{why}")
            }
            CrAccess::Write { cr, gpr: None } => {
                format!("write to CR{cr} (the host owns CR0/CR4: caching, FP/SIMD and mode bits)")
            }
            CrAccess::Clts => String::from("CLTS (PV guests have no FP/SIMD state)"),
            CrAccess::Lmsw => String::from("LMSW changes host-owned CR0 bits"),
            CrAccess::Write { cr, .. } | CrAccess::Read { cr } => format!("access to CR{cr}"),
        };
        self.fail(&format!("control register: {what}"))
    }

    /// What the guest believes CR0 or CR4 holds (VMX read shadow, SVM's VMCB).
    fn cr_shadow(&self, cr: u8) -> u64 {
        match (self.vendor, cr) {
            (Vendor::Vmx, 0) => vmcs::read(wn::CR0_READ_SHADOW),
            (Vendor::Vmx, _) => vmcs::read(wn::CR4_READ_SHADOW),
            (Vendor::Svm, _) => self.svm_cr(cr),
        }
    }

    /// General-purpose register `n` in the exit-qualification numbering (0 = RAX ...
    /// 4 = RSP, 15 = R15).
    fn reg_value(&self, n: usize) -> u64 {
        let r = &self.regs;
        match n {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => self.guest_rsp(),
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn fail(&mut self, what: &str) -> Option<SliceEnd> {
        let rip = self.guest_rip();
        self.stop(format!("{what} at rip={rip:#x}"));
        Some(SliceEnd::Blocked)
    }

    /// The guest's RIP.
    pub(super) fn guest_rip(&self) -> u64 {
        match self.vendor {
            Vendor::Vmx => vmcs::read(wn::GUEST_RIP),
            Vendor::Svm => self.svm_rip(),
        }
    }

    /// The guest's RSP.
    fn guest_rsp(&self) -> u64 {
        match self.vendor {
            Vendor::Vmx => vmcs::read(wn::GUEST_RSP),
            Vendor::Svm => self.svm_rsp(),
        }
    }

    /// Moves RIP past the instruction that exited: VMX knows its length; on SVM it is
    /// `len`, the length of the only encoding that exits here (NRIP save is not relied
    /// on: QEMU's TCG does not offer it, and a #UD intercept has no next RIP anyway).
    fn advance_rip(&mut self, len: u64) {
        match self.vendor {
            Vendor::Vmx => {
                let len = vmcs::read(ro::EXIT_INSTRUCTION_LEN).max(1);
                let rip = vmcs::read(wn::GUEST_RIP);
                let _ = vmcs::write(wn::GUEST_RIP, rip + len);
            }
            Vendor::Svm => {
                let rip = self.svm_rip();
                self.set_svm_rip(rip + len);
            }
        }
    }

    fn on_exception(
        &mut self,
        vector: u8,
        error: Option<u64>,
        address: Option<u64>,
    ) -> Option<SliceEnd> {
        let code = error.unwrap_or(0);
        let extra = match address {
            Some(a) => format!(" address={a:#x}"),
            None => String::new(),
        };
        self.fail(&format!(
            "exception {vector} ({}) error={code:#x}{extra}",
            exits::exception_name(vector)
        ))
    }

    fn on_cpuid(&mut self) -> Option<SliceEnd> {
        let leaf = self.regs.rax as u32;
        let sub = self.regs.rcx as u32;
        let mut r = cpu::cpuid(leaf, sub);
        if leaf == 1 {
            r.ecx &= !(1 << 5); // no nested VMX
            r.ecx |= 1 << 31; // running under a hypervisor
        }
        if leaf == 0x8000_0001 {
            r.ecx &= !(1 << 2); // no nested SVM
        }
        self.regs.rax = r.eax.into();
        self.regs.rbx = r.ebx.into();
        self.regs.rcx = r.ecx.into();
        self.regs.rdx = r.edx.into();
        self.advance_rip(2);
        None
    }

    fn on_nested_fault(&mut self, gpa: Gpa, access: Access) -> Option<SliceEnd> {
        let pfn = gpa.pfn();
        if self.is_remote(pfn) {
            // Post-copy: the page is still on the source. Wait for it; the access
            // is retried when it is mapped.
            return self.block_on_remote(pfn);
        }
        if access == Access::Write
            && self.tracking == Some(Tracking::WriteProtect)
            && gpa.0 < self.mem_bytes
        {
            let pages = self.pages();
            let fmt = self.fmt;
            if fmt.unprotect(nested::leaves_mut(self.ept.as_u64_mut(), pages), pfn) {
                if let Some(d) = &mut self.dirty {
                    d.set(pfn);
                }
                // VMX: the violation dropped the stale translation (SDM 29.4.3); on
                // SVM a read-only one may still be cached.
                if self.vendor == Vendor::Svm {
                    self.flush_tlb = true;
                }
                return None;
            }
        }
        let table = match self.vendor {
            Vendor::Vmx => "EPT violation",
            Vendor::Svm => "nested page fault",
        };
        self.fail(&format!(
            "{table}: {} of guest-physical {:#x} outside its {} MiB",
            access.name(),
            gpa.0,
            self.mem_bytes >> 20
        ))
    }

    /// Copies logged GPAs from the PML buffer into the dirty bitmap and resets the index.
    pub fn drain_pml(&mut self) {
        let Some(pml) = &self.pml else { return };
        let index = vmcs::read(w16::GUEST_PML_INDEX) as usize;
        // Entries index+1..=511 are valid; after a full log the index wrapped to 0xFFFF.
        let first = if index >= 512 { 0 } else { index + 1 };
        let pages = self.pages();
        for &gpa in &pml.as_u64()[first..512] {
            let pfn = (gpa / 4096) as usize;
            // Bochs may log a stray address: keep only pages of this guest.
            if pfn < pages {
                if let Some(d) = &mut self.dirty {
                    d.set(pfn);
                }
            }
        }
        let _ = vmcs::write(w16::GUEST_PML_INDEX, 511);
    }

    fn on_vmcall(&mut self) -> Option<SliceEnd> {
        let call = self.regs.rax;
        let (a0, a1, a2) = (self.regs.rdi, self.regs.rsi, self.regs.rdx);
        // Post-copy: a call whose buffer lies on a page still on the source waits for
        // it and is retried (RIP stays on the VMCALL), so the hypervisor never reads
        // or writes memory the guest does not hold yet.
        let buffer = match Hypercall::from_raw(call) {
            Some(Hypercall::ConsoleWrite) if a1 <= MAX_CONSOLE_WRITE => Some((a0, a1)),
            Some(Hypercall::Info) => Some((a0, core::mem::size_of::<GuestInfo>() as u64)),
            _ => None,
        };
        if let Some(pfn) = buffer.and_then(|(gpa, len)| self.remote_in(gpa, len)) {
            return self.block_on_remote(pfn);
        }
        let mut end = None;
        let result: Result<u64, ErrorCode> = match Hypercall::from_raw(call) {
            None => Err(ErrorCode::UnknownCall),
            Some(hc) => {
                let slots = self.stats.hypercalls.len();
                self.stats.hypercalls[(call as usize).min(slots - 1)] += 1;
                match hc {
                    Hypercall::ConsoleWrite => self.hc_console_write(a0, a1),
                    Hypercall::Time => Ok(self.clock.read(time::now_ns())),
                    Hypercall::Yield => {
                        end = Some(SliceEnd::Preempted);
                        Ok(0)
                    }
                    Hypercall::HaltUntil => {
                        if a0 > self.guest_time_ns() {
                            self.state = VmState::Halted(a0);
                            end = Some(SliceEnd::Blocked);
                        }
                        Ok(0)
                    }
                    Hypercall::Exit => {
                        self.flush_output();
                        println!("[g{}] exited with code {}", self.id, a0 as i64);
                        self.state = VmState::Exited(a0 as i64);
                        return Some(SliceEnd::Blocked);
                    }
                    Hypercall::Info => self.hc_info(a0),
                    Hypercall::Report => match ReportKind::from_raw(a0) {
                        Some(k) => {
                            self.stats.reports[(k as usize).min(3)] = Some((a1, a2));
                            Ok(0)
                        }
                        None => Err(ErrorCode::BadArgument),
                    },
                    Hypercall::TakeRequest => Ok(core::mem::take(&mut self.request)),
                    Hypercall::FreePages => self.hc_free_pages(a0, a1, a2),
                    Hypercall::NetAttach => self.hc_net_attach(a0),
                    Hypercall::NetNotify => match self.net_transmit() {
                        Err(Some(pfn)) => return self.block_on_remote(pfn),
                        Err(None) => Err(ErrorCode::BadArgument),
                        Ok(n) => Ok(n),
                    },
                    Hypercall::NetWait => {
                        if let Err(Some(pfn)) = self.net_transmit() {
                            return self.block_on_remote(pfn);
                        }
                        if core::mem::take(&mut self.nic.rx_event) {
                            Ok(0)
                        } else {
                            if a0 > self.guest_time_ns() {
                                self.state = VmState::Halted(a0);
                                self.nic.waiting = true;
                                end = Some(SliceEnd::Blocked);
                            }
                            Ok(0)
                        }
                    }
                    Hypercall::Move => {
                        let r = self.hc_move(a0, a1, a2);
                        if r.is_ok() {
                            // Waits for the move; RAX = 0 is what it finds on the
                            // destination (the kernel sets an error if it fails).
                            end = Some(SliceEnd::Blocked);
                        }
                        r
                    }
                    _ => Err(ErrorCode::UnknownCall),
                }
            }
        };
        self.regs.rax = match result {
            Ok(v) => v,
            Err(e) => {
                self.stats.hypercall_errors += 1;
                if self.stats.hypercalls[0] < 3 {
                    log::debug!("g{}: hypercall {call} failed: {e}", self.id);
                }
                e.to_raw()
            }
        };
        self.advance_rip(VMCALL_LEN);
        end
    }

    /// Checks that `[gpa, gpa+len)` lies in guest memory.
    fn guest_range(&self, gpa: u64, len: u64) -> Result<core::ops::Range<usize>, ErrorCode> {
        let end = gpa.checked_add(len).ok_or(ErrorCode::BadAddress)?;
        if end > self.mem_bytes {
            return Err(ErrorCode::BadAddress);
        }
        Ok(gpa as usize..end as usize)
    }

    fn hc_console_write(&mut self, ptr: u64, len: u64) -> Result<u64, ErrorCode> {
        if len > MAX_CONSOLE_WRITE {
            return Err(ErrorCode::BadArgument);
        }
        let range = self.guest_range(ptr, len)?;
        for i in range {
            let b = self.mem.as_bytes()[i];
            if b == b'\n' {
                self.flush_output();
            } else if b.is_ascii_graphic() || b == b' ' || b == b'\t' {
                self.out.push(b);
                if self.out.len() >= 200 {
                    self.flush_output();
                }
            }
        }
        Ok(len)
    }

    /// Prints the buffered guest output line with its id prefix.
    pub fn flush_output(&mut self) {
        if !self.out.is_empty() {
            // Only printable ASCII was buffered (hc_console_write), and the line carries
            // the guest's prefix: a guest cannot forge a hypervisor line.
            let mut line = format!("[g{}] ", self.id);
            line.push_str(&String::from_utf8_lossy(&self.out));
            line.push('\n');
            crate::arch::serial::write_guest(line.as_bytes());
            self.out.clear();
        }
    }

    fn hc_move(&mut self, ip: u64, port: u64, kind: u64) -> Result<u64, ErrorCode> {
        if ip > u64::from(u32::MAX) || port > u64::from(u16::MAX) || kind > 1 {
            return Err(ErrorCode::BadArgument);
        }
        if !self.allow_move || self.move_request.is_some() {
            return Err(ErrorCode::Refused);
        }
        self.move_request = Some(MoveRequest {
            ip: (ip as u32).to_be_bytes(),
            port: if port == 0 { 7000 } else { port as u16 },
            checkpoint: kind == 1,
        });
        self.state = VmState::Moving;
        Ok(0)
    }

    fn hc_free_pages(&mut self, gpa: u64, pages: u64, free: u64) -> Result<u64, ErrorCode> {
        if !gpa.is_multiple_of(4096) || free > 1 {
            return Err(ErrorCode::BadArgument);
        }
        let len = pages.checked_mul(4096).ok_or(ErrorCode::BadAddress)?;
        self.guest_range(gpa, len)?;
        self.hint_free((gpa / 4096) as usize, pages as usize, free == 1)
            .map_err(|_| ErrorCode::BadArgument)
    }

    fn hc_net_attach(&mut self, gpa: u64) -> Result<u64, ErrorCode> {
        if gpa == 0 {
            self.nic.ring = None;
            return Ok(nic::mac_word(self.nic.mac));
        }
        if !nic::valid_ring(gpa, self.mem_bytes) {
            return Err(ErrorCode::BadAddress);
        }
        self.nic.ring = Some(gpa);
        Ok(nic::mac_word(self.nic.mac))
    }

    /// Takes what the transmit ring holds (as much as the queue to the switch has
    /// room for). `Err(Some(pfn))`: the guest must wait for page `pfn` (post-copy);
    /// `Err(None)`: no ring, or its indices are corrupt.
    fn net_transmit(&mut self) -> Result<u64, Option<usize>> {
        let ring = self.nic.ring.ok_or(None)?;
        let room = nic::TX_QUEUE.saturating_sub(self.nic.tx_out.len());
        let (remote, dirty, free) = (&self.remote, &mut self.dirty, &mut self.free);
        let queue = &mut self.nic.tx_out;
        let r = nic::tx_drain(
            self.mem.as_bytes_mut(),
            ring,
            room,
            &mut self.nic.stats,
            |p| remote.as_ref().is_some_and(|r| r.get(p)),
            |p| written_by_hypervisor(dirty, free, p),
            |f| queue.push_back(f),
        );
        match r {
            Ok(n) => Ok(u64::from(n)),
            Err(nic::RingError::Remote(p)) => Err(Some(p)),
            Err(nic::RingError::BadIndices) => Err(None),
        }
    }

    /// Writes a frame from the switch into the receive ring, waking the guest if it
    /// waits for one. Returns whether the frame was consumed (written, or dropped
    /// because its buffer was bad or not here yet); `false`: no buffer posted, keep it.
    pub fn net_receive(&mut self, frame: &[u8]) -> bool {
        let Some(ring) = self.nic.ring else {
            return true;
        };
        let (remote, dirty, free) = (&self.remote, &mut self.dirty, &mut self.free);
        let r = nic::rx_deliver(
            self.mem.as_bytes_mut(),
            ring,
            frame,
            &mut self.nic.stats,
            |p| remote.as_ref().is_some_and(|r| r.get(p)),
            |p| written_by_hypervisor(dirty, free, p),
        );
        match r {
            Ok(nic::Delivery::NoBuffer) => return false,
            Ok(nic::Delivery::Delivered) => {}
            Ok(nic::Delivery::BadBuffer) | Err(_) => {
                self.nic.stats.rx_dropped += 1;
                return true;
            }
        }
        // `waiting` may be stale (the guest woke at its deadline and runs): then the
        // event must stay for its next NetWait.
        if core::mem::take(&mut self.nic.waiting) && matches!(self.state, VmState::Halted(_)) {
            self.state = VmState::Running;
        } else {
            self.nic.rx_event = true;
        }
        true
    }

    fn hc_info(&mut self, ptr: u64) -> Result<u64, ErrorCode> {
        let size = core::mem::size_of::<GuestInfo>() as u64;
        let range = self.guest_range(ptr, size)?;
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&ABI_VERSION.to_le_bytes());
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..16].copy_from_slice(&self.migrations.to_le_bytes());
        b[16..24].copy_from_slice(&self.mem_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.restores.to_le_bytes());
        let first = range.start / 4096;
        let last = (range.end - 1) / 4096;
        self.mem.as_bytes_mut()[range].copy_from_slice(&b);
        for pfn in first..=last {
            written_by_hypervisor(&mut self.dirty, &mut self.free, pfn);
        }
        Ok(0)
    }
}

/// Page `pfn` was written by the hypervisor itself (a hypercall result, a received
/// frame), which EPT dirty tracking never sees: mark it for a migration in progress (a
/// bit per page, however often) and drop its free-page hint.
fn written_by_hypervisor(
    dirty: &mut Option<PageBitmap>,
    free: &mut Option<PageBitmap>,
    pfn: usize,
) {
    if let Some(d) = dirty.as_mut() {
        d.set(pfn);
    }
    if let Some(f) = free.as_mut() {
        f.unset(pfn);
    }
}
