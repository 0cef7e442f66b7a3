//! Loading, checking and pre-linking the modules the daemon serves.
//!
//! Everything here runs in the parent before the first fork, so every worker
//! inherits compiled code and starts by instantiating, never by compiling.
//! Each module gets an engine of its own, because the wasm stack size and
//! fuel metering are engine settings and differ between modules.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use wasmtime::{Config as EngineConfig, Engine, ExternType, InstancePre, Linker, Module, ValType};

use super::guest::{self, HostState};
use super::settings::{Limits, ModuleSettings};
use super::{Config, DirSpec, harden};

/// Address space each linear memory reserves up front, in bytes: 32-bit
/// memories then grow without moving and need no bounds checks.
pub const MEMORY_RESERVATION: u64 = 4 << 30;

/// Guard region on each side of a linear memory, in bytes.
pub const MEMORY_GUARD: u64 = 32 << 20;

/// Address space one linear memory takes, reservation and guards together.
pub const MEMORY_FOOTPRINT: u64 = MEMORY_RESERVATION + 2 * MEMORY_GUARD;

/// Room the host needs on the worker's main thread beside the wasm stack.
const HOST_STACK_ROOM: u64 = 1 << 20;

/// A module compiled, checked and linked, ready to instantiate in a worker.
pub struct LoadedModule {
    /// The name clients ask for.
    pub name: String,
    /// The engine it was compiled with; its epoch interrupts the guest.
    pub engine: Engine,
    /// Pre-resolved imports; instantiating from it is cheap.
    pub pre: InstancePre<HostState>,
    /// Directories this module's guests get, opened once at start-up.
    pub dirs: Vec<Preopen>,
    /// Which optional exports the module has.
    pub exports: OptionalExports,
    /// Limits, environment, arguments and determinism of its guests.
    pub settings: ModuleSettings,
}

/// A directory given to guests, opened by the daemon before the first fork.
///
/// Workers open it again through `/proc/self/fd`, so they get exactly the
/// directory that was there at start-up, whatever has been renamed or
/// replaced by a symlink along its host path since (a guest with write
/// access to a parent directory could otherwise redirect it).
pub struct Preopen {
    /// What the command line asked for.
    pub spec: DirSpec,
    /// The open directory.
    pub dir: OwnedFd,
}

impl Preopen {
    fn open(spec: &DirSpec) -> anyhow::Result<Preopen> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&spec.host)
            .with_context(|| format!("directory {spec}: opening {}", spec.host.display()))?;
        Ok(Preopen { spec: spec.clone(), dir: dir.into() })
    }

    /// The path a worker opens to reach this very directory.
    pub fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.dir.as_raw_fd())
    }
}

/// The optional parts of the ABI a module implements.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalExports {
    /// `_initialize`, the WASI reactor initializer.
    pub initialize: bool,
    /// `wasm_task_init`, run once before workers are forked from its state.
    pub init: bool,
    /// `wasm_task_setup`.
    pub setup: bool,
    /// `wasm_task_checkout_done`.
    pub checkout_done: bool,
    /// `wasm_task_methods`.
    pub methods: bool,
}

/// All modules of one daemon.
pub struct Modules {
    /// The modules, in command-line order.
    pub modules: Vec<LoadedModule>,
    /// Descriptors the loaded modules hold (their memory images); workers
    /// keep these and close everything else they inherit.
    pub fds: Vec<RawFd>,
}

impl Modules {
    /// Compiles and checks every module named in `config`.
    ///
    /// Fails on the first module that is missing, is not wasm, lacks a
    /// required export, imports something the daemon does not provide, or
    /// cannot run within its limits; the error names the file and the
    /// problem.
    pub fn load(config: &Config) -> anyhow::Result<Modules> {
        check_scopes(config)?;
        let fds_before = harden::open_fds();
        let mut modules: Vec<LoadedModule> = Vec::new();
        for spec in &config.modules {
            if modules.iter().any(|m| m.name == spec.name) {
                bail!("module name `{}` is given twice", spec.name);
            }
            let settings = config.settings.resolve(&spec.name);
            let (engine, pre, exports) = load_one(&spec.path, &settings, config.max_frame)
                .with_context(|| format!("loading module `{}`", spec.name))?;
            let dirs = config
                .dirs
                .iter()
                .filter(|d| d.applies_to(&spec.name))
                .map(Preopen::open)
                .collect::<anyhow::Result<_>>()?;
            let name = spec.name.clone();
            modules.push(LoadedModule { name, engine, pre, dirs, exports, settings });
        }
        for dir in &config.dirs {
            check_dir(dir, &modules)?;
        }
        let fds = harden::open_fds().into_iter().filter(|fd| !fds_before.contains(fd)).collect();
        Ok(Modules { modules, fds })
    }

