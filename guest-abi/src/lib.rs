//! The hypercall ABI between the hypervisor and its paravirtualized (PV) guests.
//!
//! Both sides compile this crate: the hypervisor decodes calls with it, guests issue them
//! with [`hypercall`]. Nothing here is hypervisor-specific.
//!
//! # Guest environment at entry
//!
//! A guest is a static ELF64 image linked at or above [`GUEST_IMAGE_BASE`]. The hypervisor
//! loads its `PT_LOAD` segments at their physical addresses in guest-physical memory and
//! starts it in 64-bit long mode:
//!
//! * paging on, guest-virtual = guest-physical for all of its memory (2 MiB pages built by
//!   the hypervisor in the first megabyte, which the guest must not use);
//! * `RIP` = ELF entry, `RSP` = top of guest memory (16-byte aligned), `RDI` = guest-physical
//!   address of the [`BootInfo`] page ([`BOOT_INFO_ADDR`]);
//! * interrupts off, no IDT: any exception stops the guest (the hypervisor reports it);
//! * no FP/SIMD: CR0.EM is set and CR4.OSFXSR/OSXSAVE are clear and owned by the
//!   hypervisor, so x87 instructions fault (#NM), SSE/AVX fault (#UD), and an attempt to
//!   enable them stops the guest. Guests are built soft-float (`x86_64-unknown-none`).
//!   No FP/SIMD state therefore exists to leak between guests or to migrate;
//! * caching is the hypervisor's: changing CR0.CD/NW (or PE, PG, NE, ET) stops the guest.
//!   `MONITOR` and `WBINVD` are no-ops, `MWAIT` yields; `INVD`, `RDPMC`, `GETSEC`, VMX
//!   and descriptor-table instructions, I/O ports and MSRs stop the guest.
//!
//! # Calling convention
//!
//! ```text
//!   VMCALL   in:  RAX = call number (Hypercall), RDI, RSI, RDX, R10 = arguments
//!            out: RAX = result (>= 0) or a negated ErrorCode (< 0)
//!            all other registers are preserved
//! ```
//!
//! Pointers are guest-physical (= guest-virtual) addresses; the hypervisor checks that a
//! buffer lies wholly inside guest memory and fails the call with [`ErrorCode::BadAddress`]
//! otherwise. Unknown numbers fail with [`ErrorCode::UnknownCall`]; the guest keeps running.
#![no_std]

/// Version of this ABI; [`BootInfo::abi_version`] carries it, and a guest built against
/// another major version should refuse to run.
/// (v2: [`GuestInfo::restores`], [`Hypercall::FreePages`], [`Hypercall::Move`];
/// v3: the PV NIC, [`Hypercall::NetAttach`], [`Hypercall::NetNotify`],
/// [`Hypercall::NetWait`], [`NetRing`].)
pub const ABI_VERSION: u32 = 3;

/// Guest-physical address of the [`BootInfo`] page.
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// Lowest guest-physical address a guest image may be linked at. Below it the hypervisor
/// keeps the boot info and the guest's page tables.
pub const GUEST_IMAGE_BASE: u64 = 0x10_0000;
/// Largest [`Hypercall::ConsoleWrite`] length accepted in one call.
pub const MAX_CONSOLE_WRITE: u64 = 4096;
/// Size of [`BootInfo::args`].
pub const MAX_ARGS: usize = 256;
/// Magic at the start of [`BootInfo`] ("PVBOOT01").
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVBOOT01");

