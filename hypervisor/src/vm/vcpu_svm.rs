//! The vCPU of a [`Vm`] on AMD SVM: the VMCB set up equivalently to the VMX path's
//! `setup_vmx` (APM Vol. 2 ch. 15), and the run loop. Exits decode into the same
//! [`Exit`] as VMX's and go to the same handlers (`Vm::handle`).
//!
//! What differs from VMX, and why:
//! * Time slices: SVM has no preemption timer. The PIT interrupts at
//!   [`TIMER_HZ`](crate::svm::TIMER_HZ); with V_INTR_MASKING and the INTR intercept a
//!   pending physical interrupt exits the guest, the run loop acknowledges it at the
//!   PIC (the host runs with IF = 0) and checks the slice deadline.
//! * Hypercalls: guests execute VMCALL, which raises #UD on AMD. #UD is intercepted like
//!   every exception; if the bytes at RIP are VMCALL or VMMCALL it is a hypercall (so a
//!   guest moved from an Intel host in the middle of a retried hypercall goes on).
//! * CR0/CR4: no guest/host masks. Every write to CR0 or CR4 exits and stops the guest
//!   (PV guests never write them); the guest runs with CR0.EM set (x87 faults) and sees
//!   it, as there is no read shadow.
//! * The migratable state is the same [`VcpuState`]: EFER.SVME (required in the guest's
//!   EFER by VMRUN) is masked out, the interrupt shadow maps to VMX's STI blocking.

use super::exits::{CrAccess, Exit};
use super::vcpu::{guest_cr0_shadow, CR4_FP_BITS};
use super::*;
use crate::arch::svm as svm_hw;
use crate::svm::exits::{self as svm_exits, code};
use crate::svm::vmcb::{self, attrib_from_vmx_ar, ctl, save, Vmcb};
use crate::svm::Svm;

const CR0_EM: u64 = 1 << 2;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_VMXE: u64 = 1 << 13;
const EFER_SVME: u64 = svm_hw::EFER_SVME;

/// Instruction intercepts, word 1 (APM Table B-1, offset 0x0C).
mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    /// IDTR/GDTR/LDTR/TR reads and writes (bits 6-13).
    pub const DESCRIPTOR_TABLES: u32 = 0xFF << 6;
    pub const RDPMC: u32 = 1 << 15;
    pub const CPUID: u32 = 1 << 18;
    pub const RSM: u32 = 1 << 19;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const IOIO: u32 = 1 << 27;
    pub const MSR: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const FERR_FREEZE: u32 = 1 << 30;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Instruction intercepts, word 2 (offset 0x10).
mod misc2 {
    /// VMRUN (required by VMRUN itself), VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT.
    pub const SVM_INSTRUCTIONS: u32 = 0x7F;
    pub const ICEBP: u32 = 1 << 8;
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const MWAIT_CONDITIONAL: u32 = 1 << 12;
    pub const XSETBV: u32 = 1 << 13;
    pub const RDPRU: u32 = 1 << 14;
}

/// The power-on PAT (write-back in entry 0, which every NPT leaf uses).
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

