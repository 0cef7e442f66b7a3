//! The daemon's imports (module `wasm_task`, and WASI's `random_get`),
//! behind safe functions.
//!
//! Natively there is no daemon: the functions do nothing, or stand in with
//! what the native standard library offers, so guest crates and their unit
//! tests build and run on the developer's machine.

use std::io;

#[cfg(target_family = "wasm")]
mod imports {
    #[link(wasm_import_module = "wasm_task")]
    unsafe extern "C" {
        /// Emits a log record; the daemon relays it with the current reply.
        pub(super) fn log(
            level: i32,
            target_ptr: *const u8,
            target_len: usize,
            msg_ptr: *const u8,
            msg_len: usize,
        );

        /// Emits a log record with key-value fields, encoded as
        /// `docs/abi.md` describes.
        pub(super) fn log_fields(
            level: i32,
            target_ptr: *const u8,
            target_len: usize,
            msg_ptr: *const u8,
            msg_len: usize,
            fields_ptr: *const u8,
            fields_len: usize,
        );

        /// Sets the text the daemon reports if the guest traps in this export.
        pub(super) fn trap_message(ptr: *const u8, len: usize);
    }

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        /// Fills `len` bytes at `buf` with random bytes; returns a WASI errno.
        ///
        /// The wasm signature, `(i32, i32) -> i32`, is the one the standard
        /// library and `getrandom` declare too, so the linker merges them.
        pub(super) fn random_get(buf: *mut u8, len: usize) -> i32;
    }
}

/// Sends a log record to the daemon.
#[cfg(target_family = "wasm")]
pub(crate) fn log(level: log::Level, target: &str, message: &str) {
    // SAFETY: both pointers address live strings of the given lengths, and
    // the daemon only reads them before returning.
    unsafe {
        imports::log(level as i32, target.as_ptr(), target.len(), message.as_ptr(), message.len())
    }
}

/// Sends a log record to the daemon: without one, nothing.
#[cfg(not(target_family = "wasm"))]
pub(crate) fn log(_level: log::Level, _target: &str, _message: &str) {}

/// Sends a log record with encoded key-value fields to the daemon.
#[cfg(target_family = "wasm")]
pub(crate) fn log_fields(level: log::Level, target: &str, message: &str, fields: &[u8]) {
    // SAFETY: the three pointers address live buffers of the given lengths,
    // and the daemon only reads them before returning.
    unsafe {
        imports::log_fields(
            level as i32,
            target.as_ptr(),
            target.len(),
            message.as_ptr(),
            message.len(),
            fields.as_ptr(),
            fields.len(),
        )
    }
}

/// Sends a log record with fields to the daemon: without one, nothing.
#[cfg(not(target_family = "wasm"))]
pub(crate) fn log_fields(_level: log::Level, _target: &str, _message: &str, _fields: &[u8]) {}

/// Tells the daemon what to report if the guest traps before this export returns.
#[cfg(target_family = "wasm")]
pub(crate) fn trap_message(text: &str) {
    // SAFETY: the pointer addresses a live string of the given length, and
    // the daemon copies it before returning.
    unsafe { imports::trap_message(text.as_ptr(), text.len()) }
}

/// Tells the daemon what to report if the guest traps: without one, nothing.
#[cfg(not(target_family = "wasm"))]
pub(crate) fn trap_message(_text: &str) {}

/// Fills `buf` with random bytes from WASI's `random_get`.
///
/// The error is WASI's errno, which `std` on wasm32-wasip1 reads as a raw OS
/// error, so it prints as the errno's description.
#[cfg(target_family = "wasm")]
pub(crate) fn random_get(buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: the pointer addresses a live, writable buffer of the given
    // length, and the host writes nothing outside it.
    let errno = unsafe { imports::random_get(buf.as_mut_ptr(), buf.len()) };
    match errno {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Fills `buf` with bytes from the native standard library's hash keys.
///
/// Each [`RandomState`](std::hash::RandomState) hashes differently, so the
/// bytes differ from call to call. They are not fit for cryptography, but
/// native builds only compile and unit-test guests; they never serve calls.
#[cfg(not(target_family = "wasm"))]
pub(crate) fn random_get(buf: &mut [u8]) -> io::Result<()> {
    use std::hash::{BuildHasher, RandomState};

    for chunk in buf.chunks_mut(8) {
        let word = RandomState::new().hash_one(()).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    Ok(())
}
