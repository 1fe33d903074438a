//! `cargo xtask`: builds the hypervisor, the guests and the GRUB image, boots them in an
//! emulator, and runs the tests, the demo and the benchmarks. One module per subcommand;
//! every external tool is checked for (and installed when possible) before it is used.

mod bench;
mod build;
mod demo;
mod deps;
mod plot;
mod progress;
mod run;
mod soak;
mod store;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, Parser, Subcommand};
use hv_tools::emu::{default_emulator, Emulator};
use hv_tools::hub::{Faults, HubConfig, LinkConfig};

/// Build, boot, test and benchmark the hvmig hypervisor.
#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    after_help = "Run `cargo xtask help <COMMAND>` for a command's options."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the hypervisor, the guests and the GRUB ISO (out/hvmig.iso).
    Build,
    /// Boot one instance (or a linked pair) with the console on this terminal.
    ///
    /// One instance: raw mode, Ctrl-] quits. A pair: lines go to the selected instance
    /// ('@a'/'@b' switch, 'a: cmd'/'b: cmd' send once, '@quit' ends both).
    Run {
        /// Boot two linked instances, A = 10.0.0.1 and B = 10.0.0.2.
        #[arg(long)]
        pair: bool,
        /// Start a guest store (10.0.0.9) beside the instances; its lines show as `S|`.
        #[arg(long)]
        store: bool,
        /// The store's directory (with --store).
        #[arg(
            long,
            value_name = "DIR",
            default_value = "out/store",
            requires = "store"
        )]
        store_dir: PathBuf,
        #[command(flatten)]
        emu: EmuArgs,
    },
    /// Boot a linked pair, live-migrate a running counter guest from A to B, show it
    /// continuing there and print the migration's figures.
    Demo(PairArgs),
    /// Run the guest store (checkpoint and restore) on the network of the lab that
    /// `cargo xtask run` is running, until Ctrl-C; or list its checkpoints.
    ///
    /// Prints one line per event: STORE-CHECKPOINT name=... image=... mem_bytes=...
    /// bytes=... sha256=..., STORE-RESTORE name=... peer=... outcome=ok|<reason>, ...
    Store(store::StoreArgs),
    /// Run the host unit tests, then the end-to-end scenarios in the emulators.
    Test(test::TestArgs),
    /// Run the migration benchmark matrix, or compare/re-plot earlier results.
    ///
    /// Writes a table to stdout and results.json (schema-versioned), results.csv,
    /// results.txt, downtime.svg, total.svg and rounds.svg to the output directory.
    Bench(bench::BenchArgs),
    /// Migrate three guests back and forth N times with verify=full, checking after
    /// every migration that each runs on exactly one side, passes its own check, and
    /// that both hypervisors return to their idle memory, frames and sockets.
    ///
    /// Writes out/soak/soak.csv, soak.json and summary.txt.
    Soak(soak::SoakArgs),
    /// Fuzz the migration channel's handshake and records, the stream decoder and the
    /// receiver state machine (host, release build; prints its seed and inputs/s).
    Fuzz {
        /// Inputs per target (five targets).
        #[arg(long, default_value_t = 20_000)]
        iterations: u64,
        /// PRNG seed (default: from the clock, printed so a failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Print a shell completion script for xtask (for an `xtask` alias of `cargo xtask`).
    Completions {
        /// The shell to generate for.
        shell: clap_complete::Shell,
    },
}

/// `--emulator` / `--emulator-b` values (with the `qemu` alias) as an [`Emulator`].
fn emulator_parser() -> impl clap::builder::TypedValueParser<Value = Emulator> {
    PossibleValuesParser::new([
        PossibleValue::new("bochs"),
        PossibleValue::new("qemu-kvm"),
        PossibleValue::new("qemu-tcg").alias("qemu"),
    ])
    .map(|s| s.parse::<Emulator>().expect("listed values parse"))
}

