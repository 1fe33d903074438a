//! `hvstore`: the lab's guest store. Hypervisors checkpoint guests to it and restore
//! them from it over the lab's virtual Ethernet (see `hv_tools::store`).
//!
//! ```text
//! hvstore --dir out/store --key-file out/run/migration.key --hub-port P [--ip 10.0.0.9]
//! hvstore list --dir out/store
//! hvstore verify --dir out/store [NAME...]
//! ```
//!
//! Serving prints one line per event (`STORE-LISTEN`, `STORE-CONNECT`,
//! `STORE-CHECKPOINT`, `STORE-RESTORE`, ...; see `hv_tools::store::net`) and runs until
//! it is killed; a checkpoint being received then is discarded (its `.tmp` file is
//! removed at the next start).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use clap::{Args, Parser, Subcommand};
use hv_tools::store::dir::{table, Store};
use hv_tools::store::net::{self, Config, DEFAULT_MAC};

/// The lab's guest store: keeps checkpoints sent by the hypervisors and streams them
/// back for a restore.
#[derive(Debug, Parser)]
#[command(
    name = "hvstore",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: Serve,
}

/// Serving (the default command).
#[derive(Debug, Args)]
struct Serve {
    /// Store directory (created if missing).
    #[arg(long, required = true)]
    dir: Option<PathBuf>,
    /// File holding the lab's migration key (64 hex digits), e.g. out/run/migration.key.
    #[arg(long, required = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The lab hub's UDP port for this endpoint (it receives there, sends to the next).
    #[arg(long, required = true, value_name = "PORT")]
    hub_port: Option<u16>,
    /// IPv4 address on the lab network (/24).
    #[arg(long, default_value = "10.0.0.9", value_parser = parse_ip)]
    ip: [u8; 4],
    /// MAC address [default: 52:54:00:12:34:09].
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// Largest guest memory accepted, in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 4096)]
    max_mem: u64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the index as a table.
    List {
        /// Store directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Verify checkpoint files against their format, hash and the index (all, or NAMEs).
    Verify {
        /// Store directory.
        #[arg(long)]
        dir: PathBuf,
        /// Checkpoints to verify [default: all].
        names: Vec<String>,
    },
}

fn parse_ip(s: &str) -> Result<[u8; 4], String> {
    let ip: std::net::Ipv4Addr = s.parse().map_err(|e| format!("{s}: {e}"))?;
    Ok(ip.octets())
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s}: {e}"))?;
    parts
        .try_into()
        .map_err(|_| format!("{s}: a MAC has six bytes"))
}

fn serve(s: Serve) -> Result<(), String> {
    let (Some(dir), Some(key_file), Some(hub_port)) = (s.dir, s.key_file, s.hub_port) else {
        return Err("--dir, --key-file and --hub-port are required".into());
    };
    let key_hex =
        std::fs::read_to_string(&key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let cfg = Config {
        dir,
        key_hex: key_hex.trim().to_string(),
        hub_port,
        ip: s.ip,
        mac: s.mac.unwrap_or(DEFAULT_MAC),
        max_mem: s.max_mem << 20,
    };
    let stop = AtomicBool::new(false);
    net::serve(&cfg, &stop, &mut |line| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => serve(cli.serve),
        Some(Cmd::List { dir }) => Store::open(&dir).map(|(store, _)| {
            print!("{}", table(store.list()));
            println!("{} checkpoint(s) in {}", store.list().len(), dir.display());
        }),
        Some(Cmd::Verify { dir, names }) => Store::open(&dir).and_then(|(store, _)| {
            let names: Vec<String> = if names.is_empty() {
                store.list().iter().map(|e| e.name.clone()).collect()
            } else {
                names
            };
            let mut bad = 0;
            for n in &names {
                match store.load(n) {
                    Ok((_, e)) => println!("ok       {n} sha256={}", e.memory_sha256),
                    Err(e) => {
                        bad += 1;
                        println!("REFUSED  {n}: {e}");
                    }
                }
            }
            if bad == 0 {
                Ok(())
            } else {
                Err(format!("{bad} of {} checkpoint(s) refused", names.len()))
            }
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hvstore: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_parses() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "hvstore",
            "--dir",
            "d",
            "--key-file",
            "k",
            "--hub-port",
            "40004",
            "--mac",
            "52:54:00:12:34:0a",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.serve.ip, [10, 0, 0, 9]);
        assert_eq!(c.serve.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x0a]));
        assert!(Cli::try_parse_from(["hvstore", "list", "--dir", "d"]).is_ok());
        assert!(Cli::try_parse_from(["hvstore", "verify", "--dir", "d", "a-1"]).is_ok());
        assert!(Cli::try_parse_from(["hvstore", "--dir", "d"]).is_err());
    }
}
