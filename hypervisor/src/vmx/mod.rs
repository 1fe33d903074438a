//! Intel VMX: capability decoding ([`caps`]), VMCS fields ([`vmcs`]), extended page
//! tables ([`ept`]), and bring-up of VMX root operation on the boot CPU ([`enable`]).
//!
//! Bring-up follows SDM Vol. 3C §24.7-24.8: check CPUID and IA32_FEATURE_CONTROL, apply
//! the CR0/CR4 fixed bits, set CR4.VMXE, and VMXON with a revision-stamped region.

pub mod caps;
pub mod ept;
pub mod vmcs;

use alloc::format;
use alloc::string::String;

use crate::arch::{cpu, vmx as hw};
use crate::mm::phys::PhysPages;
use caps::VmxCaps;

/// Whether CPUID reports VMX (CPUID.1:ECX bit 5).
pub fn cpu_has_vmx() -> bool {
    cpu::cpuid(1, 0).ecx & (1 << 5) != 0
}

/// VMX root operation on this CPU; holds the VMXON region.
pub struct Vmx {
    /// What the CPU offers.
    pub caps: VmxCaps,
    _vmxon: PhysPages,
}

/// Enters VMX root operation. The error says what is missing, for the console.
pub fn enable() -> Result<Vmx, String> {
    if !cpu_has_vmx() {
        let v = crate::platform::cpu_vendor();
        return Err(format!(
            "this CPU ({}) does not report VMX in CPUID",
            core::str::from_utf8(&v).unwrap_or("?")
        ));
    }
    let fc = cpu::rdmsr(caps::IA32_FEATURE_CONTROL);
    if fc & 1 != 0 && fc & (1 << 2) == 0 {
        return Err("VMX is disabled by the firmware (IA32_FEATURE_CONTROL locked without VMXON outside SMX)".into());
    }
    if fc & 1 == 0 {
        // Unlocked: enable VMXON outside SMX and lock, as firmware would.
        cpu::wrmsr(caps::IA32_FEATURE_CONTROL, fc | 1 | (1 << 2));
    }
    let caps = caps::VmxCaps::read(cpu::rdmsr);
    if !caps.ept() {
        return Err("VMX without EPT is not supported".into());
    }
    let cr0 = (cpu::read_cr0() | caps.cr0_fixed0) & caps.cr0_fixed1;
    cpu::write_cr0(cr0);
    let cr4 = (cpu::read_cr4() | caps.cr4_fixed0 | (1 << 13)) & caps.cr4_fixed1;
    cpu::write_cr4(cr4);
    let mut region = PhysPages::alloc(1).map_err(|e| format!("VMXON region: {e}"))?;
    region.as_bytes_mut()[0..4].copy_from_slice(&caps.revision().to_le_bytes());
    hw::vmxon(region.base()).map_err(|e| format!("VMXON failed: {e}"))?;
    Ok(Vmx {
        caps,
        _vmxon: region,
    })
}
