//! CPU instructions: CPUID, MSRs, control registers, TSC, HLT.

use core::arch::x86_64::{__cpuid_count, _rdtsc, CpuidResult};

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // SAFETY: CPUID is available on every x86-64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        __cpuid_count(leaf, subleaf)
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged here (CR4.TSD clear) and has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        _rdtsc()
    }
}

/// Reads a model-specific register. Callers only name MSRs whose presence they checked
/// (architectural ones, or VMX ones after CPUID says VMX exists): a missing MSR faults.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: RDMSR reads without side effects for the MSRs this kernel uses.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// Writes a model-specific register. Only the VMX and EFER-related MSRs are written, by
/// code that checked the value against the capability MSRs.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the callers (vmx bring-up, guest MSR switching) write values that keep the
    // hypervisor's own execution state unchanged.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}

/// Current CR0.
pub fn read_cr0() -> u64 {
    x86_64::registers::control::Cr0::read_raw()
}

/// Sets CR0 (used only to apply the VMX fixed bits, which keep paging and protection on).
pub fn write_cr0(value: u64) {
    // SAFETY: callers only set bits required by IA32_VMX_CR0_FIXED0 (PE, PG, NE), which are
    // already set in long mode, so the memory model does not change.
    unsafe { x86_64::registers::control::Cr0::write_raw(value) }
}

/// CR0.NW and CR0.CD: caching off when set (the reset state, SDM 11.5.3).
const CR0_CACHE_OFF: u64 = (1 << 29) | (1 << 30);
/// IA32_PAT and its power-on value (WB, WT, UC-, UC in both halves, SDM 11.12.4).
const IA32_PAT: u32 = 0x277;
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// Turns the caches on (CR0.CD = NW = 0) with the architectural PAT, as firmware and
/// boot loaders may leave them off. MTRRs stay as the firmware set them (write-back
/// RAM, uncached MMIO). Returns whether caching had been off.
pub fn enable_caches() -> bool {
    let cr0 = read_cr0();
    wrmsr(IA32_PAT, PAT_DEFAULT);
    if cr0 & CR0_CACHE_OFF == 0 {
        return false;
    }
    // SAFETY: clearing CD/NW changes only the cache mode, not addressing; WBINVD first
    // writes back anything cached under the old mode (SDM 11.5.3, "enabling the cache").
    unsafe {
        core::arch::asm!("wbinvd", options(nostack));
        x86_64::registers::control::Cr0::write_raw(cr0 & !CR0_CACHE_OFF);
    }
    true
}

/// Whether caching is on (CR0.CD and NW clear), for `info`.
pub fn caches_enabled() -> bool {
    read_cr0() & CR0_CACHE_OFF == 0
}

/// Current CR3 (physical address of the PML4 plus flags).
pub fn read_cr3() -> u64 {
    let (frame, flags) = x86_64::registers::control::Cr3::read_raw();
    frame.start_address().as_u64() | u64::from(flags)
}

/// Current CR4.
pub fn read_cr4() -> u64 {
    x86_64::registers::control::Cr4::read_raw()
}

/// Sets CR4 (used only to set CR4.VMXE and the VMX fixed bits).
pub fn write_cr4(value: u64) {
    // SAFETY: callers only add VMXE and bits required by IA32_VMX_CR4_FIXED0; neither
    // changes how memory is addressed.
    unsafe { x86_64::registers::control::Cr4::write_raw(value) }
}

/// Current CR2 (faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Disables maskable interrupts. The hypervisor runs with interrupts off and polls.
pub fn disable_interrupts() {
    x86_64::instructions::interrupts::disable();
}

/// Halts this CPU forever (after a fatal error).
pub fn halt_forever() -> ! {
    loop {
        disable_interrupts();
        x86_64::instructions::hlt();
    }
}

/// A hint for spin loops.
pub fn pause() {
    core::hint::spin_loop();
}

/// Whether the CPU has RDRAND (CPUID.1:ECX bit 30).
pub fn has_rdrand() -> bool {
    cpuid(1, 0).ecx & (1 << 30) != 0
}

/// Whether the CPU has RDSEED (CPUID.(7,0):EBX bit 18).
pub fn has_rdseed() -> bool {
    cpuid(0, 0).eax >= 7 && cpuid(7, 0).ebx & (1 << 18) != 0
}

/// One RDSEED; `None` when the entropy source had nothing ready (CF = 0). Only call
/// after [`has_rdseed`].
pub fn rdseed64() -> Option<u64> {
    let v: u64;
    let ok: u8;
    // SAFETY: RDSEED only writes the named register and the flags; callers checked CPUID.
    unsafe {
        core::arch::asm!("rdseed {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
            options(nomem, nostack));
    }
    (ok != 0).then_some(v)
}

/// One RDRAND; `None` when the DRBG had nothing ready (CF = 0). Only call after
/// [`has_rdrand`].
pub fn rdrand64() -> Option<u64> {
    let v: u64;
    let ok: u8;
    // SAFETY: RDRAND only writes the named register and the flags; callers checked CPUID.
    unsafe {
        core::arch::asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
            options(nomem, nostack));
    }
    (ok != 0).then_some(v)
}