/// Hypercall numbers (RAX). 0 is reserved as invalid so that a zeroed register never
/// means anything.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hypercall {
    /// Write `len` (RSI) bytes at `ptr` (RDI) to the console. Returns the bytes written.
    ConsoleWrite = 1,
    /// Monotonic time in nanoseconds since the guest was first started. It never goes
    /// back (never below a value already returned) and keeps counting across migrations,
    /// including through the pause (the destination continues from the source's value
    /// plus the measured downtime), whatever the hosts' uptimes.
    Time = 2,
    /// Give up the rest of this time slice. Returns 0.
    Yield = 3,
    /// Sleep until the monotonic time (RDI, nanoseconds) is reached. Returns 0.
    HaltUntil = 4,
    /// End the guest with exit code RDI. Does not return.
    Exit = 5,
    /// Fill the [`GuestInfo`] at RDI. Returns 0.
    Info = 6,
    /// Report a result to the hypervisor: kind RDI ([`ReportKind`]), value RSI, detail RDX.
    /// The hypervisor shows the latest report per kind (`vms`, `stats`). Returns 0.
    Report = 7,
    /// Fetch and clear the request the operator posted for this guest ([`Request`]).
    /// Returns the request number (0 = none).
    TakeRequest = 8,
    /// Free-page hint: the RSI pages from RDI (page aligned, inside guest memory) hold
    /// nothing the guest needs (RDX = 1), or are in use again (RDX = 0). A migration
    /// sends a page hinted free as a zero page, unless the guest wrote it after the
    /// hint (the hypervisor sees the write in EPT, so a stale hint loses nothing); so
    /// after a migration a hinted page that was not written since reads as zeros.
    /// Hints are not carried across a migration. Returns the pages hinted, 0 when the
    /// hypervisor cannot see writes (no EPT dirty flags) and ignores hints.
    FreePages = 9,
    /// Guest-initiated migration: move this guest to the hypervisor at IPv4 address RDI
    /// (a.b.c.d as `a << 24 | b << 16 | c << 8 | d`), TCP port RSI (0 = 7000); RDX = 0
    /// to migrate there, 1 to checkpoint there (a store keeps a copy; the guest stays).
    /// Only if the operator allowed it for this guest (`allow-move <id> on`; off by
    /// default): otherwise fails at once with [`ErrorCode::Refused`]. The guest then
    /// waits (it does not run) until the move ends, and learns the outcome when it runs
    /// again: 0 on the destination after a migration (or on the source after a
    /// checkpoint), [`ErrorCode::MoveFailed`] back on the source if it failed (the
    /// console says why).
    Move = 10,
    /// Attach the guest's PV NIC: RDI = guest-physical address of a [`NetRing`] (page
    /// aligned; the page must lie inside guest memory), or 0 to detach. Returns the
    /// NIC's MAC address (byte `i` in bits `8i..8i+8`), chosen by the hypervisor at
    /// `start` and kept across migrations. The ring is the guest's memory: it moves with
    /// it, and the guest finds its indices where it left them on the destination.
    NetAttach = 11,
    /// Send the frames queued in the transmit ring and fill posted receive buffers
    /// with frames that arrived. Returns the frames sent. Fails with
    /// [`ErrorCode::BadArgument`] when no ring is attached or the ring's indices are
    /// inconsistent (more than [`NET_SLOTS`] outstanding); a bad descriptor only
    /// completes with [`NET_DESC_ERROR`].
    NetNotify = 12,
    /// Sleep until a frame has been written to the receive ring or the monotonic
    /// time (RDI, nanoseconds) is reached; returns at once if a frame was written
    /// since the last `NetWait` returned. Also sends what the transmit
    /// ring holds, as `NetNotify` does. Returns 0.
    NetWait = 13,
}

/// Descriptors per direction in a [`NetRing`].
pub const NET_SLOTS: u32 = 32;
/// Largest Ethernet frame (without FCS) the PV NIC carries: 14-byte header plus a
/// 1500-byte MTU. Receive buffers should hold this much.
pub const NET_FRAME_MAX: u32 = 1514;
/// [`NetDesc::flags`]: the hypervisor is done with this descriptor.
pub const NET_DESC_DONE: u32 = 1;
/// [`NetDesc::flags`]: and it was bad (buffer outside guest memory, length out of
/// range, or a receive buffer too small for the frame): nothing was sent or written.
pub const NET_DESC_ERROR: u32 = 2;

/// One buffer of the PV NIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDesc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Transmit: the frame's length (14..=[`NET_FRAME_MAX`]). Receive: the guest
    /// writes the buffer's capacity, the hypervisor the received frame's length.
    pub len: u32,
    /// The guest writes 0 when it posts the descriptor; the hypervisor writes
    /// [`NET_DESC_DONE`] (and [`NET_DESC_ERROR`]) when it completes it.
    pub flags: u32,
}

