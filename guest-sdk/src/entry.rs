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
use std::io;
use std::sync::Once;

use crate::dispatch::{self, Method};
use crate::{logger, memory, panic, reply, seed};

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

/// Implements the `wasm_task_init`, `wasm_task_setup` and
/// `wasm_task_checkout_done` hooks.
pub fn hook<E: Display>(hook: impl FnOnce() -> Result<(), E>) -> i32 {
    start();
    reply::publish(|out| dispatch::run_hook(hook, out))
}

/// The `reseed` step of `wasm_task_setup`: hands `reseed` 32 fresh random
/// bytes.
///
/// The error is text, like [`setup_step`]'s, so that both steps can share
/// one hook.
pub fn reseed(reseed: impl FnOnce([u8; 32])) -> Result<(), String> {
    reseed_from(seed::fresh_seed, reseed)
}

/// The guest's own step of `wasm_task_setup`, its error as text.
pub fn setup_step<E: Display>(setup: impl FnOnce() -> Result<(), E>) -> Result<(), String> {
    setup().map_err(|e| e.to_string())
}

/// Hands `reseed` the bytes `read` returns; without them, `reseed` never runs.
fn reseed_from(
    read: impl FnOnce() -> io::Result<[u8; 32]>,
    reseed: impl FnOnce([u8; 32]),
) -> Result<(), String> {
    let seed =
        read().map_err(|e| format!("reseeding: reading 32 bytes from WASI random_get: {e}"))?;
    reseed(seed);
    Ok(())
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

    #[test]
    fn reseed_is_not_run_when_random_bytes_are_missing() {
        let unsupported = || Err(io::Error::from(io::ErrorKind::Unsupported));
        let result = reseed_from(unsupported, |_| panic!("reseed ran without a seed"));
        let message = result.unwrap_err();
        assert!(
            message.starts_with("reseeding: reading 32 bytes from WASI random_get: "),
            "{message}"
        );
    }

    #[test]
    fn reseed_gets_fresh_bytes_each_time() {
        let mut seeds = Vec::new();
        reseed(|seed| seeds.push(seed)).unwrap();
        reseed(|seed| seeds.push(seed)).unwrap();
        assert_ne!(seeds[0], seeds[1]);
    }

    /// A module with every hook, each recording that it ran.
    mod generated {
        use std::sync::Mutex;

        /// The hooks that ran, in order.
        pub(super) static RAN: Mutex<Vec<&str>> = Mutex::new(Vec::new());

        fn ran(hook: &'static str) {
            RAN.lock().unwrap().push(hook);
        }

        crate::export! {
            methods: {},
            init: || {
                ran("init");
                Ok::<(), String>(())
            },
            reseed: |_| ran("reseed"),
            setup: || {
                ran("setup");
                Err("setup failed on purpose")
            },
            checkout_done: || {
                ran("checkout_done");
                Ok::<(), String>(())
            },
        }
    }

    // SAFETY: `export!` in `generated` defines these functions with exactly
    // these signatures; they take nothing and touch only this crate's state.
    unsafe extern "C" {
        safe fn wasm_task_init() -> i32;
        safe fn wasm_task_setup() -> i32;
    }

    #[test]
    fn generated_setup_reseeds_before_the_guests_setup() {
        wasm_task_init();
        assert_eq!(reply::last(), (0, Vec::new()));
        wasm_task_setup();
        assert_eq!(reply::last(), (1, b"setup failed on purpose".to_vec()));
        assert_eq!(*generated::RAN.lock().unwrap(), ["init", "reseed", "setup"]);
    }
}