impl Vm {
    fn vmcb(&mut self) -> Vmcb<'_> {
        Vmcb(self.vmcs.as_bytes_mut())
    }

    fn vmcb_read(&self, off: usize) -> u64 {
        vmcb::read(self.vmcs.as_bytes(), off)
    }

    /// Initialises the VMCB: intercepts, nested paging, the guest's flat 64-bit
    /// segments (the same as the VMX path's), and the guest state `s`.
    pub(super) fn setup_vmcb(&mut self, svm: &Svm, s: &VcpuState) {
        // NPT always maintains accessed/dirty flags (APM 15.25.5; measured under QEMU
        // TCG, docs/svm.md): dirty tracking by flags and free-page hints work.
        self.ad_enabled = true;
        self.flush_tlb = true;
        self.launched = false;
        let asids = svm.caps.asids.max(2);
        let asid = self.id % (asids - 1) + 1;
        let ncr3 = self.ept.base();
        let mut v = self.vmcb();
        v.0.fill(0);
        // Writes of CR0 and CR4 exit (the host owns caching, FP and mode bits).
        v.set32(ctl::INTERCEPT_CR, (1 << 16) | (1 << 20));
        // Every exception exits: PV guests have no IDT, and a fault is a bug (#UD is
        // also how a VMCALL arrives).
        v.set32(ctl::INTERCEPT_EXCEPTIONS, 0xFFFF_FFFF);
        v.set32(
            ctl::INTERCEPT_MISC1,
            misc1::INTR
                | misc1::NMI
                | misc1::SMI
                | misc1::INIT
                | misc1::DESCRIPTOR_TABLES
                | misc1::RDPMC
                | misc1::CPUID
                | misc1::RSM
                | misc1::INVD
                | misc1::HLT
                | misc1::IOIO
                | misc1::MSR
                | misc1::TASK_SWITCH
                | misc1::FERR_FREEZE
                | misc1::SHUTDOWN,
        );
        v.set32(
            ctl::INTERCEPT_MISC2,
            misc2::SVM_INSTRUCTIONS
                | misc2::ICEBP
                | misc2::WBINVD
                | misc2::MONITOR
                | misc2::MWAIT
                | misc2::MWAIT_CONDITIONAL
                | misc2::XSETBV
                | misc2::RDPRU,
        );
        v.set(ctl::IOPM_BASE, svm.iopm());
        v.set(ctl::MSRPM_BASE, svm.msrpm());
        v.set32(ctl::ASID, asid);
        // V_INTR_MASKING: physical interrupts follow the host's IF (set by the entry
        // stub), so they exit the guest; the guest's IF only masks virtual ones.
        v.set(ctl::INT_CTL, 1 << 24);
        v.set(ctl::NP_ENABLE, 1);
        v.set(ctl::N_CR3, ncr3);
        // Guest segments: flat 64-bit code and data, a busy TSS, no LDT (as on VMX).
        v.set_segment(save::CS, 0x08, attrib_from_vmx_ar(0xA09B), 0xFFFF_FFFF, 0);
        for seg in [save::SS, save::DS, save::ES] {
            v.set_segment(seg, 0x10, attrib_from_vmx_ar(0xC093), 0xFFFF_FFFF, 0);
        }
        v.set_segment(save::TR, 0x18, attrib_from_vmx_ar(0x8B), 0x67, 0);
        v.set_segment(save::LDTR, 0, 0, 0, 0);
        v.set_segment(save::GDTR, 0, 0, 0, 0);
        v.set_segment(save::IDTR, 0, 0, 0, 0);
        v.0[save::CPL] = 0;
        v.set(save::DR7, 0x400);
        v.set(save::DR6, 0xFFFF_0FF0);
        v.set(save::G_PAT, DEFAULT_PAT);
        self.write_vcpu_state_svm(s);
    }

    /// Writes the migratable vCPU state into the VMCB and the register file.
    fn write_vcpu_state_svm(&mut self, s: &VcpuState) {
        self.regs = s.regs;
        state_to_vmcb(&mut self.vmcb(), s);
    }

    /// Reads the migratable vCPU state from the VMCB.
    pub(super) fn read_vcpu_state_svm(&self) -> VcpuState {
        state_from_vmcb(self.vmcs.as_bytes(), &self.regs)
    }

    pub(super) fn svm_rip(&self) -> u64 {
        self.vmcb_read(save::RIP)
    }

    pub(super) fn set_svm_rip(&mut self, rip: u64) {
        self.vmcb().set(save::RIP, rip);
    }

    pub(super) fn svm_rsp(&self) -> u64 {
        self.vmcb_read(save::RSP)
    }

    pub(super) fn svm_cr(&self, cr: u8) -> u64 {
        match cr {
            0 => self.vmcb_read(save::CR0),
            3 => self.vmcb_read(save::CR3),
            _ => self.vmcb_read(save::CR4),
        }
    }

    /// The first bytes of the instruction at the guest's RIP, read through the guest's
    /// page tables in its memory (fewer if a page is not mapped).
    fn bytes_at_rip(&self) -> ([u8; 4], usize) {
        let (rip, cr3) = (self.svm_rip(), self.vmcb_read(save::CR3));
        let mem = self.mem.as_bytes();
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            match guest_linear_to_phys(mem, cr3, rip.wrapping_add(i as u64)) {
                Some(pa) if (pa as usize) < mem.len() => *b = mem[pa as usize],
                _ => return (bytes, i),
            }
        }
        (bytes, 4)
    }

    /// Whether the guest's RIP points at VMCALL or VMMCALL.
    fn at_hypercall(&self) -> bool {
        let (b, n) = self.bytes_at_rip();
        svm_exits::is_hypercall(&b[..n])
    }

    /// Runs the guest until `deadline` (TSC) or until it blocks.
    pub(super) fn run_slice_svm(&mut self, svm: &Svm, deadline: u64) -> SliceEnd {
        loop {
            crate::arch::serial::pump();
            if self.watch_first_run {
                self.watch_first_run = false;
                self.first_run_us = Some(time::now_us());
            }
            let flush = core::mem::take(&mut self.flush_tlb);
            let rax = self.regs.rax;
            {
                let mut v = self.vmcb();
                // 1: flush every ASID's translations at this VMRUN (after A/D clears,
                // write protection, a new guest on a reused ASID).
                v.0[ctl::TLB_CONTROL] = u8::from(flush);
                v.set(save::RAX, rax);
            }
            let entered = time::now();
            svm_hw::enter(&mut self.regs, self.vmcs.base(), svm.host_vmcb());
            let exited = time::now();
            self.launched = true;
            self.runtime_ticks += exited - entered;
            let code = self.vmcb_read(ctl::EXIT_CODE);
            let info1 = self.vmcb_read(ctl::EXIT_INFO1);
            let info2 = self.vmcb_read(ctl::EXIT_INFO2);
            self.regs.rax = self.vmcb_read(save::RAX);
            if code == code::NPF {
                self.last_npf = Some((info1, info2));
            }
            if code == code::INTR {
                // The slice timer (or another unmasked IRQ): take it off the PIC, or
                // the next VMRUN would exit at once.
                let _ = svm_hw::pic_ack();
            }
            let mut exit = svm_exits::decode(code, info1, info2, self.regs.rcx);
            if matches!(exit, Exit::Exception { vector: 6, .. }) && self.at_hypercall() {
                exit = Exit::Hypercall;
            }
            if let Exit::ControlRegister(CrAccess::Write { cr, gpr: None }) = exit {
                // No decode assists: find the source register in the instruction.
                let (b, n) = self.bytes_at_rip();
                let gpr = svm_exits::mov_to_cr_source(&b[..n]);
                exit = Exit::ControlRegister(CrAccess::Write { cr, gpr });
            }
            self.stats.exits[exit.stat_slot()] += 1;
            if exit == Exit::InvalidState {
                self.stop(format!(
                    "VM entry failed: VMRUN refused the VMCB (VMEXIT_INVALID, exitinfo1={info1:#x})"
                ));
                return SliceEnd::Blocked;
            }
            if let Some(end) = self.handle(exit) {
                return end;
            }
            if time::now() >= deadline {
                return SliceEnd::Preempted;
            }
        }
    }
}

