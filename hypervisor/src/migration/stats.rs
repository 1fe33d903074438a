//! Figures of one migration: per round and in total, from the hypervisor's TSC clock
//! (microseconds). Printed for people as a table and as one machine-readable line
//! (`MIGRATION-STATS key=value ...`) that xtask parses into JSON/CSV.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// One pre-copy round (or the final stop-and-copy, marked `last`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Round number (0 sends everything).
    pub round: u32,
    /// Page messages sent (data and zero).
    pub pages: u64,
    /// Zero pages sent as headers only.
    pub zero_pages: u64,
    /// Bytes put on the wire.
    pub bytes: u64,
    /// Duration.
    pub us: u64,
    /// Dirty pages found at the end of the round (what the next round must send).
    pub dirty_after: u64,
    /// Pages sent as deltas against their previous version (`cache=`).
    pub delta_pages: u64,
    /// Bytes those deltas saved against full pages.
    pub delta_saved: u64,
    /// Trace: where the round's time went, on the source's clock.
    pub trace: PhaseTrace,
}

/// Where a phase's time went on the source (`migrate ... trace` prints it). The
/// intervals between two polls are split by what the source was waiting for when the
/// earlier poll ended; `in_poll_us` is the time inside the polls themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTrace {
    /// Polls of the migration.
    pub polls: u32,
    /// Time inside them: encoding, hashing, encrypting, copying into the socket.
    pub in_poll_us: u64,
    /// Between polls with encoded bytes the socket did not take (the link is full).
    pub link_full_us: u64,
    /// Between polls with everything handed to the socket but not yet acknowledged
    /// while draining (waiting for ACKs).
    pub ack_wait_us: u64,
    /// Between polls with nothing to wait for (the loop ran guests and the NIC).
    pub idle_us: u64,
    /// The migrating guest's run time in the phase.
    pub guest_us: u64,
    /// The longest interval between two polls (how late the stream can be fed).
    pub max_gap_us: u64,
}

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The dirty set fits the downtime target at the measured bandwidth.
    FitsDowntime,
    /// Rounds stopped shrinking the dirty set.
    NotConverging,
    /// The round limit was reached.
    MaxRounds,
    /// Stop-and-copy baseline: no pre-copy at all.
    Baseline,
    /// Post-copy from the start: no pre-copy round.
    Postcopy,
    /// Hybrid: going on would put more than 1.15x the guest's memory on the wire
    /// before the hand-over; post-copy sends each remaining page once instead.
    WireBudget,
}

impl StopReason {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::FitsDowntime => "fits-downtime",
            Self::NotConverging => "not-converging",
            Self::MaxRounds => "max-rounds",
            Self::Baseline => "stop-and-copy",
            Self::Postcopy => "postcopy",
            Self::WireBudget => "wire-budget",
        }
    }
}

/// Everything reported for a migration.
#[derive(Clone, Debug, Default)]
pub struct MigrationStats {
    /// "source" (this side sent the guest) or "dest" (received it).
    pub role: &'static str,
    /// Guest id on this side.
    pub guest: u32,
    /// Guest image.
    pub image: String,
    /// Guest memory.
    pub mem_bytes: u64,
    /// Peer.
    pub peer: String,
    /// Dirty-tracking method name.
    pub method: &'static str,
    /// "precopy" or "stop".
    pub mode: &'static str,
    /// Pre-copy rounds (the stop-and-copy phase not counted).
    pub rounds: Vec<RoundStats>,
    /// The stop-and-copy phase.
    pub last: RoundStats,
    /// Why pre-copy ended.
    pub stop_reason: Option<StopReason>,
    /// Start to the guest running on the destination (Resumed received), or to COMMIT
    /// when the destination did not report.
    pub total_us: u64,
    /// The pause the guest saw: frozen on the source to running on the destination
    /// (the sum of the four parts below when `downtime_joined`; otherwise only the
    /// source's part, freeze to READY).
    pub downtime_us: u64,
    /// Freeze to the state handed to the link (source clock).
    pub dt_freeze_sent_us: u64,
    /// State handed to the link to READY received (source clock).
    pub dt_sent_ready_us: u64,
    /// READY received to COMMIT received (estimated: half the destination's READY to
    /// COMMIT round trip).
    pub dt_commit_wire_us: u64,
    /// COMMIT received to the guest's first instruction (destination clock).
    pub dt_resume_us: u64,
    /// Whether the destination reported its part (Resumed arrived).
    pub downtime_joined: bool,
    /// Bytes received (destination side).
    pub received_bytes: u64,
    /// Outcome: "ok" or the error.
    pub outcome: String,
    /// `verify=full` was asked for (source) or checked (destination).
    pub verify_full: bool,
    /// Post-copy: what was sent after the hand-over (pages pushed or asked for).
    pub post: RoundStats,
    /// Pages sent as zeros because the guest hinted them free (counted in the zero
    /// pages too).
    pub free_pages: u64,
    /// Auto-converge: the highest throttle applied (percent of the guest's time).
    pub throttle_pct: u8,
    /// Auto-converge: how long a throttle was in force.
    pub throttle_us: u64,
    /// Pre-copy's last round to the freeze: waiting (guest running) until the peer
    /// acknowledged everything sent.
    pub drain: PhaseTrace,
    /// Pages the guest dirtied during that drain (part of the final set).
    pub drain_dirty: u64,
    /// Pages dirty when the last pre-copy round ended (the rest of the final set).
    pub round_end_dirty: u64,
    /// Destination: from the last pre-copy round's end to End arriving (the final set
    /// and state as this side received them).
    pub dst_final_us: u64,
    /// Destination: installing the guest (vCPU state, nested tables) before READY.
    pub dst_install_us: u64,
    /// Post-copy figures (all zero when the guest moved by pre-copy only).
    pub postcopy: PostcopyStats,
}

