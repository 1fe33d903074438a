//! The switch between the guests' PV NICs, the hypervisor's own stack and the e1000
//! (the uplink). The guests' MACs are registered (not learned: the hypervisor knows
//! them), everything else is behind the uplink.
//!
//! Queues towards guests and towards the hypervisor's stack are bounded (frames beyond
//! are dropped and counted: TCP retransmits), and a guest may only send with its own
//! source MAC (port security: a guest cannot take another's traffic at the lab's hub).
//! Pure logic: the kernel moves frames between it, the rings and the e1000.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Frames queued towards one guest (while it is frozen or has no buffer posted).
pub const GUEST_QUEUE: usize = 64;
/// Frames queued from guests towards the hypervisor's own stack.
pub const HOST_QUEUE: usize = 64;
/// Announcements sent for a guest that arrived (as QEMU's announce-self).
const ANNOUNCE_ROUNDS: u8 = 3;
/// Between two announcements.
const ANNOUNCE_GAP_US: u64 = 150_000;

/// Counters of one guest port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames the guest sent into the switch.
    pub from_guest: u64,
    /// Frames queued towards the guest.
    pub to_guest: u64,
    /// Frames dropped: queue full, or a forged source MAC.
    pub dropped: u64,
    /// Frames the guest sent with a source MAC not its own (dropped).
    pub spoofed: u64,
}

/// One guest's port.
#[derive(Debug)]
pub struct Port {
    /// The guest's id.
    pub id: u32,
    /// Its MAC.
    pub mac: [u8; 6],
    queue: VecDeque<Vec<u8>>,
    /// Counters.
    pub counters: PortCounters,
}

impl Port {
    /// Frames waiting for the guest.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// The switch.
#[derive(Debug, Default)]
pub struct Switch {
    /// Guest ports.
    pub ports: Vec<Port>,
    host_q: VecDeque<Vec<u8>>,
    /// Frames from the uplink switched to guests.
    pub uplink_to_guests: u64,
    /// Frames from guests sent out of the uplink.
    pub guests_to_uplink: u64,
    /// Frames from the uplink for no one here (unicast to an unknown MAC).
    pub unknown: u64,
    /// Frames towards the hypervisor's stack dropped (queue full).
    pub host_dropped: u64,
    announces: Vec<([u8; 6], u8, u64)>,
}

fn is_group(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 != 0)
}

fn push(q: &mut VecDeque<Vec<u8>>, limit: usize, frame: Vec<u8>) -> bool {
    if q.len() >= limit {
        return false;
    }
    q.push_back(frame);
    true
}

impl Switch {
    /// Whether frames must go through the switch (a guest port exists or frames wait
    /// for the hypervisor's stack); otherwise the stack uses the e1000 directly.
    pub fn active(&self) -> bool {
        !self.ports.is_empty() || !self.host_q.is_empty()
    }

    /// Makes the ports those of `guests` (id, MAC): new ones are added, ports of guests
    /// that are gone (or detached) are removed with their queues. Returns whether the
    /// first port appeared (the uplink must then take frames for other MACs).
    pub fn sync(&mut self, guests: &[(u32, [u8; 6])]) -> bool {
        let was_empty = self.ports.is_empty();
        self.ports
            .retain(|p| guests.iter().any(|(id, mac)| *id == p.id && *mac == p.mac));
        for (id, mac) in guests {
            if !self.ports.iter().any(|p| p.id == *id) {
                self.ports.push(Port {
                    id: *id,
                    mac: *mac,
                    queue: VecDeque::new(),
                    counters: PortCounters::default(),
                });
            }
        }
        was_empty && !self.ports.is_empty()
    }

    fn queue_for_guests(&mut self, frame: &[u8], except: Option<u32>) {
        let dst = &frame[..6];
        let group = is_group(dst);
        for p in self.ports.iter_mut() {
            if Some(p.id) == except || !(group || p.mac == dst) {
                continue;
            }
            if push(&mut p.queue, GUEST_QUEUE, frame.to_vec()) {
                p.counters.to_guest += 1;
            } else {
                p.counters.dropped += 1;
            }
        }
    }

    fn is_guest(&self, mac: &[u8]) -> bool {
        self.ports.iter().any(|p| p.mac == mac)
    }

