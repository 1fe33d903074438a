//! The pre-shared migration key: parsing, fingerprint, and wiping.

use core::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// Length of the pre-shared key in bytes (256 bits).
pub const KEY_LEN: usize = 32;

/// Domain separation for the fingerprint, so that it is never a hash of the bare key.
const FINGERPRINT_LABEL: &[u8] = b"hvmig v2 key fingerprint\0";

/// The 256-bit pre-shared key that both hypervisors of a migration must hold.
///
/// Its bytes never leave this type except into the key schedule: `Debug` and
/// `Display` show only the [`fingerprint`](Self::fingerprint), and the bytes are wiped
/// when the value is dropped.
#[derive(Clone)]
pub struct MigrationKey([u8; KEY_LEN]);

/// Why a key string was refused. Never contains the key's digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Not 64 hex digits (the length found, surrounding whitespace ignored).
    Length(usize),
    /// A character that is not a hex digit, at this (0-based) position.
    Digit(usize),
    /// All 64 digits are zero: a placeholder, not a key.
    AllZero,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length(n) => write!(
                f,
                "migration key must be 64 hex digits (256 bits), got {n} characters"
            ),
            Self::Digit(i) => write!(f, "migration key has a non-hex character at position {i}"),
            Self::AllZero => f.write_str("migration key is all zeros; generate a random one"),
        }
    }
}

/// A short, non-secret identifier of a key: the first 8 bytes of
/// SHA-256("hvmig v2 key fingerprint\0" || key), printed as 16 hex digits. Two
/// hypervisors with the same fingerprint hold the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 8]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl MigrationKey {
    /// Parses 64 hex digits (either case; leading and trailing whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let s = s.trim().as_bytes();
        if s.len() != 2 * KEY_LEN {
            return Err(KeyError::Length(s.len()));
        }
        let mut k = Self([0; KEY_LEN]);
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(KeyError::Digit(2 * i))?;
            let lo = hex_val(pair[1]).ok_or(KeyError::Digit(2 * i + 1))?;
            k.0[i] = hi << 4 | lo;
        }
        if k.0 == [0; KEY_LEN] {
            return Err(KeyError::AllZero);
        }
        Ok(k)
    }

    /// A key from raw bytes (e.g. generated with RDSEED). The array is wiped.
    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let k = Self(bytes);
        bytes.zeroize();
        k
    }

    /// The key's public fingerprint (see [`Fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(FINGERPRINT_LABEL);
        h.update(self.0);
        let d = h.finalize();
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&d[..8]);
        Fingerprint(fp)
    }

    /// The secret bytes, for the key schedule only.
    pub(super) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for MigrationKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl core::str::FromStr for MigrationKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_hex(s)
    }
}

impl fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationKey(fingerprint {})", self.fingerprint())
    }
}

impl fmt::Display for MigrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}", self.fingerprint())
    }
}
