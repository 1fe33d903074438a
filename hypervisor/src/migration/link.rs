//! The byte pipe a migration runs over: a TCP connection in the kernel, an in-memory
//! pipe in the host tests.

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Still connecting.
    Connecting,
    /// Established: bytes flow both ways.
    Open,
    /// Closed or reset by the peer (or never established).
    Closed,
}

/// A reliable, ordered byte stream.
pub trait Link {
    /// Connection state.
    fn state(&mut self) -> LinkState;
    /// Queues up to `data.len()` bytes; returns how many were taken (0 when full).
    fn send(&mut self, data: &[u8]) -> usize;
    /// Bytes queued but not yet acknowledged by the peer (0: all delivered).
    fn queued(&mut self) -> usize;
    /// Reads available bytes into `buf`; 0 when nothing is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> usize;
    /// Closes gracefully after queued data.
    fn close(&mut self);
    /// Puts what was queued on the wire now (polls the network), so a sender can
    /// interleave its own work (sealing) with transmission. By default nothing: the
    /// caller's loop polls the network between calls.
    fn push(&mut self) {}
}

/// Sends a last message (REJECT, ABORT) and closes the link once all of it is queued.
/// What the link cannot take now (its buffer is full of pages) is returned: the caller
/// keeps the connection open and delivers the rest before it closes, so the peer always
/// learns why, instead of seeing a bare end of stream.
pub fn say_last(link: &mut dyn Link, msg: &[u8]) -> alloc::vec::Vec<u8> {
    let n = if link.state() == LinkState::Open {
        link.send(msg)
    } else {
        msg.len() // nobody to tell
    };
    let rest = msg[n.min(msg.len())..].to_vec();
    if rest.is_empty() {
        link.close();
    }
    rest
}
