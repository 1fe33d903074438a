//! The virtual machine control block (APM Vol. 2 Appendix B): offsets of the fields this
//! hypervisor uses, and typed access over the VMCB page's words. The VMCB is ordinary
//! memory (no VMREAD/VMWRITE): reads and writes are plain loads and stores on the page
//! the guest's [`Vm`](crate::vm::Vm) owns, made between VMRUNs.
//!
//! ```text
//!  0x000  control area   intercepts, IOPM/MSRPM, ASID, TLB control, exit code/info,
//!                        nested paging, event injection, nRIP, clean bits
//!  0x400  state save     segments, CPL, EFER, CRs, RFLAGS, RIP, RSP, RAX, PAT ...
//! ```

/// Control area (Table B-1), byte offsets.
pub mod ctl {
    /// CR read intercepts (bits 15:0), CR write intercepts (bits 31:16).
    pub const INTERCEPT_CR: usize = 0x000;
    /// DR read (15:0) and write (31:16) intercepts.
    pub const INTERCEPT_DR: usize = 0x004;
    /// Exception intercepts, one bit per vector.
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    /// Instruction intercepts, word 1 (INTR ... SHUTDOWN).
    pub const INTERCEPT_MISC1: usize = 0x00C;
    /// Instruction intercepts, word 2 (VMRUN ... ).
    pub const INTERCEPT_MISC2: usize = 0x010;
    /// Physical address of the I/O permission map (12 KiB).
    pub const IOPM_BASE: usize = 0x040;
    /// Physical address of the MSR permission map (8 KiB).
    pub const MSRPM_BASE: usize = 0x048;
    /// Guest ASID (32 bits).
    pub const ASID: usize = 0x058;
    /// TLB control (byte at 0x05C): 1 flushes every ASID's translations at VMRUN.
    pub const TLB_CONTROL: usize = 0x05C;
    /// Virtual interrupt control (bit 24 V_INTR_MASKING).
    pub const INT_CTL: usize = 0x060;
    /// Interrupt shadow (bit 0).
    pub const INT_STATE: usize = 0x068;
    /// Exit code.
    pub const EXIT_CODE: usize = 0x070;
    /// EXITINFO1.
    pub const EXIT_INFO1: usize = 0x078;
    /// EXITINFO2.
    pub const EXIT_INFO2: usize = 0x080;
    /// EXITINTINFO: an event that was being delivered at the exit.
    pub const EXIT_INT_INFO: usize = 0x088;
    /// Nested paging enable (bit 0).
    pub const NP_ENABLE: usize = 0x090;
    /// Event injection.
    pub const EVENT_INJ: usize = 0x0A8;
    /// Nested page table root (nCR3).
    pub const N_CR3: usize = 0x0B0;
    /// VMCB clean bits (32 bits).
    pub const CLEAN: usize = 0x0C0;
    /// Next sequential RIP (with NRIP save).
    pub const NEXT_RIP: usize = 0x0C8;
}

/// State-save area (Table B-2), byte offsets.
pub mod save {
    /// ES segment (selector u16, attrib u16, limit u32, base u64).
    pub const ES: usize = 0x400;
    /// CS segment.
    pub const CS: usize = 0x410;
    /// SS segment.
    pub const SS: usize = 0x420;
    /// DS segment.
    pub const DS: usize = 0x430;
    /// FS segment (VMLOAD/VMSAVE).
    pub const FS: usize = 0x440;
    /// GS segment (VMLOAD/VMSAVE).
    pub const GS: usize = 0x450;
    /// GDTR (limit, base).
    pub const GDTR: usize = 0x460;
    /// LDTR (VMLOAD/VMSAVE).
    pub const LDTR: usize = 0x470;
    /// IDTR.
    pub const IDTR: usize = 0x480;
    /// TR (VMLOAD/VMSAVE).
    pub const TR: usize = 0x490;
    /// CPL (byte).
    pub const CPL: usize = 0x4CB;
    /// EFER.
    pub const EFER: usize = 0x4D0;
    /// CR4.
    pub const CR4: usize = 0x548;
    /// CR3.
    pub const CR3: usize = 0x550;
    /// CR0.
    pub const CR0: usize = 0x558;
    /// DR7.
    pub const DR7: usize = 0x560;
    /// DR6.
    pub const DR6: usize = 0x568;
    /// RFLAGS.
    pub const RFLAGS: usize = 0x570;
    /// RIP.
    pub const RIP: usize = 0x578;
    /// RSP.
    pub const RSP: usize = 0x5D8;
    /// RAX.
    pub const RAX: usize = 0x5F8;
    /// KernelGsBase (VMLOAD/VMSAVE).
    pub const KERNEL_GS_BASE: usize = 0x620;
    /// Guest PAT (used with nested paging).
    pub const G_PAT: usize = 0x668;
}

/// Reads the 64-bit field at `off` of a VMCB page.
pub fn read(page: &[u8], off: usize) -> u64 {
    page.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// A VMCB page as bytes.
pub struct Vmcb<'a>(pub &'a mut [u8]);

impl Vmcb<'_> {
    /// Reads the 64-bit field at `off`.
    pub fn get(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.0[off..off + 8].try_into().unwrap_or([0; 8]))
    }

    /// Writes the 64-bit field at `off`.
    pub fn set(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads the 32-bit field at `off`.
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.0[off..off + 4].try_into().unwrap_or([0; 4]))
    }

    /// Writes the 32-bit field at `off`.
    pub fn set32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes a segment: selector, attributes (SVM's 12-bit packed form), limit, base.
    pub fn set_segment(&mut self, off: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        self.0[off..off + 2].copy_from_slice(&selector.to_le_bytes());
        self.0[off + 2..off + 4].copy_from_slice(&attrib.to_le_bytes());
        self.set32(off + 4, limit);
        self.set(off + 8, base);
    }
}

/// SVM's packed segment attributes (type, S, DPL, P in bits 7:0; AVL, L, D/B, G in
/// bits 11:8) from VMX's access-rights layout (the same bits at 7:0 and 15:12).
pub fn attrib_from_vmx_ar(ar: u32) -> u16 {
    ((ar & 0xFF) | ((ar >> 4) & 0xF00)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_pack_like_the_apm() {
        assert_eq!(attrib_from_vmx_ar(0xA09B), 0xA9B, "64-bit code");
        assert_eq!(attrib_from_vmx_ar(0xC093), 0xC93, "flat data");
        assert_eq!(attrib_from_vmx_ar(0x8B), 0x8B, "busy TSS");
    }

    #[test]
    fn fields_round_trip() {
        let mut page = vec![0u8; 4096];
        let mut v = Vmcb(&mut page);
        v.set(save::RIP, 0x1234_5678_9ABC);
        v.set32(ctl::ASID, 7);
        v.set_segment(save::CS, 8, 0xA9B, 0xFFFF_FFFF, 0);
        assert_eq!(v.get(save::RIP), 0x1234_5678_9ABC);
        assert_eq!(v.get32(ctl::ASID), 7);
        assert_eq!(v.get32(save::CS + 4), 0xFFFF_FFFF);
        assert_eq!(page[0x412], 0x9B);
    }
}
