//! `dirtier`: writes pages of a working set of `pages` pages (default 256) at `rate`
//! pages per second (default 1000; 0 = as fast as it can), round robin, and reports
//! how many it wrote. Word 0 of each page counts the writes to it, so the sum over the
//! working set must equal the total: asked to verify, it checks exactly that.
#![no_std]
#![no_main]

use rt::guest_abi::{ReportKind, Request};
use rt::println;

rt::entry!(main);

const WORDS: usize = 512;

fn main(env: &rt::Env) -> i32 {
    let Some(mem) = rt::free_memory(env) else {
        return 1;
    };
    let avail = mem.len() / WORDS;
    let ws = (env.args.u64("pages", 256) as usize).clamp(1, avail.max(1));
    if avail == 0 {
        println!("dirtier: no free memory");
        return 1;
    }
    let rate = env.args.u64("rate", 1000);
    println!("dirtier: working set {ws} pages, rate {rate} pages/s");
    let mut total: u64 = 0;
    let mut next = 0usize;
    let start = rt::time_ns();
    let mut last_print = start;
    const BATCH_NS: u64 = 10_000_000;
    let mut batch_deadline = start;
    loop {
        let batch = if rate == 0 {
            64
        } else {
            (rate * BATCH_NS / 1_000_000_000).max(1)
        };
        for _ in 0..batch {
            let page = &mut mem[next * WORDS..(next + 1) * WORDS];
            page[0] += 1;
            page[1 + (total as usize % (WORDS - 1))] = total;
            total += 1;
            next = (next + 1) % ws;
        }
        let now = rt::time_ns();
        if now - last_print >= 1_000_000_000 {
            last_print = now;
            println!("dirtier: wrote {total} pages ({ws} working set)");
            rt::report(ReportKind::Dirtied, total, ws as u64);
        }
        if rt::take_request() == Request::Verify {
            let sum: u64 = (0..ws).map(|p| mem[p * WORDS]).sum();
            let ok = sum == total;
            println!(
                "dirtier: verify: {} (sum {sum}, wrote {total})",
                if ok { "PASS" } else { "FAIL" }
            );
            rt::report(ReportKind::Verify, u64::from(ok), ws as u64);
        }
        // rate=0 is a CPU hog on purpose: only the preemption timer takes the CPU away.
        if rate != 0 {
            batch_deadline += BATCH_NS * batch / (rate * BATCH_NS / 1_000_000_000).max(1);
            rt::sleep_until(batch_deadline);
        }
    }
}
