//! `cargo xtask run`: boots one instance (or a linked pair) and puts its console on this
//! terminal.
//!
//! One instance: the terminal is switched to raw mode and bytes pass straight through,
//! so the hypervisor's own line editing works; Ctrl-] quits (and kills the emulator).
//! A pair: line mode with both consoles multiplexed. Output lines carry `A|`/`B|`; a
//! typed line goes to the selected instance (`@a`/`@b` switches, `a: cmd` or `b: cmd`
//! sends once); `@quit` ends both.

use std::io::{BufRead, Read, Write};
use std::process::Command;
use std::time::Duration;

use hv_tools::emu::{Emulator, Lab, LabConfig};

use crate::store::{self, LabFile, StoreArgs, StoreThread};
use crate::{build, deps, out_dir, BootOpts};

/// Checks the emulator's tools.
pub fn ensure_emulator(e: Emulator) -> Result<(), String> {
    match e {
        Emulator::Bochs => deps::ensure(deps::BOCHS_TOOLS),
        Emulator::QemuKvm | Emulator::QemuTcg => deps::ensure(deps::QEMU_TOOLS),
    }
}

/// Builds and boots per `opts`; returns the running lab.
pub fn boot(opts: &BootOpts, work: &str) -> Result<Lab, String> {
    boot_with(opts, work, 0)
}

/// [`boot`] with `extra_hub_ports` hub ports for host endpoints after the instances'
/// (the guest store's, for `run`).
pub fn boot_with(opts: &BootOpts, work: &str, extra_hub_ports: u16) -> Result<Lab, String> {
    let iso = build::run_build()?;
    ensure_emulator(opts.emulator)?;
    if let Some(b) = opts.emulator_b {
        ensure_emulator(b)?;
    }
    let cfg = LabConfig {
        emulator: opts.emulator,
        emulator_b: opts.emulator_b,
        iso,
        work_dir: out_dir().join(work),
        pair: opts.pair,
        mem_mib: opts.mem_mib,
        bochs_ips: opts.ips,
        net: true,
        extra_hub_ports,
        hub: opts.hub.clone(),
    };
    eprintln!(
        "xtask: booting {} instance(s) in {} (logs in {})",
        if opts.pair { 2 } else { 1 },
        opts.emulator,
        cfg.work_dir.display()
    );
    let lab = Lab::start(&cfg, Duration::from_secs(300))?;
    eprintln!(
        "xtask: a fresh migration key was set on every instance (kept in {}; 'key' shows its fingerprint)",
        cfg.work_dir.join("migration.key").display()
    );
    Ok(lab)
}

fn stty(args: &[&str]) {
    let _ = Command::new("stty")
        .args(args)
        .stdin(
            std::fs::File::open("/dev/tty")
                .map(Into::into)
                .unwrap_or(std::process::Stdio::null()),
        )
        .status();
}

/// `cargo xtask run`; with `store`, a guest store runs beside the lab.
///
/// The lab's hub always reserves one port after the instances' for a store, and
/// `out/run/lab.json` says which, so `cargo xtask store` can join this lab later.
pub fn run(opts: &BootOpts, store: Option<&StoreArgs>) -> Result<(), String> {
    let mut lab = boot_with(opts, "run", 1)?;
    let work = out_dir().join("run");
    let instances = lab.instances.len() as u16;
    let store_hub_port = lab.hub_base + 2 * instances;
    store::write_lab_file(
        &work,
        &LabFile {
            pid: std::process::id(),
            hub_base: lab.hub_base,
            instances,
            store_hub_port,
            key_file: work.join("migration.key"),
        },
    )?;
    let store = match store {
        Some(a) => {
            let t = store::spawn(a, &work.join("migration.key"), store_hub_port)?;
            eprintln!(
                "xtask: guest store at {} (directory {}): 'checkpoint <vm> {}', 'restore {} <name>'",
                a.ip,
                a.dir.display(),
                a.ip,
                a.ip
            );
            Some(t)
        }
        None => {
            eprintln!(
                "xtask: hub port {store_hub_port} is reserved for a guest store: 'cargo xtask store' joins this lab"
            );
            None
        }
    };
    for inst in &lab.instances {
        print!("{}", inst.console.log());
    }
    let r = if opts.pair {
        pair_terminal(&mut lab, store.as_ref())
    } else {
        single_terminal(&mut lab, store.as_ref())
    };
    drop(store);
    let _ = std::fs::remove_file(work.join(store::LAB_FILE));
    r
}

