//! `hvstore`, the lab's guest store: hypervisors checkpoint guests to it and restore
//! them from it over the virtual Ethernet, speaking the migration protocol
//! ([`hypervisor::migration::wire`]) inside the secure channel, on TCP port 7000 at its
//! own address (10.0.0.9 by default).
//!
//! * [`format`](mod@format): the checkpoint file (versioned, zero pages sparse, SHA-256 sealed).
//! * [`dir`]: the store directory: atomic, never-overwriting writes and the JSON index.
//! * [`session`]: one connection (checkpoint in, or restore out), pure over a
//!   [`Link`](hypervisor::migration::link::Link), tested on the host.
//! * [`net`]: the server loop on a [`BxEndpoint`](crate::bxnet::BxEndpoint), one
//!   connection after another, and the event lines it prints.

pub mod dir;
pub mod format;
pub mod net;
pub mod session;

#[cfg(test)]
mod tests;

pub use dir::{Entry, Store};
pub use session::{Event, Session};