/// The PV NIC's rings: one page of guest memory shared with the hypervisor
/// ([`Hypercall::NetAttach`]), virtio-like with free-running `u32` indices (slot =
/// index % [`NET_SLOTS`]), no interrupts: the guest polls, or sleeps in
/// [`Hypercall::NetWait`].
///
/// * Transmit: the guest fills `tx[tx_avail % NET_SLOTS]`, then increments `tx_avail`
///   (after a compiler fence) and calls `NetNotify`. The hypervisor sends each
///   descriptor from `tx_used` to `tx_avail` and increments `tx_used` past it; the
///   buffer is the guest's again once `tx_used` has passed it.
/// * Receive: the guest posts an empty buffer in `rx[rx_avail % NET_SLOTS]` and
///   increments `rx_avail`. The hypervisor writes an arriving frame into the buffer at
///   `rx_used`, sets its `len` and `flags`, then increments `rx_used`. Frames that find
///   no posted buffer are dropped (and counted by the hypervisor): TCP retransmits.
///
/// The hypervisor writes only `tx_used`, `rx_used`, the `flags` (and receive `len`)
/// of descriptors it completes, and receive buffers; it reads each descriptor once
/// and checks it against guest memory, so a guest that changes the ring meanwhile can
/// only spoil its own frames.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetRing {
    /// Transmit descriptors made available by the guest (free-running).
    pub tx_avail: u32,
    /// Transmit descriptors completed by the hypervisor (free-running).
    pub tx_used: u32,
    /// Receive buffers posted by the guest (free-running).
    pub rx_avail: u32,
    /// Receive buffers filled by the hypervisor (free-running).
    pub rx_used: u32,
    /// Reserved, zero.
    pub _reserved: [u32; 12],
    /// Transmit descriptors.
    pub tx: [NetDesc; NET_SLOTS as usize],
    /// Receive descriptors.
    pub rx: [NetDesc; NET_SLOTS as usize],
}

/// Byte offsets in a [`NetRing`] (the hypervisor reads the page as bytes).
pub mod net_ring {
    /// `tx_avail`.
    pub const TX_AVAIL: usize = 0;
    /// `tx_used`.
    pub const TX_USED: usize = 4;
    /// `rx_avail`.
    pub const RX_AVAIL: usize = 8;
    /// `rx_used`.
    pub const RX_USED: usize = 12;
    /// First transmit descriptor.
    pub const TX: usize = 64;
    /// First receive descriptor.
    pub const RX: usize = 64 + 16 * super::NET_SLOTS as usize;
    /// Bytes per descriptor.
    pub const DESC: usize = 16;
}

impl Hypercall {
    /// Decodes a call number, `None` for an unknown one.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::ConsoleWrite,
            2 => Self::Time,
            3 => Self::Yield,
            4 => Self::HaltUntil,
            5 => Self::Exit,
            6 => Self::Info,
            7 => Self::Report,
            8 => Self::TakeRequest,
            9 => Self::FreePages,
            10 => Self::Move,
            11 => Self::NetAttach,
            12 => Self::NetNotify,
            13 => Self::NetWait,
            _ => return None,
        })
    }
}

/// Errors returned (negated) in RAX.
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The call number is not known.
    UnknownCall = 1,
    /// A pointer or buffer is not wholly inside guest memory.
    BadAddress = 2,
    /// A length or argument is out of range.
    BadArgument = 3,
    /// The hypervisor's policy refuses the call (e.g. `Move` not allowed, or busy).
    Refused = 4,
    /// A requested move (migration or checkpoint) did not happen; the guest runs on.
    MoveFailed = 5,
}

impl ErrorCode {
    /// The RAX value for this error.
    pub const fn to_raw(self) -> u64 {
        (-(self as i64)) as u64
    }

    /// Decodes a RAX value: `Ok(value)` or the error.
    pub fn decode(rax: u64) -> Result<u64, Self> {
        match rax as i64 {
            v if v >= 0 => Ok(rax),
            -1 => Err(Self::UnknownCall),
            -2 => Err(Self::BadAddress),
            -4 => Err(Self::Refused),
            -5 => Err(Self::MoveFailed),
            _ => Err(Self::BadArgument),
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::UnknownCall => "unknown hypercall",
            Self::BadAddress => "buffer outside guest memory",
            Self::BadArgument => "argument out of range",
            Self::Refused => "refused by the hypervisor's policy",
            Self::MoveFailed => "the move did not happen",
        })
    }
}

