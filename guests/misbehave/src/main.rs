//! `misbehave`: a guest for the hypervisor's tests. It makes bad hypercalls (a pointer
//! outside its memory, a huge length, an unknown number), prints the error each got,
//! and then does something illegal (`mode=outside`: write far outside its memory;
//! `mode=ud`: an invalid opcode), which must stop it and nothing else.
#![no_std]
#![no_main]

use rt::guest_abi::{ErrorCode, Hypercall};
use rt::println;

rt::entry!(main);

fn err_code(rax: u64) -> i64 {
    match ErrorCode::decode(rax) {
        Ok(_) => 0,
        Err(e) => e as i64,
    }
}

fn main(env: &rt::Env) -> i32 {
    let mode = env.args.get("mode").unwrap_or("all");
    if mode == "all" || mode == "badptr" {
        let r = rt::raw_hypercall(Hypercall::ConsoleWrite as u64, 0x40_0000_0000, 16);
        println!("misbehave: badptr -> error {}", err_code(r));
    }
    if mode == "all" || mode == "hugelen" {
        let r = rt::raw_hypercall(Hypercall::ConsoleWrite as u64, 0x10_0000, 1 << 40);
        println!("misbehave: hugelen -> error {}", err_code(r));
    }
    if mode == "all" || mode == "unknown" {
        let r = rt::raw_hypercall(999, 0, 0);
        println!("misbehave: unknown -> error {}", err_code(r));
    }
    if mode == "ud" {
        println!("misbehave: executing ud2");
        rt::Console::flush_now();
        // SAFETY: deliberately illegal; the hypervisor stops this guest.
        unsafe { core::arch::asm!("ud2") };
    } else {
        println!("misbehave: writing outside guest memory");
        rt::Console::flush_now();
        let p = 0x40_0000_0000u64 as *mut u64;
        // SAFETY: deliberately illegal: the address is not mapped, the hypervisor stops
        // this guest at the fault.
        unsafe { core::ptr::write_volatile(p, 1) };
    }
    println!("misbehave: still running (the hypervisor should have stopped me)");
    2
}
