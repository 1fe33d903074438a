//! The runtime every PV guest links: the `_start` entry (the hypervisor starts guests in
//! long mode with RSP at the top of memory and RDI = the boot-info page, see
//! `guest-abi`), a panic handler that reports and exits, safe hypercall wrappers, a
//! line-buffered console (`println!`), `key=value` arguments, and safe access to the
//! guest's free memory. The only `unsafe` is the entry stub, reading the boot info and
//! taking the free-memory region once.
#![cfg_attr(not(test), no_std)]

pub mod pattern;

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

pub use guest_abi;
use guest_abi::{
    hypercall, BootInfo, ErrorCode, GuestInfo, Hypercall, ReportKind, Request, BOOT_INFO_MAGIC,
};

/// Bytes kept free for the stack at the top of guest memory (see the loader).
pub const STACK_RESERVE: u64 = 64 * 1024;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.section .text.entry, "ax"
.global _start
_start:
    andq $-16, %rsp
    call rt_user_main
1:  hlt
    jmp 1b
"#,
    options(att_syntax)
);

/// Defines the guest's entry: `rt::entry!(main)` with `fn main(env: &rt::Env) -> i32`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Called by `_start` with the boot-info address.
        #[no_mangle]
        pub extern "C" fn rt_user_main(boot_info: u64) -> ! {
            $crate::start(boot_info, $main)
        }
    };
}

/// What a guest knows about itself at start.
pub struct Env {
    /// The boot information from the hypervisor.
    pub boot: BootInfo,
    /// Parsed arguments.
    pub args: Args,
}

/// Runs `main` and exits with its result.
pub fn start(boot_info: u64, main: fn(&Env) -> i32) -> ! {
    // SAFETY: the hypervisor passes the address of a BootInfo page inside guest memory
    // (guest-abi contract); it is identity-mapped and read once, by value.
    let boot = unsafe { core::ptr::read_volatile(boot_info as *const BootInfo) };
    if boot.magic != BOOT_INFO_MAGIC {
        exit(254);
    }
    let len = (boot.args_len as usize).min(boot.args.len());
    let args = Args::new(&boot.args[..len]);
    let env = Env { boot, args };
    exit(main(&env))
}

/// `key=value` arguments (at most 16).
pub struct Args {
    raw: [u8; guest_abi::MAX_ARGS],
    len: usize,
}

impl Args {
    /// Copies the argument string.
    pub fn new(s: &[u8]) -> Self {
        let mut raw = [0u8; guest_abi::MAX_ARGS];
        let len = s.len().min(raw.len());
        raw[..len].copy_from_slice(&s[..len]);
        Self { raw, len }
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        let s = core::str::from_utf8(&self.raw[..self.len]).ok()?;
        s.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// The value of `key` as a number, or `default` (also when it does not parse).
    pub fn u64(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

/// Writes bytes to the hypervisor console.
pub fn write(bytes: &[u8]) -> Result<u64, ErrorCode> {
    ErrorCode::decode(hypercall(
        Hypercall::ConsoleWrite,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
        0,
    ))
}

/// Monotonic time in nanoseconds (continues across migrations).
pub fn time_ns() -> u64 {
    hypercall(Hypercall::Time, 0, 0, 0, 0)
}

/// Sleeps until the monotonic clock reads `ns`.
pub fn sleep_until(ns: u64) {
    hypercall(Hypercall::HaltUntil, ns, 0, 0, 0);
}

/// Sleeps `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    sleep_until(time_ns() + ms * 1_000_000);
}

/// Gives the CPU to other guests.
pub fn yield_now() {
    hypercall(Hypercall::Yield, 0, 0, 0, 0);
}

/// Ends the guest.
pub fn exit(code: i32) -> ! {
    Console::flush_now();
    loop {
        hypercall(Hypercall::Exit, code as i64 as u64, 0, 0, 0);
    }
}

/// The guest's current id and migration count.
pub fn info() -> GuestInfo {
    let mut gi = GuestInfo::default();
    hypercall(Hypercall::Info, &mut gi as *mut GuestInfo as u64, 0, 0, 0);
    gi
}

/// Reports a result to the hypervisor.
pub fn report(kind: ReportKind, value: u64, detail: u64) {
    hypercall(Hypercall::Report, kind as u64, value, detail, 0);
}

/// Takes the operator's pending request.
pub fn take_request() -> Request {
    match hypercall(Hypercall::TakeRequest, 0, 0, 0, 0) {
        1 => Request::Verify,
        _ => Request::None,
    }
}

/// Issues a raw hypercall (for the misbehaving test guest).
pub fn raw_hypercall(number: u64, a0: u64, a1: u64) -> u64 {
    let rax: u64;
    // SAFETY: as guest_abi::hypercall, with an arbitrary number: the hypervisor answers
    // unknown numbers with an error and writes only RAX.
    unsafe {
        core::arch::asm!("vmcall", inout("rax") number => rax, in("rdi") a0, in("rsi") a1, in("rdx") 0u64, in("r10") 0u64, options(nostack));
    }
    rax
}

/// Line-buffered console writer: a line goes out in one hypercall.
pub struct Console {
    buf: [u8; 200],
    len: usize,
}

static mut LINE: Console = Console {
    buf: [0; 200],
    len: 0,
};

impl Console {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' || self.len == self.buf.len() {
                let _ = write(&self.buf[..self.len]);
                self.len = 0;
            }
        }
    }

    /// Runs `f` with the console (guests are single-threaded and non-reentrant: no
    /// interrupts, and the panic handler only runs after `f` is gone).
    pub fn with<R>(f: impl FnOnce(&mut Console) -> R) -> R {
        // SAFETY: one vCPU, no interrupts, and nothing inside `f` calls `with` again
        // (formatting does not print), so this is the only live reference.
        f(unsafe { &mut *core::ptr::addr_of_mut!(LINE) })
    }

    /// Writes out a partial line.
    pub fn flush_now() {
        Self::with(|c| {
            if c.len > 0 {
                let _ = write(&c.buf[..c.len]);
                c.len = 0;
            }
        });
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// Prints a line on the hypervisor console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::Console::with(|c| {
            use core::fmt::Write as _;
            let _ = writeln!(c, $($arg)*);
        });
    }};
}

static REGION_TAKEN: AtomicBool = AtomicBool::new(false);

/// The guest's free memory between its image and the stack, as words. Available once.
pub fn free_memory(env: &Env) -> Option<&'static mut [u64]> {
    if REGION_TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    let start = env.boot.image_end.div_ceil(4096) * 4096;
    let end = env.boot.mem_bytes.saturating_sub(STACK_RESERVE) & !4095;
    if end <= start {
        return Some(&mut []);
    }
    // SAFETY: [image_end, mem - 64 KiB) is guest memory that nothing else uses (the
    // image ends before it, the stack lives above it), identity-mapped by the
    // hypervisor's page tables, and the flag above hands it out only once.
    Some(unsafe {
        core::slice::from_raw_parts_mut(start as *mut u64, ((end - start) / 8) as usize)
    })
}

/// Reads the TSC (guests may: RDTSC does not exit).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    Console::flush_now();
    println!("guest panic: {info}");
    exit(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let a = Args::new(b"pages=64 rate=100 mode=ud");
        assert_eq!(a.get("mode"), Some("ud"));
        assert_eq!(a.u64("pages", 1), 64);
        assert_eq!(a.u64("missing", 7), 7);
        assert_eq!(a.get("rat"), None);
    }
}
