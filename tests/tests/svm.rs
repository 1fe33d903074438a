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
        expect(&stats, "INTR-slice-timer (52)")?;
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
        expect(&stats, "VMCALL/VMMCALL (18)")?;
        Ok(())
    });
}

/// The number after `key=` in a `TRACK` line.
fn field(line: &str, key: &str) -> Result<u64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in: {line}"))
}

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn qemu_tcg_svm_npt_dirty_tracking_and_forbidden_instructions() {
    scenario("qemu-tcg-svm-npt", tcg(), |lab| {
        let c = &mut lab.instances[0].console;
        // A dirtier writing a 32-page working set at 0x105000 (pages 261..=292).
        c.command("start dirtier rate=0 pages=32", CMD_TIMEOUT)?;
        c.wait_for("[g1] dirtier: wrote", GUEST_TIMEOUT)?;
        let stats = c.command("stats 1", CMD_TIMEOUT)?;
        expect(&stats, "nested tables (NPT)")?;

        // A/D flags: TCG sets D in NPT leaves; after a clear (and the TLB flush at the
        // next VMRUN) the next writes set it again, round after round.
        expect(&c.command("track 1 pml", CMD_TIMEOUT)?, "not supported")?;
        expect(&c.command("track 1 ad", CMD_TIMEOUT)?, "'ad' started")?;
        for _ in 0..3 {
            c.wait_for("[g1] dirtier: wrote", GUEST_TIMEOUT)?;
            let out = c.command("track 1", CMD_TIMEOUT)?;
            let line = out.lines().find(|l| l.starts_with("TRACK")).unwrap_or("");
            let dirty = field(line, "dirty=")?;
            if dirty < 32 {
                return Err(format!("A/D: only {dirty} dirty pages: {line}"));
            }
            expect(line, "first=[")?;
        }
        c.command("track 1 stop", CMD_TIMEOUT)?;

        // Write protection: each first write to a page is a #NPF (write, GPA in
        // EXITINFO2) and is reported; again after re-protecting.
        expect(&c.command("track 1 wp", CMD_TIMEOUT)?, "'wp' started")?;
        let mut faults = 0;
        for _ in 0..3 {
            c.wait_for("[g1] dirtier: wrote", GUEST_TIMEOUT)?;
            let out = c.command("track 1", CMD_TIMEOUT)?;
            let line = out.lines().find(|l| l.starts_with("TRACK")).unwrap_or("");
            let dirty = field(line, "dirty=")?;
            let f = field(line, "nested_faults=")?;
            if dirty < 32 || f <= faults {
                return Err(format!("WP: {dirty} dirty, {f} faults: {line}"));
            }
            faults = f;
        }
        c.command("track 1 stop", CMD_TIMEOUT)?;
        expect(&c.command("check 1", CMD_TIMEOUT)?, "verify request posted")?;
        c.wait_for("[g1] dirtier: verify: PASS", GUEST_TIMEOUT)?;

        // MONITOR, MWAIT and WBINVD are intercepted and skipped. INVD is intercepted
        // too, but QEMU 7.2's TCG never raises that intercept (measured: the guest
        // runs on; TCG models no caches, so its INVD discards nothing).
        c.command("start misbehave mode=instr", CMD_TIMEOUT)?;
        c.wait_for(
            "[g2] misbehave: survived monitor, mwait, wbinvd",
            GUEST_TIMEOUT,
        )?;
        c.wait_for("[g2] exited with code 3", GUEST_TIMEOUT)?;
        c.command("kill 2", CMD_TIMEOUT)?;

        // Forbidden instructions stop only the guest that ran them, with the reason.
        let cases: &[(&str, &[&str])] = &[
            ("rdpmc", &["STOPPED: RDPMC"]),
            ("xsetbv", &["STOPPED: exception 6 (invalid opcode)"]),
            ("vmx", &["STOPPED: exception 6 (invalid opcode)"]),
            ("sgdt", &["STOPPED: descriptor-table instruction"]),
            (
                "sse",
                &["STOPPED: control register: write of", "no FP/SIMD"],
            ),
            ("x87", &["STOPPED: exception 7 (device not available)"]),
            (
                "cd",
                &[
                    "STOPPED: control register: write of",
                    "caching is the host's",
                ],
            ),
            ("outside", &["STOPPED: exception 14 (page fault)"]),
            ("ud", &["STOPPED: exception 6 (invalid opcode)"]),
            ("io", &["STOPPED: I/O port access"]),
            ("msr", &["STOPPED: MSR access to 0x10 is not allowed"]),
        ];
        for (n, (mode, expected)) in cases.iter().enumerate() {
            let id = n + 3;
            c.command(&format!("start misbehave mode={mode}"), CMD_TIMEOUT)?;
            let text = c.wait_for(&format!("[g{id}] STOPPED"), GUEST_TIMEOUT)?;
            let line = c.wait_for("\n", CMD_TIMEOUT)?;
            let all = format!("{text}{line}");
            for e in *expected {
                expect(&all, e).map_err(|e| format!("mode {mode}: {e}"))?;
            }
            c.command(&format!("kill {id}"), CMD_TIMEOUT)?;
        }
        // A guest hammering every hypercall with garbage (buffers across and outside
        // its memory, a NIC ring rewritten with junk) only gets errors.
        let id = cases.len() + 3;
        c.command("start misbehave mode=hammer secs=10", CMD_TIMEOUT)?;
        c.wait_for(&format!("[g{id}] misbehave: hammer done"), GUEST_TIMEOUT)?;
        // The dirtier was never disturbed.
        c.wait_for("[g1] dirtier: wrote", GUEST_TIMEOUT)?;
        let text = c.command("vms", CMD_TIMEOUT)?;
        if text.contains("HYPERVISOR") {
            return Err("hypervisor fault".into());
        }
        Ok(())
    });
}
