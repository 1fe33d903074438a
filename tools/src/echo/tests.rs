//! The meter on made-up instants, and whole runs against an echo server on a second host
//! endpoint across a real hub (loopback UDP, no emulator).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::hub::{Hub, HubConfig, HubHandle, Member};

const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x77];
const CLIENT_IP: [u8; 4] = [10, 0, 0, 7];
const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x10];
const SERVER_IP: [u8; 4] = [10, 0, 0, 10];
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

#[test]
fn echo_pattern_is_the_same_from_any_offset() {
    let mut whole = [0u8; 100];
    pattern(42, 0, &mut whole);
    let mut tail = [0u8; 63];
    pattern(42, 37, &mut tail);
    assert_eq!(&whole[37..], &tail[..]);
    let mut other = [0u8; 100];
    pattern(43, 0, &mut other);
    assert_ne!(whole, other, "the seed matters");
    // Not a constant or a short cycle.
    assert!(whole.windows(8).any(|w| w != &whole[..8]));
}

#[test]
fn echo_meter_measures_latency_and_the_longest_gap() {
    let cfg = EchoConfig {
        seed: 9,
        ..EchoConfig::default()
    };
    let t0 = Instant::now();
    let mut m = Meter::new(&cfg, t0);
    // Two chunks of 10 bytes, sent at 0 and 10 ms.
    let c1 = m.next_chunk(10).to_vec();
    m.on_send(at(t0, 0), 10);
    let c2 = m.next_chunk(10).to_vec();
    m.on_send(at(t0, 10), 10);
    assert_eq!(m.outstanding(), 20);
    // The first comes back split in two, at 3 and 5 ms; the second after a 1.2 s gap.
    m.on_echo(at(t0, 3), &c1[..4]).unwrap();
    m.on_echo(at(t0, 5), &c1[4..]).unwrap();
    m.on_echo(at(t0, 1205), &c2).unwrap();
    assert_eq!((m.echoed(), m.outstanding()), (20, 0));
    // Nothing outstanding: an idle second is no stall.
    let c3 = m.next_chunk(10).to_vec();
    m.on_send(at(t0, 2300), 10);
    m.on_echo(at(t0, 2302), &c3).unwrap();
    let r = m.report(at(t0, 2400), &cfg, "x:7", WireStats::default());
    assert_eq!((r.bytes_sent, r.bytes_echoed, r.chunks), (30, 30, 3));
    assert_eq!(r.longest_stall_ms, 1200.0);
    assert_eq!(r.longest_stall_at_ms, 5.0);
    assert_eq!(r.stall_count, 1);
    assert_eq!(r.stalls[0].offset, 10);
    assert_eq!((r.latency.min_ms, r.latency.max_ms), (2.0, 1195.0));
    assert_eq!(r.samples.len(), 3);
    assert_eq!(
        r.samples[1],
        Sample {
            at_ms: 10.0,
            latency_ms: 1195.0
        }
    );
    assert!(
        r.to_string().contains("longest stall 1200.0 ms at 0.0"),
        "{r}"
    );
    assert_eq!(r.samples_csv().lines().nth(2), Some("10.000,1195.000"));
}

#[test]
fn echo_meter_reports_the_first_bad_byte_and_extra_bytes() {
    let cfg = EchoConfig::default();
    let t0 = Instant::now();
    let mut m = Meter::new(&cfg, t0);
    let mut c = m.next_chunk(16).to_vec();
    m.on_send(t0, 16);
    m.on_echo(t0, &c[..5]).unwrap();
    c[9] ^= 0x40;
    let e = m.on_echo(t0, &c[5..]).unwrap_err();
    assert_eq!(
        e,
        EchoError::Mismatch {
            offset: 9,
            expected: c[9] ^ 0x40,
            got: c[9]
        }
    );
    assert!(
        e.to_string().starts_with("echo: byte 9 came back as"),
        "{e}"
    );

    let mut m = Meter::new(&cfg, t0);
    let c = m.next_chunk(8).to_vec();
    m.on_send(t0, 4);
    assert_eq!(m.on_echo(t0, &c), Err(EchoError::Excess { offset: 4 }));
}

