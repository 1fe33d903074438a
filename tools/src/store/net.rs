//! The store on the lab's virtual Ethernet: a [`BxEndpoint`] on a hub port listens on
//! TCP port 7000 and serves one connection after another, each through its own
//! responder [`SecureChannel`] (the lab's pre-shared migration key) and [`Session`].
//! A hypervisor that connects while another connection is served is refused (RST) and
//! may try again.
//!
//! Every event is one line; the machine-readable ones start with `STORE-`:
//!
//! ```text
//! STORE-LISTEN ip=10.0.0.9 port=7000 hub_port=P dir=DIR checkpoints=N key=<fingerprint>
//! STORE-CONNECT peer=10.0.0.1:49153
//! STORE-CHECKPOINT name=verify-1 image=verify mem_bytes=8388608 bytes=123456 sha256=<hex> peer=10.0.0.1:49153 migrations=0 guest_time_ns=1234
//! STORE-CHECKPOINT-FAILED image=verify peer=10.0.0.1:49153 reason=<text>
//! STORE-RESTORE name=verify-1 peer=10.0.0.2:49160 bytes=4300000 resumed=yes outcome=ok
//! STORE-RESTORE name=nosuch-7 peer=10.0.0.2:49160 bytes=0 resumed=no outcome=no checkpoint named nosuch-7
//! STORE-REFUSED peer=... reason=<text>
//! STORE-CHANNEL peer=... error=<text>      (the secure channel failed: wrong key, ...)
//! ```
//!
//! Reasons come from peers and files: they are printed through
//! [`wire::printable`](hypervisor::migration::wire::printable) and always last on the line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypervisor::migration::secure::{MigrationKey, SecureChannel};
use hypervisor::migration::wire::printable;
use hypervisor::migration::PORT;

use super::dir::Store;
use super::session::{Event, Session};
use crate::bxnet::{BxEndpoint, HostRng};

/// The store's default address on the lab network.
pub const DEFAULT_IP: [u8; 4] = [10, 0, 0, 9];
/// The store's default MAC.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x09];

/// Where and how the store serves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Store directory.
    pub dir: PathBuf,
    /// The lab's migration key (64 hex digits).
    pub key_hex: String,
    /// Hub port the endpoint receives on (the hub's member port).
    pub hub_port: u16,
    /// IPv4 address (/24).
    pub ip: [u8; 4],
    /// MAC address.
    pub mac: [u8; 6],
    /// Largest guest memory accepted.
    pub max_mem: u64,
}

/// The line for a finished session.
pub fn event_line(ev: &Event, peer: &str) -> String {
    match ev {
        Event::Checkpoint(e) => format!(
            "STORE-CHECKPOINT name={} image={} mem_bytes={} bytes={} sha256={} peer={} migrations={} guest_time_ns={}",
            e.name, e.image, e.mem_bytes, e.file_bytes, e.memory_sha256, e.source_peer, e.migrations, e.guest_time_ns
        ),
        Event::CheckpointFailed { image, reason } => format!(
            "STORE-CHECKPOINT-FAILED image={image} peer={peer} reason={}",
            printable(reason, 300)
        ),
        Event::Restore {
            name,
            outcome,
            resumed,
            bytes,
        } => format!(
            "STORE-RESTORE name={name} peer={peer} bytes={bytes} resumed={} outcome={}",
            if *resumed { "yes" } else { "no" },
            match outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => printable(e, 300),
            }
        ),
        Event::Refused(why) => format!("STORE-REFUSED peer={peer} reason={}", printable(why, 300)),
    }
}

/// Serves until `stop` is set, passing every event line to `out`.
pub fn serve(cfg: &Config, stop: &AtomicBool, out: &mut dyn FnMut(String)) -> Result<(), String> {
    let key = MigrationKey::from_hex(cfg.key_hex.trim()).map_err(|e| format!("key: {e}"))?;
    let (mut store, cleaned) = Store::open(&cfg.dir)?;
    store.max_mem = cfg.max_mem;
    for f in cleaned {
        out(format!("STORE-CLEANUP removed uncommitted {f}"));
    }
    let mut ep = BxEndpoint::new(cfg.hub_port, cfg.mac, cfg.ip)?;
    let epoch = Instant::now();
    let now_us = || epoch.elapsed().as_micros() as u64;
    let ip = cfg.ip.map(|b| b.to_string()).join(".");
    out(format!(
        "STORE-LISTEN ip={ip} port={PORT} hub_port={} dir={} checkpoints={} key={}",
        cfg.hub_port,
        cfg.dir.display(),
        store.list().len(),
        key.fingerprint()
    ));
    while !stop.load(Ordering::Relaxed) {
        ep.listen(PORT)?;
        let peer = loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(p) = ep.accepted() {
                break p;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        out(format!("STORE-CONNECT peer={peer}"));
        let mut chan = SecureChannel::responder(&key, &mut HostRng, now_us())
            .map_err(|e| format!("secure channel: {e}"))?;
        let mut session = Session::new(&peer, now_us());
        loop {
            let now = now_us();
            let before = session.bytes_in;
            let done = session.poll(&mut chan.link(&mut ep, now), &mut store, now);
            if done || stop.load(Ordering::Relaxed) {
                break;
            }
            if session.bytes_in == before {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        // Flush the last records and close_notify, then FIN.
        let deadline = Instant::now() + Duration::from_secs(5);
        while chan.pending() > 0 && Instant::now() < deadline {
            chan.drive(&mut ep, now_us());
            std::thread::sleep(Duration::from_millis(1));
        }
        ep.linger(Duration::from_secs(3));
        if let Some(e) = chan.error() {
            out(format!(
                "STORE-CHANNEL peer={peer} error={}",
                printable(&e.to_string(), 300)
            ));
        }
        match &session.event {
            Some(ev) => out(event_line(ev, &peer)),
            None => out(format!("STORE-REFUSED peer={peer} reason=store stopped")),
        }
    }
    Ok(())
}
