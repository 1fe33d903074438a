//! Live migration with the AMD SVM backend: a QEMU-TCG pair (NPT dirty tracking by
//! A/D flags and by write protection), and a cross-vendor pair (A: Bochs, Intel VMX with
//! EPT/PML; B: QEMU TCG, AMD SVM with NPT) that moves guests Intel -> AMD -> Intel: the
//! vCPU state in the stream is vendor-neutral.

use std::time::Duration;

use hv_tests::{expect, migrate, scenario, scenario_cross, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::console::Console;
use hv_tools::session;

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A counter moves `src` -> `dst` and continues without a gap; returns its id there.
fn counter_moves(
    src: &mut Console,
    dst: &mut Console,
    id: u32,
    peer: &str,
    opts: &str,
) -> Result<u32, String> {
    let new = migrate(src, dst, id, peer, opts)?;
    let last = session::counter_values(&src.log(), id)
        .last()
        .copied()
        .ok_or("no counter output on the source")?;
    dst.wait_for(&format!("[g{new}] counter"), GUEST_TIMEOUT)?;
    dst.wait_for("\n", CMD_TIMEOUT)?;
    let first = session::counter_values(&dst.log(), new)
        .first()
        .copied()
        .ok_or("no counter output on the destination")?;
    if first != last + 1 {
        return Err(format!(
            "counter gap: last on the source {last}, first on the destination {first}"
        ));
    }
    Ok(new)
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn qemu_tcg_svm_pair_live_migration_round_trip_with_verification() {
    let setup = Setup {
        emulator: Emulator::QemuTcg,
        pair: true,
        net: true,
        extra_hub_ports: 0,
    };
    scenario("qemu-tcg-svm-migrate", setup, |lab| {
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);

        // A counter moves A -> B (NPT A/D flags, the best SVM offers) without a gap.
        a.command("start counter period=100", CMD_TIMEOUT)?;
        a.wait_for("[g1] counter 5 ", GUEST_TIMEOUT)?;
        let id_b = counter_moves(a, b, 1, "10.0.0.2", "")?;
        expect(&a.command("migrations", CMD_TIMEOUT)?, "ad")?;

        // The verify guest moves while rewriting its memory, by A/D flags with a full
        // comparison, and back by write protection.
        a.command("start verify mem=8 rate=100 check=2", CMD_TIMEOUT)?;
        a.wait_for("[g2] verify: PASS", GUEST_TIMEOUT)?;
        let v_b = migrate(a, b, 2, "10.0.0.2", "dirty=ad verify=full")?;
        if !b.log().contains("verify=full: all 2048 pages match") {
            return Err("verify=full: the destination did not report the comparison".into());
        }
        b.command(&format!("check {v_b}"), CMD_TIMEOUT)?;
        b.wait_for(&format!("[g{v_b}] verify: PASS"), GUEST_TIMEOUT)?;
        let v_a = migrate(b, a, v_b, "10.0.0.1", "dirty=wp")?;
        a.command(&format!("check {v_a}"), CMD_TIMEOUT)?;
        a.wait_for(&format!("[g{v_a}] verify: PASS"), GUEST_TIMEOUT)?;

        // The counter comes back too.
        counter_moves(b, a, id_b, "10.0.0.1", "")?;
        Ok(())
    });
}

#[test]
#[ignore = "boots Bochs and QEMU: run with cargo xtask test"]
fn cross_vendor_bochs_vmx_to_qemu_svm_and_back() {
    scenario_cross(
        "cross-vendor-migrate",
        Emulator::Bochs,
        Emulator::QemuTcg,
        |lab| {
            let (a, b) = lab.instances.split_at_mut(1);
            let (a, b) = (&mut a[0].console, &mut b[0].console);
            expect(&a.command("info", CMD_TIMEOUT)?, "vmx         yes")?;
            expect(&b.command("info", CMD_TIMEOUT)?, "svm         yes")?;

            // Intel -> AMD: a counter (PML on the source) continues without a gap.
            a.command("start counter period=100", CMD_TIMEOUT)?;
            a.wait_for("[g1] counter 3 ", GUEST_TIMEOUT)?;
            let id_b = counter_moves(a, b, 1, "10.0.0.2", "")?;

            // The verify guest: Intel -> AMD with a full comparison, AMD -> Intel by
            // NPT write protection; it passes its own check on each side.
            a.command("start verify mem=8 rate=100 check=2", CMD_TIMEOUT)?;
            a.wait_for("[g2] verify: PASS", GUEST_TIMEOUT)?;
            let v_b = migrate(a, b, 2, "10.0.0.2", "verify=full")?;
            if !b.log().contains("verify=full: all 2048 pages match") {
                return Err("verify=full: the destination did not report the comparison".into());
            }
            b.command(&format!("check {v_b}"), CMD_TIMEOUT)?;
            b.wait_for(&format!("[g{v_b}] verify: PASS"), GUEST_TIMEOUT)?;
            let v_a = migrate(b, a, v_b, "10.0.0.1", "dirty=wp")?;
            a.command(&format!("check {v_a}"), CMD_TIMEOUT)?;
            a.wait_for(&format!("[g{v_a}] verify: PASS"), GUEST_TIMEOUT)?;

            // AMD -> Intel: the counter comes home.
            counter_moves(b, a, id_b, "10.0.0.1", "")?;

            // Post-copy across vendors: the guest runs on the other CPU before its
            // memory is there, blocking on each missing page (EPT violation on Intel,
            // nested page fault on AMD; a hypercall whose buffer is missing is retried,
            // which on AMD arrives as #UD on the VMCALL).
            let v_b = migrate(a, b, v_a, "10.0.0.2", "mode=postcopy")?;
            b.wait_for("post-copy complete, all ", MIGRATE_TIMEOUT)?;
            b.command(&format!("check {v_b}"), CMD_TIMEOUT)?;
            b.wait_for(&format!("[g{v_b}] verify: PASS"), GUEST_TIMEOUT)?;
            let v_a = migrate(b, a, v_b, "10.0.0.1", "mode=postcopy")?;
            a.wait_for("post-copy complete, all ", MIGRATE_TIMEOUT)?;
            a.command(&format!("check {v_a}"), CMD_TIMEOUT)?;
            a.wait_for(&format!("[g{v_a}] verify: PASS"), GUEST_TIMEOUT)?;
            Ok(())
        },
    );
}
