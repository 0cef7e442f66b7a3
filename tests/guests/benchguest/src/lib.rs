//! The guest the benchmark measures: no hooks, so that a checkout costs
//! exactly its calls.

use serde_bytes::Bytes;
use sha2::{Digest, Sha256};
use wasm_task_guest::export;

/// Returns its bytes unchanged, borrowing them from the request.
fn echo(bytes: &Bytes) -> Result<&Bytes, String> {
    Ok(bytes)
}

/// Does nothing: the cheapest possible call.
fn nop(_: ()) -> Result<(), String> {
    Ok(())
}

/// Hashes a 32-byte state `rounds` times with SHA-256: CPU work of a known size.
fn burn(rounds: u32) -> Result<u64, String> {
    let mut state = [7u8; 32];
    for _ in 0..rounds {
        state = Sha256::digest(state).into();
    }
    Ok(u64::from_le_bytes(state[..8].try_into().expect("8 bytes")))
}

/// Size of the guest's linear memory, in bytes.
fn linear_memory(_: ()) -> Result<u64, String> {
    #[cfg(target_family = "wasm")]
    let pages = core::arch::wasm32::memory_size(0) as u64;
    #[cfg(not(target_family = "wasm"))]
    let pages = 0;
    Ok(pages * 65536)
}

export! {
    methods: { "echo" => echo, "nop" => nop, "burn" => burn, "linear_memory" => linear_memory },
}
