//! #VMEXIT codes (APM Vol. 2 Appendix C) decoded into the vendor-neutral
//! [`Exit`](crate::vm::exits::Exit), from the exit code and EXITINFO1/EXITINFO2
//! (APM §15.7-15.12, §15.25.6 for nested page faults).
//!
//! A #UD is decoded as an exception here; the run loop turns it into a hypercall when
//! the bytes at the guest's RIP are VMCALL (guests built for Intel) or VMMCALL.

use crate::vm::exits::{Access, CrAccess, Exit, Gpa, Vendor, DESCRIPTOR_TABLES};

/// Exit codes this hypervisor names.
pub mod code {
    /// Write of CR0 (writes of CRn are 0x10 + n).
    pub const WRITE_CR0: u64 = 0x10;
    /// Exception vector 0 (vector n is 0x40 + n).
    pub const EXCP_BASE: u64 = 0x40;
    /// Physical interrupt.
    pub const INTR: u64 = 0x60;
    /// NMI.
    pub const NMI: u64 = 0x61;
    /// SMI.
    pub const SMI: u64 = 0x62;
    /// INIT.
    pub const INIT: u64 = 0x63;
    /// RDPMC.
    pub const RDPMC: u64 = 0x6F;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// RSM.
    pub const RSM: u64 = 0x73;
    /// INVD.
    pub const INVD: u64 = 0x76;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN/OUT.
    pub const IOIO: u64 = 0x7B;
    /// RDMSR/WRMSR.
    pub const MSR: u64 = 0x7C;
    /// Task switch.
    pub const TASK_SWITCH: u64 = 0x7D;
    /// FERR freeze.
    pub const FERR_FREEZE: u64 = 0x7E;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7F;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// SKINIT.
    pub const SKINIT: u64 = 0x86;
    /// ICEBP.
    pub const ICEBP: u64 = 0x88;
    /// WBINVD.
    pub const WBINVD: u64 = 0x89;
    /// MONITOR.
    pub const MONITOR: u64 = 0x8A;
    /// MWAIT.
    pub const MWAIT: u64 = 0x8B;
    /// MWAIT (armed).
    pub const MWAIT_CONDITIONAL: u64 = 0x8C;
    /// XSETBV.
    pub const XSETBV: u64 = 0x8D;
    /// RDPRU.
    pub const RDPRU: u64 = 0x8E;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN refused the VMCB (VMEXIT_INVALID, -1).
    pub const INVALID: u64 = u64::MAX;
}

/// Decodes one #VMEXIT. `rcx` is the guest's RCX (the MSR of RDMSR/WRMSR).
pub fn decode(exit_code: u64, info1: u64, info2: u64, rcx: u64) -> Exit {
    use code::*;
    match exit_code {
        0x10..=0x1F => Exit::ControlRegister(CrAccess::Write {
            cr: (exit_code - WRITE_CR0) as u8,
            gpr: (info1 & (1 << 63) != 0).then_some((info1 & 0xF) as u8),
        }),
        0x00..=0x0F => Exit::ControlRegister(CrAccess::Read {
            cr: exit_code as u8,
        }),
        0x40..=0x5F => {
            let vector = (exit_code - EXCP_BASE) as u8;
            Exit::Exception {
                vector,
                // #DF, #TS, #NP, #SS, #GP, #PF, #AC carry an error code in EXITINFO1.
                error: matches!(vector, 8 | 10..=14 | 17).then_some(info1 & 0xFFFF_FFFF),
                address: (vector == 14).then_some(info2),
            }
        }
        INTR => Exit::Timer,
        NMI | SMI | INIT => Exit::Denied("NMI/SMI/INIT arrived for the guest (host event)"),
        RDPMC => Exit::Denied("RDPMC (the host's performance counters) is not allowed"),
        CPUID => Exit::Cpuid,
        RSM => Exit::Denied("RSM is not allowed"),
        INVD => Exit::Denied("INVD (would discard the machine's cached writes) is not allowed"),
        HLT => Exit::Halt,
        IOIO => Exit::Io {
            port: (info1 >> 16) as u16,
            input: info1 & 1 != 0,
        },
        MSR => Exit::Msr {
            msr: rcx as u32,
            write: info1 & 1 != 0,
        },
        TASK_SWITCH => Exit::Denied("task switch: PV guests have no TSS of their own"),
        FERR_FREEZE => Exit::Denied("x87 FERR: PV guests have no FP state"),
        SHUTDOWN => Exit::Shutdown,
        VMMCALL => Exit::Hypercall,
        VMRUN | 0x82..=0x85 | SKINIT => {
            Exit::Denied("SVM instruction: nested virtualization is not offered")
        }
        0x66..=0x6D => Exit::Denied(DESCRIPTOR_TABLES),
        ICEBP => Exit::Denied("ICEBP is not allowed"),
        WBINVD => Exit::Wbinvd,
        MONITOR => Exit::Monitor,
        MWAIT | MWAIT_CONDITIONAL => Exit::Mwait,
        XSETBV => Exit::Denied("XSETBV: PV guests have no FP/SIMD/XSAVE state"),
        RDPRU => Exit::Denied("RDPRU is not allowed"),
        NPF => Exit::NestedFault {
            gpa: Gpa(info2),
            access: if info1 & (1 << 4) != 0 {
                Access::Execute
            } else if info1 & (1 << 1) != 0 {
                Access::Write
            } else {
                Access::Read
            },
        },
        INVALID => Exit::InvalidState,
        code => Exit::Unknown {
            vendor: Vendor::Svm,
            code,
        },
    }
}

