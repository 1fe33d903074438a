//! `counter`: prints `counter <seq> t=<ms>ms` every `period=<ms>` milliseconds (default
//! 300), forever, with `seq` counting 0, 1, 2, ... and reports it as Progress.
//!
//! It is the live-migration demo: `seq` and the deadline live on the stack / in
//! registers, which migrate with the guest, so on the destination the sequence goes on
//! without a gap or a repeat, and the clock (which the hypervisor carries over) without
//! a jump. After each line it asks for its migration count and says when it changed, and
//! likewise when it was restored from a checkpoint.
//!
//! `move-every=<n> a=<ip> b=<ip>`: every `n` lines it asks the hypervisor to move it
//! (the `Move` hypercall; the operator must `allow-move` it), to `b` after an even
//! number of migrations and to `a` after an odd one, so it travels back and forth on
//! its own, and prints the outcome when it runs again.
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
    let mut restores = rt::info().restores;
    let every = args.u64_or("move-every", 0);
    let peers = [
        args.get("a").and_then(parse_ip),
        args.get("b").and_then(parse_ip),
    ];
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
        let r = rt::info().restores;
        if r != restores {
            restores = r;
            println!("counter: restored from a checkpoint (restore {r})");
        }
        if every > 0 && seq > 0 && seq.is_multiple_of(every) {
            // Where to go next: b from the first host, a back from there.
            if let Some(ip) = peers[if migrations.is_multiple_of(2) { 1 } else { 0 }] {
                let [x, y, z, w] = ip.to_be_bytes();
                println!("counter: asking to move to {x}.{y}.{z}.{w}");
                match rt::move_to(ip, 0) {
                    Ok(_) if rt::info().migrations != migrations => {
                        migrations = rt::info().migrations;
                        println!("counter: moved myself (now {migrations} migrations)");
                    }
                    Ok(_) => println!("counter: move done, still here"),
                    Err(e) => println!("counter: move refused or failed: {e}"),
                }
            }
        }
        // Absolute deadlines, so the period does not drift; after a stall (paused,
        // migrating, starved) resume from now instead of printing a burst.
        deadline = (deadline + period).max(rt::time_ns());
        rt::sleep_until(deadline);
    }
}

/// Parses `a.b.c.d` into `a << 24 | b << 16 | c << 8 | d`.
fn parse_ip(s: &str) -> Option<u32> {
    let mut ip = 0u32;
    let mut n = 0;
    for part in s.split('.') {
        ip = ip << 8 | part.parse::<u8>().ok()? as u32;
        n += 1;
    }
    (n == 4).then_some(ip)
}
