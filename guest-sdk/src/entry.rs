//! The bodies of the exports that [`export!`](crate::export) generates.
//!
//! Each export is one call into this module, so the code generated in the
//! guest crate stays a few lines and the logic stays in this crate, next to
//! its tests.
//!
//! Addresses cross the ABI as `i32`: exact on wasm32, where pointers are 32
//! bits wide, and meaningless natively, where these functions are compiled
//! but never called.

use std::fmt::Display;
use std::sync::Once;

use crate::dispatch::{self, Method};
use crate::{logger, memory, panic, reply};

/// Implements `wasm_task_alloc`: `len` bytes for a request, or 0.
pub fn alloc(len: i32) -> i32 {
    start();
    memory::alloc(abi_len(len)) as usize as i32
}

/// Implements `wasm_task_call`: runs the named method, returns the reply record.
///
/// # Safety
///
/// `buf` must come from [`alloc`] with `method_len + args_len` as its
/// length, hold that many initialized bytes, and not be used afterwards.
pub unsafe fn call(methods: &[Method], buf: i32, method_len: i32, args_len: i32) -> i32 {
    start();
    let (method_len, args_len) = (abi_len(method_len), abi_len(args_len));

    // SAFETY: the caller's promise is exactly `Request::take`'s contract.
    let request = unsafe { memory::Request::take(abi_ptr(buf), method_len + args_len) };
    let (method, args) = request.bytes().split_at(method_len);
    reply::publish(|out| dispatch::dispatch(methods, method, args, out))
}

/// Implements `wasm_task_methods`: the method names, one a line.
pub fn methods(methods: &[Method]) -> i32 {
    start();
    reply::publish(|out| dispatch::list(methods, out))
}

/// Implements the `wasm_task_setup` and `wasm_task_checkout_done` hooks.
pub fn hook<E: Display>(hook: impl FnOnce() -> Result<(), E>) -> i32 {
    start();
    reply::publish(|out| dispatch::run_hook(hook, out))
}

/// Reads an ABI length: wasm's `i32` is untyped, lengths are unsigned.
fn abi_len(len: i32) -> usize {
    len as u32 as usize
}

/// Reads an ABI address, unsigned like a length.
fn abi_ptr(addr: i32) -> *mut u8 {
    addr as u32 as usize as *mut u8
}

/// Installs the logger and the panic hook on the first export call.
///
/// Rust has no stable way to run library code when the module is
/// instantiated, and the first export call is early enough: guest code
/// runs only inside exports.
fn start() {
    static START: Once = Once::new();
    START.call_once(|| {
        logger::install();
        panic::install();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: &[Method] = &[
        Method::new("first", |args, out| {
            dispatch::run_method("first", Ok::<u8, String>, args, out)
        }),
        Method::new("second", |args, out| {
            dispatch::run_method("second", Ok::<u8, String>, args, out)
        }),
    ];

    #[test]
    fn methods_export_publishes_the_names() {
        methods(METHODS);
        assert_eq!(reply::last(), (0, b"first\nsecond".to_vec()));
    }

    #[test]
    fn hook_export_publishes_the_error() {
        hook(|| Err("config missing"));
        assert_eq!(reply::last(), (1, b"config missing".to_vec()));
        hook(|| Ok::<(), String>(()));
        assert_eq!(reply::last(), (0, Vec::new()));
    }
}
