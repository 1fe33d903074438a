//! The hypervisor's GDT and TSS. VMX host state needs a non-null TR and flat selectors
//! with RPL 0 (SDM Vol. 3C §27.2.3), and the TSS gives double faults a known-good stack.

use alloc::boxed::Box;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot for the double-fault handler.
pub const DOUBLE_FAULT_IST: u16 = 0;

/// Selectors and bases the VMX host-state area needs.
#[derive(Clone, Copy, Debug)]
pub struct HostSegments {
    /// Code selector.
    pub code: u16,
    /// Data selector (DS/ES/SS).
    pub data: u16,
    /// Task register selector.
    pub tss: u16,
    /// Linear base of the TSS.
    pub tss_base: u64,
    /// Linear base of the GDT.
    pub gdt_base: u64,
}

static HOST: spin::Once<HostSegments> = spin::Once::new();

/// Builds and loads the GDT and TSS (once, on the boot CPU). Needs the heap.
pub fn init() -> HostSegments {
    *HOST.call_once(|| {
        let ist_stack: &'static mut [u8] =
            Box::leak(alloc::vec![0u8; 32 * 1024].into_boxed_slice());
        let mut tss = TaskStateSegment::new();
        let top = ist_stack.as_ptr() as u64 + ist_stack.len() as u64;
        tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = VirtAddr::new(top & !0xF);
        let tss: &'static TaskStateSegment = Box::leak(Box::new(tss));
        let gdt: &'static mut GlobalDescriptorTable =
            Box::leak(Box::new(GlobalDescriptorTable::new()));
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        let gdt: &'static GlobalDescriptorTable = gdt;
        gdt.load();
        // SAFETY: the selectors index the GDT just loaded, whose descriptors are a flat
        // 64-bit code segment, a flat data segment and an available TSS that lives forever.
        unsafe {
            CS::set_reg(code);
            SS::set_reg(data);
            DS::set_reg(data);
            ES::set_reg(data);
            load_tss(tss_sel);
        }
        HostSegments {
            code: code.0,
            data: data.0,
            tss: tss_sel.0,
            tss_base: tss as *const _ as u64,
            gdt_base: gdt as *const _ as u64,
        }
    })
}

/// The segments loaded by [`init`].
pub fn host_segments() -> Option<HostSegments> {
    HOST.get().copied()
}
