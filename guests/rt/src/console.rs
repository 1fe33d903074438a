//! The console: `print!`/`println!` format into a line buffer on the caller's stack and
//! hand it to the hypervisor with `ConsoleWrite`, so a line normally costs one hypercall.
//!
//! There is no shared buffer: guests are single-threaded without interrupts, but the
//! panic handler may print while a `println!` is in progress, and a per-call buffer makes
//! that harmless. The hypervisor assembles partial writes into lines and prefixes them
//! with the guest id, so a line longer than the buffer simply goes out in pieces.

use core::fmt;

/// Bytes buffered before a write goes out (longer lines are split).
const LINE: usize = 256;

/// A line being formatted.
struct LineBuf {
    buf: [u8; LINE],
    len: usize,
}

impl LineBuf {
    fn flush(&mut self) {
        if self.len > 0 {
            // Nothing sensible to do if the console refuses: drop the text.
            let _ = crate::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            if self.len == LINE {
                self.flush();
            }
            let n = bytes.len().min(LINE - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// Formats `args` and writes the text to the console (what [`print!`](crate::print)
/// and [`println!`](crate::println) call).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut line = LineBuf {
        buf: [0; LINE],
        len: 0,
    };
    let _ = fmt::Write::write_fmt(&mut line, args);
    line.flush();
}

/// Prints to the hypervisor console, without a newline.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!($($arg)*))
    };
}

/// Prints a line to the hypervisor console (which prefixes it with `[g<id>]`).
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::print_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
