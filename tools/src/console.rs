//! A client for the hypervisor's serial console over a TCP socket (Bochs `com1:
//! mode=socket-server`, QEMU `-serial tcp:...,server=on`).
//!
//! A reader thread appends everything received to a log; commands are sent as lines and
//! answered by waiting for patterns in that log, never by fixed sleeps. The log strips
//! carriage returns and ANSI escapes (GRUB clears the screen on the serial line).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The hypervisor's prompt.
pub const PROMPT: &str = "hv> ";

#[derive(Default)]
struct Shared {
    text: String,
    closed: bool,
}

/// A connected console.
pub struct Console {
    stream: TcpStream,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    /// Offset in the log up to which output has been consumed by `wait_for`.
    cursor: usize,
    name: String,
}

/// Removes ANSI escape sequences and carriage returns.
pub fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl Console {
    /// Connects to `127.0.0.1:port`, retrying until `timeout` (the emulator may still be
    /// starting).
    pub fn connect(name: &str, port: u16, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "{name}: cannot connect to console port {port}: {e}"
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream.set_nodelay(true).ok();
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
        let s2 = Arc::clone(&shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pending = String::new();
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let (m, cv) = &*s2;
                        m.lock().unwrap().closed = true;
                        cv.notify_all();
                        return;
                    }
                    Ok(n) => {
                        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                        // Keep an incomplete escape sequence for the next read.
                        let cut = pending
                            .rfind('\x1b')
                            .filter(|&i| pending.len() - i < 8)
                            .unwrap_or(pending.len());
                        let done: String = pending.drain(..cut).collect();
                        let (m, cv) = &*s2;
                        m.lock().unwrap().text.push_str(&clean(&done));
                        cv.notify_all();
                    }
                }
            }
        });
        Ok(Self {
            stream,
            shared,
            cursor: 0,
            name: name.to_string(),
        })
    }

    /// The instance name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything received so far.
    pub fn log(&self) -> String {
        self.shared.0.lock().unwrap().text.clone()
    }

    /// Whether the emulator closed the console.
    pub fn closed(&self) -> bool {
        self.shared.0.lock().unwrap().closed
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("{}: console write failed: {e}", self.name))
    }

    /// Sends a command line, typed at a human pace: the emulated UART has a small FIFO and
    /// the hypervisor polls it between guest time slices.
    pub fn send_line(&mut self, line: &str) -> Result<(), String> {
        for chunk in line.as_bytes().chunks(8) {
            self.send_raw(chunk)?;
            std::thread::sleep(Duration::from_millis(15));
        }
        self.send_raw(b"\r")
    }

    /// Waits until `pattern` appears after the cursor; returns the text up to and
    /// including it and moves the cursor past it.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.wait_any(&[pattern], timeout).map(|(_, t)| t)
    }

    /// Waits for the first of `patterns`; returns its index and the text through it.
    pub fn wait_any(
        &mut self,
        patterns: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        loop {
            let hay = &g.text[self.cursor..];
            let hit = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| hay.find(p).map(|pos| (pos, i, p.len())))
                .min();
            if let Some((pos, i, len)) = hit {
                let end = self.cursor + pos + len;
                let text = g.text[self.cursor..end].to_string();
                self.cursor = end;
                return Ok((i, text));
            }
            if g.closed {
                return Err(format!(
                    "{}: console closed while waiting for {:?}",
                    self.name, patterns
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{}: timed out after {:?} waiting for {:?}",
                    self.name, timeout, patterns
                ));
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Runs a command and returns its output (the text between the echoed command and
    /// the next prompt).
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String, String> {
        self.send_line(line)?;
        let out = self.wait_for(&format!("\n{PROMPT}"), timeout)?;
        let out = out.strip_suffix(PROMPT).unwrap_or(&out);
        // Drop the echoed command line.
        Ok(match out.find('\n') {
            Some(i) if out[..i].contains(line.split_whitespace().next().unwrap_or("")) => {
                out[i + 1..].to_string()
            }
            _ => out.to_string(),
        })
    }
}
