//! AMD nested page tables (APM Vol. 2 §15.25.5): ordinary long-mode page tables that
//! map guest-physical to host-physical addresses, in the vendor-neutral layout of
//! [`crate::vm::nested`]. Every nested walk is a user access (§15.25.5), so each entry
//! carries U/S; leaves use PAT entry 0 (write-back with the power-on PAT).
//!
//! ```text
//!  63  62    52 51            12 11  9  8  7   6  5  4   3   2  1  0
//!  [NX][ avail ][ host phys addr][avail][G][PS][D][A][PCD][PWT][U][W][P]
//! ```

use crate::vm::nested::Format;

/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User (required on every nested entry).
pub const US: u64 = 1 << 2;
/// Accessed flag, set by the CPU's nested walk.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty flag, set by the CPU on a write through the leaf.
pub const DIRTY: u64 = 1 << 6;

/// The NPT flavour of the nested tables.
pub const NPT: Format = Format {
    table: P | RW | US,
    leaf: P | RW | US,
    present: P,
    read: P,
    write: RW,
    accessed: ACCESSED,
    dirty: DIRTY,
};