#[test]
fn echo_meter_counts_an_unfinished_wait_and_thins_samples() {
    let cfg = EchoConfig {
        max_samples: 4,
        ..EchoConfig::default()
    };
    let t0 = Instant::now();
    let mut m = Meter::new(&cfg, t0);
    for i in 0..10 {
        let c = m.next_chunk(1).to_vec();
        m.on_send(at(t0, i * 10), 1);
        m.on_echo(at(t0, i * 10 + 1), &c).unwrap();
    }
    m.on_send(at(t0, 200), 1);
    // The run ends 700 ms into a wait: that wait is the longest stall.
    let r = m.report(at(t0, 900), &cfg, "x:7", WireStats::default());
    assert_eq!((r.longest_stall_ms, r.longest_stall_at_ms), (700.0, 200.0));
    assert_eq!(r.chunks, 10);
    assert!(
        r.samples.len() <= 4 && r.sample_stride == 4,
        "{:?}",
        r.samples
    );
    let times: Vec<f64> = r.samples.iter().map(|s| s.at_ms).collect();
    assert_eq!(times, [0.0, 40.0, 80.0]);
}

#[test]
fn echo_histogram_quantiles_are_within_its_precision() {
    let mut h = Histogram::new();
    for v in 1..=10_000u64 {
        h.add(v * 10);
    }
    let close = |got: u64, want: f64| (got as f64 - want).abs() / want < 1.0 / 32.0;
    assert!(close(h.quantile(0.5), 50_000.0), "{}", h.quantile(0.5));
    assert!(close(h.quantile(0.99), 99_000.0), "{}", h.quantile(0.99));
    assert_eq!((h.min, h.max, h.quantile(1.0)), (10, 100_000, 100_000));
    for v in [0, 1, 31, 32, 33, 63, 64, 1000, u64::MAX / 3, u64::MAX] {
        let b = Histogram::bucket(v);
        assert!(b < h.counts.len());
        // A bucket's middle is within 1/32 of what went into it.
        let mid = Histogram::value(b);
        assert!(mid.abs_diff(v) <= v / 32 + 1, "{v} -> {b} -> {mid}");
    }
}

#[test]
fn echo_config_is_checked() {
    let bad = |c: EchoConfig| matches!(c.check(), Err(EchoError::Config(_)));
    assert!(bad(EchoConfig {
        rate: 0,
        ..EchoConfig::default()
    }));
    assert!(bad(EchoConfig {
        chunk: 20_000,
        ..EchoConfig::default()
    }));
    assert!(bad(EchoConfig {
        max_outstanding: 60_000,
        chunk: 100,
        ..EchoConfig::default()
    }));
    assert!(EchoConfig::default().check().is_ok());
}

