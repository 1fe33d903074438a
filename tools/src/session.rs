//! Console conversations shared by xtask (demo, bench) and the end-to-end tests: run a
//! migration and collect its figures, measure the link with netbench.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::console::Console;
use crate::stats::{MigrationStats, PREFIX as STATS_PREFIX};

/// A finished migration as the consoles reported it.
#[derive(Clone, Debug)]
pub struct Migrated {
    /// The guest's id on the destination.
    pub new_id: u32,
    /// The source's `MIGRATION-STATS` line.
    pub stats: MigrationStats,
    /// The human summary the source printed.
    pub summary: String,
}

/// Parses `KEY k=v k=v ...` (or just `k=v ...`) into a map; words without `=` are skipped. For lines without a
/// typed record (NETBENCH); `MIGRATION-STATS` has [`MigrationStats::parse`].
pub fn parse_kv(line: &str) -> BTreeMap<String, String> {
    // Tokens without '=' (the line's tag, e.g. `MEM`) are not figures.
    line.split_whitespace()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Runs `migrate <id> <peer> <opts>` on `src` and waits for the guest to resume on `dst`.
pub fn migrate(
    src: &mut Console,
    dst: &mut Console,
    id: u32,
    peer: &str,
    opts: &str,
    timeout: Duration,
) -> Result<Migrated, String> {
    let cmd = format!("migrate {id} {peer} {opts}");
    let out = src.command(cmd.trim(), Duration::from_secs(60))?;
    if !out.contains(&format!("migrate: guest {id} (")) {
        return Err(format!("migrate did not start:\n{out}"));
    }
    let (i, text) = src.wait_any(&["migrated to", "migrate: FAILED"], timeout)?;
    if i == 1 {
        let why = src
            .wait_for("\n", Duration::from_secs(10))
            .unwrap_or_default();
        return Err(format!(
            "migration failed: {}{why}",
            text.lines().last().unwrap_or("")
        ));
    }
    let summary = src.wait_for(STATS_PREFIX, Duration::from_secs(30))?;
    let line = src.wait_for("\n", Duration::from_secs(10))?;
    let stats = MigrationStats::parse(&format!("{}{line}", STATS_PREFIX))
        .map_err(|e| format!("{e}: {line}"))?;
    let new_id = wait_arrived(dst, timeout)?;
    Ok(Migrated {
        new_id,
        stats,
        summary: summary.trim_end_matches(STATS_PREFIX).to_string(),
    })
}

/// The figures of `mem`'s machine-readable `MEM key=value ...` line.
pub fn mem(c: &mut Console) -> Result<BTreeMap<String, String>, String> {
    let out = c.command("mem", Duration::from_secs(120))?;
    let line = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("MEM "))
        .ok_or_else(|| format!("no MEM line in:\n{out}"))?;
    Ok(parse_kv(line))
}

/// Waits for the destination's "arrived and resumed" line; returns the guest's id there.
pub fn wait_arrived(dst: &mut Console, timeout: Duration) -> Result<u32, String> {
    let arrived = dst.wait_for("arrived and resumed", timeout)?;
    arrived
        .rsplit("migrate: guest ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("cannot find the new id in {arrived:?}"))
}

/// Waits for a destination's lost-COMMIT warning (a complete guest kept paused
/// because its source never sent COMMIT); returns that guest's id.
pub fn wait_commit_lost(dst: &mut Console, timeout: Duration) -> Result<u32, String> {
    let line = dst.wait_for("its source never sent COMMIT", timeout)?;
    line.rsplit("migrate: WARNING: guest ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no guest id in {line:?}"))
}

/// Runs `netbench <ip> <mib>` and returns the NETBENCH figures.
pub fn netbench(c: &mut Console, ip: &str, mib: u32) -> Result<BTreeMap<String, String>, String> {
    netbench_streams(c, ip, mib, 1)
}

/// [`netbench`] over `streams` parallel connections (the bytes split between them).
pub fn netbench_streams(
    c: &mut Console,
    ip: &str,
    mib: u32,
    streams: u32,
) -> Result<BTreeMap<String, String>, String> {
    c.send_line(&format!("netbench {ip} {mib} {streams}"))?;
    let (i, text) = c.wait_any(&["NETBENCH ", "error:"], Duration::from_secs(300))?;
    let rest = c.wait_for("\n", Duration::from_secs(10))?;
    if i == 1 {
        return Err(format!("netbench failed: {text}{rest}"));
    }
    let kv = parse_kv(&format!("NETBENCH {rest}"));
    if kv.get("verified").map(String::as_str) != Some("yes") {
        return Err(format!("netbench did not verify: {rest}"));
    }
    c.wait_for(crate::console::PROMPT, Duration::from_secs(30))?;
    Ok(kv)
}

