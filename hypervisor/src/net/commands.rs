//! The network console commands: `pci`, `net`, `ip`, `ping` and `netbench`.
//!
//! `ping` and `netbench` block the console (and the guests) while they run and poll the
//! stack in their own loops, so both are bounded ([`MAX_PING_COUNT`] echoes,
//! [`MAX_NETBENCH_MIB`] MiB) and Ctrl-C stops them; every wait is bounded too
//! (per-echo timeout, connect timeout, no-progress timeout, overall deadline), and
//! every failure ends as one `error:` line. `netbench`
//! also prints a machine-readable line, `NETBENCH bytes=<n> us=<elapsed>
//! mbps=<MB/s, 3 decimals> verified=<yes|no>`, for xtask.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, Ipv4Address};

use super::bench::{self, Verdict};
use super::pci::{self, PortConfig};
use super::{AddrSource, MacFmt, NetError, NetStack, TCP_BUF};
use crate::console::args::{self, CmdError};
use crate::{cmd_err, println, time};

impl From<NetError> for CmdError {
    fn from(e: NetError) -> Self {
        cmd_err!("{e}")
    }
}

/// Runs the network command `name` with arguments `rest`. `net` is the stack, if the
/// card came up at boot.
pub fn execute(net: Option<&mut NetStack>, name: &str, rest: &[&str]) -> Result<(), CmdError> {
    let usage = || {
        let c = crate::console::find(name);
        cmd_err!("usage: {} {}", name, c.map_or("", |c| c.usage))
    };
    if name == "pci" {
        return if rest.is_empty() {
            cmd_pci()
        } else {
            Err(usage())
        };
    }
    let net = net.ok_or_else(|| cmd_err!("no network: no e1000 was initialised at boot"))?;
    match (name, rest) {
        ("net", []) => {
            cmd_net(net);
            Ok(())
        }
        ("ip", []) => {
            match net.ipv4() {
                Some((a, p)) => println!("{a}/{p}"),
                None => println!("no IPv4 address"),
            }
            Ok(())
        }
        ("ip", [cidr]) => {
            let (ip, prefix) = args::parse_cidr(cidr)?;
            net.set_ipv4(Ipv4Address::from(ip), prefix)?;
            println!("ip: {}/{prefix}", Ipv4Address::from(ip));
            Ok(())
        }
        ("ping", [ip]) => ping(net, Ipv4Address::from(args::parse_ipv4(ip)?), 4),
        ("ping", [ip, count]) => {
            let n = args::parse_u64("count", count)?;
            // Bounded: the console (and every guest) waits while ping runs.
            if !(1..=MAX_PING_COUNT).contains(&n) {
                return Err(cmd_err!(
                    "bad count '{count}' (1-{MAX_PING_COUNT}: ping blocks the console; Ctrl-C stops it)"
                ));
            }
            ping(net, Ipv4Address::from(args::parse_ipv4(ip)?), n as u32)
        }
        ("netbench", [ip]) => netbench(net, Ipv4Address::from(args::parse_ipv4(ip)?), 8, 1),
        ("netbench", [ip, mib, rest @ ..]) if rest.len() <= 1 => {
            let n = args::parse_u64("size", mib)?;
            if !(1..=MAX_NETBENCH_MIB).contains(&n) {
                return Err(cmd_err!(
                    "bad size '{mib}' (1-{MAX_NETBENCH_MIB} MiB: netbench blocks the console; Ctrl-C stops it)"
                ));
            }
            let streams = match rest {
                [k] => args::parse_in_range("streams", k, 1, super::SINKS as u64)? as usize,
                _ => 1,
            };
            netbench(net, Ipv4Address::from(args::parse_ipv4(ip)?), n, streams)
        }
        _ => Err(usage()),
    }
}

fn cmd_pci() -> Result<(), CmdError> {
    let cs = PortConfig;
    let devs = pci::enumerate(&cs);
    println!(
        "  {:<8} {:<9} {:<6} {:<15} {:<7} {:>3}  bars",
        "addr", "id", "class", "kind", "cmd", "irq"
    );
    for d in &devs {
        let bars: Vec<_> = d
            .bars
            .iter()
            .map(|(i, b)| alloc::format!("{i}:{b}"))
            .collect();
        println!(
            "  {:<8} {:04x}:{:04x} {:02x}{:02x}{:02x} {:<15} {:<7} {:>3}  {}",
            alloc::format!("{}", d.addr),
            d.vendor,
            d.device,
            d.class,
            d.subclass,
            d.prog_if,
            d.class_name(),
            pci::command_flags(pci::command(&cs, d.addr)),
            d.irq,
            bars.join(" ")
        );
    }
    println!("  {} function(s)", devs.len());
    Ok(())
}

