//! Network scenario on a linked Bochs pair: both e1000s come up with their MAC-derived
//! addresses, ping works both ways, `netbench` moves 2 MiB with every byte verified by
//! the peer's sink, unreachable peers and bad arguments end in one-line errors, and the
//! lab's hub cuts and heals a port on command. A second scenario runs netbench through
//! hub links of several settings and counts the frames Bochs' receiving socket dropped.

use std::time::Duration;

use hv_tests::{expect, scenario, LinkConfig, Setup, CMD_TIMEOUT};
use hv_tools::hub::{DEFAULT_QUEUE, DEFAULT_RATE};

/// `netbench` of a few MiB over Bochs' socket network: well under a minute, but bound it.
const BENCH_TIMEOUT: Duration = Duration::from_secs(150);

/// Extracts `key=value` from a `NETBENCH ...` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
#[ignore = "boots an emulator: run with cargo xtask test"]
fn bochs_pair_ping_and_verified_netbench() {
    scenario("bochs-net", Setup::bochs_pair(), |lab| {
        let boot_a = lab.instances[0].console.log();
        expect(&boot_a, "net: e1000 52:54:00:12:34:56")?;

        let out = lab.instances[0].console.command("pci", CMD_TIMEOUT)?;
        expect(&out, "8086:100e")?;
        expect(&out, "Ethernet")?;
        expect(&out, "mem+dma")?;

        let out = lab.instances[0].console.command("net", CMD_TIMEOUT)?;
        expect(&out, "MAC 52:54:00:12:34:56, link up")?;
        expect(&out, "10.0.0.1/24 (derived from the MAC)")?;
        let out = lab.instances[1].console.command("net", CMD_TIMEOUT)?;
        expect(&out, "MAC 52:54:00:12:34:57, link up")?;
        expect(&out, "10.0.0.2/24")?;

        // Ping both ways.
        let out = lab.instances[0]
            .console
            .command("ping 10.0.0.2 3", CMD_TIMEOUT)?;
        expect(&out, "bytes from 10.0.0.2: icmp_seq=0 time=")?;
        expect(&out, "3 sent, 3 received, 0% loss")?;
        eprintln!("ping A -> B:\n{out}");
        let out = lab.instances[1]
            .console
            .command("ping 10.0.0.1 3", CMD_TIMEOUT)?;
        expect(&out, "3 sent, 3 received, 0% loss")?;
        eprintln!("ping B -> A:\n{out}");

        // Bulk TCP with verified content, A to B.
        let out = lab.instances[0]
            .console
            .command("netbench 10.0.0.2 2", BENCH_TIMEOUT)?;
        let line = out
            .lines()
            .find(|l| l.starts_with("NETBENCH "))
            .ok_or_else(|| format!("no NETBENCH line in:\n{out}"))?;
        if field(line, "verified") != Some("yes") || field(line, "bytes") != Some("2097152") {
            return Err(format!("netbench not verified:\n{out}"));
        }
        eprintln!(
            "netbench A -> B: {} MB/s ({} bytes in {} us, emulated time, ips {})",
            field(line, "mbps").unwrap_or("?"),
            field(line, "bytes").unwrap_or("?"),
            field(line, "us").unwrap_or("?"),
            hv_tools::emu::DEFAULT_BOCHS_IPS
        );
        // The sink on B counted it.
        let out = lab.instances[1].console.command("net", CMD_TIMEOUT)?;
        expect(&out, "(1 completed)")?;
        eprintln!("B after netbench:\n{out}");

        // Errors are single lines, never hangs.
        let c = &mut lab.instances[0].console;
        let out = c.command("ping 10.0.0.9 1", CMD_TIMEOUT)?;
        expect(&out, "error: ping: no reply from 10.0.0.9")?;
        let out = c.command("netbench 10.0.0.9 1", CMD_TIMEOUT)?;
        expect(
            &out,
            "error: netbench: connecting to 10.0.0.9:5001 timed out",
        )?;
        let out = c.command("ip 10.0.0.300/24", CMD_TIMEOUT)?;
        expect(&out, "error: bad IPv4 address")?;
        let out = c.command("ping", CMD_TIMEOUT)?;
        expect(&out, "error: usage: ping")?;
        // The stack still works after the errors.
        let out = c.command("ping 10.0.0.2 1", CMD_TIMEOUT)?;
        expect(&out, "1 sent, 1 received")?;

        // The hub cuts B off on command and plugs it back in.
        let hub = lab.hub.as_ref().ok_or("the lab has no hub")?;
        hub.partition(1).map_err(|e| e.to_string())?;
        let out = lab.instances[0]
            .console
            .command("ping 10.0.0.2 1", CMD_TIMEOUT)?;
        expect(&out, "error: ping: no reply from 10.0.0.2")?;
        hub.heal(1).map_err(|e| e.to_string())?;
        let out = lab.instances[0]
            .console
            .command("ping 10.0.0.2 1", CMD_TIMEOUT)?;
        expect(&out, "1 sent, 1 received")?;
        let k = hub.counters().map_err(|e| e.to_string())?;
        if k[1].cuts != 1 || k[1].dropped_partition == 0 {
            return Err(format!("partition not counted: {:?}", k[1]));
        }
        Ok(())
    });
}

