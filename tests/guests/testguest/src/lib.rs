//! The guest the end-to-end tests drive: one method per behaviour a worker
//! must handle (results, errors, state, traps, timeouts, blocking calls,
//! logs with fields and output, the filesystem sandbox) plus every hook,
//! counted; setup fails on demand through a control file.
//!
//! Counters live in statics, so they last as long as the worker instance and
//! tell the tests which instance answered and what ran on it.
//!
//! The init hook, run once per zygote (or once per worker without one),
//! leaves state that workers inherit and that `init_info` reports. What else
//! it does is set by environment variables, which the daemon passes with
//! `--env testguest:KEY=VALUE`; init handles them in this order:
//!
//! - `TG_INIT_SLEEP_MS=N`: sleeps N ms in a WASI call,
//! - `TG_INIT_READ=path`: reads the file and keeps it open, for
//!   `read_init_file`,
//! - `TG_INIT_TABLE_MIB=N`: builds a table of N MiB, every byte written,
//! - `TG_INIT_FAIL=message`: fails with the message,
//! - `TG_INIT_PANIC=message`: panics with the message,
//! - `TG_INIT_SPIN=1`: never returns.

use std::fmt::{Display, Write as _};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use std::{env, fs, hint, mem, thread};

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

/// Times the init hook ran in this instance's memory: 1 in a worker forked
/// from a zygote (the zygote ran it) and in a plain fork worker alike.
static INIT_CALLS: AtomicU64 = AtomicU64::new(0);
/// Random, drawn in init: the same in every worker of one zygote.
static INIT_TOKEN: AtomicU64 = AtomicU64::new(0);
/// Set to [`INIT_STATE`] by init and replaced by `poke`, to show that what
/// a worker writes stays in that worker.
static STATE: AtomicU64 = AtomicU64::new(0);
/// The table init builds when `TG_INIT_TABLE_MIB` is set; empty otherwise.
static TABLE: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// The file init read when `TG_INIT_READ` is set, still open.
static KEPT_FILE: Mutex<Option<KeptFile>> = Mutex::new(None);
/// The bytes the reseed hook was given in this worker.
static RESEED: Mutex<Option<[u8; 32]>> = Mutex::new(None);

/// The value init gives [`STATE`].
const INIT_STATE: u64 = 1000;

/// Counts a method call; every method starts with it.
fn called() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Returns its argument, whatever MessagePack value it is.
fn echo(value: rmpv::Value) -> Result<rmpv::Value, String> {
    called();
    Ok(value)
}

/// Arguments of [`swap_borrowed`], read in place from the request.
#[derive(Debug, Deserialize)]
struct Borrowed<'a> {
    name: &'a str,
    bytes: &'a serde_bytes::Bytes,
}

/// Answers with its arguments' two parts the other way round, without
/// copying them out of the request first.
fn swap_borrowed(args: Borrowed<'_>) -> Result<(&serde_bytes::Bytes, &str), String> {
    called();
    Ok((args.bytes, args.name))
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
    spin_forever()
}

/// A busy loop in pure wasm that makes no calls out of the guest.
fn spin_forever() -> ! {
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

/// Result of [`init_info`].
#[derive(Debug, Serialize)]
struct InitInfo {
    /// Times init ran in this instance's memory.
    init_calls: u64,
    /// The random number init drew.
    token: u64,
    /// Length of the init table in bytes; 0 without `TG_INIT_TABLE_MIB`.
    table_len: u64,
    /// Sum of the init table's bytes, wrapping.
    table_sum: u64,
    /// What init read from the `TG_INIT_READ` file.
    file: Option<String>,
    /// The reseed hook's bytes in hex; none if it has not run.
    reseed: Option<String>,
    /// The current value of [`STATE`].
    state: u64,
}

/// Reports what init left and what has become of it in this worker.
fn init_info(_: ()) -> Result<InitInfo, String> {
    called();
    let table = lock(&TABLE);
    Ok(InitInfo {
        init_calls: INIT_CALLS.load(Ordering::Relaxed),
        token: INIT_TOKEN.load(Ordering::Relaxed),
        table_len: table.len() as u64,
        table_sum: table.iter().fold(0u64, |sum, byte| sum.wrapping_add(u64::from(*byte))),
        file: lock(&KEPT_FILE).as_ref().map(|kept| kept.text.clone()),
        reseed: lock(&RESEED).as_ref().map(|seed| hex(seed)),
        state: STATE.load(Ordering::Relaxed),
    })
}

/// Sets [`STATE`] to `value` and returns its previous value.
fn poke(value: u64) -> Result<u64, String> {
    called();
    Ok(STATE.swap(value, Ordering::Relaxed))
}

/// Arguments of [`table_set`].
#[derive(Debug, Deserialize)]
struct TableSet {
    index: u64,
    value: u8,
}

/// Writes one byte of the init table and returns the byte it replaced.
fn table_set(args: TableSet) -> Result<u8, String> {
    called();
    let mut table = lock(&TABLE);
    let len = table.len();
    let byte = usize::try_from(args.index)
        .ok()
        .and_then(|index| table.get_mut(index))
        .ok_or_else(|| format!("index {} is outside the init table of {len} bytes", args.index))?;
    Ok(mem::replace(byte, args.value))
}

/// Draws 16 random bytes now, returned in hex.
fn random(_: ()) -> Result<String, String> {
    called();
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("drawing 16 random bytes: {e}"))?;
    Ok(hex(&bytes))
}

