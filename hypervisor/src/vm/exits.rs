//! VM exits, vendor-neutral: [`Exit`] is what the handlers in `vcpu.rs` match on, one
//! handler each. Intel's basic exit reason + qualification (SDM Vol. 3D Appendix C)
//! decode into it here ([`Exit::from_vmx`]); AMD's exit code + EXITINFO1/2 (APM Vol. 2
//! Appendix C) in [`crate::svm::exits`]. Both decoders are pure functions of the raw
//! fields, tested on the host.

pub use super::nested::Gpa;

/// The access that faulted in the nested tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A data read (or a read by the guest's own page walk).
    Read,
    /// A data write (or an A/D update by the guest's own page walk).
    Write,
    /// An instruction fetch.
    Execute,
}

impl Access {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Execute => "execute",
        }
    }
}

/// A control-register access that exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CRn, from the general-purpose register numbered `gpr` (0 = RAX ... 15 =
    /// R15) when the CPU says which (VMX; SVM without decode assists does not).
    Write {
        /// The control register.
        cr: u8,
        /// Source register.
        gpr: Option<u8>,
    },
    /// MOV from CRn.
    Read {
        /// The control register.
        cr: u8,
    },
    /// CLTS.
    Clts,
    /// LMSW.
    Lmsw,
}

/// Which vendor's raw code an [`Exit::Unknown`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// Intel VMX (basic exit reason).
    Vmx,
    /// AMD SVM (exit code).
    Svm,
}

/// One VM exit, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A hypercall: VMCALL (Intel's exit, or AMD's #UD on it) or VMMCALL, 3 bytes.
    Hypercall,
    /// CPUID (2 bytes).
    Cpuid,
    /// HLT (1 byte).
    Halt,
    /// The slice timer: VMX-preemption timer, or a physical interrupt (SVM's INTR
    /// intercept, VMX's external-interrupt exit).
    Timer,
    /// A nested-paging fault: EPT violation or #NPF.
    NestedFault {
        /// The guest-physical address.
        gpa: Gpa,
        /// What the guest did.
        access: Access,
    },
    /// A guest exception (every vector is intercepted: PV guests have no IDT).
    Exception {
        /// Vector.
        vector: u8,
        /// Error code, when the exception has one.
        error: Option<u64>,
        /// Faulting linear address (#PF).
        address: Option<u64>,
    },
    /// An I/O instruction (PV guests have no devices).
    Io {
        /// Port.
        port: u16,
        /// IN (else OUT).
        input: bool,
    },
    /// RDMSR or WRMSR.
    Msr {
        /// The MSR (ECX).
        msr: u32,
        /// WRMSR (else RDMSR).
        write: bool,
    },
    /// A control-register access the hypervisor intercepts.
    ControlRegister(CrAccess),
    /// Triple fault / shutdown.
    Shutdown,
    /// MONITOR (a hint: skipped, 3 bytes).
    Monitor,
    /// MWAIT (a yield, 3 bytes).
    Mwait,
    /// WBINVD (nothing to write back for a PV guest: skipped, 2 bytes).
    Wbinvd,
    /// An instruction that stops the guest; the text says which and why.
    Denied(&'static str),
    /// The page-modification log is full (VMX PML).
    LogFull,
    /// VM entry refused the guest state (VMX invalid guest state, SVM VMEXIT_INVALID).
    InvalidState,
    /// The nested tables are malformed (EPT misconfiguration): a hypervisor bug.
    Misconfig,
    /// Anything else, with the vendor's raw code.
    Unknown {
        /// Whose code.
        vendor: Vendor,
        /// VMX basic exit reason or SVM exit code.
        code: u64,
    },
}

/// The raw VMX exit fields [`Exit::from_vmx`] needs (SDM Vol. 3C §28.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxExitInfo {
    /// Exit reason.
    pub reason: u64,
    /// Exit qualification.
    pub qualification: u64,
    /// VM-exit interruption information (exceptions).
    pub interruption: u64,
    /// VM-exit interruption error code.
    pub error: u64,
    /// Guest-physical address (EPT violations).
    pub gpa: u64,
    /// RCX (the MSR of RDMSR/WRMSR).
    pub rcx: u64,
}

impl Exit {
    /// Decodes a VMX exit.
    pub fn from_vmx(i: &VmxExitInfo) -> Self {
        let q = i.qualification;
        match ExitReason::from_raw(i.reason) {
            ExitReason::Vmcall => Self::Hypercall,
            ExitReason::Cpuid => Self::Cpuid,
            ExitReason::Hlt => Self::Halt,
            ExitReason::PreemptionTimer | ExitReason::ExternalInterrupt => Self::Timer,
            ExitReason::EptViolation => Self::NestedFault {
                gpa: Gpa(i.gpa),
                access: if q & 2 != 0 {
                    Access::Write
                } else if q & 4 != 0 {
                    Access::Execute
                } else {
                    Access::Read
                },
            },
            ExitReason::Exception => {
                let vector = (i.interruption & 0xFF) as u8;
                Self::Exception {
                    vector,
                    error: (i.interruption & (1 << 11) != 0).then_some(i.error),
                    address: (vector == 14).then_some(q),
                }
            }
            ExitReason::TripleFault => Self::Shutdown,
            ExitReason::Io => Self::Io {
                port: (q >> 16) as u16,
                input: q & 8 != 0,
            },
            ExitReason::Rdmsr | ExitReason::Wrmsr => Self::Msr {
                msr: i.rcx as u32,
                write: ExitReason::from_raw(i.reason) == ExitReason::Wrmsr,
            },
            ExitReason::CrAccess => {
                let cr = (q & 0xF) as u8;
                Self::ControlRegister(match (q >> 4) & 3 {
                    0 => CrAccess::Write {
                        cr,
                        gpr: Some(((q >> 8) & 0xF) as u8),
                    },
                    1 => CrAccess::Read { cr },
                    2 => CrAccess::Clts,
                    _ => CrAccess::Lmsw,
                })
            }
            ExitReason::Monitor => Self::Monitor,
            ExitReason::Mwait => Self::Mwait,
            ExitReason::Wbinvd => Self::Wbinvd,
            ExitReason::Invd => {
                Self::Denied("INVD (would discard the machine's cached writes) is not allowed")
            }
            ExitReason::Rdpmc => {
                Self::Denied("RDPMC (the host's performance counters) is not allowed")
            }
            ExitReason::Xsetbv => Self::Denied("XSETBV: PV guests have no FP/SIMD/XSAVE state"),
            ExitReason::Getsec => Self::Denied("GETSEC is not allowed"),
            ExitReason::VmxInstruction => {
                Self::Denied("VMX instruction: nested virtualization is not offered")
            }
            ExitReason::DescriptorTable => Self::Denied(DESCRIPTOR_TABLES),
            ExitReason::PmlFull => Self::LogFull,
            ExitReason::InvalidGuestState => Self::InvalidState,
            ExitReason::EptMisconfig => Self::Misconfig,
            ExitReason::Other(n) => Self::Unknown {
                vendor: Vendor::Vmx,
                code: n.into(),
            },
        }
    }

