//! `cargo xtask bench`: a matrix of live migrations on a linked pair, with every figure
//! also stated against the link's own throughput measured by netbench in the same run.
//!
//! The guest is `verify`: it fills all of its memory, rewrites pages at `rate` pages/s
//! over all of it, and after every migration checks on the destination that no page was
//! lost (a failed check fails the benchmark). Dirty rates are fractions of the measured
//! link throughput, so a configuration means the same thing whatever the emulator's
//! speed. Each configuration runs `repeats` times;
//! the table shows medians with min-max, the JSON/CSV files hold every run, and SVG
//! plots show downtime and total time against dirty rate per method (with the min-max
//! band of the repeats), and the pages sent per round of the highest-rate pre-copy run.
//!
//! `--compare` and `--from` work on results files alone, without booting anything.

mod net;
mod report;
mod results;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use hv_tools::emu::Emulator;
use hv_tools::session;

use crate::plot::{self, Labels, Point, Series};
use crate::progress::Progress;
use crate::{out_dir, run, BootOpts, EmuArgs};
pub use results::{Record, Results, SCHEMA};

/// `cargo xtask bench` options.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Run a small matrix (12 migrations, 1 repeat) and check the outputs: what CI runs.
    #[arg(long)]
    pub quick: bool,
    /// Run only the configurations whose label (e.g. "16 MiB high pml+hybrid ws 4096")
    /// contains one of these words.
    #[arg(long, value_name = "WORD", num_args = 1..)]
    pub only: Vec<String>,
    /// Migrations per configuration [default: 3, or 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: Option<u32>,
    #[command(flatten)]
    pub emu: EmuArgs,
    /// Accepted for compatibility: the benchmark always boots a pair.
    #[arg(long, hide = true)]
    pub pair: bool,
    /// Print each figure's new/old ratio against this earlier results.json (of this
    /// run, or of --against / --from without running).
    #[arg(long, value_name = "OLD.json")]
    pub compare: Option<PathBuf>,
    /// With --compare: compare against this existing results.json instead of running
    /// (boots nothing, writes nothing).
    #[arg(
        long,
        value_name = "NEW.json",
        requires = "compare",
        conflicts_with_all = ["from", "quick", "repeats"]
    )]
    pub against: Option<PathBuf>,
    /// Rewrite the outputs (results.json in the current schema, CSV, table, plots) from
    /// an existing results.json instead of running; reads the old hand-written format too.
    #[arg(long, value_name = "RESULTS.json", conflicts_with_all = ["quick", "repeats"])]
    pub from: Option<PathBuf>,
    /// Directory for the outputs [default: out/bench, or out/bench-net with --net].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The application's view instead: the `echo` guest under a host client's steady
    /// load, migrated once per mode (pre-copy, stop-and-copy, post-copy, hybrid), with
    /// the hypervisors' downtime beside the stall the client saw and its TCP
    /// retransmissions; net.csv, net.json and latency.svg (reply latency over time).
    #[arg(long, conflicts_with_all = ["quick", "only", "compare", "against", "from"])]
    pub net: bool,
}

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

impl Config {
    /// The label `--only` matches: memory, dirty level, method and working set, as
    /// the table prints them.
    fn label(&self) -> String {
        let key = results::Key {
            mem_mib: self.mem_mib,
            dirty_level: self.level.0.into(),
            method: self.method.into(),
            mode: self.mode.into(),
            ws_pages: self.ws.unwrap_or(self.mem_mib * 256),
            workload: if self.ws.is_some() {
                "dirtier"
            } else {
                "verify"
            }
            .into(),
        };
        key.to_string()
    }
}

const LEVELS: [(&str, f64); 4] = [
    ("idle", 0.0),
    ("low", 0.125),
    ("quarter", 0.25),
    ("high", 0.5),
];

