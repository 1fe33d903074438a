//! `kv`: a small key-value server on TCP port 6379 over the PV NIC (smoltcp).
//!
//! Arguments: `ip=a.b.c.d/nn` (required; exit code 2 if missing or malformed), `gw=a.b.c.d`
//! (optional default gateway). Exit code 3 if the hypervisor has no PV NIC for it.
//!
//! The protocol (`SET`/`GET`/`DEL`/`COUNT`, one command per line) and the table are in
//! the crate's library (`kv::`), tested on the host. [`CONNS`] clients are served at
//! once; a closed connection's socket listens again. A reply is produced only when the
//! socket's send buffer has room for the longest reply, so a client that does not read
//! is slowed down (its commands wait in the receive buffer), never answered short. A line
//! longer than 256 bytes gets `ERR line too long` and the connection is closed.
//!
//! The table is a static in guest memory (256 entries, keys up to 32 bytes, values up to
//! 128), so it moves with the guest: on arrival by migration it prints the entry count.
//! It reports `Progress` (value = commands served, detail = entries) when they change (at
//! most once a second) and at least every 5 s.
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime.
#![no_std]
#![no_main]

use kv::{LineEvent, LineReader, Store, LINE_TOO_LONG, MAX_REPLY};
use rt::guest_abi::ReportKind;
use rt::net::{self, MacDisplay};
use rt::once::TakeOnce;
use rt::println;
use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::Duration;

rt::entry!(main);

/// The port.
const PORT: u16 = 6379;
/// Connections served at once.
const CONNS: usize = 4;
/// Bytes of each socket buffer (each direction).
const TCP_BUF: usize = 4096;

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;

/// Everything large, as statics (no allocator) in guest memory.
struct Memory {
    store: Store,
    tcp: [[[u8; TCP_BUF]; 2]; CONNS],
}

static MEMORY: TakeOnce<Memory> = TakeOnce::new(Memory {
    store: Store::new(),
    tcp: [[[0; TCP_BUF]; 2]; CONNS],
});

/// One connection's state besides its socket.
struct Conn {
    reader: LineReader,
    /// Counted as open.
    active: bool,
    /// Closing after an error: discard whatever still arrives.
    closing: bool,
}

/// What the guest has done.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    commands: u64,
    accepted: u64,
    open: u64,
    too_long: u64,
}