fn cmd_net(net: &mut NetStack) {
    let s = net.stats();
    let (rxn, txn) = net.ring_sizes();
    println!(
        "  nic         e1000 at {}, MAC {}, link {}, rings rx {rxn} / tx {txn}",
        net.pci_addr(),
        MacFmt(net.mac()),
        if net.link_up() { "up" } else { "DOWN" }
    );
    match net.ipv4() {
        Some((a, p)) => println!(
            "  ipv4        {a}/{p} ({})",
            match net.addr_source() {
                Some(AddrSource::CommandLine) => "kernel command line",
                Some(AddrSource::Mac) => "derived from the MAC",
                _ => "set with 'ip'",
            }
        ),
        None => println!("  ipv4        none (set one with 'ip a.b.c.d/nn')"),
    }
    println!(
        "  rx          {} packets, {} bytes",
        s.rx_packets, s.rx_bytes
    );
    println!(
        "  tx          {} packets, {} bytes",
        s.tx_packets, s.tx_bytes
    );
    println!(
        "  errors      rx {}, oversized {}, garbage {}, crc {}",
        s.rx_errors, s.rx_oversized, s.rx_garbage, s.hw_crc_errors
    );
    println!(
        "  drops       rx-ring-full {}, missed {}, no-buffer {}, tx-ring-full {}, tx-dropped {}",
        s.rx_ring_full, s.hw_missed, s.hw_no_buffer, s.tx_ring_full, s.tx_dropped
    );
    println!(
        "  sink        tcp/{} ({} completed)",
        bench::SINK_PORT,
        net.sink_runs()
    );
    let sw = &net.switch;
    println!(
        "  switch      {} guest port(s); uplink->guests {}, guests->uplink {}, unknown dst {}, to-stack drops {}",
        sw.ports.len(),
        sw.uplink_to_guests,
        sw.guests_to_uplink,
        sw.unknown,
        sw.host_dropped
    );
    for p in &sw.ports {
        println!(
            "    guest {:<4} {}  from-guest {} to-guest {} queued {} dropped {} spoofed {}",
            p.id,
            MacFmt(p.mac),
            p.counters.from_guest,
            p.counters.to_guest,
            p.queued(),
            p.counters.dropped,
            p.counters.spoofed
        );
    }
}

/// Polls until `done` says so or `timeout_us` passes; returns whether `done` did.
fn poll_until(
    net: &mut NetStack,
    timeout_us: u64,
    mut done: impl FnMut(&mut NetStack) -> bool,
) -> bool {
    let start = time::now_us();
    loop {
        net.poll();
        if done(net) {
            return true;
        }
        if time::now_us() - start > timeout_us {
            return false;
        }
        crate::arch::cpu::pause();
    }
}

fn fmt_ms(us: u64) -> alloc::string::String {
    alloc::format!("{}.{:03} ms", us / 1000, us % 1000)
}

/// Most echoes one `ping` sends (each waits at most [`PING_TIMEOUT_US`]).
pub const MAX_PING_COUNT: u64 = 20;
/// Largest `netbench` transfer.
pub const MAX_NETBENCH_MIB: u64 = 64;
const PING_TIMEOUT_US: u64 = 1_000_000;
const PING_INTERVAL_US: u64 = 200_000;
const PING_PAYLOAD: usize = 56;

fn ping(net: &mut NetStack, target: Ipv4Address, count: u32) -> Result<(), CmdError> {
    net.ready()?;
    let buf = || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 2048]);
    let h = net.sockets().add(icmp::Socket::new(buf(), buf()));
    let ident = 0x4856 ^ (time::now() as u16);
    let r = match net
        .sockets()
        .get_mut::<icmp::Socket>(h)
        .bind(icmp::Endpoint::Ident(ident))
    {
        Ok(()) => ping_loop(net, h, ident, target, count),
        Err(e) => Err(cmd_err!("ping: cannot bind ICMP socket: {e}")),
    };
    net.sockets().remove(h);
    r
}

