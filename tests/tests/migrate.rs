//! Live-migration scenarios on a Bochs pair (A = 10.0.0.1, B = 10.0.0.2), plus a host
//! endpoint on the same virtual Ethernet that plays a hostile or vanishing source.

use std::time::Duration;

use hv_tests::{expect, migrate, scenario, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::bxnet::BxEndpoint;
use hv_tools::{session, streams};

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_live_migration_round_trip_with_verification() {
    let setup = Setup {
        emulator: Emulator::Bochs,
        pair: true,
        net: true,
        extra_hub_ports: 1,
    };
    scenario("bochs-migrate", setup, |lab| {
        let hub_base = lab.hub_base;
        let key = lab.key.clone();
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);

        // 1. A counter migrates A -> B (PML) and continues without a gap.
        a.command("start counter period=100", CMD_TIMEOUT)?;
        a.wait_for("[g1] counter 5 ", GUEST_TIMEOUT)?;
        let id_b = migrate(a, b, 1, "10.0.0.2", "")?;
        let on_a = session::counter_values(&a.log(), 1)
            .last()
            .copied()
            .ok_or("no counter output on A")?;
        b.wait_for(&format!("[g{id_b}] counter"), GUEST_TIMEOUT)?;
        b.wait_for("\n", CMD_TIMEOUT)?;
        let first_b = session::counter_values(&b.log(), id_b)
            .first()
            .copied()
            .ok_or("no counter output on B")?;
        if first_b != on_a + 1 {
            return Err(format!(
                "counter gap: last on A {on_a}, first on B {first_b}"
            ));
        }
        let vms_a = a.command("vms", CMD_TIMEOUT)?;
        if vms_a.contains("counter") {
            return Err(format!(
                "migrated guest still listed on the source:\n{vms_a}"
            ));
        }
        expect(&a.command("migrations", CMD_TIMEOUT)?, " ok")?;

        // 2. The verify guest migrates while rewriting its memory (EPT A/D scanning) and
        //    passes its own check on the destination.
        a.command("start verify mem=8 rate=100 check=2", CMD_TIMEOUT)?;
        a.wait_for("[g2] verify: PASS", GUEST_TIMEOUT)?;
        //    With verify=full the destination also compares every page with the
        //    source's memory at the freeze.
        let vid_b = migrate(a, b, 2, "10.0.0.2", "dirty=ad verify=full")?;
        if !b.log().contains("verify=full: all 2048 pages match") {
            return Err("verify=full: the destination did not report the comparison".into());
        }
        b.command(&format!("check {vid_b}"), CMD_TIMEOUT)?;
        b.wait_for(&format!("[g{vid_b}] verify: PASS"), GUEST_TIMEOUT)?;

        // 3. A hostile source that holds the key (so the channel lets it through):
        //    malformed streams to A are rejected, A keeps serving.
        let mut ep = BxEndpoint::new(
            hub_base + 4,
            [0x52, 0x54, 0, 0x12, 0x34, 0x99],
            [10, 0, 0, 9],
        )?;
        for s in streams::malformed() {
            ep.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))
                .and_then(|()| ep.secure(&key, Duration::from_secs(60)))
                .map_err(|e| format!("{}: {e}", s.name))?;
            let _ = ep.send_all(&s.bytes, Duration::from_secs(60));
            ep.close();
            a.wait_for("incoming migration discarded: ", MIGRATE_TIMEOUT)
                .map_err(|e| format!("{}: {e}", s.name))?;
            let line = a.wait_for("\n", CMD_TIMEOUT)?;
            if !line.contains(s.expect) {
                return Err(format!(
                    "{}: expected '{}' in the rejection, got '{line}'",
                    s.name, s.expect
                ));
            }
        }
        // 4. A complete stream whose source vanishes after READY: never runs on A.
        ep.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))?;
        ep.secure(&key, Duration::from_secs(60))?;
        ep.send_all(
            &streams::complete_without_commit(),
            Duration::from_secs(120),
        )?;
        let reply = ep.recv_until_close(Duration::from_secs(5));
        ep.abort();
        drop(ep);
        if reply.first() != Some(&16) {
            return Err(format!("expected READY from A, got {reply:?}"));
        }
        a.wait_for("never sent COMMIT", MIGRATE_TIMEOUT)?;
        let vms_a = a.command("vms", CMD_TIMEOUT)?;
        let forged = vms_a
            .lines()
            .find(|l| l.contains("forged"))
            .ok_or(format!("forged guest not listed:\n{vms_a}"))?;
        if !forged.contains("paused") {
            return Err(format!("a guest without COMMIT must stay paused: {forged}"));
        }

        // 5. Back B -> A with write-protection tracking: the counter keeps counting.
        let before = a.log().len();
        let id_a = migrate(b, a, id_b, "10.0.0.1", "dirty=wp")?;
        // The guest may say so before or after the "arrived" line: look in the log.
        let said = format!("[g{id_a}] counter: migrated (now 2 migrations)");
        if !a.log()[before..].contains(&said) {
            a.wait_for(&said, GUEST_TIMEOUT)?;
        }
        let on_b = session::counter_values(&b.log(), id_b)
            .last()
            .copied()
            .ok_or("no counter on B")?;
        let first_a = session::counter_values(&a.log()[before..], id_a)
            .first()
            .copied()
            .ok_or("no counter back on A")?;
        if first_a != on_b + 1 {
            return Err(format!(
                "counter gap on the way back: last on B {on_b}, first on A {first_a}"
            ));
        }
        Ok(())
    });
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_peer_killed_mid_migration_keeps_guest_on_source() {
    scenario("bochs-migrate-kill", Setup::bochs_pair(), |lab| {
        let c = &mut lab.instances[0].console;
        c.command("start verify mem=16 rate=500 check=2", CMD_TIMEOUT)?;
        c.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;
        // Stop-and-copy mode freezes first; killing the peer must thaw the guest again.
        expect(
            &c.command("migrate 1 10.0.0.2 mode=stop", CMD_TIMEOUT)?,
            "migrate: guest 1",
        )?;
        std::thread::sleep(Duration::from_secs(3));
        lab.instances[1].kill();
        let c = &mut lab.instances[0].console;
        let text = c.wait_for("migrate: FAILED", MIGRATE_TIMEOUT)?;
        let _ = text;
        c.wait_for("keeps running here", CMD_TIMEOUT)?;
        let vms = c.command("vms", CMD_TIMEOUT)?;
        let line = vms
            .lines()
            .find(|l| l.contains(" verify ") && l.contains("Mi "))
            .ok_or(format!("verify guest gone:\n{vms}"))?;
        if line.contains("frozen") || line.contains("stopped") {
            return Err(format!(
                "guest not running after a failed migration: {line}"
            ));
        }
        c.command("check 1", CMD_TIMEOUT)?;
        c.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;

        // The peer killed in the phases that last milliseconds, held open with `hold`.
        // Destination killed while the source drains, and while it holds READY: the
        // source gives up and the guest runs on.
        for (point, holder) in [("drain", 0), ("ready", 1)] {
            lab.restart(1, BOOT_TIMEOUT)?;
            lab.instances[holder]
                .console
                .command(&format!("hold {point} 3000"), CMD_TIMEOUT)?;
            let c = &mut lab.instances[0].console;
            expect(
                &c.command("migrate 1 10.0.0.2 timeout=8", CMD_TIMEOUT)?,
                "migrate: guest 1",
            )?;
            lab.instances[holder]
                .console
                .wait_for(&format!("hold: {point} for"), MIGRATE_TIMEOUT)?;
            lab.instances[1].kill();
            let c = &mut lab.instances[0].console;
            c.wait_for("migrate: FAILED", MIGRATE_TIMEOUT)?;
            c.wait_for("keeps running here", CMD_TIMEOUT)?;
            c.command("check 1", CMD_TIMEOUT)?;
            c.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;
            eprintln!("migrate-kill: destination killed at {point}: the guest runs on at A");
        }

        // Source killed after READY, before COMMIT: the guest is the destination's
        // now; it keeps it paused and says so, and `resume` runs it there.
        lab.restart(1, BOOT_TIMEOUT)?;
        let c = &mut lab.instances[0].console;
        c.command("hold commit 3000", CMD_TIMEOUT)?;
        expect(
            &c.command("migrate 1 10.0.0.2 timeout=8", CMD_TIMEOUT)?,
            "migrate: guest 1",
        )?;
        c.wait_for("hold: commit for", MIGRATE_TIMEOUT)?;
        lab.instances[0].kill();
        let b = &mut lab.instances[1].console;
        let id = session::wait_commit_lost(b, MIGRATE_TIMEOUT)?;
        expect(&b.command(&format!("resume {id}"), CMD_TIMEOUT)?, "resumed")?;
        b.command(&format!("check {id}"), CMD_TIMEOUT)?;
        b.wait_for(&format!("[g{id}] verify: PASS"), GUEST_TIMEOUT)?;
        eprintln!("migrate-kill: source killed after READY: paused on B, resumed there, passes");
        Ok(())
    });
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
