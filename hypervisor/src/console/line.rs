//! Line editing for the serial console: printable characters are echoed and collected,
//! backspace/DEL erases, Ctrl-U kills the line, Ctrl-C abandons it, CR or LF ends it.
//! An overlong line is refused as a whole (never truncated into a different command).
//! Escape sequences (arrow keys) are swallowed. Pure logic, tested on the host.

use alloc::string::String;
use alloc::vec::Vec;

/// Longest accepted command line.
pub const MAX_LINE: usize = 256;

/// A line starting with this echoes `*` for what follows (`key set <hex>`).
const SECRET_PREFIX: &[u8] = b"key set ";

/// What the caller should do after feeding a byte.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing visible.
    None,
    /// Send these bytes back to the terminal.
    Echo(&'static [u8]),
    /// Echo the typed byte.
    EchoByte(u8),
    /// A complete line (without terminator).
    Line(String),
    /// The line was too long and has been discarded.
    TooLong,
    /// Ctrl-C: the line was abandoned.
    Cancelled,
}

/// The editor state.
#[derive(Debug, Default)]
pub struct LineEditor {
    buf: Vec<u8>,
    overflow: bool,
    escape: u8,
    last_cr: bool,
}

impl LineEditor {
    /// A fresh editor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one received byte.
    pub fn feed(&mut self, b: u8) -> Event {
        // Swallow ESC [ ... final-byte sequences.
        if self.escape == 1 {
            self.escape = if b == b'[' || b == b'O' { 2 } else { 0 };
            return Event::None;
        }
        if self.escape == 2 {
            if (0x40..=0x7E).contains(&b) {
                self.escape = 0;
            }
            return Event::None;
        }
        let was_cr = core::mem::replace(&mut self.last_cr, b == b'\r');
        match b {
            0x1B => {
                self.escape = 1;
                Event::None
            }
            b'\n' if was_cr => Event::None, // CR LF counts once
            b'\r' | b'\n' => {
                let overflow = core::mem::replace(&mut self.overflow, false);
                let line = core::mem::take(&mut self.buf);
                if overflow {
                    Event::TooLong
                } else {
                    Event::Line(String::from_utf8_lossy(&line).into_owned())
                }
            }
            0x08 | 0x7F => {
                if self.buf.pop().is_some() {
                    Event::Echo(b"\x08 \x08")
                } else {
                    Event::None
                }
            }
            0x15 => {
                self.buf.clear();
                self.overflow = false;
                Event::Echo(b"\r\x1b[K")
            }
            0x03 => {
                self.buf.clear();
                self.overflow = false;
                Event::Cancelled
            }
            0x20..=0x7E => {
                if self.buf.len() >= MAX_LINE {
                    self.overflow = true;
                    Event::None
                } else if self.overflow {
                    Event::None
                } else {
                    self.buf.push(b);
                    // A key typed at the console is not echoed into the serial log.
                    let secret =
                        self.buf.len() > SECRET_PREFIX.len() && self.buf.starts_with(SECRET_PREFIX);
                    Event::EchoByte(if secret { b'*' } else { b })
                }
            }
            _ => Event::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_not_echoed() {
        let mut e = LineEditor::new();
        let ev = feed_all(&mut e, b"key set ab\r");
        assert_eq!(ev[7], Event::EchoByte(b' '));
        assert_eq!(ev[8], Event::EchoByte(b'*'));
        assert_eq!(ev[9], Event::EchoByte(b'*'));
        assert_eq!(ev[10], Event::Line("key set ab".into()));
        let ev = feed_all(&mut e, b"keys\r");
        assert_eq!(ev[3], Event::EchoByte(b's'));
    }

    fn feed_all(e: &mut LineEditor, s: &[u8]) -> Vec<Event> {
        s.iter()
            .map(|&b| e.feed(b))
            .filter(|ev| *ev != Event::None)
            .collect()
    }

    #[test]
    fn edits_and_completes_lines() {
        let mut e = LineEditor::new();
        let ev = feed_all(&mut e, b"helq\x7fp\r\n");
        assert_eq!(ev.last(), Some(&Event::Line("help".into())));
        // CR LF produced one line, not a second empty one.
        assert_eq!(ev.iter().filter(|e| matches!(e, Event::Line(_))).count(), 1);
        let ev = feed_all(&mut e, b"\n");
        assert_eq!(ev, vec![Event::Line(String::new())]);
    }

    #[test]
    fn overlong_line_is_refused_whole() {
        let mut e = LineEditor::new();
        for _ in 0..MAX_LINE + 10 {
            e.feed(b'a');
        }
        assert_eq!(e.feed(b'\r'), Event::TooLong);
        feed_all(&mut e, b"ok");
        assert_eq!(e.feed(b'\r'), Event::Line("ok".into()));
    }

    #[test]
    fn escapes_and_control_keys() {
        let mut e = LineEditor::new();
        feed_all(&mut e, b"ab\x1b[Ac\x1b[1;5D");
        assert_eq!(e.feed(b'\r'), Event::Line("abc".into()));
        feed_all(&mut e, b"junk\x15");
        assert_eq!(e.feed(b'\r'), Event::Line(String::new()));
        feed_all(&mut e, b"junk");
        assert_eq!(e.feed(0x03), Event::Cancelled);
        assert_eq!(e.feed(b'\r'), Event::Line(String::new()));
        // Backspace on empty line does nothing; binary garbage is ignored.
        assert_eq!(e.feed(0x7f), Event::None);
        assert_eq!(e.feed(0xff), Event::None);
    }
}
