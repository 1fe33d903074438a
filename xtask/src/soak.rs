//! `cargo xtask soak`: many migrations back and forth, each one checked.
//!
//! Boots a pair and starts three guests on A: the verify guest (its memory under a
//! checkable invariant), a counter (a sequence with no gap allowed) and a dirtier (a
//! working set rewritten at a seeded rate). Then it migrates one guest at a time to the
//! other side, `N` times, choosing the guest, the dirty tracking (PML, A/D, WP) or
//! stop-and-copy from the seed, always with `verify=full` (the hypervisors compare every
//! page). After every migration it checks:
//!
//! * the guest runs on exactly one side (never both, never neither);
//! * its migration count went up by one (or stayed, if the migration was refused);
//! * verify and dirtier pass their own check where they run; the counter continues
//!   with the next number;
//! * both hypervisors come back to their idle level: free frames plus the guests'
//!   frames, heap minus the guests' heap (within a small tolerance for caches such as
//!   ARP), open sockets, no migration in flight.
//!
//! It writes one row per migration to out/soak/soak.csv and soak.json, and prints a
//! summary; it fails if any invariant broke.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use clap::Args;
use hv_tools::console::Console;
use hv_tools::session;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use hv_tools::hub::{Cut, Faults, HubHandle, Partition, Trigger};

use crate::progress::Progress;
use crate::{out_dir, run, BootOpts, EmuArgs};

/// `cargo xtask soak` options.
#[derive(Clone, Debug, Args)]
pub struct SoakArgs {
    /// Migrations to run.
    #[arg(long, default_value_t = 100)]
    pub migrations: u32,
    /// Seed for every random choice (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Inject network faults from the hub into some migrations: a lossy, reordering,
    /// duplicating link for the whole migration, a short partition TCP rides out, or a
    /// partition longer than the source's timeout (the migration aborts, the guest stays).
    #[arg(long)]
    pub faults: bool,
    /// Memory of the verify and dirtier guests, in MiB. A migration moves about this
    /// much over a link of ~1 MB/s, so it sets the pace of a long soak.
    #[arg(long, value_name = "MiB", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(2..=64))]
    pub guest_mem: u32,
    #[command(flatten)]
    pub emu: EmuArgs,
}

const CMD: Duration = Duration::from_secs(120);
const MIGRATE: Duration = Duration::from_secs(600);
/// Heap that may differ from the idle level without counting as a leak: caches that
/// settle (ARP entries, socket-set slots). A leak per migration would exceed it fast.
const HEAP_SLACK: i64 = 16 * 1024;

/// One guest of the soak.
#[derive(Clone, Debug)]
struct Guest {
    image: &'static str,
    /// 0 = A, 1 = B.
    side: usize,
    id: u32,
    migrations: u64,
}

/// One migration's record (soak.csv / soak.json).
#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    n: u32,
    /// The fault injected into this migration (`none` without `--faults`).
    fault: String,
    image: String,
    from: String,
    to: String,
    options: String,
    /// `ok`, or the reason it was refused (the guest stayed on its source).
    outcome: String,
    completed: bool,
    downtime_us: u64,
    total_us: u64,
    bytes: u64,
    /// Wall-clock time of the migration and its checks, in ms.
    wall_ms: u64,
    /// Invariants that broke after this migration (empty when all held).
    violations: String,
}

fn rng_seed(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

fn start(c: &mut Console, args: &str, image: &'static str) -> Result<Guest, String> {
    let id = session::start(c, args)?;
    Ok(Guest {
        image,
        side: 0,
        id,
        migrations: 0,
    })
}

/// A fault injected into one migration.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Loss, reordering and duplicates on every port for the whole migration.
    Lossy(f64),
    /// The destination cut off for a while; TCP rides it out.
    ShortCut(Duration),
    /// The destination cut off for longer than the source's `timeout=8`: it aborts.
    LongCut,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::Lossy(p) => write!(f, "loss {:.0}% + reorder 3% + dup 1%", p * 100.0),
            Fault::ShortCut(d) => write!(f, "partition {:.1} s", d.as_secs_f64()),
            Fault::LongCut => f.write_str("partition 14 s (timeout 8 s)"),
        }
    }
}

