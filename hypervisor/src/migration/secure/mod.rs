//! The secure migration channel: mutual authentication with a pre-shared key, fresh
//! per-session keys, and an AEAD record layer under the migration stream.
//!
//! [`SecureChannel`] is state only; [`SecureChannel::link`] gives a [`Link`] view over
//! it and an inner link (the kernel's `TcpLink`, rebuilt on every poll), so the
//! [`Source`](super::source::Source) and [`Receiver`](super::receiver::Receiver) run
//! over it unchanged. All cryptography comes from RustCrypto crates (`hmac`, `sha2`,
//! `hkdf`, `chacha20poly1305`); this module only frames and sequences it.
//!
//! # Driving it from the kernel
//!
//! ```text
//!  // Start of an outgoing migration (key from the console, nonces from RDSEED/RDRAND):
//!  out.chan = SecureChannel::initiator(&key, &mut rdrand, now)?;
//!  // Every poll, over that poll's fresh TcpLink:
//!  let mut tcp = TcpLink { net, h: out.sock };
//!  status = out.source.poll(&mut guest, &mut out.chan.link(&mut tcp, now), now);
//!  // After the Source finished: keep calling out.chan.drive(&mut tcp, now) until
//!  // out.chan.pending() == 0 (COMMIT and close_notify are flushed) or a short timeout,
//!  // before dropping or aborting the socket. Print out.chan.error() with the outcome.
//!
//!  // An accepted connection: one responder channel per connection, same pattern
//!  // with the Receiver: inc.receiver.poll(&mut inc.chan.link(&mut tcp, now), ...).
//! ```
//!
//! # Handshake
//!
//! The source is the initiator (I), the destination the responder (R). K is the
//! 256-bit pre-shared [`MigrationKey`].
//!
//! ```text
//!  K_auth = HKDF-SHA256(salt = "hvmig v2 handshake", ikm = K, info = "hvmig v2 auth")
//!
//!  I → R  ClientHello      "HVMIGSEC" | version u16 BE = 2 | reserved u16 = 0 | nonce_i[32]
//!  R → I  ServerHello      0x02 | nonce_r[32] | tag_r[32]
//!           tag_r = HMAC-SHA256(K_auth, "hvmig v2 responder proof" | ClientHello | nonce_r)
//!  I → R  ClientFinished   0x03 | tag_i[32]
//!           tag_i = HMAC-SHA256(K_auth, "hvmig v2 initiator proof" | ClientHello | nonce_r | tag_r)
//!  either  Alert           0x15 | code u8     (plaintext; only before the first record:
//!                                             1 = key proof failed, 2 = version, 3 = malformed;
//!                                             R instead of ServerHello: 4 = busy, 5 = no key)
//!
//!  PRK   = HKDF-Extract(salt = nonce_i | nonce_r, ikm = K)
//!  k_i2r = HKDF-Expand(PRK, "hvmig v2 i->r", 32)      k_r2i = HKDF-Expand(PRK, "hvmig v2 r->i", 32)
//! ```
//!
//! The initiator verifies tag_r (constant time, `Mac::verify_slice`) before it sends
//! anything keyed; it is established once ClientFinished is queued and may send
//! records right behind it. The responder verifies tag_i before it decrypts anything.
//! Both nonces are 32 bytes from a caller-supplied [`NonceSource`] (RDRAND/RDSEED in
//! the kernel). The two proofs use different labels, so one side's tag is never valid
//! as the other's (no reflection); tag_i covers the responder's fresh nonce_r, so
//! recorded initiator messages replayed to a responder fail.
//!
//! # Records
//!
//! ```text
//!  type u8 (0x17 data | 0x18 close_notify) | length u16 BE | ciphertext | Poly1305 tag[16]
//!  length = plaintext + 16; data: 1..=16384 bytes of plaintext; close_notify: none.
//!  AEAD = ChaCha20-Poly1305(k_dir), nonce = 0u32 | seq u64 BE, AAD = the 3-byte header
//! ```
//!
//! `seq` counts the records of one direction from 0 and is never sent: a dropped,
//! repeated, reordered, or foreign-session record fails authentication. The header is
//! range-checked before the record is buffered (so at most one record is ever held),
//! and a record's plaintext is released only after its tag verified. A sender refuses
//! to seal at seq = 2^64 - 1 rather than wrap. Either side ends its direction with a
//! close_notify record; a connection that ends without one, or mid-record, is reported
//! as truncated.
//!
//! # Failures
//!
//! Every failure is a [`SecureError`] (see [`SecureChannel::error`]); the link view
//! reports [`LinkState::Closed`] from then on, and the inner link is closed once any
//! alert is flushed. What each side sees:
//!
//! | situation | initiator (source) | responder (destination) |
//! |---|---|---|
//! | different keys | [`PeerLacksKey`](SecureError::PeerLacksKey) (bad tag_r), sends Alert 1 | [`KeyRejectedByPeer`](SecureError::KeyRejectedByPeer) (Alert 1) |
//! | forged/replayed ClientFinished | [`KeyRejectedByPeer`](SecureError::KeyRejectedByPeer) (Alert 1) | [`PeerLacksKey`](SecureError::PeerLacksKey), sends Alert 1 |
//! | old plaintext peer (`HVMIGR01`) | [`PlaintextPeer`](SecureError::PlaintextPeer) (its REJECT) | [`PlaintextPeer`](SecureError::PlaintextPeer), answers with a plaintext-protocol REJECT the old source prints |
//! | garbage / wrong magic | [`BadHandshake`](SecureError::BadHandshake) | [`BadMagic`](SecureError::BadMagic) at the first wrong byte |
//! | peer silent or too slow | [`HandshakeTimeout`](SecureError::HandshakeTimeout) | same |
//! | tampered/dropped/duplicated/reordered/foreign record | [`BadRecord`](SecureError::BadRecord) (or a header error) | same |
//! | connection cut | [`Truncated`](SecureError::Truncated) / [`ClosedWithoutNotify`](SecureError::ClosedWithoutNotify) | same |
//!
//! # Threat model
//!
//! Protected, against anyone on the network path (passive or active) who does not
//! hold K: confidentiality of the whole migration stream (guest memory, vCPU and device
//! state, the Hello with name and arguments, READY/COMMIT); its integrity and origin
//! (nothing unauthentic reaches the [`Receiver`](super::receiver::Receiver), so no
//! forged guest is ever installed); mutual authentication (each side proves it holds
//! K); replay of a recorded handshake or records into another session; reordering,
//! duplication, and truncation of records.
//!
//! Not protected: availability (an attacker can always reset or stall the TCP
//! connection; the migration then fails safely and the guest keeps running at the
//! source, and a silent client holds the destination's single migration port until
//! the handshake timeout); traffic analysis (record sizes and timing, hence roughly how
//! many pages are zero or dirty); forward secrecy (the session keys are derived from
//! K and public nonces, so whoever later learns K can decrypt recorded sessions; an
//! ephemeral Diffie-Hellman would fix that); a compromised hypervisor or a leaked K
//! (anyone with K is a legitimate peer); key distribution and rotation (the operator
//! sets the same key on both sides and compares [`MigrationKey::fingerprint`]s);
//! and weak randomness (if *both* sides repeat nonces, session keys repeat; one good
//! side suffices for fresh keys).
//!
//! On the bare-metal target the primitives use their portable integer backends (the
//! hypervisor does not enable SSE; see `.cargo/config.toml`); ChaCha20, Poly1305 and
//! SHA-256 are constant-time there by construction.

