//! `misbehave`: a guest for the hypervisor's tests that does what a guest must not.
//!
//! `mode=` (default `all`):
//!
//! * `badptr`: ConsoleWrite of a buffer outside guest memory;
//! * `hugelen`: ConsoleWrite of `1 << 40` bytes;
//! * `unknown`: hypercall number 999.
//!
//! Each prints the error it got back (`misbehave: badptr -> error 2 (...)`) and the guest
//! carries on: on its own, such a mode then exits with code 0.
//!
//! * `all`: the three above in turn, then `outside`;
//! * `outside`: a store to guest-physical 0x40_0000_0000, far beyond guest memory (the
//!   guest's page tables map only its memory: a page fault, and with no IDT the
//!   hypervisor stops the guest);
//! * `ud`: executes `ud2` (an invalid-opcode exception, same outcome);
//! * `panic`: panics (the runtime prints the message and exits with code 255).
//!
//! In `outside` and `ud` the guest never gets past the fault; if it does, it says so and
//! exits with code 3.
//!
//! `no_std`/`no_main`: a bare-metal PV guest on the `rt` runtime. Unlike the other
//! guests it issues one raw VMCALL itself, since `guest_abi::hypercall` (rightly) only
//! takes known call numbers.
#![no_std]
#![no_main]

use rt::guest_abi::{hypercall, ErrorCode, Hypercall};
use rt::println;

rt::entry!(main);

/// Far beyond any guest's memory (256 GiB).
const OUTSIDE: u64 = 0x40_0000_0000;
/// A call number the ABI does not define.
const UNKNOWN_CALL: u64 = 999;

fn main(args: &rt::Args) -> i32 {
    let mode = args.get("mode").unwrap_or("all");
    match mode {
        "badptr" | "hugelen" | "unknown" => {
            bad_call(mode);
            println!("misbehave: still running after {mode}, exiting");
            0
        }
        "all" => {
            for m in ["badptr", "hugelen", "unknown"] {
                bad_call(m);
            }
            outside()
        }
        "outside" => outside(),
        "ud" => ud(),
        "panic" => panic!("misbehave: deliberate panic"),
        _ => {
            println!(
                "misbehave: unknown mode '{mode}' (badptr, hugelen, unknown, all, outside, ud, panic)"
            );
            2
        }
    }
}

/// Makes the bad hypercall `mode` and prints what came back.
fn bad_call(mode: &str) {
    let msg = b"misbehave: this text must not be printed\n";
    let rax = match mode {
        "badptr" => hypercall(Hypercall::ConsoleWrite, OUTSIDE, 16, 0, 0),
        "hugelen" => hypercall(Hypercall::ConsoleWrite, msg.as_ptr() as u64, 1 << 40, 0, 0),
        _ => raw_hypercall(UNKNOWN_CALL),
    };
    match ErrorCode::decode(rax) {
        Err(e) => println!("misbehave: {mode} -> error {} ({e})", e as i64),
        Ok(v) => {
            println!("misbehave: {mode} -> no error (returned {v}): the hypervisor accepted it")
        }
    }
}

/// VMCALL with a raw call number and zero arguments.
fn raw_hypercall(number: u64) -> u64 {
    let rax: u64;
    // SAFETY: as in `guest_abi::hypercall`: VMCALL traps to the hypervisor, which reads
    // the argument registers and writes only RAX (an unknown number fails with
    // UnknownCall and the guest continues). The asm touches no memory and not the stack.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inout("rax") number => rax,
            in("rdi") 0u64,
            in("rsi") 0u64,
            in("rdx") 0u64,
            in("r10") 0u64,
            options(nostack, nomem),
        );
    }
    rax
}

/// Stores outside guest memory; the hypervisor stops the guest at the fault.
fn outside() -> i32 {
    println!("misbehave: writing to {OUTSIDE:#x}, outside guest memory");
    let p = OUTSIDE as *mut u64;
    // SAFETY: deliberately not: the address is outside guest memory and unmapped in the
    // guest's page tables, so the store faults and the hypervisor stops this guest; no
    // Rust-visible memory is touched. (Volatile, so the store is really made.)
    unsafe { core::ptr::write_volatile(p, 0xBAD) };
    survived("the write outside guest memory")
}

/// Executes `ud2`; the hypervisor stops the guest at the invalid-opcode exception.
fn ud() -> i32 {
    println!("misbehave: executing ud2");
    // SAFETY: deliberately not: ud2 raises #UD, and with no IDT the hypervisor stops this
    // guest. It touches no memory and not the stack.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    survived("ud2")
}

fn survived(what: &str) -> i32 {
    println!("misbehave: FAIL: still running after {what} (the hypervisor should have stopped me)");
    3
}
