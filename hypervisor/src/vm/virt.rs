//! The CPU's virtualization extension, whichever this machine has: Intel VMX (EPT) or
//! AMD SVM (NPT). [`Virt::enable`] brings up the first one CPUID offers; [`HwCaps`] is
//! what the rest of the hypervisor may ask about it (copyable, vendor-tagged).
//!
//! The vendor is a property of the machine, fixed at boot: [`vendor`] answers for code
//! that has no [`Virt`] at hand (building a guest's nested tables before its vCPU).

use alloc::string::String;
use core::sync::atomic::{AtomicU8, Ordering};

use super::exits::Vendor;
use super::nested::Format;
use crate::svm::{Svm, SvmCaps};
use crate::vmx::caps::VmxCaps;
use crate::vmx::Vmx;

/// What the CPU offers, per vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwCaps {
    /// Intel VMX capability MSRs.
    Vmx(VmxCaps),
    /// AMD SVM CPUID leaf.
    Svm(SvmCaps),
}

impl HwCaps {
    /// Whose extension.
    pub fn vendor(&self) -> Vendor {
        match self {
            Self::Vmx(_) => Vendor::Vmx,
            Self::Svm(_) => Vendor::Svm,
        }
    }
}

/// The machine's virtualization extension, on.
pub struct Virt {
    /// What it offers.
    pub caps: HwCaps,
    svm: Option<Svm>,
    _vmx: Option<Vmx>,
}

static VENDOR: AtomicU8 = AtomicU8::new(0);

/// The vendor brought up at boot (VMX until then, and on the host).
pub fn vendor() -> Vendor {
    if VENDOR.load(Ordering::Relaxed) == 1 {
        Vendor::Svm
    } else {
        Vendor::Vmx
    }
}

/// The nested-paging format of this machine's vendor.
pub fn nested_format() -> Format {
    match vendor() {
        Vendor::Vmx => crate::vmx::ept::EPT,
        Vendor::Svm => crate::svm::npt::NPT,
    }
}

impl Virt {
    /// Enables VMX if the CPU has it, else SVM. The error says what is missing.
    pub fn enable() -> Result<Self, String> {
        if crate::vmx::cpu_has_vmx() {
            let v = crate::vmx::enable()?;
            return Ok(Self {
                caps: HwCaps::Vmx(v.caps),
                svm: None,
                _vmx: Some(v),
            });
        }
        let s = crate::svm::enable()?;
        VENDOR.store(1, Ordering::Relaxed);
        Ok(Self {
            caps: HwCaps::Svm(s.caps),
            svm: Some(s),
            _vmx: None,
        })
    }

    /// The SVM pages, on an AMD machine.
    pub fn svm(&self) -> Option<&Svm> {
        self.svm.as_ref()
    }

    /// Short name of the extension ("VMX" or "SVM").
    pub fn name(&self) -> &'static str {
        match self.caps {
            HwCaps::Vmx(_) => "VMX",
            HwCaps::Svm(_) => "SVM",
        }
    }
}
