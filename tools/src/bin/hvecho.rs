//! `hvecho`: keeps a TCP connection to an echo server on the lab network, checks every
//! echoed byte and measures the stall an application sees, e.g. while the server's guest
//! is live-migrated (see `hv_tools::echo`).
//!
//! ```text
//! hvecho --hub-port P --ip 10.0.0.8 --to 10.0.0.10:7 [--rate 25600] [--chunk 256]
//!        [--seconds 30] [--json out.json] [--csv latencies.csv]
//! ```
//!
//! With `--seconds 0` it runs until a line (or end of input) on stdin. The report is
//! printed (and written as JSON / the latency samples as CSV if asked) on success and on
//! failure alike; the exit status is 1 if any byte was wrong or the connection broke.

use std::io::BufRead;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hv_tools::echo::{EchoClient, EchoConfig, Report, DEFAULT_CHUNK, DEFAULT_RATE};

/// TCP echo client for the lab network: streams a seeded byte pattern at a steady rate,
/// checks the echo byte by byte, and reports chunk latencies and the longest stall.
#[derive(Debug, Parser)]
#[command(name = "hvecho")]
struct Args {
    /// The lab hub's UDP port for this endpoint (it receives there, sends to the next).
    #[arg(long, value_name = "PORT")]
    hub_port: u16,
    /// Our IPv4 address on the lab network (/24).
    #[arg(long, value_parser = parse_ip)]
    ip: [u8; 4],
    /// Our MAC address.
    #[arg(long, default_value = "52:54:00:12:34:88", value_parser = parse_mac)]
    mac: [u8; 6],
    /// The echo server, IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    to: SocketAddrV4,
    /// Bytes per second offered.
    #[arg(long, value_name = "BYTES/S", default_value_t = DEFAULT_RATE)]
    rate: u64,
    /// Bytes per send (each chunk's round trip is measured).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CHUNK)]
    chunk: usize,
    /// How long to stream; 0: until a line or end of input on stdin.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seed of the byte pattern [default: drawn, printed in the report].
    #[arg(long)]
    seed: Option<u64>,
    /// Most bytes sent and not yet echoed.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    max_outstanding: usize,
    /// Stalls at least this long (ms) are listed in the report.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    stall_ms: u64,
    /// Fail if nothing comes back for this long (seconds) while data is outstanding.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    give_up: u64,
    /// How long the connection may take to open (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    connect_timeout: u64,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the latency samples (at_ms,latency_ms) here.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
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

fn write_outputs(a: &Args, r: &Report) -> Result<(), String> {
    if let Some(p) = &a.json {
        let j = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
        std::fs::write(p, j + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &a.csv {
        std::fs::write(p, r.samples_csv()).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn run(a: &Args) -> Result<bool, String> {
    let seed = match a.seed {
        Some(s) => s,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| format!("no seed: {e}"))?;
            u64::from_le_bytes(b)
        }
    };
    let cfg = EchoConfig {
        rate: a.rate,
        chunk: a.chunk,
        seed,
        max_outstanding: a.max_outstanding,
        stall_threshold: Duration::from_millis(a.stall_ms),
        give_up: Duration::from_secs(a.give_up),
        ..EchoConfig::default()
    };
    cfg.check().map_err(|e| e.to_string())?;
    let mut client = EchoClient::new(a.hub_port, a.mac, a.ip).map_err(|e| e.to_string())?;
    client
        .connect(
            a.to.ip().octets(),
            a.to.port(),
            Duration::from_secs(a.connect_timeout),
        )
        .map_err(|e| e.to_string())?;
    eprintln!(
        "hvecho: connected to {}, {} B/s in chunks of {} B, seed {seed}",
        a.to, a.rate, a.chunk
    );
    let outcome = if a.seconds == 0 {
        // stdin blocks, so a thread waits for it and raises the flag.
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().lock().lines().next();
            s.store(true, Ordering::Relaxed);
        });
        eprintln!("hvecho: running until a line or end of input on stdin");
        client.run_until(&cfg, || stop.load(Ordering::Relaxed))
    } else {
        let end = Instant::now() + Duration::from_secs(a.seconds);
        client.run_until(&cfg, || Instant::now() >= end)
    };
    client.close();
    let (report, error) = match outcome {
        Ok(r) => (r, None),
        Err(f) => (*f.report, Some(f.error)),
    };
    println!("{report}");
    for s in &report.stalls {
        println!(
            "  stall {:.1} ms at {:.3} s (byte {})",
            s.ms,
            s.at_ms / 1e3,
            s.offset
        );
    }
    write_outputs(a, &report)?;
    match error {
        None => Ok(true),
        Some(e) => {
            eprintln!("hvecho: {e}");
            Ok(false)
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hvecho: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn hvecho_arguments_parse() {
        Args::command().debug_assert();
        let a = Args::try_parse_from([
            "hvecho",
            "--hub-port",
            "40004",
            "--ip",
            "10.0.0.8",
            "--to",
            "10.0.0.10:7",
            "--rate",
            "1000",
        ])
        .unwrap();
        assert_eq!((a.ip, a.to.port(), a.rate), ([10, 0, 0, 8], 7, 1000));
        assert_eq!(a.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x88]);
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(Args::try_parse_from(["hvecho", "--hub-port", "1", "--ip", "10.0.0.8"]).is_err());
    }
}
