//! One guest instance and the ABI spoken with it (see `docs/abi.md`).

use std::convert::Infallible;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::{StdRng, SysRng};
use rand::{Rng, SeedableRng, TryCryptoRng, TryRng};
use wasmtime::{
    Caller, Extern, Instance, Linker, Memory, ResourceLimiter, Store, Trap, TypedFunc,
    WasmBacktrace,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, I32Exit, WasiCtxBuilder};

use super::capture::Capture;
use super::modules::LoadedModule;
use super::settings::Limits;
use crate::protocol::{ErrorKind, ErrorReply, LogRecord};

/// Log records kept per call; beyond this they are counted and dropped.
const MAX_LOG_RECORDS: usize = 1000;

/// Bytes kept of one record's message (and of a trap message); the rest is cut.
const MAX_MESSAGE_BYTES: usize = 16 << 10;

/// Bytes kept of a trap's backtrace (frames carry guest-chosen names).
const MAX_BACKTRACE_BYTES: usize = 64 << 10;

/// Bytes kept of one record's target.
const MAX_TARGET_BYTES: usize = 256;

/// Bytes of log records kept per call, at most; see [`log_budget`].
const MAX_LOG_BYTES: usize = 1 << 20;

/// Bytes of method names a guest may declare.
const MAX_METHOD_LIST_BYTES: usize = 64 << 10;

/// Status values of the reply record.
const STATUS_OK: u32 = 0;
const STATUS_ERROR: u32 = 1;
const STATUS_UNKNOWN_METHOD: u32 = 2;

/// The per-instance state the host keeps in the wasmtime store.
pub struct HostState {
    wasi: WasiP1Ctx,
    limits: Limiter,
    call_start: Instant,
    logs: Vec<LogRecord>,
    logs_dropped: usize,
    /// The host's own remarks about the call (output or records dropped).
    notes: Vec<String>,
    /// Bytes of `logs`, and the most allowed per call.
    log_bytes: usize,
    log_limit: usize,
    trap_message: Option<String>,
    stdout: Capture,
    stderr: Capture,
}

/// Memory and table limits, remembering whether the guest ran into them.
struct Limiter {
    limits: Limits,
    hit: Option<String>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let max = self.limits.memory;
        if desired > max {
            self.hit = Some(format!(
                "memory: growing a linear memory from {} KiB to {} KiB would pass the limit of {} KiB",
                current >> 10,
                desired >> 10,
                max >> 10
            ));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let max = self.limits.table_elements;
        if desired > max {
            self.hit = Some(format!(
                "table: growing a table from {current} to {desired} elements would pass the limit of {max}"
            ));
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        self.limits.tables
    }

    fn memories(&self) -> usize {
        self.limits.memories
    }
}

/// The guest broke the ABI: a pointer or length outside its memory, a bad status.
#[derive(Debug, thiserror::Error)]
#[error("guest broke the ABI: {0}")]
struct AbiViolation(String);

fn violation(msg: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(AbiViolation(msg.into()))
}

/// Defines WASI preview 1 and the `wasm_task` imports in `linker`.
pub fn add_imports(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    /// Reads the key-value fields of a `log_fields` record: for each field,
    /// a little-endian `u32` length and the key, then the same for the
    /// value. The first 64 fields are kept.
    fn decode_fields(mut bytes: &[u8]) -> wasmtime::Result<Vec<(String, String)>> {
        const MAX_FIELDS: usize = 64;
        let mut fields = Vec::new();
        while !bytes.is_empty() {
            let key = take_item(&mut bytes)?;
            let value = take_item(&mut bytes)?;
            if fields.len() < MAX_FIELDS {
                fields.push((lossy(key, MAX_TARGET_BYTES), lossy(value, MAX_MESSAGE_BYTES)));
            }
        }
        Ok(fields)
    }

    /// Splits one length-prefixed item off the front of `bytes`.
    fn take_item<'a>(bytes: &mut &'a [u8]) -> wasmtime::Result<&'a [u8]> {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| violation("log fields: a length is cut short"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(violation(format!(
                "log fields: an item of {len} bytes overruns the {} bytes left",
                rest.len()
            )));
        }
        let (item, rest) = rest.split_at(len);
        *bytes = rest;
        Ok(item)
    }

    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut HostState| &mut s.wasi)?;
    linker.func_wrap(
        "wasm_task",
        "log",
        |mut caller: Caller<'_, HostState>, level: i32, tp: i32, tl: i32, mp: i32, ml: i32| {
            let mem = caller_memory(&mut caller)?;
            let (data, state) = mem.data_and_store_mut(&mut caller);
            let target = slice(data, tp, tl)?;
            let message = slice(data, mp, ml)?;
            state.push_log(level.clamp(1, 5) as u8, target, message, Vec::new());
            Ok(())
        },
    )?;
    linker.func_wrap(
        "wasm_task",
        "log_fields",
        |mut caller: Caller<'_, HostState>,
         level: i32,
         tp: i32,
         tl: i32,
         mp: i32,
         ml: i32,
         fp: i32,
         fl: i32| {
            let mem = caller_memory(&mut caller)?;
            let (data, state) = mem.data_and_store_mut(&mut caller);
            let target = slice(data, tp, tl)?;
            let message = slice(data, mp, ml)?;
            let fields = decode_fields(slice(data, fp, fl)?)?;
            state.push_log(level.clamp(1, 5) as u8, target, message, fields);
            Ok(())
        },
    )?;
    linker.func_wrap(
        "wasm_task",
        "trap_message",
        |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| {
            let mem = caller_memory(&mut caller)?;
            let message = lossy(slice(mem.data(&caller), ptr, len)?, MAX_MESSAGE_BYTES);
            caller.data_mut().trap_message = Some(message);
            Ok(())
        },
    )?;
    Ok(())
}