/// The emulator options shared by the subcommands that boot instances.
#[derive(Clone, Debug, Args)]
pub struct EmuArgs {
    /// Emulator [default: qemu-kvm if this host has nested VMX, else bochs].
    #[arg(
        long,
        value_name = "EMULATOR",
        value_parser = emulator_parser()
    )]
    pub emulator: Option<Emulator>,
    /// A different emulator for instance B of a pair (a cross-vendor pair, e.g.
    /// `--emulator bochs --emulator-b qemu-tcg`: Intel VMX on A, AMD SVM on B).
    #[arg(
        long,
        value_name = "EMULATOR",
        value_parser = emulator_parser()
    )]
    pub emulator_b: Option<Emulator>,
    /// Bochs instructions per emulated second (sets Bochs' emulated clock).
    #[arg(long, value_name = "N", default_value_t = hv_tools::emu::DEFAULT_BOCHS_IPS)]
    pub ips: u64,
    /// RAM of each emulated machine, in MiB.
    #[arg(long = "mem", value_name = "MiB", default_value_t = 256)]
    pub mem_mib: u32,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// The lab hub's link and faults (every port alike; see tools/src/hub.rs).
#[derive(Clone, Debug, Args)]
pub struct HubArgs {
    /// Line rate of every hub port towards its member, in bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = hv_tools::hub::DEFAULT_RATE)]
    pub link_rate: u64,
    /// Egress queue of every hub port, in frames (tail drop beyond it).
    #[arg(long, value_name = "FRAMES", default_value_t = hv_tools::hub::DEFAULT_QUEUE)]
    pub link_queue: usize,
    /// Probability that the hub drops a frame (every port).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub loss: f64,
    /// Seed of the hub's fault decisions [default: HV_HUB_SEED, else random, printed].
    #[arg(long, value_name = "N")]
    pub hub_seed: Option<u64>,
}

impl HubArgs {
    /// The hub configuration these options describe.
    pub fn config(&self) -> Result<HubConfig, String> {
        let c = HubConfig {
            link: LinkConfig {
                rate: self.link_rate,
                queue: self.link_queue,
            },
            faults: Faults {
                loss: self.loss,
                ..Faults::default()
            },
            seed: self.hub_seed,
            ..HubConfig::default()
        };
        c.link.validate().map_err(|e| e.to_string())?;
        c.faults.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }
}

/// Options of the subcommands that always boot a linked pair.
#[derive(Clone, Debug, Args)]
pub struct PairArgs {
    #[command(flatten)]
    pub emu: EmuArgs,
    /// Accepted for compatibility: this command always boots a pair.
    #[arg(long, hide = true)]
    pub pair: bool,
    /// Demonstrate a guest on the network instead: a host client keeps a TCP
    /// connection to the `echo` guest while it migrates A -> B -> A, and prints the
    /// longest stall it saw beside the downtime.
    #[arg(long)]
    pub net: bool,
}

/// Options shared by the subcommands that boot instances.
#[derive(Clone, Debug)]
pub struct BootOpts {
    /// Emulator to use.
    pub emulator: Emulator,
    /// Emulator of instance B, if it differs.
    pub emulator_b: Option<Emulator>,
    /// Linked pair.
    pub pair: bool,
    /// Bochs instructions per emulated second.
    pub ips: u64,
    /// RAM per instance.
    pub mem_mib: u32,
    /// The network hub's links and faults.
    pub hub: HubConfig,
}

