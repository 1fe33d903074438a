//! The channel state machine and its per-poll [`Link`] view.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use super::handshake::{self as hs, alert, msg, Secret, NONCE_LEN, TAG_LEN};
use super::key::MigrationKey;
use super::record::{self, Opener, Sealer, HEADER, MAX_PLAIN, MAX_RECORD, OVERHEAD};
use super::{NonceSource, SecureError};
use crate::migration::link::{Link, LinkState};
use crate::migration::wire;

/// Default limit for the whole handshake, from the channel's creation.
pub const DEFAULT_HANDSHAKE_TIMEOUT_US: u64 = 10_000_000;

/// Sealed bytes kept ahead of the inner link: two full records, plus room for a
/// close_notify record or a plaintext reject that is always accepted.
const TX_CAP: usize = 2 * MAX_RECORD + TX_RESERVE;
const TX_RESERVE: usize = wire::HEADER + 4 + wire::MAX_REASON + 8;
/// Smallest record `send` cuts when the caller offers more (avoids a trickle of tiny
/// records when the buffer is nearly full).
const MIN_CHUNK: usize = 512;
/// Largest handshake message.
const HS_BUF: usize = hs::SERVER_HELLO_LEN;

/// Which end of the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends ClientHello (the migration source).
    Initiator,
    /// Answers it (the destination).
    Responder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hs {
    /// Initiator, waiting for the inner link to open.
    Start,
    /// Initiator, ClientHello sent.
    AwaitServerHello,
    /// Responder, waiting for ClientHello.
    AwaitClientHello,
    /// Responder, ServerHello sent.
    AwaitFinished,
    Established,
    Failed,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Records sealed (including close_notify).
    pub records_sent: u64,
    /// Records authenticated.
    pub records_received: u64,
    /// Plaintext bytes accepted by `send`.
    pub plain_sent: u64,
    /// Plaintext bytes released by `recv`.
    pub plain_received: u64,
    /// Bytes handed to the inner link (handshake and records).
    pub wire_sent: u64,
}

/// One end of a secure channel: role, handshake progress, keys, counters and bounded
/// buffers. It does not own the inner link; see [`SecureChannel::link`].
///
/// Memory is fixed at creation ([`SecureChannel::MEMORY`] bytes of buffers) whatever
/// the peer sends.
pub struct SecureChannel {
    role: Role,
    hs: Hs,
    /// The pre-shared key until the session keys are derived.
    key: Option<MigrationKey>,
    k_auth: Secret,
    nonce_own: [u8; NONCE_LEN],
    client_hello: [u8; hs::CLIENT_HELLO_LEN],
    nonce_r: [u8; NONCE_LEN],
    tag_r: [u8; TAG_LEN],
    hs_in: [u8; HS_BUF],
    hs_len: usize,
    started_us: u64,
    timeout_us: u64,
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    tx: Box<[u8]>,
    tx_off: usize,
    tx_end: usize,
    rx: Box<[u8]>,
    rx_have: usize,
    plain: Box<[u8]>,
    plain_off: usize,
    plain_end: usize,
    /// The peer's close_notify arrived.
    peer_closed: bool,
    /// Our user called close.
    close_requested: bool,
    /// The inner link was closed by us.
    inner_closed: bool,
    error: Option<SecureError>,
    stats: ChannelStats,
}

