//! `verify`: keeps rewriting every page of its free memory (at `rate` pages per second,
//! default 2000; 0 = as fast as it can) under an invariant it can check (see
//! `rt::pattern`). It checks every `check` seconds (default 5) and when the operator asks
//! (`check <id>`), prints PASS or FAIL and reports the result to the hypervisor. A page
//! lost by a migration shows up as FAIL.
#![no_std]
#![no_main]

use rt::guest_abi::{ReportKind, Request};
use rt::pattern::{self, Failure};
use rt::println;

rt::entry!(main);

fn main(env: &rt::Env) -> i32 {
    let Some(mem) = rt::free_memory(env) else {
        return 1;
    };
    let layout = pattern::init(mem);
    if layout.data_pages == 0 {
        println!("verify: not enough memory");
        return 1;
    }
    let rate = env.args.u64("rate", 2000);
    let check_every = env.args.u64("check", 5).max(1) * 1_000_000_000;
    println!(
        "verify: {} data pages, rate {rate} pages/s",
        layout.data_pages
    );
    let mut next = 0usize;
    let mut last_check = rt::time_ns();
    const BATCH_NS: u64 = 10_000_000;
    let mut deadline = last_check;
    loop {
        let batch = if rate == 0 {
            32
        } else {
            (rate * BATCH_NS / 1_000_000_000).max(1)
        };
        for _ in 0..batch {
            pattern::update(mem, &layout, next);
            next = (next + 1) % layout.data_pages;
        }
        let now = rt::time_ns();
        if rt::take_request() == Request::Verify || now - last_check >= check_every {
            last_check = now;
            match pattern::check(mem, &layout) {
                Ok(n) => {
                    println!("verify: PASS {n} pages checked");
                    rt::report(ReportKind::Verify, 1, n as u64);
                }
                Err(f) => {
                    match f {
                        Failure::Header => println!("verify: FAIL header damaged"),
                        Failure::Page { page, word } => {
                            println!("verify: FAIL page {page} word {word} is stale")
                        }
                        Failure::Total { ledger, header } => {
                            println!("verify: FAIL ledger sum {ledger} != header {header}")
                        }
                    }
                    rt::report(ReportKind::Verify, 0, 0);
                }
            }
        }
        if rate == 0 {
            rt::yield_now();
        } else {
            deadline += BATCH_NS;
            rt::sleep_until(deadline);
        }
    }
}