    /// A frame from the uplink: queued for the guests it is for; returns the frame the
    /// hypervisor's own stack (MAC `hv`) must see too, if any (unwrapped, see
    /// [`unwrap_tunnel`]).
    pub fn from_uplink<'f>(&mut self, hv: [u8; 6], frame: &'f [u8]) -> Option<&'f [u8]> {
        let frame = unwrap_tunnel(hv, frame).unwrap_or(frame);
        self.route_uplink(hv, frame).then_some(frame)
    }

    fn route_uplink(&mut self, hv: [u8; 6], frame: &[u8]) -> bool {
        if frame.len() < 14 {
            return false;
        }
        let dst = &frame[..6];
        if is_group(dst) {
            self.queue_for_guests(frame, None);
            return true;
        }
        if dst == hv {
            return true;
        }
        if self.is_guest(dst) {
            self.uplink_to_guests += 1;
            self.queue_for_guests(frame, None);
        } else {
            self.unknown += 1;
        }
        false
    }

    /// A frame from guest `id`: delivered to the other guests and the hypervisor's stack
    /// it is for; returned if it must go out of the uplink.
    pub fn from_guest(&mut self, hv: [u8; 6], id: u32, frame: Vec<u8>) -> Option<Vec<u8>> {
        let p = self.ports.iter_mut().find(|p| p.id == id)?;
        if frame.len() < 14 || frame[6..12] != p.mac {
            p.counters.spoofed += 1;
            p.counters.dropped += 1;
            return None;
        }
        p.counters.from_guest += 1;
        let dst: [u8; 6] = frame[..6].try_into().ok()?;
        let group = is_group(&dst);
        if group || self.is_guest(&dst) {
            self.queue_for_guests(&frame, Some(id));
        }
        if (group || dst == hv) && !push(&mut self.host_q, HOST_QUEUE, frame.clone()) {
            self.host_dropped += 1;
        }
        if group || (dst != hv && !self.is_guest(&dst)) {
            self.guests_to_uplink += 1;
            return Some(frame);
        }
        None
    }

    /// A frame from the hypervisor's own stack: queued for the guests it is for;
    /// returns whether it must go out of the uplink.
    pub fn from_host(&mut self, frame: &[u8]) -> bool {
        if frame.len() < 14 {
            return false;
        }
        let dst = &frame[..6];
        let group = is_group(dst);
        if group || self.is_guest(dst) {
            self.queue_for_guests(frame, None);
        }
        group || !self.is_guest(dst)
    }

    /// The next frame for the hypervisor's stack.
    pub fn pop_host(&mut self) -> Option<Vec<u8>> {
        self.host_q.pop_front()
    }

    /// The next frame waiting for guest `id`.
    pub fn front_for(&self, id: u32) -> Option<&[u8]> {
        self.ports
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| p.queue.front())
            .map(|f| f.as_slice())
    }

    /// Removes the frame [`Switch::front_for`] returned.
    pub fn pop_for(&mut self, id: u32) {
        if let Some(p) = self.ports.iter_mut().find(|p| p.id == id) {
            p.queue.pop_front();
        }
    }

    /// Drops the frames waiting for guest `id` beyond what it can take while it
    /// cannot run (frozen): they are counted as dropped.
    pub fn count_drop(&mut self, id: u32) {
        if let Some(p) = self.ports.iter_mut().find(|p| p.id == id) {
            p.counters.dropped += 1;
        }
    }

    /// Schedules announcements of `mac` (a guest that just arrived): switches between
    /// here and its clients learn its new port.
    pub fn announce(&mut self, mac: [u8; 6], now_us: u64) {
        self.announces.retain(|a| a.0 != mac);
        if self.announces.len() < 64 {
            self.announces.push((mac, ANNOUNCE_ROUNDS, now_us));
        }
    }

    /// The announcement frames due at `now_us`.
    pub fn due_announces(&mut self, now_us: u64, mut send: impl FnMut(&[u8])) {
        for a in self.announces.iter_mut() {
            if a.1 > 0 && now_us >= a.2 {
                send(&rarp(a.0));
                a.1 -= 1;
                a.2 = now_us + ANNOUNCE_GAP_US;
            }
        }
        self.announces.retain(|a| a.1 > 0);
    }
}

/// EtherType of the lab hub's tunnel (IEEE local experimental 1): Bochs' socket network
/// module passes only frames for the NIC's own MAC, so the hub delivers frames for the
/// guests behind it wrapped in an outer header to that MAC (tools/src/hub/switch.rs).
pub const TUNNEL_ETHERTYPE: u16 = 0x88b5;

/// The frame inside a tunnel frame addressed to `hv`, if `frame` is one.
pub fn unwrap_tunnel(hv: [u8; 6], frame: &[u8]) -> Option<&[u8]> {
    (frame.len() >= 28 && frame[..6] == hv && frame[12..14] == TUNNEL_ETHERTYPE.to_be_bytes())
        .then(|| &frame[14..])
}

