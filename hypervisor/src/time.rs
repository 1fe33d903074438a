//! Time from the TSC, calibrated at boot. Every duration the hypervisor reports is in
//! microseconds of this clock (under Bochs: emulated time, see EMULATORS.md).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;

static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);

/// Sets the TSC frequency found by calibration.
pub fn set_tsc_hz(hz: u64) {
    TSC_HZ.store(hz.max(1_000_000), Ordering::Relaxed);
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz())) as u64
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz())) as u64
}

/// Converts nanoseconds to TSC ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(tsc_hz()) / 1_000_000_000) as u64
}

/// Now, in TSC ticks.
pub fn now() -> u64 {
    rdtsc()
}

/// Now, in nanoseconds since boot.
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}

/// Now, in microseconds since boot.
pub fn now_us() -> u64 {
    ticks_to_us(rdtsc())
}

/// Milliseconds since boot (for smoltcp's clock).
pub fn now_ms() -> i64 {
    (ticks_to_us(rdtsc()) / 1000) as i64
}