fn caller_memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(violation("no exported memory")),
    }
}

/// The bytes `[ptr, ptr + len)` of `data`, or an ABI violation.
fn slice(data: &[u8], ptr: i32, len: i32) -> wasmtime::Result<&[u8]> {
    let at = range(data.len(), ptr as u32, len as u32).map_err(violation)?;
    Ok(&data[at])
}

/// `[ptr, ptr + len)` if it lies inside a memory of `size` bytes.
fn range(size: usize, ptr: u32, len: u32) -> Result<Range<usize>, String> {
    let (start, len) = (ptr as usize, len as usize);
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(format!("bytes {start}+{len} lie outside its {size}-byte memory")),
    }
}

/// Text from guest bytes: invalid UTF-8 replaced, cut to `max` bytes.
fn lossy(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len() > max;
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    if cut {
        text.push_str(" [truncated]");
    }
    text
}

/// Bytes of log records a call may produce with frames of at most `max_frame`
/// bytes: a quarter of a frame, so that records never crowd out a result.
pub fn log_budget(max_frame: usize) -> usize {
    MAX_LOG_BYTES.min(max_frame / 4)
}

impl HostState {
    /// Keeps one log record, within the per-call bounds; counts it as
    /// dropped beyond them.
    fn push_log(
        &mut self,
        level: u8,
        target: &[u8],
        message: &[u8],
        fields: Vec<(String, String)>,
    ) {
        let target = lossy(target, MAX_TARGET_BYTES);
        let message = lossy(message, MAX_MESSAGE_BYTES);
        let size = target.len()
            + message.len()
            + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if self.logs.len() >= MAX_LOG_RECORDS || self.log_bytes + size > self.log_limit {
            self.logs_dropped += 1;
            return;
        }
        self.log_bytes += size;
        let at_us = self.call_start.elapsed().as_micros() as u64;
        self.logs.push(LogRecord { level, target, message, fields, at_us });
    }
}

/// What a successful call returned: a range of guest memory holding the result.
pub type ReplyBytes = Range<usize>;

/// A live guest instance with its ABI entry points resolved.
pub struct Guest {
    store: Store<HostState>,
    instance: Instance,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    call: TypedFunc<(i32, i32, i32), i32>,
    checkout_done: Option<TypedFunc<(), i32>>,
}

/// A store with the guest's host state, before the module is instantiated.
///
/// Building it opens the preopened directories; nothing of the guest has run
/// yet, so the worker can still lock itself down before [`Prepared::instantiate`].
pub struct Prepared {
    store: Store<HostState>,
}

