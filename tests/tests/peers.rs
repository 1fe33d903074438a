//! Hostile and misbehaving peers against a Bochs pair (A = 10.0.0.1, B = 10.0.0.2),
//! played by host endpoints on the virtual Ethernet: a half-open handshake, a second
//! connection while a stream is being received, a peer that stops inside COMMIT, the
//! operator cancelling on either side, and `kill` of a guest that is migrating. In each
//! case the hypervisors keep serving and the guest runs on exactly one side.

use std::time::Duration;

use hv_tests::{expect, scenario, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::bxnet::BxEndpoint;
use hv_tools::streams;

const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);

/// The first reply message's tag and text from the bytes a hypervisor sent back.
fn reply(bytes: &[u8]) -> (u8, String) {
    let tag = bytes.first().copied().unwrap_or(0);
    let text = String::from_utf8_lossy(bytes.get(12..).unwrap_or(&[])).into_owned();
    (tag, text)
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_hostile_peers_and_operator_cancel() {
    let setup = Setup {
        emulator: Emulator::Bochs,
        pair: true,
        net: true,
        extra_hub_ports: 2,
    };
    scenario("bochs-peers", setup, |lab| {
        let hub_base = lab.hub_base;
        let key = lab.key.clone();
        let secs = Duration::from_secs;
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);
        let mut ep = BxEndpoint::new(
            hub_base + 4,
            [0x52, 0x54, 0, 0x12, 0x34, 0x98],
            [10, 0, 0, 8],
        )?;
        let mut ep2 = BxEndpoint::new(
            hub_base + 6,
            [0x52, 0x54, 0, 0x12, 0x34, 0x99],
            [10, 0, 0, 9],
        )?;

        // 1. A SYN that is never completed leaves B's listener half-open; B resets it
        //    and a real migration A -> B still goes through afterwards.
        ep.syn_only([10, 0, 0, 2], 7000)?;
        std::thread::sleep(Duration::from_secs(8));
        ep.abort();
        a.command("start counter period=100", CMD_TIMEOUT)?;
        a.wait_for("[g1] counter 3 ", GUEST_TIMEOUT)?;
        let m = hv_tools::session::migrate(a, b, 1, "10.0.0.2", "", MIGRATE_TIMEOUT)?;
        let id_b = m.new_id;
        b.wait_for(&format!("[g{id_b}] counter "), GUEST_TIMEOUT)?;

        // 2. A REJECT reaches the peer at once, with the reason.
        ep.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))?;
        ep.secure(&key, secs(60))?;
        let mut bad = streams::complete_without_commit();
        bad[1] = 1; // reserved header bits
        let _ = ep.send_all(&bad[..64], Duration::from_secs(30));
        let (tag, text) = reply(&ep.recv_until_close(Duration::from_secs(20)));
        if tag != 17 || !text.contains("reserved header") {
            return Err(format!(
                "expected a REJECT with the reason, got tag {tag}: {text:?}"
            ));
        }
        a.wait_for("incoming migration discarded: ", MIGRATE_TIMEOUT)?;

        // 3. While one stream is being received, a second source is refused ("busy"),
        //    not left hanging; then the operator cancels the first on the destination.
        let stream = streams::complete_without_commit();
        ep.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))?;
        ep.secure(&key, secs(60))?;
        ep.send_all(&stream[..stream.len() / 2], Duration::from_secs(60))?;
        a.wait_for("incoming migration from 10.0.0.8", CMD_TIMEOUT)?;
        ep2.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))?;
        match ep2.secure(&key, secs(20)) {
            Err(e) if e.contains("busy") => {}
            other => {
                return Err(format!(
                    "second source: expected a busy refusal, got {other:?}"
                ))
            }
        }
        a.wait_for(
            "refused a second incoming migration from 10.0.0.9",
            CMD_TIMEOUT,
        )?;
        ep2.abort();
        expect(
            &a.command("migrate cancel", CMD_TIMEOUT)?,
            "incoming migration from 10.0.0.8",
        )?;
        let (tag, text) = reply(&ep.recv_until_close(Duration::from_secs(20)));
        if tag != 17 || !text.contains("cancelled") {
            return Err(format!(
                "cancelled stream: expected REJECT, got tag {tag}: {text:?}"
            ));
        }
        ep.abort();

        // 4. A peer that stops inside COMMIT: after the deadline the guest stays paused
        //    (never running), and the operator can kill it.
        ep.connect([10, 0, 0, 1], 7000, Duration::from_secs(60))?;
        ep.secure(&key, secs(60))?;
        ep.send_all(&stream, Duration::from_secs(120))?;
        let mut got = Vec::new();
        for _ in 0..200 {
            got.extend(ep.recv_until_close(Duration::from_millis(50)));
            if !got.is_empty() {
                break;
            }
        }
        if got.first() != Some(&16) {
            return Err(format!("expected READY, got {got:?}"));
        }
        ep.send_all(&[18, 0, 0, 0], Duration::from_secs(10))?; // half a COMMIT header
        a.wait_for("never sent COMMIT", Duration::from_secs(60))?;
        ep.abort();
        let vms = a.command("vms", CMD_TIMEOUT)?;
        let forged = vms
            .lines()
            .find(|l| l.contains("forged"))
            .ok_or(format!("forged guest not listed:\n{vms}"))?;
        if !forged.contains("paused") {
            return Err(format!("a guest without COMMIT must stay paused: {forged}"));
        }
        let fid: u32 = forged
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("no id")?;
        expect(&a.command(&format!("kill {fid}"), CMD_TIMEOUT)?, "killed")?;

        // 5. A guest being migrated cannot be killed or paused behind the migration's
        //    back; `migrate cancel` on the source aborts it and the guest runs on.
        b.command("start verify mem=16 rate=200 check=2", CMD_TIMEOUT)?;
        let vid = b
            .wait_for("verify: PASS", GUEST_TIMEOUT)?
            .rsplit("[g")
            .next()
            .and_then(|s| s.split(']').next())
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or("no verify id")?;
        expect(
            &b.command(&format!("migrate {vid} 10.0.0.1 mode=stop"), CMD_TIMEOUT)?,
            "migrate: guest",
        )?;
        for cmd in ["kill", "pause", "resume"] {
            let out = b.command(&format!("{cmd} {vid}"), CMD_TIMEOUT)?;
            expect(&out, "is being migrated away")?;
        }
        let out = b.command("migrate cancel", CMD_TIMEOUT)?;
        expect(&out, "cancelled")?;
        if !out.contains("keeps running here") {
            b.wait_for("keeps running here", CMD_TIMEOUT)?;
        }
        a.wait_for("source aborted: cancelled by the operator", MIGRATE_TIMEOUT)?;
        b.command(&format!("check {vid}"), CMD_TIMEOUT)?;
        b.wait_for(&format!("[g{vid}] verify: PASS"), GUEST_TIMEOUT)?;
        let vms_a = a.command("vms", CMD_TIMEOUT)?;
        if vms_a.contains("verify") {
            return Err(format!("cancelled guest appeared on A:\n{vms_a}"));
        }
        // The counter kept counting on B throughout.
        b.wait_for(&format!("[g{id_b}] counter "), GUEST_TIMEOUT)?;
        Ok(())
    });
}
