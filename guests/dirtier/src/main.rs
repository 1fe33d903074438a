//! `dirtier`: dirties memory at a known rate, to load live migration's pre-copy.
//!
//! Arguments: `pages=W` (working set, default 256 pages of its free memory), `fill=1` (write
//! junk into the rest of free memory), `hint=1` (report the rest as free, so a migration
//! can skip it), `work=N` (N rounds of arithmetic before each write, so that with `rate=0`
//! its dirty rate is set by the CPU it gets) and `rate=R`
//! (page writes per second, default 1000; `0` = as fast as it can, a CPU hog that only
//! the hypervisor's preemption timer takes the CPU from). Write `k` stores the counter
//! `k + 1` into word 0 of page `k % W` (round robin), paced on absolute time in batches
//! every 10 ms. Every second it prints `dirtier: wrote <total> pages (<W> working set) at
//! <ms> ms` (its own clock since it started)
//! and reports Dirtied. Asked to verify (`check <id>`), it checks that every page holds
//! its last write (`rt::pattern::dirtier_check`) and reports the result.
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime.
#![no_std]
#![no_main]

use rt::guest_abi::{ReportKind, Request};
use rt::mem::WORDS_PER_PAGE;
use rt::pace::Pacer;
use rt::{pattern, println};

rt::entry!(main);

/// Page writes between clock and request checks when unpaced.
const UNPACED_BATCH: u64 = 1024;
const SECOND: u64 = 1_000_000_000;

fn main(args: &rt::Args) -> i32 {
    let want = args.u64_or("pages", 256);
    let rate = args.u64_or("rate", 1000);
    let work = args.u64_or("work", 0);
    let Some(region) = rt::mem::free_region() else {
        println!("dirtier: no free memory region");
        return 1;
    };
    let avail = region.len() / WORDS_PER_PAGE;
    if want == 0 || avail == 0 {
        println!("dirtier: nothing to dirty ({want} pages asked, {avail} free)");
        return 1;
    }
    let w = (want as usize).min(avail);
    if w < want as usize {
        println!("dirtier: only {avail} pages free, working set {w}");
    }
    let (ws, rest) = region.split_at_mut(w * WORDS_PER_PAGE);
    for p in 0..w {
        ws[p * WORDS_PER_PAGE] = 0;
    }
    // `fill=1`: the rest of free memory holds non-zero junk (as memory an allocator
    // freed would); `hint=1`: tell the hypervisor those pages are free.
    let spare = rest.len() / WORDS_PER_PAGE;
    if args.u64_or("fill", 0) != 0 {
        for p in 0..spare {
            rest[p * WORDS_PER_PAGE] = 0xF1EE_0000_0000_0000 | p as u64;
        }
        println!("dirtier: filled {spare} spare pages with junk");
    }
    if args.u64_or("hint", 0) != 0 && spare > 0 {
        let at = rt::mem::free_base() + (w * rt::mem::PAGE_SIZE) as u64;
        match rt::hint_free(at, spare as u64, true) {
            Ok(n) => println!("dirtier: hinted {n} spare pages free"),
            Err(e) => println!("dirtier: free-page hint refused: {e:?}"),
        }
    }
    println!(
        "dirtier: working set {w} pages at {:#x}, rate {}",
        rt::mem::free_base(),
        Rate(rate)
    );

    let mut total: u64 = 0; // writes so far; write `total` goes to page `next`
    let mut next = 0usize;
    let start = rt::time_ns();
    // With `work=N` a batch can take long: keep the reports (and requests) timely.
    let batch = if work > 0 { 16 } else { UNPACED_BATCH };
    let mut pacer = Pacer::new(rate, start, batch);
    let mut next_print = start + SECOND;
    loop {
        let now = rt::time_ns();
        for _ in 0..pacer.take(now) {
            // `work=N`: compute between writes, so the dirty rate is bound by the CPU
            // this guest gets (what auto-converge's throttle takes away).
            let mut x = total;
            for _ in 0..work {
                x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            core::hint::black_box(x);
            total += 1;
            ws[next * WORDS_PER_PAGE] = total;
            next += 1;
            if next == w {
                next = 0;
            }
        }
        if now >= next_print {
            println!(
                "dirtier: wrote {total} pages ({w} working set) at {} ms",
                (now - start) / 1_000_000
            );
            rt::report(ReportKind::Dirtied, total, w as u64);
            next_print = (next_print + SECOND).max(now + SECOND / 2);
        }
        if rt::take_request() == Request::Verify {
            // Read what memory holds now, not what the compiler remembers writing.
            let ws = core::hint::black_box(&mut *ws);
            match pattern::dirtier_check(ws, total) {
                Ok(n) => {
                    println!(
                        "dirtier: verify: PASS {n} pages hold their last write ({total} writes)"
                    );
                    rt::report(ReportKind::Verify, 1, n as u64);
                }
                Err((p, found, wrote)) => {
                    println!("dirtier: verify: FAIL page {p} holds write {found}, its last write was {wrote}");
                    rt::report(ReportKind::Verify, 0, w as u64);
                }
            }
        }
        if let Some(t) = pacer.next_wake(now) {
            rt::sleep_until(t);
        }
    }
}

/// Displays a rate argument.
struct Rate(u64);

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            0 => f.write_str("unpaced"),
            r => write!(f, "{r} pages/s"),
        }
    }
}
