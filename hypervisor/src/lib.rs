//! The hypervisor kernel.
//!
//! Built two ways: for `x86_64-unknown-none` it is the bare-metal kernel that GRUB boots
//! (entry in `main.rs`, boot stage in the `boot` crate); for the host, the same library
//! compiles with `std` so that `cargo test` exercises its hardware-free logic (parsers,
//! allocators, EPT construction, the migration stream, ring bookkeeping).
//!
//! `unsafe` is confined to the hardware modules under [`arch`] (instructions, ports,
//! MSRs, descriptor tables, the VM-entry stub) and [`mm::phys`] (turning physical
//! addresses into references); everything else is safe Rust.
#![cfg_attr(target_os = "none", no_std)]

extern crate alloc;

pub mod arch;
#[macro_use]
pub mod console;
pub mod kernel;
pub mod logger;
pub mod migration;
pub mod mm;
pub mod multiboot;
pub mod net;
pub mod platform;
pub mod rng;
pub mod svm;
pub mod time;
pub mod vm;
pub mod vmm;
pub mod vmx;

/// The panic handler's body: a panic is a hypervisor bug. Print it and halt.
pub fn panic_report(info: &core::panic::PanicInfo<'_>) -> ! {
    arch::serial::force_unlock();
    println!("\n!!! HYPERVISOR PANIC: {info}");
    println!("this CPU is halted; the hypervisor has a bug (please report the line above)");
    arch::cpu::halt_forever()
}
