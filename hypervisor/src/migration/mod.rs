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
