//! AMD SVM instructions (AMD APM Vol. 2 ch. 15) and the VMRUN/#VMEXIT stub.
//!
//! The callers in [`crate::svm`] own the pages passed here (host save area, VMCBs) as
//! [`PhysPages`] that live at least as long as SVM uses them.
//!
//! One entry goes through [`enter`]: CLGI, VMSAVE of the host's hidden state (FS, GS,
//! TR, LDTR, KernelGsBase, STAR/LSTAR/...), VMLOAD of the guest's, STI (GIF = 0 still
//! holds every interrupt off; the point is that VMRUN saves the host's RFLAGS.IF = 1, so
//! that with V_INTR_MASKING a physical interrupt reaches the INTR intercept, APM
//! 15.21.4), VMRUN; after #VMEXIT: CLI, VMSAVE of the guest's hidden state, VMLOAD of the
//! host's, STGI. Interrupts stay off in the host (IF = 0 after the stub), so a pending
//! interrupt is never taken by the host: the caller acknowledges it at the PIC.
//!
//! [`PhysPages`]: crate::mm::phys::PhysPages

pub use super::vmx::GuestRegs;

/// EFER (MSR 0xC000_0080); bit 12 is SVME.
pub const MSR_EFER: u32 = 0xC000_0080;
/// EFER.SVME.
pub const EFER_SVME: u64 = 1 << 12;
/// VM_CR (MSR 0xC001_0114); bit 4 SVMDIS: SVM disabled by the firmware.
pub const MSR_VM_CR: u32 = 0xC001_0114;
/// VM_HSAVE_PA (MSR 0xC001_0117): the host save area VMRUN writes.
pub const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.section .text
.global svm_enter
/* rdi = &mut GuestRegs (RAX and RSP live in the VMCB), rsi = guest VMCB physical
   address, rdx = host VMCB physical address (VMSAVE/VMLOAD area of the host). */
svm_enter:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi
    pushq %rsi
    pushq %rdx
    clgi
    movq %rdx, %rax
    vmsave %rax
    movq %rsi, %rax
    vmload %rax
    sti
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
    vmrun %rax
    /* #VMEXIT: RAX and RSP are the host's again (from the save area), every other
       GPR holds the guest's value. Stack: host VMCB, guest VMCB, regs pointer. */
    cli
    pushq %rdi
    movq 24(%rsp), %rdi
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
    movq 8(%rsp), %rax
    vmsave %rax
    movq (%rsp), %rax
    vmload %rax
    stgi
    addq $24, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
"#,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    fn svm_enter(regs: *mut GuestRegs, vmcb: u64, host_vmcb: u64);
}

/// Runs the guest of the VMCB at physical `vmcb` until the next #VMEXIT, with `regs`
/// (all but RAX and RSP, which the VMCB holds); `host_vmcb` receives the host's
/// VMSAVE state for the duration.
pub fn enter(regs: &mut GuestRegs, vmcb: u64, host_vmcb: u64) {
    #[cfg(target_os = "none")]
    // SAFETY: `vmcb` is a complete VMCB owned by the caller (its intercepts include
    // VMRUN, its ASID is not 0), EFER.SVME is set and VM_HSAVE_PA points at an owned
    // page, so VMRUN either runs the guest and returns here at #VMEXIT with RSP and RAX
    // restored from the save area, or exits at once with VMEXIT_INVALID; the stub saves
    // and restores the callee-saved registers; `regs` is exclusively borrowed.
    unsafe {
        svm_enter(regs, vmcb, host_vmcb)
    };
    #[cfg(not(target_os = "none"))]
    let _ = (regs, vmcb, host_vmcb);
}

/// Acknowledges the highest pending interrupt at the master 8259 without taking it
/// (OCW3 poll: the read is the INTA cycle), then ends it (non-specific EOI). Returns
/// the IRQ acknowledged, if any. For the slice timer: the host runs with IF = 0.
pub fn pic_ack() -> Option<u8> {
    use super::port::{inb, outb};
    outb(0x20, 0x0C);
    let v = inb(0x20);
    if v & 0x80 == 0 {
        return None;
    }
    outb(0x20, 0x20);
    Some(v & 7)
}

/// Programs the 8254 PIT channel 0 as a rate generator at about `hz` (IRQ 0) and masks
/// every other 8259 input, so that a guest's INTR intercept fires at that rate.
pub fn start_slice_timer(hz: u32) {
    use super::port::outb;
    let count = (1_193_182 / hz.max(19)).min(0xFFFF) as u16;
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2 (rate generator)
    outb(0x40, count as u8);
    outb(0x40, (count >> 8) as u8);
    outb(0x21, 0xFE); // master: IRQ 0 only
    outb(0xA1, 0xFF); // slave: nothing
    while pic_ack().is_some() {}
}

/// Sets EFER.SVME (APM 15.4).
pub fn enable_svme() {
    let efer = super::cpu::rdmsr(MSR_EFER);
    super::cpu::wrmsr(MSR_EFER, efer | EFER_SVME);
}
