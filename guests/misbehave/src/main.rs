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
//! Hostile modes for the hardening tests:
//!
//! * `hammer` (`secs=N`, default 30; `seed=S`, default 1, printed): every hypercall but Exit in a tight loop, with good
//!   and bad arguments (pointers into, across and outside its memory, zero and huge
//!   lengths, unknown numbers), for N seconds of its clock; then prints the number of
//!   calls and exits 0. The hypervisor's heap must stay flat meanwhile.
//! * `instr`: MONITOR, MWAIT with a deep C-state hint, WBINVD (each must be harmless:
//!   the guest prints that it survived), then INVD, which must stop it.
//! * `rdpmc`, `xsetbv`, `vmx` (VMXOFF), `sgdt`: each must stop the guest.
//! * `sse`: sets CR4.OSFXSR to use SSE; `x87`: FNINIT; `cd`: sets CR0.CD (caches off
//!   for the machine). Each must stop the guest: PV guests have no FP/SIMD state and
//!   no say over caching.
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
        "hammer" => hammer(args.u64_or("secs", 30), args.u64_or("seed", 1)),
        "instr" => instr(),
        "rdpmc" | "xsetbv" | "vmx" | "sgdt" | "sse" | "x87" | "cd" | "io" | "msr" => {
            forbidden(mode)
        }
        "panic" => panic!("misbehave: deliberate panic"),
        _ => {
            println!(
                "misbehave: unknown mode '{mode}' (badptr, hugelen, unknown, all, outside, ud, panic, hammer, instr, rdpmc, xsetbv, vmx, sgdt, sse, x87, cd, io, msr)"
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

/// A page-aligned page (the PV NIC's ring must be one).
#[repr(C, align(4096))]
struct RingPage([u32; 1024]);

/// Every hypercall but Exit, in a loop, for `secs` seconds of guest time.
fn hammer(secs: u64, seed: u64) -> i32 {
    println!("misbehave: hammering every hypercall for {secs} s (seed={seed})");
    let info = rt::info();
    let mem = info.mem_bytes;
    let buf = [0u8; 64];
    let here = buf.as_ptr() as u64;
    let end = rt::time_ns() + secs * 1_000_000_000;
    let mut calls = 0u64;
    let mut i = seed;
    // A ring page the hypervisor is told about, rewritten with garbage as we go: wild
    // indices, descriptors inside, across and outside guest memory, any length.
    let mut ring = RingPage([0; 1024]);
    let ring_at = ring.0.as_ptr() as u64;
    while rt::time_ns() < end {
        for _ in 0..64 {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ptr = match (i >> 33) % 5 {
                0 => here,
                1 => mem - 8,      // across the end of guest memory
                2 => mem,          // just outside
                3 => OUTSIDE,      // far outside
                _ => u64::MAX - 3, // wraps
            };
            for k in 0..4 {
                let w = (i.rotate_left(k * 16) as usize) % ring.0.len();
                ring.0[w] = match k {
                    0 => (i >> 7) as u32 % (mem as u32), // a plausible address
                    1 => (i >> 9) as u32 % 2048,         // a plausible length
                    _ => (i >> 13) as u32,               // anything
                };
            }
            let _ = match (i >> 40) % 13 {
                // The PV NIC: attach the garbage ring (or a bad address), then ask the
                // hypervisor to send and wait.
                9 => hypercall(
                    Hypercall::NetAttach,
                    if i & 4 == 0 { ring_at } else { ptr },
                    0,
                    0,
                    0,
                ),
                10 => hypercall(Hypercall::NetNotify, 0, 0, 0, 0),
                11 => hypercall(Hypercall::NetWait, 0, 0, 0, 0), // deadline passed
                // Zero-length writes: the console path runs, nothing is printed.
                0 => hypercall(Hypercall::ConsoleWrite, ptr, 0, 0, 0),
                1 => hypercall(Hypercall::ConsoleWrite, ptr, 1 << 40, 0, 0),
                2 => hypercall(Hypercall::Time, 0, 0, 0, 0),
                3 => hypercall(Hypercall::Yield, 0, 0, 0, 0),
                4 => hypercall(Hypercall::HaltUntil, 0, 0, 0, 0), // deadline passed
                5 => hypercall(Hypercall::Info, ptr, 0, 0, 0),
                6 => hypercall(Hypercall::Report, i % 7, i, i, 0),
                7 => hypercall(Hypercall::TakeRequest, 0, 0, 0, 0),
                // Hints over good, unaligned, huge and wrapping ranges (either way).
                8 => hypercall(Hypercall::FreePages, ptr & !0xFFF, i >> 52, i & 3, 0),
                _ => raw_hypercall(UNKNOWN_CALL + (i >> 50)),
            };
            calls += 1;
        }
    }
    println!("misbehave: hammer done: {calls} calls");
    0
}

/// Instructions that could stall or reconfigure the machine: the harmless ones are
/// emulated as no-ops, INVD stops the guest.
fn instr() -> i32 {
    let here = &instr as *const _ as u64;
    // SAFETY: MONITOR only arms an address monitor (here: our own code), MWAIT waits
    // for it or an event, WBINVD writes back caches; none touches Rust-visible memory.
    // In this guest they exit to the hypervisor, which emulates them as no-ops.
    unsafe {
        core::arch::asm!("monitor", in("rax") here, in("ecx") 0, in("edx") 0, options(nostack));
        // Hint 0x60: C7, a state in which hardware may stop the preemption timer.
        core::arch::asm!("mwait", in("eax") 0x60, in("ecx") 0, options(nostack));
        core::arch::asm!("wbinvd", options(nostack));
    }
    println!("misbehave: survived monitor, mwait, wbinvd");
    println!("misbehave: executing invd");
    // SAFETY: deliberately not: INVD would drop the machine's cached writes; the
    // hypervisor stops this guest at the exit.
    unsafe { core::arch::asm!("invd", options(nostack)) };
    survived("invd")
}

/// An instruction a PV guest may not execute; the hypervisor stops the guest.
fn forbidden(mode: &str) -> i32 {
    println!("misbehave: executing {mode}");
    // SAFETY: deliberately not: each instruction exits to the hypervisor (or faults,
    // which exits too), which stops this guest; none returns here. They touch no
    // Rust-visible memory except SGDT, which writes its 10 bytes into `gdtr`.
    unsafe {
        let mut gdtr = [0u8; 16];
        match mode {
            "rdpmc" => {
                core::arch::asm!("rdpmc", in("ecx") 0, out("eax") _, out("edx") _, options(nostack))
            }
            "xsetbv" => {
                core::arch::asm!("xsetbv", in("ecx") 0, in("eax") 3, in("edx") 0, options(nostack))
            }
            "vmx" => core::arch::asm!("vmxoff", options(nostack)),
            "sgdt" => core::arch::asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack)),
            "sse" => core::arch::asm!(
                "mov {t}, cr4", "or {t}, 0x600", "mov cr4, {t}",
                t = out(reg) _, options(nostack)
            ),
            "x87" => core::arch::asm!("fninit", options(nostack)),
            "io" => core::arch::asm!("out 0x80, al", in("al") 0u8, options(nostack)),
            "msr" => core::arch::asm!(
                "rdmsr", in("ecx") 0x10u32, out("eax") _, out("edx") _, options(nostack)
            ),
            _ => core::arch::asm!(
                "mov {t}, cr0", "bts {t}, 30", "mov cr0, {t}",
                t = out(reg) _, options(nostack)
            ),
        }
        let _ = gdtr;
    }
    survived(mode)
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
