//! `cargo xtask`: builds the hypervisor, the guests and the GRUB image, boots them in an
//! emulator, and runs the tests, the demo and the benchmarks. One module per subcommand;
//! every external tool is checked for (and installed when possible) before it is used.

mod bench;
mod build;
mod demo;
mod deps;
mod run;
mod svg;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use hv_tools::emu::{default_emulator, Emulator};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build                      build the hypervisor, the guests and the GRUB ISO (out/hvmig.iso)
  run [--pair] [--emulator bochs|qemu-kvm|qemu-tcg] [--ips N] [--mem MiB]
                             boot one instance (or a linked pair) with the console on this terminal
  demo [--emulator ...] [--ips N]
                             boot a linked pair, migrate a running counter guest from A to B,
                             show it continuing there and print the migration's figures
  test [--host-only] [filter]
                             host unit tests, then the end-to-end scenarios in the emulators
  bench [--quick] [--repeats N] [--emulator ...] [--ips N]
                             migration benchmark matrix; table on stdout, out/bench/*.json|csv|svg
  help                       this text
";

/// Options shared by the subcommands that boot instances.
#[derive(Clone, Debug)]
pub struct BootOpts {
    /// Emulator to use.
    pub emulator: Emulator,
    /// Linked pair.
    pub pair: bool,
    /// Bochs instructions per emulated second.
    pub ips: u64,
    /// RAM per instance.
    pub mem_mib: u32,
}

impl BootOpts {
    /// Parses the boot options.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            emulator: default_emulator(),
            pair: false,
            ips: hv_tools::emu::DEFAULT_BOCHS_IPS,
            mem_mib: 256,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
            match a.as_str() {
                "--pair" => o.pair = true,
                "--emulator" => o.emulator = val("--emulator")?.parse()?,
                "--ips" => o.ips = val("--ips")?.parse().map_err(|_| "bad --ips")?,
                "--mem" => o.mem_mib = val("--mem")?.parse().map_err(|_| "bad --mem")?,
                other => return Err(format!("unknown option '{other}'\n\n{USAGE}")),
            }
        }
        Ok(o)
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "build" => build::run_cmd(rest).map(|_| ()),
        "run" => BootOpts::parse(rest).and_then(|o| run::run(&o)),
        "test" => test::run(rest),
        "demo" => BootOpts::parse(rest).and_then(|o| demo::run(&o)),
        "bench" => bench::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command '{other}'\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}
