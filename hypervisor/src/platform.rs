//! Platform discovery: ACPI (MADT through the `acpi` crate), emulator identification and
//! power-off.

use alloc::vec::Vec;
use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::arch::{cpu, port};

/// Identity-mapped ACPI access: the tables live below 4 GiB in firmware-reserved memory.
#[derive(Clone, Copy, Debug)]
struct IdentityMapped;

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // SAFETY: the boot stage identity-maps the first 4 GiB; ACPI tables are there and
        // the acpi crate only reads them.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(physical_address as *mut T).expect("ACPI table at address 0"),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the MADT says about the processors.
#[derive(Clone, Debug, Default)]
pub struct CpuTopology {
    /// APIC ids of enabled processors.
    pub apic_ids: Vec<u8>,
    /// Local APIC physical address.
    pub lapic_addr: u32,
    /// Number of I/O APICs.
    pub io_apics: usize,
}

/// Reads the MADT. `rsdp` is the physical address of an RSDP (from Multiboot2), else
/// the BIOS area is searched.
pub fn read_madt(rsdp: Option<u64>) -> Result<CpuTopology, acpi::AcpiError> {
    // SAFETY: the address is a Multiboot2 copy of the RSDP or none; the acpi crate
    // validates signatures and checksums before trusting anything.
    let tables = unsafe {
        match rsdp {
            Some(a) => AcpiTables::from_rsdp(IdentityMapped, a as usize)?,
            None => AcpiTables::search_for_rsdp_bios(IdentityMapped)?,
        }
    };
    let madt = tables.find_table::<Madt>()?;
    let mut topo = CpuTopology {
        lapic_addr: madt.get().local_apic_address,
        ..Default::default()
    };
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(l) => {
                let flags = l.flags;
                if flags & 1 != 0 {
                    topo.apic_ids.push(l.apic_id);
                }
            }
            MadtEntry::IoApic(_) => topo.io_apics += 1,
            _ => {}
        }
    }
    Ok(topo)
}

/// Which machine we run on, as far as it tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// QEMU with KVM.
    QemuKvm,
    /// QEMU without KVM.
    QemuTcg,
    /// No hypervisor bit (Bochs or hardware).
    BareOrBochs,
    /// Some other hypervisor.
    Other,
}

impl Machine {
    /// Reads the CPUID hypervisor leaves.
    pub fn detect() -> Self {
        if cpu::cpuid(1, 0).ecx & (1 << 31) == 0 {
            return Self::BareOrBochs;
        }
        let r = cpu::cpuid(0x4000_0000, 0);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
        match &sig {
            b"KVMKVMKVM\0\0\0" => Self::QemuKvm,
            b"TCGTCGTCGTCG" => Self::QemuTcg,
            _ => Self::Other,
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::QemuKvm => "QEMU/KVM",
            Self::QemuTcg => "QEMU/TCG",
            Self::BareOrBochs => "Bochs or bare metal",
            Self::Other => "unknown hypervisor",
        }
    }
}

/// The CPU vendor and brand strings.
pub fn cpu_vendor() -> [u8; 12] {
    let r = cpu::cpuid(0, 0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// Powers off: Bochs' shutdown port, then QEMU's isa-debug-exit (exit status 33 = 0x10
/// shifted and or-ed with 1, the "clean shutdown" value xtask expects), then halt.
pub fn shutdown() -> ! {
    crate::arch::serial::flush_blocking();
    for &b in b"Shutdown" {
        port::outb(0x8900, b);
    }
    port::outl(0x501, 0x10);
    cpu::halt_forever()
}