impl Prepared {
    /// Builds the store for a guest of `module`, whose log records may take
    /// `log_limit` bytes per call.
    pub fn new(module: &LoadedModule, log_limit: usize) -> Result<Prepared, ErrorReply> {
        let state = new_state(module, log_limit).map_err(|e| setup_error(format!("{e:#}")))?;
        let mut store = Store::new(&module.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(1);
        if let Some(fuel) = module.settings.limits.fuel {
            store.set_fuel(fuel).expect("the module's engine meters fuel");
        }
        Ok(Prepared { store })
    }

    /// Instantiates `module` and runs `_initialize` if it has one.
    ///
    /// Setup is a separate step ([`Guest::setup`]) so the caller can tell
    /// the two failures apart.
    pub fn instantiate(self, module: &LoadedModule) -> Result<Guest, ErrorReply> {
        let mut store = self.store;
        let instance = module.pre.instantiate(&mut store).map_err(|e| {
            let mut err = classify(&mut store, e);
            err.message = format!("instantiating the module: {}", err.message);
            err
        })?;
        // The export types were checked when the module was loaded.
        let memory = instance.get_memory(&mut store, "memory").expect("checked at load");
        let alloc =
            instance.get_typed_func(&mut store, "wasm_task_alloc").expect("checked at load");
        let call = instance.get_typed_func(&mut store, "wasm_task_call").expect("checked at load");
        let checkout_done = instance.get_typed_func(&mut store, "wasm_task_checkout_done").ok();
        let mut guest = Guest { store, instance, memory, alloc, call, checkout_done };

        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut guest.store, "_initialize") {
            guest.begin();
            init.call(&mut guest.store, ()).map_err(|e| guest.error(e))?;
        }
        Ok(guest)
    }
}

impl Guest {
    /// Builds and instantiates a guest of `module` in this process in one
    /// step, without walling anything in (for embedding and benchmarks; a
    /// worker locks itself down between [`Prepared::new`] and
    /// [`Prepared::instantiate`]).
    pub fn instantiate(module: &LoadedModule, log_limit: usize) -> Result<Guest, ErrorReply> {
        Prepared::new(module, log_limit)?.instantiate(module)
    }

    /// Asks the guest for its method names, if it exports `wasm_task_methods`.
    pub fn methods(&mut self, module: &LoadedModule) -> Result<Vec<String>, ErrorReply> {
        if !module.exports.methods {
            return Ok(Vec::new());
        }
        let reply = self.hook("wasm_task_methods")?;
        if reply.len() > MAX_METHOD_LIST_BYTES {
            let msg =
                format!("method list of {} bytes exceeds {MAX_METHOD_LIST_BYTES}", reply.len());
            return Err(abi_error(&msg));
        }
        let text = std::str::from_utf8(&self.data()[reply])
            .map_err(|_| abi_error("method list is not UTF-8"))?;
        Ok(text.split('\n').filter(|m| !m.is_empty()).map(str::to_owned).collect())
    }

    /// Runs the guest's init hook, if it has one: once per zygote, or once
    /// per worker when the module's workers are plain forks.
    pub fn init(&mut self, module: &LoadedModule) -> Result<(), ErrorReply> {
        if module.exports.init {
            self.hook("wasm_task_init").map_err(|mut e| {
                if e.kind == ErrorKind::GuestError {
                    e.kind = ErrorKind::SetupFailed;
                }
                e.message = format!("init hook: {}", e.message);
                e
            })?;
        }
        Ok(())
    }

    /// Runs the guest's setup hook, if it has one.
    pub fn setup(&mut self, module: &LoadedModule) -> Result<(), ErrorReply> {
        if module.exports.setup {
            self.hook("wasm_task_setup").map_err(|mut e| {
                if e.kind == ErrorKind::GuestError {
                    e.kind = ErrorKind::SetupFailed;
                }
                e
            })?;
        }
        Ok(())
    }

    /// Runs the guest's checkout-done hook, if it has one.
    pub fn checkout_done(&mut self) -> Result<(), ErrorReply> {
        let Some(hook) = self.checkout_done.clone() else { return Ok(()) };
        self.begin();
        let record = hook.call(&mut self.store, ()).map_err(|e| self.error(e))?;
        self.read_record(record, "").map_err(|mut e| {
            if !e.kind.is_fatal() {
                e.kind = ErrorKind::CheckoutDoneFailed;
            }
            e
        })?;
        Ok(())
    }

