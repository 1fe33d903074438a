//! The end-to-end harness. Scenarios in `tests/` are `#[ignore]`d so that a plain
//! `cargo test` stays a fast host build; `cargo xtask test` builds the image and runs
//! them with `--ignored`, one at a time, with `HV_ISO` and `HV_WORK` set.
//!
//! [`scenario`] boots the instances, runs the body, and on any failure prints every
//! instance's serial log (and the tail of the Bochs log) before failing the test.

use std::path::PathBuf;
use std::time::Duration;

pub use hv_tools::emu::{Emulator, Lab, LabConfig};
pub use hv_tools::hub::{Cut, Faults, HubConfig, LinkConfig, Partition, Trigger};

/// Boot timeout: Bochs boots in seconds here, but CI machines are noisy.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Timeout for an ordinary console command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Which instances a scenario needs.
pub struct Setup {
    /// Emulator.
    pub emulator: Emulator,
    /// Two linked instances.
    pub pair: bool,
    /// A NIC on a single instance.
    pub net: bool,
    /// Extra hub ports for host endpoints (hv_tools::bxnet).
    pub extra_hub_ports: u16,
}

impl Setup {
    /// One Bochs instance without network.
    pub fn bochs() -> Self {
        Self {
            emulator: Emulator::Bochs,
            pair: false,
            net: false,
            extra_hub_ports: 0,
        }
    }

    /// A linked Bochs pair.
    pub fn bochs_pair() -> Self {
        Self {
            emulator: Emulator::Bochs,
            pair: true,
            net: true,
            extra_hub_ports: 0,
        }
    }
}

/// Boots per `setup`, runs `body`, prints diagnostics and panics on failure.
pub fn scenario(name: &str, setup: Setup, body: impl FnOnce(&mut Lab) -> Result<(), String>) {
    scenario_with_hub(name, setup, &HubConfig::default(), body)
}

/// [`scenario`] with the hub's links, faults and scripted partitions set from the start
/// (faults can also be changed later through `lab.hub()`).
pub fn scenario_with_hub(
    name: &str,
    setup: Setup,
    hub: &HubConfig,
    body: impl FnOnce(&mut Lab) -> Result<(), String>,
) {
    run_scenario(name, setup, None, hub, body)
}

/// A linked pair whose instances run in different emulators: A in `a`, B in `b` (a
/// cross-vendor pair: Bochs' VMX and QEMU TCG's SVM).
pub fn scenario_cross(
    name: &str,
    a: Emulator,
    b: Emulator,
    body: impl FnOnce(&mut Lab) -> Result<(), String>,
) {
    let setup = Setup {
        emulator: a,
        pair: true,
        net: true,
        extra_hub_ports: 0,
    };
    run_scenario(name, setup, Some(b), &HubConfig::default(), body)
}

fn run_scenario(
    name: &str,
    setup: Setup,
    emulator_b: Option<Emulator>,
    hub: &HubConfig,
    body: impl FnOnce(&mut Lab) -> Result<(), String>,
) {
    let iso = PathBuf::from(
        std::env::var("HV_ISO")
            .expect("HV_ISO not set: run the end-to-end tests with `cargo xtask test`"),
    );
    let work =
        PathBuf::from(std::env::var("HV_WORK").unwrap_or_else(|_| "/tmp/hv-e2e".into())).join(name);
    let cfg = LabConfig {
        emulator: setup.emulator,
        emulator_b,
        iso,
        work_dir: work,
        pair: setup.pair,
        mem_mib: 256,
        bochs_ips: hv_tools::emu::DEFAULT_BOCHS_IPS,
        net: setup.net,
        extra_hub_ports: setup.extra_hub_ports,
        hub: hub.clone(),
    };
    let started = std::time::Instant::now();
    let mut lab = match Lab::start(&cfg, BOOT_TIMEOUT) {
        Ok(l) => l,
        Err(e) => panic!("scenario {name}: boot failed: {e}"),
    };
    eprintln!(
        "scenario {name}: booted in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = body(&mut lab) {
        eprintln!("{}", lab.diagnostics());
        panic!("scenario {name} failed: {e}");
    }
    eprintln!(
        "scenario {name}: passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Fails unless `text` contains `needle`.
pub fn expect(text: &str, needle: &str) -> Result<(), String> {
    if text.contains(needle) {
        Ok(())
    } else {
        Err(format!("expected {needle:?} in output:\n{text}"))
    }
}

/// Migrates guest `id` from `src` to the peer (within 240 s), printing its figures;
/// returns the id it got there.
pub fn migrate(
    src: &mut hv_tools::console::Console,
    dst: &mut hv_tools::console::Console,
    id: u32,
    peer: &str,
    opts: &str,
) -> Result<u32, String> {
    let m = hv_tools::session::migrate(
        src,
        dst,
        id,
        peer,
        opts,
        std::time::Duration::from_secs(240),
    )?;
    eprintln!("migrated guest {id} to {peer} {opts}: {:?}", m.stats);
    Ok(m.new_id)
}
