//! The guest the end-to-end tests drive: one method per behaviour a worker
//! must handle (results, errors, state, traps, timeouts, blocking calls,
//! logs with fields and output, the filesystem sandbox) plus both hooks,
//! counted; setup fails on demand through a control file.
//!
//! Counters live in statics, so they last as long as the worker instance and
//! tell the tests which instance answered and what ran on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::{fs, hint, thread};

use serde::{Deserialize, Serialize};
use wasm_task_guest::{export, log};

/// Times the setup hook ran on this instance (should be 1).
static SETUP_CALLS: AtomicU64 = AtomicU64::new(0);
/// Times the checkout-done hook ran on this instance.
static CHECKOUT_DONE_CALLS: AtomicU64 = AtomicU64::new(0);
/// Method calls this instance served, counting the one being served.
static CALLS: AtomicU64 = AtomicU64::new(0);
/// The value behind `incr`.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Random, drawn in setup, so tests can tell instances apart.
static INSTANCE_ID: AtomicU64 = AtomicU64::new(0);

/// Counts a method call; every method starts with it.
fn called() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Returns its argument, whatever MessagePack value it is.
fn echo(value: rmpv::Value) -> Result<rmpv::Value, String> {
    called();
    Ok(value)
}

/// Arguments of [`add`].
#[derive(Debug, Deserialize)]
struct AddArgs {
    a: i64,
    b: i64,
    label: String,
}

/// Result of [`add`].
#[derive(Debug, Serialize)]
struct AddResult {
    sum: i64,
    label: String,
}

/// Adds two numbers and upper-cases the label, as proof the guest ran.
fn add(args: AddArgs) -> Result<AddResult, String> {
    called();
    let sum =
        args.a.checked_add(args.b).ok_or_else(|| format!("{} + {} overflows", args.a, args.b))?;
    Ok(AddResult { sum, label: args.label.to_uppercase() })
}

/// Increments the instance's counter and returns its new value.
fn incr(_: ()) -> Result<u64, String> {
    called();
    Ok(COUNTER.fetch_add(1, Ordering::Relaxed) + 1)
}

/// Result of [`stats`].
#[derive(Debug, Serialize)]
struct Stats {
    setup_calls: u64,
    checkout_done_calls: u64,
    calls: u64,
    instance_id: u64,
}

/// Reports the instance's counters and id.
fn stats(_: ()) -> Result<Stats, String> {
    called();
    Ok(Stats {
        setup_calls: SETUP_CALLS.load(Ordering::Relaxed),
        checkout_done_calls: CHECKOUT_DONE_CALLS.load(Ordering::Relaxed),
        calls: CALLS.load(Ordering::Relaxed),
        instance_id: INSTANCE_ID.load(Ordering::Relaxed),
    })
}

/// Fails in an orderly way with the given message.
fn fail(message: String) -> Result<(), String> {
    called();
    Err(message)
}

/// Panics with the given message, which traps the instance.
fn panic_with(message: String) -> Result<(), String> {
    called();
    panic!("{message}")
}

/// Never returns: a busy loop in pure wasm, for deadline tests.
fn spin(_: ()) -> Result<(), String> {
    called();
    let mut turns = 0u64;
    loop {
        // `black_box` keeps the optimizer from proving the loop useless.
        turns = hint::black_box(turns.wrapping_add(1));
    }
}

/// Blocks in a WASI call for `ms` milliseconds and returns `ms`.
fn sleep_ms(ms: u64) -> Result<u64, String> {
    called();
    thread::sleep(Duration::from_millis(ms));
    Ok(ms)
}

/// Allocates and touches `mib` MiB, to run into the daemon's memory limit.
fn allocate(mib: usize) -> Result<u64, String> {
    called();
    let block = vec![1u8; mib << 20];
    Ok(hint::black_box(&block).iter().map(|b| u64::from(*b)).sum())
}

/// Emits `text` at info and warn level, and once each on stdout and stderr.
fn log_text(text: String) -> Result<(), String> {
    called();
    log::info!("{text}");
    log::warn!("{text}");
    println!("{text}");
    eprintln!("{text}");
    Ok(())
}

/// Arguments of [`log_fields`].
#[derive(Debug, Deserialize)]
struct LogFields {
    user: String,
    tries: u32,
}

/// Logs a record with key-value fields and prints a line on each output.
fn log_fields(args: LogFields) -> Result<(), String> {
    called();
    log::info!(user = args.user.as_str(), tries = args.tries; "login by {}", args.user);
    println!("out: {}", args.user);
    eprintln!("err: {}", args.tries);
    Ok(())
}

/// Logs a warning with a field, then fails with `message`: the record
/// travels with the error reply.
fn log_then_fail(message: String) -> Result<(), String> {
    called();
    log::warn!(reason = message.as_str(); "about to fail");
    Err(message)
}

/// Reads a file as text; the error is the I/O error's text.
fn read_file(path: String) -> Result<String, String> {
    called();
    fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))
}

/// Arguments of [`write_file`].
#[derive(Debug, Deserialize)]
struct WriteFile {
    path: String,
    contents: String,
}

/// Writes (creates or replaces) a file.
fn write_file(args: WriteFile) -> Result<(), String> {
    called();
    fs::write(&args.path, args.contents).map_err(|e| format!("writing {}: {e}", args.path))
}

/// A file that makes setup fail with its contents as the message, when the
/// daemon preopens a directory as `/control` and the file exists in it.
const SETUP_ERROR_FILE: &str = "/control/setup_error";

/// Counts the hook and draws this instance's id; fails if told to by
/// [`SETUP_ERROR_FILE`].
fn setup() -> Result<(), String> {
    SETUP_CALLS.fetch_add(1, Ordering::Relaxed);
    if let Ok(message) = fs::read_to_string(SETUP_ERROR_FILE) {
        return Err(message.trim().to_owned());
    }
    let id = getrandom::u64().map_err(|e| format!("drawing the instance id: {e}"))?;
    INSTANCE_ID.store(id, Ordering::Relaxed);
    Ok(())
}

/// Counts the hook.
fn checkout_done() -> Result<(), String> {
    CHECKOUT_DONE_CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

export! {
    methods: {
        "echo" => echo,
        "add" => add,
        "incr" => incr,
        "stats" => stats,
        "fail" => fail,
        "panic" => panic_with,
        "spin" => spin,
        "sleep_ms" => sleep_ms,
        "allocate" => allocate,
        "log" => log_text,
        "log_fields" => log_fields,
        "log_then_fail" => log_then_fail,
        "read_file" => read_file,
        "write_file" => write_file,
    },
    setup: setup,
    checkout_done: checkout_done,
}
