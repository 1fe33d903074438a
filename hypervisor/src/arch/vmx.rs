//! VMX instructions (SDM Vol. 3C ch. 31) and the VM-entry/exit stub.
//!
//! Each wrapper checks the VMX instruction's result (CF = VMfailInvalid, ZF =
//! VMfailValid, then the VM-instruction error field says why). The callers in
//! [`crate::vmx`] own the regions passed here (VMXON region, VMCS) as [`PhysPages`] that
//! live at least as long as VMX uses them.
//!
//! [`PhysPages`]: crate::mm::phys::PhysPages

use core::arch::asm;

/// A failed VMX instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxFail {
    /// VMfailInvalid (no current VMCS, or a bad region).
    Invalid,
    /// VMfailValid with the VM-instruction error number (SDM Vol. 3C §31.4).
    Valid(u32),
}

impl core::fmt::Display for VmxFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Invalid => f.write_str("VMfailInvalid"),
            Self::Valid(n) => write!(
                f,
                "VMfailValid, instruction error {n} ({})",
                instruction_error_name(*n)
            ),
        }
    }
}

/// Names of the VM-instruction errors (SDM Vol. 3C Table 31-1) that matter here.
pub fn instruction_error_name(n: u32) -> &'static str {
    match n {
        2 => "VMCLEAR with invalid address",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid address",
        11 => "VMPTRLD with incorrect VMCS revision",
        12 => "VMREAD/VMWRITE to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "see SDM Vol. 3C Table 31-1",
    }
}

fn check(rflags: u64) -> Result<(), VmxFail> {
    if rflags & 1 != 0 {
        Err(VmxFail::Invalid)
    } else if rflags & (1 << 6) != 0 {
        Err(VmxFail::Valid(vmread(0x4400).unwrap_or(0) as u32))
    } else {
        Ok(())
    }
}

/// VMXON with the region at physical `addr` (4 KiB aligned, revision id written).
pub fn vmxon(addr: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: `addr` is an owned, zeroed, revision-stamped page that stays allocated
    // while VMX is on; CR4.VMXE and the fixed bits were set by the caller.
    unsafe {
        asm!("vmxon [{a}]", "pushfq", "pop {f}", a = in(reg) &addr, f = out(reg) rflags);
    }
    check(rflags)
}

/// VMCLEAR of the VMCS at `addr`.
pub fn vmclear(addr: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: `addr` is a VMCS page owned by the caller.
    unsafe {
        asm!("vmclear [{a}]", "pushfq", "pop {f}", a = in(reg) &addr, f = out(reg) rflags);
    }
    check(rflags)
}

/// VMPTRLD: make the VMCS at `addr` current.
pub fn vmptrld(addr: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: `addr` is a VMCS page owned by the caller, initialised with the revision.
    unsafe {
        asm!("vmptrld [{a}]", "pushfq", "pop {f}", a = in(reg) &addr, f = out(reg) rflags);
    }
    check(rflags)
}

/// VMREAD of `field` from the current VMCS.
pub fn vmread(field: u32) -> Result<u64, VmxFail> {
    let value: u64;
    let rflags: u64;
    // SAFETY: VMREAD only reads the current VMCS into a register.
    unsafe {
        asm!("vmread {v}, {f}", "pushfq", "pop {r}", f = in(reg) u64::from(field), v = out(reg) value, r = out(reg) rflags);
    }
    if rflags & 0x41 != 0 {
        // Do not recurse through check() for the error field itself.
        return Err(if rflags & 1 != 0 {
            VmxFail::Invalid
        } else {
            VmxFail::Valid(12)
        });
    }
    Ok(value)
}

/// VMWRITE of `value` to `field` in the current VMCS.
pub fn vmwrite(field: u32, value: u64) -> Result<(), VmxFail> {
    let rflags: u64;
    // SAFETY: VMWRITE changes the current VMCS only; the fields written by this kernel
    // (host state, guest state, controls) are validated by VM entry before use.
    unsafe {
        asm!("vmwrite {f}, {v}", "pushfq", "pop {r}", f = in(reg) u64::from(field), v = in(reg) value, r = out(reg) rflags);
    }
    check(rflags)
}