/// Chooses and arms a fault for the next migration (to `dst`, 0 = A).
fn inject(hub: &HubHandle, rng: &mut StdRng, dst: usize) -> Result<Fault, String> {
    let e = |e: hv_tools::hub::HubError| e.to_string();
    let fault = match rng.random_range(0..10) {
        0..=3 => Fault::None,
        4..=6 => Fault::Lossy(rng.random_range(0.01..0.05)),
        7..=8 => Fault::ShortCut(Duration::from_millis(rng.random_range(1000..4000))),
        _ => Fault::LongCut,
    };
    match fault {
        Fault::None => {}
        Fault::Lossy(loss) => hub
            .set_faults_all(Faults {
                loss,
                reorder: 0.03,
                reorder_by: 3,
                duplicate: 0.01,
                ..Faults::default()
            })
            .map_err(e)?,
        Fault::ShortCut(_) | Fault::LongCut => {
            let d = match fault {
                Fault::ShortCut(d) => d,
                _ => Duration::from_secs(14),
            };
            // Some time into the migration (the handshake and a part of round 0).
            let after = Duration::from_millis(rng.random_range(300..3000));
            hub.schedule(Partition {
                cut: Cut::Port(dst),
                trigger: Trigger::After(after),
                heal_after: Some(d),
            })
            .map_err(e)?
        }
    }
    Ok(fault)
}

