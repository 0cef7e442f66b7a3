//! Request buffers: handed to the daemon by `wasm_task_alloc`, taken back by
//! `wasm_task_call`.
//!
//! Both sides compute the layout with [`layout`], so a buffer is always
//! freed with the layout it was allocated with.

use std::alloc::{self, Layout};
use std::{ptr, slice};

/// Allocates `len` bytes for the daemon to write a request into.
///
/// Returns null when the allocator fails or `len` is too large for a
/// layout; the ABI reads the resulting 0 as out of memory.
pub(crate) fn alloc(len: usize) -> *mut u8 {
    match layout(len) {
        // SAFETY: `layout` never has a size of zero.
        Some(layout) => unsafe { alloc::alloc(layout) },
        None => ptr::null_mut(),
    }
}

/// The layout of a request buffer of `len` bytes.
///
/// A zero-length request still gets one byte: the global allocator must not
/// be asked for zero bytes, and a real address keeps `take` uniform.
fn layout(len: usize) -> Option<Layout> {
    Layout::from_size_align(len.max(1), 1).ok()
}

/// A request buffer owned again by the guest; freed on drop.
#[derive(Debug)]
pub(crate) struct Request {
    ptr: *mut u8,
    len: usize,
}

impl Request {
    /// Takes back ownership of a buffer that [`alloc()`] handed out.
    ///
    /// # Safety
    ///
    /// `ptr` must have come from `alloc(len)` with the same `len`, all `len`
    /// bytes must be initialized, and nothing may use or free `ptr` later.
    pub(crate) unsafe fn take(ptr: *mut u8, len: usize) -> Request {
        Request { ptr, len }
    }

    /// The request's bytes: the method name followed by the arguments.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `take`'s contract: `len` initialized bytes we own at `ptr`.
        unsafe { slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let layout = layout(self.len).expect("a layout that allocated once is valid");
        // SAFETY: `take`'s contract: `ptr` came from `alloc` with this `len`,
        // and so with this layout, and nobody else frees it.
        unsafe { alloc::dealloc(self.ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_returns_the_bytes_written_into_its_buffer() {
        let ptr = alloc(5);
        assert!(!ptr.is_null());
        // SAFETY: `alloc(5)` returned five writable bytes.
        unsafe { ptr.copy_from_nonoverlapping(b"hello".as_ptr(), 5) };

        // SAFETY: from `alloc(5)`, all five bytes written, not used again.
        let request = unsafe { Request::take(ptr, 5) };
        assert_eq!(request.bytes(), b"hello");
    }

    #[test]
    fn empty_request_gets_a_real_address() {
        let ptr = alloc(0);
        assert!(!ptr.is_null());
        // SAFETY: from `alloc(0)`; zero bytes are trivially initialized.
        let request = unsafe { Request::take(ptr, 0) };
        assert!(request.bytes().is_empty());
    }

    #[test]
    fn impossible_sizes_report_out_of_memory() {
        assert!(alloc(usize::MAX).is_null());
    }
}
