//! Boot scenarios: the image comes up in Bochs with VMX and EPT, in QEMU/TCG with AMD SVM
//! and NPT instead of VMX (and says so), and the console answers bad input with errors.

use hv_tests::{expect, scenario, Emulator, Setup, CMD_TIMEOUT};
use std::time::Duration;

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn bochs_boot_info_reports_vmx_with_ept_and_console_rejects_bad_input() {
    scenario("bochs-boot", Setup::bochs(), |lab| {
        let c = &mut lab.instances[0].console;
        let info = c.command("info", CMD_TIMEOUT)?;
        expect(&info, "vmx         yes")?;
        expect(&info, "EPT=yes")?;
        expect(&info, "EPT-A/D=yes")?;
        expect(&info, "PML=yes")?;
        let out = c.command("frobnicate 1 2", CMD_TIMEOUT)?;
        expect(&out, "error: unknown command 'frobnicate'")?;
        let out = c.command("log loud", CMD_TIMEOUT)?;
        expect(&out, "error: unknown log level 'loud'")?;
        let out = c.command("log", CMD_TIMEOUT)?;
        expect(&out, "error: usage: log")?;
        let long = "x".repeat(400);
        let out = c.command(&long, CMD_TIMEOUT)?;
        expect(&out, "error: line too long")?;
        let out = c.command("help", CMD_TIMEOUT)?;
        expect(&out, "shutdown")?;
        c.send_line("shutdown")?;
        c.wait_for("shutting down", CMD_TIMEOUT)?;
        if !lab.instances[0].wait_exit(Duration::from_secs(60)) {
            return Err("Bochs did not exit after shutdown".into());
        }
        Ok(())
    });
}

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn qemu_tcg_boot_reports_svm_instead_of_vmx_and_keeps_console() {
    scenario(
        "qemu-tcg-boot",
        Setup {
            emulator: Emulator::QemuTcg,
            pair: false,
            net: false,
            extra_hub_ports: 0,
        },
        |lab| {
            let boot_log = lab.instances[0].console.log();
            expect(&boot_log, "SVM: enabled")?;
            let c = &mut lab.instances[0].console;
            let info = c.command("info", CMD_TIMEOUT)?;
            expect(&info, "vmx         no (AMD CPU)")?;
            expect(&info, "svm         yes")?;
            expect(&info, "NPT=yes")?;
            let out = c.command("mem", CMD_TIMEOUT)?;
            expect(&out, "frames")?;
            c.send_line("shutdown")?;
            c.wait_for("shutting down", CMD_TIMEOUT)?;
            if !lab.instances[0].wait_exit(Duration::from_secs(30)) {
                return Err("QEMU did not exit after shutdown".into());
            }
            Ok(())
        },
    );
}
