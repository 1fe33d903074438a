//! Long-run properties on a Bochs pair: the guest clock never goes backwards across
//! moves between hosts of very different uptimes, the counter's gap across a move
//! matches the reported downtime, and many back-to-back migrations leave the heap, the
//! sockets and the free frames on both sides where they started.

use std::collections::BTreeMap;
use std::time::Duration;

use hv_tests::{scenario, Setup, BOOT_TIMEOUT, CMD_TIMEOUT};
use hv_tools::console::Console;
use hv_tools::session;

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Counter period (ms): short, so the gap across a move is measured finely.
const PERIOD_MS: u64 = 20;

/// Migrations in the ping-pong (`HV_PINGPONG`; the README reports a 200-migration run).
fn pingpong() -> usize {
    std::env::var("HV_PINGPONG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

use hv_tools::session::mem;

fn num(m: &BTreeMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

/// One move of the counter `id` from `src` to `dst`; checks the sequence continues,
/// the clock does not step back, and the gap matches the downtime. Returns the new id.
fn move_counter(
    src: &mut Console,
    dst: &mut Console,
    id: u32,
    peer: &str,
    opts: &str,
) -> Result<u32, String> {
    let dst_mark = dst.log().len();
    let m = session::migrate(src, dst, id, peer, opts, MIGRATE_TIMEOUT)?;
    let last = session::counter_times(&src.log(), id)
        .last()
        .copied()
        .ok_or("no counter output on the source")?;
    dst.wait_for(&format!("[g{}] counter ", m.new_id), GUEST_TIMEOUT)?;
    dst.wait_for("\n", CMD_TIMEOUT)?;
    let first = session::counter_times(&dst.log()[dst_mark..], m.new_id)
        .first()
        .copied()
        .ok_or("no counter output on the destination")?;
    if first.0 != last.0 + 1 {
        return Err(format!("sequence gap: {last:?} then {first:?}"));
    }
    if first.1 < last.1 {
        return Err(format!(
            "clock went backwards across the move to {peer}: {} ms then {} ms",
            last.1, first.1
        ));
    }
    let downtime_ms = m
        .stats
        .get("downtime_us")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or("no downtime in the stats")?
        / 1000;
    // The guest was frozen somewhere in its sleep after printing `last`: its next line
    // comes `max(period, (freeze - last) + downtime)` later on its clock, so the gap
    // lies in [downtime, downtime + period] when the pause is longer than the period.
    let gap = first.1 - last.1;
    let tol = 3;
    if gap + tol < downtime_ms.min(PERIOD_MS) || gap > downtime_ms + PERIOD_MS + tol {
        return Err(format!(
            "counter gap {gap} ms does not match the downtime {downtime_ms} ms (period {PERIOD_MS} ms)"
        ));
    }
    eprintln!(
        "moved g{id} -> {peer} g{}: seq {} -> {}, t {} -> {} ms (gap {gap} ms), downtime {downtime_ms} ms",
        m.new_id, last.0, first.0, last.1, first.1
    );
    Ok(m.new_id)
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_clock_monotonic_and_no_leak_over_many_migrations() {
    scenario("bochs-endurance", Setup::bochs_pair(), |lab| {
        // 1. A guest that has run longer than the destination has been up.
        let c = &mut lab.instances[0].console;
        c.command(&format!("start counter period={PERIOD_MS}"), CMD_TIMEOUT)?;
        c.wait_for("[g1] counter 300 ", GUEST_TIMEOUT)?;
        lab.restart(1, BOOT_TIMEOUT)?;
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);
        let up_b = b.command("info", CMD_TIMEOUT)?;
        eprintln!(
            "B restarted: {}",
            up_b.lines().find(|l| l.contains("uptime")).unwrap_or("")
        );
        let mut id = move_counter(a, b, 1, "10.0.0.2", "")?;
        id = move_counter(b, a, id, "10.0.0.1", "dirty=wp")?;
        id = move_counter(a, b, id, "10.0.0.2", "dirty=ad")?;
        id = move_counter(b, a, id, "10.0.0.1", "")?;

        // 2. Back and forth: the figures after must equal those before (sampled once
        //    the sockets of the last migrations have stopped lingering).
        std::thread::sleep(Duration::from_secs(5));
        let (ma, mb) = (mem(a)?, mem(b)?);
        let n = pingpong();
        for i in 0..n {
            id = if i % 2 == 0 {
                move_counter(a, b, id, "10.0.0.2", "")?
            } else {
                move_counter(b, a, id, "10.0.0.1", "")?
            };
        }
        if n % 2 == 1 {
            id = move_counter(b, a, id, "10.0.0.1", "")?;
        }
        let _ = id;
        // Lingering sockets close within a few seconds.
        std::thread::sleep(Duration::from_secs(5));
        let (ma2, mb2) = (mem(a)?, mem(b)?);
        eprintln!("A before {ma:?}\nA after  {ma2:?}\nB before {mb:?}\nB after  {mb2:?}");
        for (side, before, after) in [("A", &ma, &ma2), ("B", &mb, &mb2)] {
            // The heap may differ by a few bytes of caches that settle (ARP entries,
            // socket-set slots); a leak per migration would be 50x its size.
            let (hb, ha) = (num(before, "heap_used"), num(after, "heap_used"));
            if ha > hb + 4096 {
                return Err(format!(
                    "{side}: heap_used {hb} before {n} migrations, {ha} after"
                ));
            }
            for k in ["sockets", "frames_free", "migrations", "lingering"] {
                if num(before, k) != num(after, k) {
                    return Err(format!(
                        "{side}: {k} was {} before {n} migrations and {} after",
                        num(before, k),
                        num(after, k)
                    ));
                }
            }
            if num(after, "heap_failed") != 0 {
                return Err(format!("{side}: allocations failed"));
            }
        }
        Ok(())
    });
}
