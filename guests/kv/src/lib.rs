//! The `kv` guest's protocol and table: pure code, tested on the host
//! (`cargo test -p kv --lib --target x86_64-unknown-linux-gnu`).
//!
//! A line protocol, one command per line (`\n`, an optional `\r` before it is ignored):
//!
//! ```text
//!   SET <key> <value>   ->  OK            (ERR full when 256 keys exist and key is new)
//!   GET <key>           ->  VALUE <value> | NONE
//!   DEL <key>           ->  OK | NONE
//!   COUNT               ->  COUNT <n>
//!   anything else       ->  ERR <reason>
//! ```
//!
//! Command names are case-insensitive. A key is 1 to [`MAX_KEY`] bytes of printable
//! ASCII without spaces; a value is the rest of the line after the key and one space: 1
//! to [`MAX_VALUE`] bytes of printable ASCII (spaces allowed). A line of more than
//! [`MAX_LINE`] bytes before its `\n` is answered with `ERR line too long`, and the
//! server then closes the connection ([`LineReader`] reports it).
//!
//! The [`Store`] is fixed arrays (no allocator), so it lives in guest memory and moves
//! with the guest on a migration.
#![cfg_attr(not(test), no_std)]

/// Longest key.
pub const MAX_KEY: usize = 32;
/// Longest value.
pub const MAX_VALUE: usize = 128;
/// Most entries.
pub const MAX_ENTRIES: usize = 256;
/// Longest line (without its `\n`).
pub const MAX_LINE: usize = 256;
/// Longest reply (`VALUE <value>\n`).
pub const MAX_REPLY: usize = b"VALUE ".len() + MAX_VALUE + 1;

/// One slot of the table; `klen == 0` is a free slot.
#[derive(Clone, Copy)]
struct Entry {
    klen: u8,
    vlen: u8,
    key: [u8; MAX_KEY],
    value: [u8; MAX_VALUE],
}

impl Entry {
    const FREE: Self = Self {
        klen: 0,
        vlen: 0,
        key: [0; MAX_KEY],
        value: [0; MAX_VALUE],
    };

    fn key(&self) -> &[u8] {
        &self.key[..self.klen as usize]
    }
}

/// The table was full (a new key did not fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// The key-value table: [`MAX_ENTRIES`] fixed slots, linear search.
pub struct Store {
    entries: [Entry; MAX_ENTRIES],
    count: usize,
}

