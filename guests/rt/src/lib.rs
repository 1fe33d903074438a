//! The tiny runtime every PV guest links.
//!
//! A PV guest has no firmware, no interrupts and no OS: the hypervisor drops it into
//! 64-bit long mode at its ELF entry with `RSP` at the top of its memory and `RDI`
//! pointing at the [`BootInfo`] page (see `guest-abi`). Everything it can do besides
//! computing is a hypercall. This crate turns that into an ordinary (if small) Rust
//! environment:
//!
//! * `_start` aligns the stack and calls `rt_main`, which [`entry!`] defines in the guest
//!   binary; it checks the boot info, parses the arguments ([`Args`]) and runs the guest's
//!   `fn main(args: &rt::Args) -> i32`, whose result becomes the exit code;
//! * a panic handler that prints the message on the console and exits with code 255;
//! * safe hypercall wrappers ([`time_ns`], [`sleep_until`], [`exit`], [`info`],
//!   [`report`], [`take_request`], ...) and a console ([`print!`], [`println!`]);
//! * one safe handle on the guest's free memory ([`mem::free_region`]);
//! * pure, host-tested logic the guests share: [`pattern`] (memory invariants) and
//!   [`pace`] (rate pacing);
//! * networking: the PV NIC's rings ([`ring`]), the NIC as a smoltcp device and the
//!   usual setup and poll loop ([`net`]), and [`once::TakeOnce`] for the large statics
//!   (buffers, tables) a guest without an allocator needs.
//!
//! The only `unsafe` is the hypercall trap (in `guest_abi::hypercall`), the entry stub,
//! [`mem::free_region`], which turns raw guest-physical addresses into a slice,
//! [`once::TakeOnce::take`], and the volatile accesses to the NIC's shared memory in
//! [`ring::Mem`].
//! The crate also builds on the host (without the entry and the panic handler), so
//! `cargo test --manifest-path guests/rt/Cargo.toml --target x86_64-unknown-linux-gnu`
//! runs the unit tests of the pure modules.
#![cfg_attr(not(test), no_std)]

pub mod args;
pub mod console;
pub mod mem;
pub mod net;
pub mod once;
pub mod pace;
pub mod pattern;
pub mod ring;

use core::sync::atomic::{AtomicBool, Ordering};

pub use args::Args;
pub use guest_abi;
use guest_abi::{
    hypercall, BootInfo, ErrorCode, GuestInfo, Hypercall, ReportKind, Request, ABI_VERSION,
    BOOT_INFO_MAGIC,
};

// The entry point. The hypervisor starts the guest here with RSP = top of guest memory
// (16-byte aligned, but re-aligned anyway) and RDI = the BootInfo page. The SysV ABI wants
// RSP + 8 aligned to 16 at a function's entry, which the `call` provides. `rt_main` is
// defined by `entry!` in the guest binary and never returns; `ud2` stops the guest should
// it ever do so. Its only argument, RDI, is passed through untouched: the guest-abi
// contract guarantees a valid, mapped BootInfo there (`rt_main` treats it as `&BootInfo`
// and checks its magic first).
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call rt_main",
    "    ud2",
    ".size _start, . - _start",
);

/// Defines the guest's entry: `rt::entry!(main);` with `fn main(args: &rt::Args) -> i32`.
///
/// It expands to the `rt_main` function `_start` calls; the value `main` returns is the
/// guest's exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Called by the runtime's `_start` with the boot-info page (guest-abi contract).
        #[no_mangle]
        pub extern "C" fn rt_main(boot_info: &'static $crate::guest_abi::BootInfo) -> ! {
            const MAIN: fn(&$crate::Args) -> i32 = $main;
            $crate::run(boot_info, MAIN)
        }
    };
}

static STARTED: AtomicBool = AtomicBool::new(false);

/// Starts the guest: checks the boot info, records the free memory, parses the
/// arguments, runs `main` and exits with its result. Called once, by [`entry!`]'s
/// `rt_main`; any later call panics (it must not redefine the free memory).
pub fn run(boot: &BootInfo, main: fn(&Args) -> i32) -> ! {
    if STARTED.swap(true, Ordering::SeqCst) {
        panic!("rt::run called twice");
    }
    if boot.magic != BOOT_INFO_MAGIC {
        println!("rt: bad boot info magic {:#x}", boot.magic);
        exit(254);
    }
    if boot.abi_version != ABI_VERSION {
        println!(
            "rt: hypervisor speaks ABI v{}, this guest was built for v{ABI_VERSION}",
            boot.abi_version
        );
        exit(253);
    }
    mem::init(boot.image_end, boot.mem_bytes);
    let len = (boot.args_len as usize).min(boot.args.len());
    let args = Args::new(&boot.args[..len]);
    exit(main(&args))
}

/// Issues `call` and decodes the result.
fn call(call: Hypercall, a0: u64, a1: u64, a2: u64) -> Result<u64, ErrorCode> {
    ErrorCode::decode(hypercall(call, a0, a1, a2, 0))
}

