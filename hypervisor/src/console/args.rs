//! Argument parsing helpers for console commands: positional words and `key=value`
//! options, with errors that name the bad word. Pure logic, tested on the host.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// A console command error: printed as one line, then the prompt comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError(pub String);

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for CmdError {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<String> for CmdError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Builds a [`CmdError`] with `format!` syntax.
#[macro_export]
macro_rules! cmd_err {
    ($($arg:tt)*) => { $crate::console::args::CmdError(alloc::format!($($arg)*)) };
}

/// Splits a command line into words.
pub fn words(line: &str) -> Vec<&str> {
    line.split_ascii_whitespace().collect()
}

/// Parses an unsigned integer (decimal or 0x-hex) named `what`.
pub fn parse_u64(what: &str, s: &str) -> Result<u64, CmdError> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| CmdError(alloc::format!("bad {what} '{s}': expected a number")))
}

/// Parses a number named `what` that must lie in `min..=max` (a console number never
/// wraps or truncates: `4294967297` is not guest 1).
pub fn parse_in_range(what: &str, s: &str, min: u64, max: u64) -> Result<u64, CmdError> {
    let v = parse_u64(what, s)?;
    if !(min..=max).contains(&v) {
        return Err(CmdError(alloc::format!(
            "bad {what} '{s}': must be {min}..{max}"
        )));
    }
    Ok(v)
}

/// Parses a 32-bit number (a guest id) without truncation.
pub fn parse_u32(what: &str, s: &str) -> Result<u32, CmdError> {
    Ok(parse_in_range(what, s, 0, u64::from(u32::MAX))? as u32)
}

/// Splits `key=value` options from positional words.
pub fn split_options<'a>(args: &[&'a str]) -> (Vec<&'a str>, Vec<(&'a str, &'a str)>) {
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) => opts.push((k, v)),
            None => pos.push(*a),
        }
    }
    (pos, opts)
}

/// Parses an IPv4 address `a.b.c.d`.
pub fn parse_ipv4(s: &str) -> Result<[u8; 4], CmdError> {
    let err = || CmdError(alloc::format!("bad IPv4 address '{s}'"));
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for o in out.iter_mut() {
        *o = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
    }
    if parts.next().is_some() {
        return Err(err());
    }
    Ok(out)
}

/// Parses `a.b.c.d/prefix`.
pub fn parse_cidr(s: &str) -> Result<([u8; 4], u8), CmdError> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| CmdError(alloc::format!("bad address '{s}': expected a.b.c.d/prefix")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| CmdError(alloc::format!("bad prefix length in '{s}' (0-32)")))?;
    Ok((parse_ipv4(ip)?, prefix))
}

/// Parses `a.b.c.d[:port]`.
pub fn parse_endpoint(s: &str, default_port: u16) -> Result<([u8; 4], u16), CmdError> {
    match s.split_once(':') {
        Some((ip, port)) => {
            let port = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| CmdError(alloc::format!("bad port in '{s}'")))?;
            Ok((parse_ipv4(ip)?, port))
        }
        None => Ok((parse_ipv4(s)?, default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_options() {
        assert_eq!(parse_u64("id", "42"), Ok(42));
        assert_eq!(parse_u64("id", "0x10"), Ok(16));
        assert!(parse_u64("id", "x").unwrap_err().0.contains("bad id 'x'"));
        assert!(parse_u64("id", "18446744073709551616").is_err());
        assert_eq!(parse_u32("guest id", "7"), Ok(7));
        assert!(parse_u32("guest id", "4294967297")
            .unwrap_err()
            .0
            .contains("must be 0..4294967295"));
        assert!(parse_in_range("downtime (ms)", "0", 1, 60_000).is_err());
        assert!(parse_in_range("downtime (ms)", "18446744073709551615", 1, 60_000).is_err());
        assert_eq!(parse_in_range("max-rounds", "100", 1, 100), Ok(100));
        let w = words("start counter mem=4 period=100  extra");
        let (pos, opts) = split_options(&w[1..]);
        assert_eq!(pos, vec!["counter", "extra"]);
        assert_eq!(opts, vec![("mem", "4"), ("period", "100")]);
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_ipv4("10.0.0.2"), Ok([10, 0, 0, 2]));
        assert!(parse_ipv4("10.0.0").is_err());
        assert!(parse_ipv4("10.0.0.256").is_err());
        assert!(parse_ipv4("10.0.0.1.1").is_err());
        assert_eq!(parse_cidr("10.0.0.1/24"), Ok(([10, 0, 0, 1], 24)));
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("10.0.0.1").is_err());
        assert_eq!(
            parse_endpoint("10.0.0.2:7000", 1),
            Ok(([10, 0, 0, 2], 7000))
        );
        assert_eq!(parse_endpoint("10.0.0.2", 1), Ok(([10, 0, 0, 2], 1)));
        assert!(parse_endpoint("10.0.0.2:0", 1).is_err());
    }
}