/// A RARP request broadcast from `mac` (as QEMU's announce-self): carries no IP
/// address, so it changes no ARP cache; switches learn where `mac` is now.
pub fn rarp(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // Hardware type 1 (Ethernet), protocol IPv4, lengths 6 and 4, op 3 (request reverse).
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]);
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const HV: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const G1: [u8; 6] = [2, 0x12, 0x34, 0x56, 0, 1];
    const G2: [u8; 6] = [2, 0x12, 0x34, 0x56, 0, 2];
    const FAR: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
    const BCAST: [u8; 6] = [0xff; 6];

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f
    }

    fn sw() -> Switch {
        let mut s = Switch::default();
        assert!(s.sync(&[(1, G1), (2, G2)]));
        s
    }

    #[test]
    fn uplink_frames_reach_their_guest_broadcasts_everyone() {
        let mut s = sw();
        assert!(s.from_uplink(HV, &frame(G1, FAR)).is_none());
        assert_eq!(s.front_for(1).map(|f| f[5]), Some(1));
        assert!(s.front_for(2).is_none());
        assert!(s.from_uplink(HV, &frame(BCAST, FAR)).is_some());
        assert_eq!(s.ports[1].queued(), 1);
        assert!(s.from_uplink(HV, &frame(HV, FAR)).is_some());
        assert!(s.from_uplink(HV, &frame(FAR, FAR)).is_none());
        assert_eq!(s.unknown, 1);
        s.pop_for(1);
        s.pop_for(1);
        assert!(s.front_for(1).is_none());
    }

    #[test]
    fn tunnel_frames_are_unwrapped() {
        let mut s = sw();
        let inner = frame(G2, FAR);
        let mut outer = HV.to_vec();
        outer.extend_from_slice(&FAR);
        outer.extend_from_slice(&TUNNEL_ETHERTYPE.to_be_bytes());
        outer.extend_from_slice(&inner);
        assert!(s.from_uplink(HV, &outer).is_none());
        assert_eq!(s.front_for(2), Some(&inner[..]));
        // Not for us: left alone (and for no one here).
        outer[..6].copy_from_slice(&FAR);
        assert!(s.from_uplink(HV, &outer).is_none());
        assert_eq!(s.unknown, 1);
    }

    #[test]
    fn guest_frames_go_where_their_destination_is() {
        let mut s = sw();
        // To the network.
        assert!(s.from_guest(HV, 1, frame(FAR, G1)).is_some());
        // To the other guest only.
        assert!(s.from_guest(HV, 1, frame(G2, G1)).is_none());
        assert_eq!(s.ports[1].queued(), 1);
        // To the hypervisor's stack only.
        assert!(s.from_guest(HV, 1, frame(HV, G1)).is_none());
        assert!(s.pop_host().is_some());
        // Broadcast: everyone but the sender, and the uplink.
        assert!(s.from_guest(HV, 2, frame(BCAST, G2)).is_some());
        assert_eq!((s.ports[0].queued(), s.ports[1].queued()), (1, 1));
        assert!(s.pop_host().is_some());
        // A forged source is dropped.
        assert!(s.from_guest(HV, 1, frame(FAR, G2)).is_none());
        assert_eq!(s.ports[0].counters.spoofed, 1);
        // An unknown port sends nothing.
        assert!(s.from_guest(HV, 9, frame(FAR, G1)).is_none());
    }

    #[test]
    fn queues_are_bounded_and_ports_follow_the_guests() {
        let mut s = sw();
        for _ in 0..GUEST_QUEUE + 10 {
            s.from_uplink(HV, &frame(G1, FAR));
        }
        assert_eq!(s.ports[0].queued(), GUEST_QUEUE);
        assert_eq!(s.ports[0].counters.dropped, 10);
        for _ in 0..HOST_QUEUE + 5 {
            s.from_guest(HV, 2, frame(HV, G2));
        }
        assert_eq!(s.host_dropped, 5);
        assert!(!s.sync(&[(2, G2)]));
        assert_eq!(s.ports.len(), 1);
        assert!(s.front_for(1).is_none());
        assert!(!s.sync(&[]));
        assert!(s.active(), "frames still wait for the stack");
    }

    #[test]
    fn announcements_repeat_then_stop() {
        let mut s = Switch::default();
        s.announce(G1, 0);
        let mut sent = Vec::new();
        for t in [
            0,
            10,
            ANNOUNCE_GAP_US,
            2 * ANNOUNCE_GAP_US,
            10 * ANNOUNCE_GAP_US,
        ] {
            s.due_announces(t, |f| sent.push(f.to_vec()));
        }
        assert_eq!(sent.len(), ANNOUNCE_ROUNDS as usize);
        assert_eq!(&sent[0][6..12], &G1);
        assert_eq!(&sent[0][12..14], &[0x80, 0x35]);
    }
}
