//! [`TakeOnce`]: a `static` whose contents can be borrowed mutably exactly once.
//!
//! Guests have no allocator; large, long-lived buffers (the NIC's rings and frames, socket
//! buffers, a key-value table) live in statics. `TakeOnce` hands out the one
//! `&'static mut` to such a static without `static mut` and without `unsafe` in the
//! guest: the first [`TakeOnce::take`] gets it, every later call gets `None`.
//!
//! The contents live in the image's `.data` (zeros are stored in the file), so they
//! move with the guest on a migration like the rest of its memory.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// A value in a `static` that one caller may borrow mutably for the rest of the program.
pub struct TakeOnce<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the only access to `value` is the `&mut T` that `take` hands out at most once
// (guarded by the atomic swap), so sharing the `TakeOnce` itself between threads never
// gives two threads access to `T`; handing that `&mut T` to another thread moves access to
// `T`, hence the `T: Send` bound.
unsafe impl<T: Send> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    /// A not yet taken value.
    pub const fn new(value: T) -> Self {
        Self {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, the first time; `None` on every later call.
    // A `&mut` from `&self` is this type's purpose: the swap makes it unique.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::SeqCst) {
            return None;
        }
        // SAFETY: the swap above returns `false` exactly once for this static, so this is
        // the only reference to `value` ever created; the static lives for the rest of the
        // program, and nothing else reads or writes `value` (the field is private).
        Some(unsafe { &mut *self.value.get() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_once() {
        static CELL: TakeOnce<[u8; 4]> = TakeOnce::new([1, 2, 3, 4]);
        let a = CELL.take().unwrap();
        a[0] = 9;
        assert!(CELL.take().is_none());
        assert_eq!(*a, [9, 2, 3, 4]);
    }
}
