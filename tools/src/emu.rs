//! Launching the hypervisor image in an emulator: Bochs (VMX emulated, any host), QEMU
//! with KVM (nested VMX on Intel hosts) and QEMU/TCG (no VMX). One instance or a linked
//! pair on one virtual Ethernet: the lab's own [`hub`](crate::hub) joins them (Bochs: e1000
//! with the socket module; QEMU: an e1000 on a `dgram` netdev; both one frame per UDP
//! datagram), so every emulator gets the same paced links and the same fault injection.
//! Only the launch differs between emulators; [`Instance`] exposes the same console
//! either way. Emulators are killed when their [`Instance`] drops.

use std::fmt;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use crate::console::Console;
use crate::hub::{Hub, HubConfig, HubHandle, Member};

/// Which emulator runs the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    /// Bochs 2.7 with VMX emulation.
    Bochs,
    /// QEMU with KVM and `-cpu host` (needs nested VMX on an Intel host).
    QemuKvm,
    /// QEMU without KVM: no VMX, console and network only.
    QemuTcg,
}

impl FromStr for Emulator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bochs" => Ok(Self::Bochs),
            "qemu-kvm" => Ok(Self::QemuKvm),
            "qemu-tcg" | "qemu" => Ok(Self::QemuTcg),
            _ => Err(format!(
                "unknown emulator '{s}' (bochs, qemu-kvm, qemu-tcg)"
            )),
        }
    }
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bochs => "bochs",
            Self::QemuKvm => "qemu-kvm",
            Self::QemuTcg => "qemu-tcg",
        })
    }
}

/// Whether this host can run QEMU/KVM with nested VMX: /dev/kvm usable and an Intel CPU
/// with the vmx flag.
pub fn host_has_kvm_vmx() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let intel_vmx =
        cpuinfo.contains("GenuineIntel") && cpuinfo.split_whitespace().any(|w| w == "vmx");
    intel_vmx
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// The default emulator for this host.
pub fn default_emulator() -> Emulator {
    if host_has_kvm_vmx() {
        Emulator::QemuKvm
    } else {
        Emulator::Bochs
    }
}

/// Returns a free TCP port on loopback (bound then released: a small race, retried by
/// the callers' connection timeouts).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Returns a base port `p` such that UDP ports p..p+count are free now.
pub fn free_udp_range(count: u16) -> u16 {
    for _ in 0..200 {
        let base = 20000 + (std::process::id() as u16 % 97) * 64 + (rand_u16() % 256) * 128 % 30000;
        let ok = (0..count).all(|i| UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    40000
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(7)) as u16
}

/// Settings for one instance.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    /// Name used in logs ("a", "b").
    pub name: String,
    /// Emulator.
    pub emulator: Emulator,
    /// The GRUB ISO.
    pub iso: PathBuf,
    /// Guest RAM of the emulated machine in MiB.
    pub mem_mib: u32,
    /// Directory for generated configs and logs.
    pub work_dir: PathBuf,
    /// TCP port of the serial console.
    pub console_port: u16,
    /// Network: MAC address and the link (None = no NIC).
    pub net: Option<NetConfig>,
    /// Bochs instructions per emulated second (scales emulated time against wall time).
    pub bochs_ips: u64,
}

/// How an instance joins the virtual Ethernet.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The e1000's MAC.
    pub mac: [u8; 6],
    /// The instance's hub port P (hub base + 2*index): it receives frames on UDP P and
    /// sends them to P+1 (Bochs `ethdev=P`; QEMU `dgram` local P, remote P+1).
    pub hub_port: u16,
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Default Bochs speed: emulated time runs close to wall time on these machines and the
/// socket network carries a few MB/s (see EMULATORS.md).
pub const DEFAULT_BOCHS_IPS: u64 = 50_000_000;

