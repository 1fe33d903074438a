//! `counter`: prints an increasing sequence number with its timestamp every `period`
//! milliseconds (default 300), forever. After a live migration the sequence continues
//! without a gap, which is what the migration tests and the demo look for.
#![no_std]
#![no_main]

use rt::guest_abi::ReportKind;
use rt::println;

rt::entry!(main);

fn main(env: &rt::Env) -> i32 {
    let period = env.args.u64("period", 300).max(1) * 1_000_000;
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
        deadline += period;
        rt::sleep_until(deadline);
    }
}