/// Writes raw bytes to the console (at most [`guest_abi::MAX_CONSOLE_WRITE`] per call);
/// returns the bytes written. Prefer [`print!`]/[`println!`].
pub fn console_write(bytes: &[u8]) -> Result<u64, ErrorCode> {
    call(
        Hypercall::ConsoleWrite,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
    )
}

/// Monotonic time in nanoseconds since the guest was first started (it keeps counting
/// across migrations).
pub fn time_ns() -> u64 {
    call(Hypercall::Time, 0, 0, 0).unwrap_or(0)
}

/// Sleeps until the monotonic clock reads `ns` (returns at once if it already does).
pub fn sleep_until(ns: u64) {
    let _ = call(Hypercall::HaltUntil, ns, 0, 0);
}

/// Sleeps `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    sleep_until(time_ns().saturating_add(ms.saturating_mul(1_000_000)));
}

/// Gives up the rest of this time slice.
pub fn yield_now() {
    let _ = call(Hypercall::Yield, 0, 0, 0);
}

/// Ends the guest with `code` (passed sign-extended in RDI). Never returns.
pub fn exit(code: i32) -> ! {
    loop {
        // Exit does not return; should a hypervisor ever resume us, ask again.
        let _ = call(Hypercall::Exit, code as i64 as u64, 0, 0);
    }
}

/// The guest's current id, ABI version, migration count and memory size.
pub fn info() -> GuestInfo {
    let mut gi = GuestInfo::default();
    // The hypervisor fills `gi` through its address; the VMCALL asm may write memory
    // (it is not `nomem`), so the compiler re-reads `gi` afterwards.
    let _ = call(Hypercall::Info, core::ptr::addr_of_mut!(gi) as u64, 0, 0);
    gi
}

/// Reports a result to the hypervisor (shown by its `vms` and `stats` commands).
pub fn report(kind: ReportKind, value: u64, detail: u64) {
    let _ = call(Hypercall::Report, kind as u64, value, detail);
}

/// Free-page hint ([`Hypercall::FreePages`]): `pages` pages from `addr` (page aligned)
/// hold nothing this guest needs (`free`), or are in use again. Returns the pages the
/// hypervisor took as hinted (0 if it ignores hints).
pub fn hint_free(addr: u64, pages: u64, free: bool) -> Result<u64, ErrorCode> {
    call(Hypercall::FreePages, addr, pages, u64::from(free))
}

/// Asks to be migrated to the hypervisor at `ip` (`a << 24 | b << 16 | c << 8 | d`),
/// TCP port `port` (0: 7000) ([`Hypercall::Move`]). Returns when the move has ended:
/// `Ok` on the destination (the migration count is one higher), `Err(MoveFailed)` back
/// here if it failed, `Err(Refused)` at once if the operator did not allow it.
pub fn move_to(ip: u32, port: u16) -> Result<u64, ErrorCode> {
    call(Hypercall::Move, u64::from(ip), u64::from(port), 0)
}

/// Asks for a checkpoint of this guest at the store at `ip`/`port` (as [`move_to`]);
/// returns `Ok` when the store holds it, on this hypervisor.
pub fn checkpoint_to(ip: u32, port: u16) -> Result<u64, ErrorCode> {
    call(Hypercall::Move, u64::from(ip), u64::from(port), 1)
}

/// Attaches the PV NIC's ring at `ring_gpa` (a page-aligned [`guest_abi::NetRing`] in
/// guest memory; [`Hypercall::NetAttach`]); returns the NIC's MAC address. Prefer
/// [`net::PvNic::attach`], which sets the ring up first.
pub fn net_attach(ring_gpa: u64) -> Result<[u8; 6], ErrorCode> {
    call(Hypercall::NetAttach, ring_gpa, 0, 0).map(net::mac_from_u64)
}

/// Detaches the PV NIC's ring ([`Hypercall::NetAttach`] with 0).
pub fn net_detach() -> Result<(), ErrorCode> {
    call(Hypercall::NetAttach, 0, 0, 0).map(|_| ())
}

/// Has the hypervisor send the frames in the transmit ring and fill posted receive
/// buffers ([`Hypercall::NetNotify`]); returns the frames sent.
pub fn net_notify() -> Result<u64, ErrorCode> {
    call(Hypercall::NetNotify, 0, 0, 0)
}

/// Sends what the transmit ring holds, then sleeps until a frame has been written to the
/// receive ring or the monotonic clock reads `deadline_ns` ([`Hypercall::NetWait`]).
pub fn net_wait(deadline_ns: u64) -> Result<(), ErrorCode> {
    call(Hypercall::NetWait, deadline_ns, 0, 0).map(|_| ())
}

/// Fetches and clears the operator's pending request.
pub fn take_request() -> Request {
    match call(Hypercall::TakeRequest, 0, 0, 0) {
        Ok(1) => Request::Verify,
        _ => Request::None,
    }
}

#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    // A panic while printing the first one: just stop.
    if !PANICKING.swap(true, Ordering::SeqCst) {
        match info.location() {
            Some(l) => println!(
                "guest panic at {}:{}: {}",
                l.file(),
                l.line(),
                info.message()
            ),
            None => println!("guest panic: {}", info.message()),
        }
    }
    exit(255)
}
