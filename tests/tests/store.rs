//! Checkpoint, restore and guest-initiated migration on a Bochs pair (A = 10.0.0.1,
//! B = 10.0.0.2) with the guest store (`hv_tools::store`, 10.0.0.9) on the hub's extra
//! port: the verify guest is checkpointed while it runs on A, restored on B where it
//! passes its check while the original runs on; a damaged checkpoint is refused before
//! any guest memory is touched; a counter moves itself to B and back once allowed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hv_tests::{expect, scenario, Setup, CMD_TIMEOUT};
use hv_tools::console::Console;
use hv_tools::session;
use hv_tools::store::net::{self, Config};

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The store, serving in a thread until dropped.
struct StoreRun {
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    dir: PathBuf,
}

impl StoreRun {
    fn start(hub_port: u16, key: &str, dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Config {
            dir: dir.clone(),
            key_hex: key.to_string(),
            hub_port,
            ip: net::DEFAULT_IP,
            mac: net::DEFAULT_MAC,
            max_mem: 1 << 30,
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lines.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            net::serve(&cfg, &s, &mut |line| {
                eprintln!("S| {line}");
                l.lock().unwrap().push(line);
            })
        });
        Self {
            lines,
            stop,
            thread: Some(thread),
            dir,
        }
    }

    /// Waits for a store line containing `what`; returns it.
    fn wait(&self, what: &str) -> Result<String, String> {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return Ok(l.clone());
            }
            if Instant::now() > deadline {
                return Err(format!("the store never printed {what:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for StoreRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn consoles(lab: &mut hv_tests::Lab) -> (&mut Console, &mut Console) {
    let (a, b) = lab.instances.split_at_mut(1);
    (&mut a[0].console, &mut b[0].console)
}

#[test]
#[ignore = "boots an emulator pair: run with cargo xtask test"]
fn bochs_pair_checkpoint_restore_and_self_move() {
    let setup = Setup {
        extra_hub_ports: 1,
        ..Setup::bochs_pair()
    };
    scenario("bochs-store", setup, |lab| {
        // Hub member 2 (after A and B) is the store.
        let store = StoreRun::start(
            lab.hub_base + 4,
            &lab.key,
            std::env::temp_dir().join(format!("hv-store-e2e-{}", std::process::id())),
        );
        store.wait("STORE-LISTEN")?;
        let (a, b) = consoles(lab);

        // 1. Checkpoint the verify guest while it runs; it goes on running on A.
        a.command("start verify mem=8 rate=100 check=2", CMD_TIMEOUT)?;
        a.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;
        let out = a.command("checkpoint 1 10.0.0.9", CMD_TIMEOUT)?;
        expect(&out, "migrate: guest 1 (")?;
        a.wait_for("checkpointed to 10.0.0.9:7000: done", MIGRATE_TIMEOUT)?;
        let line = store.wait("STORE-CHECKPOINT ")?;
        let name = field(&line, "name").ok_or("no name")?.to_string();
        let rows = session::listed(a, "verify")?;
        if rows.len() != 1 || rows[0].1 != "running" && rows[0].1 != "sleeping" {
            return Err(format!("the checkpointed guest must run on: {rows:?}"));
        }
        a.wait_for("[g1] verify: PASS", GUEST_TIMEOUT)?;

        // 2. Restore it on B: a new, independent guest that passes its check there.
        b.command(&format!("restore 10.0.0.9 {name}"), CMD_TIMEOUT)?;
        b.wait_for(&format!("restored from checkpoint {name}"), MIGRATE_TIMEOUT)?;
        let rid = session::wait_arrived(b, MIGRATE_TIMEOUT)?;
        if !session::self_check(b, "verify", rid)? {
            return Err("the restored verify guest failed its check".into());
        }
        if !session::self_check(a, "verify", 1)? {
            return Err("the original failed its check after the checkpoint".into());
        }
        store.wait("STORE-RESTORE ")?;

        // 3. A damaged checkpoint is refused before any guest memory is touched.
        let file = store.dir.join(format!("{name}.ckpt"));
        let mut bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&file, &bytes).map_err(|e| e.to_string())?;
        b.command(&format!("restore 10.0.0.9 {name}"), CMD_TIMEOUT)?;
        let why = b.wait_for("damaged", MIGRATE_TIMEOUT)?;
        eprintln!("damaged checkpoint: {}", why.lines().last().unwrap_or(""));
        if session::listed(b, "verify")?.len() != 1 {
            return Err("a damaged checkpoint installed a guest".into());
        }
        b.command("restore 10.0.0.9 nosuch-7", CMD_TIMEOUT)?;
        b.wait_for("no checkpoint named nosuch-7", MIGRATE_TIMEOUT)?;

        // 4. A counter moves itself once allowed: refused first, then to B.
        let cid = session::start(a, "counter period=100 move-every=15 a=10.0.0.1 b=10.0.0.2")?;
        a.wait_for(&format!("[g{cid}] counter: move refused"), GUEST_TIMEOUT)?;
        a.command(&format!("allow-move {cid} on"), CMD_TIMEOUT)?;
        a.wait_for(
            &format!("guest {cid} asks to move to 10.0.0.2"),
            GUEST_TIMEOUT,
        )?;
        let bid = session::wait_arrived(b, MIGRATE_TIMEOUT)?;
        // It may say so before or after the "arrived" line: look in the whole log.
        let said = format!("[g{bid}] counter: moved myself (now 1 migrations)");
        if !b.log().contains(&said) {
            b.wait_for(&said, GUEST_TIMEOUT)?;
        }
        let on_a = session::counter_values(&a.log(), cid)
            .last()
            .copied()
            .ok_or("no counter output on A")?;
        let first_b = session::counter_values(&b.log(), bid)
            .first()
            .copied()
            .ok_or("no counter output on B")?;
        if first_b != on_a + 1 {
            return Err(format!(
                "counter gap: last on A {on_a}, first on B {first_b}"
            ));
        }
        // B has not allowed it: its next request is refused and it stays on B.
        b.wait_for(&format!("[g{bid}] counter: move refused"), GUEST_TIMEOUT)?;
        Ok(())
    });
}