fn ping_loop(
    net: &mut NetStack,
    h: smoltcp::iface::SocketHandle,
    ident: u16,
    target: Ipv4Address,
    count: u32,
) -> Result<(), CmdError> {
    let caps = ChecksumCapabilities::default();
    let mut rtts: Vec<u64> = Vec::new();
    println!("PING {target}: {PING_PAYLOAD} data bytes");
    for seq in 0..count {
        if crate::arch::serial::take_interrupt() {
            return Err(cmd_err!("ping interrupted (Ctrl-C)"));
        }
        let seq_no = seq as u16;
        let payload: Vec<u8> = (0..PING_PAYLOAD).map(|i| (i as u8) ^ (seq as u8)).collect();
        let repr = Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data: &payload,
        };
        let sent_at = time::now_us();
        {
            let sock = net.sockets().get_mut::<icmp::Socket>(h);
            let b = sock
                .send(repr.buffer_len(), IpAddress::Ipv4(target))
                .map_err(|e| cmd_err!("ping: cannot queue echo request: {e}"))?;
            repr.emit(&mut Icmpv4Packet::new_unchecked(b), &caps);
        }
        let mut rtt = None;
        poll_until(net, PING_TIMEOUT_US, |net| {
            let sock = net.sockets().get_mut::<icmp::Socket>(h);
            while let Ok((data, from)) = sock.recv() {
                let now = time::now_us();
                let Ok(pkt) = Icmpv4Packet::new_checked(data) else {
                    continue;
                };
                if let Ok(Icmpv4Repr::EchoReply {
                    ident: i,
                    seq_no: s,
                    data: d,
                }) = Icmpv4Repr::parse(&pkt, &caps)
                {
                    if i == ident && s == seq_no && from == IpAddress::Ipv4(target) {
                        if d != payload.as_slice() {
                            println!("reply from {from}: icmp_seq={seq} has corrupted data");
                        }
                        rtt = Some(now - sent_at);
                    }
                }
            }
            rtt.is_some()
        });
        match rtt {
            Some(us) => {
                println!(
                    "{} bytes from {target}: icmp_seq={seq} time={}",
                    PING_PAYLOAD + 8,
                    fmt_ms(us)
                );
                rtts.push(us);
            }
            None => println!("no reply from {target}: icmp_seq={seq} (timeout 1 s)"),
        }
        if seq + 1 < count {
            // Keep an interval between echoes, polling meanwhile.
            let wait = PING_INTERVAL_US.saturating_sub(time::now_us() - sent_at);
            poll_until(net, wait, |_| false);
        }
    }
    let got = rtts.len() as u32;
    let loss = (count - got) * 100 / count;
    if rtts.is_empty() {
        return Err(cmd_err!(
            "ping: no reply from {target} ({count} echo requests, 1 s timeout each, 100% loss)"
        ));
    }
    let min = rtts.iter().copied().min().unwrap_or(0);
    let max = rtts.iter().copied().max().unwrap_or(0);
    let avg = rtts.iter().sum::<u64>() / u64::from(got);
    println!(
        "--- {target}: {count} sent, {got} received, {loss}% loss, rtt min/avg/max {}/{}/{}",
        fmt_ms(min),
        fmt_ms(avg),
        fmt_ms(max)
    );
    Ok(())
}

const CONNECT_TIMEOUT_US: u64 = 5_000_000;
const STALL_TIMEOUT_US: u64 = 15_000_000;
const CLOSE_TIMEOUT_US: u64 = 2_000_000;

fn netbench(
    net: &mut NetStack,
    target: Ipv4Address,
    mib: u64,
    streams: usize,
) -> Result<(), CmdError> {
    net.ready()?;
    let hs: Vec<_> = (0..streams)
        .map(|_| net.add_tcp_socket(4096, TCP_BUF))
        .collect();
    let r = bench_run(net, &hs, target, mib << 20);
    for &h in &hs {
        if net.tcp(h).is_open() {
            net.tcp(h).abort();
        }
    }
    net.poll();
    for h in hs {
        net.remove_socket(h);
    }
    r
}

/// One connection of a netbench run: its share of the bytes and its progress.
struct Stream {
    h: smoltcp::iface::SocketHandle,
    total: u64,
    header: [u8; bench::HEADER_LEN],
    hdr_sent: usize,
    sent: u64,
    trailer: [u8; bench::TRAILER_LEN],
    got: usize,
    last_acked: u64,
}

