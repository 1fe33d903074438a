//! The COM1 console (16550 UART at port 0x3F8), shared by the log, the console and
//! guest output. Polled: the hypervisor never enables UART interrupts.
//!
//! Output never waits for the line: writers queue into a bounded ring
//! ([`crate::console::out`]) and [`pump`] moves bytes to the UART only when its transmit
//! FIFO is empty (LSR.THRE), 16 at a time. The main loop and the VM-exit loop call
//! [`pump`]. Only the fatal paths (panic, hypervisor exception) write synchronously,
//! after [`force_unlock`] switched the port to that mode.

use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;
use uart_16550::SerialPort;

use super::port::{inb, outb};
use crate::console::out::{OutRing, OutStats, Source};

/// COM1 base port.
const COM1: u16 = 0x3F8;
/// Line status register and its "transmitter holding register empty" bit: with FIFOs on,
/// set when the whole transmit FIFO is empty.
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
/// Depth of the 16550's transmit FIFO.
const TX_FIFO: usize = 16;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);
static RING: Mutex<OutRing> = Mutex::new(OutRing::new());
/// Set on the fatal paths: write synchronously from then on.
static SYNC: AtomicBool = AtomicBool::new(false);

/// Initialises COM1 (115200 8N1, FIFOs on).
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC and both emulators; nothing else drives it.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
}

/// Queues `bytes` from `src`, whole or not at all. `\n` becomes `\r\n` for terminals.
fn queue(bytes: &[u8], src: Source) {
    if SYNC.load(Ordering::Relaxed) {
        write_sync(bytes);
        return;
    }
    // Convert in chunks on the stack: no allocation on the print path.
    let mut chunk = [0u8; 256];
    let mut n = 0;
    let mut ring = RING.lock();
    for &b in bytes {
        if n + 2 > chunk.len() {
            ring.push(&chunk[..n], src);
            n = 0;
        }
        if b == b'\n' {
            chunk[n] = b'\r';
            n += 1;
        }
        chunk[n] = b;
        n += 1;
    }
    if n > 0 {
        ring.push(&chunk[..n], src);
    }
}

/// Writes raw bytes from the hypervisor (queued; see the module docs).
pub fn write_bytes(bytes: &[u8]) {
    queue(bytes, Source::Hypervisor);
}

/// Writes a guest's console line (queued, within the guests' share of the ring).
pub fn write_guest(bytes: &[u8]) {
    queue(bytes, Source::Guest);
}

/// Moves queued bytes to the UART as far as its FIFO has room. Never waits.
pub fn pump() {
    if SYNC.load(Ordering::Relaxed) {
        return;
    }
    let Some(mut ring) = RING.try_lock() else {
        return;
    };
    if ring.is_empty() || inb(LSR) & LSR_THRE == 0 {
        return;
    }
    let mut fifo = [0u8; TX_FIFO];
    let n = ring.pop(&mut fifo);
    for &b in &fifo[..n] {
        outb(COM1, b);
    }
}

/// Waits until everything queued has gone out (before powering off).
pub fn flush_blocking() {
    while !RING.lock().is_empty() {
        pump();
        core::hint::spin_loop();
    }
}

/// Counters of the output queue (`mem`).
pub fn out_stats() -> OutStats {
    RING.lock().stats()
}

/// Returns a received byte, if one is waiting.
pub fn try_read() -> Option<u8> {
    PORT.lock().as_mut().and_then(|p| p.try_receive().ok())
}

/// For commands that block the console: whether Ctrl-C was typed since the last call.
/// Other input typed meanwhile is discarded.
pub fn take_interrupt() -> bool {
    let mut hit = false;
    while let Some(b) = try_read() {
        hit |= b == 0x03;
    }
    hit
}

/// A `fmt::Write` sink for the serial port (queued).
pub struct Writer;

impl core::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

fn write_sync(bytes: &[u8]) {
    let mut guard = PORT.lock();
    if let Some(port) = guard.as_mut() {
        for &b in bytes {
            if b == b'\n' {
                port.send_raw(b'\r');
            }
            port.send_raw(b);
        }
    }
}

/// For the fatal paths (panic, hypervisor exception): breaks the locks, writes out what
/// is queued, and makes every later write synchronous, so the report is never lost.
pub fn force_unlock() {
    SYNC.store(true, Ordering::Relaxed);
    if PORT.is_locked() {
        // SAFETY: called only on the fatal paths with interrupts off on the only CPU
        // that runs hypervisor code: the holder will never run again.
        unsafe { PORT.force_unlock() }
    }
    if RING.is_locked() {
        // SAFETY: as above.
        unsafe { RING.force_unlock() }
    }
    let mut ring = RING.lock();
    let mut chunk = [0u8; 64];
    loop {
        let n = ring.pop(&mut chunk);
        if n == 0 {
            break;
        }
        let mut guard = PORT.lock();
        if let Some(port) = guard.as_mut() {
            for &b in &chunk[..n] {
                port.send_raw(b);
            }
        }
    }
}
