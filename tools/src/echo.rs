//! A TCP echo client that measures what an application sees while the echo server's guest
//! is live-migrated: every echoed byte checked in order, the latency of each chunk, and the
//! longest time the stream stood still.
//!
//! The client is a [`BxEndpoint`] on the lab's hub, so it sees exactly the frames an
//! emulated peer would: while the guest is paused its frames are lost, TCP retransmits, and
//! once the guest's MAC reappears on the other hypervisor's port the stream resumes. The
//! load is a deterministic byte pattern (a function of a seed and the byte's offset, so the
//! checker keeps no copy of what it sent), sent in fixed chunks at a fixed rate: a steady
//! trickle, so a stall shows as a gap in arrivals rather than being hidden by a full
//! pipe. The measurement itself ([`Meter`]) is pure logic over a caller's clock and is
//! unit-tested with made-up instants; [`EchoClient::run_until`] is the I/O loop around it,
//! and [`EchoSession`] runs that loop on its own thread while a test drives the consoles.
//!
//! What counts as a stall: the longest gap between successive arrivals of echoed data
//! while data was outstanding (from the send, when nothing was outstanding before). With
//! the endpoint polled every millisecond, that is the pause an application would notice.
//! Retransmissions are counted on the wire ([`WireStats`]), as smoltcp keeps no counters.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::socket::tcp;

use crate::bxnet::{BxEndpoint, WireStats};

/// Default load: 100 chunks of 256 bytes per second, a 10 ms resolution on stalls and
/// little enough for an emulated guest's echo server to keep up with.
pub const DEFAULT_RATE: u64 = 25_600;
/// Default chunk size in bytes.
pub const DEFAULT_CHUNK: usize = 256;
/// Most stalls listed in a report (they are still counted beyond it).
const MAX_STALLS: usize = 10_000;

/// How an echo run behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct EchoConfig {
    /// Bytes per second offered.
    pub rate: u64,
    /// Bytes per send; each chunk's latency is measured.
    pub chunk: usize,
    /// Seed of the byte pattern (printed in the report, so a run can be replayed).
    pub seed: u64,
    /// Bytes sent and not yet echoed beyond which sending waits: the endpoint's 64 KiB
    /// socket buffers stay far from full, and after a stall the backlog that bursts out
    /// stays modest. Slots missed while waiting are skipped, not made up in a burst.
    pub max_outstanding: usize,
    /// Stalls at least this long are listed in the report.
    pub stall_threshold: Duration,
    /// Data outstanding with no echo for this long is a failure ([`EchoError::Stalled`]).
    pub give_up: Duration,
    /// After the stop, how long what is outstanding may take to come back.
    pub drain_timeout: Duration,
    /// How often the endpoint is polled (the resolution of every time measured).
    pub poll: Duration,
    /// Most latency samples kept for plotting; beyond it every other one is dropped and
    /// the stride doubles, so a long run keeps an even sample of itself.
    pub max_samples: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            chunk: DEFAULT_CHUNK,
            seed: 1,
            max_outstanding: 16 * 1024,
            stall_threshold: Duration::from_millis(100),
            give_up: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(1),
            max_samples: 100_000,
        }
    }
}

impl EchoConfig {
    /// Refuses settings the run cannot honour.
    pub fn check(&self) -> Result<(), EchoError> {
        let bad = |s: String| Err(EchoError::Config(s));
        if self.rate == 0 {
            return bad("the rate must be at least 1 byte/s".into());
        }
        if self.chunk == 0 || self.chunk > self.max_outstanding {
            return bad(format!(
                "chunk {} must be within 1..={} (max outstanding)",
                self.chunk, self.max_outstanding
            ));
        }
        // Half the endpoint's send and receive buffers, so a send never blocks on them.
        if self.max_outstanding > 32 * 1024 {
            return bad(format!(
                "max outstanding {} is above 32768 bytes",
                self.max_outstanding
            ));
        }
        if self.poll.is_zero() || self.max_samples < 2 {
            return bad("poll must be non-zero and max samples at least 2".into());
        }
        Ok(())
    }
}