fn bench_run(
    net: &mut NetStack,
    hs: &[smoltcp::iface::SocketHandle],
    target: Ipv4Address,
    total: u64,
) -> Result<(), CmdError> {
    let n = hs.len() as u64;
    let mut streams: Vec<Stream> = hs
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            // Split the bytes evenly; the first stream takes the remainder.
            let share = total / n + if i == 0 { total % n } else { 0 };
            Stream {
                h,
                total: share,
                header: bench::header(share),
                hdr_sent: 0,
                sent: 0,
                trailer: [0; bench::TRAILER_LEN],
                got: 0,
                last_acked: 0,
            }
        })
        .collect();
    for s in &streams {
        net.connect(s.h, target, bench::SINK_PORT)?;
    }
    let ok = poll_until(net, CONNECT_TIMEOUT_US, |net| {
        hs.iter().all(|&h| {
            !matches!(
                net.tcp(h).state(),
                tcp::State::SynSent | tcp::State::SynReceived
            )
        })
    });
    for &h in hs {
        match net.tcp(h).state() {
            tcp::State::Established => {}
            _ if !ok => {
                return Err(cmd_err!(
                    "netbench: connecting to {target}:{} timed out after 5 s (peer unreachable?)",
                    bench::SINK_PORT
                ))
            }
            s => {
                return Err(cmd_err!(
                    "netbench: connection to {target}:{} refused or reset ({s})",
                    bench::SINK_PORT
                ))
            }
        }
    }
    println!(
        "netbench: sending {total} bytes to {target}:{} over {n} connection(s)",
        bench::SINK_PORT
    );
    let start = time::now_us();
    let mut last_progress = start;
    // Generous: the slowest link here moves well over 100 KB/s.
    let deadline_us = 60_000_000 + total * 10;
    loop {
        if crate::arch::serial::take_interrupt() {
            return Err(cmd_err!("netbench interrupted (Ctrl-C)"));
        }
        net.poll();
        let now = time::now_us();
        for st in streams.iter_mut() {
            let s = net.tcp(st.h);
            if st.hdr_sent < st.header.len() {
                st.hdr_sent += s.send_slice(&st.header[st.hdr_sent..]).unwrap_or(0);
            }
            if st.hdr_sent == st.header.len() && st.sent < st.total {
                let (sent, total) = (st.sent, st.total);
                st.sent += s
                    .send(|buf| {
                        let n = (buf.len() as u64).min(total - sent) as usize;
                        bench::fill(sent, &mut buf[..n]);
                        (n, n as u64)
                    })
                    .unwrap_or(0);
            }
            while st.got < st.trailer.len() && s.can_recv() {
                st.got += s.recv_slice(&mut st.trailer[st.got..]).unwrap_or(0);
                last_progress = now;
            }
            if st.got < st.trailer.len() && (!s.is_active() || !s.may_recv()) {
                return Err(cmd_err!(
                    "netbench: connection closed by {target} after {} of {} bytes ({})",
                    st.sent,
                    st.total,
                    s.state()
                ));
            }
            let acked = st.sent + st.hdr_sent as u64 - s.send_queue() as u64;
            if acked != st.last_acked {
                st.last_acked = acked;
                last_progress = now;
            }
        }
        if streams.iter().all(|st| st.got == st.trailer.len()) {
            break;
        }
        if now - last_progress > STALL_TIMEOUT_US {
            let acked: u64 = streams
                .iter()
                .map(|st| st.last_acked.saturating_sub(st.hdr_sent as u64))
                .sum();
            return Err(cmd_err!(
                "netbench: no progress for {} s ({acked} of {total} bytes acknowledged by {target})",
                STALL_TIMEOUT_US / 1_000_000
            ));
        }
        if now - start > deadline_us {
            let sent: u64 = streams.iter().map(|st| st.sent).sum();
            return Err(cmd_err!(
                "netbench: gave up after {} s ({sent} of {total} bytes sent)",
                deadline_us / 1_000_000
            ));
        }
    }
    let us = (time::now_us() - start).max(1);
    for &h in hs {
        net.tcp(h).close();
    }
    poll_until(net, CLOSE_TIMEOUT_US, |net| {
        hs.iter().all(|&h| {
            matches!(
                net.tcp(h).state(),
                tcp::State::TimeWait | tcp::State::Closed
            )
        })
    });
    let mut bad = None;
    for st in &streams {
        let (count, verdict) = bench::parse_trailer(&st.trailer);
        if verdict != Some(Verdict::Ok) || count != st.total {
            bad = Some(match verdict {
                Some(v) => cmd_err!(
                    "netbench: sink at {target} reports {v} after {count} of {} bytes",
                    st.total
                ),
                None => cmd_err!("netbench: sink at {target} sent an invalid trailer"),
            });
        }
    }
    let verified = bad.is_none();
    let m = bench::mbps_milli(total, us);
    println!(
        "netbench: {total} bytes to {target} in {us} us over {n} connection(s): {}.{:03} MB/s, {}",
        m / 1000,
        m % 1000,
        if verified { "verified" } else { "NOT verified" }
    );
    println!(
        "NETBENCH bytes={total} us={us} mbps={}.{:03} verified={} streams={n}",
        m / 1000,
        m % 1000,
        if verified { "yes" } else { "no" }
    );
    bad.map_or(Ok(()), Err)
}
