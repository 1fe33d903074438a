//! VMX capability MSRs: decoding and the allowed-0/allowed-1 rule for VMCS controls
//! (SDM Vol. 3D Appendix A.3-A.5, A.10). Pure logic, tested on the host.

/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_VMX_BASIC.
pub const IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS.
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS.
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS.
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS.
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// IA32_VMX_MISC.
pub const IA32_VMX_MISC: u32 = 0x485;
/// IA32_VMX_CR0_FIXED0.
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
/// IA32_VMX_CR0_FIXED1.
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// IA32_VMX_CR4_FIXED0.
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
/// IA32_VMX_CR4_FIXED1.
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// IA32_VMX_PROCBASED_CTLS2.
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
/// IA32_VMX_EPT_VPID_CAP.
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
/// IA32_VMX_TRUE_PINBASED_CTLS.
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
/// IA32_VMX_TRUE_PROCBASED_CTLS.
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
/// IA32_VMX_TRUE_EXIT_CTLS.
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
/// IA32_VMX_TRUE_ENTRY_CTLS.
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// A control that the CPU cannot provide as requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError {
    /// Which control field.
    pub field: &'static str,
    /// Bits we need set that the CPU cannot set.
    pub missing: u32,
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} controls: CPU cannot set bits {:#x}",
            self.field, self.missing
        )
    }
}

/// Applies the allowed-0 (low dword: bits that must be 1) and allowed-1 (high dword:
/// bits that may be 1) settings of a capability MSR to the `required` and `optional`
/// bits: required bits must be allowed, optional ones are taken when allowed.
pub fn adjust(
    field: &'static str,
    cap_msr: u64,
    required: u32,
    optional: u32,
) -> Result<u32, ControlError> {
    let must_be_one = cap_msr as u32;
    let may_be_one = (cap_msr >> 32) as u32;
    let missing = required & !may_be_one;
    if missing != 0 {
        return Err(ControlError { field, missing });
    }
    Ok((required | (optional & may_be_one)) | must_be_one)
}

/// What this CPU's VMX offers, decoded from the capability MSRs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    /// IA32_VMX_BASIC.
    pub basic: u64,
    /// Pin-based controls MSR (TRUE variant when available).
    pub pinbased: u64,
    /// Primary processor-based controls MSR (TRUE variant when available).
    pub procbased: u64,
    /// Secondary processor-based controls MSR (0 if there are none).
    pub procbased2: u64,
    /// VM-exit controls MSR (TRUE variant when available).
    pub exit: u64,
    /// VM-entry controls MSR (TRUE variant when available).
    pub entry: u64,
    /// IA32_VMX_MISC.
    pub misc: u64,
    /// IA32_VMX_EPT_VPID_CAP (0 if absent).
    pub ept_vpid: u64,
    /// CR0/CR4 fixed bits.
    pub cr0_fixed0: u64,
    #[allow(missing_docs)]
    pub cr0_fixed1: u64,
    #[allow(missing_docs)]
    pub cr4_fixed0: u64,
    #[allow(missing_docs)]
    pub cr4_fixed1: u64,
}