impl Store {
    /// An empty table (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            entries: [Entry::FREE; MAX_ENTRIES],
            count: 0,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn find(&self, key: &[u8]) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.klen != 0 && e.key() == key)
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key)
            .map(|i| &self.entries[i].value[..self.entries[i].vlen as usize])
    }

    /// Sets `key` (1..=[`MAX_KEY`] bytes) to `value` (at most [`MAX_VALUE`] bytes);
    /// `Full` if the key is new and every slot is taken.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Full> {
        assert!(!key.is_empty() && key.len() <= MAX_KEY && value.len() <= MAX_VALUE);
        let i = match self.find(key) {
            Some(i) => i,
            None => {
                let i = self.entries.iter().position(|e| e.klen == 0).ok_or(Full)?;
                self.count += 1;
                let e = &mut self.entries[i];
                e.key[..key.len()].copy_from_slice(key);
                e.klen = key.len() as u8;
                i
            }
        };
        let e = &mut self.entries[i];
        e.value[..value.len()].copy_from_slice(value);
        e.vlen = value.len() as u8;
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn del(&mut self, key: &[u8]) -> bool {
        match self.find(key) {
            Some(i) => {
                self.entries[i] = Entry::FREE;
                self.count -= 1;
                true
            }
            None => false,
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `SET <key> <value>`.
    Set(&'a [u8], &'a [u8]),
    /// `GET <key>`.
    Get(&'a [u8]),
    /// `DEL <key>`.
    Del(&'a [u8]),
    /// `COUNT`.
    Count,
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_graphic()
}

fn is_value_byte(b: u8) -> bool {
    b.is_ascii_graphic() || b == b' '
}

/// A key argument: the whole of `arg`.
fn key<'a>(arg: &'a [u8], usage: &'static str) -> Result<&'a [u8], &'static str> {
    if arg.is_empty() || arg.contains(&b' ') {
        Err(usage)
    } else if arg.len() > MAX_KEY {
        Err("key too long")
    } else if !arg.iter().all(|&b| is_key_byte(b)) {
        Err("bad key: printable ASCII only")
    } else {
        Ok(arg)
    }
}

/// Parses one line (without its `\n`; a trailing `\r` is ignored). `Err` holds the
/// reason for the `ERR` reply.
pub fn parse(line: &[u8]) -> Result<Command<'_>, &'static str> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err("empty line");
    }
    let (cmd, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let is = |name: &str| cmd.eq_ignore_ascii_case(name.as_bytes());
    if is("SET") {
        const USAGE: &str = "usage: SET <key> <value>";
        let rest = rest.ok_or(USAGE)?;
        let i = rest.iter().position(|&b| b == b' ').ok_or(USAGE)?;
        let k = key(&rest[..i], USAGE)?;
        let v = &rest[i + 1..];
        if v.is_empty() {
            Err(USAGE)
        } else if v.len() > MAX_VALUE {
            Err("value too long")
        } else if !v.iter().all(|&b| is_value_byte(b)) {
            Err("bad value: printable ASCII only")
        } else {
            Ok(Command::Set(k, v))
        }
    } else if is("GET") {
        const USAGE: &str = "usage: GET <key>";
        Ok(Command::Get(key(rest.ok_or(USAGE)?, USAGE)?))
    } else if is("DEL") {
        const USAGE: &str = "usage: DEL <key>";
        Ok(Command::Del(key(rest.ok_or(USAGE)?, USAGE)?))
    } else if is("COUNT") {
        match rest {
            None => Ok(Command::Count),
            Some(_) => Err("usage: COUNT"),
        }
    } else {
        Err("unknown command (SET, GET, DEL, COUNT)")
    }
}

/// A reply line being built.
pub struct Reply {
    buf: [u8; MAX_REPLY],
    len: usize,
}

impl Reply {
    fn new() -> Self {
        Self {
            buf: [0; MAX_REPLY],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(MAX_REPLY - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    /// The reply's bytes, `\n` included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Runs one line against `store`; the reply line.
pub fn execute(store: &mut Store, line: &[u8]) -> Reply {
    let mut r = Reply::new();
    match parse(line) {
        Ok(Command::Set(k, v)) => match store.set(k, v) {
            Ok(()) => r.push(b"OK"),
            Err(Full) => r.push(b"ERR full"),
        },
        Ok(Command::Get(k)) => match store.get(k) {
            Some(v) => {
                r.push(b"VALUE ");
                r.push(v);
            }
            None => r.push(b"NONE"),
        },
        Ok(Command::Del(k)) => r.push(if store.del(k) { b"OK" } else { b"NONE" }),
        Ok(Command::Count) => {
            r.push(b"COUNT ");
            r.push_number(store.len());
        }
        Err(reason) => {
            r.push(b"ERR ");
            r.push(reason.as_bytes());
        }
    }
    r.push(b"\n");
    r
}

/// The reply to a line longer than [`MAX_LINE`] (the connection is then closed).
pub const LINE_TOO_LONG: &[u8] = b"ERR line too long\n";

/// What [`LineReader::feed`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line is in [`LineReader::line`]; [`LineReader::clear`] it when done.
    Line,
    /// The line grew past [`MAX_LINE`] bytes without a `\n`.
    TooLong,
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
pub struct LineReader {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl LineReader {
    /// An empty reader.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
        }
    }

    /// Takes bytes from `data` up to the end of the first line. Returns the bytes taken
    /// and whether a line is complete (its `\n` taken, not stored) or too long (the
    /// byte that did not fit not taken).
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<LineEvent>) {
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                return (i + 1, Some(LineEvent::Line));
            }
            if self.len == MAX_LINE {
                return (i, Some(LineEvent::TooLong));
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        (data.len(), None)
    }

    /// The line so far (complete after [`LineEvent::Line`]), without `\n`.
    pub fn line(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Forgets the line.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &mut Store, line: &str) -> String {
        String::from_utf8(execute(store, line.as_bytes()).as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn commands() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, "GET a"), "NONE\n");
        assert_eq!(run(&mut s, "SET a 1"), "OK\n");
        assert_eq!(run(&mut s, "set b hello world\r"), "OK\n");
        assert_eq!(run(&mut s, "GET b"), "VALUE hello world\n");
        assert_eq!(run(&mut s, "SET a 22"), "OK\n");
        assert_eq!(run(&mut s, "GET a"), "VALUE 22\n");
        assert_eq!(run(&mut s, "COUNT"), "COUNT 2\n");
        assert_eq!(run(&mut s, "DEL a"), "OK\n");
        assert_eq!(run(&mut s, "DEL a"), "NONE\n");
        assert_eq!(run(&mut s, "Count"), "COUNT 1\n");
    }

    #[test]
    fn errors() {
        let mut s = Store::new();
        for (line, reply) in [
            ("", "ERR empty line\n"),
            ("\r", "ERR empty line\n"),
            ("FOO x", "ERR unknown command (SET, GET, DEL, COUNT)\n"),
            ("SET", "ERR usage: SET <key> <value>\n"),
            ("SET a", "ERR usage: SET <key> <value>\n"),
            ("SET a ", "ERR usage: SET <key> <value>\n"),
            ("SET  a b", "ERR usage: SET <key> <value>\n"),
            ("GET", "ERR usage: GET <key>\n"),
            ("GET a b", "ERR usage: GET <key>\n"),
            ("DEL ", "ERR usage: DEL <key>\n"),
            ("COUNT x", "ERR usage: COUNT\n"),
            ("SET k\x01 v", "ERR bad key: printable ASCII only\n"),
            ("SET k v\x7f", "ERR bad value: printable ASCII only\n"),
        ] {
            assert_eq!(run(&mut s, line), reply, "{line:?}");
        }
        let k32 = "k".repeat(32);
        let v128 = "v".repeat(128);
        assert_eq!(run(&mut s, &format!("SET {k32} {v128}")), "OK\n");
        assert_eq!(
            run(&mut s, &format!("GET {k32}")),
            format!("VALUE {v128}\n")
        );
        assert_eq!(run(&mut s, &format!("SET {k32}k v")), "ERR key too long\n");
        assert_eq!(
            run(&mut s, &format!("SET k {v128}v")),
            "ERR value too long\n"
        );
        assert_eq!(run(&mut s, "COUNT"), "COUNT 1\n");
    }

    #[test]
    fn full_table() {
        let mut s = Store::new();
        for i in 0..MAX_ENTRIES {
            assert_eq!(run(&mut s, &format!("SET k{i} {i}")), "OK\n");
        }
        assert_eq!(run(&mut s, "COUNT"), "COUNT 256\n");
        assert_eq!(run(&mut s, "SET new 1"), "ERR full\n");
        assert_eq!(run(&mut s, "SET k7 seven"), "OK\n", "updates still work");
        assert_eq!(run(&mut s, "DEL k3"), "OK\n");
        assert_eq!(run(&mut s, "SET new 1"), "OK\n");
        assert_eq!(run(&mut s, "GET new"), "VALUE 1\n");
        assert_eq!(run(&mut s, "GET k7"), "VALUE seven\n");
        assert_eq!(run(&mut s, "GET k3"), "NONE\n");
        assert_eq!(s.len(), MAX_ENTRIES);
    }

    #[test]
    fn lines_across_chunks() {
        let mut r = LineReader::new();
        assert_eq!(r.feed(b"GET "), (4, None));
        assert_eq!(r.feed(b"a\nSET"), (2, Some(LineEvent::Line)));
        assert_eq!(r.line(), b"GET a");
        r.clear();
        assert_eq!(r.feed(b"SET"), (3, None));
        assert_eq!(r.feed(b"\n"), (1, Some(LineEvent::Line)));
        assert_eq!(r.line(), b"SET");
    }

    #[test]
    fn line_length_limit() {
        let mut r = LineReader::new();
        let max = vec![b'x'; MAX_LINE];
        assert_eq!(r.feed(&max), (MAX_LINE, None));
        assert_eq!(r.feed(b"\n"), (1, Some(LineEvent::Line)));
        assert_eq!(r.line().len(), MAX_LINE);
        r.clear();
        let long = vec![b'x'; MAX_LINE + 5];
        assert_eq!(r.feed(&long), (MAX_LINE, Some(LineEvent::TooLong)));
    }
}