/// Counters from a `net` command: (rx packets, tx packets).
fn nic_packets(net_out: &str) -> Option<(u64, u64)> {
    let count = |key: &str| {
        net_out
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((count("rx ")?, count("tx ")?))
}

/// Netbench A -> B through hub links of several rates and queue lengths: how fast, and
/// how many frames Bochs' receiving socket dropped (its module reads one datagram per
/// emulated millisecond; what piles up beyond its socket buffer is lost and must be
/// retransmitted by TCP). `HV_NETBENCH_LINKS` lists `rate:queue[:backpressure]` entries
/// (bytes/s, frames, frames or `off`; absent = off),
/// `HV_NETBENCH_MIB` the size. With `HV_HUB=bxhub` the links cannot be set and every
/// entry runs through bxhub. Prints one `LINK ...` line per entry; fails if a transfer is
/// not verified. By default it checks that the lab's default link (back-pressure on)
/// loses nothing at B's socket.
#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_netbench_through_paced_links() {
    scenario("bochs-netbench-links", Setup::bochs_pair(), |lab| {
        let links: Vec<(u64, usize, Option<u32>)> = match std::env::var("HV_NETBENCH_LINKS") {
            Ok(v) => v
                .split(',')
                .map(|e| {
                    let f: Vec<&str> = e.split(':').collect();
                    let num = |i: usize| -> Result<u64, String> {
                        f.get(i)
                            .and_then(|x| x.parse().ok())
                            .ok_or(format!("bad link entry '{e}' (rate:queue[:backpressure])"))
                    };
                    let bp = match f.get(2) {
                        None | Some(&"off") => None,
                        Some(_) => Some(num(2)? as u32),
                    };
                    Ok((num(0)?, num(1)? as usize, bp))
                })
                .collect::<Result<_, String>>()?,
            Err(_) => vec![(
                DEFAULT_RATE,
                DEFAULT_QUEUE,
                Some(hv_tools::hub::DEFAULT_BACKPRESSURE),
            )],
        };
        let mib: u64 = std::env::var("HV_NETBENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        let b_port = lab.hub_base + 2;
        let out = lab.instances[0]
            .console
            .command("ping 10.0.0.2 1", CMD_TIMEOUT)?;
        expect(&out, "1 received")?;
        for (rate, queue, bp) in links {
            if let Some(hub) = &lab.hub {
                hub.set_link_all(LinkConfig { rate, queue })
                    .map_err(|e| e.to_string())?;
                hub.set_backpressure(bp).map_err(|e| e.to_string())?;
            }
            let drops0 = hv_tools::hub::udp_socket_drops(b_port).unwrap_or(0);
            let (_, a_tx0) = nic_packets(&lab.instances[0].console.command("net", CMD_TIMEOUT)?)
                .ok_or("no counters from net on A")?;
            let (b_rx0, _) = nic_packets(&lab.instances[1].console.command("net", CMD_TIMEOUT)?)
                .ok_or("no counters from net on B")?;
            let wall = std::time::Instant::now();
            let out = lab.instances[0]
                .console
                .command(&format!("netbench 10.0.0.2 {mib}"), BENCH_TIMEOUT)?;
            let wall = wall.elapsed().as_secs_f64();
            let line = out
                .lines()
                .find(|l| l.starts_with("NETBENCH "))
                .ok_or_else(|| format!("no NETBENCH line in:\n{out}"))?;
            if field(line, "verified") != Some("yes") {
                return Err(format!("netbench not verified:\n{out}"));
            }
            let drops = hv_tools::hub::udp_socket_drops(b_port).unwrap_or(0) - drops0;
            let (_, a_tx) = nic_packets(&lab.instances[0].console.command("net", CMD_TIMEOUT)?)
                .ok_or("no counters from net on A")?;
            let (b_rx, _) = nic_packets(&lab.instances[1].console.command("net", CMD_TIMEOUT)?)
                .ok_or("no counters from net on B")?;
            let bytes = mib << 20;
            let hub = if lab.hub.is_some() { "hvhub" } else { "bxhub" };
            let mbps_wall = bytes as f64 / wall / 1e6;
            eprintln!(
                "LINK hub={hub} rate={rate} queue={queue} backpressure={bp:?} mib={mib} mbps_emulated={} mbps_wall={mbps_wall:.3} \
                 wall_s={wall:.2} a_tx_frames={} b_rx_frames={} b_socket_drops={drops} min_frames={}",
                field(line, "mbps").unwrap_or("?"),
                a_tx - a_tx0,
                b_rx - b_rx0,
                bytes.div_ceil(1460)
            );
            if std::env::var("HV_NETBENCH_LINKS").is_err() && drops > 0 {
                return Err(format!(
                    "B's socket dropped {drops} frames through the default link (back-pressure {bp:?})"
                ));
            }
        }
        if let Some(hub) = &lab.hub {
            eprintln!("{}", hub.report().map_err(|e| e.to_string())?);
        }
        Ok(())
    });
}