impl InstanceConfig {
    /// The Bochs configuration file text.
    pub fn bochsrc(&self) -> String {
        let mut s = format!(
            "megs: {mem}\n\
             cpu: model=corei7_skylake_x, count=1, ips={ips}\n\
             clock: sync=none, time0=local\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             display_library: rfb, options=\"timeout=0\"\n\
             com1: enabled=1, mode=socket-server, dev=localhost:{port}\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n\
             speaker: enabled=0\n\
             sound: driver=dummy\n",
            mem = self.mem_mib,
            ips = self.bochs_ips,
            iso = self.iso.display(),
            port = self.console_port,
            log = self
                .work_dir
                .join(format!("bochs-{}.log", self.name))
                .display(),
        );
        if let Some(n) = &self.net {
            s.push_str("pci: enabled=1, chipset=i440fx, slot1=e1000\n");
            s.push_str(&format!(
                "e1000: enabled=1, mac={}, ethmod=socket, ethdev={}\n",
                mac_str(&n.mac),
                n.hub_port
            ));
        }
        s
    }

    /// The emulator command line (program and arguments).
    pub fn command_line(&self) -> Vec<String> {
        match self.emulator {
            Emulator::Bochs => vec![
                "bochs".into(),
                "-q".into(),
                "-f".into(),
                self.work_dir
                    .join(format!("bochsrc-{}", self.name))
                    .display()
                    .to_string(),
                "-rc".into(),
                self.work_dir
                    .join(format!("bochs-continue-{}.rc", self.name))
                    .display()
                    .to_string(),
            ],
            Emulator::QemuKvm | Emulator::QemuTcg => {
                let mut v: Vec<String> =
                    vec!["qemu-system-x86_64".into(), "-M".into(), "pc".into()];
                if self.emulator == Emulator::QemuKvm {
                    v.extend(["-enable-kvm".into(), "-cpu".into(), "host".into()]);
                } else {
                    v.extend(["-cpu".into(), "max".into()]);
                }
                v.extend([
                    "-m".into(),
                    self.mem_mib.to_string(),
                    "-cdrom".into(),
                    self.iso.display().to_string(),
                    "-boot".into(),
                    "d".into(),
                    "-display".into(),
                    "none".into(),
                    "-no-reboot".into(),
                    "-serial".into(),
                    format!("tcp:127.0.0.1:{},server=on,wait=on", self.console_port),
                    "-device".into(),
                    "isa-debug-exit,iobase=0x501,iosize=4".into(),
                ]);
                match &self.net {
                    Some(n) => {
                        v.extend([
                            "-netdev".into(),
                            format!(
                                "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={},\
                                 remote.type=inet,remote.host=127.0.0.1,remote.port={}",
                                n.hub_port,
                                n.hub_port + 1
                            ),
                            "-device".into(),
                            format!("e1000,netdev=n0,mac={}", mac_str(&n.mac)),
                        ]);
                    }
                    None => v.extend(["-nic".into(), "none".into()]),
                }
                v
            }
        }
    }
}

/// A running emulator with its console. Killed on drop.
pub struct Instance {
    /// The settings it was started with.
    pub config: InstanceConfig,
    child: Child,
    /// The serial console.
    pub console: Console,
}

impl Instance {
    /// Starts the emulator and connects to its console (Bochs and QEMU both wait for the
    /// console client before they run).
    pub fn start(config: InstanceConfig) -> Result<Self, String> {
        fs::create_dir_all(&config.work_dir).map_err(|e| e.to_string())?;
        if config.emulator == Emulator::Bochs {
            fs::write(
                config.work_dir.join(format!("bochsrc-{}", config.name)),
                config.bochsrc(),
            )
            .map_err(|e| e.to_string())?;
            fs::write(
                config
                    .work_dir
                    .join(format!("bochs-continue-{}.rc", config.name)),
                "c\n",
            )
            .map_err(|e| e.to_string())?;
        }
        let argv = config.command_line();
        let out = fs::File::create(
            config
                .work_dir
                .join(format!("emulator-{}.out", config.name)),
        )
        .map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        eprintln!("[{}] {}", config.name, argv.join(" "));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
        let console = Console::connect(&config.name, config.console_port, Duration::from_secs(60))?;
        Ok(Self {
            config,
            child,
            console,
        })
    }

    /// Waits for the first prompt after boot.
    pub fn wait_boot(&mut self, timeout: Duration) -> Result<String, String> {
        self.console.wait_for(crate::console::PROMPT, timeout)
    }

