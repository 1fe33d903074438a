//! AMD SVM scenarios in QEMU/TCG (`-cpu max`: AuthenticAMD with SVM and nested paging):
//! the same guests as under Bochs' VMX run under NPT, with the same hypercalls (VMCALL
//! arrives as #UD and is recognised), time-sliced by the INTR intercept.

use std::time::Duration;

use hv_tests::{expect, scenario, Emulator, Setup, CMD_TIMEOUT};

const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn tcg() -> Setup {
    Setup {
        emulator: Emulator::QemuTcg,
        pair: false,
        net: false,
        extra_hub_ports: 0,
    }
}

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn qemu_tcg_svm_guests_run_interleave_and_verify() {
    scenario("qemu-tcg-svm", tcg(), |lab| {
        let boot_log = lab.instances[0].console.log();
        expect(&boot_log, "SVM: enabled")?;
        let c = &mut lab.instances[0].console;
        let info = c.command("info", CMD_TIMEOUT)?;
        expect(&info, "svm         yes")?;
        expect(&info, "NPT=yes")?;

        let out = c.command("start hello", CMD_TIMEOUT)?;
        expect(&out, "started guest 1 (hello")?;
        c.wait_for("[g1] hello from guest 1", GUEST_TIMEOUT)?;
        c.wait_for("[g1] exited with code 0", GUEST_TIMEOUT)?;

        c.command("start counter period=100", CMD_TIMEOUT)?;
        c.command("start counter period=100", CMD_TIMEOUT)?;
        c.wait_for("[g2] counter 3 ", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter 3 ", GUEST_TIMEOUT)?;

        // A CPU hog is time-sliced by the timer interrupt: the counter still counts.
        c.command("start dirtier rate=0 pages=32", CMD_TIMEOUT)?;
        c.wait_for("[g4] dirtier: wrote", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter ", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter ", GUEST_TIMEOUT)?;
        let stats = c.command("stats 4", CMD_TIMEOUT)?;
        expect(&stats, "(52)")?;
        expect(&c.command("check 4", CMD_TIMEOUT)?, "verify request posted")?;
        c.wait_for("[g4] dirtier: verify: PASS", GUEST_TIMEOUT)?;
        expect(&c.command("kill 4", CMD_TIMEOUT)?, "guest 4 killed")?;

        c.command("start verify mem=8 rate=2000", CMD_TIMEOUT)?;
        c.wait_for("[g5] verify: PASS", GUEST_TIMEOUT)?;

        // Misbehaviour stops only the guest.
        c.command("start misbehave", CMD_TIMEOUT)?;
        c.wait_for("[g6] misbehave: unknown -> error 1", GUEST_TIMEOUT)?;
        c.wait_for("[g6] STOPPED", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter ", GUEST_TIMEOUT)?;
        let stats = c.command("stats 3", CMD_TIMEOUT)?;
        expect(&stats, "VMCALL (18)")?;
        Ok(())
    });
}
