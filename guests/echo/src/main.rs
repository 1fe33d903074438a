//! `echo`: a TCP and UDP echo server on port 7 over the PV NIC (smoltcp).
//!
//! Arguments: `ip=a.b.c.d/nn` (required; exit code 2 if missing or malformed), `gw=a.b.c.d`
//! (optional default gateway). Exit code 3 if the hypervisor has no PV NIC for it.
//!
//! TCP: [`CONNS`] sockets listen on port 7, so that many clients are served at once;
//! everything a client sends comes back in order (a byte is taken from the receive
//! buffer only when the send buffer has room for it, so none is ever dropped). When a
//! client closes its half, the rest is sent and the connection closed; a closed socket
//! listens again. UDP: each datagram to port 7 is sent back to its sender.
//!
//! It reports `Progress` (value = bytes echoed, TCP and UDP; detail = TCP connections
//! open) when they change (at most once a second) and at least every 5 s, prints a status
//! line every 5 s when something changed, and says when it has arrived by migration (or
//! been restored from a checkpoint), with the state it kept: open connections and
//! counters live in guest memory and move with it.
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime.
#![no_std]
#![no_main]

use rt::guest_abi::ReportKind;
use rt::net::{self, MacDisplay};
use rt::once::TakeOnce;
use rt::println;
use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Duration;

rt::entry!(main);

/// The echo port.
const PORT: u16 = 7;
/// TCP connections served at once.
const CONNS: usize = 4;
/// Bytes of each TCP socket buffer (each direction).
const TCP_BUF: usize = 8192;
/// UDP: datagrams and bytes buffered per direction.
const UDP_PACKETS: usize = 16;
const UDP_BUF: usize = 8192;

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;

/// Socket buffers: statics (no allocator), in guest memory like everything else.
struct Buffers {
    tcp: [[[u8; TCP_BUF]; 2]; CONNS],
    udp_rx_meta: [udp::PacketMetadata; UDP_PACKETS],
    udp_tx_meta: [udp::PacketMetadata; UDP_PACKETS],
    udp_rx: [u8; UDP_BUF],
    udp_tx: [u8; UDP_BUF],
}

static BUFFERS: TakeOnce<Buffers> = TakeOnce::new(Buffers {
    tcp: [[[0; TCP_BUF]; 2]; CONNS],
    udp_rx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
    udp_tx_meta: [udp::PacketMetadata::EMPTY; UDP_PACKETS],
    udp_rx: [0; UDP_BUF],
    udp_tx: [0; UDP_BUF],
});

/// What the guest has done.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    /// Bytes echoed over TCP.
    tcp_bytes: u64,
    /// Connections accepted.
    accepted: u64,
    /// Connections open now.
    open: u64,
    /// Datagrams (and their bytes) echoed over UDP.
    udp_datagrams: u64,
    udp_bytes: u64,
    /// Datagrams not echoed (the send buffer was full).
    udp_dropped: u64,
}

impl Counters {
    fn bytes(&self) -> u64 {
        self.tcp_bytes + self.udp_bytes
    }
}

