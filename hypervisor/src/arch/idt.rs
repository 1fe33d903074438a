//! Exception handling for the hypervisor itself. Every CPU exception (vectors 0-31) enters
//! a small assembly stub that saves the registers and calls [`exception_entry`], which
//! prints the vector, error code and registers on the console and halts: a fault in
//! the hypervisor is a bug, and a clear report beats a silent triple fault.
//!
//! Stable Rust has no `extern "x86-interrupt"`, so the stubs are written in assembly and
//! installed by address. Guest exceptions never come here: they cause VM exits.

use alloc::boxed::Box;
use core::fmt::Write;

use super::cpu;
use super::serial;

/// Registers saved by the stubs, in push order reversed (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// General-purpose registers saved by `isr_common`.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// Vector number pushed by the stub.
    pub vector: u64,
    /// Error code (pushed by the CPU, or 0 by the stub).
    pub error: u64,
    /// Interrupt frame pushed by the CPU.
    pub rip: u64,
    #[allow(missing_docs)]
    pub cs: u64,
    #[allow(missing_docs)]
    pub rflags: u64,
    #[allow(missing_docs)]
    pub rsp: u64,
    #[allow(missing_docs)]
    pub ss: u64,
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.macro ISR_NOERR n
isr_\n:
    pushq $0
    pushq $\n
    jmp isr_common
.endm
.macro ISR_ERR n
isr_\n:
    pushq $\n
    jmp isr_common
.endm

.section .text
ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR 21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR 29
ISR_ERR 30
ISR_NOERR 31

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_entry
1:
    cli
    hlt
    jmp 1b

.section .rodata
.balign 8
.global isr_table
isr_table:
    .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7
    .quad isr_8, isr_9, isr_10, isr_11, isr_12, isr_13, isr_14, isr_15
    .quad isr_16, isr_17, isr_18, isr_19, isr_20, isr_21, isr_22, isr_23
    .quad isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30, isr_31
"#,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    static isr_table: [u64; 32];
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 FP",
    "alignment check",
    "machine check",
    "SIMD FP",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Called by `isr_common` with the saved registers. Never returns.
#[cfg_attr(target_os = "none", no_mangle)]
pub extern "C" fn exception_entry(frame: &ExceptionFrame) -> ! {
    serial::force_unlock();
    let mut w = serial::Writer;
    let v = frame.vector as usize;
    let _ = writeln!(
        w,
        "\n!!! HYPERVISOR EXCEPTION {} ({}) error={:#x}",
        v,
        NAMES.get(v).copied().unwrap_or("?"),
        frame.error
    );
    let _ = writeln!(
        w,
        "rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x} cr2={:#x}",
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        cpu::read_cr2()
    );
    let _ = writeln!(
        w,
        "rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    let _ = writeln!(
        w,
        "r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    );
    let _ = writeln!(
        w,
        "this CPU is halted; the hypervisor has a bug (please report the lines above)"
    );
    cpu::halt_forever()
}

/// One 16-byte IDT gate (SDM Vol. 3A §6.14.1).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Gate>() == 16);

/// Builds and loads the IDT (all 32 exception vectors), with the double fault on its IST.
#[cfg(target_os = "none")]
pub fn init(code_selector: u16) {
    let table: &'static mut [Gate; 256] = Box::leak(Box::new([Gate::default(); 256]));
    // SAFETY: isr_table is a read-only array of 32 addresses emitted by the asm above.
    let stubs = unsafe { &isr_table };
    for (v, &addr) in stubs.iter().enumerate() {
        table[v] = Gate {
            offset_low: addr as u16,
            selector: code_selector,
            ist: if v == 8 {
                super::gdt::DOUBLE_FAULT_IST as u8 + 1
            } else {
                0
            },
            type_attr: 0x8E, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (addr >> 16) as u16,
            offset_high: (addr >> 32) as u32,
            reserved: 0,
        };
    }
    let ptr = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
        base: x86_64::VirtAddr::new(table.as_ptr() as u64),
    };
    // SAFETY: the table is leaked (lives forever) and holds valid gates for vectors 0-31;
    // vectors 32-255 are not present, and interrupts stay disabled.
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}

/// Host build: there is no IDT to load.
#[cfg(not(target_os = "none"))]
pub fn init(_code_selector: u16) {
    let _ = Box::new(Gate::default());
}