impl core::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("role", &self.role)
            .field("hs", &self.hs)
            .field("error", &self.error)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SecureChannel {
    /// Bytes of buffers a channel holds (fixed at creation, whatever arrives).
    pub const MEMORY: usize = TX_CAP + 2 * MAX_RECORD;

    fn new(
        role: Role,
        key: &MigrationKey,
        rng: &mut dyn NonceSource,
        now_us: u64,
    ) -> Result<Self, SecureError> {
        let mut nonce_own = [0u8; NONCE_LEN];
        rng.fill(&mut nonce_own)
            .map_err(|_| SecureError::NoRandomness)?;
        Ok(Self {
            role,
            hs: match role {
                Role::Initiator => Hs::Start,
                Role::Responder => Hs::AwaitClientHello,
            },
            key: Some(key.clone()),
            k_auth: hs::auth_key(key),
            nonce_own,
            client_hello: [0; hs::CLIENT_HELLO_LEN],
            nonce_r: [0; NONCE_LEN],
            tag_r: [0; TAG_LEN],
            hs_in: [0; HS_BUF],
            hs_len: 0,
            started_us: now_us,
            timeout_us: DEFAULT_HANDSHAKE_TIMEOUT_US,
            sealer: None,
            opener: None,
            tx: vec![0; TX_CAP].into_boxed_slice(),
            tx_off: 0,
            tx_end: 0,
            rx: vec![0; MAX_RECORD].into_boxed_slice(),
            rx_have: 0,
            plain: vec![0; MAX_RECORD].into_boxed_slice(),
            plain_off: 0,
            plain_end: 0,
            peer_closed: false,
            close_requested: false,
            inner_closed: false,
            error: None,
            stats: ChannelStats::default(),
        })
    }

    /// The migration source's end: draws nonce_i now, sends ClientHello once the inner
    /// link is open.
    pub fn initiator(
        key: &MigrationKey,
        rng: &mut dyn NonceSource,
        now_us: u64,
    ) -> Result<Self, SecureError> {
        Self::new(Role::Initiator, key, rng, now_us)
    }

    /// The destination's end, for one accepted connection: draws nonce_r now.
    pub fn responder(
        key: &MigrationKey,
        rng: &mut dyn NonceSource,
        now_us: u64,
    ) -> Result<Self, SecureError> {
        Self::new(Role::Responder, key, rng, now_us)
    }

    /// Sets the handshake time limit (counted from creation).
    #[must_use]
    pub fn with_handshake_timeout(mut self, us: u64) -> Self {
        self.timeout_us = us;
        self
    }

    /// A [`Link`] over this channel and `inner` for one poll.
    pub fn link<'a>(&'a mut self, inner: &'a mut dyn Link, now_us: u64) -> ChannelLink<'a> {
        self.drive(inner, now_us);
        ChannelLink {
            ch: self,
            inner,
            now_us,
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The handshake completed (and nothing failed since).
    pub fn is_established(&self) -> bool {
        self.hs == Hs::Established && self.error.is_none()
    }

    /// Why the channel failed, if it did.
    pub fn error(&self) -> Option<&SecureError> {
        self.error.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Bytes (handshake or sealed) not yet handed to the inner link.
    pub fn pending(&self) -> usize {
        self.tx_end - self.tx_off
    }

    /// Bytes held in buffers (always [`Self::MEMORY`]).
    pub fn memory(&self) -> usize {
        self.tx.len() + self.rx.len() + self.plain.len()
    }

    /// Advances without a protocol on top: handshake, flushes sealed bytes, and closes
    /// the inner link once a requested close has been flushed. The kernel calls this
    /// after the migration finished until [`Self::pending`] is 0 (or a short timeout),
    /// before it drops or aborts the socket. Returns the view's state.
    pub fn drive(&mut self, inner: &mut dyn Link, now_us: u64) -> LinkState {
        self.flush(inner);
        if self.error.is_none() && self.hs != Hs::Established {
            self.handshake(inner, now_us);
            self.flush(inner);
        }
        if (self.close_requested || self.error.is_some())
            && self.tx_off == self.tx_end
            && !self.inner_closed
        {
            inner.close();
            self.inner_closed = true;
        }
        self.view_state(inner)
    }

    fn flush(&mut self, inner: &mut dyn Link) {
        if self.tx_off < self.tx_end && !self.inner_closed {
            let n = inner.send(&self.tx[self.tx_off..self.tx_end]);
            self.tx_off += n;
            self.stats.wire_sent += n as u64;
        }
        if self.tx_off == self.tx_end {
            self.tx_off = 0;
            self.tx_end = 0;
        }
    }

    /// Appends plaintext handshake bytes (always fits: the buffer is empty then).
    fn queue(&mut self, bytes: &[u8]) {
        let room = self.tx.len() - self.tx_end;
        let n = bytes.len().min(room);
        self.tx[self.tx_end..self.tx_end + n].copy_from_slice(&bytes[..n]);
        self.tx_end += n;
    }

    /// Records the first error; discards unsent data and queues an optional plaintext
    /// notice for the peer (only during the handshake).
    fn fail(&mut self, e: SecureError, notice: Option<&[u8]>) {
        if self.error.is_some() {
            return;
        }
        self.error = Some(e);
        if self.hs != Hs::Established {
            self.hs = Hs::Failed;
        }
        self.tx_off = 0;
        self.tx_end = 0;
        self.plain_off = 0;
        self.plain_end = 0;
        self.key = None;
        if let Some(b) = notice {
            self.queue(b);
        }
    }

    fn fail_alert(&mut self, e: SecureError, code: u8) {
        self.fail(e, Some(&[msg::ALERT, code]));
    }

    /// Bytes wanted in `hs_in` for the current handshake message.
    fn hs_need(&self) -> Result<usize, SecureError> {
        if self.hs == Hs::AwaitClientHello {
            return Ok(hs::CLIENT_HELLO_LEN);
        }
        if self.hs_len == 0 {
            return Ok(1);
        }
        match (self.hs, self.hs_in[0]) {
            (_, msg::ALERT) => Ok(hs::ALERT_LEN),
            (Hs::AwaitServerHello, msg::SERVER_HELLO) => Ok(hs::SERVER_HELLO_LEN),
            (Hs::AwaitFinished, msg::CLIENT_FINISHED) => Ok(hs::CLIENT_FINISHED_LEN),
            // An old plaintext receiver answers our ClientHello with a REJECT.
            (Hs::AwaitServerHello, wire::tag::REJECT) => Err(SecureError::PlaintextPeer),
            (Hs::AwaitServerHello, _) => Err(SecureError::BadHandshake(
                "expected ServerHello or an alert from the peer",
            )),
            _ => Err(SecureError::BadHandshake(
                "expected ClientFinished or an alert from the peer",
            )),
        }
    }

    fn handshake(&mut self, inner: &mut dyn Link, now_us: u64) {
        if now_us.saturating_sub(self.started_us) > self.timeout_us {
            let ms = self.timeout_us / 1000;
            self.fail(SecureError::HandshakeTimeout { ms }, None);
            return;
        }
        let state = inner.state();
        if self.hs == Hs::Start {
            match state {
                LinkState::Connecting => return,
                LinkState::Closed => return self.fail(SecureError::ClosedDuringHandshake, None),
                LinkState::Open => {
                    self.client_hello = hs::client_hello(&self.nonce_own);
                    let m = self.client_hello;
                    self.queue(&m);
                    self.hs = Hs::AwaitServerHello;
                }
            }
        }
        while self.error.is_none() && self.hs != Hs::Established {
            let need = match self.hs_need() {
                Ok(n) => n,
                Err(e) => return self.fail_alert(e, alert::MALFORMED),
            };
            if self.hs_len < need {
                let n = inner.recv(&mut self.hs_in[self.hs_len..need]);
                if n == 0 {
                    break;
                }
                let before = self.hs_len;
                self.hs_len += n;
                if self.hs == Hs::AwaitClientHello {
                    self.check_magic(before);
                }
                continue;
            }
            self.hs_len = 0;
            self.on_message();
        }
        if self.error.is_none() && self.hs != Hs::Established && inner.state() == LinkState::Closed
        {
            self.fail(SecureError::ClosedDuringHandshake, None);
        }
    }

    /// Fails at the first byte of a ClientHello that differs from the magic.
    fn check_magic(&mut self, from: usize) {
        let end = self.hs_len.min(hs::MAGIC.len());
        if from >= end || self.hs_in[from..end] == hs::MAGIC[from..end] {
            return;
        }
        if self.hs_in[0] == wire::tag::HELLO {
            // An old source: answer in its own protocol, which it prints.
            let mut m = Vec::new();
            wire::put_reason(
                &mut m,
                wire::tag::REJECT,
                1,
                "this hypervisor requires the secure migration channel: set the same migration key on both hypervisors",
            );
            self.fail(SecureError::PlaintextPeer, Some(&m));
        } else {
            self.fail_alert(SecureError::BadMagic, alert::MALFORMED);
        }
    }

    fn on_message(&mut self) {
        let m = self.hs_in;
        if self.hs != Hs::AwaitClientHello && m[0] == msg::ALERT {
            let e = match m[1] {
                alert::AUTH => SecureError::KeyRejectedByPeer,
                c => SecureError::PeerAlert(c),
            };
            return self.fail(e, None);
        }
        match self.hs {
            Hs::AwaitClientHello => {
                let version = u16::from_be_bytes([m[8], m[9]]);
                if version != hs::VERSION {
                    return self.fail_alert(SecureError::BadVersion(version), alert::VERSION);
                }
                if m[10..12] != [0, 0] {
                    return self.fail_alert(
                        SecureError::BadHandshake("reserved ClientHello bits set"),
                        alert::MALFORMED,
                    );
                }
                self.client_hello
                    .copy_from_slice(&m[..hs::CLIENT_HELLO_LEN]);
                self.nonce_r = self.nonce_own;
                self.tag_r = hs::responder_tag(&self.k_auth, &self.client_hello, &self.nonce_r);
                let mut reply = [0u8; hs::SERVER_HELLO_LEN];
                reply[0] = msg::SERVER_HELLO;
                reply[1..1 + NONCE_LEN].copy_from_slice(&self.nonce_r);
                reply[1 + NONCE_LEN..].copy_from_slice(&self.tag_r);
                self.queue(&reply);
                self.hs = Hs::AwaitFinished;
            }
            Hs::AwaitServerHello => {
                self.nonce_r.copy_from_slice(&m[1..1 + NONCE_LEN]);
                let tag = &m[1 + NONCE_LEN..hs::SERVER_HELLO_LEN];
                if !hs::responder_tag_ok(&self.k_auth, &self.client_hello, &self.nonce_r, tag) {
                    return self.fail_alert(SecureError::PeerLacksKey, alert::AUTH);
                }
                self.tag_r.copy_from_slice(tag);
                let tag_i =
                    hs::initiator_tag(&self.k_auth, &self.client_hello, &self.nonce_r, &self.tag_r);
                let mut fin = [0u8; hs::CLIENT_FINISHED_LEN];
                fin[0] = msg::CLIENT_FINISHED;
                fin[1..].copy_from_slice(&tag_i);
                self.queue(&fin);
                self.establish();
            }
            Hs::AwaitFinished => {
                let ok = hs::initiator_tag_ok(
                    &self.k_auth,
                    &self.client_hello,
                    &self.nonce_r,
                    &self.tag_r,
                    &m[1..hs::CLIENT_FINISHED_LEN],
                );
                if !ok {
                    return self.fail_alert(SecureError::PeerLacksKey, alert::AUTH);
                }
                self.establish();
            }
            Hs::Start | Hs::Established | Hs::Failed => {}
        }
    }

    fn establish(&mut self) {
        let Some(key) = self.key.take() else {
            return self.fail(SecureError::BadHandshake("no key"), None);
        };
        let mut nonce_i = [0u8; NONCE_LEN];
        nonce_i.copy_from_slice(&self.client_hello[12..]);
        let (i2r, r2i) = hs::session_keys(&key, &nonce_i, &self.nonce_r);
        let (tx, rx) = match self.role {
            Role::Initiator => (i2r, r2i),
            Role::Responder => (r2i, i2r),
        };
        self.sealer = Some(Sealer::new(&tx));
        self.opener = Some(Opener::new(&rx));
        self.hs = Hs::Established;
    }

    /// The state the view reports.
    fn view_state(&mut self, inner: &mut dyn Link) -> LinkState {
        if self.error.is_some() {
            return LinkState::Closed;
        }
        if self.hs != Hs::Established {
            return if self.close_requested {
                LinkState::Closed
            } else {
                LinkState::Connecting
            };
        }
        if self.plain_off < self.plain_end {
            return LinkState::Open;
        }
        self.fill_plain(inner);
        if self.plain_off < self.plain_end {
            return LinkState::Open;
        }
        if self.error.is_some() || self.peer_closed || self.inner_closed {
            return LinkState::Closed;
        }
        if inner.state() == LinkState::Closed {
            // Anything still readable was read by fill_plain above.
            let e = if self.rx_have > 0 {
                SecureError::Truncated
            } else {
                SecureError::ClosedWithoutNotify
            };
            self.fail(e, None);
            return LinkState::Closed;
        }
        LinkState::Open
    }

    /// Reads from the inner link until one record's plaintext is available (or no
    /// more bytes are). Reads at most one record ahead.
    fn fill_plain(&mut self, inner: &mut dyn Link) {
        while self.plain_off == self.plain_end
            && self.error.is_none()
            && !self.peer_closed
            && self.hs == Hs::Established
        {
            let opened = self.opener.as_ref().map_or(0, Opener::seq);
            let need = if self.rx_have == 0 {
                1
            } else if self.rx[0] == msg::ALERT && opened == 0 {
                // The responder's answer to a bad ClientFinished, instead of a record.
                hs::ALERT_LEN
            } else if self.rx_have < HEADER {
                HEADER
            } else {
                match record::check_header(&self.rx[..HEADER]) {
                    Ok(len) => HEADER + len,
                    Err(e) => return self.fail(e, None),
                }
            };
            if self.rx_have < need {
                let n = inner.recv(&mut self.rx[self.rx_have..need]);
                if n == 0 {
                    return;
                }
                self.rx_have += n;
                continue;
            }
            if self.rx[0] == msg::ALERT && opened == 0 {
                let e = match self.rx[1] {
                    alert::AUTH => SecureError::KeyRejectedByPeer,
                    c => SecureError::PeerAlert(c),
                };
                return self.fail(e, None);
            }
            if need == 1 {
                continue; // type byte in: now the rest of the header
            }
            let kind = self.rx[0];
            let Some(opener) = self.opener.as_mut() else {
                return;
            };
            match opener.open(&mut self.rx[..need]) {
                Err(e) => return self.fail(e, None),
                Ok(n) => {
                    self.stats.records_received += 1;
                    self.rx_have = 0;
                    if kind == msg::CLOSE {
                        self.peer_closed = true;
                    } else {
                        core::mem::swap(&mut self.rx, &mut self.plain);
                        self.plain_off = HEADER;
                        self.plain_end = HEADER + n;
                    }
                }
            }
        }
    }

    fn send(&mut self, inner: &mut dyn Link, data: &[u8]) -> usize {
        if !self.is_established() || self.close_requested {
            return 0;
        }
        self.flush(inner);
        if self.tx_off > 0 {
            self.tx.copy_within(self.tx_off..self.tx_end, 0);
            self.tx_end -= self.tx_off;
            self.tx_off = 0;
        }
        let mut taken = 0;
        while taken < data.len() {
            let room = (TX_CAP - TX_RESERVE).saturating_sub(self.tx_end + OVERHEAD);
            let left = data.len() - taken;
            let chunk = left.min(MAX_PLAIN).min(room);
            if chunk == 0 || chunk < left.min(MIN_CHUNK) {
                break;
            }
            let Some(sealer) = self.sealer.as_mut() else {
                break;
            };
            match sealer.seal(
                msg::DATA,
                &data[taken..taken + chunk],
                &mut self.tx[self.tx_end..],
            ) {
                Ok(n) => {
                    self.tx_end += n;
                    taken += chunk;
                    self.stats.records_sent += 1;
                }
                Err(e) => {
                    self.fail(e, None);
                    return 0;
                }
            }
        }
        self.stats.plain_sent += taken as u64;
        self.flush(inner);
        taken
    }

    fn recv(&mut self, inner: &mut dyn Link, buf: &mut [u8]) -> usize {
        let mut got = 0;
        while got < buf.len() && self.is_established() {
            if self.plain_off == self.plain_end {
                self.fill_plain(inner);
                if self.plain_off == self.plain_end {
                    break;
                }
            }
            let n = (buf.len() - got).min(self.plain_end - self.plain_off);
            buf[got..got + n].copy_from_slice(&self.plain[self.plain_off..self.plain_off + n]);
            self.plain_off += n;
            got += n;
        }
        self.stats.plain_received += got as u64;
        got
    }

    fn close(&mut self, inner: &mut dyn Link) {
        if self.close_requested {
            return;
        }
        self.close_requested = true;
        if self.is_established() {
            if self.tx_off > 0 {
                self.tx.copy_within(self.tx_off..self.tx_end, 0);
                self.tx_end -= self.tx_off;
                self.tx_off = 0;
            }
            if let Some(sealer) = self.sealer.as_mut() {
                // TX_RESERVE keeps room for this record.
                match sealer.seal(msg::CLOSE, &[], &mut self.tx[self.tx_end..]) {
                    Ok(n) => {
                        self.tx_end += n;
                        self.stats.records_sent += 1;
                    }
                    Err(e) => self.fail(e, None),
                }
            }
        }
        self.flush(inner);
        if self.tx_off == self.tx_end && !self.inner_closed {
            inner.close();
            self.inner_closed = true;
        }
    }

    #[cfg(test)]
    pub(super) fn set_send_seq(&mut self, seq: u64) {
        if let Some(s) = self.sealer.as_mut() {
            s.set_seq(seq);
        }
    }
}

/// A [`Link`] over a [`SecureChannel`] and the inner link, for one poll.
///
/// `state()` is Connecting during the handshake, Open once it completed, Closed on any
/// error (see [`SecureChannel::error`]) or after the peer's close_notify once all its
/// data was read. `send()` seals what fits the bounded buffer, `queued()` is the inner
/// link's unacknowledged bytes plus sealed bytes it has not taken yet, and `recv()`
/// returns authenticated plaintext only.
pub struct ChannelLink<'a> {
    ch: &'a mut SecureChannel,
    inner: &'a mut dyn Link,
    now_us: u64,
}

impl core::fmt::Debug for ChannelLink<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChannelLink")
            .field("ch", &self.ch)
            .field("now_us", &self.now_us)
            .finish_non_exhaustive()
    }
}

impl ChannelLink<'_> {
    /// The channel behind the view.
    pub fn channel(&self) -> &SecureChannel {
        self.ch
    }
}

impl Link for ChannelLink<'_> {
    fn state(&mut self) -> LinkState {
        self.ch.drive(self.inner, self.now_us)
    }

    fn send(&mut self, data: &[u8]) -> usize {
        self.ch.drive(self.inner, self.now_us);
        self.ch.send(self.inner, data)
    }

    fn queued(&mut self) -> usize {
        self.ch.flush(self.inner);
        self.inner.queued() + self.ch.pending()
    }

    fn recv(&mut self, buf: &mut [u8]) -> usize {
        self.ch.drive(self.inner, self.now_us);
        self.ch.recv(self.inner, buf)
    }

    fn close(&mut self) {
        self.ch.close(self.inner);
    }

    fn push(&mut self) {
        self.ch.flush(self.inner);
        self.inner.push();
    }
}
