//! `hello`: prints who and where it is, measures the cost of a hypercall round trip in
//! guest-visible TSC cycles, and exits with code 0.
#![no_std]
#![no_main]

use rt::println;

rt::entry!(main);

fn main(env: &rt::Env) -> i32 {
    let gi = rt::info();
    println!(
        "hello from guest {} (abi v{}, {} MiB, migrations {})",
        gi.guest_id,
        gi.abi_version,
        env.boot.mem_bytes >> 20,
        gi.migrations
    );
    // VMCALL round trip: exit, the Time handler, VMRESUME, as the guest sees it.
    const N: u64 = 1000;
    let t0 = rt::rdtsc();
    for _ in 0..N {
        rt::time_ns();
    }
    let cycles = (rt::rdtsc() - t0) / N;
    println!("hello: hypercall round trip {cycles} TSC cycles (mean of {N} Time calls)");
    0
}
