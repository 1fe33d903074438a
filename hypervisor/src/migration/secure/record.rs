//! The record layer: ChaCha20-Poly1305 with a per-direction key and a 64-bit
//! sequence number as the nonce.

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};

use super::handshake::{msg, Secret};
use super::SecureError;

/// Record header: type u8, ciphertext length u16 BE (payload + tag).
pub const HEADER: usize = 3;
/// Poly1305 tag length.
pub const AEAD_TAG: usize = 16;
/// Largest plaintext in one record.
pub const MAX_PLAIN: usize = 16 * 1024;
/// Header and tag.
pub const OVERHEAD: usize = HEADER + AEAD_TAG;
/// Largest record on the wire.
pub const MAX_RECORD: usize = MAX_PLAIN + OVERHEAD;

fn nonce(seq: u64) -> Nonce {
    let mut n = Nonce::default();
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// Checks a record header before any of the record is buffered: known type and a
/// length in range. Returns the ciphertext length (payload + tag).
pub fn check_header(h: &[u8]) -> Result<usize, SecureError> {
    let len = usize::from(u16::from_be_bytes([h[1], h[2]]));
    let ok = match h[0] {
        msg::DATA => (AEAD_TAG + 1..=MAX_PLAIN + AEAD_TAG).contains(&len),
        msg::CLOSE => len == AEAD_TAG,
        t => return Err(SecureError::BadRecordType(t)),
    };
    if ok {
        Ok(len)
    } else {
        Err(SecureError::BadRecordLength(len))
    }
}

/// One direction's sealing state.
pub struct Sealer {
    aead: ChaCha20Poly1305,
    seq: u64,
}

impl Sealer {
    /// A sealer with sequence number 0.
    pub fn new(key: &Secret) -> Self {
        Self {
            aead: ChaCha20Poly1305::new((&**key).into()),
            seq: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    /// Writes a record of type `kind` carrying `plain` into `out` (which must hold
    /// `plain.len() + OVERHEAD` bytes); returns the record length. Refuses to use the
    /// last sequence number rather than ever wrap.
    pub fn seal(&mut self, kind: u8, plain: &[u8], out: &mut [u8]) -> Result<usize, SecureError> {
        debug_assert!(plain.len() <= MAX_PLAIN && out.len() >= plain.len() + OVERHEAD);
        if self.seq == u64::MAX {
            return Err(SecureError::CounterExhausted);
        }
        let len = plain.len() + AEAD_TAG;
        out[0] = kind;
        out[1..HEADER].copy_from_slice(&(len as u16).to_be_bytes());
        let (header, body) = out.split_at_mut(HEADER);
        let body = &mut body[..len];
        let (data, tag_out) = body.split_at_mut(plain.len());
        data.copy_from_slice(plain);
        let tag = self
            .aead
            .encrypt_inout_detached(&nonce(self.seq), header, data.into())
            .map_err(|_| SecureError::BadRecord)?;
        tag_out.copy_from_slice(&tag);
        self.seq += 1;
        Ok(HEADER + len)
    }
}

/// One direction's opening state.
pub struct Opener {
    aead: ChaCha20Poly1305,
    seq: u64,
}

impl Opener {
    /// An opener expecting sequence number 0.
    pub fn new(key: &Secret) -> Self {
        Self {
            aead: ChaCha20Poly1305::new((&**key).into()),
            seq: 0,
        }
    }

    /// Records opened so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Authenticates and decrypts `record` (header + ciphertext + tag, header already
    /// checked) in place; returns the plaintext length, at `record[HEADER..]`. Nothing
    /// is decrypted unless the tag verifies (the sequence number is the nonce, so a
    /// dropped, repeated, reordered or foreign record fails here).
    pub fn open(&mut self, record: &mut [u8]) -> Result<usize, SecureError> {
        if self.seq == u64::MAX {
            return Err(SecureError::CounterExhausted);
        }
        if record.len() < OVERHEAD {
            return Err(SecureError::BadRecord);
        }
        let (header, body) = record.split_at_mut(HEADER);
        let n = body.len() - AEAD_TAG;
        let (data, tag) = body.split_at_mut(n);
        let tag = Tag::try_from(&*tag).map_err(|_| SecureError::BadRecord)?;
        self.aead
            .decrypt_inout_detached(&nonce(self.seq), header, data.into(), &tag)
            .map_err(|_| SecureError::BadRecord)?;
        self.seq += 1;
        Ok(n)
    }
}