/// What a [`Hypercall::Report`] reports.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReportKind {
    /// Result of a memory self-check: value 1 = pass, 0 = fail; detail = pages checked.
    Verify = 1,
    /// Pages written so far by a dirtying guest: value = total page writes, detail = the
    /// number of distinct pages in its working set.
    Dirtied = 2,
    /// A free-form progress counter (e.g. the counter guest's sequence number).
    Progress = 3,
}

impl ReportKind {
    /// Decodes a report kind.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Verify,
            2 => Self::Dirtied,
            3 => Self::Progress,
            _ => return None,
        })
    }
}

/// Operator requests a guest picks up with [`Hypercall::TakeRequest`].
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Nothing pending.
    None = 0,
    /// Check your memory invariant now and [`ReportKind::Verify`] the result.
    Verify = 1,
}

/// The page at [`BOOT_INFO_ADDR`] at guest start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the hypervisor that started the guest.
    pub abi_version: u32,
    /// The guest's id on the hypervisor that started it.
    pub guest_id: u32,
    /// Size of guest-physical memory in bytes (memory is `0..mem_bytes`).
    pub mem_bytes: u64,
    /// First guest-physical address past the loaded image (page aligned): free memory
    /// runs from here to the stack at the top.
    pub image_end: u64,
    /// Length of the argument string in `args`.
    pub args_len: u32,
    /// Reserved, zero.
    pub _reserved: u32,
    /// Arguments from the `start` command, space separated UTF-8.
    pub args: [u8; MAX_ARGS],
}

/// Filled by [`Hypercall::Info`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestInfo {
    /// [`ABI_VERSION`] of the hypervisor the guest runs on now.
    pub abi_version: u32,
    /// The guest's id on the hypervisor it runs on now (it may change on migration).
    pub guest_id: u32,
    /// How many times this guest has arrived by live migration.
    pub migrations: u64,
    /// Size of guest memory in bytes.
    pub mem_bytes: u64,
    /// How many times this guest was restored from a checkpoint (a restored copy
    /// counts one more than the copy that was checkpointed).
    pub restores: u64,
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 40 + MAX_ARGS);
const _: () = assert!(core::mem::size_of::<GuestInfo>() == 32);
const _: () = assert!(core::mem::size_of::<NetDesc>() == net_ring::DESC);
const _: () = assert!(core::mem::offset_of!(NetRing, tx) == net_ring::TX);
const _: () = assert!(core::mem::offset_of!(NetRing, rx) == net_ring::RX);
const _: () = assert!(core::mem::offset_of!(NetRing, rx_used) == net_ring::RX_USED);
const _: () = assert!(core::mem::size_of::<NetRing>() <= 4096);

/// Issues a hypercall. Guest side only: on the host or in the hypervisor it would fault.
///
/// `VMCALL` with the convention in the module documentation.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn hypercall(call: Hypercall, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let rax: u64;
    // SAFETY: VMCALL traps to the hypervisor, which only reads the argument registers and
    // writes RAX (and guest memory the arguments point at, which is the caller's business).
    // The asm touches no Rust-visible memory itself and preserves the stack.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inout("rax") call as u64 => rax,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            options(nostack),
        );
    }
    rax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_numbers_round_trip() {
        for raw in 0..16 {
            if let Some(c) = Hypercall::from_raw(raw) {
                assert_eq!(c as u64, raw);
            }
        }
        assert_eq!(Hypercall::from_raw(0), None);
        assert_eq!(Hypercall::from_raw(9), Some(Hypercall::FreePages));
        assert_eq!(Hypercall::from_raw(10), Some(Hypercall::Move));
        assert_eq!(Hypercall::from_raw(13), Some(Hypercall::NetWait));
        assert_eq!(Hypercall::from_raw(14), None);
    }

    #[test]
    fn errors_are_negative() {
        for e in [
            ErrorCode::UnknownCall,
            ErrorCode::BadAddress,
            ErrorCode::BadArgument,
            ErrorCode::Refused,
            ErrorCode::MoveFailed,
        ] {
            assert!((e.to_raw() as i64) < 0);
            assert_eq!(ErrorCode::decode(e.to_raw()), Err(e));
        }
        assert_eq!(ErrorCode::decode(42), Ok(42));
    }
}