fn main(args: &rt::Args) -> i32 {
    let net::Net {
        mut nic,
        mut iface,
        cfg,
    } = match net::start(args) {
        Ok(n) => n,
        Err(e) => {
            println!("kv: {e}");
            return e.exit_code();
        }
    };
    let Some(Memory { store, tcp: bufs }) = MEMORY.take() else {
        println!("kv: memory already taken");
        return 1;
    };

    let mut storage = [SocketStorage::EMPTY; CONNS];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut handles = [None::<SocketHandle>; CONNS];
    for (h, [rx, tx]) in handles.iter_mut().zip(bufs.iter_mut()) {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        *h = Some(sockets.add(s));
    }
    let handles = handles.map(|h| h.expect("every socket added"));
    let mut conns = [const {
        Conn {
            reader: LineReader::new(),
            active: false,
            closing: false,
        }
    }; CONNS];

    println!(
        "kv: {cfg} mac {} listening on tcp/{PORT} ({} entries of at most {} keys)",
        MacDisplay(nic.mac()),
        store.len(),
        kv::MAX_ENTRIES
    );

    let mut c = Counters::default();
    let info = rt::info();
    let (mut migrations, mut restores) = (info.migrations, info.restores);
    let mut reported = None::<(Counters, usize)>;
    let mut printed = (Counters::default(), 0);
    let start = rt::time_ns();
    let (mut next_report, mut next_print, mut next_check) = (start, start + 5 * SECOND, start);
    loop {
        net::poll(&mut iface, &mut nic, &mut sockets);
        for (conn, &h) in conns.iter_mut().zip(handles.iter()) {
            serve(sockets.get_mut::<tcp::Socket>(h), conn, store, &mut c);
        }

        let now = rt::time_ns();
        if now >= next_check {
            next_check = now + 100 * MS;
            let info = rt::info();
            if info.migrations != migrations {
                migrations = info.migrations;
                println!(
                    "kv: arrived after migration {migrations} (entries: {}, connections open: {}, commands served: {})",
                    store.len(),
                    c.open,
                    c.commands
                );
            }
            if info.restores != restores {
                restores = info.restores;
                println!(
                    "kv: restored from a checkpoint (restore {restores}; entries: {}, connections open: {})",
                    store.len(),
                    c.open
                );
            }
        }
        let state = (c, store.len());
        if now >= next_report && reported != Some(state) || now >= next_report + 4 * SECOND {
            rt::report(ReportKind::Progress, c.commands, store.len() as u64);
            reported = Some(state);
            next_report = now + SECOND;
        }
        if now >= next_print {
            next_print = now + 5 * SECOND;
            if printed != state {
                printed = state;
                let s = nic.stats();
                println!(
                    "kv: {} entries, {} commands ({} connections, {} open, {} lines too long); nic rx {} tx {} errors {}",
                    store.len(),
                    c.commands,
                    c.accepted,
                    c.open,
                    c.too_long,
                    s.rx_frames,
                    s.tx_frames,
                    s.rx_errors + s.tx_errors + s.tx_dropped + s.ring_errors
                );
            }
        }
        net::wait(&mut iface, &mut nic, &sockets, net::DEFAULT_MAX_WAIT_NS);
    }
}

/// One connection: listen when closed, answer each complete line, close on a line too
/// long or when the client closed.
fn serve(s: &mut tcp::Socket<'_>, conn: &mut Conn, store: &mut Store, c: &mut Counters) {
    if !s.is_open() {
        // Closed or in TIME-WAIT: serve the next client with a fresh line buffer.
        if conn.active {
            conn.active = false;
            c.open -= 1;
        }
        conn.reader.clear();
        conn.closing = false;
        s.set_timeout(Some(Duration::from_secs(120)));
        s.set_keep_alive(Some(Duration::from_secs(30)));
        s.set_nagle_enabled(false);
        if let Err(e) = s.listen(PORT) {
            println!("kv: cannot listen on tcp/{PORT}: {e}");
        }
        return;
    }
    if !conn.active && s.is_active() {
        conn.active = true;
        c.open += 1;
        c.accepted += 1;
    }
    if conn.closing {
        // Our FIN is on its way; take what the client still sends so it can finish.
        while s.can_recv() {
            if s.recv(|b| (b.len(), ())).is_err() {
                break;
            }
        }
        return;
    }
    while s.may_send() && s.send_capacity() - s.send_queue() >= MAX_REPLY {
        // Take bytes up to the end of the next line (the receive buffer is a ring, so
        // a line may come in two pieces).
        let (taken, event) = match s.recv(|data| {
            let r = conn.reader.feed(data);
            (r.0, r)
        }) {
            Ok(r) => r,
            Err(_) => break,
        };
        match event {
            Some(LineEvent::Line) => {
                let reply = kv::execute(store, conn.reader.line());
                conn.reader.clear();
                c.commands += 1;
                // Room for the longest reply was checked above.
                let _ = s.send_slice(reply.as_bytes());
            }
            Some(LineEvent::TooLong) => {
                c.too_long += 1;
                let _ = s.send_slice(LINE_TOO_LONG);
                s.close();
                conn.closing = true;
                return;
            }
            None if taken == 0 => break,
            None => {}
        }
    }
    // The client closed its half (CLOSE-WAIT) and every line it sent is answered:
    // close ours, the FIN follows the replies still queued. (An unterminated last line
    // is dropped, as a line protocol does.)
    if s.state() == tcp::State::CloseWait && !s.can_recv() {
        s.close();
    }
}
