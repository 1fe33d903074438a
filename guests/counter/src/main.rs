//! `counter`: prints `counter <seq> t=<ms>ms` every `period=<ms>` milliseconds (default
//! 300), forever, with `seq` counting 0, 1, 2, ... and reports it as Progress.
//!
//! It is the live-migration demo: `seq` and the deadline live on the stack / in
//! registers, which migrate with the guest, so on the destination the sequence goes on
//! without a gap or a repeat, and the clock (which the hypervisor carries over) without
//! a jump. After each line it asks for its migration count and says when it changed.
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime.
#![no_std]
#![no_main]

use rt::guest_abi::ReportKind;
use rt::println;

rt::entry!(main);

fn main(args: &rt::Args) -> i32 {
    let period = args.u64_or("period", 300).max(1) * 1_000_000;
    let mut migrations = rt::info().migrations;
    let mut deadline = rt::time_ns();
    let mut seq: u64 = 0;
    loop {
        let now = rt::time_ns();
        println!("counter {seq} t={}ms", now / 1_000_000);
        rt::report(ReportKind::Progress, seq, 0);
        seq += 1;
        let m = rt::info().migrations;
        if m != migrations {
            migrations = m;
            println!("counter: migrated (now {m} migrations)");
        }
        // Absolute deadlines, so the period does not drift; after a stall (paused,
        // migrating, starved) resume from now instead of printing a burst.
        deadline = (deadline + period).max(rt::time_ns());
        rt::sleep_until(deadline);
    }
}