/// Prints the store's lines that arrived (`S| ...`), with `eol` at their ends.
fn store_lines(store: Option<&StoreThread>, eol: &str) {
    if let Some(s) = store {
        while let Ok(l) = s.lines.try_recv() {
            print!("S| {l}{eol}");
        }
    }
}

fn single_terminal(lab: &mut Lab, store: Option<&StoreThread>) -> Result<(), String> {
    eprintln!("\r\nxtask: console attached (Ctrl-] to quit)\r");
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        stty(&["raw", "-echo"]);
    }
    let inst = &mut lab.instances[0];
    let mut printed = inst.console.log().len();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Vec::new());
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let result = loop {
        store_lines(store, "\r\n");
        let log = inst.console.log();
        if log.len() > printed {
            let mut out = std::io::stdout();
            let _ = out.write_all(log[printed..].replace('\n', "\r\n").as_bytes());
            let _ = out.flush();
            printed = log.len();
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(bytes) if bytes.is_empty() => break Ok(()),
            Ok(bytes) if bytes.contains(&0x1d) => break Ok(()),
            Ok(bytes) => {
                if let Err(e) = inst.console.send_raw(&bytes) {
                    break Err(e);
                }
            }
            Err(_) => {}
        }
        if !inst.running() {
            break Ok(());
        }
    };
    if interactive {
        stty(&["sane"]);
    }
    eprintln!("\nxtask: session ended");
    result
}

fn pair_terminal(lab: &mut Lab, store: Option<&StoreThread>) -> Result<(), String> {
    eprintln!("xtask: pair ready. Lines go to the selected instance (now A); '@a'/'@b' switch,");
    eprintln!("       'a: <cmd>' / 'b: <cmd>' send once, '@quit' ends both. A is 10.0.0.1, B is 10.0.0.2.");
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut printed: Vec<usize> = lab
        .instances
        .iter()
        .map(|i| i.console.log().len())
        .collect();
    let mut partial = [String::new(), String::new()];
    let mut selected = 0usize;
    loop {
        store_lines(store, "\n");
        for (i, inst) in lab.instances.iter().enumerate() {
            let log = inst.console.log();
            if log.len() > printed[i] {
                partial[i].push_str(&log[printed[i]..]);
                printed[i] = log.len();
                while let Some(nl) = partial[i].find('\n') {
                    let line: String = partial[i].drain(..=nl).collect();
                    print!("{}| {}", ["A", "B"][i], line);
                }
                if partial[i].ends_with("hv> ") {
                    partial[i].clear();
                }
            }
        }
        let _ = std::io::stdout().flush();
        match rx.recv_timeout(Duration::from_millis(30)) {
            Ok(None) => return Ok(()),
            Ok(Some(line)) => {
                let line = line.trim();
                let (target, cmd) = match line {
                    "@quit" => return Ok(()),
                    "@a" => {
                        selected = 0;
                        continue;
                    }
                    "@b" => {
                        selected = 1;
                        continue;
                    }
                    l if l.starts_with("a:") => (0, l[2..].trim()),
                    l if l.starts_with("b:") => (1, l[2..].trim()),
                    l => (selected, l),
                };
                lab.instances[target].console.send_line(cmd)?;
            }
            Err(_) => {}
        }
    }
}