    /// The counter slot of `stats` (numbered like VMX basic exit reasons, so one
    /// table serves both vendors).
    pub fn stat_slot(&self) -> usize {
        match self {
            Self::Exception { .. } => 0,
            Self::Timer => 52,
            Self::Shutdown => 2,
            Self::Cpuid => 10,
            Self::Halt => 12,
            Self::Hypercall => 18,
            Self::ControlRegister(_) => 28,
            Self::Io { .. } => 30,
            Self::Msr { write: false, .. } => 31,
            Self::Msr { write: true, .. } => 32,
            Self::InvalidState => 33,
            Self::Mwait => 36,
            Self::Monitor => 39,
            Self::NestedFault { .. } => 48,
            Self::Misconfig => 49,
            Self::Wbinvd => 54,
            Self::LogFull => 62,
            Self::Denied(_) | Self::Unknown { .. } => 69,
        }
    }
}

/// Why descriptor-table instructions stop a guest.
pub const DESCRIPTOR_TABLES: &str = "descriptor-table instruction (LGDT/LIDT/LLDT/LTR/SGDT/SIDT/SLDT/STR): PV guests run on the hypervisor's flat segments";

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

/// Name of a `stats` counter slot ([`Exit::stat_slot`]) for a guest on `vendor`: VMX
/// slots are basic exit reasons ([`name`]); SVM's are named by what they count.
pub fn slot_name(vendor: Vendor, slot: usize) -> &'static str {
    match (vendor, slot) {
        (Vendor::Vmx, n) => name(n),
        (Vendor::Svm, 0) => "exception",
        (Vendor::Svm, 2) => "shutdown",
        (Vendor::Svm, 10) => "CPUID",
        (Vendor::Svm, 12) => "HLT",
        (Vendor::Svm, 18) => "VMCALL/VMMCALL",
        (Vendor::Svm, 28) => "CR-write",
        (Vendor::Svm, 30) => "IOIO",
        (Vendor::Svm, 31 | 32) => "MSR",
        (Vendor::Svm, 33) => "VMRUN-invalid",
        (Vendor::Svm, 36) => "MWAIT",
        (Vendor::Svm, 39) => "MONITOR",
        (Vendor::Svm, 48) => "NPF",
        (Vendor::Svm, 52) => "INTR-slice-timer",
        (Vendor::Svm, 54) => "WBINVD",
        (Vendor::Svm, _) => "other",
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

    #[test]
    fn decodes_vmx_exits_into_the_neutral_enum() {
        let d = |reason, qualification| {
            Exit::from_vmx(&VmxExitInfo {
                reason,
                qualification,
                gpa: 0x12_3456,
                rcx: 0xC000_0080,
                interruption: 0x80000B0E, // #PF, error code valid
                error: 6,
            })
        };
        assert_eq!(d(18, 0), Exit::Hypercall);
        assert_eq!(d(52, 0), Exit::Timer);
        assert_eq!(
            d(48, 0x182),
            Exit::NestedFault {
                gpa: Gpa(0x12_3456),
                access: Access::Write
            }
        );
        assert_eq!(
            d(48, 0x184),
            Exit::NestedFault {
                gpa: Gpa(0x12_3456),
                access: Access::Execute
            }
        );
        assert_eq!(
            d(0, 0xdead_0000),
            Exit::Exception {
                vector: 14,
                error: Some(6),
                address: Some(0xdead_0000)
            }
        );
        assert_eq!(
            d(30, (0x3F8 << 16) | 8),
            Exit::Io {
                port: 0x3F8,
                input: true
            }
        );
        assert_eq!(
            d(32, 0),
            Exit::Msr {
                msr: 0xC000_0080,
                write: true
            }
        );
        assert_eq!(
            d(28, 0x304),
            Exit::ControlRegister(CrAccess::Write {
                cr: 4,
                gpr: Some(3)
            })
        );
        assert_eq!(d(2, 0), Exit::Shutdown);
        assert_eq!(d(62, 0), Exit::LogFull);
        assert_eq!(
            d(99, 0),
            Exit::Unknown {
                vendor: Vendor::Vmx,
                code: 99
            }
        );
        assert_eq!(d(18, 0).stat_slot(), 18);
        assert_eq!(slot_name(Vendor::Vmx, 52), "preemption-timer");
        assert_eq!(slot_name(Vendor::Svm, 52), "INTR-slice-timer");
    }
}