    /// Calls `method` with MessagePack `args`; on success the result is in
    /// guest memory at the returned range (see [`Guest::data`]).
    pub fn call(&mut self, method: &str, args: &[u8]) -> Result<ReplyBytes, ErrorReply> {
        self.begin();
        let (ml, al) = (method.len(), args.len());
        let total = i32::try_from(ml + al).map_err(|_| abi_error("request above 2 GiB"))?;
        let buf = self.alloc.call(&mut self.store, total).map_err(|e| self.error(e))?;
        if buf == 0 && total > 0 {
            return Err(ErrorReply {
                kind: ErrorKind::Limit,
                message: format!("guest could not allocate {total} bytes for the request"),
                backtrace: None,
            });
        }

        let at = range(self.memory.data_size(&self.store), buf as u32, total as u32)
            .map_err(|m| abi_error(&format!("request buffer: {m}")))?;
        let mem = &mut self.memory.data_mut(&mut self.store)[at];
        mem[..ml].copy_from_slice(method.as_bytes());
        mem[ml..].copy_from_slice(args);

        let record = self
            .call
            .call(&mut self.store, (buf, ml as i32, al as i32))
            .map_err(|e| self.error(e))?;
        self.read_record(record, method)
    }

    /// The guest's memory, where [`Guest::call`] results live.
    pub fn data(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// Fuel the last guest entry consumed, when the module meters fuel.
    pub fn fuel_used(&self) -> Option<u64> {
        let budget = self.store.data().limits.limits.fuel?;
        let left = self.store.get_fuel().ok()?;
        Some(budget.saturating_sub(left))
    }

    /// Takes the log records and output lines made since the last call began.
    pub fn take_logs(&mut self) -> Vec<LogRecord> {
        let state = self.store.data_mut();
        let drained = [("stdout", state.stdout.drain()), ("stderr", state.stderr.drain())];
        for (target, drained) in drained {
            for line in drained.lines {
                state.push_log(3, target.as_bytes(), line.as_bytes(), Vec::new());
            }
            if drained.dropped > 0 {
                let note = format!("{} bytes of {target} dropped (limit reached)", drained.dropped);
                state.notes.push(note);
            }
        }
        let dropped = std::mem::take(&mut state.logs_dropped);
        if dropped > 0 {
            state.notes.push(format!(
                "{dropped} log records dropped (limits: {MAX_LOG_RECORDS} records, {} bytes per call)",
                state.log_limit
            ));
        }
        let mut logs = std::mem::take(&mut state.logs);
        if !state.notes.is_empty() {
            let at_us = state.call_start.elapsed().as_micros() as u64;
            logs.extend(state.notes.drain(..).map(|note| record(2, "wasm_task", note, at_us)));
        }
        state.log_bytes = 0;
        logs
    }

    /// Starts the bookkeeping of one guest entry: its own epoch deadline
    /// (the watchdog bumps the epoch once when the entry's time is up) and
    /// its own fuel budget.
    fn begin(&mut self) {
        let state = self.store.data_mut();
        state.call_start = Instant::now();
        state.trap_message = None;
        // A refused growth the guest handled earlier says nothing about
        // how this entry ends.
        state.limits.hit = None;
        let fuel = state.limits.limits.fuel;
        self.store.set_epoch_deadline(1);
        if let Some(fuel) = fuel {
            self.store.set_fuel(fuel).expect("the module's engine meters fuel");
        }
    }

    fn hook(&mut self, name: &str) -> Result<ReplyBytes, ErrorReply> {
        self.begin();
        let func = self
            .instance
            .get_typed_func::<(), i32>(&mut self.store, name)
            .map_err(|e| abi_error(&format!("export `{name}`: {e}")))?;
        let record = func.call(&mut self.store, ()).map_err(|e| self.error(e))?;
        self.read_record(record, "")
    }

    /// Reads and checks the reply record at `addr`.
    fn read_record(&self, addr: i32, method: &str) -> Result<ReplyBytes, ErrorReply> {
        let data = self.data();
        let at = range(data.len(), addr as u32, 12)
            .map_err(|m| abi_error(&format!("reply record: {m}")))?;
        if at.start % 4 != 0 {
            return Err(abi_error(&format!("reply record at {addr} is not 4-byte aligned")));
        }
        let word = |i: usize| u32::from_le_bytes(data[at.start + 4 * i..][..4].try_into().unwrap());
        let (status, ptr, len) = (word(0), word(1), word(2));
        let bytes = range(data.len(), ptr, len).map_err(|m| abi_error(&format!("reply: {m}")))?;
        let text = || lossy(&data[bytes.clone()], MAX_MESSAGE_BYTES);
        match status {
            STATUS_OK => Ok(bytes),
            STATUS_ERROR => Err(ErrorReply::new(ErrorKind::GuestError, text())),
            STATUS_UNKNOWN_METHOD => {
                let detail = text();
                let message = if method.is_empty() {
                    format!("a hook answered with status 2 (unknown method): {detail}")
                } else if detail.is_empty() {
                    format!("no method `{method}`")
                } else {
                    format!("no method `{method}`: {detail}")
                };
                Err(ErrorReply::new(ErrorKind::UnknownMethod, message))
            }
            other => Err(abi_error(&format!("unknown reply status {other}"))),
        }
    }

    /// Turns a failed guest entry into the error reported to the client.
    fn error(&mut self, err: wasmtime::Error) -> ErrorReply {
        classify(&mut self.store, err)
    }
}

fn record(level: u8, target: &str, message: String, at_us: u64) -> LogRecord {
    LogRecord { level, target: target.into(), message, fields: Vec::new(), at_us }
}

/// What a deterministic guest's wall clock always reads:
/// 2000-01-01T00:00:00Z.
pub const FIXED_WALL_CLOCK: Duration = Duration::from_secs(946_684_800);

/// How far a deterministic guest's monotonic clock moves at each reading.
pub const MONOTONIC_STEP: Duration = Duration::from_millis(1);

/// A wall clock that never moves.
struct FixedClock;

impl HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        FIXED_WALL_CLOCK
    }
}

