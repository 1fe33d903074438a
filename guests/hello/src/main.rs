//! `hello`: the smallest PV guest. It prints who and where it is, measures what a
//! hypercall round trip costs as the guest sees it (`rounds=` Time calls, default 1000;
//! `rounds=0` skips it) and exits with code 0.
//!
//! `no_std`/`no_main`: there is no OS underneath, only the hypervisor's hypercalls; the
//! runtime (`rt`) provides the entry point and the console.
#![no_std]
#![no_main]

use rt::println;

rt::entry!(main);

fn main(args: &rt::Args) -> i32 {
    let gi = rt::info();
    println!(
        "hello from guest {} (abi v{}, {} MiB, migrations {})",
        gi.guest_id,
        gi.abi_version,
        gi.mem_bytes >> 20,
        gi.migrations
    );
    let rounds = args.u64_or("rounds", 1000);
    if rounds > 0 {
        // Each Time call is a full VMCALL exit, handler and VM entry.
        let t0 = rt::time_ns();
        let c0 = rdtsc();
        for _ in 0..rounds {
            rt::time_ns();
        }
        let cycles = (rdtsc() - c0) / rounds;
        let per_call = (rt::time_ns() - t0) / rounds;
        println!("hello: hypercall round trip {per_call} ns, {cycles} TSC cycles (mean of {rounds} Time calls)");
    }
    0
}

/// The guest-visible TSC (RDTSC does not exit: it shows what a round trip costs in the
/// guest's own cycles).
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}
