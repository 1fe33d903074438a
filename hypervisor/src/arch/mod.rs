//! Hardware access. Together with [`crate::mm::phys`] this is where the hypervisor's
//! `unsafe` lives: each function here wraps one privileged instruction or device access
//! behind a safe signature, with a `// SAFETY:` note on why the wrapper is sound.
//!
//! The wrappers assume ring 0 on x86-64 (the only way this kernel runs). On the host the
//! module compiles (so clippy and the type checker see it) but is never called.

pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod mmio;
pub mod pit;
pub mod port;
pub mod serial;
pub mod svm;
pub mod vmx;