fn main(args: &rt::Args) -> i32 {
    let net::Net {
        mut nic,
        mut iface,
        cfg,
    } = match net::start(args) {
        Ok(n) => n,
        Err(e) => {
            println!("echo: {e}");
            return e.exit_code();
        }
    };
    let Some(bufs) = BUFFERS.take() else {
        println!("echo: socket buffers already taken");
        return 1;
    };
    let Buffers {
        tcp: tcp_bufs,
        udp_rx_meta,
        udp_tx_meta,
        udp_rx,
        udp_tx,
    } = bufs;

    let mut storage = [SocketStorage::EMPTY; CONNS + 1];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut tcp_handles = [None::<SocketHandle>; CONNS];
    for (h, [rx, tx]) in tcp_handles.iter_mut().zip(tcp_bufs.iter_mut()) {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        *h = Some(sockets.add(s));
    }
    let tcp_handles = tcp_handles.map(|h| h.expect("every socket added"));
    let mut udp_sock = udp::Socket::new(
        udp::PacketBuffer::new(&mut udp_rx_meta[..], &mut udp_rx[..]),
        udp::PacketBuffer::new(&mut udp_tx_meta[..], &mut udp_tx[..]),
    );
    if let Err(e) = udp_sock.bind(PORT) {
        println!("echo: cannot bind udp/{PORT}: {e}");
        return 1;
    }
    let udp_handle = sockets.add(udp_sock);
    let mut active = [false; CONNS];

    println!(
        "echo: {cfg} mac {} listening on tcp/{PORT} and udp/{PORT}",
        MacDisplay(nic.mac())
    );

    let mut c = Counters::default();
    let info = rt::info();
    let (mut migrations, mut restores) = (info.migrations, info.restores);
    let mut reported = None::<Counters>;
    let mut printed = Counters::default();
    let start = rt::time_ns();
    let (mut next_report, mut next_print, mut next_check) = (start, start + 5 * SECOND, start);
    loop {
        net::poll(&mut iface, &mut nic, &mut sockets);
        for (i, &h) in tcp_handles.iter().enumerate() {
            serve_tcp(sockets.get_mut::<tcp::Socket>(h), &mut active[i], &mut c);
        }
        serve_udp(sockets.get_mut::<udp::Socket>(udp_handle), &mut c);

        let now = rt::time_ns();
        if now >= next_check {
            next_check = now + 100 * MS;
            let info = rt::info();
            if info.migrations != migrations {
                migrations = info.migrations;
                println!(
                    "echo: arrived after migration {migrations} (connections open: {}, bytes echoed: {})",
                    c.open,
                    c.bytes()
                );
            }
            if info.restores != restores {
                restores = info.restores;
                println!(
                    "echo: restored from a checkpoint (restore {restores}; connections open: {}, bytes echoed: {})",
                    c.open,
                    c.bytes()
                );
            }
        }
        if now >= next_report && reported != Some(c) || now >= next_report + 4 * SECOND {
            rt::report(ReportKind::Progress, c.bytes(), c.open);
            reported = Some(c);
            next_report = now + SECOND;
        }
        if now >= next_print {
            next_print = now + 5 * SECOND;
            if printed != c {
                printed = c;
                let s = nic.stats();
                println!(
                    "echo: {} bytes echoed (tcp {} in {} connections, {} open; udp {} datagrams, {} dropped); nic rx {} tx {} errors {}",
                    c.bytes(),
                    c.tcp_bytes,
                    c.accepted,
                    c.open,
                    c.udp_datagrams,
                    c.udp_dropped,
                    s.rx_frames,
                    s.tx_frames,
                    s.rx_errors + s.tx_errors + s.tx_dropped + s.ring_errors
                );
            }
        }
        net::wait(&mut iface, &mut nic, &sockets, net::DEFAULT_MAX_WAIT_NS);
    }
}

/// One TCP socket: listen when closed, echo what arrived, close when the client did.
fn serve_tcp(s: &mut tcp::Socket<'_>, active: &mut bool, c: &mut Counters) {
    if !s.is_open() {
        // Closed or in TIME-WAIT: the connection is over; serve the next client.
        if *active {
            *active = false;
            c.open -= 1;
        }
        // Drop dead peers (keep-alive probes unanswered), without hurrying anyone who
        // is merely quiet, or held up by a migration.
        s.set_timeout(Some(Duration::from_secs(120)));
        s.set_keep_alive(Some(Duration::from_secs(30)));
        s.set_nagle_enabled(false);
        if let Err(e) = s.listen(PORT) {
            println!("echo: cannot listen on tcp/{PORT}: {e}");
        }
        return;
    }
    if !*active && s.is_active() {
        *active = true;
        c.open += 1;
        c.accepted += 1;
    }
    // Move bytes from the receive to the send buffer, never more than the send buffer
    // takes: what does not fit stays in the receive buffer (and TCP's window closes).
    let mut chunk = [0u8; 2048];
    while s.may_send() && s.can_recv() {
        let room = s.send_capacity() - s.send_queue();
        if room == 0 {
            break;
        }
        let n = room.min(chunk.len());
        let got = match s.recv_slice(&mut chunk[..n]) {
            Ok(0) | Err(_) => break,
            Ok(got) => got,
        };
        match s.send_slice(&chunk[..got]) {
            Ok(sent) => {
                debug_assert_eq!(sent, got);
                c.tcp_bytes += sent as u64;
            }
            // Cannot happen (may_send checked, room reserved); say so if it does.
            Err(e) => println!("echo: lost {got} bytes: {e}"),
        }
    }
    // The client closed its half (CLOSE-WAIT) and everything it sent has been taken:
    // close ours, the FIN follows the data still queued.
    if s.state() == tcp::State::CloseWait && !s.can_recv() {
        s.close();
    }
}

/// The UDP socket: send every datagram back to where it came from.
fn serve_udp(u: &mut udp::Socket<'_>, c: &mut Counters) {
    let mut buf = [0u8; 1536];
    while u.can_recv() {
        let (n, from) = match u.recv() {
            Ok((data, meta)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                (n, meta.endpoint)
            }
            Err(_) => break,
        };
        match u.send_slice(&buf[..n], from) {
            Ok(()) => {
                c.udp_datagrams += 1;
                c.udp_bytes += n as u64;
            }
            Err(_) => c.udp_dropped += 1,
        }
    }
}
