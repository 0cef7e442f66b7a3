//! Random bytes that differ from worker to worker.
//!
//! When the daemon forks workers from a zygote, each starts from a copy of
//! the zygote's memory, so a generator or hash seed drawn in `init` has the
//! same value in every worker. WASI's `random_get` is the source that does
//! differ: the daemon gives every worker its own.

use std::io;

use crate::host;

/// Reads 32 random bytes from WASI's `random_get`, fresh in every worker.
///
/// Use it to seed a generator or a keyed hasher that must differ between
/// workers. Called in `setup` or later, its bytes are the worker's own; in
/// `init` they are the zygote's, copied into every worker. The `reseed` key
/// of [`export!`](crate::export) calls it at the start of every worker's
/// setup and hands the bytes to your function.
///
/// # Errors
///
/// Fails if the host's `random_get` reports an error. The error holds
/// WASI's errno as a raw OS error, so it prints as the errno's description.
///
/// On native targets, where guests are only compiled and unit-tested, the
/// bytes come from the standard library's per-process hash keys instead:
/// they differ from call to call but are not fit for cryptography.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// static NONCE: AtomicU64 = AtomicU64::new(0);
///
/// fn next_nonce(_: ()) -> Result<u64, String> {
///     Ok(NONCE.fetch_add(1, Ordering::Relaxed))
/// }
///
/// // Each worker counts from its own random start, even those forked
/// // from a zygote.
/// fn reseed(seed: [u8; 32]) {
///     let start = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes"));
///     NONCE.store(start, Ordering::Relaxed);
/// }
///
/// wasm_task_guest::export! {
///     methods: { "next_nonce" => next_nonce },
///     reseed: reseed,
/// }
///
/// let seed = wasm_task_guest::fresh_seed().expect("random bytes");
/// assert_ne!(seed, wasm_task_guest::fresh_seed().expect("random bytes"));
/// ```
pub fn fresh_seed() -> io::Result<[u8; 32]> {
    let mut seed = [0; 32];
    host::random_get(&mut seed)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_seeds_differ() {
        let first = fresh_seed().unwrap();
        let second = fresh_seed().unwrap();
        assert_ne!(first, second);
        assert_ne!(first, [0; 32]);
    }
}