/// `cargo xtask soak`.
pub fn run(args: &SoakArgs) -> Result<(), String> {
    let seed = rng_seed(args.seed);
    let mut rng = StdRng::seed_from_u64(seed);
    eprintln!(
        "soak: {} migrations, seed {seed} (replay with --seed {seed})",
        args.migrations
    );
    let mut opts = BootOpts::new(&args.emu, true)?;
    // One seed replays the whole run, the hub's fault draws included.
    opts.hub.seed.get_or_insert(seed);
    let mut lab = run::boot(&opts, "soak")?;
    let dir = out_dir().join("soak");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let hub = lab.hub.as_ref();
    if args.faults && hub.is_none() {
        return Err("--faults needs the lab's own hub (unset HV_HUB)".into());
    }
    let (a, b) = lab.instances.split_at_mut(1);
    let mut cons = [&mut a[0].console, &mut b[0].console];
    const NAME: [&str; 2] = ["A", "B"];
    const IP: [&str; 2] = ["10.0.0.1", "10.0.0.2"];

    let verify_rate = rng.random_range(10..120);
    let dirtier_rate = rng.random_range(10..200);
    let mut guests = [
        start(
            cons[0],
            &format!(
                "verify mem={} rate={verify_rate} check=3600",
                args.guest_mem
            ),
            "verify",
        )?,
        start(cons[0], "counter period=200", "counter")?,
        start(
            cons[0],
            &format!(
                "dirtier mem={} pages={} rate={dirtier_rate}",
                args.guest_mem,
                (args.guest_mem * 256 / 2).min(512)
            ),
            "dirtier",
        )?,
    ];
    eprintln!("soak: verify rate {verify_rate} pages/s, dirtier rate {dirtier_rate} pages/s");
    std::thread::sleep(Duration::from_secs(2));
    let idle = [session::level(cons[0])?, session::level(cons[1])?];

    let mut rows = Vec::new();
    // Rows go to the CSV as they are made: a run of hours keeps its record if it stops.
    let mut csv = csv::Writer::from_path(dir.join("soak.csv")).map_err(|e| e.to_string())?;
    let mut progress = Progress::new("soak", u64::from(args.migrations));
    for n in 1..=args.migrations {
        let gi = rng.random_range(0..guests.len());
        let g = guests[gi].clone();
        let (src, dst) = (g.side, 1 - g.side);
        let options = match rng.random_range(0..4) {
            0 => "dirty=pml",
            1 => "dirty=ad",
            2 => "dirty=wp",
            _ => "mode=stop",
        }
        .to_string()
            // Bounded rounds: a guest dirtying faster than the link stops after 10.
            + " verify=full max-rounds=10";
        let fault = match (args.faults, hub) {
            (true, Some(hub)) => inject(hub, &mut rng, dst)?,
            _ => Fault::None,
        };
        let options = match fault {
            Fault::LongCut => options + " timeout=8",
            _ => options,
        };
        progress.start(&format!(
            "{} {} -> {} ({options})",
            g.image, NAME[src], NAME[dst]
        ));
        let mut row = Row {
            n,
            fault: fault.to_string(),
            image: g.image.into(),
            from: NAME[src].into(),
            to: NAME[dst].into(),
            options: options.clone(),
            ..Default::default()
        };
        let began = std::time::Instant::now();
        let dst_mark = cons[dst].log().len();
        let (s, d) = if src == 0 {
            let (x, y) = cons.split_at_mut(1);
            (&mut *x[0], &mut *y[0])
        } else {
            let (x, y) = cons.split_at_mut(1);
            (&mut *y[0], &mut *x[0])
        };
        let mut violations = Vec::new();
        match session::migrate(s, d, g.id, IP[dst], &options, MIGRATE) {
            Ok(m) => {
                let k = |key: &str| m.stats.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
                row.outcome = "ok".into();
                row.completed = true;
                row.downtime_us = k("downtime_us");
                row.total_us = k("total_us");
                row.bytes = k("bytes");
                guests[gi] = Guest {
                    side: dst,
                    id: m.new_id,
                    migrations: g.migrations + 1,
                    ..g.clone()
                };
            }
            Err(e) if e.starts_with("migration failed") => {
                // Refused or aborted: the guest must still run on its source.
                row.outcome = e.replace('\n', " ");
            }
            Err(e) => return Err(format!("migration {n}: {e}")),
        }
        if let (true, Some(hub)) = (args.faults, hub) {
            hub.heal_all().map_err(|e| e.to_string())?;
            hub.set_faults_all(Faults::default())
                .map_err(|e| e.to_string())?;
        }
        // Exactly one side runs it, with the expected migration count.
        let g2 = guests[gi].clone();
        let here = session::listed(cons[g2.side], g2.image)?;
        let there = session::listed(cons[1 - g2.side], g2.image)?;
        match (here.as_slice(), there.as_slice()) {
            ([(id, state, migr)], []) if *id == g2.id => {
                if !matches!(state.as_str(), "running" | "sleeping") {
                    violations.push(format!("{} is {state} on {}", g2.image, NAME[g2.side]));
                }
                if *migr != g2.migrations {
                    violations.push(format!(
                        "{} migration count {migr}, expected {}",
                        g2.image, g2.migrations
                    ));
                }
            }
            (_, [_, ..]) if !here.is_empty() => {
                violations.push(format!("{} listed on both sides (split brain)", g2.image))
            }
            ([], []) => violations.push(format!("{} lost: on neither side", g2.image)),
            _ => violations.push(format!(
                "{}: expected id {} on {}, found {here:?} there and {there:?} on the other side",
                g2.image, g2.id, NAME[g2.side]
            )),
        }
        // The guest's own checks where it runs now.
        let c = &mut *cons[g2.side];
        match g2.image {
            "counter" if row.completed => {
                // The source printed its last line before the freeze.
                let last = session::counter_values(&cons[src].log(), g.id)
                    .last()
                    .copied();
                let c = &mut *cons[g2.side];
                c.wait_for(&format!("[g{}] counter ", g2.id), CMD)?;
                c.wait_for("\n", CMD)?;
                let first = session::counter_values(&c.log()[dst_mark..], g2.id)
                    .first()
                    .copied();
                if let (Some(b4), Some(f)) = (last, first) {
                    if f != b4 + 1 {
                        violations.push(format!("counter gap: {b4} then {f}"));
                    }
                }
            }
            "verify" | "dirtier" if !session::self_check(c, g2.image, g2.id)? => {
                violations.push(format!("{} failed its check", g2.image));
            }
            _ => {}
        }
        // Both hypervisors back at their idle level.
        for side in 0..2 {
            let l = session::level(cons[side])?;
            let i = idle[side];
            if l.frames != i.frames || l.sockets != i.sockets || l.heap > i.heap + HEAP_SLACK {
                violations.push(format!(
                    "{}: level {l:?}, idle {i:?} (frames/sockets must match, heap within {HEAP_SLACK})",
                    NAME[side]
                ));
            }
        }
        row.violations = violations.join("; ");
        row.wall_ms = began.elapsed().as_millis() as u64;
        if !violations.is_empty() {
            progress.line(&format!("soak: migration {n}: {}", row.violations));
        }
        csv.serialize(&row).map_err(|e| e.to_string())?;
        csv.flush().map_err(|e| e.to_string())?;
        rows.push(row);
        progress.finish_one();
    }
    progress.finish();
    drop(lab);
    write_json(&dir, &rows)?;
    let summary = summarize(seed, &rows);
    print!("{summary}");
    fs::write(dir.join("summary.txt"), &summary).map_err(|e| e.to_string())?;
    if rows.iter().any(|r| !r.violations.is_empty()) {
        return Err(format!(
            "soak: invariants broke (see {})",
            dir.join("soak.csv").display()
        ));
    }
    Ok(())
}