/// Starts a guest; returns its id.
pub fn start(c: &mut Console, args: &str) -> Result<u32, String> {
    let out = c.command(&format!("start {args}"), Duration::from_secs(60))?;
    out.split("started guest ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("start {args} failed:\n{out}"))
}

/// The sequence numbers the `counter` guest `id` printed (`[g<id>] counter <n> ...`),
/// in order. A line may follow a prompt on the same row, so the tag is searched, not
/// anchored.
pub fn counter_values(log: &str, id: u32) -> Vec<u64> {
    let tag = format!("[g{id}] counter ");
    log.lines()
        .filter_map(|l| {
            l.get(l.find(&tag)? + tag.len()..)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The `(seq, t_ms)` pairs the `counter` guest `id` printed (`counter <seq> t=<ms>ms`).
pub fn counter_times(log: &str, id: u32) -> Vec<(u64, u64)> {
    let tag = format!("[g{id}] counter ");
    log.lines()
        .filter_map(|l| {
            let rest = l.get(l.find(&tag)? + tag.len()..)?;
            let mut w = rest.split(' ');
            let seq = w.next()?.parse().ok()?;
            let t = w
                .next()?
                .strip_prefix("t=")?
                .strip_suffix("ms")?
                .parse()
                .ok()?;
            Some((seq, t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_kv_keeps_every_figure_with_or_without_the_tag() {
        for line in ["MEM heap_used=5 sockets=2", "heap_used=5 sockets=2"] {
            let m = parse_kv(line);
            assert_eq!(m.get("heap_used").map(String::as_str), Some("5"), "{line}");
            assert_eq!(m.len(), 2, "{line}");
        }
    }

    #[test]
    fn parses_key_values() {
        let kv = parse_kv("MIGRATION-STATS guest=3 total_us=100 per_round=1:2:3,4:5:6");
        assert_eq!(kv["guest"], "3");
        assert_eq!(kv["per_round"], "1:2:3,4:5:6");
        assert_eq!(kv.len(), 3);
    }

    #[test]
    fn finds_counter_lines() {
        let log = "[g1] counter 4 t=1ms\nhv> [g1] counter 5 t=2ms\n[g2] counter 9 t=3ms\n[g1] counter: migrated (now 1 migrations)\n";
        assert_eq!(counter_values(log, 1), vec![4, 5]);
        assert_eq!(counter_values(log, 2), vec![9]);
        assert!(counter_values(log, 3).is_empty());
        assert_eq!(counter_times(log, 1), vec![(4, 1), (5, 2)]);
    }
}

/// A side's level with the guests' own share taken out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Free frames plus the guests' frames.
    pub frames: i64,
    /// Heap in use minus the guests' share.
    pub heap: i64,
    /// Open sockets.
    pub sockets: i64,
}

/// The `mem` figures, waiting (bounded) until no migration is in flight and no socket
/// lingers, so a level is comparable.
pub fn level(c: &mut Console) -> Result<Level, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = c.command("mem", Duration::from_secs(120))?;
        let line = out
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("MEM "))
            .ok_or_else(|| format!("no MEM line:\n{out}"))?;
        let kv = parse_kv(line);
        let n = |k: &str| kv.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
        let (mut gframes, mut gheap) = (0, 0);
        for l in out.lines() {
            // "  guest 3    4112 frames (16448 KiB: ...), 1234 bytes of heap"
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() == Some(&"guest") && w.get(3) == Some(&"frames") {
                gframes += w[2].parse::<i64>().unwrap_or(0);
                let heap = l
                    .rsplit(", ")
                    .next()
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|t| t.parse::<i64>().ok());
                gheap += heap.unwrap_or(0);
            }
        }
        let settled = n("migrations") == 0 && n("lingering") == 0;
        if settled || Instant::now() > deadline {
            return Ok(Level {
                frames: n("frames_free") + gframes,
                heap: n("heap_used") - gheap,
                sockets: n("sockets"),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The rows of `vms` naming `image`: (id, state, migrations).
pub fn listed(c: &mut Console, image: &str) -> Result<Vec<(u32, String, u64)>, String> {
    let out = c.command("vms", Duration::from_secs(120))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // A table row starts with the numeric id (guest output lines with "[gN]").
            let row = w.first().is_some_and(|id| id.parse::<u32>().is_ok());
            (row && w.get(1) == Some(&image)).then(|| {
                (
                    w[0].parse().unwrap_or(0),
                    w.get(2).unwrap_or(&"?").to_string(),
                    w.get(6).and_then(|m| m.parse().ok()).unwrap_or(0),
                )
            })
        })
        .collect())
}

/// Asks a verify or dirtier guest to check itself; Ok(false) on FAIL.
pub fn self_check(c: &mut Console, image: &str, id: u32) -> Result<bool, String> {
    c.command(&format!("check {id}"), Duration::from_secs(120))?;
    // verify prints "verify: PASS ...", the dirtier "dirtier: verify: PASS ...".
    let tag = if image == "verify" {
        format!("[g{id}] verify: ")
    } else {
        format!("[g{id}] {image}: verify: ")
    };
    let (pass, fail) = (format!("{tag}PASS"), format!("{tag}FAIL"));
    let (i, _) = c.wait_any(&[pass.as_str(), fail.as_str()], Duration::from_secs(120))?;
    Ok(i == 0)
}