/// What post-copy did: whether it ran, what the source sent and why, what the
/// destination's guest waited for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// The guest was handed over before all of its memory.
    pub used: bool,
    /// Pages the destination did not hold at the hand-over.
    pub missing_at_handover: u64,
    /// Requests for a page the guest waited for (source: received).
    pub requests: u64,
    /// Pages sent around a requested page before their turn (prepaging).
    pub prepaged: u64,
    /// The destination's figures (from PostDone on the source).
    pub remote: super::wire::PostFigures,
    /// Times the link was lost after the hand-over and post-copy resumed on a new one.
    pub recoveries: u64,
}

impl PhaseTrace {
    /// The phase's length: every interval and the polls.
    pub fn span_us(&self) -> u64 {
        self.in_poll_us + self.link_full_us + self.ack_wait_us + self.idle_us
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        alloc::format!(
            "{} polls (longest gap {} us), in polls {} ms, link full {} ms, waiting for ACKs {} ms, idle {} ms, guest ran {} ms",
            self.polls,
            self.max_gap_us,
            self.in_poll_us / 1000,
            self.link_full_us / 1000,
            self.ack_wait_us / 1000,
            self.idle_us / 1000,
            self.guest_us / 1000
        )
    }
}

impl MigrationStats {
    /// The traces of every phase on the source (rounds, drain, stop-and-copy).
    pub fn phases(&self) -> impl Iterator<Item = &PhaseTrace> {
        self.rounds
            .iter()
            .map(|r| &r.trace)
            .chain([&self.drain, &self.last.trace])
    }

    /// Bytes over all rounds.
    pub fn total_bytes(&self) -> u64 {
        self.rounds.iter().map(|r| r.bytes).sum::<u64>() + self.last.bytes + self.post.bytes
    }

    /// Zero pages elided over all rounds.
    pub fn zero_pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.zero_pages).sum::<u64>()
            + self.last.zero_pages
            + self.post.zero_pages
    }

    /// Pages sent over all rounds.
    pub fn total_pages(&self) -> u64 {
        self.rounds.iter().map(|r| r.pages).sum::<u64>() + self.last.pages + self.post.pages
    }

    /// Stream throughput in kB/s (bytes per ms).
    pub fn throughput_kbps(&self) -> u64 {
        self.total_bytes() * 1000 / self.total_us.max(1)
    }

    /// The machine-readable line.
    pub fn line(&self) -> String {
        let mut s = String::new();
        let per_round: Vec<String> = self
            .rounds
            .iter()
            .map(|r| alloc::format!("{}:{}:{}", r.pages, r.bytes, r.us))
            .collect();
        let _ = write!(
            s,
            "MIGRATION-STATS role={} guest={} image={} mem_bytes={} peer={} method={} mode={} outcome={} total_us={} downtime_us={} dt_freeze_sent_us={} dt_sent_ready_us={} dt_commit_wire_us={} dt_resume_us={} downtime_joined={} rounds={} bytes={} pages={} zero_pages={} final_dirty={} final_bytes={} stop={} throughput_kBps={} verify={} delta_pages={} delta_saved={} free_pages={} throttle_pct={} throttle_us={} drain_us={} drain_dirty={} round_end_dirty={} link_full_us={} in_poll_us={} max_gap_us={} dst_final_us={} dst_install_us={} postcopy={} post_missing={} post_pages={} post_bytes={} requests={} prepaged={} faults={} fault_median_us={} fault_max_us={} last_page_us={} recoveries={} per_round={}",
            self.role,
            self.guest,
            self.image,
            self.mem_bytes,
            self.peer,
            self.method,
            self.mode,
            // One token: the outcome is the only free text in the line.
            super::wire::printable(&self.outcome, 200).replace(' ', "_"),
            self.total_us,
            self.downtime_us,
            self.dt_freeze_sent_us,
            self.dt_sent_ready_us,
            self.dt_commit_wire_us,
            self.dt_resume_us,
            u8::from(self.downtime_joined),
            self.rounds.len(),
            self.total_bytes().max(self.received_bytes),
            self.total_pages(),
            self.zero_pages(),
            self.last.pages,
            self.last.bytes,
            self.stop_reason.map_or("none", StopReason::name),
            self.throughput_kbps(),
            if self.verify_full { "full" } else { "sent" },
            self.rounds.iter().chain([&self.last]).map(|r| r.delta_pages).sum::<u64>(),
            self.rounds.iter().chain([&self.last]).map(|r| r.delta_saved).sum::<u64>(),
            self.free_pages,
            self.throttle_pct,
            self.throttle_us,
            self.drain.span_us(),
            self.drain_dirty,
            self.round_end_dirty,
            self.phases().map(|t| t.link_full_us).sum::<u64>(),
            self.phases().map(|t| t.in_poll_us).sum::<u64>(),
            self.phases().map(|t| t.max_gap_us).max().unwrap_or(0),
            self.dst_final_us,
            self.dst_install_us,
            u8::from(self.postcopy.used),
            self.postcopy.missing_at_handover,
            self.post.pages,
            self.post.bytes,
            self.postcopy.requests,
            self.postcopy.prepaged,
            self.postcopy.remote.faults,
            self.postcopy.remote.fault_median_us,
            self.postcopy.remote.fault_max_us,
            self.postcopy.remote.last_page_us,
            self.postcopy.recoveries,
            if per_round.is_empty() { String::from("-") } else { per_round.join(",") },
        );
        s
    }
}

