//! VMX scenarios in Bochs: guests run under EPT, interleave, misbehave without harming
//! anyone else, and verify their memory. One boot serves all checks (emulators are slow).

use std::time::Duration;

use hv_tests::{expect, scenario, Setup, CMD_TIMEOUT};

/// Waiting for guest output: generous, since Bochs time-slices several guests.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn bochs_guests_run_interleave_misbehave_and_verify() {
    scenario("bochs-guests", Setup::bochs(), |lab| {
        let c = &mut lab.instances[0].console;
        let images = c.command("images", CMD_TIMEOUT)?;
        for g in ["hello", "counter", "dirtier", "verify", "misbehave"] {
            expect(&images, g)?;
        }

        // hello prints and exits.
        let out = c.command("start hello", CMD_TIMEOUT)?;
        expect(&out, "started guest 1 (hello")?;
        c.wait_for("[g1] hello from guest 1", GUEST_TIMEOUT)?;
        c.wait_for("[g1] exited with code 0", GUEST_TIMEOUT)?;

        // Two counters interleave.
        c.command("start counter period=100", CMD_TIMEOUT)?;
        c.command("start counter period=100", CMD_TIMEOUT)?;
        c.wait_for("[g2] counter 3 ", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter 3 ", GUEST_TIMEOUT)?;
        c.wait_for("[g2] counter 6 ", GUEST_TIMEOUT)?;

        // Bad requests are refused with errors; nothing changes.
        for (cmd, err) in [
            ("start nosuch", "error: no image 'nosuch'"),
            ("start counter mem=100000", "error: memory must be"),
            ("pause 99", "error: no guest with id 99"),
            ("kill x", "error: bad guest id 'x'"),
            ("resume 2", "error: guest 2 is"),
        ] {
            let out = c.command(cmd, CMD_TIMEOUT)?;
            expect(&out, err)?;
        }

        // Pause/resume: a paused counter stops, the other goes on.
        let out = c.command("pause 2", CMD_TIMEOUT)?;
        expect(&out, "guest 2 paused")?;
        let vms = c.command("vms", CMD_TIMEOUT)?;
        expect(&vms, "paused")?;
        c.wait_for("[g3] counter 12 ", GUEST_TIMEOUT)?;
        let out = c.command("resume 2", CMD_TIMEOUT)?;
        expect(&out, "guest 2 resumed")?;

        // The misbehaving guest gets errors for bad hypercalls, then is stopped at its
        // illegal access, while the counters keep counting.
        c.command("start misbehave", CMD_TIMEOUT)?;
        c.wait_for("[g4] misbehave: badptr -> error 2", GUEST_TIMEOUT)?;
        c.wait_for("[g4] misbehave: hugelen -> error 3", GUEST_TIMEOUT)?;
        c.wait_for("[g4] misbehave: unknown -> error 1", GUEST_TIMEOUT)?;
        c.wait_for("[g4] STOPPED", GUEST_TIMEOUT)?;
        let text = c.wait_for("[g3] counter 20 ", GUEST_TIMEOUT)?;
        if text.contains("HYPERVISOR") {
            return Err("hypervisor fault while a guest misbehaved".into());
        }

        let stats = c.command("stats 3", CMD_TIMEOUT)?;
        expect(&stats, "VMCALL (18)")?;

        // A CPU hog is time-sliced by the preemption timer: the counter still counts.
        c.command("start dirtier rate=0 pages=32", CMD_TIMEOUT)?;
        c.wait_for("[g5] dirtier: wrote", GUEST_TIMEOUT)?;
        // Two more counter lines after the hog got going.
        c.wait_for("[g3] counter ", GUEST_TIMEOUT)?;
        c.wait_for("[g3] counter ", GUEST_TIMEOUT)?;
        let stats = c.command("stats 5", CMD_TIMEOUT)?;
        expect(&stats, "preemption-timer (52)")?;
        expect(&c.command("check 5", CMD_TIMEOUT)?, "verify request posted")?;
        c.wait_for("[g5] dirtier: verify: PASS", GUEST_TIMEOUT)?;
        expect(&c.command("kill 5", CMD_TIMEOUT)?, "guest 5 killed")?;

        // Kill frees the guests; vms reflects it.
        expect(&c.command("kill 2", CMD_TIMEOUT)?, "guest 2 killed")?;
        expect(&c.command("kill 3", CMD_TIMEOUT)?, "guest 3 killed")?;
        let vms = c.command("vms", CMD_TIMEOUT)?;
        if vms.contains("counter") {
            return Err(format!("killed guests still listed:\n{vms}"));
        }

        // The verify guest passes its own check after running a while.
        c.command("start verify mem=8 rate=2000", CMD_TIMEOUT)?;
        c.wait_for("[g6] verify: PASS", GUEST_TIMEOUT)?;
        expect(&c.command("check 6", CMD_TIMEOUT)?, "verify request posted")?;
        c.wait_for("[g6] verify: PASS", GUEST_TIMEOUT)?;
        let stats = c.command("stats 6", CMD_TIMEOUT)?;
        expect(&stats, "verify: PASS")?;
        Ok(())
    });
}