/// Reads the file init kept open again, from its start, through the same
/// descriptor: proof that a worker can use a file opened in the zygote.
fn read_init_file(_: ()) -> Result<String, String> {
    called();
    let mut kept = lock(&KEPT_FILE);
    let kept = kept.as_mut().ok_or("init kept no file open (TG_INIT_READ is not set)")?;
    let path = &kept.path;
    kept.file
        .seek(SeekFrom::Start(0))
        .map_err(|e| format!("seeking to the start of {path}: {e}"))?;
    let mut text = String::new();
    kept.file.read_to_string(&mut text).map_err(|e| format!("reading {path} again: {e}"))?;
    Ok(text)
}

/// A file read by init and kept open for [`read_init_file`].
#[derive(Debug)]
struct KeptFile {
    path: String,
    file: File,
    /// What init read from it.
    text: String,
}

/// Counts the hook, draws [`INIT_TOKEN`], sets [`STATE`], then does what the
/// `TG_INIT_*` variables ask, in the order the crate's docs list them.
fn init() -> Result<(), String> {
    INIT_CALLS.fetch_add(1, Ordering::Relaxed);
    let token = getrandom::u64().map_err(|e| format!("drawing the init token: {e}"))?;
    INIT_TOKEN.store(token, Ordering::Relaxed);
    STATE.store(INIT_STATE, Ordering::Relaxed);

    if let Some(ms) = env_number("TG_INIT_SLEEP_MS")? {
        thread::sleep(Duration::from_millis(ms));
    }
    if let Ok(path) = env::var("TG_INIT_READ") {
        *lock(&KEPT_FILE) = Some(read_and_keep(path)?);
    }
    if let Some(mib) = env_number("TG_INIT_TABLE_MIB")? {
        *lock(&TABLE) = build_table(mib)?;
    }

    if let Ok(message) = env::var("TG_INIT_FAIL") {
        return Err(message);
    }
    if let Ok(message) = env::var("TG_INIT_PANIC") {
        panic!("{message}");
    }
    if env::var("TG_INIT_SPIN").is_ok_and(|value| value == "1") {
        spin_forever();
    }
    Ok(())
}

/// Opens and reads the file at `path`, keeping it open.
fn read_and_keep(path: String) -> Result<KeptFile, String> {
    let mut file = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(KeptFile { path, file, text })
}

/// A table of `mib` MiB in which every byte is written, so that every page
/// of it is really in memory: byte `i` is `i % 251`.
fn build_table(mib: usize) -> Result<Vec<u8>, String> {
    let len =
        mib.checked_mul(1 << 20).ok_or_else(|| format!("a table of {mib} MiB is too large"))?;
    Ok((0..len).map(|i| (i % 251) as u8).collect())
}

/// Stores the bytes, for [`init_info`].
fn reseed(seed: [u8; 32]) {
    *lock(&RESEED) = Some(seed);
}

/// The environment variable `key` parsed as a number, if it is set.
fn env_number<T>(key: &str) -> Result<Option<T>, String>
where
    T: FromStr,
    T::Err: Display,
{
    let Ok(value) = env::var(key) else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|e| format!("parsing {key}={value}: {e}"))
}

/// Locks `mutex`, ignoring poisoning: a panic ends the worker
/// (wasm32-wasip1 aborts), so no guarded state is ever seen half-written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `bytes` in lower-case hex.
fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a `String` cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
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
        "swap_borrowed" => swap_borrowed,
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
        "init_info" => init_info,
        "poke" => poke,
        "table_set" => table_set,
        "random" => random,
        "read_init_file" => read_init_file,
    },
    init: init,
    reseed: reseed,
    setup: setup,
    checkout_done: checkout_done,
}
