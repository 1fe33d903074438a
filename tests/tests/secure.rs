//! The secure migration channel on a Bochs pair (A = 10.0.0.1, B = 10.0.0.2), both
//! given the lab's key at boot: a wrong key, no key on either side, a plaintext peer,
//! a tampered record and a replayed session are each refused with a clear line on the
//! console while the guest keeps running on its source and the receiver keeps serving;
//! a migration with matching keys then goes through.

use std::time::Duration;

use hv_tests::{expect, scenario, Emulator, Setup, CMD_TIMEOUT};
use hv_tools::bxnet::BxEndpoint;
use hv_tools::console::Console;
use hv_tools::{session, streams};

const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(240);

/// `migrate 1 10.0.0.2` must fail on A with `why`; the counter keeps running on A.
fn refused(a: &mut Console, why: &str) -> Result<(), String> {
    expect(
        &a.command("migrate 1 10.0.0.2", CMD_TIMEOUT)?,
        "migrate: guest 1",
    )?;
    a.wait_for("migrate: FAILED: ", MIGRATE_TIMEOUT)?;
    let line = a.wait_for("\n", CMD_TIMEOUT)?;
    if !line.contains(why) || !line.contains("keeps running here") {
        return Err(format!("expected a failure with {why:?}, got {line:?}"));
    }
    let n = session::counter_values(&a.log(), 1)
        .last()
        .copied()
        .unwrap_or(0);
    a.wait_for(&format!("[g1] counter {} ", n + 2), GUEST_TIMEOUT)?;
    Ok(())
}

/// No guest from a host endpoint was ever installed on `c`.
fn nothing_forged(c: &mut Console) -> Result<(), String> {
    let vms = c.command("vms", CMD_TIMEOUT)?;
    // The host endpoint's streams name their guest "forged" (the IMAGE column).
    if vms
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("forged"))
    {
        return Err(format!(
            "an unauthenticated stream installed a guest:\n{vms}"
        ));
    }
    Ok(())
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_secure_channel_refuses_wrong_keys_and_tampering() {
    let setup = Setup {
        emulator: Emulator::Bochs,
        pair: true,
        net: true,
        extra_hub_ports: 1,
    };
    scenario("bochs-secure", setup, |lab| {
        let hub_base = lab.hub_base;
        let key = lab.key.clone();
        let other = hv_tools::emu::new_key()?;
        let (a, b) = lab.instances.split_at_mut(1);
        let (a, b) = (&mut a[0].console, &mut b[0].console);
        let secs = Duration::from_secs;

        // Both show the same fingerprint, never the key.
        let (ka, kb) = (
            a.command("key", CMD_TIMEOUT)?,
            b.command("key", CMD_TIMEOUT)?,
        );
        let fp = |t: &str| {
            t.split("fingerprint ")
                .nth(1)
                .and_then(|s| s.get(..16))
                .map(String::from)
        };
        if fp(&ka).is_none() || fp(&ka) != fp(&kb) || ka.contains(&key) || a.log().contains(&key) {
            return Err(format!(
                "key fingerprints differ or the key is shown:\n{ka}\n{kb}"
            ));
        }
        expect(&ka, "nonces from RD")?;

        a.command("start counter period=100", CMD_TIMEOUT)?;
        a.wait_for("[g1] counter 3 ", GUEST_TIMEOUT)?;

        // 1. Different keys: each side says so, nothing is installed on B.
        b.command(&format!("key set {other}"), CMD_TIMEOUT)?;
        refused(a, "peer does not hold the migration key")?;
        b.wait_for(
            "incoming migration discarded: secure channel: peer rejected our migration key",
            CMD_TIMEOUT,
        )?;
        nothing_forged(b)?;

        // 2. No key on the receiver: refused before any handshake.
        b.command("key clear", CMD_TIMEOUT)?;
        refused(a, "peer has no migration key configured")?;
        b.wait_for("refused an incoming migration from 10.0.0.1:", CMD_TIMEOUT)?;
        expect(
            &b.wait_for("\n", CMD_TIMEOUT)?,
            "no migration key is configured",
        )?;

        // 3. No key on the source: `migrate` refuses at once and says why.
        a.command("key clear", CMD_TIMEOUT)?;
        expect(
            &a.command("migrate 1 10.0.0.2", CMD_TIMEOUT)?,
            "error: no migration key",
        )?;
        a.command(&format!("key set {key}"), CMD_TIMEOUT)?;
        b.command(&format!("key set {key}"), CMD_TIMEOUT)?;

        let mut ep = BxEndpoint::new(
            hub_base + 4,
            [0x52, 0x54, 0, 0x12, 0x34, 0x97],
            [10, 0, 0, 7],
        )?;
        let stream = streams::complete_without_commit();

        // 4. A plaintext source (the old protocol) gets a plaintext REJECT it can print.
        ep.connect([10, 0, 0, 2], 7000, secs(60))?;
        let _ = ep.send_all(&stream[..4096], secs(30));
        let reply = ep.recv_until_close(secs(20));
        ep.abort();
        if reply.first() != Some(&17) {
            return Err(format!("plaintext peer: expected a REJECT, got {reply:?}"));
        }
        b.wait_for(
            "incoming migration discarded: secure channel: peer speaks the unencrypted",
            CMD_TIMEOUT,
        )?;

        // 5. A record with one bit flipped (after a good handshake) is detected.
        ep.connect([10, 0, 0, 2], 7000, secs(60))?;
        ep.secure(&key, secs(60))?;
        let at = ep.raw_sent().len() + 200;
        ep.flip_wire_byte(at);
        let _ = ep.send_all(&stream, secs(60));
        ep.abort();
        b.wait_for(
            "incoming migration discarded: secure channel: record failed authentication",
            MIGRATE_TIMEOUT,
        )?;
        nothing_forged(b)?;

        // 6. A recorded session replayed byte for byte fails the key proof (B's nonce
        //    differs), so the replay installs nothing.
        ep.connect([10, 0, 0, 2], 7000, secs(60))?;
        ep.secure(&key, secs(60))?;
        ep.send_all(&stream[..8192], secs(60))?;
        let recorded = ep.raw_sent().to_vec();
        ep.abort();
        b.wait_for("incoming migration discarded: ", MIGRATE_TIMEOUT)?;
        ep.connect([10, 0, 0, 2], 7000, secs(60))?;
        let _ = ep.send_raw_all(&recorded, secs(60));
        let _ = ep.recv_until_close(secs(20));
        ep.abort();
        b.wait_for(
            "incoming migration discarded: secure channel: peer does not hold the migration key",
            MIGRATE_TIMEOUT,
        )?;
        nothing_forged(b)?;

        // 7. B kept serving: with matching keys the counter moves A -> B.
        let m = session::migrate(a, b, 1, "10.0.0.2", "", MIGRATE_TIMEOUT)?;
        b.wait_for(&format!("[g{}] counter ", m.new_id), GUEST_TIMEOUT)?;
        Ok(())
    });
}
