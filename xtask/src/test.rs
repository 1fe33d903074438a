//! `cargo xtask test`: the host unit tests of the whole workspace, then the end-to-end
//! scenarios (tests/ crate, `#[ignore]`d in plain `cargo test` because they need the
//! image and the emulators), one at a time, each in its own `cargo test` so that the
//! progress display knows which one runs and how many are left.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use clap::Args;

use crate::progress::{Logger, Progress};
use crate::{build, deps, out_dir, root};

/// `cargo xtask test` options.
#[derive(Clone, Debug, Args)]
pub struct TestArgs {
    /// Stop after the host unit tests (no image, no emulators).
    #[arg(long)]
    pub host_only: bool,
    /// Run only the end-to-end scenarios whose name contains one of these.
    #[arg(value_name = "FILTER")]
    pub filter: Vec<String>,
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo xtask test [--host-only] [filter]`.
pub fn run(args: &TestArgs) -> Result<(), String> {
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
        .args([
            "test",
            "-p",
            "rt",
            "-p",
            "kv",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("guest runtime host tests failed".into());
    }
    if args.host_only {
        return Ok(());
    }
    let iso = build::run_build()?;
    deps::ensure(deps::BOCHS_TOOLS)?;
    deps::ensure(deps::QEMU_TOOLS)?;
    let scenarios = match list_scenarios() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xtask: cannot list the scenarios ({e}); running them in one go");
            return run_all_at_once(&iso, &args.filter);
        }
    };
    let chosen = select(&scenarios, &args.filter);
    if chosen.is_empty() {
        return Err(format!("no end-to-end scenario matches {:?}", args.filter));
    }
    eprintln!(
        "xtask: {} end-to-end scenario(s) in the emulators; this takes several minutes",
        chosen.len()
    );
    let mut progress = Progress::new("e2e", chosen.len() as u64);
    let mut failed = Vec::new();
    for (target, name) in &chosen {
        progress.start(name);
        let mut c = e2e_cargo(&iso);
        c.args(["--test", target, "--", "--exact", name]);
        if !run_logged(c, &progress.logger())? {
            failed.push(name.as_str());
        }
        progress.finish_one();
    }
    progress.finish();
    eprintln!(
        "scenarios: {} passed, {} failed",
        chosen.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "end-to-end scenarios failed: {} (serial logs above and in out/e2e/)",
            failed.join(", ")
        ))
    }
}

/// `cargo test -p hv-tests` for the emulator scenarios; the caller adds target and names.
fn e2e_cargo(iso: &Path) -> Command {
    let mut c = cargo();
    c.current_dir(root())
        .env("HV_ISO", iso)
        .env("HV_WORK", out_dir().join("e2e"))
        .args(["test", "-p", "hv-tests"]);
    c
}

fn e2e_args() -> [&'static str; 3] {
    ["--ignored", "--test-threads=1", "--nocapture"]
}

/// The scenario binaries (tests/tests/*.rs) and the `#[ignore]`d tests in each.
fn list_scenarios() -> Result<Vec<(String, String)>, String> {
    let dir = root().join("tests").join("tests");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    targets.sort();
    let mut out = Vec::new();
    for t in targets {
        let o = cargo()
            .current_dir(root())
            .args(["test", "-q", "-p", "hv-tests", "--test", &t, "--"])
            .args(["--ignored", "--list"])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("listing the tests of {t} failed"));
        }
        let names = parse_list(&String::from_utf8_lossy(&o.stdout));
        out.extend(names.into_iter().map(|n| (t.clone(), n)));
    }
    Ok(out)
}

/// Test names from libtest's `--list` output (`name: test` lines).
fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .collect()
}

/// The scenarios whose name contains one of `filter` (all without a filter), as
/// libtest's own filter does.
fn select(all: &[(String, String)], filter: &[String]) -> Vec<(String, String)> {
    all.iter()
        .filter(|(_, n)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .cloned()
        .collect()
}

/// Runs `c` with its output passed line by line through `log` (so a progress bar stays
/// intact); returns whether it succeeded.
fn run_logged(mut c: Command, log: &Logger) -> Result<bool, String> {
    c.args(e2e_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cargo test: {e}"))?;
    let forward = |r: Box<dyn Read + Send>, log: Logger| {
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                log.line(&line);
            }
        })
    };
    let out = forward(Box::new(child.stdout.take().expect("piped")), log.clone());
    let err = forward(Box::new(child.stderr.take().expect("piped")), log.clone());
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = (out.join(), err.join());
    Ok(status.success())
}

/// The scenarios in one `cargo test` (when they cannot be listed).
fn run_all_at_once(iso: &Path, filter: &[String]) -> Result<(), String> {
    let mut c = e2e_cargo(iso);
    c.arg("--").args(e2e_args()).args(filter);
    let ok = c.status().map(|s| s.success()).unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err("end-to-end scenarios failed (serial logs above and in out/e2e/)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_filters_scenarios() {
        let names = parse_list("boot_one: test\nmigrate_two: test\n\n2 tests, 0 benchmarks\n");
        assert_eq!(names, ["boot_one", "migrate_two"]);
        let all: Vec<(String, String)> = names.into_iter().map(|n| ("t".to_string(), n)).collect();
        assert_eq!(select(&all, &[]).len(), 2);
        let f = select(&all, &["migr".to_string()]);
        assert_eq!(f, [("t".to_string(), "migrate_two".to_string())]);
        assert!(select(&all, &["nope".to_string()]).is_empty());
    }

    #[test]
    fn child_status_is_reported() {
        let log = Progress::new("t", 1).logger();
        assert!(run_logged(Command::new("true"), &log).unwrap());
        assert!(!run_logged(Command::new("false"), &log).unwrap());
        assert!(run_logged(Command::new("/nonexistent/prog"), &log).is_err());
    }
}