/// Why an echo run failed. `offset` is the position in the stream (bytes verified so far,
/// or the first bad byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EchoError {
    /// Invalid settings.
    Config(String),
    /// The hub endpoint could not be set up.
    Endpoint(String),
    /// The connection could not be opened.
    Connect(String),
    /// Not connected (run before connect, or after a failure).
    NotConnected,
    /// An echoed byte differs from the one sent at that offset.
    Mismatch { offset: u64, expected: u8, got: u8 },
    /// More bytes came back than were sent.
    Excess { offset: u64 },
    /// The peer reset the connection.
    Reset { offset: u64 },
    /// The peer closed its side (FIN).
    Closed { offset: u64 },
    /// The connection vanished without a reset from the peer (smoltcp gave it up).
    Aborted { offset: u64 },
    /// Data was outstanding and nothing came back for `waited`.
    Stalled { offset: u64, waited: Duration },
    /// After the stop, `outstanding` bytes had not come back within the drain timeout.
    Undrained { offset: u64, outstanding: u64 },
    /// The session's thread died.
    Panicked,
}

impl fmt::Display for EchoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(s) => write!(f, "echo: bad settings: {s}"),
            Self::Endpoint(s) => write!(f, "echo: endpoint: {s}"),
            Self::Connect(s) => write!(f, "echo: connect: {s}"),
            Self::NotConnected => write!(f, "echo: not connected"),
            Self::Mismatch {
                offset,
                expected,
                got,
            } => write!(
                f,
                "echo: byte {offset} came back as {got:#04x}, {expected:#04x} was sent"
            ),
            Self::Excess { offset } => {
                write!(f, "echo: more bytes came back than the {offset} sent")
            }
            Self::Reset { offset } => write!(f, "echo: connection reset at byte {offset}"),
            Self::Closed { offset } => write!(f, "echo: peer closed at byte {offset}"),
            Self::Aborted { offset } => {
                write!(f, "echo: connection lost (no reset seen) at byte {offset}")
            }
            Self::Stalled { offset, waited } => write!(
                f,
                "echo: nothing came back for {:.1} s at byte {offset}",
                waited.as_secs_f64()
            ),
            Self::Undrained {
                offset,
                outstanding,
            } => write!(
                f,
                "echo: {outstanding} bytes never came back after the stop (at byte {offset})"
            ),
            Self::Panicked => write!(f, "echo: the session thread panicked"),
        }
    }
}

impl std::error::Error for EchoError {}

/// A failed run: why, and what was measured up to then.
#[derive(Clone, Debug)]
pub struct Failure {
    pub error: EchoError,
    pub report: Box<Report>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (until then: {})", self.error, self.report)
    }
}

impl std::error::Error for Failure {}

/// One stall: a gap in the echo while data was outstanding.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stall {
    /// When the wait began, from the start of the run.
    pub at_ms: f64,
    /// How long nothing came back.
    pub ms: f64,
    /// Bytes echoed before it.
    pub offset: u64,
}

/// One chunk's round trip, for plotting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When the chunk was sent, from the start of the run.
    pub at_ms: f64,
    /// From its send to the arrival of its last echoed byte.
    pub latency_ms: f64,
}

/// Chunk latency figures (all 0 when no chunk completed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub min_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What an echo run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The echo server, `ip:port`.
    pub remote: String,
    pub seed: u64,
    /// Bytes per second offered.
    pub rate: u64,
    pub chunk: usize,
    pub duration_ms: f64,
    pub bytes_sent: u64,
    /// Bytes that came back, every one checked.
    pub bytes_echoed: u64,
    /// Chunks whose echo came back complete.
    pub chunks: u64,
    /// The longest gap in the echo while data was outstanding.
    pub longest_stall_ms: f64,
    /// When that gap began, from the start of the run.
    pub longest_stall_at_ms: f64,
    /// Stalls of at least `stall_threshold_ms`, in order (at most 10,000 listed).
    pub stalls: Vec<Stall>,
    /// How many stalls reached the threshold (listed or not).
    pub stall_count: u64,
    pub stall_threshold_ms: f64,
    /// Chunk latencies; the median and p99 come from a log-linear histogram (within
    /// about 3%), the min and max are exact.
    pub latency: Latency,
    /// Our TCP segments that were retransmissions, counted on the wire.
    pub retransmissions: u64,
    /// Resets received on the connection (a live migration must cause none).
    pub resets: u64,
    /// Everything counted on the wire during the run.
    pub wire: WireStats,
    /// Every `sample_stride`-th chunk's latency.
    pub samples: Vec<Sample>,
    pub sample_stride: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency;
        let secs = self.duration_ms / 1e3;
        write!(
            f,
            "echo {}: {} B sent, {} B echoed in {secs:.1} s ({:.0} B/s, {} chunks of {} B, seed {}); \
             longest stall {:.1} ms at {:.2} s ({} >= {:.0} ms); latency min/median/p99/max \
             {:.1}/{:.1}/{:.1}/{:.1} ms; {} retransmissions, {} duplicates received, {} resets",
            self.remote,
            self.bytes_sent,
            self.bytes_echoed,
            self.bytes_echoed as f64 / secs.max(1e-9),
            self.chunks,
            self.chunk,
            self.seed,
            self.longest_stall_ms,
            self.longest_stall_at_ms / 1e3,
            self.stall_count,
            self.stall_threshold_ms,
            l.min_ms,
            l.median_ms,
            l.p99_ms,
            l.max_ms,
            self.retransmissions,
            self.wire.duplicates_received,
            self.resets,
        )
    }
}

