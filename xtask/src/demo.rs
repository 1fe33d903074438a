//! `cargo xtask demo`: the main job. Boots a linked pair, starts the `counter` guest on
//! A, migrates it live to B, shows the counter continuing on B without a gap in its
//! sequence, and prints the migration's figures.

use std::time::Duration;

use hv_tools::console::Console;
use hv_tools::session;

use crate::{run, BootOpts};

fn show(name: &str, c: &Console, from: usize) -> usize {
    let log = c.log();
    for line in log[from.min(log.len())..].lines() {
        if !line.trim().is_empty() {
            println!("{name}| {line}");
        }
    }
    log.len()
}

/// `cargo xtask demo [--emulator ...] [--ips N]`.
pub fn run(opts: &BootOpts) -> Result<(), String> {
    let mut opts = opts.clone();
    opts.pair = true;
    let mut lab = run::boot(&opts, "demo")?;
    let (a, b) = lab.instances.split_at_mut(1);
    let (a, b) = (&mut a[0].console, &mut b[0].console);
    let mut seen_a = show("A", a, 0);
    let mut seen_b = show("B", b, 0);
    let step = |what: &str| println!("\n==> {what}");

    step("A: start the counter guest (prints a sequence number every 200 ms)");
    let id = session::start(a, "counter period=200")?;
    a.wait_for(&format!("[g{id}] counter 5 "), Duration::from_secs(120))?;
    seen_a = show("A", a, seen_a);

    step(&format!(
        "A: live-migrate guest {id} to B (10.0.0.2) while it runs"
    ));
    let m = session::migrate(a, b, id, "10.0.0.2", "", Duration::from_secs(600))?;
    seen_a = show("A", a, seen_a);
    // Let a few lines arrive on B.
    for _ in 0..4 {
        b.wait_for(
            &format!("[g{}] counter ", m.new_id),
            Duration::from_secs(60),
        )?;
    }
    b.wait_for("\n", Duration::from_secs(10))?;
    seen_b = show("B", b, seen_b);
    let _ = (seen_a, seen_b);

    let on_a = session::counter_values(&a.log(), id);
    let on_b = session::counter_values(&b.log(), m.new_id);
    let (Some(&last_a), Some(&first_b)) = (on_a.last(), on_b.first()) else {
        return Err("no counter output to compare".into());
    };
    step("Result");
    println!(
        "last counter value on A: {last_a}, first on B: {first_b}: {}",
        if first_b == last_a + 1 {
            "no gap"
        } else {
            "GAP"
        }
    );
    let s = &m.stats;
    println!(
        "total {} us, downtime {} us, {} pre-copy rounds, {} bytes on the wire, {} zero pages elided, dirty tracking {}",
        s.total_us, s.downtime_us, s.rounds, s.bytes, s.zero_pages, s.method
    );
    // Figures a newer hypervisor reports that this xtask has no field for.
    if !s.extra.is_empty() {
        let more: Vec<String> = s.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("also: {}", more.join(" "));
    }
    println!("(times are the hypervisors' TSC clocks; under Bochs, emulated time: see README)");
    for c in [&mut *a, &mut *b] {
        let _ = c.send_line("shutdown");
    }
    if first_b != last_a + 1 {
        return Err(format!("the counter skipped from {last_a} to {first_b}"));
    }
    Ok(())
}