impl fmt::Display for MigrationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:>5} {:>8} {:>7} {:>11} {:>9} {:>8}",
            "ROUND", "PAGES", "ZERO", "BYTES", "MS", "DIRTY"
        )?;
        for r in self.rounds.iter().chain(core::iter::once(&self.last)) {
            let name = if core::ptr::eq(r, &self.last) {
                String::from("final")
            } else {
                alloc::format!("{}", r.round)
            };
            writeln!(
                f,
                "  {:>5} {:>8} {:>7} {:>11} {:>9} {:>8}",
                name,
                r.pages,
                r.zero_pages,
                r.bytes,
                r.us / 1000,
                r.dirty_after
            )?;
        }
        write!(
            f,
            "  total {} ms, downtime {} us (freeze->sent {} + sent->READY {} + COMMIT on the wire {} + COMMIT->resume {}{}), {} pre-copy rounds ({}), {} bytes, {} zero pages elided, final dirty set {} pages, {} kB/s, dirty tracking {}",
            self.total_us / 1000,
            self.downtime_us,
            self.dt_freeze_sent_us,
            self.dt_sent_ready_us,
            self.dt_commit_wire_us,
            self.dt_resume_us,
            if self.downtime_joined {
                ""
            } else {
                "; destination did not report"
            },
            self.rounds.len(),
            self.stop_reason.map_or("none", StopReason::name),
            self.total_bytes(),
            self.zero_pages(),
            self.last.pages,
            self.throughput_kbps(),
            self.method
        )?;
        if self.postcopy.used {
            let p = &self.postcopy;
            write!(
                f,
                "\n  post-copy: {} pages missing at the hand-over; {} pages ({} bytes) sent after it; {} remote faults, {} requests, {} pages prepaged; fault service median {} us, max {} us; last page {} ms after COMMIT; link recovered {} times",
                p.missing_at_handover,
                self.post.pages,
                self.post.bytes,
                p.remote.faults,
                p.requests,
                p.prepaged,
                p.remote.fault_median_us,
                p.remote.fault_max_us,
                p.remote.last_page_us / 1000,
                p.recoveries
            )?;
        }
        Ok(())
    }
}

/// Text kept in a fixed-size buffer (no heap), cut at `N` bytes on a character
/// boundary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FixedStr<const N: usize> {
    b: [u8; N],
    n: usize,
}

impl<const N: usize> FixedStr<N> {
    /// Copies (a prefix of) `s`.
    pub fn new(s: &str) -> Self {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        let mut b = [0; N];
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self { b, n }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.b[..self.n]).unwrap_or("")
    }
}