/// A monotonic clock that moves only when read, by a fixed step: the same
/// reads give the same times, and a guest waiting in a loop still sees time
/// pass.
struct SteppingClock(AtomicU64);

impl HostMonotonicClock for SteppingClock {
    fn resolution(&self) -> u64 {
        MONOTONIC_STEP.as_nanos() as u64
    }

    fn now(&self) -> u64 {
        let step = MONOTONIC_STEP.as_nanos() as u64;
        self.0.fetch_add(step, Ordering::Relaxed) + step
    }
}

fn new_state(module: &LoadedModule, log_limit: usize) -> anyhow::Result<HostState> {
    let settings = &module.settings;
    let stdout = Capture::new(settings.limits.output);
    let stderr = Capture::new(settings.limits.output);
    let mut wasi = WasiCtxBuilder::new();
    // The worker is single-threaded and synchronous: let WASI block this
    // thread instead of hopping through an async runtime for every file call.
    wasi.allow_blocking_current_thread(true);
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    wasi.envs(&settings.env).args(&settings.args);
    match settings.seed {
        Some(seed) => make_deterministic(&mut wasi, seed),
        None => draw_from_the_kernel(&mut wasi),
    }
    for dir in &module.dirs {
        let perms = if dir.spec.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
        wasi.preopened_dir(dir.path(), &dir.spec.guest, perms)
            .map_err(anyhow::Error::from)
            .map_err(|e| e.context(format!("opening directory {}", dir.spec)))?;
    }
    Ok(HostState {
        wasi: wasi.build_p1(),
        limits: Limiter { limits: settings.limits.clone(), hit: None },
        call_start: Instant::now(),
        logs: Vec::new(),
        logs_dropped: 0,
        notes: Vec::new(),
        log_bytes: 0,
        log_limit,
        trap_message: None,
        stdout,
        stderr,
    })
}

/// Random numbers from a generator of this process's own, seeded from the
/// kernel.
///
/// WASI's default generators are seeded once, when the context is built, so
/// every worker forked from one zygote would draw the same numbers. (The
/// `insecure-seed` value is fixed when the context is built too; WASI
/// preview 1 has no way to read it.)
fn draw_from_the_kernel(wasi: &mut WasiCtxBuilder) {
    wasi.secure_random(ProcessRng::default()).insecure_random(ProcessRng::default());
}