    /// The module called `name`, if the daemon serves it.
    pub fn get(&self, name: &str) -> Option<&LoadedModule> {
        self.modules.iter().find(|m| m.name == name)
    }
}

/// The engine configuration a module with `settings` runs under.
fn new_engine(settings: &ModuleSettings) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new();
    // Deadlines are enforced by bumping the epoch from the worker's watchdog.
    config.epoch_interruption(true);
    config.consume_fuel(settings.limits.fuel.is_some());
    config.max_wasm_stack(settings.limits.stack);
    // Stated rather than left to defaults: the workers' RLIMIT_AS is
    // computed from them.
    config.memory_reservation(MEMORY_RESERVATION);
    config.memory_guard_size(MEMORY_GUARD);
    config.guard_before_linear_memory(true);
    if settings.seed.is_some() {
        // Deterministic runs: the same float results on every host.
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
    }
    // Compilation happens before any fork and must leave no threads behind,
    // since fork() carries only the calling thread into the child: the crate
    // is built without wasmtime's `parallel-compilation` feature for that.
    Ok(Engine::new(&config)?)
}

/// Compiles one module with an engine of its own and checks it against the
/// ABI and its limits.
fn load_one(
    path: &Path,
    settings: &ModuleSettings,
    max_frame: usize,
) -> anyhow::Result<(Engine, InstancePre<HostState>, OptionalExports)> {
    check_limits(&settings.limits, max_frame)?;
    let engine = new_engine(settings)?;
    let mut linker = Linker::new(&engine);
    guest::add_imports(&mut linker)?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let module = Module::new(&engine, &bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a valid wasm module or WAT text", path.display()))?;
    let exports = check_exports(&module).with_context(|| {
        format!(
            "{} does not implement the wasm-task guest ABI v1 (see docs/abi.md)",
            path.display()
        )
    })?;
    check_resources(&module, &settings.limits)
        .with_context(|| format!("{} cannot run within its limits", path.display()))?;
    // Build the initial memory image now, in the parent: every worker then
    // maps the same image instead of writing its own.
    module.initialize_copy_on_write_image()?;
    let pre = linker.instantiate_pre(&module).map_err(anyhow::Error::from).with_context(|| {
        format!("{} imports something the daemon does not provide", path.display())
    })?;
    Ok((engine, pre, exports))
}
const I32: &[ValType] = &[ValType::I32];

/// Checks the exports the ABI requires and notes the optional ones.
fn check_exports(module: &Module) -> anyhow::Result<OptionalExports> {
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        Some(_) => bail!("export `memory` is not a memory"),
        None => bail!("missing export `memory`"),
    }
    require_func(module, "wasm_task_abi_v1", &[], &[])?;
    if let Some(other) = module
        .exports()
        .map(|e| e.name())
        .find(|n| n.starts_with("wasm_task_abi_v") && *n != "wasm_task_abi_v1")
    {
        bail!("exports both `wasm_task_abi_v1` and `{other}`; a module declares one ABI version");
    }
    require_func(module, "wasm_task_alloc", I32, I32)?;
    require_func(module, "wasm_task_call", &[ValType::I32, ValType::I32, ValType::I32], I32)?;
    Ok(OptionalExports {
        initialize: optional_func(module, "_initialize", &[], &[])?,
        init: optional_func(module, "wasm_task_init", &[], I32)?,
        setup: optional_func(module, "wasm_task_setup", &[], I32)?,
        checkout_done: optional_func(module, "wasm_task_checkout_done", &[], I32)?,
        methods: optional_func(module, "wasm_task_methods", &[], I32)?,
    })
}

