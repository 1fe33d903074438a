//! Network scenario on a linked Bochs pair: both e1000s come up with their MAC-derived
//! addresses, ping works both ways, `netbench` moves 2 MiB with every byte verified by
//! the peer's sink, and unreachable peers and bad arguments end in one-line errors.

use std::time::Duration;

use hv_tests::{expect, scenario, Setup, CMD_TIMEOUT};

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
        Ok(())
    });
}
