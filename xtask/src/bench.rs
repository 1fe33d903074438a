//! `cargo xtask bench`: a matrix of live migrations on a linked pair, with every figure
//! also stated against the link's own throughput measured by netbench in the same run.
//!
//! The guest is `verify`: it fills all of its memory, rewrites pages at `rate` pages/s
//! over all of it, and after every migration checks on the destination that no page was
//! lost (a failed check fails the benchmark). Dirty rates are fractions of the measured
//! link throughput, so a configuration means the same thing whatever the emulator's
//! speed. Each configuration runs `repeats` times;
//! the table shows medians with min-max, the JSON/CSV files hold every run, and SVG
//! plots show downtime and total time against dirty rate per method, and the pages sent
//! per round of the highest-rate pre-copy run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

use hv_tools::session;

use crate::{out_dir, run, svg, BootOpts};

/// One configuration of the matrix.
#[derive(Clone, Debug)]
struct Config {
    mem_mib: u64,
    /// Name of the dirty-rate level and its fraction of the link.
    level: (&'static str, f64),
    /// "pml", "ad", "wp", or "none" for the stop-and-copy baseline.
    method: &'static str,
    mode: &'static str,
    /// Working set in pages: `None` runs `verify` (rewrites all of memory), `Some(w)`
    /// runs `dirtier` over `w` pages (the rest of memory stays zero).
    ws: Option<u64>,
}

/// One migration's result.
struct Run {
    cfg: Config,
    rate_pps: u64,
    ws_pages: u64,
    stats: BTreeMap<String, String>,
}

const LEVELS: [(&str, f64); 4] = [
    ("idle", 0.0),
    ("low", 0.125),
    ("quarter", 0.25),
    ("high", 0.5),
];

fn matrix(quick: bool) -> Vec<Config> {
    let mut v = Vec::new();
    let (mems, levels, methods): (&[u64], &[(&str, f64)], &[&str]) = if quick {
        (&[16], &[LEVELS[0], LEVELS[2]], &["pml"])
    } else {
        (&[16, 32], &LEVELS, &["pml", "ad", "wp"])
    };
    for &mem_mib in mems {
        for &level in levels {
            for &method in methods {
                v.push(Config {
                    mem_mib,
                    level,
                    method,
                    mode: "precopy",
                    ws: None,
                });
            }
            v.push(Config {
                mem_mib,
                level,
                method: "none",
                mode: "stop",
                ws: None,
            });
        }
    }
    // The working-set dimension: the same dirty rate concentrated on fewer pages.
    let mem_mib = if quick { 16 } else { 32 };
    let sets: &[u64] = if quick { &[256] } else { &[256, 1024, 4096] };
    for &w in sets {
        v.push(Config {
            mem_mib,
            level: LEVELS[2],
            method: "pml",
            mode: "precopy",
            ws: Some(w),
        });
    }
    v
}

fn num(m: &BTreeMap<String, String>, k: &str) -> f64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Ratios against the link: stream throughput / link, downtime / (final bytes at link
/// speed), wire bytes / guest memory.
fn ratios(r: &Run, link_bps: f64) -> (f64, f64, f64) {
    let total_us = num(&r.stats, "total_us").max(1.0);
    let thr = num(&r.stats, "bytes") / (total_us / 1e6) / link_bps;
    let final_us = num(&r.stats, "final_bytes") / link_bps * 1e6;
    let down = num(&r.stats, "downtime_us") / final_us.max(1.0);
    let wire = num(&r.stats, "bytes") / num(&r.stats, "mem_bytes").max(1.0);
    (thr, down, wire)
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `cargo xtask bench [--quick] [--repeats N] [boot options]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut repeats = if quick { 1 } else { 3 };
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {}
            "--repeats" => {
                repeats = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--repeats needs a number")?
            }
            _ => rest.push(a.clone()),
        }
    }
    let mut opts = BootOpts::parse(&rest)?;
    opts.pair = true;
    let cfgs = matrix(quick);
    let total = cfgs.len() * repeats;
    let mut lab = run::boot(&opts, "bench")?;
    let (a, b) = lab.instances.split_at_mut(1);
    let (a, b) = (&mut a[0].console, &mut b[0].console);

    eprintln!("bench: measuring the link A -> B with netbench");
    let nb = session::netbench(a, "10.0.0.2", if quick { 2 } else { 4 })?;
    let link_bps = num(&nb, "mbps") * 1e6;
    if link_bps <= 0.0 {
        return Err(format!("netbench gave no throughput: {nb:?}"));
    }
    eprintln!(
        "bench: link {:.3} MB/s; {} migrations to run",
        link_bps / 1e6,
        total
    );

    let started = Instant::now();
    let mut runs: Vec<Run> = Vec::new();
    let mut n = 0;
    for cfg in &cfgs {
        for rep in 0..repeats {
            n += 1;
            let ws_pages = cfg.ws.unwrap_or(cfg.mem_mib * 256);
            // What the guest prints when it has checked its memory on request.
            let check = if cfg.ws.is_some() {
                "dirtier: verify"
            } else {
                "verify"
            };
            let rate_pps = if cfg.level.1 == 0.0 {
                1
            } else {
                ((link_bps * cfg.level.1) / 4096.0).max(1.0) as u64
            };
            eprintln!(
                "bench: [{n}/{total}] {} MiB, dirty {} ({} pages/s over {} pages), {} {} (run {}) at {:.0}s",
                cfg.mem_mib,
                cfg.level.0,
                rate_pps,
                ws_pages,
                cfg.mode,
                cfg.method,
                rep + 1,
                started.elapsed().as_secs_f64()
            );
            let args = match cfg.ws {
                None => format!("verify mem={} rate={rate_pps} check=0", cfg.mem_mib),
                Some(w) => format!("dirtier mem={} pages={w} rate={rate_pps}", cfg.mem_mib),
            };
            let id = session::start(a, &args)?;
            // Memory filled (verify) or first writes reported (dirtier): running.
            let ready = if cfg.ws.is_some() {
                "dirtier: wrote"
            } else {
                "verify: "
            };
            a.wait_for(&format!("[g{id}] {ready}"), Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_millis(500));
            let opts = if cfg.mode == "stop" {
                "mode=stop".to_string()
            } else {
                format!("dirty={}", cfg.method)
            };
            let m = session::migrate(a, b, id, "10.0.0.2", &opts, Duration::from_secs(900))?;
            // No page lost: the guest checks its whole memory on the destination.
            b.command(&format!("check {}", m.new_id), Duration::from_secs(60))?;
            let (i, text) = b.wait_any(
                &[
                    &format!("[g{}] {check}: PASS", m.new_id),
                    &format!("[g{}] {check}: FAIL", m.new_id),
                ],
                Duration::from_secs(300),
            )?;
            if i == 1 {
                return Err(format!("guest memory check FAILED after migration: {text}"));
            }
            b.command(&format!("kill {}", m.new_id), Duration::from_secs(60))?;
            runs.push(Run {
                cfg: cfg.clone(),
                rate_pps,
                ws_pages,
                stats: m.stats,
            });
        }
    }
    for c in [&mut *a, &mut *b] {
        let _ = c.send_line("shutdown");
    }
    let dir = out_dir().join("bench");
    write_outputs(&dir, &runs, link_bps, &opts, quick)?;
    Ok(())
}

fn write_outputs(
    dir: &std::path::Path,
    runs: &[Run],
    link_bps: f64,
    opts: &BootOpts,
    quick: bool,
) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let (date, rev) = (date(), git_rev());
    let emu = format!("{} ips={}", opts.emulator, opts.ips);

    // JSON and CSV: every run.
    let mut json = format!(
        "{{\n  \"date\": \"{date}\", \"host\": \"{host}\", \"git\": \"{rev}\", \"emulator\": \"{emu}\", \"link_bytes_per_s\": {link_bps:.0},\n  \"runs\": [\n"
    );
    let mut csv = String::from("mem_mib,dirty_level,rate_pps,ws_pages,mode,method,total_us,downtime_us,rounds,bytes,zero_pages,final_dirty,final_bytes,throughput_vs_link,downtime_vs_final_at_link,wire_vs_mem,stop,per_round\n");
    for (i, r) in runs.iter().enumerate() {
        let (thr, down, wire) = ratios(r, link_bps);
        let s = &r.stats;
        let g = |k: &str| s.get(k).cloned().unwrap_or_default();
        let _ = writeln!(
            json,
            "    {{\"mem_mib\": {}, \"dirty_level\": \"{}\", \"rate_pps\": {}, \"ws_pages\": {}, \"mode\": \"{}\", \"method\": \"{}\", \"total_us\": {}, \"downtime_us\": {}, \"rounds\": {}, \"bytes\": {}, \"zero_pages\": {}, \"final_dirty\": {}, \"final_bytes\": {}, \"stop\": \"{}\", \"per_round\": \"{}\", \"throughput_vs_link\": {thr:.4}, \"downtime_vs_final_at_link\": {down:.4}, \"wire_vs_mem\": {wire:.4}}}{}",
            r.cfg.mem_mib, r.cfg.level.0, r.rate_pps, r.ws_pages, r.cfg.mode, r.cfg.method,
            g("total_us"), g("downtime_us"), g("rounds"), g("bytes"), g("zero_pages"), g("final_dirty"), g("final_bytes"), g("stop"), g("per_round"),
            if i + 1 < runs.len() { "," } else { "" }
        );
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{thr:.4},{down:.4},{wire:.4},{},{}",
            r.cfg.mem_mib,
            r.cfg.level.0,
            r.rate_pps,
            r.ws_pages,
            r.cfg.mode,
            r.cfg.method,
            g("total_us"),
            g("downtime_us"),
            g("rounds"),
            g("bytes"),
            g("zero_pages"),
            g("final_dirty"),
            g("final_bytes"),
            g("stop"),
            g("per_round").replace(',', ";")
        );
    }
    json.push_str("  ]\n}\n");
    fs::write(dir.join("results.json"), &json).map_err(|e| e.to_string())?;
    fs::write(dir.join("results.csv"), &csv).map_err(|e| e.to_string())?;

    // Table: medians (min-max) per configuration.
    let mut table = format!(
        "migration benchmark, {date}, {emu}, git {rev}; link (netbench) {:.3} MB/s; times are the hypervisors' TSC clocks\n",
        link_bps / 1e6
    );
    let _ = writeln!(
        table,
        "{:>4} {:<8} {:>6} {:>6} {:<8} {:>16} {:>18} {:>4} {:>9} {:>7} {:>7} {:>6}",
        "MiB",
        "dirty",
        "pg/s",
        "ws pg",
        "method",
        "total ms",
        "downtime ms",
        "rnd",
        "MB",
        "thr/ln",
        "dt/fin",
        "wire"
    );
    let mut keys: Vec<(u64, &str, &str, &str, u64)> = Vec::new();
    for r in runs {
        let k = (
            r.cfg.mem_mib,
            r.cfg.level.0,
            r.cfg.method,
            r.cfg.mode,
            r.ws_pages,
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for k in &keys {
        let rs: Vec<&Run> = runs
            .iter()
            .filter(|r| {
                (
                    r.cfg.mem_mib,
                    r.cfg.level.0,
                    r.cfg.method,
                    r.cfg.mode,
                    r.ws_pages,
                ) == *k
            })
            .collect();
        let col = |f: &dyn Fn(&Run) -> f64| {
            let mut v: Vec<f64> = rs.iter().map(|r| f(r)).collect();
            let (lo, hi) = (
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            );
            (median(&mut v), lo, hi)
        };
        let (t, tl, th) = col(&|r| num(&r.stats, "total_us") / 1000.0);
        let (d, dl, dh) = col(&|r| num(&r.stats, "downtime_us") / 1000.0);
        let (rn, _, _) = col(&|r| num(&r.stats, "rounds"));
        let (mb, _, _) = col(&|r| num(&r.stats, "bytes") / 1e6);
        let (thr, _, _) = col(&|r| ratios(r, link_bps).0);
        let (dt, _, _) = col(&|r| ratios(r, link_bps).1);
        let (w, _, _) = col(&|r| ratios(r, link_bps).2);
        let method = if k.3 == "stop" { "stop" } else { k.2 };
        let _ = writeln!(
            table,
            "{:>4} {:<8} {:>6} {:>6} {:<8} {:>16} {:>18} {:>4.0} {:>9.2} {:>7.2} {:>7.2} {:>6.2}",
            k.0,
            k.1,
            rs[0].rate_pps,
            k.4,
            method,
            format!("{t:.0} ({tl:.0}-{th:.0})"),
            format!("{d:.1} ({dl:.1}-{dh:.1})"),
            rn,
            mb,
            thr,
            dt,
            w
        );
    }
    table.push_str("thr/ln = stream throughput / netbench; dt/fin = downtime / (final bytes at link speed); wire = bytes on the wire / guest memory\n");
    print!("{table}");
    fs::write(dir.join("results.txt"), &table).map_err(|e| e.to_string())?;

    // Plots.
    let mem0 = runs.first().map_or(16, |r| r.cfg.mem_mib);
    let series = |metric: &str| -> Vec<(String, Vec<(f64, f64)>)> {
        let mut out = Vec::new();
        for method in ["pml", "ad", "wp", "none"] {
            let mut pts: Vec<(f64, f64)> = Vec::new();
            for (name, _) in LEVELS {
                let mut v: Vec<f64> = runs
                    .iter()
                    .filter(|r| {
                        r.cfg.ws.is_none()
                            && r.cfg.method == method
                            && r.cfg.level.0 == name
                            && r.cfg.mem_mib == mem0
                    })
                    .map(|r| num(&r.stats, metric) / 1000.0)
                    .collect();
                if let Some(r) = runs
                    .iter()
                    .find(|r| r.cfg.level.0 == name && r.cfg.mem_mib == mem0)
                {
                    if !v.is_empty() {
                        pts.push((r.rate_pps as f64 * 4096.0 / 1e6, median(&mut v)));
                    }
                }
            }
            if !pts.is_empty() {
                out.push((
                    if method == "none" {
                        "stop-and-copy".into()
                    } else {
                        method.to_string()
                    },
                    pts,
                ));
            }
        }
        out
    };
    let xl = "guest dirty rate (MB/s)";
    fs::write(
        dir.join("downtime.svg"),
        svg::lines_log(
            &format!("Downtime vs dirty rate ({mem0} MiB guest)"),
            xl,
            "downtime (ms)",
            &series("downtime_us"),
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        dir.join("total.svg"),
        svg::lines(
            &format!("Total migration time vs dirty rate ({mem0} MiB guest)"),
            xl,
            "total (ms)",
            &series("total_us"),
        ),
    )
    .map_err(|e| e.to_string())?;
    let high = runs
        .iter()
        .filter(|r| r.cfg.mode == "precopy")
        .max_by_key(|r| r.rate_pps);
    if let Some(r) = high {
        let pages: Vec<f64> = r
            .stats
            .get("per_round")
            .map(|s| {
                s.split(',')
                    .filter_map(|x| x.split(':').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        fs::write(
            dir.join("rounds.svg"),
            svg::bars(
                &format!(
                    "Pages per pre-copy round ({} pages/s, {})",
                    r.rate_pps, r.cfg.method
                ),
                "round",
                "pages sent",
                &pages,
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    // Self-check of the outputs (what --quick is for in CI).
    let json = fs::read_to_string(dir.join("results.json")).map_err(|e| e.to_string())?;
    let records = json.matches("\"total_us\":").count();
    let csv_rows = fs::read_to_string(dir.join("results.csv"))
        .map_err(|e| e.to_string())?
        .lines()
        .count()
        - 1;
    if records != runs.len()
        || csv_rows != runs.len()
        || runs.iter().any(|r| num(&r.stats, "total_us") <= 0.0)
    {
        return Err(format!(
            "bench outputs malformed: {records} JSON records, {csv_rows} CSV rows, {} runs",
            runs.len()
        ));
    }
    for f in ["downtime.svg", "total.svg", "rounds.svg"] {
        let s = fs::read_to_string(dir.join(f)).map_err(|e| format!("{f}: {e}"))?;
        if !s.starts_with("<svg") || !s.trim_end().ends_with("</svg>") {
            return Err(format!("{f} is not an SVG"));
        }
    }
    eprintln!(
        "bench: {} runs; wrote {}/results.{{json,csv,txt}}, downtime.svg, total.svg, rounds.svg{}",
        runs.len(),
        dir.display(),
        if quick {
            " (quick mode: outputs checked)"
        } else {
            ""
        }
    );
    Ok(())
}
