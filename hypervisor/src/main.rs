//! Entry of the bare-metal hypervisor binary (see `boot` for what runs before).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate boot;

/// Called by the boot stage in 64-bit mode with GRUB's EAX and EBX.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    hypervisor::kernel::kmain(magic, u64::from(info))
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    hypervisor::panic_report(info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor is a bare-metal kernel: build and boot it with `cargo xtask run`");
    std::process::exit(2);
}
