//! `cargo xtask store`: the guest store (`hv_tools::store`, also the standalone
//! `hvstore` program) on the network of the lab that `cargo xtask run` is running, so
//! its hypervisors can `checkpoint` guests to 10.0.0.9 and `restore` them from it.
//!
//! A lab's hub has a fixed set of ports, chosen when it starts, so `cargo xtask run`
//! always reserves one after the instances' for a store and writes where it is to
//! `out/run/lab.json` (beside `migration.key`); `cargo xtask store` reads both and
//! serves on that port until Ctrl-C. `cargo xtask run --pair --store` starts the same
//! store inside the run instead, its lines shown with an `S|` prefix among the consoles.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use clap::Args;
use hv_tools::store::dir::{table, Store};
use hv_tools::store::net::{self, Config, DEFAULT_MAC};
use serde::{Deserialize, Serialize};

use crate::root;

/// `cargo xtask store` options.
#[derive(Clone, Debug, Args)]
pub struct StoreArgs {
    /// Store directory (relative paths are from the workspace root).
    #[arg(long, default_value = "out/store")]
    pub dir: PathBuf,
    /// Work directory of the running lab (`cargo xtask run` writes lab.json there).
    #[arg(long, default_value = "out/run")]
    pub lab: PathBuf,
    /// The store's IPv4 address on the lab network.
    #[arg(long, default_value = "10.0.0.9")]
    pub ip: std::net::Ipv4Addr,
    /// Largest guest memory accepted, in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 4096)]
    pub max_mem: u64,
    /// Print the store's index and exit (no lab needed).
    #[arg(long)]
    pub list: bool,
}

/// Where a running lab keeps its store port: `<work>/lab.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LabFile {
    /// The xtask process running the lab.
    pub pid: u32,
    /// The hub's base port.
    pub hub_base: u16,
    /// Instances (members 0..instances of the hub).
    pub instances: u16,
    /// The hub port reserved for a store.
    pub store_hub_port: u16,
    /// The lab's migration key file.
    pub key_file: PathBuf,
}

/// Name of the lab file in a lab's work directory.
pub const LAB_FILE: &str = "lab.json";

fn resolve(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root().join(p)
    }
}

/// Writes `<work>/lab.json` for a lab whose hub reserves `store_hub_port`.
pub fn write_lab_file(work: &Path, lab: &LabFile) -> Result<(), String> {
    let path = work.join(LAB_FILE);
    let json = serde_json::to_string_pretty(lab).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_lab_file(work: &Path) -> Result<LabFile, String> {
    let path = work.join(LAB_FILE);
    let b = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (start a lab first: cargo xtask run --pair)",
            path.display()
        )
    })?;
    let lab: LabFile =
        serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?;
    if !Path::new(&format!("/proc/{}", lab.pid)).exists() {
        return Err(format!(
            "{} is from a lab that has ended (process {} is gone): start one with cargo xtask run --pair",
            path.display(),
            lab.pid
        ));
    }
    Ok(lab)
}

fn config(args: &StoreArgs, key_file: &Path, hub_port: u16) -> Result<Config, String> {
    let key_hex =
        std::fs::read_to_string(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    Ok(Config {
        dir: resolve(&args.dir),
        key_hex: key_hex.trim().to_string(),
        hub_port,
        ip: args.ip.octets(),
        mac: DEFAULT_MAC,
        max_mem: args.max_mem << 20,
    })
}

/// `cargo xtask store`: serves in the foreground until killed (or lists the index).
pub fn run(args: &StoreArgs) -> Result<(), String> {
    if args.list {
        let (store, _) = Store::open(&resolve(&args.dir))?;
        print!("{}", table(store.list()));
        return Ok(());
    }
    let lab = read_lab_file(&resolve(&args.lab))?;
    let cfg = config(args, &lab.key_file, lab.store_hub_port)?;
    eprintln!(
        "xtask: store in {} on the lab's hub port {} (Ctrl-C ends it)",
        cfg.dir.display(),
        lab.store_hub_port
    );
    let stop = AtomicBool::new(false);
    net::serve(&cfg, &stop, &mut |line| println!("{line}"))
}

/// A store running beside a lab (`run --store`); stopped and joined when dropped.
pub struct StoreThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Its event lines.
    pub lines: Receiver<String>,
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a store on `hub_port` with the lab's key file.
pub fn spawn(args: &StoreArgs, key_file: &Path, hub_port: u16) -> Result<StoreThread, String> {
    let cfg = config(args, key_file, hub_port)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, lines) = mpsc::channel();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("hvstore".into())
            .spawn(move || {
                let r = net::serve(&cfg, &stop, &mut |l| {
                    let _ = tx.send(l);
                });
                if let Err(e) = &r {
                    let _ = tx.send(format!("STORE-ERROR {e}"));
                }
                r
            })
            .map_err(|e| e.to_string())?
    };
    Ok(StoreThread {
        stop,
        thread: Some(thread),
        lines,
    })
}