    /// Whether the emulator process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the emulator to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Kills the emulator now (a peer "vanishing").
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The serial log plus the tail of the emulator's own log, for failure reports.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "===== serial console of instance '{}' =====\n{}\n",
            self.config.name,
            self.console.log()
        );
        let log = self
            .config
            .work_dir
            .join(format!("bochs-{}.log", self.config.name));
        if let Ok(text) = fs::read_to_string(&log) {
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            s.push_str(&format!("===== tail of {} =====\n", log.display()));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::write(
            self.config
                .work_dir
                .join(format!("serial-{}.log", self.config.name)),
            self.console.log(),
        );
    }
}

/// Bochs' own `bxhub`, kept only to compare it with the lab's hub (`HV_HUB=bxhub`):
/// it forwards bursts as they come and has no counters or faults. Killed on drop.
struct Bxhub {
    child: Child,
}

impl Bxhub {
    /// Starts `bxhub` for `ports` members at UDP `base`.
    fn start(base: u16, ports: u16, work_dir: &Path) -> Result<Self, String> {
        let out = fs::File::create(work_dir.join("bxhub.out")).map_err(|e| e.to_string())?;
        let child = Command::new("bxhub")
            .arg(format!("-ports={ports}"))
            .arg(format!("-base={base}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start bxhub: {e}"))?;
        eprintln!(
            "lab: HV_HUB=bxhub: Bochs' bxhub instead of the lab's hub (no pacing, no faults)"
        );
        Ok(Self { child })
    }
}

impl Drop for Bxhub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a secret file readable only by its owner.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{text}").map_err(|e| format!("{}: {e}", path.display()))
}

/// A linked pair (or a single instance when `pair` is false).
pub struct Lab {
    /// The network hub joining the instances and the host endpoints (`None` for a single
    /// instance without a NIC). Tests inject faults through it: its port `i` is instance
    /// `i`, then the extra endpoint ports. Declared first so that it stops (and reads
    /// the members' socket drops for its report) before the emulators are killed.
    pub hub: Option<HubHandle>,
    /// The instances ("a", then "b").
    pub instances: Vec<Instance>,
    /// The hub's base UDP port: hub member `i` receives on `base + 2*i` and sends to the
    /// port after it (instances first, then the extra endpoint ports).
    pub hub_base: u16,
    /// The lab's migration key (64 hex digits), fresh for every lab, set on every
    /// instance at boot and kept in `<work_dir>/migration.key`.
    pub key: String,
    _bxhub: Option<Bxhub>,
}

/// A fresh random 256-bit migration key, as 64 hex digits.
pub fn new_key() -> Result<String, String> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| format!("no randomness for the migration key: {e}"))?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}

/// Gives `inst` the migration key at its console (`key set`; the hypervisor echoes
/// `*` for it, so the serial log does not hold it).
pub fn set_key(inst: &mut Instance, key: &str) -> Result<(), String> {
    let out = inst
        .console
        .command(&format!("key set {key}"), Duration::from_secs(120))?;
    if out.contains("key: set") {
        Ok(())
    } else {
        Err(format!("[{}] key set failed: {out}", inst.config.name))
    }
}

/// Settings for [`Lab::start`].
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Emulator for every instance (the first one's, with `emulator_b`).
    pub emulator: Emulator,
    /// A different emulator for the second instance of a pair: a cross-vendor pair
    /// (Bochs' Intel VMX and QEMU TCG's AMD SVM). `None`: both use `emulator`.
    pub emulator_b: Option<Emulator>,
    /// The image.
    pub iso: PathBuf,
    /// Working directory.
    pub work_dir: PathBuf,
    /// Two linked instances instead of one.
    pub pair: bool,
    /// RAM per instance in MiB.
    pub mem_mib: u32,
    /// Bochs speed.
    pub bochs_ips: u64,
    /// Give single instances a NIC too.
    pub net: bool,
    /// Extra hub ports for host endpoints ([`crate::bxnet`]), after the instances'.
    pub extra_hub_ports: u16,
    /// The hub's links, faults and partitions. Its report goes to `<work_dir>/hub.out`
    /// unless set; a missing seed is taken from `HV_HUB_SEED` if set, else drawn.
    pub hub: HubConfig,
}