impl Report {
    /// The latency samples as CSV (`at_ms,latency_ms`, a header line first).
    pub fn samples_csv(&self) -> String {
        let mut s = String::from("at_ms,latency_ms\n");
        for x in &self.samples {
            s.push_str(&format!("{:.3},{:.3}\n", x.at_ms, x.latency_ms));
        }
        s
    }
}

/// The load's byte pattern: byte `offset` of the stream seeded `seed`, written for
/// `out.len()` bytes from `offset`. SplitMix64 of each 8-byte word's index, so any stretch
/// can be regenerated without the ones before it.
pub fn pattern(seed: u64, offset: u64, out: &mut [u8]) {
    let word = |i: u64| {
        let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    };
    let mut cached = (u64::MAX, [0u8; 8]);
    for (j, b) in out.iter_mut().enumerate() {
        let at = offset + j as u64;
        if cached.0 != at / 8 {
            cached = (at / 8, word(at / 8));
        }
        *b = cached.1[(at % 8) as usize];
    }
}

/// Latencies in microseconds in a fixed log-linear histogram: 32 buckets per power of
/// two (a relative precision of 1/32), so a day-long soak uses the same memory as a
/// minute.
struct Histogram {
    counts: Vec<u64>,
    n: u64,
    min: u64,
    max: u64,
}

impl Histogram {
    const SUB: u32 = 32;

