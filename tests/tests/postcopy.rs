//! Post-copy and hybrid migration on a Bochs pair and a QEMU-TCG (SVM) pair (A = 10.0.0.1, B = 10.0.0.2): the
//! guest is handed over before its memory, runs on the destination at once, and
//! waits (EPT violation on an unmapped page) for each page it touches that has not
//! arrived; the source sends those first and pushes the rest.

use std::time::Duration;

use hv_tests::{expect, scenario, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::console::Console;
use hv_tools::session;
use hv_tools::stats::MigrationStats;

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn figure(s: &MigrationStats, key: &str) -> Result<u64, String> {
    s.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in {s:?}"))
}

/// Migrates and checks what every post-copy migration must show: the guest was
/// handed over with pages missing, and every one of them was sent exactly once.
fn migrate_post(
    src: &mut Console,
    dst: &mut Console,
    id: u32,
    peer: &str,
    opts: &str,
) -> Result<(u32, MigrationStats), String> {
    let m = session::migrate(src, dst, id, peer, opts, MIGRATE_TIMEOUT)?;
    eprintln!("migrated guest {id} to {peer} {opts}: {}", m.summary);
    let s = m.stats;
    if !s.ok() {
        return Err(format!("migration failed: {}", s.outcome));
    }
    if figure(&s, "postcopy")? != 1 {
        return Err(format!("{opts}: post-copy was not used: {s:?}"));
    }
    let (missing, sent) = (figure(&s, "post_missing")?, figure(&s, "post_pages")?);
    if missing == 0 || sent != missing {
        return Err(format!(
            "{missing} pages missing at the hand-over but {sent} sent after it"
        ));
    }
    // The destination reports when the last page arrived.
    dst.wait_for("post-copy complete, all ", MIGRATE_TIMEOUT)?;
    Ok((m.new_id, s))
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_postcopy_and_hybrid() {
    scenario("bochs-postcopy", Setup::bochs_pair(), |lab| {
        postcopy_and_hybrid(lab, "rate=2000")
    });
}

/// The same on a QEMU-TCG pair: AMD SVM, the missing pages unmapped in the NPT (a
/// nested page fault blocks the guest), NPT A/D flags for the pre-copy rounds.
#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn qemu_tcg_svm_pair_postcopy_and_hybrid() {
    let setup = Setup {
        emulator: Emulator::QemuTcg,
        pair: true,
        net: true,
        extra_hub_ports: 0,
    };
    // TCG's link is several times faster than Bochs' (in emulated time): the dirtier
    // that must outrun pre-copy for auto-converge to throttle it dirties faster.
    scenario("qemu-tcg-svm-postcopy", setup, |lab| {
        postcopy_and_hybrid(lab, "rate=50000")
    });
}

/// Post-copy, hybrid, auto-converge and free-page hints on a linked pair; `hog_rate` is
/// the dirtier's rate for auto-converge (one pre-copy cannot keep up with on this link).
fn postcopy_and_hybrid(lab: &mut hv_tests::Lab, hog_rate: &str) -> Result<(), String> {
    {
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);

        // 1. The verify guest (rewriting its memory) moves by post-copy and passes its
        //    check on B: every page it touched before arriving came on demand.
        a.command("start verify mem=8 rate=100 check=2", CMD_TIMEOUT)?;
        a.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;
        let (vid, s) = migrate_post(a, b, 1, "10.0.0.2", "mode=postcopy")?;
        if figure(&s, "faults")? == 0 {
            return Err("the guest never waited for a page: post-copy not exercised".into());
        }
        if figure(&s, "rounds")? != 0 {
            return Err(format!("post-copy ran pre-copy rounds: {s:?}"));
        }
        b.wait_for(&format!("[g{vid}] verify: PASS"), GUEST_TIMEOUT)?;
        if !session::self_check(b, "verify", vid)? {
            return Err("verify guest failed its check after post-copy".into());
        }
        if !session::listed(a, "verify")?.is_empty() {
            return Err("verify guest still listed on A after post-copy".into());
        }

        // 2. A counter moves by post-copy and back: no value skipped or repeated.
        let cid = session::start(a, "counter period=100")?;
        a.wait_for(&format!("[g{cid}] counter 5 "), GUEST_TIMEOUT)?;
        let (cid_b, _) = migrate_post(a, b, cid, "10.0.0.2", "mode=postcopy prepage=0")?;
        let on_a = session::counter_values(&a.log(), cid)
            .last()
            .copied()
            .ok_or("no counter output on A")?;
        b.wait_for(&format!("[g{cid_b}] counter"), GUEST_TIMEOUT)?;
        b.wait_for("\n", CMD_TIMEOUT)?;
        let first_b = session::counter_values(&b.log(), cid_b)
            .first()
            .copied()
            .ok_or("no counter output on B")?;
        if first_b != on_a + 1 {
            return Err(format!(
                "counter gap: last on A {on_a}, first on B {first_b}"
            ));
        }

        // 3. Hybrid: a dirtier faster than pre-copy can converge on moves back by
        //    pre-copy rounds, then post-copy for what stayed dirty; it passes its
        //    own check on A.
        let did = session::start(b, "dirtier pages=1024 rate=2000")?;
        b.wait_for(&format!("[g{did}] dirtier: wrote"), GUEST_TIMEOUT)?;
        let (did_a, s) = migrate_post(b, a, did, "10.0.0.1", "mode=hybrid max-rounds=4")?;
        if figure(&s, "rounds")? == 0 || figure(&s, "final_dirty")? != 0 {
            return Err(format!("hybrid: expected rounds then post-copy: {s:?}"));
        }
        if !session::self_check(a, "dirtier", did_a)? {
            return Err("dirtier failed its check after hybrid migration".into());
        }
        expect(&b.command("migrations", CMD_TIMEOUT)?, " ok")?;

        // 4. Auto-converge: the same kind of dirtier moves A -> B by pre-copy with
        //    converge=auto; the source throttles it until the rest fits.
        let (a, b) = (&mut *a, &mut *b);
        let did = session::start(a, &format!("dirtier pages=1024 {hog_rate}"))?;
        a.wait_for(&format!("[g{did}] dirtier: wrote"), GUEST_TIMEOUT)?;
        let m = session::migrate(
            a,
            b,
            did,
            "10.0.0.2",
            "converge=auto max-rounds=12",
            MIGRATE_TIMEOUT,
        )?;
        eprintln!("auto-converge: {}", m.summary);
        if figure(&m.stats, "throttle_pct")? == 0 {
            return Err(format!("auto-converge never throttled: {:?}", m.stats));
        }
        if !session::self_check(b, "dirtier", m.new_id)? {
            return Err("dirtier failed its check after auto-converge".into());
        }
        b.command(&format!("kill {}", m.new_id), CMD_TIMEOUT)?;

        // 5. Free-page hints: a guest whose spare memory holds junk moves with about
        //    its used memory on the wire when it says which pages are free.
        let mut wire = Vec::new();
        for hint in [0, 1] {
            let (a, b) = (&mut *a, &mut *b);
            let id = session::start(a, &format!("dirtier pages=256 rate=50 fill=1 hint={hint}"))?;
            a.wait_for(&format!("[g{id}] dirtier: wrote"), GUEST_TIMEOUT)?;
            let m = session::migrate(a, b, id, "10.0.0.2", "", MIGRATE_TIMEOUT)?;
            eprintln!("dirtier hint={hint}: {}", m.summary);
            if !session::self_check(b, "dirtier", m.new_id)? {
                return Err(format!("dirtier (hint={hint}) failed its check"));
            }
            b.command(&format!("kill {}", m.new_id), CMD_TIMEOUT)?;
            wire.push((m.stats.bytes, figure(&m.stats, "free_pages")?));
        }
        let ((without, _), (with, free)) = (wire[0], wire[1]);
        eprintln!("free-page hints: {without} bytes without, {with} with ({free} pages free)");
        if free == 0 || with * 3 > without {
            return Err(format!(
                "free-page hints: {with} bytes with ({free} pages free), {without} without"
            ));
        }
        Ok(())
    }
}

