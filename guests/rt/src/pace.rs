//! Rate pacing on absolute time: "do `rate` units per second" in small batches.
//!
//! The allowance is computed from the start time, not accumulated per wake-up, so
//! oversleeping or slow batches do not lower the long-run rate. A backlog of more than
//! 100 ms worth (the guest was paused, time-sliced away or migrated) is forgiven rather
//! than worked off in one burst. Pure logic: tested on the host.

/// Shortest sleep between batches, ns: at high rates a batch covers this much time.
pub const TICK_NS: u64 = 10_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Paces units of work (pages) at a fixed rate.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    rate: u64,
    origin: u64,
    done: u64,
    unpaced_batch: u64,
}

impl Pacer {
    /// A pacer for `rate` units per second from time `now` (ns). `rate == 0` means as
    /// fast as possible: every [`take`](Self::take) grants `unpaced_batch` units and
    /// [`next_wake`](Self::next_wake) never sleeps.
    pub fn new(rate: u64, now: u64, unpaced_batch: u64) -> Self {
        Self {
            rate,
            origin: now,
            done: 0,
            unpaced_batch: unpaced_batch.max(1),
        }
    }

    /// Whether the pacer never sleeps (`rate == 0`).
    pub fn unpaced(&self) -> bool {
        self.rate == 0
    }

    /// Units to do now; the caller does exactly that many.
    pub fn take(&mut self, now: u64) -> u64 {
        if self.rate == 0 {
            return self.unpaced_batch;
        }
        let elapsed = now.saturating_sub(self.origin) as u128;
        let allowed = (elapsed * self.rate as u128 / NS_PER_S).min(u64::MAX as u128) as u64;
        let owed = allowed.saturating_sub(self.done);
        let cap = (self.rate / 10).max(1);
        let n = if owed > cap {
            // Far behind: forget all but 100 ms worth.
            self.done = allowed - cap;
            cap
        } else {
            owed
        };
        self.done += n;
        n
    }

    /// When to call [`take`](Self::take) next: when the next unit falls due, but at least
    /// [`TICK_NS`] after `now`. `None` when unpaced (do not sleep).
    pub fn next_wake(&self, now: u64) -> Option<u64> {
        if self.rate == 0 {
            return None;
        }
        let next = (self.done as u128 + 1) * NS_PER_S;
        let due = self.origin as u128 + next.div_ceil(self.rate as u128);
        let due = due.min(u64::MAX as u128) as u64;
        Some(due.max(now.saturating_add(TICK_NS)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pacer the way the guests do (take, then sleep until next_wake, plus
    /// `lag` ns of oversleep) until `until`; returns the units done.
    fn simulate(rate: u64, until: u64, lag: u64) -> u64 {
        let mut p = Pacer::new(rate, 1_000, 64);
        let mut now = 1_000;
        let mut total = 0;
        while now < until + 1_000 {
            total += p.take(now);
            now = p.next_wake(now).unwrap() + lag;
        }
        total
    }

    #[test]
    fn holds_the_rate() {
        for rate in [1, 7, 100, 1000, 2000, 123_456] {
            let total = simulate(rate, 10_000_000_000, 0);
            let want = rate * 10;
            assert!(total.abs_diff(want) <= rate / 100 + 1, "{rate}: {total}");
            // Oversleeping by 3 ms per wake-up does not lower the rate.
            let total = simulate(rate, 10_000_000_000, 3_000_000);
            assert!(
                total.abs_diff(want) <= rate / 50 + 2,
                "{rate} lagging: {total}"
            );
        }
    }

    #[test]
    fn batches_are_small_and_sleeps_short() {
        let mut p = Pacer::new(1000, 0, 1);
        assert_eq!(p.take(0), 0);
        assert_eq!(p.next_wake(0), Some(TICK_NS));
        assert_eq!(p.take(TICK_NS), 10);
        let mut p = Pacer::new(1, 0, 1);
        assert_eq!(p.take(0), 0);
        assert_eq!(p.next_wake(0), Some(1_000_000_000));
        assert_eq!(p.take(1_000_000_000), 1);
        assert_eq!(p.next_wake(1_000_000_000), Some(2_000_000_000));
    }

    #[test]
    fn a_long_pause_is_forgiven() {
        let mut p = Pacer::new(1000, 0, 1);
        assert_eq!(p.take(5_000_000_000), 100);
        assert_eq!(p.take(5_010_000_000), 10);
    }

    #[test]
    fn unpaced_never_sleeps() {
        let mut p = Pacer::new(0, 0, 256);
        assert!(p.unpaced());
        assert_eq!(p.take(0), 256);
        assert_eq!(p.take(0), 256);
        assert_eq!(p.next_wake(0), None);
    }
}
