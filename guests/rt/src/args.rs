//! Guest arguments: the `start` command's space-separated `key=value` words (for example
//! `pages=64 rate=100`), copied out of the boot-info page at start.

use guest_abi::MAX_ARGS;

/// The guest's arguments. Words without `=` are ignored; a repeated key takes its first
/// value.
#[derive(Clone)]
pub struct Args {
    raw: [u8; MAX_ARGS],
    len: usize,
}

impl Args {
    /// Copies an argument string (truncated to [`MAX_ARGS`] bytes).
    pub fn new(s: &[u8]) -> Self {
        let mut raw = [0u8; MAX_ARGS];
        let len = s.len().min(MAX_ARGS);
        raw[..len].copy_from_slice(&s[..len]);
        Self { raw, len }
    }

    /// The whole argument string ("" if it is not UTF-8).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.raw[..self.len]).unwrap_or("")
    }

    /// The `key=value` pairs in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.as_str()
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs().find(|&(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of `key` as a number (decimal, or hex with `0x`): `default` when absent,
    /// `Err(value)` when it does not parse.
    pub fn parse_u64(&self, key: &str, default: u64) -> Result<u64, &str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .map_err(|_| v),
        }
    }

    /// The value of `key` as a number, or `default` when absent or malformed (which is
    /// reported on the console).
    pub fn u64_or(&self, key: &str, default: u64) -> u64 {
        self.parse_u64(key, default).unwrap_or_else(|v| {
            crate::println!("rt: ignoring {key}={v}: not a number, using {default}");
            default
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_pairs() {
        let a = Args::new(b"pages=64  rate=100 mode=ud junk x=0x10 pages=9");
        assert_eq!(a.get("mode"), Some("ud"));
        assert_eq!(a.get("pages"), Some("64"));
        assert_eq!(a.get("rat"), None);
        assert_eq!(a.get("junk"), None);
        assert_eq!(a.parse_u64("rate", 1), Ok(100));
        assert_eq!(a.parse_u64("x", 1), Ok(16));
        assert_eq!(a.parse_u64("missing", 7), Ok(7));
        assert_eq!(a.parse_u64("mode", 7), Err("ud"));
    }

    #[test]
    fn empty_and_truncated() {
        assert_eq!(Args::new(b"").get("a"), None);
        let long = [b'a'; MAX_ARGS + 10];
        assert_eq!(Args::new(&long).as_str().len(), MAX_ARGS);
    }
}