fn require_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> anyhow::Result<()> {
    if !optional_func(module, name, params, results)? {
        bail!("missing export `{name}`");
    }
    Ok(())
}

/// Whether `module` exports function `name`; an error if it does with another type.
fn optional_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> anyhow::Result<bool> {
    let Some(export) = module.get_export(name) else { return Ok(false) };
    let ExternType::Func(ty) = export else { bail!("export `{name}` is not a function") };
    let same = |got: &mut dyn ExactSizeIterator<Item = ValType>, want: &[ValType]| {
        got.len() == want.len() && got.zip(want).all(|(a, b)| ValType::eq(&a, b))
    };
    if !same(&mut ty.params(), params) || !same(&mut ty.results(), results) {
        bail!("export `{name}` has type {ty}, expected {}", describe(params, results));
    }
    Ok(true)
}

fn describe(params: &[ValType], results: &[ValType]) -> String {
    let list = |kind: &str, v: &[ValType]| {
        let types: Vec<_> = v.iter().map(|t| t.to_string()).collect();
        if types.is_empty() { String::new() } else { format!(" ({kind} {})", types.join(" ")) }
    };
    format!("(func{}{})", list("param", params), list("result", results))
}

/// A module whose memories or tables exceed the limits could never be
/// instantiated: say so at start-up rather than on every connection.
fn check_resources(module: &Module, limits: &Limits) -> anyhow::Result<()> {
    let (mut memories, mut tables) = (0, 0);
    let types = module.imports().map(|i| i.ty()).chain(module.exports().map(|e| e.ty()));
    for ty in types {
        match ty {
            ExternType::Memory(memory) => {
                memories += 1;
                let initial = memory.minimum().saturating_mul(memory.page_size());
                if initial > limits.memory as u64 {
                    bail!(
                        "a memory starts at {} KiB, above the memory limit of {} KiB",
                        initial >> 10,
                        limits.memory >> 10
                    );
                }
            }
            ExternType::Table(table) => {
                tables += 1;
                if table.minimum() > limits.table_elements as u64 {
                    bail!(
                        "a table starts with {} elements, above the limit of {}",
                        table.minimum(),
                        limits.table_elements
                    );
                }
            }
            _ => {}
        }
    }
    if memories > limits.memories {
        bail!("it has {memories} memories, above the limit of {}", limits.memories);
    }
    if tables > limits.tables {
        bail!("it has {tables} tables, above the limit of {}", limits.tables);
    }
    Ok(())
}

/// Limits that no worker could run with on this host.
fn check_limits(limits: &Limits, max_frame: usize) -> anyhow::Result<()> {
    if let Some(stack) = harden::stack_limit()
        && limits.stack as u64 + HOST_STACK_ROOM > stack
    {
        bail!(
            "a wasm stack of {} KiB does not fit the main thread's stack of {} KiB \
             (RLIMIT_STACK) with {} KiB left for the host",
            limits.stack >> 10,
            stack >> 10,
            HOST_STACK_ROOM >> 10
        );
    }
    // Measured: a worker maps 100-250 MiB beyond its start while serving;
    // a request, its reply and the reply's encoding can be in memory at once.
    let needed = 256 * (1 << 20) + 3 * max_frame as u64;
    if limits.host_memory < needed {
        bail!(
            "host-memory of {} MiB is below the {} MiB a worker needs with frames of up to {} bytes",
            limits.host_memory >> 20,
            needed >> 20,
            max_frame
        );
    }
    Ok(())
}

/// Every module named by a setting must be served.
fn check_scopes(config: &Config) -> anyhow::Result<()> {
    for (flag, name) in config.settings.modules_named() {
        if !config.modules.iter().any(|m| m.name == name) {
            bail!("{flag} names module `{name}`, which is not served");
        }
    }
    Ok(())
}

/// A preopen must name a served module. (That its host path is a directory
/// was checked when [`Preopen::open`] opened it for the modules it serves.)
fn check_dir(dir: &DirSpec, modules: &[LoadedModule]) -> anyhow::Result<()> {
    if let Some(name) = &dir.module
        && !modules.iter().any(|m| &m.name == name)
    {
        bail!("directory {dir} is for module `{name}`, which is not served");
    }
    Ok(())
}
