//! `verify`: keeps rewriting all of its free memory under an invariant it can check, so
//! that a page lost by live migration (its newest version never reached the
//! destination) shows up as a failure.
//!
//! Arguments: `rate=<pages per second>` (default 2000; `0` = as fast as it can) and
//! `check=<seconds>` (default 5; `0` = only when asked). The region is a header, a
//! ledger of per-page generations and data pages whose every word is a function of
//! (page, generation, word) — see `rt::pattern`. It updates the data pages in a sweep,
//! one page per update, and counts its updates in a local variable (which travels with
//! the vCPU state, not through guest memory). Every `check` seconds, and when the
//! operator asks (`check <id>`), it verifies every page against the ledger, the ledger
//! against the header and the header against its own count, prints
//! `verify: PASS <pages> pages checked` or `verify: FAIL ...` and reports Verify
//! (1 = pass, 0 = fail; detail = pages checked).
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime.
#![no_std]
#![no_main]

use rt::guest_abi::{ReportKind, Request};
use rt::pace::Pacer;
use rt::pattern::{self, Failure, Layout};
use rt::println;

rt::entry!(main);

/// Page updates between clock and request checks when unpaced.
const UNPACED_BATCH: u64 = 32;
const SECOND: u64 = 1_000_000_000;

fn main(args: &rt::Args) -> i32 {
    let rate = args.u64_or("rate", 2000);
    let check_s = args.u64_or("check", 5);
    let Some(region) = rt::mem::free_region() else {
        println!("verify: no free memory region");
        return 1;
    };
    let layout = pattern::init(region);
    if layout.data_pages == 0 {
        println!(
            "verify: not enough free memory ({} bytes)",
            region.len() * 8
        );
        return 1;
    }
    println!(
        "verify: {} data pages + {} ledger pages at {:#x}, rate {}, checks {}",
        layout.data_pages,
        layout.ledger_pages,
        rt::mem::free_base(),
        Every(rate, "", " pages/s", "unpaced"),
        Every(check_s, "every ", " s", "on request only"),
    );

    let mut updates: u64 = 0; // the guest's own count, compared with the header's
    let mut next = 0usize;
    let start = rt::time_ns();
    let mut pacer = Pacer::new(rate, start, UNPACED_BATCH);
    let check_ns = check_s.saturating_mul(SECOND);
    let mut next_check = start.saturating_add(check_ns);
    loop {
        let now = rt::time_ns();
        for _ in 0..pacer.take(now) {
            pattern::update(region, &layout, next);
            updates += 1;
            next += 1;
            if next == layout.data_pages {
                next = 0;
            }
        }
        let asked = rt::take_request() == Request::Verify;
        if asked || (check_ns != 0 && now >= next_check) {
            check(region, &layout, updates);
            next_check = rt::time_ns().saturating_add(check_ns);
        }
        if let Some(t) = pacer.next_wake(now) {
            rt::sleep_until(t);
        }
    }
}

/// Checks the region, prints the verdict and reports it.
fn check(region: &mut [u64], layout: &Layout, updates: u64) {
    // Read what memory holds now, not what the compiler remembers writing.
    let region = core::hint::black_box(region);
    match pattern::check(region, layout, updates) {
        Ok(n) => {
            println!("verify: PASS {n} pages checked ({updates} updates)");
            rt::report(ReportKind::Verify, 1, n as u64);
        }
        Err((f, examined)) => {
            match f {
                Failure::Header { magic, data_pages } => {
                    println!("verify: FAIL header lost (magic {magic:#x}, {data_pages} pages)")
                }
                Failure::Page {
                    page,
                    word,
                    ledger,
                    found: Some((p, g)),
                } if p == page && g < ledger => println!(
                    "verify: FAIL page {page} is stale: word {word} holds generation {g}, \
                     the ledger says {ledger}"
                ),
                Failure::Page {
                    page,
                    word,
                    ledger,
                    found,
                } => match found {
                    Some((p, g)) => println!(
                        "verify: FAIL page {page} word {word} holds page {p} generation {g}, \
                         the ledger says generation {ledger}"
                    ),
                    None => println!(
                        "verify: FAIL page {page} word {word} holds foreign data, \
                         the ledger says generation {ledger}"
                    ),
                },
                Failure::LedgerSum { ledger, header } => println!(
                    "verify: FAIL ledger is stale: its generations sum to {ledger}, \
                     the header says {header}"
                ),
                Failure::Total { header, updates } => println!(
                    "verify: FAIL header is stale: total {header}, but {updates} updates were made"
                ),
            }
            rt::report(ReportKind::Verify, 0, examined as u64);
        }
    }
}

/// Displays a numeric argument as `<prefix><n><unit>`, or the text for 0.
struct Every(u64, &'static str, &'static str, &'static str);

impl core::fmt::Display for Every {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Every(0, _, _, zero) => f.write_str(zero),
            Every(n, prefix, unit, _) => write!(f, "{prefix}{n}{unit}"),
        }
    }
}