/// Primary processor-based control bits used here.
pub mod proc {
    /// HLT exiting.
    pub const HLT_EXITING: u32 = 1 << 7;
    /// MWAIT exiting.
    pub const MWAIT_EXITING: u32 = 1 << 10;
    /// RDPMC exiting.
    pub const RDPMC_EXITING: u32 = 1 << 11;
    /// MONITOR exiting.
    pub const MONITOR_EXITING: u32 = 1 << 29;
    /// Use I/O bitmaps (off: unconditional I/O exiting instead).
    pub const UNCOND_IO_EXITING: u32 = 1 << 24;
    /// Use MSR bitmaps.
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    /// Activate secondary controls.
    pub const SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based control bits used here.
pub mod proc2 {
    /// Enable EPT.
    pub const EPT: u32 = 1 << 1;
    /// Descriptor-table exiting (LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT, STR).
    pub const DESC_TABLE_EXITING: u32 = 1 << 2;
    /// WBINVD exiting.
    pub const WBINVD_EXITING: u32 = 1 << 6;
    /// Enable RDTSCP.
    pub const RDTSCP: u32 = 1 << 3;
    /// Enable VPID.
    pub const VPID: u32 = 1 << 5;
    /// Unrestricted guest.
    pub const UNRESTRICTED: u32 = 1 << 7;
    /// Enable INVPCID.
    pub const INVPCID: u32 = 1 << 12;
    /// Enable page-modification logging.
    pub const PML: u32 = 1 << 17;
    /// EPT-violation #VE.
    pub const EPT_VE: u32 = 1 << 18;
    /// Enable XSAVES/XRSTORS.
    pub const XSAVES: u32 = 1 << 20;
}

/// Pin-based control bits used here.
pub mod pin {
    /// External-interrupt exiting.
    pub const EXT_INT_EXITING: u32 = 1 << 0;
    /// NMI exiting.
    pub const NMI_EXITING: u32 = 1 << 3;
    /// Activate VMX-preemption timer.
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// VM-exit control bits used here.
pub mod exit {
    /// Host address-space size (64-bit host).
    pub const HOST_ADDR_SPACE_64: u32 = 1 << 9;
    /// Save IA32_EFER.
    pub const SAVE_EFER: u32 = 1 << 20;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 21;
    /// Save VMX-preemption timer value.
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
}

/// VM-entry control bits used here.
pub mod entry {
    /// IA-32e mode guest.
    pub const IA32E_GUEST: u32 = 1 << 9;
    /// Load IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 15;
}

impl VmxCaps {
    /// Decodes the capability MSRs, reading each through `rdmsr`. The TRUE MSRs are used
    /// when IA32_VMX_BASIC bit 55 says they exist; secondary controls and EPT/VPID
    /// capabilities only when the allowed-1 bits say so.
    pub fn read(rdmsr: impl Fn(u32) -> u64) -> Self {
        let basic = rdmsr(IA32_VMX_BASIC);
        let has_true = basic & (1 << 55) != 0;
        let pick = |plain, tru| if has_true { rdmsr(tru) } else { rdmsr(plain) };
        let procbased = pick(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS);
        let has_secondary = (procbased >> 32) as u32 & proc::SECONDARY != 0;
        let procbased2 = if has_secondary {
            rdmsr(IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let allowed2 = (procbased2 >> 32) as u32;
        let ept_vpid = if allowed2 & (proc2::EPT | proc2::VPID) != 0 {
            rdmsr(IA32_VMX_EPT_VPID_CAP)
        } else {
            0
        };
        Self {
            basic,
            pinbased: pick(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS),
            procbased,
            procbased2,
            exit: pick(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS),
            entry: pick(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS),
            misc: rdmsr(IA32_VMX_MISC),
            ept_vpid,
            cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
        }
    }

    /// VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC).
    pub fn revision(&self) -> u32 {
        self.basic as u32 & 0x7FFF_FFFF
    }

    fn allowed2(&self, bit: u32) -> bool {
        (self.procbased2 >> 32) as u32 & bit != 0
    }

    /// EPT is available.
    pub fn ept(&self) -> bool {
        self.allowed2(proc2::EPT)
    }
    /// VPID is available.
    pub fn vpid(&self) -> bool {
        self.allowed2(proc2::VPID)
    }
    /// Unrestricted guest is available.
    pub fn unrestricted_guest(&self) -> bool {
        self.allowed2(proc2::UNRESTRICTED)
    }
    /// Page-modification logging is available.
    pub fn pml(&self) -> bool {
        self.allowed2(proc2::PML)
    }
    /// EPT accessed and dirty flags are available (EPT_VPID_CAP bit 21).
    pub fn ept_ad(&self) -> bool {
        self.ept_vpid & (1 << 21) != 0
    }
    /// EPT paging-structure memory type write-back is available (bit 14).
    pub fn ept_wb(&self) -> bool {
        self.ept_vpid & (1 << 14) != 0
    }
    /// 4-level EPT page walks are supported (bit 6).
    pub fn ept_4level(&self) -> bool {
        self.ept_vpid & (1 << 6) != 0
    }
    /// Single-context INVEPT is supported (bit 25).
    pub fn invept_single(&self) -> bool {
        self.ept_vpid & (1 << 25) != 0
    }
    /// All-context INVEPT is supported (bit 26).
    pub fn invept_all(&self) -> bool {
        self.ept_vpid & (1 << 26) != 0
    }
    /// The VMX-preemption timer is available.
    pub fn preemption_timer(&self) -> bool {
        (self.pinbased >> 32) as u32 & pin::PREEMPTION_TIMER != 0
    }
    /// The preemption timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC 4:0).
    pub fn preemption_timer_rate(&self) -> u32 {
        self.misc as u32 & 0x1F
    }
    /// Whether the TRUE control MSRs were used.
    pub fn has_true_msrs(&self) -> bool {
        self.basic & (1 << 55) != 0
    }
    /// Size of the VMXON/VMCS region in bytes (IA32_VMX_BASIC 44:32).
    pub fn region_size(&self) -> u32 {
        (self.basic >> 32) as u32 & 0x1FFF
    }

    /// One line per feature, for `info`.
    pub fn features(&self) -> [(&'static str, bool); 8] {
        [
            ("EPT", self.ept()),
            ("EPT-A/D", self.ept_ad()),
            ("PML", self.pml()),
            ("VPID", self.vpid()),
            ("unrestricted-guest", self.unrestricted_guest()),
            ("preemption-timer", self.preemption_timer()),
            ("INVEPT-single", self.invept_single()),
            ("true-MSRs", self.has_true_msrs()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BASIC, PROCBASED_CTLS2, EPT_VPID_CAP and MISC as Bochs 2.7 (corei7_skylake_x)
    /// reports them (read by `info`); the other control MSRs are plausible values.
    fn bochs_msr(msr: u32) -> u64 {
        match msr {
            IA32_VMX_BASIC => 0x00d8_1000_0000_002b,
            IA32_VMX_TRUE_PINBASED_CTLS => 0x0000_007f_0000_0016,
            IA32_VMX_TRUE_PROCBASED_CTLS => 0xfff9_fffe_0400_6172,
            IA32_VMX_PROCBASED_CTLS2 => 0x0217_7fff_0000_0000,
            IA32_VMX_TRUE_EXIT_CTLS => 0x01ff_efff_0003_6dfb,
            IA32_VMX_TRUE_ENTRY_CTLS => 0x0000_f3ff_0000_11fb,
            IA32_VMX_EPT_VPID_CAP => 0x0000_0f01_0633_4141,
            IA32_VMX_MISC => 0x6004_01e0,
            _ => 0,
        }
    }

    #[test]
    fn decodes_bochs_capabilities() {
        let c = VmxCaps::read(bochs_msr);
        assert_eq!(c.revision(), 0x2b);
        assert!(c.has_true_msrs());
        assert!(c.ept() && c.vpid() && c.pml() && c.ept_ad() && c.ept_wb() && c.ept_4level());
        assert!(c.preemption_timer());
        assert_eq!(c.preemption_timer_rate(), 0);
        assert_eq!(c.region_size(), 0x1000);
    }

    #[test]
    fn allowed_bits_rule() {
        // must-be-one 0x16, may-be-one 0x7f.
        let cap = 0x0000_007f_0000_0016;
        assert_eq!(adjust("pin", cap, pin::NMI_EXITING, 0), Ok(0x16 | 0x8));
        assert_eq!(adjust("pin", cap, 0, 1 << 10), Ok(0x16));
        let err = adjust("pin", cap, 1 << 10, 0).unwrap_err();
        assert_eq!(err.missing, 1 << 10);
        assert!(err.to_string().contains("pin"));
    }

    #[test]
    fn no_secondary_means_no_ept() {
        let c = VmxCaps::read(|m| if m == IA32_VMX_BASIC { 0x2b } else { 0 });
        assert!(!c.ept() && !c.pml() && !c.ept_ad() && !c.has_true_msrs());
    }
}
