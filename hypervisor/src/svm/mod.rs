//! AMD SVM (APM Vol. 2 ch. 15): capability decoding ([`SvmCaps`], CPUID 0x8000_000A),
//! the VMCB ([`vmcb`]), nested page tables ([`npt`]), exit decoding ([`exits`]) and
//! bring-up on the boot CPU ([`enable`]).
//!
//! Bring-up follows APM §15.4: CPUID 0x8000_0001 ECX.SVM, VM_CR.SVMDIS clear, EFER.SVME
//! set, VM_HSAVE_PA pointing at a host save page. The pages every guest shares (host
//! VMSAVE area, I/O and MSR permission maps with every bit set, so every port and MSR
//! access exits) are owned here.

pub mod exits;
pub mod npt;
pub mod vmcb;

use alloc::format;
use alloc::string::String;

use crate::arch::{cpu, svm as hw};
use crate::mm::phys::PhysPages;

/// What CPUID 0x8000_000A says about SVM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCaps {
    /// SVM revision (EAX).
    pub revision: u32,
    /// Number of ASIDs (EBX).
    pub asids: u32,
    /// Feature bits (EDX).
    pub features: u32,
}

/// Feature bits of CPUID 0x8000_000A EDX (APM Vol. 3 Appendix E.4.9).
pub mod feature {
    /// Nested paging.
    pub const NP: u32 = 1 << 0;
    /// LBR virtualization.
    pub const LBR_VIRT: u32 = 1 << 1;
    /// SVM lock.
    pub const SVML: u32 = 1 << 2;
    /// Next-RIP save on #VMEXIT.
    pub const NRIPS: u32 = 1 << 3;
    /// TSC rate MSR.
    pub const TSC_RATE: u32 = 1 << 4;
    /// VMCB clean bits.
    pub const VMCB_CLEAN: u32 = 1 << 5;
    /// Flush by ASID (TLB_CONTROL 3/7).
    pub const FLUSH_BY_ASID: u32 = 1 << 6;
    /// Decode assists.
    pub const DECODE_ASSISTS: u32 = 1 << 7;
    /// Pause-intercept filter.
    pub const PAUSE_FILTER: u32 = 1 << 10;
    /// Pause filter threshold.
    pub const PAUSE_THRESHOLD: u32 = 1 << 12;
    /// AVIC.
    pub const AVIC: u32 = 1 << 13;
    /// Virtualized VMSAVE/VMLOAD.
    pub const V_VMSAVE_VMLOAD: u32 = 1 << 15;
    /// Virtual GIF.
    pub const VGIF: u32 = 1 << 16;
}

impl SvmCaps {
    /// Reads CPUID 0x8000_000A.
    pub fn read() -> Self {
        let r = cpu::cpuid(0x8000_000A, 0);
        Self {
            revision: r.eax & 0xFF,
            asids: r.ebx,
            features: r.edx,
        }
    }

    /// Whether feature bit `f` is set.
    pub fn has(&self, f: u32) -> bool {
        self.features & f != 0
    }

    /// Nested paging.
    pub fn npt(&self) -> bool {
        self.has(feature::NP)
    }

    /// Next-RIP save.
    pub fn nrips(&self) -> bool {
        self.has(feature::NRIPS)
    }

    /// Features by name, for `info`.
    pub fn features(&self) -> [(&'static str, bool); 12] {
        use feature::*;
        [
            ("NPT", self.has(NP)),
            ("LBR-virt", self.has(LBR_VIRT)),
            ("SVM-lock", self.has(SVML)),
            ("NRIPS", self.has(NRIPS)),
            ("TSC-rate", self.has(TSC_RATE)),
            ("VMCB-clean", self.has(VMCB_CLEAN)),
            ("flush-by-ASID", self.has(FLUSH_BY_ASID)),
            ("decode-assists", self.has(DECODE_ASSISTS)),
            ("pause-filter", self.has(PAUSE_FILTER)),
            ("AVIC", self.has(AVIC)),
            ("vVMSAVE", self.has(V_VMSAVE_VMLOAD)),
            ("vGIF", self.has(VGIF)),
        ]
    }
}

/// Whether CPUID reports SVM (CPUID 0x8000_0001 ECX bit 2).
pub fn cpu_has_svm() -> bool {
    cpu::cpuid(0x8000_0000, 0).eax >= 0x8000_000A && cpu::cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0
}

/// Slice-timer interrupt rate: a guest that never exits by itself is interrupted (INTR
/// intercept) this often, and the run loop checks its slice deadline.
pub const TIMER_HZ: u32 = 1000;

/// SVM enabled on this CPU, with the pages every guest shares.
pub struct Svm {
    /// What the CPU offers.
    pub caps: SvmCaps,
    _hsave: PhysPages,
    host_vmcb: PhysPages,
    iopm: PhysPages,
    msrpm: PhysPages,
}

impl Svm {
    /// Physical address of the host's VMSAVE/VMLOAD area.
    pub fn host_vmcb(&self) -> u64 {
        self.host_vmcb.base()
    }

    /// Physical address of the I/O permission map (all ones: every port exits).
    pub fn iopm(&self) -> u64 {
        self.iopm.base()
    }

    /// Physical address of the MSR permission map (all ones: every MSR exits).
    pub fn msrpm(&self) -> u64 {
        self.msrpm.base()
    }
}

/// Turns SVM on. The error says what is missing, for the console.
pub fn enable() -> Result<Svm, String> {
    if !cpu_has_svm() {
        let v = crate::platform::cpu_vendor();
        return Err(format!(
            "this CPU ({}) reports neither VMX nor SVM in CPUID",
            core::str::from_utf8(&v).unwrap_or("?")
        ));
    }
    if cpu::rdmsr(hw::MSR_VM_CR) & (1 << 4) != 0 {
        return Err("SVM is disabled by the firmware (VM_CR.SVMDIS)".into());
    }
    let caps = SvmCaps::read();
    if !caps.npt() {
        return Err("SVM without nested paging is not supported".into());
    }
    let alloc = |n: usize, what: &str| PhysPages::alloc(n).map_err(|e| format!("{what}: {e}"));
    let hsave = alloc(1, "host save area")?;
    let host_vmcb = alloc(1, "host VMCB")?;
    let mut iopm = alloc(3, "I/O permission map")?;
    let mut msrpm = alloc(2, "MSR permission map")?;
    iopm.as_bytes_mut().fill(0xFF);
    msrpm.as_bytes_mut().fill(0xFF);
    hw::enable_svme();
    cpu::wrmsr(hw::MSR_VM_HSAVE_PA, hsave.base());
    hw::start_slice_timer(TIMER_HZ);
    Ok(Svm {
        caps,
        _hsave: hsave,
        host_vmcb,
        iopm,
        msrpm,
    })
}