impl<const N: usize> fmt::Display for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for FixedStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What `migrations` keeps of a finished migration: figures only, in a fixed-size
/// record, so a history of any length costs the same heap as an empty one.
#[derive(Clone, Copy, Debug)]
pub struct HistoryEntry {
    /// "source" or "dest".
    pub role: &'static str,
    /// Guest id on this side.
    pub guest: u32,
    /// Guest image.
    pub image: FixedStr<32>,
    /// Guest memory.
    pub mem_bytes: u64,
    /// Peer.
    pub peer: FixedStr<24>,
    /// Dirty-tracking method.
    pub method: &'static str,
    /// Pre-copy rounds.
    pub rounds: usize,
    /// Total time.
    pub total_us: u64,
    /// Downtime.
    pub downtime_us: u64,
    /// Zero pages elided.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Stream throughput.
    pub throughput_kbps: u64,
    /// Outcome ("ok" or the error, cut).
    pub outcome: FixedStr<64>,
}

impl From<&MigrationStats> for HistoryEntry {
    fn from(s: &MigrationStats) -> Self {
        Self {
            role: s.role,
            guest: s.guest,
            image: FixedStr::new(&s.image),
            mem_bytes: s.mem_bytes,
            peer: FixedStr::new(&s.peer),
            method: s.method,
            rounds: s.rounds.len(),
            total_us: s.total_us,
            downtime_us: s.downtime_us,
            zero_pages: s.zero_pages(),
            bytes: s.total_bytes().max(s.received_bytes),
            throughput_kbps: s.throughput_kbps(),
            outcome: FixedStr::new(&super::wire::printable(&s.outcome, 64)),
        }
    }
}

/// The round policy: after a pre-copy round, stop and copy now, or run another round?
/// `bandwidth` is bytes per second measured so far; `dirty` the pages to send next.
pub fn decide(
    rounds: &[RoundStats],
    dirty: u64,
    bandwidth: u64,
    downtime_us: u64,
    max_rounds: u32,
) -> Option<StopReason> {
    let bytes = dirty * (4096 + 16);
    if bandwidth > 0 && bytes * 1_000_000 / bandwidth <= downtime_us {
        return Some(StopReason::FitsDowntime);
    }
    if rounds.len() as u32 >= max_rounds {
        return Some(StopReason::MaxRounds);
    }
    // Not converging: the dirty set did not shrink by 10% over the last two rounds.
    if rounds.len() >= 3 {
        let before = rounds[rounds.len() - 3].dirty_after;
        if dirty * 10 > before * 9 {
            return Some(StopReason::NotConverging);
        }
    }
    None
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn fixed_text_is_cut_on_a_character_boundary() {
        assert_eq!(FixedStr::<4>::new("ab€").as_str(), "ab");
        assert_eq!(FixedStr::<8>::new("counter").as_str(), "counter");
        assert_eq!(format!("{:<9}|", FixedStr::<8>::new("ab")), "ab       |");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(dirty_after: u64) -> RoundStats {
        RoundStats {
            dirty_after,
            ..Default::default()
        }
    }

    #[test]
    fn policy_decisions() {
        // 1 MB/s, 10 ms target: ~2 pages fit.
        assert_eq!(
            decide(&[r(1000)], 2, 1_000_000, 10_000, 30),
            Some(StopReason::FitsDowntime)
        );
        assert_eq!(decide(&[r(1000)], 500, 1_000_000, 10_000, 30), None);
        assert_eq!(
            decide(&[r(1000), r(500)], 400, 1_000_000, 10_000, 2),
            Some(StopReason::MaxRounds)
        );
        assert_eq!(
            decide(&[r(1000), r(990), r(985)], 980, 1_000_000, 10_000, 30),
            Some(StopReason::NotConverging)
        );
        assert_eq!(
            decide(&[r(1000), r(600), r(300)], 150, 1_000_000, 10_000, 30),
            None
        );
        assert_eq!(
            decide(&[r(10)], 0, 0, 10_000, 30),
            None,
            "no bandwidth measured yet"
        );
    }

    #[test]
    fn stats_line_is_parseable() {
        let mut s = MigrationStats {
            guest: 3,
            image: "verify".into(),
            method: "pml",
            mode: "precopy",
            ..Default::default()
        };
        s.rounds.push(RoundStats {
            round: 0,
            pages: 10,
            zero_pages: 4,
            bytes: 30_000,
            us: 1000,
            dirty_after: 2,
            ..Default::default()
        });
        s.last = RoundStats {
            pages: 2,
            bytes: 8200,
            ..Default::default()
        };
        s.total_us = 2000;
        s.downtime_us = 300;
        s.outcome = "ok".into();
        let line = s.line();
        assert!(line.starts_with("MIGRATION-STATS role= guest=3 image=verify"));
        assert!(line.contains(" bytes=38200 "));
        assert!(line.contains(" zero_pages=4 "));
        assert!(line.contains(" per_round=10:30000:1000"));
        for kv in line.split(' ').skip(1) {
            assert!(kv.contains('='), "{kv}");
        }
        assert!(s.to_string().contains("downtime 300 us"));
    }
}