/// An echo server on its own hub endpoint: echoes every byte of one connection on port
/// 7, flipping bit 0 of the byte at `corrupt_at` if asked, and closes when the client does.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl Server {
    fn start(hub_port: u16, corrupt_at: Option<u64>) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut ep = BxEndpoint::new(hub_port, SERVER_MAC, SERVER_IP)?;
            ep.set_nagle(false);
            ep.listen(7)?;
            let _ = ready_tx.send(());
            let mut pending: Vec<u8> = Vec::new();
            let mut echoed = 0u64;
            while !st.load(Ordering::Relaxed) {
                ep.poll();
                let s = ep.socket();
                if pending.is_empty() && s.can_recv() {
                    let _ = s.recv(|b| {
                        pending.extend_from_slice(b);
                        (b.len(), ())
                    });
                    if let Some(i) = corrupt_at
                        .and_then(|c| c.checked_sub(echoed))
                        .filter(|&i| i < pending.len() as u64)
                    {
                        pending[i as usize] ^= 1;
                    }
                }
                if !pending.is_empty() && s.can_send() {
                    let n = s.send_slice(&pending).map_err(|e| e.to_string())?;
                    pending.drain(..n);
                    echoed += n as u64;
                }
                if pending.is_empty() && !s.may_recv() && s.state() == tcp::State::CloseWait {
                    s.close();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(echoed)
        });
        ready
            .recv_timeout(SECS(10))
            .expect("the echo server did not start");
        Server {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().unwrap();
        t.join().unwrap().expect("echo server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A hub with the client on port 0 and the echo server on port 1, the client connected.
fn lab(corrupt_at: Option<u64>) -> (HubHandle, Server, EchoClient) {
    let base = crate::emu::free_udp_range(4);
    let hub = Hub::start(
        vec![
            Member::socket_pair("client", base),
            Member::socket_pair("server", base + 2),
        ],
        HubConfig {
            seed: Some(1),
            ..HubConfig::default()
        },
    )
    .expect("hub");
    let server = Server::start(base + 2, corrupt_at);
    let mut client = EchoClient::new(base, CLIENT_MAC, CLIENT_IP).expect("client endpoint");
    client.connect(SERVER_IP, 7, SECS(20)).expect("connect");
    (hub, server, client)
}

#[test]
fn echo_over_the_hub_checks_every_byte() {
    let (hub, server, mut client) = lab(None);
    let cfg = EchoConfig {
        rate: 50_000,
        chunk: 500,
        seed: 0x5eed,
        ..EchoConfig::default()
    };
    let r = client
        .run_for(&cfg, SECS(3))
        .unwrap_or_else(|f| panic!("{f}"));
    eprintln!("{r}");
    client.close();
    assert_eq!(r.bytes_sent, r.bytes_echoed);
    // About 3 s at 50 kB/s; a loaded machine may fall somewhat behind, never ahead.
    assert!(
        (60_000..=155_000).contains(&r.bytes_echoed),
        "{}",
        r.bytes_echoed
    );
    assert_eq!(r.chunks, r.bytes_echoed / 500);
    assert_eq!(r.resets, 0);
    assert!(r.latency.min_ms > 0.0 && r.latency.min_ms <= r.latency.median_ms);
    assert!(r.latency.median_ms <= r.latency.p99_ms && r.latency.p99_ms <= r.latency.max_ms);
    assert!(r.longest_stall_ms < 1000.0, "{r}");
    assert_eq!(r.samples.len() as u64, r.chunks);
    assert_eq!(r.wire.duplicates_received, 0);
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"longest_stall_ms\""));
    assert_eq!(server.stop(), r.bytes_echoed);
    hub.stop();
}

#[test]
fn echo_reports_a_one_second_partition_as_a_stall() {
    let (hub, server, client) = lab(None);
    let cfg = EchoConfig {
        rate: 20_000,
        chunk: 200,
        seed: 77,
        ..EchoConfig::default()
    };
    let session = EchoSession::start(client, cfg).unwrap();
    assert!(
        session.wait_echoed(10_000, SECS(20)),
        "no echo before the cut"
    );
    // The server's cable is pulled for a second; both sides' segments are lost.
    let cut = Instant::now();
    hub.partition(1).unwrap();
    std::thread::sleep(SECS(1));
    hub.heal(1).unwrap();
    let cut_for = cut.elapsed();
    let resumed_at = session.echoed();
    // The backlog (up to max_outstanding) and then a second of steady stream.
    assert!(
        session.wait_echoed(resumed_at + 40_000, SECS(30)),
        "no echo after the heal"
    );
    let r = session.stop().unwrap_or_else(|f| panic!("{f}"));
    eprintln!("{r} (cut for {cut_for:?})");
    assert_eq!(r.bytes_sent, r.bytes_echoed);
    assert_eq!(r.resets, 0);
    // The stall spans the cut (less the hub's queue draining as it began) and then some:
    // the next retransmission after the heal.
    assert!(r.longest_stall_ms >= 900.0, "{r}");
    assert!(r.longest_stall_ms < 15_000.0, "{r}");
    assert!(r.retransmissions > 0, "{r}");
    assert!(r.stalls.iter().any(|s| s.ms == r.longest_stall_ms));
    assert!(hub.counters().unwrap()[1].dropped_partition > 0);
    server.stop();
    hub.stop();
}

#[test]
fn echo_names_the_offset_of_a_corrupted_byte() {
    let (hub, server, mut client) = lab(Some(1234));
    let cfg = EchoConfig {
        rate: 20_000,
        chunk: 100,
        ..EchoConfig::default()
    };
    let f = client.run_for(&cfg, SECS(2)).unwrap_err();
    assert!(
        matches!(f.error, EchoError::Mismatch { offset: 1234, .. }),
        "{f}"
    );
    assert!(f.report.bytes_echoed <= 1234, "{f}");
    server.stop();
    hub.stop();
}