/// Whether `bytes` (at the guest's RIP) start with VMCALL (0F 01 C1) or VMMCALL
/// (0F 01 D9): the hypercall instructions of both vendors.
pub fn is_hypercall(bytes: &[u8]) -> bool {
    matches!(bytes, [0x0F, 0x01, 0xC1 | 0xD9, ..])
}

/// The source register of a `MOV CRn, reg` at the start of `bytes` (an optional REX
/// prefix, 0F 22, ModRM with mod = 11), numbered 0 = RAX ... 15 = R15: what decode
/// assists would report in EXITINFO1, for CPUs (QEMU's TCG) without them.
pub fn mov_to_cr_source(bytes: &[u8]) -> Option<u8> {
    let (rex, rest) = match bytes {
        [r @ 0x40..=0x4F, rest @ ..] => (*r, rest),
        _ => (0, bytes),
    };
    match rest {
        [0x0F, 0x22, modrm, ..] if modrm >> 6 == 3 => Some((modrm & 7) | ((rex & 1) << 3)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_svm_exits_into_the_neutral_enum() {
        assert_eq!(decode(0x81, 0, 0, 0), Exit::Hypercall);
        assert_eq!(decode(0x60, 0, 0, 0), Exit::Timer);
        assert_eq!(decode(0x72, 0, 0, 0), Exit::Cpuid);
        assert_eq!(decode(0x78, 0, 0, 0), Exit::Halt);
        assert_eq!(
            decode(0x400, 0x1_0000_0007, 0x5000, 0),
            Exit::NestedFault {
                gpa: Gpa(0x5000),
                access: Access::Write
            }
        );
        assert_eq!(
            decode(0x400, 0x1_0000_0014, 0x7000, 0),
            Exit::NestedFault {
                gpa: Gpa(0x7000),
                access: Access::Execute
            }
        );
        assert_eq!(
            decode(0x400, 0x1_0000_0004, 0x8000, 0),
            Exit::NestedFault {
                gpa: Gpa(0x8000),
                access: Access::Read
            }
        );
        assert_eq!(
            decode(0x4E, 2, 0xdead_0000, 0),
            Exit::Exception {
                vector: 14,
                error: Some(2),
                address: Some(0xdead_0000)
            }
        );
        assert_eq!(
            decode(0x46, 0, 0, 0),
            Exit::Exception {
                vector: 6,
                error: None,
                address: None
            }
        );
        assert_eq!(
            decode(0x7B, (0x3F8 << 16) | 0x11, 0, 0),
            Exit::Io {
                port: 0x3F8,
                input: true
            }
        );
        assert_eq!(
            decode(0x7C, 1, 0, 0xC000_0080),
            Exit::Msr {
                msr: 0xC000_0080,
                write: true
            }
        );
        assert_eq!(
            decode(0x14, 0, 0, 0),
            Exit::ControlRegister(CrAccess::Write { cr: 4, gpr: None })
        );
        assert_eq!(decode(0x7F, 0, 0, 0), Exit::Shutdown);
        assert_eq!(decode(u64::MAX, 0, 0, 0), Exit::InvalidState);
        assert!(matches!(decode(0x80, 0, 0, 0), Exit::Denied(_)));
        assert_eq!(
            decode(0x401, 0, 0, 0),
            Exit::Unknown {
                vendor: Vendor::Svm,
                code: 0x401
            }
        );
        assert_eq!(decode(0x400, 2, 0, 0).stat_slot(), 48);
    }

    #[test]
    fn mov_to_cr_source_registers() {
        assert_eq!(
            mov_to_cr_source(&[0x0F, 0x22, 0xE0]),
            Some(0),
            "mov cr4, rax"
        );
        assert_eq!(
            mov_to_cr_source(&[0x0F, 0x22, 0xC3]),
            Some(3),
            "mov cr0, rbx"
        );
        assert_eq!(
            mov_to_cr_source(&[0x41, 0x0F, 0x22, 0xC0]),
            Some(8),
            "mov cr0, r8"
        );
        assert_eq!(mov_to_cr_source(&[0x0F, 0x20, 0xC0]), None, "mov rax, cr0");
        assert_eq!(mov_to_cr_source(&[0x0F, 0x22]), None);
    }

    #[test]
    fn both_hypercall_instructions_are_recognised() {
        assert!(is_hypercall(&[0x0F, 0x01, 0xC1]));
        assert!(is_hypercall(&[0x0F, 0x01, 0xD9, 0x90]));
        assert!(!is_hypercall(&[0x0F, 0x0B, 0x00]), "UD2");
        assert!(!is_hypercall(&[0x0F, 0x01]));
    }
}
