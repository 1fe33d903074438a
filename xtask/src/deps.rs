//! Checks for the external tools xtask needs and installs missing Debian packages when
//! running as root (otherwise prints the exact command).

use std::process::Command;

/// (program, Debian package) pairs.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
];
/// Needed to boot in Bochs.
pub const BOCHS_TOOLS: &[(&str, &str)] = &[("bochs", "bochs")];
/// Needed to boot in QEMU.
pub const QEMU_TOOLS: &[(&str, &str)] = &[("qemu-system-x86_64", "qemu-system-x86")];

/// Extra packages that provide no program to look for (GRUB's BIOS modules, the
/// emulators' firmware).
fn extra_packages(tools: &[(&str, &str)]) -> Vec<&'static str> {
    let mut v = Vec::new();
    if tools.iter().any(|(p, _)| *p == "grub-mkrescue") {
        v.push("grub-pc-bin");
    }
    if tools.iter().any(|(p, _)| *p == "bochs") {
        v.extend(["bochsbios", "vgabios"]);
    }
    v
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure every tool is present (and the firmware/GRUB data packages with them).
pub fn ensure(tools: &[(&str, &str)]) -> Result<(), String> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(p, _)| !have(p))
        .map(|(_, pkg)| *pkg)
        .collect();
    let firmware_missing = (tools.iter().any(|(p, _)| *p == "bochs")
        && !std::path::Path::new("/usr/share/bochs/BIOS-bochs-latest").exists())
        || (tools.iter().any(|(p, _)| *p == "grub-mkrescue")
            && !std::path::Path::new("/usr/lib/grub/i386-pc").exists());
    if missing.is_empty() && !firmware_missing {
        return Ok(());
    }
    missing.extend(extra_packages(tools));
    missing.sort();
    missing.dedup();
    let line = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        return Err(format!(
            "missing tools; install them with:\n  sudo apt-get update && sudo {line}"
        ));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive {line} -qq"),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "installing packages failed; try:\n  apt-get update && {line}"
        ))
    }
}

/// Adds the bare-metal Rust target (quick when present).
pub fn ensure_rust_target() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(o) = &out {
        if String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.trim() == "x86_64-unknown-none")
        {
            return Ok(());
        }
    }
    let ok = Command::new("rustup")
        .args(["target", "add", "x86_64-unknown-none"])
        .status()
        .map(|s| s.success());
    match ok {
        Ok(true) => Ok(()),
        _ => Err("cannot add the Rust target; run: rustup target add x86_64-unknown-none".into()),
    }
}
