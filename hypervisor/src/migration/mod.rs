//! Pre-copy live migration.
//!
//! * [`wire`] owns the stream format (versioned, self-describing, validated).
//! * [`source`] streams a running guest in rounds and hands it over.
//! * [`receiver`] validates an incoming stream and takes the guest over.
//! * [`stats`] holds the figures and the round policy.
//! * [`link`] is the byte-pipe abstraction both ends run over.
//! * [`secure`] authenticates the peers and encrypts the stream (pre-shared key).
//!
//! The protocol logic is pure and runs on the host in the tests below (an in-memory
//! link and a fake guest that keeps dirtying pages); `crate::kernel` binds it to
//! smoltcp TCP sockets and real guests.

pub mod delta;
pub mod kernel;
pub mod link;
pub mod receiver;
pub mod secure;
pub mod source;
pub mod stats;
pub mod wire;

#[cfg(test)]
mod tests;

/// TCP port every hypervisor receives migrations on.
pub const PORT: u16 = 7000;

/// A test hook (`hold <point> <ms>` on the console): the next migration stops at
/// `point` for a while and says so, so a fault test can cut the link in a phase that
/// otherwise lasts milliseconds (as QEMU's `pause-before-switchover`). Everything else
/// (timeouts, the hand-over rules) runs as usual, so the hold shows what a slow phase
/// does under a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Where to stop.
    pub point: HoldPoint,
    /// For how long, in milliseconds.
    pub ms: u32,
}

/// Where a [`Hold`] stops a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldPoint {
    /// Source: pre-copy is over and the link has drained; the guest still runs and is
    /// not frozen yet.
    Drain,
    /// Source: the guest is frozen; before the last dirty pages are sent.
    Freeze,
    /// Destination: the stream is complete and checked, the guest built; before READY.
    Ready,
    /// Source: READY has arrived (the guest is the destination's); before COMMIT.
    Commit,
    /// Destination: COMMIT has arrived; before the guest resumes and RESUMED is sent.
    Resume,
}

impl HoldPoint {
    /// Parses a console name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "drain" => Self::Drain,
            "freeze" => Self::Freeze,
            "ready" => Self::Ready,
            "commit" => Self::Commit,
            "resume" => Self::Resume,
            _ => return None,
        })
    }

    /// The console name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Freeze => "freeze",
            Self::Ready => "ready",
            Self::Commit => "commit",
            Self::Resume => "resume",
        }
    }

    /// Whether the source (else the destination) holds at this point.
    pub fn at_source(self) -> bool {
        matches!(self, Self::Drain | Self::Freeze | Self::Commit)
    }
}

/// Tracks one armed [`Hold`] through a migration.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Holder {
    hold: Option<Hold>,
    started_us: Option<u64>,
    done: bool,
}

impl Holder {
    pub(crate) fn new(hold: Option<Hold>) -> Self {
        Self {
            hold,
            ..Self::default()
        }
    }

    /// Whether the migration must still wait at `point` (starting the hold the first
    /// time it gets there; the console line is what a test waits for).
    pub(crate) fn holding(&mut self, point: HoldPoint, now_us: u64) -> bool {
        match self.hold {
            Some(h) if h.point == point && !self.done => {
                let start = *self.started_us.get_or_insert_with(|| {
                    log::info!("hold: {} for {} ms (test hook)", point.name(), h.ms);
                    now_us
                });
                if now_us.saturating_sub(start) < u64::from(h.ms) * 1000 {
                    return true;
                }
                log::info!("hold: {} over", point.name());
                self.done = true;
                false
            }
            _ => false,
        }
    }

    /// Whether a hold is under way now (its time is not the peer's: timeouts that
    /// measure the peer's silence start again after it).
    pub(crate) fn active(&self) -> bool {
        self.started_us.is_some() && !self.done
    }

    /// How long the hold at `point` lasted (0 if it did not happen).
    pub(crate) fn held_us(&self, point: HoldPoint) -> u64 {
        match (self.hold, self.done) {
            (Some(h), true) if h.point == point => u64::from(h.ms) * 1000,
            _ => 0,
        }
    }
}
