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
}