    fn new() -> Self {
        Self {
            counts: vec![0; 64 * Self::SUB as usize],
            n: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn bucket(v: u64) -> usize {
        if v < u64::from(Self::SUB) {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 5
        let sub = (v >> (e - 5)) - u64::from(Self::SUB);
        ((e - 4) * Self::SUB) as usize + sub as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let sub = Self::SUB as usize;
        if i < sub {
            return i as u64;
        }
        let e = (i / sub) as u32 + 4;
        let low = ((sub + i % sub) as u64) << (e - 5);
        low + (1u64 << (e - 5)) / 2
    }

    fn add(&mut self, us: u64) {
        self.counts[Self::bucket(us)] += 1;
        self.n += 1;
        self.min = self.min.min(us);
        self.max = self.max.max(us);
    }

    /// The `q` quantile (nearest rank), kept within the exact min and max.
    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        if rank == self.n {
            return self.max;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

/// The measurement of one run, over instants the caller supplies: what was sent, what
/// came back, each chunk's latency and the gaps in between.
pub struct Meter {
    seed: u64,
    start: Instant,
    sent: u64,
    echoed: u64,
    /// Chunks in flight: (stream offset one past their end, when sent). At most
    /// max_outstanding / chunk of them.
    inflight: VecDeque<(u64, Instant)>,
    /// Since when we have been waiting for the echo (data outstanding), if we are.
    waiting_since: Option<Instant>,
    longest: (Duration, Instant),
    threshold: Duration,
    stalls: Vec<Stall>,
    stall_count: u64,
    hist: Histogram,
    chunks: u64,
    samples: Vec<Sample>,
    stride: u64,
    max_samples: usize,
    scratch: Vec<u8>,
}

impl Meter {
    pub fn new(cfg: &EchoConfig, start: Instant) -> Self {
        Self {
            seed: cfg.seed,
            start,
            sent: 0,
            echoed: 0,
            inflight: VecDeque::new(),
            waiting_since: None,
            longest: (Duration::ZERO, start),
            threshold: cfg.stall_threshold,
            stalls: Vec::new(),
            stall_count: 0,
            hist: Histogram::new(),
            chunks: 0,
            samples: Vec::new(),
            stride: 1,
            max_samples: cfg.max_samples.max(2),
            scratch: Vec::new(),
        }
    }

    /// Bytes sent and not yet echoed.
    pub fn outstanding(&self) -> u64 {
        self.sent - self.echoed
    }

    /// Bytes echoed (and checked) so far.
    pub fn echoed(&self) -> u64 {
        self.echoed
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// How long we have been waiting for the echo at `now` (`None`: nothing outstanding).
    pub fn waiting(&self, now: Instant) -> Option<Duration> {
        self.waiting_since.map(|t| now.saturating_duration_since(t))
    }

    /// The next `len` bytes of the stream, to be sent.
    pub fn next_chunk(&mut self, len: usize) -> &[u8] {
        self.scratch.resize(len, 0);
        pattern(self.seed, self.sent, &mut self.scratch);
        &self.scratch
    }

    /// `len` bytes (the start of [`Self::next_chunk`]) went into the socket at `now`.
    pub fn on_send(&mut self, now: Instant, len: usize) {
        if len == 0 {
            return;
        }
        if self.outstanding() == 0 {
            self.waiting_since = Some(now);
        }
        self.sent += len as u64;
        self.inflight.push_back((self.sent, now));
    }

    fn gap(&mut self, since: Instant, now: Instant) {
        let gap = now.saturating_duration_since(since);
        let at = since.saturating_duration_since(self.start);
        if gap > self.longest.0 {
            self.longest = (gap, since);
        }
        if gap >= self.threshold {
            self.stall_count += 1;
            if self.stalls.len() < MAX_STALLS {
                self.stalls.push(Stall {
                    at_ms: ms(at),
                    ms: ms(gap),
                    offset: self.echoed,
                });
            }
        }
    }

    /// `data` came back at `now`: checks it against what was sent there, and accounts
    /// the gap before it and the chunks it completes.
    pub fn on_echo(&mut self, now: Instant, data: &[u8]) -> Result<(), EchoError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut expected = std::mem::take(&mut self.scratch);
        expected.resize(data.len(), 0);
        pattern(self.seed, self.echoed, &mut expected);
        let bad = data.iter().zip(&expected).position(|(a, b)| a != b);
        let r = match bad {
            Some(i) if self.echoed + (i as u64) < self.sent => Err(EchoError::Mismatch {
                offset: self.echoed + i as u64,
                expected: expected[i],
                got: data[i],
            }),
            _ if self.echoed + data.len() as u64 > self.sent => {
                Err(EchoError::Excess { offset: self.sent })
            }
            _ => Ok(()),
        };
        self.scratch = expected;
        r?;
        if let Some(since) = self.waiting_since {
            self.gap(since, now);
        }
        self.echoed += data.len() as u64;
        while let Some(&(end, sent_at)) = self.inflight.front() {
            if end > self.echoed {
                break;
            }
            self.inflight.pop_front();
            self.chunk_done(sent_at, now);
        }
        self.waiting_since = (self.outstanding() > 0).then_some(now);
        Ok(())
    }

    fn chunk_done(&mut self, sent_at: Instant, now: Instant) {
        let latency = now.saturating_duration_since(sent_at);
        self.hist.add(latency.as_micros() as u64);
        if self.chunks.is_multiple_of(self.stride) {
            if self.samples.len() >= self.max_samples {
                // Thin out evenly: keep every other sample and take half as many from now.
                let mut i = 0;
                self.samples.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride *= 2;
            }
            if self.chunks.is_multiple_of(self.stride) {
                self.samples.push(Sample {
                    at_ms: ms(sent_at.saturating_duration_since(self.start)),
                    latency_ms: ms(latency),
                });
            }
        }
        self.chunks += 1;
    }

    /// The report at `now`; a wait still open then counts as a stall (the run ended in
    /// it). `wire` is what the endpoint counted during the run.
    pub fn report(
        &mut self,
        now: Instant,
        cfg: &EchoConfig,
        remote: &str,
        wire: WireStats,
    ) -> Report {
        if let Some(since) = self.waiting_since.take() {
            self.gap(since, now);
        }
        let us = |v: u64| v as f64 / 1e3;
        let h = &self.hist;
        Report {
            remote: remote.to_string(),
            seed: self.seed,
            rate: cfg.rate,
            chunk: cfg.chunk,
            duration_ms: ms(now.saturating_duration_since(self.start)),
            bytes_sent: self.sent,
            bytes_echoed: self.echoed,
            chunks: self.chunks,
            longest_stall_ms: ms(self.longest.0),
            longest_stall_at_ms: ms(self.longest.1.saturating_duration_since(self.start)),
            stalls: self.stalls.clone(),
            stall_count: self.stall_count,
            stall_threshold_ms: ms(self.threshold),
            latency: Latency {
                min_ms: us(if h.n == 0 { 0 } else { h.min }),
                median_ms: us(h.quantile(0.5)),
                p99_ms: us(h.quantile(0.99)),
                max_ms: us(h.max),
            },
            retransmissions: wire.retransmitted,
            resets: wire.resets_received,
            wire,
            samples: self.samples.clone(),
            sample_stride: self.stride,
        }
    }
}

/// A TCP echo client on a hub port.
pub struct EchoClient {
    ep: BxEndpoint,
    remote: Option<([u8; 4], u16)>,
}

impl EchoClient {
    /// Joins the hub at UDP `hub_port` (as [`BxEndpoint::new`]) with `mac` and `ip`/24.
    pub fn new(hub_port: u16, mac: [u8; 6], ip: [u8; 4]) -> Result<Self, EchoError> {
        BxEndpoint::new(hub_port, mac, ip)
            .map(Self::from_endpoint)
            .map_err(EchoError::Endpoint)
    }

    /// Uses an endpoint that is already on the hub.
    pub fn from_endpoint(mut ep: BxEndpoint) -> Self {
        // Each chunk must leave when it is sent, or its latency includes Nagle's wait.
        ep.set_nagle(false);
        Self { ep, remote: None }
    }

    /// Opens the connection to the echo server at `ip:port`.
    pub fn connect(&mut self, ip: [u8; 4], port: u16, timeout: Duration) -> Result<(), EchoError> {
        self.remote = None;
        self.ep
            .connect(ip, port, timeout)
            .map_err(EchoError::Connect)?;
        self.remote = Some((ip, port));
        Ok(())
    }

    /// The underlying endpoint.
    pub fn endpoint(&mut self) -> &mut BxEndpoint {
        &mut self.ep
    }

    /// Closes the connection (FIN) and lets it drain briefly.
    pub fn close(&mut self) {
        if self.remote.take().is_some() {
            self.ep.close();
        }
    }

    /// Runs for `duration`, then drains and reports.
    pub fn run_for(&mut self, cfg: &EchoConfig, duration: Duration) -> Result<Report, Failure> {
        let end = Instant::now() + duration;
        self.run_until(cfg, || Instant::now() >= end)
    }

    /// Streams the pattern until `stop` returns true (asked once per poll), then waits
    /// for the outstanding echo and reports. Any bad byte, reset, close or long silence
    /// ends the run with a [`Failure`] holding what was measured until then.
    pub fn run_until(
        &mut self,
        cfg: &EchoConfig,
        stop: impl FnMut() -> bool,
    ) -> Result<Report, Failure> {
        self.run_counted(cfg, stop, &AtomicU64::new(0))
    }

    /// [`Self::run_until`], publishing the bytes echoed so far in `echoed`.
    fn run_counted(
        &mut self,
        cfg: &EchoConfig,
        mut stop: impl FnMut() -> bool,
        echoed: &AtomicU64,
    ) -> Result<Report, Failure> {
        let start = Instant::now();
        let wire0 = self.ep.wire_stats();
        let mut m = Meter::new(cfg, start);
        let remote = self.remote.map_or("-".to_string(), |(ip, p)| {
            format!("{}.{}.{}.{}:{p}", ip[0], ip[1], ip[2], ip[3])
        });
        let outcome = match (cfg.check(), self.remote) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(EchoError::NotConnected),
            (Ok(()), Some(_)) => self.stream(cfg, &mut m, &mut stop, echoed, wire0),
        };
        let report = m.report(
            Instant::now(),
            cfg,
            &remote,
            self.ep.wire_stats().since(&wire0),
        );
        match outcome {
            Ok(()) => Ok(report),
            Err(error) => {
                // The connection is of no further use after a failure.
                self.remote = None;
                self.ep.abort();
                Err(Failure {
                    error,
                    report: Box::new(report),
                })
            }
        }
    }

    fn stream(
        &mut self,
        cfg: &EchoConfig,
        m: &mut Meter,
        stop: &mut dyn FnMut() -> bool,
        echoed: &AtomicU64,
        wire0: WireStats,
    ) -> Result<(), EchoError> {
        let interval = Duration::from_secs_f64(cfg.chunk as f64 / cfg.rate as f64);
        // How far sending may fall behind its schedule and still catch up: a few polls'
        // worth (or one chunk at low rates), so a stall is not followed by a burst.
        let slack = interval.max(Duration::from_millis(10));
        let mut next_send = Instant::now();
        let mut drain_until: Option<Instant> = None;
        loop {
            self.ep.poll();
            let now = Instant::now();
            let s = self.ep.socket();
            while s.can_recv() {
                match s.recv(|b| (b.len(), m.on_echo(now, b))) {
                    Ok(r) => r?,
                    Err(_) => break,
                }
            }
            echoed.store(m.echoed(), Ordering::Relaxed);
            let offset = m.echoed();
            if s.state() == tcp::State::Closed {
                let resets = self.ep.wire_stats().since(&wire0).resets_received;
                return Err(if resets > 0 {
                    EchoError::Reset { offset }
                } else {
                    EchoError::Aborted { offset }
                });
            }
            if !s.may_recv() {
                return Err(EchoError::Closed { offset });
            }
            if drain_until.is_none() && stop() {
                drain_until = Some(now + cfg.drain_timeout);
            }
            if let Some(deadline) = drain_until {
                if m.outstanding() == 0 {
                    return Ok(());
                }
                if now > deadline {
                    return Err(EchoError::Undrained {
                        offset,
                        outstanding: m.outstanding(),
                    });
                }
            }
            if let Some(waited) = m.waiting(now).filter(|w| *w > cfg.give_up) {
                return Err(EchoError::Stalled { offset, waited });
            }
            if drain_until.is_none() {
                let s = self.ep.socket();
                let mut sent = false;
                while now >= next_send
                    && m.outstanding() as usize + cfg.chunk <= cfg.max_outstanding
                    && s.send_capacity() - s.send_queue() >= cfg.chunk
                {
                    let n = s.send_slice(m.next_chunk(cfg.chunk)).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    m.on_send(now, n);
                    next_send += interval;
                    sent = true;
                }
                if let Some(floor) = now.checked_sub(slack) {
                    next_send = next_send.max(floor);
                }
                if sent {
                    // Out now rather than a poll later: the latency starts at the send.
                    self.ep.poll();
                }
            }
            std::thread::sleep(cfg.poll);
        }
    }
}

/// An echo run on its own thread, so a test can migrate the guest meanwhile.
pub struct EchoSession {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<Report, Failure>>>,
}

impl EchoSession {
    /// Starts streaming on a connected `client`; it runs until [`Self::stop`] (or a
    /// failure), then closes the connection.
    pub fn start(mut client: EchoClient, cfg: EchoConfig) -> Result<Self, EchoError> {
        cfg.check()?;
        if client.remote.is_none() {
            return Err(EchoError::NotConnected);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let (st, ec) = (stop.clone(), echoed.clone());
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let r = client.run_counted(&cfg, || st.load(Ordering::Relaxed), &ec);
                client.close();
                r
            })
            .map_err(|e| EchoError::Endpoint(format!("thread: {e}")))?;
        Ok(Self {
            stop,
            echoed,
            thread: Some(thread),
        })
    }

    /// Bytes echoed and checked so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Whether the run has ended on its own (a failure; [`Self::stop`] says which).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until at least `bytes` have been echoed; false on a timeout or if the run
    /// ended first.
    pub fn wait_echoed(&self, bytes: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.echoed() < bytes {
            if self.is_finished() || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stops sending, waits for the outstanding echo (the drain timeout at most) and
    /// returns the report.
    pub fn stop(mut self) -> Result<Report, Failure> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Report, Failure> {
        self.stop.store(true, Ordering::Relaxed);
        let panicked = || {
            let (cfg, now) = (EchoConfig::default(), Instant::now());
            Failure {
                error: EchoError::Panicked,
                report: Box::new(Meter::new(&cfg, now).report(
                    now,
                    &cfg,
                    "-",
                    WireStats::default(),
                )),
            }
        };
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(panicked())),
            None => Err(panicked()),
        }
    }
}

impl Drop for EchoSession {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

#[cfg(test)]
mod tests;
