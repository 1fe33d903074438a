//! `cargo xtask demo`: the main job. Boots a linked pair, starts the `counter` guest on
//! A, migrates it live to B, shows the counter continuing on B without a gap in its
//! sequence, and prints the migration's figures. `demo --net`: the `echo` guest moves
//! A -> B -> A while a host client streams through one TCP connection to it.

use std::time::Duration;

use hv_tools::console::Console;
use hv_tools::echo::{EchoClient, EchoConfig, EchoSession};
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

/// `cargo xtask demo --net`.
pub fn run_net(opts: &BootOpts) -> Result<(), String> {
    let mut opts = opts.clone();
    opts.pair = true;
    let mut lab = run::boot_with(&opts, "demo-net", 1)?;
    let client_port = lab.hub_base + 4;
    let (a, b) = lab.instances.split_at_mut(1);
    let (a, b) = (&mut a[0].console, &mut b[0].console);
    let step = |what: &str| println!("\n==> {what}");
    let wait = Duration::from_secs(240);

    step("A: start the echo guest at 10.0.0.10 (TCP and UDP echo on port 7)");
    let id = session::start(a, "echo ip=10.0.0.10/24")?;
    let line = a.wait_for(&format!("[g{id}] echo: "), Duration::from_secs(120))?;
    println!("A| {}", line.lines().last().unwrap_or_default());
    a.wait_for("\n", Duration::from_secs(10))?;

    step("host: connect to 10.0.0.10:7 through the lab's hub and stream 8 KiB/s");
    let client = connect_echo(client_port)?;
    let cfg = EchoConfig {
        rate: 8 * 1024,
        give_up: Duration::from_secs(120),
        ..EchoConfig::default()
    };
    let run = EchoSession::start(client, cfg).map_err(|e| e.to_string())?;
    if !run.wait_echoed(16 * 1024, Duration::from_secs(60)) {
        return Err("the echo guest does not answer".into());
    }
    println!("host| {} bytes echoed so far", run.echoed());

    let mut downtimes = Vec::new();
    let mut cur = (id, true);
    for (to, ip) in [("B", "10.0.0.2"), ("A", "10.0.0.1")] {
        step(&format!(
            "live-migrate the echo guest to {to} ({ip}) under load"
        ));
        let (src, dst) = if cur.1 {
            (&mut *a, &mut *b)
        } else {
            (&mut *b, &mut *a)
        };
        let m = session::migrate(src, dst, cur.0, ip, "", wait)?;
        let before = run.echoed();
        if !run.wait_echoed(before + 16 * 1024, Duration::from_secs(90)) {
            return Err(format!("no echo after the migration to {to}"));
        }
        println!(
            "{to}| guest {} arrived; downtime {} us; host| {} bytes echoed so far",
            m.new_id,
            m.stats.downtime_us,
            run.echoed()
        );
        downtimes.push(m.stats.downtime_us);
        cur = (m.new_id, !cur.1);
    }
    let report = run
        .stop()
        .map_err(|f| format!("the echo run failed: {} ({})", f.error, f.report))?;
    step("Result");
    println!("{report}");
    println!(
        "one TCP connection, {} bytes echoed in order, {} resets; longest stall the client saw {:.0} ms, hypervisor downtimes {} us",
        report.bytes_echoed,
        report.resets,
        report.longest_stall_ms,
        downtimes
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    for c in [&mut *a, &mut *b] {
        let _ = c.send_line("shutdown");
    }
    if report.resets != 0 {
        return Err("the connection was reset".into());
    }
    Ok(())
}

/// A host client on hub port `port` (10.0.0.90), connected to the echo guest at
/// 10.0.0.10:7 (as the demo and `bench --net` start it).
pub fn connect_echo(port: u16) -> Result<EchoClient, String> {
    let mut client = EchoClient::new(port, [0x52, 0x54, 0, 0x12, 0x34, 0x90], [10, 0, 0, 90])
        .map_err(|e| e.to_string())?;
    client
        .connect([10, 0, 0, 10], 7, Duration::from_secs(60))
        .map_err(|e| format!("connect to the echo guest: {e}"))?;
    Ok(client)
}