/// Writes the vendor-neutral vCPU state `s` into a VMCB (RAX included; the other
/// general-purpose registers live in the register file).
pub fn state_to_vmcb(v: &mut Vmcb<'_>, s: &VcpuState) {
    v.set(save::RAX, s.regs.rax);
    v.set(save::RIP, s.rip);
    v.set(save::RSP, s.rsp);
    v.set(save::RFLAGS, s.rflags | 0x2);
    v.set(
        save::CR0,
        (guest_cr0_shadow(s.cr0) | CR0_EM) & !(CR0_CD | CR0_NW),
    );
    v.set(save::CR3, s.cr3);
    v.set(save::CR4, s.cr4 & !(CR4_FP_BITS | CR4_VMXE));
    v.set(save::EFER, s.efer | EFER_SVME);
    let data = attrib_from_vmx_ar(0xC093);
    v.set_segment(save::FS, 0x10, data, 0xFFFF_FFFF, s.fs_base);
    v.set_segment(save::GS, 0x10, data, 0xFFFF_FFFF, s.gs_base);
    v.set(save::KERNEL_GS_BASE, 0);
    // SVM has one interrupt-shadow bit; VMX's STI and MOV-SS blocking both map to it.
    v.set(ctl::INT_STATE, u64::from(s.interruptibility & 3 != 0));
}

/// Reads the vendor-neutral vCPU state from a VMCB page and the register file `regs`:
/// CR0 as the guest believes it (without the EM the host forces), CR4 without VMXE,
/// EFER without SVME (both vendors' own bits), the interrupt shadow as STI blocking.
pub fn state_from_vmcb(page: &[u8], regs: &GuestRegs) -> VcpuState {
    let r = |off| vmcb::read(page, off);
    VcpuState {
        regs: GuestRegs {
            rax: r(save::RAX),
            ..*regs
        },
        rip: r(save::RIP),
        rsp: r(save::RSP),
        rflags: r(save::RFLAGS),
        cr0: guest_cr0_shadow(r(save::CR0)),
        cr3: r(save::CR3),
        cr4: r(save::CR4) & !CR4_VMXE,
        efer: r(save::EFER) & !EFER_SVME,
        fs_base: r(save::FS + 8),
        gs_base: r(save::GS + 8),
        interruptibility: r(ctl::INT_STATE) & 1,
    }
}

