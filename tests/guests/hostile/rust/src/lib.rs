//! Hostile guest, the Rust half: the attacks most natural in Rust, each a
//! method, driven by `tests/e2e/hostile.rs`.

use std::hint::black_box;
use std::io::Write;

use wasm_task_guest::export;

/// Answers nothing, as proof the guest runs.
fn ok(_: ()) -> Result<(), String> {
    Ok(())
}

/// Panics with the given message.
fn panic_with(message: String) -> Result<(), String> {
    panic!("{message}")
}

/// Aborts without unwinding or a message.
fn abort(_: ()) -> Result<(), String> {
    std::process::abort()
}

/// Ends the instance with WASI `proc_exit(code)`.
fn exit(code: i32) -> Result<(), String> {
    std::process::exit(code)
}

/// Allocates 1 MiB blocks, touching each, until the allocator gives up.
fn allocate_forever(_: ()) -> Result<usize, String> {
    let mut blocks = Vec::new();
    loop {
        blocks.push(black_box(vec![1u8; 1 << 20]));
        black_box(&blocks);
    }
}

/// Recurses without end (the base case is out of reach); the work after
/// the call keeps it off the tail.
fn recurse(depth: u64) -> Result<u64, String> {
    if depth == u64::MAX {
        return Ok(0);
    }
    let deeper = recurse(black_box(depth + 1))?;
    Ok(black_box(deeper) + 1)
}

/// Prints `mib` MiB of lines to stdout and as many to stderr.
fn print_flood(mib: usize) -> Result<(), String> {
    let line = "y".repeat(63);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    for _ in 0..mib * (1 << 20) / 64 {
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        writeln!(err, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

export! {
    methods: {
        "ok" => ok,
        "panic" => panic_with,
        "abort" => abort,
        "exit" => exit,
        "allocate_forever" => allocate_forever,
        "recurse" => recurse,
        "print_flood" => print_flood,
    },
}
