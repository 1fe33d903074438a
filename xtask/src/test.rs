//! `cargo xtask test`: the host unit tests of the whole workspace, then the end-to-end
//! scenarios (tests/ crate, `#[ignore]`d in plain `cargo test` because they need the
//! image and the emulators), one at a time.

use std::process::Command;

use crate::{build, deps, out_dir, root};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo xtask test [--host-only] [filter]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let host_only = args.iter().any(|a| a == "--host-only");
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    eprintln!("xtask: host unit tests");
    let ok = cargo()
        .current_dir(root())
        .args(["test", "--workspace"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("host unit tests failed".into());
    }
    // The guests' pure logic (the verify invariant, argument parsing) also runs on the host.
    let ok = cargo()
        .current_dir(root().join("guests"))
        .args(["test", "-p", "rt", "--target", "x86_64-unknown-linux-gnu"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("guest runtime host tests failed".into());
    }
    if host_only {
        return Ok(());
    }
    let iso = build::run_build()?;
    deps::ensure(deps::BOCHS_TOOLS)?;
    deps::ensure(deps::QEMU_TOOLS)?;
    eprintln!("xtask: end-to-end scenarios (emulators; this takes several minutes)");
    let mut c = cargo();
    c.current_dir(root())
        .env("HV_ISO", &iso)
        .env("HV_WORK", out_dir().join("e2e"))
        .args([
            "test",
            "-p",
            "hv-tests",
            "--",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ]);
    c.args(filter);
    let ok = c.status().map(|s| s.success()).unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err("end-to-end scenarios failed (serial logs above and in out/e2e/)".into())
    }
}
