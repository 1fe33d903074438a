//! VM-exit reasons (SDM Vol. 3D Appendix C), decoded once into an enum so that the
//! dispatcher in `vcpu.rs` matches on names, with one handler each.

/// The basic exit reasons this hypervisor distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// 0: exception or NMI (all exceptions exit: the exception bitmap is all ones).
    Exception,
    /// 1: external interrupt.
    ExternalInterrupt,
    /// 2: triple fault.
    TripleFault,
    /// 10: CPUID.
    Cpuid,
    /// 11: GETSEC.
    Getsec,
    /// 13: INVD.
    Invd,
    /// 15: RDPMC.
    Rdpmc,
    /// 12: HLT.
    Hlt,
    /// 18: VMCALL, the hypercall.
    Vmcall,
    /// 19-27, 50, 53, 59: a VMX instruction other than VMCALL (VMCLEAR, VMLAUNCH,
    /// VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF, VMXON, INVEPT, INVVPID,
    /// VMFUNC).
    VmxInstruction,
    /// 28: control-register access.
    CrAccess,
    /// 30: I/O instruction.
    Io,
    /// 31: RDMSR.
    Rdmsr,
    /// 32: WRMSR.
    Wrmsr,
    /// 33: VM entry failed on invalid guest state.
    InvalidGuestState,
    /// 36: MWAIT.
    Mwait,
    /// 39: MONITOR.
    Monitor,
    /// 46, 47: a descriptor-table instruction (GDTR/IDTR, LDTR/TR access).
    DescriptorTable,
    /// 48: EPT violation.
    EptViolation,
    /// 49: EPT misconfiguration.
    EptMisconfig,
    /// 52: the VMX-preemption timer expired.
    PreemptionTimer,
    /// 54: WBINVD.
    Wbinvd,
    /// 55: XSETBV.
    Xsetbv,
    /// 62: the page-modification log is full.
    PmlFull,
    /// Anything else (the basic reason).
    Other(u16),
}

impl ExitReason {
    /// Decodes bits 15:0 of the exit-reason field.
    pub fn from_raw(raw: u64) -> Self {
        match raw as u16 {
            0 => Self::Exception,
            1 => Self::ExternalInterrupt,
            2 => Self::TripleFault,
            10 => Self::Cpuid,
            11 => Self::Getsec,
            12 => Self::Hlt,
            13 => Self::Invd,
            15 => Self::Rdpmc,
            18 => Self::Vmcall,
            19..=27 | 50 | 53 | 59 => Self::VmxInstruction,
            28 => Self::CrAccess,
            30 => Self::Io,
            31 => Self::Rdmsr,
            32 => Self::Wrmsr,
            33 => Self::InvalidGuestState,
            36 => Self::Mwait,
            39 => Self::Monitor,
            46 | 47 => Self::DescriptorTable,
            48 => Self::EptViolation,
            49 => Self::EptMisconfig,
            52 => Self::PreemptionTimer,
            54 => Self::Wbinvd,
            55 => Self::Xsetbv,
            62 => Self::PmlFull,
            n => Self::Other(n),
        }
    }
}

/// Human name of a basic exit reason number, for `stats`.
pub fn name(reason: usize) -> &'static str {
    match reason {
        0 => "exception/NMI",
        1 => "external-interrupt",
        2 => "triple-fault",
        7 => "interrupt-window",
        9 => "task-switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        15 => "RDPMC",
        14 => "INVLPG",
        16 => "RDTSC",
        18 => "VMCALL",
        19..=27 => "VMX-instruction",
        28 => "CR-access",
        29 => "DR-access",
        30 => "I/O",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "invalid-guest-state",
        34 => "MSR-loading",
        36 => "MWAIT",
        39 => "MONITOR",
        40 => "PAUSE",
        46 => "GDTR/IDTR-access",
        47 => "LDTR/TR-access",
        48 => "EPT-violation",
        49 => "EPT-misconfig",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "preemption-timer",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        62 => "PML-full",
        _ => "other",
    }
}

/// Names of exception vectors.
pub fn exception_name(v: u8) -> &'static str {
    match v {
        0 => "divide error",
        1 => "debug",
        2 => "NMI",
        3 => "breakpoint",
        4 => "overflow",
        5 => "bound range",
        6 => "invalid opcode",
        7 => "device not available",
        8 => "double fault",
        12 => "stack fault",
        13 => "general protection",
        14 => "page fault",
        16 => "x87 FP",
        17 => "alignment check",
        18 => "machine check",
        19 => "SIMD FP",
        _ => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_reasons() {
        assert_eq!(ExitReason::from_raw(18), ExitReason::Vmcall);
        assert_eq!(
            ExitReason::from_raw(0x8000_0021),
            ExitReason::InvalidGuestState
        );
        assert_eq!(ExitReason::from_raw(52), ExitReason::PreemptionTimer);
        assert_eq!(ExitReason::from_raw(99), ExitReason::Other(99));
        assert_eq!(ExitReason::from_raw(36), ExitReason::Mwait);
        assert_eq!(ExitReason::from_raw(39), ExitReason::Monitor);
        assert_eq!(ExitReason::from_raw(54), ExitReason::Wbinvd);
        assert_eq!(ExitReason::from_raw(13), ExitReason::Invd);
        assert_eq!(ExitReason::from_raw(15), ExitReason::Rdpmc);
        assert_eq!(ExitReason::from_raw(55), ExitReason::Xsetbv);
        assert_eq!(ExitReason::from_raw(24), ExitReason::VmxInstruction);
        assert_eq!(ExitReason::from_raw(50), ExitReason::VmxInstruction);
        assert_eq!(ExitReason::from_raw(46), ExitReason::DescriptorTable);
        assert_eq!(name(18), "VMCALL");
        assert_eq!(exception_name(14), "page fault");
    }
}
