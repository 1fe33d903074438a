//! `hvhub`: the lab's network hub as a standalone program, for linking instances started
//! by hand (a drop-in for Bochs' `bxhub -ports=N -base=P`). Member `i` receives on UDP
//! `base + 2*i` and sends to the port after it.
//!
//! It reads commands on stdin while it runs (`help` lists them): print the counters, cut
//! and heal ports or links, change faults and links. End it with `quit` or end of input
//! (Ctrl-D); the counters are printed then (and written to `--report`).

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hv_tools::hub::{
    parse_duration, Faults, Hub, HubConfig, HubHandle, LinkConfig, Member, Partition,
    DEFAULT_BACKPRESSURE, DEFAULT_QUEUE, DEFAULT_RATE,
};

/// The lab's network hub: a paced, fault-injecting switch for Bochs socket and QEMU dgram
/// networking on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "hvhub")]
struct Args {
    /// UDP base port: member i receives on base + 2*i and sends to base + 2*i + 1.
    #[arg(long, default_value_t = 40000)]
    base: u16,
    /// Number of members.
    #[arg(long, default_value_t = 2)]
    members: u16,
    /// Line rate of every port towards its member, in bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = DEFAULT_RATE)]
    rate: u64,
    /// Egress queue of every port, in frames.
    #[arg(long, value_name = "FRAMES", default_value_t = DEFAULT_QUEUE)]
    queue: usize,
    /// Probability that a frame is dropped.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    loss: f64,
    /// Probability that a frame is duplicated.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    duplicate: f64,
    /// Probability that a frame is held back by --reorder-by frames.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    reorder: f64,
    /// How many frames a reordered frame is held back by.
    #[arg(long, value_name = "K", default_value_t = 3)]
    reorder_by: u32,
    /// Delay added to every frame (e.g. 5ms).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    delay: Duration,
    /// Up to this much more per frame, uniformly drawn (order kept).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    jitter: Duration,
    /// Scripted partition `CUT[@TRIGGER][+HEAL]`, repeatable: `1@10s+2s` cuts port 1 at
    /// 10 s for 2 s; `0-1@b0:1000000` cuts the link 0-1 once port 0 sent 1,000,000 bytes.
    #[arg(long = "partition", value_name = "SPEC")]
    partitions: Vec<Partition>,
    /// Pause a port while its member's socket holds this many frames (0: off).
    #[arg(long, value_name = "FRAMES", default_value_t = DEFAULT_BACKPRESSURE)]
    backpressure: u32,
    /// Seed of the fault decisions [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the final counters to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

const HELP: &str = "commands: stats | cut PORT | cut A-B | heal PORT | heal A-B | heal all \
                    | loss P [PORT] | link RATE QUEUE [PORT] | quit";

fn command(hub: &HubHandle, line: &str) -> Result<bool, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |w: &str| w.parse::<usize>().map_err(|_| format!("bad number '{w}'"));
    let e = |e: hv_tools::hub::HubError| e.to_string();
    match words.as_slice() {
        [] => {}
        ["quit"] | ["exit"] => return Ok(false),
        ["help"] => println!("{HELP}"),
        ["stats"] => print!("{}", hub.report().map_err(e)?),
        ["cut", what] => match what.split_once('-') {
            Some((a, b)) => hub.partition_link(num(a)?, num(b)?).map_err(e)?,
            None => hub.partition(num(what)?).map_err(e)?,
        },
        ["heal", "all"] => hub.heal_all().map_err(e)?,
        ["heal", what] => match what.split_once('-') {
            Some((a, b)) => hub.heal_link(num(a)?, num(b)?).map_err(e)?,
            None => hub.heal(num(what)?).map_err(e)?,
        },
        ["loss", p, rest @ ..] => {
            let loss = p.parse().map_err(|_| format!("bad probability '{p}'"))?;
            let set = |port| -> Result<(), String> {
                let f = Faults {
                    loss,
                    ..hub.faults(port).map_err(e)?
                };
                hub.set_faults(port, f).map_err(e)
            };
            match rest {
                [port] => set(num(port)?)?,
                _ => (0..hub.members().len()).try_for_each(set)?,
            }
        }
        ["link", rate, queue, rest @ ..] => {
            let link = LinkConfig {
                rate: rate.parse().map_err(|_| format!("bad rate '{rate}'"))?,
                queue: num(queue)?,
            };
            match rest {
                [port] => hub.set_link(num(port)?, link).map_err(e)?,
                _ => hub.set_link_all(link).map_err(e)?,
            }
        }
        _ => return Err(format!("unknown command '{line}' ({HELP})")),
    }
    Ok(true)
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let members = (0..a.members)
        .map(|i| Member::socket_pair(&format!("m{i}"), a.base.wrapping_add(2 * i)))
        .collect();
    let config = HubConfig {
        link: LinkConfig {
            rate: a.rate,
            queue: a.queue,
        },
        faults: Faults {
            loss: a.loss,
            duplicate: a.duplicate,
            reorder: a.reorder,
            reorder_by: a.reorder_by,
            delay: a.delay,
            jitter: a.jitter,
        },
        partitions: a.partitions,
        seed: a.seed,
        report: a.report,
        backpressure: (a.backpressure > 0).then_some(a.backpressure),
        ..HubConfig::default()
    };
    let hub = match Hub::start(members, config) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("hvhub: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("hvhub: running; {HELP}");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match command(&hub, line.trim()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => eprintln!("hvhub: {e}"),
        }
    }
    hub.stop();
    std::process::ExitCode::SUCCESS
}