mod channel;
mod handshake;
mod key;
mod record;

#[cfg(test)]
mod tests;

use core::fmt;

pub use channel::{ChannelLink, ChannelStats, Role, SecureChannel, DEFAULT_HANDSHAKE_TIMEOUT_US};
pub use handshake::{alert, msg, refusal, CLIENT_HELLO_LEN, MAGIC, NONCE_LEN, VERSION};
pub use key::{Fingerprint, KeyError, MigrationKey, KEY_LEN};
pub use record::{MAX_PLAIN, MAX_RECORD, OVERHEAD};

#[allow(unused_imports)]
use super::link::{Link, LinkState};

/// Where handshake nonces come from: RDSEED/RDRAND in the kernel, a seeded generator
/// in tests. Nonces need not be secret, but must not repeat.
pub trait NonceSource {
    /// Fills `buf` with fresh random bytes.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NonceError>;
}

/// The random source failed (e.g. RDRAND kept reporting no data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonceError;

impl fmt::Display for NonceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the random number generator failed")
    }
}

/// Why a secure channel failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecureError {
    /// No nonce could be drawn.
    NoRandomness,
    /// The handshake did not finish in time.
    HandshakeTimeout {
        /// The limit, in milliseconds.
        ms: u64,
    },
    /// The connection closed (or never opened) before the handshake finished.
    ClosedDuringHandshake,
    /// The peer speaks the old unencrypted migration protocol (`HVMIGR01`).
    PlaintextPeer,
    /// The first bytes are not a secure-channel ClientHello.
    BadMagic,
    /// The initiator speaks another secure-channel version.
    BadVersion(u16),
    /// A malformed handshake message.
    BadHandshake(&'static str),
    /// The peer's proof of the key (its HMAC tag) did not verify.
    PeerLacksKey,
    /// The peer reports that our proof of the key did not verify.
    KeyRejectedByPeer,
    /// The peer aborted the handshake with this alert code (other than key failure).
    PeerAlert(u8),
    /// A record header with an unknown type.
    BadRecordType(u8),
    /// A record length out of range (ciphertext + tag bytes announced).
    BadRecordLength(usize),
    /// A record failed authentication.
    BadRecord,
    /// The connection ended in the middle of a record.
    Truncated,
    /// The connection ended without the peer's close_notify record.
    ClosedWithoutNotify,
    /// 2^64 - 1 records in one direction: refusing to reuse a nonce.
    CounterExhausted,
}

