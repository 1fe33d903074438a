//! Port I/O (`in`/`out`), used for the UART, the PIT, PCI configuration space and the
//! emulators' exit ports.
//!
//! Port accesses cannot violate Rust's memory safety by themselves; the devices behind
//! the ports used in this kernel (UART, PIT, PCI config, debug exit) do no DMA on a port
//! write, so the wrappers are safe functions.

use x86_64::instructions::port::Port;

/// Reads a byte from `port`.
pub fn inb(port: u16) -> u8 {
    // SAFETY: see the module documentation: port reads have no memory effects here.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: see the module documentation.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Reads a word from `port`.
pub fn inw(port: u16) -> u16 {
    // SAFETY: see the module documentation.
    unsafe { Port::<u16>::new(port).read() }
}

/// Writes a word to `port`.
pub fn outw(port: u16, value: u16) {
    // SAFETY: see the module documentation.
    unsafe { Port::<u16>::new(port).write(value) }
}

/// Reads a double word from `port`.
pub fn inl(port: u16) -> u32 {
    // SAFETY: see the module documentation.
    unsafe { Port::<u32>::new(port).read() }
}

/// Writes a double word to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: see the module documentation. PCI config writes through 0xCFC can move a
    // BAR; the PCI code only writes the command register and never relocates BARs.
    unsafe { Port::<u32>::new(port).write(value) }
}