impl LabConfig {
    /// Instance configurations (without starting anything): used by [`Lab::start`] and by
    /// the unit test of the generated command lines.
    pub fn instance_configs(&self, hub_base: u16) -> Vec<InstanceConfig> {
        let count = if self.pair { 2 } else { 1 };
        (0..count)
            .map(|i| InstanceConfig {
                name: ["a", "b"][i].to_string(),
                emulator: match (i, self.emulator_b) {
                    (1, Some(b)) => b,
                    _ => self.emulator,
                },
                iso: self.iso.clone(),
                mem_mib: self.mem_mib,
                work_dir: self.work_dir.clone(),
                console_port: free_tcp_port(),
                net: (self.pair || self.net).then(|| NetConfig {
                    mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + i as u8],
                    hub_port: hub_base + 2 * i as u16,
                }),
                bochs_ips: self.bochs_ips,
            })
            .collect()
    }
}

impl Lab {
    /// Starts the instances (and the hub) and waits until every console shows its prompt.
    pub fn start(cfg: &LabConfig, boot_timeout: Duration) -> Result<Self, String> {
        fs::create_dir_all(&cfg.work_dir).map_err(|e| e.to_string())?;
        let instances = if cfg.pair { 2 } else { 1 };
        let members = instances + cfg.extra_hub_ports;
        let hub_base = free_udp_range(2 * members);
        let networked = cfg.pair || cfg.net;
        let bxhub = std::env::var("HV_HUB").is_ok_and(|v| v == "bxhub");
        let (hub, bxhub) = if !networked {
            (None, None)
        } else if bxhub {
            (None, Some(Bxhub::start(hub_base, members, &cfg.work_dir)?))
        } else {
            (Some(start_hub(cfg, hub_base, instances, members)?), None)
        };
        let key = new_key()?;
        let key_file = cfg.work_dir.join("migration.key");
        write_private(&key_file, &key)?;
        let mut lab = Self {
            hub,
            instances: Vec::new(),
            hub_base,
            key,
            _bxhub: bxhub,
        };
        for ic in cfg.instance_configs(hub_base) {
            lab.instances.push(Instance::start(ic)?);
        }
        for i in 0..lab.instances.len() {
            let r = lab.instances[i]
                .wait_boot(boot_timeout)
                .and_then(|_| set_key(&mut lab.instances[i], &lab.key));
            if let Err(e) = r {
                return Err(format!("{e}\n{}", lab.diagnostics()));
            }
        }
        Ok(lab)
    }

    /// Powers instance `i` off and boots it again with the same settings (a fresh
    /// console port); returns once its prompt is back. Its uptime starts again from 0,
    /// which is how the clock tests get hosts with very different uptimes.
    pub fn restart(&mut self, i: usize, boot_timeout: Duration) -> Result<(), String> {
        let mut config = self.instances[i].config.clone();
        self.instances[i].kill();
        config.console_port = free_tcp_port();
        self.instances[i] = Instance::start(config)?;
        self.instances[i].wait_boot(boot_timeout)?;
        set_key(&mut self.instances[i], &self.key)
    }

    /// The hub, for fault injection; an error if the lab has none (no network, or
    /// `HV_HUB=bxhub`).
    pub fn hub(&self) -> Result<&HubHandle, String> {
        self.hub
            .as_ref()
            .ok_or_else(|| "this lab has no hub of its own (no network, or HV_HUB=bxhub)".into())
    }

    /// Diagnostics of every instance, and the hub's counters.
    pub fn diagnostics(&self) -> String {
        let mut s = self
            .instances
            .iter()
            .map(Instance::diagnostics)
            .collect::<Vec<_>>()
            .join("\n");
        if let Some(Ok(r)) = self.hub.as_ref().map(HubHandle::report) {
            s.push_str("===== hub =====\n");
            s.push_str(&r);
        }
        s
    }
}

/// The seed from `HV_HUB_SEED`, if set (decimal or 0x-hex).
fn env_seed() -> Result<Option<u64>, String> {
    let Ok(v) = std::env::var("HV_HUB_SEED") else {
        return Ok(None);
    };
    let t = v.trim();
    let parsed = match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed
        .map(Some)
        .map_err(|_| format!("HV_HUB_SEED={v:?} is not a number"))
}

