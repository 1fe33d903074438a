//! Dirty-page tracking for live migration, three ways behind one interface (SDM Vol. 3C
//! §29.3.5 for EPT A/D flags, §29.3.6 for page-modification logging; APM Vol. 2
//! §15.25.5 for NPT, which has A/D flags and write protection but no PML):
//!
//! * [`Tracking::Pml`]: the CPU appends the GPA of every page whose EPT dirty flag it
//!   sets to a 512-entry log and exits when the log is full. Per round we drain the log
//!   and clear the dirty flags of the logged pages so that their next write is logged.
//! * [`Tracking::AccessedDirty`]: scan every leaf for its dirty flag and clear it.
//! * [`Tracking::WriteProtect`]: remove write permission from every leaf; each first
//!   write to a page exits (EPT violation), is recorded, and gets write access back.
//!
//! Each collects into the caller's sink the pages written since the previous collection,
//! plus the pages the hypervisor wrote on the guest's behalf (hypercall results), which
//! EPT never sees. Callers run between guest time slices (one CPU: the guest is not
//! running), with the guest's VMCS current for PML. The table bits come from the guest's
//! nested-paging [`Format`](super::nested::Format), so EPT and NPT share the code; a
//! flush after clearing flags or rights is INVEPT on VMX and TLB_CONTROL at the next
//! VMRUN on SVM.

use alloc::format;
use alloc::string::String;

use super::{nested, HwCaps, Tracking, Vm};
use crate::mm::bitmap::PageBitmap;
use crate::mm::phys::PhysPages;
use crate::vmx::caps;
use crate::vmx::vmcs::{self, w16, w32, w64};

impl Tracking {
    /// The best method this CPU offers.
    pub fn best(caps: &HwCaps) -> Self {
        match caps {
            HwCaps::Vmx(c) if c.pml() && c.ept_ad() => Self::Pml,
            HwCaps::Vmx(c) if c.ept_ad() => Self::AccessedDirty,
            HwCaps::Vmx(_) => Self::WriteProtect,
            // NPT has A/D flags (and no PML).
            HwCaps::Svm(_) => Self::AccessedDirty,
        }
    }

    /// Whether this CPU supports the method.
    pub fn supported(self, caps: &HwCaps) -> bool {
        match (self, caps) {
            (Self::Pml, HwCaps::Vmx(c)) => c.pml() && c.ept_ad(),
            (Self::AccessedDirty, HwCaps::Vmx(c)) => c.ept_ad(),
            (Self::Pml, HwCaps::Svm(_)) => false,
            (Self::AccessedDirty | Self::WriteProtect, HwCaps::Svm(_)) => true,
            (Self::WriteProtect, HwCaps::Vmx(_)) => true,
        }
    }

    /// Short name (console and figures).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pml => "pml",
            Self::AccessedDirty => "ad",
            Self::WriteProtect => "wp",
        }
    }

    /// Parses a short name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pml" => Some(Self::Pml),
            "ad" => Some(Self::AccessedDirty),
            "wp" => Some(Self::WriteProtect),
            _ => None,
        }
    }
}

impl Vm {
    /// Starts tracking with `method` (the VMCS must be current). Pages written before
    /// this call are not reported: round 0 sends everything anyway.
    pub fn start_tracking(&mut self, method: Tracking, caps: &HwCaps) -> Result<(), String> {
        if !method.supported(caps) {
            return Err(format!(
                "dirty tracking '{}' is not supported by this CPU",
                method.name()
            ));
        }
        if !self.ad_enabled && method != Tracking::WriteProtect {
            return Err("nested A/D flags are off for this guest".into());
        }
        let pages = self.pages();
        let bitmap =
            PageBitmap::new(pages).map_err(|_| String::from("no heap for the dirty bitmap"))?;
        let fmt = self.fmt;
        let leaves = nested::leaves_mut(self.ept.as_u64_mut(), pages);
        match method {
            Tracking::WriteProtect => fmt.write_protect_all(leaves),
            Tracking::AccessedDirty => fmt.take_dirty_flags(leaves, |_| {}),
            Tracking::Pml => {
                fmt.take_dirty_flags(leaves, |_| {});
                let pml = PhysPages::alloc(1).map_err(|e| format!("PML buffer: {e}"))?;
                let e = |e: vmcs::VmcsError| format!("{e}");
                vmcs::write(w64::PML_ADDRESS, pml.base()).map_err(e)?;
                vmcs::write(w16::GUEST_PML_INDEX, 511).map_err(e)?;
                let proc2 = vmcs::read(w32::SECONDARY_CONTROLS) as u32 | caps::proc2::PML;
                vmcs::write(w32::SECONDARY_CONTROLS, proc2.into()).map_err(e)?;
                self.pml = Some(pml);
            }
        }
        self.flush_nested();
        self.dirty = Some(bitmap);
        self.tracking = Some(method);
        Ok(())
    }

    /// Reports every page written since the last call (or since tracking started) to
    /// `sink`, possibly more than once, and re-arms tracking for those pages.
    pub fn collect_dirty(&mut self, mut sink: impl FnMut(usize)) {
        let Some(method) = self.tracking else { return };
        let pages = self.pages();
        // A page reported written loses its free-page hint: its dirty flag is cleared
        // below, so the hint could not tell it was written any more.
        let mut free = self.free.take();
        let mut sink = |pfn: usize| {
            if let Some(f) = free.as_mut() {
                f.unset(pfn);
            }
            sink(pfn)
        };
        if method == Tracking::Pml {
            self.drain_pml();
        }
        let Some(mut dirty) = self.dirty.take() else {
            return;
        };
        let fmt = self.fmt;
        let leaves = nested::leaves_mut(self.ept.as_u64_mut(), pages);
        if method == Tracking::AccessedDirty {
            fmt.take_dirty_flags(leaves, &mut sink);
        }
        // The bitmap holds what write protection and PML found, and the pages the
        // hypervisor wrote itself; re-arm tracking for each as it is reported.
        dirty.drain(|pfn| {
            match method {
                Tracking::Pml => fmt.clear_dirty(leaves, pfn),
                Tracking::WriteProtect => fmt.write_protect(leaves, pfn),
                Tracking::AccessedDirty => {}
            }
            sink(pfn);
        });
        self.dirty = Some(dirty);
        self.free = free;
        self.flush_nested();
    }

    /// Stops tracking and restores normal EPT permissions (the VMCS must be current).
    pub fn stop_tracking(&mut self) {
        let Some(method) = self.tracking.take() else {
            return;
        };
        let pages = self.pages();
        match method {
            Tracking::WriteProtect => {
                let fmt = self.fmt;
                fmt.write_enable_all(nested::leaves_mut(self.ept.as_u64_mut(), pages))
            }
            Tracking::AccessedDirty => {}
            Tracking::Pml => {
                let proc2 = vmcs::read(w32::SECONDARY_CONTROLS) as u32 & !caps::proc2::PML;
                let _ = vmcs::write(w32::SECONDARY_CONTROLS, proc2.into());
                self.pml = None;
            }
        }
        self.dirty = None;
        self.flush_nested();
    }
}