/// INVEPT single-context (type 1) for `eptp`, or all-context (type 2) when
/// `eptp` is `None`.
pub fn invept(eptp: Option<u64>) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [eptp.unwrap_or(0), 0];
    let kind: u64 = if eptp.is_some() { 1 } else { 2 };
    let rflags: u64;
    // SAFETY: INVEPT only drops cached translations; the descriptor is on the stack.
    unsafe {
        asm!("invept {k}, [{d}]", "pushfq", "pop {r}", k = in(reg) kind, d = in(reg) &desc, r = out(reg) rflags);
    }
    check(rflags)
}

/// Guest general-purpose registers not held in the VMCS (RSP and RIP are).
/// The layout is fixed: the entry stub below addresses fields by offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    #[allow(missing_docs)]
    pub rax: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r15: u64,
}
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 15 * 8);

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.section .text
.global vmx_enter
/* rdi = &mut GuestRegs, rsi = 1 if the VMCS was launched (VMRESUME), else VMLAUNCH.
   Returns 0 after a VM exit, 1 on VMfailInvalid, 2 on VMfailValid. */
vmx_enter:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi
    movq $0x6C14, %rax          /* HOST_RSP */
    vmwrite %rsp, %rax
    testq %rsi, %rsi            /* flags survive the movs below */
    movq 0x00(%rdi), %rax
    movq 0x08(%rdi), %rbx
    movq 0x10(%rdi), %rcx
    movq 0x18(%rdi), %rdx
    movq 0x20(%rdi), %rsi
    movq 0x30(%rdi), %rbp
    movq 0x38(%rdi), %r8
    movq 0x40(%rdi), %r9
    movq 0x48(%rdi), %r10
    movq 0x50(%rdi), %r11
    movq 0x58(%rdi), %r12
    movq 0x60(%rdi), %r13
    movq 0x68(%rdi), %r14
    movq 0x70(%rdi), %r15
    movq 0x28(%rdi), %rdi
    jnz 1f
    vmlaunch
    jmp 2f
1:
    vmresume
2:
    /* Entry failed: CF => invalid, ZF => valid. */
    movl $2, %eax
    movl $1, %ecx
    cmovcl %ecx, %eax
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

.global vmx_exit_point
vmx_exit_point:
    /* HOST_RSP points at the saved GuestRegs pointer. */
    pushq %rdi
    movq 8(%rsp), %rdi
    movq %rax, 0x00(%rdi)
    movq %rbx, 0x08(%rdi)
    movq %rcx, 0x10(%rdi)
    movq %rdx, 0x18(%rdi)
    movq %rsi, 0x20(%rdi)
    movq %rbp, 0x30(%rdi)
    movq %r8, 0x38(%rdi)
    movq %r9, 0x40(%rdi)
    movq %r10, 0x48(%rdi)
    movq %r11, 0x50(%rdi)
    movq %r12, 0x58(%rdi)
    movq %r13, 0x60(%rdi)
    movq %r14, 0x68(%rdi)
    movq %r15, 0x70(%rdi)
    popq %rax
    movq %rax, 0x28(%rdi)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    xorl %eax, %eax
    ret
"#,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    fn vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64;
    fn vmx_exit_point();
}

/// Address the VMCS host RIP must point at.
pub fn exit_point() -> u64 {
    #[cfg(target_os = "none")]
    {
        vmx_exit_point as *const () as u64
    }
    #[cfg(not(target_os = "none"))]
    0
}

/// Enters the guest of the current VMCS with `regs`; returns after the next VM exit
/// (with `regs` updated), or the entry failure.
pub fn enter(regs: &mut GuestRegs, launched: bool) -> Result<(), VmxFail> {
    #[cfg(target_os = "none")]
    {
        // SAFETY: the current VMCS has complete host state whose RIP is
        // `vmx_exit_point` (HOST_RSP is written by the stub itself), so a VM exit resumes
        // here with callee-saved registers restored; `regs` is exclusively borrowed.
        let r = unsafe { vmx_enter(regs, u64::from(launched)) };
        match r {
            0 => Ok(()),
            1 => Err(VmxFail::Invalid),
            _ => Err(VmxFail::Valid(vmread(0x4400).unwrap_or(0) as u32)),
        }
    }
    #[cfg(not(target_os = "none"))]
    {
        let _ = (regs, launched);
        Err(VmxFail::Invalid)
    }
}

/// Reads IA32_EFER, IDTR base (host state).
pub fn idtr_base() -> u64 {
    x86_64::instructions::tables::sidt().base.as_u64()
}
