//! The COM1 console (16550 UART at port 0x3F8), shared by the log, the console and
//! guest output. Polled: the hypervisor never enables UART interrupts.

use spin::Mutex;
use uart_16550::SerialPort;

/// COM1 base port.
const COM1: u16 = 0x3F8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Initialises COM1 (115200 8N1, FIFOs on).
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC and both emulators; nothing else drives it.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
}

/// Writes raw bytes. `\n` becomes `\r\n` for terminals.
pub fn write_bytes(bytes: &[u8]) {
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

/// Returns a received byte, if one is waiting.
pub fn try_read() -> Option<u8> {
    PORT.lock().as_mut().and_then(|p| p.try_receive().ok())
}

/// A `fmt::Write` sink for the serial port.
pub struct Writer;

impl core::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Breaks the lock after a panic so that the panic message can still be printed.
pub fn force_unlock() {
    if PORT.is_locked() {
        // SAFETY: called only on the panic path with interrupts off on the only CPU that
        // runs hypervisor code: the holder will never run again.
        unsafe { PORT.force_unlock() }
    }
}