/// The whole record as JSON (written at the end; the CSV is written as it goes).
fn write_json(dir: &std::path::Path, rows: &[Row]) -> Result<(), String> {
    let json = serde_json::to_string_pretty(rows).map_err(|e| e.to_string())?;
    fs::write(dir.join("soak.json"), json).map_err(|e| e.to_string())
}

/// The summary: counts of each outcome and invariant, downtime spread.
fn summarize(seed: u64, rows: &[Row]) -> String {
    let count = |f: &dyn Fn(&Row) -> bool| rows.iter().filter(|r| f(r)).count();
    let has = |r: &Row, what: &str| r.violations.contains(what);
    let mut dts: Vec<u64> = rows
        .iter()
        .filter(|r| r.completed)
        .map(|r| r.downtime_us)
        .collect();
    dts.sort_unstable();
    let pick = |q: f64| {
        dts.get(((dts.len() as f64 - 1.0) * q).round() as usize)
            .map_or("-".to_string(), |v| format!("{:.1}", *v as f64 / 1000.0))
    };
    let wall: u64 = rows.iter().map(|r| r.wall_ms).sum();
    let mut by_opt: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.completed) {
        *by_opt.entry(r.options.as_str()).or_default() += 1;
    }
    let mut by_fault: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in rows {
        let kind = r.fault.split(' ').next().unwrap_or("none").to_string();
        let e = by_fault.entry(kind).or_default();
        e.0 += 1;
        e.1 += usize::from(r.completed);
    }
    format!(
        "soak summary (seed {seed}):\n  attempted {}\n  completed {}\n  refused or aborted, guest kept on its source (by a fault with --faults) {}\n  lost guests {}\n  guests running twice {}\n  pages mismatched (verify=full rejections) {}\n  failed guest checks or counter gaps {}\n  level changes (frames, sockets or heap leaked) {}\n  downtime ms min/median/max {}/{}/{}\n  completed by options {by_opt:?}\n  faults (attempted, completed) {by_fault:?}\n  wall time {:.1} min ({:.1} s per migration)\n",
        rows.len(),
        count(&|r| r.completed),
        count(&|r| !r.completed),
        count(&|r| has(r, "lost")),
        count(&|r| has(r, "split brain")),
        count(&|r| r.outcome.contains("differ from the source")),
        count(&|r| has(r, "failed its check") || has(r, "counter gap")),
        count(&|r| has(r, "level")),
        pick(0.0),
        pick(0.5),
        pick(1.0),
        wall as f64 / 60_000.0,
        wall as f64 / 1000.0 / rows.len().max(1) as f64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_each_kind() {
        let ok = Row {
            completed: true,
            outcome: "ok".into(),
            downtime_us: 3000,
            options: "dirty=pml verify=full".into(),
            ..Default::default()
        };
        let lost = Row {
            violations: "verify lost: on neither side".into(),
            ..ok.clone()
        };
        let refused = Row {
            completed: false,
            outcome:
                "migration failed: verify=full: 1 of 4096 pages differ from the source's memory"
                    .into(),
            ..Default::default()
        };
        let s = summarize(7, &[ok.clone(), lost, refused]);
        assert!(s.contains("attempted 3"), "{s}");
        assert!(s.contains("completed 2"), "{s}");
        assert!(s.contains("lost guests 1"), "{s}");
        assert!(
            s.contains("pages mismatched (verify=full rejections) 1"),
            "{s}"
        );
        assert!(s.contains("downtime ms min/median/max 3.0/3.0/3.0"), "{s}");
    }
}
