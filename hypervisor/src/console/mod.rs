//! The serial console: line editing ([`line`](mod@line)), argument parsing ([`args`](mod@args)) and the
//! command table ([`COMMANDS`]) from which `help` is generated. The commands themselves
//! run in [`crate::kernel`], which owns the state they act on.

pub mod args;
pub mod line;
pub mod out;

/// The prompt printed after every command.
pub const PROMPT: &str = "hv> ";

/// One console command: its name, usage and one-line description.
#[derive(Clone, Copy, Debug)]
pub struct Command {
    /// The word that invokes it.
    pub name: &'static str,
    /// Arguments, in usage notation.
    pub usage: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Every console command. `help` prints this table; the dispatcher matches on `name`.
pub const COMMANDS: &[Command] = &[
    Command { name: "help", usage: "", help: "list commands" },
    Command { name: "info", usage: "", help: "version, memory, CPUs, timer, VMX capabilities" },
    Command { name: "mem", usage: "", help: "physical memory and heap usage" },
    Command { name: "log", usage: "<error|warn|info|debug|trace>", help: "set the log level" },
    Command { name: "images", usage: "", help: "list loadable guest images" },
    Command {
        name: "start",
        usage: "<image> [mem=<MiB>] [key=value ...]",
        help: "start a guest (arguments are passed to it)",
    },
    Command { name: "vms", usage: "", help: "list guests" },
    Command { name: "pause", usage: "<id>", help: "pause a guest" },
    Command { name: "resume", usage: "<id>", help: "resume a paused guest" },
    Command { name: "kill", usage: "<id>", help: "stop a guest and free its memory" },
    Command { name: "stats", usage: "<id>", help: "exit counts by reason and reports of a guest" },
    Command { name: "check", usage: "<id>", help: "ask a guest to verify its memory now" },
    Command {
        name: "track",
        usage: "<id> [pml|ad|wp|stop]",
        help: "dirty-tracking probe: start a method, collect (no method), stop",
    },
    Command { name: "pci", usage: "", help: "list PCI devices" },
    Command { name: "net", usage: "", help: "MAC, IP, link and packet counters" },
    Command { name: "ip", usage: "<a.b.c.d/prefix>", help: "set the IPv4 address" },
    Command { name: "ping", usage: "<ip> [count]", help: "ICMP echo with round-trip times" },
    Command { name: "netbench", usage: "<ip> [MiB] [connections]", help: "TCP bulk transfer to a peer's sink" },
    Command {
        name: "migrate",
        usage: "<id> <ip>[:port] [downtime=<ms>] [max-rounds=<n>] [bandwidth=<MB/s>] [dirty=pml|ad|wp] [mode=precopy|stop|postcopy|hybrid] [prepage=<pages>] [converge=auto|off] [verify=full|sent] [cache=<MiB>] [timeout=<s>] [trace=on|off]",
        help: "live-migrate a guest to a peer",
    },
    Command {
        name: "checkpoint",
        usage: "<id> <store-ip>[:port] [downtime=<ms>] [max-rounds=<n>] [dirty=pml|ad|wp] [mode=precopy|stop] [cache=<MiB>] [timeout=<s>] [trace=on|off]",
        help: "copy a running guest to a store; it keeps running here",
    },
    Command {
        name: "restore",
        usage: "<store-ip>[:port] <checkpoint>",
        help: "start a guest from a checkpoint kept by a store",
    },
    Command {
        name: "allow-move",
        usage: "<id> on|off",
        help: "let a guest migrate or checkpoint itself (Move hypercall); off by default",
    },
    Command { name: "migrations", usage: "", help: "list past migrations with their figures" },
    Command {
        name: "key",
        usage: "[set <64 hex digits> | clear | bench [MiB]]",
        help: "show (fingerprint only), set or clear the migration key; time the cipher",
    },
    Command {
        name: "hold",
        usage: "[drain|freeze|ready|commit|resume <ms> | off]",
        help: "test hook: the next migration waits at a phase (for fault tests)",
    },
    Command { name: "shutdown", usage: "", help: "power off (ends the emulator)" },
];

/// Looks up a command by name.
pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, c) in COMMANDS.iter().enumerate() {
            assert!(
                COMMANDS[i + 1..].iter().all(|d| d.name != c.name),
                "{}",
                c.name
            );
            assert_eq!(find(c.name).unwrap().name, c.name);
        }
        assert!(find("bogus").is_none());
    }
}
