//! Guests on the network (guest-abi v3 PV NIC, the hypervisors' switches): on a Bochs
//! (VMX) pair and a QEMU TCG (SVM) pair joined by the project's hub, a host client keeps one TCP connection to the
//! `echo` guest while it migrates A -> B -> A; every byte must come back in order, the
//! connection must never reset, and the test prints the longest stall beside the
//! hypervisors' downtime. Then the `kv` guest keeps its data across a migration and
//! answers from the destination.

use std::time::Duration;

use hv_tests::{scenario, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::bxnet::BxEndpoint;
use hv_tools::echo::{EchoClient, EchoConfig, EchoSession};
use hv_tools::session;

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const ECHO_IP: [u8; 4] = [10, 0, 0, 10];
const KV_IP: [u8; 4] = [10, 0, 0, 11];

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_guest_tcp_connection_survives_migration() {
    guest_tcp("bochs-guestnet", Emulator::Bochs);
}

/// The same on a QEMU TCG pair: the guests run under AMD SVM with NPT, the NIC is
/// QEMU's e1000 (no tunnel needed: QEMU's socket netdev passes every frame).
#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn qemu_tcg_svm_pair_guest_tcp_connection_survives_migration() {
    guest_tcp("qemu-tcg-guestnet", Emulator::QemuTcg);
}

fn guest_tcp(name: &str, emulator: Emulator) {
    let setup = Setup {
        emulator,
        pair: true,
        net: true,
        extra_hub_ports: 2,
    };
    scenario(name, setup, |lab| {
        let hub_base = lab.hub_base;
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);

        // 1. The echo guest on A; a host client streams through it.
        let echo = session::start(a, "echo ip=10.0.0.10/24")?;
        a.wait_for(&format!("[g{echo}] echo: "), GUEST_TIMEOUT)?;
        let mut client = EchoClient::new(
            hub_base + 4,
            [0x52, 0x54, 0, 0x12, 0x34, 0x90],
            [10, 0, 0, 90],
        )
        .map_err(|e| e.to_string())?;
        if let Err(e) = client.connect(ECHO_IP, 7, Duration::from_secs(60)) {
            // The switch's and the NIC's counters say where the frames stopped.
            let net = a.command("net", CMD_TIMEOUT)?;
            let stats = a.command(&format!("stats {echo}"), CMD_TIMEOUT)?;
            return Err(format!("connect to the echo guest: {e}\n{net}\n{stats}"));
        }
        let cfg = EchoConfig {
            rate: 8 * 1024,
            chunk: 256,
            seed: 17,
            give_up: Duration::from_secs(120),
            ..EchoConfig::default()
        };
        eprintln!(
            "guestnet: echo load {} B/s in {} B chunks, seed {}",
            cfg.rate, cfg.chunk, cfg.seed
        );
        let run = EchoSession::start(client, cfg).map_err(|e| e.to_string())?;
        if !run.wait_echoed(16 * 1024, Duration::from_secs(60)) {
            return Err(format!(
                "the echo guest did not echo 16 KiB (got {})",
                run.echoed()
            ));
        }

        // 2. A -> B and back, under load.
        let m1 = session::migrate(a, b, echo, "10.0.0.2", "", MIGRATE_TIMEOUT)?;
        let before = run.echoed();
        if !run.wait_echoed(before + 16 * 1024, Duration::from_secs(90)) {
            let na = a.command("net", CMD_TIMEOUT)?;
            let nb = b.command("net", CMD_TIMEOUT)?;
            let sb = b.command(&format!("stats {}", m1.new_id), CMD_TIMEOUT)?;
            return Err(format!(
                "no echo from B after the migration ({} bytes echoed)\nA: {na}\nB: {nb}\n{sb}",
                run.echoed()
            ));
        }
        let m2 = session::migrate(b, a, m1.new_id, "10.0.0.1", "", MIGRATE_TIMEOUT)?;
        let before = run.echoed();
        if !run.wait_echoed(before + 16 * 1024, Duration::from_secs(90)) {
            return Err(format!(
                "no echo from A after the migration back ({} bytes echoed)",
                run.echoed()
            ));
        }
        let report = run
            .stop()
            .map_err(|f| format!("echo run failed: {} ({})", f.error, f.report))?;
        eprintln!("guestnet: {report}");
        let dt = |m: &session::Migrated| m.stats.get("downtime_us").unwrap_or_default();
        eprintln!(
            "GUESTNET stall_ms={:.1} downtime_ab_us={} downtime_ba_us={} bytes={} resets={} retransmissions={}",
            report.longest_stall_ms,
            dt(&m1),
            dt(&m2),
            report.bytes_echoed,
            report.resets,
            report.retransmissions
        );
        if report.resets != 0 {
            return Err(format!("the connection was reset: {report}"));
        }
        a.command(&format!("stats {}", m2.new_id), CMD_TIMEOUT)?;
        a.command("net", CMD_TIMEOUT)?;

        // 3. kv keeps its data across a migration and answers from the destination.
        let kv = session::start(a, "kv ip=10.0.0.11/24")?;
        a.wait_for(&format!("[g{kv}] kv: "), GUEST_TIMEOUT)?;
        let mut ep = BxEndpoint::new(
            hub_base + 6,
            [0x52, 0x54, 0, 0x12, 0x34, 0x91],
            [10, 0, 0, 91],
        )?;
        ep.connect(KV_IP, 6379, Duration::from_secs(60))?;
        let ask = |ep: &mut BxEndpoint, line: &str| -> Result<String, String> {
            ep.send_all(format!("{line}\n").as_bytes(), Duration::from_secs(30))?;
            ep.recv_line(Duration::from_secs(60))
        };
        for i in 0..20 {
            let r = ask(&mut ep, &format!("SET key{i} value-{i}-{}", i * 7919))?;
            if r != "OK" {
                return Err(format!("SET key{i}: {r}"));
            }
        }
        ep.close();
        let mk = session::migrate(a, b, kv, "10.0.0.2", "", MIGRATE_TIMEOUT)?;
        b.wait_for(&format!("[g{}] kv: ", mk.new_id), GUEST_TIMEOUT)?;
        ep.connect(KV_IP, 6379, Duration::from_secs(60))?;
        for i in 0..20 {
            let r = ask(&mut ep, &format!("GET key{i}"))?;
            let want = format!("VALUE value-{i}-{}", i * 7919);
            if r != want {
                return Err(format!(
                    "GET key{i} after the migration: {r:?}, expected {want:?}"
                ));
            }
        }
        let r = ask(&mut ep, "COUNT")?;
        if r != "COUNT 20" {
            return Err(format!("COUNT after the migration: {r}"));
        }
        ep.close();
        eprintln!("guestnet: kv answered 20 keys from B after the migration");
        Ok(())
    });
}