/// Translates a guest-linear address through the guest's 4-level page tables (in its
/// memory `mem`, root `cr3`), honouring 1 GiB and 2 MiB pages. `None` if a table lies
/// outside the guest's memory or an entry is not present.
pub fn guest_linear_to_phys(mem: &[u8], cr3: u64, va: u64) -> Option<u64> {
    const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    let entry = |table: u64, idx: u64| -> Option<u64> {
        let at = usize::try_from((table & ADDR) + idx * 8).ok()?;
        let b = mem.get(at..at + 8)?;
        let e = u64::from_le_bytes(b.try_into().ok()?);
        (e & 1 != 0).then_some(e)
    };
    let mut table = cr3;
    for level in (1..4u32).rev() {
        let shift = 12 + 9 * level;
        let e = entry(table, (va >> shift) & 511)?;
        if level < 3 && e & (1 << 7) != 0 {
            let size = 1u64 << shift;
            return Some((e & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = e;
    }
    let e = entry(table, (va >> 12) & 511)?;
    Some((e & ADDR) | (va & 0xFFF))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state as the VMX backend produces it (`read_vcpu_state`) for a guest the
    /// loader started, mid-run.
    fn from_intel() -> VcpuState {
        let mut s = VcpuState {
            rip: 0x10_0123,
            rsp: 0xFF_FF00,
            rflags: 0x202,
            cr0: 0x8000_0031,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
            fs_base: 0x1234,
            gs_base: 0x5678,
            interruptibility: 1,
            ..Default::default()
        };
        s.regs.rax = 7;
        s.regs.rdi = 0x2000;
        s.regs.r15 = u64::MAX;
        s
    }

    #[test]
    fn vcpu_state_survives_the_vmcb_unchanged() {
        let s = from_intel();
        let mut page = vec![0u8; 4096];
        state_to_vmcb(&mut Vmcb(&mut page), &s);
        // What VMRUN sees: SVME in EFER, EM in CR0; what the stream gets back: neither.
        assert_eq!(vmcb::read(&page, save::EFER), 0x1500);
        assert_eq!(vmcb::read(&page, save::CR0) & CR0_EM, CR0_EM);
        assert_eq!(state_from_vmcb(&page, &s.regs), s);
        // MOV-SS blocking (VMX bit 1) is SVM's one shadow bit, read back as STI blocking.
        let movss = VcpuState {
            interruptibility: 2,
            ..s
        };
        state_to_vmcb(&mut Vmcb(&mut page), &movss);
        assert_eq!(state_from_vmcb(&page, &s.regs).interruptibility, 1);
        // A guest that never touched the FP bits keeps them off across the move.
        let sse = VcpuState { cr4: 0x620, ..s };
        state_to_vmcb(&mut Vmcb(&mut page), &sse);
        assert_eq!(state_from_vmcb(&page, &s.regs).cr4, 0x20);
    }

    #[test]
    fn walks_guest_page_tables() {
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 a 2 MiB page at 0,
        // entry 1 -> PT 0x4000 whose entry 5 maps 0x20_5000 to 0x7000.
        let mut mem = vec![0u8; 0x8000];
        let mut put = |at: usize, v: u64| mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(0x1000, 0x2003);
        put(0x2000, 0x3003);
        put(0x3000, 0x83);
        put(0x3008, 0x4003);
        put(0x4000 + 5 * 8, 0x7003);
        assert_eq!(guest_linear_to_phys(&mem, 0x1000, 0x1234), Some(0x1234));
        assert_eq!(guest_linear_to_phys(&mem, 0x1000, 0x20_5123), Some(0x7123));
        assert_eq!(guest_linear_to_phys(&mem, 0x1000, 0x20_6000), None);
        assert_eq!(guest_linear_to_phys(&mem, 0x1000, 1 << 39), None);
        assert_eq!(
            guest_linear_to_phys(&mem, 0x10_0000, 0),
            None,
            "CR3 outside"
        );
    }
}
