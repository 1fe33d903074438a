//! Handshake messages and the key schedule (pure functions; the state machine that
//! sends and receives them is in [`super::channel`]).

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::key::MigrationKey;

type HmacSha256 = Hmac<Sha256>;

/// Magic of the initiator's first message. Deliberately unlike the plaintext stream's
/// first bytes (tag 1, then zeros), so that either side recognises the other protocol.
pub const MAGIC: [u8; 8] = *b"HVMIGSEC";
/// Secure channel version; a responder refuses any other.
pub const VERSION: u16 = 2;
/// Handshake nonce length.
pub const NONCE_LEN: usize = 32;
/// HMAC-SHA256 tag length.
pub const TAG_LEN: usize = 32;
/// ClientHello: magic, version u16 BE, reserved u16 (0), nonce_i.
pub const CLIENT_HELLO_LEN: usize = 8 + 2 + 2 + NONCE_LEN;
/// ServerHello: type, nonce_r, tag_r.
pub const SERVER_HELLO_LEN: usize = 1 + NONCE_LEN + TAG_LEN;
/// ClientFinished: type, tag_i.
pub const CLIENT_FINISHED_LEN: usize = 1 + TAG_LEN;
/// Alert: type, code.
pub const ALERT_LEN: usize = 2;

/// First byte of every message after ClientHello.
pub mod msg {
    /// Responder → initiator: nonce_r, tag_r.
    pub const SERVER_HELLO: u8 = 0x02;
    /// Initiator → responder: tag_i.
    pub const CLIENT_FINISHED: u8 = 0x03;
    /// Plaintext handshake failure notice (only before the first record).
    pub const ALERT: u8 = 0x15;
    /// AEAD record carrying stream bytes.
    pub const DATA: u8 = 0x17;
    /// AEAD record with no payload: the sender closed its direction (close_notify).
    pub const CLOSE: u8 = 0x18;
}

/// Alert codes.
pub mod alert {
    /// The peer's key proof (HMAC tag) did not verify.
    pub const AUTH: u8 = 1;
    /// Unsupported version.
    pub const VERSION: u8 = 2;
    /// Malformed handshake message.
    pub const MALFORMED: u8 = 3;
    /// The responder is receiving another migration (sent instead of ServerHello).
    pub const BUSY: u8 = 4;
    /// The responder has no migration key configured (sent instead of ServerHello).
    pub const NO_KEY: u8 = 5;
}

/// The Alert message a responder sends instead of a handshake when it refuses a
/// connection outright (`alert::BUSY`, `alert::NO_KEY`).
pub fn refusal(code: u8) -> [u8; ALERT_LEN] {
    [msg::ALERT, code]
}

const AUTH_SALT: &[u8] = b"hvmig v2 handshake";
const AUTH_INFO: &[u8] = b"hvmig v2 auth";
const RESPONDER_LABEL: &[u8] = b"hvmig v2 responder proof";
const INITIATOR_LABEL: &[u8] = b"hvmig v2 initiator proof";
/// HKDF info of the initiator → responder record key.
pub const INFO_I2R: &[u8] = b"hvmig v2 i->r";
/// HKDF info of the responder → initiator record key.
pub const INFO_R2I: &[u8] = b"hvmig v2 r->i";

/// A 32-byte secret that is wiped on drop.
pub type Secret = Zeroizing<[u8; 32]>;

/// The ClientHello for `nonce_i`.
pub fn client_hello(nonce_i: &[u8; NONCE_LEN]) -> [u8; CLIENT_HELLO_LEN] {
    let mut m = [0u8; CLIENT_HELLO_LEN];
    m[..8].copy_from_slice(&MAGIC);
    m[8..10].copy_from_slice(&VERSION.to_be_bytes());
    m[12..].copy_from_slice(nonce_i);
    m
}

/// K_auth = HKDF-SHA256(salt = "hvmig v2 handshake", ikm = key, info = "hvmig v2 auth").
pub fn auth_key(key: &MigrationKey) -> Secret {
    let mut k = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(AUTH_SALT), key.secret())
        .expand(AUTH_INFO, &mut k[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    k
}

fn mac(k_auth: &Secret, parts: &[&[u8]]) -> HmacSha256 {
    let mut m =
        <HmacSha256 as KeyInit>::new_from_slice(&k_auth[..]).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m
}

/// tag_r = HMAC(K_auth, "hvmig v2 responder proof" || ClientHello || nonce_r).
pub fn responder_tag(
    k_auth: &Secret,
    hello: &[u8; CLIENT_HELLO_LEN],
    nonce_r: &[u8; NONCE_LEN],
) -> [u8; TAG_LEN] {
    mac(k_auth, &[RESPONDER_LABEL, hello, nonce_r])
        .finalize()
        .into_bytes()
        .into()
}

/// Checks tag_r in constant time.
pub fn responder_tag_ok(
    k_auth: &Secret,
    hello: &[u8; CLIENT_HELLO_LEN],
    nonce_r: &[u8; NONCE_LEN],
    tag: &[u8],
) -> bool {
    mac(k_auth, &[RESPONDER_LABEL, hello, nonce_r])
        .verify_slice(tag)
        .is_ok()
}

/// tag_i = HMAC(K_auth, "hvmig v2 initiator proof" || ClientHello || nonce_r || tag_r).
pub fn initiator_tag(
    k_auth: &Secret,
    hello: &[u8; CLIENT_HELLO_LEN],
    nonce_r: &[u8; NONCE_LEN],
    tag_r: &[u8; TAG_LEN],
) -> [u8; TAG_LEN] {
    mac(k_auth, &[INITIATOR_LABEL, hello, nonce_r, tag_r])
        .finalize()
        .into_bytes()
        .into()
}

/// Checks tag_i in constant time.
pub fn initiator_tag_ok(
    k_auth: &Secret,
    hello: &[u8; CLIENT_HELLO_LEN],
    nonce_r: &[u8; NONCE_LEN],
    tag_r: &[u8; TAG_LEN],
    tag: &[u8],
) -> bool {
    mac(k_auth, &[INITIATOR_LABEL, hello, nonce_r, tag_r])
        .verify_slice(tag)
        .is_ok()
}

/// The two record keys: PRK = HKDF-Extract(salt = nonce_i || nonce_r, ikm = key),
/// k_i2r = Expand(PRK, "hvmig v2 i->r"), k_r2i = Expand(PRK, "hvmig v2 r->i").
pub fn session_keys(
    key: &MigrationKey,
    nonce_i: &[u8; NONCE_LEN],
    nonce_r: &[u8; NONCE_LEN],
) -> (Secret, Secret) {
    let mut salt = Zeroizing::new([0u8; 2 * NONCE_LEN]);
    salt[..NONCE_LEN].copy_from_slice(nonce_i);
    salt[NONCE_LEN..].copy_from_slice(nonce_r);
    let hk = Hkdf::<Sha256>::new(Some(&salt[..]), key.secret());
    let (mut i2r, mut r2i) = (Zeroizing::new([0u8; 32]), Zeroizing::new([0u8; 32]));
    hk.expand(INFO_I2R, &mut i2r[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    hk.expand(INFO_R2I, &mut r2i[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    (i2r, r2i)
}