impl fmt::Display for SecureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRandomness => {
                f.write_str("no randomness for the handshake nonce (the RNG failed)")
            }
            Self::HandshakeTimeout { ms } => {
                write!(f, "secure handshake did not complete within {ms} ms")
            }
            Self::ClosedDuringHandshake => {
                f.write_str("connection closed during the secure handshake")
            }
            Self::PlaintextPeer => f.write_str(
                "peer speaks the unencrypted migration protocol (HVMIGR01); \
                 both hypervisors need the secure channel and the same migration key",
            ),
            Self::BadMagic => {
                f.write_str("peer is not a secure migration endpoint (bad handshake magic)")
            }
            Self::BadVersion(v) => write!(
                f,
                "peer uses secure channel version {v}; this hypervisor speaks {}",
                VERSION
            ),
            Self::BadHandshake(what) => write!(f, "malformed secure handshake: {what}"),
            Self::PeerLacksKey => f.write_str(
                "peer does not hold the migration key (its key proof failed: different keys, \
                 or a forged or replayed handshake)",
            ),
            Self::KeyRejectedByPeer => f.write_str(
                "peer rejected our migration key: the two hypervisors hold different keys \
                 (compare the key fingerprints)",
            ),
            Self::PeerAlert(alert::VERSION) => {
                f.write_str("peer does not support our secure channel version")
            }
            Self::PeerAlert(alert::MALFORMED) => {
                f.write_str("peer found our secure handshake malformed")
            }
            Self::PeerAlert(alert::BUSY) => {
                f.write_str("peer is busy receiving another migration; try again later")
            }
            Self::PeerAlert(alert::NO_KEY) => f.write_str(
                "peer has no migration key configured and refuses every migration \
                 ('key set' there)",
            ),
            Self::PeerAlert(c) => write!(f, "peer aborted the secure handshake (alert {c})"),
            Self::BadRecordType(t) => write!(f, "record with unknown type {t:#04x}"),
            Self::BadRecordLength(n) => write!(f, "record length {n} out of range"),
            Self::BadRecord => f.write_str(
                "record failed authentication (corrupted, dropped, replayed, reordered, \
                 or from another session)",
            ),
            Self::Truncated => f.write_str("connection ended in the middle of a record"),
            Self::ClosedWithoutNotify => {
                f.write_str("connection ended without close_notify (stream may be truncated)")
            }
            Self::CounterExhausted => {
                f.write_str("record counter exhausted; refusing to reuse a nonce")
            }
        }
    }
}

/// What [`record_throughput`] measured: bytes of plaintext, and the clock ticks spent
/// sealing and opening them in full-size records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordCost {
    /// Plaintext bytes sealed (and opened again).
    pub bytes: u64,
    /// Ticks spent sealing.
    pub seal_ticks: u64,
    /// Ticks spent opening (authenticating and decrypting).
    pub open_ticks: u64,
}

/// Seals `bytes` of plaintext in full-size records with a throwaway session key and
/// opens them again, timing each half with `clock` (the TSC in the kernel): what the
/// channel costs this CPU per byte, to compare with what the link carries. Fails if a
/// record does not open (which would be a bug).
pub fn record_throughput(
    bytes: usize,
    clock: &mut dyn FnMut() -> u64,
) -> Result<RecordCost, SecureError> {
    let key: handshake::Secret = zeroize::Zeroizing::new([0x5a; 32]);
    let mut sealer = record::Sealer::new(&key);
    let mut opener = record::Opener::new(&key);
    let plain = alloc::vec![0xA5u8; MAX_PLAIN];
    let mut buf = alloc::vec![0u8; MAX_RECORD];
    let mut cost = RecordCost::default();
    while (cost.bytes as usize) < bytes {
        let n = MAX_PLAIN.min(bytes - cost.bytes as usize);
        let t0 = clock();
        let len = sealer.seal(msg::DATA, &plain[..n], &mut buf)?;
        let t1 = clock();
        let got = opener.open(&mut buf[..len])?;
        let t2 = clock();
        if got != n {
            return Err(SecureError::BadRecord);
        }
        cost.seal_ticks += t1 - t0;
        cost.open_ticks += t2 - t1;
        cost.bytes += n as u64;
    }
    Ok(cost)
}