impl BootOpts {
    /// The options from the command line; `pair` as given. Fails on an invalid hub
    /// setting (a zero rate, a probability outside 0..=1).
    pub fn new(emu: &EmuArgs, pair: bool) -> Result<Self, String> {
        Ok(Self {
            emulator: emu.emulator.unwrap_or_else(default_emulator),
            emulator_b: emu.emulator_b,
            pair,
            ips: emu.ips,
            mem_mib: emu.mem_mib,
            hub: emu.hub.config()?,
        })
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where build products and run logs go.
pub fn out_dir() -> PathBuf {
    root().join("out")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Build => build::run_build().map(|_| ()),
        Cmd::Run {
            pair,
            store,
            store_dir,
            emu,
        } => BootOpts::new(&emu, pair).and_then(|o| {
            let s = store::StoreArgs {
                dir: store_dir,
                lab: PathBuf::from("out/run"),
                ip: std::net::Ipv4Addr::new(10, 0, 0, 9),
                max_mem: 4096,
                list: false,
            };
            run::run(&o, store.then_some(&s))
        }),
        Cmd::Store(s) => store::run(&s),
        Cmd::Demo(p) => BootOpts::new(&p.emu, true).and_then(|o| {
            if p.net {
                demo::run_net(&o)
            } else {
                demo::run(&o)
            }
        }),
        Cmd::Test(t) => test::run(&t),
        Cmd::Bench(b) => bench::run(&b),
        Cmd::Soak(s) => soak::run(&s),
        Cmd::Fuzz { iterations, seed } => fuzz(iterations, seed),
        Cmd::Completions { shell } => {
            // Into a buffer first: generating straight to stdout panics on a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "xtask", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
                _ => Ok(()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask fuzz`: runs the fuzz harness (hypervisor/examples/fuzz_migration.rs).
fn fuzz(iterations: u64, seed: Option<u64>) -> Result<(), String> {
    let mut c =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).args([
        "run",
        "-q",
        "-p",
        "hypervisor",
        "--release",
        "--example",
        "fuzz_migration",
        "--",
        "--iterations",
        &iterations.to_string(),
    ]);
    if let Some(s) = seed {
        c.args(["--seed", &s.to_string()]);
    }
    match c.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("fuzzing failed ({s})")),
        Err(e) => Err(format!("cannot run cargo: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn readme_commands_parse() {
        for line in [
            "demo",
            "test",
            "test --host-only",
            "test migration",
            "bench --quick",
            "bench --repeats 1",
            "bench --compare a.json --against b.json",
            "run --pair --emulator qemu-tcg --ips 1000 --mem 64",
            "run --pair --link-rate 2000000 --link-queue 512 --loss 0.01 --hub-seed 7",
            "run --emulator qemu",
            "demo --pair --emulator bochs",
            "demo --net",
            "bench --net",
            "bench --net --repeats 3 --out /tmp/x",
            "bench --quick --emulator qemu-kvm --repeats 2 --compare old.json",
            "bench --from docs/bench/results.json --out docs/bench",
            "build",
            "completions bash",
            "soak --migrations 20 --seed 5",
            "soak --migrations 1000 --seed 1000 --guest-mem 4",
            "run --pair --store",
            "run --pair --store --store-dir /tmp/ckpts",
            "store",
            "store --dir out/store --lab out/run",
            "store --list",
        ] {
            let args = std::iter::once("xtask").chain(line.split(' '));
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{line}: {e}");
            }
        }
    }

    #[test]
    fn hub_options_are_checked() {
        let cli = Cli::try_parse_from(["xtask", "run", "--pair", "--loss", "1.5"]).unwrap();
        let Cmd::Run { emu, .. } = cli.cmd else {
            panic!("not run")
        };
        let e = BootOpts::new(&emu, true).unwrap_err();
        assert!(e.contains("loss probability 1.5"), "{e}");
        let cli = Cli::try_parse_from(["xtask", "run", "--link-rate", "0"]).unwrap();
        let Cmd::Run { emu, .. } = cli.cmd else {
            panic!("not run")
        };
        assert!(BootOpts::new(&emu, false).is_err());
    }

    #[test]
    fn typo_gets_a_suggestion() {
        let e = Cli::try_parse_from(["xtask", "bench", "--quik"]).unwrap_err();
        assert!(e.to_string().contains("--quick"), "{e}");
        let e = Cli::try_parse_from(["xtask", "run", "--emulator", "boch"]).unwrap_err();
        assert!(e.to_string().contains("bochs"), "{e}");
    }
}