fn consoles(lab: &mut hv_tests::Lab) -> (&mut Console, &mut Console) {
    let (a, b) = lab.instances.split_at_mut(1);
    (&mut a[0].console, &mut b[0].console)
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_postcopy_survives_a_partition() {
    scenario("bochs-postcopy-partition", Setup::bochs_pair(), |lab| {
        // A guest large enough that its pages are still streaming when B is cut off.
        let (a, _) = consoles(lab);
        a.command("start verify mem=32 rate=100 check=0", CMD_TIMEOUT)?;
        a.wait_for("[g1] verify: ", GUEST_TIMEOUT)?;
        let out = a.command("migrate 1 10.0.0.2 mode=postcopy timeout=4", CMD_TIMEOUT)?;
        expect(&out, "migrate: guest 1 (")?;
        let (_, b) = consoles(lab);
        let id = session::wait_arrived(b, MIGRATE_TIMEOUT)?;
        // Cut B off mid post-copy: the source gives up on the link after 4 s and
        // keeps the guest's memory; B's guest runs on, waiting at missing pages.
        lab.hub()?.partition(1).map_err(|e| e.to_string())?;
        let (a, b) = consoles(lab);
        a.wait_for("post-copy interrupted", MIGRATE_TIMEOUT)?;
        b.wait_for("reconnecting to 10.0.0.1", MIGRATE_TIMEOUT)?;
        let rows = session::listed(b, "verify")?;
        if rows.len() != 1 {
            return Err(format!("the guest must stay on B while cut off: {rows:?}"));
        }
        std::thread::sleep(Duration::from_secs(5));
        lab.hub()?.heal(1).map_err(|e| e.to_string())?;
        let (a, b) = consoles(lab);
        b.wait_for("reconnected to its source", MIGRATE_TIMEOUT)?;
        a.wait_for("migrated to 10.0.0.2", MIGRATE_TIMEOUT)?;
        let done = b.wait_for("post-copy complete, all ", MIGRATE_TIMEOUT)?;
        eprintln!("{}", done.lines().last().unwrap_or(""));
        if !b
            .wait_for("\n", CMD_TIMEOUT)?
            .contains("link recovered 1 times")
        {
            return Err("B did not count the recovery".into());
        }
        if !session::self_check(b, "verify", id)? {
            return Err("verify guest failed its check after a recovered post-copy".into());
        }
        if !session::listed(a, "verify")?.is_empty() {
            return Err("the source still holds the guest after post-copy completed".into());
        }
        Ok(())
    });
}