/// The configurations to run. `svm`: the source is an AMD SVM instance (QEMU TCG),
/// which has no PML: its tracking methods are NPT dirty flags (`ad`, also in the rows
/// that use the best method) and write protection.
fn matrix(quick: bool, svm: bool) -> Vec<Config> {
    let mut v = Vec::new();
    let best = if svm { "ad" } else { "pml" };
    let all: &[&str] = if svm {
        &["ad", "wp"]
    } else {
        &["pml", "ad", "wp"]
    };
    let (mems, levels, methods): (&[u64], &[(&str, f64)], &[&str]) = if quick {
        (&[16], &[LEVELS[0], LEVELS[2]], &all[..1])
    } else {
        (&[16, 32], &LEVELS, all)
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
    // What verify=full (every page hashed at the freeze and compared before READY)
    // adds to the downtime: the quarter-rate PML case again with it.
    v.push(Config {
        mem_mib: mems[0],
        level: LEVELS[2],
        method: best,
        mode: "precopy+full",
        ws: None,
    });
    // Delta compression of re-sent pages against the same run without it, at half
    // the link (the dirtier rewrites one word per page write: deltas are small).
    for mode in ["precopy", "precopy+delta"] {
        v.push(Config {
            mem_mib: mems[0],
            level: LEVELS[3],
            method: best,
            mode,
            ws: Some(1024),
        });
    }
    // Post-copy and hybrid against pre-copy where pre-copy struggles: half the link,
    // the link's rate, and above it (pre-copy cannot converge there). The pre-copy
    // row at half the link is the delta comparison's baseline above.
    let post_levels: &[(&str, f64)] = if quick {
        &[LEVELS[3]]
    } else {
        &[LEVELS[3], ("link", 1.0), ("twice", 2.0)]
    };
    for &level in post_levels {
        for mode in ["precopy", "precopy+autoconv", "postcopy", "hybrid"] {
            if (mode == "precopy" && level == LEVELS[3]) || (mode == "precopy+autoconv" && quick) {
                continue;
            }
            v.push(Config {
                mem_mib: mems[0],
                level,
                method: best,
                mode,
                ws: Some(1024),
            });
        }
    }
    // A CPU-bound dirtier (no pacing: its dirty rate is what CPU it gets, as a real
    // workload's), far above the link: pre-copy alone cannot converge; auto-converge's
    // throttle takes CPU, and with it the dirty rate. The level is the guest's own
    // rate measured before the migration (aimed at 4x the link, about 2x while the
    // migration takes its share of the CPU; see `start_hog`).
    for mode in ["precopy+hog", "precopy+autoconv-hog"] {
        if quick {
            break; // a minute or more each: not in CI
        }
        v.push(Config {
            mem_mib: mems[0],
            level: ("cpu", 4.0),
            method: best,
            mode,
            ws: Some(1024),
        });
    }
    // The verify guest (all of its memory rewritten) at half the link, where pre-copy
    // needs 3-4x its memory: post-copy and hybrid against the pml row above.
    if !quick {
        for mode in ["postcopy", "hybrid"] {
            v.push(Config {
                mem_mib: mems[0],
                level: LEVELS[3],
                method: best,
                mode,
                ws: None,
            });
        }
    }
    // A guest whose spare memory holds junk (as freed memory does), without and with
    // free-page hints.
    for mode in ["precopy+junk", "precopy+junk-hinted"] {
        v.push(Config {
            mem_mib: mems[0],
            level: LEVELS[1],
            method: best,
            mode,
            ws: Some(256),
        });
    }
    // The working-set dimension: the same dirty rate concentrated on fewer pages.
    let mem_mib = if quick { 16 } else { 32 };
    let sets: &[u64] = if quick { &[256] } else { &[256, 1024, 4096] };
    for &w in sets {
        v.push(Config {
            mem_mib,
            level: LEVELS[2],
            method: best,
            mode: "precopy",
            ws: Some(w),
        });
    }
    v
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

fn load(path: &Path) -> Result<Results, String> {
    Results::load(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.net {
        let opts = crate::BootOpts::new(&args.emu, true)?;
        let dir = args
            .out
            .clone()
            .unwrap_or_else(|| out_dir().join("bench-net"));
        return net::run(&opts, &dir, args.repeats.unwrap_or(1));
    }
    let old = args.compare.as_deref().map(load).transpose()?;
    if let (Some(old), Some(new)) = (&old, &args.against) {
        print!("{}", report::compare_text(old, &load(new)?));
        return Ok(());
    }
    let dir = args.out.clone().unwrap_or_else(|| out_dir().join("bench"));
    let res = match &args.from {
        Some(path) => load(path)?,
        None => run_matrix(args)?,
    };
    write_outputs(&dir, &res)?;
    if let Some(old) = &old {
        print!("\n{}", report::compare_text(old, &res));
    }
    Ok(())
}

/// Boots a pair and runs the matrix.
fn run_matrix(args: &BenchArgs) -> Result<Results, String> {
    let quick = args.quick;
    let repeats = args.repeats.unwrap_or(if quick { 1 } else { 3 });
    let opts = BootOpts::new(&args.emu, true)?;
    let svm = opts.emulator == Emulator::QemuTcg;
    let cfgs: Vec<Config> = matrix(quick, svm)
        .into_iter()
        .filter(|c| {
            args.only.is_empty() || args.only.iter().any(|w| c.label().contains(w.as_str()))
        })
        .collect();
    if cfgs.is_empty() {
        return Err(format!("no configuration matches {:?}", args.only));
    }
    let total = cfgs.len() as u64 * u64::from(repeats);
    let mut lab = run::boot(&opts, "bench")?;
    let (a, b) = lab.instances.split_at_mut(1);
    let (a, b) = (&mut a[0].console, &mut b[0].console);

    eprintln!("bench: measuring the link A -> B with netbench");
    let nb = session::netbench(a, "10.0.0.2", if quick { 2 } else { 4 })?;
    let link_bps = nb
        .get("mbps")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        * 1e6;
    if link_bps <= 0.0 {
        return Err(format!("netbench gave no throughput: {nb:?}"));
    }
    eprintln!(
        "bench: link {:.3} MB/s; {total} migrations to run",
        link_bps / 1e6
    );
    // Would parallel connections (QEMU's multifd) carry more? The same transfer over
    // two connections, right after.
    let nb2 = session::netbench_streams(a, "10.0.0.2", if quick { 2 } else { 4 }, 2)?;
    let link2_bps = nb2
        .get("mbps")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        * 1e6;
    eprintln!(
        "bench: two connections {:.3} MB/s = {:.2}x one",
        link2_bps / 1e6,
        link2_bps / link_bps
    );

    // What the channel's cipher costs the source, against the same link.
    let crypto = a.command("key bench 4", Duration::from_secs(600))?;
    let kv = crypto
        .lines()
        .find_map(|l| l.trim().strip_prefix("CRYPTO "))
        .map(session::parse_kv)
        .ok_or_else(|| format!("key bench printed no CRYPTO line:\n{crypto}"))?;
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
    let seal_bps = num("seal_kBps").map(|k| k * 1000.0);
    let seal_cpb = num("seal_cpb");
    if let Some(bps) = seal_bps {
        eprintln!(
            "bench: cipher seals {:.3} MB/s ({:.1} cycles/byte) = {:.1}x the link",
            bps / 1e6,
            seal_cpb.unwrap_or(0.0),
            bps / link_bps
        );
    }

    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut res = Results {
        schema: SCHEMA,
        date: date(),
        host,
        git: git_rev(),
        emulator: format!("{} ips={}", opts.emulator, opts.ips),
        link_bytes_per_s: link_bps.round(),
        link_two_connections_bytes_per_s: Some(link2_bps.round()),
        cipher_seal_bytes_per_s: seal_bps,
        cipher_seal_cycles_per_byte: seal_cpb,
        runs: Vec::new(),
    };
    let mut progress = Progress::new("bench", total);
    for cfg in &cfgs {
        for rep in 1..=repeats {
            let ws_pages = cfg.ws.unwrap_or(cfg.mem_mib * 256);
            let rate_pps = if cfg.level.1 == 0.0 {
                1
            } else {
                ((link_bps * cfg.level.1) / 4096.0).max(1.0) as u64
            };
            progress.start(&format!(
                "{} MiB, dirty {} ({rate_pps} pages/s over {ws_pages} pages), {} {} (run {rep})",
                cfg.mem_mib, cfg.level.0, cfg.mode, cfg.method
            ));
            let (stats, rate_pps) = migrate_once(a, b, cfg, rate_pps)?;
            let workload = if cfg.ws.is_some() {
                "dirtier"
            } else {
                "verify"
            };
            let r = Record::new(
                cfg.mem_mib,
                cfg.level.0,
                rate_pps,
                ws_pages,
                workload,
                cfg.method,
                cfg.mode,
                rep,
                stats,
                link_bps,
            );
            progress.line(&format!(
                "bench: {}: total {:.0} ms, downtime {:.1} ms, {} rounds",
                r.key(),
                r.stats.total_us as f64 / 1e3,
                r.stats.downtime_us as f64 / 1e3,
                r.stats.rounds
            ));
            res.runs.push(r);
            progress.finish_one();
        }
    }
    progress.finish();
    for c in [&mut *a, &mut *b] {
        let _ = c.send_line("shutdown");
    }
    Ok(res)
}

/// One migration of `cfg`, with the guest's memory checked on the destination.
fn migrate_once(
    a: &mut hv_tools::console::Console,
    b: &mut hv_tools::console::Console,
    cfg: &Config,
    rate_pps: u64,
) -> Result<(hv_tools::stats::MigrationStats, u64), String> {
    // What the guest prints when it has checked its memory on request.
    let check = if cfg.ws.is_some() {
        "dirtier: verify"
    } else {
        "verify"
    };
    let args = match cfg.ws {
        None => format!("verify mem={} rate={rate_pps} check=0", cfg.mem_mib),
        Some(w) => format!(
            "dirtier mem={} pages={w} rate={rate_pps}{}",
            cfg.mem_mib,
            match cfg.mode {
                "precopy+junk" => " fill=1",
                "precopy+junk-hinted" => " fill=1 hint=1",
                _ => "",
            }
        ),
    };
    let (id, rate_pps) = if cfg.mode.ends_with("hog") {
        start_hog(a, cfg, rate_pps)?
    } else {
        (session::start(a, &args)?, rate_pps)
    };
    // Memory filled (verify) or first writes reported (dirtier): running.
    let ready = if cfg.ws.is_some() {
        "dirtier: wrote"
    } else {
        "verify: "
    };
    a.wait_for(&format!("[g{id}] {ready}"), Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_millis(500));
    let before = a.log().len();
    let opts = match cfg.mode {
        "stop" => "mode=stop".to_string(),
        "precopy+full" => format!("dirty={} verify=full", cfg.method),
        "precopy+delta" => format!("dirty={} cache=8", cfg.method),
        "postcopy" | "hybrid" => format!("dirty={} mode={}", cfg.method, cfg.mode),
        "precopy+autoconv" | "precopy+autoconv-hog" => {
            format!("dirty={} converge=auto", cfg.method)
        }
        "precopy+junk" | "precopy+junk-hinted" => format!("dirty={}", cfg.method),
        _ => format!("dirty={}", cfg.method),
    };
    // The trace's figures are in MIGRATION-STATS either way; its console lines make
    // the saved logs say where each round's time went.
    let opts = format!("{opts} trace=on");
    let mut m = session::migrate(a, b, id, "10.0.0.2", &opts, Duration::from_secs(900))?;
    let log = a.log();
    let during = wrote(&log[before.min(log.len())..], id);
    if let Some(r) = during.get(..2).and_then(|d| rate_between(d[0], d[1])) {
        // Its rate in the migration's first second (before any throttle): the CPU
        // the migration's own work leaves it.
        m.stats
            .extra
            .insert("guest_pps_migrating".into(), r.to_string());
    }
    m.stats
        .extra
        .insert("guest_pps_alone".into(), rate_pps.to_string());
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
    Ok((m.stats, rate_pps))
}

/// Starts the CPU-bound dirtier (`rate=0 work=N`) with `work` set so that, alone,
/// it writes about `target` pages/s (its rate is the CPU it gets, so the work per
/// write is found by measuring); returns its id and its measured rate.
fn start_hog(
    a: &mut hv_tools::console::Console,
    cfg: &Config,
    target: u64,
) -> Result<(u32, u64), String> {
    let ws = cfg.ws.unwrap_or(1024);
    let mut work = 10_000u64;
    for attempt in 0.. {
        let id = session::start(
            a,
            &format!("dirtier mem={} pages={ws} rate=0 work={work}", cfg.mem_mib),
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let w = loop {
            let w = wrote(&a.log(), id);
            if w.len() >= 3 {
                break w;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("dirtier {id} reported no rate"));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let rate = rate_between(w[w.len() - 2], w[w.len() - 1])
            .ok_or_else(|| format!("dirtier {id}: no time between its reports"))?
            .max(1);
        if attempt == 3 || rate.abs_diff(target) * 4 <= target {
            return Ok((id, rate));
        }
        a.command(&format!("kill {id}"), Duration::from_secs(60))?;
        work = (work * rate / target.max(1)).max(1);
    }
    unreachable!()
}

/// The running totals a dirtier reported in `log` with its clock ("dirtier: wrote <n>
/// pages (...) at <ms> ms").
fn wrote(log: &str, id: u32) -> Vec<(u64, u64)> {
    let tag = format!("[g{id}] dirtier: wrote ");
    log.lines()
        .filter_map(|l| l.split_once(&tag))
        .filter_map(|(_, rest)| {
            let n = rest.split_whitespace().next()?.parse().ok()?;
            let ms = rest
                .split(" at ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((n, ms))
        })
        .collect()
}

/// Pages per second between two reports of [`wrote`].
fn rate_between(a: (u64, u64), b: (u64, u64)) -> Option<u64> {
    let ms = b.1.checked_sub(a.1).filter(|ms| *ms > 0)?;
    Some(b.0.saturating_sub(a.0) * 1000 / ms)
}

/// The charts: (file name, SVG).
fn plots(res: &Results) -> Result<Vec<(&'static str, String)>, String> {
    let mem0 = res.runs.first().map_or(16, |r| r.mem_mib);
    let groups = res.groups();
    let series = |metric: fn(&Record) -> f64| -> Vec<Series> {
        let mut out = Vec::new();
        for method in ["pml", "ad", "wp", "none"] {
            let mut points: Vec<Point> = groups
                .iter()
                .filter(|(k, _)| k.workload == "verify" && k.method == method && k.mem_mib == mem0)
                .map(|(_, rs)| {
                    let (y, lo, hi) = report::spread(rs.iter().map(|r| metric(r)).collect());
                    Point {
                        x: rs[0].rate_pps as f64 * 4096.0 / 1e6,
                        y,
                        lo,
                        hi,
                    }
                })
                .collect();
            points.sort_by(|a, b| a.x.total_cmp(&b.x));
            if !points.is_empty() {
                let name = if method == "none" {
                    "stop-and-copy"
                } else {
                    method
                };
                out.push(Series {
                    name: name.into(),
                    points,
                });
            }
        }
        out
    };
    let xl = "guest dirty rate (MB/s)";
    let spread_note = if groups.iter().any(|(_, rs)| rs.len() > 1) {
        "; band: min-max of repeats"
    } else {
        ""
    };
    let mut out = vec![
        (
            "downtime.svg",
            plot::lines(
                &Labels {
                    title: &format!("Downtime vs dirty rate ({mem0} MiB guest{spread_note})"),
                    x: xl,
                    y: "downtime (ms, log scale)",
                },
                &series(|r| r.stats.downtime_us as f64 / 1e3),
                true,
            ),
        ),
        (
            "total.svg",
            plot::lines(
                &Labels {
                    title: &format!(
                        "Total migration time vs dirty rate ({mem0} MiB guest{spread_note})"
                    ),
                    x: xl,
                    y: "total (ms)",
                },
                &series(|r| r.stats.total_us as f64 / 1e3),
                false,
            ),
        ),
    ];
    let high = res
        .runs
        .iter()
        .filter(|r| r.mode == "precopy")
        .max_by_key(|r| r.rate_pps);
    if let Some(r) = high {
        let pages: Vec<f64> = r.stats.per_round.iter().map(|p| p.pages as f64).collect();
        out.push((
            "rounds.svg",
            plot::bars(
                &Labels {
                    title: &format!(
                        "Pages per pre-copy round ({} pages/s, {})",
                        r.rate_pps, r.method
                    ),
                    x: "round",
                    y: "pages sent",
                },
                &pages,
            ),
        ));
    }
    out.into_iter()
        .map(|(name, svg)| svg.map(|s| (name, s)).map_err(|e| format!("{name}: {e}")))
        .collect()
}

/// Writes results.json/csv/txt and the plots to `dir`, prints the table, and reads
/// everything back to check it (what `--quick` in CI is for).
fn write_outputs(dir: &Path, res: &Results) -> Result<(), String> {
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let csv = res.to_csv().map_err(|e| format!("results.csv: {e}"))?;
    let table = report::table(res);
    let charts = plots(res)?;
    let mut files = vec![
        ("results.json", res.to_json()),
        ("results.csv", csv),
        ("results.txt", table.clone()),
    ];
    files.extend(charts.iter().map(|(n, s)| (*n, s.clone())));
    for (name, text) in &files {
        let p = dir.join(name);
        fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    print!("{table}");

    // Self-check: every file parses back to what was written.
    let back =
        Results::load(&dir.join("results.json")).map_err(|e| format!("results.json: {e}"))?;
    let p = dir.join("results.csv");
    let rows = Results::runs_from_csv(&fs::read_to_string(&p).map_err(|e| io(&p, e))?)
        .map_err(|e| format!("results.csv: {e}"))?;
    if back.runs.len() != res.runs.len() || rows.len() != res.runs.len() {
        return Err(format!(
            "bench outputs malformed: {} JSON records, {} CSV rows, {} runs",
            back.runs.len(),
            rows.len(),
            res.runs.len()
        ));
    }
    if res.runs.iter().any(|r| r.stats.total_us == 0) {
        return Err("a run has no total time".into());
    }
    for (name, _) in &charts {
        let p = dir.join(name);
        plot::check_svg(&fs::read_to_string(&p).map_err(|e| io(&p, e))?)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "bench: {} runs; wrote and checked {} in {}",
        res.runs.len(),
        names.join(", "),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::results::tests::sample;
    use super::*;

    #[test]
    fn quick_matrix_is_small() {
        assert_eq!(matrix(true, false).len(), 12);
        assert_eq!(
            matrix(false, false).len(),
            2 * 4 * 4 + 1 + 2 + 11 + 2 + 2 + 2 + 3
        );
        // SVM: no PML; NPT dirty flags take its place, one method fewer per level.
        assert_eq!(matrix(true, true).len(), 12);
        assert_eq!(
            matrix(false, true).len(),
            2 * 4 * 3 + 1 + 2 + 11 + 2 + 2 + 2 + 3
        );
        assert!(matrix(false, true).iter().all(|c| c.method != "pml"));
        let labels: Vec<String> = matrix(false, false).iter().map(Config::label).collect();
        assert!(
            labels.contains(&"16 MiB high pml+hybrid ws 4096".to_string()),
            "{labels:?}"
        );
    }

    #[test]
    fn outputs_are_written_and_read_back() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        let res = sample();
        write_outputs(&dir, &res).unwrap();
        let svg = fs::read_to_string(dir.join("downtime.svg")).unwrap();
        assert!(svg.contains("stop-and-copy") && svg.contains("pml"));
        assert!(svg.contains("band: min-max"));
        assert_eq!(Results::load(&dir.join("results.json")).unwrap(), res);
        fs::remove_dir_all(&dir).unwrap();
    }
}
