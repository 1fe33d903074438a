//! Intel VMX: capability decoding ([`caps`]).
pub mod caps;

use crate::arch::cpu;

/// Whether CPUID reports VMX (CPUID.1:ECX bit 5).
pub fn cpu_has_vmx() -> bool {
    cpu::cpuid(1, 0).ecx & (1 << 5) != 0
}

/// Reads the capability MSRs (only call when [`cpu_has_vmx`]).
pub fn read_caps() -> caps::VmxCaps {
    caps::VmxCaps::read(cpu::rdmsr)
}
