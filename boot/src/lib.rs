//! The boot stage: the first code that runs after GRUB.
//!
//! GRUB (Multiboot2, see the Multiboot2 specification §3.2) enters `_start` in 32-bit
//! protected mode with paging off, EAX holding the magic 0x36d76289 and EBX the physical
//! address of the boot information. This stage
//!
//! 1. saves EAX/EBX, sets up a stack,
//! 2. identity-maps the first 4 GiB with 2 MiB pages (RAM, the e1000 BAR at 0xc0000000,
//!    the local APIC at 0xfee00000 all live there),
//! 3. enables PAE, long mode (EFER.LME) and paging, loads a minimal 64-bit GDT,
//! 4. far-jumps to 64-bit code and calls `kernel_main(magic, info)` in the hypervisor.
//!
//! Everything here is assembly: no Rust code can run before long mode. The hypervisor
//! replaces the GDT later; it keeps these page tables (identity mapping is what lets it
//! treat physical addresses as pointers, see `hypervisor::mm`).
//!
//! Stack size is fixed here; the hypervisor does deep work (TCP, EPT walks) on it.
#![no_std]

/// Size of the boot (and only) hypervisor stack.
pub const STACK_SIZE: usize = 512 * 1024;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
.set MB2_MAGIC, 0xe85250d6
.set MB2_ARCH, 0
.section .multiboot_header, "a"
.balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH + (mb2_header_end - mb2_header_start))
    /* end tag */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

.section .bss.boot, "aw", @nobits
.balign 4096
boot_pml4:   .skip 4096
boot_pdpt:   .skip 4096
boot_pds:    .skip 4096 * 4
boot_stack_bottom:
    .skip {stack_size}
.global boot_stack_top
boot_stack_top:

.section .data.boot, "aw"
.balign 8
boot_mb_magic: .long 0
boot_mb_info:  .long 0
.balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .text.boot, "ax"
.code32
.global _start
_start:
    cli
    cld
    movl %eax, boot_mb_magic
    movl %ebx, boot_mb_info
    movl $boot_stack_top, %esp

    /* PD entries: 2048 x 2 MiB pages covering 0..4 GiB, present|writable|PS */
    movl $boot_pds, %edi
    movl $0x83, %eax
    xorl %edx, %edx
    movl $2048, %ecx
1:
    movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $0x200000, %eax
    adcl $0, %edx
    addl $8, %edi
    loop 1b

    /* PDPT[0..4] -> the four PDs */
    movl $boot_pdpt, %edi
    movl $boot_pds, %eax
    orl $0x3, %eax
    movl $4, %ecx
2:
    movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 2b

    /* PML4[0] -> PDPT */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $0, boot_pml4 + 4

    /* CR4.PAE */
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME | EFER.NXE */
    movl $0xC0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax
    wrmsr
    /* CR0.PG | CR0.PE | CR0.NE | CR0.WP */
    movl %cr0, %eax
    orl $0x80010021, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $boot_long_mode

.code64
boot_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorq %rbp, %rbp
    movl boot_mb_magic, %edi
    movl boot_mb_info, %esi
    call kernel_main
3:
    cli
    hlt
    jmp 3b
"#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);
