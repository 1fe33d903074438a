//! A guest's monotonic clock: the host clock plus a signed offset, never lower than any
//! value the guest has already read.
//!
//! The guest's time is not tied to the host's uptime. On the destination of a migration
//! the host may have been up for less (or more) time than the guest has existed, or run
//! its TSC at another rate; the offset is signed and never clamped, so the guest's clock
//! continues from where it was. The floor (the highest value handed out) makes the
//! clock monotonic even if an estimate of the pause errs low.
//!
//! What the clock does during a migration's pause: it keeps running, as a real clock
//! would. The destination sets it to the guest's time at the freeze plus the pause as
//! measured through the hand-over (freeze to READY on the source's clock, READY to
//! COMMIT on the wire, estimated as half the READY/COMMIT round trip), so the guest sees
//! a jump equal to the downtime, never a step back.

/// The clock's state: all in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestClock {
    /// Guest time minus host time (i128: any two u64 times differ by less).
    offset_ns: i128,
    /// The highest value the guest may already have seen.
    floor_ns: u64,
}

impl GuestClock {
    /// A clock that reads 0 at host time `host_ns`.
    pub fn starting_at(host_ns: u64) -> Self {
        let mut c = Self::default();
        c.continue_from(0, host_ns);
        c
    }

    fn raw(&self, host_ns: u64) -> u64 {
        let v = i128::from(host_ns) + self.offset_ns;
        v.clamp(0, i128::from(u64::MAX)) as u64
    }

    /// The guest's time at host time `host_ns`, without recording it as seen.
    pub fn peek(&self, host_ns: u64) -> u64 {
        self.raw(host_ns).max(self.floor_ns)
    }

    /// The guest reads its clock: the value becomes the new floor.
    pub fn read(&mut self, host_ns: u64) -> u64 {
        let v = self.peek(host_ns);
        self.floor_ns = v;
        v
    }

    /// From host time `host_ns` on, the clock continues from `guest_ns` (never below
    /// what the guest has already seen).
    pub fn continue_from(&mut self, guest_ns: u64, host_ns: u64) {
        self.offset_ns = i128::from(guest_ns) - i128::from(host_ns);
        self.floor_ns = self.floor_ns.max(guest_ns);
    }

    /// The signed offset (for `stats`).
    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_on_a_host_with_less_uptime() {
        // The guest has run 71.5 s; the destination has been up 2 s.
        let mut c = GuestClock::starting_at(5_000_000_000);
        let before = c.read(76_518_936_739);
        assert_eq!(before, 71_518_936_739);
        let mut d = GuestClock::default();
        d.continue_from(before, 2_000_000_000);
        assert!(d.offset_ns() > 0);
        assert_eq!(d.read(2_000_000_000), before);
        assert_eq!(d.read(2_100_000_000), before + 100_000_000);
    }

    #[test]
    fn continues_on_a_host_with_more_uptime() {
        let mut c = GuestClock::default();
        c.continue_from(1_000, u64::MAX - 10);
        assert!(c.offset_ns() < 0);
        assert_eq!(c.read(u64::MAX - 10), 1_000);
        assert_eq!(c.read(u64::MAX), 1_010);
    }

    #[test]
    fn never_goes_back_even_if_set_lower() {
        let mut c = GuestClock::starting_at(0);
        assert_eq!(c.read(500), 500);
        // An estimate that errs low cannot move the clock back.
        c.continue_from(100, 600);
        assert_eq!(c.read(600), 500);
        assert_eq!(c.read(700), 500);
        assert_eq!(c.read(1_000), 500);
        assert_eq!(c.read(1_001), 501);
    }

    #[test]
    fn extremes_saturate_instead_of_wrapping() {
        let mut c = GuestClock::default();
        c.continue_from(u64::MAX, 0);
        assert_eq!(c.read(u64::MAX), u64::MAX);
        let mut d = GuestClock::default();
        d.continue_from(0, u64::MAX);
        assert_eq!(d.read(0), 0);
        assert_eq!(d.read(u64::MAX), 0);
    }

    #[test]
    fn many_moves_between_hosts_are_monotonic() {
        // Ping-pong between two hosts whose clocks differ by an hour either way, with
        // pauses estimated too low or too high: every read is >= the previous one.
        let mut hosts = [3_600_000_000_000u64, 1_000_000];
        let mut c = GuestClock::starting_at(hosts[0]);
        let mut last = 0;
        let mut x = 12345u64;
        for i in 0..1000 {
            let h = i % 2;
            for _ in 0..5 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                hosts[h] += x >> 40;
                let v = c.read(hosts[h]);
                assert!(v >= last);
                last = v;
            }
            let frozen = c.read(hosts[h]);
            let other = 1 - h;
            hosts[other] += 50_000;
            let estimate = x >> 50; // anything, even 0
            let mut d = GuestClock::default();
            d.continue_from(frozen, hosts[other]);
            d.continue_from(frozen + estimate, hosts[other]);
            c = d;
        }
    }
}
