//! `cargo xtask build`: the hypervisor (release, x86_64-unknown-none), the guests (their
//! own workspace in guests/) and a GRUB rescue ISO that boots the hypervisor with every
//! guest as a Multiboot2 module.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{deps, out_dir, root};

/// The guest images put on the ISO (module name = binary name).
pub const GUESTS: &[&str] = &[
    "hello",
    "counter",
    "dirtier",
    "verify",
    "misbehave",
    "echo",
    "kv",
];

const TARGET: &str = "x86_64-unknown-none";

/// A cargo command for the bare-metal target, without the variables an outer cargo
/// (running xtask) exports, which would leak host settings into the cross build.
fn cargo(dir: &Path) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTFLAGS" || k == "RUSTC_WRAPPER"
        {
            c.env_remove(k);
        }
    }
    c
}

fn exec(mut c: Command, what: &str) -> Result<(), String> {
    let status = c.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// Builds everything; returns the ISO path.
pub fn run_build() -> Result<PathBuf, String> {
    deps::ensure_rust_target()?;
    deps::ensure(deps::BUILD_TOOLS)?;
    let root = root();
    let mut c = cargo(&root);
    c.args([
        "build",
        "--release",
        "-p",
        "hypervisor",
        "--bin",
        "hypervisor",
        "--target",
        TARGET,
    ]);
    exec(c, "building the hypervisor")?;
    let kernel = root
        .join("target")
        .join(TARGET)
        .join("release")
        .join("hypervisor");

    let guests_dir = root.join("guests");
    let mut guest_bins = Vec::new();
    if guests_dir.join("Cargo.toml").exists() {
        let mut c = cargo(&guests_dir);
        c.args(["build", "--release", "--target", TARGET]);
        exec(c, "building the guests")?;
        for g in GUESTS {
            let p = guests_dir
                .join("target")
                .join(TARGET)
                .join("release")
                .join(g);
            if p.exists() {
                guest_bins.push((g.to_string(), p));
            }
        }
    }

    let iso_root = out_dir().join("iso");
    let _ = fs::remove_dir_all(&iso_root);
    fs::create_dir_all(iso_root.join("boot/grub")).map_err(|e| e.to_string())?;
    fs::create_dir_all(iso_root.join("boot/guests")).map_err(|e| e.to_string())?;
    fs::copy(&kernel, iso_root.join("boot/hypervisor.elf"))
        .map_err(|e| format!("copy kernel: {e}"))?;
    let mut modules = String::new();
    for (name, path) in &guest_bins {
        fs::copy(path, iso_root.join(format!("boot/guests/{name}.elf")))
            .map_err(|e| e.to_string())?;
        modules.push_str(&format!("  module2 /boot/guests/{name}.elf {name}\n"));
    }
    let cfg = format!(
        "set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         menuentry \"hvmig\" {{\n  multiboot2 /boot/hypervisor.elf\n{modules}  boot\n}}\n"
    );
    fs::write(iso_root.join("boot/grub/grub.cfg"), cfg).map_err(|e| e.to_string())?;
    let iso = out_dir().join("hvmig.iso");
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&iso_root)
        .output()
        .map_err(|e| format!("grub-mkrescue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "xtask: built {} ({} guest image(s))",
        iso.display(),
        guest_bins.len()
    );
    Ok(iso)
}