/// Starts the lab's hub: instance `i` on port `base + 2*i`, then the endpoints.
fn start_hub(
    cfg: &LabConfig,
    base: u16,
    instances: u16,
    members: u16,
) -> Result<HubHandle, String> {
    let names = ["a", "b"];
    let members = (0..members)
        .map(|i| {
            let name = match names.get(i as usize) {
                Some(n) if i < instances => n.to_string(),
                _ => format!("endpoint{}", i - instances),
            };
            Member::socket_pair(&name, base + 2 * i)
        })
        .collect();
    let mut hc = cfg.hub.clone();
    // Bochs' socket module passes only frames for the NIC's own MAC: the guests behind
    // each Bochs hypervisor are reached through the hub's tunnel.
    for ic in cfg.instance_configs(base) {
        if ic.emulator == Emulator::Bochs {
            if let Some(n) = ic.net {
                let port = usize::from((n.hub_port - base) / 2);
                hc.tunnel.push((port, n.mac));
            }
        }
    }
    if hc.seed.is_none() {
        hc.seed = env_seed()?;
    }
    if hc.report.is_none() {
        hc.report = Some(cfg.work_dir.join("hub.out"));
    }
    Hub::start(members, hc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(emulator: Emulator) -> LabConfig {
        LabConfig {
            emulator,
            emulator_b: None,
            iso: "/x/hv.iso".into(),
            work_dir: "/tmp/w".into(),
            pair: true,
            mem_mib: 256,
            bochs_ips: 50_000_000,
            net: false,
            extra_hub_ports: 0,
            hub: HubConfig::default(),
        }
    }

    #[test]
    fn cross_vendor_pair_runs_bochs_and_qemu_tcg() {
        let mut c = cfg(Emulator::Bochs);
        c.emulator_b = Some(Emulator::QemuTcg);
        let ics = c.instance_configs(40000);
        assert_eq!(ics[0].emulator, Emulator::Bochs);
        assert_eq!(ics[1].emulator, Emulator::QemuTcg);
        assert!(ics[1].command_line().join(" ").contains("-cpu max"));
    }

    #[test]
    fn qemu_kvm_pair_command_lines() {
        let ics = cfg(Emulator::QemuKvm).instance_configs(40000);
        assert_eq!(ics.len(), 2);
        let a = ics[0].command_line().join(" ");
        let b = ics[1].command_line().join(" ");
        assert!(
            a.starts_with("qemu-system-x86_64 -M pc -enable-kvm -cpu host -m 256 -cdrom /x/hv.iso")
        );
        assert!(a.contains(
            "-netdev dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=40000,\
             remote.type=inet,remote.host=127.0.0.1,remote.port=40001"
        ));
        assert!(b.contains("local.port=40002,") && b.contains("remote.port=40003"));
        assert!(a.contains("e1000,netdev=n0,mac=52:54:00:12:34:56"));
        assert!(b.contains("e1000,netdev=n0,mac=52:54:00:12:34:57"));
        assert!(a.contains(&format!(
            "tcp:127.0.0.1:{},server=on,wait=on",
            ics[0].console_port
        )));
        assert!(a.contains("isa-debug-exit"));
    }

    #[test]
    fn qemu_tcg_has_no_kvm() {
        let mut c = cfg(Emulator::QemuTcg);
        c.pair = false;
        let a = c.instance_configs(0)[0].command_line().join(" ");
        assert!(!a.contains("kvm") && a.contains("-cpu max") && a.contains("-nic none"));
    }

    #[test]
    fn bochs_pair_config() {
        let ics = cfg(Emulator::Bochs).instance_configs(40000);
        let a = ics[0].bochsrc();
        let b = ics[1].bochsrc();
        assert!(a.contains("cpu: model=corei7_skylake_x"));
        assert!(a.contains("ethmod=socket, ethdev=40000"));
        assert!(b.contains("ethmod=socket, ethdev=40002"));
        assert!(a.contains(&format!(
            "mode=socket-server, dev=localhost:{}",
            ics[0].console_port
        )));
        assert_eq!(ics[0].command_line()[0], "bochs");
    }

    #[test]
    fn emulator_names_round_trip() {
        for e in [Emulator::Bochs, Emulator::QemuKvm, Emulator::QemuTcg] {
            assert_eq!(e.to_string().parse::<Emulator>(), Ok(e));
        }
        assert!("vbox".parse::<Emulator>().is_err());
    }
}
