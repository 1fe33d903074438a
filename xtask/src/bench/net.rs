//! `cargo xtask bench --net`: what an application sees. The `echo` guest serves a host
//! client's steady stream (one TCP connection per migration) while it is migrated in
//! each mode; each row puts the hypervisors' downtime beside the longest stall the
//! client saw and the retransmissions it sent, and latency.svg plots the client's reply
//! latency over time around each migration.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use hv_tools::echo::{EchoConfig, EchoSession};
use hv_tools::session;
use serde::Serialize;

use crate::plot::{self, Labels, Point, Series};
use crate::{run, BootOpts};

/// The modes, in the order they run (the guest alternates sides).
const MODES: [(&str, &str); 4] = [
    ("precopy", ""),
    ("stop", "mode=stop"),
    ("postcopy", "mode=postcopy"),
    ("hybrid", "mode=hybrid"),
];
/// The client's load.
const RATE: u64 = 8 * 1024;
const CHUNK: usize = 256;

/// One migration under load.
#[derive(Clone, Debug, Serialize)]
struct Row {
    mode: String,
    repeat: u32,
    from: String,
    to: String,
    /// The hypervisors' downtime (freeze to resume, joined from both clocks).
    downtime_ms: f64,
    /// The longest gap in the echo the client saw.
    stall_ms: f64,
    /// Stall over downtime.
    stall_ratio: f64,
    /// TCP segments the client sent again.
    retransmissions: u64,
    resets: u64,
    bytes_echoed: u64,
    latency_median_ms: f64,
    latency_max_ms: f64,
    total_ms: f64,
}

/// `cargo xtask bench --net`.
pub fn run(opts: &BootOpts, dir: &Path, repeats: u32) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut lab = run::boot_with(opts, "bench-net", 1)?;
    let client_port = lab.hub_base + 4;
    let (a, b) = lab.instances.split_at_mut(1);
    let mut cons = [&mut a[0].console, &mut b[0].console];
    const NAME: [&str; 2] = ["A", "B"];
    const IP: [&str; 2] = ["10.0.0.1", "10.0.0.2"];
    let mut id = session::start(cons[0], "echo ip=10.0.0.10/24")?;
    cons[0].wait_for(&format!("[g{id}] echo: "), Duration::from_secs(120))?;
    let mut side = 0;
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for repeat in 1..=repeats {
        for (mode, opts) in MODES {
            let client =
                crate::demo::connect_echo(client_port).map_err(|e| format!("{mode}: {e}"))?;
            let cfg = EchoConfig {
                rate: RATE,
                chunk: CHUNK,
                seed: u64::from(repeat),
                give_up: Duration::from_secs(180),
                ..EchoConfig::default()
            };
            let run = EchoSession::start(client, cfg).map_err(|e| e.to_string())?;
            // Two seconds of steady load before, and after, the migration.
            if !run.wait_echoed(2 * RATE, Duration::from_secs(60)) {
                return Err(format!("{mode}: the echo guest does not answer"));
            }
            let started = Instant::now();
            let (s, d) = if side == 0 {
                let (x, y) = cons.split_at_mut(1);
                (&mut *x[0], &mut *y[0])
            } else {
                let (x, y) = cons.split_at_mut(1);
                (&mut *y[0], &mut *x[0])
            };
            let m = session::migrate(s, d, id, IP[1 - side], opts, Duration::from_secs(600))?;
            let before = run.echoed();
            if !run.wait_echoed(before + 2 * RATE, Duration::from_secs(120)) {
                return Err(format!("{mode}: no echo after the migration"));
            }
            let r = run
                .stop()
                .map_err(|f| format!("{mode}: echo run failed: {} ({})", f.error, f.report))?;
            let downtime_ms = m.stats.downtime_us as f64 / 1000.0;
            let row = Row {
                mode: mode.into(),
                repeat,
                from: NAME[side].into(),
                to: NAME[1 - side].into(),
                downtime_ms,
                stall_ms: r.longest_stall_ms,
                stall_ratio: if downtime_ms > 0.0 {
                    r.longest_stall_ms / downtime_ms
                } else {
                    0.0
                },
                retransmissions: r.retransmissions,
                resets: r.resets,
                bytes_echoed: r.bytes_echoed,
                latency_median_ms: r.latency.median_ms,
                latency_max_ms: r.latency.max_ms,
                total_ms: m.stats.total_us as f64 / 1000.0,
            };
            println!(
                "NETBENCH-ROW mode={} from={} to={} downtime_ms={:.1} stall_ms={:.1} ratio={:.2} retransmissions={} resets={} median_ms={:.1} max_ms={:.1}",
                row.mode,
                row.from,
                row.to,
                row.downtime_ms,
                row.stall_ms,
                row.stall_ratio,
                row.retransmissions,
                row.resets,
                row.latency_median_ms,
                row.latency_max_ms
            );
            // Latency against time since the migration command (first repeat only).
            let t0 = r.duration_ms - started.elapsed().as_secs_f64() * 1000.0;
            if repeat == 1 {
                series.push(Series {
                    name: mode.into(),
                    points: r
                        .samples
                        .iter()
                        .map(|p| {
                            let x = (p.at_ms - t0) / 1000.0;
                            Point {
                                x,
                                y: p.latency_ms,
                                lo: p.latency_ms,
                                hi: p.latency_ms,
                            }
                        })
                        .collect(),
                });
            }
            rows.push(row);
            id = m.new_id;
            side = 1 - side;
        }
    }
    for c in cons {
        let _ = c.send_line("shutdown");
    }
    drop(lab);
    let mut w = csv::Writer::from_path(dir.join("net.csv")).map_err(|e| e.to_string())?;
    for r in &rows {
        w.serialize(r).map_err(|e| e.to_string())?;
    }
    w.flush().map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
    fs::write(dir.join("net.json"), json).map_err(|e| e.to_string())?;
    let svg = plot::lines(
        &Labels {
            title: "echo guest: client reply latency around a migration",
            x: "seconds from the migrate command",
            y: "reply latency (ms)",
        },
        &series,
        true,
    )
    .map_err(|e| e.to_string())?;
    fs::write(dir.join("latency.svg"), svg).map_err(|e| e.to_string())?;
    println!("\n| mode | downtime (ms) | client stall (ms) | stall / downtime | retransmissions | resets |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {} | {} |",
            r.mode, r.downtime_ms, r.stall_ms, r.stall_ratio, r.retransmissions, r.resets
        );
    }
    println!("(outputs in {})", dir.display());
    if rows.iter().any(|r| r.resets > 0) {
        return Err("a client connection was reset".into());
    }
    Ok(())
}
