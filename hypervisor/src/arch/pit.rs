//! TSC calibration against the 8254 PIT (1.193182 MHz), channel 2 gated through port
//! 0x61. Both Bochs and QEMU emulate it; on Bochs with `clock: sync=none` the result is
//! the emulated TSC rate (instructions per emulated second), which is what every duration
//! the hypervisor reports is measured in.

use super::cpu::rdtsc;
use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;

/// Measures TSC ticks per second over a `ms`-millisecond PIT interval (at most 50).
/// Returns `None` if the PIT never signals (then the caller falls back to CPUID).
pub fn calibrate_tsc(ms: u64) -> Option<u64> {
    let count = PIT_HZ * ms / 1000;
    // Gate channel 2 low while programming, speaker off.
    let ctl = inb(0x61) & !0x03;
    outb(0x61, ctl);
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
    outb(0x42, (count & 0xFF) as u8);
    outb(0x42, (count >> 8) as u8);
    let start = rdtsc();
    outb(0x61, ctl | 0x01); // gate high: counting starts
    let mut spins: u64 = 0;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            return None;
        }
    }
    let end = rdtsc();
    outb(0x61, ctl);
    Some((end - start) * 1000 / ms)
}
