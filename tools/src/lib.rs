//! Host-side support shared by `xtask` and the end-to-end tests: launching the
//! hypervisor in an emulator ([`emu`]) and driving its serial console ([`console`]).
//!
//! Everything binds to loopback only, draws its ports so that concurrent runs do not
//! collide, kills emulators on drop and bounds every wait with a timeout.

pub mod bxnet;
pub mod console;
pub mod echo;
pub mod emu;
pub mod hub;
pub mod session;
pub mod stats;
pub mod store;
pub mod streams;