/// Bumped in every process forked for guests (see [`forked`]), so that a
/// generator can tell it now draws in another process without asking the
/// kernel at each draw (WASI draws a byte at a time).
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Marks this process as freshly forked from the daemon or a zygote: the
/// random generators it inherited seed themselves afresh before their next
/// draw. Called first thing in every such child.
pub fn forked() {
    FORKS.fetch_add(1, Ordering::Relaxed);
    rand::rng().reseed().ok();
}

/// A ChaCha generator seeded from the kernel in the process that draws from
/// it: in a forked child it seeds itself afresh before its first draw there.
#[derive(Default)]
struct ProcessRng {
    /// The generator, and [`FORKS`] when it was seeded.
    seeded: Option<(StdRng, u64)>,
}

impl ProcessRng {
    fn rng(&mut self) -> &mut StdRng {
        let forks = FORKS.load(Ordering::Relaxed);
        if self.seeded.as_ref().is_none_or(|(_, seeded_at)| *seeded_at != forks) {
            let rng = StdRng::try_from_rng(&mut SysRng)
                .unwrap_or_else(|_| StdRng::from_rng(&mut rand::rng()));
            self.seeded = Some((rng, forks));
        }
        &mut self.seeded.as_mut().expect("seeded above").0
    }
}

impl TryRng for ProcessRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.rng().next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.rng().next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.rng().fill_bytes(dst);
        Ok(())
    }
}

impl TryCryptoRng for ProcessRng {}

/// Fixed clocks and random numbers drawn from `seed`, for runs that repeat.
fn make_deterministic(wasi: &mut WasiCtxBuilder, seed: u64) {
    wasi.wall_clock(FixedClock)
        .monotonic_clock(SteppingClock(AtomicU64::new(0)))
        .secure_random(StdRng::seed_from_u64(seed))
        .insecure_random(StdRng::seed_from_u64(seed.rotate_left(32)))
        .insecure_random_seed(u128::from(seed));
}

fn classify(store: &mut Store<HostState>, err: wasmtime::Error) -> ErrorReply {
    let state = store.data_mut();
    let backtrace = err
        .downcast_ref::<WasmBacktrace>()
        .map(|bt| lossy(bt.to_string().as_bytes(), MAX_BACKTRACE_BYTES));
    let trap_message = state.trap_message.take();
    let (kind, message) = if let Some(v) = err.downcast_ref::<AbiViolation>() {
        (ErrorKind::Protocol, v.to_string())
    } else if let Some(exit) = err.downcast_ref::<I32Exit>() {
        (ErrorKind::GuestTrap, format!("guest exited with proc_exit({})", exit.0))
    } else if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        (ErrorKind::Timeout, "guest interrupted at the call's deadline".to_owned())
    } else if let Some(Trap::OutOfFuel) = err.downcast_ref::<Trap>() {
        let budget = state.limits.limits.fuel.unwrap_or_default();
        (ErrorKind::Limit, format!("fuel: the budget of {budget} units per call ran out"))
    } else if let Some(limit) = state.limits.hit.take() {
        (ErrorKind::Limit, limit)
    } else if let Some(Trap::StackOverflow) = err.downcast_ref::<Trap>() {
        let stack = state.limits.limits.stack >> 10;
        (
            ErrorKind::GuestTrap,
            format!("wasm trap: call stack exhausted (the stack limit is {stack} KiB)"),
        )
    } else if let Some(trap) = err.downcast_ref::<Trap>() {
        let message = match trap_message {
            Some(m) => format!("{m} ({trap})"),
            None => trap.to_string(),
        };
        (ErrorKind::GuestTrap, message)
    } else {
        (ErrorKind::GuestTrap, format!("{err:#}"))
    };
    ErrorReply { kind, message, backtrace }
}

fn abi_error(msg: &str) -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::Protocol,
        message: format!("guest broke the ABI: {msg}"),
        backtrace: None,
    }
}

/// A failure to set a guest up, or a module's workers.
pub fn setup_error(message: String) -> ErrorReply {
    ErrorReply::new(ErrorKind::SetupFailed, message)
}
