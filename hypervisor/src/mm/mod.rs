//! Physical memory: the frame allocator ([`frames`]), owned page ranges and the
//! identity-mapped view of physical memory ([`phys`]), and the kernel heap ([`heap`]).
//!
//! The boot stage identity-maps the first 4 GiB, so a physical address below 4 GiB is
//! also a valid pointer. Only [`phys`] turns addresses into references.

pub mod bitmap;
pub mod frames;
pub mod heap;
pub mod phys;

/// Size of a page/frame.
pub const PAGE_SIZE: u64 = 4096;
